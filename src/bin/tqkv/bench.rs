//! `tqkv bench`: throughput of the codec on CUDA (or the CPU without a GPU) and of the fused CUDA
//! decode attention, each beside a device-to-device copy measured in the same process.

use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Subcommand};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;
use tqkv::cpu::AttentionConfig;
use tqkv::cuda::{
    BatchCache, BufferDType, CudaCodec, CudaDevice, CudaStream, DecodeVariant, DeviceBuffer,
    ExactPlacement, SeqPlanes,
};
use tqkv::{
    cpu, CacheLayout, CacheMode, Codec, DType, Domain, Dst, KvCache, Preset, Result, Side, Src,
    TqError,
};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Quantize and sequence-dequantize throughput (GB/s counting bytes read + written) against
    /// a device-to-device copy, and the latency of a one-token append.
    Codec(CodecArgs),
    /// Fused decode attention (one bf16 query per sequence over the compressed cache): µs per
    /// call, GB/s of compressed bytes read, % of a device-to-device copy. Needs a CUDA device.
    Decode(DecodeArgs),
}

#[derive(Args)]
struct DecodeArgs {
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// KV heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Sequences per call, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Tokens cached per sequence, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384,65536")]
    contexts: Vec<usize>,
    /// K/V bit widths as K/V, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8/8,4/4,4/2")]
    bits: Vec<String>,
    /// Presets (centered keys, exact sink and window) timed beside the plain bit widths,
    /// comma-separated; "" for none.
    #[arg(long, value_delimiter = ',', default_value = "tq4", value_parser = parse_preset_arg)]
    presets: Vec<Option<Preset>>,
    /// Timed calls per shape (the median is reported; at least 20).
    #[arg(long, default_value_t = 30)]
    reps: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Kernel variant WARPSxSTAGESxMIN_BLOCKS[xLUT256[xTRANS[xMERGE_LAST[xVROWS]]]] (e.g.
    /// 8x2x2x1x1x1) instead of the default rule, for tuning.
    #[arg(long, value_parser = parse_variant)]
    variant: Option<DecodeVariant>,
    /// How the L2 is emptied before each timed call.
    #[arg(long, value_enum, default_value_t = Flush::Write)]
    flush: Flush,
    /// Where the presets' exact sinks and window are scored: `spread` (a share in each packed
    /// split), `blocks` (an extra block per pair), `blocks:N` (N extra blocks shared by the
    /// pairs) or `fold:CREDIT` (each pair's last packed split, CREDIT tiles fewer), for tuning;
    /// default: spread up to 4096 tokens, blocks past that where the wave leaves them slots.
    #[arg(long, value_parser = parse_exact)]
    exact: Option<ExactPlacement>,
    /// L2 policy of the streamed cache: `auto` (evict-first while a call reads at most 4 L2
    /// sizes, the default), `first` or `normal`, for tuning.
    #[arg(long, value_enum, default_value_t = L2Policy::Auto)]
    l2: L2Policy,
    /// Packed splits per (sequence, kv head) instead of the launch's choice (>= 1), for tuning.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    splits: Option<u32>,
}

/// `tqkv bench decode --l2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum L2Policy {
    Auto,
    First,
    Normal,
}

impl L2Policy {
    fn evict_first(self) -> Option<bool> {
        match self {
            Self::Auto => None,
            Self::First => Some(true),
            Self::Normal => Some(false),
        }
    }
}

/// The L2 flush before each timed decode call (256 MB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Flush {
    /// A write (memset): leaves the L2 full of dirty lines, whose write-back the timed call pays
    /// as it evicts them.
    Write,
    /// A read: leaves clean lines of another buffer in the L2.
    Read,
}

/// Empties the L2 before a timed call (see [`Flush`]); the read kernel is compiled on creation.
enum L2Flush {
    /// `fill_bytes` of the buffer with the repetition's byte.
    Write(DeviceBuffer),
    /// `tq_read_flush` over `buf`.
    Read {
        buf: CudaSlice<u64>,
        sink: CudaSlice<u64>,
        f: CudaFunction,
    },
}

/// Reads `n` u64 (grid-stride) and stores nothing unless their xor is one magic value.
const READ_FLUSH_SRC: &str = r#"
extern "C" __global__ void tq_read_flush(const unsigned long long* p, unsigned long long n,
                                         unsigned long long* sink) {
    unsigned long long acc = 0;
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += step)
        acc ^= p[i];
    if (acc == 0x9e3779b97f4a7c15ull) *sink = acc;
}
"#;

