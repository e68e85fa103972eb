//! A gated branch: `y = sigmoid(g) · x`, one gate value per token (Qwen2-MoE's shared expert,
//! whose gate is a `linear` with one output).
//!
//! Ports: `x` `[tokens, dim]` f32; `g` `[tokens, 1]` f32. Output: `y` `[tokens, dim]` (reuses
//! `x`'s buffer when nothing else holds it).

use crate::spec::{int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, Packet};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// A gate node: `sigmoid_gate dim=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub dim: usize,
}

impl OpSpec for Spec {
    const KIND: &'static str = "sigmoid_gate";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        Spec { dim: p.usize("dim") }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("dim", int(self.dim))]
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::act("x", self.dim), Port::act("g", 1)]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.dim)]
    }
    /// In place: `x`'s buffer.
    fn activation_floats(&self, _tokens: usize) -> usize {
        0
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(SigmoidGate { dim: self.dim })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuSigmoidGate { dim: self.dim }))
    }
}

/// See the module doc.
pub struct SigmoidGate {
    pub dim: usize,
}

impl Operator<Packet> for SigmoidGate {
    fn kind(&self) -> &str {
        "sigmoid_gate"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        let Packet::Act { batch, mut x } = ins.take(0) else {
            return Err(OpError::new("port `x` expected activations"));
        };
        let (gb, g) = ins.get(1).act("g")?;
        check_act("x", &batch, &x, self.dim)?;
        check_act("g", gb, g, 1)?;
        if gb.pass != batch.pass {
            return Err(OpError::new(format!(
                "ports `x` and `g` carry different passes ({} and {})",
                batch.pass, gb.pass
            )));
        }
        for (row, &gv) in x.f32_mut().chunks_exact_mut(self.dim).zip(g.f32()) {
            let s = 1.0 / (1.0 + (-gv).exp());
            row.iter_mut().for_each(|v| *v *= s);
        }
        out.send(0, Packet::Act { batch, x });
        Ok(Step::Continue)
    }
}

/// [`SigmoidGate`] on a GPU lane (into a copy of `x`: GPU activations are shared read-only).
pub struct GpuSigmoidGate {
    pub dim: usize,
}

impl Operator<Packet> for GpuSigmoidGate {
    fn kind(&self) -> &str {
        "sigmoid_gate"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let gpu = cx.gpu()?;
        let (batch, x) = crate::gpu::act("x", ins.get(0), self.dim)?;
        let (gb, g) = crate::gpu::act("g", ins.get(1), 1)?;
        if gb.pass != batch.pass {
            return Err(OpError::new(format!(
                "ports `x` and `g` carry different passes ({} and {})",
                batch.pass, gb.pass
            )));
        }
        let mut y = crate::gpu::copy(gpu, x)?;
        gpu.kernels.sigmoid_gate(&mut y.f32_mut(), &g.f32()?, self.dim).map_err(crate::gpu::err)?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn each_row_is_scaled_by_the_sigmoid_of_its_gate() {
        let b = batch(&[(0, 2)]);
        let mut op = SigmoidGate { dim: 2 };
        let out = fire(&mut op, vec![act(&b, 2, &[1.0, -2.0, 3.0, 4.0]), act(&b, 1, &[0.0, -1.5])], 1).unwrap();
        let y = out[0].as_ref().unwrap().act("y").unwrap().1.f32().to_vec();
        let s = 1.0 / (1.0 + 1.5f32.exp());
        let want = [0.5, -1.0, 3.0 * s, 4.0 * s];
        assert!(y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{y:?}");
    }
}
