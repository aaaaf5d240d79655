//! `tqkv eval` presets: causal attention fidelity of each [`Preset`] beside plain TurboQuant at
//! the same bits.
//!
//! Query t sees keys 0..=t. Under a preset, key j is exact when `j < sinks` or `j > t − window`
//! (the window a cache holds when t is its newest token), else it is the cache's packed
//! version: k − μ quantized, μ added back, μ per (kv head, channel) estimated by the cache
//! from its first append, the prefill (tokens `0..prefill`). Plain TurboQuant quantizes every
//! key and value. Both are compared with exact attention over the same layer: mean
//! ‖o − ô‖/‖o‖, mean cosine, mean KL(p ‖ p̂) of the attention distributions, and the share of
//! queries whose most-attended key changes.
//!
//! Exact keys and values are the input as read (widened to f32), and packed ones are quantized
//! from it; a cache stores and quantizes the input rounded to f16, which is the same for f16
//! input (the shipped samples) and differs by that rounding for f32 input.

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::kvio::context;
use crate::reference::{attend_head, HeadOutput, Shape};
use tqkv::io::{KvLayer, KvTensor};
use tqkv::{CacheLayout, CacheOptions, Domain, Dst, KvCache, Preset, Result, Side, Src, TqError};

/// Context lengths at which bits per value are reported.
pub const CONTEXTS: [usize; 2] = [4096, 32768];

/// One configuration to evaluate.
#[derive(Debug, Clone)]
pub struct Variant {
    pub preset: Preset,
    /// `plain`, `preset`, `center only` or `exact only`.
    pub kind: &'static str,
    pub options: CacheOptions,
}

impl Variant {
    /// Plain TurboQuant at the preset's bits, then the preset with its options (window and
    /// sinks overridden when given); with `ablation`, also centering alone and exact tokens
    /// alone.
    pub fn for_preset(
        preset: Preset,
        window: Option<usize>,
        sinks: Option<usize>,
        ablation: bool,
    ) -> Vec<Variant> {
        let mut opts = preset.options();
        opts.window = window.unwrap_or(opts.window);
        opts.sinks = sinks.unwrap_or(opts.sinks);
        let mut v = vec![
            Variant {
                preset,
                kind: "plain",
                options: CacheOptions::plain(),
            },
            Variant {
                preset,
                kind: "preset",
                options: opts.clone(),
            },
        ];
        if ablation {
            v.push(Variant {
                preset,
                kind: "center only",
                options: CacheOptions::plain().with_center_keys(opts.center_keys),
            });
            v.push(Variant {
                preset,
                kind: "exact only",
                options: opts.with_center_keys(false),
            });
        }
        v
    }

    /// True bits per cached value of one layer of `heads` kv heads at `ctx` tokens.
    pub fn bits_per_value(&self, heads: usize, head_dim: usize, ctx: usize) -> Result<f64> {
        let (k, v) = self.preset.bits();
        let l = CacheLayout::new(heads, head_dim, ctx, k, v)?;
        let bytes = self.options.memory_bytes(&l) as f64;
        Ok(bytes * 8.0 / (2 * heads * ctx * head_dim) as f64)
    }
}

/// Fidelity sums over (q head, token).
#[derive(Debug, Clone, Copy, Default)]
pub struct Acc {
    rel_sum: f64,
    cos_sum: f64,
    kl_sum: f64,
    top_changed: usize,
    n: usize,
}

impl Acc {
    pub fn merge(self, o: Self) -> Self {
        Self {
            rel_sum: self.rel_sum + o.rel_sum,
            cos_sum: self.cos_sum + o.cos_sum,
            kl_sum: self.kl_sum + o.kl_sum,
            top_changed: self.top_changed + o.top_changed,
            n: self.n + o.n,
        }
    }

    fn mean(&self, x: f64) -> f64 {
        x / self.n.max(1) as f64
    }

    pub fn rel(&self) -> f64 {
        self.mean(self.rel_sum)
    }

    pub fn cos(&self) -> f64 {
        self.mean(self.cos_sum)
    }

    pub fn kl(&self) -> f64 {
        self.mean(self.kl_sum)
    }

