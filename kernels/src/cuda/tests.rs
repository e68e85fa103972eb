//! The GPU kernels against the CPU ones. Compiling the source needs only NVRTC's library.
//! Each kernel test runs twice: on a GPU ("skipped: no GPU" where there is none), and on the
//! CPU emulator of CUDA's execution model (`emu`), which runs the same source wherever a C++
//! compiler is — so the kernels' logic is checked on every machine, CI included. cuBLAS
//! (`linear`) and the Rust side's shape checks are checked on a GPU only.

use super::*;
use crate::attention::attend_reference;
use crate::matmul::matmul_reference;
use crate::rope::{Rope, RopeScaling};
use crate::WeightView;
use cudarc::driver::CudaSlice;

mod emu;

/// Says a test was skipped where the log shows it: straight to standard error, past the test
/// harness's capture.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// Whether NVRTC's own tests can run: its library loads, and it is not the emulated device's
/// stand-in (which compiles only `weir.cu`, to no real PTX).
fn real_nvrtc() -> bool {
    if std::env::var_os(weir_gpu_emu::MARK).is_some() {
        skipped("on the emulated CUDA device, whose NVRTC is a stand-in");
        return false;
    }
    if !nvrtc_present() {
        skipped("no NVRTC library (libnvrtc): the kernels' source was not compiled");
        return false;
    }
    true
}

