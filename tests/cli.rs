//! The `tqkv` binary: eval and roundtrip outputs, and one test per error path (status 2, one
//! `error: ...` line on stderr, no output file left behind).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Gauss;
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;
use tqkv::codebook::{centroids_f64, gaussian_distortion};
use tqkv::{cpu, CacheLayout, Codec, Domain, Dst, Side, Src};

fn tqkv(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tqkv"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the tqkv binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        stderr(out)
    );
}

/// Status 2, exactly one stderr line `error: ...` containing `needle`, nothing on stdout.
fn assert_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(out));
}

/// Names of the entries of `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A tensor to write: name, dtype, shape, raw little-endian bytes.
struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32_t(name: &str, shape: &[usize], data: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn f16_t(name: &str, shape: &[usize], data: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        bytes: data
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

fn bf16_t(name: &str, shape: &[usize], data: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        bytes: data
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Gaussian `[tokens, heads, head_dim]` values.
fn gauss(seed: u64, shape: &[usize]) -> Vec<f32> {
    Gauss::new(seed).vec(shape.iter().product())
}

fn write_st(path: &Path, tensors: &[T], metadata: Option<HashMap<String, String>>) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("view");
            (t.name.as_str(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, &metadata).expect("serialize");
    std::fs::write(path, bytes).expect("write");
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// `layer.0.k` and `layer.0.v` f32 of one shape, in a file `kv.safetensors`.
fn kv_file(dir: &Path, shape: &[usize]) -> PathBuf {
    let path = dir.join("kv.safetensors");
    write_st(
        &path,
        &[
            f32_t("layer.0.k", shape, &gauss(1, shape)),
            f32_t("layer.0.v", shape, &gauss(2, shape)),
        ],
        None,
    );
    path
}

fn theory(bits: u32) -> f64 {
    gaussian_distortion(centroids_f64(bits).expect("bits"))
}

fn eval_json(dir: &Path, args: &[&str]) -> Value {
    let out = tqkv(dir, args);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).expect("eval --json prints JSON")
}

fn num(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {row}"))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---- eval ----

#[test]
fn eval_default_runs_from_any_directory_on_both_shipped_datasets() {
    let dir = tempdir();
    let v = eval_json(dir.path(), &["eval", "--json", "--bits", "4/4,8/4"]);
    let names: Vec<&str> = v["datasets"]
        .as_array()
        .expect("datasets")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["smollm2-135m", "synthetic"]);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    let bits: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| (r["k_bits"].as_u64().unwrap(), r["v_bits"].as_u64().unwrap()))
        .collect();
    assert_eq!(bits, [(4, 4), (8, 4), (4, 4), (8, 4)]);
    for key in [
        "bytes_per_token",
        "compression_vs_f16",
        "k_rel_mse",
        "v_rel_mse",
        "k_cosine_mean",
        "v_cosine_mean",
        "attn_cosine_mean",
        "attn_cosine_min",
        "attn_rel_err_mean",
        "attn_top1_changed",
    ] {
        for r in rows {
            num(r, key);
        }
    }
}

#[test]
fn eval_on_real_sample_reports_bytes_and_errors_near_lloyd_max_theory() {
    let dir = tempdir();
    let v = eval_json(dir.path(), &["eval", "--json", "--bits", "4/4"]);
    let row = &v["rows"][0];
    assert_eq!(row["dataset"], "smollm2-135m");
    // 6 layers × 3 kv heads × (32 + 32 index bytes + 2 × 4 norm bytes); f16: 6 × 3 × 64 × 4.
    assert_eq!(row["bytes_per_token"], 6 * 3 * 72);
    assert!((num(row, "compression_vs_f16") - 4608.0 / 1296.0).abs() < 1e-12);
    for side in ["k_rel_mse", "v_rel_mse"] {
        let ratio = num(row, side) / theory(4);
        assert!((0.85..1.05).contains(&ratio), "{side}/D_4 = {ratio}");
    }
    let attn = num(row, "attn_cosine_mean");
    assert!((0.98..1.0).contains(&attn), "attn cosine {attn}");
    assert!(num(row, "attn_cosine_min") <= attn);
}

#[test]
fn eval_table_lists_every_default_setting_for_both_datasets() {
    let dir = tempdir();
    let out = tqkv(dir.path(), &["eval"]);
    assert_ok(&out);
    let text = stdout(&out);
    for bits in ["8/8", "6/6", "5/5", "4/4", "3/3", "2/2", "8/4", "4/2"] {
        let n = text
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("{bits} ")))
            .count();
        assert_eq!(n, 2, "{bits} rows in:\n{text}");
    }
    assert!(text.contains("smollm2-135m") && text.contains("synthetic"));
}

