//! `weir graph check`: a graph file checked — against a model, placed as `weir run` would
//! place it — and what it would run, in one line.

use crate::error::{Error, Result};
use crate::model::Model;
use weir_graphs::place::memory::Reserve;
use weir_graphs::{Graph, PlaceOptions};
use weir_operators::attention::KV_BLOCK_TOKENS;
use weir_operators::OpConfig;

/// Checks graph file `text` (named `name` in messages): with `model`, placed for it with
/// `threads` compute threads, as the engine would — with the least reserve a run can have (one
/// KV block, passes of one token), since the run's options decide it —; without, its syntax
/// and structure, with the transfers the placement would add. Every problem is an error (a graph file's as
/// `file:line:col` lines); the summary says how many lanes, operators and edges run, how many
/// operators run on GPU lanes and how many transfers move data to and from GPU memory; for a
/// graph over several processes, each process's part.
pub fn check_graph(text: &str, name: &str, model: Option<&Model>, threads: usize) -> Result<String> {
    let g = match model {
        Some(m) => {
            let reserve = Reserve { kv_tokens: KV_BLOCK_TOKENS, pass_tokens: 1, passes: 1 };
            let place = |process: Option<String>| {
                let o = PlaceOptions { threads, reserve, process, ..Default::default() };
                m.place(Some((text, name)), &o).map(|p| p.graph)
            };
            let g = place(None)?;
            if g.part.is_none() {
                return Ok(format!("{name}: ok ({})", summary(&g)));
            }
            // A graph over several processes: each process's part (a worker's file has no `main`).
            let mut parts = Vec::new();
            if !g.nodes.is_empty() {
                parts.push(format!("main: {}", summary(&g)));
            }
            for p in g.processes.iter().filter(|p| p.name != weir_graphs::graph::MAIN) {
                let part = place(Some(p.name.clone()))?;
                if !part.nodes.is_empty() {
                    parts.push(format!("{}: {}", p.name, summary(&part)));
                }
            }
            return Ok(format!("{name}: ok ({})", parts.join("; ")));
        }
        None => {
            let cpus = weir_runtime::lane::allowed_cpus();
            let input = weir_graphs::format::CheckInput { vars: vec![], weights: None, cpus, process: None };
            let mut g = weir_graphs::format::load_str(text, name, &input).map_err(Error::Graph)?;
            weir_graphs::place::transfers::insert(&mut g).map_err(|e| Error::Placement(format!("{name}: {e}")))?;
            g
        }
    };
    Ok(format!("{name}: ok ({})", summary(&g)))
}

/// Lanes, operators and edges of a placed graph, and its GPU work if any.
pub fn summary(g: &Graph) -> String {
    let transfer = |op: &OpConfig| matches!(op, OpConfig::ToGpu(_) | OpConfig::ToHost(_));
    let ops = g.nodes.iter().filter(|n| !matches!(n.op, OpConfig::Load(_)) && !transfer(&n.op)).count();
    let mut s = format!("{} lanes, {ops} operators, {} edges", g.lanes.len(), g.edges.len());
    let on_gpu = g
        .nodes
        .iter()
        .filter(|n| g.lanes[n.lane].kind.is_gpu() && !transfer(&n.op) && !matches!(n.op, OpConfig::Load(_)))
        .count();
    let up = g.nodes.iter().filter(|n| matches!(n.op, OpConfig::ToGpu(_))).count();
    let down = g.nodes.iter().filter(|n| matches!(n.op, OpConfig::ToHost(_))).count();
    if on_gpu + up + down > 0 {
        s += &format!("; {on_gpu} operators on GPU lanes, {up} transfers to GPU memory and {down} back");
    }
    s
}
