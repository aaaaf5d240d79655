//! Attention over the compressed cache on the CPU.
//!
//! Queries `[n_q, num_heads, head_dim]` attend causally to the cache: query i sits at logical
//! position `p = len - n_q + i` and sees the retained positions `pos ≤ p` (and `pos > p - W`
//! with a sliding window W). Query head h reads kv head `h / (num_heads / num_kv_heads)`.
//! score = scale · q·k, then `c · tanh(score / c)` with a softcap c; softmax over the visible
//! positions; output `Σ softmax · v`, `[n_q, num_heads, head_dim]` f32 in the original domain.
//!
//! [`attention`] works in the rotated domain, where the cache lives: each query is rotated once
//! (R orthogonal, so q·k = Rq·Rk), scored against the packed keys (centroid × norm, the norm
//! applied once per key), the rotated values are accumulated with weight softmax × norm, and the
//! output is rotated back once. No key or value is rotated and the cache is never materialized.
//! Work is spread over (query, head) pairs with rayon. The row kernels are chosen at run time:
//! AVX-512F, else AVX2 + FMA, else portable Rust. The SIMD kernels decode rows in registers:
//! 4-bit rows by permutes over the 16 centroids, each byte's low then high nibble, so a group
//! of coordinates comes out as `[evens, odds]` (the query is reordered to match once, the
//! accumulator back once); 2- and 3-bit rows by per-lane variable shifts, in natural order;
//! one-byte rows (5, 6, 8 bits) by permutes over 32-entry slices (AVX-512); with AVX2, 5- and
//! 6-bit rows by permutes over 8-entry slices merged by blends on the index's higher bits,
//! 8-bit rows by scalar table loads.
//! [`attention_reference`] dequantizes the cache to the original domain and runs dense
//! attention in f64; tests compare the two.
//!
//! A cache with exact sinks and window or centered keys ([`crate::CacheOptions`]): the packed
//! part runs as above over the packed positions only, with `scale · q·μ` added to each score;
//! the exact part and the log-sum-exp merge live in `cpu/segments.rs`.

use rayon::prelude::*;

use crate::cache::KvCache;
use crate::dtype::Src;
use crate::error::{invalid, Result};
use crate::layout::Side;
use crate::pack::unpack_row;

use super::segments::{self, SegScratch, Segments};

/// Attention parameters, `#[repr(C)]` so a GPU kernel can take the same struct (12 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionConfig {
    /// Multiplies q·k before the softcap and the softmax (usually `1 / sqrt(head_dim)`); finite.
    pub scale: f32,
    /// Logit softcap c: `score = c · tanh(score / c)`. 0 = off; otherwise finite and > 0.
    pub softcap: f32,
    /// Sliding window W in tokens: the query at position p sees `p - W < pos ≤ p`. 0 = off.
    pub window: u32,
}

impl AttentionConfig {
    /// `scale = 1 / sqrt(head_dim)`, no softcap, no window.
    pub fn new(head_dim: usize) -> Self {
        Self {
            scale: (1.0 / (head_dim.max(1) as f64).sqrt()) as f32,
            softcap: 0.0,
            window: 0,
        }
    }

    pub fn with_scale(self, scale: f32) -> Self {
        Self { scale, ..self }
    }

    pub fn with_window(self, window: u32) -> Self {
        Self { window, ..self }
    }

    pub fn with_softcap(self, softcap: f32) -> Self {
        Self { softcap, ..self }
    }

    /// Checks that `scale` is finite and `softcap` finite and ≥ 0; `op` names the caller.
    pub fn check(&self, op: &str) -> Result<()> {
        if !self.scale.is_finite() {
            invalid!("{op}: scale must be finite, got {}", self.scale);
        }
        if !(self.softcap.is_finite() && self.softcap >= 0.0) {
            invalid!(
                "{op}: softcap must be finite and > 0 (or 0 = off), got {}",
                self.softcap
            );
        }
        Ok(())
    }
}

/// Which CPU kernels [`attention_with`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// The fastest the running CPU supports (AVX-512, else AVX2 + FMA, else portable).
    Auto,
    /// Plain Rust, auto-vectorized for the build target (what CPUs without AVX2 run).
    Portable,
    /// AVX2 + FMA (x86-64).
    Avx2,
    /// AVX-512F (x86-64).
    Avx512,
}

