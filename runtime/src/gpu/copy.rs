//! Host → device copy bandwidth, measured three ways in one run (issue 7's first GPU
//! benchmark): from a buffer of a host pool pinned as the copy lanes pin their window's
//! buffers (`super::pinned`: what streamed weights are uploaded from), from plain pinned memory
//! (`cuMemAllocHost` and a copy: the plain `cudaMemcpy`), and from pageable memory (an
//! ordinary heap buffer, which the driver stages). `weir gpu copy` prints it.

use super::{call, open, pinned, BlockPool, DeviceBlock, GpuError};
use crate::Pool;
use cudarc::driver::sys::CUevent_flags;

/// One measurement: GB/s of each source, best of its rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyBandwidth {
    /// The device, by name.
    pub device: String,
    /// Bytes per copy.
    pub bytes: usize,
    /// From a host pool's buffer, pinned as the copy lanes pin theirs, into a block of the
    /// device pool.
    pub pool_gbps: f64,
    /// From plain pinned memory into plain device memory.
    pub plain_pinned_gbps: f64,
    /// From pageable memory.
    pub pageable_gbps: f64,
}

impl CopyBandwidth {
    /// The pinned pool buffer's bandwidth as a share of the plain copy's (the goal is ≥ 0.9).
    pub fn pool_ratio(&self) -> f64 {
        self.pool_gbps / self.plain_pinned_gbps
    }
}

/// Copies `bytes` to device `ordinal` `rounds` times from each source, the sources taking
/// turns round by round, timed by events on one stream.
pub fn h2d_bandwidth(ordinal: usize, bytes: usize, rounds: usize) -> Result<CopyBandwidth, GpuError> {
    if bytes == 0 || rounds == 0 {
        return Err(GpuError::Cuda(format!("a copy of {bytes} bytes, {rounds} times, measures nothing")));
    }
    let (ctx, info) = open(ordinal)?;
    let stream = call("creating a stream", || ctx.new_stream())?;
    let window = Pool::new("window", bytes);
    let device: BlockPool<DeviceBlock> = BlockPool::new("gpu", 2 * bytes, stream.clone());
    // SAFETY: written below before any copy reads it.
    let mut plain_src = call("allocating pinned memory", || unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0) })?;
    call("filling pinned memory", || plain_src.as_mut_slice().map(|s| s.fill(1)))?;
    let mut plain_dst = DeviceBlock::alloc_on(&stream, bytes)?;
    let pageable = vec![1u8; bytes];
    let room = || GpuError::Cuda("a pool without room for one copy".into());
    let mut src = window.try_alloc(bytes).ok_or_else(room)?;
    src.as_bytes_mut().fill(1);
    if !pinned::pin(&ctx, src.as_bytes().as_ptr(), src.len())? {
        return Err(GpuError::Cuda(format!("the driver would not pin a host buffer of {bytes} bytes")));
    }
    let mut dst = device.try_alloc(bytes)?.ok_or_else(room)?;
    let timed = |f: &mut dyn FnMut() -> Result<(), cudarc::driver::DriverError>| -> Result<f64, GpuError> {
        call("timing a copy", || {
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            f()?;
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            end.synchronize()?;
            start.elapsed_ms(&end)
        })
        .map(|ms| bytes as f64 / (ms as f64 / 1e3) / 1e9)
    };
    let (mut pool, mut plain, mut page) = (0f64, 0f64, 0f64);
    for _ in 0..rounds {
        pool = pool.max(timed(&mut || stream.memcpy_htod(src.as_bytes(), &mut dst.0))?);
        plain = plain.max(timed(&mut || stream.memcpy_htod(&plain_src, &mut plain_dst.0))?);
        page = page.max(timed(&mut || stream.memcpy_htod(&pageable, &mut plain_dst.0))?);
    }
    Ok(CopyBandwidth { device: info.name, bytes, pool_gbps: pool, plain_pinned_gbps: plain, pageable_gbps: page })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_measured_on_a_gpu_and_refused_by_name_without_one() {
        let present = super::super::driver_present() && super::super::device_count().unwrap_or(0) > 0;
        match h2d_bandwidth(0, 8 << 20, 3) {
            Ok(c) => {
                assert!(present);
                assert!(c.pool_gbps > 0.0 && c.plain_pinned_gbps > 0.0 && c.pageable_gbps > 0.0, "{c:?}");
            }
            Err(e) => {
                assert!(!present, "{e}");
                assert!(e.to_string().contains("no CUDA"), "{e}");
                super::super::skipped("no GPU");
            }
        }
        assert!(h2d_bandwidth(0, 0, 3).is_err());
    }
}
