//! CPU speed of tqkv on one thread (head_dim 128, 4/4 bits): attention of one query head over
//! 4096 compressed tokens against plain f32 attention over the same 4096 tokens uncompressed,
//! and quantize / dequantize throughput.
//!
//! `cargo bench --bench cpu`. The f32 baseline is one auto-vectorized loop compiled for AVX2 +
//! FMA and for AVX-512F (whichever the CPU has; x86-64 only); tqkv runs its automatic choice,
//! its AVX2 kernels and its portable kernels. tqkv runs inside a one-thread rayon pool. After
//! criterion's report the bench prints the ratios of this run, read back from
//! `target/criterion/*/new/estimates.json`.

use std::hint::black_box;
use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

use criterion::{BenchmarkId, Criterion, Throughput};
use tqkv::cpu::{self, AttentionConfig, Simd};
use tqkv::rotation::splitmix64;
use tqkv::{CacheLayout, Codec, Domain, Dst, KvCache, Preset, Side, Src};

const D: usize = 128;
const BITS: u32 = 4;
const CONTEXT: usize = 4096;
/// Vectors per quantize / dequantize call: 512 tokens × 8 kv heads.
const CODEC_TOKENS: usize = 512;
const CODEC_HEADS: usize = 8;

/// Deterministic values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| (splitmix64(&mut s) >> 40) as f32 / (1u32 << 22) as f32 - 2.0)
        .collect()
}

/// Plain f32 attention of one query head over `k`, `v`: `[n, d]` row-major. Written to
/// auto-vectorize: 32 independent lanes per dot product (four 8-wide accumulators), one
/// multiply-add per element, the same softmax as tqkv (f32 exp, f64 sum).
#[inline(always)]
fn dense_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let mut max = f32::NEG_INFINITY;
    for (s, kr) in scores.iter_mut().zip(k.chunks_exact(d)) {
        let mut lanes = [0f32; 32];
        for (qc, kc) in q.chunks_exact(32).zip(kr.chunks_exact(32)) {
            for l in 0..32 {
                lanes[l] = qc[l].mul_add(kc[l], lanes[l]);
            }
        }
        *s = lanes.iter().sum::<f32>() * scale;
        max = max.max(*s);
    }
    let mut sum = 0f64;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s as f64;
    }
    out.fill(0.0);
    for (&p, vr) in scores.iter().zip(v.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(vr) {
            *o = p.mul_add(*x, *o);
        }
    }
    let inv = (1.0 / sum) as f32;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// [`dense_attention`] compiled for AVX2 + FMA, the instruction set tqkv's kernels use here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dense_attention_avx2(q: &[f32], k: &[f32], v: &[f32], scale: f32, s: &mut [f32], o: &mut [f32]) {
    dense_attention(q, k, v, scale, s, o)
}

/// [`dense_attention`] compiled with AVX-512F as well (the fastest baseline where present).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
fn dense_attention_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    s: &mut [f32],
    o: &mut [f32],
) {
    dense_attention(q, k, v, scale, s, o)
}

/// The f32 baseline with the given instruction set (`Simd::Portable`: the build target's).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn dense(simd: Simd, q: &[f32], k: &[f32], v: &[f32], scale: f32, s: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: callers pass a kernel set only when `simd.is_supported()`.
        Simd::Avx512 => return unsafe { dense_attention_avx512(q, k, v, scale, s, o) },
        // SAFETY: as above.
        Simd::Avx2 => return unsafe { dense_attention_avx2(q, k, v, scale, s, o) },
        _ => {}
    }
    dense_attention(q, k, v, scale, s, o)
}