impl Simd {
    /// Whether the running CPU can execute these kernels.
    pub fn is_supported(self) -> bool {
        match self {
            Simd::Auto | Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => Simd::Avx2.is_supported() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// A validated attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    pub n_q: usize,
    pub num_heads: usize,
    /// Query heads per kv head (`num_heads / num_kv_heads`).
    pub group: usize,
    /// The cache's `len()` and `first()` at planning time.
    pub len: usize,
    pub first: usize,
    pub window: usize,
}

impl AttentionPlan {
    /// The logical positions `lo..=hi` query `i` sees (never empty).
    pub fn visible(&self, i: usize) -> (usize, usize) {
        let p = self.len - self.n_q + i;
        let lo = if self.window > 0 {
            (p + 1).saturating_sub(self.window)
        } else {
            0
        };
        (lo.max(self.first), p)
    }
}

/// Validates an attention call over `cache` (`q_len` query elements, `out_len` output
/// elements); `None` means nothing to do (no queries).
pub fn plan_attention(
    op: &str,
    cache: &KvCache,
    q_len: usize,
    num_heads: usize,
    cfg: &AttentionConfig,
    out_len: usize,
) -> Result<Option<AttentionPlan>> {
    let l = cache.layout();
    let (kv, d) = (l.num_kv_heads, l.head_dim);
    if out_len != q_len {
        invalid!(
            "{op}: out has {out_len} elements, q has {q_len}; both are [n_q, num_heads, head_dim]"
        );
    }
    if q_len == 0 {
        return Ok(None);
    }
    if num_heads == 0 || !num_heads.is_multiple_of(kv) {
        invalid!("{op}: num_heads ({num_heads}) is not a positive multiple of num_kv_heads ({kv})");
    }
    let Some(per_query) = num_heads.checked_mul(d) else {
        invalid!("{op}: num_heads ({num_heads}) × head_dim ({d}) overflows");
    };
    if !q_len.is_multiple_of(per_query) {
        invalid!(
            "{op}: q has {q_len} elements, not a multiple of num_heads ({num_heads}) × \
             head_dim ({d})"
        );
    }
    cfg.check(op)?;
    let n_q = q_len / per_query;
    let (len, first) = (cache.len(), cache.first());
    if n_q > len {
        invalid!("{op}: n_q ({n_q}) > len ({len}): every query must sit at a cached position");
    }
    if n_q > len - first {
        invalid!(
            "{op}: n_q ({n_q}) > retained positions ({}): query 0 sits at position {}, which \
             this ring cache no longer holds (it holds {first}..{len})",
            len - first,
            len - n_q
        );
    }
    Ok(Some(AttentionPlan {
        n_q,
        num_heads,
        group: num_heads / kv,
        len,
        first,
        window: cfg.window as usize,
    }))
}

/// Attention of `q: [n_q, num_heads, head_dim]` over `cache` into `out: [n_q, num_heads,
/// head_dim]` (original domain), with the fastest kernels of the running CPU.
pub fn attention(
    cache: &KvCache,
    q: Src<'_>,
    num_heads: usize,
    cfg: &AttentionConfig,
    out: &mut [f32],
) -> Result<()> {
    attention_with(cache, q, num_heads, cfg, out, Simd::Auto)
}

/// [`attention`] with a choice of kernels.
pub fn attention_with(
    cache: &KvCache,
    q: Src<'_>,
    num_heads: usize,
    cfg: &AttentionConfig,
    out: &mut [f32],
    simd: Simd,
) -> Result<()> {
    let op = "attention";
    let Some(plan) = plan_attention(op, cache, q.len(), num_heads, cfg, out.len())? else {
        return Ok(());
    };
    if !simd.is_supported() {
        invalid!("{op}: this CPU cannot run the {simd:?} kernels");
    }
    let ctx = Ctx::new(cache, q, plan, cfg);
    let isa = match simd {
        Simd::Auto => Isa::detect(),
        Simd::Portable => Isa::Portable,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => Isa::Avx2,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => Isa::Avx512,
        #[cfg(not(target_arch = "x86_64"))]
        _ => Isa::Portable,
    };
    let d = cache.layout().head_dim;
    let job = |s: &mut Scratch, (w, o): (usize, &mut [f32])| {
        let (i, h) = (w / num_heads, w % num_heads);
        match isa {
            Isa::Portable => attend::<Portable>(&ctx, i, h, s, o),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2 and FMA.
            Isa::Avx2 => unsafe { attend_avx2(&ctx, i, h, s, o) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only chosen when the CPU has AVX-512F, AVX2 and FMA.
            Isa::Avx512 => unsafe { attend_avx512(&ctx, i, h, s, o) },
        }
    };
    let visits = (plan.n_q * num_heads).saturating_mul(plan.len - plan.first);
    if visits < PARALLEL_MIN_KEY_VISITS {
        let mut s = Scratch::default();
        out.chunks_mut(d)
            .enumerate()
            .for_each(|item| job(&mut s, item));
    } else {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each_init(Scratch::default, job);
    }
    Ok(())
}

/// Key visits (queries × heads × keys) below which attention stays on the calling thread.
const PARALLEL_MIN_KEY_VISITS: usize = 1 << 15;

/// The reference: dequantizes every retained position to the original domain and runs dense
/// attention with f64 scores, softmax and accumulation. Same contract as [`attention`].
pub fn attention_reference(
    cache: &KvCache,
    q: Src<'_>,
    num_heads: usize,
    cfg: &AttentionConfig,
    out: &mut [f32],
) -> Result<()> {
    let op = "attention_reference";
    let Some(plan) = plan_attention(op, cache, q.len(), num_heads, cfg, out.len())? else {
        return Ok(());
    };
    let l = cache.layout();
    let (kv, d) = (l.num_kv_heads, l.head_dim);
    let n = plan.len - plan.first;
    let mut k = vec![0f32; kv * n * d];
    let mut v = vec![0f32; kv * n * d];
    let orig = crate::codec::Domain::Original;
    cache.dequantize(Side::Keys, plan.first, n, orig, crate::Dst::F32(&mut k))?;
    cache.dequantize(Side::Values, plan.first, n, orig, crate::Dst::F32(&mut v))?;
    let mut qv = vec![0f32; d];
    let mut scores = Vec::with_capacity(n);
    let mut acc = vec![0f64; d];
    for (w, o) in out.chunks_exact_mut(d).enumerate() {
        let (i, h) = (w / num_heads, w % num_heads);
        let g = h / plan.group;
        q.read_f32(w * d, &mut qv);
        let (lo, hi) = plan.visible(i);
        let row = |pos: usize| (g * n + pos - plan.first) * d;
        scores.clear();
        for pos in lo..=hi {
            let kr = &k[row(pos)..][..d];
            let dot: f64 = qv.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mut s = dot * cfg.scale as f64;
            if cfg.softcap > 0.0 {
                let c = cfg.softcap as f64;
                s = c * (s / c).tanh();
            }
            scores.push(s);
        }
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        acc.fill(0.0);
        for (pos, s) in (lo..=hi).zip(&scores) {
            let p = (s - m).exp();
            sum += p;
            for (a, x) in acc.iter_mut().zip(&v[row(pos)..][..d]) {
                *a += p * *x as f64;
            }
        }
        for (o, a) in o.iter_mut().zip(&acc) {
            *o = (a / sum) as f32;
        }
    }
    Ok(())
}

/// Everything one (query, head) item reads.
struct Ctx<'a> {
    q: Src<'a>,
    plan: AttentionPlan,
    cfg: AttentionConfig,
    cache: &'a KvCache,
    /// Exact sinks and window, key mean.
    segs: Segments<'a>,
    keys: Plane<'a>,
    values: Plane<'a>,
    d: usize,
    capacity: usize,
    /// Multiplies the rotated query: `scale × norm_mul`.
    q_mul: f32,
    /// Multiplies the accumulated values: `norm_mul`.
    v_mul: f32,
}

/// One side of the cache as the kernels read it.
struct Plane<'a> {
    packed: &'a [u8],
    norms: &'a [f32],
    row_bytes: usize,
    npp: usize,
    bits: u32,
    /// Centroids, zero-padded to 256 entries (any u8 index is in bounds).
    table: [f32; 256],
    /// For 2 and 3 bits: `table8[i] = centroid[i mod 2^bits]`, so that any 3 low bits of an
    /// index select its centroid.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    table8: [f32; 8],
    /// For 2, 3 and 4 bits: `table16[i] = centroid[i mod 2^bits]` (any 4 low bits select).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    table16: [f32; 16],
    /// For 4 bits: `pairs[b] = [centroid[b & 15], centroid[b >> 4]]`, the two coordinates of
    /// packed byte b.
    pairs: [[f32; 2]; 256],
}

impl<'a> Plane<'a> {
    fn new(cache: &'a KvCache, side: Side) -> Self {
        let l = cache.layout();
        let cb = cache.codec().codebook(side);
        let mut table = [0f32; 256];
        table[..cb.centroids.len()].copy_from_slice(&cb.centroids);
        // The AVX-512 8-bit and the AVX2 6-bit lookups rely on C[n - 1 - i] = -C[i].
        debug_assert!(cb
            .centroids
            .iter()
            .zip(cb.centroids.iter().rev())
            .all(|(a, b)| *a == -*b));
        let n = cb.centroids.len();
        let table8 = std::array::from_fn(|i| if n <= 8 { cb.centroids[i % n] } else { 0.0 });
        let table16 = std::array::from_fn(|i| if n <= 16 { cb.centroids[i % n] } else { 0.0 });
        let pairs = std::array::from_fn(|b| {
            if n == 16 {
                [cb.centroids[b & 15], cb.centroids[b >> 4]]
            } else {
                [0.0; 2]
            }
        });
        Self {
            packed: cache.packed(side),
            norms: cache.norms(side),
            row_bytes: l.row_bytes(side),
            npp: l.norms_per_pos(),
            bits: cb.bits,
            table,
            table8,
            table16,
            pairs,
        }
    }

