//! Changing how weights are held: bf16 → f16 in place.
//!
//! On a CPU without bf16 instructions, f16 weights are cheaper to widen than bf16 ones (one
//! `vcvtph2ps` per 8 against a zero-extend and a shift): on the AVX2 path the matrix kernels
//! run at 125–130 GFLOP/s in f16 against 99–124 in bf16 from 32 tokens on (BENCHMARKS.md). Both are 2 bytes, so the conversion happens in the
//! buffer the weights were read into. It is exact for every bf16 value whose magnitude is at
//! least 2⁻¹⁴ (f16's smallest normal; bf16's 8 significant bits fit f16's 11) and at most 65504,
//! and for zeros, infinities and NaNs; smaller magnitudes round to the nearest f16 subnormal,
//! off by at most 2⁻²⁵ (a bf16 weight of magnitude 0.02 is itself only known to ±4·10⁻⁵). A
//! finite value above 65504 has no f16: such a tensor is left as it is.

use crate::matmul::bf16_to_f32;

/// Whether every value of `bits` (bf16) has an f16 of the same kind: no finite magnitude above
/// f16's largest, 65504. Returns the index of the first that has none.
pub fn bf16_fits_f16(bits: &[u16]) -> Result<(), usize> {
    // bf16 0x4780 is 65536, the first finite magnitude past 65504 (0x477F is 65280);
    // 0x7F80 and up are infinities and NaNs, which f16 has too.
    let bad = |b: u16| (0x4780..0x7F80).contains(&(b & 0x7FFF));
    // Whole blocks without an early exit (the compiler vectorises the fold); the index is
    // looked for only in a block that has one.
    for (n, block) in bits.chunks(4096).enumerate() {
        if block.iter().fold(false, |any, &b| any | bad(b)) {
            return Err(n * 4096 + block.iter().position(|&b| bad(b)).unwrap_or(0));
        }
    }
    Ok(())
}

/// Rewrites `bits` from bf16 to f16 (round to nearest even), leaving it untouched and
/// returning the index of the first value with no f16 (see [`bf16_fits_f16`]) if there is one.
pub fn bf16_to_f16_in_place(bits: &mut [u16]) -> Result<(), usize> {
    bf16_fits_f16(bits)?;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the features were just detected.
        done = unsafe { avx2(bits) };
    }
    for b in &mut bits[done..] {
        *b = half::f16::from_f32(bf16_to_f32(*b)).to_bits();
    }
    Ok(())
}

/// Converts whole groups of 8; returns how many elements it converted.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn avx2(bits: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let n = bits.len() / 8 * 8;
    let p = bits.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let h = _mm_loadu_si128(p.add(i) as *const __m128i);
        let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
        let out = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
        _mm_storeu_si128(p.add(i) as *mut __m128i, out);
        i += 8;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bf16_converts_as_the_reference_does() {
        // All 65536 bit patterns, minus those with no f16, in an odd-length buffer (a tail
        // past the groups of 8).
        let all: Vec<u16> = (0..=u16::MAX).filter(|b| bf16_fits_f16(&[*b]).is_ok()).chain([0x3F80]).collect();
        assert_eq!(all.len() % 8, 1);
        let mut got = all.clone();
        bf16_to_f16_in_place(&mut got).unwrap();
        for (b, h) in all.iter().zip(&got) {
            let want = half::f16::from_f32(bf16_to_f32(*b));
            let g = half::f16::from_bits(*h);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "bf16 {b:#06x}: got f16 {h:#06x}, want {:#06x}",
                want.to_bits()
            );
            let (x, y) = (bf16_to_f32(*b), g.to_f32());
            if x.is_finite() {
                let exact = x.abs() >= 2f32.powi(-14) || x == 0.0;
                let err = (x - y).abs();
                assert!(if exact { err == 0.0 } else { err <= 2f32.powi(-25) }, "bf16 {b:#06x}: {x} became {y}");
            }
        }
    }

    #[test]
    fn a_value_past_65504_leaves_the_buffer_untouched() {
        let big = half::bf16::from_f32(70000.0).to_bits();
        let mut v: Vec<u16> = [1.0f32, -2.5, 65280.0].iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect();
        v.push(big);
        let before = v.clone();
        assert_eq!(bf16_to_f16_in_place(&mut v), Err(3));
        assert_eq!(v, before);
        // The largest bf16 below the limit, its negative, and infinity have f16s.
        assert!(bf16_fits_f16(&[0x477F, 0xC77F, 0x7F80, 0xFF80]).is_ok());
        assert_eq!(bf16_fits_f16(&[0x3F80, 0xC780]), Err(1));
    }
}
