//! Pass: place experts. Expert placement across tiers: under a budget of fast-tier bytes for expert weights, the
//! most used experts stay resident and the rest are read from storage when chosen, into a
//! bounded popularity-aware cache (`weir_operators::expert_store`).
//!
//! The budget is shared out as follows. Every MoE layer with experts outside the resident set
//! gets an expert store whose pool holds `min(top_k, budget / layers / expert)` experts (at
//! least one: a chosen expert must fit somewhere to be computed): its cache, and the room its
//! reads need while they are computed. What is left keeps experts resident, chosen over all
//! layers by how often each was chosen per token in calibration (`--expert-stats`; without
//! one, every expert ties and lower layers and ids go first). A budget of all expert bytes
//! changes nothing. The rewrite removes the cold experts' weights from the loaders (so they
//! are never read whole), adds one `expert_store` per layer on an NVMe lane (`expert_reads`,
//! made if the graph has none), fed by the layer's router, feeding the cold experts' weight
//! ports.
//!
//! With prediction (and a cache), every store after the first MoE layer also gets a hint: a
//! copy of its layer's router (`hint = true`, not counted in the statistics) on the previous
//! MoE layer's router lane, applied to that router's input — the previous layer's hidden
//! state — so the store can read the likely experts while the previous layer computes.

use super::memory::held_bytes;
use crate::error::{Error, Result};
use crate::graph::{Edge, Graph, Node, Port};
use std::collections::{BTreeMap, HashMap};
pub use weir_operators::expert_store::{LaneTiming, TwinCosts};
use weir_operators::loader::{IoMode, TensorSource};
use weir_operators::{add, expert, expert_store, router, OpConfig};
use weir_runtime::{LaneKind, LaneSpec};

/// Fast-tier room for expert weights over all layers (resident experts and caches).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertBudget {
    Bytes(u64),
    /// A fraction of all experts' bytes (`--expert-budget 25%`).
    Fraction(f64),
}

impl ExpertBudget {
    /// `--expert-budget`: a size (`2GB`, see [`crate::parse_size`]) or a percentage of all
    /// experts' bytes (`25%`).
    pub fn parse(s: &str) -> std::result::Result<ExpertBudget, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => Ok(ExpertBudget::Fraction(v / 100.0)),
                _ => Err(format!("{s}: a percentage must be a number from 0 to 100")),
            },
            None => crate::parse_size(s).map(ExpertBudget::Bytes).map_err(|e| format!("{s}: {e}")),
        }
    }

    fn bytes(self, total: u64) -> u64 {
        match self {
            ExpertBudget::Bytes(b) => b,
            ExpertBudget::Fraction(f) => (total as f64 * f) as u64,
        }
    }
}

/// How experts are placed.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertPlacement {
    pub budget: ExpertBudget,
    /// Calibration: per layer, how often each expert was chosen per token routed.
    pub popularity: HashMap<u32, Vec<f64>>,
    /// Keep what stores read (false: read every chosen cold expert every time — the baseline
    /// that caching is measured against, with the same memory).
    pub cache: bool,
    /// Read ahead the experts the next layer's router predicts (only with `cache`).
    pub predict: bool,
    /// A second lane for the experts read by stores, chosen between per pass (see [`Twins`]).
    pub twins: Option<Twins>,
}

/// Twins of the cold experts (Fiddler's decision): every expert a store serves is placed on a
/// second lane as well, and each pass its store sends the weights to whichever of the two
/// finishes the step soonest (`weir_operators::offload::decide`). A lane computes an expert over
/// the store's memory in place if it is a CPU lane; a GPU lane takes the weights moved to it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Twins {
    /// The twins' lane, by name.
    pub lane: String,
    /// What one expert costs on each lane, by lane name: the experts' own lanes and the twins'
    /// (the engine measures the lanes missing here at start-up).
    pub timings: BTreeMap<String, LaneTiming>,
}

/// The shape of an MoE layer's experts, as timing one needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShape {
    pub hidden: usize,
    pub intermediate: usize,
    /// The weights' type as stored.
    pub dtype: weir_runtime::DType,
}