    #[inline(always)]
    fn row(&self, at: usize) -> (&[u8], &[f32]) {
        (
            &self.packed[at * self.row_bytes..(at + 1) * self.row_bytes],
            &self.norms[at * self.npp..(at + 1) * self.npp],
        )
    }
}

impl<'a> Ctx<'a> {
    fn new(cache: &'a KvCache, q: Src<'a>, plan: AttentionPlan, cfg: &AttentionConfig) -> Self {
        let l = cache.layout();
        // Decoded coordinate = centroid × norm × norm_mul (dequantize's g, split in two).
        let norm_mul = if l.head_dim <= 256 {
            1.0 / cache.codec().sqrt_d()
        } else {
            1.0 / l.scale_factor_d512
        };
        Self {
            q,
            plan,
            cfg: *cfg,
            cache,
            segs: Segments::new(cache),
            keys: Plane::new(cache, Side::Keys),
            values: Plane::new(cache, Side::Values),
            d: l.head_dim,
            capacity: l.capacity,
            q_mul: cfg.scale * norm_mul,
            v_mul: norm_mul,
        }
    }
}

/// Per-thread scratch.
struct Scratch {
    q: [f32; 1024],
    acc: [f32; 1024],
    buf: [f32; 1024],
    idx: [u8; 1024],
    scores: Vec<f32>,
    seg: SegScratch,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            q: [0.0; 1024],
            acc: [0.0; 1024],
            buf: [0.0; 1024],
            idx: [0; 1024],
            scores: Vec::new(),
            seg: SegScratch::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if Simd::Avx512.is_supported() {
                return Isa::Avx512;
            }
            if Simd::Avx2.is_supported() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// Reorders every group of `g` coordinates to `[even coordinates, odd coordinates]`: the order
/// in which the 4-bit kernels decode a row (low nibbles, then high nibbles). `tmp`: `g` floats.
#[inline(always)]
fn split_even_odd(x: &mut [f32], g: usize, tmp: &mut [f32]) {
    for c in x.chunks_exact_mut(g) {
        tmp[..g].copy_from_slice(c);
        for k in 0..g / 2 {
            c[k] = tmp[2 * k];
            c[g / 2 + k] = tmp[2 * k + 1];
        }
    }
}

/// The inverse of [`split_even_odd`].
#[inline(always)]
fn merge_even_odd(x: &mut [f32], g: usize, tmp: &mut [f32]) {
    for c in x.chunks_exact_mut(g) {
        tmp[..g].copy_from_slice(c);
        for k in 0..g / 2 {
            c[2 * k] = tmp[k];
            c[2 * k + 1] = tmp[g / 2 + k];
        }
    }
}

/// The row kernels one instruction set provides. `d` (a power of two ≥ 32) is the slice length;
/// blocks are `min(d, 256)` coordinates, one norm each.
trait Kernels {
    /// Coordinates per group that 4-bit rows decode as `[evens, odds]` (see
    /// [`split_even_odd`]); 0 when 4-bit rows decode in natural order.
    const SPLIT4: usize;
    /// `Σ_b norms[b] · (q_b · c_b)`, `c_j = table[idx_j]` the centroids of the packed `row`.
    /// `idx` (`d` bytes) and `buf` (`d` floats) are scratch.
    fn score(
        p: &Plane<'_>,
        q: &[f32],
        row: &[u8],
        norms: &[f32],
        idx: &mut [u8],
        buf: &mut [f32],
    ) -> f32;
    /// `acc_b += (w · norms[b]) · c_b`, with `c` and the scratch as in [`Kernels::score`].
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        p: &Plane<'_>,
        acc: &mut [f32],
        w: f32,
        row: &[u8],
        norms: &[f32],
        idx: &mut [u8],
        buf: &mut [f32],
    );
}

/// Portable row decode: `out[j] = table[idx_j]`.
#[inline(always)]
fn decode_portable(p: &Plane<'_>, row: &[u8], idx: &mut [u8], out: &mut [f32]) {
    match p.bits {
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(row) {
                o.copy_from_slice(&p.pairs[b as usize]);
            }
        }
        5 | 6 | 8 => {
            for (o, &i) in out.iter_mut().zip(row) {
                *o = p.table[i as usize];
            }
        }
        _ => {
            unpack_row(p.bits, row, idx);
            for (o, &i) in out.iter_mut().zip(idx.iter()) {
                *o = p.table[i as usize];
            }
        }
    }
}

