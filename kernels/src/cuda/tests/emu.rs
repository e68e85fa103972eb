//! The kernel tests' second device: `gpu-emu/emu/emu.cpp`, a CPU emulator of CUDA's execution
//! model that runs `weir.cu` itself, from the library the emulated device is built into
//! (`weir_gpu_emu`: the machine's C++ compiler, `$CXX` else `c++`). Each kernel is launched
//! directly, with the grid, block and arguments [`GpuKernels`] gives it.

use super::{skipped, Dev, Elt};
use crate::attention::AttnShape;
use crate::cuda::{attend_cfg, grid_for, rows_cfg, Count, Elem, ROW_THREADS};
use cudarc::driver::LaunchConfig;
use std::ffi::{c_void, CString};
use std::sync::OnceLock;

/// The loaded emulator.
pub struct Emu {
    launch: weir_gpu_emu::Launch,
}

impl Emu {
    /// The emulator, built on first use; `None` (and "skipped: …") without a C++ compiler.
    pub fn get() -> Option<&'static Emu> {
        static EMU: OnceLock<Option<Emu>> = OnceLock::new();
        let emu = EMU.get_or_init(|| match weir_gpu_emu::launcher() {
            Ok(launch) => Some(Emu { launch }),
            Err(why) => {
                eprintln!("{why}");
                None
            }
        });
        if emu.is_none() {
            skipped("no C++ compiler, or not x86-64 Linux: the kernels were not emulated");
        }
        emu.as_ref()
    }

    fn run(&self, kernel: &str, cfg: LaunchConfig, args: Args) {
        let mut slots = args.0;
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        let name = CString::new(kernel).expect("a kernel name");
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        // SAFETY: every argument is a live host buffer or a value, in the order the kernel takes.
        let rc = unsafe { (self.launch)(name.as_ptr(), g.0, g.1, g.2, b.0, b.1, b.2, ptrs.as_mut_ptr()) };
        assert_eq!(rc, 0, "the emulator has no kernel {kernel}");
    }
}

/// A kernel's arguments, each in a slot of its own as cuLaunchKernel takes them (a value of
/// at most 8 bytes at the start of its slot: little-endian).
#[derive(Default)]
struct Args(Vec<u64>);

impl Args {
    fn val<V: Copy>(mut self, v: V) -> Args {
        assert!(std::mem::size_of::<V>() <= 8);
        let mut slot = 0u64;
        // SAFETY: V fits in the slot and is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                &v as *const V as *const u8,
                &mut slot as *mut u64 as *mut u8,
                std::mem::size_of::<V>(),
            )
        };
        self.0.push(slot);
        self
    }
    fn buf<T>(self, b: &[T]) -> Args {
        self.val(b.as_ptr())
    }
    fn out<T>(self, b: &mut [T]) -> Args {
        self.val(b.as_mut_ptr())
    }
}

fn i(v: usize) -> i32 {
    i32::try_from(v).expect("a test shape within i32")
}

