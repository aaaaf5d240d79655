//! Attention over a cache's exact segments (sinks, recent window) and the log-sum-exp merge
//! with the packed segment.
//!
//! For one (query, head) the visible positions `lo..=hi` split into sinks `lo..min(hi+1, S)`,
//! packed `max(lo, S)..min(hi+1, frontier)` and window `max(lo, S, frontier)..=hi`. Exact keys
//! are scored in the original domain (`scale · q·k`, f32); packed scores get `scale · q·μ`
//! added before the softcap (the packed keys are centered, the exact ones are as given). Each
//! part keeps (max m, Σ e^(s−m), Σ e^(s−m)·v); the output is
//! `(A_p e^(m_p−M) + A_e e^(m_e−M)) / (Z_p e^(m_p−M) + Z_e e^(m_e−M))`, M = max(m_p, m_e).

use std::ops::Range;

use super::attention::AttentionConfig;
use crate::cache::{KvCache, Segment};
use crate::layout::Side;

/// The exact segments of a cache as attention reads them.
pub(crate) struct Segments<'a> {
    cache: &'a KvCache,
    sinks: usize,
    frontier: usize,
    /// `[num_kv_heads, head_dim]` μ (original domain) when the packed keys are centered.
    mean: Option<&'a [f32]>,
}

/// The visible positions of one query, by segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Split {
    pub sinks: Range<usize>,
    pub packed: Range<usize>,
    pub window: Range<usize>,
}

/// Softmax state of the exact part: max score, Σ e^(s − max) (0 and −∞ when empty); the
/// accumulated values live in [`SegScratch::acc`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Partial {
    pub max: f32,
    pub sum: f64,
}

/// Per-thread scratch of the exact part.
pub(crate) struct SegScratch {
    scores: Vec<f32>,
    /// Σ e^(s − max) · v over the exact positions, original domain (`head_dim` used).
    acc: [f32; 1024],
    row: [f32; 1024],
}

impl Default for SegScratch {
    fn default() -> Self {
        Self {
            scores: Vec::new(),
            acc: [0.0; 1024],
            row: [0.0; 1024],
        }
    }
}

impl<'a> Segments<'a> {
    pub fn new(cache: &'a KvCache) -> Self {
        Self {
            cache,
            sinks: cache.sinks(),
            frontier: cache.frontier(),
            mean: cache.key_mean(),
        }
    }

    /// Splits the visible positions `lo..=hi` by segment.
    pub fn split(&self, lo: usize, hi: usize) -> Split {
        let end = hi + 1;
        let s = self.sinks.clamp(lo, end);
        let f = self.frontier.clamp(s, end);
        Split {
            sinks: lo..s,
            packed: s..f,
            window: f..end,
        }
    }

    /// `scale · q·μ_g` (f32), the shift the packed scores of kv head `g` need; 0 without
    /// centering. `q`: the query in the original domain.
    pub fn key_bias(&self, q: &[f32], g: usize, scale: f32) -> f32 {
        match self.mean {
            Some(mu) => scale * dot(q, &mu[g * q.len()..(g + 1) * q.len()]),
            None => 0.0,
        }
    }

    /// Scores the exact positions of `split` for query `q` (original domain) against kv head
    /// `g`, and accumulates their values into `s.acc`.
    pub fn exact_part(
        &self,
        q: &[f32],
        g: usize,
        split: &Split,
        cfg: &AttentionConfig,
        s: &mut SegScratch,
    ) -> Partial {
        let d = q.len();
        let n = split.sinks.len() + split.window.len();
        let acc = &mut s.acc[..d];
        acc.fill(0.0);
        if n == 0 {
            return Partial {
                max: f32::NEG_INFINITY,
                sum: 0.0,
            };
        }
        let seg = |p: usize| {
            if p < self.sinks {
                Segment::Sink
            } else {
                Segment::Window
            }
        };
        let row = &mut s.row[..d];
        s.scores.clear();
        let mut max = f32::NEG_INFINITY;
        let c = cfg.softcap;
        for p in split.sinks.clone().chain(split.window.clone()) {
            self.cache.read_exact(Side::Keys, seg(p), g, p, row);
            let mut x = cfg.scale * dot(q, row);
            if c > 0.0 {
                x = c * (x / c).tanh();
            }
            max = max.max(x);
            s.scores.push(x);
        }
        let mut sum = 0f64;
        for (p, sc) in split
            .sinks
            .clone()
            .chain(split.window.clone())
            .zip(&s.scores)
        {
            let w = (sc - max).exp();
            sum += w as f64;
            self.cache.read_exact(Side::Values, seg(p), g, p, row);
            for (a, v) in acc.iter_mut().zip(row.iter()) {
                *a += w * v;
            }
        }
        Partial { max, sum }
    }
}

/// Output factors of the merge: `(f_p, f_e)` with `out = R⁻¹(acc_p · f_p) + acc_e · f_e`, where
/// `acc_p` is the packed part's value sum before its `v_mul` (applied here) and `(max_p,
/// sum_p)` its softmax state. Without exact positions `f_p = v_mul / sum_p` exactly.
pub(crate) fn merge_factors(max_p: f32, sum_p: f64, e: &Partial, v_mul: f32) -> (f32, f32) {
    if e.sum == 0.0 {
        return ((v_mul as f64 / sum_p) as f32, 0.0);
    }
    let m = max_p.max(e.max);
    let wp = ((max_p - m) as f64).exp();
    let we = ((e.max - m) as f64).exp();
    let z = sum_p * wp + e.sum * we;
    ((v_mul as f64 * wp / z) as f32, (we / z) as f32)
}

/// `out += acc_e · f_e` (original domain).
pub(crate) fn add_exact(s: &SegScratch, f_e: f32, out: &mut [f32]) {
    if f_e == 0.0 {
        return;
    }
    for (o, a) in out.iter_mut().zip(&s.acc) {
        *o += a * f_e;
    }
}

/// The output when every visible position is exact: `acc_e / sum_e`.
pub(crate) fn finish_exact(e: &Partial, s: &SegScratch, out: &mut [f32]) {
    let f = (1.0 / e.sum) as f32;
    for (o, a) in out.iter_mut().zip(&s.acc) {
        *o = a * f;
    }
}

/// f32 dot product with 8 independent lanes (auto-vectorized).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (ac, bc) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            lanes[k] += ac[k] * bc[k];
        }
    }
    lanes.iter().sum()
}
