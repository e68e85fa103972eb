//! The machine's CUDA devices, through the driver library loaded at run time (cudarc with
//! dynamic loading: a build of weir needs no CUDA installed).
//!
//! cudarc panics on its first call when the driver library is missing (or lacks a function
//! it binds), so every call goes through `weir_kernels::cuda::call`, which checks the library
//! first and runs the call under `catch_unwind`: without a driver, or without the device asked
//! for, opening a device is a typed [`GpuError`], never a panic.

use std::sync::Arc;

pub mod copy;
pub mod lane;
pub mod pinned;
pub mod pool;
pub use lane::{DeviceTensor, DeviceTensorMut, GpuLane};
pub use pool::{Block, BlockPool, DeviceBlock, Leased};

pub use cudarc::driver::CudaContext;
use weir_kernels::cuda::call;
pub use weir_kernels::cuda::{driver_present, GpuError};

/// What a device is.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: usize,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
}

/// The number of CUDA devices.
pub fn device_count() -> Result<usize, GpuError> {
    call("counting devices", || CudaContext::device_count().map(|n| n.max(0) as usize))
}

/// Opens device `ordinal`'s primary context and says what it is.
pub fn open(ordinal: usize) -> Result<(Arc<CudaContext>, GpuInfo), GpuError> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(GpuError::NoDevice { ordinal, count });
    }
    let ctx = call(&format!("opening device {ordinal}"), || CudaContext::new(ordinal))?;
    let info = call(&format!("querying device {ordinal}"), || {
        Ok::<_, cudarc::driver::DriverError>(GpuInfo {
            ordinal,
            name: ctx.name()?,
            total_bytes: ctx.total_mem()?,
            capability: ctx.compute_capability()?,
        })
    })?;
    Ok((ctx, info))
}

/// What a device's pool leaves to everything else by default (the CUDA context, cuBLAS's
/// workspace, other processes).
pub const HEADROOM: usize = 1 << 30;

/// The default budget of device `ordinal`'s pool: its memory less [`HEADROOM`].
pub fn default_budget(ordinal: usize) -> Result<usize, GpuError> {
    let (_, info) = open(ordinal)?;
    Ok(info.total_bytes.saturating_sub(HEADROOM))
}

/// The GPU side of every lane of a program (`None` for CPU and I/O lanes): per device one
/// memory pool of `budget` bytes (default: the device's memory less 1 GiB), per GPU lane a
/// stream of its own with weir's kernels loaded. A device that is missing, or kernels that do
/// not load, refuse the program, naming the device and why. Also returns the devices' pools.
pub fn lanes_for(lanes: &[crate::LaneSpec], budget: Option<usize>) -> Result<GpuLanes, crate::Error> {
    let mut devices: Vec<(usize, Arc<CudaContext>, BlockPool<DeviceBlock>)> = Vec::new();
    let mut out = Vec::with_capacity(lanes.len());
    for l in lanes {
        let crate::LaneKind::GpuStream { device, .. } = l.kind else {
            out.push(None);
            continue;
        };
        let unavailable = |reason: String| crate::Error::DeviceUnavailable { device: format!("gpu{device}"), reason };
        if !devices.iter().any(|d| d.0 == device) {
            let (ctx, info) = open(device).map_err(|e| unavailable(e.to_string()))?;
            let bytes = budget.unwrap_or(info.total_bytes.saturating_sub(HEADROOM));
            if bytes > info.total_bytes {
                return Err(unavailable(format!(
                    "--gpu-memory {bytes} is more than {}'s {} bytes",
                    info.name, info.total_bytes
                )));
            }
            let stream = call("creating a stream", || ctx.new_stream()).map_err(|e| unavailable(e.to_string()))?;
            devices.push((device, ctx, BlockPool::new(&format!("gpu{device}"), bytes, stream)));
        }
        let (_, ctx, memory) = devices.iter().find(|d| d.0 == device).expect("added above");
        let stream = call("creating a stream", || ctx.new_stream()).map_err(|e| unavailable(e.to_string()))?;
        let kernels =
            weir_kernels::cuda::GpuKernels::new(stream).map_err(|e| unavailable(format!("lane `{}`: {e}", l.name)))?;
        out.push(Some(GpuLane { kernels, memory: memory.clone() }));
    }
    Ok((out, devices.into_iter().map(|d| d.2).collect()))
}

/// Per lane its GPU side (`None` for CPU and I/O lanes), and each device's memory pool.
pub type GpuLanes = (Vec<Option<GpuLane>>, Vec<BlockPool<DeviceBlock>>);

/// Says a test was skipped where the log shows it: straight to standard error, past the test
/// harness's capture (which only takes `print!` and `eprint!`).
#[cfg(test)]
pub(crate) fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_every_device_is_a_typed_error() {
        if driver_present() {
            skipped("a CUDA driver is present (this test is for machines without one)");
            return;
        }
        assert_eq!(device_count(), Err(GpuError::NoDriver));
        assert_eq!(open(0).err(), Some(GpuError::NoDriver));
        assert!(GpuError::NoDriver.to_string().contains("no CUDA driver"));
    }

    /// The GPU tests of this crate again, in a child process on the emulated CUDA device
    /// (`weir_gpu_emu`): pools, copies and lanes run where there is no GPU.
    #[test]
    fn the_gpu_tests_pass_on_the_emulated_device() {
        weir_gpu_emu::assert_tests_pass(&["gpu", "--skip", "emulated"], 3);
    }

    #[test]
    fn a_gpu_opens_and_names_itself_and_a_missing_ordinal_is_refused() {
        if !driver_present() || device_count().unwrap_or(0) == 0 {
            skipped("no GPU");
            return;
        }
        let (_, info) = open(0).unwrap();
        assert!(!info.name.is_empty() && info.total_bytes > 0 && info.capability.0 > 0, "{info:?}");
        let count = device_count().unwrap();
        assert_eq!(open(count).err(), Some(GpuError::NoDevice { ordinal: count, count }));
    }
}
