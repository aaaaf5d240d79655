//! `CudaCodec`: the quantize and dequantize ops on the GPU, validated like the CPU ops.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::buffer::{BufferDType, DeviceBuffer};
use super::device::CudaDevice;
use super::driver_err;
use super::params::{AppendParams, DequantizeParams, QuantizeParams};
use super::registry::{Family, KernelKey};
use crate::codebook::Codebook;
use crate::codec::{Codec, Domain};
use crate::dtype::DType;
use crate::error::{invalid, Result, TqError};
use crate::layout::Side;

/// Warps per block of both kernels (`WARPS` in kernels/*.cu).
const WARPS: u32 = 8;
/// Resident blocks per SM assumed when choosing `VPW` (the launch itself asks the occupancy
/// query).
const BLOCKS_PER_SM: u32 = 8;
/// "No non-finite vector seen" in the quantize status word.
const STATUS_CLEAR: u64 = u64::MAX;

/// One side's codebook on the device.
#[derive(Debug)]
struct SideTables {
    centroids: CudaSlice<f32>,
    /// The quantize kernel's index lookup ([`BucketTable::words`]).
    buckets: CudaSlice<u32>,
    bucket_scale: f32,
    bucket_offset: f32,
}

/// Buckets of the quantize kernel's index lookup (`BUCKETS` in kernels/quantize.cu).
fn bucket_count(bits: u32) -> usize {
    4 << bits
}

/// The quantize kernel's exact index lookup for one codebook: bucket
/// `c(u) = min(floor(fma(u, scale, offset)) as u32, n - 1)` (monotone in u; negatives and NaN
/// give 0) holds at most one boundary, so the index (the number of boundaries `< u`) is
/// `words[2c + 1] + (f32::from_bits(words[2c]) < u)`.
#[derive(Debug, Clone, PartialEq)]
struct BucketTable {
    scale: f32,
    offset: f32,
    /// `n` pairs: the bucket's boundary as f32 bits (+inf if none), then the number of
    /// boundaries in lower buckets.
    words: Vec<u32>,
}

impl BucketTable {
    /// The bucket of `u`, computed as the kernel does (one fused multiply-add, then a floor
    /// conversion that saturates to `0..=u32::MAX`).
    fn bucket(&self, u: f32) -> usize {
        let n = self.words.len() / 2;
        ((libm::fmaf(u, self.scale, self.offset).floor() as u32) as usize).min(n - 1)
    }

    /// Buckets `1 ..= n - 2` span the boundaries evenly; 0 and `n - 1` hold none.
    fn new(cb: &Codebook) -> Result<Self> {
        let op = "cuda codec: index lookup table";
        let n = bucket_count(cb.bits);
        let b = &cb.boundaries;
        let (Some(&lo), Some(&hi)) = (b.first(), b.last()) else {
            invalid!("{op}: {}-bit codebook has no boundaries", cb.bits);
        };
        let scale = ((n - 3) as f64 / (hi as f64 - lo as f64)) as f32;
        let offset = (1.5 - lo as f64 * scale as f64) as f32;
        let mut t = Self {
            scale,
            offset,
            words: vec![0; 2 * n],
        };
        let of: Vec<usize> = b.iter().map(|&x| t.bucket(x)).collect();
        if of[0] == 0 || of[of.len() - 1] >= n - 1 || of.windows(2).any(|w| w[0] >= w[1]) {
            invalid!(
                "{op}: {}-bit boundaries do not fall one per bucket in {n} buckets",
                cb.bits
            );
        }
        let mut next = 0;
        for c in 0..n {
            let here = next < b.len() && of[next] == c;
            t.words[2 * c] = if here { b[next] } else { f32::INFINITY }.to_bits();
            t.words[2 * c + 1] = next as u32;
            next += usize::from(here);
        }
        Ok(t)
    }
}