fn bench_attention(c: &mut Criterion, pool: &rayon::ThreadPool) {
    let layout = CacheLayout::new(1, D, CONTEXT, BITS, BITS).expect("layout");
    let mut cache = KvCache::new(layout).expect("cache");
    let k = values(CONTEXT * D, 1);
    let v = values(CONTEXT * D, 2);
    let q = values(D, 3);
    cache.append(Src::F32(&k), Src::F32(&v)).expect("append");
    let cfg = AttentionConfig::new(D);

    let mut g = c.benchmark_group("attention_1head_4096");
    let mut scores = vec![0f32; CONTEXT];
    let mut out = vec![0f32; D];
    for (name, simd) in [
        ("f32_dense_avx512", Simd::Avx512),
        ("f32_dense_avx2", Simd::Avx2),
    ] {
        if !simd.is_supported() {
            continue;
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                let (q, k, v) = (black_box(&q), black_box(&k), black_box(&v));
                dense(simd, q, k, v, cfg.scale, &mut scores, &mut out)
            })
        });
    }
    for (name, simd) in [
        ("tqkv_4bit", Simd::Auto),
        ("tqkv_4bit_avx2", Simd::Avx2),
        ("tqkv_4bit_portable", Simd::Portable),
    ] {
        if !simd.is_supported() {
            continue;
        }
        g.bench_function(name, |b| {
            pool.install(|| {
                b.iter(|| {
                    let q = Src::F32(black_box(&q));
                    cpu::attention_with(black_box(&cache), q, 1, &cfg, &mut out, simd)
                        .expect("attention")
                })
            })
        });
    }
    // Preset tq4 (4/4 bits, centered keys, exact window 32 and 1 sink): what the segments cost.
    let tq4 = Preset::Tq4;
    let layout = tq4.layout(1, D, CONTEXT).expect("layout");
    let mut preset = KvCache::with_options(layout, tq4.options()).expect("cache");
    preset.append(Src::F32(&k), Src::F32(&v)).expect("append");
    g.bench_function("tqkv_4bit_tq4_preset", |b| {
        pool.install(|| {
            b.iter(|| {
                let q = Src::F32(black_box(&q));
                cpu::attention(black_box(&preset), q, 1, &cfg, &mut out).expect("attention")
            })
        })
    });
    g.finish();

    // Other bit widths (keys/values), automatic kernels: informative, no target.
    let mut g = c.benchmark_group("attention_1head_4096_bits");
    for (kb, vb) in [(2, 2), (3, 3), (5, 5), (6, 6), (8, 8), (8, 4)] {
        let layout = CacheLayout::new(1, D, CONTEXT, kb, vb).expect("layout");
        let mut cache = KvCache::new(layout).expect("cache");
        cache.append(Src::F32(&k), Src::F32(&v)).expect("append");
        g.bench_function(format!("tqkv_{kb}_{vb}"), |b| {
            pool.install(|| {
                b.iter(|| {
                    let q = Src::F32(black_box(&q));
                    cpu::attention(black_box(&cache), q, 1, &cfg, &mut out).expect("attention")
                })
            })
        });
        // One-byte rows also with the AVX2 kernels: what CPUs without AVX-512 run.
        if kb == vb && kb >= 5 && Simd::Avx2.is_supported() {
            g.bench_function(format!("tqkv_{kb}_{vb}_avx2"), |b| {
                pool.install(|| {
                    b.iter(|| {
                        let q = Src::F32(black_box(&q));
                        cpu::attention_with(black_box(&cache), q, 1, &cfg, &mut out, Simd::Avx2)
                            .expect("attention")
                    })
                })
            });
        }
    }
    g.finish();
}

