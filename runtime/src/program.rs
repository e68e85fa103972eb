//! Building and running a program: a placed graph of actors on lanes.
//!
//! Build, then run: [`ProgramBuilder`] takes lanes, actors and edges and checks them
//! (every port connected once, capacities non-zero, lanes possible on this machine);
//! [`ProgramBuilder::build`] starts one thread per lane (plus a lane's worker pool), after
//! which the only failures are the actors' own (bad data, I/O), reported through
//! [`Program::fault`] and [`Program::shutdown`].
//!
//! A lane thread sweeps its actors in topological order, firing each that is ready, and parks
//! when a sweep fires nothing; edges wake it. When an actor fails or panics, the fault is
//! recorded with the actor's and lane's names, every lane is told to stop, and as lanes exit
//! their channel ends drop, so whoever waits on the program's external edges returns at once.

use crate::actor::{Actor, Fired, InPort, Operator};
use crate::channel::{edge, ExternalRx, ExternalTx, Waker};
use crate::error::Error;
use crate::lane::{self, LaneId, LaneKind, LaneSpec, WorkerPool};
use crate::trace::{Event, Trace, TraceSink};
use crate::Message;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use weir_kernels::{Parallel, Serial};

/// Index of an actor in a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ActorId(pub usize);

/// An edge's (actor, port) ends, `None` outside the program, and its capacity.
type EdgeEnds = (Option<(usize, usize)>, Option<(usize, usize)>, usize);

struct ActorSlot<M> {
    actor: Actor<M>,
    lane: LaneId,
    layer: Option<u32>,
    kind: String,
}

/// Collects lanes, actors and edges; `build` starts them.
pub struct ProgramBuilder<M> {
    lanes: Vec<LaneSpec>,
    wakers: Vec<Arc<Waker>>,
    actors: Vec<ActorSlot<M>>,
    edges: Vec<EdgeEnds>,
    problems: Vec<String>,
    sink: Arc<TraceSink>,
    activations: crate::pool::Pool,
    gpu_memory: Option<usize>,
    serial: Vec<usize>,
}

impl<M: Message> Default for ProgramBuilder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Message> ProgramBuilder<M> {
    /// An empty program.
    pub fn new() -> Self {
        ProgramBuilder {
            lanes: Vec::new(),
            wakers: Vec::new(),
            actors: Vec::new(),
            edges: Vec::new(),
            problems: Vec::new(),
            sink: Arc::new(TraceSink::new()),
            activations: crate::pool::Pool::transient("activations", usize::MAX, None),
            gpu_memory: None,
            serial: Vec::new(),
        }
    }

    /// Makes a GPU lane wait for its stream after every firing, so that nothing it enqueues
    /// overlaps what it does next on the host (reading a weight, say): the no-overlap baseline.
    pub fn serial(&mut self, lane: LaneId) -> &mut Self {
        if !self.serial.contains(&lane.0) {
            self.serial.push(lane.0);
        }
        self
    }

    /// The budget of each GPU's memory pool, which its lanes' weights, KV cache and
    /// activations share (default: the device's memory less 1 GiB).
    pub fn gpu_memory(&mut self, bytes: usize) -> &mut Self {
        self.gpu_memory = Some(bytes);
        self
    }

