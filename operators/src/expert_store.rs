//! Expert store: the experts of one MoE layer that are not resident, read from storage only
//! when the router chooses them, and kept in a bounded, popularity-aware cache.
//!
//! Ports: input `route` (the layer's router). Outputs: `gate`, `up`, `down` of every expert it
//! serves, in order (expert `experts[j]` on ports `3j`, `3j + 1`, `3j + 2`). Each pass, every
//! served expert gets either its three weights or [`Packet::Absent`] (no token chose it): an
//! expert not chosen is never read.
//!
//! When a route arrives the store sends, in one firing, the cached experts that were chosen and
//! `Absent` to the others; then it reads the chosen experts that are not cached, one per firing
//! (taking no new route until they are out), each into a buffer from its own pool. The pool's
//! budget is the cache: a read that finds no room evicts the least popular cached expert —
//! popularity is the calibration counts (`--expert-stats`) plus this run's choices, decaying
//! over passes; ties go to the least recently used — and if the memory is still held by experts
//! computing this pass, the store waits until they finish (backpressure). With a budget of one
//! expert it caches nothing useful: every chosen expert is read every time (the baseline
//! policy).

use crate::loader::{IoMode, Loader, TensorSource};
use crate::Packet;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use weir_runtime::{Emit, FireCx, Inputs, Needs, OpError, Operator, Pool, ReadyCx, SpanKind, Step, Tensor};

/// How much each pass's choices fade: a choice counts half after ~35 passes.
const DECAY: f64 = 0.98;
/// Calibration counts weigh as much as this many passes of choices.
const PRIOR_PASSES: f64 = 50.0;

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
}

/// One served expert: its cached weights, popularity and last use.
struct Slot {
    weights: Option<[Tensor; 3]>,
    score: f64,
    last: u64,
}

/// See the module doc.
pub struct ExpertStore {
    /// Experts of the router's `experts` that this store serves, in port order.
    served: Vec<usize>,
    experts: usize,
    reader: Loader,
    /// The tensors' names, as the messages carry them.
    names: Vec<Arc<str>>,
    pool: Pool,
    slots: Vec<Slot>,
    /// Served experts (indices into `served`) chosen this pass and still to read and send.
    pending: VecDeque<usize>,
    tick: u64,
    cache: bool,
    stats: Arc<ExpertCacheStats>,
}

