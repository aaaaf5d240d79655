//! `KvCache`: the compressed K/V cache of one layer, the object inference engines hold.
//!
//! It owns the four planes of a [`CacheLayout`] (keys and values, each packed indices + norms,
//! see [`crate::layout`]) and the logical length. Tokens get consecutive logical positions
//! 0, 1, 2, ...; a global cache stores position p in slot p, a ring cache in slot
//! `p % capacity`. The retained positions are always the contiguous range
//! [`KvCache::first`]`..`[`KvCache::len`]: everything in a global cache, the last `capacity`
//! positions written in a ring (fewer after a [`KvCache::truncate`]).
//!
//! Beyond plain TurboQuant ([`KvCache::new`]), [`KvCache::with_options`] adds key centering and
//! exact sinks and recent window ([`CacheOptions`]); the defaults and the [`crate::Preset`]s are
//! the recommended way. Exact positions `[max(frontier, sinks), len)` and `[0, sinks)` live
//! beside the packed planes (see [`Segment`] and `docs/FORMAT.md`).
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
//! // The recommended configuration: a preset (4/4 bits, centered keys, exact window and sink).
//! let p = tqkv::Preset::Tq4;
//! let mut tq4 = KvCache::with_options(p.layout(2, 64, 32)?, p.options())?;
//! tq4.append(Src::F32(&kv), Src::F32(&kv))?;
//! attention(&tq4, Src::F32(&q), 6, &AttentionConfig::new(64), &mut out)?;
//! # Ok::<(), tqkv::TqError>(())
//! ```

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::codec::{Codec, Domain};
use crate::cpu;
use crate::dtype::{DType, Dst, Src};
use crate::error::{invalid, try_alloc, Result};
use crate::layout::{CacheLayout, CacheMode, Side};
use crate::options::CacheOptions;

/// The K/V cache of one layer, compressed with TurboQuant.
///
/// Segments (see [`CacheOptions`]): positions `p < sinks` are exact sinks; positions in
/// `[max(frontier, sinks), len)` are exact in the recent window; the rest of the retained
/// positions, `[max(first, sinks), frontier)`, are packed. `len - frontier ≤ window`.
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
    options: CacheOptions,
    /// Effective sinks and window: the options' values, at most `capacity`.
    sinks: usize,
    window: usize,
    /// Positions in `[sinks, frontier)` have been quantized into the packed planes.
    frontier: usize,
    /// Whether `key_mean` holds μ (given, or estimated from the first append).
    mean_set: bool,
    /// `[num_kv_heads, head_dim]` f32: μ in the original domain (empty without centering).
    key_mean: Vec<f32>,
    /// `[num_kv_heads, head_dim]` f32: R μ, μ in the rotated domain.
    key_mean_rot: Vec<f32>,
    /// `[num_kv_heads, sinks, head_dim]` f16/bf16 bits: position p < sinks at index p.
    k_sinks: Vec<u16>,
    v_sinks: Vec<u16>,
    /// `[num_kv_heads, window, head_dim]` f16/bf16 bits: position p at slot `p % window`.
    k_window: Vec<u16>,
    v_window: Vec<u16>,
}

impl KvCache {
    /// An empty plain TurboQuant cache (no centering, no exact tokens) with every plane
    /// allocated for `layout.capacity` tokens. `num_kv_heads`, `head_dim` and `capacity` must
    /// be > 0. Prefer [`KvCache::with_options`] with [`CacheOptions::default`] or a
    /// [`crate::Preset`]: better quality at nearly the same memory.
    pub fn new(layout: CacheLayout) -> Result<Self> {
        Self::with_options(layout, CacheOptions::plain())
    }

