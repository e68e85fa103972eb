//! Criterion benchmarks of the CPU kernels on the TinyLlama-1.1B shape, each beside its bound
//! measured in the same run:
//!
//! * `decode/read-…` — the memory-read bound: [`weir_kernels::probe`] over as many bytes as the
//!   decode matmul streams, one stream per task (`sequential`) and eight side by side with a
//!   prefetch (`tiled`); throughput in bytes, so criterion prints GB/s for both;
//! * `decode/…` — matrix-vector (one token) over weights cycled through a set larger than the
//!   caches, bf16 and f32, 1 and 2 threads;
//! * `decode-step/…` — one decode step's matrix-vector products over a whole TinyLlama-shaped
//!   bf16 weight set (2.07 GB, the engine's mix of shapes), beside the read probe over as many
//!   bytes;
//! * `gemm/…` — matrix-matrix at 8 to 512 tokens, bf16 (f16 from 32, f32 at 512) (throughput in
//!   floating-point operations: criterion's "elem/s" are FLOP/s);
//! * `gemm/fma-peak` — the FMA peak of the lane's cores (an unrolled register-only loop);
//! * `attention/…` — one new token over a 512-position context (f32 and bf16 cache), 32
//!   sequences of 100–720 positions decoding in one call, and a 512-token prompt block.
//!
//! `cargo bench --bench kernels` (add `-- decode` etc. to pick). `WEIR_CPU_ISA` picks the path.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use weir_kernels::attention::{attend_batch, AttnShape, KvBlocks, KvData, KvType, SeqAttn};
use weir_kernels::probe::{self, ReadPattern};
use weir_kernels::{matmul, Parallel, WeightView};
use weir_runtime::WorkerPool;

/// TinyLlama-1.1B: hidden 2048, MLP 5632, 32 heads / 4 KV heads of 64.
const HIDDEN: usize = 2048;
const MLP: usize = 5632;

fn pool(threads: usize) -> WorkerPool {
    let cores = weir_runtime::lane::allowed_cpus();
    let threads = threads.clamp(1, cores.len());
    WorkerPool::new("bench", &cores[1..threads]).expect("worker pool")
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Enough `[MLP, HIDDEN]` matrices that cycling through them misses every cache (≥ 256 MB).
fn matrices<T: Clone>(one: &[T], bytes_each: usize) -> Vec<Vec<T>> {
    let count = (256usize << 20).div_ceil(bytes_each).max(2);
    (0..count).map(|_| one.to_vec()).collect()
}

fn decode(c: &mut Criterion) {
    let w32 = random(MLP * HIDDEN, 1);
    let w16: Vec<u16> = w32.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
    let set32 = matrices(&w32, w32.len() * 4);
    let set16 = matrices(&w16, w16.len() * 2);
    // Per weight type: its copies, and as many bytes of plain f32 to read for the bound.
    let kinds: Vec<(&str, usize, Vec<WeightView>)> = vec![
        ("bf16", w16.len() * 2, set16.iter().map(|w| WeightView::Bf16(w)).collect()),
        ("f32", w32.len() * 4, set32.iter().map(|w| WeightView::F32(w)).collect()),
    ];
    let words: Vec<Vec<Vec<f32>>> =
        kinds.iter().map(|(_, bytes, _)| matrices(&vec![1f32; bytes / 4], *bytes)).collect();
    let x = random(HIDDEN, 2);
    let mut y = vec![0f32; MLP];
    let mut g = c.benchmark_group("decode");
    for threads in [1, 2] {
        let par = pool(threads);
        for ((name, bytes, views), words) in kinds.iter().zip(&words) {
            g.throughput(Throughput::Bytes(*bytes as u64));
            // The bound: reading the same bytes, one stream per task or eight side by side.
            for pattern in ReadPattern::ALL {
                let mut i = 0;
                g.bench_function(BenchmarkId::new(format!("read-{name}-{}", pattern.name()), threads), |b| {
                    b.iter(|| {
                        i = (i + 1) % words.len();
                        black_box(probe::read(&words[i], pattern, &par))
                    })
                });
            }
            let mut i = 0;
            g.bench_function(BenchmarkId::new(format!("matvec-{name}"), threads), |b| {
                b.iter(|| {
                    i = (i + 1) % views.len();
                    matmul::matmul(&x, 1, views[i], MLP, None, &mut y, &par);
                    black_box(&y);
                })
            });
        }
    }
    g.finish();
}

/// One decode step's matrix-vector products over a whole TinyLlama-shaped bf16 weight set
/// (22 layers of q, k, v, o, gate, up, down, and the LM head: 2.07 GB), as the engine runs
/// them, beside the read probe over as many bytes. One shape cycled through copies (`decode`
/// above) caches and prefetches differently from this mix; the engine sees this one.
fn decode_step(c: &mut Criterion) {
    // [out, in] of q, k, v, o, gate, up, down (4 KV heads of 64).
    let layer =
        [(HIDDEN, HIDDEN), (256, HIDDEN), (256, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)];
    let mut shapes: Vec<(usize, usize)> = (0..22).flat_map(|_| layer).collect();
    shapes.push((32000, HIDDEN));
    // Values do not change the speed: a cheap pattern of normal bf16 numbers.
    let ws: Vec<Vec<u16>> =
        shapes.iter().map(|&(n, k)| (0..n * k).map(|i| 0x3c00u16 + (i % 251) as u16).collect()).collect();
    let bytes: usize = ws.iter().map(|w| w.len() * 2).sum();
    let words = vec![1f32; bytes / 4];
    let x = random(MLP, 2);
    let mut y = vec![0f32; 32000];
    let mut g = c.benchmark_group("decode-step");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes as u64));
    let par = pool(2);
    for pattern in ReadPattern::ALL {
        g.bench_function(BenchmarkId::new(format!("read-{}", pattern.name()), 2), |b| {
            b.iter(|| black_box(probe::read(&words, pattern, &par)))
        });
    }
    g.bench_function(BenchmarkId::new("matvec-bf16", 2), |b| {
        b.iter(|| {
            for (w, &(n, k)) in ws.iter().zip(&shapes) {
                matmul::matmul(&x[..k], 1, WeightView::Bf16(w), n, None, &mut y[..n], &par);
            }
            black_box(&y);
        })
    });
    g.finish();
}