/// The experts of `g`: their shape, and the lanes they are on. `None` without experts.
pub fn expert_shape(g: &Graph) -> Option<(ExpertShape, Vec<usize>)> {
    let mut lanes: Vec<usize> =
        g.nodes.iter().filter(|n| matches!(&n.op, OpConfig::Expert(e) if !e.twin)).map(|n| n.lane).collect();
    lanes.sort_unstable();
    lanes.dedup();
    let (ni, e) = g.nodes.iter().enumerate().find_map(|(i, n)| match &n.op {
        OpConfig::Expert(e) => Some((i, e)),
        _ => None,
    })?;
    let gate = g.edge_into(ni, 2)?;
    let dtype = match &g.nodes[gate.from.node].op {
        OpConfig::Load(l) => l.tensors[gate.from.port].dtype,
        _ => weir_runtime::DType::F32,
    };
    Some((ExpertShape { hidden: e.hidden, intermediate: e.intermediate, dtype }, lanes))
}

/// Times one expert, through `timing`, on every lane `t` needs (the experts' own lanes and the
/// twins') that it has no timing for. A twin lane that does not exist or computes nothing is
/// left for [`place`] to refuse, naming it.
pub fn time_lanes(
    g: &Graph,
    t: &mut Twins,
    timing: &dyn Fn(&LaneSpec, &ExpertShape) -> std::result::Result<LaneTiming, String>,
) -> Result<()> {
    let Some((shape, mut lanes)) = expert_shape(g) else { return Ok(()) };
    lanes.extend(g.lanes.iter().position(|l| l.name == t.lane));
    for l in lanes {
        let lane = &g.lanes[l];
        let computes = matches!(lane.kind, LaneKind::Cpu { .. } | LaneKind::GpuStream { .. });
        if computes && !t.timings.contains_key(&lane.name) {
            let timing = timing(lane, &shape)
                .map_err(|e| Error::Placement(format!("timing an expert on lane `{}`: {e}", lane.name)))?;
            t.timings.insert(lane.name.clone(), timing);
        }
    }
    Ok(())
}

/// What the placement did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExpertPlan {
    /// Bytes of all experts' weights, and the budget they were placed under.
    pub expert_bytes: u64,
    pub budget: u64,
    /// Resident experts (layer, expert) and their bytes.
    pub resident: Vec<(u32, usize)>,
    pub resident_bytes: u64,
    /// Per layer with a store: the experts it serves and its pool's bytes.
    pub stores: Vec<(u32, Vec<usize>, u64)>,
    /// Layers whose store reads ahead on a prediction.
    pub predicted: Vec<u32>,
}

/// One expert node: where its three weights come from.
struct ExpertNode {
    node: usize,
    layer: u32,
    index: usize,
    experts: usize,
    /// (loader node, loader port) feeding gate, up, down.
    sources: [(usize, usize); 3],
    bytes: u64,
}