impl L2Flush {
    fn new(stream: &Arc<CudaStream>, mode: Flush) -> Result<Self> {
        if mode == Flush::Write {
            return Ok(Self::Write(DeviceBuffer::zeros(
                stream,
                BufferDType::U8,
                FLUSH_BYTES,
            )?));
        }
        let err = |e: &dyn std::fmt::Display| TqError::Cuda(format!("bench: read flush: {e}"));
        let buf = stream
            .alloc_zeros::<u64>(FLUSH_BYTES / 8)
            .map_err(|e| err(&e))?;
        let sink = stream.alloc_zeros::<u64>(1).map_err(|e| err(&e))?;
        let ptx = cudarc::nvrtc::compile_ptx(READ_FLUSH_SRC).map_err(|e| err(&e))?;
        let m = stream.context().load_module(ptx).map_err(|e| err(&e))?;
        let f = m.load_function("tq_read_flush").map_err(|e| err(&e))?;
        Ok(Self::Read { buf, sink, f })
    }

    fn run(&mut self, stream: &Arc<CudaStream>, rep: usize) -> Result<()> {
        match self {
            Self::Write(b) => b.fill_bytes(stream, rep as u8),
            Self::Read { buf, sink, f } => {
                let n = (FLUSH_BYTES / 8) as u64;
                let cfg = LaunchConfig {
                    grid_dim: (1024, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: tq_read_flush reads n u64 of `buf` (its length) and may write one u64
                // of `sink`.
                unsafe {
                    stream
                        .launch_builder(f)
                        .arg(&*buf)
                        .arg(&n)
                        .arg(&mut *sink)
                        .launch(cfg)
                }
                .map(|_| ())
                .map_err(|e| TqError::Cuda(format!("bench: read flush: {e}")))
            }
        }
    }
}

fn parse_preset_arg(s: &str) -> std::result::Result<Option<Preset>, String> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        crate::kvio::parse_preset(s).map(Some)
    }
}

fn parse_variant(s: &str) -> std::result::Result<DecodeVariant, String> {
    DecodeVariant::parse(s).map_err(|e| e.to_string())
}

fn parse_exact(s: &str) -> std::result::Result<ExactPlacement, String> {
    ExactPlacement::parse(s).map_err(|e| e.to_string())
}

#[derive(Args)]
struct CodecArgs {
    /// Tokens quantized / dequantized per call.
    #[arg(long, default_value_t = 32768)]
    tokens: usize,
    /// KV heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Bit widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4,8,2,3,5,6")]
    bits: Vec<u32>,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 30)]
    reps: usize,
    /// Run on the CPU even when a GPU is present.
    #[arg(long)]
    cpu: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Codec(a) => codec(&a),
        BenchWhat::Decode(a) => decode(&a),
    }
}

/// Appends per timed batch of the decode-step measurement.
const APPENDS: usize = 32;

/// A CUDA event for timing.
fn new_event(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<tqkv::cuda::CudaEvent> {
    ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| TqError::Cuda(format!("bench: event: {e}")))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// f16 Gaussian-ish input (deterministic; never zeros).
fn input(n: usize, seed: u64) -> Vec<f16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            let u = (tqkv::rotation::splitmix64(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
            f16::from_f64((u - 0.5) * 3.4)
        })
        .collect()
}

struct Row {
    bits: u32,
    q_gbs: f64,
    q_copy_gbs: f64,
    dq_gbs: f64,
    dq_copy_gbs: f64,
    dq_rot_gbs: f64,
    append_us: f64,
}

/// Rejects zero sizes and too few repetitions (`op` names the benchmark).
fn check_sizes(op: &str, sizes: &[(&str, usize)], reps: usize, min_reps: usize) -> Result<()> {
    for &(name, v) in sizes {
        if v == 0 {
            return Err(TqError::InvalidArgument(format!(
                "{op}: --{name} must be > 0"
            )));
        }
    }
    if reps < min_reps {
        return Err(TqError::InvalidArgument(format!(
            "{op}: --reps ({reps}) must be at least {min_reps}"
        )));
    }
    Ok(())
}

