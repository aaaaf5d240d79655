//! `KvCache`: the compressed K/V cache of one layer, the object inference engines hold.
//!
//! It owns the four planes of a [`CacheLayout`] (keys and values, each packed indices + norms,
//! see [`crate::layout`]) and the logical length. Tokens get consecutive logical positions
//! 0, 1, 2, ...; a global cache stores position p in slot p, a ring cache in slot
//! `p % capacity`. The retained positions are always the contiguous range
//! [`KvCache::first`]`..`[`KvCache::len`]: everything in a global cache, the last `capacity`
//! positions written in a ring (fewer after a [`KvCache::truncate`]).
//!
//! ```
//! use tqkv::cpu::{attention, AttentionConfig};
//! use tqkv::{CacheLayout, KvCache, Src};
//! // One layer: 2 kv heads, head_dim 64, room for 32 tokens, 8-bit keys, 4-bit values.
//! let mut cache = KvCache::new(CacheLayout::new(2, 64, 32, 8, 4)?)?;
//! let kv: Vec<f32> = (0..5 * 2 * 64).map(|i| (i as f32 * 0.1).sin()).collect();
//! cache.append(Src::F32(&kv), Src::F32(&kv))?; // prompt: 5 tokens, [5, 2, 64] each
//! let q: Vec<f32> = (0..6 * 64).map(|i| (i as f32 * 0.3).cos()).collect(); // [1, 6 heads, 64]
//! let mut out = vec![0f32; q.len()];
//! attention(&cache, Src::F32(&q), 6, &AttentionConfig::new(64), &mut out)?;
//! assert_eq!((cache.len(), cache.memory_bytes() > 0), (5, true));
//! # Ok::<(), tqkv::TqError>(())
//! ```

use crate::codec::{Codec, Domain};
use crate::cpu;
use crate::dtype::{Dst, Src};
use crate::error::{invalid, Result};
use crate::layout::{CacheLayout, CacheMode, Side};

/// The K/V cache of one layer, compressed with TurboQuant.
#[derive(Debug, Clone)]
pub struct KvCache {
    codec: Codec,
    /// `[num_kv_heads, capacity, row_bytes(k_bits)]` u8.
    k_packed: Vec<u8>,
    /// `[num_kv_heads, capacity, norms_per_pos]` f32.
    k_norms: Vec<f32>,
    /// `[num_kv_heads, capacity, row_bytes(v_bits)]` u8.
    v_packed: Vec<u8>,
    /// `[num_kv_heads, capacity, norms_per_pos]` f32.
    v_norms: Vec<f32>,
    /// Tokens appended so far (minus truncated ones): the next logical position.
    len: usize,
    /// Oldest retained logical position (0 in a global cache).
    first: usize,
}

impl KvCache {
    /// An empty cache with every plane allocated for `layout.capacity` tokens.
    /// `num_kv_heads`, `head_dim` and `capacity` must be > 0.
    pub fn new(layout: CacheLayout) -> Result<Self> {
        let codec = Codec::new(layout)?;
        let l = *codec.layout();
        if l.num_kv_heads == 0 || l.head_dim == 0 || l.capacity == 0 {
            invalid!(
                "kv cache: num_kv_heads ({}), head_dim ({}) and capacity ({}) must all be > 0",
                l.num_kv_heads,
                l.head_dim,
                l.capacity
            );
        }
        Ok(Self {
            k_packed: vec![0; l.packed_len(Side::Keys)],
            k_norms: vec![0.0; l.norms_len()],
            v_packed: vec![0; l.packed_len(Side::Values)],
            v_norms: vec![0.0; l.norms_len()],
            codec,
            len: 0,
            first: 0,
        })
    }

