//! `BatchCache`: the compressed K/V caches of many sequences (one layer) in device memory, the
//! input of the fused decode attention ([`BatchCache::attention`], src/cuda/decode.rs).
//!
//! Planes: packed `[num_seqs, num_kv_heads, capacity, row_bytes]` u8 and norms
//! `[num_seqs, num_kv_heads, capacity, norms_per_pos]` f32 per side: sequence s's slice is
//! exactly the planes of a one-sequence [`KvCache`] of the same layout. Per sequence the device
//! holds its logical length (u32 `seq_lens`) and its mode (u32 `ring_flags`, nonzero = ring);
//! the host keeps a mirror of both. A global sequence stores position p in slot p, a ring one in
//! slot `p % capacity` and attends to its last `capacity` positions.
//!
//! With [`CacheOptions`] other than plain ([`BatchCache::with_options`]) each sequence also has
//! the planes of a [`KvCache`] with those options: exact sinks `[num_seqs, num_kv_heads, sinks,
//! head_dim]` and window `[num_seqs, num_kv_heads, window, head_dim]` (f16/bf16 bits, position p
//! at window slot `p % window`), μ `[num_seqs, num_kv_heads, head_dim]` f32 when centering keys,
//! and its frontier (u32 `frontiers`, host mirror too): positions `[sinks, frontier)` are packed.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::buffer::{BufferDType, DeviceBuffer};
use super::codec::CudaCodec;
use super::decode::DecodeState;
use super::device::CudaDevice;
use super::driver_err;
use super::params::AppendParams;
use crate::cache::KvCache;
use crate::codec::Codec;
use crate::dtype::DType;
use crate::error::{invalid, Result};
use crate::layout::{CacheLayout, CacheMode, Side};
use crate::options::CacheOptions;
use crate::TqError;

/// The K/V caches of `num_seqs` sequences of one layer on one device.
#[derive(Debug)]
pub struct BatchCache {
    pub(super) codec: CudaCodec,
    pub(super) num_seqs: usize,
    pub(super) k_packed: DeviceBuffer,
    pub(super) k_norms: DeviceBuffer,
    pub(super) v_packed: DeviceBuffer,
    pub(super) v_norms: DeviceBuffer,
    /// u32 `[num_seqs]`: logical length of each sequence.
    pub(super) seq_lens: CudaSlice<u32>,
    /// u32 `[num_seqs]`: where an append's kernel writes the lengths after it; swapped with
    /// `seq_lens` once launched (no upload per decode step).
    seq_lens_next: CudaSlice<u32>,
    /// u32 `[num_seqs]`: 1 = ring, 0 = global.
    pub(super) ring_flags: CudaSlice<u32>,
    /// Host mirror of `seq_lens`.
    pub(super) lens: Vec<u32>,
    /// Host mirror of `ring_flags`.
    pub(super) modes: Vec<CacheMode>,
    /// Decode-attention kernels and workspace.
    pub(super) decode: DecodeState,
    options: CacheOptions,
    /// Effective exact sinks and window (the options' values, at most `capacity`).
    pub(super) sinks: usize,
    pub(super) window: usize,
    /// Exact segments, μ and frontiers; `None` for plain TurboQuant options.
    pub(super) extras: Option<Extras>,
}

/// What a batch with non-plain options keeps beside the packed planes (module docs).
#[derive(Debug)]
pub(super) struct Extras {
    pub(super) k_sinks: DeviceBuffer,
    pub(super) v_sinks: DeviceBuffer,
    pub(super) k_window: DeviceBuffer,
    pub(super) v_window: DeviceBuffer,
    /// f32 `[num_seqs, num_kv_heads, head_dim]`; `None` without centering.
    pub(super) key_mean: Option<DeviceBuffer>,
    /// u32 `[num_seqs]` frontiers and their host mirror.
    pub(super) frontiers: CudaSlice<u32>,
    frontier: Vec<u32>,
    /// u32 `[num_seqs]`: the frontiers after an append (tq_append_kv), swapped in like
    /// `seq_lens_next`.
    frontiers_next: CudaSlice<u32>,
    /// Whether each sequence's μ is set (given, or uploaded with a cache).
    mean_set: Vec<bool>,
}