fn gemm(c: &mut Criterion) {
    let w32 = random(MLP * HIDDEN, 3);
    let w16: Vec<u16> = w32.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
    let wh: Vec<u16> = w32.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
    let par = pool(2);
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10);
    // The FMA peak of these cores: 12 independent 8-wide FMA chains per thread.
    let rounds = 1usize << 22;
    g.throughput(Throughput::Elements((par.threads() * rounds * 12 * 8 * 2) as u64));
    g.bench_function("fma-peak", |b| b.iter(|| black_box(fma_peak(rounds, &par))));
    for t in [8, 32, 64, 128, 512] {
        let x = random(t * HIDDEN, 4);
        let mut y = vec![0f32; t * MLP];
        g.throughput(Throughput::Elements((2 * t * HIDDEN * MLP) as u64));
        g.bench_function(BenchmarkId::new("bf16", t), |b| {
            b.iter(|| {
                matmul::matmul(&x, t, WeightView::Bf16(&w16), MLP, None, &mut y, &par);
                black_box(&y);
            })
        });
        if t >= 32 {
            g.bench_function(BenchmarkId::new("f16", t), |b| {
                b.iter(|| {
                    matmul::matmul(&x, t, WeightView::F16(&wh), MLP, None, &mut y, &par);
                    black_box(&y);
                })
            });
        }
        if t == 512 {
            g.bench_function(BenchmarkId::new("f32", t), |b| {
                b.iter(|| {
                    matmul::matmul(&x, t, WeightView::F32(&w32), MLP, None, &mut y, &par);
                    black_box(&y);
                })
            });
        }
    }
    g.finish();
}

fn fma_peak(rounds: usize, par: &dyn Parallel) -> f32 {
    let out: Vec<std::sync::Mutex<f32>> = (0..par.threads()).map(|_| Default::default()).collect();
    par.run(par.threads(), &|i| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            *out[i].lock().unwrap() = unsafe { fma_loop(rounds) };
        }
    });
    out.iter().map(|p| *p.lock().unwrap()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop(rounds: usize) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..rounds {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    lanes.iter().sum()
}

fn attention(c: &mut Criterion) {
    let shape = AttnShape { heads: 32, kv_heads: 4, head_dim: 64 };
    let par = pool(2);
    let bt = 16;
    let kv_width = shape.kv_heads * shape.head_dim;
    let qd = shape.heads * shape.head_dim;
    // Caches of up to 1024 positions, f32 and bf16.
    let blocks: Vec<Vec<f32>> = (0..1024usize.div_ceil(bt)).map(|b| random(2 * bt * kv_width, 10 + b as u64)).collect();
    let blocks16: Vec<Vec<u16>> =
        blocks.iter().map(|b| b.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect()).collect();
    let refs: Vec<&[f32]> = blocks.iter().map(|b| b.as_slice()).collect();
    let refs16: Vec<&[u16]> = blocks16.iter().map(|b| b.as_slice()).collect();
    let mut g = c.benchmark_group("attention");
    // (name, cache type, [(past, new)] per sequence): one token after 512 positions; 32
    // sequences decoding at once over contexts of 100–720 positions; a 512-token prompt.
    let batch32: Vec<(usize, usize)> = (0..32).map(|i| (100 + i * 20, 1)).collect();
    for (name, ty, seqs) in [
        ("decode-ctx512-f32", KvType::F32, vec![(512, 1)]),
        ("decode-ctx512-bf16", KvType::Bf16, vec![(512, 1)]),
        ("decode-batch32-f32", KvType::F32, batch32),
        ("prefill-512-f32", KvType::F32, vec![(0, 512)]),
    ] {
        let data = match ty {
            KvType::F32 => KvData::F32(&refs),
            _ => KvData::Bf16(&refs16),
        };
        let mut row = 0;
        let list: Vec<SeqAttn> = seqs
            .iter()
            .map(|&(past, new)| {
                let s = SeqAttn { row, new, past, kv: KvBlocks { data, block_tokens: bt } };
                row += new;
                s
            })
            .collect();
        let q = random(row * qd, 5);
        let mut out = vec![0f32; q.len()];
        // 4 FLOPs per (query head, dimension, position seen): q·k and the weighted sum.
        let seen: usize = seqs.iter().map(|&(past, new)| (1..=new).map(|j| past + j).sum::<usize>()).sum();
        g.throughput(Throughput::Elements((4 * seen * qd) as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                attend_batch(&q, &list, None, shape, &mut out, &par);
                black_box(&out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, decode_step, gemm, attention);
criterion_main!(benches);
