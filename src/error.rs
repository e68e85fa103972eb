//! The `weir` crate's errors.

use std::path::PathBuf;
use thiserror::Error;

/// Anything that can go wrong opening a model, building an engine or running a request.
#[derive(Debug, Error)]
pub enum Error {
    /// The model folder, its config or its weights are wrong, or the placement asks for
    /// something impossible.
    #[error(transparent)]
    Model(weir_graphs::Error),
    /// The runtime failed: an actor failed, a lane could not be placed.
    #[error(transparent)]
    Runtime(#[from] weir_runtime::Error),
    /// The model folder does not exist or is not a folder.
    #[error("{path}: not a model folder ({reason})")]
    NotAFolder { path: PathBuf, reason: String },
    /// `tokenizer.json` could not be loaded or used.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A text prompt was given but the model folder has no tokenizer.
    #[error("{dir}: no tokenizer.json, so text prompts cannot be encoded (give token ids instead)")]
    NoTokenizer { dir: PathBuf },
    /// A request is invalid; nothing was run for it.
    #[error("invalid request: {0}")]
    Request(String),
    /// The wait queue is full (`EngineOptions::max_queue`): nothing was run; try again later.
    #[error("busy: {waiting} requests are waiting already (--max-queue); try again later")]
    Busy { waiting: usize },
    /// A decode worker cannot reserve a request's whole length now (a batch slot and its KV
    /// cache): nothing was run; another worker, or later.
    #[error("no room: the KV cache reserve or the batch cannot take {tokens} more positions now; try another worker or later")]
    NoRoom { tokens: usize },
    /// The engine failed while running an accepted request.
    #[error("generation failed: {0}")]
    Failed(String),
    /// The engine has stopped (shut down, or failed earlier).
    #[error("the engine has stopped{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Stopped(Option<weir_runtime::Error>),
    /// A graph file is wrong: every problem, as `file:line:col: message` lines.
    #[error("{0}")]
    Graph(weir_graphs::format::Report),
    /// A node cannot run where the graph placed it (an operator with no GPU version on a
    /// GPU lane, an edge between two GPUs).
    #[error("placement: {0}")]
    Placement(String),
    /// A file could not be written. (Each error's message is whole: none of them repeats its
    /// cause through `source()`, so a printed chain says each cause once.)
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

impl From<weir_graphs::Error> for Error {
    fn from(e: weir_graphs::Error) -> Error {
        match e {
            weir_graphs::Error::Graph(r) => Error::Graph(r),
            e => Error::Model(e),
        }
    }
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, Error>;
