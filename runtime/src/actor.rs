//! The operator contract, and the actor that wraps an operator with its ports.
//!
//! An actor fires when every input port holds a message and every output edge has room. A
//! *sticky* input port (resident weights) keeps its latest message across firings: a loader
//! sends a resident weight once; a streamed weight arrives on a plain port once per pass.

use crate::channel::{EdgeRx, EdgeTx};
use crate::error::OpError;
use crate::trace::SpanKind;
use weir_kernels::Parallel;

/// Whether an operator wants to fire again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Fire again when ready.
    Continue,
    /// Done for good (a loader that sent everything); the actor is retired.
    Finished,
}

/// The messages an operator receives in one firing, one per input port.
pub struct Inputs<'a, M> {
    pub(crate) slots: &'a mut [Option<M>],
    pub(crate) sticky: &'a [bool],
}

impl<'a, M: Clone> Inputs<'a, M> {
    /// Inputs over these slots (for driving an operator directly, as operator tests do).
    pub fn new(slots: &'a mut [Option<M>], sticky: &'a [bool]) -> Self {
        assert_eq!(slots.len(), sticky.len());
        Inputs { slots, sticky }
    }
    /// Number of ports.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// Whether there are no input ports.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// The message on port `i`.
    pub fn get(&self, i: usize) -> &M {
        self.slots[i].as_ref().expect("an actor fires only with every input present")
    }
    /// The message on port `i`, if one came (an operator whose [`Operator::needs`] is not
    /// [`Needs::All`] may fire with some ports empty); `None` too if there is no port `i`.
    pub fn try_get(&self, i: usize) -> Option<&M> {
        self.slots.get(i).and_then(Option::as_ref)
    }
    /// Takes the message on port `i` (a sticky port keeps its copy).
    pub fn take(&mut self, i: usize) -> M {
        if self.sticky[i] {
            self.get(i).clone()
        } else {
            self.slots[i].take().expect("an actor fires only with every input present")
        }
    }
}

/// Where an operator puts its results: at most one message per output port per firing.
pub struct Emit<M> {
    pub(crate) staged: Vec<Option<M>>,
    pub(crate) overfull: Option<usize>,
}

impl<M> Emit<M> {
    /// An empty set of `ports` outputs (for driving an operator directly).
    pub fn new(ports: usize) -> Self {
        Emit { staged: (0..ports).map(|_| None).collect(), overfull: None }
    }
    /// What was emitted, per port.
    pub fn into_staged(self) -> Vec<Option<M>> {
        self.staged
    }
    /// Emits `m` on output port `port`.
    pub fn send(&mut self, port: usize, m: M) {
        if self.staged[port].is_some() {
            self.overfull = Some(port);
        }
        self.staged[port] = Some(m);
    }
}

/// What an operator may use while it fires.
pub struct FireCx<'a> {
    /// The cores of this lane, for kernels.
    pub par: &'a dyn Parallel,
    /// This actor's name (for error messages).
    pub actor: &'a str,
    /// The program's activation pool: outputs and scratch come from it.
    pub activations: &'a crate::pool::Pool,
    /// On a GPU lane: its stream, kernels and device memory.
    pub gpu: Option<&'a crate::gpu::GpuLane>,
}

impl FireCx<'_> {
    /// The GPU lane this actor runs on; an error naming the actor on any other lane.
    pub fn gpu(&self) -> Result<&crate::gpu::GpuLane, OpError> {
        self.gpu.ok_or_else(|| {
            OpError::new(format!("`{}` computes on a GPU but was placed on a CPU or I/O lane", self.actor))
        })
    }

    /// A zeroed f32 tensor from the activation pool; an error when the pool's budget has no
    /// room (the planner reserves enough for the passes the scheduler lets in flight, so this
    /// means a graph the reserve does not cover).
    pub fn zeros_f32(&self, shape: Vec<usize>) -> Result<crate::Tensor, OpError> {
        let bytes = shape.iter().product::<usize>() * 4;
        let p = self.activations;
        match p.try_alloc(bytes) {
            Some(buf) => Ok(crate::Tensor::from_buffer(crate::DType::F32, shape, buf)),
            None => Err(OpError::new(format!(
                "the `{}` pool has no room for a {bytes}-byte activation {shape:?}: {} of its {} bytes are in use",
                p.name(),
                p.in_use(),
                p.budget()
            ))),
        }
    }
}

