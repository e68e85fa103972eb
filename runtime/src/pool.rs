//! Host memory pools: budgets that hold by construction. (A GPU's memory has pools of its own,
//! `gpu::BlockPool`, on the same books: the `Ledger`.)
//!
//! A pool hands out [`HostBuffer`]s only while the bytes in use stay within its budget; a
//! buffer returns its bytes when it is dropped (wherever that happens: after the last operator
//! that held the tensor lets go), and the lanes waiting for room are woken. So an actor that
//! needs a buffer — a loader about to read the next streamed tensor — is simply not ready
//! while the pool is full: backpressure again, now on memory. The high-water mark is kept for
//! reports and for tests that assert the budget held.

use crate::channel::Waker;
use crate::tensor::HostBuffer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A budget's bookkeeping, the same for the host pools and the GPU's block pools
/// (`gpu::pool`): bytes held (on loan or kept for reuse), bytes kept, the high-water mark of
/// bytes held, and the lanes waiting for room.
pub(crate) struct Ledger {
    pub(crate) name: String,
    pub(crate) budget: usize,
    /// Bytes held: on loan and kept for reuse.
    pub(crate) used: AtomicUsize,
    pub(crate) high_water: AtomicUsize,
    /// Bytes kept for reuse (changed under the owner's free-list lock).
    pub(crate) free_bytes: AtomicUsize,
    waiters: Mutex<Vec<Arc<Waker>>>,
}

impl Ledger {
    pub(crate) fn new(name: &str, budget: usize) -> Ledger {
        Ledger {
            name: name.to_string(),
            budget,
            used: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            free_bytes: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
        }
    }

    /// Bytes on loan now.
    pub(crate) fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire) - self.free_bytes.load(Ordering::Acquire)
    }

    /// Whether `bytes` could be had now (kept blocks can make room).
    pub(crate) fn has_room(&self, bytes: usize) -> bool {
        self.in_use() + bytes <= self.budget
    }

    /// `bytes` more held; the high-water mark follows.
    pub(crate) fn hold(&self, bytes: usize) {
        let now = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.high_water.fetch_max(now, Ordering::AcqRel);
    }

    /// Wakes `lane` the next time bytes come back (once).
    pub(crate) fn notify_on_release(&self, lane: &LaneWaker) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if !w.iter().any(|x| Arc::ptr_eq(x, &lane.0)) {
            w.push(lane.0.clone());
        }
        // Bytes released between the caller's check and this registration are not seen here:
        // the caller checks again after registering (a release after it unparks the lane, and
        // an unpark before the lane parks makes the park return at once). Waking the lane here
        // would make an actor waiting on a full pool spin its lane at full speed.
    }

    /// Bytes came back: wakes every lane waiting (each once).
    pub(crate) fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiters {
            w.wake();
        }
    }
}

pub(crate) struct PoolInner {
    pub(crate) ledger: Ledger,
    /// Keep returned buffers for reuse (weights, KV blocks: the same sizes come back), or free
    /// them at once (activations: their sizes change with every pass).
    reuse: bool,
    /// The tier's bytes over every pool that shares this meter.
    meter: Option<TierMeter>,
    /// Buffers returned and kept for reuse (streamed tensors come round with the same sizes
    /// every pass, so a returned buffer is usually the next one asked for).
    free: Mutex<Vec<HostBuffer>>,
}

impl PoolInner {
    /// A buffer came back: keep it for reuse (its bytes stay counted) or free it, and wake the
    /// waiters.
    pub(crate) fn give_back(&self, buf: HostBuffer) {
        if self.reuse {
            // Counted as free under the lock that `try_alloc` holds, together with the list.
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            self.ledger.free_bytes.fetch_add(buf.len(), Ordering::AcqRel);
            free.push(buf);
        } else {
            self.release(buf.len());
            drop(buf); // no lease: the memory is freed
        }
        self.ledger.wake_waiters();
    }

    /// A kept buffer is freed (the caller holds the free list's lock and took it off).
    fn drop_kept(&self, b: HostBuffer) {
        self.ledger.free_bytes.fetch_sub(b.len(), Ordering::AcqRel);
        self.release(b.len());
        drop(b); // no lease: the memory is freed
    }

