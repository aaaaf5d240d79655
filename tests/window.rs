//! Exact sinks and recent window: which segment holds each position, when tokens are
//! quantized, ring and truncate semantics across the frontier, attention across segments.

mod common;
use common::Gauss;
use half::{bf16, f16};
use tqkv::cpu::{attention_reference, attention_with, AttentionConfig, Simd};
use tqkv::{
    CacheLayout, CacheMode, CacheOptions, DType, Domain, Dst, KvCache, Segment, Side, Src, TqError,
};

const HEADS: usize = 2;
/// Fast path vs f64 reference on the same cache: f32 rounding only (see tests/attention.rs).
const TOL: f32 = 1e-5;

fn layout(d: usize, cap: usize, kb: u32, vb: u32, mode: CacheMode) -> CacheLayout {
    CacheLayout::new(HEADS, d, cap, kb, vb)
        .unwrap()
        .with_mode(mode)
}

/// `n` tokens `[n, HEADS, d]`, keys with a common offset (what centering removes).
fn kv(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut g = Gauss::new(seed);
    let k = (0..n * HEADS * d)
        .map(|i| 1.5 * g.next() + (i % d) as f32 * 0.05)
        .collect();
    (k, g.vec(n * HEADS * d))
}

fn span(x: &[f32], d: usize, from: usize, to: usize) -> &[f32] {
    &x[from * HEADS * d..to * HEADS * d]
}

fn deq(c: &KvCache, side: Side, start: usize, n: usize, domain: Domain) -> Vec<f32> {
    let mut out = vec![f32::NAN; HEADS * n * c.layout().head_dim];
    c.dequantize(side, start, n, domain, Dst::F32(&mut out))
        .unwrap();
    out
}

fn all(c: &KvCache, side: Side) -> Vec<f32> {
    deq(c, side, c.first(), c.len() - c.first(), Domain::Original)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// `x: [n, HEADS, d]` rounded to f16, as `[HEADS, n, d]`.
fn f16_by_head(x: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for t in 0..n {
        for h in 0..HEADS {
            for j in 0..d {
                out[(h * n + t) * d + j] = f16::from_f32(x[(t * HEADS + h) * d + j]).to_f32();
            }
        }
    }
    out
}

fn kernels() -> Vec<Simd> {
    [Simd::Portable, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|s| s.is_supported())
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f32::max)
}

fn attend(c: &KvCache, q: &[f32], heads: usize, cfg: &AttentionConfig, simd: Simd) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    attention_with(c, Src::F32(q), heads, cfg, &mut out, simd).unwrap();
    out
}

fn reference(c: &KvCache, q: &[f32], heads: usize, cfg: &AttentionConfig) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    attention_reference(c, Src::F32(q), heads, cfg, &mut out).unwrap();
    out
}

fn is_invalid<T>(r: tqkv::Result<T>, needle: &str) -> bool {
    match r {
        Err(TqError::InvalidArgument(m)) => m.contains(needle) || panic!("message: {m}"),
        _ => false,
    }
}

fn append_chunks(c: &mut KvCache, k: &[f32], v: &[f32], d: usize, chunks: &[usize]) {
    let mut at = 0;
    for &n in chunks {
        c.append(
            Src::F32(span(k, d, at, at + n)),
            Src::F32(span(v, d, at, at + n)),
        )
        .unwrap();
        at += n;
    }
}

#[test]
fn a_token_is_quantized_when_it_leaves_the_window() {
    let d = 64;
    let opts = CacheOptions::plain().with_window(4).with_sinks(1);
    let mut c = KvCache::with_options(layout(d, 32, 4, 4, CacheMode::Global), opts).unwrap();
    let (k, v) = kv(12, d, 1);
    for t in 0..12 {
        append_chunks(&mut c, span(&k, d, t, 12), &v[t * HEADS * d..], d, &[1]);
        let len = t + 1;
        assert_eq!(c.frontier(), len.saturating_sub(4));
        for p in 0..len {
            let want = match p {
                0 => Segment::Sink,
                p if p + 4 < len => Segment::Packed,
                _ => Segment::Window,
            };
            assert_eq!(c.segment(p), want, "len {len} pos {p}");
        }
    }
    // Exact segments return the f16 rounding of the input; packed ones do not.
    let got = all(&c, Side::Keys);
    let exact = f16_by_head(&k, 12, d);
    for h in 0..HEADS {
        for p in 0..12 {
            let row = |x: &[f32]| x[(h * 12 + p) * d..][..d].to_vec();
            let is_exact = p == 0 || p >= 8;
            assert_eq!(same_bits(&row(&got), &row(&exact)), is_exact, "pos {p}");
        }
    }
}