impl ExpertStore {
    /// A store for `served` (expert ids of `experts`), reading `tensors` (gate, up, down of each
    /// served expert, in order) into `pool`; `prior[j]`: how often expert `served[j]` was chosen
    /// per token in calibration (0 if unknown); `cache`: keep what it reads. The expert
    /// placement sizes the pool to hold at least its largest expert.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        served: Vec<usize>,
        experts: usize,
        tensors: Vec<TensorSource>,
        mode: IoMode,
        pool: Pool,
        prior: Vec<f64>,
        cache: bool,
        stats: Arc<ExpertCacheStats>,
    ) -> ExpertStore {
        assert_eq!(tensors.len(), 3 * served.len(), "gate, up, down per served expert");
        assert_eq!(prior.len(), served.len(), "a prior per served expert");
        let mode = match mode {
            IoMode::Uring { depth, chunk, .. } => IoMode::Uring { depth, chunk, ahead: false },
            m => m,
        };
        let n = tensors.len();
        let names = tensors.iter().map(|t| Arc::from(t.name.as_str())).collect();
        let reader = Loader::new(tensors, vec![true; n], mode, Some(pool.clone()));
        let slots = prior.iter().map(|p| Slot { weights: None, score: p * PRIOR_PASSES, last: 0 }).collect();
        ExpertStore { served, experts, reader, names, pool, slots, pending: VecDeque::new(), tick: 0, cache, stats }
    }

    /// Adds the bytes it reads to `counter` (every loader's total).
    pub fn count_into(&mut self, counter: Arc<AtomicU64>) {
        self.reader.count_into(counter);
    }

    /// Pool bytes expert `j`'s three tensors take.
    fn bytes(&self, j: usize) -> usize {
        (0..3).map(|i| self.reader.held(3 * j + i)).sum()
    }

    /// Drops the least popular cached expert (ties: least recently used) other than `keep`;
    /// false if none is cached.
    fn evict_one(&mut self, keep: usize) -> bool {
        let victim =
            (0..self.slots.len()).filter(|&j| j != keep && self.slots[j].weights.is_some()).min_by(|&a, &b| {
                self.slots[a].score.total_cmp(&self.slots[b].score).then(self.slots[a].last.cmp(&self.slots[b].last))
            });
        match victim {
            Some(j) => {
                self.slots[j].weights = None;
                self.stats.evictions.fetch_add(1, Relaxed);
                true
            }
            None => false,
        }
    }

    /// Sends expert `j`'s weights on its three ports.
    fn send(&self, j: usize, w: &[Tensor; 3], out: &mut Emit<Packet>) {
        for (i, t) in w.iter().enumerate() {
            out.send(3 * j + i, Packet::Weight { name: self.names[3 * j + i].clone(), w: t.clone() });
        }
    }

    /// Takes a route: counts popularity, sends cached and absent experts, queues the reads.
    fn route(&mut self, p: &Packet, out: &mut Emit<Packet>) -> Result<(), OpError> {
        let Packet::Route { route, .. } = p else {
            return Err(OpError::new("port `route` expected a router's choices"));
        };
        if route.experts != self.experts {
            return Err(OpError::new(format!(
                "port `route` carries choices over {} experts; this store serves experts of {}",
                route.experts, self.experts
            )));
        }
        self.tick += 1;
        let tokens = route.tokens().max(1) as f64;
        for j in 0..self.served.len() {
            let mine = route.tokens_of(self.served[j]).len();
            let s = &mut self.slots[j];
            s.score = s.score * DECAY + mine as f64 / tokens;
            if mine == 0 {
                for i in 0..3 {
                    out.send(3 * j + i, Packet::Absent);
                }
                continue;
            }
            s.last = self.tick;
            match &s.weights {
                Some(w) => {
                    let w = w.clone();
                    self.stats.hits.fetch_add(1, Relaxed);
                    self.send(j, &w, out);
                }
                None => self.pending.push_back(j),
            }
        }
        Ok(())
    }
}

impl Operator<Packet> for ExpertStore {
    fn kind(&self) -> &str {
        "expert_store"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Load
    }
    fn needs(&self) -> Needs {
        if self.pending.is_empty() {
            Needs::All
        } else {
            Needs::Nothing
        }
    }
    fn next_outputs(&self) -> Option<std::ops::Range<usize>> {
        self.pending.front().map(|&j| 3 * j..3 * j + 3)
    }
    fn ready(&mut self, cx: &ReadyCx) -> bool {
        let Some(&j) = self.pending.front() else { return true };
        let need = self.bytes(j);
        while !self.pool.has_room(need) && self.evict_one(j) {}
        if self.pool.has_room(need) {
            return true;
        }
        // Held by experts computing this pass: woken when they drop their weights.
        self.pool.notify_on_release(cx.lane);
        self.pool.has_room(need)
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        let Some(&j) = self.pending.front() else {
            let p = ins.take(0);
            self.route(&p, out)?;
            return Ok(Step::Continue);
        };
        let mut got = Vec::with_capacity(3);
        for i in 0..3 {
            match self.reader.read_now(3 * j + i)? {
                Some(t) => got.push(t),
                // Another allocation took the room since `ready` (none should): try again.
                None => return Ok(Step::Continue),
            }
        }
        let w: [Tensor; 3] = got.try_into().map_err(|_| OpError::new("three tensors per expert"))?;
        self.pending.pop_front();
        self.stats.misses.fetch_add(1, Relaxed);
        self.stats.bytes_read.fetch_add(w.iter().map(|t| t.nbytes() as u64).sum(), Relaxed);
        self.send(j, &w, out);
        if self.cache {
            self.slots[j].weights = Some(w);
        }
        Ok(Step::Continue)
    }
}