fn codec(a: &CodecArgs) -> Result<()> {
    check_sizes(
        "bench codec",
        &[
            ("tokens", a.tokens),
            ("heads", a.heads),
            ("head-dim", a.head_dim),
        ],
        a.reps,
        1,
    )?;
    let reps = a.reps;
    if !a.cpu && CudaDevice::is_available() {
        let dev = CudaDevice::new(0)?;
        println!(
            "tqkv bench codec on CUDA: {} (sm_{}{}, {} SMs), {} tokens x {} kv heads x head_dim {}, \
             f16 in/out, median of {reps} (CUDA events around batches of 4 calls queued behind a busy GPU, after warm-up)",
            dev.name(),
            dev.compute_capability().0,
            dev.compute_capability().1,
            dev.sm_count(),
            a.tokens,
            a.heads,
            a.head_dim
        );
        let mut rows = Vec::new();
        for &bits in &a.bits {
            rows.push(cuda_row(&dev, a, bits, reps)?);
        }
        print_rows(&rows, "device-to-device copy", "GPU time, back-to-back");
    } else {
        println!(
            "tqkv bench codec on the CPU ({}): {} tokens x {} kv heads x head_dim {}, f16 in/out, \
             median of {reps}",
            if a.cpu {
                "--cpu"
            } else {
                "no CUDA device found"
            },
            a.tokens,
            a.heads,
            a.head_dim
        );
        let mut rows = Vec::new();
        for &bits in &a.bits {
            rows.push(cpu_row(a, bits, reps)?);
        }
        print_rows(&rows, "host memcpy", "wall time");
    }
    Ok(())
}

fn print_rows(rows: &[Row], baseline: &str, clock: &str) {
    println!("baseline: {baseline} of the op's byte count (bytes read + written), same process");
    println!(
        "| bits | quantize GB/s | copy GB/s | ratio | dequantize_seq GB/s (original) | copy GB/s | \
         ratio | dequantize_seq GB/s (rotated) | 1-token append µs ({clock}) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} |",
            r.bits,
            r.q_gbs,
            r.q_copy_gbs,
            r.q_gbs / r.q_copy_gbs,
            r.dq_gbs,
            r.dq_copy_gbs,
            r.dq_gbs / r.dq_copy_gbs,
            r.dq_rot_gbs,
            r.append_us
        );
    }
}

/// Bytes the ops move: f16 activations, packed rows and norms.
fn op_bytes(l: &CacheLayout, tokens: usize) -> (usize, usize) {
    let act = tokens * l.num_kv_heads * l.head_dim * 2;
    let plane = tokens * l.num_kv_heads * (l.row_bytes(Side::Keys) + 4 * l.norms_per_pos());
    (act, plane)
}

/// Median GPU milliseconds of one call of `f(i)`, after 3 warm-up calls. Each sample times a
/// batch of BATCH calls between two events, enqueued behind one untimed call that keeps the GPU
/// busy meanwhile: host launch overhead stays outside the events' interval.
fn time_gpu(
    stream: &Arc<CudaStream>,
    reps: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    const BATCH: usize = 4;
    let ctx = stream.context();
    let ev = |e| TqError::Cuda(format!("bench: event: {e}"));
    let (start, end) = (new_event(ctx)?, new_event(ctx)?);
    for i in 0..3 {
        f(i)?;
    }
    let mut ms = Vec::with_capacity(reps);
    let mut i = 0;
    for _ in 0..reps {
        f(i)?;
        start.record(stream).map_err(ev)?;
        for _ in 0..BATCH {
            i += 1;
            f(i)?;
        }
        end.record(stream).map_err(ev)?;
        end.synchronize().map_err(ev)?;
        ms.push(start.elapsed_ms(&end).map_err(ev)? as f64 / BATCH as f64);
        i += 1;
    }
    Ok(median(ms))
}

