//! RoPE: rotates every head of every token by its position (rotate-half layout).
//!
//! Ports: `x` `[tokens, heads*head_dim]` f32. Output: `y`, same shape. Positions come from the
//! batch: sequence `s`'s tokens sit at `start..start+len`.

use crate::spec::{float, int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, Packet};
use weir_kernels::rope::Rope;
use weir_kernels::rope::RopeScaling;
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// A rotary embedding node: `rope heads=… head_dim=… theta=… [scaling="default"|"linear"|"llama3"]
/// [factor=… low_freq_factor=… high_freq_factor=… original_max=…]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub heads: usize,
    pub head_dim: usize,
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl OpSpec for Spec {
    const KIND: &'static str = "rope";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        let (heads, head_dim, theta) = (p.usize("heads"), p.usize("head_dim"), p.f32("theta", None));
        let scaling = match p.string("scaling", "default").as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: p.f32("factor", None) },
            "llama3" => RopeScaling::Llama3 {
                factor: p.f32("factor", None),
                low_freq_factor: p.f32("low_freq_factor", None),
                high_freq_factor: p.f32("high_freq_factor", None),
                original_max_position_embeddings: p.f32("original_max", None),
            },
            other => {
                p.error(Some("scaling"), format!("unknown scaling \"{other}\" (known: default, linear, llama3)"));
                RopeScaling::Default
            }
        };
        // Scaling parameters that the chosen scaling does not read are not errors.
        p.allow(&["factor", "low_freq_factor", "high_freq_factor", "original_max"]);
        if head_dim % 2 != 0 {
            p.error(Some("head_dim"), format!("`head_dim` must be even, found {head_dim}"));
        }
        Spec { heads, head_dim, theta, scaling }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        let mut v = vec![("heads", int(self.heads)), ("head_dim", int(self.head_dim)), ("theta", float(self.theta))];
        let name = |s: &str| ParamValue::Str(s.into());
        match self.scaling {
            RopeScaling::Default => v.push(("scaling", name("default"))),
            RopeScaling::Linear { factor } => v.extend([("scaling", name("linear")), ("factor", float(factor))]),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => v
                .extend([
                    ("scaling", name("llama3")),
                    ("factor", float(factor)),
                    ("low_freq_factor", float(low_freq_factor)),
                    ("high_freq_factor", float(high_freq_factor)),
                    ("original_max", float(original_max_position_embeddings)),
                ]),
        }
        v
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::act("x", self.heads * self.head_dim)]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.heads * self.head_dim)]
    }
    /// In place.
    fn activation_floats(&self, _tokens: usize) -> usize {
        0
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(RopeOp { heads: self.heads, rope: Rope::new(self.head_dim, self.theta, &self.scaling) })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuRope::new(self.heads, Rope::new(self.head_dim, self.theta, &self.scaling))))
    }
}

/// See the module doc.
pub struct RopeOp {
    pub heads: usize,
    pub rope: Rope,
}

impl Operator<Packet> for RopeOp {
    fn kind(&self) -> &str {
        "rope"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        let width = self.heads * self.rope.head_dim;
        let Packet::Act { batch, mut x } = ins.take(0) else {
            return Err(OpError::new("port `x` expected activations"));
        };
        check_act("x", &batch, &x, width)?;
        let data = x.f32_mut();
        for (row, pos) in batch.positions().enumerate() {
            self.rope.apply(&mut data[row * width..(row + 1) * width], pos);
        }
        out.send(0, Packet::Act { batch, x });
        Ok(Step::Continue)
    }
}

/// [`RopeOp`] on a GPU lane (the inverse frequencies uploaded at its first firing).
pub struct GpuRope {
    pub heads: usize,
    pub rope: Rope,
    inv_freq: Option<cudarc::driver::CudaSlice<f32>>,
}

impl GpuRope {
    /// A RoPE operator for `heads` heads.
    pub fn new(heads: usize, rope: Rope) -> GpuRope {
        GpuRope { heads, rope, inv_freq: None }
    }
}

impl Operator<Packet> for GpuRope {
    fn kind(&self) -> &str {
        "rope"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let hd = self.rope.head_dim;
        let (batch, x) = crate::gpu::act("x", ins.get(0), self.heads * hd)?;
        if batch.tokens() == 0 {
            out.send(0, Packet::DevAct { batch: batch.clone(), x: x.clone() });
            return Ok(Step::Continue);
        }
        if self.inv_freq.is_none() {
            self.inv_freq = Some(g.upload_values(&self.rope.inv_freq)?);
        }
        let inv = self.inv_freq.as_ref().expect("set above");
        let pos = g.upload_values(&batch.positions().map(|p| p as i32).collect::<Vec<i32>>())?;
        let mut y = crate::gpu::copy(g, x)?;
        g.kernels.rope(&mut y.f32_mut(), &pos.as_view(), &inv.as_view(), self.heads, hd).map_err(crate::gpu::err)?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use weir_kernels::rope::RopeScaling;

    #[test]
    fn each_token_is_rotated_by_its_own_position() {
        // Two sequences: one at positions 0..2, one at position 5.
        let b = batch(&[(0, 2), (5, 1)]);
        let rope = Rope::new(2, 10000.0, &RopeScaling::Default);
        let mut op = RopeOp { heads: 1, rope: rope.clone() };
        let out = fire(&mut op, vec![act(&b, 2, &[1., 0., 1., 0., 1., 0.])], 1).unwrap();
        let y = out[0].as_ref().unwrap().act("y").unwrap().1.f32().to_vec();
        for (row, pos) in [0usize, 1, 5].iter().enumerate() {
            assert!((y[row * 2] - (*pos as f32).cos()).abs() < 1e-6);
            assert!((y[row * 2 + 1] - (*pos as f32).sin()).abs() < 1e-6);
        }
    }
}
