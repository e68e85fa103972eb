//! The GPU kernels: the CUDA C of `weir.cu` compiled by NVRTC at start-up for the device's
//! architecture (the PTX cached on disk), and cuBLAS for the linear layers. Activations are f32
//! as on the CPU; weights and KV caches are f32, bf16 or f16 ([`Elem`]), held as raw bytes.
//!
//! CUDA comes through cudarc with its libraries loaded at run time, so a build needs no CUDA.
//! cudarc panics on the first call into a library that is missing (or lacks a function it
//! binds), so each library's presence is checked first and every call runs under
//! `catch_unwind`: no driver, no device, no NVRTC or a failed call is a typed [`GpuError`],
//! never a panic.
//!
//! Nothing here runs without a GPU except compiling the source to PTX, which needs only
//! NVRTC's library (the tests do it wherever `libnvrtc` loads). The tests also run the
//! source itself on a CPU emulator of CUDA's execution model (`gpu-emu/emu/emu.cpp`), which checks
//! the kernels' logic on any x86-64 Linux machine with a C++ compiler.

use crate::attention::{AttnShape, KvType};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use std::sync::Arc;

mod load;
pub use load::{call, compile, cublas_present, driver_present, nvrtc_present, ptx};
#[cfg(test)]
pub(crate) use load::{compile_source, ptx_cached_in};

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("weir.cu");

/// The kernels `SOURCE` defines, by name.
pub const KERNELS: [&str; 14] = [
    "embed",
    "rmsnorm",
    "rope",
    "silu_mul",
    "add",
    "add_bias",
    "narrow",
    "gather_rows",
    "scatter_rows",
    "sigmoid_gate",
    "kv_store",
    "attend",
    "argmax",
    "top_k",
];

/// The largest head dimension `attend` takes (`ATTN_MAX_HEAD_DIM` in the source).
pub const MAX_HEAD_DIM: usize = 256;
/// The most candidates `top_k` returns per row (`TOPK_MAX`).
pub const MAX_TOP_K: usize = 64;

/// Why the GPU cannot do what was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    /// No CUDA driver library (`libcuda.so`) could be loaded.
    #[error("no CUDA driver on this machine (libcuda could not be loaded)")]
    NoDriver,
    /// The driver is there but has no device of that ordinal.
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice { ordinal: usize, count: usize },
    /// A CUDA library other than the driver could not be loaded.
    #[error("no {0} library on this machine (set LD_LIBRARY_PATH to the CUDA libraries)")]
    NoLibrary(&'static str),
    /// NVRTC refused the kernels' source.
    #[error("NVRTC could not compile weir's kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    /// A kernel was handed buffers that do not fit the shapes it was given.
    #[error("{kernel}: {why}")]
    Shape { kernel: &'static str, why: String },
    /// A CUDA call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Element type of a weight or KV buffer on the GPU (the `dtype` argument of the kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 | Elem::F16 => 2,
        }
    }
}

impl From<KvType> for Elem {
    fn from(t: KvType) -> Elem {
        match t {
            KvType::F32 => Elem::F32,
            KvType::Bf16 => Elem::Bf16,
            KvType::F16 => Elem::F16,
        }
    }
}

/// Threads per block of the row kernels (a multiple of 32, a power of two).
const ROW_THREADS: u32 = 256;
/// Threads per block of `attend` (`ATTN_THREADS`).
const ATTN_THREADS: u32 = 128;

fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// The arguments of a column-major cuBLAS GEMM `C = op(A) · op(B)` (`C` m × n, inner size k).
#[derive(Debug, Clone, Copy, PartialEq)]
struct GemmShape {
    transa: bool,
    transb: bool,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
}

/// `linear`'s GEMM: row-major `y[t, n] = x[t, k] · W[n, k]ᵀ` as cuBLAS sees it. Row-major
/// `y[t, n]` is column-major `[n, t]`; it is `op(A) · B` with `A` the column-major `[k, n]`
/// that row-major `W[n, k]` is, transposed (lda k), and `B` the column-major `[k, t]` that
/// row-major `x[t, k]` is (ldb k). Checked against the CPU by a column-major GEMM in the tests.
fn gemm_shape(t: i32, n: i32, k: i32) -> GemmShape {
    GemmShape { transa: true, transb: false, m: n, n: t, k, lda: k, ldb: k, ldc: n }
}