impl Extras {
    fn num_bytes(&self) -> usize {
        let mean = self.key_mean.as_ref().map_or(0, |m| m.num_bytes());
        self.k_sinks.num_bytes()
            + self.v_sinks.num_bytes()
            + self.k_window.num_bytes()
            + self.v_window.num_bytes()
            + mean
            + 2 * 4 * self.frontier.len() // u32 frontiers (two buffers)
    }

    fn exact(&self, side: Side) -> (&DeviceBuffer, &DeviceBuffer) {
        match side {
            Side::Keys => (&self.k_sinks, &self.k_window),
            Side::Values => (&self.v_sinks, &self.v_window),
        }
    }
}

fn ring_flag(mode: CacheMode) -> u32 {
    u32::from(mode == CacheMode::Ring)
}

impl BatchCache {
    /// `num_seqs` empty plain TurboQuant sequences (no centering, no exact tokens), each in
    /// `layout.mode`, with every plane allocated (zeroed) for `layout.capacity` tokens.
    /// `num_kv_heads`, `head_dim` and `capacity` must be > 0.
    pub fn new(device: Arc<CudaDevice>, layout: CacheLayout, num_seqs: usize) -> Result<Self> {
        Self::with_options(device, layout, CacheOptions::plain(), num_seqs)
    }

    /// `num_seqs` empty sequences with `options` (key centering, exact sinks and window; see
    /// [`CacheOptions`] and the module docs). A given `options.key_mean` is every sequence's μ;
    /// otherwise a centering sequence takes μ from the cache [`BatchCache::upload`]s into it or
    /// from [`BatchCache::set_key_mean`].
    pub fn with_options(
        device: Arc<CudaDevice>,
        layout: CacheLayout,
        options: CacheOptions,
        num_seqs: usize,
    ) -> Result<Self> {
        let op = "batch cache";
        let l = layout.validated()?;
        if l.num_kv_heads == 0 || l.head_dim == 0 || l.capacity == 0 {
            invalid!(
                "{op}: num_kv_heads ({}), head_dim ({}) and capacity ({}) must all be > 0",
                l.num_kv_heads,
                l.head_dim,
                l.capacity
            );
        }
        if num_seqs > u32::MAX as usize {
            invalid!("{op}: num_seqs ({num_seqs}) must fit in u32");
        }
        let plane = |len: usize| {
            num_seqs.checked_mul(len).ok_or_else(|| {
                crate::TqError::InvalidArgument(format!(
                    "{op}: num_seqs ({num_seqs}) × plane length ({len}) overflows"
                ))
            })
        };
        let codec = CudaCodec::new(device, Codec::new(l)?)?;
        let s = codec.stream().clone();
        let f32s = BufferDType::Float(DType::F32);
        let k_packed = DeviceBuffer::zeros(&s, BufferDType::U8, plane(l.packed_len(Side::Keys))?)?;
        let v_packed =
            DeviceBuffer::zeros(&s, BufferDType::U8, plane(l.packed_len(Side::Values))?)?;
        let k_norms = DeviceBuffer::zeros(&s, f32s, plane(l.norms_len())?)?;
        let v_norms = DeviceBuffer::zeros(&s, f32s, plane(l.norms_len())?)?;
        let modes = vec![l.mode; num_seqs];
        let flags: Vec<u32> = modes.iter().map(|&m| ring_flag(m)).collect();
        let up = |e| driver_err("batch cache: upload lengths", e);
        // At least one element: a zero-length device allocation is not allowed.
        let lens = vec![0u32; num_seqs];
        let seq_lens = s.clone_htod(&padded(&lens)).map_err(up)?;
        let seq_lens_next = s.clone_htod(&padded(&lens)).map_err(up)?;
        let ring_flags = s.clone_htod(&padded(&flags)).map_err(up)?;
        options.check(&l)?;
        let sinks = options.sinks.min(l.capacity);
        let window = options.window.min(l.capacity);
        let extras = if options.center_keys || sinks + window > 0 {
            let (h, d) = (l.num_kv_heads, l.head_dim);
            let exact = BufferDType::Float(options.exact_dtype);
            let zeros = |dtype, tokens: usize| {
                let len = plane(h.checked_mul(tokens * d).ok_or_else(|| {
                    TqError::InvalidArgument(format!("{op}: exact plane size overflows"))
                })?)?;
                DeviceBuffer::zeros(&s, dtype, len)
            };
            let key_mean = match &options.key_mean {
                Some(mu) => {
                    let all: Vec<f32> = (0..num_seqs).flat_map(|_| mu.iter().copied()).collect();
                    Some(DeviceBuffer::from_f32(&s, &all)?)
                }
                None if options.center_keys => Some(zeros(f32s, 1)?),
                None => None,
            };
            Some(Extras {
                k_sinks: zeros(exact, sinks)?,
                v_sinks: zeros(exact, sinks)?,
                k_window: zeros(exact, window)?,
                v_window: zeros(exact, window)?,
                key_mean,
                frontiers: s.clone_htod(&padded(&lens)).map_err(up)?,
                frontier: lens.clone(),
                frontiers_next: s.clone_htod(&padded(&lens)).map_err(up)?,
                mean_set: vec![options.key_mean.is_some(); num_seqs],
            })
        } else {
            None
        };
        Ok(Self {
            codec,
            num_seqs,
            k_packed,
            k_norms,
            v_packed,
            v_norms,
            seq_lens,
            seq_lens_next,
            ring_flags,
            lens,
            modes,
            decode: DecodeState::default(),
            options,
            sinks,
            window,
            extras,
        })
    }

