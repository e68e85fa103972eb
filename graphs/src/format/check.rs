//! Stage two: statements → a checked [`Graph`].
//!
//! `expand` turns the statements into flat declarations (loops and conditions expanded,
//! expressions evaluated against the model's variables); this file resolves them and checks:
//! operators known and their parameters valid, lanes declared and of the right kind, every
//! port connected exactly once, edge widths and weight shapes consistent with the operators'
//! parameters (and so with the model's config), tensors present in the weights, capacities
//! non-zero, names unique, no cycle. Weights, expert stores and transfers are resolved in
//! `weights`. Every problem is reported, each at its place.

use super::expand::{expand, Ep, Flat, Value};
use super::syntax::{Diagnostic, File, Span};
use super::weights::Weights;
use crate::graph::{Edge, Graph, Node, Port};
use crate::safetensors::WeightIndex;
use std::collections::{BTreeMap, HashMap, HashSet};
use weir_operators::{Carries, OpConfig, ParamValue};
use weir_runtime::LaneKind;

/// What the checker needs besides the file.
pub struct CheckInput<'a> {
    /// Variables (the model's, see [`super::model_vars`]); empty without a model.
    pub vars: Vec<(String, Value)>,
    /// The model's weights; without them, tensors are not looked up and shapes come from the
    /// operators.
    pub weights: Option<&'a WeightIndex>,
    /// CPUs this process may use (for `cores=` and `threads=`).
    pub cpus: Vec<usize>,
    /// The process this check places for (`None`: `main`); the cores of other processes'
    /// lanes are theirs to check.
    pub process: Option<String>,
}

/// Expands and checks a parsed file into a graph, or returns every problem found.
pub fn check(file: &File, input: &CheckInput) -> Result<Graph, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let flat = expand(&file.stmts, &input.vars, &mut errors);
    let graph = Resolver::new(&flat, input, &mut errors).resolve();
    if errors.is_empty() {
        Ok(graph)
    } else {
        errors.sort_by_key(|d| d.span);
        errors.dedup();
        Err(errors)
    }
}

/// What a lane is asked to hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum LaneUse {
    /// Operators: a cpu or gpu lane.
    Compute,
    /// A `kv_send`: it waits on the network, so an io lane (or a cpu lane, taking turns).
    Send,
    /// Weights: an io, nvme or cpu lane (a cpu lane takes turns reading and computing).
    Loader,
    /// An expert store: an nvme lane (it reads with io_uring).
    Store,
}

/// The state of resolving one file.
pub(super) struct Resolver<'a> {
    pub f: &'a Flat,
    pub input: &'a CheckInput<'a>,
    errors: &'a mut Vec<Diagnostic>,
    pub graph: Graph,
    lane_idx: HashMap<String, (usize, Span)>,
    pub node_idx: HashMap<String, (usize, Span)>,
    /// Nodes that could not be built: references to them are not reported again as unknown.
    pub broken: HashSet<String>,
    /// Input ports fed so far, and where.
    fed: HashMap<(usize, usize), Span>,
    /// Output ports that feed something.
    pub feeds_out: HashSet<(usize, usize)>,
    /// Ports named by a statement that failed: already reported, not reported again as
    /// unconnected.
    pub tried_in: HashSet<(usize, usize)>,
    tried_out: HashSet<(usize, usize)>,
}

impl<'a> Resolver<'a> {
    fn new(f: &'a Flat, input: &'a CheckInput<'a>, errors: &'a mut Vec<Diagnostic>) -> Self {
        Resolver {
            f,
            input,
            errors,
            graph: Graph::new(Vec::new()),
            lane_idx: HashMap::new(),
            node_idx: HashMap::new(),
            broken: HashSet::new(),
            fed: HashMap::new(),
            feeds_out: HashSet::new(),
            tried_in: HashSet::new(),
            tried_out: HashSet::new(),
        }
    }

