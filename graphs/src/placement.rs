//! Where a graph's operators and tensors go. Today: one CPU compute lane over a core set, one or
//! more loader lanes, every weight resident in host memory. Later issues add GPU streams, NVMe
//! readers and streamed tiers; a placement names them the same way.

use crate::error::{Error, Result};

/// How a model is placed on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Logical CPUs of the compute lane; the lane's thread runs on the first.
    pub compute_cores: Vec<usize>,
    /// Loader lanes (threads reading weights), at least 1.
    pub loader_lanes: usize,
    /// Capacity of activation edges: passes that may queue between two operators.
    pub activation_capacity: usize,
}

impl Placement {
    /// One compute lane over the first `threads` CPUs this process may use (all if 0), one
    /// loader lane.
    pub fn cpu(threads: usize) -> Result<Placement> {
        let allowed = weir_runtime::lane::allowed_cpus();
        let n = if threads == 0 { allowed.len() } else { threads };
        if n > allowed.len() {
            return Err(Error::Placement(format!(
                "{n} threads asked for, but this process may use {} CPUs ({allowed:?})",
                allowed.len()
            )));
        }
        Ok(Placement { compute_cores: allowed[..n].to_vec(), loader_lanes: 1, activation_capacity: 2 })
    }
}
