//! `y = x · Wᵀ (+ b)`: the linear layer, with f32 accumulation whatever the weight type.
//!
//! Weights are stored `[n, k]` (Hugging Face's `[out, in]`), activations `[t, k]` row-major.
//! The work is split over the lane's cores by output rows. Decode (t = 1) streams the weights
//! at memory speed: each core takes one contiguous slice of rows and reads it row after row,
//! one sequential stream. From [`GEMM_MIN_TOKENS`] tokens on, the AVX2 path is a packed GEMM
//! ([`crate::gemm`]) for f32 and bf16 weights; otherwise each task walks its rows in blocks that stay in the L2 cache while every small
//! block of tokens passes over them (4 rows × 3 tokens per register tile, 4 × 2 for a last
//! pair of tokens), so each weight is read from memory once.

use crate::isa::{self, Isa};
use crate::par::{split_range, Parallel, SharedMut};

/// A weight matrix as stored: f32, or bf16/f16 bits.
#[derive(Debug, Clone, Copy)]
pub enum WeightView<'a> {
    /// IEEE single precision.
    F32(&'a [f32]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half precision bit patterns.
    F16(&'a [u16]),
}

impl WeightView<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightView::F32(w) => w.len(),
            WeightView::Bf16(w) | WeightView::F16(w) => w.len(),
        }
    }
    /// Whether the matrix is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightView::F32(w) => w[i],
            WeightView::Bf16(w) => bf16_to_f32(w[i]),
            WeightView::F16(w) => half::f16::from_bits(w[i]).to_f32(),
        }
    }
    /// Row `r` of a matrix with `k` columns, converted to f32 into `out` (`[k]`).
    pub fn row_to_f32(&self, r: usize, k: usize, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate().take(k) {
            *o = self.get(r * k + i);
        }
    }
}

/// Exact widening of a bfloat16 bit pattern.
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Rows per cache block: 64 rows of a 2048-wide bf16 matrix are 256 KiB, well inside L2.
const ROW_BLOCK: usize = 64;

/// From this many tokens on, the AVX2 path packs weights into f32 panels once and runs the
/// outer-product kernel of [`crate::gemm`]. Measured on the TinyLlama MLP shape (bf16,
/// 2 threads, `cargo bench --bench kernels -- gemm`) when it was set: at 8–32 tokens
/// converting weights as they are used was faster (83 vs 51 GFLOP/s at 8), at 64–128 the two
/// were level, at 512 the packed kernel ahead (BENCHMARKS.md has its current figures).
pub const GEMM_MIN_TOKENS: usize = 64;

/// Whether the call takes the packed GEMM: on the AVX2 path, from [`GEMM_MIN_TOKENS`] tokens,
/// for f32 and bf16 weights. f16 weights never do: `vcvtph2ps` widens them so cheaply that the
/// 4-row × 3-token tile, converting as it goes, is ahead of packing at every size measured
/// (f16, TinyLlama MLP shape, 2 threads, side by side: 134 vs 116 GFLOP/s at 128 tokens, 132 vs
/// 122 at 512).
fn packs(isa: Isa, t: usize, w: WeightView<'_>) -> bool {
    isa == Isa::Avx2 && t >= GEMM_MIN_TOKENS && !matches!(w, WeightView::F16(_))
}

/// `y[t, n] = x[t, k] · w[n, k]ᵀ + bias[n]`, on the detected instruction set.
///
/// `x.len()` must be `t * k`, `w.len()` `n * k`, `y.len()` `t * n`, `bias.len()` `n`.
pub fn matmul(
    x: &[f32],
    t: usize,
    w: WeightView<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    par: &dyn Parallel,
) {
    matmul_with(isa::detected(), x, t, w, n, bias, y, par)
}

