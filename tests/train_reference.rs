//! `learn-kern train`, `eval` and `infer` held to PyTorch. tools/golden/make_train_fixtures.py builds a tiny
//! PCH model from `transformers.BertEncoder` as the official LEARN code does, trains it in float64 with
//! `--no-shuffle` semantics and records every update (tests/fixtures/train/reference.json, with the flags
//! of each run); here the real binary runs the same flags from the same float32 initial checkpoint and its
//! `train.log.jsonl` must follow the record step by step. Eval and infer run on the checkpoint PyTorch
//! trained, so both sides rank with the same weights.

use learn_kern::embed::store::ContentStore;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Loss and gradient norm: float32 against float64 over six Adam updates.
const TRAIN_RTOL: f64 = 1e-3;
/// Metrics are averages of rank-based values; the fixture's scores are at least 1e-4 apart in every
/// ranked list the metrics read (the script asserts it), far more than float32 rounding moves them, so
/// the ranks agree and the averages equal PyTorch's up to summation order.
const METRIC_ATOL: f64 = 1e-6;
/// Embeddings: float32 against float64 through the whole model (SPEC §6: CPU vs PyTorch ≤ 1e-4).
const EMBED_ATOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train")
}

fn reference() -> Value {
    let path = fixtures().join("reference.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The binary, run from the fixture directory so that the recorded flags' file names resolve.
fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_learn-kern"));
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE").current_dir(fixtures());
    cmd.args(["--quiet", "--device", "cpu"]);
    cmd
}

fn succeed(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the binary runs");
    assert!(out.status.success(), "{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr));
    out
}

fn strings(flags: &Value) -> Vec<String> {
    flags.as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect()
}

/// Relative difference, with an exact zero required where the reference is exactly zero (a batch whose
/// users have no negatives).
fn rel(got: f64, want: f64) -> f64 {
    if want == 0.0 { if got == 0.0 { 0.0 } else { f64::INFINITY } } else { (got - want).abs() / want.abs() }
}

fn train_case(name: &str) {
    let reference = reference();
    let case = reference["train"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    succeed(
        bin()
            .args(["train", "--content", "store", "--sequences", "sequences.jsonl", "--no-shuffle", "--init"])
            .arg(case["init"].as_str().unwrap())
            .arg("--out")
            .arg(&out)
            .args(strings(&case["flags"])),
    );
    let log = std::fs::read_to_string(out.join("train.log.jsonl")).unwrap();
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let want = case["log"].as_array().unwrap();
    assert_eq!(lines.len(), want.len(), "{name}: one log line per update");
    let mut worst = [0.0f64; 2];
    for (got, want) in lines.iter().zip(want) {
        let step = &want["step"];
        assert_eq!(got["step"], *step, "{name}");
        for key in ["users", "pairs"] {
            assert_eq!(got[key], want[key], "{name} step {step}: {key}");
        }
        let lr = got["lr"].as_f64().unwrap();
        assert!(rel(lr, want["lr"].as_f64().unwrap()) < 1e-12, "{name} step {step}: lr {lr} vs {}", want["lr"]);
        for (w, key) in worst.iter_mut().zip(["loss", "grad_norm"]) {
            let (g, r) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            let d = rel(g, r);
            assert!(d <= TRAIN_RTOL, "{name} step {step}: {key} {g} vs PyTorch {r} (relative {d:.1e})");
            *w = w.max(d);
        }
    }
    eprintln!("{name}: worst relative difference: loss {:.1e}, grad_norm {:.1e}", worst[0], worst[1]);
}

#[test]
fn training_with_every_position_and_false_negatives_masked_follows_pytorch() {
    train_case("all_masked");
}

#[test]
fn training_on_last_positions_with_adamw_and_clipping_follows_pytorch() {
    train_case("last_kept_adamw_clipped");
}

#[test]
fn training_with_the_self_item_tower_follows_pytorch() {
    train_case("self_item_tower");
}

#[test]
fn eval_metrics_follow_pytorch() {
    let reference = reference();
    for case in reference["eval"].as_array().unwrap() {
        let name = &case["name"];
        let out = succeed(
            bin()
                .args(["eval", "--checkpoint", "trained.safetensors", "--content", "store"])
                .args(["--sequences", "sequences.jsonl", "--json", "-"])
                .args(strings(&case["flags"])),
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["users"], case["users"], "{name}");
        assert_eq!(got["gallery"], case["gallery"], "{name}");
        let (got, want) = (got["metrics"].as_object().unwrap(), case["metrics"].as_object().unwrap());
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for (key, want) in want {
            let (g, w) = (got[key].as_f64().unwrap(), want.as_f64().unwrap());
            assert!((g - w).abs() <= METRIC_ATOL, "{name} {key}: {g} vs PyTorch {w}");
        }
    }
}

/// Runs `infer` and reads the store it writes.
fn infer(dir: &Path, tower: &str, extra: &[&str]) -> ContentStore {
    let out = dir.join(tower);
    succeed(
        bin()
            .args(["infer", "--checkpoint", "trained.safetensors", "--content", "store", "--tower", tower])
            .args(extra)
            .arg("--out")
            .arg(&out),
    );
    ContentStore::open(&out).unwrap()
}

fn assert_rows_match(store: &ContentStore, want: &Value, what: &str) {
    let want = want.as_array().unwrap();
    assert_eq!(store.len(), want.len(), "{what}");
    for (r, want) in want.iter().enumerate() {
        let want = want.as_array().unwrap();
        assert_eq!(store.dim(), want.len(), "{what}");
        for (g, w) in store.row(r).iter().zip(want) {
            let w = w.as_f64().unwrap();
            assert!((*g as f64 - w).abs() <= EMBED_ATOL, "{what} row {r} ({}): {g} vs PyTorch {w}", store.ids[r]);
        }
    }
}

#[test]
fn infer_embeddings_follow_pytorch() {
    let reference = reference();
    let want = &reference["embeddings"];
    let dir = tempfile::tempdir().unwrap();
    let items = infer(dir.path(), "item", &[]);
    let content = ContentStore::open(&fixtures().join("store")).unwrap();
    assert_eq!(items.ids, content.ids);
    assert_rows_match(&items, &want["item"], "item embeddings");

    let history = want["history"].to_string();
    let users = infer(dir.path(), "user", &["--sequences", "sequences.jsonl", "--history", &history]);
    let ids: Vec<&str> = want["users"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(users.ids, ids);
    assert_rows_match(&users, &want["user"], "user embeddings");
}