/// `n` values in [-1, 1), the same for the same seed (also the AMX tests').
pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
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
    if !real_nvrtc() {
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
    if !real_nvrtc() {
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

/// Every GPU test of this module again, in a child process on the emulated device
/// (`emulated`): the Rust side of the kernels — loading, launching, cuBLAS's arguments, shape
/// checks, copies — runs where there is no GPU. NVRTC's own tests skip there: the emulated
/// NVRTC is not NVRTC.
#[test]
fn the_gpu_tests_pass_on_the_emulated_device() {
    weir_gpu_emu::assert_tests_pass(&["cuda::tests::", "--skip", "emulated"], 10);
}

/// What the kernel tests need of a device: buffers to and from it, and weir's kernels on them
/// (the signatures of [`GpuKernels`], with the device's own buffer type).
trait Dev {
    type Buf<T: Elt>;
    fn up<T: Elt>(&self, v: &[T]) -> Self::Buf<T>;
    fn down<T: Elt>(&self, b: &Self::Buf<T>) -> Vec<T>;
    /// A buffer's device address, as a KV block table holds it.
    fn addr(&self, b: &Self::Buf<u8>) -> u64;
    fn embed(&self, ids: &Self::Buf<i32>, table: &Self::Buf<u8>, elem: Elem, dim: usize, out: &mut Self::Buf<f32>);
    fn rmsnorm(&self, x: &Self::Buf<f32>, w: &Self::Buf<f32>, eps: f32, y: &mut Self::Buf<f32>);
    fn rope(
        &self,
        x: &mut Self::Buf<f32>,
        pos: &Self::Buf<i32>,
        inv_freq: &Self::Buf<f32>,
        heads: usize,
        head_dim: usize,
    );
    fn silu_mul(&self, gate: &mut Self::Buf<f32>, up: &Self::Buf<f32>);
    fn add(&self, a: &mut Self::Buf<f32>, b: &Self::Buf<f32>);
    fn add_bias(&self, y: &mut Self::Buf<f32>, b: &Self::Buf<f32>);
    fn narrow(&self, x: &Self::Buf<f32>, elem: Elem, y: &mut Self::Buf<u8>);
    fn gather_rows(&self, x: &Self::Buf<f32>, idx: &Self::Buf<i32>, width: usize, out: &mut Self::Buf<f32>);
    fn scatter_rows(
        &self,
        rows: &Self::Buf<f32>,
        idx: &Self::Buf<i32>,
        w: &Self::Buf<f32>,
        width: usize,
        y: &mut Self::Buf<f32>,
    );
    fn sigmoid_gate(&self, x: &mut Self::Buf<f32>, g: &Self::Buf<f32>, dim: usize);
    #[allow(clippy::too_many_arguments)]
    fn kv_store(
        &self,
        k: &Self::Buf<f32>,
        v: &Self::Buf<f32>,
        elem: Elem,
        block: &Self::Buf<u64>,
        offset: &Self::Buf<i32>,
        kv_dim: usize,
        bt: usize,
    );
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Self::Buf<f32>,
        elem: Elem,
        table: &Self::Buf<u64>,
        starts: &Self::Buf<i32>,
        pos: &Self::Buf<i32>,
        s: AttnShape,
        bt: usize,
        window: Option<usize>,
        out: &mut Self::Buf<f32>,
    );
    fn argmax(&self, logits: &Self::Buf<f32>, vocab: usize, out: &mut Self::Buf<i32>);
    fn top_k(
        &self,
        logits: &Self::Buf<f32>,
        vocab: usize,
        k: usize,
        ids: &mut Self::Buf<i32>,
        vals: &mut Self::Buf<f32>,
    );
}

/// The element types the tests move.
trait Elt: cudarc::driver::DeviceRepr + Default + Clone + Copy + 'static {}
impl Elt for f32 {}
impl Elt for i32 {}
impl Elt for u8 {}
impl Elt for u64 {}

/// A stream on device 0, or `None` (and "skipped: no GPU") where there is none.
fn gpu() -> Option<GpuKernels> {
    if !driver_present() || CudaContext::device_count().unwrap_or(0) < 1 {
        skipped("no GPU");
        return None;
    }
    let ctx = CudaContext::new(0).expect("device 0");
    Some(GpuKernels::new(ctx.new_stream().expect("a stream")).unwrap_or_else(|e| panic!("{e}")))
}

impl Dev for GpuKernels {
    type Buf<T: Elt> = CudaSlice<T>;
    fn up<T: Elt>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream().clone_htod(v).expect("copy to the GPU")
    }
    fn down<T: Elt>(&self, b: &CudaSlice<T>) -> Vec<T> {
        self.stream().clone_dtoh(b).expect("copy from the GPU")
    }
    fn addr(&self, b: &CudaSlice<u8>) -> u64 {
        cudarc::driver::DevicePtr::device_ptr(b, self.stream()).0
    }
    fn embed(&self, ids: &CudaSlice<i32>, table: &CudaSlice<u8>, elem: Elem, dim: usize, out: &mut CudaSlice<f32>) {
        GpuKernels::embed(self, &ids.as_view(), &table.as_view(), elem, dim, &mut out.as_view_mut()).unwrap()
    }
    fn rmsnorm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, eps: f32, y: &mut CudaSlice<f32>) {
        GpuKernels::rmsnorm(self, &x.as_view(), &w.as_view(), eps, &mut y.as_view_mut()).unwrap()
    }
    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
    ) {
        GpuKernels::rope(self, &mut x.as_view_mut(), &pos.as_view(), &inv_freq.as_view(), heads, head_dim).unwrap()
    }
    fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) {
        GpuKernels::silu_mul(self, &mut gate.as_view_mut(), &up.as_view()).unwrap()
    }
    fn add(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>) {
        GpuKernels::add(self, &mut a.as_view_mut(), &b.as_view()).unwrap()
    }
    fn add_bias(&self, y: &mut CudaSlice<f32>, b: &CudaSlice<f32>) {
        GpuKernels::add_bias(self, &mut y.as_view_mut(), &b.as_view()).unwrap()
    }
    fn narrow(&self, x: &CudaSlice<f32>, elem: Elem, y: &mut CudaSlice<u8>) {
        GpuKernels::narrow(self, &x.as_view(), elem, &mut y.as_view_mut()).unwrap()
    }
    fn gather_rows(&self, x: &CudaSlice<f32>, idx: &CudaSlice<i32>, width: usize, out: &mut CudaSlice<f32>) {
        GpuKernels::gather_rows(self, &x.as_view(), &idx.as_view(), width, &mut out.as_view_mut()).unwrap()
    }
    fn scatter_rows(
        &self,
        rows: &CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        w: &CudaSlice<f32>,
        width: usize,
        y: &mut CudaSlice<f32>,
    ) {
        GpuKernels::scatter_rows(self, &rows.as_view(), &idx.as_view(), &w.as_view(), width, &mut y.as_view_mut())
            .unwrap()
    }
    fn sigmoid_gate(&self, x: &mut CudaSlice<f32>, g: &CudaSlice<f32>, dim: usize) {
        GpuKernels::sigmoid_gate(self, &mut x.as_view_mut(), &g.as_view(), dim).unwrap()
    }
    fn kv_store(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        elem: Elem,
        block: &CudaSlice<u64>,
        offset: &CudaSlice<i32>,
        kv_dim: usize,
        bt: usize,
    ) {
        // SAFETY: the tests' blocks are live, of the right size, used on this stream only.
        unsafe {
            GpuKernels::kv_store(
                self,
                &k.as_view(),
                &v.as_view(),
                elem,
                &block.as_view(),
                &offset.as_view(),
                kv_dim,
                bt,
            )
        }
        .unwrap()
    }
    fn attend(
        &self,
        q: &CudaSlice<f32>,
        elem: Elem,
        table: &CudaSlice<u64>,
        starts: &CudaSlice<i32>,
        pos: &CudaSlice<i32>,
        s: AttnShape,
        bt: usize,
        window: Option<usize>,
        out: &mut CudaSlice<f32>,
    ) {
        let (q, t, st, p) = (q.as_view(), table.as_view(), starts.as_view(), pos.as_view());
        // SAFETY: as for kv_store; every position up to each row's was stored.
        unsafe { GpuKernels::attend(self, &q, elem, &t, &st, &p, s, bt, window, &mut out.as_view_mut()) }.unwrap()
    }
    fn argmax(&self, logits: &CudaSlice<f32>, vocab: usize, out: &mut CudaSlice<i32>) {
        GpuKernels::argmax(self, &logits.as_view(), vocab, &mut out.as_view_mut()).unwrap()
    }
    fn top_k(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        k: usize,
        ids: &mut CudaSlice<i32>,
        vals: &mut CudaSlice<f32>,
    ) {
        GpuKernels::top_k(self, &logits.as_view(), vocab, k, &mut ids.as_view_mut(), &mut vals.as_view_mut()).unwrap()
    }
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

