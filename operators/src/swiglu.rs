//! SwiGLU MLP: `y = down(silu(gate(x)) * up(x))`.
//!
//! Ports: `x` `[tokens, hidden]` f32; `gate`, `up` `[intermediate, hidden]`; `down`
//! `[hidden, intermediate]`. Output: `y` `[tokens, hidden]` f32.

use crate::spec::{int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, weight_view, Packet};
use weir_kernels::WeightView;
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step, Tensor};

/// A SwiGLU MLP node: `swiglu hidden=… intermediate=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub hidden: usize,
    pub intermediate: usize,
}

impl OpSpec for Spec {
    const KIND: &'static str = "swiglu";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        Spec { hidden: p.usize("hidden"), intermediate: p.usize("intermediate") }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("hidden", int(self.hidden)), ("intermediate", int(self.intermediate))]
    }
    fn inputs(&self) -> Vec<Port> {
        let (h, m) = (self.hidden, self.intermediate);
        vec![
            Port::act("x", h),
            Port::weight("gate", vec![m, h]),
            Port::weight("up", vec![m, h]),
            Port::weight("down", vec![h, m]),
        ]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.hidden)]
    }
    /// Its output and the gate and up products.
    fn activation_floats(&self, tokens: usize) -> usize {
        tokens * (2 * self.intermediate + self.hidden)
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(SwiGlu { hidden: self.hidden, intermediate: self.intermediate })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuSwiGlu { hidden: self.hidden, intermediate: self.intermediate }))
    }
}

/// `down(silu(gate(x)) * up(x))` for `t` rows of `x` (`[t, h]`); `gate`, `up` `[m, h]`, `down`
/// `[h, m]`. Outputs and scratch come from the activation pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    x: &[f32],
    t: usize,
    gate: WeightView<'_>,
    up: WeightView<'_>,
    down: WeightView<'_>,
    h: usize,
    m: usize,
    cx: &FireCx,
) -> Result<Tensor, OpError> {
    let mut g = cx.zeros_f32(vec![t, m])?; // [tokens, intermediate]
    let mut u = cx.zeros_f32(vec![t, m])?; // [tokens, intermediate]
    weir_kernels::matmul::matmul(x, t, gate, m, None, g.f32_mut(), cx.par);
    weir_kernels::matmul::matmul(x, t, up, m, None, u.f32_mut(), cx.par);
    weir_kernels::activation::silu_mul_inplace(g.f32_mut(), u.f32());
    drop(u);
    let mut y = cx.zeros_f32(vec![t, h])?; // [tokens, hidden]
    weir_kernels::matmul::matmul(g.f32(), t, down, h, None, y.f32_mut(), cx.par);
    Ok(y)
}

/// See the module doc.
pub struct SwiGlu {
    pub hidden: usize,
    pub intermediate: usize,
}

impl Operator<Packet> for SwiGlu {
    fn kind(&self) -> &str {
        "swiglu"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let (h, m) = (self.hidden, self.intermediate);
        let (gn, g) = ins.get(1).weight("gate")?;
        let (un, u) = ins.get(2).weight("up")?;
        let (dn, d) = ins.get(3).weight("down")?;
        let (g, u, d) = (weight_view(gn, g, &[m, h])?, weight_view(un, u, &[m, h])?, weight_view(dn, d, &[h, m])?);
        let (batch, x) = ins.get(0).act("x")?;
        check_act("x", batch, x, h)?;
        let y = forward(x.f32(), batch.tokens(), g, u, d, h, m, cx)?;
        out.send(0, Packet::Act { batch: batch.clone(), x: y });
        Ok(Step::Continue)
    }
}

/// [`SwiGlu`] on a GPU lane.
pub struct GpuSwiGlu {
    pub hidden: usize,
    pub intermediate: usize,
}

impl Operator<Packet> for GpuSwiGlu {
    fn kind(&self) -> &str {
        "swiglu"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let (h, m) = (self.hidden, self.intermediate);
        let gate = crate::gpu::weight("gate", ins.get(1), &[m, h])?;
        let up = crate::gpu::weight("up", ins.get(2), &[m, h])?;
        let down = crate::gpu::weight("down", ins.get(3), &[h, m])?;
        let (batch, x) = crate::gpu::act("x", ins.get(0), h)?;
        let y = gpu_forward(g, &x.f32()?, batch.tokens(), gate, up, down, h, m)?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

/// A GPU weight and its element type.
pub(crate) type GpuWeight<'a> = (&'a weir_runtime::gpu::DeviceTensor, weir_kernels::cuda::Elem);

/// `down(silu(gate(x)) · up(x))` on the lane's stream, `x` `[t, h]`: the MLP of [`GpuSwiGlu`]
/// and of each expert on a GPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gpu_forward(
    g: &weir_runtime::gpu::GpuLane,
    x: &cudarc::driver::CudaView<'_, f32>,
    t: usize,
    (gate, ge): GpuWeight<'_>,
    (up, ue): GpuWeight<'_>,
    (down, de): GpuWeight<'_>,
    h: usize,
    m: usize,
) -> Result<weir_runtime::gpu::DeviceTensorMut, OpError> {
    let mut a = crate::gpu::linear(g, x, t, gate, ge, m, None)?;
    let u = crate::gpu::linear(g, x, t, up, ue, m, None)?;
    g.kernels.silu_mul(&mut a.f32_mut(), &u.f32()).map_err(crate::gpu::err)?;
    drop(u);
    crate::gpu::linear(g, &a.f32(), t, down, de, h, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn matches_the_formula_on_one_unit() {
        let b = batch(&[(0, 1)]);
        let mut op = SwiGlu { hidden: 1, intermediate: 1 };
        let out = fire(
            &mut op,
            vec![
                act(&b, 1, &[2.0]),
                weight(vec![1, 1], &[1.5]),
                weight(vec![1, 1], &[-1.0]),
                weight(vec![1, 1], &[3.0]),
            ],
            1,
        )
        .unwrap();
        let g = 3.0f32;
        let want = 3.0 * (g / (1.0 + (-g).exp())) * -2.0;
        assert!((out[0].as_ref().unwrap().act("y").unwrap().1.f32()[0] - want).abs() < 1e-5);
    }
}