    /// Records trace events (spans cost two clock reads and a lock each).
    pub fn trace(&mut self, on: bool) -> &mut Self {
        self.sink.enabled.store(on, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// The pool operators take their outputs and scratch from (default: unbounded). Set it
    /// before adding actors.
    pub fn activations(&mut self, pool: crate::pool::Pool) -> &mut Self {
        self.activations = pool;
        self
    }

    /// Adds a lane.
    pub fn lane(&mut self, spec: LaneSpec) -> LaneId {
        self.lanes.push(spec);
        self.wakers.push(Arc::new(Waker::default()));
        LaneId(self.lanes.len() - 1)
    }

    /// Places an operator on a lane with `inputs` input ports and `outputs` output ports.
    pub fn actor(
        &mut self,
        name: &str,
        lane: LaneId,
        layer: Option<u32>,
        op: Box<dyn Operator<M>>,
        inputs: usize,
        outputs: usize,
    ) -> ActorId {
        if lane.0 >= self.lanes.len() {
            self.problems.push(format!("actor `{name}` is placed on lane #{} which does not exist", lane.0));
        }
        let kind = op.kind().to_string();
        let id = self.actors.len() as u32;
        self.actors.push(ActorSlot {
            actor: Actor {
                id,
                name: name.to_string(),
                op,
                inputs: (0..inputs).map(|_| InPort { rx: None, sticky: false, uses: 1, left: 0 }).collect(),
                outputs: (0..outputs).map(|_| Vec::new()).collect(),
                slots: (0..inputs).map(|_| None).collect(),
                sticky: vec![false; inputs],
                finished: false,
                activations: self.activations.clone(),
            },
            lane,
            layer,
            kind,
        });
        ActorId(self.actors.len() - 1)
    }

    /// Makes input `port` of `actor` sticky: it keeps its latest message across firings
    /// (resident weights).
    pub fn sticky(&mut self, actor: ActorId, port: usize) {
        self.keep(actor, port, u32::MAX);
    }

    /// Makes input `port` of `actor` keep each message for `uses` firings (a streamed weight
    /// shared by `uses` micro-batches); `u32::MAX` keeps it for ever (see [`Self::sticky`]).
    pub fn keep(&mut self, actor: ActorId, port: usize, uses: u32) {
        if uses <= 1 {
            return;
        }
        match self
            .actors
            .get_mut(actor.0)
            .and_then(|a| a.actor.sticky.get_mut(port).map(|s| (s, &mut a.actor.inputs[port])))
        {
            Some((s, p)) => {
                *s = true;
                p.sticky = true;
                p.uses = uses;
            }
            None => self.problems.push(format!("keep: actor #{} has no input port {port}", actor.0)),
        }
    }

    fn waker_of(&self, a: ActorId) -> Option<Arc<Waker>> {
        self.actors.get(a.0).and_then(|s| self.wakers.get(s.lane.0)).cloned()
    }

    fn check_out(&mut self, a: ActorId, port: usize) -> bool {
        let ok = self.actors.get(a.0).is_some_and(|s| port < s.actor.outputs.len());
        if !ok {
            let name = self.actors.get(a.0).map_or(format!("#{}", a.0), |s| s.actor.name.clone());
            self.problems.push(format!("actor `{name}` has no output port {port}"));
        }
        ok
    }

    fn check_in(&mut self, a: ActorId, port: usize) -> bool {
        let Some(s) = self.actors.get(a.0) else {
            self.problems.push(format!("no actor #{}", a.0));
            return false;
        };
        let name = s.actor.name.clone();
        match s.actor.inputs.get(port) {
            None => {
                self.problems.push(format!("actor `{name}` has no input port {port}"));
                false
            }
            Some(p) if p.rx.is_some() => {
                self.problems.push(format!("input port {port} of actor `{name}` is connected twice"));
                false
            }
            Some(_) => true,
        }
    }

    fn check_capacity(&mut self, capacity: usize, what: &str) -> bool {
        if capacity == 0 {
            self.problems.push(format!("{what}: capacity 0 (an edge must hold at least one message)"));
        }
        capacity > 0
    }

    fn probe(&self) -> Option<Arc<crate::channel::Probe>> {
        Some(Arc::new(crate::channel::Probe { edge: self.edges.len() as u32, sink: self.sink.clone() }))
    }

    /// Connects output `from.1` of actor `from.0` to input `to.1` of `to.0` with a bounded edge.
    pub fn connect(&mut self, from: (ActorId, usize), to: (ActorId, usize), capacity: usize) {
        let what = format!("edge #{}", self.edges.len());
        if !(self.check_out(from.0, from.1) & self.check_in(to.0, to.1) & self.check_capacity(capacity, &what)) {
            return;
        }
        let (tx, rx) = edge(capacity, self.waker_of(from.0), self.waker_of(to.0), self.probe());
        self.actors[from.0 .0].actor.outputs[from.1].push(tx);
        self.actors[to.0 .0].actor.inputs[to.1].rx = Some(rx);
        self.edges.push((Some((from.0 .0, from.1)), Some((to.0 .0, to.1)), capacity));
    }

    /// An edge from outside into input `port` of `actor`.
    pub fn input(&mut self, actor: ActorId, port: usize, capacity: usize) -> ExternalTx<M> {
        let capacity = capacity.max(1);
        let (tx, rx) = edge(capacity, None, self.waker_of(actor), self.probe());
        if self.check_in(actor, port) {
            self.actors[actor.0].actor.inputs[port].rx = Some(rx);
        }
        self.edges.push((None, Some((actor.0, port)), capacity));
        ExternalTx { inner: tx }
    }

    /// An edge from output `port` of `actor` to outside.
    pub fn output(&mut self, actor: ActorId, port: usize, capacity: usize) -> ExternalRx<M> {
        let capacity = capacity.max(1);
        let (tx, rx) = edge(capacity, self.waker_of(actor), None, self.probe());
        if self.check_out(actor, port) {
            self.actors[actor.0].actor.outputs[port].push(tx);
        }
        self.edges.push((Some((actor.0, port)), None, capacity));
        ExternalRx { inner: rx }
    }

    /// Checks the program and starts its lanes.
    pub fn build(self) -> Result<Program, Error> {
        let mut problems = self.problems;
        for s in &self.actors {
            for (i, p) in s.actor.inputs.iter().enumerate() {
                if p.rx.is_none() {
                    problems.push(format!("input port {i} of actor `{}` is not connected", s.actor.name));
                }
            }
            for (i, p) in s.actor.outputs.iter().enumerate() {
                if p.is_empty() {
                    problems.push(format!("output port {i} of actor `{}` is not connected", s.actor.name));
                }
            }
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(problems.join("; ")));
        }
        let allowed = lane::allowed_cpus();
        for l in &self.lanes {
            lane::validate(l, &allowed)?;
        }
        let (mut gpu_lanes, gpu_pools) = crate::gpu::lanes_for(&self.lanes, self.gpu_memory)?;

        let sink = self.sink.on().then(|| self.sink.clone());
        if let Some(t) = &sink {
            for (i, l) in self.lanes.iter().enumerate() {
                t.push(Event::LaneCreated { lane: i as u32, name: l.name.clone(), kind: l.describe() });
            }
            for s in &self.actors {
                t.push(Event::ActorCreated {
                    actor: s.actor.id,
                    name: s.actor.name.clone(),
                    kind: s.kind.clone(),
                    lane: s.lane.0 as u32,
                    layer: s.layer,
                });
            }
            for (i, &(from, to, capacity)) in self.edges.iter().enumerate() {
                let end = |x: Option<(usize, usize)>| x.map(|(a, p)| (a as u32, p as u32));
                t.push(Event::EdgeCreated { edge: i as u32, from: end(from), to: end(to), capacity: capacity as u32 });
            }
        }

        // Sweep order: topological over the edges, so a pass flows through a lane in one sweep.
        let order = topo_order(self.actors.len(), &self.edges);
        let mut per_lane: Vec<Vec<Actor<M>>> = (0..self.lanes.len()).map(|_| Vec::new()).collect();
        let mut slots: Vec<Option<ActorSlot<M>>> = self.actors.into_iter().map(Some).collect();
        for i in order {
            if let Some(s) = slots[i].take() {
                per_lane[s.lane.0].push(s.actor);
            }
        }

        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            fault: Mutex::new(None),
            wakers: self.wakers.clone(),
            trace: sink,
            gate: (Mutex::new(false), std::sync::Condvar::new()),
        });
        let mut threads = Vec::new();
        for (i, (spec, actors)) in self.lanes.into_iter().zip(per_lane).enumerate() {
            tracing::info!("lane `{}` ({}): {} actors", spec.name, spec.describe(), actors.len());
            let sh = shared.clone();
            let name = spec.name.clone();
            let gpu = gpu_lanes[i].take();
            let serial = self.serial.contains(&i);
            let h = std::thread::Builder::new()
                .name(format!("lane-{name}"))
                .spawn(move || lane_main(i, spec, gpu, serial, actors, sh))
                .map_err(|e| Error::Spawn { lane: name.clone(), reason: e.to_string() });
            match h {
                Ok(h) => {
                    self.wakers[i].set(h.thread().clone());
                    threads.push(h);
                }
                Err(e) => {
                    shared.stop_all();
                    shared.open_gate();
                    for h in threads {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        // Every lane's waker is set before any lane runs, so no wake-up is lost.
        shared.open_gate();
        Ok(Program { shared, threads, gpu_pools })
    }
}

fn topo_order(n: usize, edges: &[EdgeEnds]) -> Vec<usize> {
    let mut indeg = vec![0usize; n];
    let mut succ = vec![Vec::new(); n];
    for &(f, t, _) in edges {
        if let (Some((f, _)), Some((t, _))) = (f, t) {
            succ[f].push(t);
            indeg[t] += 1;
        }
    }
    let mut queue: std::collections::VecDeque<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    while let Some(i) = queue.pop_front() {
        order.push(i);
        seen[i] = true;
        for &s in &succ[i] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                queue.push_back(s);
            }
        }
    }
    // Actors on a cycle keep their insertion order after the rest.
    order.extend((0..n).filter(|&i| !seen[i]));
    order
}

struct Shared {
    stop: AtomicBool,
    fault: Mutex<Option<Error>>,
    wakers: Vec<Arc<Waker>>,
    trace: Option<Arc<TraceSink>>,
    gate: (Mutex<bool>, std::sync::Condvar),
}

impl Shared {
    fn open_gate(&self) {
        *self.gate.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.gate.1.notify_all();
    }
    fn wait_gate(&self) {
        let mut open = self.gate.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.gate.1.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
    fn stop_all(&self) {
        self.stop.store(true, Ordering::Release);
        for w in &self.wakers {
            w.wake();
        }
    }
    fn fail(&self, e: Error) {
        {
            let mut f = self.fault.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                tracing::error!("{e}");
                *f = Some(e);
            }
        }
        self.stop_all();
    }
}

fn lane_main<M: Message>(
    index: usize,
    spec: LaneSpec,
    gpu: Option<crate::gpu::GpuLane>,
    serial: bool,
    mut actors: Vec<Actor<M>>,
    sh: Arc<Shared>,
) {
    sh.wait_gate();
    let pool = match &spec.kind {
        LaneKind::Cpu { cores } => {
            if let Err(e) = lane::pin_current(cores[0]) {
                tracing::warn!("lane `{}`: could not pin to core {}: {e}", spec.name, cores[0]);
            }
            weir_kernels::isa::flush_subnormals();
            match WorkerPool::new(&spec.name, &cores[1..]) {
                Ok(p) => Some(p),
                Err(e) => {
                    sh.fail(e);
                    return;
                }
            }
        }
        LaneKind::Io { core } | LaneKind::Nvme { core, .. } => {
            if let Some(c) = core {
                if let Err(e) = lane::pin_current(*c) {
                    tracing::warn!("lane `{}`: could not pin to core {c}: {e}", spec.name);
                }
            }
            None
        }
        LaneKind::GpuStream { .. } => {
            // Kernel launches bind the device's context themselves; cuBLAS and copies expect
            // it current on this thread.
            if let Some(g) = &gpu {
                if let Err(e) = g.stream().context().bind_to_thread() {
                    sh.fail(Error::DeviceUnavailable { device: spec.describe(), reason: e.to_string() });
                    return;
                }
            }
            None
        }
    };
    let par: &dyn Parallel = match &pool {
        Some(p) => p,
        None => &Serial,
    };
    let trace = sh.trace.clone();
    let waker = crate::pool::LaneWaker(sh.wakers[index].clone());
    // Background work (`Needs::Optional` with no message) runs only in a sweep that follows
    // one where nothing could fire.
    let mut background = false;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            break;
        }
        let mut progressed = false;
        for a in actors.iter_mut() {
            let t0 = trace.as_ref().map(|t| t.now_ns());
            match catch_unwind(AssertUnwindSafe(|| a.try_fire(par, gpu.as_ref(), &waker, background))) {
                Ok(Ok(Fired::No)) => {}
                Ok(Ok(Fired::Yes { bytes })) => {
                    progressed = true;
                    // A GPU operator only enqueues work. On a serial lane, and while tracing
                    // (so that a span shows device time), the lane waits for its stream — this
                    // stream alone — before it goes on.
                    if let (Some(g), true) = (&gpu, serial || trace.is_some()) {
                        if let Err(e) = g.stream().synchronize() {
                            sh.fail(Error::Actor {
                                actor: a.name.clone(),
                                lane: spec.name.clone(),
                                error: crate::OpError::new(format!("CUDA: {e}")),
                            });
                            return;
                        }
                    }
                    if let (Some(t), Some(t0)) = (&trace, t0) {
                        let t1 = t.now_ns();
                        t.push(Event::Span {
                            lane: index as u32,
                            actor: a.id,
                            kind: a.op.span_kind(),
                            start_ns: t0,
                            dur_ns: t1 - t0,
                            bytes,
                        });
                    }
                }
                Ok(Err(e)) => {
                    sh.fail(Error::Actor { actor: a.name.clone(), lane: spec.name.clone(), error: e });
                    return;
                }
                Err(p) => {
                    let message = crate::error::panic_message(p.as_ref());
                    sh.fail(Error::Panic { actor: a.name.clone(), lane: spec.name.clone(), message });
                    return;
                }
            }
            if sh.stop.load(Ordering::Acquire) {
                break;
            }
        }
        actors.retain(|a| !a.finished);
        if actors.is_empty() {
            break;
        }
        if progressed {
            background = false;
        } else if !background {
            background = true; // an idle sweep: background work may go next
        } else {
            background = false;
            std::thread::park();
        }
    }
}

