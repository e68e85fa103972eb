//! Budgeted pools of GPU memory.
//!
//! The same rule as the host pools (`crate::pool`): a pool hands out blocks only while the
//! bytes it holds stay within its budget (`--gpu-memory` for the device); a block returns to
//! the pool when its last holder drops it and is kept for reuse (streamed weights come round
//! with the same sizes every pass), and the lanes waiting for room are woken. An actor that
//! needs a block — a copy lane about to upload the next layer — is simply not ready while the
//! pool is full: backpressure, on GPU memory.
//!
//! [`BlockPool`] is generic over what a block is ([`Block`]): [`DeviceBlock`], device memory
//! allocated on a stream (the tests use host blocks to check the accounting without a GPU).
//! Pinned host memory is not a pool of its own: the host pools' buffers that copy lanes upload
//! from are pinned where they are (`super::pinned`).

use super::GpuError;
use crate::pool::{LaneWaker, Ledger};
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use weir_kernels::cuda::call;

/// A block of memory a [`BlockPool`] hands out.
pub trait Block: Send + Sync + Sized + 'static {
    /// Where blocks are allocated from (a stream, for device memory).
    type Source: Send + Sync;
    /// A new block of `bytes` (contents unspecified).
    fn alloc(src: &Self::Source, bytes: usize) -> Result<Self, GpuError>;
    /// Its size in bytes.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Device memory, allocated on a stream (and ordered by cudarc's events against the streams
/// that use it).
pub struct DeviceBlock(pub CudaSlice<u8>);

impl DeviceBlock {
    /// A block outside any pool (for measurements that compare against the pool).
    pub fn alloc_on(stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceBlock, GpuError> {
        <DeviceBlock as Block>::alloc(stream, bytes)
    }
}

impl Block for DeviceBlock {
    type Source = Arc<CudaStream>;
    fn alloc(stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceBlock, GpuError> {
        // SAFETY: the contents are unset; every user writes a block before reading it (a copy
        // lane fills a weight block, a KV block's positions are stored before attention
        // reads them).
        let mut b = call(&format!("allocating {bytes} bytes of GPU memory"), || unsafe { stream.alloc::<u8>(bytes) })?;
        // An asynchronous allocation is ordered on `stream` only: record that point as the
        // block's last write, so that a lane's stream using it first waits for it.
        drop(cudarc::driver::DevicePtrMut::device_ptr_mut(&mut b, stream));
        Ok(DeviceBlock(b))
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

struct Inner<B: Block> {
    ledger: Ledger,
    src: B::Source,
    /// Blocks kept for reuse.
    free: Mutex<Vec<B>>,
}

impl<B: Block> Inner<B> {
    fn give_back(&self, b: B) {
        {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            self.ledger.free_bytes.fetch_add(b.len(), Ordering::AcqRel);
            free.push(b);
        }
        self.ledger.wake_waiters();
    }
}

/// A budgeted source of [`Block`]s. Cloning shares the pool.
pub struct BlockPool<B: Block> {
    inner: Arc<Inner<B>>,
}

impl<B: Block> Clone for BlockPool<B> {
    fn clone(&self) -> Self {
        BlockPool { inner: self.inner.clone() }
    }
}

impl<B: Block> std::fmt::Debug for BlockPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockPool({}: {}/{} bytes, high water {})",
            self.name(),
            self.used(),
            self.budget(),
            self.high_water()
        )
    }
}

/// A block on loan from a [`BlockPool`]; back to the pool when dropped.
pub struct Leased<B: Block> {
    block: Option<B>,
    pool: Arc<Inner<B>>,
}

impl<B: Block> std::ops::Deref for Leased<B> {
    type Target = B;
    fn deref(&self) -> &B {
        self.block.as_ref().expect("a leased block is present until dropped")
    }
}

impl<B: Block> std::ops::DerefMut for Leased<B> {
    fn deref_mut(&mut self) -> &mut B {
        self.block.as_mut().expect("a leased block is present until dropped")
    }
}

impl<B: Block> Drop for Leased<B> {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            self.pool.give_back(b);
        }
    }
}

impl<B: Block> BlockPool<B> {
    /// A pool of `budget` bytes allocating from `src`.
    pub fn new(name: &str, budget: usize, src: B::Source) -> BlockPool<B> {
        BlockPool { inner: Arc::new(Inner { ledger: Ledger::new(name, budget), src, free: Mutex::new(Vec::new()) }) }
    }

