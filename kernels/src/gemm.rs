//! The compute-bound linear layer (prefill, large-batch decode): `y[t, n] = x[t, k] · w[n, k]ᵀ`
//! as a packed GEMM.
//!
//! Both operands keep `k` contiguous, so one must be transposed for an outer-product kernel:
//! the weights are, a block of 16 rows × [`KC`] columns at a time, converted to f32 once into
//! a panel `[KC][16]` (an 8 × 8 register transpose), and that conversion serves every token.
//! The micro-kernel then keeps a 6-token × 16-output tile of `y` in 12 registers; for each
//! `k` it loads two weight vectors from the panel, broadcasts one input per token and issues
//! 12 FMAs — no horizontal sums, no conversions in the inner loop.
//!
//! Blocking (GotoBLAS's order, with the weights in the role of its packed `B`): a task owns a
//! range of output rows and walks them [`NC`] at a time (up to 32 panels, 512 KiB of f32: in
//! L2/L3), `k` in steps of [`KC`]. It packs those panels once, then takes the tokens [`MC`] at a
//! time (72 KiB of `x`: in L2) and runs every panel (16 KiB: in L1) over all the token groups of
//! that block before the next panel, adding into `y`.

use crate::matmul::WeightView;
use crate::par::SharedMut;

/// Columns of `k` per packed panel.
pub const KC: usize = 256;
/// Output rows per block of panels (a multiple of 16).
pub const NC: usize = 512;
/// Tokens per block of `x` that the panels run over in turn (a multiple of [`MR`]).
pub const MC: usize = 72;
/// Tokens per micro-kernel tile.
pub const MR: usize = 6;