/// `attend`'s grid: a block per query row and head.
fn attend_cfg(rows: usize, heads: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, heads as u32, 1), block_dim: (ATTN_THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn check(kernel: &'static str, ok: bool, why: impl FnOnce() -> String) -> Result<(), GpuError> {
    if ok {
        Ok(())
    } else {
        Err(GpuError::Shape { kernel, why: why() })
    }
}

fn int(kernel: &'static str, what: &str, v: usize) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::Shape { kernel, why: format!("{what} {v} is past i32") })
}

/// weir's kernels loaded on one stream (a GPU compute lane), with a cuBLAS handle bound to it.
/// Every method only enqueues work on the stream; cudarc orders it after earlier writes to its
/// buffers from other streams through events, never a device-wide synchronise.
pub struct GpuKernels {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    f: Vec<CudaFunction>,
    blas: CudaBlas,
}

impl std::fmt::Debug for GpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKernels").field("device", &self.stream.context().ordinal()).finish()
    }
}

/// `silu_mul(gate, up)`'s and `add`'s element counts are `size_t` in the source.
type Count = u64;

impl GpuKernels {
    /// Compiles (or reads from the cache) and loads the kernels for `stream`'s device.
    pub fn new(stream: Arc<CudaStream>) -> Result<GpuKernels, GpuError> {
        let ctx: Arc<CudaContext> = stream.context().clone();
        let arch = call("querying the compute capability", || ctx.compute_capability())?;
        let text = ptx(arch)?;
        let module = call("loading the kernels' PTX", || ctx.load_module(cudarc::nvrtc::Ptx::from_src(text)))?;
        let f = KERNELS
            .iter()
            .map(|name| call(&format!("finding kernel {name}"), || module.load_function(name)))
            .collect::<Result<Vec<_>, _>>()?;
        if !cublas_present() {
            return Err(GpuError::NoLibrary("cuBLAS (libcublas)"));
        }
        let blas = call("creating a cuBLAS handle", || CudaBlas::new(stream.clone()))?;
        Ok(GpuKernels { stream, _module: module, f, blas })
    }

