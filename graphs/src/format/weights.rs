//! `weight` statements → loaders, expert stores, and what passes through transfers.
//!
//! A tensor a `weight` statement names is read by a loader: one loader node per loader lane
//! (`load/<lane>`), its tensors in order of first appearance, the same tensor named twice read
//! once and sent to both. With `store=NAME` it is read instead by that expert store, when its
//! router chooses the expert. A weight may feed a transfer's input (`to_gpu.x`): the
//! transfer's edges then carry it on, resident (sticky) or streamed as its tier says, and the
//! ports they reach must take a weight of its shape.

use super::check::{LaneUse, Resolver};
use super::expand::{Kept, WeightDecl};
use super::syntax::Span;
use crate::graph::{Edge, Node, Port};
use std::collections::{BTreeMap, HashMap};
use weir_operators::loader::{IoMode, TensorSource};
use weir_operators::{Carries, OpConfig};
use weir_runtime::{DType, LaneKind};

/// A weight statement, resolved.
struct Fed {
    /// The port it feeds.
    to: (usize, usize),
    source: TensorSource,
    tier: Kept,
    capacity: usize,
    uses: u32,
    span: Span,
}

/// The weights of a file, as they are resolved.
#[derive(Default)]
pub(super) struct Weights {
    /// Per loader lane: its tensors and their tiers, in order of first appearance.
    per_lane: BTreeMap<usize, Vec<(TensorSource, Kept)>>,
    /// Tensor name → (loader lane, port, tier).
    home: HashMap<String, (usize, usize, Kept)>,
    /// (loader lane, port, statement).
    loaded: Vec<(usize, usize, Fed)>,
    /// (store node, statement).
    stored: Vec<(usize, Fed)>,
    /// Round-robin position over the loader lanes.
    rr: usize,
}

impl Weights {
    /// Reads every `weight` statement.
    pub fn read(&mut self, r: &mut Resolver) {
        for w in &r.f.weights {
            let Some(to) = r.endpoint(&w.to, false) else { continue };
            r.tried_in.insert(to);
            let node = &r.graph.nodes[to.0];
            let (port, op) = (node.op.inputs()[to.1].clone(), &node.op);
            let want = match op.input_ports()[to.1].carries.clone() {
                Carries::Weight(shape) => Some(shape),
                Carries::Any => None, // a transfer: its consumers say what it must be
                _ => {
                    r.err(w.to.span, format!("input `{}.{port}` does not take a weight", node.name));
                    continue;
                }
            };
            let Some(source) = source(r, w, want.as_deref(), (&node.name.clone(), &port)) else { continue };
            if !r.connect_in(to, w.to.span) {
                continue;
            }
            let layer = r.graph.nodes[to.0].layer;
            let kind = r.graph.nodes[to.0].op.kind();
            let tier = w.tier.unwrap_or_else(|| placed_tier(r, layer, kind));
            let (capacity, uses) = (w.capacity.map_or(1, |c| c.0), w.uses.map_or(1, |u| u.0 as u32));
            let fed = Fed { to, source, tier, capacity, uses, span: w.to.span };
            match &w.store {
                Some(store) => self.stored_by(r, store, w, fed),
                None => self.loaded_by(r, w, fed),
            }
        }
    }

    fn stored_by(&mut self, r: &mut Resolver, store: &(String, Span), w: &WeightDecl, fed: Fed) {
        match r.node_idx.get(&store.0).map(|&(i, _)| i) {
            Some(s) if matches!(r.graph.nodes[s].op, OpConfig::ExpertStore(_)) => {
                if w.tier.is_some() {
                    r.err(fed.span, "a weight an expert store reads has no tier (the store keeps it)".into());
                }
                self.stored.push((s, fed));
            }
            // A store that could not be built was reported already.
            _ if r.broken.contains(&store.0) => {}
            _ => r.err(store.1, format!("`store={}` names no expert_store node", store.0)),
        }
    }

