//! Key centering: μ estimated or given, keys quantized as k − μ, scores corrected by q·μ,
//! dequantize adds μ back.

mod common;
use common::Gauss;
use tqkv::cpu::{attention_reference, attention_with, AttentionConfig, Simd};
use tqkv::{CacheLayout, CacheOptions, Domain, Dst, KvCache, Side, Src};

const HEADS: usize = 2;

fn layout(d: usize, cap: usize, kb: u32, vb: u32) -> CacheLayout {
    CacheLayout::new(HEADS, d, cap, kb, vb).unwrap()
}

/// Keys `[n, HEADS, d]` with a large per-channel offset (what real keys have), values.
fn kv(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut g = Gauss::new(seed);
    let offset: Vec<f32> = (0..HEADS * d).map(|_| 3.0 * g.next()).collect();
    let k = (0..n * HEADS * d)
        .map(|i| g.next() + offset[i % (HEADS * d)])
        .collect();
    (k, g.vec(n * HEADS * d))
}

fn deq(c: &KvCache, side: Side, domain: Domain) -> Vec<f32> {
    let mut out = vec![f32::NAN; HEADS * c.len() * c.layout().head_dim];
    c.dequantize(side, 0, c.len(), domain, Dst::F32(&mut out))
        .unwrap();
    out
}

fn attend(c: &KvCache, q: &[f32], heads: usize, cfg: &AttentionConfig, simd: Simd) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    attention_with(c, Src::F32(q), heads, cfg, &mut out, simd).unwrap();
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f32::max)
}

fn kernels() -> Vec<Simd> {
    [Simd::Portable, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|s| s.is_supported())
        .collect()
}

/// Per-(head, channel) mean of `k: [n, HEADS, d]` in f64, rounded to f32.
fn mean(k: &[f32], n: usize, d: usize) -> Vec<f32> {
    (0..HEADS * d)
        .map(|c| ((0..n).map(|t| k[t * HEADS * d + c] as f64).sum::<f64>() / n as f64) as f32)
        .collect()
}

