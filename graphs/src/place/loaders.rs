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
            merge(g, lane);
        }
    }
}

/// Makes the loaders on `lane` one, `load/<lane>` (as a graph file's weights on one lane are
/// read by one loader), their tensors in node order.
fn merge(g: &mut Graph, lane: usize) {
    let on_lane: Vec<usize> = g.loaders().filter(|&(i, _)| g.nodes[i].lane == lane).map(|(i, _)| i).collect();
    let Some((&first, rest)) = on_lane.split_first() else { return };
    for &other in rest {
        let OpConfig::Load(taken) = std::mem::replace(&mut g.nodes[other].op, OpConfig::Load(empty(IoMode::Pread)))
        else {
            continue;
        };
        let OpConfig::Load(into) = &mut g.nodes[first].op else { return };
        let base = into.tensors.len();
        into.tensors.extend(taken.tensors);
        into.streamed.extend(taken.streamed);
        into.held.extend(taken.held);
        for e in g.edges.iter_mut().filter(|e| e.from.node == other) {
            e.from = Port { node: first, port: base + e.from.port };
        }
    }
    g.nodes[first].name = format!("load/{}", g.lanes[lane].name);
    remove_nodes(g, rest);
}

/// A loader spec with no tensors.
fn empty(mode: IoMode) -> Spec {
    Spec { tensors: vec![], streamed: vec![], held: vec![], mode }
}

/// Removes nodes that no edge touches, renumbering the rest.
fn remove_nodes(g: &mut Graph, gone: &[usize]) {
    let mut new = vec![usize::MAX; g.nodes.len()];
    let mut next = 0;
    for (i, slot) in new.iter_mut().enumerate() {
        if !gone.contains(&i) {
            *slot = next;
            next += 1;
        }
    }
    let mut i = 0;
    g.nodes.retain(|_| {
        i += 1;
        !gone.contains(&(i - 1))
    });
    for e in g.edges.iter_mut() {
        (e.from.node, e.to.node) = (new[e.from.node], new[e.to.node]);
    }
    (g.entry.node, g.exit.node) = (new[g.entry.node], new[g.exit.node]);
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
    let mut specs: Vec<Spec> = (0..lanes).map(|_| empty(spec.mode)).collect();
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
