//! Which instruction set the fast kernels use, detected once at run time.
//!
//! `WEIR_CPU_ISA=avx512|portable` forces a path (a path the CPU lacks falls back to portable
//! with a warning on stderr), so every path can be tested on one machine.

use std::sync::OnceLock;

/// An instruction-set path of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VL (x86-64).
    Avx512,
    /// Plain Rust that the compiler vectorises as it can.
    Portable,
}

impl Isa {
    /// The name used by `WEIR_CPU_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
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

/// The best path this CPU supports, unless `WEIR_CPU_ISA` asks for another.
pub fn detected() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = if avx512_present() { Isa::Avx512 } else { Isa::Portable };
        match std::env::var("WEIR_CPU_ISA").ok().as_deref() {
            None | Some("") | Some("auto") => best,
            Some("portable") => Isa::Portable,
            Some("avx512") if best == Isa::Avx512 => Isa::Avx512,
            Some(other) => {
                eprintln!(
                    "weir: WEIR_CPU_ISA={other} is not available on this CPU (known: avx512, portable); using {}",
                    best.name()
                );
                best
            }
        }
    })
}

/// Every path this CPU can run, best first (for tests that check each against the reference).
pub fn available() -> Vec<Isa> {
    let mut v = Vec::new();
    if avx512_present() {
        v.push(Isa::Avx512);
    }
    v.push(Isa::Portable);
    v
}