/// Runs a kernel test on a GPU and on the emulator, each where it can.
macro_rules! on_both {
    ($body:ident, $gpu:ident, $emu:ident) => {
        #[test]
        fn $gpu() {
            if let Some(g) = gpu() {
                $body(&g)
            }
        }
        #[test]
        fn $emu() {
            if let Some(e) = emu::Emu::get() {
                $body(e)
            }
        }
    };
}

on_both!(row_kernels, row_kernels_match_the_cpu, row_kernels_match_the_cpu_emulated);
on_both!(edge_shapes, edge_shapes_match_the_cpu, edge_shapes_match_the_cpu_emulated);
on_both!(moe_kernels, expert_rows_and_gates_match_the_cpu, expert_rows_and_gates_match_the_cpu_emulated);
on_both!(rope_llama3, rope_matches_the_cpu_with_llama3_scaling, rope_matches_the_cpu_with_llama3_scaling_emulated);
on_both!(paged_attention, paged_attention_matches_the_reference, paged_attention_matches_the_reference_emulated);
on_both!(
    argmax_top_k,
    argmax_and_top_k_take_the_lowest_index_among_equals,
    argmax_and_top_k_take_the_lowest_index_among_equals_emulated
);

fn row_kernels<D: Dev>(g: &D) {
    let (rows, dim) = (5, 333);
    let x = random(rows * dim, 1);
    let w = random(dim, 2);
    // RMSNorm.
    let mut want = vec![0f32; x.len()];
    for r in 0..rows {
        crate::norm::rmsnorm_row(&x[r * dim..][..dim], &w, 1e-5, &mut want[r * dim..][..dim]);
    }
    let (xd, wd) = (g.up(&x), g.up(&w));
    let mut yd = g.up(&vec![0f32; x.len()]);
    g.rmsnorm(&xd, &wd, 1e-5, &mut yd);
    close("rmsnorm", &g.down(&yd), &want, 1e-5);
    // SwiGLU's middle and the residual add.
    let upv = random(x.len(), 3);
    let mut gate = x.clone();
    crate::activation::silu_mul_inplace(&mut gate, &upv);
    let mut gd = g.up(&x);
    g.silu_mul(&mut gd, &g.up(&upv));
    close("silu_mul", &g.down(&gd), &gate, 1e-6);
    let mut sum = x.clone();
    crate::activation::add_inplace(&mut sum, &upv);
    let mut ad = g.up(&x);
    g.add(&mut ad, &g.up(&upv));
    assert_eq!(g.down(&ad), sum, "add is exact");
    let mut biased = x.clone();
    biased.chunks_mut(dim).for_each(|r| r.iter_mut().zip(&w).for_each(|(a, b)| *a += b));
    let mut bd = g.up(&x);
    g.add_bias(&mut bd, &wd);
    assert_eq!(g.down(&bd), biased, "add_bias is exact");
    // Embedding rows of every weight type.
    let (vocab, ids) = (17usize, vec![3i32, 0, 16, 3]);
    let table = random(vocab * dim, 4);
    for elem in [Elem::F32, Elem::Bf16, Elem::F16] {
        let t = rounded(&table, elem);
        let want: Vec<f32> = ids.iter().flat_map(|&i| t[i as usize * dim..][..dim].to_vec()).collect();
        let mut od = g.up(&vec![0f32; ids.len() * dim]);
        g.embed(&g.up(&ids), &g.up(&bytes_of(&table, elem)), elem, dim, &mut od);
        assert_eq!(g.down(&od), want, "embed {elem:?} is exact");
    }
    // Rounding to bf16 and f16: nearest even, as the `half` crate — ties and values past
    // f16's range included.
    let mut xs = x.clone();
    xs.extend([
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        70000.0,
        -1e-8,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
    ]);
    for elem in [Elem::Bf16, Elem::F16] {
        let mut nd = g.up(&vec![0u8; xs.len() * 2]);
        g.narrow(&g.up(&xs), elem, &mut nd);
        assert_eq!(g.down(&nd), bytes_of(&xs, elem), "narrow to {elem:?}");
    }
}