    /// An empty cache with `options` (centering, exact sinks and window).
    pub fn with_options(layout: CacheLayout, options: CacheOptions) -> Result<Self> {
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
        options.check(&l)?;
        let (h, d) = (l.num_kv_heads, l.head_dim);
        let sinks = options.sinks.min(l.capacity);
        let window = options.window.min(l.capacity);
        let mean_len = if options.center_keys { h * d } else { 0 };
        let what = "kv cache";
        let mut cache = Self {
            k_packed: try_alloc(l.packed_len(Side::Keys), 0, what)?,
            k_norms: try_alloc(l.norms_len(), 0.0, what)?,
            v_packed: try_alloc(l.packed_len(Side::Values), 0, what)?,
            v_norms: try_alloc(l.norms_len(), 0.0, what)?,
            codec,
            len: 0,
            first: 0,
            sinks,
            window,
            frontier: 0,
            mean_set: false,
            key_mean: vec![0.0; mean_len],
            key_mean_rot: vec![0.0; mean_len],
            k_sinks: try_alloc(h * sinks * d, 0, what)?,
            v_sinks: try_alloc(h * sinks * d, 0, what)?,
            k_window: try_alloc(h * window * d, 0, what)?,
            v_window: try_alloc(h * window * d, 0, what)?,
            options,
        };
        if let Some(mu) = cache.options.key_mean.clone() {
            cache.set_mean(&mu);
        }
        Ok(cache)
    }

