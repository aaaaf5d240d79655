//! Device memory that knows its element type and count.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use half::{bf16, f16};

use super::driver_err;
use crate::dtype::{DType, Src};
use crate::error::{invalid, Result};

/// Element type of a [`DeviceBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferDType {
    /// Packed planes.
    U8,
    /// f32, f16 or bf16 tensors (norms are f32).
    Float(DType),
}

impl BufferDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            BufferDType::U8 => 1,
            BufferDType::Float(d) => d.size(),
        }
    }
}

/// `len` elements of `dtype` in device memory (bytes, allocation-aligned).
#[derive(Debug)]
pub struct DeviceBuffer {
    data: CudaSlice<u8>,
    dtype: BufferDType,
    len: usize,
}

impl DeviceBuffer {
    /// `len` zeroed elements.
    pub fn zeros(stream: &Arc<CudaStream>, dtype: BufferDType, len: usize) -> Result<Self> {
        let Some(bytes) = len.checked_mul(dtype.size()) else {
            invalid!("device buffer: {len} elements of {dtype:?} overflow usize bytes");
        };
        let data = stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| driver_err("device buffer: alloc", e))?;
        Ok(Self { data, dtype, len })
    }

    fn from_bytes(stream: &Arc<CudaStream>, dtype: BufferDType, bytes: &[u8]) -> Result<Self> {
        let mut buf = Self::zeros(stream, dtype, bytes.len() / dtype.size())?;
        if !bytes.is_empty() {
            stream
                .memcpy_htod(bytes, &mut buf.data)
                .map_err(|e| driver_err("device buffer: upload", e))?;
        }
        Ok(buf)
    }

    /// A copy of host bytes (a packed plane).
    pub fn from_u8(stream: &Arc<CudaStream>, host: &[u8]) -> Result<Self> {
        Self::from_bytes(stream, BufferDType::U8, host)
    }

    /// A copy of an f32, f16 or bf16 host tensor.
    pub fn from_src(stream: &Arc<CudaStream>, host: Src<'_>) -> Result<Self> {
        let bytes: &[u8] = match host {
            Src::F32(s) => bytemuck::cast_slice(s),
            Src::F16(s) => bytemuck::cast_slice(s),
            Src::Bf16(s) => bytemuck::cast_slice(s),
        };
        Self::from_bytes(stream, BufferDType::Float(host.dtype()), bytes)
    }

    /// A copy of an f32 host tensor (norms).
    pub fn from_f32(stream: &Arc<CudaStream>, host: &[f32]) -> Result<Self> {
        Self::from_src(stream, Src::F32(host))
    }

    pub fn dtype(&self) -> BufferDType {
        self.dtype
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the elements.
    pub fn num_bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// The raw bytes on the device (at least one byte is allocated).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.data
    }

    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.data
    }

    /// Sets every byte to `byte` (0xFF makes every f32/f16/bf16 element a NaN: test poison).
    pub fn fill_bytes(&mut self, stream: &Arc<CudaStream>, byte: u8) -> Result<()> {
        let n = self.num_bytes();
        if n == 0 {
            return Ok(());
        }
        let (ptr, _sync) = self.data.device_ptr_mut(stream);
        // SAFETY: `ptr` addresses `n <= allocation` bytes of this live buffer, ordered on `stream`.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, n, stream.cu_stream()) }
            .map_err(|e| driver_err("device buffer: memset", e))
    }

    /// Copies the bytes to the host (synchronizes `stream`).
    pub fn to_bytes(&self, stream: &Arc<CudaStream>) -> Result<Vec<u8>> {
        let mut v = stream
            .clone_dtoh(&self.data)
            .map_err(|e| driver_err("device buffer: download", e))?;
        v.truncate(self.num_bytes());
        Ok(v)
    }

    fn check(&self, op: &str, want: BufferDType) -> Result<()> {
        if self.dtype != want {
            invalid!("{op}: buffer holds {:?}, not {want:?}", self.dtype);
        }
        Ok(())
    }

    /// Copies an f32 buffer to the host.
    pub fn to_f32(&self, stream: &Arc<CudaStream>) -> Result<Vec<f32>> {
        self.check("device buffer: to_f32", BufferDType::Float(DType::F32))?;
        Ok(pod_vec(&self.to_bytes(stream)?))
    }

    /// Copies an f16 buffer to the host.
    pub fn to_f16(&self, stream: &Arc<CudaStream>) -> Result<Vec<f16>> {
        self.check("device buffer: to_f16", BufferDType::Float(DType::F16))?;
        Ok(pod_vec(&self.to_bytes(stream)?))
    }

    /// Copies a bf16 buffer to the host.
    pub fn to_bf16(&self, stream: &Arc<CudaStream>) -> Result<Vec<bf16>> {
        self.check("device buffer: to_bf16", BufferDType::Float(DType::Bf16))?;
        Ok(pod_vec(&self.to_bytes(stream)?))
    }
}

/// Reinterprets little-endian bytes as elements (any alignment).
fn pod_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    bytes
        .chunks_exact(std::mem::size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}
