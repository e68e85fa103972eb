//! Host buffers pinned for the copy lanes: a streamed weight's pool buffer is registered with
//! CUDA (page-locked, `cuMemHostRegister`) the first time it is uploaded, so that the upload is
//! a DMA straight from it rather than the driver's copy through a staging buffer of its own.
//! The pools keep their buffers for reuse, so a window's buffers are registered once and every
//! later pass uploads from them as they are.
//!
//! A registration must end before its memory does: a buffer that is freed, or whose pages the
//! pool moves into another buffer (`HostBuffer::assemble`), is unregistered first
//! (`forget`). An upload from pinned memory runs after the call returns, so the uploader
//! waits for it before the buffer can go back to the pool (`GpuLane::upload_pinned`).

use super::{call, CudaContext, GpuError};
use cudarc::driver::sys;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Registered ranges by start address: their length and the context that registered them.
static PINNED: Mutex<BTreeMap<usize, (usize, Arc<CudaContext>)>> = Mutex::new(BTreeMap::new());
/// Whether anything was ever registered (so that freeing a buffer costs nothing otherwise).
static ANY: AtomicBool = AtomicBool::new(false);

fn pinned() -> std::sync::MutexGuard<'static, BTreeMap<usize, (usize, Arc<CudaContext>)>> {
    PINNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers `ptr .. ptr + len` (a whole host buffer) with `ctx`'s device, unless it already
/// is. `Ok(false)` where the driver refuses (too much locked memory, say): the caller uploads
/// from pageable memory instead, which is only slower.
pub fn pin(ctx: &Arc<CudaContext>, ptr: *const u8, len: usize) -> Result<bool, GpuError> {
    if len == 0 {
        return Ok(false);
    }
    let start = ptr as usize;
    let mut map = pinned();
    if let Some((&s, &(l, _))) = map.range(..=start).next_back() {
        if start < s + l {
            return Ok(start + len <= s + l);
        }
    }
    call("binding the device's context", || ctx.bind_to_thread())?;
    // SAFETY: the range is a live host buffer the caller owns; it is unregistered (`forget`)
    // before that memory is freed or moved.
    let r = call("pinning a host buffer", || unsafe {
        sys::cuMemHostRegister_v2(ptr as *mut _, len, sys::CU_MEMHOSTREGISTER_PORTABLE).result()
    });
    if r.is_err() {
        return Ok(false);
    }
    map.insert(start, (len, ctx.clone()));
    ANY.store(true, Ordering::Release);
    Ok(true)
}

/// Whether `ptr` lies in a registered range.
pub fn is_pinned(ptr: *const u8) -> bool {
    let p = ptr as usize;
    pinned().range(..=p).next_back().is_some_and(|(&s, &(l, _))| p < s + l)
}

/// Ends every registration that overlaps `ptr .. ptr + len`: called before that memory is
/// freed or its pages moved.
pub(crate) fn forget(ptr: *const u8, len: usize) {
    if !ANY.load(Ordering::Acquire) || len == 0 {
        return;
    }
    let (lo, hi) = (ptr as usize, ptr as usize + len);
    let mut map = pinned();
    let gone: Vec<usize> = map.range(..hi).filter(|(&s, &(l, _))| s + l > lo).map(|(&s, _)| s).collect();
    for s in gone {
        let (_, ctx) = map.remove(&s).expect("listed above");
        // An error here leaves the pages locked until the process ends, nothing worse.
        let _ = call("binding the device's context", || ctx.bind_to_thread());
        // SAFETY: `s` is the start of a range this module registered and has not unregistered.
        let _ = call("unpinning a host buffer", || unsafe { sys::cuMemHostUnregister(s as *mut _).result() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::HUGE;
    use crate::{HostBuffer, Pool};

    #[test]
    fn a_pinned_buffer_is_unpinned_before_its_memory_is_freed_or_moved() {
        let Ok((ctx, _)) = super::super::open(0) else {
            super::super::skipped("no GPU");
            return;
        };
        // A buffer of its own: pinned once (a second pin finds it), unpinned when freed.
        let b = HostBuffer::zeroed(3 * HUGE);
        let p = b.as_bytes().as_ptr();
        assert!(pin(&ctx, p, b.len()).unwrap() && pin(&ctx, p, b.len()).unwrap());
        assert!(is_pinned(p) && is_pinned(p.wrapping_add(3 * HUGE - 1)) && !is_pinned(p.wrapping_add(3 * HUGE)));
        drop(b);
        assert!(!is_pinned(p));
        // A pool's buffer stays pinned while the pool keeps it, and is unpinned when a larger
        // buffer is made of its pages.
        let pool = Pool::with("window", 16 * HUGE, true, None);
        let a = pool.try_alloc(2 * HUGE).unwrap();
        let pa = a.as_bytes().as_ptr();
        assert!(pin(&ctx, pa, a.len()).unwrap());
        drop(a);
        assert!(is_pinned(pa), "kept by the pool, still pinned");
        let again = pool.try_alloc(2 * HUGE).unwrap();
        assert_eq!(again.as_bytes().as_ptr(), pa, "the same buffer back");
        drop(again);
        let big = pool.try_alloc(5 * HUGE).unwrap();
        assert!(!is_pinned(pa), "its pages moved into a new buffer");
        drop(big);
    }
}