impl Dev for Emu {
    type Buf<T: Elt> = Vec<T>;
    fn up<T: Elt>(&self, v: &[T]) -> Vec<T> {
        v.to_vec()
    }
    fn down<T: Elt>(&self, b: &Vec<T>) -> Vec<T> {
        b.clone()
    }
    fn addr(&self, b: &Vec<u8>) -> u64 {
        b.as_ptr() as u64
    }
    fn embed(&self, ids: &Vec<i32>, table: &Vec<u8>, elem: Elem, dim: usize, out: &mut Vec<f32>) {
        let a = Args::default().buf(ids).buf(table).val(elem as i32).out(out).val(i(dim));
        self.run("embed", rows_cfg(ids.len(), ROW_THREADS), a)
    }
    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, y: &mut Vec<f32>) {
        let rows = x.len() / w.len();
        self.run("rmsnorm", rows_cfg(rows, ROW_THREADS), Args::default().buf(x).buf(w).out(y).val(i(w.len())).val(eps))
    }
    fn rope(&self, x: &mut Vec<f32>, pos: &Vec<i32>, inv_freq: &Vec<f32>, heads: usize, head_dim: usize) {
        let a = Args::default().out(x).buf(pos).buf(inv_freq).val(i(heads)).val(i(head_dim));
        self.run("rope", rows_cfg(pos.len(), ROW_THREADS), a)
    }
    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) {
        let n = gate.len();
        self.run("silu_mul", grid_for(n), Args::default().out(gate).buf(up).val(n as Count))
    }
    fn add(&self, a: &mut Vec<f32>, b: &Vec<f32>) {
        let n = a.len();
        self.run("add", grid_for(n), Args::default().out(a).buf(b).val(n as Count))
    }
    fn add_bias(&self, y: &mut Vec<f32>, b: &Vec<f32>) {
        let total = y.len();
        self.run("add_bias", grid_for(total), Args::default().out(y).buf(b).val(i(b.len())).val(total as Count))
    }
    fn narrow(&self, x: &Vec<f32>, elem: Elem, y: &mut Vec<u8>) {
        let n = x.len();
        self.run("narrow", grid_for(n), Args::default().buf(x).out(y).val(elem as i32).val(n as Count))
    }
    fn gather_rows(&self, x: &Vec<f32>, idx: &Vec<i32>, width: usize, out: &mut Vec<f32>) {
        let a = Args::default().buf(x).buf(idx).out(out).val(i(width));
        self.run("gather_rows", rows_cfg(idx.len(), ROW_THREADS), a)
    }
    fn scatter_rows(&self, rows: &Vec<f32>, idx: &Vec<i32>, w: &Vec<f32>, width: usize, y: &mut Vec<f32>) {
        let a = Args::default().buf(rows).buf(idx).buf(w).out(y).val(i(width));
        self.run("scatter_rows", rows_cfg(idx.len(), ROW_THREADS), a)
    }
    fn sigmoid_gate(&self, x: &mut Vec<f32>, g: &Vec<f32>, dim: usize) {
        self.run("sigmoid_gate", rows_cfg(g.len(), ROW_THREADS), Args::default().out(x).buf(g).val(i(dim)))
    }
    fn kv_store(
        &self,
        k: &Vec<f32>,
        v: &Vec<f32>,
        elem: Elem,
        block: &Vec<u64>,
        offset: &Vec<i32>,
        kv_dim: usize,
        bt: usize,
    ) {
        let a = Args::default().buf(k).buf(v).val(elem as i32).buf(block).buf(offset).val(i(kv_dim)).val(i(bt));
        self.run("kv_store", rows_cfg(block.len(), ROW_THREADS), a)
    }
    fn attend(
        &self,
        q: &Vec<f32>,
        elem: Elem,
        table: &Vec<u64>,
        starts: &Vec<i32>,
        pos: &Vec<i32>,
        s: AttnShape,
        bt: usize,
        window: Option<usize>,
        out: &mut Vec<f32>,
    ) {
        let cfg = attend_cfg(pos.len(), s.heads);
        let a = Args::default().buf(q).out(out).val(elem as i32).buf(table).buf(starts).buf(pos);
        let a = a.val(i(s.heads)).val(i(s.kv_heads)).val(i(s.head_dim)).val(i(bt)).val(i(window.unwrap_or(0)));
        self.run("attend", cfg, a)
    }
    fn argmax(&self, logits: &Vec<f32>, vocab: usize, out: &mut Vec<i32>) {
        let rows = out.len();
        self.run("argmax", rows_cfg(rows, 1024), Args::default().buf(logits).val(i(vocab)).out(out))
    }
    fn top_k(&self, logits: &Vec<f32>, vocab: usize, k: usize, ids: &mut Vec<i32>, vals: &mut Vec<f32>) {
        let rows = ids.len() / k;
        self.run("top_k", rows_cfg(rows, 1024), Args::default().buf(logits).val(i(vocab)).val(i(k)).out(ids).out(vals))
    }
}
