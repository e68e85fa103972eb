//! What the expert stores of an engine count: hits, misses, bytes, read-ahead, twins.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of every expert store of an engine (observation only).
#[derive(Debug, Default)]
pub struct ExpertCacheStats {
    /// Chosen experts found in the cache.
    pub hits: AtomicU64,
    /// Chosen experts read from storage because they were not cached.
    pub misses: AtomicU64,
    /// Bytes read from storage for experts.
    pub bytes_read: AtomicU64,
    /// Cached experts dropped to make room.
    pub evictions: AtomicU64,
    /// Experts whose reading ahead began on a hint (the bytes read are in `bytes_read`, those of
    /// reads given up too).
    pub prefetches: AtomicU64,
    /// Of those, the experts then chosen: found cached (counted in `hits` too) or still being
    /// read (finished as a miss, with a head start).
    pub prefetch_hits: AtomicU64,
    /// Readings ahead given up because the route chose otherwise.
    pub prefetch_cancels: AtomicU64,
    /// Chosen experts in passes that had a hint, and how many of them the hint named.
    pub hinted: AtomicU64,
    pub predicted: AtomicU64,
    /// With twins: chosen experts computed on their own lane, and on their twins'.
    pub on_own_lane: AtomicU64,
    pub on_twin: AtomicU64,
}

/// The counters of [`ExpertCacheStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExpertCounts {
    pub hits: u64,
    pub misses: u64,
    pub bytes_read: u64,
    pub evictions: u64,
    pub prefetches: u64,
    pub prefetch_hits: u64,
    pub prefetch_cancels: u64,
    pub hinted: u64,
    pub predicted: u64,
    pub on_own_lane: u64,
    pub on_twin: u64,
}

impl ExpertCacheStats {
    /// The counters now.
    pub fn snapshot(&self) -> ExpertCounts {
        let l = |a: &AtomicU64| a.load(Relaxed);
        ExpertCounts {
            hits: l(&self.hits),
            misses: l(&self.misses),
            bytes_read: l(&self.bytes_read),
            evictions: l(&self.evictions),
            prefetches: l(&self.prefetches),
            prefetch_hits: l(&self.prefetch_hits),
            prefetch_cancels: l(&self.prefetch_cancels),
            hinted: l(&self.hinted),
            predicted: l(&self.predicted),
            on_own_lane: l(&self.on_own_lane),
            on_twin: l(&self.on_twin),
        }
    }
}

impl ExpertCounts {
    /// What was counted since `earlier`.
    pub fn since(&self, earlier: &ExpertCounts) -> ExpertCounts {
        ExpertCounts {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            bytes_read: self.bytes_read - earlier.bytes_read,
            evictions: self.evictions - earlier.evictions,
            prefetches: self.prefetches - earlier.prefetches,
            prefetch_hits: self.prefetch_hits - earlier.prefetch_hits,
            prefetch_cancels: self.prefetch_cancels - earlier.prefetch_cancels,
            hinted: self.hinted - earlier.hinted,
            predicted: self.predicted - earlier.predicted,
            on_own_lane: self.on_own_lane - earlier.on_own_lane,
            on_twin: self.on_twin - earlier.on_twin,
        }
    }
    /// Chosen cold experts found cached, of all chosen cold experts (`None`: none chosen).
    pub fn hit_rate(&self) -> Option<f64> {
        (self.hits + self.misses > 0).then(|| self.hits as f64 / (self.hits + self.misses) as f64)
    }
    /// Chosen experts the hints named, of all chosen in passes with a hint.
    pub fn prediction_hit_rate(&self) -> Option<f64> {
        (self.hinted > 0).then(|| self.predicted as f64 / self.hinted as f64)
    }
}