/// Median milliseconds of copying `bytes` device-to-device (two buffer pairs, alternating, so
/// repeated runs do not read from L2); returns GB/s counting read + write.
fn copy_gbs(stream: &Arc<CudaStream>, bytes: usize, reps: usize) -> Result<f64> {
    let al = |e| TqError::Cuda(format!("bench: alloc: {e}"));
    let mut pairs = Vec::new();
    for seed in 0..2u64 {
        let src: Vec<u8> = input(bytes / 2, seed)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let s = stream.clone_htod(&src).map_err(al)?;
        let d = stream.alloc_zeros::<u8>(bytes).map_err(al)?;
        pairs.push((s, d));
    }
    let ms = time_gpu(stream, reps, |i| {
        let (s, d) = &mut pairs[i % 2];
        stream
            .memcpy_dtod(s, d)
            .map_err(|e| TqError::Cuda(format!("bench: copy: {e}")))
    })?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

fn cuda_row(dev: &Arc<CudaDevice>, a: &CodecArgs, bits: u32, reps: usize) -> Result<Row> {
    let l = CacheLayout::new(a.heads, a.head_dim, a.tokens, bits, bits)?;
    let gc = CudaCodec::new(dev.clone(), Codec::new(l)?)?;
    let s = gc.stream().clone();
    let n = a.tokens * a.heads * a.head_dim;
    let (act, plane) = op_bytes(&l, a.tokens);
    let f16_buf = |seed| DeviceBuffer::from_src(&s, Src::F16(&input(n, seed)));
    let srcs = [f16_buf(1)?, f16_buf(2)?];
    let mut planes = Vec::new();
    for _ in 0..2 {
        planes.push((
            DeviceBuffer::zeros(&s, BufferDType::U8, l.packed_len(Side::Keys))?,
            DeviceBuffer::zeros(&s, BufferDType::Float(DType::F32), l.norms_len())?,
        ));
    }
    let q_ms = time_gpu(&s, reps, |i| {
        let (p, nr) = &mut planes[i % 2];
        gc.quantize(Side::Keys, &srcs[i % 2], a.tokens, 0, p, nr)
    })?;
    gc.check_finite()?;
    let mut outs = [
        DeviceBuffer::zeros(&s, BufferDType::Float(DType::F16), n)?,
        DeviceBuffer::zeros(&s, BufferDType::Float(DType::F16), n)?,
    ];
    let dq = |domain, outs: &mut [DeviceBuffer; 2]| {
        time_gpu(&s, reps, |i| {
            let (p, nr) = &planes[i % 2];
            gc.dequantize_seq(Side::Keys, p, nr, 0, a.tokens, domain, &mut outs[i % 2])
        })
    };
    let dq_ms = dq(Domain::Original, &mut outs)?;
    let dq_rot_ms = dq(Domain::Rotated, &mut outs)?;
    let one = DeviceBuffer::from_src(&s, Src::F16(&input(a.heads * a.head_dim, 3)))?;
    // GPU time of back-to-back appends: a queued full dequantize keeps the GPU busy while the
    // host enqueues them, so host launch overhead stays out of the events' interval.
    let ev = |e| TqError::Cuda(format!("bench: event: {e}"));
    let (start, end) = (
        s.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ev)?,
        s.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(ev)?,
    );
    let mut append = Vec::with_capacity(reps);
    for r in 0..reps + 2 {
        for _ in 0..4 {
            let (p, nr) = &planes[1];
            gc.dequantize_seq(
                Side::Keys,
                p,
                nr,
                0,
                a.tokens,
                Domain::Original,
                &mut outs[0],
            )?;
        }
        start.record(&s).map_err(ev)?;
        for i in 0..APPENDS {
            let (p, nr) = &mut planes[0];
            gc.quantize(Side::Keys, &one, 1, (r * APPENDS + i) % a.tokens, p, nr)?;
        }
        end.record(&s).map_err(ev)?;
        end.synchronize().map_err(ev)?;
        if r >= 2 {
            append.push(start.elapsed_ms(&end).map_err(ev)? as f64 / APPENDS as f64);
        }
    }
    let append_ms = median(append);
    let gbs = |ms: f64| (act + plane) as f64 / (ms * 1e-3) / 1e9;
    let copy = copy_gbs(&s, (act + plane) / 2, reps)?;
    Ok(Row {
        bits,
        q_gbs: gbs(q_ms),
        q_copy_gbs: copy,
        dq_gbs: gbs(dq_ms),
        dq_copy_gbs: copy,
        dq_rot_gbs: gbs(dq_rot_ms),
        append_us: append_ms * 1e3,
    })
}

