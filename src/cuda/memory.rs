//! Device and pinned host memory, owned plainly: a `DeviceBuffer` is one `cuMemAlloc`, a `Pinned` one
//! `cuMemHostAlloc`, and [`Dev`] is a typed address range inside memory someone else keeps alive.
//!
//! The engine allocates a few large buffers up front (the weights, one activation arena sized from
//! `--batch-tokens`, pinned staging) and hands out views of them; nothing is allocated per batch. cudarc's
//! `CudaSlice` would record events on every use to order streams for us; the engine orders its two streams
//! itself with explicit events, so it keeps raw device addresses instead.

use anyhow::Result;
use cudarc::driver::{CudaContext, CudaStream, DriverError, result, sys};
use std::marker::PhantomData;
use std::sync::Arc;

/// Alignment of every sub-allocation: enough for 16-byte vector accesses and the 32-byte alignment of
/// tensor-core fragments, and what cuBLAS prefers for its operands.
pub const ALIGN: usize = 256;

/// `len` elements of `T` at device address `ptr`. Plain data: the memory belongs to a [`DeviceBuffer`] that
/// must outlive every use, which the owners in this crate (the model, the arena) guarantee by holding both.
pub struct Dev<T> {
    ptr: u64,
    len: usize,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Dev<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Dev<T> {}

impl<T> std::fmt::Debug for Dev<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dev<{}>[{:#x}; {}]", std::any::type_name::<T>(), self.ptr, self.len)
    }
}

impl<T> Dev<T> {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// Elements `start .. start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Dev<T> {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len), "{self:?}: no elements {start}+{len}");
        Dev { ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64, len, _type: PhantomData }
    }

    /// The same bytes seen as `U` (the whole `U` elements that fit).
    pub fn cast<U>(&self) -> Dev<U> {
        Dev { ptr: self.ptr, len: self.bytes() / std::mem::size_of::<U>(), _type: PhantomData }
    }
}

/// One device allocation, freed on drop.
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    ptr: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// `bytes` of uninitialised device memory.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: a plain allocation; zero bytes is allowed and yields a null address, never used.
        let ptr = if bytes == 0 { 0 } else { unsafe { result::malloc_sync(bytes) }? };
        Ok(DeviceBuffer { ctx: ctx.clone(), ptr, bytes })
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `len` elements of `T` from byte `offset`.
    pub fn view<T>(&self, offset: usize, len: usize) -> Dev<T> {
        let end = len.checked_mul(std::mem::size_of::<T>()).and_then(|b| b.checked_add(offset));
        assert!(end.is_some_and(|end| end <= self.bytes), "a view past the end of a {}-byte buffer", self.bytes);
        assert!(offset.is_multiple_of(std::mem::align_of::<T>()), "a misaligned view");
        Dev { ptr: self.ptr + offset as u64, len, _type: PhantomData }
    }

    /// The whole buffer as `T`.
    pub fn all<T>(&self) -> Dev<T> {
        self.view(0, self.bytes / std::mem::size_of::<T>())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // Errors here (a context already torn down) cannot be reported from a destructor.
            let _ = self.ctx.bind_to_thread();
            // SAFETY: allocated by cuMemAlloc in this context and freed once. Owners synchronise their
            // streams before dropping buffers, so no queued work still uses it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Plans sub-allocations of one buffer: each request gets an [`ALIGN`]-aligned byte offset.
#[derive(Default, Debug)]
pub struct Layout {
    bytes: usize,
}

impl Layout {
    /// Reserves `len` elements of `T`; returns their byte offset.
    pub fn take<T>(&mut self, len: usize) -> usize {
        let offset = self.bytes.next_multiple_of(ALIGN);
        self.bytes = offset + len * std::mem::size_of::<T>();
        offset
    }

    pub fn bytes(&self) -> usize {
        self.bytes.next_multiple_of(ALIGN)
    }
}

/// Page-locked host memory: the staging area of asynchronous copies.
pub struct Pinned<T: bytemuck::Pod> {
    ctx: Arc<CudaContext>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: the memory is a plain host allocation owned by this value; moving it to another thread moves the
// ownership, and the context handle is thread-safe.
unsafe impl<T: bytemuck::Pod> Send for Pinned<T> {}

impl<T: bytemuck::Pod> Pinned<T> {
    /// `len` zeroed elements.
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // Not write-combined: the host reads results back from these buffers, and reads from
        // write-combined memory are uncached.
        // SAFETY: a plain allocation of `bytes` bytes, zeroed before any typed access.
        let ptr = unsafe { result::malloc_host(bytes, 0) }? as *mut T;
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
        Ok(Pinned { ctx: ctx.clone(), ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host view. The caller makes sure no copy into this memory is in flight (an event it waited on).
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised elements owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The host view for writing. The caller makes sure no copy out of this memory is in flight.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, borrowed mutably through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Copies `len` elements to `dst` on `stream`, returning at once. Neither side may be touched until the
    /// stream has passed this point.
    pub fn copy_to_device(&self, dst: Dev<T>, len: usize, stream: &CudaStream) -> Result<(), DriverError> {
        assert!(len <= self.len && len <= dst.len(), "pinned upload of {len} elements into {dst:?}");
        self.ctx.bind_to_thread()?;
        // SAFETY: both ranges are in bounds (asserted); the memory is page-locked, so the copy is truly
        // asynchronous and the caller's event discipline keeps it alive and untouched.
        unsafe { result::memcpy_htod_async(dst.ptr(), &self.as_slice()[..len], stream.cu_stream()) }
    }

    /// Copies `len` elements from `src` on `stream`, returning at once (see [`Self::copy_to_device`]).
    pub fn copy_from_device(&mut self, src: Dev<T>, len: usize, stream: &CudaStream) -> Result<(), DriverError> {
        assert!(len <= self.len && len <= src.len(), "pinned download of {len} elements from {src:?}");
        self.ctx.bind_to_thread()?;
        // SAFETY: as in copy_to_device.
        unsafe { result::memcpy_dtoh_async(&mut self.as_mut_slice()[..len], src.ptr(), stream.cu_stream()) }
    }
}

impl<T: bytemuck::Pod> Drop for Pinned<T> {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc and freed once. Owners synchronise their streams before
        // dropping staging buffers, so no copy still uses it.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

/// True when a driver error is the device running out of memory.
pub fn is_out_of_memory(err: &DriverError) -> bool {
    err.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY
}