/// Places `g`'s experts under `p` (see the module doc). A graph without experts, or a budget
/// that holds them all, is left as it is.
pub fn place(g: &mut Graph, p: &ExpertPlacement) -> Result<ExpertPlan> {
    if let Some(s) = g.nodes.iter().find(|n| matches!(n.op, OpConfig::ExpertStore(_))) {
        return Err(Error::Placement(format!(
            "the graph places its experts already (expert store `{}`): give no expert budget",
            s.name
        )));
    }
    let mut nodes = Vec::new();
    for (ni, n) in g.nodes.iter().enumerate() {
        let OpConfig::Expert(expert::Spec { index, experts, .. }) = n.op else { continue };
        let mut sources = [(usize::MAX, 0); 3];
        for e in g.edges.iter().filter(|e| e.to.node == ni && (2..5).contains(&e.to.port)) {
            if matches!(g.nodes[e.from.node].op, OpConfig::Load(_)) {
                sources[e.to.port - 2] = (e.from.node, e.from.port);
            }
        }
        if sources.iter().any(|s| s.0 == usize::MAX) {
            return Err(Error::Placement(format!(
                "expert node `{}`: its weights do not all come from loaders",
                n.name
            )));
        }
        let bytes = sources.iter().map(|&(l, port)| held_bytes_of(g, l, port)).sum();
        nodes.push(ExpertNode { node: ni, layer: n.layer.unwrap_or(0), index, experts, sources, bytes });
    }
    let total: u64 = nodes.iter().map(|x| x.bytes).sum();
    let budget = p.budget.bytes(total);
    let mut plan = ExpertPlan { expert_bytes: total, budget, ..Default::default() };
    if nodes.is_empty() || budget >= total {
        plan.resident = nodes.iter().map(|x| (x.layer, x.index)).collect();
        plan.resident_bytes = total;
        return Ok(plan);
    }
    let layers: BTreeMap<u32, Vec<usize>> = nodes.iter().enumerate().fold(BTreeMap::new(), |mut m, (i, x)| {
        m.entry(x.layer).or_insert_with(Vec::new).push(i);
        m
    });
    // Each layer's store: room for min(top_k, its share) of its largest expert, at least one.
    let mut store_bytes: BTreeMap<u32, u64> = BTreeMap::new();
    for (&layer, members) in &layers {
        let largest = members.iter().map(|&i| nodes[i].bytes).max().unwrap_or(0);
        let top_k = router_of(g, nodes[members[0]].node).map_or(1, |(_, k)| k);
        let share = budget / layers.len() as u64;
        let slots = (share / largest.max(1)).clamp(1, top_k as u64);
        store_bytes.insert(layer, slots * largest);
    }
    let stores_total: u64 = store_bytes.values().sum();
    if stores_total > budget {
        let largest = nodes.iter().map(|x| x.bytes).max().unwrap_or(0);
        return Err(Error::Placement(format!(
            "the expert budget of {} bytes holds less than one expert per MoE layer ({} layers, experts of up to {largest} \
             bytes): give at least {stores_total} bytes",
            budget,
            layers.len()
        )));
    }
    // Resident: the most chosen per token, over all layers, while they fit.
    let pop = |x: &ExpertNode| p.popularity.get(&x.layer).and_then(|v| v.get(x.index)).copied().unwrap_or(0.0);
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|&a, &b| {
        pop(&nodes[b])
            .total_cmp(&pop(&nodes[a]))
            .then((nodes[a].layer, nodes[a].index).cmp(&(nodes[b].layer, nodes[b].index)))
    });
    let mut left = budget - stores_total;
    let mut resident = vec![false; nodes.len()];
    for i in order {
        if nodes[i].bytes <= left {
            left -= nodes[i].bytes;
            resident[i] = true;
        }
    }
    plan.resident = (0..nodes.len()).filter(|&i| resident[i]).map(|i| (nodes[i].layer, nodes[i].index)).collect();
    plan.resident_bytes = (0..nodes.len()).filter(|&i| resident[i]).map(|i| nodes[i].bytes).sum();

    let twin_lane = match &p.twins {
        Some(t) => Some(twin_lane(g, t)?),
        None => None,
    };
    let lane = nvme_lane(g);
    let (depth, chunk) = match g.lanes[lane].kind {
        LaneKind::Nvme { depth, chunk, .. } => (depth, chunk),
        _ => (8, 1 << 20),
    };
    let mut drop_edges: Vec<(usize, usize)> = Vec::new(); // (node, port) inputs no longer fed by loaders
    for (&layer, members) in &layers {
        // Ascending by expert, as a store's ports are (and as the checker orders them).
        let mut cold: Vec<usize> = members.iter().copied().filter(|&i| !resident[i]).collect();
        cold.sort_by_key(|&i| nodes[i].index);
        if cold.is_empty() {
            continue;
        }
        let Some((route, _)) = router_of(g, nodes[cold[0]].node) else {
            return Err(Error::Placement(format!("expert node `{}` has no router", g.nodes[nodes[cold[0]].node].name)));
        };
        let served: Vec<usize> = cold.iter().map(|&i| nodes[i].index).collect();
        let tensors: Vec<TensorSource> =
            cold.iter().flat_map(|&i| nodes[i].sources.map(|(l, port)| source_of(g, l, port))).collect();
        let experts = nodes[cold[0]].experts;
        let popularity = p.popularity.get(&layer);
        let prior: Vec<f64> = (0..experts).map(|e| popularity.and_then(|v| v.get(e)).copied().unwrap_or(0.0)).collect();
        let budget = store_bytes[&layer];
        // The previous MoE layer's router, whose input predicts this layer's choices.
        let earlier = layers.range(..layer).next_back().and_then(|(_, m)| router_of(g, nodes[m[0]].node));
        let hint = earlier.filter(|_| p.cache && p.predict).map(|(prev, _)| (prev, route));
        let op = OpConfig::ExpertStore(expert_store::Spec {
            served: served.clone(),
            experts,
            tensors,
            mode: IoMode::Uring { depth, chunk, ahead: false },
            prior,
            budget,
            cache: p.cache,
            hinted: hint.is_some(),
            twins: match (&p.twins, twin_lane) {
                (Some(t), Some(tl)) => Some(costs(g, t, g.nodes[nodes[cold[0]].node].lane, tl)?),
                _ => None,
            },
        });
        let stride = if p.twins.is_some() { 6 } else { 3 };
        let store = g.nodes.len();
        g.nodes.push(Node { name: format!("l{layer}/expert_store"), op, lane, layer: Some(layer) });
        g.edges.push(Edge::new(route, Port { node: store, port: 0 }, 1));
        if let Some((prev, this)) = hint {
            add_hint(g, prev.node, this.node, store);
            plan.predicted.push(layer);
        }
        for (j, &i) in cold.iter().enumerate() {
            let twin = twin_lane.map(|tl| add_twin(g, nodes[i].node, tl));
            for w in 0..3 {
                drop_edges.push((nodes[i].node, 2 + w));
                let to = [Some(nodes[i].node), twin].into_iter().flatten();
                for (side, node) in to.enumerate() {
                    let from = Port { node: store, port: stride * j + 3 * side + w };
                    g.edges.push(Edge::new(from, Port { node, port: 2 + w }, 1));
                }
            }
        }
        plan.stores.push((layer, served, budget));
    }
    g.edges.retain(|e| {
        !(matches!(g.nodes[e.from.node].op, OpConfig::Load(_)) && drop_edges.contains(&(e.to.node, e.to.port)))
    });
    prune_loaders(g);
    Ok(plan)
}