    /// The options the batch was built with.
    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// Exact sink positions per sequence: `0..sinks()` (at most `capacity`).
    pub fn sinks(&self) -> usize {
        self.sinks
    }

    /// Exact recent-window length in tokens (at most `capacity`).
    pub fn window(&self) -> usize {
        self.window
    }

    /// Each sequence's quantized frontier: retained positions in `[sinks, frontier)` are packed,
    /// `[max(frontier, sinks), len)` exact in the window. Equal to the lengths for plain options.
    pub fn frontiers(&self) -> &[u32] {
        self.extras.as_ref().map_or(&self.lens, |e| &e.frontier)
    }

    /// Sets sequence `seq`'s key mean μ, `[num_kv_heads, head_dim]` f32 (original domain). Only
    /// for centering batches, and only while nothing of the sequence is packed (its frontier is at
    /// most `sinks`): the packed keys were quantized minus the μ they had.
    pub fn set_key_mean(&mut self, seq: usize, mu: &[f32]) -> Result<()> {
        let op = "batch cache set_key_mean";
        self.check_seq(op, seq)?;
        let l = *self.layout();
        let sinks = self.sinks as u32;
        let Some(e) = self.extras.as_mut() else {
            invalid!("{op}: the batch does not center keys (CacheOptions::center_keys is off)");
        };
        let Some(buf) = e.key_mean.as_mut() else {
            invalid!("{op}: the batch does not center keys (CacheOptions::center_keys is off)");
        };
        let n = l.num_kv_heads * l.head_dim;
        if mu.len() != n {
            invalid!(
                "{op}: mu has {} elements, need {n} (num_kv_heads={} × head_dim={})",
                mu.len(),
                l.num_kv_heads,
                l.head_dim
            );
        }
        if let Some(i) = mu.iter().position(|x| !x.is_finite()) {
            invalid!("{op}: mu[{i}] is not finite ({})", mu[i]);
        }
        if e.frontier[seq] > sinks {
            invalid!(
                "{op}: sequence {seq} already has packed keys (positions {sinks}..{}) quantized \
                 with its previous mean",
                e.frontier[seq]
            );
        }
        let s = self.codec.stream();
        upload_seq_part(
            s,
            bytemuck::cast_slice(mu),
            buf,
            seq,
            "batch cache: upload key mean",
        )?;
        e.mean_set[seq] = true;
        Ok(())
    }

    /// Sequence `seq`'s exact sinks `[num_kv_heads, sinks, head_dim]` and window `[num_kv_heads,
    /// window, head_dim]` of one side, f16/bf16 bits (empty for plain options; synchronizes).
    pub fn download_exact(&self, seq: usize, side: Side) -> Result<(Vec<u16>, Vec<u16>)> {
        let op = "batch cache download_exact";
        self.check_seq(op, seq)?;
        let Some(e) = &self.extras else {
            return Ok((Vec::new(), Vec::new()));
        };
        let (sinks, window) = e.exact(side);
        let s = self.codec.stream();
        let bits = |buf: &DeviceBuffer| -> Result<Vec<u16>> {
            let n = buf.num_bytes() / self.num_seqs.max(1);
            let bytes = download_seq_part(s, buf, seq, n, "batch cache: download exact")?;
            Ok(bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect())
        };
        Ok((bits(sinks)?, bits(window)?))
    }