impl SideTables {
    fn new(stream: &Arc<CudaStream>, cb: &Codebook) -> Result<Self> {
        let up = |e| driver_err("cuda codec: upload tables", e);
        let t = BucketTable::new(cb)?;
        Ok(Self {
            centroids: stream.clone_htod(&cb.centroids).map_err(up)?,
            buckets: stream.clone_htod(&t.words).map_err(up)?,
            bucket_scale: t.scale,
            bucket_offset: t.offset,
        })
    }
}

/// A [`Codec`] with its rotation signs and codebooks on one device.
#[derive(Debug)]
pub struct CudaCodec {
    codec: Codec,
    device: Arc<CudaDevice>,
    stream: Arc<CudaStream>,
    signs: CudaSlice<f32>,
    keys: SideTables,
    values: SideTables,
    /// Smallest `token * num_kv_heads + head` of a non-finite input vector, or STATUS_CLEAR.
    status: Mutex<CudaSlice<u64>>,
}

fn dtype_code(d: DType) -> i64 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Bf16 => 2,
    }
}

/// Coordinates per lane (`LANE_ELEMS`): 16 (whole packed bytes at every bit width, few
/// cross-lane butterfly stages), or head_dim / 32 when a vector needs the whole warp.
fn lane_elems(head_dim: usize) -> usize {
    (head_dim / 32).max(16)
}

/// Vectors each lane group loads before processing them (`VPW`): 2 hides memory latency on
/// large launches; 1 keeps small ones (a decode step) spread over more lanes.
fn vectors_per_group(head_dim: usize, n_vectors: u64, sm_count: u32) -> i64 {
    let groups_on_chip = sm_count as u64 * (WARPS * BLOCKS_PER_SM) as u64 * groups(head_dim);
    if head_dim >= 512 || n_vectors <= groups_on_chip {
        1
    } else {
        2
    }
}

/// A prepared launch of a both-sides batch append ([`CudaCodec::kv_launch`]): blocks
/// `[0, grid / 2)` write the keys, the rest the values.
struct KvLaunch {
    key: KernelKey,
    f: CudaFunction,
    pk: QuantizeParams,
    pv: QuantizeParams,
    cfg: LaunchConfig,
}

/// Lane groups (vectors in flight) per warp: `32 / (head_dim / LANE_ELEMS)`.
fn groups(head_dim: usize) -> u64 {
    (32 / (head_dim / lane_elems(head_dim))) as u64
}

fn float_dtype(op: &str, what: &str, buf: &DeviceBuffer) -> Result<DType> {
    match buf.dtype() {
        BufferDType::Float(d) => Ok(d),
        other => invalid!("{op}: {what} buffer holds {other:?}, need f32, f16 or bf16"),
    }
}

fn expect_dtype(op: &str, what: &str, buf: &DeviceBuffer, want: BufferDType) -> Result<()> {
    if buf.dtype() != want {
        invalid!("{op}: {what} buffer holds {:?}, need {want:?}", buf.dtype());
    }
    Ok(())
}

impl CudaCodec {
    /// Uploads the codec's tables to `device`; operations run on the device's stream.
    pub fn new(device: Arc<CudaDevice>, codec: Codec) -> Result<Self> {
        let stream = device.stream().clone();
        let up = |e| driver_err("cuda codec: upload tables", e);
        let signs = stream.clone_htod(codec.rotation().signs()).map_err(up)?;
        let status = stream.clone_htod(&[STATUS_CLEAR]).map_err(up)?;
        Ok(Self {
            keys: SideTables::new(&stream, codec.codebook(Side::Keys))?,
            values: SideTables::new(&stream, codec.codebook(Side::Values))?,
            signs,
            status: Mutex::new(status),
            codec,
            device,
            stream,
        })
    }