/// Shapes at the kernels' edges: rows shorter than a block's threads and longer than several
/// strides, a vocabulary below the block size, the largest top-k.
fn edge_shapes<D: Dev>(g: &D) {
    for dim in [1usize, 7, 255, 257, 5000] {
        let (rows, x, w) = (3, random(3 * dim, 50), random(dim, 51));
        let mut want = vec![0f32; x.len()];
        for r in 0..rows {
            crate::norm::rmsnorm_row(&x[r * dim..][..dim], &w, 1e-6, &mut want[r * dim..][..dim]);
        }
        let mut y = g.up(&vec![0f32; x.len()]);
        g.rmsnorm(&g.up(&x), &g.up(&w), 1e-6, &mut y);
        close(&format!("rmsnorm dim {dim}"), &g.down(&y), &want, 1e-5);
        let ids = vec![2i32, 0];
        let table = random(3 * dim, 52);
        let mut out = g.up(&vec![0f32; 2 * dim]);
        g.embed(&g.up(&ids), &g.up(&bytes_of(&table, Elem::F32)), Elem::F32, dim, &mut out);
        let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * dim..][..dim].to_vec()).collect();
        assert_eq!(g.down(&out), want, "embed dim {dim}");
    }
    // A vocabulary smaller than the block: most threads see nothing.
    let logits = vec![0.5f32, -1.0, 3.0, 3.0, 2.0, -7.0, 0.0];
    let mut out = g.up(&[0i32; 1][..]);
    g.argmax(&g.up(&logits), 7, &mut out);
    assert_eq!(g.down(&out), vec![2]);
    let (mut ids, mut vals) = (g.up(&[0i32; 7][..]), g.up(&[0f32; 7][..]));
    g.top_k(&g.up(&logits), 7, 7, &mut ids, &mut vals);
    assert_eq!(g.down(&ids), vec![2, 3, 4, 0, 6, 1, 5]);
    // The largest k over a row with many ties: by value, then by index.
    let vocab = 1000;
    let logits: Vec<f32> = (0..vocab).map(|i| ((i * 37) % 101) as f32).collect();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let k = super::MAX_TOP_K;
    let (mut ids, mut vals) = (g.up(&vec![0i32; k]), g.up(&vec![0f32; k]));
    g.top_k(&g.up(&logits), vocab, k, &mut ids, &mut vals);
    assert_eq!(g.down(&ids), order[..k].iter().map(|&i| i as i32).collect::<Vec<_>>());
    assert_eq!(g.down(&vals), order[..k].iter().map(|&i| logits[i]).collect::<Vec<_>>());
}

