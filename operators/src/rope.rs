//! RoPE: rotates every head of every token by its position (rotate-half layout).
//!
//! Ports: `x` `[tokens, heads*head_dim]` f32. Output: `y`, same shape. Positions come from the
//! batch: sequence `s`'s tokens sit at `start..start+len`.

use crate::{check_act, Packet};
use weir_kernels::rope::Rope;
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

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
