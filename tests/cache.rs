mod common;
use common::{Gauss, BITS};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use tqkv::{cpu, CacheLayout, CacheMode, Codec, Domain, Dst, KvCache, Side, Src, TqError};

const HEADS: usize = 2;

fn layout(d: usize, cap: usize, k_bits: u32, v_bits: u32, mode: CacheMode) -> CacheLayout {
    CacheLayout::new(HEADS, d, cap, k_bits, v_bits)
        .unwrap()
        .with_mode(mode)
}

/// `n` random tokens `[n, HEADS, d]`.
fn tokens(n: usize, d: usize, seed: u64) -> Vec<f32> {
    Gauss::new(seed).vec(n * HEADS * d)
}

/// Dequantizes `start..start + n` of `side` from the cache.
fn deq(c: &KvCache, side: Side, start: usize, n: usize, domain: Domain) -> Vec<f32> {
    let mut out = vec![f32::NAN; HEADS * n * c.layout().head_dim];
    c.dequantize(side, start, n, domain, Dst::F32(&mut out))
        .unwrap();
    out
}

/// What `cpu::quantize` + `cpu::dequantize_seq` give for `x: [n, HEADS, d]` in a fresh global
/// plane at positions `0..n`, `[HEADS, n, d]`.
fn direct(l: CacheLayout, side: Side, x: &[f32], n: usize, domain: Domain) -> Vec<f32> {
    let l = CacheLayout {
        capacity: n,
        mode: CacheMode::Global,
        ..l
    };
    let codec = Codec::new(l).unwrap();
    let mut packed = vec![0u8; l.packed_len(side)];
    let mut norms = vec![0f32; l.norms_len()];
    cpu::quantize(&codec, side, Src::F32(x), n, 0, &mut packed, &mut norms).unwrap();
    let mut out = vec![0f32; HEADS * n * l.head_dim];
    cpu::dequantize_seq(
        &codec,
        side,
        &packed,
        &norms,
        0,
        n,
        domain,
        Dst::F32(&mut out),
    )
    .unwrap();
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Tokens `from..to` of `x: [n, HEADS, d]`.
fn span(x: &[f32], d: usize, from: usize, to: usize) -> &[f32] {
    &x[from * HEADS * d..to * HEADS * d]
}

fn is_invalid(r: tqkv::Result<()>, needle: &str) -> bool {
    matches!(r, Err(TqError::InvalidArgument(m)) if m.contains(needle))
}

/// Bytes of every plane, to check that a failed call leaves the cache as it was.
fn snapshot(c: &KvCache) -> (Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>, usize, usize) {
    (
        c.packed(Side::Keys).to_vec(),
        c.packed(Side::Values).to_vec(),
        c.norms(Side::Keys).to_vec(),
        c.norms(Side::Values).to_vec(),
        c.len(),
        c.first(),
    )
}

#[test]
fn new_cache_is_empty_and_rejects_zero_sizes() {
    let c = KvCache::new(layout(64, 8, 4, 4, CacheMode::Global)).unwrap();
    assert_eq!((c.len(), c.first(), c.capacity()), (0, 0, 8));
    assert!(c.is_empty());
    for (heads, d, cap) in [(0, 64, 8), (2, 0, 8), (2, 64, 0)] {
        let l = CacheLayout::new(heads, d, cap, 4, 4).unwrap();
        assert!(matches!(KvCache::new(l), Err(TqError::InvalidArgument(_))));
    }
}

#[test]
fn memory_bytes_counts_every_plane_and_the_codec_tables() {
    for (d, kb, vb) in [(64, 4, 2), (128, 8, 3), (512, 5, 6)] {
        let l = layout(d, 37, kb, vb, CacheMode::Ring);
        let c = KvCache::new(l).unwrap();
        let planes = c.packed(Side::Keys).len()
            + c.packed(Side::Values).len()
            + 4 * (c.norms(Side::Keys).len() + c.norms(Side::Values).len());
        assert_eq!(planes, l.total_bytes());
        let tables = 4 * ((1usize << kb) + (1 << kb) - 1 + (1 << vb) + (1 << vb) - 1 + d);
        assert_eq!(c.memory_bytes(), planes + tables);
    }
}

#[test]
fn appended_tokens_dequantize_like_the_codec_ops() {
    for bits in BITS {
        for d in [64, 128, 512] {
            let (n, kb, vb) = (9, bits, if bits == 2 { 8 } else { 2 });
            let l = layout(d, 16, kb, vb, CacheMode::Global);
            let mut c = KvCache::new(l).unwrap();
            let (k, v) = (tokens(n, d, 1), tokens(n, d, 2));
            c.append(Src::F32(&k), Src::F32(&v)).unwrap();
            assert_eq!(c.len(), n);
            for domain in [Domain::Rotated, Domain::Original] {
                let got_k = deq(&c, Side::Keys, 0, n, domain);
                let got_v = deq(&c, Side::Values, 0, n, domain);
                assert!(same_bits(&got_k, &direct(l, Side::Keys, &k, n, domain)));
                assert!(same_bits(&got_v, &direct(l, Side::Values, &v, n, domain)));
            }
        }
    }
}

#[test]
fn appending_in_chunks_equals_appending_at_once() {
    for mode in [CacheMode::Global, CacheMode::Ring] {
        let (d, n) = (64, 13);
        let (k, v) = (tokens(n, d, 3), tokens(n, d, 4));
        let mut once = KvCache::new(layout(d, 16, 4, 3, mode)).unwrap();
        once.append(Src::F32(&k), Src::F32(&v)).unwrap();
        let mut chunked = KvCache::new(layout(d, 16, 4, 3, mode)).unwrap();
        for (a, b) in [(0, 1), (1, 5), (5, 5), (5, 13)] {
            chunked
                .append(Src::F32(span(&k, d, a, b)), Src::F32(span(&v, d, a, b)))
                .unwrap();
        }
        assert_eq!(snapshot(&once), snapshot(&chunked));
    }
}

#[test]
fn f16_and_bf16_inputs_equal_their_f32_widening() {
    let (d, n) = (128, 5);
    let (k, v) = (tokens(n, d, 5), tokens(n, d, 6));
    let (k16, v16): (Vec<f16>, Vec<f16>) = (
        k.iter().map(|&x| f16::from_f32(x)).collect(),
        v.iter().map(|&x| f16::from_f32(x)).collect(),
    );
    let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
        k.iter().map(|&x| bf16::from_f32(x)).collect(),
        v.iter().map(|&x| bf16::from_f32(x)).collect(),
    );
    let l = layout(d, 8, 4, 4, CacheMode::Global);
    let mut a = KvCache::new(l).unwrap();
    a.append(Src::F16(&k16), Src::F16(&v16)).unwrap();
    let mut b = KvCache::new(l).unwrap();
    let (kw, vw): (Vec<f32>, Vec<f32>) = (
        k16.iter().map(|x| x.to_f32()).collect(),
        v16.iter().map(|x| x.to_f32()).collect(),
    );
    b.append(Src::F32(&kw), Src::F32(&vw)).unwrap();
    assert_eq!(snapshot(&a), snapshot(&b));
    let mut a = KvCache::new(l).unwrap();
    a.append(Src::Bf16(&kb), Src::Bf16(&vb)).unwrap();
    let (kw, vw): (Vec<f32>, Vec<f32>) = (
        kb.iter().map(|x| x.to_f32()).collect(),
        vb.iter().map(|x| x.to_f32()).collect(),
    );
    let mut b = KvCache::new(l).unwrap();
    b.append(Src::F32(&kw), Src::F32(&vw)).unwrap();
    assert_eq!(snapshot(&a), snapshot(&b));
}

