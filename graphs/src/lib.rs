//! weir-graphs: turns a model folder, a graph file and the run's options into a placed graph;
//! runs nothing.
//!
//! * [`config`] — `config.json` / `generation_config.json` (both transformers spellings).
//! * [`safetensors`] — safetensors headers, single-file and sharded; the data stays on disk.
//! * [`llama`] — the Llama family's tensors, checked against the config.
//! * [`format`](mod@format) — graph definition files: parse (with spans), check, print.
//! * [`builtin`] — the built-in architectures as graph files (`graphs/*.weir`).
//! * [`graph`] — the IR: nodes on lanes, bounded edges, one entry and one exit; DOT dumps.
//! * [`place`](mod@place) — the placement pipeline: expand → place experts → plan memory → assign
//!   loaders → insert transfers, each pass a function over the IR.
//! * [`offload`] — where each activated expert outside the fast tier is computed (makespan).

pub mod builtin;
pub mod config;
pub mod error;
pub mod format;
pub mod graph;
pub mod llama;
/// The per-step decision lives with the expert stores that make it.
pub use weir_operators::offload;
pub mod place;
pub mod safetensors;

pub use config::{Architecture, ModelConfig, MoeConfig, SamplingDefaults};
pub use error::{Error, Result};
pub use graph::Graph;
pub use place::{place, Machine, PlaceOptions, Placed};
pub use safetensors::WeightIndex;

/// A byte size for people: `529.3 KB`, `2.20 GB` (decimal units, three significant digits).
pub fn format_size(bytes: u64) -> String {
    let units = [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)];
    let b = bytes as f64;
    match units.iter().find(|(_, u)| b >= *u) {
        Some((name, u)) => {
            let v = b / u;
            let digits = if v >= 100.0 {
                0
            } else if v >= 10.0 {
                1
            } else {
                2
            };
            format!("{v:.digits$} {name}")
        }
        None => format!("{bytes} B"),
    }
}

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
