//! The embed command as a user runs it: bad input gets one sentence naming the file, line, id or tensor and
//! exit status 2, never a panic and never a store that looks finished; a killed run resumes to the same store.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_learn-kern"));
    // Backtraces are printed only when asked for; the messages under test are the user's view.
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    cmd.arg("--quiet").arg("--device").arg("cpu");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A tiny random model, made once per test directory.
fn model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    let out = run(bin().args(["init-model", "--preset", "tiny", "--seed", "1", "--out"]).arg(&model));
    assert!(out.status.success(), "{}", stderr(&out));
    model
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs embed on `items` and expects exit status 2 with `want` in the one-line message.
fn expect_bad_input(dir: &Path, model: &Path, items: &Path, want: &str) {
    let out_dir = dir.join("store-bad");
    let out = run(bin().arg("embed").arg("--model").arg(model).arg("--items").arg(items).arg("--out").arg(&out_dir));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(want), "expected {want:?} in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err:?}");
    assert!(!out_dir.join("meta.json").exists(), "no store may look finished");
}

#[test]
fn bad_items_files_name_the_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d);
    let good = b"{\"id\": 1, \"title\": \"Kettle\"}\n";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("json.jsonl", [&good[..], b"{\"id\": 2, \"title\": }\n"].concat(), "line 2 is not valid JSON"),
        ("noid.jsonl", [&good[..], b"{\"title\": \"x\"}\n"].concat(), "line 2 has no \"id\""),
        ("dup.jsonl", [&good[..], b"{\"id\": \"1\", \"title\": \"y\"}\n"].concat(), "duplicate id \"1\""),
        ("latin1.jsonl", [&good[..], b"{\"id\": 2, \"title\": \"Caf\xe9\"}\n"].concat(), "line 2 is not valid UTF-8"),
        ("empty.jsonl", [&good[..], b"{\"id\": 2, \"title\": \"\"}\n"].concat(), "line 2 (id \"2\") has no text"),
    ];
    for (name, bytes, want) in cases {
        let items = write(d, name, &bytes);
        expect_bad_input(d, &m, &items, want);
    }
    expect_bad_input(d, &m, &d.join("missing.jsonl"), "missing.jsonl: cannot open");

    // --skip-invalid turns bad lines into a count and embeds the rest.
    let items = write(d, "mixed.jsonl", &[&good[..], b"oops\n{\"id\": 3, \"text\": \"ok\"}\n"].concat());
    let out = run(bin()
        .arg("embed")
        .arg("--model")
        .arg(&m)
        .arg("--items")
        .arg(&items)
        .arg("--out")
        .arg(d.join("s"))
        .arg("--skip-invalid")
        .arg("--json"));
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["items"].as_u64(), report["skipped_invalid"].as_u64()), (Some(2), Some(1)));
}

#[test]
fn broken_models_name_the_file_or_tensor_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d);
    let items = write(d, "items.jsonl", b"{\"id\": 1, \"title\": \"Kettle\"}\n");
    let config = std::fs::read_to_string(m.join("config.json")).unwrap();

    std::fs::write(m.join("config.json"), "{ not json").unwrap();
    expect_bad_input(d, &m, &items, "config.json");
    std::fs::write(m.join("config.json"), config.replace("\"hidden_size\": 128,", "")).unwrap();
    expect_bad_input(d, &m, &items, "hidden_size");
    // A config promising a wider model than the weights: the first mis-shaped tensor is named with both shapes.
    std::fs::write(m.join("config.json"), config.replace("\"intermediate_size\": 352", "\"intermediate_size\": 353"))
        .unwrap();
    expect_bad_input(d, &m, &items, "gate_proj.weight");
    std::fs::write(m.join("config.json"), config.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"))
        .unwrap();
    expect_bad_input(d, &m, &items, "model.layers.2.");
    std::fs::write(m.join("config.json"), &config).unwrap();
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    expect_bad_input(d, &m, &items, "tokenizer");
    expect_bad_input(d, &d.join("nowhere"), &items, "nowhere");
}

fn embed_cmd(model: &Path, items: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("embed").arg("--model").arg(model).arg("--items").arg(items).arg("--out").arg(out);
    cmd.args(["--batch-tokens", "512", "--sort-window", "64", "--threads", "1"]);
    cmd
}

#[test]
fn a_killed_embed_resumes_to_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d);
    let mut items = String::new();
    for (i, item) in learn_kern::demo::catalogue::generate(1500, 5).iter().enumerate() {
        assert_eq!(item.record["id"], format!("item-{i}"));
        items.push_str(&format!("{}\n", item.record));
    }
    let items = write(d, "items.jsonl", items.as_bytes());

    let whole = d.join("whole");
    let out = run(&mut embed_cmd(&m, &items, &whole));
    assert!(out.status.success(), "{}", stderr(&out));

    // Kill a second run once some batches are journalled, then rerun the same command.
    let resumed = d.join("resumed");
    let mut child = embed_cmd(&m, &items, &resumed).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let journal = resumed.join("progress.journal");
    let started = std::time::Instant::now();
    while std::fs::metadata(&journal).map(|m| m.len() < 24).unwrap_or(true) {
        assert!(started.elapsed().as_secs() < 120, "the job never journalled a batch");
        if child.try_wait().unwrap().is_some() {
            break; // finished before we could kill it: the rerun must then be a no-op
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = run(embed_cmd(&m, &items, &resumed).arg("--json"));
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if report.get("already_complete").is_none() {
        assert!(report["resumed_batches"].as_u64().unwrap() >= 3, "{report}");
        assert!(report["computed_items"].as_u64().unwrap() < 1500, "{report}");
    }
    for name in ["embeddings.npy", "ids.txt"] {
        assert_eq!(std::fs::read(whole.join(name)).unwrap(), std::fs::read(resumed.join(name)).unwrap(), "{name}");
    }
    let meta = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p.join("meta.json")).unwrap()).unwrap()
    };
    assert_eq!(meta(&whole)["count"], 1500);
    assert_eq!(meta(&whole)["total_tokens"], meta(&resumed)["total_tokens"]);

    // The same command on a finished store does nothing; different arguments are refused.
    let out = run(embed_cmd(&m, &items, &resumed).args(["--max-tokens", "64"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("max_tokens: 500 then, 64 now"), "{}", stderr(&out));
}
