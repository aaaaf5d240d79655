//! `tqkv eval`: what the codec does to KV activations — reconstruction error of K and V against
//! the Lloyd-Max theory, the fidelity of causal GQA attention over the dequantized cache, and
//! the causal evaluation of the presets beside plain TurboQuant ([`crate::causal`]).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::causal::{self, Variant};
use crate::data::{self, Dataset};
use crate::kvio::{layout_for, parse_bits_pair, roundtrip, Bits};
use crate::reference::{attend_head, HeadOutput, Shape};
use tqkv::codebook::{centroids_f64, gaussian_distortion};
use tqkv::io::KvLayer;
use tqkv::layout::DEFAULT_SEED;
use tqkv::{Preset, Result, Side, TqError};

const DEFAULT_BITS: &str = "8/8,6/6,5/5,4/4,3/3,2/2,8/4,4/2";

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// safetensors file with tensors `PREFIX.k`, `PREFIX.v` and optional `PREFIX.q`
    /// ([tokens, heads, head_dim], f32/f16/bf16; e.g. `layer.3.k`). Without q the attention
    /// columns are skipped. Default: the SmolLM2-135M sample shipped in the binary and a
    /// synthetic Gaussian set with outlier channels.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Comma-separated keys/values bit settings (each 2, 3, 4, 5, 6 or 8).
    #[arg(
        long,
        value_name = "KB/VB,...",
        value_delimiter = ',',
        value_parser = parse_bits_pair,
        default_value = DEFAULT_BITS
    )]
    pub bits: Vec<Bits>,
    /// Rotation seed.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Cache slots per head (default: each tensor's token count); longer tensors are an error.
    #[arg(long, value_name = "N")]
    pub capacity: Option<usize>,
    /// Presets to evaluate causally beside plain TurboQuant at the same bits: comma-separated
    /// names (tq8, k8v4, tq6, k6v4, tq4, tq3), `all` or `none`.
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        default_value = "all"
    )]
    pub presets: Vec<String>,
    /// Exact recent window of the presets, in tokens (default: the presets' 32).
    #[arg(long, value_name = "W")]
    pub window: Option<usize>,
    /// Exact sink tokens of the presets (default: the presets' 1).
    #[arg(long, value_name = "S")]
    pub sinks: Option<usize>,
    /// Tokens of the prefill, the first append from which the presets estimate the key mean μ
    /// (default: every token of the layer, the whole text as one prompt).
    #[arg(long, value_name = "N")]
    pub prefill: Option<usize>,
    /// Also evaluate each preset's centering alone and its exact tokens alone.
    #[arg(long)]
    pub ablation: bool,
    /// Print the preset table of every layer too.
    #[arg(long)]
    pub per_layer: bool,
    /// Print one JSON object (`datasets`, `rows`, `presets`) instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The presets named by `--presets`.
fn presets(names: &[String]) -> Result<Vec<Preset>> {
    let mut out = Vec::new();
    for n in names {
        match n.trim() {
            "all" => out.extend(Preset::ALL),
            "none" => {}
            other => {
                out.push(other.parse::<Preset>().map_err(|e| {
                    TqError::InvalidArgument(format!("--presets: {e} (or all, none)"))
                })?)
            }
        }
    }
    out.dedup();
    Ok(out)
}

/// Reconstruction error of one side, summed over vectors.
#[derive(Debug, Clone, Copy, Default)]
struct ErrAcc {
    err2: f64,
    norm2: f64,
    cos_sum: f64,
    n: usize,
}

impl ErrAcc {
    fn of(x: &[f32], xh: &[f32], d: usize) -> Self {
        x.chunks_exact(d)
            .zip(xh.chunks_exact(d))
            .fold(Self::default(), |mut acc, (a, b)| {
                let (mut e2, mut n2, mut m2, mut dot) = (0f64, 0f64, 0f64, 0f64);
                for (&a, &b) in a.iter().zip(b) {
                    let (a, b) = (a as f64, b as f64);
                    e2 += (a - b) * (a - b);
                    n2 += a * a;
                    m2 += b * b;
                    dot += a * b;
                }
                acc.err2 += e2;
                acc.norm2 += n2;
                acc.cos_sum += cosine(dot, n2, m2);
                acc.n += 1;
                acc
            })
    }