    pub fn err(&mut self, span: Span, message: String) {
        self.errors.push(Diagnostic { span, message });
    }

    fn resolve(mut self) -> Graph {
        self.lanes();
        self.nodes();
        self.edges();
        let mut weights = Weights::default();
        weights.read(&mut self);
        let entry = self.end(false);
        let exit = self.end(true);
        weights.stores(&mut self);
        weights.transfers(&mut self);
        self.connected();
        self.acyclic();
        weights.loaders(&mut self);
        self.graph.host_budget = self.f.host_budget;
        self.graph.gpu_budget = self.f.gpu_budget;
        if let (Some(e), Some(x)) = (entry, exit) {
            self.graph.entry = e;
            self.graph.exit = x;
        }
        self.graph
    }

    /// The `process` statements, and each lane's `process=`: a declared process (or `main`).
    fn processes(&mut self) {
        for p in &self.f.processes {
            if self.graph.processes.iter().any(|q| q.name == p.name) {
                self.err(p.span, format!("process `{}` is declared twice", p.name));
                continue;
            }
            self.graph.processes.push(crate::graph::Process { name: p.name.clone(), at: p.at.clone() });
        }
        for l in &self.f.lanes {
            let Some((_, v, sp)) = l.attrs.iter().find(|(k, _, _)| k == "process") else { continue };
            let Value::Str(name) = v else {
                self.err(*sp, format!("`process` must name a process, found {v}"));
                continue;
            };
            if name == crate::graph::MAIN {
                continue;
            }
            if !self.graph.processes.iter().any(|p| &p.name == name) {
                let mut known: Vec<&str> = self.graph.processes.iter().map(|p| p.name.as_str()).collect();
                known.insert(0, crate::graph::MAIN);
                let m = format!(
                    "lane `{}`: unknown process `{name}` (declared: {}; add `process {name} at=\"HOST:PORT\"`)",
                    l.name,
                    known.join(", ")
                );
                self.err(*sp, m);
                continue;
            }
            self.graph.lane_process.insert(l.name.clone(), name.clone());
        }
    }

    fn lanes(&mut self) {
        self.processes();
        for l in &self.f.lanes {
            if let Some((_, first)) = self.lane_idx.get(&l.name) {
                let m = format!("lane `{}` is declared twice (first at {first})", l.name);
                self.err(l.span, m);
                continue;
            }
            let mut problems = Vec::new();
            // Another process's lane is checked against the CPUs over there, by that process.
            let mine = self.graph.lane_process.get(&l.name).map_or(crate::graph::MAIN, String::as_str)
                == self.input.process.as_deref().unwrap_or(crate::graph::MAIN);
            let anywhere: Vec<usize>;
            let cpus = if mine {
                &self.input.cpus
            } else {
                anywhere = (0..4096).collect();
                &anywhere
            };
            let lane = super::lanes::lane(l, cpus, &mut |sp, m| problems.push((sp, m)));
            problems.into_iter().for_each(|(sp, m)| self.err(sp, m));
            if let Some(lane) = lane {
                self.lane_idx.insert(l.name.clone(), (self.graph.lanes.len(), l.span));
                self.graph.lanes.push(lane);
            }
        }
    }