fn time_cpu(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

fn cpu_row(a: &CodecArgs, bits: u32, reps: usize) -> Result<Row> {
    let l = CacheLayout::new(a.heads, a.head_dim, a.tokens, bits, bits)?;
    let codec = Codec::new(l)?;
    let n = a.tokens * a.heads * a.head_dim;
    let (act, plane) = op_bytes(&l, a.tokens);
    let x = input(n, 1);
    let mut packed = vec![0u8; l.packed_len(Side::Keys)];
    let mut norms = vec![0f32; l.norms_len()];
    let q_ms = time_cpu(reps, || {
        cpu::quantize(
            &codec,
            Side::Keys,
            Src::F16(&x),
            a.tokens,
            0,
            &mut packed,
            &mut norms,
        )
    })?;
    let mut out = vec![f16::ZERO; n];
    let mut dq = |domain| {
        time_cpu(reps, || {
            cpu::dequantize_seq(
                &codec,
                Side::Keys,
                &packed,
                &norms,
                0,
                a.tokens,
                domain,
                Dst::F16(&mut out),
            )
        })
    };
    let dq_ms = dq(Domain::Original)?;
    let dq_rot_ms = dq(Domain::Rotated)?;
    let one = input(a.heads * a.head_dim, 3);
    let mut pos = 0;
    let append_ms = time_cpu(reps.max(100), || {
        pos = (pos + 1) % a.tokens;
        cpu::quantize(
            &codec,
            Side::Keys,
            Src::F16(&one),
            1,
            pos,
            &mut packed,
            &mut norms,
        )
    })?;
    let half = (act + plane) / 2;
    let src = vec![7u8; half];
    let mut dst = vec![0u8; half];
    let copy_ms = time_cpu(reps, || {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        Ok(())
    })?;
    let gbs = |ms: f64| (act + plane) as f64 / (ms * 1e-3) / 1e9;
    let copy = gbs(copy_ms);
    Ok(Row {
        bits,
        q_gbs: gbs(q_ms),
        q_copy_gbs: copy,
        dq_gbs: gbs(dq_ms),
        dq_copy_gbs: copy,
        dq_rot_gbs: gbs(dq_rot_ms),
        append_us: append_ms * 1e3,
    })
}

/// Bytes the L2 flush writes before every timed decode call (the H100's L2 is 50 MB).
const FLUSH_BYTES: usize = 256 << 20;

fn parse_bits(s: &str) -> Result<(u32, u32)> {
    let parsed = s
        .split_once('/')
        .and_then(|(k, v)| Some((k.trim().parse().ok()?, v.trim().parse().ok()?)));
    match parsed {
        Some(kv) => Ok(kv),
        None => Err(TqError::InvalidArgument(format!(
            "bench decode: --bits entry {s:?} is not K/V (e.g. 4/4)"
        ))),
    }
}

/// One measured decode shape.
struct DecodeRow {
    batch: usize,
    context: usize,
    bits: (u32, u32),
    /// "K/V" for plain TurboQuant, else the preset's name.
    label: String,
    /// For a preset: µs of a plain cache of the same bits and prompt, timed alternately with it.
    paired_plain_us: Option<f64>,
    us: f64,
    bytes: usize,
    splits: u32,
    /// Kernel variant `WxSxMxLxTxFxR` and registers per thread.
    variant: String,
}

fn decode(a: &DecodeArgs) -> Result<()> {
    if !CudaDevice::is_available() {
        return Err(TqError::Cuda(
            "bench decode: no CUDA device (this benchmark has no CPU fallback)".into(),
        ));
    }
    let mut sizes = vec![
        ("heads", a.heads),
        ("kv-heads", a.kv_heads),
        ("head-dim", a.head_dim),
    ];
    sizes.extend(a.batches.iter().map(|&b| ("batches", b)));
    sizes.extend(a.contexts.iter().map(|&c| ("contexts", c)));
    check_sizes("bench decode", &sizes, a.reps, 20)?;
    let reps = a.reps;
    let bits = a
        .bits
        .iter()
        .map(|b| parse_bits(b))
        .collect::<Result<Vec<_>>>()?;
    let dev = CudaDevice::new(0)?;
    let s = dev.stream().clone();
    println!(
        "tqkv bench decode on CUDA: {} (sm_{}{}, {} SMs), {} query heads, {} kv heads, head_dim \
         {}, bf16 query/output, CUDA events, L2 flushed ({} MB {:?}) before each call, median \
         of {reps}",
        dev.name(),
        dev.compute_capability().0,
        dev.compute_capability().1,
        dev.sm_count(),
        a.heads,
        a.kv_heads,
        a.head_dim,
        FLUSH_BYTES >> 20,
        a.flush
    );
    let copy = copy_gbs(&s, FLUSH_BYTES, reps)?;
    println!(
        "device-to-device copy: {copy:.0} GB/s (bytes read + written, {} MB)",
        FLUSH_BYTES >> 20
    );
    let mut flush = L2Flush::new(&s, a.flush)?;
    let mut rows = Vec::new();
    for &(kb, vb) in &bits {
        for &context in &a.contexts {
            let l = CacheLayout::new(a.kv_heads, a.head_dim, context, kb, vb)?;
            let planes = prompt_planes(&dev, l)?;
            for &batch in &a.batches {
                let mut cache = plain_batch(&dev, l, batch, a, &planes)?;
                let (us, splits, variant) =
                    time_decode(&s, &mut cache, a, batch, reps, &mut flush)?;
                rows.push(DecodeRow {
                    batch,
                    context,
                    bits: (kb, vb),
                    label: format!("{kb}/{vb}"),
                    paired_plain_us: None,
                    us,
                    bytes: batch * context * (l.bytes_per_token()),
                    splits,
                    variant,
                });
            }
        }
    }
    for &preset in a.presets.iter().flatten() {
        let (kb, vb) = preset.bits();
        for &context in &a.contexts {
            let l = preset.layout(a.kv_heads, a.head_dim, context)?;
            let prompt = preset_prompt(l, preset, context)?;
            let exact = prompt.sinks() + prompt.window();
            let planes = prompt_planes(&dev, l)?;
            for &batch in &a.batches {
                let mut cache = BatchCache::with_options(dev.clone(), l, preset.options(), batch)?;
                cache.set_decode_variant(a.variant)?;
                cache.set_exact_placement(a.exact);
                cache.set_l2_evict_first(a.l2.evict_first());
                cache.set_decode_splits(a.splits)?;
                for seq in 0..batch {
                    cache.upload(seq, &prompt)?;
                }
                // The same prompt in a plain cache of the same bits, timed alternately with the
                // preset (the better of two medians each): the preset's cost without drift.
                let mut plain = plain_batch(&dev, l, batch, a, &planes)?;
                let (mut us, mut plain_us) = (f64::INFINITY, f64::INFINITY);
                let (mut splits, mut variant) = (0, String::new());
                for _ in 0..2 {
                    let (p_us, _, _) = time_decode(&s, &mut plain, a, batch, reps, &mut flush)?;
                    plain_us = plain_us.min(p_us);
                    let (t, sp, v) = time_decode(&s, &mut cache, a, batch, reps, &mut flush)?;
                    (us, splits, variant) = (us.min(t), sp, v);
                }
                let exact_bytes = exact.min(context) * a.kv_heads * a.head_dim * 2 * 2;
                let packed = context.saturating_sub(exact) * l.bytes_per_token();
                rows.push(DecodeRow {
                    batch,
                    context,
                    bits: (kb, vb),
                    label: preset.name().to_string(),
                    us,
                    bytes: batch * (packed + exact_bytes),
                    splits,
                    variant,
                    paired_plain_us: Some(plain_us),
                });
            }
        }
    }
    println!(
        "| batch | context | bits | µs | GB/s (compressed bytes read) | % of copy | splits | variant |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    rows.sort_by_key(|r| {
        (
            r.batch,
            r.context,
            std::cmp::Reverse(r.bits),
            r.label.contains('/'),
        )
    });
    for r in &rows {
        let gbs = r.bytes as f64 / (r.us * 1e-6) / 1e9;
        println!(
            "| {} | {} | {} | {:.1} | {gbs:.0} | {:.0}% | {} | {} |",
            r.batch,
            r.context,
            r.label,
            r.us,
            100.0 * gbs / copy,
            r.splits,
            r.variant
        );
    }
    let presets: Vec<&DecodeRow> = rows
        .iter()
        .filter(|r| r.paired_plain_us.is_some())
        .collect();
    if !presets.is_empty() {
        println!();
        println!(
            "Cost of the presets' exact window, sink and centering: preset µs / µs of a plain cache \
             of the same bits and prompt, timed alternately (better of two medians each)"
        );
        println!();
        println!("| batch | context | preset | bits | preset µs | plain µs | preset / plain |");
        println!("|---|---|---|---|---|---|---|");
        for p in presets {
            let plain = p.paired_plain_us.unwrap_or(f64::NAN);
            println!(
                "| {} | {} | {} | {}/{} | {:.1} | {plain:.1} | {:.3} |",
                p.batch,
                p.context,
                p.label,
                p.bits.0,
                p.bits.1,
                p.us,
                p.us / plain
            );
        }
    }
    // One decode step's append (one token per sequence, keys and values) into ring caches.
    let mut appends = Vec::new();
    for &batch in &a.batches {
        let mut cells = Vec::new();
        for &(kb, vb) in &bits {
            let l = CacheLayout::new(a.kv_heads, a.head_dim, APPEND_CAPACITY, kb, vb)?
                .with_mode(CacheMode::Ring);
            let cache = BatchCache::new(dev.clone(), l, batch)?;
            cells.push((format!("{kb}/{vb}"), time_appends(&s, cache, a, batch)?));
        }
        for &preset in a.presets.iter().flatten() {
            let l = preset
                .layout(a.kv_heads, a.head_dim, APPEND_CAPACITY)?
                .with_mode(CacheMode::Ring);
            let options = preset
                .options()
                .with_key_mean(vec![0.0; a.kv_heads * a.head_dim]);
            let cache = BatchCache::with_options(dev.clone(), l, options, batch)?;
            cells.push((
                preset.name().to_string(),
                time_appends(&s, cache, a, batch)?,
            ));
        }
        appends.push((batch, cells));
    }
    if let Some((_, first)) = appends.first() {
        println!();
        println!(
            "Append of one decode step (one token per sequence, keys and values; ring caches of \
             {APPEND_CAPACITY} slots, f16 input): µs per call, host launch work included, \
             {APPEND_STEPS} calls back to back"
        );
        println!();
        let names: Vec<&str> = first.iter().map(|c| c.0.as_str()).collect();
        println!("| batch | {} |", names.join(" | "));
        println!("|---|{}", "---|".repeat(names.len()));
        for (batch, cells) in &appends {
            let us: Vec<String> = cells.iter().map(|c| format!("{:.1}", c.1)).collect();
            println!("| {batch} | {} |", us.join(" | "));
        }
    }
    if let Some(path) = &a.json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "batch": r.batch, "context": r.context, "k_bits": r.bits.0, "v_bits": r.bits.1,
                    "label": r.label, "paired_plain_us": r.paired_plain_us,
                    "us": r.us, "bytes": r.bytes, "splits": r.splits, "variant": r.variant,
                })
            })
            .collect();
        let flush = format!("{:?}", a.flush).to_lowercase();
        let doc = serde_json::json!({
            "device": dev.name(), "copy_gbs": copy, "flush": flush, "rows": rows,
        });
        std::fs::write(path, doc.to_string()).map_err(|e| TqError::Io {
            context: format!("bench decode: writing {}", path.display()),
            source: e,
        })?;
    }
    Ok(())
}

