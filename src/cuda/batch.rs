//! `BatchCache`: the compressed K/V caches of many sequences (one layer) in device memory, the
//! input of the fused decode attention ([`BatchCache::attention`], src/cuda/decode.rs).
//!
//! Planes: packed `[num_seqs, num_kv_heads, capacity, row_bytes]` u8 and norms
//! `[num_seqs, num_kv_heads, capacity, norms_per_pos]` f32 per side: sequence s's slice is
//! exactly the planes of a one-sequence [`KvCache`] of the same layout. Per sequence the device
//! holds its logical length (u32 `seq_lens`) and its mode (u32 `ring_flags`, nonzero = ring);
//! the host keeps a mirror of both. A global sequence stores position p in slot p, a ring one in
//! slot `p % capacity` and attends to its last `capacity` positions.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::buffer::{BufferDType, DeviceBuffer};
use super::codec::CudaCodec;
use super::decode::DecodeState;
use super::device::CudaDevice;
use super::driver_err;
use crate::cache::KvCache;
use crate::codec::Codec;
use crate::dtype::DType;
use crate::error::{invalid, Result};
use crate::layout::{CacheLayout, CacheMode, Side};

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
    /// u32 `[num_seqs]`: 1 = ring, 0 = global.
    pub(super) ring_flags: CudaSlice<u32>,
    /// Host mirror of `seq_lens`.
    pub(super) lens: Vec<u32>,
    /// Host mirror of `ring_flags`.
    pub(super) modes: Vec<CacheMode>,
    /// Decode-attention kernels and workspace.
    pub(super) decode: DecodeState,
}

fn ring_flag(mode: CacheMode) -> u32 {
    u32::from(mode == CacheMode::Ring)
}

impl BatchCache {
    /// `num_seqs` empty sequences, each in `layout.mode`, with every plane allocated (zeroed) for
    /// `layout.capacity` tokens. `num_kv_heads`, `head_dim` and `capacity` must be > 0.
    pub fn new(device: Arc<CudaDevice>, layout: CacheLayout, num_seqs: usize) -> Result<Self> {
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
        let ring_flags = s.clone_htod(&padded(&flags)).map_err(up)?;
        Ok(Self {
            codec,
            num_seqs,
            k_packed,
            k_norms,
            v_packed,
            v_norms,
            seq_lens,
            ring_flags,
            lens,
            modes,
            decode: DecodeState::default(),
        })
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

    /// Bytes of the four planes on the device.
    pub fn memory_bytes(&self) -> usize {
        self.k_packed.num_bytes()
            + self.v_packed.num_bytes()
            + self.k_norms.num_bytes()
            + self.v_norms.num_bytes()
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

    /// Uploads the host mirrors of the lengths and modes (stream-ordered after earlier work).
    fn sync_meta(&mut self) -> Result<()> {
        let s = self.codec.stream().clone();
        let flags: Vec<u32> = self.modes.iter().map(|&m| ring_flag(m)).collect();
        let up = |e| driver_err("batch cache: upload lengths", e);
        s.memcpy_htod(&padded(&self.lens), &mut self.seq_lens)
            .map_err(up)?;
        s.memcpy_htod(&padded(&flags), &mut self.ring_flags)
            .map_err(up)
    }

    /// Empties sequence `seq` and sets its mode (its slots keep their bytes until rewritten).
    pub fn reset(&mut self, seq: usize, mode: CacheMode) -> Result<()> {
        self.check_seq("batch cache reset", seq)?;
        self.lens[seq] = 0;
        self.modes[seq] = mode;
        self.sync_meta()
    }

    /// Copies a CPU cache into sequence `seq`: its planes, length and mode. The cache must have
    /// this batch's layout (mode aside) and retain exactly what the kernels assume: every
    /// position of a global cache, the last `min(len, capacity)` positions of a ring (no
    /// truncation below a wrapped ring's window), and be plain TurboQuant (no key centering, no
    /// exact sinks or window: the GPU decode does not read those yet).
    pub fn upload(&mut self, seq: usize, cache: &KvCache) -> Result<()> {
        let op = "batch cache upload";
        self.check_seq(op, seq)?;
        let (l, c) = (*self.layout(), *cache.layout());
        let same = CacheLayout { mode: l.mode, ..c } == l;
        if !same {
            invalid!("{op}: cache layout {c:?} differs from the batch layout {l:?} (mode aside)");
        }
        let o = cache.options();
        if o.center_keys || cache.sinks() > 0 || cache.window() > 0 {
            invalid!(
                "{op}: the GPU decode reads plain TurboQuant caches; this cache has \
                 center_keys={}, sinks={}, window={} (build it with KvCache::new or \
                 CacheOptions::plain())",
                o.center_keys,
                cache.sinks(),
                cache.window()
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
        let up = |e| driver_err("batch cache: upload", e);
        for side in [Side::Keys, Side::Values] {
            let packed = cache.packed(side);
            let norms: &[u8] = bytemuck::cast_slice(cache.norms(side));
            let (pb, nb) = match side {
                Side::Keys => (&mut self.k_packed, &mut self.k_norms),
                Side::Values => (&mut self.v_packed, &mut self.v_norms),
            };
            let p0 = seq * packed.len();
            s.memcpy_htod(packed, &mut pb.slice_mut().slice_mut(p0..p0 + packed.len()))
                .map_err(up)?;
            let n0 = seq * norms.len();
            s.memcpy_htod(norms, &mut nb.slice_mut().slice_mut(n0..n0 + norms.len()))
                .map_err(up)?;
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
        let down = |e| driver_err("batch cache: download", e);
        let mut packed = vec![0u8; plen];
        s.memcpy_dtoh(&pb.slice().slice(seq * plen..(seq + 1) * plen), &mut packed)
            .map_err(down)?;
        let mut norm_bytes = vec![0u8; nlen];
        s.memcpy_dtoh(
            &nb.slice().slice(seq * nlen..(seq + 1) * nlen),
            &mut norm_bytes,
        )
        .map_err(down)?;
        s.synchronize().map_err(down)?;
        let norms = norm_bytes
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect();
        Ok((packed, norms))
    }

    /// Appends one token to every sequence: `k` and `v` each `[num_seqs, num_kv_heads,
    /// head_dim]` (f32, f16 or bf16), token s at sequence s's next position. One launch per side,
    /// bit-identical to the CPU quantize; asynchronous on the codec's stream. A global sequence
    /// that is full is an error (nothing is written). A non-finite vector leaves its slot as it
    /// was and is reported by [`BatchCache::check_finite`]; its sequence's length still advances.
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
        let n = self.num_seqs;
        self.codec.quantize_batch(
            Side::Keys,
            k,
            n,
            &self.seq_lens,
            &self.ring_flags,
            &mut self.k_packed,
            &mut self.k_norms,
        )?;
        self.codec.quantize_batch(
            Side::Values,
            v,
            n,
            &self.seq_lens,
            &self.ring_flags,
            &mut self.v_packed,
            &mut self.v_norms,
        )?;
        for len in &mut self.lens {
            *len += 1;
        }
        self.sync_meta()
    }

    /// Synchronizes the stream and reports (and clears) the first non-finite vector seen by
    /// [`BatchCache::append`] since the last check ("token" = the sequence).
    pub fn check_finite(&self) -> Result<()> {
        self.codec.check_finite()
    }
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

/// `v`, or `[0]` when empty (device allocations are never empty).
fn padded(v: &[u32]) -> Vec<u32> {
    if v.is_empty() {
        vec![0]
    } else {
        v.to_vec()
    }
}
