//! To GPU: a host tensor copied into GPU memory, on a copy lane (a stream of its own, so
//! copies overlap the compute lanes' work). The placement (`weir_graphs::place::transfers`)
//! puts one on every edge from host memory to a GPU lane; a graph file may write them itself,
//! and `weir graph show` prints them.
//!
//! Port `x`: activations become [`Packet::DevAct`] (f32); weights become [`Packet::DevWeight`]
//! as stored, except vectors (norms, biases), which the GPU kernels read as f32. Anything
//! else (token ids: the GPU embedding reads them from the host) passes through unchanged.
//! Output `y`.
//!
//! A streamed weight is uploaded from its pool buffer pinned (`GpuLane::upload_pinned`): a
//! DMA, not the driver's copy through staging memory. Its upload keeps its host buffer (from the loader's budgeted pool) alive
//! for as long as the GPU copy lives (`keep_host`): the loader then reads ahead only as far as
//! GPU copies are used up. The placement sizes a GPU graph's host weights pool to what the plan
//! streams (`weir_graphs::place::memory::host_pools`: the weights kept on the GPU only pass
//! through it), so
//! the plan that fitted the weights into `--gpu-memory` holds on the device too, in the
//! loader's order, with no waiting here.

use crate::spec::{Carries, Mem, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::Packet;
use weir_runtime::{DType, Emit, FireCx, Inputs, OpError, Operator, SpanKind, Step};

/// A transfer to GPU memory: `to_gpu`, on a GPU lane (a device's copy lane, or a loader's own
/// GPU lane under `--prefetch 0`). The placement puts one wherever an edge goes from host
/// memory to a GPU's; a graph file may write them itself (`weir graph show` does).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    /// What it carries is a weight streamed from the host (set by the checker from the tier of
    /// the weight that feeds it, not a parameter): see [`ToGpu::keep_host`].
    pub keep_host: bool,
}

impl OpSpec for Spec {
    const KIND: &'static str = "to_gpu";
    const GPU: bool = true;
    fn from_params(_: &mut Params) -> Spec {
        Spec::default()
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        Vec::new()
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::of("x", Carries::Any)]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::of("y", Carries::Any)]
    }
    fn memories(&self) -> (Mem, Mem) {
        (Mem::Host, Mem::Lane)
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(ToGpu { keep_host: self.keep_host })
    }
    fn instantiate_gpu(&self, env: &OpEnv, layer: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(self.instantiate(env, layer))
    }
}

/// See the module doc.
pub struct ToGpu {
    /// Keep a weight's host buffer alive with its GPU copy (streamed weights).
    pub keep_host: bool,
}

impl Operator<Packet> for ToGpu {
    fn kind(&self) -> &str {
        "to_gpu"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Transfer
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let p = match ins.take(0) {
            Packet::Act { batch, x } => {
                if x.dtype != DType::F32 {
                    return Err(OpError::new(format!("activations of {} (f32 expected)", x.dtype.name())));
                }
                Packet::DevAct { batch, x: g.upload(DType::F32, x.shape.clone(), x.bytes())? }
            }
            Packet::Weight { name, w } => {
                if w.dtype == DType::U32 {
                    return Err(OpError::new(format!("weight `{name}` has dtype u32, expected f32, bf16 or f16")));
                }
                let up = if w.shape.len() == 1 {
                    let v: Vec<u8> = w.to_f32_vec().iter().flat_map(|f| f.to_le_bytes()).collect();
                    g.upload(DType::F32, w.shape.clone(), &v)?
                } else if self.keep_host {
                    // Streamed: uploaded every pass from the window's buffers, pinned once.
                    g.upload_pinned(w.dtype, w.shape.clone(), &w)?
                } else {
                    g.upload(w.dtype, w.shape.clone(), w.bytes())?
                };
                let up = if self.keep_host { up.holding(std::sync::Arc::new(w)) } else { up };
                Packet::DevWeight { name, w: up }
            }
            other => other,
        };
        out.send(0, p);
        Ok(Step::Continue)
    }
}
