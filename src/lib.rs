//! weir: runs large language models on every device of one machine at once.
//!
//! The model is compiled into a dataflow graph of operator actors pinned to lanes (CPU cores,
//! I/O threads, io_uring NVMe readers, CUDA streams), every edge a bounded channel, weights
//! delivered to operators as messages by loader actors. This crate is the library face of that
//! engine; the `weir` binary is a thin CLI over it.
//!
//! * [`Model`] — open and check a Hugging Face folder (config, safetensors, tokenizer), and
//!   place it on this machine (`weir_graphs::place`, asking [`machine`] about it).
//! * [`Engine`] — a placed model running, and the [`scheduler`] batching requests into passes;
//!   [`EngineOptions`] (in [`options`]) say how to place and run it; [`Request`] and its
//!   [`Event`]s (in [`request`]) what a caller submits and gets back.
//! * [`compile`] — a placed graph → a running program.
//! * [`serve`] — the OpenAI API on actix-web in front of an engine (`weir serve`).
//! * [`load`] — a load generator for OpenAI-compatible servers (`weir load`): Poisson arrivals,
//!   latency percentiles, an SVG of latency against load.
//! * [`synth`] — write a random-weight model of a named shape.
//! * [`bench`](mod@bench) — the end-to-end benchmark and the memory-bandwidth probe behind `weir bench`.
//! * [`costs`] — an expert's cost on a lane, measured for twin experts.
//!
//! ```
//! use weir::{Engine, EngineOptions, Event, Model, Request};
//! # let dir = std::env::temp_dir().join(format!("weir-doc-{}", std::process::id()));
//! // A tiny random model, so the example needs no download.
//! weir::synth::write_model(&dir, &weir::synth::shape("tiny")?, weir::DType::F32, 7)?;
//! let model = Model::open(&dir)?;
//! let engine = Engine::new(&model, EngineOptions { threads: 1, ..Default::default() })?;
//! let prompt = model.encode("The man")?;
//! let generation = engine.submit(Request::greedy(prompt, 5))?;
//! let mut tokens = Vec::new();
//! for event in generation {
//!     match event {
//!         Event::Token { id, .. } => tokens.push(id), // as each is produced
//!         Event::Done(stats) => assert_eq!(stats.generated_tokens, tokens.len()),
//!         Event::Failed(e) => panic!("{e}"),
//!         Event::PromptLogits(_) => {}
//!     }
//! }
//! assert!(!tokens.is_empty() && tokens.len() <= 5);
//! engine.shutdown()?;
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), weir::Error>(())
//! ```

pub mod bench;
pub mod compile;
pub mod costs;
pub mod engine;
pub mod error;
pub mod expert_stats;
pub mod graph_check;
pub mod load;
pub mod log;
pub mod machine;
pub mod model;
pub mod options;
pub mod pipeline;
pub mod request;
pub mod route;
pub mod scheduler;
pub mod serve;
pub mod split;
pub mod synth;

pub use engine::Engine;
pub use error::{Error, Result};
pub use graph_check::check_graph;
pub use model::Model;
pub use options::{EngineOptions, Role};
pub use request::{Event, FinishReason, Generation, LogitsMode, Next, Output, Request, Stats};
pub use scheduler::kv_tokens_needed;
pub use weir_graphs::parse_size;
pub use weir_operators::{KvType, RouteRecord, RoutingStats, Sampling};
pub use weir_runtime::{DType, Trace};