    fn merge(self, o: Self) -> Self {
        Self {
            err2: self.err2 + o.err2,
            norm2: self.norm2 + o.norm2,
            cos_sum: self.cos_sum + o.cos_sum,
            n: self.n + o.n,
        }
    }
}

/// Attention-output fidelity, summed over (layer, query head, token).
#[derive(Debug, Clone, Copy)]
struct AttnAcc {
    cos_sum: f64,
    cos_min: f64,
    rel_sum: f64,
    top_changed: usize,
    n: usize,
}

impl Default for AttnAcc {
    fn default() -> Self {
        Self {
            cos_sum: 0.0,
            cos_min: f64::INFINITY,
            rel_sum: 0.0,
            top_changed: 0,
            n: 0,
        }
    }
}

impl AttnAcc {
    fn of(exact: &HeadOutput, approx: &HeadOutput, d: usize) -> Self {
        let mut acc = Self::default();
        for (o, oh) in exact.out.chunks_exact(d).zip(approx.out.chunks_exact(d)) {
            let (mut e2, mut n2, mut m2, mut dot) = (0f64, 0f64, 0f64, 0f64);
            for (&a, &b) in o.iter().zip(oh) {
                e2 += (a - b) * (a - b);
                n2 += a * a;
                m2 += b * b;
                dot += a * b;
            }
            let c = cosine(dot, n2, m2);
            acc.cos_sum += c;
            acc.cos_min = acc.cos_min.min(c);
            acc.rel_sum += match (n2 > 0.0, e2 > 0.0) {
                (true, _) => (e2 / n2).sqrt(),
                (false, false) => 0.0,
                (false, true) => 1.0,
            };
            acc.n += 1;
        }
        acc.top_changed = exact
            .top
            .iter()
            .zip(&approx.top)
            .filter(|(a, b)| a != b)
            .count();
        acc
    }

    fn merge(self, o: Self) -> Self {
        Self {
            cos_sum: self.cos_sum + o.cos_sum,
            cos_min: self.cos_min.min(o.cos_min),
            rel_sum: self.rel_sum + o.rel_sum,
            top_changed: self.top_changed + o.top_changed,
            n: self.n + o.n,
        }
    }
}

/// Cosine from a dot product and two squared norms; two zero vectors agree (1), one does not (0).
fn cosine(dot: f64, n2: f64, m2: f64) -> f64 {
    match (n2 > 0.0, m2 > 0.0) {
        (true, true) => dot / (n2 * m2).sqrt(),
        (false, false) => 1.0,
        _ => 0.0,
    }
}

/// One table row: a data set under one bit setting.
struct Row {
    dataset: String,
    bits: Bits,
    bytes_per_token: usize,
    f16_bytes_per_token: usize,
    k: ErrAcc,
    v: ErrAcc,
    attn: Option<AttnAcc>,
}

impl Row {
    fn compression(&self) -> f64 {
        self.f16_bytes_per_token as f64 / self.bytes_per_token as f64
    }

