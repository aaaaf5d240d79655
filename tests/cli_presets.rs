//! The `tqkv` binary's preset features: `eval --presets`, `roundtrip --center-keys` and
//! `--preset`, and their error paths (status 2, one `error: ...` line).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Gauss;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;
use tqkv::{CacheLayout, CacheOptions, Domain, Dst, KvCache, Side, Src};

fn tqkv(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tqkv"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the tqkv binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "stderr: {}", stderr(out));
}

fn assert_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{needle:?}: {err}"
    );
    assert!(out.stdout.is_empty());
}

const SHAPE: [usize; 3] = [24, 2, 32];
const Q_SHAPE: [usize; 3] = [24, 4, 32];

/// Keys with a per-channel offset, values, queries: `layer.0.{k,v,q}` f32 in `kv.st`.
fn kv_file(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let mut g = Gauss::new(1);
    let n: usize = SHAPE.iter().product();
    let k: Vec<f32> = (0..n).map(|i| g.next() + (i % 64) as f32 * 0.1).collect();
    let v = g.vec(n);
    let q = g.vec(Q_SHAPE.iter().product());
    let bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let (kb, vb, qb) = (bytes(&k), bytes(&v), bytes(&q));
    let views = vec![
        (
            "layer.0.k",
            TensorView::new(Dtype::F32, SHAPE.to_vec(), &kb).unwrap(),
        ),
        (
            "layer.0.v",
            TensorView::new(Dtype::F32, SHAPE.to_vec(), &vb).unwrap(),
        ),
        (
            "layer.0.q",
            TensorView::new(Dtype::F32, Q_SHAPE.to_vec(), &qb).unwrap(),
        ),
    ];
    let st = safetensors::serialize(views, &None).unwrap();
    std::fs::write(dir.join("kv.st"), st).unwrap();
    (k, v)
}

fn eval_json(dir: &Path, args: &[&str]) -> Value {
    let out = tqkv(dir, args);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn eval_reports_each_preset_beside_plain_turboquant() {
    let dir = tempfile::tempdir().unwrap();
    kv_file(dir.path());
    let v = eval_json(
        dir.path(),
        &[
            "eval",
            "--json",
            "--bits",
            "4/4",
            "--input",
            "kv.st",
            "--presets",
            "tq4,k8v4",
        ],
    );
    let rows = v["presets"].as_array().unwrap();
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["preset"].as_str().unwrap(),
                r["variant"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("tq4", "plain"),
            ("tq4", "preset"),
            ("k8v4", "plain"),
            ("k8v4", "preset")
        ]
    );
    for pair in rows.chunks(2) {
        let (plain, preset) = (&pair[0], &pair[1]);
        assert_eq!(plain["k_bits"], preset["k_bits"]);
        let f = |r: &Value, k: &str| r[k].as_f64().unwrap();
        assert!(f(preset, "kl_mean") < f(plain, "kl_mean"), "{preset}");
        assert!(f(preset, "attn_rel_err_mean") < f(plain, "attn_rel_err_mean"));
        assert_eq!(preset["window"], 32);
        assert_eq!(preset["layers"].as_array().unwrap().len(), 1);
        let bpv = preset["bits_per_value"][0]["bits_per_value"]
            .as_f64()
            .unwrap();
        assert!(
            bpv > plain["bits_per_value"][0]["bits_per_value"]
                .as_f64()
                .unwrap()
        );
    }
}

#[test]
fn a_window_covering_every_token_makes_the_preset_exact() {
    let dir = tempfile::tempdir().unwrap();
    kv_file(dir.path());
    let v = eval_json(
        dir.path(),
        &[
            "eval",
            "--json",
            "--bits",
            "4/4",
            "--input",
            "kv.st",
            "--presets",
            "tq3",
            "--window",
            "24",
        ],
    );
    let preset = &v["presets"][1];
    assert_eq!(preset["kl_mean"].as_f64().unwrap(), 0.0);
    assert_eq!(preset["top1_changed"].as_f64().unwrap(), 0.0);
    assert!(preset["attn_rel_err_mean"].as_f64().unwrap() < 1e-12);
}

#[test]
fn eval_ablation_and_per_layer_tables() {
    let dir = tempfile::tempdir().unwrap();
    kv_file(dir.path());
    let out = tqkv(
        dir.path(),
        &[
            "eval",
            "--bits",
            "4/4",
            "--input",
            "kv.st",
            "--presets",
            "tq4",
            "--ablation",
            "--per-layer",
        ],
    );
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for variant in ["plain", "preset", "center only", "exact only"] {
        assert!(
            text.contains(&format!("tq4 {variant} per layer:")),
            "{text}"
        );
    }
}

#[test]
fn eval_preset_errors() {
    let dir = tempfile::tempdir().unwrap();
    kv_file(dir.path());
    let base = ["eval", "--input", "kv.st", "--bits", "4/4"];
    let run = |extra: &[&str]| tqkv(dir.path(), &[&base[..], extra].concat());
    assert_error(&run(&["--presets", "tq5"]), "unknown preset `tq5`");
    assert_error(&run(&["--prefill", "0"]), "--prefill (0) must be in 1..=24");
    assert_error(&run(&["--prefill", "25"]), "--prefill (25)");
    assert_error(&run(&["--window", "x"]), "--window");
}

#[test]
fn roundtrip_center_keys_matches_a_centering_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (k, v) = kv_file(dir.path());
    for args in [
        &["--k-bits", "4", "--v-bits", "3", "--center-keys"][..],
        &["--preset", "k6v4"][..],
    ] {
        let out = tqkv(
            dir.path(),
            &[
                &["roundtrip", "--input", "kv.st", "--output", "out.st"][..],
                args,
            ]
            .concat(),
        );
        assert_ok(&out);
        let (kb, vb) = if args[0] == "--preset" {
            (6, 4)
        } else {
            (4, 3)
        };
        let bytes = std::fs::read(dir.path().join("out.st")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        // The library's centering cache: μ from one append of every token, all packed.
        let [n, h, d] = SHAPE;
        let l = CacheLayout::new(h, d, n, kb, vb).unwrap();
        let opts = CacheOptions::plain().with_center_keys(true);
        let mut c = KvCache::with_options(l, opts).unwrap();
        c.append(Src::F32(&k), Src::F32(&v)).unwrap();
        for (side, name) in [(Side::Keys, "layer.0.k"), (Side::Values, "layer.0.v")] {
            let mut by_head = vec![0f32; n * h * d];
            c.dequantize(side, 0, n, Domain::Original, Dst::F32(&mut by_head))
                .unwrap();
            let got = f32s(st.tensor(name).unwrap().data());
            for t in 0..n {
                for hh in 0..h {
                    assert_eq!(
                        got[(t * h + hh) * d..][..d],
                        by_head[(hh * n + t) * d..][..d],
                        "{args:?} {name}"
                    );
                }
            }
        }
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        assert!(meta["tqkv_roundtrip"].contains("center_keys=true"));
    }
}

#[test]
fn roundtrip_preset_errors() {
    let dir = tempfile::tempdir().unwrap();
    kv_file(dir.path());
    let io = ["roundtrip", "--input", "kv.st", "--output", "out.st"];
    let run = |extra: &[&str]| tqkv(dir.path(), &[&io[..], extra].concat());
    assert_error(&run(&["--preset", "fp8"]), "unknown preset `fp8`");
    assert_error(&run(&["--preset", "tq4", "--k-bits", "4"]), "--k-bits");
    assert_error(&run(&[]), "--k-bits");
    assert_error(&run(&["--v-bits", "4"]), "--k-bits");
    assert!(!dir.path().join("out.st").exists());
}
