mod common;
use common::{Gauss, BITS};
use half::{bf16, f16};
use proptest::prelude::*;
use tqkv::{cpu, CacheLayout, CacheMode, Codec, Domain, Dst, Side, Src};

/// A cache plane filled with `n` quantized random tokens.
struct Plane {
    codec: Codec,
    packed: Vec<u8>,
    norms: Vec<f32>,
}

fn plane(heads: usize, d: usize, cap: usize, bits: u32, mode: CacheMode, seed: u64) -> Plane {
    let layout = CacheLayout::new(heads, d, cap, bits, bits)
        .unwrap()
        .with_mode(mode);
    let codec = Codec::new(layout).unwrap();
    let mut p = Plane {
        packed: vec![0; layout.packed_len(Side::Keys)],
        norms: vec![0.0; layout.norms_len()],
        codec,
    };
    let x = Gauss::new(seed).vec(cap * heads * d);
    cpu::quantize(
        &p.codec,
        Side::Keys,
        Src::F32(&x),
        cap,
        0,
        &mut p.packed,
        &mut p.norms,
    )
    .unwrap();
    p
}

fn deq_seq(p: &Plane, start: usize, n: usize, domain: Domain) -> Vec<f32> {
    let l = p.codec.layout();
    let mut out = vec![f32::NAN; l.num_kv_heads * n * l.head_dim];
    cpu::dequantize_seq(
        &p.codec,
        Side::Keys,
        &p.packed,
        &p.norms,
        start,
        n,
        domain,
        Dst::F32(&mut out),
    )
    .unwrap();
    out
}

