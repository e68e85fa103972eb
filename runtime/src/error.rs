//! The runtime's errors.

use thiserror::Error;

/// An operator's failure, with what a person needs to act on it.
#[derive(Debug, Error, Clone)]
#[error("{0}")]
pub struct OpError(pub String);

impl OpError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> OpError {
        OpError(msg.into())
    }
}

/// Errors from building or running a program. Each message is whole, its cause included (none
/// is repeated through `source()`).
#[derive(Debug, Error, Clone)]
pub enum Error {
    /// The graph handed to the builder is inconsistent.
    #[error("invalid program: {0}")]
    Invalid(String),
    /// A lane cannot be placed as asked (core missing, device absent).
    #[error("lane `{lane}`: {reason}")]
    Lane { lane: String, reason: String },
    /// A device that a lane needs is not present or not compiled in.
    #[error("device {device} unavailable: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    /// An actor failed; every lane stopped.
    #[error("actor `{actor}` on lane `{lane}` failed: {error}")]
    Actor { actor: String, lane: String, error: OpError },
    /// An actor panicked (a bug in weir); every lane stopped.
    #[error("actor `{actor}` on lane `{lane}` panicked: {message}")]
    Panic { actor: String, lane: String, message: String },
    /// The program stopped (shut down, or failed earlier) and takes no more work.
    #[error("the program has stopped")]
    Stopped,
    /// A thread could not be started.
    #[error("could not start a thread for lane `{lane}`: {reason}")]
    Spawn { lane: String, reason: String },
}

/// The message a caught panic carried (`"unknown panic"` if it was not a string).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
