//! weir-graphs: turns a model folder and a placement into a placed graph; runs nothing.
//!
//! * [`config`] — `config.json` / `generation_config.json` (both transformers spellings).
//! * [`safetensors`] — safetensors headers, single-file and sharded; the data stays on disk.
//! * [`llama`] — the Llama family (Llama, Mistral, Qwen2) as a graph of operators.
//! * [`placement`] — which lane each operator runs on.
//! * [`graph`] — the IR: nodes on lanes, bounded edges, one entry and one exit; text and DOT dumps.

pub mod config;
pub mod error;
pub mod graph;
pub mod llama;
pub mod placement;
pub mod safetensors;

pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use graph::Graph;
pub use placement::Placement;
pub use safetensors::WeightIndex;
