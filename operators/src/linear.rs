//! Linear: `y = x Wᵀ (+ b)`, weights `[out, in]` in f32, bf16 or f16, accumulation in f32.
//!
//! Ports: `x` `[tokens, in]` f32, `weight` `[out, in]`, optional `bias` `[out]`.
//! Output: `y` `[tokens, out]` f32.

use crate::spec::{int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, weight_vec, weight_view, Packet};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// A linear node: `linear in=… out=… [bias=false]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub in_dim: usize,
    pub out_dim: usize,
    pub bias: bool,
}

impl OpSpec for Spec {
    const KIND: &'static str = "linear";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        Spec { in_dim: p.usize("in"), out_dim: p.usize("out"), bias: p.bool("bias", false) }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("in", int(self.in_dim)), ("out", int(self.out_dim)), ("bias", ParamValue::Bool(self.bias))]
    }
    fn inputs(&self) -> Vec<Port> {
        let mut v = vec![Port::act("x", self.in_dim), Port::weight("weight", vec![self.out_dim, self.in_dim])];
        if self.bias {
            v.push(Port::weight("bias", vec![self.out_dim]));
        }
        v
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.out_dim)]
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(Linear { in_dim: self.in_dim, out_dim: self.out_dim, bias: self.bias })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuLinear { in_dim: self.in_dim, out_dim: self.out_dim, bias: self.bias }))
    }
}

/// See the module doc.
pub struct Linear {
    pub in_dim: usize,
    pub out_dim: usize,
    pub bias: bool,
}

impl Operator<Packet> for Linear {
    fn kind(&self) -> &str {
        "linear"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let (name, w) = ins.get(1).weight("weight")?;
        let w = weight_view(name, w, &[self.out_dim, self.in_dim])?;
        let bias = if self.bias {
            let (bn, b) = ins.get(2).weight("bias")?;
            Some(weight_vec(bn, b, self.out_dim)?)
        } else {
            None
        };
        let (batch, x) = ins.get(0).act("x")?;
        check_act("x", batch, x, self.in_dim)?;
        let t = batch.tokens();
        let mut y = cx.zeros_f32(vec![t, self.out_dim])?; // [tokens, out]
        weir_kernels::matmul::matmul(x.f32(), t, w, self.out_dim, bias.as_deref(), y.f32_mut(), cx.par);
        out.send(0, Packet::Act { batch: batch.clone(), x: y });
        Ok(Step::Continue)
    }
}

/// [`Linear`] on a GPU lane (cuBLAS, f32 accumulation).
pub struct GpuLinear {
    pub in_dim: usize,
    pub out_dim: usize,
    pub bias: bool,
}

impl Operator<Packet> for GpuLinear {
    fn kind(&self) -> &str {
        "linear"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let (w, e) = crate::gpu::weight("weight", ins.get(1), &[self.out_dim, self.in_dim])?;
        let bias = if self.bias { Some(crate::gpu::vector("bias", ins.get(2), self.out_dim)?) } else { None };
        let (batch, x) = crate::gpu::act("x", ins.get(0), self.in_dim)?;
        let y = crate::gpu::linear(g, &x.f32()?, batch.tokens(), w, e, self.out_dim, bias.as_ref())?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn projects_with_bias_and_rejects_a_transposed_weight() {
        let b = batch(&[(0, 1)]);
        let mut op = Linear { in_dim: 2, out_dim: 3, bias: true };
        let w = weight(vec![3, 2], &[1., 0., 0., 1., 1., 1.]);
        let bias = weight(vec![3], &[0.5, 0., -1.]);
        let out = fire(&mut op, vec![act(&b, 2, &[2., 3.]), w, bias.clone()], 1).unwrap();
        assert_eq!(out[0].as_ref().unwrap().act("y").unwrap().1.f32(), &[2.5, 3., 4.]);
        let wt = weight(vec![2, 3], &[0.; 6]);
        let e = fire(&mut op, vec![act(&b, 2, &[2., 3.]), wt, bias], 1).unwrap_err();
        assert!(e.0.contains("expected [3, 2]"), "{e}");
    }
}
