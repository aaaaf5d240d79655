//! GPU batch caches with key centering and exact sinks / recent window (CacheOptions): the batch
//! append reproduces the CPU cache's every plane (packed bytes, norms, exact bits, frontier), and
//! decode attention over the exact segments plus the centered packed keys matches
//! `cpu::attention` of the same cache within the decode kernel's tolerance. Skips without a GPU
//! unless `TQ_REQUIRE_GPU=1`.

mod common;

use std::sync::Arc;

use common::{device, Gauss};
use tqkv::cpu::{attention, AttentionConfig};
use tqkv::cuda::{BatchCache, CudaDevice, DeviceBuffer, ExactPlacement};
use tqkv::{CacheLayout, CacheMode, CacheOptions, DType, KvCache, Preset, Side, Src};

/// Relative L2 error allowed over one case's whole output (as tests/gpu_decode.rs).
const TOL: f64 = 2e-3;
/// Per (sequence, head): catches a wrong head or sequence (as tests/gpu_decode.rs).
const TOL_HEAD: f64 = 1.5e-2;

fn layout(kv: usize, d: usize, cap: usize, kb: u32, vb: u32) -> CacheLayout {
    CacheLayout::new(kv, d, cap, kb, vb).expect("valid layout")
}

/// `n` tokens `[n, kv, d]`: keys with a per-channel offset (what centering removes), values
/// with a per-coordinate offset (outputs are not ~0 averages of noise).
fn tokens(l: &CacheLayout, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (kv, d) = (l.num_kv_heads, l.head_dim);
    let mut g = Gauss::new(seed);
    let k = g
        .vec(n * kv * d)
        .iter()
        .enumerate()
        .map(|(i, x)| x + 3.0 * ((i % (kv * d)) as f32 * 0.61).cos())
        .collect();
    let v = g
        .vec(n * kv * d)
        .iter()
        .enumerate()
        .map(|(i, x)| x + ((i % d) as f32 * 0.37).sin())
        .collect();
    (k, v)
}

/// A CPU cache of `mode` with `options` and `len` tokens appended (prefill in one append).
fn filled(
    l: CacheLayout,
    options: &CacheOptions,
    mode: CacheMode,
    len: usize,
    seed: u64,
) -> KvCache {
    let mut c = KvCache::with_options(l.with_mode(mode), options.clone()).expect("cpu cache");
    if len > 0 {
        let (k, v) = tokens(&l, len, seed);
        c.append(Src::F32(&k), Src::F32(&v)).expect("append");
    }
    c
}

/// The option sets under test: the presets' default, sinks only, window only, centering only,
/// bf16 exact tokens with a wider window.
fn option_sets() -> Vec<(&'static str, CacheOptions)> {
    let plain = CacheOptions::plain();
    vec![
        (
            "default (centered, window 32, sink 1)",
            CacheOptions::default(),
        ),
        ("sinks 4 only", plain.clone().with_sinks(4)),
        ("window 16 only", plain.clone().with_window(16)),
        ("centering only", plain.clone().with_center_keys(true)),
        (
            "bf16, window 48, sinks 2, centered",
            CacheOptions::default()
                .with_window(48)
                .with_sinks(2)
                .with_exact_dtype(DType::Bf16),
        ),
    ]
}

/// GPU vs CPU decode attention of one query per sequence; returns the whole-output error.
fn compare_attention(
    batch: &BatchCache,
    cpu: &[KvCache],
    heads: usize,
    cfg: &AttentionConfig,
    seed: u64,
    what: &str,
) -> f64 {
    let d = batch.layout().head_dim;
    let per_q = heads * d;
    let n = cpu.len() * per_q;
    let q: Vec<f32> = Gauss::new(seed).vec(n).iter().map(|x| 2.0 * x).collect();
    let s = batch.codec().stream().clone();
    let q_dev = DeviceBuffer::from_f32(&s, &q).expect("upload q");
    let mut out = DeviceBuffer::from_f32(&s, &vec![f32::NAN; n]).expect("alloc out");
    batch
        .attention(&q_dev, heads, cfg, &mut out)
        .expect("gpu attention");
    let gpu = out.to_f32(&s).expect("download");
    let (mut num, mut den) = (0f64, 0f64);
    for (i, c) in cpu.iter().enumerate() {
        let g = &gpu[i * per_q..(i + 1) * per_q];
        if c.is_empty() {
            assert!(g.iter().all(|&x| x == 0.0), "{what}: seq {i} is empty");
            continue;
        }
        let mut want = vec![0f32; per_q];
        attention(
            c,
            Src::F32(&q[i * per_q..(i + 1) * per_q]),
            heads,
            cfg,
            &mut want,
        )
        .expect("cpu attention");
        for h in 0..heads {
            let (gh, wh) = (&g[h * d..(h + 1) * d], &want[h * d..(h + 1) * d]);
            let (mut n2, mut d2) = (0f64, 0f64);
            for (&a, &b) in gh.iter().zip(wh) {
                assert!(a.is_finite(), "{what}: seq {i} head {h}: output {a}");
                n2 += (a as f64 - b as f64).powi(2);
                d2 += (b as f64).powi(2);
            }
            let rel = (n2 / d2.max(1e-300)).sqrt();
            assert!(
                rel <= TOL_HEAD,
                "{what}: seq {i} (len {}, frontier {}) head {h}: error {rel:.3e}",
                c.len(),
                c.frontier()
            );
            num += n2;
            den += d2;
        }
    }
    let rel = (num / den.max(1e-300)).sqrt();
    println!("{what}: rel L2 {rel:.2e}");
    assert!(
        rel <= TOL,
        "{what}: relative L2 error {rel:.3e} > {TOL:.0e}"
    );
    rel
}

