//! GPU parity: the CUDA kernels produce the CPU's exact bytes (packed indices, norms) and bits
//! (dequantized f32/f16/bf16). Skips without a GPU unless `TQ_REQUIRE_GPU=1`.

mod common;

use std::sync::Arc;

use common::{device, require_gpu, Gauss, BITS};
use half::{bf16, f16};
use tqkv::cuda::{compile_ptx, CudaCodec, CudaDevice, DeviceBuffer, Family, KernelKey};
use tqkv::{cpu, CacheLayout, CacheMode, Codec, DType, Domain, Dst, Side, Src};

fn layout(heads: usize, d: usize, cap: usize, kb: u32, vb: u32, mode: CacheMode) -> CacheLayout {
    CacheLayout::new(heads, d, cap, kb, vb)
        .expect("valid layout")
        .with_mode(mode)
}

/// Host input in one dtype, from Gaussian f32 values.
enum HostSrc {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl HostSrc {
    fn new(dtype: DType, n: usize, seed: u64) -> Self {
        let v = Gauss::new(seed).vec(n);
        match dtype {
            DType::F32 => HostSrc::F32(v),
            DType::F16 => HostSrc::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => HostSrc::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    fn src(&self) -> Src<'_> {
        match self {
            HostSrc::F32(v) => Src::F32(v),
            HostSrc::F16(v) => Src::F16(v),
            HostSrc::Bf16(v) => Src::Bf16(v),
        }
    }
}

/// Packed bytes and norm bits after quantizing on the CPU and on the GPU (both planes start
/// poisoned with 0xFF bytes, so unwritten slots must match too).
struct QuantOut {
    cpu_packed: Vec<u8>,
    cpu_norms: Vec<u32>,
    gpu_packed: Vec<u8>,
    gpu_norms: Vec<u32>,
}

fn quantize_both(
    dev: &Arc<CudaDevice>,
    l: CacheLayout,
    side: Side,
    src: Src<'_>,
    n_tokens: usize,
    write_pos: usize,
) -> QuantOut {
    let codec = Codec::new(l).expect("codec");
    let mut cpu_packed = vec![0xFFu8; l.packed_len(side)];
    let mut cpu_norms = vec![f32::from_bits(u32::MAX); l.norms_len()];
    cpu::quantize(
        &codec,
        side,
        src,
        n_tokens,
        write_pos,
        &mut cpu_packed,
        &mut cpu_norms,
    )
    .expect("cpu quantize");

    let gc = CudaCodec::new(dev.clone(), codec).expect("cuda codec");
    let s = gc.stream().clone();
    let src_d = DeviceBuffer::from_src(&s, src).expect("upload");
    let mut packed = DeviceBuffer::from_u8(&s, &vec![0u8; l.packed_len(side)]).expect("alloc");
    let mut norms = DeviceBuffer::from_f32(&s, &vec![0f32; l.norms_len()]).expect("alloc");
    packed.fill_bytes(&s, 0xFF).expect("poison");
    norms.fill_bytes(&s, 0xFF).expect("poison");
    gc.quantize(side, &src_d, n_tokens, write_pos, &mut packed, &mut norms)
        .expect("gpu quantize");
    gc.check_finite().expect("finite inputs");
    QuantOut {
        cpu_packed,
        cpu_norms: cpu_norms.iter().map(|x| x.to_bits()).collect(),
        gpu_packed: packed.to_bytes(&s).expect("download"),
        gpu_norms: norms
            .to_f32(&s)
            .expect("download")
            .iter()
            .map(|x| x.to_bits())
            .collect(),
    }
}

fn assert_quantize_parity(
    dev: &Arc<CudaDevice>,
    l: CacheLayout,
    side: Side,
    dtype: DType,
    n_tokens: usize,
    write_pos: usize,
    seed: u64,
) {
    let host = HostSrc::new(dtype, n_tokens * l.num_kv_heads * l.head_dim, seed);
    let o = quantize_both(dev, l, side, host.src(), n_tokens, write_pos);
    let what = format!("{l:?} {side:?} {dtype:?} n_tokens={n_tokens} write_pos={write_pos}");
    assert_eq!(o.gpu_norms, o.cpu_norms, "norms differ: {what}");
    if let Some(i) = (0..o.cpu_packed.len()).find(|&i| o.cpu_packed[i] != o.gpu_packed[i]) {
        panic!(
            "packed differs at byte {i} (cpu {:#x}, gpu {:#x}): {what}",
            o.cpu_packed[i], o.gpu_packed[i]
        );
    }
}

/// A fully written plane of one side, quantized on the CPU from Gaussian data.
fn cpu_plane(l: CacheLayout, side: Side, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let codec = Codec::new(l).expect("codec");
    let src = Gauss::new(seed).vec(l.capacity * l.num_kv_heads * l.head_dim);
    let mut packed = vec![0u8; l.packed_len(side)];
    let mut norms = vec![0f32; l.norms_len()];
    cpu::quantize(
        &codec,
        side,
        Src::F32(&src),
        l.capacity,
        0,
        &mut packed,
        &mut norms,
    )
    .expect("cpu quantize");
    (packed, norms)
}

/// Output bits (as u32 per element) of a dequantize on the CPU.
fn cpu_dequantize(
    l: CacheLayout,
    side: Side,
    plane: &(Vec<u8>, Vec<f32>),
    start: usize,
    n: usize,
    domain: Domain,
    dtype: DType,
) -> Vec<u32> {
    let codec = Codec::new(l).expect("codec");
    let len = l.num_kv_heads * n * l.head_dim;
    let (p, nr) = (&plane.0, &plane.1);
    match dtype {
        DType::F32 => {
            let mut o = vec![0f32; len];
            cpu::dequantize_seq(&codec, side, p, nr, start, n, domain, Dst::F32(&mut o)).unwrap();
            o.iter().map(|x| x.to_bits()).collect()
        }
        DType::F16 => {
            let mut o = vec![f16::ZERO; len];
            cpu::dequantize_seq(&codec, side, p, nr, start, n, domain, Dst::F16(&mut o)).unwrap();
            o.iter().map(|x| x.to_bits() as u32).collect()
        }
        DType::Bf16 => {
            let mut o = vec![bf16::ZERO; len];
            cpu::dequantize_seq(&codec, side, p, nr, start, n, domain, Dst::Bf16(&mut o)).unwrap();
            o.iter().map(|x| x.to_bits() as u32).collect()
        }
    }
}

fn download_bits(buf: &DeviceBuffer, gc: &CudaCodec) -> Vec<u32> {
    let s = gc.stream();
    match buf.dtype() {
        tqkv::cuda::BufferDType::Float(DType::F32) => {
            buf.to_f32(s).unwrap().iter().map(|x| x.to_bits()).collect()
        }
        tqkv::cuda::BufferDType::Float(DType::F16) => buf
            .to_f16(s)
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u32)
            .collect(),
        tqkv::cuda::BufferDType::Float(DType::Bf16) => buf
            .to_bf16(s)
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u32)
            .collect(),
        other => panic!("not a float buffer: {other:?}"),
    }
}

