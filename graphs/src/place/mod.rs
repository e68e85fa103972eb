//! The placement pipeline: a model, a graph file and the run's options → the placed graph
//! that runs, one actor per node and one channel per edge.
//!
//! [`place`] runs the passes in order, each a function over the graph IR that can be called
//! and tested alone:
//!
//! 1. [`expand`] — the architecture's built-in graph file, or the user's, parsed and checked
//!    against the model's variables and weights (`format`).
//! 2. [`experts::place`] — `--expert-budget`: the most chosen experts resident, the others read
//!    by an expert store per MoE layer when chosen, twins where asked. Before the memory plan,
//!    because the stores' caches come out of the host budget first and the plan fits the rest.
//! 3. [`memory::plan`] — which weights stay resident and which stream under the budgets (the
//!    host's, the GPU's, or both: FlexGen's three tiers); micro-batches share streamed weights.
//! 4. [`loaders::assign`] — which lanes read the weights, and how (io_uring where weights
//!    stream; on the compute lane for `--prefetch 0`).
//! 5. [`kv_export::export`] — a prefill worker's (`--role prefill`): attention exports its KV
//!    cache, a `kv_send` node per attention node sends it to the decode worker.
//! 6. [`transfers::insert`] — a `to_gpu` or `to_host` node on every edge between host and GPU
//!    memory, on the device's copy lanes (a GPU attention's `kv` edge too).
//!
//! The engine, `weir graph show|dot|check` and `WEIR_DUMP_GRAPH` all call [`place`], so what
//! `graph show` prints is what runs: printed, and run with `--graph`, it gives the same actors.
//! A graph file that carries its own placement (budgets, tiers, stores, transfers: a printed
//! one) keeps it when no budget flag overrides it. Nothing here runs anything: what the
//! placement must know of the machine (its CPUs, a GPU's memory, what an expert costs on a
//! lane) it asks a [`Machine`].

pub mod experts;
pub mod kv_export;
pub mod loaders;
pub mod memory;
pub mod processes;
pub mod transfers;

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::{ModelConfig, WeightIndex};
use experts::{ExpertPlacement, ExpertPlan, ExpertShape, LaneTiming};
use memory::{HostPools, Plan, Reserve};
use weir_operators::KvType;
use weir_runtime::LaneSpec;

/// What the placement must know of the machine it places for.
pub trait Machine {
    /// The CPUs this process may use.
    fn cpus(&self) -> Vec<usize>;
    /// GPU `device`'s default memory budget (its memory less some headroom); `None` where it
    /// cannot be opened.
    fn gpu_memory(&self, device: usize) -> Option<u64>;
    /// What one expert of `shape` costs on `lane`, measured (for `--expert-twins`).
    fn expert_timing(&self, lane: &LaneSpec, shape: &ExpertShape) -> std::result::Result<LaneTiming, String>;
}

/// How to place a model: the options of `weir run` that shape the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaceOptions {
    /// Compute threads: the graph files' `threads` variable (0: every CPU this process may use).
    pub threads: usize,
    /// The KV cache's element type: the graph files' `kv_dtype` variable.
    pub kv_dtype: KvType,
    /// Loader lanes of a built-in graph.
    pub loader_lanes: usize,
    /// Host memory for weights, KV cache and activations together (`--memory-budget`).
    pub memory_budget: Option<u64>,
    /// Each GPU's memory budget (`--gpu-memory`).
    pub gpu_memory: Option<u64>,
    /// Layers of weights reading may run ahead of compute under a budget; 0 turns overlap off.
    pub prefetch: Option<usize>,
    /// Micro-batches of a step sharing one load of every streamed weight.
    pub micro_batches: usize,
    /// What a budget sets aside before weights: the KV cache and activations.
    pub reserve: Reserve,
    /// `--expert-budget` and its companions (mixture-of-experts models).
    pub experts: Option<ExpertPlacement>,
    /// A prefill worker's graph: attention exports its KV cache (`kv_export`).
    pub export_kv: bool,
    /// Which process's part of a graph over several processes to place (`None`: `main`).
    pub process: Option<String>,
}

