//! weir: runs large language models on every device of one machine at once.
//!
//! The model is compiled into a dataflow graph of operator actors pinned to lanes (CPU core
//! sets today; GPU streams and NVMe readers slot in as lane kinds), every edge a bounded
//! channel, weights delivered to operators as messages by loader actors. This crate is the
//! library face of that engine; the `weir` binary is a thin CLI over it.
//!
//! * [`Model`] — open and check a Hugging Face folder (config, safetensors, tokenizer).
//! * [`Engine`] — compile a model onto this machine and run requests, batching them.
//! * [`synth`] — write a random-weight model of a named shape.
//! * [`bench`] — the end-to-end benchmark and the memory-bandwidth probe behind `weir bench`.
//! * [`costs`] — an expert's cost on each lane, measured at start-up for twin experts.
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
pub mod model;
pub mod synth;

pub use engine::{Engine, EngineOptions, Event, FinishReason, Generation, LogitsMode, Output, Request, Stats};
pub use error::{Error, Result};
pub use model::Model;
pub use weir_operators::{KvType, RouteRecord, RoutingStats, Sampling};
pub use weir_runtime::{DType, Trace};

/// Parses a byte size: `123`, `700MB`, `4GB`, `1.5GiB`, `512KiB` (decimal and binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (like 700MB or 4GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        u => return Err(format!("unknown unit `{u}` in `{s}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("`{s}` must be a positive size"));
    }
    Ok((n * mult) as u64)
}
