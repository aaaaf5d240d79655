//! Dense causal grouped-query attention with f64 accumulation: the reference `tqkv eval`
//! compares the quantized cache against.

/// Attention outputs of one query head for every token.
pub struct HeadOutput {
    /// `[tokens, head_dim]`.
    pub out: Vec<f64>,
    /// Per token, the key position with the largest attention weight (the lowest on ties).
    pub top: Vec<usize>,
    /// Per token, the log-sum-exp of its scores.
    pub lse: Vec<f64>,
    /// The scaled scores `s[t][j]` (j ≤ t; row t starts at `t(t+1)/2`) when asked for, else
    /// empty.
    pub scores: Vec<f64>,
}

/// Shapes of one layer: `q` is `[tokens, q_heads, head_dim]`, `k` and `v` are
/// `[tokens, kv_heads, head_dim]`; `q_heads` is a multiple of `kv_heads`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Query head `qh` over the whole sequence: token t attends to keys 0..=t of kv head
/// `qh / (q_heads / kv_heads)` with weights softmax(q·k / √head_dim). `keep_scores` also
/// returns the scores.
pub fn attend_head(
    s: Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qh: usize,
    keep_scores: bool,
) -> HeadOutput {
    let d = s.head_dim;
    let kvh = qh / (s.q_heads / s.kv_heads);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; s.tokens * d];
    let mut top = vec![0usize; s.tokens];
    let mut lse = Vec::with_capacity(s.tokens);
    let mut scores = Vec::with_capacity(if keep_scores {
        s.tokens * (s.tokens + 1) / 2
    } else {
        0
    });
    let mut w = vec![0f64; s.tokens];
    let kv_row = |t: usize| {
        let start = (t * s.kv_heads + kvh) * d;
        start..start + d
    };
    for t in 0..s.tokens {
        let qs = (t * s.q_heads + qh) * d;
        let qv = &q[qs..qs + d];
        let mut best = (f64::NEG_INFINITY, 0usize);
        for (j, wj) in w[..=t].iter_mut().enumerate() {
            let kj = &k[kv_row(j)];
            let dot: f64 = qv.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
            *wj = dot * scale;
            if *wj > best.0 {
                best = (*wj, j);
            }
        }
        top[t] = best.1;
        if keep_scores {
            scores.extend_from_slice(&w[..=t]);
        }
        let mut total = 0.0;
        for wj in &mut w[..=t] {
            *wj = (*wj - best.0).exp();
            total += *wj;
        }
        lse.push(best.0 + total.ln());
        let o = &mut out[t * d..(t + 1) * d];
        for (j, &wj) in w[..=t].iter().enumerate() {
            let p = wj / total;
            for (oi, &vi) in o.iter_mut().zip(&v[kv_row(j)]) {
                *oi += p * vi as f64;
            }
        }
    }
    HeadOutput {
        out,
        top,
        lse,
        scores,
    }
}
