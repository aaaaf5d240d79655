//! Typed views of caller memory: inputs (`Src`) and outputs (`Dst`) in f32, f16 or bf16.

use half::{bf16, f16};

/// Element type of a tensor the caller passes or receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// A read-only tensor in one of the supported element types.
#[derive(Debug, Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl Src<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Src::F32(s) => s.len(),
            Src::F16(s) => s.len(),
            Src::Bf16(s) => s.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            Src::F32(_) => DType::F32,
            Src::F16(_) => DType::F16,
            Src::Bf16(_) => DType::Bf16,
        }
    }

    /// Converts `out.len()` elements starting at `offset` to f32 (exact for every type).
    #[inline]
    pub fn read_f32(&self, offset: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Src::F32(s) => out.copy_from_slice(&s[offset..offset + n]),
            Src::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[offset..offset + n]) {
                    *o = v.to_f32();
                }
            }
            Src::Bf16(s) => {
                for (o, v) in out.iter_mut().zip(&s[offset..offset + n]) {
                    *o = v.to_f32();
                }
            }
        }
    }
}

/// A writable tensor in one of the supported element types.
#[derive(Debug)]
pub enum Dst<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [bf16]),
}

impl Dst<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Dst::F32(s) => s.len(),
            Dst::F16(s) => s.len(),
            Dst::Bf16(s) => s.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            Dst::F32(_) => DType::F32,
            Dst::F16(_) => DType::F16,
            Dst::Bf16(_) => DType::Bf16,
        }
    }

    /// Writes `vals` at `offset`, rounding to nearest-even for f16 and bf16.
    #[inline]
    pub fn write_f32(&mut self, offset: usize, vals: &[f32]) {
        let n = vals.len();
        match self {
            Dst::F32(d) => d[offset..offset + n].copy_from_slice(vals),
            Dst::F16(d) => {
                for (o, v) in d[offset..offset + n].iter_mut().zip(vals) {
                    *o = f16::from_f32(*v);
                }
            }
            Dst::Bf16(d) => {
                for (o, v) in d[offset..offset + n].iter_mut().zip(vals) {
                    *o = bf16::from_f32(*v);
                }
            }
        }
    }
}