/// A running program. Dropping it stops it.
pub struct Program {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    gpu_pools: Vec<crate::gpu::BlockPool<crate::gpu::DeviceBlock>>,
}

impl Program {
    /// Each GPU's memory pool (`gpu0`, …): budget, bytes held, high-water mark. Empty without
    /// GPU lanes.
    pub fn gpu_pools(&self) -> &[crate::gpu::BlockPool<crate::gpu::DeviceBlock>] {
        &self.gpu_pools
    }

    /// The first failure, if an actor failed.
    pub fn fault(&self) -> Option<Error> {
        self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The events recorded so far (empty unless tracing was on).
    pub fn trace(&self) -> Trace {
        match &self.shared.trace {
            Some(t) => Trace {
                events: t.events.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                start_unix_ns: t.start_unix_ns,
            },
            None => Trace::default(),
        }
    }

    /// Stops every lane, waits for the threads, and returns the fault if there was one.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop_and_join();
        match self.fault() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn stop_and_join(&mut self) {
        self.shared.stop_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::{Emit, FireCx, Inputs, Step};
    use crate::error::OpError;

    #[derive(Clone, Debug, PartialEq)]
    struct N(i64);
    impl Message for N {
        fn bytes(&self) -> usize {
            8
        }
    }

    struct AddWeight;
    impl Operator<N> for AddWeight {
        fn fire(&mut self, ins: &mut Inputs<N>, out: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            let w = ins.get(1).0;
            let x = ins.take(0).0;
            if x < 0 {
                return Err(OpError::new(format!("negative input {x}")));
            }
            out.send(0, N(x + w));
            Ok(Step::Continue)
        }
    }

    struct Source(Vec<i64>);
    impl Operator<N> for Source {
        fn fire(&mut self, _: &mut Inputs<N>, out: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            out.send(0, N(self.0.remove(0)));
            Ok(if self.0.is_empty() { Step::Finished } else { Step::Continue })
        }
    }

    struct Panics;
    impl Operator<N> for Panics {
        fn fire(&mut self, _: &mut Inputs<N>, _: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            panic!("boom");
        }
    }

    fn cpu0() -> usize {
        lane::allowed_cpus()[0]
    }

    /// source(weight, sent once) ──sticky──▶ add ──▶ add2 (on a second lane) ──▶ out
    fn two_lane_program(trace: bool) -> (Program, ExternalTx<N>, ExternalRx<N>) {
        let mut b = ProgramBuilder::<N>::new();
        b.trace(trace);
        let l0 = b.lane(LaneSpec::cpu("a", vec![cpu0()]));
        let l1 = b.lane(LaneSpec::io("b", None));
        let w = b.actor("w", l1, None, Box::new(Source(vec![10])), 0, 1);
        let w2 = b.actor("w2", l1, None, Box::new(Source(vec![100])), 0, 1);
        let add = b.actor("add", l0, Some(0), Box::new(AddWeight), 2, 1);
        let add2 = b.actor("add2", l1, Some(1), Box::new(AddWeight), 2, 1);
        b.sticky(add, 1);
        b.sticky(add2, 1);
        b.connect((w, 0), (add, 1), 1);
        b.connect((w2, 0), (add2, 1), 1);
        b.connect((add, 0), (add2, 0), 1);
        let tx = b.input(add, 0, 1);
        let rx = b.output(add2, 0, 1);
        (b.build().unwrap(), tx, rx)
    }

    #[test]
    fn messages_flow_across_lanes_with_sticky_weights() {
        let (p, tx, rx) = two_lane_program(true);
        let feeder = std::thread::spawn(move || {
            for i in 0..100 {
                tx.send(N(i)).unwrap();
            }
        });
        for i in 0..100 {
            assert_eq!(rx.recv(), Some(N(i + 110)));
        }
        feeder.join().unwrap();
        let trace = p.trace();
        assert!(trace.spans() >= 200);
        let json = trace.to_chrome_json();
        assert!(json.contains("\"add2\"") && json.contains("thread_name"));
        p.shutdown().unwrap();
    }

    /// Emits one message once `pool` has room for `bytes`; counts how often it was asked.
    struct NeedsMemory {
        pool: crate::pool::Pool,
        bytes: usize,
        asked: Arc<std::sync::atomic::AtomicUsize>,
    }
    impl Operator<N> for NeedsMemory {
        fn ready(&mut self, cx: &crate::actor::ReadyCx) -> bool {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.pool.has_room(self.bytes) {
                return true;
            }
            self.pool.notify_on_release(cx.lane);
            self.pool.has_room(self.bytes)
        }
        fn fire(&mut self, _: &mut Inputs<N>, out: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            out.send(0, N(self.pool.try_alloc(self.bytes).map_or(-1, |b| b.len() as i64)));
            Ok(Step::Finished)
        }
    }

    #[test]
    fn an_actor_waiting_for_memory_sleeps_until_bytes_are_released() {
        let pool = crate::pool::Pool::transient("p", 1000, None);
        let held = pool.try_alloc(800).unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::io("io", None));
        let op = NeedsMemory { pool: pool.clone(), bytes: 500, asked: asked.clone() };
        let a = b.actor("a", l, None, Box::new(op), 0, 1);
        let rx = b.output(a, 0, 1);
        let p = b.build().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        // A lane polling a full pool would have asked millions of times by now.
        let while_full = asked.load(std::sync::atomic::Ordering::Relaxed);
        assert!(while_full < 20, "asked {while_full} times while the pool was full");
        drop(held);
        assert_eq!(rx.recv(), Some(N(500)), "woken by the release");
        p.shutdown().unwrap();
    }

    /// Takes whichever requests came (`Needs::Any`); request `v` becomes `v` pieces of `v`,
    /// put before any pieces still due, sent one per firing while taking no input
    /// (`Needs::Nothing`).
    struct Pieces(Vec<i64>);
    impl Operator<N> for Pieces {
        fn needs(&self) -> crate::actor::Needs {
            if self.0.is_empty() {
                crate::actor::Needs::Any
            } else {
                crate::actor::Needs::Nothing
            }
        }
        fn next_outputs(&self) -> Option<std::ops::Range<usize>> {
            Some(0..1)
        }
        fn fire(&mut self, ins: &mut Inputs<N>, out: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            let new: Vec<i64> =
                (0..ins.len()).filter_map(|i| ins.try_get(i)).flat_map(|n| vec![n.0; n.0 as usize]).collect();
            self.0.splice(0..0, new);
            if !self.0.is_empty() {
                out.send(0, N(self.0.remove(0)));
            }
            Ok(Step::Continue)
        }
    }

    #[test]
    fn an_actor_may_fire_on_any_input_and_finish_work_taking_none() {
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::cpu("a", vec![cpu0()]));
        let a = b.actor("pieces", l, None, Box::new(Pieces(Vec::new())), 2, 1);
        let (tx0, tx1) = (b.input(a, 0, 2), b.input(a, 1, 1));
        let rx = b.output(a, 0, 8);
        // Both ports have a request when it first fires; port 0 has a second one queued.
        tx0.send(N(2)).unwrap();
        tx0.send(N(1)).unwrap();
        tx1.send(N(3)).unwrap();
        let p = b.build().unwrap();
        // The first firing takes 2 and 3; the 1 waits until their pieces are out (taken earlier,
        // its piece would come first, since new pieces go in front).
        let got: Vec<i64> = (0..6).map(|_| rx.recv().unwrap().0).collect();
        assert_eq!(got, vec![2, 2, 3, 3, 3, 1]);
        // A request on one port alone is enough.
        tx1.send(N(1)).unwrap();
        assert_eq!(rx.recv(), Some(N(1)));
        p.shutdown().unwrap();
    }