#[test]
fn chunked_appends_give_the_same_cache_as_one_append() {
    let d = 64;
    let (k, v) = kv(40, d, 2);
    let mu: Vec<f32> = Gauss::new(3).vec(HEADS * d);
    let opts = CacheOptions::default().with_key_mean(mu);
    for mode in [CacheMode::Global, CacheMode::Ring] {
        let l = layout(d, 40, 4, 3, mode);
        let mut one = KvCache::with_options(l, opts.clone()).unwrap();
        append_chunks(&mut one, &k, &v, d, &[40]);
        for chunks in [vec![1; 40], vec![3, 7, 1, 29], vec![33, 7]] {
            let mut c = KvCache::with_options(l, opts.clone()).unwrap();
            append_chunks(&mut c, &k, &v, d, &chunks);
            assert_eq!(c.frontier(), one.frontier());
            for side in [Side::Keys, Side::Values] {
                assert!(same_bits(&all(&c, side), &all(&one, side)), "{chunks:?}");
            }
        }
    }
}

#[test]
fn a_window_larger_than_the_sequence_keeps_every_token_exact() {
    let d = 64;
    let l = layout(d, 16, 2, 2, CacheMode::Global);
    let mut c = KvCache::with_options(l, CacheOptions::default().with_window(100)).unwrap();
    let (k, v) = kv(10, d, 4);
    append_chunks(&mut c, &k, &v, d, &[10]);
    assert_eq!((c.frontier(), c.window()), (0, 16));
    assert!(same_bits(&all(&c, Side::Keys), &f16_by_head(&k, 10, d)));
    assert!(same_bits(&all(&c, Side::Values), &f16_by_head(&v, 10, d)));
    assert!(
        c.packed(Side::Keys).iter().all(|&b| b == 0),
        "nothing packed"
    );
    // 2-bit planes would be visible in the output: attention equals the exact reference.
    let q = Gauss::new(5).vec(3 * 4 * d);
    let cfg = AttentionConfig::new(d);
    for simd in kernels() {
        let err = rel_err(&attend(&c, &q, 4, &cfg, simd), &reference(&c, &q, 4, &cfg));
        assert!(err < TOL, "{simd:?}: {err}");
    }
}