struct Portable;

impl Kernels for Portable {
    const SPLIT4: usize = 0;

    #[inline(always)]
    fn score(
        p: &Plane<'_>,
        q: &[f32],
        row: &[u8],
        norms: &[f32],
        idx: &mut [u8],
        buf: &mut [f32],
    ) -> f32 {
        decode_portable(p, row, idx, buf);
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let (qb, xb) = (&q[b * bl..(b + 1) * bl], &buf[b * bl..(b + 1) * bl]);
            let mut lanes = [0f32; 8];
            for (qc, xc) in qb.chunks_exact(8).zip(xb.chunks_exact(8)) {
                for k in 0..8 {
                    lanes[k] += qc[k] * xc[k];
                }
            }
            s += lanes.iter().sum::<f32>() * n;
        }
        s
    }

    #[inline(always)]
    fn accumulate(
        p: &Plane<'_>,
        acc: &mut [f32],
        w: f32,
        row: &[u8],
        norms: &[f32],
        idx: &mut [u8],
        buf: &mut [f32],
    ) {
        decode_portable(p, row, idx, buf);
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let (ab, xb) = (&mut acc[b * bl..(b + 1) * bl], &buf[b * bl..(b + 1) * bl]);
            let wn = w * n;
            for (a, v) in ab.iter_mut().zip(xb) {
                *a += wn * v;
            }
        }
    }
}