fn bench_codec(c: &mut Criterion, pool: &rayon::ThreadPool) {
    let layout = CacheLayout::new(CODEC_HEADS, D, CODEC_TOKENS, BITS, BITS).expect("layout");
    let codec = Codec::new(layout).expect("codec");
    let x = values(CODEC_TOKENS * CODEC_HEADS * D, 4);
    let mut packed = vec![0u8; layout.packed_len(Side::Keys)];
    let mut norms = vec![0f32; layout.norms_len()];
    let vectors = (CODEC_TOKENS * CODEC_HEADS) as u64;

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(vectors));
    g.bench_function("quantize_4bit", |b| {
        pool.install(|| {
            b.iter(|| {
                let x = Src::F32(black_box(&x));
                cpu::quantize(
                    &codec,
                    Side::Keys,
                    x,
                    CODEC_TOKENS,
                    0,
                    &mut packed,
                    &mut norms,
                )
                .expect("quantize")
            })
        })
    });
    // Other bit widths: informative, no target.
    for bits in [2, 3, 5, 6, 8] {
        let l = CacheLayout::new(CODEC_HEADS, D, CODEC_TOKENS, bits, bits).expect("layout");
        let codec = Codec::new(l).expect("codec");
        let mut packed = vec![0u8; l.packed_len(Side::Keys)];
        g.bench_function(format!("quantize_{bits}bit"), |b| {
            pool.install(|| {
                b.iter(|| {
                    let x = Src::F32(black_box(&x));
                    cpu::quantize(
                        &codec,
                        Side::Keys,
                        x,
                        CODEC_TOKENS,
                        0,
                        &mut packed,
                        &mut norms,
                    )
                    .expect("quantize")
                })
            })
        });
    }
    let mut out = vec![0f32; x.len()];
    for (name, domain) in [("original", Domain::Original), ("rotated", Domain::Rotated)] {
        g.bench_function(BenchmarkId::new("dequantize_4bit", name), |b| {
            pool.install(|| {
                b.iter(|| {
                    cpu::dequantize_seq(
                        &codec,
                        Side::Keys,
                        black_box(&packed),
                        &norms,
                        0,
                        CODEC_TOKENS,
                        domain,
                        Dst::F32(&mut out),
                    )
                    .expect("dequantize")
                })
            })
        });
    }
    g.finish();
}

/// When this run began: estimates older than this come from earlier runs.
static START: OnceLock<SystemTime> = OnceLock::new();

/// Time in ns per iteration (slope, else mean) of one criterion benchmark, if it ran in this
/// run.
fn time_ns(id: &str) -> Option<f64> {
    let p = Path::new("target/criterion")
        .join(id)
        .join("new/estimates.json");
    let written = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
    if written < *START.get()? {
        return None;
    }
    let text = std::fs::read_to_string(p).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| v["mean"]["point_estimate"].as_f64())
}

fn print_summary() {
    println!("\nsummary (one thread, head_dim {D}, {BITS}/{BITS} bits):");
    let group = "attention_1head_4096";
    let base = ["f32_dense_avx512", "f32_dense_avx2"]
        .into_iter()
        .filter_map(|id| Some((id, time_ns(&format!("{group}/{id}"))?)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((base_id, base)) = base {
        println!("  attention, 1 query head × {CONTEXT} keys, against the faster f32 baseline:");
        for id in [
            "f32_dense_avx512",
            "f32_dense_avx2",
            "tqkv_4bit",
            "tqkv_4bit_avx2",
            "tqkv_4bit_portable",
            "tqkv_4bit_tq4_preset",
        ] {
            if let Some(t) = time_ns(&format!("{group}/{id}")) {
                let r = t / base;
                println!("    {id}: {:.1} µs, {r:.2} × {base_id}", t / 1e3);
            }
        }
    }
    if let Some((base_id, base)) = base {
        for (kb, vb) in [(2, 2), (3, 3), (5, 5), (6, 6), (8, 8), (8, 4)] {
            for (suffix, kernels) in [("", "auto"), ("_avx2", "AVX2")] {
                let id = format!("tqkv_{kb}_{vb}{suffix}");
                if let Some(t) = time_ns(&format!("{group}_bits/{id}")) {
                    let r = t / base;
                    println!(
                        "    {id} ({kernels}): {:.1} µs, {r:.2} × {base_id}",
                        t / 1e3
                    );
                }
            }
        }
    }
    let vectors = (CODEC_TOKENS * CODEC_HEADS) as f64;
    for id in [
        "codec/quantize_4bit",
        "codec/dequantize_4bit/original",
        "codec/dequantize_4bit/rotated",
        "codec/quantize_2bit",
        "codec/quantize_3bit",
        "codec/quantize_5bit",
        "codec/quantize_6bit",
        "codec/quantize_8bit",
    ] {
        if let Some(t) = time_ns(id) {
            println!("  {id}: {:.2} M vectors/s", vectors / t * 1e3);
        }
    }
}

fn main() {
    START.get_or_init(SystemTime::now);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    let mut c = Criterion::default().configure_from_args();
    bench_attention(&mut c, &pool);
    bench_codec(&mut c, &pool);
    c.final_summary();
    print_summary();
}