/// A poisoned (all-NaN) device output of `len` elements.
fn poisoned(gc: &CudaCodec, dtype: DType, len: usize) -> DeviceBuffer {
    let s = gc.stream();
    let mut b = DeviceBuffer::zeros(s, tqkv::cuda::BufferDType::Float(dtype), len).unwrap();
    b.fill_bytes(s, 0xFF).unwrap();
    b
}

struct GpuPlane {
    gc: CudaCodec,
    packed: DeviceBuffer,
    norms: DeviceBuffer,
}

fn gpu_plane(dev: &Arc<CudaDevice>, l: CacheLayout, plane: &(Vec<u8>, Vec<f32>)) -> GpuPlane {
    let gc = CudaCodec::new(dev.clone(), Codec::new(l).unwrap()).unwrap();
    let s = gc.stream().clone();
    GpuPlane {
        packed: DeviceBuffer::from_u8(&s, &plane.0).unwrap(),
        norms: DeviceBuffer::from_f32(&s, &plane.1).unwrap(),
        gc,
    }
}

impl GpuPlane {
    fn seq(&self, side: Side, start: usize, n: usize, domain: Domain, dtype: DType) -> Vec<u32> {
        let l = self.gc.codec().layout();
        let mut out = poisoned(&self.gc, dtype, l.num_kv_heads * n * l.head_dim);
        self.gc
            .dequantize_seq(side, &self.packed, &self.norms, start, n, domain, &mut out)
            .expect("gpu dequantize_seq");
        download_bits(&out, &self.gc)
    }

