//! Reaching CUDA: whether each library loads, calls that never panic, and NVRTC compiling the
//! kernels for the device's architecture, the PTX cached on disk.

use super::{GpuError, SOURCE};
use std::path::PathBuf;

/// Whether a library can be loaded, found out once per process (each look is a `dlopen`).
fn present(cell: &'static std::sync::OnceLock<bool>, look: unsafe fn() -> bool) -> bool {
    // SAFETY: `look` only tries to open the library by its usual names.
    *cell.get_or_init(|| std::panic::catch_unwind(|| unsafe { look() }).unwrap_or(false))
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    present(&P, cudarc::driver::sys::is_culib_present)
}

/// Whether NVRTC's library can be loaded (it compiles without a GPU).
pub fn nvrtc_present() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    present(&P, cudarc::nvrtc::sys::is_culib_present)
}

/// Whether cuBLAS's library can be loaded.
pub fn cublas_present() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    present(&P, cudarc::cublas::sys::is_culib_present)
}

/// Runs a CUDA call, turning its error or its panic into a [`GpuError`] that says `what` failed.
pub fn call<T, E: std::fmt::Display>(what: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(GpuError::Cuda(format!("{what}: {e}"))),
        Err(p) => Err(GpuError::Cuda(format!("{what}: {}", panic_text(p.as_ref())))),
    }
}

pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// The PTX of [`SOURCE`] for compute capability `arch` (e.g. `(9, 0)`): read from the cache
/// folder if an earlier start compiled it, otherwise compiled by NVRTC and written there
/// (`WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir`, else `~/.cache/weir`; a cache that cannot
/// be written only costs the next start a compile).
pub fn ptx(arch: (i32, i32)) -> Result<String, GpuError> {
    ptx_cached_in(cache_dir(), arch)
}

pub(crate) fn ptx_cached_in(dir: Option<PathBuf>, arch: (i32, i32)) -> Result<String, GpuError> {
    let name = format!("kernels-{:016x}-sm{}{}.ptx", source_hash(), arch.0, arch.1);
    let file = dir.map(|d| d.join(&name));
    if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        if text.contains(".entry") {
            return Ok(text);
        }
    }
    let text = compile(arch)?;
    if let Some(f) = file {
        // Written whole, then renamed: a reader never sees half a file.
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        let written = f.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, &text).is_ok()
            && std::fs::rename(&tmp, &f).is_ok();
        if !written {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(text)
}

/// Compiles [`SOURCE`] with NVRTC for `arch`, without the cache.
pub fn compile(arch: (i32, i32)) -> Result<String, GpuError> {
    compile_source(SOURCE, arch)
}

pub(crate) fn compile_source(src: &str, arch: (i32, i32)) -> Result<String, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoLibrary("NVRTC (libnvrtc)"));
    }
    let arch_name = format!("compute_{}{}", arch.0, arch.1);
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch_name}"), "--std=c++17".into()],
        name: Some("weir.cu".into()),
        ..Default::default()
    };
    let out = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(src, opts));
    match out {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(cudarc::nvrtc::CompileError::CompileError { log, .. })) => {
            Err(GpuError::Compile { arch: arch_name, log: log.to_string_lossy().into_owned() })
        }
        Ok(Err(e)) => Err(GpuError::Compile { arch: arch_name, log: e.to_string() }),
        Err(p) => Err(GpuError::Compile { arch: arch_name, log: panic_text(p.as_ref()) }),
    }
}

pub(crate) fn source_hash() -> u64 {
    // FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
    SOURCE.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn cache_dir() -> Option<PathBuf> {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("WEIR_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("weir")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("weir")))
}
