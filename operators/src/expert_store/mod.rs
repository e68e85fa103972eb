//! Expert store: the experts of one MoE layer that are not resident, read from storage only
//! when the router chooses them, and kept in a bounded, popularity-aware cache.
//!
//! Ports: input `route` (the layer's router) and, when it predicts, `hint` (this layer's router
//! applied to an earlier layer's hidden state). Outputs: `gate`, `up`, `down` of every expert it
//! serves, in order (expert `experts[j]` on ports `3j`, `3j + 1`, `3j + 2`). Each pass, every
//! served expert gets either its three weights or [`Packet::Absent`] (no token chose it): an
//! expert not chosen is never read on demand.
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
//!
//! With *twins* (each served expert also placed on a second lane, see `expert`), the store
//! decides each pass, for the chosen experts, which of the pair computes each one — the expert
//! on its own lane or its twin — so that the step finishes soonest ([`crate::offload::decide`],
//! over costs measured at start-up: lane 0 is the experts' own lane, lane 1 the twins', tier 0
//! the store's memory; the experts' own lane is first busy with the layer's resident experts
//! the route chose). Each expert's ports are then six: its weights, then its twin's; the one not
//! chosen gets `Absent`.
//!
//! A hint, when it comes before the pass's route, names the experts the layer will likely
//! choose (most predicted first); as background work (`Needs::Optional`), which the runtime runs
//! only when nothing else on the lane can fire (demand first: the stores of an engine share one
//! NVMe lane, so a store's chosen expert is read before another's prediction), the store reads
//! the predicted experts it does not hold, one after another, into room it makes by dropping
//! experts the hint did not name — never waiting for memory, never sending. Reading ahead moves
//! on a chunk per firing, so a route that comes is taken at once (a message before background
//! work): an expert being read that the route chose is finished first, as a chosen read with a
//! head start; one it did not choose is given up (the chunks in flight are waited for, the
//! memory freed). Whether the prediction was right is counted over all the layer's chosen
//! experts, resident ones too.

mod spec;
mod stats;

pub use spec::{LaneTiming, Spec, TwinCosts};
pub use stats::{ExpertCacheStats, ExpertCounts};

use crate::loader::{IoMode, Loader, TensorSource};
use crate::offload::{decide, Active, Choice, Costs};
use crate::Packet;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use weir_runtime::{Emit, FireCx, Inputs, Needs, OpError, Operator, Pool, ReadyCx, SpanKind, Step, Tensor};

/// How much each pass's choices fade: a choice counts half after ~35 passes.
const DECAY: f64 = 0.98;
/// Calibration counts weigh as much as this many passes of choices.
const PRIOR_PASSES: f64 = 50.0;
/// One served expert: its cached weights, popularity and last use.
struct Slot {
    weights: Option<[Tensor; 3]>,
    score: f64,
    last: u64,
    /// Read ahead and not chosen since.
    ahead: bool,
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
    /// Routes taken, and hints taken (hint `n` belongs to route `n`).
    tick: u64,
    hints: u64,
    /// The experts (of all `experts`) the hint for the coming route named.
    predicted: Option<Vec<bool>>,
    /// Served experts to read ahead, most predicted first.
    ahead: VecDeque<usize>,
    /// The expert being read ahead (its three reads started), and those of its tensors that
    /// have landed.
    reading: Option<usize>,
    landed: Vec<Tensor>,
    cache: bool,
    stats: Arc<ExpertCacheStats>,
    /// With twins: the costs the choice is made from, and this pass's choice per served expert
    /// (true: its twin computes it).
    twins: Option<Costs>,
    on_twin: Vec<bool>,
}

