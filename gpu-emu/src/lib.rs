//! weir-gpu-emu: an emulated CUDA device for the tests, so that every GPU test runs on machines
//! without a GPU. A dev-dependency only: nothing of the product builds or loads it.
//!
//! `emu/driver.cpp` implements what weir calls of the CUDA driver, cuBLAS and NVRTC on the CPU,
//! running weir's kernels on the emulator of `emu/emu.cpp` (see the file for what it checks:
//! streams that run only when the host waits and then in a random order, poisoned fresh and
//! freed memory, copies checked against allocations). It is built by the machine's C++
//! compiler into a folder as `libcuda.so`, `libcublas.so` and `libnvrtc.so`; a process started
//! with that folder first in `LD_LIBRARY_PATH` then finds one device, "weir emulated GPU (CPU)"
//! of compute capability 99.0, through cudarc exactly as it would find a real one.
//!
//! The dynamic loader reads `LD_LIBRARY_PATH` when a process starts, so a test binary reruns
//! its own GPU tests in a child process ([`rerun`]); [`assert_tests_pass`] is what each test
//! binary with GPU tests calls. The kernel tests also launch kernels on the emulator directly
//! ([`launcher`]), and the tests of how the host drives a GPU read the device's call counts
//! ([`counts`]).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The kernels' CUDA source, which the emulator runs (and the emulated NVRTC accepts: only it).
const KERNELS: &str = include_str!("../../kernels/src/cuda/weir.cu");

/// FNV-1a, continued from `h` over `bytes`.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The hash `weir_kernels::cuda` names its PTX by (FNV-1a of `weir.cu`): the emulated NVRTC
/// checks that the source it is handed is the one it was built with.
fn source_hash() -> u64 {
    fnv(0xcbf2_9ce4_8422_2325, KERNELS.as_bytes())
}

/// Set in the child processes [`rerun`] starts (so that they do not start their own).
pub const MARK: &str = "WEIR_EMULATED_GPU";

/// The folder holding the emulated libraries, built on first use (once per process); an
/// error says why they could not be (no C++ compiler, not x86-64 Linux).
pub fn libraries() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(build).clone()
}

fn build() -> Result<PathBuf, String> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return Err("the CUDA emulator switches threads with x86-64 Linux code".into());
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("emu");
    let src = here.join("driver.cpp");
    // Built once per version of its sources, into a folder named after them.
    let mut key = source_hash();
    for f in ["driver.cpp", "emu.cpp"] {
        let text = std::fs::read(here.join(f)).map_err(|e| format!("reading emu/{f}: {e}"))?;
        key = fnv(key, &text);
    }
    let dir = std::env::temp_dir().join(format!("weir-emulated-cuda-{key:016x}"));
    let lib = dir.join("libweir_emulated_cuda.so");
    let names = ["libcuda.so", "libcublas.so", "libnvrtc.so"];
    if lib.exists() && names.iter().all(|n| dir.join(n).exists()) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // Written under a name of this process's, then renamed: another test binary building the
    // same library at the same time never loads half of one.
    let tmp = dir.join(format!("build-{}.so", std::process::id()));
    let hash = format!("-DWEIR_SOURCE_FNV={:#x}ull", source_hash());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas", &hash, "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(|e| format!("no C++ compiler ({cxx}: {e})"))?;
    if !out.status.success() {
        return Err(format!("{cxx} could not build {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr)));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    for name in names {
        let link = dir.join(format!("{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("libweir_emulated_cuda.so", &link)
            .and_then(|()| std::fs::rename(&link, dir.join(name)))
            .map_err(|e| format!("linking {name} in {}: {e}", dir.display()))?;
    }
    Ok(dir)
}

/// What a rerun printed.
#[derive(Debug)]
pub struct Rerun {
    /// Whether every test passed.
    pub ok: bool,
    /// Standard output and standard error, one after the other.
    pub output: String,
}

impl Rerun {
    /// How many tests passed, from the harness's summary line.
    pub fn passed(&self) -> usize {
        self.output
            .lines()
            .filter_map(|l| l.strip_prefix("test result: "))
            .filter_map(|l| l.split("; ").next())
            .filter_map(|l| l.rsplit(' ').nth(1))
            .filter_map(|n| n.parse::<usize>().ok())
            .sum()
    }
}

/// Runs the tests of this test binary that `args` selects (libtest's arguments: filters,
/// `--exact`, `--skip`) again in a child process on the emulated device. `None` when this
/// is that child already, or (with "skipped: …" on standard error) when the libraries cannot
/// be built here.
pub fn rerun(args: &[&str]) -> Option<Rerun> {
    if std::env::var_os(MARK).is_some() {
        return None;
    }
    let dir = match libraries() {
        Ok(d) => d,
        Err(why) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no emulated GPU ({why})");
            return None;
        }
    };
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(p) if !p.is_empty() => {
            let mut v = dir.clone().into_os_string();
            v.push(":");
            v.push(p);
            v
        }
        _ => dir.clone().into_os_string(),
    };
    let out = match std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .args(args)
            .arg("--test-threads=1")
            .env("LD_LIBRARY_PATH", path)
            .env(MARK, "1")
            .env("WEIR_CACHE_DIR", dir.join("ptx-cache"))
            .output()
    }) {
        Ok(out) => out,
        Err(e) => return Some(Rerun { ok: false, output: format!("starting this test binary again failed: {e}") }),
    };
    let mut output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    use std::os::unix::process::ExitStatusExt;
    match out.status.signal() {
        Some(11) => output.push_str(
            "\n[the test process died of SIGSEGV: on the emulated device that is most often a kernel or a copy \
             past the end of a device buffer, which ends against a page that may not be touched]\n",
        ),
        Some(6) => output.push_str("\n[the test process aborted: the emulator says why above]\n"),
        Some(sig) => output.push_str(&format!("\n[the test process died of signal {sig}]\n")),
        None => {}
    }
    Some(Rerun { ok: out.status.success(), output })
}