#[test]
fn empty_append_is_a_no_op() {
    let mut c = KvCache::new(layout(64, 4, 4, 4, CacheMode::Global)).unwrap();
    let before = snapshot(&c);
    c.append(Src::F32(&[]), Src::F32(&[])).unwrap();
    assert_eq!(snapshot(&c), before);
}

#[test]
fn bad_appends_fail_and_leave_the_cache_unchanged() {
    let d = 64;
    let mut c = KvCache::new(layout(d, 4, 4, 4, CacheMode::Global)).unwrap();
    let (k, v) = (tokens(3, d, 7), tokens(3, d, 8));
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    let before = snapshot(&c);
    let one = tokens(1, d, 9);
    let two = tokens(2, d, 10);
    assert!(is_invalid(
        c.append(Src::F32(&one), Src::F32(&two)),
        "k has 128 elements and v has 256"
    ));
    assert!(is_invalid(
        c.append(Src::F32(&one[..100]), Src::F32(&one[..100])),
        "not a multiple of num_kv_heads (2) × head_dim (64)"
    ));
    assert!(is_invalid(
        c.append(Src::F32(&two), Src::F32(&two)),
        "len (3) + n_new (2) > capacity (4) of a global cache"
    ));
    let mut bad = one.clone();
    bad[70] = f32::NAN;
    assert!(is_invalid(
        c.append(Src::F32(&one), Src::F32(&bad)),
        "non-finite"
    ));
    assert_eq!(snapshot(&c).4, before.4, "len unchanged");
    assert!(same_bits(
        &deq(&c, Side::Values, 0, 3, Domain::Rotated),
        &direct(*c.layout(), Side::Values, &v, 3, Domain::Rotated)
    ));
    c.append(Src::F32(&one), Src::F32(&one)).unwrap();
    assert_eq!(c.len(), 4);
}