/// The twins' lane: one of the graph's CPU or GPU lanes.
fn twin_lane(g: &Graph, t: &Twins) -> Result<usize> {
    let names = || g.lanes.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ");
    let Some(i) = g.lanes.iter().position(|l| l.name == t.lane) else {
        return Err(Error::Placement(format!(
            "twin lane `{}`: the graph has no such lane (lanes: {})",
            t.lane,
            names()
        )));
    };
    match g.lanes[i].kind {
        LaneKind::Cpu { .. } | LaneKind::GpuStream { .. } => Ok(i),
        _ => Err(Error::Placement(format!("twin lane `{}` is an I/O lane; experts run on cpu or gpu lanes", t.lane))),
    }
}

/// A store's costs: its experts' own lane's and the twins' lane's timings. A GPU lane takes
/// the weights moved to it (its upload cost); a CPU lane reads the store's memory in place.
fn costs(g: &Graph, t: &Twins, own: usize, twin: usize) -> Result<TwinCosts> {
    let timing = |l: usize| {
        let name = &g.lanes[l].name;
        let Some(timing) = t.timings.get(name) else {
            return Err(Error::Placement(format!("no timing of an expert on lane `{name}`")));
        };
        let gpu = matches!(g.lanes[l].kind, LaneKind::GpuStream { .. });
        Ok(LaneTiming { upload_s: if gpu { timing.upload_s } else { None }, ..*timing })
    };
    Ok(TwinCosts { own: timing(own)?, twin: timing(twin)? })
}

/// Places a twin of expert node `node` on `lane`: the same inputs but its weights, and a sum of
/// the two outputs where the expert's went (on the expert's lane).
fn add_twin(g: &mut Graph, node: usize, lane: usize) -> usize {
    let OpConfig::Expert(e) = &g.nodes[node].op else { unreachable!("twins are made for expert nodes") };
    let (spec, hidden) = (expert::Spec { twin: true, ..e.clone() }, e.hidden);
    let (name, layer, own) = (g.nodes[node].name.clone(), g.nodes[node].layer, g.nodes[node].lane);
    let twin = g.nodes.len();
    g.nodes.push(Node { name: format!("{name}/twin"), op: OpConfig::Expert(spec), lane, layer });
    let sum = g.nodes.len();
    g.nodes.push(Node { name: format!("{name}/sum"), op: OpConfig::Add(add::Spec { dim: hidden }), lane: own, layer });
    let inputs: Vec<Edge> = g
        .edges
        .iter()
        .filter(|e| e.to.node == node && e.to.port < 2)
        .map(|e| Edge { to: Port { node: twin, port: e.to.port }, ..e.clone() })
        .collect();
    g.edges.extend(inputs);
    let mut capacity = 1;
    for e in g.edges.iter_mut().filter(|e| e.from.node == node) {
        e.from.node = sum;
        capacity = e.capacity;
    }
    for (from, port) in [(node, 0), (twin, 1)] {
        g.edges.push(Edge::new(Port { node: from, port: 0 }, Port { node: sum, port }, capacity));
    }
    twin
}