/// One (query `i`, head `h`) item: score the exact segments ([`segments`]); rotate q, score
/// the visible packed keys, softmax, accumulate the values, rotate the output back into `out`
/// (`head_dim` values), merged with the exact part by log-sum-exp.
#[inline(always)]
fn attend<K: Kernels>(ctx: &Ctx<'_>, i: usize, h: usize, s: &mut Scratch, out: &mut [f32]) {
    let (d, cap) = (ctx.d, ctx.capacity);
    let plan = &ctx.plan;
    let g = h / plan.group;
    let (lo, hi) = plan.visible(i);
    let split = ctx.segs.split(lo, hi);
    let count = split.packed.len();
    let layout = ctx.cache.layout();
    let rotation = ctx.cache.codec().rotation();

    let q = &mut s.q[..d];
    ctx.q.read_f32((i * plan.num_heads + h) * d, q);
    let exact = ctx.segs.exact_part(q, g, &split, &ctx.cfg, &mut s.seg);
    if count == 0 {
        segments::finish_exact(&exact, &s.seg, out);
        return;
    }
    let bias = ctx.segs.key_bias(q, g, ctx.cfg.scale);
    rotation.forward(q);
    for v in q.iter_mut() {
        *v *= ctx.q_mul;
    }
    let (idx, buf) = (&mut s.idx[..d], &mut s.buf[..d]);
    if K::SPLIT4 > 0 && ctx.keys.bits == 4 {
        split_even_odd(q, K::SPLIT4, buf);
    }

    s.scores.resize(count, 0.0);
    let first_slot = layout.slot(split.packed.start);
    let mut slot = first_slot;
    let mut max = f32::NEG_INFINITY;
    let c = ctx.cfg.softcap;
    for sc in s.scores.iter_mut() {
        let (row, norms) = ctx.keys.row(g * cap + slot);
        let mut x = K::score(&ctx.keys, q, row, norms, idx, buf) + bias;
        if c > 0.0 {
            x = c * (x / c).tanh();
        }
        *sc = x;
        max = max.max(x);
        slot += 1;
        if slot == cap {
            slot = 0;
        }
    }

    let mut sum = 0f64;
    for sc in s.scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc as f64;
    }

    let acc = &mut s.acc[..d];
    acc.fill(0.0);
    slot = first_slot;
    for &p in s.scores.iter() {
        let (row, norms) = ctx.values.row(g * cap + slot);
        K::accumulate(&ctx.values, acc, p, row, norms, idx, buf);
        slot += 1;
        if slot == cap {
            slot = 0;
        }
    }
    if K::SPLIT4 > 0 && ctx.values.bits == 4 {
        merge_even_odd(acc, K::SPLIT4, buf);
    }
    let (f, f_exact) = segments::merge_factors(max, sum, &exact, ctx.v_mul);
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * f;
    }
    rotation.inverse(out);
    segments::add_exact(&s.seg, f_exact, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(ctx: &Ctx<'_>, i: usize, h: usize, s: &mut Scratch, out: &mut [f32]) {
    attend::<avx2::Avx2>(ctx, i, h, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
fn attend_avx512(ctx: &Ctx<'_>, i: usize, h: usize, s: &mut Scratch, out: &mut [f32]) {
    attend::<avx512::Avx512>(ctx, i, h, s, out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA row kernels. Only reachable after runtime detection (`Isa::Avx2`).
    use std::arch::x86_64::*;

    use super::{Kernels, Plane};
    pub(super) struct Avx2;

    impl Kernels for Avx2 {
        const SPLIT4: usize = 16;

        #[inline(always)]
        fn score(
            p: &Plane<'_>,
            q: &[f32],
            row: &[u8],
            norms: &[f32],
            _idx: &mut [u8],
            _buf: &mut [f32],
        ) -> f32 {
            // SAFETY: only instantiated inside `attend_avx2`, reached after detection.
            unsafe {
                match p.bits {
                    2 => score_small::<2>(p, q, row, norms),
                    3 => score_small::<3>(p, q, row, norms),
                    4 => score4(p, q, row, norms),
                    5 => score_bytes::<5>(p, q, row, norms),
                    6 => score_bytes::<6>(p, q, row, norms),
                    _ => score8(p, q, row, norms),
                }
            }
        }

        #[inline(always)]
        fn accumulate(
            p: &Plane<'_>,
            acc: &mut [f32],
            w: f32,
            row: &[u8],
            norms: &[f32],
            _idx: &mut [u8],
            _buf: &mut [f32],
        ) {
            // SAFETY: as above.
            unsafe {
                match p.bits {
                    2 => accumulate_small::<2>(p, acc, w, row, norms),
                    3 => accumulate_small::<3>(p, acc, w, row, norms),
                    4 => accumulate4(p, acc, w, row, norms),
                    5 => accumulate_bytes::<5>(p, acc, w, row, norms),
                    6 => accumulate_bytes::<6>(p, acc, w, row, norms),
                    _ => accumulate8(p, acc, w, row, norms),
                }
            }
        }
    }

    /// Indices (low `B` bits of each lane; higher bits are garbage) of the 8 coordinates
    /// `8j..8j + 8` of a 2- or 3-bit row, in natural order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn small_idx<const B: u32>(row: &[u8], j: usize) -> __m256i {
        if B == 2 {
            let b = &row[2 * j..2 * j + 2];
            let v = u16::from_le_bytes([b[0], b[1]]);
            _mm256_srlv_epi32(
                _mm256_set1_epi32(v as i32),
                _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
            )
        } else {
            let b = &row[3 * j..3 * j + 3];
            let v = u32::from_le_bytes([b[0], b[1], b[2], 0]);
            _mm256_srlv_epi32(
                _mm256_set1_epi32(v as i32),
                _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21),
            )
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn table8(p: &Plane<'_>) -> __m256 {
        // SAFETY: `table8` has 8 floats.
        unsafe { _mm256_loadu_ps(p.table8.as_ptr()) }
    }

    /// [`Kernels::score`] for 2- and 3-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn score_small<const B: u32>(
        p: &Plane<'_>,
        q: &[f32],
        row: &[u8],
        norms: &[f32],
    ) -> f32 {
        let t = table8(p);
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let qb = &q[b * bl..(b + 1) * bl];
            let j0 = b * bl / 8;
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for (k, qc) in qb.chunks_exact(16).enumerate() {
                let v0 = _mm256_permutevar8x32_ps(t, small_idx::<B>(row, j0 + 2 * k));
                let v1 = _mm256_permutevar8x32_ps(t, small_idx::<B>(row, j0 + 2 * k + 1));
                // SAFETY: `qc` has 16 floats.
                unsafe {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qc.as_ptr()), v0, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qc.as_ptr().add(8)), v1, a1);
                }
            }
            s += hsum(_mm256_add_ps(a0, a1)) * n;
        }
        s
    }

    /// [`Kernels::accumulate`] for 2- and 3-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn accumulate_small<const B: u32>(
        p: &Plane<'_>,
        acc: &mut [f32],
        w: f32,
        row: &[u8],
        norms: &[f32],
    ) {
        let t = table8(p);
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let ab = &mut acc[b * bl..(b + 1) * bl];
            let j0 = b * bl / 8;
            let wn = _mm256_set1_ps(w * n);
            for (k, ac) in ab.chunks_exact_mut(8).enumerate() {
                let v = _mm256_permutevar8x32_ps(t, small_idx::<B>(row, j0 + k));
                // SAFETY: `ac` has 8 floats.
                unsafe {
                    let at = ac.as_mut_ptr();
                    _mm256_storeu_ps(at, _mm256_fmadd_ps(wn, v, _mm256_loadu_ps(at)));
                }
            }
        }
    }

    /// The 16-entry table of a ≤ 4-bit plane as two 8-float halves.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn halves(p: &Plane<'_>) -> (__m256, __m256) {
        let t = &p.table;
        // SAFETY: `t` has 256 entries; each load reads 8 of the first 16.
        unsafe {
            (
                _mm256_loadu_ps(t.as_ptr()),
                _mm256_loadu_ps(t.as_ptr().add(8)),
            )
        }
    }

    /// Centroids of the 16 coordinates packed (4-bit) in `c[0..8]`, as (evens, odds).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn decode16(c: &[u8], lo: __m256, hi: __m256) -> (__m256, __m256) {
        debug_assert!(c.len() >= 8);
        // SAFETY: `c` has 8 bytes.
        let b = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(c.as_ptr().cast()) });
        (lut16(b, lo, hi), lut16(_mm256_srli_epi32::<4>(b), lo, hi))
    }

    /// [`Kernels::score`] for 4-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn score4(p: &Plane<'_>, q: &[f32], row: &[u8], norms: &[f32]) -> f32 {
        let (lo, hi) = halves(p);
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let (qb, rb) = (&q[b * bl..(b + 1) * bl], &row[b * bl / 2..(b + 1) * bl / 2]);
            let mut a = [_mm256_setzero_ps(); 4];
            for (qc, c) in qb.chunks_exact(32).zip(rb.chunks_exact(16)) {
                let (e0, o0) = decode16(c, lo, hi);
                let (e1, o1) = decode16(&c[8..], lo, hi);
                for (k, v) in [e0, o0, e1, o1].into_iter().enumerate() {
                    // SAFETY: `qc` has 32 floats.
                    let qv = unsafe { _mm256_loadu_ps(qc.as_ptr().add(8 * k)) };
                    a[k] = _mm256_fmadd_ps(qv, v, a[k]);
                }
            }
            let t = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            s += hsum(t) * n;
        }
        s
    }

    /// [`Kernels::accumulate`] for 4-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn accumulate4(p: &Plane<'_>, acc: &mut [f32], w: f32, row: &[u8], norms: &[f32]) {
        let (lo, hi) = halves(p);
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let ab = &mut acc[b * bl..(b + 1) * bl];
            let rb = &row[b * bl / 2..(b + 1) * bl / 2];
            let wn = _mm256_set1_ps(w * n);
            for (ac, c) in ab.chunks_exact_mut(32).zip(rb.chunks_exact(16)) {
                let (e0, o0) = decode16(c, lo, hi);
                let (e1, o1) = decode16(&c[8..], lo, hi);
                for (k, v) in [e0, o0, e1, o1].into_iter().enumerate() {
                    // SAFETY: `ac` has 32 floats.
                    unsafe {
                        let at = ac.as_mut_ptr().add(8 * k);
                        _mm256_storeu_ps(at, _mm256_fmadd_ps(wn, v, _mm256_loadu_ps(at)));
                    }
                }
            }
        }
    }

    /// Looks up 8 indices (< 16, i32 lanes) in a 16-entry table held as two halves.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lut16(idx: __m256i, lo: __m256, hi: __m256) -> __m256 {
        let a = _mm256_permutevar8x32_ps(lo, idx);
        let b = _mm256_permutevar8x32_ps(hi, idx);
        // Bit 3 of the index, moved to the sign bit, selects the upper half.
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
    }

    /// The 32 table entries [`lookup_bytes`] reads as 8-float registers: the centroids of a
    /// 5-bit plane, the lower half of a 6-bit one.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn table32(p: &Plane<'_>) -> [__m256; 4] {
        // SAFETY: `p.table` has 256 entries; the loads read the first 32.
        std::array::from_fn(|k| unsafe { _mm256_loadu_ps(p.table.as_ptr().add(8 * k)) })
    }

    /// Centroids of 8 one-byte indices (`c[0..8]`, 5 or 6 bits; higher bits ignored): a
    /// permute per 8-entry slice of 32 entries, merged by blends on index bits 3 and 4 (moved
    /// to the sign bit). 6 bits use the codebook's symmetry, `C[63 - j] = -C[j]`: upper
    /// indices read the lower half at `idx ^ 63` and flip the sign.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lookup_bytes<const B: u32>(c: &[u8], t: &[__m256; 4]) -> __m256 {
        debug_assert!(c.len() >= 8);
        // SAFETY: `c` has 8 bytes.
        let i = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(c.as_ptr().cast()) });
        // Bit 5 in the sign bit; all ones where it is set.
        let top = _mm256_slli_epi32::<26>(i);
        let upper = _mm256_srai_epi32::<31>(top);
        let j = if B == 5 {
            i
        } else {
            _mm256_xor_si256(i, upper)
        };
        let sel = |s: __m256i| _mm256_castsi256_ps(s);
        let (b3, b4) = (
            sel(_mm256_slli_epi32::<28>(j)),
            sel(_mm256_slli_epi32::<27>(j)),
        );
        let pair = |k: usize| {
            let lo = _mm256_permutevar8x32_ps(t[k], j);
            _mm256_blendv_ps(lo, _mm256_permutevar8x32_ps(t[k + 1], j), b3)
        };
        let v = _mm256_blendv_ps(pair(0), pair(2), b4);
        if B == 5 {
            return v;
        }
        let sign = _mm256_and_si256(top, _mm256_set1_epi32(i32::MIN));
        _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(v), sign))
    }

    /// Centroids of 8 one-byte indices (`c[0..8]`, 8 bits) by scalar table loads (faster here
    /// than a gather or a tree of 16 permutes over the symmetric half).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lookup8(c: &[u8], t: &[f32; 256]) -> __m256 {
        let at = |k: usize| t[c[k] as usize];
        _mm256_setr_ps(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7))
    }

    /// [`Kernels::score`] for 8-bit rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn score8(p: &Plane<'_>, q: &[f32], row: &[u8], norms: &[f32]) -> f32 {
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let (qb, rb) = (&q[b * bl..(b + 1) * bl], &row[b * bl..(b + 1) * bl]);
            let mut a = [_mm256_setzero_ps(); 4];
            for (qc, c) in qb.chunks_exact(32).zip(rb.chunks_exact(32)) {
                for (k, a) in a.iter_mut().enumerate() {
                    let v = lookup8(&c[8 * k..8 * k + 8], &p.table);
                    // SAFETY: `qc` has 32 floats.
                    let qv = unsafe { _mm256_loadu_ps(qc.as_ptr().add(8 * k)) };
                    *a = _mm256_fmadd_ps(qv, v, *a);
                }
            }
            let t = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            s += hsum(t) * n;
        }
        s
    }

    /// [`Kernels::accumulate`] for 8-bit rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn accumulate8(p: &Plane<'_>, acc: &mut [f32], w: f32, row: &[u8], norms: &[f32]) {
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let (ab, rb) = (&mut acc[b * bl..(b + 1) * bl], &row[b * bl..(b + 1) * bl]);
            let wn = _mm256_set1_ps(w * n);
            for (ac, c) in ab.chunks_exact_mut(8).zip(rb.chunks_exact(8)) {
                let v = lookup8(c, &p.table);
                // SAFETY: `ac` has 8 floats.
                unsafe {
                    let at = ac.as_mut_ptr();
                    _mm256_storeu_ps(at, _mm256_fmadd_ps(wn, v, _mm256_loadu_ps(at)));
                }
            }
        }
    }

    /// [`Kernels::score`] for 5- and 6-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn score_bytes<const B: u32>(p: &Plane<'_>, q: &[f32], row: &[u8], norms: &[f32]) -> f32 {
        let t = table32(p);
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let (qb, rb) = (&q[b * bl..(b + 1) * bl], &row[b * bl..(b + 1) * bl]);
            let mut a = [_mm256_setzero_ps(); 4];
            for (qc, c) in qb.chunks_exact(32).zip(rb.chunks_exact(32)) {
                for (k, a) in a.iter_mut().enumerate() {
                    let v = lookup_bytes::<B>(&c[8 * k..], &t);
                    // SAFETY: `qc` has 32 floats.
                    let qv = unsafe { _mm256_loadu_ps(qc.as_ptr().add(8 * k)) };
                    *a = _mm256_fmadd_ps(qv, v, *a);
                }
            }
            let t = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            s += hsum(t) * n;
        }
        s
    }

    /// [`Kernels::accumulate`] for 5- and 6-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn accumulate_bytes<const B: u32>(
        p: &Plane<'_>,
        acc: &mut [f32],
        w: f32,
        row: &[u8],
        norms: &[f32],
    ) {
        let t = table32(p);
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let (ab, rb) = (&mut acc[b * bl..(b + 1) * bl], &row[b * bl..(b + 1) * bl]);
            let wn = _mm256_set1_ps(w * n);
            for (ac, c) in ab.chunks_exact_mut(8).zip(rb.chunks_exact(8)) {
                let v = lookup_bytes::<B>(c, &t);
                // SAFETY: `ac` has 8 floats.
                unsafe {
                    let at = ac.as_mut_ptr();
                    _mm256_storeu_ps(at, _mm256_fmadd_ps(wn, v, _mm256_loadu_ps(at)));
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512F row kernels for 4-bit rows (other widths use the AVX2 ones). Only reachable
    //! after runtime detection (`Isa::Avx512`).
    use std::arch::x86_64::*;

    use super::{Kernels, Plane};

    pub(super) struct Avx512;

    impl Kernels for Avx512 {
        const SPLIT4: usize = 32;

        #[inline(always)]
        fn score(
            p: &Plane<'_>,
            q: &[f32],
            row: &[u8],
            norms: &[f32],
            _idx: &mut [u8],
            _buf: &mut [f32],
        ) -> f32 {
            // SAFETY: only instantiated inside `attend_avx512`, reached after detection.
            unsafe {
                match p.bits {
                    2 => score_small512::<2>(p, q, row, norms),
                    3 => score_small512::<3>(p, q, row, norms),
                    4 => score4(p, q, row, norms),
                    5 => score_bytes::<5>(p, q, row, norms),
                    6 => score_bytes::<6>(p, q, row, norms),
                    _ => score_bytes::<8>(p, q, row, norms),
                }
            }
        }

        #[inline(always)]
        fn accumulate(
            p: &Plane<'_>,
            acc: &mut [f32],
            w: f32,
            row: &[u8],
            norms: &[f32],
            _idx: &mut [u8],
            _buf: &mut [f32],
        ) {
            // SAFETY: as above.
            unsafe {
                match p.bits {
                    2 => accumulate_small512::<2>(p, acc, w, row, norms),
                    3 => accumulate_small512::<3>(p, acc, w, row, norms),
                    4 => accumulate4(p, acc, w, row, norms),
                    5 => accumulate_bytes::<5>(p, acc, w, row, norms),
                    6 => accumulate_bytes::<6>(p, acc, w, row, norms),
                    _ => accumulate_bytes::<8>(p, acc, w, row, norms),
                }
            }
        }
    }

    /// Indices (low 4 bits of each lane meaningful modulo `2^B`) of the 16 coordinates
    /// `16j..16j + 16` of a 2- or 3-bit row, in natural order.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn small_idx<const B: u32>(row: &[u8], j: usize) -> __m512i {
        if B == 2 {
            let b = &row[4 * j..4 * j + 4];
            let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let shifts =
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            _mm512_srlv_epi32(_mm512_set1_epi32(v as i32), shifts)
        } else {
            // 16 three-bit indices in 6 bytes: shift a 64-bit copy per lane, keep low dwords.
            let at = 6 * j;
            let v = match row.get(at..at + 8) {
                Some(b) => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                None => {
                    let b = &row[at..at + 6];
                    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0])
                }
            };
            let x = _mm512_set1_epi64(v as i64);
            let lo = _mm512_srlv_epi64(x, _mm512_setr_epi64(0, 3, 6, 9, 12, 15, 18, 21));
            let hi = _mm512_srlv_epi64(x, _mm512_setr_epi64(24, 27, 30, 33, 36, 39, 42, 45));
            let low_dwords =
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            _mm512_permutex2var_epi32(lo, low_dwords, hi)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn table16(p: &Plane<'_>) -> __m512 {
        // SAFETY: `table16` has 16 floats.
        unsafe { _mm512_loadu_ps(p.table16.as_ptr()) }
    }

    /// [`Kernels::score`] for 2- and 3-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn score_small512<const B: u32>(p: &Plane<'_>, q: &[f32], row: &[u8], norms: &[f32]) -> f32 {
        let t = table16(p);
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let qb = &q[b * bl..(b + 1) * bl];
            let j0 = b * bl / 16;
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (k, qc) in qb.chunks_exact(32).enumerate() {
                let v0 = _mm512_permutexvar_ps(small_idx::<B>(row, j0 + 2 * k), t);
                let v1 = _mm512_permutexvar_ps(small_idx::<B>(row, j0 + 2 * k + 1), t);
                // SAFETY: `qc` has 32 floats.
                unsafe {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qc.as_ptr()), v0, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qc.as_ptr().add(16)), v1, a1);
                }
            }
            s += _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * n;
        }
        s
    }

    /// [`Kernels::accumulate`] for 2- and 3-bit rows, decoding in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn accumulate_small512<const B: u32>(
        p: &Plane<'_>,
        acc: &mut [f32],
        w: f32,
        row: &[u8],
        norms: &[f32],
    ) {
        let t = table16(p);
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let ab = &mut acc[b * bl..(b + 1) * bl];
            let j0 = b * bl / 16;
            let wn = _mm512_set1_ps(w * n);
            for (k, ac) in ab.chunks_exact_mut(16).enumerate() {
                let v = _mm512_permutexvar_ps(small_idx::<B>(row, j0 + k), t);
                // SAFETY: `ac` has 16 floats.
                unsafe {
                    let at = ac.as_mut_ptr();
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(wn, v, _mm512_loadu_ps(at)));
                }
            }
        }
    }

    /// Centroids of 16 one-byte indices (`c[0..16]`, 5, 6 or 8 bits): two-register permutes
    /// over 32-entry slices of the table, merged by the higher index bits; 8 bits use the
    /// codebook's symmetry to read only the lower 128 entries.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn lookup_bytes<const B: u32>(c: &[u8], t: &[__m512; 8]) -> __m512 {
        debug_assert!(c.len() >= 16);
        // SAFETY: `c` has 16 bytes.
        let i = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(c.as_ptr().cast()) });
        let slice = |k: usize| _mm512_permutex2var_ps(t[2 * k], i, t[2 * k + 1]);
        let bit = |b: i32| _mm512_test_epi32_mask(i, _mm512_set1_epi32(1 << b));
        match B {
            5 => slice(0),
            6 => _mm512_mask_blend_ps(bit(5), slice(0), slice(1)),
            _ => {
                // Codebooks are symmetric: C[255 - j] = -C[j]. Upper indices read the lower
                // half at 255 - idx (= idx ^ 255) and flip the sign.
                let upper = bit(7);
                let j = _mm512_mask_xor_epi32(i, upper, i, _mm512_set1_epi32(255));
                let half = |k: usize| _mm512_permutex2var_ps(t[2 * k], j, t[2 * k + 1]);
                let jbit = |b: i32| _mm512_test_epi32_mask(j, _mm512_set1_epi32(1 << b));
                let b5 = jbit(5);
                let q0 = _mm512_mask_blend_ps(b5, half(0), half(1));
                let q1 = _mm512_mask_blend_ps(b5, half(2), half(3));
                let v = _mm512_castps_si512(_mm512_mask_blend_ps(jbit(6), q0, q1));
                let sign = _mm512_set1_epi32(i32::MIN);
                _mm512_castsi512_ps(_mm512_mask_xor_epi32(v, upper, v, sign))
            }
        }
    }

    /// The table entries [`lookup_bytes`] reads (the first `min(2^B, 128)`) as 16-float
    /// registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn table256<const B: u32>(p: &Plane<'_>) -> [__m512; 8] {
        let t = p.table.as_ptr();
        let mut r = [_mm512_setzero_ps(); 8];
        for (k, r) in r.iter_mut().enumerate().take((1 << B.min(7)) / 16) {
            // SAFETY: `p.table` has 256 entries; k < 16.
            *r = unsafe { _mm512_loadu_ps(t.add(16 * k)) };
        }
        r
    }

    /// [`Kernels::score`] for rows of one byte per index.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn score_bytes<const B: u32>(p: &Plane<'_>, q: &[f32], row: &[u8], norms: &[f32]) -> f32 {
        let t = table256::<B>(p);
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let (qb, rb) = (&q[b * bl..(b + 1) * bl], &row[b * bl..(b + 1) * bl]);
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (qc, c) in qb.chunks_exact(32).zip(rb.chunks_exact(32)) {
                let v0 = lookup_bytes::<B>(c, &t);
                let v1 = lookup_bytes::<B>(&c[16..], &t);
                // SAFETY: `qc` has 32 floats.
                unsafe {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qc.as_ptr()), v0, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qc.as_ptr().add(16)), v1, a1);
                }
            }
            s += _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * n;
        }
        s
    }

    /// [`Kernels::accumulate`] for rows of one byte per index.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn accumulate_bytes<const B: u32>(
        p: &Plane<'_>,
        acc: &mut [f32],
        w: f32,
        row: &[u8],
        norms: &[f32],
    ) {
        let t = table256::<B>(p);
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let (ab, rb) = (&mut acc[b * bl..(b + 1) * bl], &row[b * bl..(b + 1) * bl]);
            let wn = _mm512_set1_ps(w * n);
            for (ac, c) in ab.chunks_exact_mut(16).zip(rb.chunks_exact(16)) {
                let v = lookup_bytes::<B>(c, &t);
                // SAFETY: `ac` has 16 floats.
                unsafe {
                    let at = ac.as_mut_ptr();
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(wn, v, _mm512_loadu_ps(at)));
                }
            }
        }
    }

    /// The 16 centroids of a 4-bit plane.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn table(p: &Plane<'_>) -> __m512 {
        // SAFETY: `p.table` has 256 entries; the load reads the first 16.
        unsafe { _mm512_loadu_ps(p.table.as_ptr()) }
    }

    /// Centroids of the 32 coordinates packed (4-bit) in `c[0..16]`, as (evens, odds).
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn decode32(c: &[u8], t: __m512) -> (__m512, __m512) {
        debug_assert!(c.len() >= 16);
        // SAFETY: `c` has 16 bytes.
        let b = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(c.as_ptr().cast()) });
        // The permute reads the low 4 bits of each lane: the low nibble, then the high one.
        (
            _mm512_permutexvar_ps(b, t),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), t),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn score4(p: &Plane<'_>, q: &[f32], row: &[u8], norms: &[f32]) -> f32 {
        let t = table(p);
        let bl = q.len().min(256);
        let mut s = 0.0;
        for (b, &n) in norms.iter().enumerate() {
            let (qb, rb) = (&q[b * bl..(b + 1) * bl], &row[b * bl / 2..(b + 1) * bl / 2]);
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (qc, c) in qb.chunks_exact(32).zip(rb.chunks_exact(16)) {
                let (e, o) = decode32(c, t);
                // SAFETY: `qc` has 32 floats.
                unsafe {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qc.as_ptr()), e, a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qc.as_ptr().add(16)), o, a1);
                }
            }
            s += _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * n;
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f")]
    fn accumulate4(p: &Plane<'_>, acc: &mut [f32], w: f32, row: &[u8], norms: &[f32]) {
        let t = table(p);
        let bl = acc.len().min(256);
        for (b, &n) in norms.iter().enumerate() {
            let ab = &mut acc[b * bl..(b + 1) * bl];
            let rb = &row[b * bl / 2..(b + 1) * bl / 2];
            let wn = _mm512_set1_ps(w * n);
            for (ac, c) in ab.chunks_exact_mut(32).zip(rb.chunks_exact(16)) {
                let (e, o) = decode32(c, t);
                // SAFETY: `ac` has 32 floats.
                unsafe {
                    let at = ac.as_mut_ptr();
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(wn, e, _mm512_loadu_ps(at)));
                    let at = at.add(16);
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(wn, o, _mm512_loadu_ps(at)));
                }
            }
        }
    }
}