    pub fn layout(&self) -> &CacheLayout {
        self.codec.codec().layout()
    }

    /// The codec (rotation and codebooks) on the device; its stream runs every operation.
    pub fn codec(&self) -> &CudaCodec {
        &self.codec
    }

    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }

    /// Logical lengths (tokens appended) of every sequence.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// Mode of every sequence.
    pub fn modes(&self) -> &[CacheMode] {
        &self.modes
    }

    /// Bytes of every buffer the batch holds on the device: the four planes, the lengths (two
    /// buffers) and modes, and with non-plain options the exact sinks and window, μ and the
    /// frontiers (two buffers).
    pub fn memory_bytes(&self) -> usize {
        self.k_packed.num_bytes()
            + self.v_packed.num_bytes()
            + self.k_norms.num_bytes()
            + self.v_norms.num_bytes()
            + 12 * self.num_seqs
            + self.extras.as_ref().map_or(0, Extras::num_bytes)
    }

    fn check_seq(&self, op: &str, seq: usize) -> Result<()> {
        if seq >= self.num_seqs {
            invalid!(
                "{op}: sequence {seq} out of range (num_seqs {})",
                self.num_seqs
            );
        }
        Ok(())
    }

    /// Uploads the host mirrors of the lengths, modes and frontiers (stream-ordered after earlier
    /// work). Appends need none of it: their kernels write the lengths and frontiers after them.
    fn sync_meta(&mut self) -> Result<()> {
        let s = self.codec.stream().clone();
        let flags: Vec<u32> = self.modes.iter().map(|&m| ring_flag(m)).collect();
        let up = |e| driver_err("batch cache: upload lengths and modes", e);
        s.memcpy_htod(&padded(&self.lens), &mut self.seq_lens)
            .map_err(up)?;
        s.memcpy_htod(&padded(&flags), &mut self.ring_flags)
            .map_err(up)?;
        if let Some(e) = self.extras.as_mut() {
            s.memcpy_htod(&padded(&e.frontier), &mut e.frontiers)
                .map_err(up)?;
        }
        Ok(())
    }

    /// Empties sequence `seq` and sets its mode (its slots keep their bytes until rewritten).
    pub fn reset(&mut self, seq: usize, mode: CacheMode) -> Result<()> {
        self.check_seq("batch cache reset", seq)?;
        self.lens[seq] = 0;
        self.modes[seq] = mode;
        let given = self.options.key_mean.clone();
        if let Some(e) = self.extras.as_mut() {
            e.frontier[seq] = 0;
            e.mean_set[seq] = false;
        }
        if let Some(mu) = given {
            self.set_key_mean(seq, &mu)?;
        }
        self.sync_meta()
    }

    /// Copies a CPU cache into sequence `seq`: its planes, exact segments, μ, frontier, length
    /// and mode. The cache must have this batch's layout (mode aside) and options (centering,
    /// effective sinks and window, exact dtype) and retain exactly what the kernels assume: every
    /// position of a global cache, the last `min(len, capacity)` positions of a ring (no
    /// truncation below a wrapped ring's window).
    pub fn upload(&mut self, seq: usize, cache: &KvCache) -> Result<()> {
        let op = "batch cache upload";
        self.check_seq(op, seq)?;
        let (l, c) = (*self.layout(), *cache.layout());
        let same = CacheLayout { mode: l.mode, ..c } == l;
        if !same {
            invalid!("{op}: cache layout {c:?} differs from the batch layout {l:?} (mode aside)");
        }
        let (o, b) = (cache.options(), &self.options);
        let exact = self.sinks + self.window > 0;
        if o.center_keys != b.center_keys
            || cache.sinks() != self.sinks
            || cache.window() != self.window
            || (exact && o.exact_dtype != b.exact_dtype)
        {
            invalid!(
                "{op}: the cache has center_keys={}, sinks={}, window={}, exact_dtype={:?} but \
                 the batch has center_keys={}, sinks={}, window={}, exact_dtype={:?}",
                o.center_keys,
                cache.sinks(),
                cache.window(),
                o.exact_dtype,
                b.center_keys,
                self.sinks,
                self.window,
                b.exact_dtype
            );
        }
        let want_first = match c.mode {
            CacheMode::Global => 0,
            CacheMode::Ring => cache.len().saturating_sub(c.capacity),
        };
        if cache.first() != want_first {
            invalid!(
                "{op}: the cache retains positions {}..{} but a {:?} sequence of length {} must \
                 retain {want_first}..{}",
                cache.first(),
                cache.len(),
                c.mode,
                cache.len(),
                cache.len()
            );
        }
        let Ok(len) = u32::try_from(cache.len()) else {
            invalid!("{op}: len ({}) must fit in u32", cache.len());
        };
        let s = self.codec.stream().clone();
        let up = "batch cache: upload";
        for side in [Side::Keys, Side::Values] {
            let (pb, nb) = match side {
                Side::Keys => (&mut self.k_packed, &mut self.k_norms),
                Side::Values => (&mut self.v_packed, &mut self.v_norms),
            };
            upload_seq_part(&s, cache.packed(side), pb, seq, up)?;
            upload_seq_part(&s, bytemuck::cast_slice(cache.norms(side)), nb, seq, up)?;
        }
        if let Some(e) = self.extras.as_mut() {
            let Ok(frontier) = u32::try_from(cache.frontier()) else {
                invalid!("{op}: frontier ({}) must fit in u32", cache.frontier());
            };
            for side in [Side::Keys, Side::Values] {
                let (sinks, window) = match side {
                    Side::Keys => (&mut e.k_sinks, &mut e.k_window),
                    Side::Values => (&mut e.v_sinks, &mut e.v_window),
                };
                upload_seq_part(
                    &s,
                    bytemuck::cast_slice(cache.exact_sinks(side)),
                    sinks,
                    seq,
                    up,
                )?;
                upload_seq_part(
                    &s,
                    bytemuck::cast_slice(cache.exact_window(side)),
                    window,
                    seq,
                    up,
                )?;
            }
            // The cache's μ, else (an empty cache) the batch's given one.
            let mu = cache.key_mean().or(self.options.key_mean.as_deref());
            if let (Some(buf), Some(mu)) = (e.key_mean.as_mut(), mu) {
                upload_seq_part(&s, bytemuck::cast_slice(mu), buf, seq, up)?;
            }
            e.mean_set[seq] = mu.is_some();
            e.frontier[seq] = frontier;
        }
        self.lens[seq] = len;
        self.modes[seq] = c.mode;
        self.sync_meta()
    }

    /// Copies one sequence's device planes into sequence `seq` and sets its length and mode:
    /// planes of a one-sequence cache of this layout (e.g. a prompt written by
    /// [`CudaCodec::quantize`]), `len` tokens appended, the last `min(len, capacity)` retained.
    pub fn copy_sequence(
        &mut self,
        seq: usize,
        planes: SeqPlanes<'_>,
        len: usize,
        mode: CacheMode,
    ) -> Result<()> {
        let op = "batch cache copy_sequence";
        self.check_seq(op, seq)?;
        if self.extras.is_some() {
            invalid!(
                "{op}: the batch keeps exact tokens or centered keys; copy a whole cache with \
                 upload instead"
            );
        }
        let l = *self.layout();
        if mode == CacheMode::Global && len > l.capacity {
            invalid!(
                "{op}: len ({len}) > capacity ({}) of a global sequence",
                l.capacity
            );
        }
        let Ok(len32) = u32::try_from(len) else {
            invalid!("{op}: len ({len}) must fit in u32");
        };
        let parts = [
            (
                "k_packed",
                planes.k_packed,
                BufferDType::U8,
                l.packed_len(Side::Keys),
            ),
            (
                "v_packed",
                planes.v_packed,
                BufferDType::U8,
                l.packed_len(Side::Values),
            ),
            (
                "k_norms",
                planes.k_norms,
                BufferDType::Float(DType::F32),
                l.norms_len(),
            ),
            (
                "v_norms",
                planes.v_norms,
                BufferDType::Float(DType::F32),
                l.norms_len(),
            ),
        ];
        for (name, buf, dtype, len) in parts {
            if buf.dtype() != dtype || buf.len() != len {
                invalid!(
                    "{op}: {name} holds {} elements of {:?}, need {len} of {dtype:?}",
                    buf.len(),
                    buf.dtype()
                );
            }
        }
        let s = self.codec.stream().clone();
        let copy = |e| driver_err("batch cache: copy_sequence", e);
        for (src, dst) in [
            (planes.k_packed, &mut self.k_packed),
            (planes.v_packed, &mut self.v_packed),
            (planes.k_norms, &mut self.k_norms),
            (planes.v_norms, &mut self.v_norms),
        ] {
            let n = src.num_bytes();
            let view = src.slice().slice(0..n);
            s.memcpy_dtod(
                &view,
                &mut dst.slice_mut().slice_mut(seq * n..(seq + 1) * n),
            )
            .map_err(copy)?;
        }
        self.lens[seq] = len32;
        self.modes[seq] = mode;
        self.sync_meta()
    }

    /// Sequence `seq`'s packed plane `[num_kv_heads, capacity, row_bytes]` and norms plane
    /// `[num_kv_heads, capacity, norms_per_pos]` of one side (synchronizes the stream).
    pub fn download(&self, seq: usize, side: Side) -> Result<(Vec<u8>, Vec<f32>)> {
        let op = "batch cache download";
        self.check_seq(op, seq)?;
        let l = self.layout();
        let (pb, nb) = match side {
            Side::Keys => (&self.k_packed, &self.k_norms),
            Side::Values => (&self.v_packed, &self.v_norms),
        };
        let (plen, nlen) = (l.packed_len(side), l.norms_len() * 4);
        let s = self.codec.stream();
        let down = "batch cache: download";
        let packed = download_seq_part(s, pb, seq, plen, down)?;
        let norm_bytes = download_seq_part(s, nb, seq, nlen, down)?;
        let norms = norm_bytes
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect();
        Ok((packed, norms))
    }

    /// Appends one token to every sequence: `k` and `v` each `[num_seqs, num_kv_heads,
    /// head_dim]` (f32, f16 or bf16), token s at sequence s's next position. Plain options: one
    /// launch (two when the K and V bit widths or dtypes differ). Otherwise one more launch first
    /// stages the position that leaves the exact segments (as [`KvCache::append`] with one token;
    /// `k` and `v` must then share a dtype).
    /// Bit-identical to the CPU; asynchronous on the codec's stream. A global sequence that is
    /// full, or a centering sequence without μ that would quantize a key, is an error (nothing is
    /// written). A non-finite vector (or one the exact dtype cannot hold) is reported by
    /// [`BatchCache::check_finite`]; its packed slot keeps its bytes, its sequence's length
    /// still advances.
    pub fn append(&mut self, k: &DeviceBuffer, v: &DeviceBuffer) -> Result<()> {
        let op = "batch cache append";
        let l = *self.layout();
        let need = self.num_seqs * l.num_kv_heads * l.head_dim;
        for (name, buf) in [("k", k), ("v", v)] {
            if !matches!(buf.dtype(), BufferDType::Float(_)) {
                invalid!(
                    "{op}: {name} holds {:?}, need f32, f16 or bf16",
                    buf.dtype()
                );
            }
            if buf.len() != need {
                invalid!(
                    "{op}: {name} has {} elements, need {need} (num_seqs={} × num_kv_heads={} × \
                     head_dim={})",
                    buf.len(),
                    self.num_seqs,
                    l.num_kv_heads,
                    l.head_dim
                );
            }
        }
        for (s, (&len, &mode)) in self.lens.iter().zip(&self.modes).enumerate() {
            if mode == CacheMode::Global && len as usize >= l.capacity {
                invalid!(
                    "{op}: sequence {s} is full: len ({len}) = capacity ({}) of a global sequence",
                    l.capacity
                );
            }
            if len == u32::MAX {
                invalid!("{op}: sequence {s}: len ({len}) would overflow u32");
            }
        }
        if self.num_seqs == 0 {
            return Ok(());
        }
        if self.extras.is_some() {
            return self.append_staged(k, v);
        }
        quantize_both(
            &self.codec,
            (k, v),
            self.num_seqs,
            &self.seq_lens,
            &self.ring_flags,
            Some(&mut self.seq_lens_next),
            (&mut self.k_packed, &mut self.k_norms),
            (&mut self.v_packed, &mut self.v_norms),
        )?;
        // The kernel wrote the new lengths beside the old ones: swap them in, no upload.
        std::mem::swap(&mut self.seq_lens, &mut self.seq_lens_next);
        for len in &mut self.lens {
            *len += 1;
        }
        Ok(())
    }

    /// [`BatchCache::append`] of a batch with exact segments or centered keys (shapes checked).
    fn append_staged(&mut self, k: &DeviceBuffer, v: &DeviceBuffer) -> Result<()> {
        let op = "batch cache append";
        let (sinks, window) = (self.sinks as u64, self.window as u64);
        let n = self.num_seqs;
        let num_kv_heads = self.layout().num_kv_heads as u32;
        let exact_bf16 = u32::from(self.options.exact_dtype == DType::Bf16);
        let Some(e) = self.extras.as_mut() else {
            return Ok(());
        };
        if k.dtype() != v.dtype() {
            invalid!(
                "{op}: k holds {:?} and v {:?}; with exact segments or centered keys they must \
                 share a dtype",
                k.dtype(),
                v.dtype()
            );
        }
        if e.key_mean.is_some() {
            for s in 0..n {
                let leaves = leaving_position(self.lens[s], e.frontier[s], sinks, window);
                if !e.mean_set[s] && leaves.is_some() {
                    invalid!(
                        "{op}: sequence {s} has no key mean and would quantize a key: upload a \
                         cache that has one, call set_key_mean, or give CacheOptions::key_mean"
                    );
                }
            }
        }
        let BufferDType::Float(dtype) = k.dtype() else {
            invalid!("{op}: k holds {:?}, need f32, f16 or bf16", k.dtype());
        };
        let st = self.codec.stream().clone();
        let (k_new, _g1) = k.slice().device_ptr(&st);
        let (v_new, _g2) = v.slice().device_ptr(&st);
        let (seq_lens, _g3) = self.seq_lens.device_ptr(&st);
        let (frontiers, _g4) = e.frontiers.device_ptr(&st);
        let (k_sinks, _g5) = e.k_sinks.slice().device_ptr(&st);
        let (v_sinks, _g6) = e.v_sinks.slice().device_ptr(&st);
        let (k_window, _g7) = e.k_window.slice().device_ptr(&st);
        let (v_window, _g8) = e.v_window.slice().device_ptr(&st);
        let mean = e.key_mean.as_ref().map(|m| m.slice().device_ptr(&st));
        let (next_lens, _g9) = self.seq_lens_next.device_ptr_mut(&st);
        let (next_frontiers, _g10) = e.frontiers_next.device_ptr_mut(&st);
        let params = AppendParams {
            k_new,
            v_new,
            seq_lens,
            frontiers,
            key_mean: mean.as_ref().map_or(0, |m| m.0),
            k_sinks,
            v_sinks,
            k_window,
            v_window,
            next_lens,
            next_frontiers,
            num_kv_heads,
            sinks: sinks as u32,
            window: window as u32,
            exact_bf16,
        };
        self.codec.append_kv(
            &params,
            dtype,
            n,
            &self.ring_flags,
            (&mut self.k_packed, &mut self.k_norms),
            (&mut self.v_packed, &mut self.v_norms),
        )?;
        drop((_g1, _g2, _g3, _g4, _g5, _g6, _g7, _g8, _g9, _g10, mean));
        // tq_append_kv wrote the new lengths and frontiers beside the old ones (the same rule as
        // here): swap them in, no upload.
        std::mem::swap(&mut self.seq_lens, &mut self.seq_lens_next);
        std::mem::swap(&mut e.frontiers, &mut e.frontiers_next);
        for (len, frontier) in self.lens.iter_mut().zip(&mut e.frontier) {
            *len += 1;
            *frontier = (*frontier).max((u64::from(*len).saturating_sub(window)) as u32);
        }
        Ok(())
    }

    /// Synchronizes the stream and reports (and clears) the first non-finite vector seen by
    /// [`BatchCache::append`] since the last check ("token" = the sequence).
    pub fn check_finite(&self) -> Result<()> {
        self.codec.check_finite()
    }
}