#[test]
fn attention_matches_the_reference_across_sinks_packed_and_window() {
    for (kb, vb) in [(4, 4), (8, 4), (3, 3), (6, 4), (2, 5)] {
        for d in [64, 512] {
            for mode in [CacheMode::Global, CacheMode::Ring] {
                let l = layout(d, 48, kb, vb, mode);
                let opts = CacheOptions::default().with_window(8).with_sinks(2);
                let mut c = KvCache::with_options(l, opts).unwrap();
                let n = if mode == CacheMode::Ring { 70 } else { 45 };
                let (k, v) = kv(n, d, 6 + d as u64);
                append_chunks(&mut c, &k, &v, d, &[20, 1, n - 21]);
                let q = Gauss::new(7).vec(12 * 6 * d);
                for cfg in [
                    AttentionConfig::new(d),
                    AttentionConfig::new(d).with_window(30).with_softcap(5.0),
                ] {
                    let want = reference(&c, &q, 6, &cfg);
                    for simd in kernels() {
                        let err = rel_err(&attend(&c, &q, 6, &cfg, simd), &want);
                        assert!(
                            err < TOL,
                            "{kb}/{vb} d {d} {mode:?} {cfg:?} {simd:?}: {err}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_reference_sees_exact_tokens_as_stored() {
    // Reference over a cache with a window equals dense attention over the dequantized
    // segments: check one query against a hand-built mix.
    let d = 64;
    let l = layout(d, 20, 3, 3, CacheMode::Global);
    let mut c = KvCache::with_options(l, CacheOptions::default().with_window(4)).unwrap();
    let (k, v) = kv(20, d, 8);
    append_chunks(&mut c, &k, &v, d, &[20]);
    let (kd, vd) = (all(&c, Side::Keys), all(&c, Side::Values));
    let exact_k = f16_by_head(&k, 20, d);
    // Window 16..20 and the sink hold the inputs' f16 rounding.
    for p in [0, 16, 19] {
        assert_eq!(kd[p * d..][..d], exact_k[p * d..][..d]);
    }
    let q = Gauss::new(9).vec(HEADS * d);
    let cfg = AttentionConfig::new(d);
    let got = reference(&c, &q, HEADS, &cfg);
    for h in 0..HEADS {
        let qv = &q[h * d..][..d];
        let s: Vec<f64> = (0..20)
            .map(|t| {
                let kr = &kd[(h * 20 + t) * d..][..d];
                qv.iter()
                    .zip(kr)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * 0.125
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for j in 0..d {
            let o: f64 = (0..20)
                .map(|t| (s[t] - m).exp() / z * vd[(h * 20 + t) * d + j] as f64)
                .sum();
            assert!((o as f32 - got[h * d + j]).abs() < 1e-5);
        }
    }
}

#[test]
fn a_ring_keeps_exact_and_packed_tokens_right_across_wraps() {
    let d = 64;
    let l = layout(d, 10, 4, 4, CacheMode::Ring);
    let opts = CacheOptions::default().with_window(4).with_sinks(1);
    let mut c = KvCache::with_options(l, opts).unwrap();
    let (k, v) = kv(37, d, 10);
    append_chunks(&mut c, &k, &v, d, &[3, 9, 1, 1, 15, 8]);
    assert_eq!((c.first(), c.len(), c.frontier()), (27, 37, 33));
    // The newest 4 are exact; the retained older ones packed; the sink is gone.
    let got = deq(&c, Side::Values, 33, 4, Domain::Original);
    let want = f16_by_head(span(&v, d, 33, 37), 4, d);
    assert!(same_bits(&got, &want));
    assert!(c
        .dequantize(
            Side::Keys,
            0,
            1,
            Domain::Original,
            Dst::F32(&mut [0.0; HEADS * 64])
        )
        .is_err());
    let q = Gauss::new(11).vec(5 * 4 * d);
    let cfg = AttentionConfig::new(d).with_window(7);
    for simd in kernels() {
        let err = rel_err(&attend(&c, &q, 4, &cfg, simd), &reference(&c, &q, 4, &cfg));
        assert!(err < TOL, "{simd:?}: {err}");
    }
}

#[test]
fn truncating_into_the_window_keeps_its_exact_tokens_and_earlier_quantized_ones() {
    let d = 64;
    let l = layout(d, 32, 4, 4, CacheMode::Global);
    let opts = CacheOptions::default().with_window(8);
    let (k, v) = kv(20, d, 12);
    let (k2, v2) = kv(3, d, 13);
    let mut c = KvCache::with_options(l, opts).unwrap();
    append_chunks(&mut c, &k, &v, d, &[20]);
    let packed_before = deq(&c, Side::Keys, 0, 12, Domain::Original);
    c.truncate(15).unwrap();
    assert_eq!((c.len(), c.frontier()), (15, 12));
    append_chunks(&mut c, &k2, &v2, d, &[3]);
    // 18 tokens with a window of 8 would put the frontier at 10; 10 and 11 were quantized
    // before the truncate and stay quantized.
    assert_eq!((c.len(), c.frontier()), (18, 12));
    assert!(same_bits(
        &deq(&c, Side::Keys, 0, 12, Domain::Original),
        &packed_before
    ));
    let mut kk = span(&k, d, 12, 15).to_vec();
    kk.extend_from_slice(&k2);
    assert!(same_bits(
        &deq(&c, Side::Keys, 12, 6, Domain::Original),
        &f16_by_head(&kk, 6, d)
    ));
}

#[test]
fn truncating_below_the_frontier_keeps_quantized_positions_quantized() {
    let d = 64;
    let l = layout(d, 32, 3, 3, CacheMode::Global);
    let mu = Gauss::new(20).vec(HEADS * d);
    let opts = CacheOptions::default().with_window(4).with_key_mean(mu);
    let (k, v) = kv(26, d, 14);
    let mut c = KvCache::with_options(l, opts.clone()).unwrap();
    append_chunks(&mut c, &k, &v, d, &[20]);
    let before = deq(&c, Side::Keys, 0, 10, Domain::Original);
    c.truncate(10).unwrap();
    assert_eq!(c.frontier(), 10);
    assert_eq!(c.segment(9), Segment::Packed);
    assert!(same_bits(
        &deq(&c, Side::Keys, 0, 10, Domain::Original),
        &before
    ));
    // New tokens 10..16 enter the window; 10 and 11 leave it again, quantized once.
    append_chunks(&mut c, span(&k, d, 20, 26), span(&v, d, 20, 26), d, &[6]);
    assert_eq!((c.len(), c.frontier()), (16, 12));
    let mut kk = span(&k, d, 0, 10).to_vec();
    kk.extend_from_slice(span(&k, d, 20, 26));
    let mut vv = span(&v, d, 0, 10).to_vec();
    vv.extend_from_slice(span(&v, d, 20, 26));
    let mut direct = KvCache::with_options(l, opts).unwrap();
    append_chunks(&mut direct, &kk, &vv, d, &[10, 6]);
    for side in [Side::Keys, Side::Values] {
        assert!(same_bits(&all(&c, side), &all(&direct, side)));
    }
}

#[test]
fn memory_bytes_counts_the_exact_segments_and_the_mean() {
    for (d, kb, vb, w, s, cap) in [
        (64, 4, 4, 32, 1, 100),
        (128, 8, 4, 7, 3, 50),
        (64, 3, 3, 64, 4, 20),
    ] {
        let l = layout(d, cap, kb, vb, CacheMode::Ring);
        let opts = CacheOptions::default().with_window(w).with_sinks(s);
        let c = KvCache::with_options(l, opts.clone()).unwrap();
        let plain = KvCache::new(l).unwrap().memory_bytes();
        let exact = 2 * 2 * HEADS * (w.min(cap) + s.min(cap)) * d;
        let mean = 2 * 4 * HEADS * d;
        assert_eq!(c.memory_bytes(), plain + exact + mean);
        assert_eq!(c.memory_bytes(), opts.memory_bytes(&l));
        assert_eq!(
            CacheOptions::plain().memory_bytes(&l),
            plain,
            "plain options match KvCache::new"
        );
    }
}

#[test]
fn bf16_exact_segments_hold_the_bf16_rounding() {
    let d = 64;
    let l = layout(d, 8, 4, 4, CacheMode::Global);
    let opts = CacheOptions::default().with_exact_dtype(DType::Bf16);
    let mut c = KvCache::with_options(l, opts).unwrap();
    let (k, v) = kv(3, d, 15);
    append_chunks(&mut c, &k, &v, d, &[3]);
    let got = deq(&c, Side::Keys, 0, 3, Domain::Original);
    assert_eq!(got[d + 5], bf16::from_f32(k[HEADS * d + 5]).to_f32());
}

#[test]
fn values_outside_f16_are_an_error_that_leaves_the_cache_unchanged() {
    let d = 64;
    let l = layout(d, 8, 4, 4, CacheMode::Ring);
    let mut c = KvCache::with_options(l, CacheOptions::default().with_window(2)).unwrap();
    let (k, v) = kv(6, d, 16);
    append_chunks(&mut c, &k, &v, d, &[6]);
    let before = (all(&c, Side::Keys), c.len(), c.frontier());
    let (mut k2, v2) = kv(3, d, 17);
    k2[70] = 1e6;
    assert!(is_invalid(
        c.append(Src::F32(&k2), Src::F32(&v2)),
        "overflows the exact dtype F16"
    ));
    k2[70] = f32::NAN;
    assert!(is_invalid(
        c.append(Src::F32(&k2), Src::F32(&v2)),
        "not finite"
    ));
    assert_eq!((all(&c, Side::Keys), c.len(), c.frontier()), before);
}

#[test]
fn a_failed_quantize_in_a_ring_restores_the_overwritten_slots() {
    // bf16 holds 1e30, but its squares overflow the f32 norm: the quantize step fails.
    let d = 64;
    let l = layout(d, 6, 4, 4, CacheMode::Ring);
    let opts = CacheOptions::plain()
        .with_window(2)
        .with_exact_dtype(DType::Bf16);
    let mut c = KvCache::with_options(l, opts).unwrap();
    let (k, v) = kv(9, d, 18);
    append_chunks(&mut c, &k, &v, d, &[9]);
    let before = (
        c.packed(Side::Keys).to_vec(),
        c.norms(Side::Values).to_vec(),
        all(&c, Side::Values),
        c.frontier(),
    );
    let (mut k2, v2) = kv(4, d, 19);
    k2[3] = 1e30;
    assert!(c.append(Src::F32(&k2), Src::F32(&v2)).is_err());
    let after = (
        c.packed(Side::Keys).to_vec(),
        c.norms(Side::Values).to_vec(),
        all(&c, Side::Values),
        c.frontier(),
    );
    assert!(before == after, "the ring is as before the failed append");
}

#[test]
fn bad_options_are_rejected() {
    let l = layout(64, 8, 4, 4, CacheMode::Global);
    let bad = [
        (
            CacheOptions::default().with_exact_dtype(DType::F32),
            "exact_dtype",
        ),
        (
            CacheOptions::default().with_key_mean(vec![0.0; 5]),
            "key_mean has 5",
        ),
        (
            CacheOptions::default().with_key_mean(vec![f32::NAN; 128]),
            "not finite",
        ),
        (
            CacheOptions {
                center_keys: false,
                key_mean: Some(vec![0.0; 128]),
                ..CacheOptions::default()
            },
            "center_keys is off",
        ),
    ];
    for (opts, needle) in bad {
        assert!(
            is_invalid(KvCache::with_options(l, opts), needle),
            "{needle}"
        );
    }
}

mod random_ops {
    use super::*;
    use proptest::prelude::*;

    /// Append `n` tokens (clipped to a global cache's room) or truncate `back` tokens (clipped
    /// to the retained ones).
    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        Truncate(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1usize..12).prop_map(Op::Append),
            1 => (0usize..8).prop_map(Op::Truncate),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// After any sequence of appends and truncates: the segments partition the retained
        /// positions (`len − frontier ≤ W`), exact positions hold the f16 input of their
        /// token, and attention matches the reference.
        #[test]
        fn segments_stay_consistent(
            ring in any::<bool>(),
            window in 0usize..10,
            sinks in 0usize..3,
            ops in proptest::collection::vec(op(), 1..10),
        ) {
            let d = 32;
            let mode = if ring { CacheMode::Ring } else { CacheMode::Global };
            let l = layout(d, 24, 3, 4, mode);
            let mu = Gauss::new(30).vec(HEADS * d);
            let opts = CacheOptions::default()
                .with_window(window)
                .with_sinks(sinks)
                .with_key_mean(mu);
            let mut c = KvCache::with_options(l, opts).unwrap();
            // `tokens[p]`: the input row `[HEADS, d]` of position p (k, v).
            let mut tokens: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
            let mut seed = 100;
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let n = if ring { n } else { n.min(24 - c.len()) };
                        if n == 0 {
                            continue;
                        }
                        seed += 1;
                        let (k, v) = kv(n, d, seed);
                        c.append(Src::F32(&k), Src::F32(&v)).unwrap();
                        for t in 0..n {
                            tokens.push((span(&k, d, t, t + 1).to_vec(), span(&v, d, t, t + 1).to_vec()));
                        }
                    }
                    Op::Truncate(back) => {
                        let new_len = c.len().saturating_sub(back).max(c.first());
                        c.truncate(new_len).unwrap();
                        tokens.truncate(new_len);
                    }
                }
                let (first, len, frontier) = (c.first(), c.len(), c.frontier());
                prop_assert!(frontier <= len && len - frontier <= window.min(24));
                for (p, (k, _)) in tokens.iter().enumerate().take(len).skip(first) {
                    let seg = c.segment(p);
                    if seg == Segment::Packed {
                        continue;
                    }
                    let got = deq(&c, Side::Keys, p, 1, Domain::Original);
                    let want = f16_by_head(k, 1, d);
                    prop_assert!(same_bits(&got, &want), "pos {} ({:?})", p, seg);
                }
                if len > first {
                    let n_q = (len - first).min(3);
                    let q = Gauss::new(seed + 50).vec(n_q * 4 * d);
                    let cfg = AttentionConfig::new(d);
                    let err = rel_err(
                        &attend(&c, &q, 4, &cfg, Simd::Auto),
                        &reference(&c, &q, 4, &cfg),
                    );
                    prop_assert!(err < TOL, "attention: {}", err);
                }
            }
        }
    }
}