    /// The lane named `name`, if it is declared and fits `usage` (else reported).
    pub fn lane_of(&mut self, name: &(String, Span), usage: LaneUse) -> Option<usize> {
        let Some(&(i, _)) = self.lane_idx.get(&name.0) else {
            let mut known: Vec<&str> = self.lane_idx.keys().map(String::as_str).collect();
            known.sort();
            let m = format!("unknown lane `{}` (declared: {})", name.0, known.join(", "));
            self.err(name.1, m);
            return None;
        };
        let kind = &self.graph.lanes[i].kind;
        let (fits, what) = match usage {
            LaneUse::Compute => (
                matches!(kind, LaneKind::Cpu { .. } | LaneKind::GpuStream { .. }),
                "operators run on a cpu or gpu lane",
            ),
            // A cpu lane takes turns reading and computing: the no-overlap baseline
            // (`--prefetch 0`) places loaders so.
            LaneUse::Loader => {
                (!matches!(kind, LaneKind::GpuStream { .. }), "weights are loaded on an io, nvme or cpu lane")
            }
            LaneUse::Store => {
                (matches!(kind, LaneKind::Nvme { .. }), "an expert store reads with io_uring, on an nvme lane")
            }
            LaneUse::Send => (
                matches!(kind, LaneKind::Io { .. } | LaneKind::Cpu { .. }),
                "kv_send, net_send and net_recv wait on the network, on an io lane (or a cpu lane)",
            ),
        };
        if !fits {
            let m = format!("lane `{}` is a {} lane, but {what}", name.0, self.graph.lanes[i].describe());
            self.err(name.1, m);
            return None;
        }
        Some(i)
    }

    fn nodes(&mut self) {
        let first_compute = self.graph.lanes.iter().position(|l| !matches!(l.kind, LaneKind::Io { .. }));
        for n in &self.f.nodes {
            if let Some((_, first)) = self.node_idx.get(&n.name) {
                let m = format!("node `{}` is declared twice (first at {first})", n.name);
                self.err(n.span, m);
                continue;
            }
            let params: BTreeMap<String, ParamValue> =
                n.params.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
            let op = match OpConfig::from_params(&n.kind.0, &params) {
                Ok(op) => op,
                Err(es) => {
                    self.broken.insert(n.name.clone());
                    for (param, m) in es.into_iter().filter(|_| !n.poisoned) {
                        let at = param.and_then(|p| n.params.get(&p).map(|x| x.1));
                        let sp = at.unwrap_or(if m.contains("unknown operator") { n.kind.1 } else { n.span });
                        self.err(sp, format!("node `{}`: {m}", n.name));
                    }
                    continue;
                }
            };
            let usage = match op {
                OpConfig::ExpertStore(_) => LaneUse::Store,
                OpConfig::KvSend(_) | OpConfig::NetSend(_) | OpConfig::NetRecv(_) => LaneUse::Send,
                _ => LaneUse::Compute,
            };
            let placed = self.f.places.iter().rev().find(|p| {
                p.lane.is_some()
                    && p.layers.is_none_or(|(a, b)| n.layer.is_some_and(|l| (l as i64) >= a && (l as i64) < b))
                    && p.kind.as_ref().is_none_or(|k| *k == n.kind.0)
            });
            let lane = match n.lane.clone().or(placed.and_then(|p| p.lane.clone())).or(self.f.default_lane.clone()) {
                Some(l) => self.lane_of(&l, usage),
                None if usage == LaneUse::Store => {
                    self.err(n.span, format!("node `{}`: an expert store needs `lane=` (an nvme lane)", n.name));
                    None
                }
                None => first_compute.or_else(|| {
                    self.err(n.span, format!("node `{}` has no lane: declare a cpu lane", n.name));
                    None
                }),
            };
            let Some(lane) = lane else {
                self.broken.insert(n.name.clone());
                continue;
            };
            self.node_idx.insert(n.name.clone(), (self.graph.nodes.len(), n.span));
            self.graph.nodes.push(Node { name: n.name.clone(), op, lane, layer: n.layer.map(|l| l as u32) });
        }
    }

    /// The node and port an endpoint names (an output port if `output`); a port left out is
    /// the first. `None` if either is unknown (reported).
    pub fn endpoint(&mut self, e: &Ep, output: bool) -> Option<(usize, usize)> {
        let Some(&(n, _)) = self.node_idx.get(&e.node) else {
            if !self.broken.contains(&e.node) {
                self.err(e.span, format!("unknown node `{}`", e.node));
            }
            return None;
        };
        let op = &self.graph.nodes[n].op;
        let ports = if output { op.outputs() } else { op.inputs() };
        let Some((p, sp)) = &e.port else { return Some((n, 0)) };
        match ports.iter().position(|x| x == p) {
            Some(i) => Some((n, i)),
            None => {
                let dir = if output { "output" } else { "input" };
                let (kind, list) = (op.kind(), ports.join(", "));
                self.err(*sp, format!("node `{}` ({kind}) has no {dir} port `{p}` ({dir}s: {list})", e.node));
                None
            }
        }
    }