#[test]
fn centering_leaves_attention_over_unquantized_keys_bit_for_bit_unchanged() {
    let d = 64;
    let (k, v) = kv(20, d, 1);
    let q = Gauss::new(2).vec(5 * 4 * d);
    let cfg = AttentionConfig::new(d);
    let mut outs = Vec::new();
    for center in [false, true] {
        let opts = CacheOptions::default()
            .with_window(32)
            .with_center_keys(center);
        let mut c = KvCache::with_options(layout(d, 20, 4, 4), opts).unwrap();
        c.append(Src::F32(&k), Src::F32(&v)).unwrap();
        assert_eq!(c.key_mean().is_some(), center);
        outs.push(attend(&c, &q, 4, &cfg, Simd::Auto));
    }
    assert!(outs[0]
        .iter()
        .zip(&outs[1])
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn a_centered_cache_packs_k_minus_mu_and_scores_like_the_keys_as_given() {
    // Same packed bytes as a plain cache fed k − μ; the q·μ correction only shifts every
    // score of a query by the same constant, so the outputs agree within the f32 rounding of
    // the shifted scores (measured ~2e-7 relative).
    let d = 128;
    let n = 40;
    let (k, v) = kv(n, d, 3);
    let mu = mean(&k, n, d);
    let centered: Vec<f32> = k
        .iter()
        .enumerate()
        .map(|(i, x)| x - mu[i % (HEADS * d)])
        .collect();
    let l = layout(d, n, 4, 4);
    let opts = CacheOptions::plain().with_key_mean(mu.clone());
    let mut c = KvCache::with_options(l, opts).unwrap();
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    let mut p = KvCache::new(l).unwrap();
    p.append(Src::F32(&centered), Src::F32(&v)).unwrap();
    assert_eq!(c.packed(Side::Keys), p.packed(Side::Keys));
    assert_eq!(c.norms(Side::Keys), p.norms(Side::Keys));
    let q: Vec<f32> = Gauss::new(4)
        .vec(8 * 4 * d)
        .iter()
        .map(|x| 0.3 * x)
        .collect();
    let cfg = AttentionConfig::new(d);
    for simd in kernels() {
        let err = rel_err(
            &attend(&c, &q, 4, &cfg, simd),
            &attend(&p, &q, 4, &cfg, simd),
        );
        assert!(err < 1e-6, "{simd:?}: {err}");
    }
}

#[test]
fn dequantize_adds_the_mean_back_in_both_domains() {
    let d = 64;
    let n = 12;
    let (k, v) = kv(n, d, 5);
    let mu = mean(&k, n, d);
    let centered: Vec<f32> = k
        .iter()
        .enumerate()
        .map(|(i, x)| x - mu[i % (HEADS * d)])
        .collect();
    let l = layout(d, n, 3, 3);
    let mut c = KvCache::with_options(l, CacheOptions::plain().with_center_keys(true)).unwrap();
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    let mut p = KvCache::new(l).unwrap();
    p.append(Src::F32(&centered), Src::F32(&v)).unwrap();
    let mu_rot = c.key_mean_rotated().unwrap().to_vec();
    for (domain, m) in [(Domain::Original, &mu), (Domain::Rotated, &mu_rot)] {
        let got = deq(&c, Side::Keys, domain);
        let base = deq(&p, Side::Keys, domain);
        for h in 0..HEADS {
            for t in 0..n {
                for j in 0..d {
                    let at = (h * n + t) * d + j;
                    assert_eq!(got[at], base[at] + m[h * d + j]);
                }
            }
        }
        assert_eq!(deq(&c, Side::Values, domain), deq(&p, Side::Values, domain));
    }
}

#[test]
fn the_mean_is_estimated_from_the_first_append_and_kept_until_reset() {
    let d = 64;
    let (k, v) = kv(30, d, 6);
    let l = layout(d, 30, 4, 4);
    let mut c = KvCache::with_options(l, CacheOptions::default()).unwrap();
    assert!(c.key_mean().is_none());
    let pre = 10 * HEADS * d;
    c.append(Src::F32(&k[..pre]), Src::F32(&v[..pre])).unwrap();
    let mu = mean(&k[..pre], 10, d);
    assert_eq!(c.key_mean().unwrap(), &mu[..]);
    c.append(Src::F32(&k[pre..]), Src::F32(&v[pre..])).unwrap();
    assert_eq!(c.key_mean().unwrap(), &mu[..], "later appends keep μ");
    c.truncate(0).unwrap();
    assert_eq!(c.key_mean().unwrap(), &mu[..], "truncate keeps μ");
    c.reset();
    assert!(c.key_mean().is_none(), "reset forgets an estimated μ");
    let given = vec![0.5f32; HEADS * d];
    let mut g =
        KvCache::with_options(l, CacheOptions::default().with_key_mean(given.clone())).unwrap();
    g.append(Src::F32(&k), Src::F32(&v)).unwrap();
    g.reset();
    assert_eq!(g.key_mean().unwrap(), &given[..], "reset keeps a given μ");
}

#[test]
fn centering_shrinks_the_key_error_of_offset_keys() {
    let d = 64;
    let n = 64;
    let (k, v) = kv(n, d, 7);
    let err = |opts: CacheOptions| {
        let mut c = KvCache::with_options(layout(d, n, 4, 4), opts).unwrap();
        c.append(Src::F32(&k), Src::F32(&v)).unwrap();
        let got = deq(&c, Side::Keys, Domain::Original);
        let mut e2 = 0f64;
        for h in 0..HEADS {
            for t in 0..n {
                for j in 0..d {
                    let x = k[(t * HEADS + h) * d + j] as f64;
                    e2 += (got[(h * n + t) * d + j] as f64 - x).powi(2);
                }
            }
        }
        e2
    };
    let (plain, centered) = (
        err(CacheOptions::plain()),
        err(CacheOptions::plain().with_center_keys(true)),
    );
    assert!(
        centered < 0.5 * plain,
        "centered {centered} vs plain {plain}"
    );
}

#[test]
fn softcapped_attention_over_centered_keys_matches_the_reference() {
    // The q·μ correction goes in before the softcap, where shift invariance does not hold.
    let d = 64;
    let (k, v) = kv(50, d, 8);
    let l = layout(d, 50, 4, 4);
    let mut c = KvCache::with_options(l, CacheOptions::default().with_window(5)).unwrap();
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    let q = Gauss::new(9).vec(6 * 4 * d);
    let cfg = AttentionConfig::new(d).with_softcap(3.0);
    let mut want = vec![0f32; q.len()];
    attention_reference(&c, Src::F32(&q), 4, &cfg, &mut want).unwrap();
    for simd in kernels() {
        let err = rel_err(&attend(&c, &q, 4, &cfg, simd), &want);
        assert!(err < 1e-5, "{simd:?}: {err}");
    }
}

#[test]
fn a_non_finite_key_mean_is_an_error_that_leaves_the_cache_empty() {
    let d = 64;
    let (mut k, v) = kv(4, d, 10);
    k[7] = f32::INFINITY;
    let l = layout(d, 8, 4, 4);
    let mut c = KvCache::with_options(l, CacheOptions::plain().with_center_keys(true)).unwrap();
    match c.append(Src::F32(&k), Src::F32(&v)) {
        Err(tqkv::TqError::InvalidArgument(m)) => assert!(m.contains("key mean"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!((c.len(), c.key_mean()), (0, None));
}
