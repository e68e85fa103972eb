//! This machine, as the placement asks about it (`weir_graphs::Machine`): the CPUs this process
//! may use, each GPU's default memory budget, and what one expert costs on a lane (measured
//! with the real kernels, `costs`).

use weir_graphs::place::experts::{ExpertShape, LaneTiming};
use weir_runtime::LaneSpec;

/// The machine this process runs on.
pub struct ThisMachine;

impl weir_graphs::Machine for ThisMachine {
    fn cpus(&self) -> Vec<usize> {
        weir_runtime::lane::allowed_cpus()
    }

    fn gpu_memory(&self, device: usize) -> Option<u64> {
        weir_runtime::gpu::default_budget(device).ok().map(|b| b as u64)
    }

    fn expert_timing(&self, lane: &LaneSpec, shape: &ExpertShape) -> Result<LaneTiming, String> {
        crate::costs::expert_timing(lane, shape.hidden, shape.intermediate, shape.dtype)
    }
}