/// The position a one-token append to a sequence of length `len` and quantized frontier
/// `frontier` moves from the exact segments into the packed planes, if any (the rule of
/// `tq_append_kv` and of [`KvCache::append`]): `a = max(frontier, sinks)` leaves when
/// `len + 1 > a + window`.
fn leaving_position(len: u32, frontier: u32, sinks: u64, window: u64) -> Option<u32> {
    let a = u64::from(frontier).max(sinks);
    (u64::from(len) + 1 > a + window).then_some(a as u32)
}

/// The batch quantize of keys and values at `positions` (one token per sequence): one launch
/// when both sources have the same dtype (equal or different bit widths), else one per side.
#[allow(clippy::too_many_arguments)]
fn quantize_both(
    codec: &CudaCodec,
    (k, v): (&DeviceBuffer, &DeviceBuffer),
    num_seqs: usize,
    positions: &CudaSlice<u32>,
    ring_flags: &CudaSlice<u32>,
    next_lens: Option<&mut CudaSlice<u32>>,
    k_planes: (&mut DeviceBuffer, &mut DeviceBuffer),
    v_planes: (&mut DeviceBuffer, &mut DeviceBuffer),
) -> Result<()> {
    if k.dtype() == v.dtype() {
        return codec.quantize_batch_kv(
            k, v, num_seqs, positions, ring_flags, next_lens, k_planes, v_planes,
        );
    }
    let (kp, kn) = k_planes;
    codec.quantize_batch(
        Side::Keys,
        k,
        num_seqs,
        positions,
        ring_flags,
        next_lens,
        kp,
        kn,
    )?;
    let (vp, vn) = v_planes;
    codec.quantize_batch(
        Side::Values,
        v,
        num_seqs,
        positions,
        ring_flags,
        None,
        vp,
        vn,
    )
}

