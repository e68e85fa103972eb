//! Data types, aligned host buffers and tensors. (Tensors in a GPU's memory are
//! `gpu::DeviceTensor`.)

use std::sync::Arc;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    /// The lower-case name (`f32`, `bf16`, …).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }
}

const PAGE: usize = 4096;
/// Buffers from this size up are mapped directly, 2 MiB aligned and marked for transparent
/// huge pages: the kernel hands them out zeroed (no memset), and a fresh 24 MB weight buffer
/// costs a dozen page faults instead of six thousand.
pub(crate) const HUGE: usize = 2 << 20;

/// Maps `len` zeroed bytes at a 2 MiB boundary and asks for huge pages; `None` if the mapping
/// fails (out of memory).
fn map_huge(len: usize) -> Option<std::ptr::NonNull<u8>> {
    let len = len.next_multiple_of(PAGE);
    let span = len + HUGE;
    // SAFETY: an anonymous private mapping; the parts outside the aligned range are unmapped
    // at once, and the rest is owned by the buffer until its drop unmaps it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = p as usize;
        let start = base.next_multiple_of(HUGE);
        if start > base {
            libc::munmap(p, start - base);
        }
        let tail = base + span - (start + len);
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        std::ptr::NonNull::new(start as *mut u8)
    }
}

/// Small buffers are cache-line aligned; buffers of a page or more are page aligned, as
/// direct I/O requires.
fn align_for(len: usize) -> usize {
    if len >= 4096 {
        4096
    } else {
        64
    }
}

/// An aligned (64 bytes; 4096 from a page up), zero-initialised byte buffer in host memory, counted by a [`Pool`]
/// when it came from one (its bytes return to the pool when it is dropped).
///
/// [`Pool`]: crate::pool::Pool
pub struct HostBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Its own mapping (`map_huge`, or built by [`HostBuffer::assemble`]), not the heap's.
    mapped: bool,
    pub(crate) lease: Option<Arc<crate::pool::PoolInner>>,
}