#[test]
fn eval_prints_nothing_on_stderr_when_it_is_not_a_terminal() {
    let dir = tempdir();
    let out = tqkv(dir.path(), &["eval", "--bits", "2/2"]);
    assert_ok(&out);
    assert!(out.stderr.is_empty(), "stderr: {}", stderr(&out));
}

#[test]
fn eval_input_without_queries_leaves_attention_columns_null() {
    let dir = tempdir();
    let path = kv_file(dir.path(), &[40, 2, 32]);
    let v = eval_json(
        dir.path(),
        &[
            "eval",
            "--json",
            "--bits",
            "8/8",
            "--input",
            path_str(&path),
        ],
    );
    let row = &v["rows"][0];
    assert_eq!(row["dataset"], "kv.safetensors");
    assert!(row["attn_cosine_mean"].is_null() && row["attn_top1_changed"].is_null());
    let ratio = num(row, "k_rel_mse") / theory(8);
    assert!((0.8..1.1).contains(&ratio), "k_rel_mse/D_8 = {ratio}");
    let text = stdout(&tqkv(
        dir.path(),
        &["eval", "--bits", "8/8", "--input", path_str(&path)],
    ));
    assert!(text.contains("no queries"), "{text}");
}

#[test]
fn eval_input_with_queries_in_mixed_dtypes_measures_attention() {
    let dir = tempdir();
    let path = dir.path().join("mixed.safetensors");
    let (kv, q) = ([48, 2, 64], [48, 6, 64]);
    write_st(
        &path,
        &[
            bf16_t("blk.7.q", &q, &gauss(3, &q)),
            f16_t("blk.7.k", &kv, &gauss(4, &kv)),
            f32_t("blk.7.v", &kv, &gauss(5, &kv)),
        ],
        None,
    );
    let v = eval_json(
        dir.path(),
        &[
            "eval",
            "--json",
            "--bits",
            "8/8,2/2",
            "--input",
            path_str(&path),
        ],
    );
    let (hi, lo) = (&v["rows"][0], &v["rows"][1]);
    assert!(num(hi, "attn_cosine_mean") > 0.999, "{hi}");
    assert!(num(hi, "attn_cosine_mean") > num(lo, "attn_cosine_mean"));
    assert!(num(hi, "attn_top1_changed") <= num(lo, "attn_top1_changed"));
    assert_eq!(v["datasets"][0]["q_heads"], 6);
}

// ---- roundtrip ----

