mod common;
use common::{Gauss, BITS};
use half::f16;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use tqkv::cpu::{attention, attention_reference, attention_with, AttentionConfig, Simd};
use tqkv::{CacheLayout, CacheMode, KvCache, Src, TqError};

/// Tolerance of the fast path against the f64 reference on the same cache, relative to the
/// largest output magnitude: both compute the same math; they differ by f32 rounding (rotation,
/// dot products, exp, accumulation over up to a few hundred keys).
const TOL: f32 = 1e-5;

/// A cache of `n` random tokens and the f32 K/V that went in, `[n, kv, d]` each.
struct Setup {
    cache: KvCache,
    k: Vec<f32>,
    v: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn setup(
    kv: usize,
    d: usize,
    cap: usize,
    n: usize,
    kb: u32,
    vb: u32,
    mode: CacheMode,
    seed: u64,
) -> Setup {
    let l = CacheLayout::new(kv, d, cap, kb, vb)
        .unwrap()
        .with_mode(mode);
    let mut cache = KvCache::new(l).unwrap();
    let mut g = Gauss::new(seed);
    // Keys with a per-token offset pattern so that softmax weights are far from uniform.
    let k: Vec<f32> = g.vec(n * kv * d).iter().map(|x| 1.5 * x).collect();
    let v = g.vec(n * kv * d);
    cache.append(Src::F32(&k), Src::F32(&v)).unwrap();
    Setup { cache, k, v }
}

/// Every kernel set this CPU runs (portable, and AVX2 / AVX-512 where present).
fn kernels() -> Vec<Simd> {
    [Simd::Auto, Simd::Portable, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|s| s.is_supported())
        .collect()
}

fn queries(n_q: usize, heads: usize, d: usize, seed: u64) -> Vec<f32> {
    Gauss::new(seed).vec(n_q * heads * d)
}

fn run(c: &KvCache, q: &[f32], heads: usize, cfg: &AttentionConfig, simd: Simd) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    attention_with(c, Src::F32(q), heads, cfg, &mut out, simd).unwrap();
    out
}

fn reference(c: &KvCache, q: &[f32], heads: usize, cfg: &AttentionConfig) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    attention_reference(c, Src::F32(q), heads, cfg, &mut out).unwrap();
    out
}

/// max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    diff / scale
}