    /// Background work, one piece per firing, while it has some (`Needs::Optional`); a
    /// message that has come is taken first (sent on as 100 + v).
    struct Background(i64);
    impl Operator<N> for Background {
        fn needs(&self) -> crate::actor::Needs {
            if self.0 > 0 {
                crate::actor::Needs::Optional
            } else {
                crate::actor::Needs::Any
            }
        }
        fn fire(&mut self, ins: &mut Inputs<N>, out: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            match ins.try_get(0) {
                Some(n) => out.send(0, N(100 + n.0)),
                None => {
                    self.0 -= 1;
                    out.send(0, N(self.0));
                }
            }
            Ok(Step::Continue)
        }
    }

    #[test]
    fn an_actor_may_work_with_no_input_and_takes_a_message_first() {
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::cpu("a", vec![cpu0()]));
        let a = b.actor("background", l, None, Box::new(Background(3)), 1, 1);
        let tx = b.input(a, 0, 1);
        let rx = b.output(a, 0, 8);
        tx.send(N(7)).unwrap();
        let p = b.build().unwrap();
        let got: Vec<i64> = (0..4).map(|_| rx.recv().unwrap().0).collect();
        assert_eq!(got, vec![107, 2, 1, 0]);
        // Out of background work it waits for a message and fires on nothing else.
        tx.send(N(1)).unwrap();
        assert_eq!(rx.recv(), Some(N(101)));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(rx.inner.recv_now(), None, "fired with neither work nor input");
        p.shutdown().unwrap();
    }

    /// Passes each message on, recording its value in `log` as it fires.
    struct Logged(Arc<std::sync::Mutex<Vec<i64>>>, i64);
    impl Operator<N> for Logged {
        fn fire(&mut self, ins: &mut Inputs<N>, out: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            let n = ins.take(0).0;
            self.0.lock().unwrap().push(self.1 + n);
            out.send(0, N(n));
            Ok(Step::Continue)
        }
    }

    /// [`Background`] that records each piece of background work in `log` (as -1).
    struct LoggedBackground(Arc<std::sync::Mutex<Vec<i64>>>, i64);
    impl Operator<N> for LoggedBackground {
        fn needs(&self) -> crate::actor::Needs {
            if self.1 > 0 {
                crate::actor::Needs::Optional
            } else {
                crate::actor::Needs::Any
            }
        }
        fn fire(&mut self, ins: &mut Inputs<N>, out: &mut Emit<N>, _: &FireCx) -> Result<Step, OpError> {
            if ins.try_get(0).is_none() {
                self.1 -= 1;
                self.0.lock().unwrap().push(-1);
                out.send(0, N(-1));
            }
            Ok(Step::Continue)
        }
    }

    #[test]
    fn background_work_yields_to_actors_with_messages_on_its_lane() {
        // One lane: `fg` forwards messages (work somebody waits for), `bg` has background work.
        // While `fg` has messages, `bg` does none; it works only when the lane would idle.
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::io("shared", None));
        let fg = b.actor("fg", l, None, Box::new(Logged(log.clone(), 0)), 1, 1);
        let bg = b.actor("bg", l, None, Box::new(LoggedBackground(log.clone(), 3)), 1, 1);
        let tx = b.input(fg, 0, 8);
        let _bg_in = b.input(bg, 0, 1);
        let rx = b.output(fg, 0, 8);
        let bg_out = b.output(bg, 0, 8);
        for i in 1..=5 {
            tx.send(N(i)).unwrap();
        }
        let p = b.build().unwrap();
        let got: Vec<i64> = (0..5).map(|_| rx.recv().unwrap().0).collect();
        let bg_got: Vec<i64> = (0..3).map(|_| bg_out.recv().unwrap().0).collect();
        assert_eq!((got, bg_got), ((1..=5).collect(), vec![-1; 3]));
        // Every forwarded message before any background work: the queue was full from the start.
        assert_eq!(*log.lock().unwrap(), vec![1, 2, 3, 4, 5, -1, -1, -1]);
        p.shutdown().unwrap();
    }

    #[test]
    fn a_kept_port_serves_each_message_to_that_many_firings() {
        // Weights 100, 200, … each used by 3 inputs in turn: 0+100, 1+100, 2+100, 3+200, …
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::cpu("a", vec![cpu0()]));
        let w = b.actor("w", l, None, Box::new(Source((1..=4).map(|i| i * 100).collect())), 0, 1);
        let add = b.actor("add", l, None, Box::new(AddWeight), 2, 1);
        b.connect((w, 0), (add, 1), 1);
        b.keep(add, 1, 3);
        let tx = b.input(add, 0, 1);
        let rx = b.output(add, 0, 1);
        let p = b.build().unwrap();
        let h = std::thread::spawn(move || {
            for i in 0..12 {
                tx.send(N(i)).unwrap();
            }
        });
        for i in 0..12 {
            assert_eq!(rx.recv(), Some(N(i + 100 * (i / 3 + 1))));
        }
        h.join().unwrap();
        p.shutdown().unwrap();
    }

    #[test]
    fn a_failing_actor_stops_everything_and_reports_itself() {
        let (p, tx, rx) = two_lane_program(false);
        tx.send(N(1)).unwrap();
        assert_eq!(rx.recv(), Some(N(111)));
        tx.send(N(-5)).unwrap();
        // The output closes instead of hanging, and further input is refused.
        assert_eq!(rx.recv(), None);
        let mut refused = false;
        for _ in 0..10 {
            if tx.send(N(1)).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
        match p.shutdown() {
            Err(Error::Actor { actor, lane, error }) => {
                assert_eq!((actor.as_str(), lane.as_str()), ("add", "a"));
                assert!(error.0.contains("negative input -5"));
            }
            other => panic!("expected an actor error, got {other:?}"),
        }
    }

    #[test]
    fn a_panicking_actor_is_a_fault_not_a_crash() {
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::cpu("a", vec![cpu0()]));
        let a = b.actor("bad", l, None, Box::new(Panics), 1, 1);
        let tx = b.input(a, 0, 1);
        let rx = b.output(a, 0, 1);
        let p = b.build().unwrap();
        tx.send(N(1)).unwrap();
        assert_eq!(rx.recv(), None);
        assert!(matches!(p.shutdown(), Err(Error::Panic { .. })));
    }

    #[test]
    fn builder_reports_every_wiring_problem_at_once() {
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::cpu("a", vec![cpu0()]));
        let a = b.actor("lonely", l, None, Box::new(AddWeight), 2, 1);
        let c = b.actor("other", l, None, Box::new(AddWeight), 2, 1);
        b.connect((a, 0), (c, 0), 0);
        b.connect((a, 3), (c, 1), 1);
        let err = b.build().err().expect("must fail").to_string();
        for want in [
            "capacity 0",
            "no output port 3",
            "input port 0 of actor `lonely` is not connected",
            "output port 0 of actor `other`",
        ] {
            assert!(err.contains(want), "missing `{want}` in: {err}");
        }
    }

    #[test]
    fn backpressure_bounds_what_a_producer_sends_ahead() {
        // A source of 1000 messages into an edge of capacity 3 that nobody reads: the source
        // must stop after filling the edge.
        let mut b = ProgramBuilder::<N>::new();
        let l = b.lane(LaneSpec::io("src", None));
        let s = b.actor("s", l, None, Box::new(Source((0..1000).collect())), 0, 1);
        let rx = b.output(s, 0, 3);
        let p = b.build().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(rx.inner.rx.len(), 3);
        for i in 0..1000 {
            assert_eq!(rx.recv(), Some(N(i)));
        }
        p.shutdown().unwrap();
    }
}