// SAFETY: HostBuffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> HostBuffer {
        if len == 0 {
            return HostBuffer { ptr: std::ptr::NonNull::<u64>::dangling().cast(), len: 0, mapped: false, lease: None };
        }
        if len >= HUGE {
            let ptr = map_huge(len).unwrap_or_else(|| {
                std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(len, HUGE).expect("buffer layout"))
            });
            return HostBuffer { ptr, len, mapped: true, lease: None };
        }
        let layout = std::alloc::Layout::from_size_align(len, align_for(len)).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        HostBuffer { ptr, len, mapped: false, lease: None }
    }

    /// How many whole 2 MiB units [`HostBuffer::assemble`] could take from this buffer.
    pub(crate) fn movable_units(&self) -> usize {
        if self.mapped {
            self.len / HUGE
        } else {
            0
        }
    }

    /// Whether this is what is left of a mapped buffer after [`HostBuffer::assemble`] took its
    /// whole units: less than a unit.
    pub(crate) fn is_remnant(&self) -> bool {
        self.mapped && self.len < HUGE
    }

    /// A buffer of `len` bytes whose first whole 2 MiB units are pages moved out of `spare`
    /// buffers by the kernel (`mremap`: page tables change hands, nothing is copied or zeroed;
    /// the pages keep their old contents), the rest fresh zeroed pages. Units come from the
    /// front of each spare buffer in turn, which shrinks by them. Returns the buffer and the
    /// bytes moved into it; `None` if mapping fails.
    ///
    /// Memory that comes back in other sizes than the next request (streamed weights in a
    /// tight pool) is thus reused without the kernel clearing a fresh page for every byte.
    pub(crate) fn assemble(len: usize, spare: &mut [HostBuffer]) -> Option<(HostBuffer, usize)> {
        let ptr = map_huge(len)?;
        let base = ptr.as_ptr() as usize;
        let units = len / HUGE;
        let mut moved = 0;
        'fill: for s in spare.iter_mut() {
            while s.movable_units() > 0 {
                if moved == units {
                    break 'fill;
                }
                let src = s.ptr.as_ptr() as usize;
                let dst = base + moved * HUGE;
                // Pages pinned for a copy lane are unpinned before they move.
                crate::gpu::pinned::forget(s.ptr.as_ptr(), s.len);
                // SAFETY: src..src+HUGE is a whole unit of `s`'s own mapping (2 MiB aligned:
                // mapped buffers start on a 2 MiB boundary and shrink by whole units), and
                // dst..dst+HUGE lies in the mapping just made; MREMAP_FIXED replaces the latter
                // with the former, leaving src unmapped, which `s` no longer covers below.
                let r = unsafe {
                    libc::mremap(
                        src as *mut libc::c_void,
                        HUGE,
                        HUGE,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        dst as *mut libc::c_void,
                    )
                };
                if r == libc::MAP_FAILED {
                    break 'fill;
                }
                // SAFETY: a whole unit past the start stays inside (or one past) the mapping.
                s.ptr = unsafe { std::ptr::NonNull::new_unchecked((src + HUGE) as *mut u8) };
                s.len -= HUGE;
                moved += 1;
            }
        }
        Some((HostBuffer { ptr, len, mapped: true, lease: None }, moved * HUGE))
    }

    /// The address of the first byte (for I/O that writes into the buffer).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// The bytes, mutable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn typed<T: bytemuck_lite::Pod>(&self, off: usize, len: usize) -> &[T] {
        assert!(off.is_multiple_of(std::mem::size_of::<T>()) && off + len <= self.len, "typed view out of bounds");
        // SAFETY: in bounds (checked), aligned (64-byte allocation, offset a multiple of T's
        // size), and T is a plain number type.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off) as *const T, len / std::mem::size_of::<T>()) }
    }
    fn typed_mut<T: bytemuck_lite::Pod>(&mut self) -> &mut [T] {
        // SAFETY: as above, exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut T, self.len / std::mem::size_of::<T>()) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Some(pool) = self.lease.take() {
            // Back to its pool, memory and all, for the next buffer of this size.
            let b = HostBuffer { ptr: self.ptr, len: self.len, mapped: self.mapped, lease: None };
            self.len = 0;
            pool.give_back(b);
            return;
        }
        crate::gpu::pinned::forget(self.ptr.as_ptr(), self.len);
        if self.mapped {
            if self.len > 0 {
                // SAFETY: this range is mapped and owned by this buffer alone; unmapped once.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len.next_multiple_of(PAGE)) };
            }
            return;
        }
        if self.len > 0 {
            let layout = std::alloc::Layout::from_size_align(self.len, align_for(self.len)).expect("buffer layout");
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

mod bytemuck_lite {
    /// Plain number types that any bit pattern is valid for.
    pub trait Pod: Copy {}
    impl Pod for f32 {}
    impl Pod for u16 {}
    impl Pod for u32 {}
}

/// A dense row-major tensor in a host buffer shared by reference count, so fan-out is free.
#[derive(Clone)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    buf: Arc<HostBuffer>,
    /// Where the data starts in `buf` (direct I/O reads whole aligned blocks around a tensor).
    off: usize,
    /// Something held as long as this tensor (any clone of it) lives ([`Tensor::holding`]).
    held: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?})", self.dtype.name(), self.shape)
    }
}

impl Tensor {
    /// Wraps a buffer whose length matches `shape` and `dtype`.
    pub fn from_buffer(dtype: DType, shape: Vec<usize>, buf: HostBuffer) -> Tensor {
        debug_assert_eq!(buf.len(), shape.iter().product::<usize>() * dtype.size());
        Tensor { dtype, shape, buf: Arc::new(buf), off: 0, held: None }
    }

    /// Wraps the bytes `off..off + numel·size` of a larger buffer. `off` must be a multiple of
    /// the element size (checked: returns the buffer back otherwise).
    pub fn from_buffer_at(dtype: DType, shape: Vec<usize>, buf: HostBuffer, off: usize) -> Result<Tensor, HostBuffer> {
        let n = shape.iter().product::<usize>() * dtype.size();
        if !off.is_multiple_of(dtype.size()) || off + n > buf.len() {
            return Err(buf);
        }
        Ok(Tensor { dtype, shape, buf: Arc::new(buf), off, held: None })
    }