#[test]
fn failed_ring_append_restores_the_overwritten_slots() {
    let d = 64;
    let mut c = KvCache::new(layout(d, 4, 4, 4, CacheMode::Ring)).unwrap();
    let (k, v) = (tokens(6, d, 11), tokens(6, d, 12));
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    let before = snapshot(&c);
    // Three new tokens; the value of the last one is infinite: keys are written, values fail.
    let (nk, mut nv) = (tokens(3, d, 13), tokens(3, d, 14));
    nv[2 * HEADS * d + 5] = f32::INFINITY;
    assert!(is_invalid(
        c.append(Src::F32(&nk), Src::F32(&nv)),
        "input token 2, head 0 has a non-finite value"
    ));
    assert_eq!(snapshot(&c), before);
}

#[test]
fn ring_keeps_the_last_capacity_positions_in_their_slots() {
    let (d, cap) = (128, 5);
    let mut c = KvCache::new(layout(d, cap, 3, 5, CacheMode::Ring)).unwrap();
    let (k, v) = (tokens(12, d, 15), tokens(12, d, 16));
    for (a, b) in [(0, 3), (3, 9), (9, 12)] {
        c.append(Src::F32(span(&k, d, a, b)), Src::F32(span(&v, d, a, b)))
            .unwrap();
    }
    assert_eq!((c.len(), c.first()), (12, 7));
    for domain in [Domain::Rotated, Domain::Original] {
        // Positions 7..12 equal a fresh quantization of those tokens.
        let want_k = direct(*c.layout(), Side::Keys, span(&k, d, 7, 12), 5, domain);
        let want_v = direct(*c.layout(), Side::Values, span(&v, d, 7, 12), 5, domain);
        assert!(same_bits(&deq(&c, Side::Keys, 7, 5, domain), &want_k));
        assert!(same_bits(&deq(&c, Side::Values, 7, 5, domain), &want_v));
        // A sub-range that wraps (positions 9..12 live in slots 4, 0, 1).
        let sub = deq(&c, Side::Keys, 9, 3, domain);
        for h in 0..HEADS {
            assert!(same_bits(
                &sub[h * 3 * d..(h + 1) * 3 * d],
                &want_k[(h * 5 + 2) * d..(h * 5 + 5) * d]
            ));
        }
    }
}

#[test]
fn ring_append_longer_than_capacity_keeps_the_tail() {
    let (d, cap) = (64, 4);
    let (k, v) = (tokens(10, d, 17), tokens(10, d, 18));
    let mut c = KvCache::new(layout(d, cap, 4, 4, CacheMode::Ring)).unwrap();
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    assert_eq!((c.len(), c.first()), (10, 6));
    let want = direct(
        *c.layout(),
        Side::Keys,
        span(&k, d, 6, 10),
        4,
        Domain::Rotated,
    );
    assert!(same_bits(
        &deq(&c, Side::Keys, 6, 4, Domain::Rotated),
        &want
    ));
}