    pub fn layout(&self) -> &CacheLayout {
        self.codec.layout()
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The options the cache was built with.
    pub fn options(&self) -> &CacheOptions {
        &self.options
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

    /// Exact sink positions: `0..sinks()` (at most `capacity`).
    pub fn sinks(&self) -> usize {
        self.sinks
    }

    /// Exact recent-window length in tokens (at most `capacity`).
    pub fn window(&self) -> usize {
        self.window
    }

    /// The quantized frontier: retained positions in `[max(first, sinks), frontier)` are
    /// packed, those in `[max(frontier, sinks), len)` exact in the window.
    pub fn frontier(&self) -> usize {
        self.frontier
    }

    /// The segment that holds retained position `pos`.
    pub fn segment(&self, pos: usize) -> Segment {
        if pos < self.sinks {
            Segment::Sink
        } else if pos < self.frontier {
            Segment::Packed
        } else {
            Segment::Window
        }
    }

    /// μ, `[num_kv_heads, head_dim]` f32 in the original domain, once given or estimated;
    /// `None` without centering or before the first append.
    pub fn key_mean(&self) -> Option<&[f32]> {
        self.mean_set.then_some(self.key_mean.as_slice())
    }

    /// R μ (μ in the rotated domain, what a kernel dots with the rotated query), as
    /// [`KvCache::key_mean`].
    pub fn key_mean_rotated(&self) -> Option<&[f32]> {
        self.mean_set.then_some(self.key_mean_rot.as_slice())
    }

    /// The exact sinks of one side, `[num_kv_heads, sinks, head_dim]` f16/bf16 bits
    /// ([`CacheOptions::exact_dtype`]).
    pub fn exact_sinks(&self, side: Side) -> &[u16] {
        match side {
            Side::Keys => &self.k_sinks,
            Side::Values => &self.v_sinks,
        }
    }

    /// The exact recent window of one side, `[num_kv_heads, window, head_dim]` f16/bf16 bits,
    /// position p at slot `p % window`.
    pub fn exact_window(&self, side: Side) -> &[u16] {
        match side {
            Side::Keys => &self.k_window,
            Side::Values => &self.v_window,
        }
    }

    /// Exact heap bytes of every buffer the cache holds: the four planes, the codec's rotation
    /// signs and codebooks, the exact sinks and window, μ and R μ
    /// ([`CacheOptions::memory_bytes`]).
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
        let exact =
            self.k_sinks.len() + self.v_sinks.len() + self.k_window.len() + self.v_window.len();
        let mean = self.key_mean.len() + self.key_mean_rot.len();
        planes + 4 * tables + 2 * exact + 4 * mean
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

    fn set_mean(&mut self, mu: &[f32]) {
        let d = self.layout().head_dim;
        self.key_mean.copy_from_slice(mu);
        self.key_mean_rot.copy_from_slice(mu);
        for row in self.key_mean_rot.chunks_exact_mut(d) {
            self.codec.rotation().forward(row);
        }
        self.mean_set = true;
    }

    /// Appends `n_new` tokens, `k` and `v` each `[n_new, num_kv_heads, head_dim]` (n_new is
    /// inferred from the length; 0 is a no-op). A global cache rejects tokens past `capacity`;
    /// a ring keeps the last `capacity`. Sinks and window tokens are stored in the exact dtype;
    /// tokens leaving the window are quantized (keys minus μ). The first append to an empty
    /// centering cache without a given μ sets μ to the mean of its keys. On any error the
    /// cache is left as it was.
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
        let plain = self.sinks == 0 && self.window == 0 && !self.options.center_keys;
        // New tokens as the exact segments store them (empty when nothing is kept exact).
        let (k_exact, v_exact) = if self.sinks + self.window > 0 {
            (self.to_exact("k", k)?, self.to_exact("v", v)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let mean = if self.options.center_keys && !self.mean_set {
            Some(mean_of(k, n_new, per_token)?)
        } else {
            None
        };
        // Positions leaving the window (or never entering it): `a..b`.
        let a = self.frontier.max(self.sinks);
        let b = a.max(end.saturating_sub(self.window));
        let n_leave = b - a;
        // A ring overwrites retained slots: keep them to restore on failure. Elsewhere the
        // written slots hold nothing visible until the append succeeds.
        let n_written = n_leave.min(l.capacity);
        let backup = (n_leave > 0 && l.mode == CacheMode::Ring && !self.is_empty())
            .then(|| self.backup_slots(b - n_written, n_written));
        let written = if n_leave == 0 {
            Ok(())
        } else if plain {
            self.quantize_both(k, v, n_new, self.len)
        } else {
            let mu = mean.as_deref();
            let kq = self.leaving(Side::Keys, k, &k_exact, a, b, mu);
            let vq = self.leaving(Side::Values, v, &v_exact, a, b, None);
            self.quantize_both(Src::F32(&kq), Src::F32(&vq), n_leave, a)
        };
        if let Err(e) = written {
            if let Some(b) = backup {
                self.restore_slots(&b);
            }
            return Err(e);
        }
        if let Some(mu) = mean {
            self.set_mean(&mu);
        }
        self.store_exact(&k_exact, &v_exact, end);
        self.len = end;
        self.first = self.first.max(end.saturating_sub(l.capacity));
        self.frontier = self.frontier.max(end.saturating_sub(self.window));
        Ok(())
    }

    /// `x` rounded to the exact dtype, as bits; `name` is "k" or "v".
    fn to_exact(&self, name: &str, x: Src<'_>) -> Result<Vec<u16>> {
        let dt = self.options.exact_dtype;
        let mut buf = [0f32; 1024];
        let d = self.layout().head_dim;
        let mut out = Vec::with_capacity(x.len());
        for start in (0..x.len()).step_by(d) {
            x.read_f32(start, &mut buf[..d]);
            for (j, &f) in buf[..d].iter().enumerate() {
                let bits = match dt {
                    DType::Bf16 => bf16::from_f32(f).to_bits(),
                    _ => f16::from_f32(f).to_bits(),
                };
                if !f.is_finite() {
                    invalid!("kv cache append: {name}[{}] is not finite ({f})", start + j);
                }
                if !from_bits(dt, bits).is_finite() {
                    invalid!(
                        "kv cache append: {name}[{}] = {f} overflows the exact dtype {dt:?} \
                         (use CacheOptions::exact_dtype = Bf16)",
                        start + j
                    );
                }
                out.push(bits);
            }
        }
        Ok(out)
    }

    /// The sources of positions `a..b` to quantize, `[b - a, num_kv_heads, head_dim]` f32:
    /// exact copies (window or new tokens) when the cache keeps exact tokens, else the input;
    /// minus `mu` (else minus the cache's μ when centering keys).
    fn leaving(
        &self,
        side: Side,
        x: Src<'_>,
        x_exact: &[u16],
        a: usize,
        b: usize,
        mu: Option<&[f32]>,
    ) -> Vec<f32> {
        let l = self.layout();
        let (h, d) = (l.num_kv_heads, l.head_dim);
        let dt = self.options.exact_dtype;
        let per_token = h * d;
        let mut out = vec![0f32; (b - a) * per_token];
        let window = self.exact_window(side);
        for (t, row) in out.chunks_exact_mut(per_token).enumerate() {
            let p = a + t;
            if p < self.len {
                for (hh, r) in row.chunks_exact_mut(d).enumerate() {
                    let at = (hh * self.window + p % self.window) * d;
                    for (o, &bits) in r.iter_mut().zip(&window[at..at + d]) {
                        *o = from_bits(dt, bits);
                    }
                }
            } else if x_exact.is_empty() {
                x.read_f32((p - self.len) * per_token, row);
            } else {
                let at = (p - self.len) * per_token;
                for (o, &bits) in row.iter_mut().zip(&x_exact[at..at + per_token]) {
                    *o = from_bits(dt, bits);
                }
            }
        }
        let mu = match (side, mu) {
            (Side::Keys, Some(m)) => Some(m),
            (Side::Keys, None) if self.options.center_keys => Some(self.key_mean.as_slice()),
            _ => None,
        };
        if let Some(mu) = mu {
            for row in out.chunks_exact_mut(per_token) {
                for (o, m) in row.iter_mut().zip(mu) {
                    *o -= m;
                }
            }
        }
        out
    }

    /// Writes the new tokens `len..end` (`[end - len, heads, d]` exact bits) into the sinks
    /// and the window.
    fn store_exact(&mut self, k_exact: &[u16], v_exact: &[u16], end: usize) {
        if k_exact.is_empty() {
            return;
        }
        let l = *self.layout();
        let (h, d) = (l.num_kv_heads, l.head_dim);
        let win_lo = end.saturating_sub(self.window).max(self.sinks);
        for p in self.len..end {
            let src = (p - self.len) * h * d;
            for hh in 0..h {
                let s = src + hh * d;
                let dst = if p < self.sinks {
                    (hh * self.sinks + p) * d
                } else if p >= win_lo {
                    (hh * self.window + p % self.window) * d
                } else {
                    continue;
                };
                let (ks, vs) = if p < self.sinks {
                    (&mut self.k_sinks, &mut self.v_sinks)
                } else {
                    (&mut self.k_window, &mut self.v_window)
                };
                ks[dst..dst + d].copy_from_slice(&k_exact[s..s + d]);
                vs[dst..dst + d].copy_from_slice(&v_exact[s..s + d]);
            }
        }
    }

    fn quantize_both(&mut self, k: Src<'_>, v: Src<'_>, n: usize, write_pos: usize) -> Result<()> {
        let codec = &self.codec;
        cpu::quantize(
            codec,
            Side::Keys,
            k,
            n,
            write_pos,
            &mut self.k_packed,
            &mut self.k_norms,
        )?;
        cpu::quantize(
            codec,
            Side::Values,
            v,
            n,
            write_pos,
            &mut self.v_packed,
            &mut self.v_norms,
        )
    }

    /// Copies of the packed slots of positions `first_pos..first_pos + n` (all heads, both
    /// sides).
    fn backup_slots(&self, first_pos: usize, n: usize) -> SlotBackup {
        let l = self.layout();
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
    /// `dst: [num_kv_heads, n, head_dim]`, in the rotated or the original domain: the keys and
    /// values as the cache holds them (exact segments widened; packed keys with μ added back,
    /// R μ in the rotated domain). Every position must be retained (`first() ≤ start`,
    /// `start + n ≤ len()`). Packed positions of a plain cache are bit-identical to
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
        let mean = match (side, domain) {
            (Side::Keys, Domain::Original) => self.key_mean(),
            (Side::Keys, Domain::Rotated) => self.key_mean_rotated(),
            _ => None,
        };
        let mut out = [0f32; 1024];
        let mut idx = [0u8; 1024];
        for h in 0..l.num_kv_heads {
            for t in 0..n {
                let p = start + t;
                let o = &mut out[..d];
                match self.segment(p) {
                    Segment::Packed => {
                        let at = h * cap + l.slot(p);
                        cpu::dequantize_vector(
                            &self.codec,
                            side,
                            &packed[at * rb..(at + 1) * rb],
                            &norms[at * npp..(at + 1) * npp],
                            domain,
                            &mut idx[..d],
                            o,
                        );
                        if let Some(mu) = mean {
                            for (x, m) in o.iter_mut().zip(&mu[h * d..(h + 1) * d]) {
                                *x += m;
                            }
                        }
                    }
                    seg => {
                        self.read_exact(side, seg, h, p, o);
                        if domain == Domain::Rotated {
                            self.codec.rotation().forward(o);
                        }
                    }
                }
                dst.write_f32((h * n + t) * d, o);
            }
        }
        Ok(())
    }

    /// Widens the exact copy of position `p` (a sink or in the window) of head `h` into `out`.
    pub(crate) fn read_exact(&self, side: Side, seg: Segment, h: usize, p: usize, out: &mut [f32]) {
        let d = out.len();
        let (buf, at) = match seg {
            Segment::Sink => (self.exact_sinks(side), (h * self.sinks + p) * d),
            _ => (
                self.exact_window(side),
                (h * self.window + p % self.window) * d,
            ),
        };
        let bits = &buf[at..at + d];
        match self.options.exact_dtype {
            DType::Bf16 => bytemuck::cast_slice::<u16, bf16>(bits).convert_to_f32_slice(out),
            _ => bytemuck::cast_slice::<u16, f16>(bits).convert_to_f32_slice(out),
        }
    }

    /// Forgets every token: `len() = 0`. Buffers keep their size and contents; a μ estimated
    /// from the first append is forgotten too (the next append estimates it again), a given
    /// one is kept.
    pub fn reset(&mut self) {
        self.len = 0;
        self.first = 0;
        self.frontier = 0;
        self.mean_set = self.options.key_mean.is_some();
    }

    /// Drops the tokens at positions `new_len..len()` (rejected speculative tokens, prompt
    /// reuse); the next append writes at `new_len`. `new_len` must be ≤ `len()` and, in a ring,
    /// ≥ `first()`: older positions were overwritten and cannot come back. Below the frontier,
    /// retained positions stay quantized (the frontier moves down to `new_len`); μ is kept.
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
        self.frontier = self.frontier.min(new_len);
        Ok(())
    }
}

/// Where a retained position lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// An exact sink (`pos < sinks`).
    Sink,
    /// The packed planes.
    Packed,
    /// The exact recent window.
    Window,
}

/// Widens f16/bf16 bits to f32 (exact).
#[inline]
pub(crate) fn from_bits(dt: DType, bits: u16) -> f32 {
    match dt {
        DType::Bf16 => bf16::from_bits(bits).to_f32(),
        _ => f16::from_bits(bits).to_f32(),
    }
}

/// Per-(head, channel) mean of the keys `k: [n, num_kv_heads, head_dim]` (f64 sums, rounded
/// to f32), `[num_kv_heads, head_dim]`.
fn mean_of(k: Src<'_>, n: usize, per_token: usize) -> Result<Vec<f32>> {
    let mut sum = vec![0f64; per_token];
    let mut row = vec![0f32; per_token];
    for t in 0..n {
        k.read_f32(t * per_token, &mut row);
        for (s, &x) in sum.iter_mut().zip(&row) {
            *s += x as f64;
        }
    }
    let mu: Vec<f32> = sum.iter().map(|s| (s / n as f64) as f32).collect();
    if let Some(i) = mu.iter().position(|m| !m.is_finite()) {
        invalid!(
            "kv cache append: the key mean of channel {i} (head-major) is not finite; the keys \
             hold NaN or infinite values"
        );
    }
    Ok(mu)
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
