//! Fused decode attention over a [`BatchCache`] (kernels/decode_attention.cu): one query token
//! per sequence, at its last position, against the packed keys and values, never materialized.
//!
//! One launch on the codec's stream: `tq_decode_split` (grid `(num_splits, num_kv_heads,
//! num_seqs)`, flash-decoding partial states per split); the last block of each (sequence, kv
//! head) to finish merges its splits (log-sum-exp, inverse rotation, output dtype). Variants
//! without the last-block merge launch `tq_decode_merge` (grid `(num_heads, num_seqs)`) for it
//! instead, with bit-identical results. The result matches [`crate::cpu::attention()`] of the
//! same cache within the f16 rounding of the kernel's tensor-core operands (~2e-3 relative L2
//! over an output, see bench/NOTES-decode.md).

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::batch::BatchCache;
use super::buffer::{BufferDType, DeviceBuffer};
use super::driver_err;
use super::params::DecodeParams;
use super::registry::{Family, KernelKey};
use crate::cpu::AttentionConfig;
use crate::dtype::DType;
use crate::error::{invalid, Result, TqError};
use crate::layout::{CacheMode, Side};

/// Tokens per warp tile (`TILE` in the kernel).
const TILE: u32 = 16;
/// Most query heads per kv head the kernel handles (`GQA`: mma rows 0..7).
pub const MAX_GQA: usize = 8;
/// Head dimensions the kernel handles (powers of two).
pub const HEAD_DIM_RANGE: (usize, usize) = (64, 512);
/// Grid y/z limit (num_kv_heads, num_seqs, num_heads of the merge).
const MAX_GRID_YZ: usize = 65535;

/// One compiled instance of the decode kernels and what the host needs to launch it.
#[derive(Debug, Clone)]
struct DecodeKernel {
    split: CudaFunction,
    merge: CudaFunction,
    info: DecodeKernelInfo,
}

/// Launch facts of one decode kernel instance, read from the compiled module and the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeKernelInfo {
    /// Dynamic shared memory of `tq_decode_split` (module global `tq_decode_smem_bytes`).
    pub smem_bytes: u32,
    /// The same with spread exact slots (`tq_decode_smem_bytes_spread`), when it keeps
    /// `blocks_per_sm` blocks resident (else 0: [`ExactPlacement::Spread`] falls back to
    /// [`ExactPlacement::Blocks`]).
    pub smem_bytes_spread: u32,
    /// `sizeof(DecodeParams)` in the kernel (module global `tq_decode_params_bytes`).
    pub params_bytes: u32,
    /// Resident `tq_decode_split` blocks per SM (driver occupancy query).
    pub blocks_per_sm: u32,
    /// Registers per thread of `tq_decode_split`.
    pub registers: u32,
    /// The compile-time variant of this instance.
    pub variant: DecodeVariant,
}

/// Where a launch scores the exact sinks and window of a cache that has them
/// (`DecodeParams::exact`): in the packed splits, or as one more partial slot of each
/// (sequence, kv head) written by extra blocks or by each pair's last packed split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExactPlacement {
    /// Each packed split of a pair also scores an even share of the pair's exact slots (their
    /// rows staged at its start, scored before its tiles) and merges them with its warps'
    /// states: no extra block or partial. The default up to 4096 visible positions, and past that
    /// for one-block-per-SM variants whose wave leaves fewer free slots than pairs.
    Spread,
    /// One more block per (sequence, kv head), dispatched after the packed blocks (grid z-slices
    /// past the sequences): they fill the block slots the packed wave leaves free. The default
    /// past 4096 visible positions (with one block per SM: where each pair's gets a free slot).
    Blocks,
    /// `blocks` extra blocks (at most one per pair), block `e` serving pairs `e`, `e + blocks`,
    /// ... one after another (for tuning and tests; measured on the H100 with `blocks` = the free
    /// slots of the wave: 1.6-1.8x the plain time at batch 8 and 32 / 16384 tokens, a pair takes
    /// ~12 µs on an SM whose packed block keeps it busy).
    Shared { blocks: u32 },
    /// The last packed split of each pair scores them before its packed tiles and streams
    /// `credit` fewer tiles than the pair's other splits (the others take them over). Measured on
    /// the H100 (bench/NOTES-decode.md): better than `Blocks` at batch 8 / 16384 tokens after an
    /// L2 flush by writes, worse after a flush by reads; `fold:48` was the best credit.
    Folded { credit: u32 },
}

impl ExactPlacement {
    /// `spread`, `blocks`, `blocks:N` or `fold:CREDIT` (credit in tiles of 16 positions).
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "blocks" => Ok(Self::Blocks),
            None if s == "spread" => Ok(Self::Spread),
            Some(("blocks", n)) => match n.parse() {
                Ok(blocks) if blocks > 0 => Ok(Self::Shared { blocks }),
                _ => invalid!("exact placement {s:?}: {n:?} is not a block count >= 1"),
            },
            Some(("fold", n)) => n
                .parse()
                .map(|credit| Self::Folded { credit })
                .map_err(|_| {
                    TqError::InvalidArgument(format!(
                        "exact placement {s:?}: credit {n:?} is not a tile count"
                    ))
                }),
            _ => {
                invalid!(
                    "exact placement {s:?}: expected \"spread\", \"blocks\", \"blocks:N\" or \"fold:CREDIT\""
                )
            }
        }
    }
}