    pub fn layout(&self) -> &CacheLayout {
        self.codec.layout()
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Tokens appended so far (after truncation): the logical position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token is retained.
    pub fn is_empty(&self) -> bool {
        self.first == self.len
    }

    /// Slots per head: the most tokens the cache can retain.
    pub fn capacity(&self) -> usize {
        self.layout().capacity
    }

    /// Oldest retained logical position; positions `first()..len()` are retained.
    pub fn first(&self) -> usize {
        self.first
    }

    /// Exact heap bytes of every buffer the cache holds: the four planes plus the codec's
    /// rotation signs and codebooks.
    pub fn memory_bytes(&self) -> usize {
        let planes = self.k_packed.len()
            + self.v_packed.len()
            + 4 * (self.k_norms.len() + self.v_norms.len());
        let codec = &self.codec;
        let tables = [Side::Keys, Side::Values]
            .iter()
            .map(|&s| {
                let cb = codec.codebook(s);
                cb.centroids.len() + cb.boundaries.len()
            })
            .sum::<usize>()
            + codec.rotation().signs().len();
        planes + 4 * tables
    }

    /// The packed plane of one side, `[num_kv_heads, capacity, row_bytes]` u8.
    pub fn packed(&self, side: Side) -> &[u8] {
        match side {
            Side::Keys => &self.k_packed,
            Side::Values => &self.v_packed,
        }
    }

    /// The norms plane of one side, `[num_kv_heads, capacity, norms_per_pos]` f32.
    pub fn norms(&self, side: Side) -> &[f32] {
        match side {
            Side::Keys => &self.k_norms,
            Side::Values => &self.v_norms,
        }
    }

    /// Appends `n_new` tokens, `k` and `v` each `[n_new, num_kv_heads, head_dim]` (n_new is
    /// inferred from the length; 0 is a no-op). A global cache rejects tokens past `capacity`;
    /// a ring keeps the last `capacity`. On any error the cache is left as it was.
    pub fn append(&mut self, k: Src<'_>, v: Src<'_>) -> Result<()> {
        let l = *self.layout();
        let per_token = l.num_kv_heads * l.head_dim;
        if k.len() != v.len() {
            invalid!(
                "kv cache append: k has {} elements and v has {}; both must be \
                 [n_new, num_kv_heads={}, head_dim={}]",
                k.len(),
                v.len(),
                l.num_kv_heads,
                l.head_dim
            );
        }
        if !k.len().is_multiple_of(per_token) {
            invalid!(
                "kv cache append: k and v have {} elements, not a multiple of num_kv_heads ({}) \
                 × head_dim ({})",
                k.len(),
                l.num_kv_heads,
                l.head_dim
            );
        }
        let n_new = k.len() / per_token;
        if n_new == 0 {
            return Ok(());
        }
        let Some(end) = self.len.checked_add(n_new) else {
            invalid!(
                "kv cache append: len ({}) + n_new ({n_new}) overflows",
                self.len
            );
        };
        if l.mode == CacheMode::Global && end > l.capacity {
            invalid!(
                "kv cache append: len ({}) + n_new ({n_new}) > capacity ({}) of a global cache",
                self.len,
                l.capacity
            );
        }
        // A ring overwrites retained slots: keep them to restore on failure. In a global
        // cache (or an empty ring) the written slots hold nothing visible until the append
        // succeeds.
        let backup =
            (l.mode == CacheMode::Ring && !self.is_empty()).then(|| self.backup_slots(n_new));
        let written = self.quantize_both(k, v, n_new);
        if let Err(e) = written {
            if let Some(b) = backup {
                self.restore_slots(&b);
            }
            return Err(e);
        }
        self.len = end;
        self.first = self.first.max(end.saturating_sub(l.capacity));
        Ok(())
    }

    fn quantize_both(&mut self, k: Src<'_>, v: Src<'_>, n_new: usize) -> Result<()> {
        let codec = &self.codec;
        cpu::quantize(
            codec,
            Side::Keys,
            k,
            n_new,
            self.len,
            &mut self.k_packed,
            &mut self.k_norms,
        )?;
        cpu::quantize(
            codec,
            Side::Values,
            v,
            n_new,
            self.len,
            &mut self.v_packed,
            &mut self.v_norms,
        )
    }

    /// Copies of the slots an append of `n_new` tokens writes (all heads, both sides).
    fn backup_slots(&self, n_new: usize) -> SlotBackup {
        let l = self.layout();
        let n = n_new.min(l.capacity);
        let first_pos = self.len + n_new - n;
        let slots: Vec<usize> = (first_pos..first_pos + n).map(|p| l.slot(p)).collect();
        let mut b = SlotBackup {
            slots,
            ..SlotBackup::default()
        };
        let npp = l.norms_per_pos();
        for h in 0..l.num_kv_heads {
            for &s in &b.slots {
                let at = h * l.capacity + s;
                for (side, packed) in [
                    (Side::Keys, &mut b.k_packed),
                    (Side::Values, &mut b.v_packed),
                ] {
                    let rb = l.row_bytes(side);
                    packed.extend_from_slice(&self.packed(side)[at * rb..(at + 1) * rb]);
                }
                b.k_norms
                    .extend_from_slice(&self.k_norms[at * npp..(at + 1) * npp]);
                b.v_norms
                    .extend_from_slice(&self.v_norms[at * npp..(at + 1) * npp]);
            }
        }
        b
    }

    fn restore_slots(&mut self, b: &SlotBackup) {
        let l = *self.layout();
        let (npp, rk, rv) = (
            l.norms_per_pos(),
            l.row_bytes(Side::Keys),
            l.row_bytes(Side::Values),
        );
        let mut j = 0;
        for h in 0..l.num_kv_heads {
            for &s in &b.slots {
                let at = h * l.capacity + s;
                self.k_packed[at * rk..(at + 1) * rk]
                    .copy_from_slice(&b.k_packed[j * rk..(j + 1) * rk]);
                self.v_packed[at * rv..(at + 1) * rv]
                    .copy_from_slice(&b.v_packed[j * rv..(j + 1) * rv]);
                self.k_norms[at * npp..(at + 1) * npp]
                    .copy_from_slice(&b.k_norms[j * npp..(j + 1) * npp]);
                self.v_norms[at * npp..(at + 1) * npp]
                    .copy_from_slice(&b.v_norms[j * npp..(j + 1) * npp]);
                j += 1;
            }
        }
    }

    /// Checks that logical positions `start..start + n` are retained; `op` names the caller.
    pub(crate) fn check_retained(&self, op: &str, start: usize, n: usize) -> Result<()> {
        let Some(end) = start.checked_add(n) else {
            invalid!("{op}: start ({start}) + n ({n}) overflows");
        };
        if end > self.len {
            invalid!("{op}: positions {start}..{end} end past len ({})", self.len);
        }
        if start < self.first {
            invalid!(
                "{op}: position {start} is no longer retained; this ring cache holds positions \
                 {}..{}",
                self.first,
                self.len
            );
        }
        Ok(())
    }

    /// Dequantizes logical positions `start..start + n` of one side into
    /// `dst: [num_kv_heads, n, head_dim]`, in the rotated or the original domain. Every position
    /// must be retained (`first() ≤ start`, `start + n ≤ len()`). Values are bit-identical to
    /// [`cpu::dequantize_seq`] of the same slots.
    pub fn dequantize(
        &self,
        side: Side,
        start: usize,
        n: usize,
        domain: Domain,
        mut dst: Dst<'_>,
    ) -> Result<()> {
        let op = "kv cache dequantize";
        self.check_retained(op, start, n)?;
        let l = self.layout();
        let (d, cap) = (l.head_dim, l.capacity);
        let need = l.num_kv_heads * n * d;
        if dst.len() != need {
            invalid!(
                "{op}: dst has {} elements, need {need} (num_kv_heads={} × n={n} × head_dim={d})",
                dst.len(),
                l.num_kv_heads
            );
        }
        let (rb, npp) = (l.row_bytes(side), l.norms_per_pos());
        let (packed, norms) = (self.packed(side), self.norms(side));
        let mut out = [0f32; 1024];
        let mut idx = [0u8; 1024];
        for h in 0..l.num_kv_heads {
            for t in 0..n {
                let at = h * cap + l.slot(start + t);
                cpu::dequantize_vector(
                    &self.codec,
                    side,
                    &packed[at * rb..(at + 1) * rb],
                    &norms[at * npp..(at + 1) * npp],
                    domain,
                    &mut idx[..d],
                    &mut out[..d],
                );
                dst.write_f32((h * n + t) * d, &out[..d]);
            }
        }
        Ok(())
    }

    /// Forgets every token: `len() = 0`. Buffers keep their size and contents.
    pub fn reset(&mut self) {
        self.len = 0;
        self.first = 0;
    }

    /// Drops the tokens at positions `new_len..len()` (rejected speculative tokens, prompt
    /// reuse); the next append writes at `new_len`. `new_len` must be ≤ `len()` and, in a ring,
    /// ≥ `first()`: older positions were overwritten and cannot come back.
    pub fn truncate(&mut self, new_len: usize) -> Result<()> {
        if new_len > self.len {
            invalid!(
                "kv cache truncate: new_len ({new_len}) > len ({})",
                self.len
            );
        }
        if new_len < self.first {
            invalid!(
                "kv cache truncate: new_len ({new_len}) is below the oldest retained position \
                 ({}) of this ring cache; positions before it were overwritten (reset instead)",
                self.first
            );
        }
        self.len = new_len;
        Ok(())
    }
}

/// Saved slot contents, `[num_kv_heads, slots.len(), ...]` per buffer.
#[derive(Default)]
struct SlotBackup {
    slots: Vec<usize>,
    k_packed: Vec<u8>,
    v_packed: Vec<u8>,
    k_norms: Vec<f32>,
    v_norms: Vec<f32>,
}