thread_local! {
    /// Each worker's packed panels (`NC × KC` f32), kept between calls.
    static PANELS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Computes `y[.., rows]` for all `t` tokens. `rows.start` is a multiple of 16 unless it is
/// the last partial panel's start.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x` is `[t, k]`, `w` `[n, k]`, `y` points at `[t, n]`,
/// and no other task writes `y[.., rows]`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows_avx2(
    x: &[f32],
    t: usize,
    k: usize,
    w: WeightView<'_>,
    n: usize,
    y: SharedMut<f32>,
    rows: std::ops::Range<usize>,
) {
    PANELS.with(|cell| {
        let mut panels = cell.borrow_mut();
        if panels.len() < NC * KC {
            panels.resize(NC * KC, 0.0);
        }
        let pp = panels.as_mut_ptr();
        let mut r0 = rows.start;
        while r0 < rows.end {
            let nr = (rows.end - r0).min(NC);
            let npanels = nr.div_ceil(16);
            let mut k0 = 0;
            while k0 < k {
                let kc = (k - k0).min(KC);
                for p in 0..npanels {
                    let pr = r0 + p * 16;
                    let live = (rows.end - pr).min(16);
                    avx2::pack(w, k, pr, live, k0, kc, pp.add(p * KC * 16));
                }
                let add = k0 > 0;
                let mut m0 = 0;
                while m0 < t {
                    let mc = (t - m0).min(MC);
                    for p in 0..npanels {
                        let pr = r0 + p * 16;
                        let cols = (rows.end - pr).min(16);
                        let panel = pp.add(p * KC * 16);
                        let mut t0 = m0;
                        while t0 < m0 + mc {
                            let tt = (m0 + mc - t0).min(MR);
                            let xo = x.as_ptr().add(t0 * k + k0);
                            let yo = y.0.add(t0 * n + pr);
                            match tt {
                                6 => avx2::micro::<6>(xo, k, panel, kc, yo, n, cols, add),
                                5 => avx2::micro::<5>(xo, k, panel, kc, yo, n, cols, add),
                                4 => avx2::micro::<4>(xo, k, panel, kc, yo, n, cols, add),
                                3 => avx2::micro::<3>(xo, k, panel, kc, yo, n, cols, add),
                                2 => avx2::micro::<2>(xo, k, panel, kc, yo, n, cols, add),
                                _ => avx2::micro::<1>(xo, k, panel, kc, yo, n, cols, add),
                            }
                            t0 += tt;
                        }
                    }
                    m0 += mc;
                }
                k0 += kc;
            }
            r0 += nr;
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::matmul::{bf16_to_f32, WeightView};
    use std::arch::x86_64::*;

    /// Eight rows of 8 f32 in `r`, transposed in place (row i becomes column i).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn transpose8(r: &mut [__m256; 8]) {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        r[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
        r[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
        r[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
        r[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
        r[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
        r[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
        r[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
        r[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
    }

    /// Eight consecutive weights of row `r` from column `c`, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(w: WeightView<'_>, at: usize) -> __m256 {
        match w {
            WeightView::F32(w) => _mm256_loadu_ps(w.as_ptr().add(at)),
            WeightView::Bf16(w) => {
                let h = _mm_loadu_si128(w.as_ptr().add(at) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            WeightView::F16(w) => _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(at) as *const __m128i)),
        }
    }

    /// Packs rows `r0 .. r0 + live` (live ≤ 16; the rest of the 16 are zeros), columns
    /// `k0 .. k0 + kc`, of `w` (`[n, k]`) as f32 into `dst[kk * 16 + row]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn pack(
        w: WeightView<'_>,
        k: usize,
        r0: usize,
        live: usize,
        k0: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        let full = kc / 8 * 8;
        for g in 0..2 {
            let rows = live.saturating_sub(g * 8).min(8);
            if rows == 8 {
                let mut kk = 0;
                while kk < full {
                    let mut r: [__m256; 8] = [_mm256_setzero_ps(); 8];
                    for (i, v) in r.iter_mut().enumerate() {
                        *v = load8(w, (r0 + g * 8 + i) * k + k0 + kk);
                    }
                    transpose8(&mut r);
                    for (i, v) in r.iter().enumerate() {
                        _mm256_storeu_ps(dst.add((kk + i) * 16 + g * 8), *v);
                    }
                    kk += 8;
                }
                for kk in full..kc {
                    for i in 0..8 {
                        *dst.add(kk * 16 + g * 8 + i) = get(w, (r0 + g * 8 + i) * k + k0 + kk);
                    }
                }
            } else {
                for kk in 0..kc {
                    for i in 0..8 {
                        *dst.add(kk * 16 + g * 8 + i) =
                            if i < rows { get(w, (r0 + g * 8 + i) * k + k0 + kk) } else { 0.0 };
                    }
                }
            }
        }
    }

    #[inline]
    fn get(w: WeightView<'_>, i: usize) -> f32 {
        match w {
            WeightView::F32(w) => w[i],
            WeightView::Bf16(w) => bf16_to_f32(w[i]),
            WeightView::F16(w) => half::f16::from_bits(w[i]).to_f32(),
        }
    }

    /// `y[T, cols] (+)= x[T, kc] · panel[kc][16]`: `x` at row stride `xs`, `y` at row stride
    /// `ys`; only the first `cols` outputs are written; `add` adds to what `y` holds.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn micro<const T: usize>(
        x: *const f32,
        xs: usize,
        panel: *const f32,
        kc: usize,
        y: *mut f32,
        ys: usize,
        cols: usize,
        add: bool,
    ) {
        let mut c0 = [_mm256_setzero_ps(); T];
        let mut c1 = [_mm256_setzero_ps(); T];
        if add {
            // The tile of `y` this adds into was last touched a whole block of `k` ago: ask
            // for its lines now, so that they arrive while the loop below runs.
            for t in 0..T {
                _mm_prefetch::<_MM_HINT_T0>(y.add(t * ys) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(y.add(t * ys + 15) as *const i8);
            }
        }
        for kk in 0..kc {
            let w0 = _mm256_loadu_ps(panel.add(kk * 16));
            let w1 = _mm256_loadu_ps(panel.add(kk * 16 + 8));
            for t in 0..T {
                let xv = _mm256_broadcast_ss(&*x.add(t * xs + kk));
                c0[t] = _mm256_fmadd_ps(w0, xv, c0[t]);
                c1[t] = _mm256_fmadd_ps(w1, xv, c1[t]);
            }
        }
        for t in 0..T {
            let yo = y.add(t * ys);
            if cols == 16 {
                let (mut a, mut b) = (c0[t], c1[t]);
                if add {
                    a = _mm256_add_ps(a, _mm256_loadu_ps(yo));
                    b = _mm256_add_ps(b, _mm256_loadu_ps(yo.add(8)));
                }
                _mm256_storeu_ps(yo, a);
                _mm256_storeu_ps(yo.add(8), b);
            } else {
                let mut tmp = [0f32; 16];
                _mm256_storeu_ps(tmp.as_mut_ptr(), c0[t]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), c1[t]);
                for (j, v) in tmp.iter().enumerate().take(cols) {
                    *yo.add(j) = if add { *yo.add(j) + v } else { *v };
                }
            }
        }
    }
}
