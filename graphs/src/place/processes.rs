//! Pass: cut a graph over several processes into the part one process runs.
//!
//! A graph file may put lanes in other processes (`process tail at="10.0.0.2:7100"`, `lane back
//! cpu process=tail`): a pipeline whose layers run on several machines (or several sets of
//! cores, each its own process). Every process runs the same file; this pass, right after the
//! file is checked, keeps the nodes on the process's own lanes and turns every edge that
//! crosses into a `net_send` node on the producing side and a `net_recv` node on the consuming
//! side (on an I/O lane `net`), joined at run time by a remote edge named after the producing
//! port and the process it goes to (`l0/mlp_add.y@tail`). A producer feeding several nodes
//! over there sends once; the far side fans out. The later passes plan each part's memory, its
//! loaders and its transfers alone.
//!
//! Weights never cross: a tensor a loader of one process would send to a node of another is
//! read by a loader of that process instead (its first io or nvme lane, or a new io lane
//! `<process>/loader`). The scheduler runs in `main`, so the graph's `input` and `output` must
//! be on `main`'s lanes.

use crate::error::{Error, Result};
use crate::graph::{Edge, Graph, Node, Port, MAIN};
use std::collections::BTreeMap;
use weir_operators::{net_recv, net_send, Carries, OpConfig};
use weir_runtime::{LaneKind, LaneSpec};

/// The lane the pass puts `net_send` and `net_recv` nodes on.
pub const NET_LANE: &str = "net";

/// The name both ends of a crossing edge give it: the producing port and where it goes.
pub fn edge_name(g: &Graph, from: Port, to_process: &str) -> String {
    let n = &g.nodes[from.node];
    format!("{}.{}@{to_process}", n.name, n.op.outputs()[from.port])
}

/// Runs the pass for process `me`: the part of `g` that `me` runs. A graph on one process
/// comes back as it is (for `main`).
pub fn cut(mut g: Graph, me: &str) -> Result<Graph> {
    if me != MAIN && !g.processes.iter().any(|p| p.name == me) {
        let mut known: Vec<&str> = g.processes.iter().map(|p| p.name.as_str()).collect();
        known.insert(0, MAIN);
        return Err(Error::Options(format!(
            "--process {me}: the graph declares no process `{me}` (declared: {})",
            known.join(", ")
        )));
    }
    if g.lane_process.is_empty() && me == MAIN {
        return Ok(g);
    }
    let whole = g.lanes.iter().any(|l| !g.lane_process.contains_key(&l.name));
    if whole {
        for (what, p) in [("input", g.entry), ("output", g.exit)] {
            let n = &g.nodes[p.node];
            let at = g.process_of(n.lane);
            if at != MAIN {
                return Err(Error::Placement(format!(
                    "the graph's {what} `{}` is on lane `{}` of process `{at}`: it must run in `main`, with the scheduler",
                    n.name, g.lanes[n.lane].name
                )));
            }
        }
    }
    own_loaders(&mut g);
    split(g, me)
}

/// Every weight read in the process of the node it feeds (see the module doc).
fn own_loaders(g: &mut Graph) {
    let mut loader_in: BTreeMap<String, usize> = BTreeMap::new();
    for e in 0..g.edges.len() {
        let (from, to) = (g.edges[e].from, g.edges[e].to);
        let OpConfig::Load(spec) = &g.nodes[from.node].op else { continue };
        let there = g.process_of(g.nodes[to.node].lane).to_string();
        if g.process_of(g.nodes[from.node].lane) == there {
            continue;
        }
        let (tensor, streamed, held) =
            (spec.tensors[from.port].clone(), spec.streamed[from.port], spec.held[from.port]);
        let loader = match loader_in.get(&there) {
            Some(&l) => l,
            None => {
                let l = loader_of(g, &there, spec.mode);
                loader_in.insert(there, l);
                l
            }
        };
        let OpConfig::Load(into) = &mut g.nodes[loader].op else { continue };
        let port = match into.tensors.iter().position(|t| t.name == tensor.name) {
            Some(p) => p,
            None => {
                into.tensors.push(tensor);
                into.streamed.push(streamed);
                into.held.push(held);
                into.tensors.len() - 1
            }
        };
        g.edges[e].from = Port { node: loader, port };
    }
    drop_unused_ports(g);
}

/// A loader node of process `p`, made on its first io or nvme lane (or a new io lane).
fn loader_of(g: &mut Graph, p: &str, mode: weir_operators::loader::IoMode) -> usize {
    let lanes: Vec<usize> = (0..g.lanes.len()).filter(|&l| g.process_of(l) == p).collect();
    let reader =
        lanes.iter().copied().find(|&l| matches!(g.lanes[l].kind, LaneKind::Io { .. } | LaneKind::Nvme { .. }));
    let lane = reader.unwrap_or_else(|| {
        let name = format!("{p}/loader");
        g.lanes.push(LaneSpec::io(&name, None));
        g.lane_process.insert(name, p.to_string());
        g.lanes.len() - 1
    });
    if let Some(i) = g.loaders().find(|&(i, _)| g.nodes[i].lane == lane).map(|(i, _)| i) {
        return i;
    }
    let spec = weir_operators::loader::Spec { tensors: Vec::new(), streamed: Vec::new(), held: Vec::new(), mode };
    let name = g.fresh_name(&format!("load/{}", g.lanes[lane].name));
    g.nodes.push(Node { name, op: OpConfig::Load(spec), lane, layer: None });
    g.nodes.len() - 1
}