/// Compile-time shape of `tq_decode_split` beyond the cache's bits and head_dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeVariant {
    /// Warps per block (`WARPS`).
    pub warps: u32,
    /// Tiles per warp in the shared-memory pipeline (`STAGES`).
    pub stages: u32,
    /// Resident blocks per SM the register allocation must allow (`MIN_BLOCKS`).
    pub min_blocks: u32,
    /// Byte-field codebook tables in 256-byte rows, offsets by one PRMT (`LUT256`).
    pub lut256: bool,
    /// Transposed tensor-core products: tokens / head dims on the 16 mma rows, query heads on
    /// the 8 columns (`TRANS`); else query heads on rows 0..7 and rows 8..15 idle.
    pub trans: bool,
    /// The last split block of each (sequence, kv head) merges the splits (`MERGE_LAST`, one
    /// launch); else a second launch (`tq_decode_merge`) does.
    pub merge_last: bool,
    /// V pipeline stages in row order where the rows are eight 16-byte chunks (one-byte
    /// indices at head_dim 128; `VROWS`): whole-row loads instead of 16-byte pieces.
    pub vrows: bool,
}

impl DecodeVariant {
    /// Parses `WxSxM` followed by up to four 0/1 flags `xLxTxFxR` (L = LUT256, T = TRANS, F =
    /// MERGE_LAST, R = VROWS; default 0).
    pub fn parse(s: &str) -> Result<Self> {
        let f: Vec<Option<u32>> = s.split('x').map(|p| p.trim().parse().ok()).collect();
        match f.as_slice() {
            [Some(w), Some(st), Some(m), rest @ ..]
                if rest.len() <= 4
                    && (1..=16).contains(w)
                    && (2..=8).contains(st)
                    && (1..=16).contains(m)
                    && rest.iter().all(|l| matches!(l, Some(0 | 1))) =>
            {
                Ok(Self {
                    warps: *w,
                    stages: *st,
                    min_blocks: *m,
                    lut256: rest.first() == Some(&Some(1)),
                    trans: rest.get(1) == Some(&Some(1)),
                    merge_last: rest.get(2) == Some(&Some(1)),
                    vrows: rest.get(3) == Some(&Some(1)),
                })
            }
            _ => invalid!(
                "decode attention: variant {s:?} is not \
                 WARPSxSTAGESxMIN_BLOCKS[xLUT256[xTRANS[xMERGE_LAST[xVROWS]]]] (warps 1..=16, \
                 stages 2..=8, min_blocks 1..=16, the flags 0 or 1)"
            ),
        }
    }
}

/// `WxSxMxLxTxFxR`, the form [`DecodeVariant::parse`] reads.
impl std::fmt::Display for DecodeVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{}x{}x{}x{}x{}",
            self.warps,
            self.stages,
            self.min_blocks,
            u8::from(self.lut256),
            u8::from(self.trans),
            u8::from(self.merge_last),
            u8::from(self.vrows)
        )
    }
}

/// Kernel instances (by gqa, dtype and variant; bits and head_dim are the cache's) and the f32
/// workspace of the split states, grown on demand.
#[derive(Debug, Default)]
pub(super) struct DecodeState {
    kernels: Mutex<HashMap<(usize, i64, DecodeVariant), DecodeKernel>>,
    workspace: Mutex<Option<CudaSlice<f32>>>,
    /// u32 `[num_seqs, num_kv_heads]` counters of the last-block merge, zeroed once at
    /// allocation; every launch leaves them zero.
    counters: Mutex<Option<CudaSlice<u32>>>,
    /// A variant chosen by the caller ([`BatchCache::set_decode_variant`]), else the default.
    variant: Option<DecodeVariant>,
    /// A placement chosen by the caller ([`BatchCache::set_exact_placement`]), else spread up to
    /// 4096 visible positions, extra blocks past that (see [`ExactPlacement`]).
    exact_placement: Option<ExactPlacement>,
    /// Evict-first streaming chosen by the caller ([`BatchCache::set_l2_evict_first`]), else by
    /// the launch's size.
    l2_evict_first: Option<bool>,
    /// Packed splits per pair chosen by the caller ([`BatchCache::set_decode_splits`]).
    splits: Option<u32>,
    /// The single split's direct output turned off by the caller
    /// ([`BatchCache::set_direct_output`]).
    no_direct_out: bool,
}

fn dtype_code(d: DType) -> i64 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Bf16 => 2,
    }
}

