//! A graph → graph-file text. What `weir graph show` prints: every lane, every node with every
//! parameter, lane and layer — transfers and expert stores included —, every edge with its
//! capacity, every weight with its loader lane and tier or its expert store: nothing left to
//! defaults or loops. Parsing the text back gives the same graph, and running it runs the same
//! actors.

use crate::graph::{Graph, Port};
use std::fmt::Write;
use weir_operators::OpConfig;
use weir_runtime::LaneKind;

/// Quotes a string for a graph file (braces escaped: they would interpolate).
pub fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' | '{' | '}' => {
                q.push('\\');
                q.push(c);
            }
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// A lane's or node's name as an attribute's value: bare, or quoted where it is also a
/// variable's name (a bare word is read as the variable).
fn name_value(name: &str) -> String {
    if super::expand::VARIABLES.contains(&name) {
        quote(name)
    } else {
        name.to_string()
    }
}

/// The graph as a version-1 graph file.
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    let compute = g.nodes.iter().filter(|n| !matches!(n.op, OpConfig::Load(_))).count();
    let _ = writeln!(s, "weir {}", super::syntax::VERSION);
    let _ = writeln!(s, "# compiled and placed: {} lanes, {compute} operators, {} edges", g.lanes.len(), g.edges.len());
    s.push('\n');
    for p in &g.processes {
        let at = p.at.as_ref().map_or(String::new(), |a| format!(" at={}", quote(a)));
        let _ = writeln!(s, "process {}{at}", p.name);
    }
    for l in &g.lanes {
        let mut line = match &l.kind {
            LaneKind::Cpu { cores } => {
                let cores = cores.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
                format!("lane {} cpu cores={cores}", l.name)
            }
            LaneKind::Io { core: Some(c) } => format!("lane {} io core={c}", l.name),
            LaneKind::Io { core: None } => format!("lane {} io", l.name),
            LaneKind::Nvme { core, depth, chunk } => {
                let core = core.map_or(String::new(), |c| format!(" core={c}"));
                format!("lane {} nvme depth={depth} chunk={chunk}{core}", l.name)
            }
            LaneKind::GpuStream { device, stream } => format!("lane {} gpu device={device} stream={stream}", l.name),
        };
        // A worker's part: every lane its own (lanes later passes added included).
        let process = match g.part.as_deref() {
            Some(p) if p != crate::graph::MAIN => Some(p),
            Some(_) => None,
            None => g.lane_process.get(&l.name).map(String::as_str),
        };
        if let Some(p) = process {
            line.push_str(&format!(" process={}", name_value(p)));
        }
        let _ = writeln!(s, "{line}");
    }
    for (k, b) in [("host", g.host_budget), ("gpu", g.gpu_budget)] {
        if let Some(b) = b {
            let _ = writeln!(s, "budget {k}={b}");
        }
    }
    s.push('\n');
    for n in g.nodes.iter().filter(|n| !matches!(n.op, OpConfig::Load(_))) {
        let _ = write!(s, "node {} = {}", n.name, n.op.kind());
        for (k, v) in n.op.params() {
            let _ = write!(s, " {k}={v}");
        }
        let _ = write!(s, " lane={}", name_value(&g.lanes[n.lane].name));
        if let Some(l) = n.layer {
            let _ = write!(s, " layer={l}");
        }
        s.push('\n');
    }
    s.push('\n');
    let in_name = |p: &Port| format!("{}.{}", g.nodes[p.node].name, g.nodes[p.node].op.inputs()[p.port]);
    if g.drives() {
        let _ = writeln!(s, "input {}", in_name(&g.entry));
    }
    let reader = |i: usize| matches!(g.nodes[i].op, OpConfig::Load(_) | OpConfig::ExpertStore(_));
    for e in g.edges.iter().filter(|e| !reader(e.from.node)) {
        let from = &g.nodes[e.from.node];
        let out = &from.op.outputs()[e.from.port];
        let _ = writeln!(s, "edge {}.{out} -> {} capacity={}", from.name, in_name(&e.to), e.capacity);
    }
    if g.drives() {
        let x = &g.nodes[g.exit.node];
        let _ = writeln!(s, "output {}.{}", x.name, x.op.outputs()[g.exit.port]);
    }
    s.push('\n');
    // A tensor's consumers by name: the same whatever order the passes left its edges in.
    let by_name = |es: &mut Vec<&crate::graph::Edge>| {
        es.sort_by(|a, b| (&g.nodes[a.to.node].name, a.to.port).cmp(&(&g.nodes[b.to.node].name, b.to.port)))
    };
    for (li, l) in g.loaders() {
        for (port, t) in l.tensors.iter().enumerate() {
            let mut edges: Vec<_> = g.edges_from(li, port).collect();
            by_name(&mut edges);
            for e in edges {
                // Into a transfer: its edges say how the weight is used on the other side.
                let uses = match &g.nodes[e.to.node].op {
                    OpConfig::ToGpu(_) | OpConfig::ToHost(_) => g.edges_from(e.to.node, 0).map(|x| x.uses).max(),
                    _ => Some(e.uses),
                };
                let uses = uses.filter(|&u| u > 1).map_or(String::new(), |u| format!(" uses={u}"));
                let (to, lane, tier) = (in_name(&e.to), name_value(&g.lanes[g.nodes[li].lane].name), l.tier(port));
                let _ = writeln!(
                    s,
                    "weight {to} = {} lane={lane} capacity={} tier={tier}{uses}",
                    quote(&t.name),
                    e.capacity
                );
            }
        }
    }
    for (si, st) in g.nodes.iter().enumerate() {
        let OpConfig::ExpertStore(spec) = &st.op else { continue };
        let sides = if spec.twins.is_some() { 2 } else { 1 };
        let mut edges: Vec<_> = g.edges.iter().filter(|e| e.from.node == si).collect();
        edges.sort_by_key(|e| e.from.port);
        for e in edges {
            let t = &spec.tensors[3 * (e.from.port / (3 * sides)) + e.from.port % 3];
            let (to, store) = (in_name(&e.to), name_value(&st.name));
            let _ = writeln!(s, "weight {to} = {} store={store} capacity={}", quote(&t.name), e.capacity);
        }
    }
    s
}