    fn loaded_by(&mut self, r: &mut Resolver, w: &WeightDecl, fed: Fed) {
        let name = fed.source.name.clone();
        let (lane, port) = match self.home.get(&name) {
            Some(&(_, _, t)) if t != fed.tier => {
                let tier = |t: Kept| format!("{t:?}").to_lowercase();
                let m = format!("tensor `{name}` is placed both tier={} and tier={}", tier(t), tier(fed.tier));
                r.err(fed.span, m);
                return;
            }
            Some(&(lane, port, _)) => (lane, port),
            None => {
                let Some(lane) = self.loader_lane(r, w, fed.tier) else { return };
                let list = self.per_lane.entry(lane).or_default();
                list.push((fed.source.clone(), fed.tier));
                self.home.insert(name, (lane, list.len() - 1, fed.tier));
                (lane, list.len() - 1)
            }
        };
        self.loaded.push((lane, port, fed));
    }

    /// The lane a new tensor loads on: its `lane=`, the file's `default loader=`, or dealt
    /// round-robin — resident ones to io lanes first, streamed ones to nvme lanes first.
    fn loader_lane(&mut self, r: &mut Resolver, w: &WeightDecl, tier: Kept) -> Option<usize> {
        if let Some(l) = w.lane.clone().or(r.f.default_loader.clone()) {
            return r.lane_of(&l, LaneUse::Loader);
        }
        let of = |io: bool| -> Vec<usize> {
            let lanes = &r.graph.lanes;
            (0..lanes.len())
                .filter(|&i| match lanes[i].kind {
                    LaneKind::Io { .. } => io,
                    LaneKind::Nvme { .. } => !io,
                    _ => false,
                })
                .collect()
        };
        let (first, second) = if tier.streamed() { (of(false), of(true)) } else { (of(true), of(false)) };
        let pick = if first.is_empty() { second } else { first };
        if pick.is_empty() {
            r.err(w.to.span, "weights need a loader lane: declare `lane NAME io` (or `nvme`)".into());
            return None;
        }
        self.rr += 1;
        Some(pick[(self.rr - 1) % pick.len()])
    }

    /// Gives every expert store the experts its `weight … store=` statements name (ascending
    /// by expert; with twins, each expert's weights then its twin's) and its edges.
    pub fn stores(&mut self, r: &mut Resolver) {
        let mut by_store: BTreeMap<usize, Vec<Fed>> = BTreeMap::new();
        for (s, fed) in self.stored.drain(..) {
            by_store.entry(s).or_default().push(fed);
        }
        for (s, feds) in by_store {
            store(r, s, feds);
        }
    }

    /// Checks what passes through each transfer reaches a port that takes it, and carries a
    /// weight's residency on: edges from a transfer fed by a weight are sticky where the weight
    /// is resident and serve `uses` firings; a `to_gpu` of a streamed weight keeps its host
    /// buffer with its GPU copy.
    pub fn transfers(&mut self, r: &mut Resolver) {
        let weight_into: HashMap<(usize, usize), (&TensorSource, Kept, u32)> =
            self.loaded.iter().map(|(_, _, f)| (f.to, (&f.source, f.tier, f.uses))).collect();
        for t in 0..r.graph.nodes.len() {
            if !matches!(r.graph.nodes[t].op, OpConfig::ToGpu(_) | OpConfig::ToHost(_)) {
                continue;
            }
            let fed = weight_into.get(&(t, 0)).copied();
            let from_edge = r.graph.edges.iter().find(|e| e.to.node == t).map(|e| e.from);
            let carries = match (fed, from_edge) {
                (Some((src, ..)), _) => Carries::Weight(src.shape.clone()),
                (None, Some(f)) => origin(r, f),
                (None, None) => continue, // not connected: reported
            };
            for ei in 0..r.graph.edges.len() {
                let e = r.graph.edges[ei].clone();
                if e.from.node != t {
                    continue;
                }
                let to = &r.graph.nodes[e.to.node];
                let takes = to.op.input_ports()[e.to.port].carries.clone();
                if takes != Carries::Any && carries != Carries::Any && takes != carries {
                    let (tname, pname) = (r.graph.nodes[t].name.clone(), to.op.inputs()[e.to.port].clone());
                    let m = format!("`{tname}` passes {carries} on to `{}.{pname}`, which takes {takes}", to.name);
                    let sp = r.node_idx[&tname].1;
                    r.err(sp, m);
                    continue;
                }
                if let Some((_, tier, uses)) = fed {
                    r.graph.edges[ei].sticky = !tier.streamed();
                    r.graph.edges[ei].uses = uses;
                }
            }
            if let (OpConfig::ToGpu(spec), Some((_, tier, _))) = (&mut r.graph.nodes[t].op, fed) {
                spec.keep_host = tier.streamed();
            }
        }
    }

