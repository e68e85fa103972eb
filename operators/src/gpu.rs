//! What the GPU versions of the operators share: checks of GPU tensors against the shapes an
//! operator expects, and the linear layer (cuBLAS) that Linear, SwiGLU and the LM head run.
//!
//! A GPU operator lives in the same file as its CPU one (`GpuLinear` beside `Linear`) and
//! computes the same thing with `weir_kernels::cuda`; [`crate::OpConfig::instantiate_gpu`] picks
//! the one for the lane a node is placed on. Its inputs arrive as [`Packet::DevAct`] and
//! [`Packet::DevWeight`], made by the transfer operators ([`crate::to_gpu`],
//! [`crate::to_host`]) that the placement puts on every edge between host and GPU memory.

use crate::{Batch, Packet};
use cudarc::driver::CudaView;
use weir_kernels::cuda::{Elem, GpuError};
use weir_runtime::gpu::{DeviceTensor, DeviceTensorMut, GpuLane};
use weir_runtime::{DType, OpError};

/// A GPU failure as an operator error.
pub(crate) fn err(e: GpuError) -> OpError {
    OpError::new(e.to_string())
}

/// The kernels' element type of a weight.
pub(crate) fn elem(name: &str, dtype: DType) -> Result<Elem, OpError> {
    match dtype {
        DType::F32 => Ok(Elem::F32),
        DType::BF16 => Ok(Elem::Bf16),
        DType::F16 => Ok(Elem::F16),
        DType::U32 => Err(OpError::new(format!("weight `{name}` has dtype u32, expected f32, bf16 or f16"))),
    }
}

/// A GPU weight checked against the shape the operator expects.
pub(crate) fn weight<'a>(port: &str, p: &'a Packet, shape: &[usize]) -> Result<(&'a DeviceTensor, Elem), OpError> {
    let (name, w) = p.dev_weight(port)?;
    if w.shape != shape {
        return Err(OpError::new(format!("weight `{name}` has shape {:?}, expected {shape:?}", w.shape)));
    }
    Ok((w, elem(name, w.dtype)?))
}

/// A GPU vector weight (norm, bias: made f32 by the upload) of `len` values.
pub(crate) fn vector<'a>(port: &str, p: &'a Packet, len: usize) -> Result<CudaView<'a, f32>, OpError> {
    let (name, w) = p.dev_weight(port)?;
    if w.shape != [len] {
        return Err(OpError::new(format!("weight `{name}` has shape {:?}, expected [{len}]", w.shape)));
    }
    w.f32()
}

/// GPU activations `[tokens, width]` with `tokens` matching the batch.
pub(crate) fn act<'a>(
    port: &str,
    p: &'a Packet,
    width: usize,
) -> Result<(&'a std::sync::Arc<Batch>, &'a DeviceTensor), OpError> {
    let (batch, x) = p.dev_act(port)?;
    if x.shape != [batch.tokens(), width] {
        return Err(OpError::new(format!(
            "port `{port}`: activations have shape {:?}, expected [{}, {width}]",
            x.shape,
            batch.tokens()
        )));
    }
    Ok((batch, x))
}

/// `y = x · Wᵀ (+ b)` on the lane's stream: `x` `[t, k]`, `w` `[n, k]` of `e`; `y` `[t, n]`.
pub(crate) fn linear(
    g: &GpuLane,
    x: &CudaView<'_, f32>,
    t: usize,
    w: &DeviceTensor,
    e: Elem,
    n: usize,
    bias: Option<&CudaView<'_, f32>>,
) -> Result<DeviceTensorMut, OpError> {
    let k = x.len() / t.max(1);
    let mut y = g.alloc(DType::F32, vec![t, n])?;
    // The input rounded to the weights' type (bf16/f16 GEMMs take both operands in it).
    let mut scratch = g.alloc(DType::BF16, vec![if e == Elem::F32 { 1 } else { t * k }])?;
    g.kernels.linear(x, t, &w.bytes(), e, n, &mut y.f32_mut(), &mut scratch.bytes_mut()).map_err(err)?;
    if let Some(b) = bias {
        g.kernels.add_bias(&mut y.f32_mut(), b).map_err(err)?;
    }
    Ok(y)
}

/// A copy of `x` on the lane's stream (for operators that change their input in place).
pub(crate) fn copy(g: &GpuLane, x: &DeviceTensor) -> Result<DeviceTensorMut, OpError> {
    let mut y = g.alloc(x.dtype, x.shape.clone())?;
    if x.nbytes() == 0 {
        return Ok(y);
    }
    let stream = g.stream().clone();
    weir_kernels::cuda::call("copying on the GPU", || stream.memcpy_dtod(&x.bytes(), &mut y.bytes_mut()))
        .map_err(err)?;
    Ok(y)
}