/// The default variant for `pairs` (sequence, kv head) pairs on `sms` multiprocessors: the best
/// measured on the H100 at head_dim 128 (bench/NOTES-decode.md, v4-v8): transposed products, the
/// last-block merge and row-order V stages (where they apply) everywhere; 8/8 with 4 warps, 2
/// stages, byte-field tables off (MIN_BLOCKS 4); other bits 2 stages with byte-field tables, 8
/// warps and 2 blocks per SM, or, where one 16-warp block per SM still gives every pair at least
/// two splits in one wave (`2 * pairs <= sms`: batch 8 of 8 kv heads), 16 warps and one block
/// (one block's tables, no second block competing for issue, half the partials to merge: 2-5%
/// faster there, 2% slower at batch 32; where the device grants such a block too little shared
/// memory, e.g. 5 and 6 bits at head_dim 128 on the H100, the launch falls back to 8 warps).
/// Head dims above 128 need more registers, so they ask for one block of 4 warps.
fn variant(k_bits: u32, v_bits: u32, head_dim: usize, pairs: u64, sms: u64) -> DecodeVariant {
    let (warps, min_blocks, lut256) = if head_dim > 128 {
        (4, 1, true)
    } else if k_bits == 8 && v_bits == 8 {
        (4, 4, false)
    } else if 2 * pairs <= sms {
        (16, 1, true)
    } else {
        (8, 2, true)
    };
    DecodeVariant {
        warps,
        stages: 2,
        min_blocks,
        lut256,
        trans: true,
        merge_last: true,
        vrows: true,
    }
}

/// Splits per (sequence, kv head): the fewest that fill the resident block slots (`slots`) with
/// at least 85% of the last wave busy, each split keeping at least 2 tiles per warp; else the
/// count with the fullest last wave.
pub fn num_splits(pairs: u64, slots: u64, max_tiles: u64, warps: u32) -> u32 {
    let slots = slots.max(1);
    let s_max = max_tiles.div_ceil(2 * warps as u64).max(1);
    let (mut best, mut best_eff) = (1u64, 0.0f64);
    for s in 1..=s_max {
        let t = pairs * s;
        let eff = t as f64 / (t.div_ceil(slots) * slots) as f64;
        if t as f64 >= 0.9 * slots as f64 && eff >= 0.85 {
            return s as u32;
        }
        if eff > best_eff + 1e-9 {
            (best, best_eff) = (s, eff);
        }
    }
    best as u32
}

/// Longest visible sequence up to which the exact slots are spread over the packed splits by
/// default (H100, tq4 / plain 4/4: at 4096 tokens spread 1.13-1.16, extra blocks 1.25-1.31 at
/// batch 1 and 8; at 16384 and 65536 extra blocks 1.006-1.07, spread 1.02-1.13).
const SPREAD_MAX_POSITIONS: u64 = 4096;

/// Launches that read at most this many L2 sizes of packed cache stream it evict-first (H100,
/// flush by writes: -6% at 142 MB, +4% at 570 MB; flush by reads: no change either way).
const L2_EVICT_FIRST_L2S: u64 = 4;

fn float_dtype(op: &str, what: &str, buf: &DeviceBuffer) -> Result<DType> {
    match buf.dtype() {
        BufferDType::Float(d) => Ok(d),
        other => invalid!("{op}: {what} holds {other:?}, need f32, f16 or bf16"),
    }
}

impl BatchCache {
    /// Chooses the decode kernel variant (`None`: the default rule, the best measured on the
    /// H100); for tuning runs (`tqkv bench decode --variant`). Takes effect at the next launch.
    pub fn set_decode_variant(&mut self, variant: Option<DecodeVariant>) -> Result<()> {
        self.decode.variant = variant;
        self.decode
            .kernels
            .lock()
            .map_err(|_| TqError::Cuda("decode attention: lock poisoned".into()))?
            .clear();
        Ok(())
    }

    /// Chooses where the exact sinks and window are scored (`None`: [`ExactPlacement::Spread`] up
    /// to 4096 visible positions, [`ExactPlacement::Blocks`] past that where the wave leaves them
    /// slots);
    /// for tuning and tests. Takes effect at the next launch.
    pub fn set_exact_placement(&mut self, placement: Option<ExactPlacement>) {
        self.decode.exact_placement = placement;
    }

    /// Forces the L2 policy of the streamed cache (`Some(true)`: evict-first, `Some(false)`:
    /// evict-normal; `None`: evict-first while the launch reads at most 4 L2 sizes, the default);
    /// for tuning. Takes effect at the next launch.
    pub fn set_l2_evict_first(&mut self, evict_first: Option<bool>) {
        self.decode.l2_evict_first = evict_first;
    }

    /// Lets a pair's only packed split write the output itself (`true`, the default, with the
    /// last-block merge and no extra exact slot), or always through a partial and the merge
    /// (`false`); for tuning and tests. Takes effect at the next launch.
    pub fn set_direct_output(&mut self, on: bool) {
        self.decode.no_direct_out = !on;
    }