    fn pos(&self, side: Side, pos: usize, domain: Domain, dtype: DType) -> Vec<u32> {
        let l = self.gc.codec().layout();
        let mut out = poisoned(&self.gc, dtype, l.num_kv_heads * l.head_dim);
        self.gc
            .dequantize_pos(side, &self.packed, &self.norms, pos, domain, &mut out)
            .expect("gpu dequantize_pos");
        download_bits(&out, &self.gc)
    }
}

fn assert_dequantize_parity(dev: &Arc<CudaDevice>, l: CacheLayout, side: Side, dtype: DType) {
    let plane = cpu_plane(l, side, 0xDE0 + l.head_dim as u64 + l.bits(side) as u64);
    let g = gpu_plane(dev, l, &plane);
    let (start, n) = (1, l.capacity - 2);
    for domain in [Domain::Rotated, Domain::Original] {
        let want = cpu_dequantize(l, side, &plane, start, n, domain, dtype);
        let got = g.seq(side, start, n, domain, dtype);
        if let Some(i) = (0..want.len()).find(|&i| want[i] != got[i]) {
            panic!(
                "dequantize differs at element {i} (cpu {:#x}, gpu {:#x}): {l:?} {side:?} \
                 {domain:?} {dtype:?}",
                want[i], got[i]
            );
        }
    }
}

const HEAD_DIMS: [usize; 4] = [64, 128, 256, 512];

#[test]
fn quantize_matches_cpu_bytes_at_every_bit_width_and_head_dim() {
    let Some(dev) = device() else { return };
    for &bits in &BITS {
        for &d in &HEAD_DIMS {
            let l = layout(3, d, 16, bits, 8, CacheMode::Global);
            assert_quantize_parity(
                &dev,
                l,
                Side::Keys,
                DType::F32,
                7,
                2,
                bits as u64 * 1000 + d as u64,
            );
        }
    }
}

#[test]
fn quantize_matches_cpu_bytes_at_head_dims_32_and_1024() {
    let Some(dev) = device() else { return };
    for d in [32, 1024] {
        for bits in [3, 4] {
            let l = layout(2, d, 8, 2, bits, CacheMode::Global);
            assert_quantize_parity(&dev, l, Side::Values, DType::F32, 5, 1, 77 + d as u64);
        }
    }
}

#[test]
fn quantize_f16_and_bf16_inputs_match_cpu_bytes() {
    let Some(dev) = device() else { return };
    for dtype in [DType::F16, DType::Bf16] {
        for (d, bits) in [(128, 4), (128, 3), (64, 8), (512, 2)] {
            let l = layout(2, d, 9, bits, bits, CacheMode::Global);
            assert_quantize_parity(&dev, l, Side::Keys, dtype, 9, 0, 5 + bits as u64);
        }
    }
}

#[test]
fn ring_quantize_wraps_and_keeps_the_last_capacity_tokens_like_cpu() {
    let Some(dev) = device() else { return };
    for bits in [2, 4, 6] {
        let l = layout(3, 128, 8, bits, bits, CacheMode::Ring);
        // Wraps: positions 6..11 go to slots 6, 7, 0, 1, 2.
        assert_quantize_parity(&dev, l, Side::Keys, DType::F32, 5, 6, 11);
        // Longer than the window: only the last 8 of 19 tokens are written.
        assert_quantize_parity(&dev, l, Side::Values, DType::F16, 19, 3, 12);
        // A large logical position.
        assert_quantize_parity(&dev, l, Side::Keys, DType::F32, 3, (1 << 33) + 5, 13);
    }
}

#[test]
fn prefill_of_many_tokens_matches_cpu_in_one_launch() {
    let Some(dev) = device() else { return };
    // 40000 vectors: more than one grid-stride sweep of the launch.
    let l = layout(8, 64, 5000, 4, 4, CacheMode::Global);
    assert_quantize_parity(&dev, l, Side::Keys, DType::Bf16, 5000, 0, 99);
}