    /// The same codec issuing its work on another stream of the same device.
    pub fn with_stream(mut self, stream: Arc<CudaStream>) -> Self {
        self.stream = stream;
        self
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The stream this codec's operations are issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The compiled quantize entry of `family` (`Quantize` or `QuantizeBatch`) for one side,
    /// input dtype and vectors per lane group, with its registry key.
    fn quantize_function(
        &self,
        family: Family,
        side: Side,
        in_dtype: DType,
        vpw: i64,
    ) -> Result<(KernelKey, CudaFunction)> {
        let key = self.quantize_key(family, side, in_dtype, vpw);
        let f = self
            .device
            .registry()
            .function(self.device.context(), &key)?;
        Ok((key, f))
    }

    /// Another entry `name` of the module compiled for `key` (the quantize family holds more
    /// than its registry entry).
    fn module_function(&self, op: &str, key: &KernelKey, name: &str) -> Result<CudaFunction> {
        let module = self.device.registry().module(self.device.context(), key)?;
        module
            .load_function(name)
            .map_err(|e| driver_err(&format!("{op}: loading {name} of {key}"), e))
    }

    /// The non-finite-input status word, locked for a launch or a check by `op`.
    fn status_word(&self, op: &str) -> Result<MutexGuard<'_, CudaSlice<u64>>> {
        self.status
            .lock()
            .map_err(|_| TqError::Cuda(format!("{op}: status lock poisoned")))
    }

    /// The kernel, per-side parameters and launch shape of a batch append of both sides (one
    /// token per sequence): `names[0]` of the quantize module for equal bit widths, `names[1]`
    /// of the mixed one otherwise ([`CudaCodec::batch_kv_key`]); a grid-stride wave per side.
    /// `None` when there is nothing to write.
    fn kv_launch(
        &self,
        op: &str,
        num_seqs: usize,
        in_dtype: DType,
        new_dtype: Option<DType>,
        names: [&str; 2],
    ) -> Result<Option<KvLaunch>> {
        let l = self.codec.layout();
        let n_vectors = num_seqs as u64 * l.num_kv_heads as u64;
        if n_vectors == 0 || l.head_dim == 0 {
            return Ok(None);
        }
        let vpw = vectors_per_group(l.head_dim, n_vectors, self.device.sm_count());
        let key = self.batch_kv_key(in_dtype, vpw, new_dtype);
        let name = names[usize::from(l.k_bits != l.v_bits)];
        let f = self.module_function(op, &key, name)?;
        let pk = self.quantize_params(Side::Keys, n_vectors, 0, 0);
        let pv = self.quantize_params(Side::Values, n_vectors, 0, 0);
        let mut cfg = self.launch_config(op, &f, n_vectors, l.head_dim, vpw)?;
        cfg.grid_dim.0 *= 2;
        Ok(Some(KvLaunch {
            key,
            f,
            pk,
            pv,
            cfg,
        }))
    }

    /// The module of the batch appends of both sides for `in_dtype` sources: the quantize
    /// module (`BITS`) when the sides have equal bit widths, else the mixed one (`K_BITS`,
    /// `V_BITS`; kernels/quantize_mixed.cu); with `new_dtype` (`NEW_DTYPE`) the preset appends'
    /// new tokens (`in_dtype` f32).
    fn batch_kv_key(&self, in_dtype: DType, vpw: i64, new_dtype: Option<DType>) -> KernelKey {
        let l = self.codec.layout();
        let mut key = if l.k_bits == l.v_bits {
            self.quantize_key(Family::QuantizeBatch, Side::Keys, in_dtype, vpw)
        } else {
            KernelKey {
                family: Family::QuantizeBatchMixed,
                defines: vec![
                    ("HEAD_DIM", l.head_dim as i64),
                    ("LANE_ELEMS", lane_elems(l.head_dim) as i64),
                    ("K_BITS", l.k_bits as i64),
                    ("V_BITS", l.v_bits as i64),
                    ("IN_DTYPE", dtype_code(in_dtype)),
                    ("VPW", vpw),
                ],
            }
        };
        if let Some(d) = new_dtype {
            key.defines.push(("NEW_DTYPE", dtype_code(d)));
        }
        key
    }