/// [`rerun`], then panics with the child's output unless every test passed, none said
/// "skipped: no GPU", and at least `least` passed. Does nothing in the child itself.
pub fn assert_tests_pass(args: &[&str], least: usize) {
    let Some(run) = rerun(args) else { return };
    assert!(run.ok, "on the emulated GPU:\n{}", run.output);
    assert!(!run.output.contains("skipped: no GPU"), "a GPU test did not run on the emulated GPU:\n{}", run.output);
    assert!(run.passed() >= least, "{} tests passed on the emulated GPU, not {least}:\n{}", run.passed(), run.output);
}

/// What the emulated device has been asked to do so far in this process, for tests of how the
/// host drives a GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `cuCtxSynchronize`: waits for the whole device.
    pub ctx_synchronize: u64,
    /// `cuMemFree`: also waits for the whole device (stream-ordered frees do not).
    pub mem_free_sync: u64,
    pub stream_synchronize: u64,
    pub event_synchronize: u64,
    pub launches: u64,
    /// Copies to the device from pinned host memory (DMA) and from pageable memory (staged).
    pub h2d_pinned: u64,
    pub h2d_pageable: u64,
    pub d2h: u64,
}

/// The emulated device's counts, where this process runs on it ([`MARK`] set and its driver
/// loaded); `None` elsewhere.
pub fn counts() -> Option<Counts> {
    std::env::var_os(MARK)?;
    type Get = unsafe extern "C" fn(*mut u64, i32) -> i32;
    // SAFETY: the process already has this library loaded (cudarc loaded it as the driver):
    // opening it again returns the same one, and `weir_emu_counts` has the signature of `Get`.
    unsafe {
        let lib = libloading::Library::new("libcuda.so").ok()?;
        let get = *lib.get::<Get>(b"weir_emu_counts\0").ok()?;
        let mut v = [0u64; 8];
        get(v.as_mut_ptr(), v.len() as i32);
        let [ctx_synchronize, mem_free_sync, stream_synchronize, event_synchronize, launches, h2d_pinned, h2d_pageable, d2h] =
            v;
        Some(Counts {
            ctx_synchronize,
            mem_free_sync,
            stream_synchronize,
            event_synchronize,
            launches,
            h2d_pinned,
            h2d_pageable,
            d2h,
        })
    }
}

/// `weir_emu_launch`: runs one kernel of `weir.cu` on the emulator, on host memory — name, grid
/// (x, y, z), block (x, y, z), and one pointer per argument, as `cuLaunchKernel` takes them.
/// Returns 0, or non-zero if there is no such kernel.
pub type Launch =
    unsafe extern "C" fn(*const std::ffi::c_char, u32, u32, u32, u32, u32, u32, *mut *mut std::ffi::c_void) -> i32;

/// The emulator's kernel launcher, for tests that run a kernel on host buffers directly (built
/// on first use; an error says why it could not be). It is loaded under the library's own name,
/// so it does not become the process's CUDA driver (cudarc looks for `libcuda.so`).
pub fn launcher() -> Result<Launch, String> {
    static LAUNCH: OnceLock<Result<(libloading::Library, Launch), String>> = OnceLock::new();
    let loaded = LAUNCH.get_or_init(|| {
        let dir = libraries()?;
        // SAFETY: the library was built from emu/driver.cpp, whose `weir_emu_launch` has the
        // signature of `Launch`; it stays loaded for the life of the process (the static).
        unsafe {
            let lib = libloading::Library::new(dir.join("libweir_emulated_cuda.so"))
                .map_err(|e| format!("loading the emulator: {e}"))?;
            let launch = *lib.get::<Launch>(b"weir_emu_launch\0").map_err(|e| format!("weir_emu_launch: {e}"))?;
            Ok((lib, launch))
        }
    });
    loaded.as_ref().map(|(_, l)| *l).map_err(Clone::clone)
}
