//! weir-kernels: math on buffers, and nothing else.
//!
//! Every function here takes plain slices (row-major, shapes in the comments) and an
//! implementation of [`Parallel`] that splits work over the cores of the lane that calls it.
//! Nothing here knows of graphs, operators, threads or models.
//!
//! * [`matmul`] — `y = x · Wᵀ (+ b)` with f32, bf16 or f16 weights and f32 accumulation.
//! * [`gemm`] — the packed, register-tiled kernel `matmul` uses for many tokens at once.
//! * [`amx`] — the same on AMX tiles for bf16 weights (`WEIR_CPU_ISA=amx`; not yet run on an AMX CPU).
//! * [`convert`] — bf16 weights rewritten as f16 in place (cheaper to widen without bf16 instructions).
//! * [`norm`] — RMSNorm.
//! * [`rope`] — rotary position embedding tables and the rotate-half application.
//! * [`attention`] — causal grouped-query attention of new tokens over a KV cache.
//! * [`activation`] — SiLU-gated product (SwiGLU's middle).
//! * [`cuda`] — the same operations on a GPU: CUDA C compiled by NVRTC at start-up, cuBLAS GEMMs.
//! * [`probe`] — the memory-read bound, read the ways the decode kernels read.
//! * [`isa`] — which instruction set the fast paths use (`WEIR_CPU_ISA` overrides).
//!
//! ```
//! use weir_kernels::{matmul, Serial, WeightView};
//! let x = [1.0f32, 2.0];                // [tokens=1, k=2]
//! let w = [1.0f32, 0.0, 0.5, 0.5];      // [n=2, k=2]
//! let mut y = [0.0f32; 2];              // [tokens=1, n=2]
//! matmul::matmul(&x, 1, WeightView::F32(&w), 2, None, &mut y, &Serial);
//! assert_eq!(y, [1.0, 1.5]);
//! ```

pub mod activation;
pub mod amx;
pub mod attention;
pub mod convert;
pub mod cuda;
pub mod gemm;
pub mod isa;
pub mod matmul;
pub mod norm;
pub mod par;
pub mod probe;
pub mod rope;

pub use matmul::WeightView;
pub use par::{Parallel, Serial};