/// A plain batch of `batch` copies of the prompt `planes` ([`prompt_planes`] of `l`, every
/// sequence `l.capacity` tokens long), with the benchmark's kernel variant.
fn plain_batch(
    dev: &Arc<CudaDevice>,
    l: CacheLayout,
    batch: usize,
    a: &DecodeArgs,
    planes: &[DeviceBuffer; 4],
) -> Result<BatchCache> {
    let mut cache = BatchCache::new(dev.clone(), l, batch)?;
    cache.set_decode_variant(a.variant)?;
    cache.set_l2_evict_first(a.l2.evict_first());
    cache.set_decode_splits(a.splits)?;
    let sp = SeqPlanes {
        k_packed: &planes[0],
        k_norms: &planes[1],
        v_packed: &planes[2],
        v_norms: &planes[3],
    };
    for seq in 0..batch {
        cache.copy_sequence(seq, sp, l.capacity, CacheMode::Global)?;
    }
    Ok(cache)
}

/// Median µs of one decode call of `cache` (every sequence full, bf16 queries), its splits and
/// kernel variant description.
fn time_decode(
    s: &Arc<CudaStream>,
    cache: &mut BatchCache,
    a: &DecodeArgs,
    batch: usize,
    reps: usize,
    flush: &mut L2Flush,
) -> Result<(f64, u32, String)> {
    let n = batch * a.heads * a.head_dim;
    let q: Vec<half::bf16> = input(n, 7)
        .iter()
        .map(|x| half::bf16::from_f32(x.to_f32()))
        .collect();
    let q = DeviceBuffer::from_src(s, Src::Bf16(&q))?;
    let mut out = DeviceBuffer::zeros(s, BufferDType::Float(DType::Bf16), n)?;
    let cfg = AttentionConfig::new(a.head_dim);
    let splits = cache.decode_splits(a.heads, DType::Bf16, &cfg)?;
    let info = cache.decode_kernel_info(a.heads, DType::Bf16)?;
    let v = info.variant;
    let variant = format!(
        "{v} ({} regs, {} blocks/SM)",
        info.registers, info.blocks_per_sm
    );
    let us = time_flushed(s, reps, flush, || {
        cache.attention(&q, a.heads, &cfg, &mut out)
    })?;
    if !out.to_bf16(s)?.iter().all(|x| x.is_finite()) {
        let l = cache.layout();
        return Err(TqError::Cuda(format!(
            "bench decode: non-finite output at batch {batch}, context {}, bits {}/{}",
            l.capacity, l.k_bits, l.v_bits
        )));
    }
    Ok((us, splits, variant))
}