/// [`matmul`] on a chosen instruction set (tests use this to check every path).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    isa: Isa,
    x: &[f32],
    t: usize,
    w: WeightView<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    par: &dyn Parallel,
) {
    if t == 0 || n == 0 {
        return;
    }
    let k = x.len() / t;
    assert_eq!(x.len(), t * k, "x is not [t, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert_eq!(y.len(), t * n, "y is not [t, n]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias is not [n]");
    }
    let threads = par.threads().max(1);
    let packed = packs(isa, t, w);
    // On AMX tiles the input is rounded to bf16 and padded once, for every task.
    let tiles = match w {
        WeightView::Bf16(_) if isa == Isa::Amx && t >= crate::amx::MIN_TOKENS => Some(crate::amx::pack_x(x, t, k)),
        _ => None,
    };
    // Decode is memory-bound: one even slice of rows per worker. Prefill is compute-bound and
    // finer tasks balance better.
    let tasks = if t == 1 { threads } else { (n.div_ceil(ROW_BLOCK)).clamp(1, threads * 4) };
    let align = if tiles.is_some() {
        32
    } else if packed {
        16
    } else {
        4
    };
    let tasks = tasks.min(n.div_ceil(align)).max(1);
    let yp = SharedMut(y.as_mut_ptr());
    par.run(tasks, &|i| {
        let rows = split_range(n, tasks, align, i);
        // SAFETY: the row ranges of the tasks are disjoint; each task writes y[.., rows] only,
        // which lies inside `y` (checked above).
        unsafe { rows_task(isa, x, t, k, w, n, bias, yp, rows, tiles.as_ref()) };
    });
}

#[allow(clippy::too_many_arguments)]
unsafe fn rows_task(
    isa: Isa,
    x: &[f32],
    t: usize,
    k: usize,
    w: WeightView<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: SharedMut<f32>,
    rows: std::ops::Range<usize>,
    tiles: Option<&(Vec<u16>, usize)>,
) {
    let mut rb = rows.start;
    #[cfg(target_arch = "x86_64")]
    if let (Some((a, kp)), WeightView::Bf16(wb)) = (tiles, w) {
        crate::amx::rows(&mut crate::amx::Hardware, a, *kp, t, wb, n, k, y, rows.clone());
        rb = rows.end;
    }
    #[cfg(target_arch = "x86_64")]
    if packs(isa, t, w) {
        crate::gemm::rows_avx2(x, t, k, w, n, y, rows.clone());
        rb = rows.end;
    }
    while rb < rows.end {
        let re = (rb + ROW_BLOCK).min(rows.end);
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => avx512::block(x, t, k, w, n, y, rb..re),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::block(x, t, k, w, n, y, rb..re),
            _ => portable_block(x, t, k, w, n, y, rb..re),
        }
        rb = re;
    }
    if let Some(b) = bias {
        for ti in 0..t {
            let yr = y.slice(ti * n + rows.start, rows.len());
            for (v, bv) in yr.iter_mut().zip(&b[rows.clone()]) {
                *v += *bv;
            }
        }
    }
}

unsafe fn portable_block(
    x: &[f32],
    t: usize,
    k: usize,
    w: WeightView<'_>,
    n: usize,
    y: SharedMut<f32>,
    rows: std::ops::Range<usize>,
) {
    let mut wrow = vec![0f32; k];
    for o in rows {
        w.row_to_f32(o, k, &mut wrow);
        for ti in 0..t {
            let xr = &x[ti * k..(ti + 1) * k];
            *y.slice(ti * n + o, 1).as_mut_ptr() = dot_portable(xr, &wrow);
        }
    }
}