fn deq_pos(p: &Plane, pos: usize, domain: Domain) -> Vec<f32> {
    let l = p.codec.layout();
    let mut out = vec![f32::NAN; l.num_kv_heads * l.head_dim];
    cpu::dequantize_pos(
        &p.codec,
        Side::Keys,
        &p.packed,
        &p.norms,
        pos,
        domain,
        Dst::F32(&mut out),
    )
    .unwrap();
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn seq_with_one_token_is_byte_identical_to_per_position() {
    for bits in BITS {
        for d in [64, 128, 256, 512] {
            let p = plane(2, d, 8, bits, CacheMode::Global, 11);
            for pos in 0..8 {
                for domain in [Domain::Rotated, Domain::Original] {
                    let a = deq_pos(&p, pos, domain);
                    let b = deq_seq(&p, pos, 1, domain);
                    assert!(same_bits(&a, &b), "bits={bits} d={d} pos={pos} {domain:?}");
                    assert!(a.iter().all(|v| v.is_finite()));
                }
            }
        }
    }
}

#[test]
fn seq_with_many_tokens_equals_per_position_concatenated() {
    let (heads, n, start) = (2, 4, 2);
    for bits in BITS {
        for d in [64, 128, 256, 512] {
            let p = plane(heads, d, 8, bits, CacheMode::Global, 12);
            let seq = deq_seq(&p, start, n, Domain::Rotated);
            for t in 0..n {
                let pp = deq_pos(&p, start + t, Domain::Rotated);
                for h in 0..heads {
                    let s = &seq[(h * n + t) * d..(h * n + t + 1) * d];
                    assert!(
                        same_bits(&pp[h * d..(h + 1) * d], s),
                        "bits={bits} d={d} t={t} h={h}"
                    );
                }
            }
        }
    }
}

/// Mean ||x - x̂||² over random unit vectors, original domain.
fn unit_mse(d: usize, bits: u32, n: usize) -> f64 {
    let layout = CacheLayout::new(1, d, n, bits, bits).unwrap();
    let codec = Codec::new(layout).unwrap();
    let mut g = Gauss::new(1000 + d as u64 + bits as u64);
    let x: Vec<f32> = (0..n).flat_map(|_| g.unit(d)).collect();
    let mut packed = vec![0; layout.packed_len(Side::Values)];
    let mut norms = vec![0.0; layout.norms_len()];
    cpu::quantize(
        &codec,
        Side::Values,
        Src::F32(&x),
        n,
        0,
        &mut packed,
        &mut norms,
    )
    .unwrap();
    let mut out = vec![0f32; n * d];
    cpu::dequantize_seq(
        &codec,
        Side::Values,
        &packed,
        &norms,
        0,
        n,
        Domain::Original,
        Dst::F32(&mut out),
    )
    .unwrap();
    x.iter()
        .zip(&out)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / n as f64
}

#[test]
fn unit_vector_mse_matches_an_independent_implementation_within_2_percent() {
    let want = [
        (64, [0.1148, 0.03348, 0.009173]),
        (128, [0.1161, 0.03392, 0.009336]),
        (256, [0.1167, 0.03425, 0.009395]),
    ];
    for (d, mses) in want {
        for (bits, w) in [2, 3, 4].into_iter().zip(mses) {
            let got = unit_mse(d, bits, 20_000);
            assert!(
                (got - w).abs() / w < 0.02,
                "d={d} bits={bits}: mse {got}, want {w} ± 2%"
            );
        }
    }
}

#[test]
fn unit_vector_mse_stays_below_the_bound_at_5_6_8_bits() {
    for d in [64, 128, 256] {
        for (bits, bound) in [(5, 0.0026), (6, 0.00066), (8, 0.000043)] {
            let got = unit_mse(d, bits, 20_000);
            assert!(got < bound, "d={d} bits={bits}: mse {got} ≥ {bound}");
        }
    }
}

#[test]
fn large_head_dims_reconstruct_with_block_norms() {
    for d in [512, 1024] {
        for (bits, bound) in [(4, 0.0097), (8, 0.000043)] {
            let got = unit_mse(d, bits, 2_000);
            assert!(got < bound, "d={d} bits={bits}: mse {got}");
        }
    }
}

#[test]
fn f16_and_bf16_inputs_quantize_like_their_f32_values() {
    let layout = CacheLayout::new(2, 64, 4, 4, 4).unwrap();
    let codec = Codec::new(layout).unwrap();
    let x: Vec<f32> = Gauss::new(5).vec(4 * 2 * 64);
    let run = |src: Src| {
        let mut p = vec![0u8; layout.packed_len(Side::Keys)];
        let mut n = vec![0f32; layout.norms_len()];
        cpu::quantize(&codec, Side::Keys, src, 4, 0, &mut p, &mut n).unwrap();
        (p, n)
    };
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let hf: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    assert_eq!(run(Src::F16(&h)), run(Src::F32(&hf)));
    let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    assert_eq!(run(Src::Bf16(&b)), run(Src::F32(&bf)));
}

#[test]
fn f16_and_bf16_outputs_are_the_rounded_f32_outputs() {
    let p = plane(2, 128, 4, 4, CacheMode::Global, 3);
    let f = deq_seq(&p, 0, 4, Domain::Original);
    let mut h = vec![f16::ZERO; f.len()];
    let mut b = vec![bf16::ZERO; f.len()];
    cpu::dequantize_seq(
        &p.codec,
        Side::Keys,
        &p.packed,
        &p.norms,
        0,
        4,
        Domain::Original,
        Dst::F16(&mut h),
    )
    .unwrap();
    cpu::dequantize_seq(
        &p.codec,
        Side::Keys,
        &p.packed,
        &p.norms,
        0,
        4,
        Domain::Original,
        Dst::Bf16(&mut b),
    )
    .unwrap();
    for i in 0..f.len() {
        assert_eq!(h[i], f16::from_f32(f[i]));
        assert_eq!(b[i], bf16::from_f32(f[i]));
    }
}

#[test]
fn zero_vectors_stay_near_zero_and_finite() {
    let layout = CacheLayout::new(1, 64, 1, 4, 4).unwrap();
    let codec = Codec::new(layout).unwrap();
    let mut p = vec![0u8; layout.packed_len(Side::Keys)];
    let mut n = vec![1f32; layout.norms_len()];
    cpu::quantize(
        &codec,
        Side::Keys,
        Src::F32(&[0.0; 64]),
        1,
        0,
        &mut p,
        &mut n,
    )
    .unwrap();
    assert_eq!(n[0], 0.0);
    let mut out = [f32::NAN; 64];
    cpu::dequantize_pos(
        &codec,
        Side::Keys,
        &p,
        &n,
        0,
        Domain::Original,
        Dst::F32(&mut out),
    )
    .unwrap();
    assert!(out.iter().all(|v| *v == 0.0));
}

#[test]
fn ring_wraps_positions_modulo_capacity() {
    let (heads, d, cap) = (2, 64, 5);
    let layout = CacheLayout::new(heads, d, cap, 4, 4)
        .unwrap()
        .with_mode(CacheMode::Ring);
    let codec = Codec::new(layout).unwrap();
    let x = Gauss::new(9).vec(8 * heads * d); // tokens at positions 3..11
    let mut ring = (
        vec![0u8; layout.packed_len(Side::Keys)],
        vec![0f32; layout.norms_len()],
    );
    cpu::quantize(
        &codec,
        Side::Keys,
        Src::F32(&x),
        8,
        3,
        &mut ring.0,
        &mut ring.1,
    )
    .unwrap();
    // Only the last 5 tokens (positions 6..11) are kept, at slots 6%5.. = 1,2,3,4,0.
    let glayout = CacheLayout::new(heads, d, 1, 4, 4).unwrap();
    let gcodec = Codec::new(glayout).unwrap();
    for t in 3..8 {
        let pos = 3 + t;
        let one = &x[t * heads * d..(t + 1) * heads * d];
        let mut g = (
            vec![0u8; glayout.packed_len(Side::Keys)],
            vec![0f32; glayout.norms_len()],
        );
        cpu::quantize(&gcodec, Side::Keys, Src::F32(one), 1, 0, &mut g.0, &mut g.1).unwrap();
        let slot = pos % cap;
        let rb = layout.row_bytes(Side::Keys);
        for h in 0..heads {
            assert_eq!(
                &ring.0[(h * cap + slot) * rb..(h * cap + slot + 1) * rb],
                &g.0[h * rb..(h + 1) * rb]
            );
            assert_eq!(ring.1[h * cap + slot], g.1[h]);
        }
    }
}

#[test]
fn ring_accepts_a_write_past_capacity_and_global_rejects_it() {
    let x = Gauss::new(1).vec(64);
    for (mode, ok) in [(CacheMode::Ring, true), (CacheMode::Global, false)] {
        let layout = CacheLayout::new(1, 64, 4, 4, 4).unwrap().with_mode(mode);
        let codec = Codec::new(layout).unwrap();
        let mut p = vec![0u8; layout.packed_len(Side::Keys)];
        let mut n = vec![0f32; layout.norms_len()];
        let r = cpu::quantize(&codec, Side::Keys, Src::F32(&x), 1, 4, &mut p, &mut n);
        assert_eq!(r.is_ok(), ok, "{mode:?}");
        if let Err(e) = r {
            let e = e.to_string();
            assert!(e.contains("quantize") && e.contains("capacity (4)"), "{e}");
        }
    }
}

fn err_of(r: tqkv::Result<()>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn every_bad_argument_is_an_error_naming_the_op_and_values() {
    let layout = CacheLayout::new(2, 64, 4, 4, 4).unwrap();
    let c = Codec::new(layout).unwrap();
    let mut p = vec![0u8; layout.packed_len(Side::Keys)];
    let mut n = vec![0f32; layout.norms_len()];
    let x = vec![0.5f32; 2 * 2 * 64];
    let e = err_of(cpu::quantize(
        &c,
        Side::Keys,
        Src::F32(&x[1..]),
        2,
        0,
        &mut p,
        &mut n,
    ));
    assert!(
        e.contains("quantize: src has 255 elements, need 256"),
        "{e}"
    );
    let e = err_of(cpu::quantize(
        &c,
        Side::Keys,
        Src::F32(&x),
        2,
        0,
        &mut p[1..],
        &mut n,
    ));
    assert!(
        e.contains("packed buffer has 255 bytes, the layout needs 256"),
        "{e}"
    );
    let e = err_of(cpu::quantize(
        &c,
        Side::Keys,
        Src::F32(&x),
        2,
        0,
        &mut p,
        &mut n[..7],
    ));
    assert!(
        e.contains("norms buffer has 7 elements, the layout needs 8"),
        "{e}"
    );
    let e = err_of(cpu::quantize(
        &c,
        Side::Keys,
        Src::F32(&x),
        2,
        3,
        &mut p,
        &mut n,
    ));
    assert!(
        e.contains("write_pos (3) + n_tokens (2) > capacity (4)"),
        "{e}"
    );
    let e = err_of(cpu::quantize(
        &c,
        Side::Keys,
        Src::F32(&x),
        2,
        usize::MAX,
        &mut p,
        &mut n,
    ));
    assert!(e.contains("overflows"), "{e}");
    let mut bad = x.clone();
    bad[70] = f32::NAN;
    let e = err_of(cpu::quantize(
        &c,
        Side::Keys,
        Src::F32(&bad),
        2,
        0,
        &mut p,
        &mut n,
    ));
    assert!(
        e.contains("token 0, head 1") && e.contains("non-finite"),
        "{e}"
    );
    bad[70] = f32::INFINITY;
    assert!(cpu::quantize(&c, Side::Keys, Src::F32(&bad), 2, 0, &mut p, &mut n).is_err());

    let mut out = vec![0f32; 2 * 64];
    let e = err_of(cpu::dequantize_pos(
        &c,
        Side::Keys,
        &p,
        &n,
        4,
        Domain::Rotated,
        Dst::F32(&mut out),
    ));
    assert!(
        e.contains("dequantize_pos: start_pos (4) + n_tokens (1) > capacity (4)"),
        "{e}"
    );
    let e = err_of(cpu::dequantize_pos(
        &c,
        Side::Keys,
        &p,
        &n,
        0,
        Domain::Rotated,
        Dst::F32(&mut out[1..]),
    ));
    assert!(
        e.contains("dequantize_pos: dst has 127 elements, need 128"),
        "{e}"
    );
    let e = err_of(cpu::dequantize_seq(
        &c,
        Side::Keys,
        &p,
        &n,
        2,
        3,
        Domain::Rotated,
        Dst::F32(&mut out),
    ));
    assert!(
        e.contains("dequantize_seq: start_pos (2) + n_tokens (3) > capacity (4)"),
        "{e}"
    );
    let e = err_of(cpu::dequantize_seq(
        &c,
        Side::Keys,
        &p,
        &n,
        0,
        2,
        Domain::Rotated,
        Dst::F32(&mut out),
    ));
    assert!(e.contains("dst has 128 elements, need 256"), "{e}");
    let e = err_of(cpu::dequantize_seq(
        &c,
        Side::Keys,
        &p[..3],
        &n,
        0,
        1,
        Domain::Rotated,
        Dst::F32(&mut out),
    ));
    assert!(
        e.contains("dequantize_seq: packed buffer has 3 bytes"),
        "{e}"
    );
}

#[test]
fn bad_layouts_are_rejected() {
    let e = CacheLayout::new(1, 96, 4, 4, 4).unwrap_err().to_string();
    assert!(e.contains("head_dim") && e.contains("96"), "{e}");
    for d in [16, 2048] {
        assert!(CacheLayout::new(1, d, 4, 4, 4).is_err(), "head_dim {d}");
    }
    let e = CacheLayout::new(1, 64, 4, 7, 4).unwrap_err().to_string();
    assert!(e.contains("k_bits") && e.contains('7'), "{e}");
    let e = CacheLayout::new(1, 64, 4, 4, 1).unwrap_err().to_string();
    assert!(e.contains("v_bits"), "{e}");
    for sf in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let l = CacheLayout::new(1, 512, 4, 4, 4).unwrap();
        assert!(l.with_scale_factor_d512(sf).is_err(), "sf {sf}");
    }
    let e = CacheLayout::new(1, 64, 1usize << 40, 4, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("u32"), "{e}");
}

#[test]
fn zero_heads_head_dim_or_tokens_is_a_no_op() {
    for (heads, d) in [(0, 64), (2, 0)] {
        let layout = CacheLayout::new(heads, d, 4, 4, 4).unwrap();
        let c = Codec::new(layout).unwrap();
        cpu::quantize(&c, Side::Keys, Src::F32(&[]), 3, 0, &mut [], &mut []).unwrap();
        cpu::dequantize_seq(
            &c,
            Side::Keys,
            &[],
            &[],
            9,
            3,
            Domain::Original,
            Dst::F32(&mut []),
        )
        .unwrap();
    }
    let layout = CacheLayout::new(1, 64, 4, 4, 4).unwrap();
    let c = Codec::new(layout).unwrap();
    let mut p = vec![7u8; layout.packed_len(Side::Keys)];
    cpu::quantize(&c, Side::Keys, Src::F32(&[]), 0, 99, &mut p, &mut [0.0; 4]).unwrap();
    assert!(p.iter().all(|&b| b == 7), "nothing written");
    cpu::dequantize_seq(
        &c,
        Side::Keys,
        &p,
        &[0.0; 4],
        99,
        0,
        Domain::Rotated,
        Dst::F32(&mut []),
    )
    .unwrap();
}

#[test]
fn keys_and_values_use_their_own_bit_widths() {
    let layout = CacheLayout::new(1, 64, 2, 8, 2).unwrap();
    assert_eq!(layout.row_bytes(Side::Keys), 64);
    assert_eq!(layout.row_bytes(Side::Values), 16);
    assert_eq!(layout.bytes_per_token(), 64 + 16 + 8);
    let c = Codec::new(layout).unwrap();
    let x = Gauss::new(4).vec(2 * 64);
    let mut pk = vec![0u8; layout.packed_len(Side::Keys)];
    let mut pv = vec![0u8; layout.packed_len(Side::Values)];
    let (mut nk, mut nv) = (vec![0f32; 2], vec![0f32; 2]);
    cpu::quantize(&c, Side::Keys, Src::F32(&x), 2, 0, &mut pk, &mut nk).unwrap();
    cpu::quantize(&c, Side::Values, Src::F32(&x), 2, 0, &mut pv, &mut nv).unwrap();
    assert_eq!(nk, nv, "norms do not depend on bits");
    let err = |p: &[u8], side| {
        let mut o = vec![0f32; 2 * 64];
        cpu::dequantize_seq(&c, side, p, &nk, 0, 2, Domain::Original, Dst::F32(&mut o)).unwrap();
        x.iter().zip(&o).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
    };
    assert!(err(&pk, Side::Keys) * 100.0 < err(&pv, Side::Values));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x7471_6b76),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn quantize_in_pieces_equals_quantize_at_once(
        bits_i in 0usize..6, d_log in 5u32..9, heads in 1usize..4, cap in 1usize..12,
        n in 1usize..12, split in 0usize..12, start in 0usize..20, seed in any::<u64>(),
    ) {
        let (bits, d) = (BITS[bits_i], 1usize << d_log);
        let layout = CacheLayout::new(heads, d, cap, bits, bits).unwrap().with_mode(CacheMode::Ring).with_seed(seed);
        let c = Codec::new(layout).unwrap();
        let x = Gauss::new(seed).vec(n * heads * d);
        let split = split.min(n);
        let mut whole = (vec![0u8; layout.packed_len(Side::Keys)], vec![0f32; layout.norms_len()]);
        cpu::quantize(&c, Side::Keys, Src::F32(&x), n, start, &mut whole.0, &mut whole.1).unwrap();
        let mut parts = (vec![0u8; layout.packed_len(Side::Keys)], vec![0f32; layout.norms_len()]);
        let cut = split * heads * d;
        cpu::quantize(&c, Side::Keys, Src::F32(&x[..cut]), split, start, &mut parts.0, &mut parts.1).unwrap();
        cpu::quantize(&c, Side::Keys, Src::F32(&x[cut..]), n - split, start + split, &mut parts.0, &mut parts.1).unwrap();
        prop_assert_eq!(whole, parts);
    }

    /// Per-vector relative error stays within 32 D_b (the mean is ≈ D_b; the worst of 20,000
    /// Gaussian vectors measured 20 D_b at 5 bits, d = 64, from coordinates beyond the outermost
    /// centroid).
    #[test]
    fn dequantized_vectors_stay_within_a_small_multiple_of_the_distortion(
        bits_i in 0usize..6, d_log in 5u32..11, seed in any::<u64>(), scale in 1e-3f32..1e3,
    ) {
        let (bits, d) = (BITS[bits_i], 1usize << d_log);
        let layout = CacheLayout::new(1, d, 1, bits, bits).unwrap().with_seed(seed);
        let c = Codec::new(layout).unwrap();
        let x: Vec<f32> = Gauss::new(seed).vec(d).into_iter().map(|v| v * scale).collect();
        let mut p = vec![0u8; layout.packed_len(Side::Keys)];
        let mut nrm = vec![0f32; layout.norms_len()];
        cpu::quantize(&c, Side::Keys, Src::F32(&x), 1, 0, &mut p, &mut nrm).unwrap();
        let mut y = vec![0f32; d];
        cpu::dequantize_pos(&c, Side::Keys, &p, &nrm, 0, Domain::Original, Dst::F32(&mut y)).unwrap();
        let err: f64 = x.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let norm2: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        let d_b = tqkv::codebook::gaussian_distortion(tqkv::codebook::centroids_f64(bits).unwrap());
        prop_assert!(err / norm2 < 32.0 * d_b, "relative error {} vs D_b {}", err / norm2, d_b);
    }
}

