//! A GPU lane as its operators see it: one CUDA stream with weir's kernels loaded on it, and
//! its device's memory pool; and the tensors that live in device memory.
//!
//! Every operator of a GPU lane only enqueues work on the lane's stream and returns; the lane
//! thread goes on firing. Order across lanes (a copy lane's upload before the compute lane's
//! GEMM on that weight) comes from cudarc's events on each buffer — a stream waits for the
//! last write to a buffer before reading it — never from a device-wide synchronise. The host
//! waits only where it needs values back (a download), and then for that stream alone.

use super::{BlockPool, DeviceBlock, GpuError, Leased};
use crate::tensor::DType;
use crate::OpError;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::sync::Arc;
use weir_kernels::cuda::{call, GpuKernels};

/// What a GPU lane gives the operators it fires.
pub struct GpuLane {
    /// weir's kernels on this lane's stream.
    pub kernels: GpuKernels,
    /// The device's memory (shared by the device's lanes, under `--gpu-memory`).
    pub memory: BlockPool<DeviceBlock>,
}

impl std::fmt::Debug for GpuLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuLane({:?}, {:?})", self.kernels, self.memory)
    }
}

fn op_err(e: GpuError) -> OpError {
    OpError::new(e.to_string())
}

impl GpuLane {
    /// The lane's stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.kernels.stream()
    }

    /// A tensor in device memory from the pool (contents unset: the caller writes it whole).
    /// No room in the pool is an error naming it and its budget (`--gpu-memory`).
    pub fn alloc(&self, dtype: DType, shape: Vec<usize>) -> Result<DeviceTensorMut, OpError> {
        let bytes = (shape.iter().product::<usize>() * dtype.size()).max(1);
        match self.memory.try_alloc(bytes).map_err(op_err)? {
            Some(block) => Ok(DeviceTensorMut { dtype, shape, block }),
            None => Err(OpError::new(format!(
                "GPU memory pool `{}` has no room for {bytes} bytes {shape:?}: {} of its {} bytes are in use \
                 (--gpu-memory sets its budget)",
                self.memory.name(),
                self.memory.in_use(),
                self.memory.budget()
            ))),
        }
    }

    /// `bytes` (a host tensor's data) copied to a new device tensor, on this lane's stream.
    pub fn upload(&self, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<DeviceTensor, OpError> {
        let mut t = self.alloc(dtype, shape)?;
        if bytes.len() != t.nbytes() {
            return Err(OpError::new(format!("uploading {} bytes into a tensor of {}", bytes.len(), t.nbytes())));
        }
        let stream = self.stream();
        if !bytes.is_empty() {
            let mut dst = t.bytes_mut();
            call("copying to the GPU", || stream.memcpy_htod(bytes, &mut dst)).map_err(op_err)?;
        }
        Ok(t.freeze())
    }

    /// A host tensor copied to a new device tensor as [`GpuLane::upload`] does, but from its
    /// buffer pinned ([`super::pinned`]: registered on first use) where the driver allows, so
    /// the copy is a DMA from it. The buffer must be one that will be uploaded from again (a
    /// streamed weight's pool buffer): pinning costs about as much as one copy. Returns once
    /// the copy is done, so the buffer may be reused as soon as it is dropped.
    pub fn upload_pinned(&self, dtype: DType, shape: Vec<usize>, t: &crate::Tensor) -> Result<DeviceTensor, OpError> {
        let (ptr, len) = t.buffer();
        if !super::pinned::pin(self.stream().context(), ptr, len).map_err(op_err)? {
            return self.upload(dtype, shape, t.bytes());
        }
        let up = self.upload(dtype, shape, t.bytes())?;
        // From pinned memory the copy is still running: wait for it (this lane's stream only).
        call("waiting for a copy to the GPU", || self.stream().synchronize()).map_err(op_err)?;
        Ok(up)
    }

    /// Small host values (token ids, positions, block tables) as a device array, on this
    /// lane's stream.
    pub fn upload_values<T: cudarc::driver::DeviceRepr>(
        &self,
        v: &[T],
    ) -> Result<cudarc::driver::CudaSlice<T>, OpError> {
        let stream = self.stream();
        call("copying to the GPU", || stream.clone_htod(v)).map_err(op_err)
    }

    /// A device tensor's bytes back in host memory; waits for this lane's stream only.
    pub fn download(&self, t: &DeviceTensor, out: &mut [u8]) -> Result<(), OpError> {
        if out.len() != t.nbytes() {
            return Err(OpError::new(format!("downloading {} bytes into {}", t.nbytes(), out.len())));
        }
        if out.is_empty() {
            return Ok(());
        }
        let stream = self.stream();
        call("copying from the GPU", || {
            stream.memcpy_dtoh(&t.bytes(), out)?;
            stream.synchronize()
        })
        .map_err(op_err)
    }
}