    pub fn top(&self) -> f64 {
        self.mean(self.top_changed as f64)
    }

    pub fn json(&self) -> Value {
        json!({
            "attn_rel_err_mean": self.rel(),
            "attn_cosine_mean": self.cos(),
            "kl_mean": self.kl(),
            "top1_changed": self.top(),
        })
    }
}

/// Row `tok` of head `h` of `x: [tokens, heads, d]`.
fn row(x: &KvTensor, tok: usize, h: usize) -> &[f32] {
    let d = x.head_dim;
    &x.data[(tok * x.heads + h) * d..][..d]
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Exact attention of one layer, per q head, with its scores.
fn exact(layer: &KvLayer, q: &KvTensor) -> Vec<HeadOutput> {
    let s = Shape {
        tokens: layer.k.tokens,
        q_heads: q.heads,
        kv_heads: layer.k.heads,
        head_dim: layer.k.head_dim,
    };
    (0..q.heads)
        .map(|qh| attend_head(s, &q.data, &layer.k.data, &layer.v.data, qh, true))
        .collect()
}

/// (max, index of the first max).
fn argmax(s: &[f64]) -> (f64, usize) {
    s.iter().enumerate().fold(
        (f64::NEG_INFINITY, 0),
        |(m, i), (j, &x)| {
            if x > m {
                (x, j)
            } else {
                (m, i)
            }
        },
    )
}

/// K and V of `layer` through a cache with `variant`'s quantizer (every token packed, μ from
/// the first `prefill` tokens), dequantized to the original domain, `[tokens, heads, d]`.
fn packed_kv(
    layer: &KvLayer,
    variant: &Variant,
    seed: u64,
    prefill: usize,
) -> Result<(KvTensor, KvTensor)> {
    let (n, h, d) = (layer.k.tokens, layer.k.heads, layer.k.head_dim);
    let (kb, vb) = variant.preset.bits();
    let l = CacheLayout::new(h, d, n, kb, vb)
        .map(|l| l.with_seed(seed))
        .map_err(context(&layer.name))?;
    let opts = CacheOptions::plain().with_center_keys(variant.options.center_keys);
    let mut cache = KvCache::with_options(l, opts).map_err(context(&layer.name))?;
    let split = prefill.min(n) * h * d;
    for (a, b) in [(0, split), (split, n * h * d)] {
        cache
            .append(Src::F32(&layer.k.data[a..b]), Src::F32(&layer.v.data[a..b]))
            .map_err(context(&layer.name))?;
    }
    let mut out = Vec::new();
    for (side, t) in [(Side::Keys, &layer.k), (Side::Values, &layer.v)] {
        let mut by_head = vec![0f32; n * h * d];
        cache.dequantize(side, 0, n, Domain::Original, Dst::F32(&mut by_head))?;
        let mut data = vec![0f32; n * h * d];
        for (hh, rows) in by_head.chunks_exact(n * d).enumerate() {
            for (tok, r) in rows.chunks_exact(d).enumerate() {
                data[(tok * h + hh) * d..][..d].copy_from_slice(r);
            }
        }
        out.push(KvTensor { data, ..t.clone() });
    }
    let v = out.pop();
    let k = out.pop();
    match (k, v) {
        (Some(k), Some(v)) => Ok((k, v)),
        _ => Err(TqError::InvalidArgument(format!(
            "{}: internal: missing dequantized tensors",
            layer.name
        ))),
    }
}

/// Causal attention of `variant` over one layer against the exact one.
fn measure(
    layer: &KvLayer,
    q: &KvTensor,
    ex: &[HeadOutput],
    variant: &Variant,
    seed: u64,
    prefill: usize,
) -> Result<Acc> {
    let (kh, vh) = packed_kv(layer, variant, seed, prefill)?;
    let (n, d) = (layer.k.tokens, layer.k.head_dim);
    let group = q.heads / layer.k.heads;
    let scale = 1.0 / (d as f64).sqrt();
    let (w, sinks) = (variant.options.window, variant.options.sinks);
    let is_exact = |t: usize, j: usize| j < sinks || j + w > t;
    let mut acc = Acc::default();
    let mut sh = vec![0f64; n];
    let mut o = vec![0f64; d];
    for (qh, exh) in ex.iter().enumerate() {
        let g = qh / group;
        for t in 0..n {
            let qv = row(q, t, qh);
            let s = &exh.scores[t * (t + 1) / 2..][..t + 1];
            for (j, x) in sh[..=t].iter_mut().enumerate() {
                *x = if is_exact(t, j) {
                    s[j]
                } else {
                    scale * dot(qv, row(&kh, j, g))
                };
            }
            let (m, best) = argmax(&sh[..=t]);
            let z: f64 = sh[..=t].iter().map(|x| (x - m).exp()).sum();
            let lse_h = m + z.ln();
            let lse = exh.lse[t];
            o.fill(0.0);
            let mut kl = 0.0;
            for j in 0..=t {
                let p = (s[j] - lse).exp();
                kl += p * ((s[j] - lse) - (sh[j] - lse_h));
                let ph = (sh[j] - lse_h).exp();
                let vr = if is_exact(t, j) {
                    row(&layer.v, j, g)
                } else {
                    row(&vh, j, g)
                };
                for (oi, &vi) in o.iter_mut().zip(vr) {
                    *oi += ph * vi as f64;
                }
            }
            let oe = &exh.out[t * d..(t + 1) * d];
            let (mut e2, mut n2, mut m2, mut dt) = (0f64, 0f64, 0f64, 0f64);
            for (&a, &b) in oe.iter().zip(&o) {
                e2 += (a - b) * (a - b);
                n2 += a * a;
                m2 += b * b;
                dt += a * b;
            }
            acc.rel_sum += if n2 > 0.0 {
                (e2 / n2).sqrt()
            } else if e2 > 0.0 {
                1.0
            } else {
                0.0
            };
            acc.cos_sum += if n2 > 0.0 && m2 > 0.0 {
                dt / (n2 * m2).sqrt()
            } else {
                (n2 == m2) as u8 as f64
            };
            acc.kl_sum += kl.max(0.0);
            acc.top_changed += (best != exh.top[t]) as usize;
            acc.n += 1;
        }
    }
    Ok(acc)
}

/// Every variant over every layer that has queries: `[layer][variant]`, layer names.
pub fn evaluate(
    layers: &[KvLayer],
    variants: &[Variant],
    seed: u64,
    prefill: Option<usize>,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<(String, Vec<Acc>)>> {
    layers
        .par_iter()
        .filter(|layer| layer.k.tokens > 0)
        .filter_map(|layer| layer.q.as_ref().map(|q| (layer, q)))
        .map(|(layer, q)| {
            let n = layer.k.tokens;
            let prefill = prefill.unwrap_or(n);
            if prefill == 0 || prefill > n {
                return Err(TqError::InvalidArgument(format!(
                    "{}: --prefill ({prefill}) must be in 1..={n} (the layer's tokens)",
                    layer.name
                )));
            }
            let ex = exact(layer, q);
            let accs = variants
                .iter()
                .map(|v| measure(layer, q, &ex, v, seed, prefill))
                .collect::<Result<Vec<_>>>()?;
            progress.inc(1);
            Ok((layer.name.clone(), accs))
        })
        .collect()
}

/// Sum over layers of each variant.
fn totals(results: &[(String, Vec<Acc>)], n_variants: usize) -> Vec<Acc> {
    (0..n_variants)
        .map(|i| {
            results
                .iter()
                .fold(Acc::default(), |a, (_, accs)| a.merge(accs[i]))
        })
        .collect()
}

/// What the run measured, for the table heading and the JSON.
pub struct Setup<'a> {
    pub dataset: &'a str,
    pub heads: usize,
    pub head_dim: usize,
    pub tokens: usize,
    pub prefill: Option<usize>,
}

/// The overall table (and per-layer tables with `per_layer`).
pub fn table(
    setup: &Setup<'_>,
    variants: &[Variant],
    results: &[(String, Vec<Acc>)],
    per_layer: bool,
) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if results.is_empty() {
        let _ = writeln!(
            s,
            "{}: no queries, no causal preset evaluation\n",
            setup.dataset
        );
        return s;
    }
    let prefill = setup.prefill.unwrap_or(setup.tokens);
    let _ = writeln!(
        s,
        "{}: causal presets over {} layers; query t sees keys 0..=t; μ from the prefill \
         (tokens 0..{prefill} of {}); bits/value per layer ({} kv heads, head_dim {}) at \
         {} and {} tokens",
        setup.dataset,
        results.len(),
        setup.tokens,
        setup.heads,
        setup.head_dim,
        CONTEXTS[0],
        CONTEXTS[1]
    );
    let _ = writeln!(
        s,
        "{:>6} {:>5} {:>12} {:>6} {:>5} {:>3} | {:>7} {:>7} | {:>9} {:>9} {:>9} {:>7}",
        "preset",
        "K/V",
        "variant",
        "center",
        "W",
        "S",
        "b/v 4K",
        "b/v 32K",
        "attn err",
        "attn cos",
        "KL",
        "top1 Δ"
    );
    let tot = totals(results, variants.len());
    for (v, a) in variants.iter().zip(&tot) {
        let (kb, vb) = v.preset.bits();
        let bpv = |c: usize| {
            v.bits_per_value(setup.heads, setup.head_dim, c)
                .unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            s,
            "{:>6} {:>5} {:>12} {:>6} {:>5} {:>3} | {:>7.3} {:>7.3} | {:>9.3e} {:>9.6} {:>9.3e} {:>6.2}%",
            v.preset.name(),
            format!("{kb}/{vb}"),
            v.kind,
            if v.options.center_keys { "yes" } else { "no" },
            v.options.window,
            v.options.sinks,
            bpv(CONTEXTS[0]),
            bpv(CONTEXTS[1]),
            a.rel(),
            a.cos(),
            a.kl(),
            100.0 * a.top()
        );
    }
    if per_layer {
        for (i, v) in variants.iter().enumerate() {
            let _ = writeln!(s, "\n{} {} per layer:", v.preset.name(), v.kind);
            let _ = writeln!(
                s,
                "{:>12} | {:>9} {:>9} {:>7}",
                "layer", "attn err", "KL", "top1 Δ"
            );
            for (name, accs) in results {
                let a = &accs[i];
                let _ = writeln!(
                    s,
                    "{name:>12} | {:>9.3e} {:>9.3e} {:>6.2}%",
                    a.rel(),
                    a.kl(),
                    100.0 * a.top()
                );
            }
        }
    }
    s.push_str(
        "attn err = mean ‖o−ô‖/‖o‖, attn cos = mean cosine, KL = mean KL(p‖p̂) of the attention \
         distributions (nats), top1 Δ = share of queries whose most-attended key changes; per \
         (layer, q head, token). Preset: keys j < S and j > t−W exact.\n\n",
    );
    s
}