#[test]
fn dequantize_matches_cpu_bits_at_every_bit_width_head_dim_and_domain() {
    let Some(dev) = device() else { return };
    for &bits in &BITS {
        for &d in &HEAD_DIMS {
            let l = layout(3, d, 11, 8, bits, CacheMode::Global);
            assert_dequantize_parity(&dev, l, Side::Values, DType::F32);
        }
    }
    for d in [32, 1024] {
        let l = layout(2, d, 6, 3, 4, CacheMode::Global);
        assert_dequantize_parity(&dev, l, Side::Keys, DType::F32);
    }
}

#[test]
fn dequantize_f16_and_bf16_outputs_match_cpu_bits() {
    let Some(dev) = device() else { return };
    for dtype in [DType::F16, DType::Bf16] {
        for (d, bits) in [(128, 4), (128, 3), (64, 8), (512, 5), (32, 2)] {
            let l = layout(2, d, 7, bits, bits, CacheMode::Global);
            assert_dequantize_parity(&dev, l, Side::Keys, dtype);
        }
    }
}

#[test]
fn seq_with_one_token_is_byte_identical_to_per_position() {
    let Some(dev) = device() else { return };
    for &bits in &BITS {
        let l = layout(3, 128, 6, bits, bits, CacheMode::Global);
        let plane = cpu_plane(l, Side::Keys, 31 + bits as u64);
        let g = gpu_plane(&dev, l, &plane);
        for pos in 0..l.capacity {
            for domain in [Domain::Rotated, Domain::Original] {
                let seq = g.seq(Side::Keys, pos, 1, domain, DType::F32);
                let per = g.pos(Side::Keys, pos, domain, DType::F32);
                assert_eq!(seq, per, "bits {bits} pos {pos} {domain:?}");
            }
        }
    }
}

#[test]
fn seq_with_many_tokens_equals_per_position_concatenated() {
    let Some(dev) = device() else { return };
    for &bits in &BITS {
        let l = layout(3, 64, 7, bits, bits, CacheMode::Global);
        let d = l.head_dim;
        let plane = cpu_plane(l, Side::Values, 57 + bits as u64);
        let g = gpu_plane(&dev, l, &plane);
        let (start, n) = (1, 5);
        let seq = g.seq(Side::Values, start, n, Domain::Original, DType::F32);
        for t in 0..n {
            let per = g.pos(Side::Values, start + t, Domain::Original, DType::F32);
            for h in 0..l.num_kv_heads {
                assert_eq!(
                    seq[(h * n + t) * d..(h * n + t + 1) * d],
                    per[h * d..(h + 1) * d],
                    "bits {bits} head {h} token {t}"
                );
            }
        }
    }
}

#[test]
fn non_finite_input_is_reported_and_its_slot_left_unwritten() {
    let Some(dev) = device() else { return };
    let l = layout(2, 128, 4, 4, 4, CacheMode::Global);
    let mut x = Gauss::new(3).vec(3 * 2 * 128);
    let (bad_t, bad_h) = (1, 1);
    x[(bad_t * 2 + bad_h) * 128 + 5] = f32::NAN;
    let gc = CudaCodec::new(dev.clone(), Codec::new(l).unwrap()).unwrap();
    let s = gc.stream().clone();
    let src = DeviceBuffer::from_f32(&s, &x).unwrap();
    let mut packed = DeviceBuffer::from_u8(&s, &vec![0xAB; l.packed_len(Side::Keys)]).unwrap();
    let mut norms = DeviceBuffer::from_f32(&s, &vec![-1.0; l.norms_len()]).unwrap();
    gc.quantize(Side::Keys, &src, 3, 0, &mut packed, &mut norms)
        .unwrap();
    let err = gc.check_finite().unwrap_err().to_string();
    assert!(err.contains("token 1, head 1"), "{err}");
    let nr = norms.to_f32(&s).unwrap();
    assert_eq!(
        nr[l.capacity + 1],
        -1.0,
        "the bad vector's norm was written"
    );
    assert!(
        nr[l.capacity + 2] > 0.0,
        "the next token of that head was not written"
    );
    gc.check_finite()
        .expect("the status is cleared after a report");
}

