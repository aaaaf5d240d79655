//! `tqkv bench`: throughput of the codec on CUDA (or the CPU without a GPU), each op beside a
//! plain copy of the same byte count measured in the same process.

use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Subcommand};
use cudarc::driver::sys::CUevent_flags;
use half::f16;
use tqkv::cuda::{BufferDType, CudaCodec, CudaDevice, CudaStream, DeviceBuffer};
use tqkv::{cpu, CacheLayout, Codec, DType, Domain, Dst, Result, Side, Src, TqError};

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
    let BenchWhat::Codec(a) = args.what;
    codec(&a)
}

/// Appends per timed batch of the decode-step measurement.
const APPENDS: usize = 32;

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

fn codec(a: &CodecArgs) -> Result<()> {
    let reps = a.reps.max(1);
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
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(ev)?;
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(ev)?;
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