    /// The loader nodes and their edges, in a canonical order (by loader, tensor, consumer),
    /// so that printing and parsing again gives the same graph whatever order the weight
    /// statements came in.
    pub fn loaders(&mut self, r: &mut Resolver) {
        let g = &mut r.graph;
        let mut loader_of = HashMap::new();
        for (lane, list) in std::mem::take(&mut self.per_lane) {
            let name = format!("load/{}", g.lanes[lane].name);
            let mode = match g.lanes[lane].kind {
                LaneKind::Nvme { depth, chunk, .. } => IoMode::Uring { depth, chunk, ahead: true },
                // Read on a compute lane: direct reads, one tensor per firing, taking turns with
                // compute — as the planner's no-overlap baseline does.
                LaneKind::Cpu { .. } => IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: false },
                _ => IoMode::Pread,
            };
            let streamed = list.iter().map(|(_, t)| t.streamed()).collect();
            let held = list.iter().map(|(_, t)| *t == Kept::Dram).collect();
            let tensors = list.into_iter().map(|(s, _)| s).collect();
            let op = OpConfig::Load(weir_operators::loader::Spec { tensors, streamed, held, mode });
            loader_of.insert(lane, g.nodes.len());
            g.nodes.push(Node { name, op, lane, layer: None });
        }
        self.loaded.sort_by_key(|(lane, port, f)| (*lane, *port, f.to));
        for (lane, port, f) in self.loaded.drain(..) {
            // A weight into a transfer goes on to its consumers: the transfer takes each copy.
            let into_transfer = matches!(g.nodes[f.to.0].op, OpConfig::ToGpu(_) | OpConfig::ToHost(_));
            let (sticky, uses) = if into_transfer { (false, 1) } else { (!f.tier.streamed(), f.uses) };
            let from = Port { node: loader_of[&lane], port };
            g.edges.push(Edge { from, to: Port { node: f.to.0, port: f.to.1 }, capacity: f.capacity, sticky, uses });
        }
    }
}

/// Where a weight statement's tensor is: looked up in the model's weights and checked against
/// the shape the port wants (`want`; `None` for a transfer's input), or made up from that shape
/// without a model.
fn source(
    r: &mut Resolver,
    w: &WeightDecl,
    want: Option<&[usize]>,
    (node, port): (&str, &str),
) -> Option<TensorSource> {
    match r.input.weights {
        Some(idx) => match idx.tensors.get(&w.tensor) {
            None => {
                r.err(w.tensor_span, format!("tensor `{}` is not in the model's weights", w.tensor));
                None
            }
            Some(t) if want.is_some_and(|s| t.shape != s) => {
                let (want, found) = (want.unwrap_or_default(), &t.shape);
                let m = format!(
                    "tensor `{}`: node `{node}` port `{port}` expects shape {want:?}, found {found:?}",
                    w.tensor
                );
                r.err(w.tensor_span, m);
                None
            }
            Some(t) => Some(t.clone()),
        },
        None => Some(TensorSource {
            name: w.tensor.clone(),
            path: Default::default(),
            offset: 0,
            dtype: DType::F32,
            shape: want.map(<[usize]>::to_vec).unwrap_or_default(),
        }),
    }
}

/// The tier `place` rules give a weight of a node with this layer and kind (resident if none).
fn placed_tier(r: &Resolver, layer: Option<u32>, kind: &str) -> Kept {
    r.f.places
        .iter()
        .rev()
        .find(|p| {
            p.tier.is_some()
                && p.layers.is_none_or(|(a, b)| layer.is_some_and(|l| (l as i64) >= a && (l as i64) < b))
                && p.kind.as_ref().is_none_or(|k| k == kind)
        })
        .and_then(|p| p.tier)
        .unwrap_or(Kept::Host)
}