    fn json(&self) -> Value {
        let rel = |a: &ErrAcc| a.err2 / a.norm2;
        let cos = |a: &ErrAcc| a.cos_sum / a.n as f64;
        let attn = |f: fn(&AttnAcc) -> f64| self.attn.as_ref().map(f);
        json!({
            "dataset": self.dataset,
            "k_bits": self.bits.k,
            "v_bits": self.bits.v,
            "bytes_per_token": self.bytes_per_token,
            "f16_bytes_per_token": self.f16_bytes_per_token,
            "compression_vs_f16": self.compression(),
            "k_rel_mse": rel(&self.k),
            "k_rel_mse_theory": theory(self.bits.k),
            "k_cosine_mean": cos(&self.k),
            "v_rel_mse": rel(&self.v),
            "v_rel_mse_theory": theory(self.bits.v),
            "v_cosine_mean": cos(&self.v),
            "attn_cosine_mean": attn(|a| a.cos_sum / a.n as f64),
            "attn_cosine_min": attn(|a| a.cos_min),
            "attn_rel_err_mean": attn(|a| a.rel_sum / a.n as f64),
            "attn_top1_changed": attn(|a| a.top_changed as f64 / a.n as f64),
        })
    }
}

/// Lloyd-Max distortion D_b of N(0, 1): the relative MSE expected for Gaussian-like coordinates.
fn theory(bits: u32) -> f64 {
    centroids_f64(bits).map_or(f64::NAN, gaussian_distortion)
}

pub fn run(args: EvalArgs) -> Result<()> {
    let datasets = match &args.input {
        Some(path) => vec![data::from_file(path)?],
        None => vec![data::shipped_sample()?, data::synthetic()],
    };
    let variants: Vec<Variant> = presets(&args.presets)?
        .into_iter()
        .flat_map(|p| Variant::for_preset(p, args.window, args.sinks, args.ablation))
        .collect();
    for ds in &datasets {
        check(ds, &args)?;
    }
    let preset_steps = if variants.is_empty() { 0 } else { 1 };
    let steps: usize = datasets.iter().map(|d| d.layers.len()).sum::<usize>()
        * (args.bits.len() + 1 + preset_steps);
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new(steps as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} layers")
            .map_err(|e| TqError::InvalidArgument(format!("progress bar: {e}")))?
            .progress_chars("=> "),
    );
    let mut rows = Vec::new();
    let mut preset_text = String::new();
    let mut preset_json = Vec::new();
    for ds in &datasets {
        progress.set_message(ds.name.clone());
        rows.extend(evaluate(ds, &args, &progress)?);
        let Some(first) = ds.layers.first().map(|l| &l.k) else {
            continue;
        };
        if variants.is_empty() {
            continue;
        }
        let results = causal::evaluate(&ds.layers, &variants, args.seed, args.prefill, &progress)?;
        let setup = causal::Setup {
            dataset: &ds.name,
            heads: first.heads,
            head_dim: first.head_dim,
            tokens: first.tokens,
            prefill: args.prefill,
        };
        preset_text.push_str(&causal::table(&setup, &variants, &results, args.per_layer));
        preset_json.extend(causal::json(&setup, &variants, &results));
    }
    progress.finish_and_clear();
    let text = if args.json {
        let out = json!({
            "tqkv_version": env!("CARGO_PKG_VERSION"),
            "seed": args.seed,
            "datasets": datasets.iter().map(describe_json).collect::<Vec<_>>(),
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "presets": preset_json,
        });
        format!("{out:#}\n")
    } else {
        tables(&datasets, &rows) + "\n" + &preset_text
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|source| TqError::Io {
            context: "cannot write to stdout".into(),
            source,
        })
}

/// Rejects what would fail mid-run: non-finite values, shapes no cache layout can hold.
fn check(ds: &Dataset, args: &EvalArgs) -> Result<()> {
    for layer in &ds.layers {
        for t in [Some(&layer.k), Some(&layer.v), layer.q.as_ref()]
            .into_iter()
            .flatten()
        {
            t.check_finite()?;
        }
        for &bits in &args.bits {
            layout_for(&layer.k, bits, args.seed, args.capacity)?;
        }
        if let (Some(p), Some(_)) = (args.prefill, &layer.q) {
            if p == 0 || p > layer.k.tokens {
                return Err(TqError::InvalidArgument(format!(
                    "{}: --prefill ({p}) must be in 1..={} (the layer's tokens)",
                    layer.name, layer.k.tokens
                )));
            }
        }
    }
    Ok(())
}