/// Slots of the ring caches `bench decode` times appends on.
const APPEND_CAPACITY: usize = 4096;
/// Appends timed back to back (after as many warm-up appends).
const APPEND_STEPS: usize = 200;

/// Mean µs of one [`BatchCache::append`] (one f16 token per sequence), wall time between two
/// events around `APPEND_STEPS` calls: the launches and the host's per-call work.
fn time_appends(
    s: &Arc<CudaStream>,
    mut cache: BatchCache,
    a: &DecodeArgs,
    batch: usize,
) -> Result<f64> {
    let n = batch * a.kv_heads * a.head_dim;
    let k = DeviceBuffer::from_src(s, Src::F16(&input(n, 3)))?;
    let v = DeviceBuffer::from_src(s, Src::F16(&input(n, 4)))?;
    let ctx = s.context();
    let ev = |e| TqError::Cuda(format!("bench: event: {e}"));
    let (start, end) = (new_event(ctx)?, new_event(ctx)?);
    for _ in 0..APPEND_STEPS {
        cache.append(&k, &v)?;
    }
    start.record(s).map_err(ev)?;
    for _ in 0..APPEND_STEPS {
        cache.append(&k, &v)?;
    }
    end.record(s).map_err(ev)?;
    end.synchronize().map_err(ev)?;
    cache.check_finite()?;
    Ok(start.elapsed_ms(&end).map_err(ev)? as f64 * 1e3 / APPEND_STEPS as f64)
}