impl Default for PlaceOptions {
    fn default() -> Self {
        PlaceOptions {
            threads: 0,
            kv_dtype: KvType::F32,
            loader_lanes: 1,
            memory_budget: None,
            gpu_memory: None,
            prefetch: None,
            micro_batches: 1,
            reserve: Reserve { kv_tokens: 2048, pass_tokens: 256, passes: 1 },
            experts: None,
            export_kv: false,
            process: None,
        }
    }
}

/// A placed graph and what the passes decided.
#[derive(Debug, Clone)]
pub struct Placed {
    pub graph: Graph,
    /// What the memory planner decided, when it planned.
    pub plan: Option<Plan>,
    /// Where the expert placement put each expert, when an expert budget was given.
    pub experts: Option<ExpertPlan>,
    /// The host pools the graph runs in, when it has a budget.
    pub pools: Option<HostPools>,
}

/// Runs the pipeline (see the module doc): `file` is a graph file's text and its name for
/// messages, `None` for the architecture's built-in one.
pub fn place(
    config: &ModelConfig,
    weights: &WeightIndex,
    file: Option<(&str, &str)>,
    o: &PlaceOptions,
    machine: &dyn Machine,
) -> Result<Placed> {
    let mut graph = expand(config, weights, file, o.threads, o.kv_dtype, o.process.as_deref(), machine)?;
    debug(&graph, "expand");
    graph = processes::cut(graph, o.process.as_deref().unwrap_or(crate::graph::MAIN))?;
    debug(&graph, "cut into processes");
    let experts = match &o.experts {
        Some(p) => {
            let mut p = p.clone();
            if let Some(t) = p.twins.as_mut() {
                experts::time_lanes(&graph, t, &|lane, shape| machine.expert_timing(lane, shape))?;
                tracing::debug!("expert timings: {:?}", t.timings);
            }
            Some(experts::place(&mut graph, &p)?)
        }
        None => None,
    };
    debug(&graph, "place experts");
    let plan = memory::plan(&mut graph, o, machine)?;
    debug(&graph, "plan memory");
    loaders::assign(&mut graph, o.loader_lanes, file.is_none(), plan.is_some(), o.prefetch);
    debug(&graph, "assign loaders");
    if o.export_kv {
        kv_export::export(&mut graph)?;
        debug(&graph, "export the KV cache");
    }
    transfers::insert(&mut graph)?;
    debug(&graph, "insert transfers");
    let pools = memory::host_pools(&graph, &o.reserve)?;
    Ok(Placed { graph, plan, experts, pools })
}

/// Says, at `debug`, what the graph is after a pass.
fn debug(g: &Graph, pass: &str) {
    let loaders = g.loaders().count();
    let (nodes, edges, lanes) = (g.nodes.len(), g.edges.len(), g.lanes.len());
    tracing::debug!("after {pass}: {nodes} nodes ({loaders} loaders), {edges} edges, {lanes} lanes");
}

/// Pass 1: the graph file (`file`: text and name; `None`: the architecture's built-in one)
/// parsed and checked for this model, with `threads` compute threads (0 = all) and KV cache
/// elements of `kv_dtype`, for `process` (`None`: `main`; see `processes`).
pub fn expand(
    config: &ModelConfig,
    weights: &WeightIndex,
    file: Option<(&str, &str)>,
    threads: usize,
    kv_dtype: KvType,
    process: Option<&str>,
    machine: &dyn Machine,
) -> Result<Graph> {
    let (text, name) = file.unwrap_or_else(|| {
        let (name, text) = crate::builtin::for_architecture(config.architecture);
        (text, name)
    });
    let cpus = machine.cpus();
    if threads > cpus.len() {
        return Err(Error::Options(format!(
            "{threads} threads asked for, but this process may use {} CPUs ({cpus:?})",
            cpus.len()
        )));
    }
    let threads = if threads == 0 { cpus.len() } else { threads };
    let vars = crate::format::model_vars(config, threads, kv_dtype);
    let input = crate::format::CheckInput { vars, weights: Some(weights), cpus, process: process.map(str::to_string) };
    crate::format::load_str(text, name, &input).map_err(Error::Graph)
}