fn moe_kernels<D: Dev>(g: &D) {
    let (tokens, width) = (7, 300);
    let x = random(tokens * width, 40);
    // The tokens routed to one expert, out of order, and their weights.
    let (idx, w) = (vec![5i32, 0, 3], vec![0.5f32, -1.25, 2.0]);
    let want: Vec<f32> = idx.iter().flat_map(|&t| x[t as usize * width..][..width].to_vec()).collect();
    let mut rows = g.up(&vec![0f32; idx.len() * width]);
    g.gather_rows(&g.up(&x), &g.up(&idx), width, &mut rows);
    assert_eq!(g.down(&rows), want, "gather_rows is exact");
    let out = random(idx.len() * width, 41);
    let mut want = x.clone();
    for (r, (&t, &s)) in idx.iter().zip(&w).enumerate() {
        for d in 0..width {
            want[t as usize * width + d] = out[r * width + d] * s;
        }
    }
    let mut y = g.up(&x);
    g.scatter_rows(&g.up(&out), &g.up(&idx), &g.up(&w), width, &mut y);
    assert_eq!(g.down(&y), want, "scatter_rows is exact and leaves the other rows");
    let gates = random(tokens, 42).iter().map(|v| v * 8.0).collect::<Vec<f32>>();
    let mut want = x.clone();
    for (row, &gv) in want.chunks_exact_mut(width).zip(&gates) {
        let s = 1.0 / (1.0 + (-gv).exp());
        row.iter_mut().for_each(|v| *v *= s);
    }
    let mut xd = g.up(&x);
    g.sigmoid_gate(&mut xd, &g.up(&gates), width);
    close("sigmoid_gate", &g.down(&xd), &want, 1e-6);
}

fn rope_llama3<D: Dev>(g: &D) {
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
    let mut xd = g.up(&x);
    g.rope(&mut xd, &g.up(&pos), &g.up(&rope.inv_freq), heads, hd);
    close("rope", &g.down(&xd), &want, 2e-5);
}

fn paged_attention<D: Dev>(g: &D) {
    // GQA, then multi-head with each thread holding two dimensions, the largest head, and a
    // head dimension that is no multiple of 32 — each with every cache type.
    let shapes = [(8, 2, 64), (4, 4, 128), (2, 1, 256), (6, 3, 80)];
    for (i, (heads, kv_heads, head_dim)) in shapes.into_iter().enumerate() {
        let s = AttnShape { heads, kv_heads, head_dim };
        for elem in [Elem::F32, Elem::Bf16, Elem::F16] {
            // Windows only on the first shape: they change which positions count, not how.
            let windows: &[Option<usize>] = if i == 0 { &[None, Some(50)] } else { &[None] };
            for &window in windows {
                paged_attention_case(g, s, elem, window);
            }
        }
    }
}

fn paged_attention_case<D: Dev>(g: &D, s: AttnShape, elem: Elem, window: Option<usize>) {
    let (kvd, qd, bt) = (s.kv_heads * s.head_dim, s.heads * s.head_dim, 16usize);
    // (past, new): a long decode, a prompt block, a one-position sequence, a tile boundary.
    let seqs = [(300usize, 1usize), (0, 37), (0, 1), (127, 2)];
    {
        {
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
                        let b = g.up(&vec![0u8; 2 * bt * kvd * elem.size()]);
                        let p = g.addr(&b);
                        blocks.push(b);
                        p
                    })
                    .collect();
                // Stored in a different order from the blocks' (the pool hands them out in any).
                let mut order: Vec<usize> = (0..len).collect();
                order.reverse();
                let addr: Vec<u64> = order.iter().map(|p| mine[p / bt]).collect();
                let offset: Vec<i32> = order.iter().map(|p| (p % bt) as i32).collect();
                let pick = |m: &[f32]| order.iter().flat_map(|&p| m[p * kvd..][..kvd].to_vec()).collect::<Vec<f32>>();
                table.extend(&mine);
                g.kv_store(&g.up(&pick(&k)), &g.up(&pick(&v)), elem, &g.up(&addr), &g.up(&offset), kvd, bt);
                let qs = random(new * qd, 30 + i as u64);
                want.extend(attend_reference(&qs, &rounded(&k, elem), &rounded(&v, elem), past, window, s));
                q.extend(qs);
                for j in 0..new {
                    starts.push(start);
                    pos.push((past + j) as i32);
                }
            }
            let mut out = g.up(&vec![0f32; q.len()]);
            g.attend(&g.up(&q), elem, &g.up(&table), &g.up(&starts), &g.up(&pos), s, bt, window, &mut out);
            close(&format!("attend {s:?} {elem:?} window {window:?}"), &g.down(&out), &want, 1e-4);
            drop(blocks);
        }
    }
}