#[test]
fn dequantize_rejects_positions_not_retained_and_bad_dst() {
    let d = 64;
    let mut c = KvCache::new(layout(d, 4, 4, 4, CacheMode::Ring)).unwrap();
    let (k, v) = (tokens(6, d, 19), tokens(6, d, 20));
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    let mut out = vec![0f32; HEADS * 2 * d];
    let mut try_deq = |start, n| {
        c.dequantize(
            Side::Keys,
            start,
            n,
            Domain::Rotated,
            Dst::F32(&mut out[..HEADS * n * d]),
        )
    };
    assert!(is_invalid(
        try_deq(1, 2),
        "position 1 is no longer retained; this ring cache holds positions 2..6"
    ));
    assert!(is_invalid(try_deq(5, 2), "positions 5..7 end past len (6)"));
    assert!(try_deq(4, 2).is_ok());
    assert!(is_invalid(
        c.dequantize(Side::Keys, 4, 1, Domain::Rotated, Dst::F32(&mut out)),
        "dst has 256 elements, need 128"
    ));
}

#[test]
fn reset_empties_the_cache() {
    let d = 64;
    let mut c = KvCache::new(layout(d, 4, 4, 4, CacheMode::Ring)).unwrap();
    let (k, v) = (tokens(6, d, 21), tokens(6, d, 22));
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    c.reset();
    assert_eq!((c.len(), c.first()), (0, 0));
    assert!(c
        .dequantize(Side::Keys, 0, 1, Domain::Rotated, Dst::F32(&mut [0.0; 128]))
        .is_err());
    c.append(Src::F32(span(&k, d, 0, 2)), Src::F32(span(&v, d, 0, 2)))
        .unwrap();
    assert_eq!(c.len(), 2);
}

#[test]
fn truncate_then_append_equals_appending_the_accepted_tokens() {
    for mode in [CacheMode::Global, CacheMode::Ring] {
        let (d, cap) = (64, 8);
        let (k, v) = (tokens(7, d, 23), tokens(7, d, 24));
        let (rk, rv) = (tokens(3, d, 25), tokens(3, d, 26));
        // Speculation: tokens 0..5, then 3 drafts of which 1 is accepted, then tokens 5..7.
        let mut c = KvCache::new(layout(d, cap, 4, 4, mode)).unwrap();
        c.append(Src::F32(span(&k, d, 0, 5)), Src::F32(span(&v, d, 0, 5)))
            .unwrap();
        c.append(Src::F32(&rk), Src::F32(&rv)).unwrap();
        c.truncate(6).unwrap();
        c.append(Src::F32(span(&k, d, 5, 7)), Src::F32(span(&v, d, 5, 7)))
            .unwrap();
        let mut want_k = span(&k, d, 0, 5).to_vec();
        want_k.extend_from_slice(span(&rk, d, 0, 1));
        want_k.extend_from_slice(span(&k, d, 5, 7));
        assert_eq!(c.len(), 8);
        let want = direct(*c.layout(), Side::Keys, &want_k, 8, Domain::Original);
        assert!(same_bits(
            &deq(&c, Side::Keys, 0, 8, Domain::Original),
            &want
        ));
    }
}

#[test]
fn truncate_rejects_growing_and_positions_a_ring_overwrote() {
    let d = 64;
    let mut c = KvCache::new(layout(d, 4, 4, 4, CacheMode::Ring)).unwrap();
    let (k, v) = (tokens(6, d, 27), tokens(6, d, 28));
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    assert!(is_invalid(c.truncate(7), "new_len (7) > len (6)"));
    assert!(is_invalid(
        c.truncate(1),
        "new_len (1) is below the oldest retained position (2)"
    ));
    assert_eq!(c.len(), 6);
    c.truncate(3).unwrap();
    assert_eq!((c.len(), c.first()), (3, 2));
    // One retained position left (2); appending refills the window from there.
    c.append(Src::F32(span(&k, d, 3, 6)), Src::F32(span(&v, d, 3, 6)))
        .unwrap();
    assert_eq!((c.len(), c.first()), (6, 2));
    let want = direct(
        *c.layout(),
        Side::Values,
        span(&v, d, 2, 6),
        4,
        Domain::Rotated,
    );
    assert!(same_bits(
        &deq(&c, Side::Values, 2, 4, Domain::Rotated),
        &want
    ));
}

