//! `CudaCodec`: the quantize and dequantize ops on the GPU, validated like the CPU ops.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::buffer::{BufferDType, DeviceBuffer};
use super::device::CudaDevice;
use super::driver_err;
use super::params::{DequantizeParams, QuantizeParams};
use super::registry::{Family, KernelKey};
use crate::codebook::Codebook;
use crate::codec::{Codec, Domain};
use crate::dtype::DType;
use crate::error::{invalid, Result, TqError};
use crate::layout::Side;

/// Warps per block of both kernels (`WARPS` in kernels/*.cu).
const WARPS: u32 = 8;
/// Resident blocks per SM the grid-stride launch aims for.
const BLOCKS_PER_SM: u32 = 8;
/// Cells of the index-guess table (`GUESS_CELLS` in kernels/quantize.cu).
const GUESS_CELLS: usize = 1024;
/// "No non-finite vector seen" in the quantize status word.
const STATUS_CLEAR: u64 = u64::MAX;

/// One side's codebook on the device.
#[derive(Debug)]
struct SideTables {
    centroids: CudaSlice<f32>,
    boundaries: CudaSlice<f32>,
    /// `[GUESS_CELLS]` u8: boundaries below each cell's centre (a starting guess only).
    guess: CudaSlice<u8>,
    table_lo: f32,
    table_inv_width: f32,
}

impl SideTables {
    fn new(stream: &Arc<CudaStream>, cb: &Codebook) -> Result<Self> {
        let b = &cb.boundaries;
        let lo = b[0] as f64;
        let width = (b[b.len() - 1] as f64 - lo).max(f64::MIN_POSITIVE) / GUESS_CELLS as f64;
        let guess: Vec<u8> = (0..GUESS_CELLS)
            .map(|c| {
                let centre = lo + (c as f64 + 0.5) * width;
                b.iter().filter(|&&t| (t as f64) < centre).count() as u8
            })
            .collect();
        let up = |e| driver_err("cuda codec: upload tables", e);
        Ok(Self {
            centroids: stream.clone_htod(&cb.centroids).map_err(up)?,
            boundaries: stream.clone_htod(b).map_err(up)?,
            guess: stream.clone_htod(&guess).map_err(up)?,
            table_lo: lo as f32,
            table_inv_width: (1.0 / width) as f32,
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

/// Vectors each warp loads before processing them (more bytes in flight for small vectors).
fn vectors_per_warp(head_dim: usize) -> i64 {
    (512 / head_dim).clamp(1, 4) as i64
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

    fn tables(&self, side: Side) -> &SideTables {
        match side {
            Side::Keys => &self.keys,
            Side::Values => &self.values,
        }
    }

    fn launch_config(&self, n_vectors: u64, vpw: i64) -> LaunchConfig {
        let per_block = WARPS as u64 * vpw as u64;
        let cap = (self.device.sm_count() * BLOCKS_PER_SM) as u64;
        LaunchConfig {
            grid_dim: (n_vectors.div_ceil(per_block).min(cap) as u32, 1, 1),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// GPU [`crate::cpu::quantize`]: `src: [n_tokens, num_kv_heads, head_dim]` (f32, f16 or
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
        let vpw = vectors_per_warp(l.head_dim);
        let key = KernelKey {
            family: Family::Quantize,
            defines: vec![
                ("HEAD_DIM", l.head_dim as i64),
                ("BITS", l.bits(side) as i64),
                ("IN_DTYPE", dtype_code(in_dtype)),
                ("VPW", vpw),
            ],
        };
        let f = self
            .device
            .registry()
            .function(self.device.context(), &key)?;
        let t = self.tables(side);
        let n_vectors = plan.n_write as u64 * l.num_kv_heads as u64;
        let params = QuantizeParams {
            n_vectors,
            skip: plan.skip as u64,
            num_kv_heads: l.num_kv_heads as u32,
            capacity: l.capacity as u32,
            first_slot: l.slot(plan.first_pos) as u32,
            sqrt_d: self.codec.sqrt_d(),
            inv_sqrt_d: self.codec.rotation().inv_sqrt_d(),
            scale_factor: l.scale_factor_d512,
            table_lo: t.table_lo,
            table_inv_width: t.table_inv_width,
        };
        let cfg = self.launch_config(n_vectors, vpw);
        let mut status = self
            .status
            .lock()
            .map_err(|_| TqError::Cuda(format!("{op}: status lock poisoned")))?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(src.slice())
            .arg(packed.slice_mut())
            .arg(norms.slice_mut())
            .arg(&mut *status)
            .arg(&self.signs)
            .arg(&t.boundaries)
            .arg(&t.guess)
            .arg(&params);
        // SAFETY: the argument list matches tq_quantize's signature; the validated plan keeps
        // every read inside src and every write inside packed and norms.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_err(&format!("{op}: launch {key}"), e))?;
        Ok(())
    }

    /// Synchronizes [`CudaCodec::stream`] and reports (and clears) the first non-finite input
    /// vector seen by [`CudaCodec::quantize`] since the last check.
    pub fn check_finite(&self) -> Result<()> {
        let mut status = self
            .status
            .lock()
            .map_err(|_| TqError::Cuda("cuda quantize: status lock poisoned".into()))?;
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
        let vpw = vectors_per_warp(l.head_dim);
        let key = KernelKey {
            family: Family::Dequantize,
            defines: vec![
                ("HEAD_DIM", l.head_dim as i64),
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
        let n_vectors = l.num_kv_heads as u64 * n_tokens as u64;
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
        let cfg = self.launch_config(n_vectors, vpw);
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