/// Which inputs an operator's next firing needs (sticky ports always need their message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// A message on every input: the dataflow rule.
    All,
    /// A message on at least one input; it takes whichever came (a store serving requests from
    /// several producers, in the order they arrive).
    Any,
    /// No input now: the firing finishes work already taken (sending what a request asked for,
    /// one piece per firing) and leaves new messages waiting.
    Nothing,
    /// Whatever has come, even nothing: the firing does background work (a prefetch) when no
    /// message is there and takes a message first when one is. Background work yields to its
    /// lane: a firing with no message runs only in a sweep where no other actor of the lane
    /// could fire (so reading ahead never delays a read somebody is waiting for on that lane).
    Optional,
}

/// What an operator may use to say whether it can fire.
pub struct ReadyCx<'a> {
    /// Wakes this actor's lane: hand it to a resource (a pool) that frees up later.
    pub lane: &'a crate::pool::LaneWaker,
}

/// An operator as the runtime sees it: opaque, fired with its inputs.
pub trait Operator<M>: Send {
    /// Computes one firing.
    fn fire(&mut self, ins: &mut Inputs<M>, out: &mut Emit<M>, cx: &FireCx) -> Result<Step, OpError>;
    /// How this operator's spans are drawn in a trace.
    fn span_kind(&self) -> SpanKind {
        SpanKind::Compute
    }
    /// The operator's kind, for traces (`linear`, `attention`, …).
    fn kind(&self) -> &str {
        "op"
    }
    /// If the next firing will emit on some output ports only, those ports: the actor then
    /// waits for room on their edges alone (a loader sending one tensor per firing). An empty
    /// range: the firing emits nothing.
    fn next_outputs(&self) -> Option<std::ops::Range<usize>> {
        None
    }
    /// Which inputs the next firing needs (see [`Needs`]); by default every one.
    fn needs(&self) -> Needs {
        Needs::All
    }
    /// Whatever else the next firing needs beyond inputs and room on outputs — memory from a
    /// pool, say. An operator that returns `false` must arrange for `cx.lane` to be woken
    /// when that changes.
    fn ready(&mut self, _cx: &ReadyCx) -> bool {
        true
    }
}

pub(crate) struct InPort<M> {
    pub(crate) rx: Option<EdgeRx<M>>,
    /// The port keeps its message across firings: for ever (`uses == u32::MAX`, resident
    /// weights), or for `uses` firings (a streamed weight shared by micro-batches).
    pub(crate) sticky: bool,
    pub(crate) uses: u32,
    pub(crate) left: u32,
}

pub(crate) struct Actor<M> {
    pub(crate) id: u32,
    pub(crate) name: String,
    pub(crate) op: Box<dyn Operator<M>>,
    pub(crate) inputs: Vec<InPort<M>>,
    pub(crate) outputs: Vec<Vec<EdgeTx<M>>>,
    pub(crate) slots: Vec<Option<M>>,
    pub(crate) sticky: Vec<bool>,
    pub(crate) finished: bool,
    pub(crate) activations: crate::pool::Pool,
}

/// The result of trying to fire an actor.
pub(crate) enum Fired {
    No,
    Yes { bytes: u64 },
}