/// A dot product with 16 independent partial sums, which the compiler vectorises.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The plain reference: one f64-free, straightforward loop per output.
pub fn matmul_reference(x: &[f32], t: usize, w: WeightView<'_>, n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let k = x.len().checked_div(t).unwrap_or(0);
    let mut y = vec![0f32; t * n];
    for ti in 0..t {
        for o in 0..n {
            let mut s = 0f32;
            for i in 0..k {
                s += x[ti * k + i] * w.get(o * k + i);
            }
            y[ti * n + o] = s + bias.map_or(0.0, |b| b[o]);
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{SharedMut, WeightView};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn ld_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn ldm_f32(p: *const f32, m: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(m, p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn ld_bf16(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn ldm_bf16(p: *const u16, m: __mmask16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn ld_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn ldm_f16(p: *const u16, m: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
    }

    /// One register tile: R weight rows × T tokens, k-loop in steps of 16.
    macro_rules! tile_fn {
        ($name:ident, $ty:ty, $ld:ident, $ldm:ident) => {
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
            unsafe fn $name<const R: usize, const T: usize>(
                x: *const f32, // [T, k] at stride k
                w: *const $ty, // [R, k] at stride k
                k: usize,
                y: *mut f32, // [T, n] at stride n
                n: usize,
            ) {
                let mut acc = [[_mm512_setzero_ps(); T]; R];
                let mut i = 0;
                while i + 16 <= k {
                    let mut xv = [_mm512_setzero_ps(); T];
                    for t in 0..T {
                        xv[t] = _mm512_loadu_ps(x.add(t * k + i));
                    }
                    for r in 0..R {
                        let wv = $ld(w.add(r * k + i));
                        for t in 0..T {
                            acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
                        }
                    }
                    i += 16;
                }
                if i < k {
                    let m: __mmask16 = ((1u32 << (k - i)) - 1) as u16;
                    let mut xv = [_mm512_setzero_ps(); T];
                    for t in 0..T {
                        xv[t] = _mm512_maskz_loadu_ps(m, x.add(t * k + i));
                    }
                    for r in 0..R {
                        let wv = $ldm(w.add(r * k + i), m);
                        for t in 0..T {
                            acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
                        }
                    }
                }
                for r in 0..R {
                    for t in 0..T {
                        *y.add(t * n + r) = _mm512_reduce_add_ps(acc[r][t]);
                    }
                }
            }
        };
    }
    tile_fn!(tile_f32, f32, ld_f32, ldm_f32);
    tile_fn!(tile_bf16, u16, ld_bf16, ldm_bf16);
    tile_fn!(tile_f16, u16, ld_f16, ldm_f16);

    macro_rules! block_fn {
        ($name:ident, $ty:ty, $tile:ident) => {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
            unsafe fn $name(
                x: &[f32],
                t: usize,
                k: usize,
                w: &[$ty],
                n: usize,
                y: SharedMut<f32>,
                rows: std::ops::Range<usize>,
            ) {
                let xp = x.as_ptr();
                let wp = w.as_ptr();
                let mut t0 = 0;
                while t0 < t {
                    let tt = (t - t0).min(4);
                    let mut o = rows.start;
                    while o < rows.end {
                        let rr = (rows.end - o).min(4);
                        let yo = y.0.add(t0 * n + o);
                        let xo = xp.add(t0 * k);
                        let wo = wp.add(o * k);
                        match (rr, tt) {
                            (4, 4) => $tile::<4, 4>(xo, wo, k, yo, n),
                            (4, _) => {
                                for j in 0..tt {
                                    $tile::<4, 1>(xo.add(j * k), wo, k, yo.add(j * n), n)
                                }
                            }
                            (_, 4) => {
                                for r in 0..rr {
                                    $tile::<1, 4>(xo, wo.add(r * k), k, yo.add(r), n)
                                }
                            }
                            _ => {
                                for r in 0..rr {
                                    for j in 0..tt {
                                        $tile::<1, 1>(xo.add(j * k), wo.add(r * k), k, yo.add(j * n + r), n)
                                    }
                                }
                            }
                        }
                        o += rr;
                    }
                    t0 += tt;
                }
            }
        };
    }
    block_fn!(block_f32, f32, tile_f32);
    block_fn!(block_bf16, u16, tile_bf16);
    block_fn!(block_f16, u16, tile_f16);

    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL; shapes as in `matmul_with`.
    pub(super) unsafe fn block(
        x: &[f32],
        t: usize,
        k: usize,
        w: WeightView<'_>,
        n: usize,
        y: SharedMut<f32>,
        rows: std::ops::Range<usize>,
    ) {
        match w {
            WeightView::F32(w) => block_f32(x, t, k, w, n, y, rows),
            WeightView::Bf16(w) => block_bf16(x, t, k, w, n, y, rows),
            WeightView::F16(w) => block_f16(x, t, k, w, n, y, rows),
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{SharedMut, WeightView};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One token against one row: four accumulators over 32 columns a step, then 8 at a time,
    /// then the scalar tail. Decode calls this for row after row, so each core reads its slice
    /// of the matrix as one sequential stream — the pattern this CPU's prefetchers follow
    /// best (in the engine, decoding TinyLlama bf16 on 2 threads: 9.7–11.2 tokens/s against
    /// 6.5–8.6 for the 8-row tile it replaced, alternated run by run).
    macro_rules! dot_fn {
        ($name:ident, $ty:ty, $ld:ident, $cvt:expr) => {
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name(x: *const f32, w: *const $ty, k: usize) -> f32 {
                let mut a = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= k {
                    for (j, acc) in a.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps($ld(w.add(i + 8 * j)), _mm256_loadu_ps(x.add(i + 8 * j)), *acc);
                    }
                    i += 32;
                }
                while i + 8 <= k {
                    a[0] = _mm256_fmadd_ps($ld(w.add(i)), _mm256_loadu_ps(x.add(i)), a[0]);
                    i += 8;
                }
                let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
                let cvt = $cvt;
                for j in i..k {
                    s += cvt(*w.add(j)) * *x.add(j);
                }
                s
            }
        };
    }
    dot_fn!(dot_f32, f32, ld_f32, |v: f32| v);
    dot_fn!(dot_bf16, u16, ld_bf16, super::bf16_to_f32);
    dot_fn!(dot_f16, u16, ld_f16, |v: u16| half::f16::from_bits(v).to_f32());

    /// One register tile: R weight rows × T tokens, k-loop in steps of 8; the k % 8 tail is
    /// added in scalar code with the same widening as the vector loads.
    macro_rules! tile_fn {
        ($name:ident, $ty:ty, $ld:ident, $cvt:expr) => {
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const R: usize, const T: usize>(
                x: *const f32,
                w: *const $ty,
                k: usize,
                y: *mut f32,
                n: usize,
            ) {
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let mut i = 0;
                while i + 8 <= k {
                    let mut xv = [_mm256_setzero_ps(); T];
                    for t in 0..T {
                        xv[t] = _mm256_loadu_ps(x.add(t * k + i));
                    }
                    for r in 0..R {
                        let wv = $ld(w.add(r * k + i));
                        for t in 0..T {
                            acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                        }
                    }
                    i += 8;
                }
                let cvt = $cvt;
                for r in 0..R {
                    for t in 0..T {
                        let mut s = hsum(acc[r][t]);
                        for j in i..k {
                            s += cvt(*w.add(r * k + j)) * *x.add(t * k + j);
                        }
                        *y.add(t * n + r) = s;
                    }
                }
            }
        };
    }
    tile_fn!(tile_f32, f32, ld_f32, |v: f32| v);
    tile_fn!(tile_bf16, u16, ld_bf16, super::bf16_to_f32);
    tile_fn!(tile_f16, u16, ld_f16, |v: u16| half::f16::from_bits(v).to_f32());

    /// The f16 tile of 4 rows × 3 tokens, its `k` loop written out: twelve accumulators,
    /// three inputs and the widened weight vector fill the sixteen registers exactly. (Compiled
    /// from the generic tile, the f16 loop stores and reloads one accumulator on the stack every
    /// step — seen in `objdump` — and runs at half this speed; the bf16 one compiles clean.)
    /// The `k % 8` tail is added in scalar code.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_f16_4x3(x: *const f32, w: *const u16, k: usize, y: *mut f32, n: usize) {
        let k8 = k / 8 * 8;
        let zero = _mm256_setzero_ps();
        let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7, mut a8, mut a9, mut a10, mut a11] =
            [zero; 12];
        if k8 > 0 {
            // SAFETY (of the reads): rows `w + r*k` and inputs `x + t*k` hold `k` elements each
            // (the caller's shapes), and the loop reads columns `0..k8` of them.
            core::arch::asm!(
                "2:",
                "vmovups ymm12, [{x0} + {i}*4]",
                "vmovups ymm13, [{x1} + {i}*4]",
                "vmovups ymm14, [{x2} + {i}*4]",
                "vcvtph2ps ymm15, [{w0} + {i}*2]",
                "vfmadd231ps ymm0, ymm15, ymm12",
                "vfmadd231ps ymm1, ymm15, ymm13",
                "vfmadd231ps ymm2, ymm15, ymm14",
                "vcvtph2ps ymm15, [{w1} + {i}*2]",
                "vfmadd231ps ymm3, ymm15, ymm12",
                "vfmadd231ps ymm4, ymm15, ymm13",
                "vfmadd231ps ymm5, ymm15, ymm14",
                "vcvtph2ps ymm15, [{w2} + {i}*2]",
                "vfmadd231ps ymm6, ymm15, ymm12",
                "vfmadd231ps ymm7, ymm15, ymm13",
                "vfmadd231ps ymm8, ymm15, ymm14",
                "vcvtph2ps ymm15, [{w3} + {i}*2]",
                "vfmadd231ps ymm9, ymm15, ymm12",
                "vfmadd231ps ymm10, ymm15, ymm13",
                "vfmadd231ps ymm11, ymm15, ymm14",
                "add {i}, 8",
                "cmp {i}, {end}",
                "jb 2b",
                x0 = in(reg) x,
                x1 = in(reg) x.add(k),
                x2 = in(reg) x.add(2 * k),
                w0 = in(reg) w,
                w1 = in(reg) w.add(k),
                w2 = in(reg) w.add(2 * k),
                w3 = in(reg) w.add(3 * k),
                i = inout(reg) 0usize => _,
                end = in(reg) k8,
                inout("ymm0") a0, inout("ymm1") a1, inout("ymm2") a2, inout("ymm3") a3,
                inout("ymm4") a4, inout("ymm5") a5, inout("ymm6") a6, inout("ymm7") a7,
                inout("ymm8") a8, inout("ymm9") a9, inout("ymm10") a10, inout("ymm11") a11,
                out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                options(nostack, readonly),
            );
        }
        let acc = [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11];
        for r in 0..4 {
            for t in 0..3 {
                let mut s = hsum(acc[r * 3 + t]);
                for j in k8..k {
                    s += half::f16::from_bits(*w.add(r * k + j)).to_f32() * *x.add(t * k + j);
                }
                *y.add(t * n + r) = s;
            }
        }
    }

    macro_rules! block_fn {
        ($name:ident, $ty:ty, $tile:ident, $tile43:path, $dot:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name(
                x: &[f32],
                t: usize,
                k: usize,
                w: &[$ty],
                n: usize,
                y: SharedMut<f32>,
                rows: std::ops::Range<usize>,
            ) {
                let xp = x.as_ptr();
                let wp = w.as_ptr();
                if t == 1 {
                    for o in rows {
                        *y.0.add(o) = $dot(xp, wp.add(o * k), k);
                    }
                    return;
                }
                let mut t0 = 0;
                while t0 < t {
                    // 4 rows × 3 tokens: 12 accumulators + 3 inputs + 1 weight = 16 registers.
                    let tt = (t - t0).min(3);
                    let mut o = rows.start;
                    while o < rows.end {
                        let yo = y.0.add(t0 * n + o);
                        let xo = xp.add(t0 * k);
                        let wo = wp.add(o * k);
                        let rr = (rows.end - o).min(4);
                        match (rr, tt) {
                            (4, 3) => $tile43(xo, wo, k, yo, n),
                            (4, 2) => $tile::<4, 2>(xo, wo, k, yo, n),
                            (4, _) => {
                                for j in 0..tt {
                                    $tile::<4, 1>(xo.add(j * k), wo, k, yo.add(j * n), n)
                                }
                            }
                            (_, 3) => {
                                for r in 0..rr {
                                    $tile::<1, 3>(xo, wo.add(r * k), k, yo.add(r), n)
                                }
                            }
                            _ => {
                                for r in 0..rr {
                                    for j in 0..tt {
                                        $tile::<1, 1>(xo.add(j * k), wo.add(r * k), k, yo.add(j * n + r), n)
                                    }
                                }
                            }
                        }
                        o += rr;
                    }
                    t0 += tt;
                }
            }
        };
    }
    // The 4 × 3 tile: the generic one where the compiler allocates it well, written out for f16.
    block_fn!(block_f32, f32, tile_f32, tile_f32::<4, 3>, dot_f32);
    block_fn!(block_bf16, u16, tile_bf16, tile_bf16::<4, 3>, dot_bf16);
    block_fn!(block_f16, u16, tile_f16, tile_f16_4x3, dot_f16);

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; shapes as in `matmul_with`.
    pub(super) unsafe fn block(
        x: &[f32],
        t: usize,
        k: usize,
        w: WeightView<'_>,
        n: usize,
        y: SharedMut<f32>,
        rows: std::ops::Range<usize>,
    ) {
        match w {
            WeightView::F32(w) => block_f32(x, t, k, w, n, y, rows),
            WeightView::Bf16(w) => block_bf16(x, t, k, w, n, y, rows),
            WeightView::F16(w) => block_f16(x, t, k, w, n, y, rows),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Serial;

    fn rng(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    struct Threads(usize);
    impl Parallel for Threads {
        fn threads(&self) -> usize {
            self.0
        }
        fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
            std::thread::scope(|s| {
                for i in 0..tasks {
                    s.spawn(move || f(i));
                }
            });
        }
    }

    #[test]
    fn every_isa_and_dtype_matches_reference_on_odd_shapes() {
        let mut seed = 7u64;
        for isa in isa::available() {
            for &(t, k, n) in &[
                (1, 1, 1),
                (1, 15, 3),
                (3, 17, 5),
                (4, 16, 4),
                (5, 33, 9),
                (9, 64, 130),
                (1, 2048, 7),
                (6, 100, 67),
                (13, 523, 70),
                // One token: columns past the 32-wide steps, 8-wide steps and scalar tails.
                (1, 1100, 21),
                (1, 77, 64),
                // 4 × 3 tiles with no whole group of 8 columns, and with exactly one; a last
                // pair of tokens (4 × 2 tiles).
                (3, 5, 8),
                (6, 8, 4),
                (8, 24, 12),
                // The packed path (from GEMM_MIN_TOKENS tokens).
                (70, 300, 37),
            ] {
                let x: Vec<f32> = (0..t * k).map(|_| rng(&mut seed)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| rng(&mut seed)).collect();
                let wb: Vec<u16> = wf.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
                let wh: Vec<u16> = wf.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
                let bias: Vec<f32> = (0..n).map(|_| rng(&mut seed)).collect();
                for (name, w) in
                    [("f32", WeightView::F32(&wf)), ("bf16", WeightView::Bf16(&wb)), ("f16", WeightView::F16(&wh))]
                {
                    for par in [&Serial as &dyn Parallel, &Threads(3)] {
                        let want = matmul_reference(&x, t, w, n, Some(&bias));
                        let mut got = vec![0f32; t * n];
                        matmul_with(isa, &x, t, w, n, Some(&bias), &mut got, par);
                        // AMX tiles round the input to bf16 (a relative error of up to 2⁻⁹ per
                        // element) where the other paths keep it f32.
                        let rounded = isa == Isa::Amx && name == "bf16" && t >= crate::amx::MIN_TOKENS;
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            let tol = if rounded { 4e-3 } else { 1e-5 } * (k as f32).sqrt() * 4.0;
                            assert!((a - b).abs() <= tol, "{isa:?} {name} t={t} k={k} n={n} at {i}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_packed_kernel_matches_reference_at_every_edge() {
        if !isa::available().contains(&Isa::Avx2) {
            println!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut seed = 11u64;
        // k over several panels with a ragged end (not a multiple of 8), partial panels of
        // rows, token counts that leave every micro-kernel height, a row range that starts
        // inside a panel; more tokens than one block of x (MC) and more rows than one block of
        // panels (NC), with ragged ends.
        use crate::gemm::{MC, NC};
        for &(t, k, n, r0) in &[
            (13, 523, 70, 0),
            (12, 600, 16, 0),
            (7, 8, 33, 0),
            (17, 1, 5, 0),
            (40, 257, 129, 0),
            (9, 300, 50, 19),
            (2 * MC + 7, 300, NC + 37, 3),
        ] {
            let x: Vec<f32> = (0..t * k).map(|_| rng(&mut seed)).collect();
            let wf: Vec<f32> = (0..n * k).map(|_| rng(&mut seed)).collect();
            let wb: Vec<u16> = wf.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
            let wh: Vec<u16> = wf.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
            for (name, w) in
                [("f32", WeightView::F32(&wf)), ("bf16", WeightView::Bf16(&wb)), ("f16", WeightView::F16(&wh))]
            {
                let want = matmul_reference(&x, t, w, n, None);
                let mut got = vec![f32::NAN; t * n];
                // SAFETY: AVX2 was detected; one task owns rows r0..n of `got`.
                unsafe { crate::gemm::rows_avx2(&x, t, k, w, n, SharedMut(got.as_mut_ptr()), r0..n) };
                for ti in 0..t {
                    for o in 0..n {
                        let (a, b) = (got[ti * n + o], want[ti * n + o]);
                        if o < r0 {
                            assert!(a.is_nan(), "{name} t={t} k={k} n={n}: wrote row {o} outside its range");
                            continue;
                        }
                        let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                        assert!((a - b).abs() <= tol, "{name} t={t} k={k} n={n} token {ti} row {o}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
