//! The graph IR: operators placed on lanes, wired by bounded edges. Built by an architecture
//! (see [`crate::llama`]) and compiled into a running program by the `weir` crate; this crate
//! never runs anything.

use std::fmt::Write;
use weir_operators::OpConfig;
use weir_runtime::LaneSpec;

/// One end of an edge: a node's port, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Port {
    pub node: usize,
    pub port: usize,
}

/// An operator instance placed on a lane.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: OpConfig,
    pub lane: usize,
    pub layer: Option<u32>,
}

/// A bounded edge. `sticky`: the consumer keeps the last message (resident weights). `uses`:
/// a streamed weight serves that many firings (micro-batches) before the next one is taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub from: Port,
    pub to: Port,
    pub capacity: usize,
    pub sticky: bool,
    pub uses: u32,
}

/// A placed dataflow graph with one entry (token ids in) and one exit (sampled tokens out).
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub lanes: Vec<LaneSpec>,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub entry: Port,
    pub exit: Port,
    /// The host tier's budget in bytes (`budget host=…`), if the file sets one.
    pub host_budget: Option<u64>,
}

impl Graph {
    /// An empty graph on these lanes.
    pub fn new(lanes: Vec<LaneSpec>) -> Graph {
        Graph {
            lanes,
            nodes: Vec::new(),
            edges: Vec::new(),
            entry: Port { node: 0, port: 0 },
            exit: Port { node: 0, port: 0 },
            host_budget: None,
        }
    }

    /// Graphviz DOT of the graph, one cluster per lane.
    pub fn dot(&self) -> String {
        let mut s = String::from("digraph weir {\n  rankdir=TB;\n  node [shape=box, fontsize=10];\n");
        for (li, l) in self.lanes.iter().enumerate() {
            let _ = writeln!(s, "  subgraph cluster_{li} {{ label=\"{} ({})\";", l.name, l.describe());
            for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.lane == li) {
                let _ = writeln!(s, "    n{i} [label=\"{}\\n{}\"];", n.name, n.op.kind());
            }
            s.push_str("  }\n");
        }
        for e in &self.edges {
            let style = if e.sticky { " [style=dashed]" } else { "" };
            let _ = writeln!(s, "  n{} -> n{}{style};", e.from.node, e.to.node);
        }
        s.push_str("}\n");
        s
    }
}
