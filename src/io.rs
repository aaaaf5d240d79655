//! Reading KV activations from safetensors files.
//!
//! A KV tensor is `[tokens, heads, head_dim]` in f32, f16 or bf16 (little-endian), widened
//! exactly to f32 on reading. Tensors named `PREFIX.q`, `PREFIX.k`, `PREFIX.v` (or plain `q`,
//! `k`, `v`) form one layer named `PREFIX`; K and V are required, Q is optional.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::dtype::DType;
use crate::error::{invalid, Result, TqError};

/// One `[tokens, heads, head_dim]` tensor, row-major, widened to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct KvTensor {
    /// The tensor's name in the file.
    pub name: String,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Element type in the file.
    pub dtype: DType,
    /// `tokens * heads * head_dim` values.
    pub data: Vec<f32>,
}

impl KvTensor {
    /// Reads a rank-3 f32/f16/bf16 tensor view.
    pub fn from_view(name: &str, view: &TensorView<'_>) -> Result<Self> {
        let &[tokens, heads, head_dim] = view.shape() else {
            invalid!(
                "{name}: expected rank 3 [tokens, heads, head_dim], got shape {:?}",
                view.shape()
            );
        };
        let bytes = view.data();
        let (dtype, data) = match view.dtype() {
            Dtype::F32 => (
                DType::F32,
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::F16 => (
                DType::F16,
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            Dtype::BF16 => (
                DType::Bf16,
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            other => invalid!("{name}: dtype {other:?} is not supported (f32, f16 or bf16)"),
        };
        Ok(Self {
            name: name.to_string(),
            tokens,
            heads,
            head_dim,
            dtype,
            data,
        })
    }

    /// Fails on the first NaN or infinite value, naming its token, head and coordinate.
    pub fn check_finite(&self) -> Result<()> {
        if let Some(i) = self.data.iter().position(|x| !x.is_finite()) {
            let d = self.head_dim.max(1);
            let (t, h, j) = (i / (self.heads * d), (i / d) % self.heads.max(1), i % d);
            invalid!(
                "{}: token {t}, head {h}, coordinate {j} is {} (only finite values can be quantized)",
                self.name,
                self.data[i]
            );
        }
        Ok(())
    }
}

/// The K, V and optional Q tensors of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayer {
    /// The common prefix of the tensor names (`layer.3` for `layer.3.k`; empty for `k`).
    pub name: String,
    pub q: Option<KvTensor>,
    pub k: KvTensor,
    pub v: KvTensor,
}

impl KvLayer {
    /// Checks that K and V have one shape, and that Q (if any) has their tokens and head_dim
    /// and a multiple of their heads (grouped-query attention).
    pub fn validated(self) -> Result<Self> {
        let (k, v) = (&self.k, &self.v);
        if (k.tokens, k.heads, k.head_dim) != (v.tokens, v.heads, v.head_dim) {
            invalid!(
                "{}: shape [{}, {}, {}] differs from {} [{}, {}, {}]",
                v.name,
                v.tokens,
                v.heads,
                v.head_dim,
                k.name,
                k.tokens,
                k.heads,
                k.head_dim
            );
        }
        if let Some(q) = &self.q {
            if q.tokens != k.tokens || q.head_dim != k.head_dim {
                invalid!(
                    "{}: tokens ({}) and head_dim ({}) must match {} ({}, {})",
                    q.name,
                    q.tokens,
                    q.head_dim,
                    k.name,
                    k.tokens,
                    k.head_dim
                );
            }
            if k.heads == 0 || q.heads % k.heads != 0 {
                invalid!(
                    "{}: heads ({}) is not a multiple of the kv heads ({}) of {}",
                    q.name,
                    q.heads,
                    k.heads,
                    k.name
                );
            }
        }
        Ok(self)
    }
}

/// Splits a K/V/Q tensor name into (layer prefix, role): `layer.3.k` → (`layer.3`, 'k'),
/// `v` → (``, 'v'). Other names give `None`.
pub fn kv_role(name: &str) -> Option<(&str, char)> {
    let (prefix, last) = match name.rsplit_once('.') {
        Some((p, l)) if !p.is_empty() => (p, l),
        Some(_) => return None,
        None => ("", name),
    };
    match last {
        "q" => Some((prefix, 'q')),
        "k" => Some((prefix, 'k')),
        "v" => Some((prefix, 'v')),
        _ => None,
    }
}

/// Parses a safetensors buffer; the error names `source` (a path, for messages).
pub fn parse<'a>(bytes: &'a [u8], source: &str) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| TqError::Format(format!("{source}: not a valid safetensors file ({e})")))
}