/// What the library gives for one tensor: quantize, dequantize to the original domain,
/// `[tokens, heads, head_dim]`.
fn library_roundtrip(data: &[f32], shape: [usize; 3], side: Side, bits: u32) -> Vec<f32> {
    let [n, h, d] = shape;
    let layout = CacheLayout::new(h, d, n, bits, bits).unwrap();
    let codec = Codec::new(layout).unwrap();
    let mut packed = vec![0u8; layout.packed_len(side)];
    let mut norms = vec![0f32; layout.norms_len()];
    cpu::quantize(&codec, side, Src::F32(data), n, 0, &mut packed, &mut norms).unwrap();
    let mut by_head = vec![0f32; h * n * d];
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
    .unwrap();
    let mut out = vec![0f32; n * h * d];
    for hh in 0..h {
        for t in 0..n {
            let src = (hh * n + t) * d;
            let dst = (t * h + hh) * d;
            out[dst..dst + d].copy_from_slice(&by_head[src..src + d]);
        }
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn roundtrip_writes_library_output_for_kv_and_copies_everything_else() {
    let dir = tempdir();
    let (input, output) = (dir.path().join("in.st"), dir.path().join("out.st"));
    let shape = [24usize, 2, 32];
    let (k, v) = (gauss(6, &shape), gauss(7, &shape));
    let k16: Vec<f32> = k.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    let other = T {
        name: "embed".into(),
        dtype: Dtype::I32,
        shape: vec![3],
        bytes: [1i32, -2, 3].iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let q = bf16_t("layer.0.q", &[24, 4, 32], &gauss(8, &[24, 4, 32]));
    let q_bytes = q.bytes.clone();
    let meta = HashMap::from([("model".to_string(), "test".to_string())]);
    write_st(
        &input,
        &[
            f16_t("k", &shape, &k),
            f32_t("layer.0.v", &shape, &v),
            other,
            q,
        ],
        Some(meta),
    );
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "3",
            "--input",
            "in.st",
            "--output",
            "out.st",
        ],
    );
    assert_ok(&out);
    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let got_k = st.tensor("k").unwrap();
    assert_eq!((got_k.dtype(), got_k.shape()), (Dtype::F32, &shape[..]));
    assert_eq!(
        f32s(got_k.data()),
        library_roundtrip(&k16, shape, Side::Keys, 4)
    );
    let got_v = st.tensor("layer.0.v").unwrap();
    assert_eq!(got_v.dtype(), Dtype::F32);
    assert_eq!(
        f32s(got_v.data()),
        library_roundtrip(&v, shape, Side::Values, 3)
    );
    let embed = st.tensor("embed").unwrap();
    assert_eq!(
        (embed.dtype(), embed.data()),
        (Dtype::I32, &bytes_of_i32(&[1, -2, 3])[..])
    );
    let got_q = st.tensor("layer.0.q").unwrap();
    assert_eq!((got_q.dtype(), got_q.data()), (Dtype::BF16, &q_bytes[..]));
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    assert_eq!(meta["model"], "test");
    assert!(meta["tqkv_roundtrip"].contains("k_bits=4 v_bits=3"));
    assert_eq!(entries(dir.path()), ["in.st", "out.st"]);
}

fn bytes_of_i32(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn roundtrip_seed_changes_the_reconstruction() {
    let dir = tempdir();
    kv_file(dir.path(), &[16, 1, 32]);
    let run = |seed: &str, out: &str| {
        let o = tqkv(
            dir.path(),
            &[
                "roundtrip",
                "--k-bits",
                "2",
                "--v-bits",
                "2",
                "--seed",
                seed,
                "--input",
                "kv.safetensors",
                "--output",
                out,
            ],
        );
        assert_ok(&o);
        let bytes = std::fs::read(dir.path().join(out)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        f32s(st.tensor("layer.0.k").unwrap().data())
    };
    assert_ne!(run("1", "a.st"), run("2", "b.st"));
}

// ---- errors ----

#[test]
fn missing_input_file_is_an_error() {
    let dir = tempdir();
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "nope.safetensors"]),
        "nope.safetensors",
    );
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--input",
            "nope.st",
            "--output",
            "o.st",
        ],
    );
    assert_error(&out, "cannot read nope.st");
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn non_safetensors_file_is_an_error() {
    let dir = tempdir();
    std::fs::write(
        dir.path().join("junk.st"),
        b"this is not a safetensors file",
    )
    .unwrap();
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "junk.st"]),
        "not a valid safetensors file",
    );
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--input",
            "junk.st",
            "--output",
            "o.st",
        ],
    );
    assert_error(&out, "not a valid safetensors file");
    assert_eq!(entries(dir.path()), ["junk.st"]);
}

