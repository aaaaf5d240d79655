//! `Codec`: a validated layout with its rotation and codebooks, and the argument checks every
//! backend runs before it touches memory.

use crate::codebook::Codebook;
use crate::error::{invalid, Result};
use crate::layout::{CacheLayout, CacheMode, Side};
use crate::rotation::Rotation;

/// Norms at or below this leave the vector's indices at the codebook's zero crossing (u = 0).
pub const NORM_EPS: f32 = 1e-10;

/// Whether dequantized vectors stay in the rotated domain or are rotated back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// y = H D x, as stored (what attention consumes).
    Rotated,
    /// x = D H y, the caller's original coordinates.
    Original,
}

/// The rotation and codebooks of one cache layout, shared by all its operations.
#[derive(Debug, Clone)]
pub struct Codec {
    layout: CacheLayout,
    rotation: Rotation,
    k_codebook: Codebook,
    v_codebook: Codebook,
    sqrt_d: f32,
}

/// What a validated quantize call writes: source tokens `skip..n_tokens` go to logical
/// positions `first_pos..first_pos + (n_tokens - skip)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizePlan {
    pub skip: usize,
    pub first_pos: usize,
    pub n_write: usize,
}

impl Codec {
    /// Validates `layout` and builds its rotation and codebooks.
    pub fn new(layout: CacheLayout) -> Result<Self> {
        let layout = layout.validated()?;
        let d = layout.head_dim.max(1);
        Ok(Self {
            rotation: Rotation::new(d, layout.seed)?,
            k_codebook: Codebook::new(layout.k_bits)?,
            v_codebook: Codebook::new(layout.v_bits)?,
            sqrt_d: (d as f32).sqrt(),
            layout,
        })
    }

    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }

    /// The codebook of one side.
    pub fn codebook(&self, side: Side) -> &Codebook {
        match side {
            Side::Keys => &self.k_codebook,
            Side::Values => &self.v_codebook,
        }
    }

    /// `sqrt(head_dim) as f32` (correctly rounded).
    pub fn sqrt_d(&self) -> f32 {
        self.sqrt_d
    }

    fn is_empty(&self) -> bool {
        self.layout.num_kv_heads == 0 || self.layout.head_dim == 0
    }

    fn check_planes(&self, op: &str, side: Side, packed: usize, norms: usize) -> Result<()> {
        let (want_p, want_n) = (self.layout.packed_len(side), self.layout.norms_len());
        if packed != want_p {
            invalid!("{op}: packed buffer has {packed} bytes, the layout needs {want_p}");
        }
        if norms != want_n {
            invalid!("{op}: norms buffer has {norms} elements, the layout needs {want_n}");
        }
        Ok(())
    }

    /// Validates a quantize call; `None` means nothing to do (zero heads, head_dim or tokens).
    #[allow(clippy::too_many_arguments)]
    pub fn plan_quantize(
        &self,
        op: &str,
        side: Side,
        src_len: usize,
        n_tokens: usize,
        write_pos: usize,
        packed_len: usize,
        norms_len: usize,
    ) -> Result<Option<QuantizePlan>> {
        if self.is_empty() || n_tokens == 0 {
            return Ok(None);
        }
        let l = &self.layout;
        let Some(need) = n_tokens
            .checked_mul(l.num_kv_heads)
            .and_then(|x| x.checked_mul(l.head_dim))
        else {
            invalid!(
                "{op}: n_tokens ({n_tokens}) × num_kv_heads ({}) × head_dim ({}) overflows",
                l.num_kv_heads,
                l.head_dim
            );
        };
        if src_len != need {
            invalid!(
                "{op}: src has {src_len} elements, need {need} (n_tokens={n_tokens} × \
                 num_kv_heads={} × head_dim={})",
                l.num_kv_heads,
                l.head_dim
            );
        }
        self.check_planes(op, side, packed_len, norms_len)?;
        let Some(end) = write_pos.checked_add(n_tokens) else {
            invalid!("{op}: write_pos ({write_pos}) + n_tokens ({n_tokens}) overflows");
        };
        if l.capacity == 0 {
            invalid!("{op}: the cache has capacity 0");
        }
        match l.mode {
            CacheMode::Global if end > l.capacity => invalid!(
                "{op}: write_pos ({write_pos}) + n_tokens ({n_tokens}) > capacity ({}) of a \
                 global cache",
                l.capacity
            ),
            _ => {}
        }
        let skip = n_tokens.saturating_sub(l.capacity);
        Ok(Some(QuantizePlan {
            skip,
            first_pos: write_pos + skip,
            n_write: n_tokens - skip,
        }))
    }

    /// Validates a sequence dequantize of slots `start_pos..start_pos + n_tokens`; `false` means
    /// nothing to do.
    #[allow(clippy::too_many_arguments)]
    pub fn check_dequantize(
        &self,
        op: &str,
        side: Side,
        start_pos: usize,
        n_tokens: usize,
        packed_len: usize,
        norms_len: usize,
        dst_len: usize,
    ) -> Result<bool> {
        if self.is_empty() || n_tokens == 0 {
            return Ok(false);
        }
        let l = &self.layout;
        self.check_planes(op, side, packed_len, norms_len)?;
        if start_pos
            .checked_add(n_tokens)
            .is_none_or(|end| end > l.capacity)
        {
            invalid!(
                "{op}: start_pos ({start_pos}) + n_tokens ({n_tokens}) > capacity ({})",
                l.capacity
            );
        }
        let need = l.num_kv_heads * n_tokens * l.head_dim;
        if dst_len < need {
            invalid!(
                "{op}: dst has {dst_len} elements, need {need} (num_kv_heads={} × \
                 n_tokens={n_tokens} × head_dim={})",
                l.num_kv_heads,
                l.head_dim
            );
        }
        Ok(true)
    }
}