/// What an output port carries, looking back through transfers to what feeds them.
fn origin(r: &Resolver, mut from: Port) -> Carries {
    for _ in 0..r.graph.nodes.len() {
        let op = &r.graph.nodes[from.node].op;
        if !matches!(op, OpConfig::ToGpu(_) | OpConfig::ToHost(_)) {
            return op.output_carries(from.port);
        }
        match r.graph.edges.iter().find(|e| e.to.node == from.node) {
            Some(e) => from = e.from,
            None => return Carries::Any,
        }
    }
    Carries::Any
}

/// The expert a store's weight reaches, with its role: (expert node, twin, 0 gate / 1 up /
/// 2 down). Through a transfer, the port its one edge reaches.
fn expert_port(r: &Resolver, to: (usize, usize)) -> Option<(usize, bool, usize)> {
    let (mut node, mut port) = to;
    if matches!(r.graph.nodes[node].op, OpConfig::ToGpu(_)) {
        let mut out = r.graph.edges.iter().filter(|e| e.from.node == node);
        let e = out.next().filter(|_| out.next().is_none())?;
        (node, port) = (e.to.node, e.to.port);
    }
    match &r.graph.nodes[node].op {
        OpConfig::Expert(e) if (2..5).contains(&port) => Some((node, e.twin, port - 2)),
        _ => None,
    }
}

/// Resolves store `s`'s weights: which experts it serves, its tensors, ports and edges.
fn store(r: &mut Resolver, s: usize, feds: Vec<Fed>) {
    let name = r.graph.nodes[s].name.clone();
    let OpConfig::ExpertStore(spec) = &r.graph.nodes[s].op else { return };
    let (experts, twins) = (spec.experts, spec.twins.is_some());
    // expert → [own, twin] × [gate, up, down] → statement
    let mut slots: BTreeMap<usize, [[Option<Fed>; 3]; 2]> = BTreeMap::new();
    for fed in feds {
        let Some((node, twin, role)) = expert_port(r, fed.to) else {
            let m =
                format!("a weight `{name}` reads must feed an expert's gate, up or down (through a to_gpu at most)");
            r.err(fed.span, m);
            continue;
        };
        let OpConfig::Expert(e) = &r.graph.nodes[node].op else { continue };
        if e.experts != experts {
            let m = format!(
                "expert `{}` is one of {} experts, but `{name}` serves a router over {experts}",
                r.graph.nodes[node].name, e.experts
            );
            r.err(fed.span, m);
            continue;
        }
        if twin && !twins {
            r.err(fed.span, format!("`{name}` feeds a twin expert but has no `twins=true`"));
            continue;
        }
        let index = e.index;
        slots.entry(index).or_default()[twin as usize][role] = Some(fed);
    }
    let sides = if twins { 2 } else { 1 };
    let mut served = Vec::new();
    let mut tensors = Vec::new();
    let mut edges = Vec::new();
    for (index, mut sides_of) in slots {
        let complete = (0..sides).all(|t| sides_of[t].iter().all(Option::is_some));
        if !complete {
            let span = sides_of.iter().flatten().flatten().next().map_or(Span::default(), |f| f.span);
            let what = if twins { "gate, up and down, for the expert and its twin" } else { "gate, up and down" };
            r.err(span, format!("`{name}` serves expert {index}: give it all three weights ({what})"));
            continue;
        }
        let j = served.len();
        served.push(index);
        for (side, roles) in sides_of.iter_mut().take(sides).enumerate() {
            for (role, fed) in roles.iter_mut().enumerate() {
                let Some(f) = fed.take() else { continue };
                if side == 0 {
                    tensors.push(f.source.clone());
                }
                let port = sides * 3 * j + 3 * side + role;
                edges.push(Edge::new(Port { node: s, port }, Port { node: f.to.0, port: f.to.1 }, f.capacity));
            }
        }
    }
    let lane = &r.graph.lanes[r.graph.nodes[s].lane].kind;
    let mode = match *lane {
        LaneKind::Nvme { depth, chunk, .. } => IoMode::Uring { depth, chunk, ahead: false },
        _ => IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: false },
    };
    if let OpConfig::ExpertStore(spec) = &mut r.graph.nodes[s].op {
        (spec.served, spec.tensors, spec.mode) = (served, tensors, mode);
    }
    r.graph.edges.extend(edges);
}
