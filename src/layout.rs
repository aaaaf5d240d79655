//! The cache layout: shapes, strides and sizes of the packed planes. Pure, no I/O.
//!
//! One plane per side (keys, values), each two buffers:
//! - packed: `[num_kv_heads, capacity, row_bytes]` u8 (see [`crate::pack`] for a row);
//! - norms: `[num_kv_heads, capacity, norms_per_pos]` f32, `norms_per_pos = max(1, head_dim/256)`.
//!   For head_dim ≤ 256 the norm is ‖y‖₂ of the rotated vector; above, one RMS per 256-block.
//!
//! Positions: a global cache stores logical position p in slot p (p < capacity); a ring cache
//! (sliding window) stores it in slot `p % capacity`.

use crate::codebook::check_bits;
use crate::error::{invalid, Result};
use crate::pack;

/// Default rotation seed.
pub const DEFAULT_SEED: u64 = 0x7451_4B56_5345_4544; // "tqKVSEED"

/// Smallest and largest supported head dimension (powers of two in between).
pub const HEAD_DIM_RANGE: (usize, usize) = (32, 1024);

/// How logical positions map to slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Position p in slot p; writing at or past `capacity` is an error.
    Global,
    /// Position p in slot `p % capacity`: a sliding window of the last `capacity` tokens.
    Ring,
}

/// Which tensor a plane holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Keys,
    Values,
}

/// The geometry of a TurboQuant KV cache of one layer. Build with [`CacheLayout::new`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheLayout {
    pub num_kv_heads: usize,
    /// A power of two in 32..=1024 (0 allowed: every operation is then a no-op).
    pub head_dim: usize,
    /// Slots per head.
    pub capacity: usize,
    pub k_bits: u32,
    pub v_bits: u32,
    /// Codebook-input scale for head_dim > 256 (u = y · sf / rms); default 1.0.
    pub scale_factor_d512: f32,
    /// Seed of the rotation's random signs.
    pub seed: u64,
    pub mode: CacheMode,
}

impl CacheLayout {
    /// A validated global layout with the default seed and `scale_factor_d512 = 1.0`.
    pub fn new(
        num_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        k_bits: u32,
        v_bits: u32,
    ) -> Result<Self> {
        Self {
            num_kv_heads,
            head_dim,
            capacity,
            k_bits,
            v_bits,
            scale_factor_d512: 1.0,
            seed: DEFAULT_SEED,
            mode: CacheMode::Global,
        }
        .validated()
    }

    /// The same layout with another rotation seed.
    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    /// The same layout in another mode.
    pub fn with_mode(self, mode: CacheMode) -> Self {
        Self { mode, ..self }
    }

    /// The same layout with another `scale_factor_d512`, validated.
    pub fn with_scale_factor_d512(self, scale_factor_d512: f32) -> Result<Self> {
        Self {
            scale_factor_d512,
            ..self
        }
        .validated()
    }

    /// Checks every field; returns the layout unchanged when valid.
    pub fn validated(self) -> Result<Self> {
        let (lo, hi) = HEAD_DIM_RANGE;
        let d = self.head_dim;
        if d != 0 && (!d.is_power_of_two() || d < lo || d > hi) {
            invalid!("cache layout: head_dim must be a power of two in {lo}..={hi}, got {d}");
        }
        check_bits("cache layout: k_bits", self.k_bits)?;
        check_bits("cache layout: v_bits", self.v_bits)?;
        let sf = self.scale_factor_d512;
        if !(sf.is_finite() && sf > 0.0) {
            invalid!("cache layout: scale_factor_d512 must be finite and > 0, got {sf}");
        }
        if self.capacity > u32::MAX as usize || self.num_kv_heads > u32::MAX as usize {
            invalid!(
                "cache layout: num_kv_heads ({}) and capacity ({}) must fit in u32",
                self.num_kv_heads,
                self.capacity
            );
        }
        // Bounds every size derived from the layout (planes, exact copies of up to 2·capacity
        // tokens, f32 scratch) with room to spare: 16 · heads · capacity · (head_dim + 8) bytes.
        let total = 16 * (self.num_kv_heads as u128) * (self.capacity as u128) * (d as u128 + 8);
        if total > isize::MAX as u128 {
            invalid!(
                "cache layout: num_kv_heads ({}) × capacity ({}) × head_dim ({d}) is too large \
                 to address",
                self.num_kv_heads,
                self.capacity
            );
        }
        Ok(self)
    }

    /// Bits per index of one side.
    pub fn bits(&self, side: Side) -> u32 {
        match side {
            Side::Keys => self.k_bits,
            Side::Values => self.v_bits,
        }
    }

    /// f32 norms stored per (head, slot): `max(1, head_dim / 256)`.
    pub fn norms_per_pos(&self) -> usize {
        (self.head_dim / 256).max(1)
    }

    /// Bytes of one packed row of one side.
    pub fn row_bytes(&self, side: Side) -> usize {
        pack::row_bytes(self.bits(side), self.head_dim)
    }

    /// Length in bytes of a side's packed buffer: `num_kv_heads * capacity * row_bytes`.
    pub fn packed_len(&self, side: Side) -> usize {
        self.num_kv_heads * self.capacity * self.row_bytes(side)
    }

    /// Length in f32 elements of a side's norms buffer: `num_kv_heads * capacity * norms_per_pos`.
    pub fn norms_len(&self) -> usize {
        self.num_kv_heads * self.capacity * self.norms_per_pos()
    }

    /// Bytes one token occupies in both planes (K and V, indices and norms, all heads).
    pub fn bytes_per_token(&self) -> usize {
        self.num_kv_heads
            * (self.row_bytes(Side::Keys)
                + self.row_bytes(Side::Values)
                + 2 * 4 * self.norms_per_pos())
    }

    /// Bytes of the whole cache (both planes, all slots).
    pub fn total_bytes(&self) -> usize {
        self.capacity * self.bytes_per_token()
    }

    /// Slot of logical position `pos` (caller has checked `capacity > 0`).
    pub fn slot(&self, pos: usize) -> usize {
        match self.mode {
            CacheMode::Global => pos,
            CacheMode::Ring => pos % self.capacity,
        }
    }
}