fn shape(layer: &KvLayer) -> Option<Shape> {
    layer.q.as_ref().map(|q| Shape {
        tokens: layer.k.tokens,
        q_heads: q.heads,
        kv_heads: layer.k.heads,
        head_dim: layer.k.head_dim,
    })
}

/// Attention of every query head of `layer` over the given keys and values.
fn attend_layer(layer: &KvLayer, k: &[f32], v: &[f32]) -> Vec<HeadOutput> {
    match (shape(layer), &layer.q) {
        (Some(s), Some(q)) if s.kv_heads > 0 && s.head_dim > 0 => (0..s.q_heads)
            .into_par_iter()
            .map(|qh| attend_head(s, &q.data, k, v, qh, false))
            .collect(),
        _ => Vec::new(),
    }
}

/// What one layer (or a sum of layers) measures under one bit setting.
#[derive(Debug, Clone, Copy, Default)]
struct Measure {
    bytes_per_token: usize,
    f16_bytes_per_token: usize,
    k: ErrAcc,
    v: ErrAcc,
    attn: AttnAcc,
}

impl Measure {
    fn merge(self, o: Self) -> Self {
        Self {
            bytes_per_token: self.bytes_per_token + o.bytes_per_token,
            f16_bytes_per_token: self.f16_bytes_per_token + o.f16_bytes_per_token,
            k: self.k.merge(o.k),
            v: self.v.merge(o.v),
            attn: self.attn.merge(o.attn),
        }
    }
}

/// Round-trips a layer's K and V at `bits` and compares them, and the attention over them
/// (against `exact`), with the originals.
fn measure_layer(
    layer: &KvLayer,
    exact: &[HeadOutput],
    bits: Bits,
    args: &EvalArgs,
) -> Result<Measure> {
    let layout = layout_for(&layer.k, bits, args.seed, args.capacity)?;
    let kh = roundtrip(&layer.k, Side::Keys, layout)?;
    let vh = roundtrip(&layer.v, Side::Values, layout)?;
    let d = layer.k.head_dim.max(1);
    let approx = attend_layer(layer, &kh, &vh);
    Ok(Measure {
        bytes_per_token: layout.bytes_per_token(),
        f16_bytes_per_token: 2 * 2 * layer.k.heads * layer.k.head_dim,
        k: ErrAcc::of(&layer.k.data, &kh, d),
        v: ErrAcc::of(&layer.v.data, &vh, d),
        attn: exact
            .iter()
            .zip(&approx)
            .map(|(e, a)| AttnAcc::of(e, a, d))
            .fold(AttnAcc::default(), AttnAcc::merge),
    })
}

fn evaluate(ds: &Dataset, args: &EvalArgs, progress: &ProgressBar) -> Result<Vec<Row>> {
    let exact: Vec<Vec<HeadOutput>> = ds
        .layers
        .par_iter()
        .map(|layer| {
            let r = attend_layer(layer, &layer.k.data, &layer.v.data);
            progress.inc(1);
            r
        })
        .collect();
    let mut rows = Vec::with_capacity(args.bits.len());
    for &bits in &args.bits {
        let layers: Vec<Measure> = ds
            .layers
            .par_iter()
            .zip(&exact)
            .map(|(layer, exact)| {
                let m = measure_layer(layer, exact, bits, args);
                progress.inc(1);
                m
            })
            .collect::<Result<_>>()?;
        let total = layers.into_iter().fold(Measure::default(), Measure::merge);
        rows.push(Row {
            dataset: ds.name.clone(),
            bits,
            bytes_per_token: total.bytes_per_token,
            f16_bytes_per_token: total.f16_bytes_per_token,
            k: total.k,
            v: total.v,
            attn: (total.attn.n > 0).then_some(total.attn),
        });
    }
    Ok(rows)
}

