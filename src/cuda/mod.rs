//! CUDA backend: the codec's quantize and dequantize on an NVIDIA GPU, bit-identical to
//! [`crate::cpu`].
//!
//! - [`CudaDevice`]: a context, its stream and the kernel [`Registry`]; [`CudaDevice::new`]
//!   returns `TqError::Cuda` (never panics) when libcuda, libnvrtc or a device is missing.
//! - [`DeviceBuffer`]: device memory that knows its element type and count.
//! - [`CudaCodec`]: a [`crate::Codec`] with its tables on the device; `quantize`,
//!   `dequantize_seq`, `dequantize_pos` validate like the CPU ops, then launch one kernel.
//! - [`BatchCache`]: the caches of many sequences in one set of device planes; one-launch
//!   append of a token per sequence; fused decode attention ([`BatchCache::attention`]).
//!
//! Kernels live in `kernels/*.cu`, are compiled by NVRTC for the device's compute capability
//! once per (kernel, compile-time constants) and cached.

mod batch;
mod buffer;
mod codec;
mod decode;
mod device;
mod params;
mod registry;

pub use batch::{BatchCache, SeqPlanes};
pub use buffer::{BufferDType, DeviceBuffer};
pub use codec::CudaCodec;
pub use decode::{
    num_splits, DecodeKernelInfo, DecodeVariant, ExactPlacement,
    HEAD_DIM_RANGE as DECODE_HEAD_DIM_RANGE, MAX_GQA,
};
pub use device::CudaDevice;
pub use params::{DecodeParams, DequantizeParams, QuantizeParams};
pub use registry::{compile_ptx, Family, KernelKey, Registry};

pub use cudarc::driver::{CudaEvent, CudaStream};

use crate::error::TqError;

/// Wraps a driver error into `TqError::Cuda`, naming the operation.
pub(crate) fn driver_err(op: &str, e: cudarc::driver::DriverError) -> TqError {
    TqError::Cuda(format!("{op}: {e}"))
}