/// A CPU cache with `preset`'s options holding a `context`-token prompt (the inputs of
/// [`prompt_planes`]), for [`BatchCache::upload`].
fn preset_prompt(l: CacheLayout, preset: Preset, context: usize) -> Result<KvCache> {
    eprintln!(
        "bench decode: quantizing a {context}-token {} prompt on the CPU",
        preset.name()
    );
    let mut cache = KvCache::with_options(l, preset.options())?;
    let per = l.num_kv_heads * l.head_dim;
    let (k, v) = (input(context * per, 1), input(context * per, 2));
    for t in (0..context).step_by(4096) {
        let r = t * per..(t + 4096).min(context) * per;
        cache.append(Src::F16(&k[r.clone()]), Src::F16(&v[r]))?;
    }
    Ok(cache)
}

/// The planes of one `context`-token prompt (f16 Gaussian-ish K/V quantized on the GPU): packed
/// keys, key norms, packed values, value norms.
fn prompt_planes(dev: &Arc<CudaDevice>, l: CacheLayout) -> Result<[DeviceBuffer; 4]> {
    let gc = CudaCodec::new(dev.clone(), Codec::new(l)?)?;
    let s = gc.stream().clone();
    let n = l.capacity * l.num_kv_heads * l.head_dim;
    let f32s = BufferDType::Float(DType::F32);
    let mut planes = [
        DeviceBuffer::zeros(&s, BufferDType::U8, l.packed_len(Side::Keys))?,
        DeviceBuffer::zeros(&s, f32s, l.norms_len())?,
        DeviceBuffer::zeros(&s, BufferDType::U8, l.packed_len(Side::Values))?,
        DeviceBuffer::zeros(&s, f32s, l.norms_len())?,
    ];
    let [kp, kn, vp, vn] = &mut planes;
    let k = DeviceBuffer::from_src(&s, Src::F16(&input(n, 1)))?;
    gc.quantize(Side::Keys, &k, l.capacity, 0, kp, kn)?;
    let v = DeviceBuffer::from_src(&s, Src::F16(&input(n, 2)))?;
    gc.quantize(Side::Values, &v, l.capacity, 0, vp, vn)?;
    gc.check_finite()?;
    Ok(planes)
}

/// Median GPU microseconds of `f`, each call timed alone between two events after `flush`
/// (which evicts L2 and keeps the GPU busy while the host enqueues the call), after 3 warm-up
/// calls.
fn time_flushed(
    stream: &Arc<CudaStream>,
    reps: usize,
    flush: &mut L2Flush,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let ctx = stream.context();
    let ev = |e| TqError::Cuda(format!("bench: event: {e}"));
    let (start, end) = (new_event(ctx)?, new_event(ctx)?);
    for _ in 0..3 {
        f()?;
    }
    let mut us = Vec::with_capacity(reps);
    for r in 0..reps {
        flush.run(stream, r)?;
        start.record(stream).map_err(ev)?;
        f()?;
        end.record(stream).map_err(ev)?;
        end.synchronize().map_err(ev)?;
        us.push(start.elapsed_ms(&end).map_err(ev)? as f64 * 1e3);
    }
    Ok(median(us))
}
