//! Residual add: `y = a + b`.
//!
//! Ports: `a`, `b` `[tokens, dim]` f32. Output: `y` `[tokens, dim]` f32 (reuses `a`'s buffer
//! when nothing else holds it). A `b` that is [`Packet::Absent`] adds nothing: `a` goes on as
//! it is (a twin expert that computed nothing this pass, see `expert`).

use crate::spec::{int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, Packet};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// A residual add node: `add dim=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub dim: usize,
}

impl OpSpec for Spec {
    const KIND: &'static str = "add";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        Spec { dim: p.usize("dim") }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("dim", int(self.dim))]
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::act("a", self.dim), Port::act("b", self.dim)]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.dim)]
    }
    /// In place: `a`'s buffer.
    fn activation_floats(&self, _tokens: usize) -> usize {
        0
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(Add { dim: self.dim })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuAdd { dim: self.dim }))
    }
}

/// See the module doc.
pub struct Add {
    pub dim: usize,
}

impl Operator<Packet> for Add {
    fn kind(&self) -> &str {
        "add"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        if matches!(ins.get(1), Packet::Absent) {
            out.send(0, ins.take(0));
            return Ok(Step::Continue);
        }
        let Packet::Act { batch, mut x } = ins.take(0) else {
            return Err(OpError::new("port `a` expected activations"));
        };
        let (bb, y) = ins.get(1).act("b")?;
        check_act("a", &batch, &x, self.dim)?;
        check_act("b", bb, y, self.dim)?;
        if bb.pass != batch.pass {
            return Err(OpError::new(format!(
                "ports `a` and `b` carry different passes ({} and {})",
                batch.pass, bb.pass
            )));
        }
        weir_kernels::activation::add_inplace(x.f32_mut(), y.f32());
        out.send(0, Packet::Act { batch, x });
        Ok(Step::Continue)
    }
}

/// [`Add`] on a GPU lane.
pub struct GpuAdd {
    pub dim: usize,
}

impl Operator<Packet> for GpuAdd {
    fn kind(&self) -> &str {
        "add"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        if matches!(ins.get(1), Packet::Absent) {
            out.send(0, ins.take(0));
            return Ok(Step::Continue);
        }
        let g = cx.gpu()?;
        let (batch, a) = crate::gpu::act("a", ins.get(0), self.dim)?;
        let (_, b) = crate::gpu::act("b", ins.get(1), self.dim)?;
        let mut y = crate::gpu::copy(g, a)?;
        g.kernels.add(&mut y.f32_mut(), &b.f32()?).map_err(crate::gpu::err)?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn adds_elementwise() {
        let b = batch(&[(0, 1)]);
        let out = fire(&mut Add { dim: 2 }, vec![act(&b, 2, &[1., 2.]), act(&b, 2, &[10., 20.])], 1).unwrap();
        assert_eq!(out[0].as_ref().unwrap().act("y").unwrap().1.f32(), &[11., 22.]);
        let e = fire(&mut Add { dim: 3 }, vec![act(&b, 2, &[1., 2.]), act(&b, 2, &[1., 2.])], 1).unwrap_err();
        assert!(e.0.contains("expected [1, 3]"));
        let out = fire(&mut Add { dim: 2 }, vec![act(&b, 2, &[1., 2.]), Packet::Absent], 1).unwrap();
        assert_eq!(out[0].as_ref().unwrap().act("y").unwrap().1.f32(), &[1., 2.], "an absent `b` adds nothing");
    }
}