/// A tensor in device memory, shared read-only (cloning shares the block; it returns to the
/// pool when the last holder drops it).
#[derive(Clone)]
pub struct DeviceTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    block: Arc<Leased<DeviceBlock>>,
    /// Something held as long as this tensor is (see [`DeviceTensor::holding`]).
    held: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceTensor({} {:?})", self.dtype.name(), self.shape)
    }
}

impl DeviceTensor {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// This tensor, keeping `x` alive as long as any copy of it lives: a streamed weight's host
    /// buffer, so that the host pool's budget also bounds how many uploaded copies are in GPU
    /// memory at once (the loader reads the next only when an earlier copy is done with).
    pub fn holding(mut self, x: Arc<dyn std::any::Any + Send + Sync>) -> DeviceTensor {
        self.held = Some(x);
        self
    }
    /// The data as bytes.
    pub fn bytes(&self) -> CudaView<'_, u8> {
        self.block.0.slice(..self.nbytes())
    }
    /// The data as f32 (an error naming the dtype otherwise).
    pub fn f32(&self) -> Result<CudaView<'_, f32>, OpError> {
        if self.dtype != DType::F32 {
            return Err(OpError::new(format!("a GPU tensor of {} where f32 was expected", self.dtype.name())));
        }
        // SAFETY: the block holds at least numel f32 values (allocated for them).
        unsafe { self.block.0.transmute::<f32>(self.numel()) }
            .ok_or_else(|| OpError::new("a GPU tensor smaller than its shape"))
    }
}

/// A device tensor being written by the operator that allocated it.
pub struct DeviceTensorMut {
    pub dtype: DType,
    pub shape: Vec<usize>,
    block: Leased<DeviceBlock>,
}

impl DeviceTensorMut {
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
    /// The data as bytes, to write.
    pub fn bytes_mut(&mut self) -> CudaViewMut<'_, u8> {
        let n = self.nbytes();
        self.block.0.slice_mut(..n)
    }
    /// The data as f32, to write (allocated as f32: see [`GpuLane::alloc`]).
    pub fn f32_mut(&mut self) -> CudaViewMut<'_, f32> {
        debug_assert_eq!(self.dtype, DType::F32);
        let n = self.shape.iter().product::<usize>();
        // SAFETY: the block holds nbytes ≥ n f32 values.
        unsafe { self.block.0.transmute_mut::<f32>(n) }.expect("a block the size of its tensor")
    }
    /// The data as f32, to read while it is still being written.
    pub fn f32(&self) -> CudaView<'_, f32> {
        let n = self.shape.iter().product::<usize>();
        // SAFETY: as above.
        unsafe { self.block.0.transmute::<f32>(n) }.expect("a block the size of its tensor")
    }
    /// Done writing: a shareable tensor.
    pub fn freeze(self) -> DeviceTensor {
        DeviceTensor { dtype: self.dtype, shape: self.shape, block: Arc::new(self.block), held: None }
    }
}