/// `(tokens, kv heads, q heads, head_dim, dtype)` when every layer shares them.
fn common_shape(ds: &Dataset) -> Option<(usize, usize, Option<usize>, usize, String)> {
    let of = |l: &KvLayer| {
        (
            l.k.tokens,
            l.k.heads,
            l.q.as_ref().map(|q| q.heads),
            l.k.head_dim,
            format!("{:?}", l.k.dtype).to_lowercase(),
        )
    };
    let first = of(ds.layers.first()?);
    ds.layers.iter().all(|l| of(l) == first).then_some(first)
}

fn describe_json(ds: &Dataset) -> Value {
    let shape = common_shape(ds);
    json!({
        "name": ds.name,
        "description": ds.description,
        "layers": ds.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
        "tokens": shape.as_ref().map(|s| s.0),
        "kv_heads": shape.as_ref().map(|s| s.1),
        "q_heads": shape.as_ref().and_then(|s| s.2),
        "head_dim": shape.as_ref().map(|s| s.3),
        "dtype": shape.as_ref().map(|s| s.4.clone()),
        "bytes_per_token_covers": "all layers of the data set, K and V, all kv heads",
    })
}

fn tables(datasets: &[Dataset], rows: &[Row]) -> String {
    let mut s = String::new();
    for ds in datasets {
        let n = ds.layers.len();
        let _ = writeln!(s, "{}: {}", ds.name, ds.description);
        let shape = match common_shape(ds) {
            Some((t, kvh, qh, d, dt)) => {
                let q = qh.map_or("no queries".into(), |q| format!("{q} q heads"));
                format!("{t} tokens, {kvh} kv heads, {q}, head_dim {d}, {dt}")
            }
            None => "layers of different shapes".into(),
        };
        let _ = writeln!(
            s,
            "{n} layers, {shape}; bytes per token cover all {n} layers (K+V, all kv heads)"
        );
        let _ =
            writeln!(
            s,
            "{:>5} {:>8} {:>6} | {:>9} {:>9} {:>8} | {:>9} {:>9} {:>8} | {:>9} {:>9} {:>9} {:>7}",
            "K/V", "B/token", "x f16", "K relMSE", "theory", "K cos", "V relMSE", "theory",
            "V cos", "attn cos", "attn min", "attn err", "top1 Δ"
        );
        for r in rows.iter().filter(|r| r.dataset == ds.name) {
            let bits = format!("{}/{}", r.bits.k, r.bits.v);
            let _ = write!(
                s,
                "{bits:>5} {:>8} {:>6.2} | {:>9.3e} {:>9.3e} {:>8.5} | {:>9.3e} {:>9.3e} {:>8.5} |",
                r.bytes_per_token,
                r.compression(),
                r.k.err2 / r.k.norm2,
                theory(r.bits.k),
                r.k.cos_sum / r.k.n as f64,
                r.v.err2 / r.v.norm2,
                theory(r.bits.v),
                r.v.cos_sum / r.v.n as f64,
            );
            match &r.attn {
                Some(a) => {
                    let _ = writeln!(
                        s,
                        " {:>9.5} {:>9.5} {:>9.3e} {:>6.1}%",
                        a.cos_sum / a.n as f64,
                        a.cos_min,
                        a.rel_sum / a.n as f64,
                        100.0 * a.top_changed as f64 / a.n as f64
                    );
                }
                None => {
                    let _ = writeln!(s, " {:>9} {:>9} {:>9} {:>7}", "-", "-", "-", "-");
                }
            }
        }
        let _ = writeln!(s);
    }
    s.push_str(
        "relMSE = Σ‖x−x̂‖²/Σ‖x‖²; theory = Lloyd-Max N(0,1) distortion D_b; cos = mean cosine per \
         vector.\nattn: causal GQA softmax(q·k/√d)·v over the dequantized cache vs the exact one, \
         per (layer, q head, token):\nmean and worst cosine, mean ‖o−ô‖/‖o‖, share of queries \
         whose most-attended key changes.\n",
    );
    s
}
