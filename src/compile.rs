//! Compiles a placed graph into a running program: every node becomes an actor on its lane,
//! every edge a bounded channel.
//!
//! A node on a GPU lane becomes its operator's GPU version. Where an edge joins host memory
//! and a GPU's memory, a transfer actor goes in between (`to_gpu` / `to_host`), on the
//! device's copy lane for that direction — a stream of its own, so copies overlap compute —
//! one per output and destination, shared by every edge from that output there. The
//! transfer's edges keep the original edge's capacity; a resident weight's port stays sticky.

use crate::error::{Error, Result};
use std::collections::HashMap;
use weir_graphs::Graph;
use weir_operators::Packet;
use weir_runtime::{ExternalRx, ExternalTx, LaneId, LaneKind, LaneSpec, Program, ProgramBuilder};

/// A started program with its entry (token ids in) and exit (sampled tokens out).
pub struct Compiled {
    pub program: Program,
    pub entry: ExternalTx<Packet>,
    pub exit: ExternalRx<Packet>,
}

/// Starts `g` on its lanes.
/// `in_flight`: passes the driver sends before it reads a result (the exit edge holds them).
/// `gpu_memory`: the budget of each GPU's memory pool (`--gpu-memory`; default the device's
/// memory less 1 GiB).
pub fn compile(
    g: &Graph,
    trace: bool,
    env: &weir_operators::OpEnv,
    in_flight: usize,
    gpu_memory: Option<usize>,
) -> Result<Compiled> {
    let mut b = ProgramBuilder::<Packet>::new();
    b.trace(trace);
    b.activations(env.activations.clone());
    if let Some(bytes) = gpu_memory {
        b.gpu_memory(bytes);
    }
    let lanes: Vec<LaneId> = g.lanes.iter().map(|l| b.lane(l.clone())).collect();
    let mut actors = Vec::with_capacity(g.nodes.len());
    for (i, n) in g.nodes.iter().enumerate() {
        // A loader on a GPU lane (`--prefetch 0`) reads there, in turn with the lane's work,
        // which then waits for its stream after every firing: nothing overlaps.
        if gpu_of(g, n.lane).is_some() && node_gpu(g, i).is_none() {
            b.serial(lanes[n.lane]);
        }
        let op = match node_gpu(g, i) {
            Some(_) => {
                n.op.instantiate_gpu(env, n.layer).map_err(|e| Error::Placement(format!("node `{}`: {e}", n.name)))?
            }
            None => n.op.instantiate(env, n.layer),
        };
        actors.push(b.actor(&n.name, lanes[n.lane], n.layer, op, n.op.inputs().len(), n.op.outputs().len()));
    }
    let crossings = transfers(g)?;
    // Each edge's source: its node's output port, or the transfer it goes through.
    let mut source: HashMap<usize, (weir_runtime::ActorId, usize)> = HashMap::new();
    let mut copy_lanes: HashMap<(usize, bool), LaneId> = HashMap::new();
    for c in &crossings {
        let from = &g.nodes[c.from.node];
        let lane = match c.lane {
            Some(l) => lanes[l],
            None => *copy_lanes.entry((c.device, c.up)).or_insert_with(|| {
                let (name, stream) = if c.up { ("h2d", 1) } else { ("d2h", 2) };
                b.lane(LaneSpec {
                    name: format!("gpu{}.{name}", c.device),
                    kind: LaneKind::GpuStream { device: c.device, stream },
                })
            }),
        };
        let op: Box<dyn weir_runtime::Operator<Packet>> = if c.up {
            // A streamed weight: its host buffer bounds its GPU copies (see `ToGpu`).
            let streamed =
                matches!(from.op, weir_operators::OpConfig::Load { .. }) && c.edges.iter().any(|&e| !g.edges[e].sticky);
            Box::new(weir_operators::to_gpu::ToGpu { keep_host: streamed })
        } else {
            Box::new(weir_operators::to_host::ToHost)
        };
        let x = b.actor(&c.name(g), lane, from.layer, op, 1, 1);
        // The edge into the transfer: the first crossing edge's capacity.
        b.connect((actors[c.from.node], c.from.port), (x, 0), g.edges[c.edges[0]].capacity);
        for &e in &c.edges {
            source.insert(e, (x, 0));
        }
    }
    for (i, e) in g.edges.iter().enumerate() {
        let from = source.get(&i).copied().unwrap_or((actors[e.from.node], e.from.port));
        b.connect(from, (actors[e.to.node], e.to.port), e.capacity);
        if e.sticky {
            b.sticky(actors[e.to.node], e.to.port);
        } else if e.uses > 1 {
            b.keep(actors[e.to.node], e.to.port, e.uses);
        }
    }
    let entry = b.input(actors[g.entry.node], g.entry.port, 1);
    let exit = b.output(actors[g.exit.node], g.exit.port, in_flight.max(1));
    let program = b.build()?;
    Ok(Compiled { program, entry, exit })
}

