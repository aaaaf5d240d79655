//! Pins the exact bytes the codec produces, so that optimizations (and the GPU kernels, which
//! mirror the CPU) cannot change results unnoticed. If a change of format is intended, update
//! the digests together with docs/FORMAT.md.
mod common;
use common::BITS;
use tqkv::rotation::splitmix64;
use tqkv::{cpu, CacheLayout, Codec, Domain, Dst, Side, Src};

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

fn digest(bits: u32, d: usize) -> u64 {
    let (heads, n) = (3, 17);
    let layout = CacheLayout::new(heads, d, n, bits, bits)
        .unwrap()
        .with_seed(42);
    let codec = Codec::new(layout).unwrap();
    // Inputs from integer arithmetic only (no libm), so the digests hold on any platform.
    let mut state = bits as u64 * 10_000 + d as u64;
    let x: Vec<f32> = (0..n * heads * d)
        .map(|i| {
            let u = (splitmix64(&mut state) >> 40) as f32 / (1u32 << 24) as f32 - 0.5;
            u * if i % 7 == 0 { 12.0 } else { 3.0 }
        })
        .collect();
    let mut packed = vec![0u8; layout.packed_len(Side::Keys)];
    let mut norms = vec![0f32; layout.norms_len()];
    cpu::quantize(
        &codec,
        Side::Keys,
        Src::F32(&x),
        n,
        0,
        &mut packed,
        &mut norms,
    )
    .unwrap();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut h, &packed);
    fnv(&mut h, bytemuck::cast_slice(&norms));
    for domain in [Domain::Rotated, Domain::Original] {
        let mut out = vec![0f32; heads * n * d];
        cpu::dequantize_seq(
            &codec,
            Side::Keys,
            &packed,
            &norms,
            0,
            n,
            domain,
            Dst::F32(&mut out),
        )
        .unwrap();
        fnv(&mut h, bytemuck::cast_slice(&out));
    }
    h
}

#[test]
fn codec_output_bytes_are_pinned() {
    let mut got = Vec::new();
    for bits in BITS {
        for d in [32, 64, 128, 256, 512, 1024] {
            got.push(format!("{bits}/{d}:{:016x}", digest(bits, d)));
        }
    }
    let got = got.join(" ");
    let want = include_str!("golden_digests.txt").trim();
    if std::env::var("TQ_PRINT_GOLDEN").is_ok() {
        println!("{got}");
    }
    assert_eq!(
        got, want,
        "codec output changed; set TQ_PRINT_GOLDEN=1 to see the new digests"
    );
}
