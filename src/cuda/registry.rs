//! NVRTC compilation of the kernel sources under `kernels/`, once per (kernel, compile-time
//! constants), cached per device.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::driver_err;
use crate::error::{Result, TqError};

const COMMON_SRC: &str = include_str!("../../kernels/common.cu");
const QUANTIZE_SRC: &str = include_str!("../../kernels/quantize.cu");
const DEQUANTIZE_SRC: &str = include_str!("../../kernels/dequantize.cu");

/// One kernel source (op family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Quantize,
    Dequantize,
}

impl Family {
    fn source(self) -> &'static str {
        match self {
            Family::Quantize => QUANTIZE_SRC,
            Family::Dequantize => DEQUANTIZE_SRC,
        }
    }

    /// The `extern "C"` entry point.
    pub fn entry(self) -> &'static str {
        match self {
            Family::Quantize => "tq_quantize",
            Family::Dequantize => "tq_dequantize",
        }
    }
}

/// A kernel instance: its family and compile-time constants (`-D NAME=value`, in order).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub family: Family,
    pub defines: Vec<(&'static str, i64)>,
}

impl fmt::Display for KernelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.family.entry())?;
        for (name, value) in &self.defines {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// Compiles one kernel instance to PTX for `arch` (e.g. "compute_90a"). IEEE division and square
/// root, no fused multiply-add, no flush-to-zero: the CPU's operation order survives compilation.
pub fn compile_ptx(key: &KernelKey, arch: &str) -> Result<Ptx> {
    let mut src = String::new();
    for (name, value) in &key.defines {
        src.push_str(&format!("#define {name} {value}\n"));
    }
    src.push_str(COMMON_SRC);
    src.push_str(key.family.source());
    let opts = CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(format!("{}.cu", key.family.entry())),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        CompileError::CompileError {
            nvrtc,
            options,
            log,
        } => TqError::Cuda(format!(
            "nvrtc: compiling {key} failed ({nvrtc:?}, options {options:?}):\n{}",
            log.to_string_lossy()
        )),
        other => TqError::Cuda(format!("nvrtc: compiling {key} failed: {other}")),
    })
}

/// Compiled kernels of one device, by instance.
#[derive(Debug)]
pub struct Registry {
    arch: String,
    cache: Mutex<HashMap<KernelKey, CudaFunction>>,
}

impl Registry {
    /// A registry compiling for `arch` (an NVRTC `--gpu-architecture` value).
    pub fn new(arch: String) -> Self {
        Self {
            arch,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The virtual architecture for a compute capability: `compute_XY`, with the
    /// architecture-specific suffix `a` from Hopper on (compute_90a on the H100).
    pub fn arch_for((major, minor): (i32, i32)) -> String {
        let suffix = if major >= 9 { "a" } else { "" };
        format!("compute_{major}{minor}{suffix}")
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The function of `key`, compiled and loaded on first use.
    pub fn function(&self, ctx: &Arc<CudaContext>, key: &KernelKey) -> Result<CudaFunction> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| TqError::Cuda("kernel registry: lock poisoned".into()))?;
        if let Some(f) = cache.get(key) {
            return Ok(f.clone());
        }
        let ptx = compile_ptx(key, &self.arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| driver_err(&format!("loading {key}"), e))?;
        let f = module
            .load_function(key.family.entry())
            .map_err(|e| driver_err(&format!("loading {key}"), e))?;
        cache.insert(key.clone(), f.clone());
        Ok(f)
    }
}