/// Every placement of the exact work: spread over the packed splits (the default), extra blocks,
/// three extra blocks shared by the pairs (each serves several, one after another), folded into
/// the last packed split with no credit, with a typical one, and with a credit larger than any
/// split (that split streams no packed tile).
const PLACEMENTS: [Option<ExactPlacement>; 6] = [
    None,
    Some(ExactPlacement::Blocks),
    Some(ExactPlacement::Shared { blocks: 3 }),
    Some(ExactPlacement::Folded { credit: 0 }),
    Some(ExactPlacement::Folded { credit: 48 }),
    Some(ExactPlacement::Folded { credit: 1000 }),
];

#[test]
fn decode_over_exact_segments_and_centered_keys_matches_cpu_attention() {
    let Some(dev) = device() else { return };
    let (g, r) = (CacheMode::Global, CacheMode::Ring);
    let seqs = [
        (0, g),
        (1, g),
        (3, g),
        (33, g),
        (34, g),
        (49, g),
        (200, g),
        (1500, g),
        (700, r),
        (256, r),
    ];
    for (name, options) in option_sets() {
        for (kb, vb) in [(4, 4), (8, 4), (3, 3)] {
            // One layout per batch: globals up to 1500 tokens, rings of 256 slots (wrapped).
            for (mode, cap) in [(g, 2048), (r, 256)] {
                let l = layout(2, 128, cap, kb, vb);
                let cpu: Vec<KvCache> = seqs
                    .iter()
                    .filter(|s| s.1 == mode)
                    .enumerate()
                    .map(|(i, &(len, _))| filled(l, &options, mode, len, 40 + i as u64))
                    .collect();
                let mut batch =
                    BatchCache::with_options(dev.clone(), l, options.clone(), cpu.len())
                        .expect("batch cache");
                for (i, c) in cpu.iter().enumerate() {
                    batch.upload(i, c).expect("upload");
                }
                for placement in PLACEMENTS {
                    batch.set_exact_placement(placement);
                    for (cfg_name, cfg) in [
                        ("plain", AttentionConfig::new(128)),
                        (
                            "window 40 + softcap 30",
                            AttentionConfig::new(128).with_window(40).with_softcap(30.0),
                        ),
                    ] {
                        let what =
                            format!("{name}, {kb}/{vb}, {mode:?}, {cfg_name}, {placement:?}");
                        compare_attention(&batch, &cpu, 8, &cfg, 7, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn every_exact_placement_serves_every_sequence_of_a_large_batch() {
    let Some(dev) = device() else { return };
    // 40 sequences × 2 kv heads: few packed splits, so the exact blocks span many grid slices.
    let l = layout(2, 128, 3000, 4, 4);
    let options = CacheOptions::default();
    let mut g = Gauss::new(17);
    let cpu: Vec<KvCache> = (0..40)
        .map(|i| {
            let len = if i < 3 {
                [0, 1, 34][i]
            } else {
                1 + (g.uniform() * 2999.0) as usize
            };
            filled(l, &options, CacheMode::Global, len, 700 + i as u64)
        })
        .collect();
    let mut batch =
        BatchCache::with_options(dev.clone(), l, options, cpu.len()).expect("batch cache");
    for (i, c) in cpu.iter().enumerate() {
        batch.upload(i, c).expect("upload");
    }
    for placement in PLACEMENTS {
        batch.set_exact_placement(placement);
        compare_attention(
            &batch,
            &cpu,
            8,
            &AttentionConfig::new(128),
            3,
            &format!("40 sequences, tq4 options, {placement:?}"),
        );
    }
}

/// Appends `steps` tokens to every sequence on the GPU and the CPU and compares every plane
/// after each step, and attention every `every` steps.
fn assert_appends_match(
    dev: &Arc<CudaDevice>,
    l: CacheLayout,
    options: &CacheOptions,
    seqs: &[(usize, CacheMode)],
    steps: usize,
    dtype: DType,
    name: &str,
) {
    let mut cpu: Vec<KvCache> = seqs
        .iter()
        .enumerate()
        .map(|(i, &(len, mode))| filled(l, options, mode, len, 300 + i as u64))
        .collect();
    let mut batch =
        BatchCache::with_options(dev.clone(), l, options.clone(), seqs.len()).expect("batch");
    for (i, c) in cpu.iter().enumerate() {
        batch.upload(i, c).expect("upload");
    }
    let per = l.num_kv_heads * l.head_dim;
    let s = batch.codec().stream().clone();
    for step in 0..steps {
        let (k, v) = tokens(&l, seqs.len(), 1000 + step as u64);
        let upload = |x: &[f32]| match dtype {
            DType::F16 => {
                let h: Vec<half::f16> = x.iter().map(|&f| half::f16::from_f32(f)).collect();
                DeviceBuffer::from_src(&s, Src::F16(&h)).expect("upload")
            }
            _ => DeviceBuffer::from_f32(&s, x).expect("upload"),
        };
        let (k_dev, v_dev) = (upload(&k), upload(&v));
        batch.append(&k_dev, &v_dev).expect("gpu append");
        batch.check_finite().expect("finite");
        for (i, c) in cpu.iter_mut().enumerate() {
            let at = i * per..(i + 1) * per;
            match dtype {
                DType::F16 => {
                    let kh: Vec<half::f16> = k[at.clone()]
                        .iter()
                        .map(|&f| half::f16::from_f32(f))
                        .collect();
                    let vh: Vec<half::f16> =
                        v[at].iter().map(|&f| half::f16::from_f32(f)).collect();
                    c.append(Src::F16(&kh), Src::F16(&vh)).expect("cpu append");
                }
                _ => c
                    .append(Src::F32(&k[at.clone()]), Src::F32(&v[at]))
                    .expect("cpu append"),
            }
            let what = format!(
                "{name}: step {step} seq {i} ({:?}, len {})",
                seqs[i],
                c.len()
            );
            assert_eq!(batch.lens()[i] as usize, c.len(), "{what}: length");
            assert_eq!(
                batch.frontiers()[i] as usize,
                c.frontier(),
                "{what}: frontier"
            );
            for side in [Side::Keys, Side::Values] {
                let (packed, norms) = batch.download(i, side).expect("download");
                assert!(
                    packed == c.packed(side),
                    "{what}: {side:?} packed bytes differ"
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&norms), bits(c.norms(side)), "{what}: {side:?} norms");
                let (sinks, window) = batch.download_exact(i, side).expect("download exact");
                assert_eq!(sinks, c.exact_sinks(side), "{what}: {side:?} sinks");
                assert_eq!(window, c.exact_window(side), "{what}: {side:?} window");
            }
        }
        if step % 8 == 7 || step + 1 == steps {
            let what = format!("{name}: attention after step {step}");
            compare_attention(
                &batch,
                &cpu,
                4 * l.num_kv_heads,
                &AttentionConfig::new(l.head_dim),
                90 + step as u64,
                &what,
            );
        }
    }
}

#[test]
fn gpu_appends_match_cpu_appends_across_the_window_and_sink_boundaries() {
    let Some(dev) = device() else { return };
    let (g, r) = (CacheMode::Global, CacheMode::Ring);
    for (name, options) in option_sets() {
        // Lengths around the sink and window boundaries; every sequence has μ (a prefill).
        let globals = [(1, g), (2, g), (5, g), (31, g), (33, g), (47, g), (60, g)];
        assert_appends_match(
            &dev,
            layout(3, 64, 128, 4, 4),
            &options,
            &globals,
            40,
            DType::F32,
            name,
        );
        let rings = [(20, r), (63, r), (64, r), (130, r)];
        assert_appends_match(
            &dev,
            layout(2, 128, 64, 8, 3),
            &options,
            &rings,
            24,
            DType::F16,
            name,
        );
    }
}

#[test]
fn centering_batches_need_a_key_mean_before_a_key_is_packed() {
    let Some(dev) = device() else { return };
    let msg = |r: tqkv::Result<()>| r.expect_err("must fail").to_string();
    let l = layout(2, 64, 128, 4, 4);
    let options = CacheOptions::default(); // sink 1, window 32, centered
    let mut batch = BatchCache::with_options(dev.clone(), l, options.clone(), 1).expect("batch");
    let s = batch.codec().stream().clone();
    let tok = DeviceBuffer::from_f32(&s, &Gauss::new(5).vec(2 * 64)).expect("upload");
    // Positions 0..33 stay exact (sink 0, window 1..33): no key is quantized yet.
    for _ in 0..33 {
        batch.append(&tok, &tok).expect("append while exact");
    }
    let e = msg(batch.append(&tok, &tok));
    assert!(
        e.contains("batch cache append: sequence 0 has no key mean") && e.contains("set_key_mean"),
        "{e}"
    );
    assert_eq!(batch.lens(), &[33]);
    let mu = vec![0.25f32; 2 * 64];
    batch.set_key_mean(0, &mu).expect("set mean");
    batch.append(&tok, &tok).expect("append after set_key_mean");
    assert_eq!((batch.lens()[0], batch.frontiers()[0]), (34, 2));
    let e = msg(batch.set_key_mean(0, &mu));
    assert!(
        e.contains("already has packed keys (positions 1..2)"),
        "{e}"
    );
    let e = msg(batch.set_key_mean(0, &mu[1..]));
    assert!(e.contains("mu has 127 elements, need 128"), "{e}");

    // Reset forgets μ unless the options give one.
    batch.reset(0, CacheMode::Global).expect("reset");
    assert_eq!((batch.lens()[0], batch.frontiers()[0]), (0, 0));
    let given = options.clone().with_key_mean(mu.clone());
    let mut calibrated = BatchCache::with_options(dev.clone(), l, given, 1).expect("batch");
    for _ in 0..40 {
        calibrated
            .append(&tok, &tok)
            .expect("append with a given mean");
    }
    assert_eq!(calibrated.frontiers()[0], 8);

    // Mismatched options, device-plane copies and mixed dtypes are errors.
    let plain = KvCache::new(l).expect("cache");
    let e = msg(batch.upload(0, &plain));
    assert!(
        e.contains("the cache has center_keys=false, sinks=0, window=0")
            && e.contains("the batch has center_keys=true, sinks=1, window=32"),
        "{e}"
    );
    let tok16 = DeviceBuffer::from_src(&s, Src::F16(&vec![half::f16::ONE; 2 * 64])).expect("up");
    let e = msg(batch.append(&tok, &tok16));
    assert!(e.contains("k holds Float(F32) and v Float(F16)"), "{e}");
    let mut plain_batch = BatchCache::new(dev.clone(), l, 1).expect("batch");
    let e = msg(plain_batch.set_key_mean(0, &mu));
    assert!(e.contains("does not center keys"), "{e}");
    let zeros = |dtype, len| DeviceBuffer::zeros(&s, dtype, len).expect("zeros");
    let (packed, f32) = (
        tqkv::cuda::BufferDType::U8,
        tqkv::cuda::BufferDType::Float(DType::F32),
    );
    let kp = zeros(packed, l.packed_len(Side::Keys));
    let kn = zeros(f32, l.norms_len());
    let vp = zeros(packed, l.packed_len(Side::Values));
    let vn = zeros(f32, l.norms_len());
    let planes = tqkv::cuda::SeqPlanes {
        k_packed: &kp,
        k_norms: &kn,
        v_packed: &vp,
        v_norms: &vn,
    };
    let e = msg(batch.copy_sequence(0, planes, 4, CacheMode::Global));
    assert!(e.contains("copy_sequence") && e.contains("upload"), "{e}");
    plain_batch
        .copy_sequence(0, planes, 4, CacheMode::Global)
        .expect("plain batches copy device planes");
}

#[test]
fn memory_bytes_counts_exact_segments_and_the_mean() {
    let Some(dev) = device() else { return };
    let l = Preset::Tq4.layout(8, 128, 1024).expect("layout");
    let plain = BatchCache::new(dev.clone(), l, 4).expect("plain");
    let tq4 = BatchCache::with_options(dev, l, Preset::Tq4.options(), 4).expect("tq4");
    // Exact planes: 4 seqs × 8 heads × (1 + 32) tokens × 128 × 2 bytes × K and V; μ: 4 × 8 × 128
    // f32; frontiers (two buffers): 2 × 4 u32.
    let exact = 4 * 8 * 33 * 128 * 2 * 2;
    let extra = exact + 4 * 8 * 128 * 4 + 2 * 4 * 4;
    assert_eq!(tq4.memory_bytes() - plain.memory_bytes(), extra);
}