    /// The stream every method enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn func(&self, name: &str) -> &CudaFunction {
        let i = KERNELS.iter().position(|k| *k == name).expect("a kernel of KERNELS");
        &self.f[i]
    }

    /// `out[t] = table[ids[t]]` as f32; `table`: `[rows, dim]` of `elem`.
    pub fn embed(
        &self,
        ids: &CudaView<'_, i32>,
        table: &CudaView<'_, u8>,
        elem: Elem,
        dim: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        if ids.is_empty() {
            return Ok(()); // a pass with no tokens (only releases)
        }
        let t = ids.len();
        check("embed", out.len() == t * dim && table.len() % (dim * elem.size()) == 0, || {
            format!("{t} ids of dim {dim} into {} floats from a table of {} bytes", out.len(), table.len())
        })?;
        let (dt, d) = (elem as i32, int("embed", "dim", dim)?);
        call("embed", || {
            let mut b = self.stream.launch_builder(self.func("embed"));
            b.arg(ids).arg(table).arg(&dt).arg(out).arg(&d);
            // SAFETY: the argument list matches the kernel's; shapes were checked above (the
            // ids are checked against the table by the caller, as on the CPU).
            unsafe { b.launch(rows_cfg(t, ROW_THREADS)) }
        })
        .map(drop)
    }

    /// RMSNorm of each row of `x` (`[rows, w.len()]`) into `y`.
    pub fn rmsnorm(
        &self,
        x: &CudaView<'_, f32>,
        w: &CudaView<'_, f32>,
        eps: f32,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        if x.is_empty() && y.is_empty() {
            return Ok(());
        }
        let dim = w.len();
        check("rmsnorm", dim > 0 && x.len() % dim == 0 && y.len() == x.len(), || {
            format!("x of {} floats, weight of {dim}, out of {}", x.len(), y.len())
        })?;
        let d = int("rmsnorm", "dim", dim)?;
        call("rmsnorm", || {
            let mut b = self.stream.launch_builder(self.func("rmsnorm"));
            b.arg(x).arg(w).arg(y).arg(&d).arg(&eps);
            // SAFETY: arguments match; shapes checked.
            unsafe { b.launch(rows_cfg(x.len() / dim, ROW_THREADS)) }
        })
        .map(drop)
    }

    /// Rotates each row of `x` (`[tokens, heads*head_dim]`) for its position, in place.
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        pos: &CudaView<'_, i32>,
        inv_freq: &CudaView<'_, f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), GpuError> {
        if pos.is_empty() && x.is_empty() {
            return Ok(());
        }
        let t = pos.len();
        check(
            "rope",
            head_dim.is_multiple_of(2) && inv_freq.len() == head_dim / 2 && x.len() == t * heads * head_dim,
            || {
                format!(
                    "{} floats for {t} positions × {heads} heads × {head_dim}, {} frequencies",
                    x.len(),
                    inv_freq.len()
                )
            },
        )?;
        let (h, hd) = (int("rope", "heads", heads)?, int("rope", "head_dim", head_dim)?);
        call("rope", || {
            let mut b = self.stream.launch_builder(self.func("rope"));
            b.arg(x).arg(pos).arg(inv_freq).arg(&h).arg(&hd);
            // SAFETY: arguments match; shapes checked.
            unsafe { b.launch(rows_cfg(t, ROW_THREADS)) }
        })
        .map(drop)
    }

    /// `gate = silu(gate) * up`.
    pub fn silu_mul(&self, gate: &mut CudaViewMut<'_, f32>, up: &CudaView<'_, f32>) -> Result<(), GpuError> {
        if gate.is_empty() && up.is_empty() {
            return Ok(());
        }
        check("silu_mul", gate.len() == up.len(), || format!("gate of {}, up of {}", gate.len(), up.len()))?;
        let n = gate.len() as Count;
        call("silu_mul", || {
            let mut b = self.stream.launch_builder(self.func("silu_mul"));
            b.arg(gate).arg(up).arg(&n);
            // SAFETY: arguments match; lengths checked.
            unsafe { b.launch(grid_for(n as usize)) }
        })
        .map(drop)
    }

    /// `a += b`.
    pub fn add(&self, a: &mut CudaViewMut<'_, f32>, b: &CudaView<'_, f32>) -> Result<(), GpuError> {
        if a.is_empty() && b.is_empty() {
            return Ok(());
        }
        check("add", a.len() == b.len(), || format!("{} and {} floats", a.len(), b.len()))?;
        let n = a.len() as Count;
        call("add", || {
            let mut l = self.stream.launch_builder(self.func("add"));
            l.arg(a).arg(b).arg(&n);
            // SAFETY: arguments match; lengths checked.
            unsafe { l.launch(grid_for(n as usize)) }
        })
        .map(drop)
    }

    /// Each row of `y` (`[rows, b.len()]`) `+= b`.
    pub fn add_bias(&self, y: &mut CudaViewMut<'_, f32>, b: &CudaView<'_, f32>) -> Result<(), GpuError> {
        if y.is_empty() {
            return Ok(());
        }
        check("add_bias", !b.is_empty() && y.len().is_multiple_of(b.len()), || {
            format!("{} floats in rows of {}", y.len(), b.len())
        })?;
        let (n, total) = (int("add_bias", "width", b.len())?, y.len() as Count);
        call("add_bias", || {
            let mut l = self.stream.launch_builder(self.func("add_bias"));
            l.arg(y).arg(b).arg(&n).arg(&total);
            // SAFETY: arguments match; lengths checked.
            unsafe { l.launch(grid_for(total as usize)) }
        })
        .map(drop)
    }

    /// `y = x` rounded to `elem` (bf16 or f16; `y` holds `x.len()` of them).
    pub fn narrow(&self, x: &CudaView<'_, f32>, elem: Elem, y: &mut CudaViewMut<'_, u8>) -> Result<(), GpuError> {
        if x.is_empty() {
            return Ok(());
        }
        check("narrow", elem != Elem::F32 && y.len() >= x.len() * 2, || {
            format!("{} floats to {elem:?} in {} bytes", x.len(), y.len())
        })?;
        let (dt, n) = (elem as i32, x.len() as Count);
        call("narrow", || {
            let mut b = self.stream.launch_builder(self.func("narrow"));
            b.arg(x).arg(y).arg(&dt).arg(&n);
            // SAFETY: arguments match; room checked.
            unsafe { b.launch(grid_for(n as usize)) }
        })
        .map(drop)
    }

    /// `out[r] = x[idx[r]]` (rows of `width`): the rows of the tokens routed to one expert.
    /// The indices must be rows of `x` (the caller's routing).
    pub fn gather_rows(
        &self,
        x: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        width: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        if idx.is_empty() {
            return Ok(());
        }
        check("gather_rows", width > 0 && x.len() % width == 0 && out.len() == idx.len() * width, || {
            format!("{} rows of {width} from {} floats into {}", idx.len(), x.len(), out.len())
        })?;
        let w = int("gather_rows", "width", width)?;
        call("gather_rows", || {
            let mut b = self.stream.launch_builder(self.func("gather_rows"));
            b.arg(x).arg(idx).arg(out).arg(&w);
            // SAFETY: arguments match; shapes checked, indices the caller's promise.
            unsafe { b.launch(rows_cfg(idx.len(), ROW_THREADS)) }
        })
        .map(drop)
    }

    /// `y[idx[r]] = w[r] · rows[r]` (rows of `width`), leaving `y`'s other rows as they are:
    /// an expert's weighted outputs back in their tokens' rows. No index may repeat.
    pub fn scatter_rows(
        &self,
        rows: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        w: &CudaView<'_, f32>,
        width: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        if idx.is_empty() {
            return Ok(());
        }
        check(
            "scatter_rows",
            width > 0 && rows.len() == idx.len() * width && w.len() == idx.len() && y.len() % width == 0,
            || {
                format!(
                    "{} rows of {width} ({} floats, {} weights) into {} floats",
                    idx.len(),
                    rows.len(),
                    w.len(),
                    y.len()
                )
            },
        )?;
        let wd = int("scatter_rows", "width", width)?;
        call("scatter_rows", || {
            let mut b = self.stream.launch_builder(self.func("scatter_rows"));
            b.arg(rows).arg(idx).arg(w).arg(y).arg(&wd);
            // SAFETY: arguments match; shapes checked, indices the caller's promise.
            unsafe { b.launch(rows_cfg(idx.len(), ROW_THREADS)) }
        })
        .map(drop)
    }

    /// Each row of `x` (`[tokens, dim]`) scaled by the sigmoid of its gate `g[t]`.
    pub fn sigmoid_gate(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        g: &CudaView<'_, f32>,
        dim: usize,
    ) -> Result<(), GpuError> {
        if g.is_empty() && x.is_empty() {
            return Ok(());
        }
        check("sigmoid_gate", x.len() == g.len() * dim, || {
            format!("{} floats for {} gates of {dim}", x.len(), g.len())
        })?;
        let d = int("sigmoid_gate", "dim", dim)?;
        call("sigmoid_gate", || {
            let mut b = self.stream.launch_builder(self.func("sigmoid_gate"));
            b.arg(x).arg(g).arg(&d);
            // SAFETY: arguments match; shapes checked.
            unsafe { b.launch(rows_cfg(g.len(), ROW_THREADS)) }
        })
        .map(drop)
    }

    /// Zeros on the stream.
    pub fn zero(&self, y: &mut CudaViewMut<'_, f32>) -> Result<(), GpuError> {
        if y.is_empty() {
            return Ok(());
        }
        call("zeroing", || self.stream.memset_zeros(y))
    }

    /// Stores each token's keys and values (`[tokens, kv_dim]`) into a paged cache: token `t`
    /// at position `offset[t]` of the block at device address `block[t]` (`[2, block_tokens,
    /// kv_dim]` of `elem`: keys, then values).
    ///
    /// # Safety
    /// Every address must be a live device block of at least `2·block_tokens·kv_dim` elements
    /// of `elem`, not used by another stream until this stream's work on it is done, and every
    /// offset below `block_tokens`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kv_store(
        &self,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
        elem: Elem,
        block: &CudaView<'_, u64>,
        offset: &CudaView<'_, i32>,
        kv_dim: usize,
        block_tokens: usize,
    ) -> Result<(), GpuError> {
        if block.is_empty() && k.is_empty() && v.is_empty() {
            return Ok(());
        }
        let t = block.len();
        check(
            "kv_store",
            k.len() == t * kv_dim && v.len() == k.len() && offset.len() == t && block_tokens > 0,
            || {
                format!(
                    "{t} blocks, {} offsets, keys {} and values {} floats of dim {kv_dim}",
                    offset.len(),
                    k.len(),
                    v.len()
                )
            },
        )?;
        let (dt, kd, bt) =
            (elem as i32, int("kv_store", "kv_dim", kv_dim)?, int("kv_store", "block_tokens", block_tokens)?);
        call("kv_store", || {
            let mut b = self.stream.launch_builder(self.func("kv_store"));
            b.arg(k).arg(v).arg(&dt).arg(block).arg(offset).arg(&kd).arg(&bt);
            // SAFETY: arguments match; the addresses are the caller's promise.
            unsafe { b.launch(rows_cfg(t, ROW_THREADS)) }
        })
        .map(drop)
    }

    /// Attention of every query row of `q` (`[rows, heads*head_dim]`, rotated) over its
    /// sequence's paged cache: row `r` sits at position `pos[r]`; its sequence's blocks, in
    /// order, are at the device addresses `table[table_start[r]..]`; with `window` only the
    /// last `window` positions count.
    ///
    /// # Safety
    /// The blocks a row reaches (`pos[r] / block_tokens + 1` of them from its start) must be
    /// live device blocks laid out as [`GpuKernels::kv_store`] writes them, holding every
    /// position up to the row's, written on this stream (or ordered before it).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attend(
        &self,
        q: &CudaView<'_, f32>,
        elem: Elem,
        table: &CudaView<'_, u64>,
        table_start: &CudaView<'_, i32>,
        pos: &CudaView<'_, i32>,
        s: AttnShape,
        block_tokens: usize,
        window: Option<usize>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        if pos.is_empty() && q.is_empty() && out.is_empty() {
            return Ok(());
        }
        let rows = pos.len();
        let qd = s.heads * s.head_dim;
        check("attend", s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads), || {
            format!("{} heads over {} KV heads", s.heads, s.kv_heads)
        })?;
        check("attend", s.head_dim > 0 && s.head_dim <= MAX_HEAD_DIM, || {
            format!("head dimension {} (at most {MAX_HEAD_DIM})", s.head_dim)
        })?;
        check("attend", q.len() == rows * qd && out.len() == q.len() && table_start.len() == rows, || {
            format!("q of {} and out of {} floats for {rows} rows of {qd}", q.len(), out.len())
        })?;
        let h = int("attend", "heads", s.heads)?;
        let (kvh, hd) = (int("attend", "kv_heads", s.kv_heads)?, int("attend", "head_dim", s.head_dim)?);
        let (dt, bt) = (elem as i32, int("attend", "block_tokens", block_tokens)?);
        let w = int("attend", "window", window.unwrap_or(0))?;
        let cfg = attend_cfg(rows, s.heads);
        call("attend", || {
            let mut b = self.stream.launch_builder(self.func("attend"));
            b.arg(q).arg(out).arg(&dt).arg(table).arg(table_start).arg(pos);
            b.arg(&h).arg(&kvh).arg(&hd).arg(&bt).arg(&w);
            // SAFETY: arguments match; the blocks are the caller's promise.
            unsafe { b.launch(cfg) }
        })
        .map(drop)
    }

    /// The greedy choice of each row of `logits` (`[rows, vocab]`): the lowest index of the
    /// largest value.
    pub fn argmax(
        &self,
        logits: &CudaView<'_, f32>,
        vocab: usize,
        out: &mut CudaViewMut<'_, i32>,
    ) -> Result<(), GpuError> {
        if out.is_empty() && logits.is_empty() {
            return Ok(());
        }
        let rows = out.len();
        check("argmax", vocab > 0 && logits.len() == rows * vocab, || {
            format!("{} logits for {rows} rows of {vocab}", logits.len())
        })?;
        let v = int("argmax", "vocab", vocab)?;
        call("argmax", || {
            let mut b = self.stream.launch_builder(self.func("argmax"));
            b.arg(logits).arg(&v).arg(out);
            // SAFETY: arguments match; shapes checked. 1024 threads: the shared arrays' size.
            unsafe { b.launch(rows_cfg(rows, 1024)) }
        })
        .map(drop)
    }

    /// Each row's `k` largest logits, largest first (lower index first among equals): ids and
    /// values, `[rows, k]` each.
    pub fn top_k(
        &self,
        logits: &CudaView<'_, f32>,
        vocab: usize,
        k: usize,
        ids: &mut CudaViewMut<'_, i32>,
        vals: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        if ids.is_empty() && vals.is_empty() && logits.is_empty() {
            return Ok(());
        }
        check("top_k", (1..=MAX_TOP_K.min(vocab)).contains(&k), || {
            format!("k = {k} (1 to {} for a vocabulary of {vocab})", MAX_TOP_K.min(vocab))
        })?;
        let rows = ids.len() / k;
        check("top_k", logits.len() == rows * vocab && ids.len() == rows * k && vals.len() == ids.len(), || {
            format!("{} logits of {vocab}, {} ids and {} values for k = {k}", logits.len(), ids.len(), vals.len())
        })?;
        let (v, kk) = (int("top_k", "vocab", vocab)?, k as i32);
        call("top_k", || {
            let mut b = self.stream.launch_builder(self.func("top_k"));
            b.arg(logits).arg(&v).arg(&kk).arg(ids).arg(vals);
            // SAFETY: arguments match; shapes checked.
            unsafe { b.launch(rows_cfg(rows, 1024)) }
        })
        .map(drop)
    }

    /// The linear layer `y = x · Wᵀ` (`x`: `[t, k]` f32, `w`: `[n, k]` of `elem`, `y`: `[t, n]`
    /// f32) through cuBLAS with f32 accumulation: f32 weights in f32 (no TF32), bf16 and f16
    /// weights against `x` rounded to their type into `scratch` (`t·k` of them).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &CudaView<'_, f32>,
        t: usize,
        w: &CudaView<'_, u8>,
        elem: Elem,
        n: usize,
        y: &mut CudaViewMut<'_, f32>,
        scratch: &mut CudaViewMut<'_, u8>,
    ) -> Result<(), GpuError> {
        if t == 0 && x.is_empty() && y.is_empty() {
            return Ok(());
        }
        let k = x.len() / t.max(1);
        check("linear", t > 0 && x.len() == t * k && w.len() == n * k * elem.size() && y.len() == t * n, || {
            format!(
                "x of {} floats for {t} tokens, w of {} bytes for [{n}, {k}] {elem:?}, y of {}",
                x.len(),
                w.len(),
                y.len()
            )
        })?;
        let g = gemm_shape(int("linear", "t", t)?, int("linear", "n", n)?, int("linear", "k", k)?);
        let ty = match elem {
            Elem::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            Elem::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            Elem::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        };
        if elem != Elem::F32 {
            self.narrow(x, elem, scratch)?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // cuBLAS calls the driver on this thread's current context.
        call("binding the device's context", || self.stream.context().bind_to_thread())?;
        call("linear (cuBLAS GEMM)", || {
            let (wp, _w) = w.device_ptr(&self.stream);
            let (xp, _x) =
                if elem == Elem::F32 { x.device_ptr(&self.stream) } else { scratch.device_ptr(&self.stream) };
            let (yp, _y) = y.device_ptr_mut(&self.stream);
            let op = |transposed| {
                if transposed {
                    blas_sys::cublasOperation_t::CUBLAS_OP_T
                } else {
                    blas_sys::cublasOperation_t::CUBLAS_OP_N
                }
            };
            // SAFETY: pointers are live device buffers of the sizes checked above.
            unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    op(g.transa),
                    op(g.transb),
                    g.m,
                    g.n,
                    g.k,
                    (&alpha) as *const f32 as *const _,
                    wp as *const _,
                    ty,
                    g.lda,
                    xp as *const _,
                    ty,
                    g.ldb,
                    (&beta) as *const f32 as *const _,
                    yp as *mut _,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    g.ldc,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