    /// A block of `bytes` if the budget has room for it now (`Ok(None)`: wait for a release,
    /// see [`BlockPool::notify_on_release`]): a kept block of that size, or a new one after
    /// freeing kept blocks of other sizes as far as that makes room. A request larger than
    /// the whole budget, or an allocation the device refuses, is an error naming the pool.
    pub fn try_alloc(&self, bytes: usize) -> Result<Option<Leased<B>>, GpuError> {
        let p = &self.inner;
        if bytes > p.ledger.budget {
            return Err(GpuError::Cuda(format!(
                "pool {}: a block of {bytes} bytes can never fit its budget of {} bytes",
                p.ledger.name, p.ledger.budget
            )));
        }
        let mut free = p.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = free.iter().position(|b| b.len() == bytes) {
            let b = free.swap_remove(i);
            p.ledger.free_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Ok(Some(Leased { block: Some(b), pool: p.clone() }));
        }
        if !p.ledger.has_room(bytes) {
            return Ok(None);
        }
        while p.ledger.used.load(Ordering::Acquire) + bytes > p.ledger.budget {
            let Some(old) = free.pop() else { break };
            p.ledger.free_bytes.fetch_sub(old.len(), Ordering::AcqRel);
            p.ledger.used.fetch_sub(old.len(), Ordering::AcqRel);
            drop(old);
        }
        let b = B::alloc(&p.src, bytes).map_err(|e| GpuError::Cuda(format!("pool {}: {e}", p.ledger.name)))?;
        p.ledger.hold(bytes);
        Ok(Some(Leased { block: Some(b), pool: p.clone() }))
    }

    /// Whether `bytes` could be had now (kept blocks can make room).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.inner.ledger.has_room(bytes)
    }

    /// Wakes `lane` the next time a block comes back (once). Check for room again after
    /// calling this: a release just before it is not announced.
    pub fn notify_on_release(&self, lane: &LaneWaker) {
        self.inner.ledger.notify_on_release(lane)
    }

    /// Bytes held (in use, or kept for reuse).
    pub fn used(&self) -> usize {
        self.inner.ledger.used.load(Ordering::Acquire)
    }
    /// Bytes in blocks on loan now.
    pub fn in_use(&self) -> usize {
        self.inner.ledger.in_use()
    }
    /// The most bytes ever held at once.
    pub fn high_water(&self) -> usize {
        self.inner.ledger.high_water.load(Ordering::Acquire)
    }
    /// The budget.
    pub fn budget(&self) -> usize {
        self.inner.ledger.budget
    }
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.ledger.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host bytes as blocks: the pool's accounting, checked where there is no GPU.
    struct HostBlock(Vec<u8>);
    impl Block for HostBlock {
        type Source = ();
        fn alloc(_: &(), bytes: usize) -> Result<HostBlock, GpuError> {
            Ok(HostBlock(vec![0; bytes]))
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn the_budget_holds_blocks_come_back_and_are_reused() {
        let p: BlockPool<HostBlock> = BlockPool::new("gpu", 1000, ());
        let a = p.try_alloc(600).unwrap().unwrap();
        assert!(p.try_alloc(500).unwrap().is_none(), "over budget: wait");
        assert!(!p.has_room(500));
        let b = p.try_alloc(400).unwrap().unwrap();
        assert_eq!((p.used(), p.in_use(), p.high_water()), (1000, 1000, 1000));
        drop(a);
        assert_eq!((p.used(), p.in_use()), (1000, 400), "kept for reuse");
        let mut c = p.try_alloc(600).unwrap().unwrap();
        c.0[0] = 7; // the block itself, through the lease
        assert_eq!((p.used(), c.len()), (1000, 600));
        drop((b, c));
        // A size nobody returned: kept blocks are freed to make room.
        let d = p.try_alloc(900).unwrap().unwrap();
        assert_eq!((p.used(), p.in_use(), p.high_water()), (900, 900, 1000));
        drop(d);
    }

    #[test]
    fn a_block_past_the_budget_is_an_error_naming_the_pool() {
        let p: BlockPool<HostBlock> = BlockPool::new("gpu-weights", 100, ());
        let e = p.try_alloc(101).err().expect("refused").to_string();
        assert!(e.contains("gpu-weights") && e.contains("101") && e.contains("100"), "{e}");
        assert_eq!(p.used(), 0);
    }

    #[test]
    fn a_waiting_lane_is_woken_when_a_block_comes_back() {
        let p: BlockPool<HostBlock> = BlockPool::new("gpu", 100, ());
        let a = p.try_alloc(100).unwrap().unwrap();
        // This thread plays the lane: registered, then parked until the release unparks it.
        let lane = LaneWaker::detached();
        lane.0.set(std::thread::current());
        p.notify_on_release(&lane);
        std::thread::spawn(move || drop(a)).join().unwrap();
        let t0 = std::time::Instant::now();
        std::thread::park_timeout(std::time::Duration::from_secs(20));
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "the release did not wake the lane");
        assert!(p.try_alloc(100).unwrap().is_some());
    }

    #[test]
    fn device_pools_allocate_on_a_gpu() {
        if !crate::gpu::driver_present() || crate::gpu::device_count().unwrap_or(0) == 0 {
            crate::gpu::skipped("no GPU");
            return;
        }
        let (ctx, _) = crate::gpu::open(0).unwrap();
        let dev: BlockPool<DeviceBlock> = BlockPool::new("gpu", 3 << 20, ctx.new_stream().unwrap());
        let a = dev.try_alloc(2 << 20).unwrap().unwrap();
        assert!(dev.try_alloc(2 << 20).unwrap().is_none());
        drop(a);
        assert!(dev.try_alloc(2 << 20).unwrap().is_some(), "reused");
    }
}
