//! NVRTC compilation of the kernel sources under `kernels/`, once per (kernel, compile-time
//! constants), cached per device.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::driver_err;
use crate::error::{Result, TqError};

const COMMON_SRC: &str = include_str!("../../kernels/common.cu");
const QUANTIZE_SRC: &str = include_str!("../../kernels/quantize.cu");
const QUANTIZE_MIXED_SRC: &str = include_str!("../../kernels/quantize_mixed.cu");
const DEQUANTIZE_SRC: &str = include_str!("../../kernels/dequantize.cu");
const DECODE_SRC: &str = include_str!("../../kernels/decode_attention.cu");

/// One kernel source (op family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Quantize,
    /// One token per sequence into batch planes (`tq_quantize_batch` in kernels/quantize.cu).
    QuantizeBatch,
    /// Keys and values of different bit widths (`K_BITS`, `V_BITS`) in one batch append
    /// (`tq_quantize_batch_kv_mixed` in kernels/quantize_mixed.cu).
    QuantizeBatchMixed,
    Dequantize,
    /// Fused decode attention (kernels/decode_attention.cu): `tq_decode_split`, then
    /// `tq_decode_merge` of the same module.
    Decode,
}

impl Family {
    /// The kernel source: kernels/common.cu, then the family's file (decode_attention.cu is
    /// self-contained). The mixed batch append compiles common.cu + quantize.cu once per side, in
    /// namespaces `tq_k` (`BITS` = `K_BITS`) and `tq_v` (`BITS` = `V_BITS`), without their entry
    /// points, then its own kernel.
    fn source(self) -> String {
        match self {
            Family::Quantize | Family::QuantizeBatch => format!("{COMMON_SRC}{QUANTIZE_SRC}"),
            Family::QuantizeBatchMixed => format!(
                "#define TQ_SIDE_ONLY 1\n#define BITS K_BITS\nnamespace tq_k {{\n{COMMON_SRC}{QUANTIZE_SRC}}}\n\
                 #undef BITS\n#define BITS V_BITS\nnamespace tq_v {{\n{COMMON_SRC}{QUANTIZE_SRC}}}\n\
                 #undef BITS\n{QUANTIZE_MIXED_SRC}"
            ),
            Family::Dequantize => format!("{COMMON_SRC}{DEQUANTIZE_SRC}"),
            Family::Decode => DECODE_SRC.to_string(),
        }
    }

    /// The `extern "C"` entry point.
    pub fn entry(self) -> &'static str {
        match self {
            Family::Quantize => "tq_quantize",
            Family::QuantizeBatch => "tq_quantize_batch",
            Family::QuantizeBatchMixed => "tq_quantize_batch_kv_mixed",
            Family::Dequantize => "tq_dequantize",
            Family::Decode => "tq_decode_split",
        }
    }

    /// Whether the compiler may fuse multiply-adds. The codec kernels reproduce the CPU's bytes,
    /// so they may not; decode attention has a tolerance (f16 tensor-core operands) and may.
    fn fmad(self) -> bool {
        self == Family::Decode
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
/// root, no flush-to-zero, and for the codec no fused multiply-add: the CPU's operation order
/// survives compilation.
pub fn compile_ptx(key: &KernelKey, arch: &str) -> Result<Ptx> {
    let mut src = String::new();
    for (name, value) in &key.defines {
        src.push_str(&format!("#define {name} {value}\n"));
    }
    src.push_str(&key.family.source());
    let opts = CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(key.family.fmad()),
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

/// Compiled kernels of one device, by instance: the loaded module and its entry function.
#[derive(Debug)]
pub struct Registry {
    arch: String,
    cache: Mutex<HashMap<KernelKey, (Arc<CudaModule>, CudaFunction)>>,
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
        Ok(self.load(ctx, key)?.1)
    }

    /// The module of `key` (for its other functions and globals), compiled and loaded on first
    /// use.
    pub fn module(&self, ctx: &Arc<CudaContext>, key: &KernelKey) -> Result<Arc<CudaModule>> {
        Ok(self.load(ctx, key)?.0)
    }

    fn load(
        &self,
        ctx: &Arc<CudaContext>,
        key: &KernelKey,
    ) -> Result<(Arc<CudaModule>, CudaFunction)> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| TqError::Cuda("kernel registry: lock poisoned".into()))?;
        if let Some(entry) = cache.get(key) {
            return Ok(entry.clone());
        }
        let ptx = compile_ptx(key, &self.arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| driver_err(&format!("loading {key}"), e))?;
        let f = module
            .load_function(key.family.entry())
            .map_err(|e| driver_err(&format!("loading {key}"), e))?;
        cache.insert(key.clone(), (module.clone(), f.clone()));
        Ok((module, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(line number, extern "C" line)` of every entry point of `src` outside an
    /// `#ifndef TQ_SIDE_ONLY` (or `#if !defined(TQ_SIDE_ONLY) ...`) region.
    fn unguarded_entries(src: &str) -> Vec<(usize, String)> {
        let mut stack: Vec<bool> = Vec::new(); // per open #if: whether it excludes TQ_SIDE_ONLY
        let mut out = Vec::new();
        for (i, line) in src.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("#if") {
                let guard = t.starts_with("#ifndef TQ_SIDE_ONLY")
                    || t.starts_with("#if !defined(TQ_SIDE_ONLY)");
                stack.push(guard);
            } else if t.starts_with("#endif") {
                stack.pop();
            } else if t.starts_with("extern \"C\"") && !stack.iter().any(|&g| g) {
                out.push((i + 1, line.to_string()));
            }
        }
        out
    }

    #[test]
    fn quantize_entry_points_are_left_out_of_the_mixed_sides() {
        // The mixed module compiles quantize.cu twice: an unguarded entry point would be defined
        // twice (the module fails to compile on the device only).
        assert_eq!(unguarded_entries(QUANTIZE_SRC), Vec::new());
        assert!(
            QUANTIZE_SRC.contains("extern \"C\""),
            "quantize.cu has entry points"
        );
        assert_eq!(
            unguarded_entries("#ifdef X\nextern \"C\" void f();\n#endif\n"),
            vec![(2, "extern \"C\" void f();".to_string())],
            "the scan sees an entry point outside the guard"
        );
    }

    #[test]
    fn mixed_source_compiles_each_side_in_its_namespace() {
        let src = Family::QuantizeBatchMixed.source();
        let at = |pat: &str| {
            src.find(pat)
                .unwrap_or_else(|| panic!("mixed source lacks {pat:?}"))
        };
        assert!(at("#define TQ_SIDE_ONLY 1") < at("#define BITS K_BITS"));
        assert!(at("#define BITS K_BITS") < at("namespace tq_k {"));
        assert!(at("namespace tq_k {") < at("#define BITS V_BITS"));
        assert!(at("#define BITS V_BITS") < at("namespace tq_v {"));
        assert!(at("namespace tq_v {") < at("tq_quantize_batch_kv_mixed("));
        assert_eq!(src.matches(QUANTIZE_SRC).count(), 2);
        assert_eq!(src.matches(COMMON_SRC).count(), 2);
        assert!(src.contains("tq_append_kv_mixed("));
        assert_eq!(
            Family::QuantizeBatchMixed.entry(),
            "tq_quantize_batch_kv_mixed"
        );
    }
}