#[test]
fn token_counts_whose_element_count_overflows_are_an_error() {
    let layout = CacheLayout::new(1, 32, 4, 8, 8)
        .unwrap()
        .with_mode(CacheMode::Ring);
    let c = Codec::new(layout).unwrap();
    let (mut p, mut n) = (vec![0u8; layout.packed_len(Side::Keys)], vec![0f32; 4]);
    let e = err_of(cpu::quantize(
        &c,
        Side::Keys,
        Src::F32(&[0.5; 32]),
        (1 << 59) + 1,
        0,
        &mut p,
        &mut n,
    ));
    assert!(
        e.contains("quantize: n_tokens (576460752303423489)") && e.contains("overflows"),
        "{e}"
    );
}

#[test]
fn byte_rows_ignore_the_high_bits_of_corrupt_bytes() {
    for bits in [5, 6] {
        let layout = CacheLayout::new(1, 32, 1, bits, bits).unwrap();
        let c = Codec::new(layout).unwrap();
        let dq = |byte: u8| {
            let mut out = vec![f32::NAN; 32];
            cpu::dequantize_pos(
                &c,
                Side::Keys,
                &[byte; 32],
                &[1.0],
                0,
                Domain::Rotated,
                Dst::F32(&mut out),
            )
            .unwrap();
            out
        };
        let mask = ((1u32 << bits) - 1) as u8;
        assert_eq!(dq(0xFF), dq(mask), "{bits}-bit");
        assert!(dq(0xFF).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn layouts_too_large_to_address_are_rejected() {
    let e = CacheLayout::new(1 << 29, 32, (1 << 29) - 1, 8, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("too large"), "{e}");
}