/// Removes the loader ports whose tensors now go nowhere (read by another process instead).
fn drop_unused_ports(g: &mut Graph) {
    for n in 0..g.nodes.len() {
        let OpConfig::Load(spec) = &g.nodes[n].op else { continue };
        let used: Vec<bool> = (0..spec.tensors.len()).map(|p| g.edges_from(n, p).next().is_some()).collect();
        if used.iter().all(|u| *u) {
            continue;
        }
        let mut renumber = vec![usize::MAX; used.len()];
        let mut spec = spec.clone();
        let mut next = 0;
        for (p, u) in used.iter().enumerate() {
            if *u {
                renumber[p] = next;
                next += 1;
            }
        }
        fn keep<T>(v: &mut Vec<T>, used: &[bool]) {
            let mut i = 0;
            v.retain(|_| {
                i += 1;
                used[i - 1]
            });
        }
        keep(&mut spec.tensors, &used);
        keep(&mut spec.streamed, &used);
        keep(&mut spec.held, &used);
        g.nodes[n].op = OpConfig::Load(spec);
        for e in g.edges.iter_mut().filter(|e| e.from.node == n) {
            e.from.port = renumber[e.from.port];
        }
    }
}

/// The part of `g` on `me`'s lanes, its crossing edges turned into `net_send`/`net_recv` nodes.
fn split(g: Graph, me: &str) -> Result<Graph> {
    let mine = |lane: usize| g.process_of(lane) == me;
    let mut part = Graph::new(Vec::new());
    let mut lane_map = vec![usize::MAX; g.lanes.len()];
    for (i, l) in g.lanes.iter().enumerate().filter(|&(i, _)| mine(i)) {
        lane_map[i] = part.lanes.len();
        part.lanes.push(l.clone());
    }
    let mut node_map = vec![usize::MAX; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate().filter(|(_, n)| mine(n.lane)) {
        node_map[i] = part.nodes.len();
        part.nodes.push(Node { lane: lane_map[n.lane], ..n.clone() });
    }
    let mut net_lane = None;
    // (producing port, process it goes to) → the edge into its `net_send`.
    let mut sends: BTreeMap<(Port, String), usize> = BTreeMap::new();
    let mut recvs: BTreeMap<Port, usize> = BTreeMap::new();
    for e in &g.edges {
        let (from_here, to_here) = (mine(g.nodes[e.from.node].lane), mine(g.nodes[e.to.node].lane));
        let (from, to) = (Port { node: node_map[e.from.node], ..e.from }, Port { node: node_map[e.to.node], ..e.to });
        if from_here && to_here {
            part.edges.push(Edge { from, to, ..e.clone() });
            continue;
        }
        if !from_here && !to_here {
            continue;
        }
        let producer = &g.nodes[e.from.node];
        let port = &producer.op.output_ports()[e.from.port];
        if e.sticky || e.uses > 1 || matches!(port.carries, Carries::Weight(_)) {
            return Err(Error::Placement(format!(
                "the weight edge `{}.{}` -> `{}` crosses from process `{}` to `{}`: weights are read where they are used",
                producer.name,
                port.name,
                g.nodes[e.to.node].name,
                g.process_of(producer.lane),
                g.process_of(g.nodes[e.to.node].lane)
            )));
        }
        let lane = *net_lane.get_or_insert_with(|| {
            let name = part.fresh_lane(NET_LANE);
            part.lanes.push(LaneSpec::io(&name, None));
            part.lanes.len() - 1
        });
        if from_here {
            let there = g.process_of(g.nodes[e.to.node].lane).to_string();
            let key = (e.from, there.clone());
            // One crossing per output and process: the edge into its `net_send` holds the most
            // any of the edges it stands for held.
            if let Some(&into) = sends.get(&key) {
                let cap = &mut part.edges[into].capacity;
                *cap = (*cap).max(e.capacity);
                continue;
            }
            let name = part.fresh_name(&format!("net/to_{there}/{}/{}", producer.name, port.name));
            let spec = net_send::Spec { edge: edge_name(&g, e.from, &there), peer: there };
            part.nodes.push(Node { name, op: OpConfig::NetSend(spec), lane, layer: producer.layer });
            sends.insert(key, part.edges.len());
            part.edges.push(Edge::new(from, Port { node: part.nodes.len() - 1, port: 0 }, e.capacity));
        } else {
            let recv = match recvs.get(&e.from) {
                Some(&r) => r,
                None => {
                    let there = g.process_of(producer.lane).to_string();
                    let width = if let Carries::Act(w) = port.carries { w } else { 0 };
                    let name = part.fresh_name(&format!("net/from_{there}/{}/{}", producer.name, port.name));
                    let spec = net_recv::Spec { edge: edge_name(&g, e.from, me), peer: there, width };
                    part.nodes.push(Node { name, op: OpConfig::NetRecv(spec), lane, layer: producer.layer });
                    recvs.insert(e.from, part.nodes.len() - 1);
                    part.nodes.len() - 1
                }
            };
            part.edges.push(Edge::new(Port { node: recv, port: 0 }, to, e.capacity));
        }
    }
    if me == MAIN {
        part.entry = Port { node: node_map[g.entry.node], ..g.entry };
        part.exit = Port { node: node_map[g.exit.node], ..g.exit };
    }
    part.host_budget = g.host_budget;
    part.gpu_budget = g.gpu_budget;
    part.lane_process = part.lanes.iter().filter(|_| me != MAIN).map(|l| (l.name.clone(), me.to_string())).collect();
    part.processes = g.processes;
    part.part = Some(me.to_string());
    Ok(part)
}