    /// The registry key of a quantize-family module (its defines).
    fn quantize_key(&self, family: Family, side: Side, in_dtype: DType, vpw: i64) -> KernelKey {
        let l = self.codec.layout();
        KernelKey {
            family,
            defines: vec![
                ("HEAD_DIM", l.head_dim as i64),
                ("LANE_ELEMS", lane_elems(l.head_dim) as i64),
                ("BITS", l.bits(side) as i64),
                ("IN_DTYPE", dtype_code(in_dtype)),
                ("VPW", vpw),
            ],
        }
    }

    /// The quantize kernels' parameters for one side (both entries share the struct).
    fn quantize_params(
        &self,
        side: Side,
        n_vectors: u64,
        skip: u64,
        first_slot: u32,
    ) -> QuantizeParams {
        let l = self.codec.layout();
        let t = self.tables(side);
        QuantizeParams {
            n_vectors,
            skip,
            num_kv_heads: l.num_kv_heads as u32,
            capacity: l.capacity as u32,
            first_slot,
            sqrt_d: self.codec.sqrt_d(),
            inv_sqrt_d: self.codec.rotation().inv_sqrt_d(),
            scale_factor: l.scale_factor_d512,
            bucket_scale: t.bucket_scale,
            bucket_offset: t.bucket_offset,
        }
    }

    fn tables(&self, side: Side) -> &SideTables {
        match side {
            Side::Keys => &self.keys,
            Side::Values => &self.values,
        }
    }

    /// The rotation's signs, f32 `[head_dim]`.
    pub(crate) fn signs(&self) -> &CudaSlice<f32> {
        &self.signs
    }

    /// One side's centroids, f32 `[2^bits]`.
    pub(crate) fn centroids(&self, side: Side) -> &CudaSlice<f32> {
        &self.tables(side).centroids
    }