    fn data_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// A zeroed f32 tensor.
    pub fn zeros_f32(shape: Vec<usize>) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_buffer(DType::F32, shape, HostBuffer::zeroed(n * 4))
    }
    /// An f32 tensor holding `data`.
    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Tensor {
        let mut t = Tensor::zeros_f32(shape);
        t.f32_mut().copy_from_slice(data);
        t
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.data_len()
    }
    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_bytes()[self.off..self.off + self.data_len()]
    }
    /// This tensor, keeping `x` alive as long as any clone of it lives (a held weight sent
    /// from where it is held keeps the window's room it takes: `Pool::try_reserve`).
    pub fn holding(mut self, x: Arc<dyn std::any::Any + Send + Sync>) -> Tensor {
        self.held = Some(x);
        self
    }
    /// The whole buffer this tensor's data lies in: its start and length.
    pub fn buffer(&self) -> (*const u8, usize) {
        (self.buf.ptr.as_ptr(), self.buf.len)
    }
    /// Bytes held in memory for this tensor (its whole buffer).
    pub fn held_bytes(&self) -> usize {
        self.buf.len()
    }
    /// The data as f32 (panics if the dtype is not f32: a bug, not bad input).
    pub fn f32(&self) -> &[f32] {
        assert_eq!(self.dtype, DType::F32, "tensor is {}", self.dtype.name());
        self.buf.typed(self.off, self.data_len())
    }
    /// The data as 16-bit patterns (bf16 or f16).
    pub fn u16(&self) -> &[u16] {
        assert!(matches!(self.dtype, DType::BF16 | DType::F16), "tensor is {}", self.dtype.name());
        self.buf.typed(self.off, self.data_len())
    }
    /// The data as u32.
    pub fn u32(&self) -> &[u32] {
        assert_eq!(self.dtype, DType::U32, "tensor is {}", self.dtype.name());
        self.buf.typed(self.off, self.data_len())
    }
    /// Mutable f32 data; copies the buffer first if it is shared.
    pub fn f32_mut(&mut self) -> &mut [f32] {
        assert_eq!(self.dtype, DType::F32, "tensor is {}", self.dtype.name());
        self.unique_buf().typed_mut()
    }
    /// Mutable 16-bit patterns (bf16 or f16); copies the buffer first if it is shared.
    pub fn u16_mut(&mut self) -> &mut [u16] {
        assert!(matches!(self.dtype, DType::BF16 | DType::F16), "tensor is {}", self.dtype.name());
        self.unique_buf().typed_mut()
    }
    /// Mutable raw bytes; copies the buffer first if it is shared.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.unique_buf().as_bytes_mut()
    }
    /// The buffer, made this tensor's own and exactly its data.
    fn unique_buf(&mut self) -> &mut HostBuffer {
        if Arc::get_mut(&mut self.buf).is_none() || self.off != 0 || self.buf.len() != self.data_len() {
            let mut fresh = HostBuffer::zeroed(self.data_len());
            fresh.as_bytes_mut().copy_from_slice(self.bytes());
            self.buf = Arc::new(fresh);
            self.off = 0;
        }
        Arc::get_mut(&mut self.buf).expect("unique after copy")
    }

    /// The data converted to f32 (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.f32().to_vec(),
            DType::BF16 => self.u16().iter().map(|b| half::bf16::from_bits(*b).to_f32()).collect(),
            DType::F16 => self.u16().iter().map(|b| half::f16::from_bits(*b).to_f32()).collect(),
            DType::U32 => self.u32().iter().map(|v| *v as f32).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_shared_tensors_copy_on_write() {
        let b = HostBuffer::zeroed(100);
        assert_eq!(b.as_bytes().as_ptr() as usize % 64, 0);
        let a = Tensor::from_f32(vec![2], &[1.0, 2.0]);
        let mut c = a.clone();
        c.f32_mut()[0] = 5.0;
        assert_eq!(a.f32(), &[1.0, 2.0]);
        assert_eq!(c.f32(), &[5.0, 2.0]);
        assert_eq!(Tensor::zeros_f32(vec![0]).nbytes(), 0);
    }
}
