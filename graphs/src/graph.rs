//! The graph IR: operators placed on lanes, wired by bounded edges. A graph file is checked
//! into one (`format`), the placement passes rewrite it (`place`), and the `weir` crate turns
//! the placed graph into a running program, one actor per node and one channel per edge — so
//! what `weir graph show` prints of it is what runs. This crate never runs anything.

use std::fmt::Write;
use weir_operators::{Mem, OpConfig};
use weir_runtime::{LaneKind, LaneSpec};

/// One end of an edge: a node's port, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
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

impl Edge {
    /// A plain edge (not sticky, each message used once).
    pub fn new(from: Port, to: Port, capacity: usize) -> Edge {
        Edge { from, to, capacity, sticky: false, uses: 1 }
    }
}

/// A process a graph spreads over: `process NAME [at="ADDR"]`. `main` is the one that runs
/// the scheduler (the graph's `input` and `output`); it need not be declared.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    pub name: String,
    /// Where it listens for the edges that come to it (`HOST:PORT` or `unix:PATH`).
    pub at: Option<String>,
}

/// The process that runs the scheduler.
pub const MAIN: &str = "main";

/// A placed dataflow graph with one entry (token ids in) and one exit (sampled tokens out).
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub lanes: Vec<LaneSpec>,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub entry: Port,
    pub exit: Port,
    /// The host tier's budget in bytes (`budget host=…`), if the file or the placement sets one.
    pub host_budget: Option<u64>,
    /// Each GPU's memory budget in bytes (`budget gpu=…`), if the file or the placement sets one.
    pub gpu_budget: Option<u64>,
    /// The processes the file declares (`process` statements), in order.
    pub processes: Vec<Process>,
    /// Lane name → its process, for the lanes outside `main` (`lane … process=NAME`).
    pub lane_process: std::collections::BTreeMap<String, String>,
    /// Which process's part this is, once the placement has cut a graph over several processes
    /// (`place::processes`): its lanes are that process's, its edges to others `net_send` and
    /// `net_recv` nodes. `None`: a whole graph.
    pub part: Option<String>,
}

/// Which memory a port's data is in: the host's, or GPU `d`'s.
pub type Memory = Option<usize>;

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
            gpu_budget: None,
            processes: Vec::new(),
            lane_process: Default::default(),
            part: None,
        }
    }

    /// The process lane `lane` runs in.
    pub fn process_of(&self, lane: usize) -> &str {
        self.lane_process.get(&self.lanes[lane].name).map_or(MAIN, String::as_str)
    }

    /// Whether this graph (or part) drives passes: it has the scheduler's entry and exit.
    pub fn drives(&self) -> bool {
        self.part.as_deref().is_none_or(|p| p == MAIN)
    }

    /// The GPU lane `lane` drives, if it is one.
    pub fn lane_device(&self, lane: usize) -> Option<usize> {
        match self.lanes[lane].kind {
            LaneKind::GpuStream { device, .. } => Some(device),
            _ => None,
        }
    }

    /// Where node `node`'s inputs (`output = false`) or outputs are: in its lane's memory, or
    /// in host memory for what keeps its data there wherever it runs (see `Mem`).
    pub fn memory(&self, node: usize, output: bool) -> Memory {
        let n = &self.nodes[node];
        let (inputs, outputs) = n.op.memories();
        match if output { outputs } else { inputs } {
            Mem::Lane => self.lane_device(n.lane),
            Mem::Host => None,
        }
    }

    /// Whether any node keeps data in a GPU's memory.
    pub fn on_gpu(&self) -> bool {
        !self.devices().is_empty()
    }

    /// The GPUs whose memory some node uses, in order.
    pub fn devices(&self) -> Vec<usize> {
        let mut d: Vec<usize> =
            (0..self.nodes.len()).flat_map(|n| [self.memory(n, false), self.memory(n, true)]).flatten().collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// The edges leaving output `port` of `node`.
    pub fn edges_from(&self, node: usize, port: usize) -> impl Iterator<Item = &Edge> + '_ {
        self.edges.iter().filter(move |e| e.from.node == node && e.from.port == port)
    }

    /// The edge into input `port` of `node`, if one feeds it.
    pub fn edge_into(&self, node: usize, port: usize) -> Option<&Edge> {
        self.edges.iter().find(|e| e.to.node == node && e.to.port == port)
    }

    /// The node named `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// A node name not yet taken: `base`, else `base/2`, `base/3`, …
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| self.nodes.iter().any(|x| x.name == n);
        if !taken(base) {
            return base.to_string();
        }
        (2..).map(|i| format!("{base}/{i}")).find(|n| !taken(n)).unwrap_or_default()
    }

    /// A lane name not yet taken: `base`, else `base2`, `base3`, …
    pub fn fresh_lane(&self, base: &str) -> String {
        let taken = |n: &str| self.lanes.iter().any(|l| l.name == n);
        if !taken(base) {
            return base.to_string();
        }
        (2..).map(|i| format!("{base}{i}")).find(|n| !taken(n)).unwrap_or_default()
    }

    /// The loader nodes, with their specs.
    pub fn loaders(&self) -> impl Iterator<Item = (usize, &weir_operators::loader::Spec)> + '_ {
        self.nodes.iter().enumerate().filter_map(|(i, n)| match &n.op {
            OpConfig::Load(l) => Some((i, l)),
            _ => None,
        })
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