    /// One token per sequence, `src: [num_seqs, num_kv_heads, head_dim]`, into batch planes
    /// `[num_seqs, num_kv_heads, capacity, ...]` at each sequence's position `seq_lens[j]` (slot
    /// `seq_lens[j] % capacity` where `ring_flags[j] != 0`), and with `next_lens` the lengths after
    /// it (`seq_lens[j] + 1`) into that buffer. One launch; the caller (the batch cache) has
    /// validated every shape and that each global sequence has room. A non-finite vector is
    /// reported by [`CudaCodec::check_finite`] as token `j` (the sequence).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn quantize_batch(
        &self,
        side: Side,
        src: &DeviceBuffer,
        num_seqs: usize,
        seq_lens: &CudaSlice<u32>,
        ring_flags: &CudaSlice<u32>,
        next_lens: Option<&mut CudaSlice<u32>>,
        packed: &mut DeviceBuffer,
        norms: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "cuda batch append";
        let in_dtype = float_dtype(op, "src", src)?;
        let l = self.codec.layout();
        let n_vectors = num_seqs as u64 * l.num_kv_heads as u64;
        if n_vectors == 0 || l.head_dim == 0 {
            return Ok(());
        }
        let vpw = vectors_per_group(l.head_dim, n_vectors, self.device.sm_count());
        let (key, f) = self.quantize_function(Family::QuantizeBatch, side, in_dtype, vpw)?;
        let t = self.tables(side);
        let params = self.quantize_params(side, n_vectors, 0, 0);
        let cfg = self.launch_config(op, &f, n_vectors, l.head_dim, vpw)?;
        let mut status = self.status_word(op)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(src.slice())
            .arg(packed.slice_mut())
            .arg(norms.slice_mut())
            .arg(&mut *status)
            .arg(&self.signs)
            .arg(&t.buckets)
            .arg(seq_lens)
            .arg(ring_flags);
        let null = 0u64;
        match next_lens {
            Some(n) => launch.arg(n),
            None => launch.arg(&null),
        };
        launch.arg(&params);
        // SAFETY: the argument list matches tq_quantize_batch's signature (a null next_lens is
        // skipped); the batch cache checked src's shape, that every written slot lies inside
        // packed and norms, and that next_lens holds num_seqs lengths.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_err(&format!("{op}: launch {key}"), e))?;
        Ok(())
    }

    /// [`CudaCodec::quantize_batch`] of keys and values in one launch: `tq_quantize_batch_kv`, or
    /// for different bit widths `tq_quantize_batch_kv_mixed` (kernels/quantize_mixed.cu). Both
    /// sources must have the same dtype (the caller checks; otherwise it quantizes each side
    /// alone).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn quantize_batch_kv(
        &self,
        k_src: &DeviceBuffer,
        v_src: &DeviceBuffer,
        num_seqs: usize,
        seq_lens: &CudaSlice<u32>,
        ring_flags: &CudaSlice<u32>,
        next_lens: Option<&mut CudaSlice<u32>>,
        (k_packed, k_norms): (&mut DeviceBuffer, &mut DeviceBuffer),
        (v_packed, v_norms): (&mut DeviceBuffer, &mut DeviceBuffer),
    ) -> Result<()> {
        let op = "cuda batch append (keys and values)";
        let in_dtype = float_dtype(op, "k", k_src)?;
        if v_src.dtype() != k_src.dtype() {
            invalid!(
                "{op}: needs equal source dtypes, got {:?}/{:?}",
                k_src.dtype(),
                v_src.dtype()
            );
        }
        let names = ["tq_quantize_batch_kv", "tq_quantize_batch_kv_mixed"];
        let Some(KvLaunch {
            key,
            f,
            pk,
            pv,
            cfg,
        }) = self.kv_launch(op, num_seqs, in_dtype, None, names)?
        else {
            return Ok(());
        };
        let (tk, tv) = (self.tables(Side::Keys), self.tables(Side::Values));
        let mut status = self.status_word(op)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(k_src.slice())
            .arg(v_src.slice())
            .arg(k_packed.slice_mut())
            .arg(k_norms.slice_mut())
            .arg(v_packed.slice_mut())
            .arg(v_norms.slice_mut())
            .arg(&mut *status)
            .arg(&self.signs)
            .arg(&tk.buckets)
            .arg(&tv.buckets)
            .arg(seq_lens)
            .arg(ring_flags);
        let null = 0u64;
        match next_lens {
            Some(n) => launch.arg(n),
            None => launch.arg(&null),
        };
        launch.arg(&pk).arg(&pv);
        // SAFETY: the argument list matches tq_quantize_batch_kv's (and _mixed's) signature (a null
        // next_lens is skipped); the batch cache checked both sources' shapes, that every written
        // slot lies inside the planes, and that next_lens holds num_seqs lengths.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_err(&format!("{op}: launch {key}"), e))?;
        Ok(())
    }

    /// One decode step of a batch with exact segments or centered keys, keys and values in one
    /// launch (`tq_append_kv`, or for different bit widths `tq_append_kv_mixed`): each side writes
    /// its new tokens' exact copies and quantizes the vectors leaving the exact segments into
    /// its planes; the key side writes the lengths and frontiers after the append into
    /// `p.next_lens` / `p.next_frontiers`. `new_dtype` is the dtype of `p.k_new` and `p.v_new`.
    /// The batch cache has validated every pointer's buffer; non-finite inputs go to
    /// [`CudaCodec::check_finite`].
    pub(crate) fn append_kv(
        &self,
        p: &AppendParams,
        new_dtype: DType,
        num_seqs: usize,
        ring_flags: &CudaSlice<u32>,
        (k_packed, k_norms): (&mut DeviceBuffer, &mut DeviceBuffer),
        (v_packed, v_norms): (&mut DeviceBuffer, &mut DeviceBuffer),
    ) -> Result<()> {
        let op = "cuda batch append (exact segments)";
        // The staged vectors are f32 (keys minus μ): the quantize side's input dtype.
        let names = ["tq_append_kv", "tq_append_kv_mixed"];
        let Some(KvLaunch {
            key,
            f,
            pk,
            pv,
            cfg,
        }) = self.kv_launch(op, num_seqs, DType::F32, Some(new_dtype), names)?
        else {
            return Ok(());
        };
        let (tk, tv) = (self.tables(Side::Keys), self.tables(Side::Values));
        let mut status = self.status_word(op)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(p)
            .arg(k_packed.slice_mut())
            .arg(k_norms.slice_mut())
            .arg(v_packed.slice_mut())
            .arg(v_norms.slice_mut())
            .arg(&mut *status)
            .arg(&self.signs)
            .arg(&tk.buckets)
            .arg(&tv.buckets)
            .arg(ring_flags)
            .arg(&pk)
            .arg(&pv);
        // SAFETY: the argument list matches tq_append_kv's (and _mixed's) signature; every
        // pointer in `p` addresses a live buffer of the shape its field states, and the planes,
        // ring flags and every slot written were checked by the batch cache.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_err(&format!("{op}: launch {key}"), e))?;
        Ok(())
    }

    /// A grid-stride launch of `f`: one wave of the blocks that fit on the device at once (the
    /// occupancy query), fewer when the work needs fewer.
    fn launch_config(
        &self,
        op: &str,
        f: &CudaFunction,
        n_vectors: u64,
        head_dim: usize,
        vpw: i64,
    ) -> Result<LaunchConfig> {
        let per_block = WARPS as u64 * groups(head_dim) * vpw as u64;
        let fit = f
            .occupancy_max_active_blocks_per_multiprocessor(WARPS * 32, 0, None)
            .map_err(|e| driver_err(&format!("{op}: occupancy query"), e))?
            .max(1);
        let cap = self.device.sm_count() as u64 * fit as u64;
        Ok(LaunchConfig {
            grid_dim: (n_vectors.div_ceil(per_block).min(cap) as u32, 1, 1),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// GPU [`crate::cpu::quantize()`]: `src: [n_tokens, num_kv_heads, head_dim]` (f32, f16 or
    /// bf16) into the packed plane `[num_kv_heads, capacity, row_bytes]` and the f32 norms plane,
    /// token t at logical position `write_pos + t` (ring and global rules of the CPU). One launch
    /// for any `n_tokens`; asynchronous on [`CudaCodec::stream`]. A non-finite input vector leaves
    /// its slot unwritten and is reported by [`CudaCodec::check_finite`].
    #[allow(clippy::too_many_arguments)]
    pub fn quantize(
        &self,
        side: Side,
        src: &DeviceBuffer,
        n_tokens: usize,
        write_pos: usize,
        packed: &mut DeviceBuffer,
        norms: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "cuda quantize";
        let in_dtype = float_dtype(op, "src", src)?;
        expect_dtype(op, "packed", packed, BufferDType::U8)?;
        expect_dtype(op, "norms", norms, BufferDType::Float(DType::F32))?;
        let Some(plan) = self.codec.plan_quantize(
            op,
            side,
            src.len(),
            n_tokens,
            write_pos,
            packed.len(),
            norms.len(),
        )?
        else {
            return Ok(());
        };
        let l = self.codec.layout();
        let n_vectors = plan.n_write as u64 * l.num_kv_heads as u64;
        let vpw = vectors_per_group(l.head_dim, n_vectors, self.device.sm_count());
        let (key, f) = self.quantize_function(Family::Quantize, side, in_dtype, vpw)?;
        let t = self.tables(side);
        let params = self.quantize_params(
            side,
            n_vectors,
            plan.skip as u64,
            l.slot(plan.first_pos) as u32,
        );
        let cfg = self.launch_config(op, &f, n_vectors, l.head_dim, vpw)?;
        let mut status = self.status_word(op)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(src.slice())
            .arg(packed.slice_mut())
            .arg(norms.slice_mut())
            .arg(&mut *status)
            .arg(&self.signs)
            .arg(&t.buckets)
            .arg(&params);
        // SAFETY: the argument list matches tq_quantize's signature; the validated plan keeps
        // every read inside src and every write inside packed and norms.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_err(&format!("{op}: launch {key}"), e))?;
        Ok(())
    }

    /// Synchronizes [`CudaCodec::stream`] and reports (and clears) the first non-finite input
    /// vector seen by [`CudaCodec::quantize`] since the last check.
    pub fn check_finite(&self) -> Result<()> {
        let mut status = self.status_word("cuda quantize")?;
        let seen = self
            .stream
            .clone_dtoh(&*status)
            .map_err(|e| driver_err("cuda quantize: read status", e))?;
        let first = seen.first().copied().unwrap_or(STATUS_CLEAR);
        if first == STATUS_CLEAR {
            return Ok(());
        }
        self.stream
            .memcpy_htod(&[STATUS_CLEAR], &mut *status)
            .map_err(|e| driver_err("cuda quantize: reset status", e))?;
        let heads = self.codec.layout().num_kv_heads.max(1) as u64;
        invalid!(
            "cuda quantize: input token {}, head {} has a non-finite value (or overflows f32 when \
             squared)",
            first / heads,
            first % heads
        )
    }

    /// GPU [`crate::cpu::dequantize_seq`]: slots `start_pos..start_pos + n_tokens` of one side
    /// into `dst: [num_kv_heads, n_tokens, head_dim]` (f32, f16 or bf16, rounded to nearest-even).
    #[allow(clippy::too_many_arguments)]
    pub fn dequantize_seq(
        &self,
        side: Side,
        packed: &DeviceBuffer,
        norms: &DeviceBuffer,
        start_pos: usize,
        n_tokens: usize,
        domain: Domain,
        dst: &mut DeviceBuffer,
    ) -> Result<()> {
        self.dequantize(
            "cuda dequantize_seq",
            side,
            packed,
            norms,
            start_pos,
            n_tokens,
            domain,
            dst,
        )
    }

    /// GPU [`crate::cpu::dequantize_pos`]: slot `read_pos` into `dst: [num_kv_heads, head_dim]`.
    pub fn dequantize_pos(
        &self,
        side: Side,
        packed: &DeviceBuffer,
        norms: &DeviceBuffer,
        read_pos: usize,
        domain: Domain,
        dst: &mut DeviceBuffer,
    ) -> Result<()> {
        self.dequantize(
            "cuda dequantize_pos",
            side,
            packed,
            norms,
            read_pos,
            1,
            domain,
            dst,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn dequantize(
        &self,
        op: &str,
        side: Side,
        packed: &DeviceBuffer,
        norms: &DeviceBuffer,
        start_pos: usize,
        n_tokens: usize,
        domain: Domain,
        dst: &mut DeviceBuffer,
    ) -> Result<()> {
        expect_dtype(op, "packed", packed, BufferDType::U8)?;
        expect_dtype(op, "norms", norms, BufferDType::Float(DType::F32))?;
        let out_dtype = float_dtype(op, "dst", dst)?;
        if !self.codec.check_dequantize(
            op,
            side,
            start_pos,
            n_tokens,
            packed.len(),
            norms.len(),
            dst.len(),
        )? {
            return Ok(());
        }
        let l = self.codec.layout();
        let n_vectors = l.num_kv_heads as u64 * n_tokens as u64;
        let vpw = vectors_per_group(l.head_dim, n_vectors, self.device.sm_count());
        let key = KernelKey {
            family: Family::Dequantize,
            defines: vec![
                ("HEAD_DIM", l.head_dim as i64),
                ("LANE_ELEMS", lane_elems(l.head_dim) as i64),
                ("BITS", l.bits(side) as i64),
                ("OUT_DTYPE", dtype_code(out_dtype)),
                ("ORIGINAL", (domain == Domain::Original) as i64),
                ("VPW", vpw),
            ],
        };
        let f = self
            .device
            .registry()
            .function(self.device.context(), &key)?;
        let params = DequantizeParams {
            n_vectors,
            num_kv_heads: l.num_kv_heads as u32,
            capacity: l.capacity as u32,
            start_pos: start_pos as u32,
            n_tokens: n_tokens as u32,
            sqrt_d: self.codec.sqrt_d(),
            inv_sqrt_d: self.codec.rotation().inv_sqrt_d(),
            scale_factor: l.scale_factor_d512,
            pad: 0,
        };
        let cfg = self.launch_config(op, &f, n_vectors, l.head_dim, vpw)?;
        let t = self.tables(side);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(packed.slice())
            .arg(norms.slice())
            .arg(dst.slice_mut())
            .arg(&self.signs)
            .arg(&t.centroids)
            .arg(&params);
        // SAFETY: the argument list matches tq_dequantize's signature; check_dequantize keeps
        // every read inside packed and norms and every write inside dst.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_err(&format!("{op}: launch {key}"), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_layout_covers_every_head_dim_with_whole_warps() {
        for d in [32, 64, 128, 256, 512, 1024] {
            let e = lane_elems(d);
            let lanes_per_vector = d / e;
            assert!(e >= 16 && e * lanes_per_vector == d, "d {d}: E {e}");
            assert!(
                lanes_per_vector.is_power_of_two() && lanes_per_vector <= 32,
                "d {d}"
            );
            assert_eq!(groups(d) * lanes_per_vector as u64, 32, "d {d}");
            // One vector per warp from 512 on: the kernel's any-sync over the warp relies on it.
            assert!(d < 512 || groups(d) == 1, "d {d}");
        }
    }

    /// The kernel's index of `u` (`pack_index` in kernels/quantize.cu).
    fn lookup(t: &BucketTable, u: f32) -> u32 {
        let c = t.bucket(u);
        t.words[2 * c + 1] + u32::from(f32::from_bits(t.words[2 * c]) < u)
    }

    #[test]
    fn bucket_lookup_counts_the_boundaries_below_u_at_every_bit_width() {
        let mut rng = 0x5eed_u64;
        for bits in [2, 3, 4, 5, 6, 8] {
            let cb = Codebook::new(bits).unwrap();
            let t = BucketTable::new(&cb).unwrap();
            assert_eq!(t.words.len(), 2 * bucket_count(bits), "bits {bits}");
            let mut probes: Vec<f32> = vec![
                f32::NAN,
                -f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                f32::MIN,
                f32::MIN_POSITIVE,
                -f32::MIN_POSITIVE,
                1e-45,
                -1e-45,
                0.0,
                -0.0,
            ];
            for &b in &cb.boundaries {
                probes.extend([b, b.next_up(), b.next_down(), -b]);
            }
            // Every bucket edge: the floats where floor(fma(u, scale, offset)) steps.
            for c in 0..=bucket_count(bits) {
                let u = ((c as f64 - t.offset as f64) / t.scale as f64) as f32;
                probes.extend([u, u.next_up(), u.next_down()]);
            }
            probes.extend((0..4000).map(|i| (i as f32 - 2000.0) * 0.003));
            for _ in 0..20000 {
                let r = crate::rotation::splitmix64(&mut rng);
                probes.push(f32::from_bits(r as u32 & 0xc0ff_ffff));
            }
            for u in probes {
                assert_eq!(
                    lookup(&t, u),
                    u32::from(cb.index_of(u)),
                    "bits {bits} u {u:e}"
                );
            }
        }
    }
}