    /// `bytes` leave the pool (and the tier).
    fn release(&self, bytes: usize) {
        self.ledger.used.fetch_sub(bytes, Ordering::AcqRel);
        if let Some(m) = &self.meter {
            m.0.used.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Buffers kept for reuse die with the pool.
        if let Some(m) = &self.meter {
            m.0.used.fetch_sub(*self.ledger.free_bytes.get_mut(), Ordering::AcqRel);
        }
    }
}

#[derive(Default)]
struct MeterInner {
    used: AtomicUsize,
    high_water: AtomicUsize,
}

/// The bytes of one tier over several pools (weights, KV cache, activations), and their
/// high-water mark: the tier's peak is not the sum of its pools' peaks, which need not
/// coincide. Cloning shares the meter.
#[derive(Clone, Default)]
pub struct TierMeter(Arc<MeterInner>);

impl std::fmt::Debug for TierMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TierMeter({} bytes, at most {})", self.used(), self.high_water())
    }
}

impl TierMeter {
    /// A meter at zero.
    pub fn new() -> TierMeter {
        TierMeter::default()
    }
    /// Bytes held by its pools now.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Acquire)
    }
    /// The most bytes its pools ever held at once.
    pub fn high_water(&self) -> usize {
        self.0.high_water.load(Ordering::Acquire)
    }
    fn add(&self, bytes: usize) {
        let now = self.0.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.0.high_water.fetch_max(now, Ordering::AcqRel);
    }
}

/// A budgeted source of buffers for one tier. Cloning shares the pool.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pool({}: {}/{} bytes, high water {})",
            self.inner.ledger.name,
            self.used(),
            self.budget(),
            self.high_water()
        )
    }
}

/// Room in a pool's budget without memory ([`Pool::try_reserve`]); given back when dropped.
pub struct Reservation {
    pool: Arc<PoolInner>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.ledger.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.pool.ledger.wake_waiters();
    }
}

/// A waker for the lane an actor runs on, for resources that free up outside any channel.
#[derive(Clone)]
pub struct LaneWaker(pub(crate) Arc<Waker>);

impl LaneWaker {
    /// A waker of no lane (for driving an operator by hand, as operator tests do).
    pub fn detached() -> LaneWaker {
        LaneWaker(Arc::new(Waker::default()))
    }
}

impl Pool {
    /// A pool of `budget` bytes that keeps returned buffers for reuse.
    pub fn new(name: &str, budget: usize) -> Pool {
        Pool::with(name, budget, true, None)
    }

    /// A pool of `budget` bytes that frees returned buffers at once (for buffers whose sizes
    /// vary, as activations'), counted on `meter` with the tier's other pools.
    pub fn transient(name: &str, budget: usize, meter: Option<&TierMeter>) -> Pool {
        Pool::with(name, budget, false, meter)
    }

    /// A pool of `budget` bytes that keeps returned buffers (`reuse`) or frees them, counted on
    /// `meter` with the tier's other pools.
    pub fn with(name: &str, budget: usize, reuse: bool, meter: Option<&TierMeter>) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                ledger: Ledger::new(name, budget),
                reuse,
                meter: meter.cloned(),
                free: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A buffer of `bytes`, if the budget has room for it now: a returned buffer of that size
    /// (its old contents still in it), or a new one — made, where the pool keeps returned
    /// buffers, of their pages moved into place (old contents; see `HostBuffer::assemble`)
    /// and fresh zeroed pages for the rest, after dropping kept buffers if that makes room.
    /// A pool that does not keep returned buffers always gives zeroed ones.
    pub fn try_alloc(&self, bytes: usize) -> Option<HostBuffer> {
        let p = &self.inner;
        // Held for the whole allocation: `used` only grows here, so the room checked below
        // is still there at the end.
        let mut free = p.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = free.iter().position(|b| b.len() == bytes) {
            let mut b = free.swap_remove(i);
            p.ledger.free_bytes.fetch_sub(bytes, Ordering::AcqRel);
            b.lease = Some(p.clone());
            return Some(b);
        }
        if p.ledger.in_use().checked_add(bytes)? > p.ledger.budget {
            return None;
        }
        let mut fresh = None;
        let mut moved = 0;
        if free.iter().any(|b| b.movable_units() > 0) && bytes >= crate::tensor::HUGE {
            // Kept pages of other sizes: move them into the new buffer rather than unmap
            // them and have the kernel clear fresh ones.
            let (b, m) = HostBuffer::assemble(bytes, &mut free)?;
            p.ledger.free_bytes.fetch_sub(m, Ordering::AcqRel);
            moved = m;
            fresh = Some(b);
            // What is left of a moved-from buffer after its last whole unit is of no more use.
            let (remnants, kept): (Vec<_>, Vec<_>) = free.drain(..).partition(|b| b.is_remnant());
            *free = kept;
            remnants.into_iter().for_each(|b| p.drop_kept(b));
        }
        let add = bytes - moved;
        while p.ledger.used.load(Ordering::Acquire) + add > p.ledger.budget {
            let Some(old) = free.pop() else { break };
            p.drop_kept(old);
        }
        if p.ledger.used.load(Ordering::Acquire) + add > p.ledger.budget {
            // Cannot happen while every change to the free list and its bytes holds the lock;
            // should it, the moved pages go and the request waits.
            p.release(moved);
            return None;
        }
        p.ledger.hold(add);
        if let Some(m) = &p.meter {
            m.add(add);
        }
        drop(free);
        let mut b = fresh.unwrap_or_else(|| HostBuffer::zeroed(bytes));
        b.lease = Some(p.clone());
        Some(b)
    }

