//! The graphs crate's errors: everything that can be wrong with a model folder or a graph.

use std::path::PathBuf;
use thiserror::Error;

/// What is wrong with a model folder, its weights, or a graph built from them. Each message is
/// whole, its cause included: none is repeated through `source()`, so a printed chain says
/// each cause once.
#[derive(Debug, Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A JSON file is malformed.
    #[error("{path}: invalid JSON: {error}")]
    Json { path: PathBuf, error: serde_json::Error },
    /// A config key is missing or has the wrong type or value.
    #[error("{path}: {key}: {problem}")]
    Config { path: PathBuf, key: String, problem: String },
    /// The architecture is not one weir knows.
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture { path: PathBuf, arch: String, supported: String },
    /// A safetensors file is malformed or does not hold what its header says.
    #[error("{path}: {problem}")]
    Safetensors { path: PathBuf, problem: String },
    /// Tensors that the architecture needs are missing, or disagree with the config.
    #[error("the weights do not match the config:\n  {}", problems.join("\n  "))]
    Weights { problems: Vec<String> },
    /// The placement asks for something impossible.
    #[error("placement: {0}")]
    Placement(String),
    /// A graph file is wrong: every problem, as `file:line:col: message` lines.
    #[error("{0}")]
    Graph(crate::format::Report),
    /// The options ask for something impossible or contradictory (named by their flags).
    #[error("{0}")]
    Options(String),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, Error>;
