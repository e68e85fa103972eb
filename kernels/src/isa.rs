//! Which instruction set the fast kernels use, detected once at run time.
//!
//! `WEIR_CPU_ISA=amx|avx512|avx2|portable` forces a path (a path the CPU lacks falls back to the
//! best one with a warning on stderr), so every path can be tested on one machine.
//!
//! `amx` (AVX-512 with AMX tiles for bf16 GEMMs, [`crate::amx`]) is chosen only when asked for:
//! its kernel is checked on an emulated tile unit everywhere but has not yet run on an AMX
//! CPU, and it rounds the input to bf16 (the other paths keep it f32).

use std::sync::OnceLock;

/// An instruction-set path of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 with AMX bf16 tiles for GEMMs of bf16 weights (only when asked for).
    Amx,
    /// AVX-512 F/BW/VL (x86-64).
    Avx512,
    /// AVX2 with FMA and F16C (x86-64).
    Avx2,
    /// Plain Rust that the compiler vectorises as it can.
    Portable,
}

impl Isa {
    /// The name used by `WEIR_CPU_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

fn avx512_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn avx2_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The best path this CPU supports, unless `WEIR_CPU_ISA` asks for another.
pub fn detected() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let all = available();
        let best = all[0];
        match std::env::var("WEIR_CPU_ISA").ok().as_deref() {
            None | Some("") | Some("auto") => best,
            Some(name) => match all.iter().find(|i| i.name() == name) {
                Some(i) => *i,
                None => {
                    eprintln!(
                        "weir: WEIR_CPU_ISA={name} is not available on this CPU (available: {}); using {}",
                        all.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "),
                        best.name()
                    );
                    best
                }
            },
        }
    })
}

/// Makes the calling thread treat subnormal floats as zero, as inputs and as results (x86-64's
/// MXCSR DAZ and FTZ bits). Subnormals carry no meaning at the scale of activations and
/// weights, but on x86 each one that reaches an FMA can cost a slow microcode assist;
/// random-weight models produce them deep in the layers. Compute lanes call this on start.
pub fn flush_subnormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: setting DAZ (bit 6) and FTZ (bit 15) changes only how subnormals round; every
    // x86-64 CPU has SSE2 and both bits.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

/// Every path this CPU can run, best first (for tests that check each against the reference);
/// `amx` only when `WEIR_CPU_ISA=amx` asks for it.
pub fn available() -> Vec<Isa> {
    let mut v = Vec::new();
    if avx512_present() && crate::amx::available() && std::env::var("WEIR_CPU_ISA").is_ok_and(|v| v == "amx") {
        v.push(Isa::Amx);
    }
    if avx512_present() {
        v.push(Isa::Avx512);
    }
    if avx2_present() {
        v.push(Isa::Avx2);
    }
    v.push(Isa::Portable);
    v
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn subnormal_results_are_flushed_to_zero_on_a_thread_that_asks() {
        let product = || std::hint::black_box(1e-30f32) * std::hint::black_box(1e-10f32);
        std::thread::spawn(move || {
            assert!(product() > 0.0 && !product().is_normal(), "subnormal before");
            super::flush_subnormals();
            assert_eq!(product(), 0.0);
        })
        .join()
        .unwrap();
    }
}
