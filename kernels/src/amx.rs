//! The linear layer on AMX tiles (Sapphire Rapids and later): `y[t, n] = x[t, k] · w[n, k]ᵀ`
//! for bf16 weights, with `tdpbf16ps` — bf16 products summed in f32. The input is rounded to
//! bf16 (to nearest, ties to even), as oneDNN and PyTorch do on these tiles; the weights are
//! bf16 as stored. Compute-bound passes only (prefill, large batches: [`MIN_TOKENS`] on).
//!
//! Tiles (eight registers of up to 16 rows × 64 bytes): four accumulators `C` of 16 tokens × 16
//! outputs in f32 (a 32 × 32 block of `y`), two `A` of 16 tokens × 32 columns of `x` in bf16,
//! two `B` of 32 columns × 16 outputs of `w` in the pair-interleaved ("VNNI") layout the
//! instruction takes: tile row `r` holds, for each of its 16 outputs `j`, the pair
//! `w[j][2r], w[j][2r + 1]`. Each step of 32 columns is four loads and four `tdpbf16ps`.
//!
//! `x` is rounded and padded once per call (`[t↑32, k↑32]`); each task packs the weights of its
//! rows 32 at a time into that layout (`k↑32 / 32` blocks of 1 KiB per 16 outputs) and runs
//! every block of 32 tokens over them. Padding is zeros, so edges need no other care.
//!
//! The tile unit is reached through `Unit`: `Hardware` issues the instructions (`asm!`:
//! Rust's AMX intrinsics are not stable), and the tests also run the kernel on `Emulated`, the
//! same tile semantics in plain Rust, so the blocking, packing and edges are checked on any
//! machine. Linux hands a thread AMX's tile state only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`): [`available`] asks once per process.

use crate::par::SharedMut;

/// From this many tokens on, bf16 weights go to the tiles (where the CPU has them). Below it
/// the passes are memory-bound and the vector kernels are as fast.
pub const MIN_TOKENS: usize = 32;

/// Columns of `x` and `w` per tile step (32 bf16 = 64 bytes: one tile row).
const KS: usize = 32;
/// Bytes of one packed `B` tile: 16 rows of 64 bytes.
const B_TILE: usize = 1024;

/// Whether this CPU and OS let this process use AMX's bf16 tiles: CPUID says AMX-TILE and
/// AMX-BF16, and Linux grants the tile data state (asked once; granted for every thread).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let edx = core::arch::x86_64::__cpuid_count(7, 0).edx;
            let (tile, bf16) = (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1);
            if !(tile && bf16) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// A tile unit as the kernel drives it: fixed roles for the eight tiles (see the module doc).
pub(crate) trait Unit {
    /// Configures the tiles and zeroes the four accumulators.
    ///
    /// # Safety
    /// On [`Hardware`], [`available`] must be true.
    unsafe fn start(&mut self);
    /// One step of 32 columns: `A0` = rows `0..16` of `a` (row stride `lda` bytes), `A1` =
    /// rows `16..32`; `B0`, `B1` = the packed tiles at `b0`, `b1`; then `C00 += A0·B0`,
    /// `C01 += A0·B1`, `C10 += A1·B0`, `C11 += A1·B1`.
    ///
    /// # Safety
    /// `a` must hold 32 rows of 64 bytes at stride `lda`; `b0`, `b1` a packed tile each.
    unsafe fn step(&mut self, a: *const u16, lda: usize, b0: *const u16, b1: *const u16);
    /// Stores the 32 × 32 block of accumulators at `c` (row stride `ldc` bytes) and releases
    /// the tiles.
    ///
    /// # Safety
    /// `c` must hold 32 rows of 32 f32 at stride `ldc`.
    unsafe fn finish(&mut self, c: *mut f32, ldc: usize);
}

/// The tile configuration `ldtilecfg` reads: palette 1; tiles 0–3 16 rows × 64 bytes (16 f32),
/// 4–7 16 rows × 64 bytes (32 bf16, or 16 pairs).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes()); // bytes per row
            c[48 + t] = 16; // rows
        }
        Config(c)
    }
}

/// The CPU's tiles.
pub(crate) struct Hardware;

