//! Pass (a prefill worker's, `--role prefill`): export the KV cache. Every attention node
//! gets `export=true`, and its `kv` output an edge to a `kv_send` node of its own on the I/O
//! lane `kvnet`, which sends each layer's keys and values to the sequence's decode worker as
//! soon as that layer has run (`weir_operators::kv_link`). A graph that already has its
//! `kv_send` nodes (a printed one, or a file that places them itself) gets none added.
//!
//! Attention on a GPU lane exports too (its rows brought back to the host each exporting
//! pass; the transfers pass puts a `to_host` on its `kv` edge): GPU prefill, CPU decode.

use crate::error::Result;
use crate::graph::{Edge, Graph, Node, Port};
use weir_operators::{kv_send, KvType, OpConfig};
use weir_runtime::LaneSpec;

/// The lane the pass puts `kv_send` nodes on.
pub const KV_LANE: &str = "kvnet";

/// Runs the pass.
pub fn export(g: &mut Graph) -> Result<()> {
    if g.nodes.iter().any(|n| matches!(n.op, OpConfig::KvSend(_))) {
        return Ok(());
    }
    let attention: Vec<usize> =
        (0..g.nodes.len()).filter(|&i| matches!(g.nodes[i].op, OpConfig::Attention(_))).collect();
    let lane = match g.lanes.iter().position(|l| l.name == KV_LANE) {
        Some(l) => l,
        None => {
            g.lanes.push(LaneSpec::io(KV_LANE, None));
            g.lanes.len() - 1
        }
    };
    for i in attention {
        if let OpConfig::Attention(a) = &mut g.nodes[i].op {
            a.export = true;
        }
        let (name, layer) = (format!("{}_kv", g.nodes[i].name), g.nodes[i].layer);
        g.nodes.push(Node { name, op: OpConfig::KvSend(kv_send::Spec), lane, layer });
        let to = Port { node: g.nodes.len() - 1, port: 0 };
        g.edges.push(Edge::new(Port { node: i, port: 1 }, to, 4));
    }
    Ok(())
}

/// Every attention node of `g` with its `kv_heads·head_dim`, in graph order, and the KV
/// cache's element type: what both ends of a KV edge must agree on.
pub fn attention_nodes(g: &Graph) -> (Vec<(String, usize)>, KvType) {
    let mut ty = KvType::F32;
    let nodes = g
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            OpConfig::Attention(a) => {
                ty = a.kv;
                Some((n.name.clone(), a.kv_heads * a.head_dim))
            }
            _ => None,
        })
        .collect();
    (nodes, ty)
}