#[test]
fn bad_arguments_are_errors_naming_the_op_and_values() {
    let Some(dev) = device() else { return };
    let l = layout(2, 64, 4, 4, 4, CacheMode::Global);
    let gc = CudaCodec::new(dev.clone(), Codec::new(l).unwrap()).unwrap();
    let s = gc.stream().clone();
    let src = DeviceBuffer::from_f32(&s, &vec![0.5; 2 * 64]).unwrap();
    let mut packed = DeviceBuffer::from_u8(&s, &vec![0; l.packed_len(Side::Keys)]).unwrap();
    let mut norms = DeviceBuffer::from_f32(&s, &vec![0.0; l.norms_len()]).unwrap();
    let mut short = DeviceBuffer::from_f32(&s, &[0.0; 3]).unwrap();

    let e = gc
        .quantize(Side::Keys, &src, 2, 0, &mut packed, &mut norms)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("cuda quantize: src has 128 elements, need 256"),
        "{e}"
    );
    let e = gc
        .quantize(Side::Keys, &src, 1, 4, &mut packed, &mut norms)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("write_pos (4) + n_tokens (1) > capacity (4)"),
        "{e}"
    );
    let e = gc.quantize(
        Side::Keys,
        &packed_clone(&s, &packed),
        1,
        0,
        &mut packed,
        &mut norms,
    );
    assert!(e.unwrap_err().to_string().contains("src buffer holds U8"));
    let e = gc
        .quantize(Side::Keys, &src, 1, 0, &mut short, &mut norms)
        .unwrap_err();
    assert!(
        e.to_string().contains("cuda quantize: packed buffer holds"),
        "{e}"
    );
    let e = gc
        .dequantize_seq(
            Side::Keys,
            &packed,
            &norms,
            2,
            3,
            Domain::Rotated,
            &mut short,
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("cuda dequantize_seq: start_pos (2) + n_tokens (3) > capacity (4)"),
        "{e}"
    );
    let e = gc
        .dequantize_pos(Side::Keys, &packed, &norms, 0, Domain::Rotated, &mut short)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("cuda dequantize_pos: dst has 3 elements, need 128"),
        "{e}"
    );
    let e = gc
        .dequantize_pos(Side::Keys, &norms, &norms, 0, Domain::Rotated, &mut short)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("packed buffer holds Float(F32), need U8"),
        "{e}"
    );
    // Zero tokens: a no-op.
    gc.quantize(Side::Keys, &src, 0, 0, &mut packed, &mut norms)
        .unwrap();
    gc.dequantize_seq(
        Side::Keys,
        &packed,
        &norms,
        0,
        0,
        Domain::Rotated,
        &mut short,
    )
    .unwrap();
}

fn packed_clone(s: &Arc<tqkv::cuda::CudaStream>, p: &DeviceBuffer) -> DeviceBuffer {
    DeviceBuffer::from_u8(s, &p.to_bytes(s).unwrap()).unwrap()
}

#[test]
fn every_kernel_variant_compiles_with_nvrtc() {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        if require_gpu() {
            panic!("TQ_REQUIRE_GPU=1 but libnvrtc does not load");
        }
        println!("skipping: no CUDA device (libnvrtc does not load)");
        return;
    }
    for &bits in &BITS {
        for d in [32, 64, 128, 256, 512, 1024] {
            let q = KernelKey {
                family: Family::Quantize,
                defines: vec![
                    ("HEAD_DIM", d),
                    ("LANE_ELEMS", (d / 32).max(16)),
                    ("BITS", bits as i64),
                    ("IN_DTYPE", d % 3),
                    ("VPW", 2),
                ],
            };
            let dq = KernelKey {
                family: Family::Dequantize,
                defines: vec![
                    ("HEAD_DIM", d),
                    ("LANE_ELEMS", (d / 32).max(16)),
                    ("BITS", bits as i64),
                    ("OUT_DTYPE", d % 3),
                    ("ORIGINAL", d / 32 % 2),
                    ("VPW", 2),
                ],
            };
            for key in [q, dq] {
                let ptx = compile_ptx(&key, "compute_90a").unwrap_or_else(|e| panic!("{e}"));
                let text = ptx.to_src();
                assert!(!text.contains(".local"), "{key}: local memory in the PTX");
            }
        }
    }
}
