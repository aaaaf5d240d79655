//! GPU batch cache and fused decode attention: the batch append reproduces the CPU quantize bytes;
//! decode attention matches `cpu::attention` of the same packed cache within the kernel's f16
//! tensor-core rounding. Skips without a GPU unless `TQ_REQUIRE_GPU=1`.

mod common;

use std::sync::Arc;

use common::{device, require_gpu, Gauss};
use half::{bf16, f16};
use tqkv::cpu::{attention, AttentionConfig};
use tqkv::cuda::{
    compile_ptx, BatchCache, CudaDevice, DecodeParams, DecodeVariant, DeviceBuffer, Family,
    KernelKey,
};
use tqkv::{CacheLayout, CacheMode, DType, KvCache, Side, Src};

/// Relative L2 error ‖gpu − cpu‖ / ‖cpu‖ allowed over one case's whole output (f32 outputs).
/// The kernel rounds its tensor-core operands (rotated query, centroids, softmax weight × norm)
/// to f16; bench/NOTES-decode.md measured at most 1.8e-3 over 110 cases.
const TOL: f64 = 2e-3;
/// Per (sequence, head) the same rounding reaches ~5e-3 (NOTES-decode.md); this bound only
/// catches a wrong head or sequence.
const TOL_HEAD: f64 = 1.5e-2;

/// Every batch cache of this file is built here. The test harness variable
/// `TQ_DECODE_VARIANT=WxSxMxLxTxFxR` runs the tests under another kernel variant (tuning runs:
/// bench/decode_sweep.sh).
fn batch_cache(dev: Arc<CudaDevice>, l: CacheLayout, num_seqs: usize) -> tqkv::Result<BatchCache> {
    let mut b = BatchCache::new(dev, l, num_seqs)?;
    if let Ok(v) = std::env::var("TQ_DECODE_VARIANT") {
        if !v.trim().is_empty() {
            b.set_decode_variant(Some(DecodeVariant::parse(&v)?))?;
        }
    }
    Ok(b)
}

/// Every CPU reference cache of this file is built here.
fn plain_cache(layout: CacheLayout) -> KvCache {
    KvCache::new(layout).expect("cpu cache")
}

fn layout(kv: usize, d: usize, cap: usize, kb: u32, vb: u32) -> CacheLayout {
    CacheLayout::new(kv, d, cap, kb, vb).expect("valid layout")
}

/// A CPU cache of `mode` with `len` Gaussian tokens appended (a ring keeps the last capacity).
fn filled_cache(l: CacheLayout, mode: CacheMode, len: usize, seed: u64) -> KvCache {
    let mut c = plain_cache(l.with_mode(mode));
    let per = l.num_kv_heads * l.head_dim;
    let mut g = Gauss::new(seed);
    let mut left = len;
    while left > 0 {
        let n = left.min(4096);
        let k = g.vec(n * per);
        // Values with a per-coordinate offset, so outputs are not ~0 averages of noise.
        let v: Vec<f32> = g
            .vec(n * per)
            .iter()
            .enumerate()
            .map(|(i, x)| x + ((i % l.head_dim) as f32 * 0.37).sin())
            .collect();
        c.append(Src::F32(&k), Src::F32(&v)).expect("append");
        left -= n;
    }
    c
}