    /// Room for `bytes` in the budget, held without memory, if the budget has it now (kept
    /// buffers are freed to make it). A tensor sent from memory held elsewhere takes it in
    /// place of the buffer a copy would have taken, so that what the pool bounds downstream
    /// (a GPU's streamed copies) stays bounded. Not counted in the high-water mark or on the
    /// tier's meter: no memory is taken.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        let p = &self.inner;
        let mut free = p.free.lock().unwrap_or_else(|e| e.into_inner());
        if p.ledger.in_use().checked_add(bytes)? > p.ledger.budget {
            return None;
        }
        while p.ledger.used.load(Ordering::Acquire) + bytes > p.ledger.budget {
            let old = free.pop()?;
            p.drop_kept(old);
        }
        p.ledger.used.fetch_add(bytes, Ordering::AcqRel);
        Some(Reservation { pool: p.clone(), bytes })
    }

    /// Whether `bytes` could be allocated now (kept buffers can make room).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.inner.ledger.has_room(bytes)
    }

    /// Wakes `lane` the next time bytes are released (once). Check for room again after
    /// calling this: a release just before it is not announced.
    pub fn notify_on_release(&self, lane: &LaneWaker) {
        self.inner.ledger.notify_on_release(lane)
    }

    /// Bytes held (in use, or kept for reuse).
    pub fn used(&self) -> usize {
        self.inner.ledger.used.load(Ordering::Acquire)
    }
    /// Bytes in buffers that are in use now.
    pub fn in_use(&self) -> usize {
        self.inner.ledger.in_use()
    }
    /// The most bytes ever held at once (in use, or kept for reuse).
    pub fn high_water(&self) -> usize {
        self.inner.ledger.high_water.load(Ordering::Acquire)
    }
    /// The budget.
    pub fn budget(&self) -> usize {
        self.inner.ledger.budget
    }
    /// Whether returned buffers are kept for reuse.
    pub fn reuses(&self) -> bool {
        self.inner.reuse
    }
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.ledger.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_holds_and_dropping_returns_bytes() {
        let p = Pool::new("t", 1000);
        let a = p.try_alloc(600).unwrap();
        assert!(p.try_alloc(500).is_none(), "over budget");
        let b = p.try_alloc(400).unwrap();
        assert_eq!((p.used(), p.high_water()), (1000, 1000));
        drop(a);
        assert_eq!((p.used(), p.in_use()), (1000, 400), "a returned buffer is kept for reuse");
        let c = p.try_alloc(600).unwrap();
        assert_eq!(c.len(), 600);
        assert_eq!(p.used(), 1000, "and reused");
        drop((b, c));
        assert_eq!((p.in_use(), p.high_water()), (0, 1000));
        // A size nobody returned: kept buffers are dropped to make room.
        let d = p.try_alloc(900).unwrap();
        assert_eq!((p.used(), p.in_use()), (900, 900));
        drop(d);
        assert!(p.try_alloc(1001).is_none());
    }

    #[test]
    fn kept_pages_of_other_sizes_are_moved_into_a_new_buffer_not_freed() {
        const MIB: usize = 1 << 20;
        let m = TierMeter::new();
        let p = Pool::with("w", 26 * MIB, true, Some(&m));
        // Three 8 MiB buffers come back, each unit marked with its owner and place.
        let held: Vec<HostBuffer> = (0..3u8)
            .map(|k| {
                let mut b = p.try_alloc(8 * MIB).unwrap();
                for u in 0..4 {
                    b.as_bytes_mut()[u * 2 * MIB] = 10 * (k + 1) + u as u8;
                }
                b
            })
            .collect();
        drop(held);
        // And a small one, which cannot be moved (not a whole unit) but is kept for its size.
        drop(p.try_alloc(MIB).unwrap());
        assert_eq!((p.used(), p.in_use()), (25 * MIB, 0));
        // 22 MiB and a page: no kept buffer of that size; 11 units are moved from the kept
        // ones (their marks come along), the last page is fresh, and the budget holds.
        let big = p.try_alloc(22 * MIB + 4096).unwrap();
        let marks: Vec<u8> = (0..11).map(|u| big.as_bytes()[u * 2 * MIB]).collect();
        assert!(marks.iter().all(|v| *v != 0), "moved pages keep their contents: {marks:?}");
        let mut seen = marks.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 11, "each unit moved once: {marks:?}");
        assert!(big.as_bytes()[22 * MIB..].iter().all(|v| *v == 0), "the fresh page is zeroed");
        // Held: the new buffer, the one unit left over (2 MiB) and the small buffer; the meter
        // agrees.
        assert_eq!((p.in_use(), p.used()), (22 * MIB + 4096, 25 * MIB + 4096));
        assert_eq!(m.used(), p.used());
        let small = p.try_alloc(MIB).unwrap();
        assert_eq!(p.used(), 25 * MIB + 4096, "the small buffer is reused");
        drop(small);
        assert!(p.high_water() <= 26 * MIB);
        drop(big);
        // Small buffers cannot be moved; a request that needs every byte drops them.
        let all = p.try_alloc(26 * MIB).unwrap();
        assert_eq!(p.used(), 26 * MIB);
        drop(all);
    }

    #[test]
    fn the_budget_holds_while_threads_take_and_return_buffers_of_many_sizes() {
        const MIB: usize = 1 << 20;
        let budget = 40 * MIB;
        let p = Pool::new("w", budget);
        let sizes = [4096, MIB, 2 * MIB, 3 * MIB + 4096, 8 * MIB, 12 * MIB];
        std::thread::scope(|sc| {
            for th in 0..4usize {
                let p = p.clone();
                sc.spawn(move || {
                    let mut held: Vec<HostBuffer> = Vec::new();
                    for i in 0..400usize {
                        let size = sizes[(i * 7 + th * 3) % sizes.len()];
                        match p.try_alloc(size) {
                            Some(b) => {
                                assert_eq!(b.len(), size);
                                held.push(b);
                            }
                            None => {
                                held.clear();
                            }
                        }
                        if held.len() > 2 {
                            held.remove(0);
                        }
                    }
                });
            }
        });
        assert!(p.high_water() <= budget, "{p:?}");
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn transient_pools_free_at_once_and_the_meter_sees_the_tier() {
        let m = TierMeter::new();
        let w = Pool::with("w", 1000, true, Some(&m));
        let a = Pool::transient("a", 1000, Some(&m));
        let x = w.try_alloc(700).unwrap();
        let y = a.try_alloc(300).unwrap();
        assert_eq!((m.used(), m.high_water()), (1000, 1000));
        drop(y);
        assert_eq!((a.used(), m.used()), (0, 700), "a transient pool frees what comes back");
        drop(x);
        assert_eq!((w.used(), m.used()), (700, 700), "a reusing pool keeps it");
        let z = a.try_alloc(500).unwrap();
        assert_eq!((m.used(), m.high_water()), (1200, 1200));
        drop(z);
        assert_eq!((a.high_water(), w.high_water()), (500, 700));
    }

    #[test]
    fn concurrent_allocations_never_exceed_the_budget() {
        let p = Pool::new("t", 10_000);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..2000 {
                        if let Some(b) = p.try_alloc(1000 + i % 7) {
                            assert!(p.used() <= 10_000);
                            drop(b);
                        }
                    }
                });
            }
        });
        assert!(p.high_water() <= 10_000);
        assert_eq!(p.in_use(), 0);
    }
}
