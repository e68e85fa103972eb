//! weir-operators: what each operator consumes and produces, and which kernel computes it.
//!
//! One operator per file. Each file holds the operator's `Spec` — what a graph node declares:
//! its parameters, ports and shape rules, and how to make the operator that runs it, behind
//! [`OpSpec`] (see [`spec`]) —, the [`weir_runtime::Operator`] implementations that call the
//! kernels (on a CPU lane and, where it has one, on a GPU lane), and its tests. Nothing here
//! knows of threads: an operator is fired by whatever lane it was placed on, and splits its
//! kernels over that lane's cores through the `par` it is handed.
//!
//! [`OpConfig`] (in [`registry`]) is the list of kinds. [`offload`] is not an operator: it is
//! the per-step decision the expert stores make (where each chosen expert runs).

pub mod add;
pub mod attention;
pub mod embedding;
pub mod expert;
pub mod expert_store;
pub mod gpu;
pub mod kv_link;
pub mod kv_send;
pub mod linear;
pub mod lm_head;
pub mod loader;
pub mod net;
pub mod net_recv;
pub mod net_send;
pub mod offload;
pub mod packet;
pub mod registry;
pub mod rmsnorm;
pub mod rope;
pub mod router;
pub mod sampler;
pub mod sigmoid_gate;
pub mod spec;
pub mod swiglu;
pub mod to_gpu;
pub mod to_host;

pub use packet::{Batch, LogitsWanted, Packet, Sampling, SeqSlice};
pub use registry::{kinds, OpConfig};
pub use router::{RouteRecord, Routing, RoutingStats};
pub use spec::{Carries, Mem, OpEnv, OpSpec, ParamValue, Params, Port};
pub use weir_kernels::attention::KvType;
pub use weir_kernels::rope::{Rope, RopeScaling};

use weir_kernels::WeightView;
use weir_runtime::{DType, OpError, Tensor};

/// A weight as the kernels read it, checked against the shape the operator expects.
pub(crate) fn weight_view<'a>(name: &str, w: &'a Tensor, shape: &[usize]) -> Result<WeightView<'a>, OpError> {
    if w.shape != shape {
        return Err(OpError::new(format!("weight `{name}` has shape {:?}, expected {shape:?}", w.shape)));
    }
    Ok(match w.dtype {
        DType::F32 => WeightView::F32(w.f32()),
        DType::BF16 => WeightView::Bf16(w.u16()),
        DType::F16 => WeightView::F16(w.u16()),
        DType::U32 => return Err(OpError::new(format!("weight `{name}` has dtype u32, expected f32, bf16 or f16"))),
    })
}

/// A small weight vector as f32, checked against its expected length.
pub(crate) fn weight_vec(name: &str, w: &Tensor, len: usize) -> Result<Vec<f32>, OpError> {
    if w.shape != [len] {
        return Err(OpError::new(format!("weight `{name}` has shape {:?}, expected [{len}]", w.shape)));
    }
    if w.dtype == DType::U32 {
        return Err(OpError::new(format!("weight `{name}` has dtype u32")));
    }
    Ok(w.to_f32_vec())
}

/// Checks that activations are `[tokens, width]` with `tokens` matching the batch.
pub(crate) fn check_act(port: &str, batch: &Batch, x: &Tensor, width: usize) -> Result<(), OpError> {
    if x.shape != [batch.tokens(), width] {
        return Err(OpError::new(format!(
            "port `{port}`: activations have shape {:?}, expected [{}, {width}]",
            x.shape,
            batch.tokens()
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for operator tests: run one firing of an operator directly.
    use super::*;
    use std::sync::Arc;
    use weir_kernels::Serial;
    use weir_runtime::{Emit, FireCx, Inputs, Operator};

    pub fn batch(lens: &[(usize, usize)]) -> Arc<Batch> {
        Arc::new(Batch {
            pass: 0,
            seqs: lens
                .iter()
                .enumerate()
                .map(|(i, &(start, len))| SeqSlice {
                    id: i as u64,
                    start,
                    len,
                    logits: LogitsWanted::Last,
                    sampling: Sampling::default(),
                })
                .collect(),
            release: vec![],
            ..Default::default()
        })
    }

    pub fn weight(shape: Vec<usize>, data: &[f32]) -> Packet {
        Packet::Weight { name: "w".into(), w: Tensor::from_f32(shape, data) }
    }

    pub fn act(batch: &Arc<Batch>, width: usize, data: &[f32]) -> Packet {
        Packet::Act { batch: batch.clone(), x: Tensor::from_f32(vec![batch.tokens(), width], data) }
    }

    /// Fires `op` once with `inputs`; returns its outputs.
    pub fn fire(
        op: &mut dyn Operator<Packet>,
        inputs: Vec<Packet>,
        outputs: usize,
    ) -> Result<Vec<Option<Packet>>, OpError> {
        fire_some(op, inputs.into_iter().map(Some).collect(), outputs)
    }

    /// Fires `op` once with the inputs that came (`None`: that port has none).
    pub fn fire_some(
        op: &mut dyn Operator<Packet>,
        mut slots: Vec<Option<Packet>>,
        outputs: usize,
    ) -> Result<Vec<Option<Packet>>, OpError> {
        let sticky = vec![false; slots.len()];
        let mut ins = Inputs::new(&mut slots, &sticky);
        let mut out = Emit::new(outputs);
        let pool = weir_runtime::Pool::transient("activations", usize::MAX, None);
        let cx = FireCx { par: &Serial, actor: "test", activations: &pool, gpu: None };
        op.fire(&mut ins, &mut out, &cx)?;
        Ok(out.into_staged())
    }
}
