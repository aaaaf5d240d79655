//! Device detection and the context, stream and kernel registry of one GPU.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaStream};

use super::driver_err;
use super::registry::Registry;
use crate::error::{Result, TqError};

/// One GPU: its context, the stream tqkv's work runs on (the default stream), and the
/// compiled-kernel cache.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
    l2_bytes: u64,
    registry: Registry,
}

/// Checks that libcuda and libnvrtc load, before any cudarc call (cudarc panics without them).
fn check_libraries() -> Result<()> {
    // SAFETY: these only try to open the shared libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(TqError::Cuda(
            "no CUDA driver: libcuda could not be loaded (is an NVIDIA driver installed? is \
             LD_LIBRARY_PATH set?)"
                .into(),
        ));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(TqError::Cuda(
            "no NVRTC: libnvrtc could not be loaded (add the CUDA toolkit's lib64 to \
             LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    Ok(())
}

impl CudaDevice {
    /// True when libcuda and libnvrtc load and at least one device is present.
    pub fn is_available() -> bool {
        check_libraries().is_ok() && CudaContext::device_count().is_ok_and(|n| n > 0)
    }

    /// Opens device `ordinal` (its primary context) with a new stream.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        check_libraries()?;
        let count = CudaContext::device_count().map_err(|e| driver_err("cuda device", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(TqError::Cuda(format!(
                "cuda device: ordinal {ordinal} requested, {count} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("cuda device", e))?;
        // The context's default stream: while no other stream exists, cudarc records no
        // per-buffer events around launches (cheaper decode steps).
        let stream = ctx.default_stream();
        let name = ctx.name().map_err(|e| driver_err("cuda device", e))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| driver_err("cuda device", e))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_err("cuda device", e))?
            .max(1) as u32;
        let l2_bytes = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| driver_err("cuda device", e))?
            .max(0) as u64;
        Ok(Arc::new(Self {
            registry: Registry::new(Registry::arch_for(compute_capability)),
            ctx,
            stream,
            name,
            compute_capability,
            sm_count,
            l2_bytes,
        }))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream tqkv's operations on this device run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new stream on this device (from then on cudarc orders buffer uses across streams with
    /// events).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx
            .new_stream()
            .map_err(|e| driver_err("cuda device: new stream", e))
    }

    /// Waits for all work on [`CudaDevice::stream`].
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("cuda synchronize", e))
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor), e.g. (9, 0) on the H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// L2 cache bytes (50 MiB on the H100 SXM).
    pub fn l2_bytes(&self) -> u64 {
        self.l2_bytes
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