/// Host queries in one dtype.
enum HostQ {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl HostQ {
    /// Queries with a larger scale (|q| ~ 2 sqrt(d)) so the softmax is peaked, as in models.
    fn new(dtype: DType, n: usize, seed: u64) -> Self {
        let v: Vec<f32> = Gauss::new(seed).vec(n).iter().map(|x| 2.0 * x).collect();
        match dtype {
            DType::F32 => HostQ::F32(v),
            DType::F16 => HostQ::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => HostQ::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    fn src(&self, range: std::ops::Range<usize>) -> Src<'_> {
        match self {
            HostQ::F32(v) => Src::F32(&v[range]),
            HostQ::F16(v) => Src::F16(&v[range]),
            HostQ::Bf16(v) => Src::Bf16(&v[range]),
        }
    }

    fn len(&self) -> usize {
        match self {
            HostQ::F32(v) => v.len(),
            HostQ::F16(v) => v.len(),
            HostQ::Bf16(v) => v.len(),
        }
    }
}

/// An output buffer of `dtype` poisoned with NaN.
fn poisoned(cache: &BatchCache, dtype: DType, len: usize) -> DeviceBuffer {
    let s = cache.codec().stream();
    let mut b = DeviceBuffer::zeros(s, tqkv::cuda::BufferDType::Float(dtype), len).expect("alloc");
    b.fill_bytes(s, 0xFF).expect("poison");
    b
}

fn download_f32(cache: &BatchCache, buf: &DeviceBuffer, dtype: DType) -> Vec<f32> {
    let s = cache.codec().stream();
    match dtype {
        DType::F32 => buf.to_f32(s).expect("download"),
        DType::F16 => buf
            .to_f16(s)
            .expect("download")
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        DType::Bf16 => buf
            .to_bf16(s)
            .expect("download")
            .iter()
            .map(|x| x.to_f32())
            .collect(),
    }
}

/// One decode-attention case: sequences of the given lengths and modes, one query each.
struct Case {
    name: &'static str,
    kv: usize,
    gqa: usize,
    d: usize,
    bits: (u32, u32),
    cap: usize,
    seqs: Vec<(usize, CacheMode)>,
    cfg: AttentionConfig,
    dtype: DType,
}

impl Case {
    fn new(name: &'static str, kv: usize, gqa: usize, d: usize, bits: (u32, u32)) -> Self {
        Self {
            name,
            kv,
            gqa,
            d,
            bits,
            cap: 1024,
            seqs: vec![
                (1, CacheMode::Global),
                (7, CacheMode::Global),
                (1000, CacheMode::Global),
            ],
            cfg: AttentionConfig::new(d),
            dtype: DType::F32,
        }
    }
}

/// 33 mixed lengths up to `cap` (0, 1, 7, 1000 and pseudo-random others), all global.
fn mixed_lengths(cap: usize, seed: u64) -> Vec<(usize, CacheMode)> {
    let mut g = Gauss::new(seed);
    let mut v: Vec<usize> = vec![0, 1, 7, 1000.min(cap), cap];
    while v.len() < 33 {
        v.push(1 + (g.uniform() * (cap - 1) as f64) as usize);
    }
    v.into_iter().map(|n| (n, CacheMode::Global)).collect()
}

/// Runs a case; returns (whole-output relative L2 error, worst per-(sequence, head) error).
fn run_case(dev: &Arc<CudaDevice>, c: &Case) -> (f64, f64) {
    let l = layout(c.kv, c.d, c.cap, c.bits.0, c.bits.1);
    let heads = c.kv * c.gqa;
    let s_n = c.seqs.len();
    let mut batch = batch_cache(dev.clone(), l, s_n).expect("batch cache");
    let cpu: Vec<KvCache> = c
        .seqs
        .iter()
        .enumerate()
        .map(|(i, &(len, mode))| filled_cache(l, mode, len, 1000 + i as u64))
        .collect();
    for (i, cache) in cpu.iter().enumerate() {
        batch.upload(i, cache).expect("upload");
    }
    let per_q = heads * c.d;
    let q = HostQ::new(c.dtype, s_n * per_q, 77);
    assert_eq!(q.len(), s_n * per_q);
    let s = batch.codec().stream().clone();
    let q_dev = DeviceBuffer::from_src(&s, q.src(0..s_n * per_q)).expect("upload q");
    let mut out = poisoned(&batch, c.dtype, s_n * per_q);
    batch
        .attention(&q_dev, heads, &c.cfg, &mut out)
        .expect("gpu attention");
    let gpu = download_f32(&batch, &out, c.dtype);

    let (mut num, mut den, mut worst_head) = (0f64, 0f64, 0f64);
    for (i, cache) in cpu.iter().enumerate() {
        let g = &gpu[i * per_q..(i + 1) * per_q];
        if cache.is_empty() {
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{}: sequence {i} is empty, output must be exact zeros",
                c.name
            );
            continue;
        }
        let mut want = vec![0f32; per_q];
        attention(
            cache,
            q.src(i * per_q..(i + 1) * per_q),
            heads,
            &c.cfg,
            &mut want,
        )
        .expect("cpu attention");
        for h in 0..heads {
            let (gh, wh) = (&g[h * c.d..(h + 1) * c.d], &want[h * c.d..(h + 1) * c.d]);
            let (mut n2, mut d2) = (0f64, 0f64);
            for (&a, &b) in gh.iter().zip(wh) {
                assert!(
                    a.is_finite(),
                    "{}: seq {i} head {h}: non-finite output {a}",
                    c.name
                );
                n2 += (a as f64 - b as f64).powi(2);
                d2 += (b as f64).powi(2);
            }
            worst_head = worst_head.max((n2 / d2.max(1e-300)).sqrt());
            num += n2;
            den += d2;
        }
    }
    let rel = (num / den.max(1e-300)).sqrt();
    let splits = batch.decode_splits(heads, c.dtype, &c.cfg).expect("splits");
    println!(
        "{}: kv {} gqa {} d {} bits {}/{} {:?} seqs {} splits {splits}: rel L2 {rel:.2e}, worst head \
         {worst_head:.2e}",
        c.name,
        c.kv,
        c.gqa,
        c.d,
        c.bits.0,
        c.bits.1,
        c.dtype,
        s_n
    );
    let tol = TOL
        + match c.dtype {
            DType::F32 => 0.0,
            DType::F16 => 2f64.powi(-11),
            DType::Bf16 => 2f64.powi(-8),
        };
    assert!(
        rel <= tol,
        "{}: relative L2 error {rel:.3e} > {tol:.1e}",
        c.name
    );
    assert!(
        worst_head <= TOL_HEAD + tol,
        "{}: worst per-head error {worst_head:.3e}",
        c.name
    );
    (rel, worst_head)
}

fn run_cases(cases: &[Case]) {
    let Some(dev) = device() else { return };
    for c in cases {
        run_case(&dev, c);
    }
}

#[test]
fn decode_matches_cpu_attention_over_gqa_1_4_8_at_batch_33_with_mixed_lengths() {
    run_cases(&[1, 4, 8].map(|gqa| Case {
        cap: 3000,
        seqs: mixed_lengths(3000, gqa as u64),
        ..Case::new("batch 33 mixed", 2, gqa, 128, (4, 4))
    }));
}

#[test]
fn decode_matches_cpu_attention_at_head_dims_64_256_512() {
    run_cases(&[64, 256, 512].map(|d| Case::new("head_dim", 2, 4, d, (4, 4))));
}

#[test]
fn decode_matches_cpu_attention_at_bits_8_8_4_2_3_3_3_2_2_2_8_4_6_6_and_5_5() {
    run_cases(&[
        Case::new("bits 8/8", 2, 4, 128, (8, 8)),
        Case::new("bits 4/2", 2, 4, 128, (4, 2)),
        Case::new("bits 3/3", 2, 4, 128, (3, 3)),
        Case::new("bits 3/2 d64", 2, 4, 64, (3, 2)),
        Case::new("bits 2/2", 2, 4, 128, (2, 2)),
        // the 16-warp default of small batches: 8/4 fits; 6/6 and 5/5 need more shared memory
        // than the H100 grants a block and fall back to 8 warps
        Case::new("bits 8/4", 2, 4, 128, (8, 4)),
        Case::new("bits 6/6", 2, 4, 128, (6, 6)),
        Case::new("bits 5/5", 2, 4, 128, (5, 5)),
    ]);
}

#[test]
fn decode_matches_cpu_attention_over_70000_tokens() {
    run_cases(&[Case {
        cap: 70000,
        seqs: vec![(70000, CacheMode::Global)],
        ..Case::new("batch 1 x 70000", 2, 4, 128, (4, 4))
    }]);
}

#[test]
fn decode_of_wrapped_rings_attends_to_the_last_capacity_tokens() {
    let ring = CacheMode::Ring;
    run_cases(&[Case {
        cap: 1000,
        seqs: vec![
            (2500, ring),
            (999, ring),
            (1000, ring),
            (1001, ring),
            (7, ring),
            (3017, ring),
        ],
        ..Case::new("ring wrapped", 2, 4, 128, (4, 4))
    }]);
}

#[test]
fn decode_with_window_and_softcap_matches_cpu() {
    let cfg = AttentionConfig::new(128)
        .with_window(777)
        .with_softcap(20.0);
    run_cases(&[Case {
        cap: 3000,
        seqs: vec![
            (1, CacheMode::Global),
            (500, CacheMode::Global),
            (3000, CacheMode::Global),
        ],
        cfg,
        ..Case::new("window 777 + softcap 20", 2, 4, 128, (4, 4))
    }]);
}

#[test]
fn decode_mixes_ring_and_global_sequences_with_a_window_and_empty_ones() {
    let (g, r) = (CacheMode::Global, CacheMode::Ring);
    run_cases(&[Case {
        cap: 512,
        seqs: vec![(0, g), (300, g), (512, g), (0, r), (1300, r), (77, r)],
        cfg: AttentionConfig::new(128).with_window(300),
        ..Case::new("mixed modes, window 300", 2, 4, 128, (4, 4))
    }]);
}

#[test]
fn decode_with_f16_and_bf16_queries_writes_the_same_dtype() {
    run_cases(&[
        Case {
            dtype: DType::F16,
            ..Case::new("f16 q/out", 2, 4, 128, (4, 2))
        },
        Case {
            dtype: DType::Bf16,
            ..Case::new("bf16 q/out", 2, 4, 128, (8, 8))
        },
    ]);
}

#[test]
fn decode_of_all_empty_sequences_is_exact_zeros() {
    run_cases(&[Case {
        seqs: vec![(0, CacheMode::Global), (0, CacheMode::Ring)],
        ..Case::new("all empty", 2, 4, 128, (4, 4))
    }]);
}

#[test]
fn decode_params_mirror_has_the_kernels_size() {
    let Some(dev) = device() else { return };
    // The spread exact slots' larger shared memory keeps the occupancy on the H100 (228 KB per
    // SM); on smaller parts the launch falls back to exact blocks (smem_bytes_spread 0).
    let hopper = dev.compute_capability().0 >= 9;
    let batch = batch_cache(dev, layout(2, 128, 64, 4, 4), 1).expect("batch cache");
    for (heads, dtype) in [(8, DType::Bf16), (2, DType::F32)] {
        let info = batch.decode_kernel_info(heads, dtype).expect("kernel");
        assert_eq!(
            info.params_bytes as usize,
            std::mem::size_of::<DecodeParams>()
        );
        assert_eq!(info.params_bytes, 232);
        assert!(info.smem_bytes > 48 * 1024, "{info:?}");
        assert!(
            info.smem_bytes_spread > info.smem_bytes || (!hopper && info.smem_bytes_spread == 0),
            "spread exact slots unavailable: {info:?}"
        );
        assert!(info.blocks_per_sm >= 1, "{info:?}");
        println!("decode kernel heads {heads} {dtype:?}: {info:?}");
    }
}

/// Appends one token per sequence on the GPU and on the CPU; compares every plane byte.
fn assert_append_matches_cpu(dev: &Arc<CudaDevice>, l: CacheLayout, dtype: DType) {
    let (g, r) = (CacheMode::Global, CacheMode::Ring);
    let cap = l.capacity;
    let seqs = [
        (0, g),
        (3, g),
        (cap - 1, g),
        (0, r),
        (cap - 1, r),
        (cap, r),
        (2 * cap + 3, r),
    ];
    let (mut batch, mut cpu) = uploaded_batch_and_cpu(dev, l, &seqs, 500);
    let per = l.num_kv_heads * l.head_dim;
    let k = HostQ::new(dtype, seqs.len() * per, 11);
    let v = HostQ::new(dtype, seqs.len() * per, 12);
    let s = batch.codec().stream().clone();
    let k_dev = DeviceBuffer::from_src(&s, k.src(0..seqs.len() * per)).expect("upload");
    let v_dev = DeviceBuffer::from_src(&s, v.src(0..seqs.len() * per)).expect("upload");
    batch.append(&k_dev, &v_dev).expect("gpu append");
    batch.check_finite().expect("finite");
    for (i, c) in cpu.iter_mut().enumerate() {
        c.append(k.src(i * per..(i + 1) * per), v.src(i * per..(i + 1) * per))
            .expect("cpu append");
        assert_eq!(batch.lens()[i] as usize, c.len(), "seq {i} length");
        for side in [Side::Keys, Side::Values] {
            let (packed, norms) = batch.download(i, side).expect("download");
            let what = format!("{l:?} {dtype:?} seq {i} ({:?}) {side:?}", seqs[i]);
            assert!(packed == c.packed(side), "packed bytes differ: {what}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&norms), bits(c.norms(side)), "norms differ: {what}");
        }
    }
}

#[test]
fn batch_append_matches_cpu_quantize_bytes() {
    let Some(dev) = device() else { return };
    for (d, kb, vb, dtype) in [
        (128, 4, 4, DType::F32),
        (128, 8, 2, DType::F16),
        (64, 3, 5, DType::Bf16),
        (512, 6, 4, DType::F16),
        (32, 2, 8, DType::F32),
    ] {
        assert_append_matches_cpu(&dev, layout(3, d, 16, kb, vb), dtype);
    }
}

#[test]
fn decode_after_gpu_appends_matches_cpu_after_the_same_appends() {
    let Some(dev) = device() else { return };
    // 4/4 and 4/2 appends in one launch each (4/2: tq_quantize_batch_kv_mixed); a re-upload and
    // a reset between appends (the lengths after an append are written on the device into a
    // second buffer that the batch swaps in; an upload or reset writes the current one).
    for (kb, vb) in [(4, 4), (4, 2)] {
        let l = layout(2, 128, 64, kb, vb);
        let seqs = [
            (10, CacheMode::Global),
            (63, CacheMode::Ring),
            (0, CacheMode::Global),
        ];
        let (mut batch, mut cpu) = uploaded_batch_and_cpu(&dev, l, &seqs, 900);
        let per = l.num_kv_heads * l.head_dim;
        let heads = 8;
        let s = batch.codec().stream().clone();
        let cfg = AttentionConfig::new(128);
        for step in 0..5u64 {
            if step == 3 {
                cpu[0] = filled_cache(l, CacheMode::Global, 20, 950);
                batch.upload(0, &cpu[0]).expect("re-upload");
                cpu[2] = filled_cache(l, CacheMode::Ring, 0, 951);
                batch.reset(2, CacheMode::Ring).expect("reset");
            }
            let kv = HostQ::new(DType::F32, 2 * seqs.len() * per, 40 + step);
            let n = seqs.len() * per;
            let k_dev = DeviceBuffer::from_src(&s, kv.src(0..n)).expect("upload");
            let v_dev = DeviceBuffer::from_src(&s, kv.src(n..2 * n)).expect("upload");
            batch.append(&k_dev, &v_dev).expect("gpu append");
            let q = HostQ::new(DType::F32, seqs.len() * heads * 128, 60 + step);
            let q_dev = DeviceBuffer::from_src(&s, q.src(0..q.len())).expect("upload q");
            let mut out = poisoned(&batch, DType::F32, q.len());
            batch
                .attention(&q_dev, heads, &cfg, &mut out)
                .expect("gpu attention");
            let gpu = out.to_f32(&s).expect("download");
            for (i, c) in cpu.iter_mut().enumerate() {
                c.append(
                    kv.src(i * per..(i + 1) * per),
                    kv.src(n + i * per..n + (i + 1) * per),
                )
                .expect("cpu append");
                assert_eq!(
                    batch.lens()[i] as usize,
                    c.len(),
                    "{kb}/{vb} step {step} seq {i}: length"
                );
                let qn = heads * 128;
                let mut want = vec![0f32; qn];
                attention(c, q.src(i * qn..(i + 1) * qn), heads, &cfg, &mut want).expect("cpu");
                let g = &gpu[i * qn..(i + 1) * qn];
                let num: f64 = g
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum();
                let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
                let rel = (num / den).sqrt();
                assert!(
                    rel <= TOL,
                    "{kb}/{vb} step {step} seq {i}: relative L2 {rel:.3e}"
                );
            }
        }
    }
}

/// A batch cache holding `seqs` (length, mode), sequence i filled with seed `seed + i`.
fn uploaded_batch(
    dev: &Arc<CudaDevice>,
    l: CacheLayout,
    seqs: &[(usize, CacheMode)],
    seed: u64,
) -> BatchCache {
    uploaded_batch_and_cpu(dev, l, seqs, seed).0
}

/// [`uploaded_batch`] and the CPU caches it uploaded.
fn uploaded_batch_and_cpu(
    dev: &Arc<CudaDevice>,
    l: CacheLayout,
    seqs: &[(usize, CacheMode)],
    seed: u64,
) -> (BatchCache, Vec<KvCache>) {
    let mut batch = batch_cache(dev.clone(), l, seqs.len()).expect("batch cache");
    let cpu: Vec<KvCache> = seqs
        .iter()
        .enumerate()
        .map(|(i, &(len, mode))| filled_cache(l, mode, len, seed + i as u64))
        .collect();
    for (i, c) in cpu.iter().enumerate() {
        batch.upload(i, c).expect("upload");
    }
    (batch, cpu)
}

#[test]
fn last_block_merge_is_bit_identical_to_the_merge_launch_and_reusable_across_split_counts() {
    let Some(dev) = device() else { return };
    let l = layout(2, 128, 4096, 4, 4);
    let seqs = [(4000, CacheMode::Global), (1500, CacheMode::Global)];
    let mut batch = uploaded_batch(&dev, l, &seqs, 300);
    let heads = 8;
    let s = batch.codec().stream().clone();
    let q = HostQ::new(DType::F32, seqs.len() * heads * 128, 31);
    let q_dev = DeviceBuffer::from_src(&s, q.src(0..q.len())).expect("upload q");
    let full = AttentionConfig::new(128);
    let windowed = AttentionConfig {
        window: 300,
        ..AttentionConfig::new(128)
    };
    let run = |batch: &BatchCache, cfg: &AttentionConfig| -> Vec<u32> {
        let mut out = poisoned(batch, DType::F32, q.len());
        batch
            .attention(&q_dev, heads, cfg, &mut out)
            .expect("gpu attention");
        let o = out.to_f32(&s).expect("download");
        assert!(o.iter().all(|x| x.is_finite()), "non-finite output");
        o.iter().map(|x| x.to_bits()).collect()
    };
    let mut v = batch
        .decode_kernel_info(heads, DType::F32)
        .expect("kernel")
        .variant;
    v.merge_last = true;
    batch.set_decode_variant(Some(v)).expect("variant");
    let (sf, sw) = (
        batch
            .decode_splits(heads, DType::F32, &full)
            .expect("splits"),
        batch
            .decode_splits(heads, DType::F32, &windowed)
            .expect("splits"),
    );
    assert!(sf > sw && sf > 2, "splits full {sf}, windowed {sw}");
    let (a1, w1, a2, w2) = (
        run(&batch, &full),
        run(&batch, &windowed),
        run(&batch, &full),
        run(&batch, &windowed),
    );
    assert!(a1 == a2 && w1 == w2, "repeated calls differ");
    // A single split writes the output itself: the same bits as through a partial and the merge;
    // and more splits are close to it (other sums, other f16 roundings of the weights).
    batch.set_decode_splits(Some(1)).expect("splits");
    let (d_full, d_win) = (run(&batch, &full), run(&batch, &windowed));
    batch.set_direct_output(false);
    assert!(
        run(&batch, &full) == d_full && run(&batch, &windowed) == d_win,
        "one split: the direct output differs from the merge"
    );
    batch.set_direct_output(true);
    let mut by_splits = vec![d_full];
    for splits in [2, 5] {
        batch.set_decode_splits(Some(splits)).expect("splits");
        by_splits.push(run(&batch, &full));
    }
    batch.set_decode_splits(None).expect("splits");
    v.merge_last = false;
    batch.set_decode_variant(Some(v)).expect("variant");
    assert!(
        run(&batch, &full) == a1,
        "full context: merge launch differs"
    );
    assert!(run(&batch, &windowed) == w1, "window: merge launch differs");
    let a: Vec<f32> = a1.iter().map(|&b| f32::from_bits(b)).collect();
    let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (c, splits) in by_splits.iter().zip([1, 2, 5]) {
        let worst = a
            .iter()
            .zip(c.iter().map(|&b| f32::from_bits(b)))
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 2e-3 * scale,
            "{splits} splits: max difference {worst}, output scale {scale}"
        );
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_op_and_values() {
    let Some(dev) = device() else { return };
    let msg = |r: tqkv::Result<()>| r.expect_err("must fail").to_string();
    let l = layout(2, 128, 4, 4, 4);
    let mut batch = batch_cache(dev.clone(), l, 2).expect("batch cache");
    let s = batch.codec().stream().clone();
    let f32_buf = |n: usize| DeviceBuffer::from_f32(&s, &vec![0.5f32; n]).expect("alloc");
    let q = f32_buf(2 * 8 * 128);
    let mut out = f32_buf(2 * 8 * 128);
    let cfg = AttentionConfig::new(128);

    let e = msg(batch.attention(&q, 5, &cfg, &mut out));
    assert!(
        e.contains(
            "decode attention: num_heads (5) is not a positive multiple of num_kv_heads (2)"
        ),
        "{e}"
    );
    let e = msg(batch.attention(&f32_buf(2 * 18 * 128), 18, &cfg, &mut f32_buf(2 * 18 * 128)));
    assert!(
        e.contains("= 9 query heads") && e.contains("at most 8"),
        "{e}"
    );
    let e = msg(batch.attention(&q, 4, &cfg, &mut out));
    assert!(e.contains("q has 2048 elements, need 1024"), "{e}");
    let mut out16 =
        DeviceBuffer::from_src(&s, Src::F16(&vec![f16::ZERO; 2 * 8 * 128])).expect("alloc");
    let e = msg(batch.attention(&q, 8, &cfg, &mut out16));
    assert!(e.contains("out holds F16 but q holds F32"), "{e}");
    let e = msg(batch.attention(&q, 8, &cfg.with_scale(f32::NAN), &mut out));
    assert!(e.contains("scale must be finite, got NaN"), "{e}");
    let e = msg(batch.attention(&q, 8, &cfg.with_softcap(-1.0), &mut out));
    assert!(e.contains("softcap") && e.contains("-1"), "{e}");
    let packed = DeviceBuffer::from_u8(&s, &[0u8; 2048]).expect("alloc");
    let e = msg(batch.attention(&packed, 8, &cfg, &mut out));
    assert!(e.contains("q holds U8"), "{e}");

    let small = batch_cache(dev.clone(), layout(2, 32, 4, 4, 4), 1).expect("batch cache");
    let e = msg(small.attention(
        &f32_buf(2 * 32),
        2,
        &AttentionConfig::new(32),
        &mut f32_buf(2 * 32),
    ));
    assert!(e.contains("head_dim (32) must be in 64..=512"), "{e}");

    // A full global sequence rejects the append and nothing changes.
    let full = filled_cache(l, CacheMode::Global, 4, 1);
    batch.upload(1, &full).expect("upload");
    let tok = f32_buf(2 * 2 * 128);
    let e = msg(batch.append(&tok, &tok));
    assert!(
        e.contains("batch cache append: sequence 1 is full: len (4) = capacity (4)"),
        "{e}"
    );
    assert_eq!(batch.lens(), &[0, 4]);
    let e = msg(batch.append(&f32_buf(128), &tok));
    assert!(e.contains("k has 128 elements, need 512"), "{e}");

    let other = plain_cache(layout(2, 128, 4, 8, 4));
    let e = msg(batch.upload(0, &other));
    assert!(
        e.contains("batch cache upload") && e.contains("differs"),
        "{e}"
    );
    let e = msg(batch.upload(2, &full));
    assert!(e.contains("sequence 2 out of range (num_seqs 2)"), "{e}");
    let mut truncated = filled_cache(l, CacheMode::Ring, 9, 2);
    truncated.truncate(7).expect("truncate");
    let e = msg(batch.upload(0, &truncated));
    assert!(
        e.contains("retains positions 5..7") && e.contains("must retain 3..7"),
        "{e}"
    );
    let mut centered = KvCache::with_options(l, tqkv::CacheOptions::default()).expect("cache");
    let tok = Gauss::new(3).vec(2 * 2 * 128);
    centered
        .append(Src::F32(&tok), Src::F32(&tok))
        .expect("append");
    let e = msg(batch.upload(0, &centered));
    assert!(
        e.contains("the cache has center_keys=true, sinks=1")
            && e.contains("the batch has center_keys=false, sinks=0"),
        "{e}"
    );
}

#[test]
fn every_decode_kernel_variant_compiles_with_nvrtc_and_fits_shared_memory() {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        if require_gpu() {
            panic!("TQ_REQUIRE_GPU=1 but libnvrtc does not load");
        }
        println!("skipping: no CUDA device (libnvrtc does not load)");
        return;
    }
    // The variants the tests above and `tqkv bench decode` launch (WARPS, STAGES, MIN_BLOCKS as
    // chosen by src/cuda/decode.rs, and the previous 4-warp defaults), plus the batch quantize
    // entry.
    let variants: &[[i64; 8]] = &[
        // [k_bits, v_bits, head_dim, gqa, dtype, warps, stages, min_blocks]
        [4, 4, 128, 1, 0, 8, 2, 2],
        [4, 4, 128, 4, 0, 8, 2, 2],
        [4, 4, 128, 8, 0, 8, 2, 2],
        [4, 4, 128, 4, 2, 8, 2, 2],
        [4, 4, 128, 4, 2, 4, 2, 3],
        [4, 4, 64, 4, 0, 8, 2, 2],
        [4, 4, 256, 4, 0, 4, 2, 1],
        [4, 4, 512, 4, 0, 4, 2, 1],
        [8, 8, 128, 4, 0, 4, 2, 4],
        [8, 8, 128, 4, 2, 4, 2, 4],
        [8, 8, 128, 4, 2, 4, 4, 2],
        [4, 2, 128, 4, 0, 8, 2, 2],
        [4, 2, 128, 4, 1, 8, 2, 2],
        [4, 2, 128, 4, 2, 8, 2, 2],
        [3, 3, 128, 4, 0, 8, 2, 2],
        [3, 2, 64, 4, 0, 8, 2, 2],
        [2, 2, 128, 4, 0, 8, 2, 2],
        // one 16-warp block per SM (the default for small batches)
        [4, 4, 128, 4, 2, 16, 2, 1],
        [4, 4, 64, 8, 0, 16, 2, 1],
        [4, 2, 128, 4, 2, 16, 2, 1],
        [3, 3, 128, 1, 1, 16, 2, 1],
        [8, 4, 128, 4, 2, 16, 2, 1],
        [6, 4, 128, 4, 2, 16, 2, 1],
        [6, 6, 64, 4, 0, 16, 2, 1],
        [2, 2, 128, 4, 0, 16, 2, 1],
        // (5 and 6 bits at head_dim 128 fall back to 8 warps: 16 would need 265-271 KB)
        [6, 6, 128, 4, 2, 8, 2, 2],
        [5, 5, 128, 8, 2, 8, 2, 2],
    ];
    // Each with the byte-field tables (LUT256) and transposed products (TRANS) off and on; 4/4 and
    // 8/8 also with one of them. The last-block merge (MERGE_LAST) and the row-order V stage
    // (VROWS) go with TRANS.
    let flags = |kb: i64, vb: i64| -> &'static [(i64, i64)] {
        if kb == vb && (kb == 4 || kb == 8) {
            &[(0, 0), (1, 1), (1, 0), (0, 1)]
        } else {
            &[(0, 0), (1, 1)]
        }
    };
    let keys = variants
        .iter()
        .flat_map(|&[kb, vb, d, gqa, dt, w, st, mb]| {
            flags(kb, vb).iter().map(move |&(lut, tr)| KernelKey {
                family: Family::Decode,
                defines: vec![
                    ("K_BITS", kb),
                    ("V_BITS", vb),
                    ("HEAD_DIM", d),
                    ("GQA", gqa),
                    ("DTYPE", dt),
                    ("WARPS", w),
                    ("STAGES", st),
                    ("MIN_BLOCKS", mb),
                    ("LUT256", lut),
                    ("TRANS", tr),
                    ("MERGE_LAST", tr),
                    ("VROWS", tr),
                ],
            })
        });
    for key in keys {
        let text = compile_ptx(&key, "compute_90a")
            .unwrap_or_else(|e| panic!("{e}"))
            .to_src();
        let smem: u32 = text
            .lines()
            .find_map(|l| {
                let rest = l.split("tq_decode_smem_bytes = ").nth(1)?;
                rest.trim_end_matches(';').trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("{key}: no tq_decode_smem_bytes in the PTX"));
        assert!(smem <= 227 * 1024, "{key}: {smem} bytes of shared memory");
        assert!(text.contains(".entry tq_decode_merge"), "{key}");
    }
    let key = KernelKey {
        family: Family::QuantizeBatch,
        defines: vec![
            ("HEAD_DIM", 128),
            ("LANE_ELEMS", 16),
            ("BITS", 4),
            ("IN_DTYPE", 1),
            ("VPW", 1),
        ],
    };
    let text = compile_ptx(&key, "compute_90a")
        .unwrap_or_else(|e| panic!("{e}"))
        .to_src();
    assert!(
        text.contains(".entry tq_quantize_batch") && !text.contains(".local"),
        "{key}"
    );
}

#[test]
fn copy_sequence_places_device_planes_like_upload() {
    let Some(dev) = device() else { return };
    let l = layout(2, 64, 32, 4, 8);
    let c = filled_cache(l, CacheMode::Ring, 40, 3);
    let mut batch = batch_cache(dev, l, 3).expect("batch cache");
    let s = batch.codec().stream().clone();
    let up8 = |v: &[u8]| DeviceBuffer::from_u8(&s, v).expect("upload");
    let up32 = |v: &[f32]| DeviceBuffer::from_f32(&s, v).expect("upload");
    let (kp, vp) = (up8(c.packed(Side::Keys)), up8(c.packed(Side::Values)));
    let (kn, vn) = (up32(c.norms(Side::Keys)), up32(c.norms(Side::Values)));
    let planes = tqkv::cuda::SeqPlanes {
        k_packed: &kp,
        k_norms: &kn,
        v_packed: &vp,
        v_norms: &vn,
    };
    batch
        .copy_sequence(2, planes, 40, CacheMode::Ring)
        .expect("copy");
    assert_eq!(batch.lens(), &[0, 0, 40]);
    assert_eq!(batch.modes()[2], CacheMode::Ring);
    for side in [Side::Keys, Side::Values] {
        let (packed, norms) = batch.download(2, side).expect("download");
        assert!(packed == c.packed(side), "{side:?} packed");
        assert_eq!(norms, c.norms(side), "{side:?} norms");
        let (empty, _) = batch.download(1, side).expect("download");
        assert!(
            empty.iter().all(|&b| b == 0),
            "{side:?}: sequence 1 untouched"
        );
    }
    let e = batch
        .copy_sequence(
            0,
            tqkv::cuda::SeqPlanes {
                k_packed: &vp,
                ..planes
            },
            40,
            CacheMode::Ring,
        )
        .expect_err("v plane as k")
        .to_string();
    assert!(
        e.contains("k_packed holds 4096 elements of U8, need 2048 of U8"),
        "{e}"
    );
}

#[test]
fn the_l2_policy_of_the_stream_changes_no_output_bit() {
    let Some(dev) = device() else { return };
    let l = layout(2, 128, 3000, 4, 2);
    let seqs = [(3000, CacheMode::Global), (777, CacheMode::Global)];
    let mut batch = uploaded_batch(&dev, l, &seqs, 500);
    let heads = 8;
    let s = batch.codec().stream().clone();
    let q = HostQ::new(DType::Bf16, seqs.len() * heads * 128, 41);
    let q_dev = DeviceBuffer::from_src(&s, q.src(0..q.len())).expect("upload q");
    let cfg = AttentionConfig::new(128);
    let e = batch
        .set_decode_splits(Some(0))
        .expect_err("0 splits")
        .to_string();
    assert!(e.contains("splits must be at least 1"), "{e}");
    let mut outs = Vec::new();
    for policy in [Some(true), Some(false), None] {
        batch.set_l2_evict_first(policy);
        let mut out = poisoned(&batch, DType::Bf16, q.len());
        batch
            .attention(&q_dev, heads, &cfg, &mut out)
            .expect("gpu attention");
        let o = download_f32(&batch, &out, DType::Bf16);
        assert!(
            o.iter().all(|x| x.is_finite()),
            "{policy:?}: non-finite output"
        );
        outs.push(o.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }
    assert_eq!(outs[0], outs[1], "evict-first vs evict-normal");
    assert_eq!(outs[0], outs[2], "evict-first vs the default");
}