    /// Marks input `to` fed; false (reported) if it already was.
    pub fn connect_in(&mut self, to: (usize, usize), sp: Span) -> bool {
        if let Some(first) = self.fed.get(&to) {
            let n = &self.graph.nodes[to.0];
            let m = format!("input `{}.{}` is fed twice (first at {first})", n.name, n.op.inputs()[to.1]);
            self.err(sp, m);
            return false;
        }
        self.fed.insert(to, sp);
        true
    }

    fn edges(&mut self) {
        let default_cap = self.f.default_capacity.map_or(2, |c| c.0);
        for e in &self.f.edges {
            let (from, to) = (self.endpoint(&e.from, true), self.endpoint(&e.to, false));
            self.tried_out.extend(from);
            self.tried_in.extend(to);
            let (Some(from), Some(to)) = (from, to) else { continue };
            if !self.edge_fits(e, from, to) || !self.connect_in(to, e.to.span) {
                continue;
            }
            self.feeds_out.insert(from);
            let (from, to) = (Port { node: from.0, port: from.1 }, Port { node: to.0, port: to.1 });
            self.graph.edges.push(Edge::new(from, to, e.capacity.map_or(default_cap, |c| c.0)));
        }
    }

    /// Whether an edge may join these ports (what each carries); reported if not. A weight
    /// port may be fed by an edge only from a transfer (the checker follows the transfer back
    /// to its weight); what passes through a transfer is checked in `weights`.
    fn edge_fits(&mut self, e: &super::expand::EdgeDecl, from: (usize, usize), to: (usize, usize)) -> bool {
        let (fnode, tnode) = (&self.graph.nodes[from.0], &self.graph.nodes[to.0]);
        let in_name = tnode.op.inputs()[to.1].clone();
        let out_name = fnode.op.outputs()[from.1].clone();
        let (out, takes) = (fnode.op.output_carries(from.1), tnode.op.input_carries(to.1));
        let message = if tnode.op.weight_shape(to.1).is_some() && out != Carries::Any {
            format!("input `{}.{in_name}` takes a weight: feed it with a `weight` statement", tnode.name)
        } else if tnode.op.takes_ids(to.1) {
            format!("input `{}.{in_name}` takes token ids: feed it with the `input` statement", tnode.name)
        } else if out == Carries::Tokens {
            let m = format!(
                "output `{}.{out_name}` carries sampled tokens: route it to the `output` statement",
                fnode.name
            );
            self.err(e.from.span, m);
            return false;
        } else {
            match takes {
                Some(b) if b != Carries::Any && out != Carries::Any && out != b => {
                    format!("edge `{}.{out_name}` -> `{}.{in_name}`: expected {b}, found {out}", fnode.name, tnode.name)
                }
                _ => return true,
            }
        };
        self.err(e.to.span, message);
        false
    }

