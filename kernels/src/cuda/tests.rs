//! The GPU kernels against the CPU ones. Compiling the source needs only NVRTC's library;
//! the rest needs a GPU and says "skipped: no GPU" where there is none.

use super::*;
use crate::attention::attend_reference;
use crate::matmul::matmul_reference;
use crate::rope::{Rope, RopeScaling};
use crate::WeightView;
use cudarc::driver::CudaSlice;

/// Says a test was skipped where the log shows it: straight to standard error, past the test
/// harness's capture.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
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

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: GPU {g}, CPU {w}");
    }
}

#[test]
fn nvrtc_compiles_every_kernel_for_hopper_and_ampere() {
    if !nvrtc_present() {
        skipped("no NVRTC library (libnvrtc): the kernels' source was not compiled");
        return;
    }
    for arch in [(9, 0), (8, 0)] {
        let text = compile(arch).unwrap_or_else(|e| panic!("{e}"));
        for k in KERNELS {
            assert!(text.contains(&format!(".entry {k}(")), "no entry {k} in the PTX for {arch:?}");
        }
    }
}

#[test]
fn compiled_ptx_is_cached_and_a_cached_copy_is_used() {
    if !nvrtc_present() {
        skipped("no NVRTC library (libnvrtc)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("weir-ptx-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = ptx_cached_in(Some(dir.clone()), (9, 0)).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), first);
    // A cached copy is what the next start reads (marked here so that it can be told apart).
    std::fs::write(&files[0], format!("{first}\n// from the cache\n")).unwrap();
    assert!(ptx_cached_in(Some(dir.clone()), (9, 0)).unwrap().ends_with("// from the cache\n"));
    // A cache file that is not PTX is compiled over.
    std::fs::write(&files[0], "garbage").unwrap();
    assert_eq!(ptx_cached_in(Some(dir.clone()), (9, 0)).unwrap(), first);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_source_nvrtc_refuses_is_a_compile_error_with_its_log() {
    if !nvrtc_present() {
        skipped("no NVRTC library (libnvrtc)");
        return;
    }
    let e = compile_source("extern \"C\" __global__ void k() { undefined_thing(); }", (9, 0)).unwrap_err();
    match e {
        GpuError::Compile { arch, log } => {
            assert_eq!(arch, "compute_90");
            assert!(log.contains("undefined_thing"), "{log}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn without_nvrtc_compiling_is_a_typed_error() {
    if nvrtc_present() {
        skipped("NVRTC is present (this test is for machines without it)");
        return;
    }
    assert_eq!(compile((9, 0)), Err(GpuError::NoLibrary("NVRTC (libnvrtc)")));
}

/// A stream on device 0, or `None` (and "skipped: no GPU") where there is none.
fn gpu() -> Option<GpuKernels> {
    if !driver_present() || CudaContext::device_count().unwrap_or(0) < 1 {
        skipped("no GPU");
        return None;
    }
    let ctx = CudaContext::new(0).expect("device 0");
    Some(GpuKernels::new(ctx.new_stream().expect("a stream")).unwrap_or_else(|e| panic!("{e}")))
}

fn up<T: cudarc::driver::DeviceRepr>(g: &GpuKernels, v: &[T]) -> CudaSlice<T> {
    g.stream().clone_htod(v).expect("copy to the GPU")
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(g: &GpuKernels, v: &CudaSlice<T>) -> Vec<T> {
    g.stream().clone_dtoh(v).expect("copy from the GPU")
}

fn bytes_of(v: &[f32], elem: Elem) -> Vec<u8> {
    match elem {
        Elem::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Elem::Bf16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect(),
        Elem::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect(),
    }
}

/// The values a buffer of `elem` holds for `v` (rounded as stored).
fn rounded(v: &[f32], elem: Elem) -> Vec<f32> {
    match elem {
        Elem::F32 => v.to_vec(),
        Elem::Bf16 => v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(),
        Elem::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
    }
}

#[test]
fn row_kernels_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let (rows, dim) = (5, 333);
    let x = random(rows * dim, 1);
    let w = random(dim, 2);
    // RMSNorm.
    let mut want = vec![0f32; x.len()];
    for r in 0..rows {
        crate::norm::rmsnorm_row(&x[r * dim..][..dim], &w, 1e-5, &mut want[r * dim..][..dim]);
    }
    let (xd, wd) = (up(&g, &x), up(&g, &w));
    let mut yd = up(&g, &vec![0f32; x.len()]);
    g.rmsnorm(&xd.as_view(), &wd.as_view(), 1e-5, &mut yd.as_view_mut()).unwrap();
    close("rmsnorm", &down(&g, &yd), &want, 1e-5);
    // SwiGLU's middle and the residual add.
    let upv = random(x.len(), 3);
    let mut gate = x.clone();
    crate::activation::silu_mul_inplace(&mut gate, &upv);
    let mut gd = up(&g, &x);
    g.silu_mul(&mut gd.as_view_mut(), &up(&g, &upv).as_view()).unwrap();
    close("silu_mul", &down(&g, &gd), &gate, 1e-6);
    let mut sum = x.clone();
    crate::activation::add_inplace(&mut sum, &upv);
    let mut ad = up(&g, &x);
    g.add(&mut ad.as_view_mut(), &up(&g, &upv).as_view()).unwrap();
    assert_eq!(down(&g, &ad), sum, "add is exact");
    let mut biased = x.clone();
    biased.chunks_mut(dim).for_each(|r| r.iter_mut().zip(&w).for_each(|(a, b)| *a += b));
    let mut bd = up(&g, &x);
    g.add_bias(&mut bd.as_view_mut(), &wd.as_view()).unwrap();
    assert_eq!(down(&g, &bd), biased, "add_bias is exact");
    // Embedding rows of every weight type.
    let (vocab, ids) = (17usize, vec![3i32, 0, 16, 3]);
    let table = random(vocab * dim, 4);
    for elem in [Elem::F32, Elem::Bf16, Elem::F16] {
        let t = rounded(&table, elem);
        let want: Vec<f32> = ids.iter().flat_map(|&i| t[i as usize * dim..][..dim].to_vec()).collect();
        let mut od = up(&g, &vec![0f32; ids.len() * dim]);
        g.embed(&up(&g, &ids).as_view(), &up(&g, &bytes_of(&table, elem)).as_view(), elem, dim, &mut od.as_view_mut()).unwrap();
        assert_eq!(down(&g, &od), want, "embed {elem:?} is exact");
    }
    // A pass with no tokens (only releases) launches nothing and is no error.
    let empty = up(&g, &[0f32; 1][..0]);
    g.rmsnorm(&empty.as_view(), &wd.as_view(), 1e-5, &mut up(&g, &[0f32; 1][..0]).as_view_mut()).unwrap();
    let mut scratch = up(&g, &[0u8; 2]);
    let mut y0 = up(&g, &[0f32; 1][..0]);
    g.linear(&empty.as_view(), 0, &up(&g, &bytes_of(&table, Elem::F32)).as_view(), Elem::F32, vocab, &mut y0.as_view_mut(), &mut scratch.as_view_mut())
        .unwrap();
    // Rounding to bf16 and f16: nearest even, as the `half` crate.
    for elem in [Elem::Bf16, Elem::F16] {
        let mut nd = up(&g, &vec![0u8; x.len() * 2]);
        g.narrow(&xd.as_view(), elem, &mut nd.as_view_mut()).unwrap();
        assert_eq!(down(&g, &nd), bytes_of(&x, elem), "narrow to {elem:?}");
    }
}

#[test]
fn rope_matches_the_cpu_with_llama3_scaling() {
    let Some(g) = gpu() else { return };
    let (heads, hd) = (3, 128);
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let rope = Rope::new(hd, 500000.0, &scaling);
    let pos = vec![0i32, 1, 77, 4095, 100_000];
    let x = random(pos.len() * heads * hd, 5);
    let mut want = x.clone();
    for (t, p) in pos.iter().enumerate() {
        rope.apply(&mut want[t * heads * hd..][..heads * hd], *p as usize);
    }
    let mut xd = up(&g, &x);
    g.rope(&mut xd.as_view_mut(), &up(&g, &pos).as_view(), &up(&g, &rope.inv_freq).as_view(), heads, hd).unwrap();
    close("rope", &down(&g, &xd), &want, 2e-5);
}

#[test]
fn linear_matches_the_reference_for_every_weight_type() {
    let Some(g) = gpu() else { return };
    for (t, k, n) in [(1, 64, 48), (3, 100, 37), (37, 256, 300)] {
        let x = random(t * k, 6);
        let w = random(n * k, 7);
        for elem in [Elem::F32, Elem::Bf16, Elem::F16] {
            // The reference on the same rounded weights; bf16/f16 also round the input.
            let wr = rounded(&w, elem);
            let xr = if elem == Elem::F32 { x.clone() } else { rounded(&x, elem) };
            let want = matmul_reference(&xr, t, WeightView::F32(&wr), n, None);
            let mut yd = up(&g, &vec![0f32; t * n]);
            let mut scratch = up(&g, &vec![0u8; t * k * 2]);
            g.linear(&up(&g, &x).as_view(), t, &up(&g, &bytes_of(&w, elem)).as_view(), elem, n, &mut yd.as_view_mut(), &mut scratch.as_view_mut()).unwrap();
            close(&format!("linear {elem:?} {t}x{k}x{n}"), &down(&g, &yd), &want, 1e-4);
        }
    }
}

#[test]
fn paged_attention_matches_the_reference_for_a_batch_of_sequences() {
    let Some(g) = gpu() else { return };
    let s = AttnShape { heads: 8, kv_heads: 2, head_dim: 64 };
    let (kvd, qd, bt) = (s.kv_heads * s.head_dim, s.heads * s.head_dim, 16usize);
    // (past, new): a long decode, a prompt block, a one-position sequence, a tile boundary.
    let seqs = [(300usize, 1usize), (0, 37), (0, 1), (127, 2)];
    for elem in [Elem::F32, Elem::Bf16, Elem::F16] {
        for window in [None, Some(50)] {
            // Every block its own allocation, as from the GPU pool.
            let mut blocks = Vec::new();
            let (mut table, mut starts, mut pos, mut q, mut want) = (vec![], vec![], vec![], vec![], vec![]);
            for (i, &(past, new)) in seqs.iter().enumerate() {
                let len = past + new;
                let k = random(len * kvd, 10 + i as u64);
                let v = random(len * kvd, 20 + i as u64);
                let start = table.len() as i32;
                let mine: Vec<u64> = (0..len.div_ceil(bt))
                    .map(|_| {
                        let b = up(&g, &vec![0u8; 2 * bt * kvd * elem.size()]);
                        let p = cudarc::driver::DevicePtr::device_ptr(&b, g.stream()).0;
                        blocks.push(b);
                        p
                    })
                    .collect();
                let addr: Vec<u64> = (0..len).map(|p| mine[p / bt]).collect();
                let offset: Vec<i32> = (0..len).map(|p| (p % bt) as i32).collect();
                table.extend(&mine);
                // SAFETY: the blocks above are live, of the right size, used on this stream only.
                unsafe {
                    g.kv_store(
                        &up(&g, &k).as_view(),
                        &up(&g, &v).as_view(),
                        elem,
                        &up(&g, &addr).as_view(),
                        &up(&g, &offset).as_view(),
                        kvd,
                        bt,
                    )
                }
                .unwrap();
                let qs = random(new * qd, 30 + i as u64);
                want.extend(attend_reference(&qs, &rounded(&k, elem), &rounded(&v, elem), past, window, s));
                q.extend(qs);
                for j in 0..new {
                    starts.push(start);
                    pos.push((past + j) as i32);
                }
            }
            let mut out = up(&g, &vec![0f32; q.len()]);
            // SAFETY: as above; every position up to each row's was stored.
            unsafe {
                g.attend(
                    &up(&g, &q).as_view(),
                    elem,
                    &up(&g, &table).as_view(),
                    &up(&g, &starts).as_view(),
                    &up(&g, &pos).as_view(),
                    s,
                    bt,
                    window,
                    &mut out.as_view_mut(),
                )
            }
            .unwrap();
            close(&format!("attend {elem:?} window {window:?}"), &down(&g, &out), &want, 1e-4);
            drop(blocks);
        }
    }
}

#[test]
fn argmax_and_top_k_take_the_lowest_index_among_equals() {
    let Some(g) = gpu() else { return };
    let vocab = 3001;
    let mut logits = random(2 * vocab, 8);
    logits[100] = 5.0;
    logits[2000] = 5.0; // a tie: 100 wins
    logits[vocab + 2999] = 7.0;
    logits[vocab + 5] = 6.0;
    logits[vocab + 6] = 6.0;
    let ld = up(&g, &logits);
    let mut out = up(&g, &[0i32; 2][..]);
    g.argmax(&ld.as_view(), vocab, &mut out.as_view_mut()).unwrap();
    assert_eq!(down(&g, &out), vec![100, (vocab + 2999 - vocab) as i32]);
    let (mut ids, mut vals) = (up(&g, &[0i32; 6][..]), up(&g, &[0f32; 6][..]));
    g.top_k(&ld.as_view(), vocab, 3, &mut ids.as_view_mut(), &mut vals.as_view_mut()).unwrap();
    let ids = down(&g, &ids);
    assert_eq!(&ids[..2], &[100, 2000]);
    assert_eq!(&ids[3..], &[2999, 5, 6]);
    assert_eq!(&down(&g, &vals)[3..], &[7.0, 6.0, 6.0]);
    // Bad shapes are refused by name, not launched.
    let e = g.top_k(&ld.as_view(), vocab, 65, &mut up(&g, &[0i32; 130][..]).as_view_mut(), &mut up(&g, &[0f32; 130][..]).as_view_mut()).unwrap_err();
    assert!(matches!(e, GpuError::Shape { kernel: "top_k", .. }), "{e}");
}