#[test]
fn wrong_rank_is_an_error() {
    let dir = tempdir();
    let path = dir.path().join("r2.st");
    write_st(
        &path,
        &[
            f32_t("layer.0.k", &[8, 64], &gauss(1, &[8, 64])),
            f32_t("layer.0.v", &[8, 64], &gauss(2, &[8, 64])),
        ],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "r2.st"]),
        "expected rank 3",
    );
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--input",
            "r2.st",
            "--output",
            "o.st",
        ],
    );
    assert_error(&out, "layer.0.k: expected rank 3");
    assert_eq!(entries(dir.path()), ["r2.st"]);
}

#[test]
fn head_dim_not_a_power_of_two_is_an_error() {
    let dir = tempdir();
    kv_file(dir.path(), &[8, 2, 48]);
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "kv.safetensors"]),
        "head_dim must be a power of two in 32..=1024, got 48",
    );
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--input",
            "kv.safetensors",
            "--output",
            "o.st",
        ],
    );
    assert_error(&out, "got 48");
    assert_eq!(entries(dir.path()), ["kv.safetensors"]);
}

#[test]
fn head_dim_outside_32_to_1024_is_an_error() {
    for d in [16usize, 2048] {
        let dir = tempdir();
        kv_file(dir.path(), &[2, 1, d]);
        let out = tqkv(
            dir.path(),
            &[
                "roundtrip",
                "--k-bits",
                "4",
                "--v-bits",
                "4",
                "--input",
                "kv.safetensors",
                "--output",
                "o.st",
            ],
        );
        assert_error(&out, &format!("got {d}"));
        assert_error(
            &tqkv(dir.path(), &["eval", "--input", "kv.safetensors"]),
            &format!("got {d}"),
        );
        assert_eq!(entries(dir.path()), ["kv.safetensors"]);
    }
}

#[test]
fn unsupported_bits_are_an_error() {
    let dir = tempdir();
    kv_file(dir.path(), &[8, 1, 32]);
    for bits in ["4/7", "1/1", "4", "x/4"] {
        assert_error(&tqkv(dir.path(), &["eval", "--bits", bits]), "--bits");
    }
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "7",
            "--v-bits",
            "4",
            "--input",
            "kv.safetensors",
            "--output",
            "o.st",
        ],
    );
    assert_error(&out, "bits must be one of 2, 3, 4, 5, 6, 8, got 7");
    assert_eq!(entries(dir.path()), ["kv.safetensors"]);
}

#[test]
fn tokens_over_capacity_are_an_error() {
    let dir = tempdir();
    kv_file(dir.path(), &[16, 1, 32]);
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--capacity",
            "8",
            "--input",
            "kv.safetensors",
            "--output",
            "o.st",
        ],
    );
    assert_error(&out, "16 tokens do not fit a cache of capacity 8");
    assert_error(
        &tqkv(
            dir.path(),
            &["eval", "--capacity", "15", "--input", "kv.safetensors"],
        ),
        "capacity 15",
    );
    assert_eq!(entries(dir.path()), ["kv.safetensors"]);
}

#[test]
fn unknown_option_is_an_error() {
    let dir = tempdir();
    assert_error(&tqkv(dir.path(), &["eval", "--frobnicate"]), "--frobnicate");
    assert_error(
        &tqkv(dir.path(), &["roundtrip", "--frobnicate"]),
        "--frobnicate",
    );
    assert_error(&tqkv(dir.path(), &["evaluate"]), "evaluate");
    assert_error(&tqkv(dir.path(), &[]), "subcommand");
}

#[test]
fn missing_required_roundtrip_options_are_an_error() {
    let dir = tempdir();
    assert_error(
        &tqkv(dir.path(), &["roundtrip", "--k-bits", "4"]),
        "--v-bits",
    );
}

