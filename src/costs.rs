//! What one expert costs on each lane, measured at start-up for the twin decision
//! (`weir_graphs::place::experts::Twins`, Fiddler's choice between computing an expert where its
//! weights are and moving them): the real kernels, on the lane's own cores or device, over
//! random weights of the model's expert shape and type — at 1 and 8 tokens, best of three runs
//! each, so that the cost is `fixed + per_token × tokens`. For a GPU lane, also the time to move
//! one expert's weights to it from host memory.

use std::time::Instant;
use weir_graphs::place::experts::LaneTiming;
use weir_kernels::WeightView;
use weir_runtime::{DType, LaneKind, LaneSpec};

/// The most tokens an expert is timed over (and the fewest: one).
const MOST: usize = 8;

/// One expert's cost on `lane` (see the module doc).
pub fn expert_timing(
    lane: &LaneSpec,
    hidden: usize,
    intermediate: usize,
    dtype: DType,
) -> std::result::Result<LaneTiming, String> {
    let (h, m) = (hidden, intermediate);
    let weights = [random(m * h, dtype, 1), random(m * h, dtype, 2), random(h * m, dtype, 3)];
    let fit = |run: &mut dyn FnMut(usize) -> std::result::Result<(), String>| {
        let mut best = |t: usize| -> std::result::Result<f64, String> {
            run(t)?; // warm
            let mut b = f64::INFINITY;
            for _ in 0..3 {
                let t0 = Instant::now();
                run(t)?;
                b = b.min(t0.elapsed().as_secs_f64());
            }
            Ok(b)
        };
        let (one, most) = (best(1)?, best(MOST)?);
        let per_token_s = ((most - one) / (MOST - 1) as f64).max(0.0);
        Ok::<_, String>(((one - per_token_s).max(0.0), per_token_s))
    };
    match &lane.kind {
        LaneKind::Cpu { cores } => {
            let pool = weir_runtime::WorkerPool::new(&format!("{}-timing", lane.name), cores.get(1..).unwrap_or(&[]))
                .map_err(|e| e.to_string())?;
            // Buffers for the most tokens timed, made once: only the kernels are timed.
            let x = vec![0.01f32; MOST * h];
            let (mut a, mut u, mut y) = (vec![0f32; MOST * m], vec![0f32; MOST * m], vec![0f32; MOST * h]);
            let mut run = |t: usize| {
                let (x, a, u, y) = (&x[..t * h], &mut a[..t * m], &mut u[..t * m], &mut y[..t * h]);
                weir_kernels::matmul::matmul(x, t, weights[0].view(), m, None, a, &pool);
                weir_kernels::matmul::matmul(x, t, weights[1].view(), m, None, u, &pool);
                weir_kernels::activation::silu_mul_inplace(a, u);
                weir_kernels::matmul::matmul(a, t, weights[2].view(), h, None, y, &pool);
                std::hint::black_box(&y);
                Ok(())
            };
            let (fixed_s, per_token_s) = fit(&mut run)?;
            Ok(LaneTiming { fixed_s, per_token_s, upload_s: None })
        }
        LaneKind::GpuStream { device, .. } => gpu_timing(*device, h, m, dtype, &weights, fit),
        _ => Err("an I/O lane computes no experts".into()),
    }
}

/// [`expert_timing`] on a GPU: cuBLAS linears and the SiLU kernel on a stream of its own, and
/// the expert's three tensors copied from (pageable) host memory, each waited for.
fn gpu_timing(
    device: usize,
    h: usize,
    m: usize,
    dtype: DType,
    weights: &[Weights; 3],
    fit: impl Fn(&mut dyn FnMut(usize) -> std::result::Result<(), String>) -> std::result::Result<(f64, f64), String>,
) -> std::result::Result<LaneTiming, String> {
    use weir_kernels::cuda::{call, Elem, GpuKernels};
    let (ctx, _) = weir_runtime::gpu::open(device).map_err(|e| e.to_string())?;
    let stream = call("creating a stream", || ctx.new_stream()).map_err(|e| e.to_string())?;
    let k = GpuKernels::new(stream.clone()).map_err(|e| e.to_string())?;
    let elem = match dtype {
        DType::BF16 => Elem::Bf16,
        DType::F16 => Elem::F16,
        _ => Elem::F32,
    };
    let bytes: Vec<Vec<u8>> = weights.iter().map(Weights::bytes).collect();
    let up = |b: &Vec<u8>| call("copying to the GPU", || stream.clone_htod(b)).map_err(|e| e.to_string());
    let w = [up(&bytes[0])?, up(&bytes[1])?, up(&bytes[2])?];
    let sync = || call("waiting for the stream", || stream.synchronize()).map_err(|e| e.to_string());
    // Buffers for the most tokens timed, made once: only the kernels and copies are timed.
    let zeros = |n: usize| call("allocating", || stream.alloc_zeros::<f32>(n)).map_err(|e| e.to_string());
    let (x, mut a, mut u, mut y) = (zeros(MOST * h)?, zeros(MOST * m)?, zeros(MOST * m)?, zeros(MOST * h)?);
    let mut scratch =
        call("allocating", || stream.alloc_zeros::<u8>(2 * MOST * h.max(m))).map_err(|e| e.to_string())?;
    let mut run = |t: usize| -> std::result::Result<(), String> {
        let e = |r: std::result::Result<(), weir_kernels::cuda::GpuError>| r.map_err(|e| e.to_string());
        let (xv, mut sv) = (x.slice(..t * h), scratch.slice_mut(..2 * t * h.max(m)));
        e(k.linear(&xv, t, &w[0].as_view(), elem, m, &mut a.slice_mut(..t * m), &mut sv))?;
        e(k.linear(&xv, t, &w[1].as_view(), elem, m, &mut u.slice_mut(..t * m), &mut sv))?;
        e(k.silu_mul(&mut a.slice_mut(..t * m), &u.slice(..t * m)))?;
        e(k.linear(&a.slice(..t * m), t, &w[2].as_view(), elem, h, &mut y.slice_mut(..t * h), &mut sv))?;
        sync()
    };
    let (fixed_s, per_token_s) = fit(&mut run)?;
    // Moving one expert: its three tensors copied into memory already allocated (a pool's).
    let mut dst = [up(&bytes[0])?, up(&bytes[1])?, up(&bytes[2])?];
    let mut upload_s = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        for (d, b) in dst.iter_mut().zip(&bytes) {
            call("copying to the GPU", || stream.memcpy_htod(b.as_slice(), d)).map_err(|e| e.to_string())?;
        }
        sync()?;
        upload_s = upload_s.min(t0.elapsed().as_secs_f64());
    }
    Ok(LaneTiming { fixed_s, per_token_s, upload_s: Some(upload_s) })
}

/// Random weights of one type.
enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl Weights {
    fn view(&self) -> WeightView<'_> {
        match self {
            Weights::F32(w) => WeightView::F32(w),
            Weights::Bf16(w) => WeightView::Bf16(w),
            Weights::F16(w) => WeightView::F16(w),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        match self {
            Weights::F32(w) => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Weights::Bf16(w) | Weights::F16(w) => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// `n` random weights of `dtype` in [-0.05, 0.05).
fn random(n: usize, dtype: DType, seed: u64) -> Weights {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    match dtype {
        DType::BF16 => Weights::Bf16((0..n).map(|_| half::bf16::from_f32(next()).to_bits()).collect()),
        DType::F16 => Weights::F16((0..n).map(|_| half::f16::from_f32(next()).to_bits()).collect()),
        _ => Weights::F32((0..n).map(|_| next()).collect()),
    }
}