    /// Forces the packed splits per (sequence, kv head) (`None`: [`num_splits`] of the resident
    /// block slots); for tuning. Takes effect at the next launch.
    pub fn set_decode_splits(&mut self, splits: Option<u32>) -> Result<()> {
        if splits == Some(0) {
            invalid!("decode attention: splits must be at least 1");
        }
        self.decode.splits = splits;
        Ok(())
    }

    /// The decode kernels for `gqa` query heads per kv head and queries/outputs of `dtype`,
    /// compiled and loaded on first use.
    fn decode_kernel(&self, gqa: usize, dtype: DType) -> Result<DecodeKernel> {
        let l = *self.layout();
        let Some(v) = self.decode.variant else {
            let pairs = self.num_seqs as u64 * l.num_kv_heads as u64;
            let sms = self.codec.device().sm_count() as u64;
            let v = variant(l.k_bits, l.v_bits, l.head_dim, pairs, sms);
            let k = self.decode_kernel_for(gqa, dtype, v);
            // The rule's choice for batches too large for one block per SM.
            let many = variant(l.k_bits, l.v_bits, l.head_dim, sms, sms);
            if k.is_ok() || many == v {
                return k;
            }
            // The 16-warp default needs more shared memory than this device grants a block (5 and
            // 6 bits at head_dim 128 on the H100: 265-271 KB): the variant of larger batches
            // instead, remembered under the 16-warp key (no retry per call).
            let k8 = self.decode_kernel_for(gqa, dtype, many)?;
            self.decode
                .kernels
                .lock()
                .map_err(|_| TqError::Cuda("decode attention: lock poisoned".into()))?
                .insert((gqa, dtype_code(dtype), v), k8.clone());
            return Ok(k8);
        };
        self.decode_kernel_for(gqa, dtype, v)
    }