#[cfg(target_arch = "x86_64")]
impl Unit for Hardware {
    unsafe fn start(&mut self) {
        let cfg = Config::new();
        core::arch::asm!(
            "ldtilecfg [{cfg}]",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            cfg = in(reg) cfg.0.as_ptr(),
            options(nostack),
        );
    }
    unsafe fn step(&mut self, a: *const u16, lda: usize, b0: *const u16, b1: *const u16) {
        core::arch::asm!(
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a = in(reg) a,
            a1 = in(reg) (a as *const u8).add(16 * lda),
            lda = in(reg) lda,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    unsafe fn finish(&mut self, c: *mut f32, ldc: usize) {
        let c = c as *mut u8;
        core::arch::asm!(
            "tilestored [{c00} + {ldc}*1], tmm0",
            "tilestored [{c01} + {ldc}*1], tmm1",
            "tilestored [{c10} + {ldc}*1], tmm2",
            "tilestored [{c11} + {ldc}*1], tmm3",
            "tilerelease",
            c00 = in(reg) c,
            c01 = in(reg) c.add(64),
            c10 = in(reg) c.add(16 * ldc),
            c11 = in(reg) c.add(16 * ldc + 64),
            ldc = in(reg) ldc,
            options(nostack),
        );
    }
}

/// The tile unit in plain Rust, for the tests: the same instructions' semantics on arrays.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Emulated {
    c: [[[f32; 16]; 16]; 4],
    a: [[[u16; 32]; 16]; 2],
    b: [[[u16; 32]; 16]; 2],
}

#[cfg(test)]
impl Unit for Emulated {
    unsafe fn start(&mut self) {
        self.c = [[[0.0; 16]; 16]; 4];
    }
    unsafe fn step(&mut self, a: *const u16, lda: usize, b0: *const u16, b1: *const u16) {
        for (h, half) in self.a.iter_mut().enumerate() {
            for (r, row) in half.iter_mut().enumerate() {
                let p = (a as *const u8).add((16 * h + r) * lda) as *const u16;
                row.copy_from_slice(std::slice::from_raw_parts(p, 32));
            }
        }
        for (tile, src) in self.b.iter_mut().zip([b0, b1]) {
            for (r, row) in tile.iter_mut().enumerate() {
                row.copy_from_slice(std::slice::from_raw_parts(src.add(32 * r), 32));
            }
        }
        let w = |v: u16| f32::from_bits((v as u32) << 16);
        for (ci, (ai, bi)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
            for m in 0..16 {
                for n in 0..16 {
                    let mut s = self.c[ci][m][n];
                    for p in 0..16 {
                        s += w(self.a[ai][m][2 * p]) * w(self.b[bi][p][2 * n])
                            + w(self.a[ai][m][2 * p + 1]) * w(self.b[bi][p][2 * n + 1]);
                    }
                    self.c[ci][m][n] = s;
                }
            }
        }
    }
    unsafe fn finish(&mut self, c: *mut f32, ldc: usize) {
        for (ci, (rm, cn)) in [(0, 0), (0, 16), (16, 0), (16, 16)].into_iter().enumerate() {
            for m in 0..16 {
                let row = (c as *mut u8).add((rm + m) * ldc) as *mut f32;
                std::ptr::copy_nonoverlapping(self.c[ci][m].as_ptr(), row.add(cn), 16);
            }
        }
    }
}

/// f32 rounded to bf16, to nearest with ties to even (NaN stays NaN).
#[inline]
fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` (`[t, k]` f32) rounded to bf16 into `[t↑32, k↑32]`, zeros in the padding.
pub(crate) fn pack_x(x: &[f32], t: usize, k: usize) -> (Vec<u16>, usize) {
    let (tp, kp) = (t.next_multiple_of(32), k.next_multiple_of(KS));
    let mut a = vec![0u16; tp * kp];
    for (row, src) in a.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
        for (d, s) in row.iter_mut().zip(src) {
            *d = to_bf16(*s);
        }
    }
    (a, kp)
}

/// Packs outputs `j0 .. j0 + 16` of `w` (`[n, k]` bf16; rows past `n` are zeros) into the
/// `B` tiles of every step: `dst[s * 512 + r * 32 + 2c + i] = w[j0 + c][32s + 2r + i]`.
fn pack_b(w: &[u16], n: usize, k: usize, j0: usize, dst: &mut [u16]) {
    let steps = k.div_ceil(KS);
    dst[..steps * B_TILE / 2].fill(0);
    for c in 0..16 {
        let j = j0 + c;
        if j >= n {
            break;
        }
        let row = &w[j * k..(j + 1) * k];
        for (kk, v) in row.iter().enumerate() {
            let (s, within) = (kk / KS, kk % KS);
            dst[s * (B_TILE / 2) + (within / 2) * 32 + 2 * c + within % 2] = *v;
        }
    }
}

/// Computes `y[.., rows]` for all `t` tokens on `unit`, from `a` (`x` packed by [`pack_x`],
/// row length `kp`). `rows.start` is a multiple of 32 unless it is the last block.
///
/// # Safety
/// `y` points at `[t, n]`, no other task writes `y[.., rows]`, and on [`Hardware`] [`available`]
/// is true.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<U: Unit>(
    unit: &mut U,
    a: &[u16],
    kp: usize,
    t: usize,
    w: &[u16],
    n: usize,
    k: usize,
    y: SharedMut<f32>,
    rows: std::ops::Range<usize>,
) {
    let steps = kp / KS;
    let mut b = vec![0u16; 2 * steps * B_TILE / 2];
    let mut c = [[0f32; 32]; 32];
    let lda = kp * 2;
    let mut j0 = rows.start;
    while j0 < rows.end {
        let (lo, hi) = b.split_at_mut(steps * B_TILE / 2);
        pack_b(w, rows.end.min(n), k, j0, lo);
        pack_b(w, rows.end.min(n), k, j0 + 16, hi);
        let cols = (rows.end - j0).min(32);
        let mut m0 = 0;
        while m0 < t {
            unit.start();
            for s in 0..steps {
                unit.step(a.as_ptr().add(m0 * kp + s * KS), lda, lo.as_ptr().add(s * 512), hi.as_ptr().add(s * 512));
            }
            unit.finish(c.as_mut_ptr() as *mut f32, 128);
            for (m, row) in c.iter().enumerate().take((t - m0).min(32)) {
                let out = y.0.add((m0 + m) * n + j0);
                std::ptr::copy_nonoverlapping(row.as_ptr(), out, cols);
            }
            m0 += 32;
        }
        j0 += 32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::tests::random;

    /// The product the tiles compute: `x` rounded to bf16, f32 sums (in f64 here).
    fn reference(x: &[f32], t: usize, w: &[u16], n: usize) -> Vec<f32> {
        let k = x.len() / t;
        let mut y = vec![0f32; t * n];
        for i in 0..t {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|kk| {
                        let a = f32::from_bits((to_bf16(x[i * k + kk]) as u32) << 16);
                        let b = f32::from_bits((w[j * k + kk] as u32) << 16);
                        a as f64 * b as f64
                    })
                    .sum();
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    fn run<U: Unit>(unit: &mut U, t: usize, n: usize, k: usize, split: usize) {
        let x = random(t * k, 1);
        let w: Vec<u16> = random(n * k, 2).iter().map(|v| to_bf16(*v)).collect();
        let (a, kp) = pack_x(&x, t, k);
        let mut y = vec![f32::NAN; t * n];
        let yp = SharedMut(y.as_mut_ptr());
        // Two tasks' row ranges, as matmul splits them (the first a multiple of 32).
        let cut = split.min(n);
        // SAFETY: disjoint row ranges of `y`; the emulated unit needs no hardware.
        unsafe {
            rows(unit, &a, kp, t, &w, n, k, yp, 0..cut);
            rows(unit, &a, kp, t, &w, n, k, yp, cut..n);
        }
        let want = reference(&x, t, &w, n);
        for (i, (g, r)) in y.iter().zip(&want).enumerate() {
            assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "t={t} n={n} k={k}: y[{i}] = {g}, want {r}");
        }
    }

    #[test]
    fn the_tile_kernel_matches_the_reference_at_every_edge() {
        for (t, n, k, split) in
            [(1, 1, 1, 0), (32, 32, 32, 32), (33, 47, 70, 32), (64, 96, 96, 64), (5, 200, 31, 128), (70, 16, 1000, 0)]
        {
            run(&mut Emulated::default(), t, n, k, split);
        }
    }

    #[test]
    fn on_amx_hardware_the_tiles_match_the_reference() {
        // Until a run on an AMX CPU has checked this kernel, it runs only where asked for, as
        // the path itself does (`WEIR_CPU_ISA=amx cargo test`).
        let asked = std::env::var("WEIR_CPU_ISA").is_ok_and(|v| v == "amx");
        if !available() || !asked {
            use std::io::Write;
            let why = if available() { "set WEIR_CPU_ISA=amx to run it" } else { "no AMX tiles on this CPU" };
            let _ = writeln!(std::io::stderr(), "skipped: the AMX hardware test ({why}; the emulated unit ran)");
            return;
        }
        for (t, n, k, split) in [(1, 1, 1, 0), (33, 47, 70, 32), (64, 96, 96, 64), (70, 16, 1000, 0)] {
            run(&mut Hardware, t, n, k, split);
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    }
}