#[test]
fn non_finite_values_are_an_error_and_leave_no_output() {
    let dir = tempdir();
    let shape = [8usize, 2, 32];
    let mut k = gauss(1, &shape);
    k[(5 * 2 + 1) * 32 + 3] = f32::NAN;
    let mut v = gauss(2, &shape);
    v[7] = f32::INFINITY;
    write_st(
        &dir.path().join("nan.st"),
        &[
            f32_t("layer.0.k", &shape, &k),
            f32_t("layer.0.v", &shape, &gauss(2, &shape)),
        ],
        None,
    );
    write_st(
        &dir.path().join("inf.st"),
        &[
            f32_t("layer.0.k", &shape, &gauss(1, &shape)),
            f16_t("layer.0.v", &shape, &v),
        ],
        None,
    );
    let roundtrip = |input: &str| {
        tqkv(
            dir.path(),
            &[
                "roundtrip",
                "--k-bits",
                "4",
                "--v-bits",
                "4",
                "--input",
                input,
                "--output",
                "o.st",
            ],
        )
    };
    assert_error(
        &roundtrip("nan.st"),
        "layer.0.k: token 5, head 1, coordinate 3 is NaN",
    );
    assert_error(
        &roundtrip("inf.st"),
        "layer.0.v: token 0, head 0, coordinate 7 is inf",
    );
    assert_error(&tqkv(dir.path(), &["eval", "--input", "nan.st"]), "is NaN");
    assert_eq!(entries(dir.path()), ["inf.st", "nan.st"]);
}

#[test]
fn non_finite_queries_are_an_error_in_eval() {
    let dir = tempdir();
    let (kv, qs) = ([8usize, 1, 32], [8usize, 2, 32]);
    let mut q = gauss(3, &qs);
    q[40] = f32::NEG_INFINITY;
    write_st(
        &dir.path().join("q.st"),
        &[
            f32_t("q", &qs, &q),
            f32_t("k", &kv, &gauss(1, &kv)),
            f32_t("v", &kv, &gauss(2, &kv)),
        ],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "q.st"]),
        "q: token 0, head 1, coordinate 8 is -inf",
    );
}

#[test]
fn failed_roundtrip_keeps_an_existing_output_untouched() {
    let dir = tempdir();
    let shape = [8usize, 1, 32];
    let mut v = gauss(2, &shape);
    v[100] = f32::NAN;
    write_st(
        &dir.path().join("in.st"),
        &[
            f32_t("a.k", &shape, &gauss(1, &shape)),
            f32_t("a.v", &shape, &v),
        ],
        None,
    );
    std::fs::write(dir.path().join("out.st"), b"previous").unwrap();
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--input",
            "in.st",
            "--output",
            "out.st",
        ],
    );
    assert_error(&out, "a.v");
    assert_eq!(
        std::fs::read(dir.path().join("out.st")).unwrap(),
        b"previous"
    );
    assert_eq!(entries(dir.path()), ["in.st", "out.st"]);
}

#[test]
fn unsupported_dtype_is_an_error() {
    let dir = tempdir();
    let bytes = bytes_of_i32(&vec![1; 8 * 32]);
    let k = T {
        name: "k".into(),
        dtype: Dtype::I32,
        shape: vec![8, 1, 32],
        bytes,
    };
    write_st(
        &dir.path().join("i.st"),
        &[k, f32_t("v", &[8, 1, 32], &gauss(2, &[8, 1, 32]))],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "i.st"]),
        "k: dtype I32 is not supported",
    );
}

#[test]
fn inconsistent_layer_shapes_are_an_error_in_eval() {
    let dir = tempdir();
    write_st(
        &dir.path().join("heads.st"),
        &[
            f32_t("q", &[8, 4, 32], &gauss(3, &[8, 4, 32])),
            f32_t("k", &[8, 3, 32], &gauss(1, &[8, 3, 32])),
            f32_t("v", &[8, 3, 32], &gauss(2, &[8, 3, 32])),
        ],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "heads.st"]),
        "q: heads (4) is not a multiple of the kv heads (3)",
    );
    write_st(
        &dir.path().join("kv.st"),
        &[
            f32_t("k", &[8, 1, 32], &gauss(1, &[8, 1, 32])),
            f32_t("v", &[9, 1, 32], &gauss(2, &[9, 1, 32])),
        ],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "kv.st"]),
        "differs from k",
    );
    write_st(
        &dir.path().join("qt.st"),
        &[
            f32_t("q", &[7, 2, 32], &gauss(3, &[7, 2, 32])),
            f32_t("k", &[8, 1, 32], &gauss(1, &[8, 1, 32])),
            f32_t("v", &[8, 1, 32], &gauss(2, &[8, 1, 32])),
        ],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "qt.st"]),
        "q: tokens (7) and head_dim (32) must match k (8, 32)",
    );
}