fn argmax_top_k<D: Dev>(g: &D) {
    let vocab = 3001;
    let mut logits = random(2 * vocab, 8);
    logits[100] = 5.0;
    logits[2000] = 5.0; // a tie: 100 wins
    logits[vocab + 2999] = 7.0;
    logits[vocab + 5] = 6.0;
    logits[vocab + 6] = 6.0;
    let ld = g.up(&logits);
    let mut out = g.up(&[0i32; 2][..]);
    g.argmax(&ld, vocab, &mut out);
    assert_eq!(g.down(&out), vec![100, 2999]);
    let (mut ids, mut vals) = (g.up(&[0i32; 6][..]), g.up(&[0f32; 6][..]));
    g.top_k(&ld, vocab, 3, &mut ids, &mut vals);
    let ids = g.down(&ids);
    assert_eq!(&ids[..2], &[100, 2000]);
    assert_eq!(&ids[3..], &[2999, 5, 6]);
    assert_eq!(&g.down(&vals)[3..], &[7.0, 6.0, 6.0]);
    // The third of row 0 is its largest random logit after the two fives.
    let third = (0..vocab)
        .filter(|&i| i != 100 && i != 2000)
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap();
    assert_eq!(ids[2], third as i32);
}

/// A column-major GEMM as cuBLAS defines it: `C[i + j·ldc] = Σ_l op(A)[i, l] · op(B)[l, j]`,
/// where `op(X)[r, c]` is `X[r + c·ld]`, or `X[c + r·ld]` if transposed.
fn gemm_column_major(g: &GemmShape, a: &[f32], b: &[f32], c: &mut [f32]) {
    let at = |x: &[f32], tr: bool, ld: i32, r: usize, col: usize| {
        if tr {
            x[col + r * ld as usize]
        } else {
            x[r + col * ld as usize]
        }
    };
    for i in 0..g.m as usize {
        for j in 0..g.n as usize {
            let s = (0..g.k as usize).map(|l| at(a, g.transa, g.lda, i, l) * at(b, g.transb, g.ldb, l, j)).sum();
            c[i + j * g.ldc as usize] = s;
        }
    }
}

#[test]
fn linear_hands_cublas_the_row_major_product() {
    // What `linear` asks cuBLAS for, computed by cuBLAS's definition, is y = x · Wᵀ row-major.
    for (t, k, n) in [(1, 5, 3), (4, 7, 2), (3, 16, 9)] {
        let (x, w) = (random(t * k, 60), random(n * k, 61));
        let mut y = vec![0f32; t * n];
        gemm_column_major(&gemm_shape(t as i32, n as i32, k as i32), &w, &x, &mut y);
        let want = matmul_reference(&x, t, WeightView::F32(&w), n, None);
        close(&format!("linear's GEMM {t}x{k}x{n}"), &y, &want, 1e-6);
    }
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
            let mut yd = g.up(&vec![0f32; t * n]);
            let mut scratch = g.up(&vec![0u8; t * k * 2]);
            g.linear(
                &g.up(&x).as_view(),
                t,
                &g.up(&bytes_of(&w, elem)).as_view(),
                elem,
                n,
                &mut yd.as_view_mut(),
                &mut scratch.as_view_mut(),
            )
            .unwrap();
            close(&format!("linear {elem:?} {t}x{k}x{n}"), &g.down(&yd), &want, 1e-4);
        }
    }
}

#[test]
fn passes_with_no_tokens_launch_nothing_and_bad_shapes_are_refused_by_name() {
    let Some(g) = gpu() else { return };
    let w = g.up(&random(8, 2));
    let empty = g.up(&[0f32; 1][..0]);
    GpuKernels::rmsnorm(&g, &empty.as_view(), &w.as_view(), 1e-5, &mut g.up(&[0f32; 1][..0]).as_view_mut()).unwrap();
    let mut scratch = g.up(&[0u8; 2]);
    let mut y0 = g.up(&[0f32; 1][..0]);
    g.linear(
        &empty.as_view(),
        0,
        &g.up(&bytes_of(&random(16, 1), Elem::F32)).as_view(),
        Elem::F32,
        2,
        &mut y0.as_view_mut(),
        &mut scratch.as_view_mut(),
    )
    .unwrap();
    let ld = g.up(&random(2 * 3001, 8));
    let e = GpuKernels::top_k(
        &g,
        &ld.as_view(),
        3001,
        65,
        &mut g.up(&[0i32; 130][..]).as_view_mut(),
        &mut g.up(&[0f32; 130][..]).as_view_mut(),
    )
    .unwrap_err();
    assert!(matches!(e, GpuError::Shape { kernel: "top_k", .. }), "{e}");
    let e = GpuKernels::rmsnorm(
        &g,
        &g.up(&random(10, 1)).as_view(),
        &w.as_view(),
        1e-5,
        &mut g.up(&[0f32; 10][..]).as_view_mut(),
    )
    .unwrap_err();
    assert!(matches!(e, GpuError::Shape { kernel: "rmsnorm", .. }), "{e}");
}