    /// The decode kernel of variant `v` for this cache's bits and head_dim (compiled and cached
    /// on first use).
    fn decode_kernel_for(
        &self,
        gqa: usize,
        dtype: DType,
        v: DecodeVariant,
    ) -> Result<DecodeKernel> {
        let l = *self.layout();
        let mut kernels = self
            .decode
            .kernels
            .lock()
            .map_err(|_| TqError::Cuda("decode attention: lock poisoned".into()))?;
        if let Some(k) = kernels.get(&(gqa, dtype_code(dtype), v)) {
            return Ok(k.clone());
        }
        let key = KernelKey {
            family: Family::Decode,
            defines: vec![
                ("K_BITS", l.k_bits as i64),
                ("V_BITS", l.v_bits as i64),
                ("HEAD_DIM", l.head_dim as i64),
                ("GQA", gqa as i64),
                ("DTYPE", dtype_code(dtype)),
                ("WARPS", v.warps as i64),
                ("STAGES", v.stages as i64),
                ("MIN_BLOCKS", v.min_blocks as i64),
                ("LUT256", v.lut256 as i64),
                ("TRANS", v.trans as i64),
                ("MERGE_LAST", v.merge_last as i64),
                ("VROWS", v.vrows as i64),
            ],
        };
        let dev = self.codec.device();
        let module = dev.registry().module(dev.context(), &key)?;
        let err = |what: &str| {
            let key = key.clone();
            let what = what.to_string();
            move |e| driver_err(&format!("decode attention: {what} of {key}"), e)
        };
        let split = module
            .load_function("tq_decode_split")
            .map_err(err("load tq_decode_split"))?;
        let merge = module
            .load_function("tq_decode_merge")
            .map_err(err("load tq_decode_merge"))?;
        let s = self.codec.stream();
        let read_u32 = |name: &str| -> Result<u32> {
            let global = module.get_global(name, s).map_err(err(name))?;
            let mut b = [0u8; 4];
            s.memcpy_dtoh(&global, &mut b[..]).map_err(err(name))?;
            s.synchronize().map_err(err(name))?;
            Ok(u32::from_le_bytes(b))
        };
        let smem_bytes = read_u32("tq_decode_smem_bytes")?;
        let smem_spread = read_u32("tq_decode_smem_bytes_spread")?;
        let params_bytes = read_u32("tq_decode_params_bytes")?;
        if params_bytes as usize != std::mem::size_of::<DecodeParams>() {
            return Err(TqError::Cuda(format!(
                "decode attention: the kernel's DecodeParams has {params_bytes} bytes, the Rust \
                 mirror {} ({key})",
                std::mem::size_of::<DecodeParams>()
            )));
        }
        // The driver refuses a size above the device's per-block limit (a variant too large for
        // this head_dim): say which variant and how much it needs.
        split
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(|e| {
                TqError::InvalidArgument(format!(
                    "decode attention: variant {v} at head_dim {} needs {smem_bytes} bytes of \
                     shared memory per block and {} refused it ({e}); choose fewer warps or \
                     stages",
                    l.head_dim,
                    dev.name()
                ))
            })?;
        let blocks_per_sm = split
            .occupancy_max_active_blocks_per_multiprocessor(v.warps * 32, smem_bytes as usize, None)
            .map_err(err("occupancy"))?;
        if blocks_per_sm == 0 {
            return Err(TqError::Cuda(format!(
                "decode attention: {key} cannot run ({smem_bytes} bytes of shared memory per \
                 block; 0 resident blocks per SM)"
            )));
        }
        // Spread exact slots need more shared memory: usable where the device grants it without
        // costing a resident block.
        let smem_bytes_spread = if split
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_spread as i32,
            )
            .is_ok()
            && split
                .occupancy_max_active_blocks_per_multiprocessor(
                    v.warps * 32,
                    smem_spread as usize,
                    None,
                )
                .is_ok_and(|b| b == blocks_per_sm)
        {
            smem_spread
        } else {
            split
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes as i32,
                )
                .map_err(err("shared memory size"))?;
            0
        };
        let registers = split.num_regs().map_err(err("registers"))?.max(0) as u32;
        let k = DecodeKernel {
            split,
            merge,
            info: DecodeKernelInfo {
                smem_bytes,
                smem_bytes_spread,
                params_bytes,
                blocks_per_sm,
                registers,
                variant: v,
            },
        };
        kernels.insert((gqa, dtype_code(dtype), v), k.clone());
        Ok(k)
    }

    /// Launch facts of the decode kernel for `num_heads` query heads and queries of `dtype`
    /// (compiles it on first use).
    pub fn decode_kernel_info(&self, num_heads: usize, dtype: DType) -> Result<DecodeKernelInfo> {
        let gqa = self.check_heads("decode attention", num_heads)?;
        Ok(self.decode_kernel(gqa, dtype)?.info)
    }

    /// Checks `num_heads` and the layout against the kernel's limits; returns the GQA group.
    fn check_heads(&self, op: &str, num_heads: usize) -> Result<usize> {
        let l = self.layout();
        let kv = l.num_kv_heads;
        if num_heads == 0 || !num_heads.is_multiple_of(kv) {
            invalid!(
                "{op}: num_heads ({num_heads}) is not a positive multiple of num_kv_heads ({kv})"
            );
        }
        let gqa = num_heads / kv;
        if gqa > MAX_GQA {
            invalid!(
                "{op}: num_heads ({num_heads}) / num_kv_heads ({kv}) = {gqa} query heads per kv \
                 head; the kernel handles at most {MAX_GQA}"
            );
        }
        let (lo, hi) = HEAD_DIM_RANGE;
        if l.head_dim < lo || l.head_dim > hi {
            invalid!("{op}: head_dim ({}) must be in {lo}..={hi}", l.head_dim);
        }
        if num_heads > MAX_GRID_YZ || self.num_seqs > MAX_GRID_YZ {
            invalid!(
                "{op}: num_heads ({num_heads}) and num_seqs ({}) must be at most {MAX_GRID_YZ}",
                self.num_seqs
            );
        }
        Ok(gqa)
    }

    /// Splits the next [`BatchCache::attention`] call would use for `num_heads` query heads and
    /// `dtype` queries with `cfg`'s window.
    pub fn decode_splits(
        &self,
        num_heads: usize,
        dtype: DType,
        cfg: &AttentionConfig,
    ) -> Result<u32> {
        let gqa = self.check_heads("decode attention", num_heads)?;
        let k = self.decode_kernel(gqa, dtype)?;
        Ok(self.splits_for(&k.info, self.visible_extent(cfg).0))
    }

    /// Packed splits per pair for sequences of at most `longest` visible positions.
    fn splits_for(&self, info: &DecodeKernelInfo, longest: u64) -> u32 {
        if let Some(s) = self.decode.splits {
            return s;
        }
        let l = self.layout();
        let pairs = self.num_seqs as u64 * l.num_kv_heads as u64;
        let tiles = longest.div_ceil(TILE as u64).max(1);
        let slots = self.codec.device().sm_count() as u64 * info.blocks_per_sm as u64;
        num_splits(pairs, slots, tiles, info.variant.warps)
    }

    /// The longest and the total of the sequences' visible positions (the last `capacity` of a
    /// ring, the last `cfg.window`), in one pass.
    fn visible_extent(&self, cfg: &AttentionConfig) -> (u64, u64) {
        let (cap, window) = (self.layout().capacity as u64, cfg.window as u64);
        self.lens
            .iter()
            .zip(&self.modes)
            .fold((0, 0), |(longest, total), (&len, &mode)| {
                let mut n = len as u64;
                if mode == CacheMode::Ring {
                    n = n.min(cap);
                }
                if window > 0 {
                    n = n.min(window);
                }
                (longest.max(n), total + n)
            })
    }

    /// Decode attention of one query per sequence: `q: [num_seqs, num_heads, head_dim]` (f32, f16
    /// or bf16) attends to every retained position of its sequence (the last `capacity` of a
    /// ring, the last `cfg.window` with a window) into `out` of the same shape and dtype, in the
    /// original domain. A sequence of length 0 gives zeros. The semantics of
    /// [`crate::cpu::attention()`] with one query at position `len - 1`. Asynchronous on the
    /// codec's stream.
    pub fn attention(
        &self,
        q: &DeviceBuffer,
        num_heads: usize,
        cfg: &AttentionConfig,
        out: &mut DeviceBuffer,
    ) -> Result<()> {
        let op = "decode attention";
        let dtype = float_dtype(op, "q", q)?;
        let out_dtype = float_dtype(op, "out", out)?;
        if out_dtype != dtype {
            invalid!("{op}: out holds {out_dtype:?} but q holds {dtype:?}; they must match");
        }
        let gqa = self.check_heads(op, num_heads)?;
        let l = *self.layout();
        let need = self.num_seqs * num_heads * l.head_dim;
        for (name, len) in [("q", q.len()), ("out", out.len())] {
            if len != need {
                invalid!(
                    "{op}: {name} has {len} elements, need {need} (num_seqs={} × num_heads=\
                     {num_heads} × head_dim={})",
                    self.num_seqs,
                    l.head_dim
                );
            }
        }
        cfg.check(op)?;
        if self.num_seqs == 0 {
            return Ok(());
        }
        let k = self.decode_kernel(gqa, dtype)?;
        // The exact sinks and window: scored in the packed splits (exact = 3), or one more
        // partial slot per (sequence, kv head) written by extra blocks (1: grid z-slices past the
        // sequences, `packed` blocks per (z, kv head)) or by each pair's last packed split (2).
        let (longest, visible) = self.visible_extent(cfg);
        let packed = self.splits_for(&k.info, longest);
        let n_pairs = self.num_seqs * l.num_kv_heads;
        let (exact, exact_credit, exact_blocks) = if self.sinks + self.window == 0 {
            (0, 0, 0)
        } else {
            // Spread where the packed wave is short (an exact block would outlast it), else
            // extra blocks (H100: bench/NOTES-decode.md).
            // With one block per SM, extra blocks only where the wave leaves them free slots.
            let slots = self.codec.device().sm_count() as usize * k.info.blocks_per_sm as usize;
            let free = slots.saturating_sub(packed as usize * n_pairs);
            let auto = if longest <= SPREAD_MAX_POSITIONS
                || (k.info.blocks_per_sm == 1 && n_pairs > free)
            {
                ExactPlacement::Spread
            } else {
                ExactPlacement::Blocks
            };
            match self.decode.exact_placement.unwrap_or(auto) {
                ExactPlacement::Spread if k.info.smem_bytes_spread > 0 => (3, 0, 0),
                ExactPlacement::Spread | ExactPlacement::Blocks => (1, 0, n_pairs as u32),
                ExactPlacement::Shared { blocks } => (1, 0, blocks.min(n_pairs as u32)),
                ExactPlacement::Folded { credit } => (2, credit, 0),
            }
        };
        let splits = packed + u32::from(exact == 1 || exact == 2);
        // Exact blocks: z-slices of (packed, num_kv_heads) blocks past the sequences.
        let exact_z = (exact_blocks as usize).div_ceil(packed as usize * l.num_kv_heads);
        if self.num_seqs + exact_z > MAX_GRID_YZ {
            invalid!(
                "{op}: num_seqs ({}) + exact-block slices ({exact_z}) must be at most {MAX_GRID_YZ}",
                self.num_seqs
            );
        }
        let n_part = self.num_seqs * l.num_kv_heads * splits as usize * gqa;
        let ws_len = n_part * (l.head_dim + 2);
        let s = self.codec.stream();
        let mut ws = self
            .decode
            .workspace
            .lock()
            .map_err(|_| TqError::Cuda(format!("{op}: lock poisoned")))?;
        if ws.as_ref().is_none_or(|w| w.len() < ws_len) {
            *ws = None;
            *ws = Some(
                s.alloc_zeros::<f32>(ws_len)
                    .map_err(|e| driver_err(&format!("{op}: workspace"), e))?,
            );
        }
        let Some(ws) = ws.as_mut() else {
            return Err(TqError::Cuda(format!("{op}: no workspace")));
        };
        let mut counters = self
            .decode
            .counters
            .lock()
            .map_err(|_| TqError::Cuda(format!("{op}: lock poisoned")))?;
        if counters.is_none() {
            *counters = Some(
                s.alloc_zeros::<u32>(n_pairs)
                    .map_err(|e| driver_err(&format!("{op}: split counters"), e))?,
            );
        }
        let Some(counters) = counters.as_mut() else {
            return Err(TqError::Cuda(format!("{op}: no split counters")));
        };
        let (q_ptr, _g1) = q.slice().device_ptr(s);
        let (out_ptr, _g2) = out.slice().device_ptr(s);
        let (kp, _g3) = self.k_packed.slice().device_ptr(s);
        let (kn, _g4) = self.k_norms.slice().device_ptr(s);
        let (vp, _g5) = self.v_packed.slice().device_ptr(s);
        let (vn, _g6) = self.v_norms.slice().device_ptr(s);
        let (kcb, _g7) = self.codec.centroids(Side::Keys).device_ptr(s);
        let (vcb, _g8) = self.codec.centroids(Side::Values).device_ptr(s);
        let (signs, _g9) = self.codec.signs().device_ptr(s);
        let (lens, _g10) = self.seq_lens.device_ptr(s);
        let (rings, _g11) = self.ring_flags.device_ptr(s);
        let (ws_ptr, _g12) = ws.device_ptr(s);
        let (cnt_ptr, _g13) = counters.device_ptr(s);
        let e = self.extras.as_ref();
        let frontiers = e.map(|e| e.frontiers.device_ptr(s));
        let key_mean = e
            .and_then(|e| e.key_mean.as_ref())
            .map(|b| b.slice().device_ptr(s));
        let k_sinks = e.map(|e| e.k_sinks.slice().device_ptr(s));
        let v_sinks = e.map(|e| e.v_sinks.slice().device_ptr(s));
        let k_window = e.map(|e| e.k_window.slice().device_ptr(s));
        let v_window = e.map(|e| e.v_window.slice().device_ptr(s));
        let addr = |p: &Option<(u64, _)>| p.as_ref().map_or(0, |p| p.0);
        for (name, ptr) in [
            ("q", q_ptr),
            ("out", out_ptr),
            ("k_packed", kp),
            ("v_packed", vp),
        ] {
            if ptr % 16 != 0 {
                invalid!("{op}: {name} at {ptr:#x} is not 16-byte aligned");
            }
        }
        // Evict-first streaming while the launch reads at most L2_EVICT_FIRST_L2S L2 sizes: it
        // keeps the L2's other lines (a flush by writes leaves dirty ones, whose write-back the
        // stream would otherwise pay); past that its cost outweighs this (bench/NOTES-decode.md).
        let stream_bytes = visible * l.bytes_per_token() as u64;
        let l2_evict_first = u32::from(
            self.decode
                .l2_evict_first
                .unwrap_or(stream_bytes <= L2_EVICT_FIRST_L2S * self.codec.device().l2_bytes()),
        );
        // One packed split and no exact slot: nothing to merge, the block writes the output
        // (H100, batch 32: 1-2% faster than its partial, count and merge through the L2).
        let direct_out = u32::from(
            k.info.variant.merge_last
                && packed == 1
                && (exact == 0 || exact == 3)
                && !self.decode.no_direct_out,
        );
        let params = DecodeParams {
            q: q_ptr,
            out: out_ptr,
            k_packed: kp,
            k_norms: kn,
            v_packed: vp,
            v_norms: vn,
            k_codebook: kcb,
            v_codebook: vcb,
            signs,
            seq_lens: lens,
            ring_flags: rings,
            part_o: ws_ptr,
            part_ml: ws_ptr + (n_part * l.head_dim * 4) as u64,
            num_seqs: self.num_seqs as u32,
            num_kv_heads: l.num_kv_heads as u32,
            capacity: l.capacity as u32,
            num_splits: splits,
            ring: 0,
            window: cfg.window,
            scale: cfg.scale,
            softcap: cfg.softcap,
            pv_scale: 1.0,
            inv_sf: 1.0 / l.scale_factor_d512,
            frontiers: addr(&frontiers),
            key_mean: addr(&key_mean),
            k_sinks: addr(&k_sinks),
            v_sinks: addr(&v_sinks),
            k_window: addr(&k_window),
            v_window: addr(&v_window),
            sinks: self.sinks as u32,
            window_len: self.window as u32,
            exact,
            exact_bf16: u32::from(self.options().exact_dtype == DType::Bf16),
            counters: cnt_ptr,
            exact_credit,
            exact_blocks,
            l2_evict_first,
            direct_out,
        };
        let split_cfg = LaunchConfig {
            grid_dim: (
                packed,
                l.num_kv_heads as u32,
                (self.num_seqs + exact_z) as u32,
            ),
            block_dim: (k.info.variant.warps * 32, 1, 1),
            shared_mem_bytes: if exact == 3 {
                k.info.smem_bytes_spread
            } else {
                k.info.smem_bytes
            },
        };
        let merge_cfg = LaunchConfig {
            grid_dim: (num_heads as u32, self.num_seqs as u32, 1),
            block_dim: (l.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: both kernels take one DecodeParams by value (size checked against the module
        // when it was loaded); every pointer addresses a live buffer whose shape was validated
        // above (planes [num_seqs, num_kv_heads, capacity, ...] of this layout, workspace of
        // n_part * (head_dim + 2) f32, num_seqs * num_kv_heads zeroed counters) or allocated
        // with the batch (exact planes, μ, frontiers of this batch's options), all ordered on
        // this stream.
        unsafe {
            s.launch_builder(&k.split)
                .arg(&params)
                .launch(split_cfg)
                .map_err(|e| driver_err(&format!("{op}: launch tq_decode_split"), e))?;
            if !k.info.variant.merge_last {
                s.launch_builder(&k.merge)
                    .arg(&params)
                    .launch(merge_cfg)
                    .map_err(|e| driver_err(&format!("{op}: launch tq_decode_merge"), e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_match_the_prototype_harness_on_132_sms() {
        // bench/NOTES-decode.md, v3 table (8 kv heads, 65536 tokens): 3 blocks per SM (4/4)
        // gives 45 / 6 / 3 splits at batch 1 / 8 / 32; 2 blocks per SM (8/8) 30 / 4 / 1.
        let tiles = 65536 / 16;
        for (blocks, want) in [(3, [45, 6, 3]), (2, [30, 4, 1])] {
            let got = [1, 8, 32].map(|b| num_splits(b * 8, 132 * blocks, tiles, 4));
            assert_eq!(got, want, "{blocks} blocks per SM");
        }
    }

    #[test]
    fn exact_placements_parse_or_name_the_bad_value() {
        for (text, want) in [
            ("spread", ExactPlacement::Spread),
            ("blocks", ExactPlacement::Blocks),
            ("blocks:3", ExactPlacement::Shared { blocks: 3 }),
            ("fold:48", ExactPlacement::Folded { credit: 48 }),
        ] {
            assert_eq!(ExactPlacement::parse(text).ok(), Some(want), "{text}");
        }
        for bad in [
            "", "fold", "fold:-1", "fold:x", "block", "blocks:0", "blocks:x", "pairs",
        ] {
            let e = ExactPlacement::parse(bad).expect_err(bad).to_string();
            assert!(
                e.contains("exact placement") && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
    }

    #[test]
    fn splits_keep_two_tiles_per_warp() {
        assert_eq!(num_splits(8, 396, 1, 4), 1);
        assert!(num_splits(1, 396, 40, 4) as u64 <= 40u64.div_ceil(2 * 4));
    }

    #[test]
    fn variants_are_the_measured_best_at_head_dim_128() {
        let sm = |v: DecodeVariant| (v.warps, v.stages, v.min_blocks, v.lut256, v.trans);
        // batch 32 of 8 kv heads on 132 SMs
        assert_eq!(sm(variant(8, 8, 128, 256, 132)), (4, 2, 4, false, true));
        assert_eq!(sm(variant(4, 4, 128, 256, 132)), (8, 2, 2, true, true));
        assert_eq!(sm(variant(4, 2, 64, 256, 132)), (8, 2, 2, true, true));
        assert_eq!(sm(variant(4, 4, 256, 256, 132)), (4, 2, 1, true, true));
        // batch 8 and 1: one 16-warp block per SM still gives every pair two splits
        assert_eq!(sm(variant(4, 4, 128, 64, 132)), (16, 2, 1, true, true));
        assert_eq!(sm(variant(4, 2, 128, 8, 132)), (16, 2, 1, true, true));
        assert_eq!(sm(variant(4, 4, 128, 67, 132)), (8, 2, 2, true, true));
        assert_eq!(sm(variant(8, 8, 128, 64, 132)), (4, 2, 4, false, true));
        assert_eq!(sm(variant(4, 4, 256, 64, 132)), (4, 2, 1, true, true));
        for (kb, vb, d, pairs) in [
            (8, 8, 128, 256),
            (4, 4, 128, 256),
            (4, 2, 64, 8),
            (4, 4, 256, 8),
        ] {
            let v = variant(kb, vb, d, pairs, 132);
            assert!(v.merge_last && v.vrows, "{kb}/{vb} d={d}");
        }
    }

    #[test]
    fn variants_print_as_they_parse() {
        for s in ["8x2x2x1x1x1x1", "4x2x4x0x1x1x1", "4x3x1x0x0x0x0"] {
            assert_eq!(
                DecodeVariant::parse(s).map(|v| v.to_string()).ok(),
                Some(s.into())
            );
        }
    }

    #[test]
    fn variant_strings_parse_or_name_the_bad_value() {
        let v = DecodeVariant::parse("4x2x3x1").expect("valid");
        assert_eq!(
            (v.warps, v.stages, v.min_blocks, v.lut256, v.trans),
            (4, 2, 3, true, false)
        );
        let v = DecodeVariant::parse("8x4x2x0x1").expect("valid");
        assert_eq!(
            (
                v.warps,
                v.stages,
                v.min_blocks,
                v.lut256,
                v.trans,
                v.merge_last
            ),
            (8, 4, 2, false, true, false)
        );
        let v = DecodeVariant::parse("8x2x2x1x1x1").expect("valid");
        assert_eq!(
            (v.warps, v.lut256, v.trans, v.merge_last),
            (8, true, true, true)
        );
        for bad in [
            "",
            "4x2",
            "4x1x3",
            "4x2x3x2",
            "0x2x3",
            "4x2x3x1x1x1x1x1",
            "4x2x3x1x1x2",
            "axbxc",
        ] {
            let e = DecodeVariant::parse(bad).expect_err(bad).to_string();
            assert!(
                e.contains("variant") && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
    }
}