    /// The graph's entry (`input`) or exit (`output`).
    fn end(&mut self, output: bool) -> Option<Port> {
        let what = if output { "output" } else { "input" };
        let eps = if output { &self.f.outputs } else { &self.f.inputs };
        // A worker's part (every lane in another process) has neither: the scheduler is in `main`.
        let worker = !self.graph.lanes.is_empty() && self.graph.lane_process.len() == self.graph.lanes.len();
        if eps.is_empty() && worker {
            return None;
        }
        if eps.is_empty() {
            let which =
                if output { "(which port gives the sampled tokens?)" } else { "(which port takes the token ids?)" };
            self.err(Span { line: 1, col: 1 }, format!("no `{what}` statement: the graph needs one {which}"));
            return None;
        }
        for extra in &eps[1..] {
            self.err(extra.span, format!("a second `{what}` statement (the first is at {})", eps[0].span));
        }
        let e = &eps[0];
        let (n, p) = self.endpoint(e, output)?;
        let (name, op) = (&self.graph.nodes[n].name, &self.graph.nodes[n].op);
        if output {
            if op.output_carries(p) != Carries::Tokens {
                let m =
                    format!("`output` must be a sampler's tokens, found `{name}.{}` ({})", op.outputs()[p], op.kind());
                self.err(e.span, m);
                return None;
            }
            self.feeds_out.insert((n, p));
        } else {
            if !op.takes_ids(p) {
                let m =
                    format!("`input` must be an embedding's ids, found `{name}.{}` ({})", op.inputs()[p], op.kind());
                self.err(e.span, m);
                return None;
            }
            if !self.connect_in((n, p), e.span) {
                return None;
            }
        }
        Some(Port { node: n, port: p })
    }

    /// Every port connected.
    fn connected(&mut self) {
        for i in 0..self.graph.nodes.len() {
            let n = &self.graph.nodes[i];
            let decl_span = self.node_idx[&n.name].1;
            let mut problems = Vec::new();
            for (p, port) in n.op.input_ports().iter().enumerate() {
                if !self.fed.contains_key(&(i, p)) && !self.tried_in.contains(&(i, p)) {
                    let how = if matches!(port.carries, Carries::Weight(_)) { "a `weight`" } else { "an `edge`" };
                    problems.push(format!("input `{}.{}` is not connected (add {how} statement)", n.name, port.name));
                }
            }
            // An expert store's outputs are made by the `weight … store=` statements that name it.
            if !matches!(n.op, OpConfig::ExpertStore(_)) {
                for (p, name) in n.op.outputs().iter().enumerate() {
                    if !self.feeds_out.contains(&(i, p)) && !self.tried_out.contains(&(i, p)) {
                        problems.push(format!("output `{}.{name}` goes nowhere", n.name));
                    }
                }
            }
            problems.into_iter().for_each(|m| self.err(decl_span, m));
        }
    }

    /// No cycles (every edge here is unbuffered: a cycle would never fire).
    fn acyclic(&mut self) {
        let nodes = &self.graph.nodes;
        let mut succ: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
        for e in &self.graph.edges {
            succ[e.from.node].push(e.to.node);
        }
        let mut state = vec![0u8; nodes.len()];
        for s in 0..nodes.len() {
            if state[s] != 0 {
                continue;
            }
            if let Some(cyc) = find_cycle(s, &succ, &mut state, &mut Vec::new()) {
                let names: Vec<&str> = cyc.iter().map(|&i| nodes[i].name.as_str()).collect();
                let m = format!("cycle {} (no edge in it is buffered, so it can never fire)", names.join(" -> "));
                let sp = self.node_idx[&nodes[cyc[0]].name].1;
                self.err(sp, m);
                return;
            }
        }
    }
}

/// A cycle through `u`'s descendants, if there is one (depth first; `state`: 0 unseen, 1 on
/// the path, 2 done).
fn find_cycle(u: usize, succ: &[Vec<usize>], state: &mut [u8], path: &mut Vec<usize>) -> Option<Vec<usize>> {
    state[u] = 1;
    path.push(u);
    for &v in &succ[u] {
        if state[v] == 1 {
            let start = path.iter().position(|&x| x == v).unwrap_or(0);
            let mut cyc = path[start..].to_vec();
            cyc.push(v);
            return Some(cyc);
        }
        if state[v] == 0 {
            if let Some(c) = find_cycle(v, succ, state, path) {
                return Some(c);
            }
        }
    }
    path.pop();
    state[u] = 2;
    None
}
