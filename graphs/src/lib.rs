//! weir-graphs: turns a model folder and a placement into a placed graph; runs nothing.
//!
//! * [`config`] — `config.json` / `generation_config.json` (both transformers spellings).
//! * [`safetensors`] — safetensors headers, single-file and sharded; the data stays on disk.
//! * [`llama`] — the Llama family's tensors, checked against the config.
//! * [`experts`] — expert placement across tiers: hot experts resident, the rest read when chosen.
//! * [`offload`] — where each activated expert outside the fast tier is computed (makespan).
//! * [`plan`] — the memory planner: which weights stay resident, which stream, under a budget.
//! * [`graph`] — the IR: nodes on lanes, bounded edges, one entry and one exit; DOT dumps.
//! * [`format`] — graph definition files: parse (with spans), check, print.
//! * [`builtin`] — the built-in architectures as graph files (`graphs/*.weir`).

pub mod builtin;
pub mod config;
pub mod error;
pub mod experts;
pub mod format;
pub mod graph;
pub mod llama;
/// The per-step decision lives with the expert stores that make it.
pub use weir_operators::offload;
pub mod plan;
pub mod safetensors;

pub use config::{Architecture, ModelConfig, MoeConfig};
pub use error::{Error, Result};
pub use graph::Graph;
pub use safetensors::WeightIndex;

/// Parses and checks a graph file for a model: `text` is the file's content, `file` its name
/// in messages, `threads` and `kv_dtype` the values of those variables.
pub fn load_graph(
    text: &str,
    file: &str,
    config: &ModelConfig,
    weights: &WeightIndex,
    threads: usize,
    kv_dtype: weir_operators::KvType,
) -> std::result::Result<Graph, format::Report> {
    let cpus = weir_runtime::lane::allowed_cpus();
    let threads = if threads == 0 { cpus.len() } else { threads };
    let input =
        format::CheckInput { vars: format::model_vars(config, threads, kv_dtype), weights: Some(weights), cpus };
    format::load_str(text, file, &input)
}
