//! `tqkv roundtrip`: quantize → dequantize (original domain) of every K/V tensor of a
//! safetensors file, so external harnesses can measure the codec on their own model. With
//! `--center-keys` (or a preset) keys are centered first and the mean is added back. Every token
//! is quantized: the exact window and sinks of a cache depend on the query position, which a
//! tensor round trip has not; a harness keeps the tokens it wants exact from its own input.

use std::borrow::Cow;
use std::path::PathBuf;

use clap::Args;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView, View};
use safetensors::SafeTensors;

use crate::kvio::{
    layout_for, parse_bits, parse_preset, roundtrip, roundtrip_centered, write_atomic, Bits,
};
use tqkv::io::{kv_role, parse, tensors_in_order, KvTensor};
use tqkv::layout::DEFAULT_SEED;
use tqkv::{Preset, Result, Side, TqError};

#[derive(Args, Debug)]
pub struct RoundtripArgs {
    /// Bits per key index: 2, 3, 4, 5, 6 or 8 (or --preset).
    #[arg(long, value_name = "KB", value_parser = parse_bits,
          required_unless_present = "preset", requires = "v_bits", conflicts_with = "preset")]
    pub k_bits: Option<u32>,
    /// Bits per value index: 2, 3, 4, 5, 6 or 8 (or --preset).
    #[arg(long, value_name = "VB", value_parser = parse_bits,
          required_unless_present = "preset", requires = "k_bits", conflicts_with = "preset")]
    pub v_bits: Option<u32>,
    /// A preset's bits and key centering: tq8, k8v4, tq6, k6v4, tq4, tq3.
    #[arg(long, value_name = "NAME", value_parser = parse_preset)]
    pub preset: Option<Preset>,
    /// Center keys: subtract each K tensor's per-(head, channel) mean over its tokens before
    /// quantizing, add it back after (what a centering cache does with its prefill).
    #[arg(long)]
    pub center_keys: bool,
    /// Rotation seed.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Cache slots per head (default: each tensor's token count); longer tensors are an error.
    #[arg(long, value_name = "N")]
    pub capacity: Option<usize>,
    /// safetensors file; tensors named `k`, `v`, `*.k`, `*.v` are [tokens, heads, head_dim]
    /// f32/f16/bf16.
    #[arg(long, value_name = "IN")]
    pub input: PathBuf,
    /// Written atomically: K/V tensors as f32, every other tensor and the metadata copied.
    #[arg(long, value_name = "OUT")]
    pub output: PathBuf,
}

/// A tensor of the output file: copied from the input, or a round-tripped K/V tensor.
enum OutTensor<'a> {
    Copied(TensorView<'a>),
    F32 { shape: Vec<usize>, bytes: Vec<u8> },
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutTensor::Copied(t) => t.dtype(),
            OutTensor::F32 { .. } => Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Copied(t) => t.shape(),
            OutTensor::F32 { shape, .. } => shape,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Copied(t) => Cow::Borrowed(t.data()),
            OutTensor::F32 { bytes, .. } => Cow::Borrowed(bytes),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            OutTensor::Copied(t) => t.data().len(),
            OutTensor::F32 { bytes, .. } => bytes.len(),
        }
    }
}

pub fn run(args: RoundtripArgs) -> Result<()> {
    let shown = args.input.display().to_string();
    let bytes = std::fs::read(&args.input).map_err(|source| TqError::Io {
        context: format!("cannot read {shown}"),
        source,
    })?;
    let st = parse(&bytes, &shown)?;
    let metadata = SafeTensors::read_metadata(&bytes)
        .map_err(|e| TqError::Format(format!("{shown}: not a valid safetensors file ({e})")))?
        .1
        .metadata()
        .clone();
    let (bits, center) = match (args.preset, args.k_bits, args.v_bits) {
        (Some(p), _, _) => {
            let (k, v) = p.bits();
            (Bits { k, v }, args.center_keys || p.options().center_keys)
        }
        (None, Some(k), Some(v)) => (Bits { k, v }, args.center_keys),
        _ => {
            return Err(TqError::InvalidArgument(
                "roundtrip: give --preset or both --k-bits and --v-bits".into(),
            ))
        }
    };
    // Every tensor is converted before the first error (in name order) is reported, so the
    // error does not depend on thread timing.
    let converted: Vec<Result<(String, OutTensor<'_>)>> = tensors_in_order(&st)
        .into_par_iter()
        .map(|(name, view)| {
            let side = match kv_role(&name) {
                Some((_, 'k')) => Side::Keys,
                Some((_, 'v')) => Side::Values,
                _ => return Ok((name, OutTensor::Copied(view))),
            };
            let t = KvTensor::from_view(&name, &view)?;
            let layout = layout_for(&t, bits, args.seed, args.capacity)?;
            let out = if center && side == Side::Keys {
                roundtrip_centered(&t, side, layout)?
            } else {
                roundtrip(&t, side, layout)?
            };
            let shape = view.shape().to_vec();
            let bytes = out.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((name, OutTensor::F32 { shape, bytes }))
        })
        .collect();
    let tensors = converted.into_iter().collect::<Result<Vec<_>>>()?;
    let n_kv = tensors
        .iter()
        .filter(|(_, t)| matches!(t, OutTensor::F32 { .. }))
        .count();
    if n_kv == 0 {
        return Err(TqError::InvalidArgument(format!(
            "{shown}: no K/V tensor (names `k`, `v`, `*.k` or `*.v`)"
        )));
    }
    let mut metadata = metadata.unwrap_or_default();
    metadata.insert(
        "tqkv_roundtrip".into(),
        format!(
            "tqkv {} roundtrip: k_bits={} v_bits={} seed={} center_keys={center}{}; K/V \
             tensors dequantized to f32",
            env!("CARGO_PKG_VERSION"),
            bits.k,
            bits.v,
            args.seed,
            args.preset
                .map_or(String::new(), |p| format!(" preset={p}")),
        ),
    );
    let out_bytes = safetensors::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        &Some(metadata),
    )
    .map_err(|e| TqError::Format(format!("cannot serialize the output: {e}")))?;
    let out_shown = args.output.display().to_string();
    write_atomic(&args.output, &out_bytes)?;
    println!(
        "{out_shown}: {n_kv} K/V tensors round-tripped at {}/{} bits{} (f32), {} copied",
        bits.k,
        bits.v,
        if center { ", keys centered" } else { "" },
        tensors.len() - n_kv
    );
    Ok(())
}
