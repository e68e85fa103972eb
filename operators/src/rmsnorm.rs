//! RMSNorm: `y = weight * x / sqrt(mean(x²) + eps)` over each row.
//!
//! Ports: `x` `[tokens, dim]` f32, `weight` `[dim]`. Output: `y` `[tokens, dim]` f32.

use crate::spec::{float, int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, weight_vec, Packet};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// An RMSNorm node: `rmsnorm dim=… eps=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub dim: usize,
    pub eps: f32,
}

impl OpSpec for Spec {
    const KIND: &'static str = "rmsnorm";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        Spec { dim: p.usize("dim"), eps: p.f32("eps", None) }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("dim", int(self.dim)), ("eps", float(self.eps))]
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::act("x", self.dim), Port::weight("weight", vec![self.dim])]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.dim)]
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(RmsNorm { dim: self.dim, eps: self.eps })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuRmsNorm { dim: self.dim, eps: self.eps }))
    }
}

/// See the module doc.
pub struct RmsNorm {
    pub dim: usize,
    pub eps: f32,
}

impl Operator<Packet> for RmsNorm {
    fn kind(&self) -> &str {
        "rmsnorm"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let (name, w) = ins.get(1).weight("weight")?;
        let w = weight_vec(name, w, self.dim)?;
        let (batch, x) = ins.get(0).act("x")?;
        check_act("x", batch, x, self.dim)?;
        let mut y = cx.zeros_f32(x.shape.clone())?; // [tokens, dim]
        weir_kernels::norm::rmsnorm(x.f32(), &w, self.eps, y.f32_mut(), cx.par);
        out.send(0, Packet::Act { batch: batch.clone(), x: y });
        Ok(Step::Continue)
    }
}

/// [`RmsNorm`] on a GPU lane.
pub struct GpuRmsNorm {
    pub dim: usize,
    pub eps: f32,
}

impl Operator<Packet> for GpuRmsNorm {
    fn kind(&self) -> &str {
        "rmsnorm"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let w = crate::gpu::vector("weight", ins.get(1), self.dim)?;
        let (batch, x) = crate::gpu::act("x", ins.get(0), self.dim)?;
        let mut y = g.alloc(weir_runtime::DType::F32, x.shape.clone())?;
        g.kernels.rmsnorm(&x.f32()?, &w, self.eps, &mut y.f32_mut()).map_err(crate::gpu::err)?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn normalises_each_row_and_checks_the_weight_shape() {
        let b = batch(&[(0, 2)]);
        let mut op = RmsNorm { dim: 2, eps: 0.0 };
        let out = fire(&mut op, vec![act(&b, 2, &[3., 4., -1., 1.]), weight(vec![2], &[1., 2.])], 1).unwrap();
        let (_, y) = out[0].as_ref().unwrap().act("y").unwrap();
        let r = (12.5f32).sqrt();
        assert!((y.f32()[0] - 3. / r).abs() < 1e-6 && (y.f32()[1] - 8. / r).abs() < 1e-6);
        assert!((y.f32()[2] + 1.).abs() < 1e-6 && (y.f32()[3] - 2.).abs() < 1e-6);
        let e = fire(&mut op, vec![act(&b, 2, &[0.; 4]), weight(vec![3], &[1.; 3])], 1).unwrap_err();
        assert!(e.0.contains("expected [2]"), "{e}");
    }
}