/// The four device planes of one sequence: packed `[num_kv_heads, capacity, row_bytes]` u8 and
/// norms `[num_kv_heads, capacity, norms_per_pos]` f32 per side.
#[derive(Debug, Clone, Copy)]
pub struct SeqPlanes<'a> {
    pub k_packed: &'a DeviceBuffer,
    pub k_norms: &'a DeviceBuffer,
    pub v_packed: &'a DeviceBuffer,
    pub v_norms: &'a DeviceBuffer,
}

/// Copies `host`, sequence `seq`'s part of a batch buffer (`host.len()` bytes per sequence), into
/// `dev` (nothing for an empty part); `what` names the copy in errors.
fn upload_seq_part(
    s: &Arc<CudaStream>,
    host: &[u8],
    dev: &mut DeviceBuffer,
    seq: usize,
    what: &str,
) -> Result<()> {
    if host.is_empty() {
        return Ok(());
    }
    let b0 = seq * host.len();
    s.memcpy_htod(host, &mut dev.slice_mut().slice_mut(b0..b0 + host.len()))
        .map_err(|e| driver_err(what, e))
}

/// Sequence `seq`'s part of a batch buffer, `n` bytes per sequence (synchronizes the stream).
fn download_seq_part(
    s: &Arc<CudaStream>,
    dev: &DeviceBuffer,
    seq: usize,
    n: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; n];
    if n > 0 {
        s.memcpy_dtoh(&dev.slice().slice(seq * n..(seq + 1) * n), &mut bytes)
            .map_err(|e| driver_err(what, e))?;
    }
    s.synchronize().map_err(|e| driver_err(what, e))?;
    Ok(bytes)
}