#[test]
fn ring_truncate_keeps_first_so_old_slots_are_not_resurrected() {
    let d = 64;
    let mut c = KvCache::new(layout(d, 4, 4, 4, CacheMode::Ring)).unwrap();
    let (k, v) = (tokens(6, d, 29), tokens(6, d, 30));
    c.append(Src::F32(&k), Src::F32(&v)).unwrap();
    c.truncate(4).unwrap();
    // Positions 2, 3 remain; slots of 0, 1 hold 4, 5 (dropped), never position 0 or 1 again.
    assert_eq!(c.first(), 2);
    assert!(c
        .dequantize(Side::Keys, 1, 1, Domain::Rotated, Dst::F32(&mut [0.0; 128]))
        .is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Truncate(usize),
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..7).prop_map(Op::Append),
        1 => (0usize..12).prop_map(Op::Truncate),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        rng_seed: RngSeed::Fixed(0x7e57_cace),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A model keeps every appended token; after each operation the cache's length, oldest
    /// retained position and retained contents (bit for bit) match it, and each rejected
    /// operation is the one the model rejects.
    #[test]
    fn cache_follows_a_model_of_appends_truncates_and_resets(
        ring in any::<bool>(),
        cap in 1usize..8,
        ops in prop::collection::vec(op(), 1..24),
        seed in any::<u64>(),
    ) {
        let d = 32;
        let tok = HEADS * d;
        let mode = if ring { CacheMode::Ring } else { CacheMode::Global };
        let l = layout(d, cap, 3, 4, mode);
        let mut c = KvCache::new(l).unwrap();
        let mut g = Gauss::new(seed);
        // The model: K and V of logical positions 0..len, `[len, HEADS, d]`, and `first`.
        let (mut mk, mut mv, mut first) = (Vec::new(), Vec::new(), 0usize);
        for op in ops {
            let len = mk.len() / tok;
            match op {
                Op::Append(n) => {
                    let (k, v) = (g.vec(n * tok), g.vec(n * tok));
                    let r = c.append(Src::F32(&k), Src::F32(&v));
                    if !ring && len + n > cap {
                        prop_assert!(r.is_err());
                    } else {
                        prop_assert!(r.is_ok());
                        mk.extend_from_slice(&k);
                        mv.extend_from_slice(&v);
                        if ring {
                            first = first.max((len + n).saturating_sub(cap));
                        }
                    }
                }
                Op::Truncate(t) => {
                    let r = c.truncate(t);
                    if t > len || t < first {
                        prop_assert!(r.is_err());
                    } else {
                        prop_assert!(r.is_ok());
                        mk.truncate(t * tok);
                        mv.truncate(t * tok);
                    }
                }
                Op::Reset => {
                    c.reset();
                    mk.clear();
                    mv.clear();
                    first = 0;
                }
            }
            let len = mk.len() / tok;
            prop_assert_eq!((c.len(), c.first()), (len, first));
            if len > first {
                let n = len - first;
                for (side, m) in [(Side::Keys, &mk), (Side::Values, &mv)] {
                    let want = direct(l, side, &m[first * tok..len * tok], n, Domain::Rotated);
                    prop_assert!(same_bits(&deq(&c, side, first, n, Domain::Rotated), &want));
                }
            }
        }
    }
}

#[test]
fn a_cache_too_large_for_memory_is_an_error_not_an_abort() {
    let l = CacheLayout::new(1 << 16, 128, u32::MAX as usize, 8, 8).unwrap();
    let e = KvCache::new(l).unwrap_err().to_string();
    assert!(e.contains("kv cache: cannot allocate"), "{e}");
}