/// The tensors of a file in natural name order (`layer.2.k` before `layer.10.k`), so that
/// whatever reports on them does so in a stable order.
pub fn tensors_in_order<'a>(st: &SafeTensors<'a>) -> Vec<(String, TensorView<'a>)> {
    let mut tensors = st.tensors();
    tensors.sort_by_cached_key(|(name, _)| natural_key(name));
    tensors
}

/// Every layer of a safetensors buffer, in natural name order (`layer.2` before `layer.10`).
/// Tensors with other names are ignored; a layer with Q but not both K and V is an error, and so
/// is a buffer without any K/V pair.
pub fn read_kv_layers(bytes: &[u8], source: &str) -> Result<Vec<KvLayer>> {
    let st = parse(bytes, source)?;
    type Parts = (Option<KvTensor>, Option<KvTensor>, Option<KvTensor>);
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (name, view) in tensors_in_order(&st) {
        let Some((prefix, role)) = kv_role(&name) else {
            continue;
        };
        let t = KvTensor::from_view(&name, &view)?;
        let entry = parts.entry(prefix.to_string()).or_default();
        match role {
            'q' => entry.0 = Some(t),
            'k' => entry.1 = Some(t),
            _ => entry.2 = Some(t),
        }
    }
    let mut layers = Vec::with_capacity(parts.len());
    for (name, (q, k, v)) in parts {
        let (Some(k), Some(v)) = (k, v) else {
            let shown = if name.is_empty() { "k/v" } else { &name };
            invalid!("{source}: layer `{shown}` needs both a `.k` and a `.v` tensor");
        };
        layers.push(KvLayer { name, q, k, v }.validated()?);
    }
    if layers.is_empty() {
        invalid!("{source}: no K/V tensors (names `k`, `v` or `PREFIX.k`, `PREFIX.v`)");
    }
    layers.sort_by_key(|l| natural_key(&l.name));
    Ok(layers)
}

/// Reads a file and returns [`read_kv_layers`] of its contents.
pub fn load_kv_layers(path: &Path) -> Result<Vec<KvLayer>> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TqError::Io {
        context: format!("cannot read {shown}"),
        source,
    })?;
    read_kv_layers(&bytes, &shown)
}

/// Sort key that orders digit runs by value: `layer.2` < `layer.10`.
fn natural_key(s: &str) -> Vec<(u8, u128, String)> {
    let mut key = Vec::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let digits = c.is_ascii_digit();
        let end = rest
            .find(|ch: char| ch.is_ascii_digit() != digits)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        match run.parse::<u128>() {
            Ok(n) if digits => key.push((0, n, String::new())),
            _ => key.push((1, 0, run.to_string())),
        }
        rest = tail;
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_role_splits_prefix_and_role() {
        assert_eq!(kv_role("layer.3.k"), Some(("layer.3", 'k')));
        assert_eq!(kv_role("v"), Some(("", 'v')));
        assert_eq!(kv_role("model.q"), Some(("model", 'q')));
        assert_eq!(kv_role("layer.3.kv"), None);
        assert_eq!(kv_role(".k"), None);
    }

    fn view_of<'a>(dtype: Dtype, shape: &[usize], bytes: &'a [u8]) -> TensorView<'a> {
        TensorView::new(dtype, shape.to_vec(), bytes).unwrap()
    }

    #[test]
    fn from_view_widens_f16_and_bf16_exactly() {
        let vals = [1.5f32, -0.333_251_95, 65504.0, 0.0];
        let h: Vec<u8> = vals
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        let b: Vec<u8> = vals
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let th = KvTensor::from_view("k", &view_of(Dtype::F16, &[1, 2, 2], &h)).unwrap();
        let tb = KvTensor::from_view("k", &view_of(Dtype::BF16, &[2, 1, 2], &b)).unwrap();
        let want_h: Vec<f32> = vals.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let want_b: Vec<f32> = vals.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(
            (th.tokens, th.heads, th.head_dim, th.data),
            (1, 2, 2, want_h)
        );
        assert_eq!(
            (tb.tokens, tb.heads, tb.head_dim, tb.data),
            (2, 1, 2, want_b)
        );
    }

    #[test]
    fn from_view_rejects_other_ranks_and_dtypes() {
        let bytes = [0u8; 16];
        assert!(KvTensor::from_view("k", &view_of(Dtype::F32, &[2, 2], &bytes)).is_err());
        assert!(KvTensor::from_view("k", &view_of(Dtype::I32, &[1, 2, 2], &bytes)).is_err());
    }

    #[test]
    fn natural_key_orders_numbers_by_value() {
        let mut names = vec!["layer.10", "layer.2", "layer.1", "a"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, vec!["a", "layer.1", "layer.2", "layer.10"]);
    }
}