impl<M: crate::Message> Actor<M> {
    /// Whether the actor can fire now; a firing that would be background work (see
    /// [`Needs::Optional`]) only when `background` allows it.
    fn ready(&mut self, lane: &crate::pool::LaneWaker, background: bool) -> bool {
        let needs = self.op.needs();
        let mut any = false;
        for (port, slot) in self.inputs.iter().zip(&self.slots) {
            let Some(rx) = &port.rx else { return false };
            let has = rx.has_message();
            if port.sticky {
                if slot.is_none() && !has {
                    return false;
                }
            } else if !has && needs == Needs::All {
                return false;
            } else {
                any |= has;
            }
        }
        let has_plain = self.inputs.iter().any(|p| !p.sticky);
        if needs == Needs::Any && has_plain && !any {
            return false;
        }
        if needs == Needs::Optional && !any && !background {
            return false;
        }
        let room = match self.op.next_outputs() {
            Some(ports) => self.outputs.get(ports).is_none_or(|p| p.iter().flatten().all(|tx| tx.has_room())),
            None => self.outputs.iter().flatten().all(|tx| tx.has_room()),
        };
        room && self.op.ready(&ReadyCx { lane })
    }

    /// Fires once if ready; background work (see [`Needs::Optional`]) only if `background`.
    pub(crate) fn try_fire(
        &mut self,
        par: &dyn Parallel,
        gpu: Option<&crate::gpu::GpuLane>,
        lane: &crate::pool::LaneWaker,
        background: bool,
    ) -> Result<Fired, OpError> {
        if self.finished || !self.ready(lane, background) {
            return Ok(Fired::No);
        }
        let needs = self.op.needs();
        for (port, slot) in self.inputs.iter_mut().zip(self.slots.iter_mut()) {
            let rx = port.rx.as_ref().expect("checked in ready");
            if port.sticky && port.uses == u32::MAX {
                while let Some(m) = rx.recv_now() {
                    *slot = Some(m);
                }
            } else if port.sticky {
                if slot.is_none() {
                    *slot = rx.recv_now();
                    port.left = port.uses;
                }
            } else if needs != Needs::Nothing {
                // Under `Any` or `Optional` a port may be empty: its slot stays empty.
                *slot = rx.recv_now();
            }
        }
        let hint = self.op.next_outputs();
        let mut bytes: u64 = self.slots.iter().flatten().map(|m| m.bytes() as u64).sum();
        let mut emit = Emit { staged: (0..self.outputs.len()).map(|_| None).collect(), overfull: None };
        let step = {
            let mut ins = Inputs { slots: &mut self.slots, sticky: &self.sticky };
            let cx = FireCx { par, actor: &self.name, activations: &self.activations, gpu };
            self.op.fire(&mut ins, &mut emit, &cx)?
        };
        if let Some(port) = emit.overfull {
            return Err(OpError::new(format!("emitted twice on output port {port} in one firing")));
        }
        if let Some(hint) = hint {
            if let Some((port, _)) = emit.staged.iter().enumerate().find(|(p, m)| m.is_some() && !hint.contains(p)) {
                return Err(OpError::new(format!("announced output ports {hint:?} but emitted on port {port}")));
            }
        }
        if self.inputs.is_empty() {
            bytes = emit.staged.iter().flatten().map(|m| m.bytes() as u64).sum();
        }
        for (port, m) in emit.staged.into_iter().enumerate() {
            let Some(m) = m else { continue };
            let edges = &self.outputs[port];
            let mut m = Some(m);
            for (i, tx) in edges.iter().enumerate() {
                let msg = if i + 1 == edges.len() { m.take() } else { m.clone() };
                let Some(msg) = msg else { break };
                if tx.send_now(msg).is_err() {
                    return Err(OpError::new(format!(
                        "output port {port} was full although it had room before firing"
                    )));
                }
            }
        }
        for ((slot, sticky), port) in self.slots.iter_mut().zip(&self.sticky).zip(self.inputs.iter_mut()) {
            if !sticky {
                *slot = None;
            } else if port.uses != u32::MAX {
                port.left = port.left.saturating_sub(1);
                if port.left == 0 {
                    *slot = None;
                }
            }
        }
        if step == Step::Finished {
            self.finished = true;
        }
        Ok(Fired::Yes { bytes })
    }
}
