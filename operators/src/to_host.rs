//! To host: GPU activations copied back into host memory, on a copy lane. The placement
//! (`weir_graphs::place::transfers`) puts one on every edge from a GPU lane to a CPU lane (to
//! the sampler, say, or to attention computed on the CPU where the KV cache lives); a graph
//! file may write them itself, and `weir graph show` prints them.

use crate::spec::{Carries, Mem, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::Packet;
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, SpanKind, Step};

/// A transfer to host memory: `to_host`, on a GPU lane (the device's copy lane for that
/// direction). The placement puts one wherever an edge goes from a GPU's memory to the host's;
/// a graph file may write them itself (`weir graph show` does).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec;

impl OpSpec for Spec {
    const KIND: &'static str = "to_host";
    const GPU: bool = true;
    fn from_params(_: &mut Params) -> Spec {
        Spec
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
        (Mem::Lane, Mem::Host)
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(ToHost)
    }
    fn instantiate_gpu(&self, env: &OpEnv, layer: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(self.instantiate(env, layer))
    }
}

/// See the module doc.
pub struct ToHost;

impl Operator<Packet> for ToHost {
    fn kind(&self) -> &str {
        "to_host"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Transfer
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let p = match ins.take(0) {
            Packet::DevAct { batch, x } => {
                let mut y = cx.zeros_f32(x.shape.clone())?;
                let f = y.f32_mut();
                // SAFETY: the same memory as `f`, viewed as its bytes.
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(f.as_mut_ptr() as *mut u8, std::mem::size_of_val(f)) };
                g.download(&x, bytes)?;
                Packet::Act { batch, x: y }
            }
            Packet::DevWeight { name, .. } => {
                return Err(OpError::new(format!("weight `{name}` is in GPU memory; a CPU operator cannot read it")));
            }
            other => other,
        };
        out.send(0, p);
        Ok(Step::Continue)
    }
}
