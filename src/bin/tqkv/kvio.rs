//! Helpers shared by the subcommands: bit settings, the quantize → dequantize round trip of one
//! KV tensor, and atomic file output.

use std::io::Write;
use std::path::Path;

use tqkv::codebook::SUPPORTED_BITS;
use tqkv::error::try_alloc;
use tqkv::io::KvTensor;
use tqkv::{cpu, CacheLayout, Codec, Domain, Dst, Preset, Result, Side, Src, TqError};

/// Bits per index of keys and of values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bits {
    pub k: u32,
    pub v: u32,
}

/// Parses one bit width (2, 3, 4, 5, 6 or 8) for clap.
pub fn parse_bits(s: &str) -> std::result::Result<u32, String> {
    let b: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bits (2, 3, 4, 5, 6 or 8)"))?;
    if !SUPPORTED_BITS.contains(&b) {
        return Err(format!("bits must be one of 2, 3, 4, 5, 6, 8, got {b}"));
    }
    Ok(b)
}

/// Parses a `KB/VB` setting such as `8/4` for clap.
pub fn parse_bits_pair(s: &str) -> std::result::Result<Bits, String> {
    let Some((k, v)) = s.split_once('/') else {
        return Err(format!(
            "`{s}` is not a KB/VB setting (keys/values bits, e.g. 8/4)"
        ));
    };
    Ok(Bits {
        k: parse_bits(k)?,
        v: parse_bits(v)?,
    })
}

/// Prefixes an error message with `what` (a tensor or file name).
pub fn context(what: &str) -> impl Fn(TqError) -> TqError + '_ {
    // Unprefixed tensors (`k`, `v`) form a layer with an empty name.
    let what = if what.is_empty() { "input" } else { what };
    move |e| match e {
        TqError::InvalidArgument(m) => TqError::InvalidArgument(format!("{what}: {m}")),
        TqError::Format(m) => TqError::Format(format!("{what}: {m}")),
        TqError::Cuda(m) => TqError::Cuda(format!("{what}: {m}")),
        TqError::Io { context, source } => TqError::Io {
            context: format!("{what}: {context}"),
            source,
        },
    }
}

/// The cache layout that holds tensor `t` (its heads and head_dim, `capacity` slots, default
/// its token count). A tensor longer than the capacity is an error.
pub fn layout_for(
    t: &KvTensor,
    bits: Bits,
    seed: u64,
    capacity: Option<usize>,
) -> Result<CacheLayout> {
    let capacity = capacity.unwrap_or(t.tokens);
    if t.tokens > capacity {
        return Err(TqError::InvalidArgument(format!(
            "{}: {} tokens do not fit a cache of capacity {capacity} (--capacity)",
            t.name, t.tokens
        )));
    }
    CacheLayout::new(t.heads, t.head_dim, capacity, bits.k, bits.v)
        .map(|l| l.with_seed(seed))
        .map_err(context(&t.name))
}

/// Quantizes every vector of `t` as one side of a `layout` cache, then dequantizes it back to
/// the original domain: `[tokens, heads, head_dim]` f32, the shape of `t`.
pub fn roundtrip(t: &KvTensor, side: Side, layout: CacheLayout) -> Result<Vec<f32>> {
    let (n, heads, d) = (t.tokens, t.heads, t.head_dim);
    let mut out = vec![0f32; t.data.len()];
    if out.is_empty() {
        return Ok(out);
    }
    t.check_finite()?;
    let codec = Codec::new(layout).map_err(context(&t.name))?;
    let mut packed = try_alloc(layout.packed_len(side), 0u8, &t.name)?;
    let mut norms = try_alloc(layout.norms_len(), 0f32, &t.name)?;
    cpu::quantize(
        &codec,
        side,
        Src::F32(&t.data),
        n,
        0,
        &mut packed,
        &mut norms,
    )
    .map_err(context(&t.name))?;
    let mut by_head = vec![0f32; heads * n * d];
    cpu::dequantize_seq(
        &codec,
        side,
        &packed,
        &norms,
        0,
        n,
        Domain::Original,
        Dst::F32(&mut by_head),
    )
    .map_err(context(&t.name))?;
    for (h, rows) in by_head.chunks_exact(n * d).enumerate() {
        for (tok, row) in rows.chunks_exact(d).enumerate() {
            let start = (tok * heads + h) * d;
            out[start..start + d].copy_from_slice(row);
        }
    }
    Ok(out)
}

/// [`roundtrip`] of centered keys, as a [`tqkv::KvCache`] with centering does it: μ = the
/// per-(head, channel) mean of `t` over its tokens (f64 sums, rounded to f32), `t − μ`
/// quantized and dequantized, μ added back.
pub fn roundtrip_centered(t: &KvTensor, side: Side, layout: CacheLayout) -> Result<Vec<f32>> {
    let per_token = t.heads * t.head_dim;
    if t.data.is_empty() || per_token == 0 {
        return Ok(vec![0f32; t.data.len()]);
    }
    t.check_finite()?;
    let mut sum = vec![0f64; per_token];
    for row in t.data.chunks_exact(per_token) {
        for (s, &x) in sum.iter_mut().zip(row) {
            *s += x as f64;
        }
    }
    let mu: Vec<f32> = sum.iter().map(|s| (s / t.tokens as f64) as f32).collect();
    let mut centered = t.clone();
    for row in centered.data.chunks_exact_mut(per_token) {
        for (x, m) in row.iter_mut().zip(&mu) {
            *x -= m;
        }
    }
    let mut out = roundtrip(&centered, side, layout)?;
    for row in out.chunks_exact_mut(per_token) {
        for (x, m) in row.iter_mut().zip(&mu) {
            *x += m;
        }
    }
    Ok(out)
}

/// Parses a preset name for clap.
pub fn parse_preset(s: &str) -> std::result::Result<Preset, String> {
    s.parse::<Preset>().map_err(|e| e.to_string())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, renamed at the end:
/// `path` is either untouched or complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let shown = path.display();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(TqError::InvalidArgument(format!(
            "cannot write {shown}: directory {} does not exist",
            dir.display()
        )));
    }
    let io_err = |what: String| {
        move |source| TqError::Io {
            context: what,
            source,
        }
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tqkv-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(io_err(format!("cannot write {shown}")))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_err(format!("cannot write {shown}")))?;
    tmp.persist(path)
        .map_err(|e| io_err(format!("cannot write {shown}"))(e.error))?;
    Ok(())
}