/// Dense causal attention in f64 over the original (uncompressed) K/V `[n, kv, d]`.
fn dense_original(s: &Setup, q: &[f32], heads: usize, cfg: &AttentionConfig) -> Vec<f32> {
    let l = s.cache.layout();
    let (kv, d, n) = (l.num_kv_heads, l.head_dim, s.cache.len());
    let n_q = q.len() / (heads * d);
    let mut out = vec![0f32; q.len()];
    for i in 0..n_q {
        let p = n - n_q + i;
        for h in 0..heads {
            let g = h / (heads / kv);
            let qv = &q[(i * heads + h) * d..][..d];
            let row = |x: &[f32], t: usize| x[(t * kv + g) * d..][..d].to_vec();
            let scores: Vec<f64> = (0..=p)
                .map(|t| {
                    let k = row(&s.k, t);
                    qv.iter()
                        .zip(&k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * cfg.scale as f64
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let o = &mut out[(i * heads + h) * d..][..d];
            for (t, wt) in w.iter().enumerate() {
                for (o, x) in o.iter_mut().zip(row(&s.v, t)) {
                    *o += (wt / sum * x as f64) as f32;
                }
            }
        }
    }
    out
}

fn is_invalid<T>(r: tqkv::Result<T>, needle: &str) -> bool {
    match r {
        Err(TqError::InvalidArgument(m)) => m.contains(needle) || panic!("message: {m}"),
        _ => false,
    }
}

#[test]
fn config_is_a_12_byte_pod_for_the_gpu() {
    assert_eq!(std::mem::size_of::<AttentionConfig>(), 12);
    let c = AttentionConfig::new(64).with_window(7).with_softcap(30.0);
    let words: &[u32] = bytemuck::cast_slice(std::slice::from_ref(&c));
    assert_eq!(words, &[0.125f32.to_bits(), 30f32.to_bits(), 7]);
}

#[test]
fn matches_the_reference_for_every_bit_width_and_head_dim() {
    for bits in BITS {
        for d in [32, 64, 128, 512] {
            let vb = if bits == 8 { 2 } else { bits };
            let s = setup(
                2,
                d,
                48,
                40,
                bits,
                vb,
                CacheMode::Global,
                bits as u64 * 100 + d as u64,
            );
            let q = queries(3, 4, d, 7);
            let cfg = AttentionConfig::new(d);
            let want = reference(&s.cache, &q, 4, &cfg);
            for simd in kernels() {
                let err = rel_err(&run(&s.cache, &q, 4, &cfg, simd), &want);
                assert!(err < TOL, "bits {bits} d {d} {simd:?}: {err}");
            }
        }
    }
}

#[test]
fn grouped_query_heads_read_their_kv_head() {
    let d = 64;
    for (kv, group) in [(3, 1), (3, 3), (2, 4), (1, 8)] {
        let heads = kv * group;
        let s = setup(kv, d, 64, 50, 4, 4, CacheMode::Global, 100 + heads as u64);
        let cfg = AttentionConfig::new(d);
        let q = queries(2, heads, d, 8);
        let got = run(&s.cache, &q, heads, &cfg, Simd::Auto);
        assert!(rel_err(&got, &reference(&s.cache, &q, heads, &cfg)) < TOL);
        // One query vector for every head: heads of one group agree, groups differ.
        let one = queries(1, 1, d, 9);
        let same: Vec<f32> = (0..heads).flat_map(|_| one.iter().copied()).collect();
        let out = run(&s.cache, &same, heads, &cfg, Simd::Auto);
        let head = |h: usize| &out[h * d..(h + 1) * d];
        for h in 0..heads {
            assert_eq!(head(h), head(h / group * group), "head {h}");
            if h >= group {
                assert_ne!(head(h), head(0), "head {h} reads kv head {}", h / group);
            }
        }
    }
}

#[test]
fn error_against_uncompressed_attention_shrinks_as_bits_grow() {
    let (d, n) = (128, 96);
    let cfg = AttentionConfig::new(d);
    let errs: Vec<f32> = [2, 4, 8]
        .iter()
        .map(|&b| {
            let s = setup(2, d, n, n, b, b, CacheMode::Global, 9);
            let q: Vec<f32> = queries(4, 4, d, 10).iter().map(|x| 2.0 * x).collect();
            rel_err(
                &run(&s.cache, &q, 4, &cfg, Simd::Auto),
                &dense_original(&s, &q, 4, &cfg),
            )
        })
        .collect();
    eprintln!("relative error vs uncompressed, 2/4/8 bits: {errs:?}");
    assert!(
        errs[0] > 2.0 * errs[1] && errs[1] > 4.0 * errs[2],
        "errors {errs:?}"
    );
    assert!(errs[2] < 0.02, "8-bit error {}", errs[2]);
}

#[test]
fn several_queries_are_causal() {
    let (d, n, n_q) = (64, 30, 5);
    let s = setup(2, d, 32, n, 4, 4, CacheMode::Global, 11);
    let q = queries(n_q, 2, d, 12);
    let cfg = AttentionConfig::new(d);
    let all = run(&s.cache, &q, 2, &cfg, Simd::Auto);
    for i in 0..n_q {
        // Query i alone on the cache cut right after its position gives the same bits.
        let mut cut = s.cache.clone();
        cut.truncate(n - n_q + i + 1).unwrap();
        let one = run(&cut, &q[i * 2 * d..(i + 1) * 2 * d], 2, &cfg, Simd::Auto);
        assert_eq!(&all[i * 2 * d..(i + 1) * 2 * d], &one[..], "query {i}");
    }
}

#[test]
fn ring_after_wrap_matches_the_reference_and_sees_only_retained_tokens() {
    let (d, cap) = (64, 16);
    for n in [16, 23, 40] {
        let s = setup(2, d, cap, n, 4, 3, CacheMode::Ring, 13 + n as u64);
        let q = queries(4, 6, d, 14);
        let cfg = AttentionConfig::new(d);
        let got = run(&s.cache, &q, 6, &cfg, Simd::Auto);
        assert!(rel_err(&got, &reference(&s.cache, &q, 6, &cfg)) < TOL);
        // Same as a global cache holding only the retained tokens.
        let l = CacheLayout::new(2, d, cap, 4, 3).unwrap();
        let mut g = KvCache::new(l).unwrap();
        let tail = (n - cap) * 2 * d;
        g.append(Src::F32(&s.k[tail..]), Src::F32(&s.v[tail..]))
            .unwrap();
        assert_eq!(got, run(&g, &q, 6, &cfg, Simd::Auto));
    }
}

#[test]
fn window_limits_each_query_to_the_last_w_positions() {
    let (d, n, w) = (64, 40, 9);
    let s = setup(1, d, 64, n, 4, 4, CacheMode::Global, 15);
    let q = queries(3, 2, d, 16);
    let cfg = AttentionConfig::new(d).with_window(w as u32);
    let got = run(&s.cache, &q, 2, &cfg, Simd::Auto);
    assert!(rel_err(&got, &reference(&s.cache, &q, 2, &cfg)) < TOL);
    // The last query equals attention over a cache of only the last w tokens.
    let mut last = KvCache::new(*s.cache.layout()).unwrap();
    last.append(Src::F32(&s.k[(n - w) * d..]), Src::F32(&s.v[(n - w) * d..]))
        .unwrap();
    let no_window = AttentionConfig::new(d);
    let want = run(&last, &q[2 * 2 * d..], 2, &no_window, Simd::Auto);
    assert_eq!(&got[2 * 2 * d..], &want[..]);
    assert_ne!(got, run(&s.cache, &q, 2, &no_window, Simd::Auto));
}

#[test]
fn softcap_matches_the_reference_and_changes_the_output() {
    let (d, n) = (64, 40);
    let s = setup(2, d, 64, n, 5, 4, CacheMode::Global, 17);
    let q: Vec<f32> = queries(2, 4, d, 18).iter().map(|x| 8.0 * x).collect();
    let cfg = AttentionConfig::new(d).with_softcap(5.0);
    for simd in kernels() {
        let got = run(&s.cache, &q, 4, &cfg, simd);
        assert!(rel_err(&got, &reference(&s.cache, &q, 4, &cfg)) < TOL);
    }
    let plain = run(&s.cache, &q, 4, &AttentionConfig::new(d), Simd::Auto);
    assert!(rel_err(&run(&s.cache, &q, 4, &cfg, Simd::Auto), &plain) > 0.01);
}

#[test]
fn window_and_softcap_together_in_a_ring_match_the_reference() {
    let (d, cap) = (128, 24);
    let s = setup(2, d, cap, 61, 4, 4, CacheMode::Ring, 19);
    let q: Vec<f32> = queries(6, 8, d, 20).iter().map(|x| 3.0 * x).collect();
    let cfg = AttentionConfig::new(d).with_window(10).with_softcap(20.0);
    let want = reference(&s.cache, &q, 8, &cfg);
    for simd in kernels() {
        assert!(rel_err(&run(&s.cache, &q, 8, &cfg, simd), &want) < TOL);
    }
}

#[test]
fn many_queries_in_parallel_equal_the_serial_items() {
    // 64 queries × 8 heads × 200 keys crosses the parallel threshold.
    let (d, n, n_q) = (64, 200, 64);
    let s = setup(2, d, n, n, 4, 4, CacheMode::Global, 21);
    let q = queries(n_q, 8, d, 22);
    let cfg = AttentionConfig::new(d);
    let all = run(&s.cache, &q, 8, &cfg, Simd::Auto);
    let i = n_q - 1;
    let one = run(&s.cache, &q[i * 8 * d..], 8, &cfg, Simd::Auto);
    assert_eq!(&all[i * 8 * d..], &one[..]);
    assert!(rel_err(&all, &reference(&s.cache, &q, 8, &cfg)) < TOL);
}

#[test]
fn f16_queries_equal_their_f32_widening() {
    let d = 64;
    let s = setup(1, d, 16, 10, 4, 4, CacheMode::Global, 23);
    let q16: Vec<f16> = queries(1, 2, d, 24)
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let q32: Vec<f32> = q16.iter().map(|x| x.to_f32()).collect();
    let cfg = AttentionConfig::new(d);
    let mut out = vec![0f32; q32.len()];
    attention(&s.cache, Src::F16(&q16), 2, &cfg, &mut out).unwrap();
    assert_eq!(out, run(&s.cache, &q32, 2, &cfg, Simd::Auto));
}

#[test]
fn every_kernel_set_gives_the_same_result_within_rounding() {
    for (kb, vb) in [(4, 4), (4, 2), (3, 4), (8, 5), (2, 3), (6, 8), (5, 6)] {
        for d in [32, 128, 512] {
            let s = setup(2, d, 40, 37, kb, vb, CacheMode::Ring, 40 + d as u64);
            let q = queries(3, 6, d, 41);
            let cfg = AttentionConfig::new(d).with_window(20);
            let base = run(&s.cache, &q, 6, &cfg, Simd::Portable);
            for simd in kernels() {
                let err = rel_err(&run(&s.cache, &q, 6, &cfg, simd), &base);
                assert!(err < TOL, "{kb}/{vb} d {d} {simd:?}: {err}");
                let err = rel_err(
                    &run(&s.cache, &q, 6, &cfg, simd),
                    &reference(&s.cache, &q, 6, &cfg),
                );
                assert!(err < TOL, "{kb}/{vb} d {d} {simd:?} vs reference: {err}");
            }
        }
    }
}

#[test]
fn unsupported_kernels_are_refused() {
    let s = setup(1, 64, 8, 4, 4, 4, CacheMode::Global, 42);
    let q = queries(1, 1, 64, 43);
    let mut out = vec![0f32; 64];
    for simd in [Simd::Avx2, Simd::Avx512] {
        let r = attention_with(
            &s.cache,
            Src::F32(&q),
            1,
            &AttentionConfig::new(64),
            &mut out,
            simd,
        );
        assert_eq!(r.is_ok(), simd.is_supported(), "{simd:?}");
    }
}

#[test]
fn no_queries_is_a_no_op() {
    let s = setup(1, 64, 16, 10, 4, 4, CacheMode::Global, 25);
    let mut out: Vec<f32> = vec![];
    attention(
        &s.cache,
        Src::F32(&[]),
        2,
        &AttentionConfig::new(64),
        &mut out,
    )
    .unwrap();
}

#[test]
fn bad_arguments_are_rejected() {
    let d = 64;
    let s = setup(3, d, 8, 6, 4, 4, CacheMode::Ring, 26);
    let cfg = AttentionConfig::new(d);
    let q = queries(2, 6, d, 27);
    let mut out = vec![0f32; q.len()];
    let c = &s.cache;
    let mut call = |q: &[f32], heads: usize, cfg: AttentionConfig, out_len: usize| {
        attention(c, Src::F32(q), heads, &cfg, &mut out[..out_len])
    };
    assert!(is_invalid(
        call(&q, 10, cfg, q.len()),
        "num_heads (10) is not a positive multiple of num_kv_heads (3)"
    ));
    assert!(is_invalid(
        call(&q, 0, cfg, q.len()),
        "num_heads (0) is not a positive multiple"
    ));
    assert!(is_invalid(
        call(&q, 3 << 60, cfg, q.len()),
        "num_heads (3458764513820540928) × head_dim (64) overflows"
    ));
    assert!(is_invalid(
        call(&q[..100], 6, cfg, 100),
        "q has 100 elements, not a multiple of num_heads (6) × head_dim (64)"
    ));
    assert!(is_invalid(
        call(&q, 6, cfg, q.len() - 1),
        "out has 767 elements, q has 768"
    ));
    assert!(is_invalid(
        call(&q, 6, cfg.with_scale(f32::NAN), q.len()),
        "scale must be finite"
    ));
    assert!(is_invalid(
        call(&q, 6, cfg.with_softcap(-1.0), q.len()),
        "softcap must be finite and > 0"
    ));
    let many = queries(7, 6, d, 28);
    let mut out7 = vec![0f32; many.len()];
    assert!(is_invalid(
        attention(c, Src::F32(&many), 6, &cfg, &mut out7),
        "n_q (7) > len (6)"
    ));
    // A ring of 4 slots after 6 tokens holds positions 2..6: at most 4 queries.
    let r = setup(1, d, 4, 6, 4, 4, CacheMode::Ring, 29);
    let q5 = queries(5, 1, d, 30);
    let mut out5 = vec![0f32; q5.len()];
    assert!(is_invalid(
        attention(&r.cache, Src::F32(&q5), 1, &cfg, &mut out5),
        "n_q (5) > retained positions (4): query 0 sits at position 1"
    ));
    assert!(is_invalid(
        attention_reference(&r.cache, Src::F32(&q5), 1, &cfg, &mut out5),
        "n_q (5) > retained positions (4)"
    ));
    let empty = KvCache::new(CacheLayout::new(1, d, 4, 4, 4).unwrap()).unwrap();
    let q1 = queries(1, 1, d, 31);
    let mut out1 = vec![0f32; d];
    assert!(is_invalid(
        attention(&empty, Src::F32(&q1), 1, &cfg, &mut out1),
        "n_q (1) > len (0)"
    ));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: RngSeed::Fixed(0xa77e_0001),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any layout, GQA group, cache fill (global or wrapped ring), number of queries, window
    /// and softcap: every kernel set matches the reference.
    #[test]
    fn matches_the_reference_for_any_shape_and_position(
        kv in 1usize..4,
        group in 1usize..5,
        d_log in 5u32..8,
        cap in 1usize..40,
        extra in 0usize..40,
        ring in any::<bool>(),
        q_frac in 0.0f64..1.0,
        window in 0u32..12,
        softcap in prop_oneof![Just(0.0f32), 1.0f32..50.0],
        (kb, vb) in (0usize..6, 0usize..6),
        seed in any::<u64>(),
    ) {
        let (d, heads) = (1usize << d_log, kv * group);
        let mode = if ring { CacheMode::Ring } else { CacheMode::Global };
        let n = if ring { 1 + extra } else { 1 + extra % cap };
        let s = setup(kv, d, cap, n, BITS[kb], BITS[vb], mode, seed);
        let retained = s.cache.len() - s.cache.first();
        let n_q = 1 + ((q_frac * retained as f64) as usize).min(retained - 1);
        let q = queries(n_q, heads, d, seed ^ 1);
        let cfg = AttentionConfig::new(d).with_window(window).with_softcap(softcap);
        let want = reference(&s.cache, &q, heads, &cfg);
        for simd in kernels() {
            let err = rel_err(&run(&s.cache, &q, heads, &cfg, simd), &want);
            prop_assert!(err < TOL, "{:?}: {}", simd, err);
        }
    }
}