/// Adds `router`'s copy as a hint, on `earlier`'s lane and input, feeding `store`'s port 1.
fn add_hint(g: &mut Graph, earlier: usize, router: usize, store: usize) {
    let OpConfig::Router(r) = &g.nodes[router].op else { unreachable!("`router_of` found a router") };
    let spec = router::Spec { hint: true, ..r.clone() };
    let hint = g.nodes.len();
    let (lane, layer) = (g.nodes[earlier].lane, g.nodes[router].layer);
    let name = format!("{}/expert_hint", layer.map_or_else(|| g.nodes[router].name.clone(), |l| format!("l{l}")));
    g.nodes.push(Node { name, op: OpConfig::Router(spec), lane, layer });
    let copies: Vec<Edge> = g
        .edges
        .iter()
        .filter(|e| (e.to.node == earlier && e.to.port == 0) || (e.to.node == router && e.to.port == 1))
        .map(|e| Edge { to: Port { node: hint, port: e.to.port }, ..e.clone() })
        .collect();
    g.edges.extend(copies);
    g.edges.push(Edge::new(Port { node: hint, port: 0 }, Port { node: store, port: 1 }, 1));
}

/// The router port feeding expert node `node`'s route, and the router's top-k.
fn router_of(g: &Graph, node: usize) -> Option<(Port, usize)> {
    let e = g.edges.iter().find(|e| e.to.node == node && e.to.port == 1)?;
    match &g.nodes[e.from.node].op {
        OpConfig::Router(r) => Some((e.from, r.top_k)),
        _ => None,
    }
}

fn source_of(g: &Graph, loader: usize, port: usize) -> TensorSource {
    match &g.nodes[loader].op {
        OpConfig::Load(l) => l.tensors[port].clone(),
        _ => unreachable!("sources are loader ports (checked in `place`)"),
    }
}

fn held_bytes_of(g: &Graph, loader: usize, port: usize) -> u64 {
    let t = source_of(g, loader, port);
    held_bytes(t.offset, t.nbytes())
}

/// The graph's first NVMe lane, or a new one (`expert_reads`) if it has none.
fn nvme_lane(g: &mut Graph) -> usize {
    if let Some(i) = g.lanes.iter().position(|l| matches!(l.kind, LaneKind::Nvme { .. })) {
        return i;
    }
    g.lanes
        .push(LaneSpec { name: "expert_reads".into(), kind: LaneKind::Nvme { core: None, depth: 8, chunk: 1 << 20 } });
    g.lanes.len() - 1
}

/// Drops loader tensors nobody consumes any more and renumbers the loaders' ports; a loader
/// left with nothing is left with no tensors (it finishes at once).
fn prune_loaders(g: &mut Graph) {
    for ni in 0..g.nodes.len() {
        let OpConfig::Load(l) = &g.nodes[ni].op else { continue };
        let (tensors, streamed, held) = (&l.tensors, &l.streamed, &l.held);
        let used: Vec<bool> =
            (0..tensors.len()).map(|p| g.edges.iter().any(|e| e.from.node == ni && e.from.port == p)).collect();
        let mut new_port = vec![usize::MAX; tensors.len()];
        let (mut ts, mut ss, mut hs) = (Vec::new(), Vec::new(), Vec::new());
        for p in 0..tensors.len() {
            if used[p] {
                new_port[p] = ts.len();
                ts.push(tensors[p].clone());
                ss.push(streamed[p]);
                hs.push(held[p]);
            }
        }
        if let OpConfig::Load(l) = &mut g.nodes[ni].op {
            (l.tensors, l.streamed, l.held) = (ts, ss, hs);
        }
        for e in g.edges.iter_mut().filter(|e| e.from.node == ni) {
            e.from.port = new_port[e.from.port];
        }
    }
}