/// One JSON object per variant, with per-layer values.
pub fn json(setup: &Setup<'_>, variants: &[Variant], results: &[(String, Vec<Acc>)]) -> Vec<Value> {
    let tot = totals(results, variants.len());
    variants
        .iter()
        .zip(&tot)
        .enumerate()
        .map(|(i, (v, a))| {
            let (kb, vb) = v.preset.bits();
            let bpv: Vec<Value> = CONTEXTS
                .iter()
                .map(|&c| {
                    json!({
                        "context": c,
                        "bits_per_value": v.bits_per_value(setup.heads, setup.head_dim, c).ok(),
                    })
                })
                .collect();
            let layers: Vec<Value> = results
                .iter()
                .map(|(name, accs)| {
                    let mut o = accs[i].json();
                    o["layer"] = json!(name);
                    o
                })
                .collect();
            let mut o = a.json();
            o["dataset"] = json!(setup.dataset);
            o["preset"] = json!(v.preset.name());
            o["variant"] = json!(v.kind);
            o["k_bits"] = json!(kb);
            o["v_bits"] = json!(vb);
            o["center_keys"] = json!(v.options.center_keys);
            o["window"] = json!(v.options.window);
            o["sinks"] = json!(v.options.sinks);
            o["prefill"] = json!(setup.prefill.unwrap_or(setup.tokens));
            o["bits_per_value"] = json!(bpv);
            o["layers"] = json!(layers);
            o
        })
        .collect()
}