/// `v`, or `[0]` when empty (device allocations are never empty).
fn padded(v: &[u32]) -> Vec<u32> {
    if v.is_empty() {
        vec![0]
    } else {
        v.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Src;

    /// The host's rule for the position leaving the exact segments agrees with the CPU cache,
    /// token by token (the CPU cache's frontier moves past exactly that position).
    #[test]
    fn leaving_position_matches_the_cpu_cache_frontier() {
        for (sinks, window) in [(1, 32), (0, 4), (4, 0), (2, 3), (0, 0)] {
            let l = CacheLayout::new(1, 32, 64, 4, 4).expect("layout");
            let options = CacheOptions::default()
                .with_sinks(sinks)
                .with_window(window)
                .with_key_mean(vec![0.0; 32]);
            let mut cache = KvCache::with_options(l, options).expect("cache");
            let tok: Vec<f32> = (0..32).map(|i| (i as f32 * 0.7).sin()).collect();
            for _ in 0..50 {
                let (len, frontier) = (cache.len() as u32, cache.frontier() as u32);
                let leaves = leaving_position(len, frontier, sinks as u64, window as u64);
                cache
                    .append(Src::F32(&tok), Src::F32(&tok))
                    .expect("append");
                let packed_now = cache.frontier().max(sinks) as u32;
                let packed_before = frontier.max(sinks as u32);
                let want = (packed_now > packed_before).then_some(packed_before);
                assert_eq!(leaves, want, "sinks {sinks} window {window} len {len}");
            }
        }
    }
}