#[test]
fn layer_without_values_is_an_error_in_eval() {
    let dir = tempdir();
    write_st(
        &dir.path().join("k.st"),
        &[
            f32_t("layer.0.k", &[8, 1, 32], &gauss(1, &[8, 1, 32])),
            f32_t("layer.0.v", &[8, 1, 32], &gauss(2, &[8, 1, 32])),
            f32_t("layer.1.k", &[8, 1, 32], &gauss(3, &[8, 1, 32])),
        ],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "k.st"]),
        "layer `layer.1` needs both a `.k` and a `.v` tensor",
    );
}

#[test]
fn file_without_kv_tensors_is_an_error() {
    let dir = tempdir();
    write_st(
        &dir.path().join("w.st"),
        &[f32_t("weight", &[4, 4], &[0.5; 16])],
        None,
    );
    assert_error(
        &tqkv(dir.path(), &["eval", "--input", "w.st"]),
        "no K/V tensors",
    );
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--input",
            "w.st",
            "--output",
            "o.st",
        ],
    );
    assert_error(&out, "no K/V tensor");
    assert_eq!(entries(dir.path()), ["w.st"]);
}

#[test]
fn output_into_a_missing_directory_is_an_error() {
    let dir = tempdir();
    kv_file(dir.path(), &[8, 1, 32]);
    let out = tqkv(
        dir.path(),
        &[
            "roundtrip",
            "--k-bits",
            "4",
            "--v-bits",
            "4",
            "--input",
            "kv.safetensors",
            "--output",
            "missing/o.st",
        ],
    );
    assert_error(&out, "directory missing does not exist");
}

#[test]
fn help_works_for_every_subcommand() {
    let dir = tempdir();
    for args in [
        &["--help"][..],
        &["eval", "--help"],
        &["roundtrip", "--help"],
        &["help", "eval"],
    ] {
        let out = tqkv(dir.path(), args);
        assert_ok(&out);
        assert!(
            stdout(&out).contains("Usage: tqkv"),
            "{args:?}: {}",
            stdout(&out)
        );
    }
}

#[test]
fn zero_sizes_in_bench_codec_are_an_error() {
    let dir = tempdir();
    for (flag, name) in [
        ("--tokens", "tokens"),
        ("--heads", "heads"),
        ("--head-dim", "head-dim"),
    ] {
        assert_error(
            &tqkv(dir.path(), &["bench", "codec", "--cpu", flag, "0"]),
            &format!("bench codec: --{name} must be > 0"),
        );
    }
    assert_error(
        &tqkv(dir.path(), &["bench", "codec", "--cpu", "--reps", "0"]),
        "--reps (0) must be at least 1",
    );
}

#[test]
fn bad_tuning_values_in_bench_decode_are_errors_before_any_device_work() {
    let dir = tempdir();
    assert_error(
        &tqkv(dir.path(), &["bench", "decode", "--splits", "0"]),
        "invalid value '0' for '--splits <SPLITS>'",
    );
    for (bad, needle) in [
        ("blocks:0", "\"0\" is not a block count >= 1"),
        ("fold:x", "credit \"x\" is not a tile count"),
        (
            "pairs",
            "expected \"spread\", \"blocks\", \"blocks:N\" or \"fold:CREDIT\"",
        ),
    ] {
        assert_error(
            &tqkv(dir.path(), &["bench", "decode", "--exact", bad]),
            needle,
        );
    }
    assert_error(
        &tqkv(dir.path(), &["bench", "decode", "--l2", "last"]),
        "invalid value 'last' for '--l2 <L2>'",
    );
}