/// Whose memory lane `lane`'s operators read and write: GPU `d`'s (`Some(d)`) or the host's.
pub fn gpu_of(g: &Graph, lane: usize) -> Option<usize> {
    match g.lanes[lane].kind {
        LaneKind::GpuStream { device, .. } => Some(device),
        _ => None,
    }
}

/// Whose memory node `node`'s outputs are in: its lane's GPU, except for loaders, which read
/// into host memory wherever they run.
pub fn node_gpu(g: &Graph, node: usize) -> Option<usize> {
    let n = &g.nodes[node];
    if matches!(n.op, weir_operators::OpConfig::Load { .. }) {
        None
    } else {
        gpu_of(g, n.lane)
    }
}

/// Where data crosses between host memory and a GPU's: one transfer actor, on the device's
/// copy lane for that direction, for one output port and destination memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// The output port whose data crosses.
    pub from: weir_graphs::graph::Port,
    /// The GPU on the other side.
    pub device: usize,
    /// Host to GPU (`to_gpu`), or back (`to_host`).
    pub up: bool,
    /// The edges (indices into `Graph::edges`) that take the data from the transfer.
    pub edges: Vec<usize>,
    /// The lane the transfer runs on when not the device's copy lane: a loader's own GPU lane
    /// (`--prefetch 0`: reading, uploading and computing in turn).
    pub lane: Option<usize>,
}

impl Crossing {
    /// The transfer actor's name: `<node>.to_gpu`, `<node>.p<port>.to_host`, …
    pub fn name(&self, g: &Graph) -> String {
        let port = if self.from.port == 0 { String::new() } else { format!("p{}.", self.from.port) };
        format!("{}.{port}{}", g.nodes[self.from.node].name, if self.up { "to_gpu" } else { "to_host" })
    }
}

/// Every crossing of `g`: edges whose ends are on lanes with different memories (a GPU lane's
/// device, or the host for CPU and I/O lanes), grouped by output port and destination. An
/// edge between two GPUs is refused.
pub fn transfers(g: &Graph) -> Result<Vec<Crossing>> {
    let memory = |node: usize| node_gpu(g, node);
    let mut out: Vec<Crossing> = Vec::new();
    for (i, e) in g.edges.iter().enumerate() {
        let (src, dst) = (memory(e.from.node), memory(e.to.node));
        if src == dst {
            continue;
        }
        let (device, up) = match (src, dst) {
            (None, Some(d)) => (d, true),
            (Some(d), None) => (d, false),
            _ => {
                return Err(Error::Placement(format!(
                    "edge {} -> {} joins two GPUs; weir moves data between the host and one GPU only",
                    g.nodes[e.from.node].name, g.nodes[e.to.node].name
                )))
            }
        };
        match out.iter_mut().find(|c| c.from == e.from && c.device == device && c.up == up) {
            Some(c) => c.edges.push(i),
            None => {
                let from_lane = g.nodes[e.from.node].lane;
                let lane = (up && gpu_of(g, from_lane) == Some(device)).then_some(from_lane);
                out.push(Crossing { from: e.from, device, up, edges: vec![i], lane })
            }
        }
    }
    Ok(out)
}
