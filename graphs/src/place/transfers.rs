//! Pass: insert transfers. Wherever an edge joins host memory and a GPU's, a `to_gpu` or
//! `to_host` node goes in between, on the device's copy lane for that direction (`gpu0/h2d`,
//! stream 1; `gpu0/d2h`, stream 2) — a stream of its own, so copies overlap compute — one per
//! output port and destination memory, shared by every edge from that output there. An upload
//! from a loader on the device's own GPU lane (`--prefetch 0`) runs on that lane: reading,
//! uploading and computing in turn. The transfer's edges keep the original edge's capacity,
//! stickiness and uses; a streamed weight's upload keeps its host buffer (see `to_gpu`).
//!
//! It first checks what runs on GPU lanes can: every node there has a GPU version, or keeps
//! its data in host memory (a loader); no edge joins two GPUs. A graph that already has its
//! transfers (a printed one) gets none added.

use crate::error::{Error, Result};
use crate::graph::{Edge, Graph, Memory, Node, Port};
use weir_operators::{to_gpu, to_host, OpConfig};
use weir_runtime::{LaneKind, LaneSpec};

/// One transfer to insert: the output port whose data crosses, the GPU on the other side, the
/// direction, and the edges (indices into `Graph::edges`) that take the data from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub from: Port,
    pub device: usize,
    /// Host to GPU (`to_gpu`), or back (`to_host`).
    pub up: bool,
    pub edges: Vec<usize>,
}

/// Runs the pass.
pub fn insert(g: &mut Graph) -> Result<Vec<Crossing>> {
    check_kinds(g)?;
    let crossings = crossings(g)?;
    for c in &crossings {
        let node = transfer_node(g, c);
        let x = g.nodes.len();
        g.nodes.push(node);
        let capacity = g.edges[c.edges[0]].capacity;
        for &e in &c.edges {
            g.edges[e].from = Port { node: x, port: 0 };
        }
        g.edges.push(Edge::new(c.from, Port { node: x, port: 0 }, capacity));
    }
    Ok(crossings)
}

/// Every node on a GPU lane has a GPU version (or keeps its data in host memory); transfers
/// run on GPU lanes.
pub fn check_kinds(g: &Graph) -> Result<()> {
    let mut problems = Vec::new();
    for n in &g.nodes {
        let gpu_lane = g.lanes[n.lane].kind.is_gpu();
        if gpu_lane && !n.op.runs_on_gpu() {
            if let Err(e) = n.op.instantiate_gpu(&Default::default(), n.layer) {
                problems.push(format!("node `{}`: {e}", n.name));
            }
        }
        if !gpu_lane && matches!(n.op, OpConfig::ToGpu(_) | OpConfig::ToHost(_)) {
            let lane = &g.lanes[n.lane];
            problems.push(format!(
                "node `{}`: a {} runs on a gpu lane, not on {} lane `{}`",
                n.name,
                n.op.kind(),
                lane.describe(),
                lane.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Placement(problems.join("; ")))
    }
}

/// The crossings of `g`: edges whose source's output memory is not their destination's input
/// memory, grouped by output port and destination memory. An edge between two GPUs is refused.
pub fn crossings(g: &Graph) -> Result<Vec<Crossing>> {
    let mut out: Vec<Crossing> = Vec::new();
    for (i, e) in g.edges.iter().enumerate() {
        let (src, dst): (Memory, Memory) = (g.memory(e.from.node, true), g.memory(e.to.node, false));
        let (device, up) = match (src, dst) {
            (a, b) if a == b => continue,
            (None, Some(d)) => (d, true),
            (Some(d), None) => (d, false),
            _ => {
                let (a, b) = (&g.nodes[e.from.node].name, &g.nodes[e.to.node].name);
                return Err(Error::Placement(format!(
                    "edge {a} -> {b} joins two GPUs; weir moves data between the host and one GPU only"
                )));
            }
        };
        match out.iter_mut().find(|c| c.from == e.from && c.device == device && c.up == up) {
            Some(c) => c.edges.push(i),
            None => out.push(Crossing { from: e.from, device, up, edges: vec![i] }),
        }
    }
    Ok(out)
}

/// The transfer node for `c`, on its lane (made if the device's copy lane is missing).
fn transfer_node(g: &mut Graph, c: &Crossing) -> Node {
    let from = &g.nodes[c.from.node];
    let (layer, from_lane) = (from.layer, from.lane);
    // A loader on the device's own GPU lane (`--prefetch 0`) uploads there, in turn.
    let own = c.up && g.lane_device(from_lane) == Some(c.device);
    let lane = if own { from_lane } else { copy_lane(g, c.device, c.up) };
    let from = &g.nodes[c.from.node];
    let base = match &from.op {
        OpConfig::Load(l) => tensor_path(&l.tensors[c.from.port].name),
        _ if c.from.port == 0 => from.name.clone(),
        _ => format!("{}/p{}", from.name, c.from.port),
    };
    let name = g.fresh_name(&format!("{base}/{}", if c.up { "to_gpu" } else { "to_host" }));
    let op = if c.up {
        // A streamed weight: its host buffer bounds its GPU copies (see `to_gpu`).
        let streamed = matches!(from.op, OpConfig::Load(_)) && c.edges.iter().any(|&e| !g.edges[e].sticky);
        OpConfig::ToGpu(to_gpu::Spec { keep_host: streamed })
    } else {
        OpConfig::ToHost(to_host::Spec)
    };
    Node { name, op, lane, layer }
}

/// The copy lane of `device` for a direction, made if missing.
fn copy_lane(g: &mut Graph, device: usize, up: bool) -> usize {
    let (dir, stream) = if up { ("h2d", 1) } else { ("d2h", 2) };
    let name = format!("gpu{device}/{dir}");
    if let Some(i) = g.lanes.iter().position(|l| l.name == name) {
        return i;
    }
    g.lanes.push(LaneSpec { name, kind: LaneKind::GpuStream { device, stream } });
    g.lanes.len() - 1
}

/// A tensor's name as a node name: `model.layers.0.mlp.up_proj.weight` →
/// `model/layers/0/mlp/up_proj/weight`.
fn tensor_path(tensor: &str) -> String {
    let s: String = tensor.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '/' }).collect();
    if s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s
    } else {
        format!("t/{s}")
    }
}
