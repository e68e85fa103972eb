//! Pass: assign loaders. Which lanes read the weights, and how, once the plan has said what
//! streams.
//!
//! - The built-in graph files declare one loader lane; `loader_lanes` > 1 adds more
//!   (`loader1`, `loader2`, …) and deals the tensors over them round-robin, in order.
//! - Where the memory was planned, every loader reads with io_uring and `O_DIRECT` (a buffer of
//!   whole blocks), its lane an nvme lane, reading ahead between firings as far as its pool
//!   allows.
//! - `--prefetch 0`: the loaders move onto the first compute lane and read one tensor per
//!   firing, taking turns with compute — the baseline that overlap is measured against.

use crate::graph::{Graph, Node, Port};
use weir_operators::loader::{IoMode, Spec};
use weir_operators::OpConfig;
use weir_runtime::{LaneKind, LaneSpec};

/// Runs the pass: `loader_lanes` for a built-in graph (`builtin`), and how the loaders read
/// where the memory was planned (`planned`) with `prefetch`.
pub fn assign(g: &mut Graph, loader_lanes: usize, builtin: bool, planned: bool, prefetch: Option<usize>) {
    if builtin && loader_lanes > 1 {
        deal(g, loader_lanes);
    }
    if !planned {
        return;
    }
    for n in g.nodes.iter_mut() {
        if let OpConfig::Load(l) = &mut n.op {
            if let LaneKind::Io { core } = g.lanes[n.lane].kind {
                g.lanes[n.lane].kind = LaneKind::Nvme { core, depth: 8, chunk: 1 << 20 };
            }
            l.mode = IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: true };
        }
    }
    if prefetch == Some(0) {
        let compute = g.nodes.iter().find(|n| !matches!(n.op, OpConfig::Load(_))).map(|n| n.lane);
        if let Some(lane) = compute {
            for n in g.nodes.iter_mut() {
                if let OpConfig::Load(l) = &mut n.op {
                    n.lane = lane;
                    // Nothing read between firings: reading and computing take turns.
                    l.mode = IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: false };
                }
            }
        }
    }
}

/// Deals the tensors of the graph's one loader over `lanes` io lanes (its own, then new ones
/// named `loader1`, …), round-robin in its order.
fn deal(g: &mut Graph, lanes: usize) {
    let loaders: Vec<usize> = g.loaders().map(|(i, _)| i).collect();
    let [first] = loaders[..] else { return };
    let OpConfig::Load(spec) = g.nodes[first].op.clone() else { return };
    let mut nodes = vec![first];
    for i in 1..lanes {
        let name = format!("loader{i}");
        g.lanes.push(LaneSpec::io(&name, None));
        nodes.push(g.nodes.len());
        let empty = Spec { tensors: vec![], streamed: vec![], held: vec![], mode: spec.mode };
        g.nodes.push(Node {
            name: format!("load/{name}"),
            op: OpConfig::Load(empty),
            lane: g.lanes.len() - 1,
            layer: None,
        });
    }
    let mut specs: Vec<Spec> =
        (0..lanes).map(|_| Spec { tensors: vec![], streamed: vec![], held: vec![], mode: spec.mode }).collect();
    let mut moved = vec![Port::default(); spec.tensors.len()];
    for (t, source) in spec.tensors.iter().enumerate() {
        let s = &mut specs[t % lanes];
        moved[t] = Port { node: nodes[t % lanes], port: s.tensors.len() };
        s.tensors.push(source.clone());
        s.streamed.push(spec.streamed[t]);
        s.held.push(spec.held[t]);
    }
    for (node, s) in nodes.iter().zip(specs) {
        g.nodes[*node].op = OpConfig::Load(s);
    }
    for e in g.edges.iter_mut().filter(|e| e.from.node == first) {
        e.from = moved[e.from.port];
    }
}
