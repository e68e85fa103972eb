//! A graph → graph-file text. What `weir graph show` prints: every node with every parameter,
//! lane and layer, every edge with its capacity, every weight with its loader lane — nothing
//! left to defaults or loops. Parsing the text back gives the same graph.

use crate::graph::Graph;
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

/// The graph as a version-1 graph file.
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    let compute = g.nodes.iter().filter(|n| !matches!(n.op, OpConfig::Load { .. })).count();
    let _ = writeln!(s, "weir {}", super::syntax::VERSION);
    let _ = writeln!(s, "# compiled and placed: {} lanes, {compute} operators, {} edges", g.lanes.len(), g.edges.len());
    s.push('\n');
    for l in &g.lanes {
        let _ = match &l.kind {
            LaneKind::Cpu { cores } => {
                writeln!(
                    s,
                    "lane {} cpu cores={}",
                    l.name,
                    cores.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
                )
            }
            LaneKind::Io { core: Some(c) } => writeln!(s, "lane {} io core={c}", l.name),
            LaneKind::Io { core: None } => writeln!(s, "lane {} io", l.name),
            LaneKind::Nvme { core, depth, chunk } => writeln!(
                s,
                "lane {} nvme depth={depth} chunk={chunk}{}",
                l.name,
                core.map_or(String::new(), |c| format!(" core={c}"))
            ),
            LaneKind::GpuStream { device, stream } => {
                writeln!(s, "lane {} gpu device={device} stream={stream}", l.name)
            }
        };
    }
    if let Some(b) = g.host_budget {
        let _ = writeln!(s, "budget host={b}");
    }
    s.push('\n');
    for n in &g.nodes {
        if matches!(n.op, OpConfig::Load { .. } | OpConfig::ExpertStore { .. }) {
            continue;
        }
        let _ = write!(s, "node {} = {}", n.name, n.op.kind());
        for (k, v) in n.op.params() {
            let _ = write!(s, " {k}={v}");
        }
        let _ = write!(s, " lane={}", g.lanes[n.lane].name);
        if let Some(l) = n.layer {
            let _ = write!(s, " layer={l}");
        }
        s.push('\n');
    }
    s.push('\n');
    let in_name = |p: &crate::graph::Port| format!("{}.{}", g.nodes[p.node].name, g.nodes[p.node].op.inputs()[p.port]);
    let _ = writeln!(s, "input {}", in_name(&g.entry));
    let reader = |i: usize| matches!(g.nodes[i].op, OpConfig::Load { .. } | OpConfig::ExpertStore { .. });
    for e in g.edges.iter().filter(|e| !reader(e.from.node) && !reader(e.to.node)) {
        let from = &g.nodes[e.from.node];
        let _ = writeln!(
            s,
            "edge {}.{} -> {} capacity={}",
            from.name,
            from.op.outputs()[e.from.port],
            in_name(&e.to),
            e.capacity
        );
    }
    let x = &g.nodes[g.exit.node];
    let _ = writeln!(s, "output {}.{}", x.name, x.op.outputs()[g.exit.port]);
    s.push('\n');
    for (li, l) in g.nodes.iter().enumerate() {
        let OpConfig::Load { tensors, streamed, held, .. } = &l.op else { continue };
        for (port, t) in tensors.iter().enumerate() {
            for e in g.edges.iter().filter(|e| e.from.node == li && e.from.port == port) {
                let tier = match (streamed[port], held[port]) {
                    (false, _) => "host",
                    (true, true) => "dram",
                    (true, false) => "nvme",
                };
                let uses = if e.uses > 1 { format!(" uses={}", e.uses) } else { String::new() };
                let _ = writeln!(
                    s,
                    "weight {} = {} lane={} capacity={} tier={tier}{uses}",
                    in_name(&e.to),
                    quote(&t.name),
                    g.lanes[l.lane].name,
                    e.capacity
                );
            }
        }
    }
    // Expert stores are made by the expert placement, not written in files: said as comments.
    for (si, st) in g.nodes.iter().enumerate() {
        let OpConfig::ExpertStore { served, tensors, budget, cache, hinted, .. } = &st.op else { continue };
        let list: Vec<String> = served.iter().map(|e| e.to_string()).collect();
        let _ = writeln!(
            s,
            "# {} (lane {}): experts {} read from storage when chosen, {budget} bytes{}{}",
            st.name,
            g.lanes[st.lane].name,
            list.join(", "),
            if *cache { " of cache" } else { ", nothing kept" },
            if *hinted { ", read ahead when predicted" } else { "" }
        );
        for (port, t) in tensors.iter().enumerate() {
            for e in g.edges.iter().filter(|e| e.from.node == si && e.from.port == port) {
                let _ = writeln!(s, "#   weight {} = {}", in_name(&e.to), quote(&t.name));
            }
        }
    }
    s
}