impl ExpertStore {
    /// A store for `served` (expert ids of `experts`), reading `tensors` (gate, up, down of each
    /// served expert, in order) into `pool`; `prior[j]`: how often expert `served[j]` was chosen
    /// per token in calibration (0 if unknown); `cache`: keep what it reads. It reads with io_uring
    /// (`mode` must be [`IoMode::Uring`]). The expert placement sizes the pool to hold at least
    /// its largest expert.
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
        twins: Option<Costs>,
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
        let slots =
            prior.iter().map(|p| Slot { weights: None, score: p * PRIOR_PASSES, last: 0, ahead: false }).collect();
        ExpertStore {
            experts,
            reader,
            names,
            pool,
            slots,
            pending: VecDeque::new(),
            tick: 0,
            hints: 0,
            predicted: None,
            ahead: VecDeque::new(),
            reading: None,
            landed: Vec::new(),
            cache,
            stats,
            on_twin: vec![false; served.len()],
            served,
            twins,
        }
    }

    /// Output ports per served expert: its three weights, and its twin's three.
    fn stride(&self) -> usize {
        if self.twins.is_some() {
            6
        } else {
            3
        }
    }

    /// Adds the bytes it reads to `counter` (every loader's total).
    pub fn count_into(&mut self, counter: Arc<AtomicU64>) {
        self.reader.count_into(counter);
    }

    /// Pool bytes expert `j`'s three tensors take.
    fn bytes(&self, j: usize) -> usize {
        (0..3).map(|i| self.reader.held(3 * j + i)).sum()
    }

    /// Drops the least popular cached expert (ties: least recently used) for which `may` holds;
    /// false if there is none.
    fn evict_one(&mut self, may: impl Fn(usize) -> bool) -> bool {
        let victim = (0..self.slots.len()).filter(|&j| may(j) && self.slots[j].weights.is_some()).min_by(|&a, &b| {
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

    /// Sends expert `j`'s weights to whichever of it and its twin computes it this pass, and
    /// `Absent` to the other.
    fn send(&self, j: usize, w: &[Tensor; 3], out: &mut Emit<Packet>) {
        let (k, twin) = (self.stride(), self.on_twin[j]);
        for (i, t) in w.iter().enumerate() {
            out.send(
                k * j + 3 * twin as usize + i,
                Packet::Weight { name: self.names[3 * j + i].clone(), w: t.clone() },
            );
            if self.twins.is_some() {
                out.send(k * j + 3 * !twin as usize + i, Packet::Absent);
            }
        }
    }

    /// With twins: which of each chosen expert and its twin computes it this pass, so that the
    /// step finishes soonest.
    fn choose(&mut self, route: &crate::router::Routing) -> Result<(), OpError> {
        let Some(costs) = &self.twins else { return Ok(()) };
        let mut costs = costs.clone();
        // The experts' own lane first computes the chosen experts that are resident there.
        let own = &costs.lanes[0];
        let busy: f64 = (0..self.experts)
            .filter(|e| !self.served.contains(e))
            .map(|e| route.tokens_of(e).len())
            .filter(|&t| t > 0)
            .map(|t| own.compute_s(t))
            .sum();
        costs.lanes[0].busy_s += busy;
        let active: Vec<Active> = (0..self.served.len())
            .filter_map(|j| {
                let tokens = route.tokens_of(self.served[j]).len();
                (tokens > 0).then_some(Active { expert: j, tokens, tier: 0 })
            })
            .collect();
        let d = decide(&active, &costs).map_err(|e| OpError::new(format!("choosing where experts run: {e}")))?;
        for (a, c) in active.iter().zip(&d.choices) {
            let lane = match *c {
                Choice::InPlace { lane } => lane,
                Choice::Moved { link } => costs.links[link].to,
            };
            self.on_twin[a.expert] = lane == 1;
            let n = if lane == 1 { &self.stats.on_twin } else { &self.stats.on_own_lane };
            n.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// The router's choices `p` carries, checked against the experts this store serves.
    fn choices<'a>(&self, p: &'a Packet, port: &str) -> Result<&'a crate::router::Routing, OpError> {
        let Packet::Route { route, .. } = p else {
            return Err(OpError::new(format!("port `{port}` expected a router's choices")));
        };
        if route.experts != self.experts {
            return Err(OpError::new(format!(
                "port `{port}` carries choices over {} experts; this store serves experts of {}",
                route.experts, self.experts
            )));
        }
        Ok(route)
    }

    /// Takes a route: counts popularity, sends cached and absent experts, queues the reads.
    fn route(&mut self, p: &Packet, out: &mut Emit<Packet>) -> Result<(), OpError> {
        let route = self.choices(p, "route")?;
        self.tick += 1;
        self.ahead.clear();
        if let Some(j) = self.reading {
            if route.tokens_of(self.served[j]).is_empty() {
                self.abandon_reading()?;
                self.stats.prefetch_cancels.fetch_add(1, Relaxed);
            } else {
                self.stats.prefetch_hits.fetch_add(1, Relaxed);
            }
        }
        if let Some(predicted) = self.predicted.take() {
            let chosen = (0..self.experts).filter(|&e| !route.tokens_of(e).is_empty());
            let (n, right) = chosen.fold((0, 0), |(n, r), e| (n + 1, r + predicted[e] as u64));
            self.stats.hinted.fetch_add(n, Relaxed);
            self.stats.predicted.fetch_add(right, Relaxed);
        }
        self.choose(route)?;
        let (tokens, k) = (route.tokens().max(1) as f64, self.stride());
        for j in 0..self.served.len() {
            let mine = route.tokens_of(self.served[j]).len();
            let s = &mut self.slots[j];
            s.score = s.score * DECAY + mine as f64 / tokens;
            if mine == 0 {
                for i in 0..k {
                    out.send(k * j + i, Packet::Absent);
                }
                continue;
            }
            s.last = self.tick;
            match &s.weights {
                Some(w) => {
                    let w = w.clone();
                    self.stats.hits.fetch_add(1, Relaxed);
                    if std::mem::take(&mut s.ahead) {
                        self.stats.prefetch_hits.fetch_add(1, Relaxed);
                    }
                    self.send(j, &w, out);
                }
                None => {
                    // The one being read ahead goes first: it has a head start.
                    if self.reading == Some(j) {
                        self.pending.push_front(j);
                    } else {
                        self.pending.push_back(j);
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes a hint: if it is for the coming route (not one already taken), remembers what it
    /// names and queues the named served experts not cached, most named first, as many as the
    /// pool holds.
    fn hint(&mut self, p: &Packet) -> Result<(), OpError> {
        let route = self.choices(p, "hint")?;
        self.hints += 1;
        if self.hints <= self.tick {
            return Ok(()); // came after its route: stale
        }
        let votes: Vec<usize> = (0..self.experts).map(|e| route.tokens_of(e).len()).collect();
        self.predicted = Some(votes.iter().map(|&v| v > 0).collect());
        if !self.cache {
            return Ok(());
        }
        let mut named: Vec<usize> = (0..self.served.len()).filter(|&j| votes[self.served[j]] > 0).collect();
        named.sort_by_key(|&j| std::cmp::Reverse(votes[self.served[j]]));
        let room = self.pool.budget() / (0..self.served.len()).map(|j| self.bytes(j)).max().unwrap_or(1).max(1);
        self.ahead = named.into_iter().take(room).filter(|&j| self.slots[j].weights.is_none()).collect();
        Ok(())
    }

    /// One step of reading ahead: moves the expert being read on (waiting for a chunk at
    /// most), caching it once it has landed; or starts reading the next expert to read ahead,
    /// if room can be made without dropping one the hint named (otherwise gives up reading
    /// ahead for this pass).
    fn read_ahead(&mut self) -> Result<(), OpError> {
        if let Some(j) = self.reading {
            self.reader.advance()?;
            if let Some(w) = self.land_reading()? {
                let s = &mut self.slots[j];
                s.weights = Some(w);
                s.ahead = true;
            }
            return Ok(());
        }
        let Some(j) = self.ahead.pop_front() else { return Ok(()) };
        if self.slots[j].weights.is_some() {
            return Ok(());
        }
        let need = self.bytes(j);
        let predicted = self.predicted.clone().unwrap_or_default();
        let served = self.served.clone();
        while !self.pool.has_room(need) && self.evict_one(|k| !predicted.get(served[k]).copied().unwrap_or(false)) {}
        if !self.start(j)? {
            self.ahead.clear();
            return Ok(());
        }
        self.stats.prefetches.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Starts reading served expert `j`'s three weights (it is then the one being read);
    /// false, with nothing started, if the pool has no room for them.
    fn start(&mut self, j: usize) -> Result<bool, OpError> {
        self.reading = Some(j);
        for i in 0..3 {
            if !self.reader.begin(3 * j + i)? {
                self.abandon_reading()?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Takes the tensors of the expert being read that have landed; its weights once all three
    /// have (it is then no longer being read).
    fn land_reading(&mut self) -> Result<Option<[Tensor; 3]>, OpError> {
        while self.reader.first_done() {
            let t = self.reader.take_first()?;
            self.landed.push(t);
        }
        if self.landed.len() < 3 {
            return Ok(None);
        }
        self.reading = None;
        let w: [Tensor; 3] =
            std::mem::take(&mut self.landed).try_into().map_err(|_| OpError::new("three tensors per expert"))?;
        self.stats.bytes_read.fetch_add(w.iter().map(|t| t.nbytes() as u64).sum(), Relaxed);
        Ok(Some(w))
    }

    /// Waits for the expert being read to land.
    fn finish_reading(&mut self) -> Result<[Tensor; 3], OpError> {
        loop {
            if let Some(w) = self.land_reading()? {
                return Ok(w);
            }
            self.reader.advance()?;
        }
    }

    /// Gives up the expert being read: waits for its chunks in flight and frees its memory.
    fn abandon_reading(&mut self) -> Result<(), OpError> {
        let landed: u64 = self.landed.drain(..).map(|t| t.nbytes() as u64).sum();
        let got = self.reader.abandon()?;
        self.stats.bytes_read.fetch_add(landed + got, Relaxed);
        self.reading = None;
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
        if !self.pending.is_empty() {
            Needs::Nothing
        } else if self.reading.is_some() || !self.ahead.is_empty() {
            Needs::Optional
        } else {
            Needs::Any
        }
    }
    fn next_outputs(&self) -> Option<std::ops::Range<usize>> {
        let k = self.stride();
        self.pending.front().map(|&j| k * j..k * j + k)
    }
    fn ready(&mut self, cx: &ReadyCx) -> bool {
        let Some(&j) = self.pending.front() else {
            // Taking a route or a hint, or reading ahead: the runtime runs reading ahead only
            // when nothing else on the lane can fire.
            return true;
        };
        if self.reading == Some(j) {
            return true; // its memory is taken
        }
        let need = self.bytes(j);
        while !self.pool.has_room(need) && self.evict_one(|k| k != j) {}
        if self.pool.has_room(need) {
            return true;
        }
        // Held by experts computing this pass: woken when they drop their weights.
        self.pool.notify_on_release(cx.lane);
        self.pool.has_room(need)
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        let Some(&j) = self.pending.front() else {
            // A hint first: one that came with its route is still that route's prediction.
            if let Some(h) = ins.try_get(1).cloned() {
                self.hint(&h)?;
            }
            match ins.try_get(0).cloned() {
                Some(r) => self.route(&r, out)?,
                None if ins.try_get(1).is_none() => self.read_ahead()?,
                None => {}
            }
            return Ok(Step::Continue);
        };
        // Unless it is being read ahead already. No room: another allocation took it since
        // `ready` (none should) — try again.
        if self.reading != Some(j) && !self.start(j)? {
            return Ok(Step::Continue);
        }
        let w = self.finish_reading()?;
        self.pending.pop_front();
        self.stats.misses.fetch_add(1, Relaxed);
        self.send(j, &w, out);
        if self.cache {
            self.slots[j].weights = Some(w);
        }
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Routing;
    use crate::testing::{batch, fire_some};
    use weir_runtime::{DType, LaneWaker};

    const N: usize = 1024; // floats per tensor: one 4 KiB block

    /// A store over four experts written to a real file (tensor `i` of expert `e` holds
    /// `10e + i`), with room for two.
    fn store(name: &str) -> (ExpertStore, Arc<ExpertCacheStats>, std::path::PathBuf) {
        store_with(name, None)
    }

    /// [`store`], with twins choosing from `twins`.
    fn store_with(name: &str, twins: Option<Costs>) -> (ExpertStore, Arc<ExpertCacheStats>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("weir-expert-store-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("experts.bin");
        let data: Vec<u8> = (0..12)
            .flat_map(|t| std::iter::repeat_n((10 * (t / 3) + t % 3) as f32, N))
            .flat_map(f32::to_le_bytes)
            .collect();
        std::fs::write(&path, data).unwrap();
        let tensors = (0..12)
            .map(|t| TensorSource {
                name: format!("e{}.{}", t / 3, t % 3),
                path: path.clone(),
                offset: (t * 4 * N) as u64,
                dtype: DType::F32,
                shape: vec![N],
            })
            .collect();
        let stats = Arc::new(ExpertCacheStats::default());
        let mode = IoMode::Uring { depth: 2, chunk: 4096, ahead: false };
        let pool = Pool::new("experts", 2 * 3 * 4 * N);
        let s = ExpertStore::new(vec![0, 1, 2, 3], 4, tensors, mode, pool, vec![0.0; 4], true, stats.clone(), twins);
        (s, stats, dir)
    }

    /// One token choosing `ids` of four experts.
    fn route(ids: [u32; 2]) -> Packet {
        let r = Routing { experts: 4, top_k: 2, ids: ids.to_vec(), weights: vec![0.5, 0.5] };
        Packet::Route { batch: batch(&[(0, 1)]), route: Arc::new(r) }
    }

    fn cached(s: &ExpertStore) -> Vec<usize> {
        (0..4).filter(|&j| s.slots[j].weights.is_some()).collect()
    }

    /// Which experts the firing's outputs sent weights for (checking they are that expert's),
    /// and that every other expert got `Absent` or nothing.
    fn sent(out: &[Option<Packet>]) -> Vec<usize> {
        let mut got = Vec::new();
        for e in 0..4 {
            match &out[3 * e] {
                Some(Packet::Weight { w, .. }) => {
                    for i in 0..3 {
                        let Some(Packet::Weight { w, .. }) = &out[3 * e + i] else {
                            panic!("expert {e}: three weights")
                        };
                        assert_eq!(w.f32()[N - 1], (10 * e + i) as f32, "expert {e} tensor {i}");
                    }
                    assert_eq!(w.f32().len(), N);
                    got.push(e);
                }
                Some(Packet::Absent) | None => {}
                Some(_) => panic!("expert {e}: not a weight"),
            }
        }
        got
    }

    #[test]
    fn with_twins_each_chosen_expert_goes_where_the_step_finishes_soonest() {
        use crate::offload::LaneCost;
        let lane = |fixed_s: f64| LaneCost { name: "l".into(), fixed_s, per_token_s: 0.0, busy_s: 0.0, reads: vec![0] };
        // (expert, 0 for its own lane or 1 for its twin) of every expert sent weights.
        let placed = |out: &[Option<Packet>]| -> Vec<(usize, usize)> {
            let mut got = Vec::new();
            for e in 0..4 {
                for side in 0..2 {
                    if let Some(Packet::Weight { w, .. }) = &out[6 * e + 3 * side] {
                        assert_eq!(w.f32()[0], (10 * e) as f32, "expert {e}'s own weights");
                        for i in 0..3 {
                            assert!(matches!(out[6 * e + 3 * (1 - side) + i], Some(Packet::Absent)), "the other side");
                        }
                        got.push((e, side));
                    }
                }
            }
            got
        };
        // Equal lanes: the two chosen experts split (a step of 1 s, not 2). A costly twin: both
        // stay.
        for (twin_s, want) in [(1.0, vec![(0, 0), (2, 1)]), (100.0, vec![(0, 0), (2, 0)])] {
            let costs = Costs { lanes: vec![lane(1.0), lane(twin_s)], links: vec![] };
            let (mut s, stats, dir) = store_with(&format!("twins-{twin_s}"), Some(costs));
            let out = fire_some(&mut s, vec![Some(route([0, 2])), None], 24).unwrap();
            for e in [1, 3] {
                assert!((0..6).all(|i| matches!(out[6 * e + i], Some(Packet::Absent))), "expert {e} not chosen");
            }
            let mut got = Vec::new();
            for _ in 0..2 {
                assert_eq!(s.next_outputs().map(|r| r.len()), Some(6));
                got.extend(placed(&fire_some(&mut s, vec![None, None], 24).unwrap()));
            }
            assert_eq!(got, want, "twin cost {twin_s}");
            // The next pass finds both cached and sends them at once, choosing again.
            let out = fire_some(&mut s, vec![Some(route([2, 0])), None], 24).unwrap();
            assert_eq!(placed(&out), want);
            let c = stats.snapshot();
            let twins = want.iter().filter(|w| w.1 == 1).count() as u64;
            assert_eq!((c.on_own_lane, c.on_twin), (2 * (2 - twins), 2 * twins));
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// Fires with no input while it has reading ahead to do (a chunk or more per firing).
    fn read_ahead_all(s: &mut ExpertStore) {
        for _ in 0..100 {
            if s.needs() != Needs::Optional {
                return;
            }
            assert!(fire_some(s, vec![None, None], 12).unwrap().iter().all(Option::is_none), "never sends ahead");
        }
        panic!("reading ahead did not finish");
    }

    #[test]
    fn a_hint_reads_the_named_experts_ahead_and_their_route_finds_them() {
        let (mut s, stats, dir) = store("ahead");
        let lane = LaneWaker::detached();
        assert_eq!(s.needs(), Needs::Any);
        // The hint names 3 and 1: nothing is sent, both are queued to read ahead.
        let out = fire_some(&mut s, vec![None, Some(route([3, 1]))], 12).unwrap();
        assert!(out.iter().all(Option::is_none));
        assert_eq!(s.needs(), Needs::Optional);
        assert!(s.ready(&ReadyCx { lane: &lane }));
        read_ahead_all(&mut s);
        assert_eq!(cached(&s), vec![1, 3]);
        assert_eq!(s.needs(), Needs::Any, "nothing left to read ahead");
        let c = stats.snapshot();
        assert_eq!((c.prefetches, c.misses, c.bytes_read), (2, 0, 2 * 3 * 4 * N as u64));
        // The route chooses 1 and 2: 1 was read ahead (a hit), 2 must be read on demand.
        let out = fire_some(&mut s, vec![Some(route([1, 2])), None], 12).unwrap();
        assert_eq!(sent(&out), vec![1]);
        assert!(matches!(out[0], Some(Packet::Absent)) && matches!(out[9], Some(Packet::Absent)));
        assert_eq!(s.needs(), Needs::Nothing);
        assert!(s.ready(&ReadyCx { lane: &lane }), "room made by dropping 3");
        let out = fire_some(&mut s, vec![None, None], 12).unwrap();
        assert_eq!(sent(&out), vec![2]);
        assert_ne!(s.needs(), Needs::Nothing, "nothing left to read on demand");
        assert_eq!(cached(&s), vec![1, 2]);
        let c = stats.snapshot();
        assert_eq!((c.hits, c.prefetch_hits, c.misses, c.evictions), (1, 1, 1, 1));
        // Of the two chosen, the hint named one.
        assert_eq!((c.hinted, c.predicted), (2, 1));
        assert_eq!(c.prediction_hit_rate(), Some(0.5));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_route_finishes_the_expert_being_read_ahead_if_chosen_and_gives_it_up_if_not() {
        let (mut s, stats, dir) = store("cancel");
        let lane = LaneWaker::detached();
        // Pass 1: the hint names 0 and 2; 0's reads start, then the route (0 and 1) comes.
        fire_some(&mut s, vec![None, Some(route([0, 2]))], 12).unwrap();
        fire_some(&mut s, vec![None, None], 12).unwrap();
        assert_eq!(s.reading, Some(0));
        let out = fire_some(&mut s, vec![Some(route([0, 1])), None], 12).unwrap();
        assert!(sent(&out).is_empty(), "0 is still being read");
        assert_eq!(s.pending, [0, 1], "the one being read goes first");
        assert!(s.ready(&ReadyCx { lane: &lane }));
        assert_eq!(sent(&fire_some(&mut s, vec![None, None], 12).unwrap()), vec![0]);
        assert!(s.ready(&ReadyCx { lane: &lane }));
        assert_eq!(sent(&fire_some(&mut s, vec![None, None], 12).unwrap()), vec![1]);
        let c = stats.snapshot();
        assert_eq!((c.prefetches, c.prefetch_hits, c.prefetch_cancels, c.misses), (1, 1, 0, 2));
        // Pass 2: the hint names 3 and 0; 0 is held, 1 (not named) is dropped to read 3. The
        // route chooses 0 and 1: 3's reading is given up and its memory freed.
        fire_some(&mut s, vec![None, Some(route([3, 0]))], 12).unwrap();
        fire_some(&mut s, vec![None, None], 12).unwrap();
        assert_eq!(s.reading, Some(3));
        assert_eq!(cached(&s), vec![0]);
        let out = fire_some(&mut s, vec![Some(route([0, 1])), None], 12).unwrap();
        assert_eq!(sent(&out), vec![0]);
        assert_eq!((s.reading, s.pool.in_use()), (None, 3 * 4 * N), "only 0 is held");
        assert!(s.ready(&ReadyCx { lane: &lane }));
        assert_eq!(sent(&fire_some(&mut s, vec![None, None], 12).unwrap()), vec![1]);
        let c = stats.snapshot();
        assert_eq!((c.prefetches, c.prefetch_hits, c.prefetch_cancels, c.misses), (2, 1, 1, 3));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reading_ahead_drops_only_unnamed_experts_and_a_hint_after_its_route_is_stale() {
        let (mut s, stats, dir) = store("stale");
        let lane = LaneWaker::detached();
        let fire = |s: &mut ExpertStore, route_in: Option<Packet>, hint: Option<Packet>| {
            fire_some(s, vec![route_in, hint], 12).unwrap()
        };
        // Pass 1: the hint names 0 and 1; both are read ahead, and chosen.
        fire(&mut s, None, Some(route([0, 1])));
        read_ahead_all(&mut s);
        assert_eq!(sent(&fire(&mut s, Some(route([0, 1])), None)), vec![0, 1]);
        // Pass 2: the hint names 2 and 1; 1 is held, 2 is read in place of 0 (not named).
        fire(&mut s, None, Some(route([2, 1])));
        read_ahead_all(&mut s);
        assert_eq!(cached(&s), vec![1, 2]);
        assert_eq!(sent(&fire(&mut s, Some(route([2, 1])), None)), vec![1, 2]);
        let c = stats.snapshot();
        assert_eq!((c.hits, c.misses, c.prefetches, c.prefetch_hits, c.evictions), (4, 0, 3, 3, 1));
        // Pass 3: route and hint in one firing: the hint is this route's prediction (3 and 0
        // named, 3 and 2 chosen); the route ends reading ahead, 3 is read on demand.
        assert_eq!(sent(&fire(&mut s, Some(route([3, 2])), Some(route([3, 0])))), vec![2]);
        assert_eq!(s.needs(), Needs::Nothing);
        assert!(s.ready(&ReadyCx { lane: &lane }));
        assert_eq!(sent(&fire(&mut s, None, None)), vec![3]);
        let c = stats.snapshot();
        assert_eq!((c.hinted, c.predicted, c.prefetches, c.misses), (6, 5, 3, 1));
        // Pass 4: its hint comes after its route — stale: nothing queued, nothing counted.
        assert_eq!(sent(&fire(&mut s, Some(route([2, 3])), None)), vec![2, 3]);
        fire(&mut s, None, Some(route([0, 1])));
        assert!(s.predicted.is_none() && s.ahead.is_empty());
        assert_eq!(stats.snapshot().hinted, 6);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
