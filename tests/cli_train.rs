//! train, eval and infer as a user runs them: a killed run resumes to exactly the result of an uninterrupted
//! one, a diverging run stops at the step that diverged and keeps the last good checkpoint, bad input gets
//! one sentence naming the file, line, id, tensor or flag and exit status 2, and infer writes stores that
//! neighbors reads. The data is the small fixture of tests/fixtures/train.

use learn_kern::embed::store::ContentStore;
use learn_kern::pch::{PchConfig, PchParams};
use learn_kern::train::checkpoint::{self, write_f32_safetensors};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train").join(name)
}

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_learn-kern"));
    // Backtraces are printed only when asked for; the messages under test are the user's view.
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    cmd.args(["--quiet", "--device", "cpu"]);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn succeed(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    out
}

/// A training run of the tiny preset on the fixture, long enough to be killed in the middle: shuffled
/// epochs and dropout, so that a resume must restore the order and the dropout stream too.
fn train_cmd(out: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("train").arg("--content").arg(fixture("store")).arg("--sequences").arg(fixture("sequences.jsonl"));
    cmd.arg("--out").arg(out);
    cmd.args(["--preset", "pch-tiny", "--steps", "40", "--batch-users", "4", "--history", "9", "--targets", "6"]);
    cmd.args(["--lr", "1e-3", "--dropout", "0.1", "--seed", "7", "--checkpoint-every", "2", "--threads", "2"]);
    cmd
}

/// Log lines without the wall-clock field.
fn parse_log(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| {
            let mut v: Value = serde_json::from_str(line).unwrap();
            v.as_object_mut().unwrap().remove("elapsed_s").expect("every line has elapsed_s");
            v
        })
        .collect()
}

fn log_lines(dir: &Path) -> Vec<Value> {
    parse_log(&std::fs::read_to_string(dir.join("train.log.jsonl")).unwrap())
}

fn checkpoint_step(path: &Path) -> usize {
    checkpoint::load(path).unwrap().1["step"].parse().unwrap()
}

/// Starts a run and SIGKILLs it as soon as its first optimiser state is on disk. The rest of the run takes
/// well under a second, so a poll delayed that long on a loaded machine finds it finished: then it starts
/// again in a clean directory, a few times at most.
fn start_and_kill(out: &Path) {
    for _ in 0..5 {
        let mut child = train_cmd(out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let started = Instant::now();
        while !out.join("optimizer.safetensors").exists() {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before it saved any state");
            assert!(started.elapsed() < Duration::from_secs(120), "the run never saved its state");
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
        std::fs::remove_dir_all(out).unwrap();
    }
    panic!("five runs finished before they could be killed");
}

#[test]
fn a_killed_run_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    succeed(&mut train_cmd(&whole));
    let want_log = log_lines(&whole);
    let want_checkpoint = std::fs::read(whole.join("checkpoint.safetensors")).unwrap();
    assert_eq!(want_log.len(), 40);
    assert_eq!(checkpoint_step(&whole.join("checkpoint.safetensors")), 40);

    // The same command again continues from the last saved step; so does --resume DIR.
    for (name, resume_flag) in [("rerun", false), ("resume", true)] {
        let out = dir.path().join(name);
        start_and_kill(&out);
        let mut cmd = if resume_flag {
            let mut cmd = bin();
            cmd.arg("train").arg("--resume").arg(&out).args(["--threads", "2"]);
            cmd
        } else {
            train_cmd(&out)
        };
        let report: Value = serde_json::from_slice(&succeed(cmd.arg("--json")).stdout).unwrap();
        let from = report["resumed_from"].as_u64().expect("the run resumed") as usize;
        assert!(from >= 2 && from.is_multiple_of(2) && from < 40, "{name}: {report}");
        assert_eq!(report["steps_run"].as_u64(), Some(40 - from as u64), "{name}: {report}");
        assert_eq!(log_lines(&out), want_log, "{name}: the log differs from the uninterrupted run's");
        let got = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
        assert!(got == want_checkpoint, "{name}: the checkpoint differs from the uninterrupted run's");
    }
}

/// A run gives the same bits on a machine with another core count, so it can resume on one. The batch
/// (48 users of 9 history items) spans several of the loss's 64-row blocks, where a per-thread split of
/// the column-gradient sums would round differently.
#[test]
fn the_thread_count_does_not_change_the_bits() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    let mut state = 12345u64;
    let mut item = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        format!("\"i{}\"", (state >> 33) % 40)
    };
    for u in 0..48 {
        let history: Vec<String> = (0..9).map(|_| item()).collect();
        let targets: Vec<String> = (0..6).map(|_| item()).collect();
        lines += &format!(
            "{{\"user\": \"u{u}\", \"history\": [{}], \"targets\": [{}]}}\n",
            history.join(","),
            targets.join(",")
        );
    }
    let sequences = write(dir.path(), "sequences.jsonl", &lines);
    let runs: Vec<(Vec<Value>, Vec<u8>)> = ["1", "3"]
        .iter()
        .map(|threads| {
            let out = dir.path().join(format!("threads{threads}"));
            let mut cmd = bin();
            cmd.arg("train").arg("--content").arg(fixture("store")).arg("--sequences").arg(&sequences);
            cmd.arg("--out").arg(&out).args(["--preset", "pch-tiny", "--steps", "3", "--batch-users", "48"]);
            succeed(cmd.args(["--history", "9", "--targets", "6", "--lr", "1e-3", "--threads", threads]));
            (log_lines(&out), std::fs::read(out.join("checkpoint.safetensors")).unwrap())
        })
        .collect();
    assert_eq!(runs[0].0, runs[1].0, "the logs differ");
    assert!(runs[0].1 == runs[1].1, "the checkpoints differ");
}

#[test]
fn a_finished_run_reruns_as_a_no_op_and_other_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    succeed(&mut train_cmd(&out));
    let files = |out: &Path| {
        ["train.json", "train.log.jsonl", "checkpoint.safetensors", "optimizer.safetensors"]
            .map(|name| std::fs::read(out.join(name)).unwrap())
    };
    let before = files(&out);
    let (before_log, before_checkpoint) = (parse_log(&String::from_utf8_lossy(&before[1])), &before[2]);

    let report: Value = serde_json::from_slice(&succeed(train_cmd(&out).arg("--json")).stdout).unwrap();
    assert_eq!(report["steps_run"], 0, "{report}");
    assert!(files(&out) == before, "a finished run must be left as it is");

    let refused = run(train_cmd(&out).args(["--weight-decay", "0.01"]));
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("holds a run with other settings") && err.contains("--overwrite"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(files(&out) == before, "a refused run must not touch the directory");

    succeed(train_cmd(&out).args(["--weight-decay", "0.01", "--overwrite"]));
    let settings: Value = serde_json::from_slice(&std::fs::read(out.join("train.json")).unwrap()).unwrap();
    assert_eq!(settings["weight_decay"], 0.01);
    let log = log_lines(&out);
    assert_eq!(log.len(), 40);
    assert_eq!(log[0]["step"], 1, "--overwrite starts again");
    // Same data order and dropout masks, so the first loss is the same; the decay then changes the weights.
    assert_eq!(log[0]["loss"], before_log[0]["loss"]);
    assert_ne!(log[1]["loss"], before_log[1]["loss"]);
    assert_ne!(&std::fs::read(out.join("checkpoint.safetensors")).unwrap(), before_checkpoint);
}

#[test]
fn a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // A learning rate of 1e30 with no warm-up: the first update is finite but throws the weights to ~1e30,
    // so the second forward pass overflows and its loss is NaN.
    let diverge = |out: &Path| {
        let mut cmd = bin();
        cmd.arg("train").arg("--content").arg(fixture("store")).arg("--sequences").arg(fixture("sequences.jsonl"));
        cmd.arg("--out").arg(out);
        cmd.args(["--preset", "pch-tiny", "--steps", "5", "--batch-users", "4", "--lr", "1e30"]);
        cmd.args(["--warmup-frac", "0", "--checkpoint-every", "1"]);
        run(&mut cmd)
    };
    let failed = diverge(&out);
    let err = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(err.contains("step 2: the loss is NaN") && err.contains("last good checkpoint"), "{err}");
    assert!(!err.contains("panicked") && err.trim().lines().count() == 1, "{err}");
    assert_eq!(log_lines(&out).len(), 1, "the diverged update is not logged");
    let good = out.join("checkpoint.safetensors");
    assert_eq!(checkpoint_step(&good), 1);
    let (params, _) = checkpoint::load(&good).unwrap();
    assert!(params.flat().iter().all(|v| v.is_finite()));
    let mut eval = bin();
    eval.arg("eval").arg("--checkpoint").arg(&good).arg("--content").arg(fixture("store"));
    succeed(eval.arg("--sequences").arg(fixture("sequences.jsonl")).args(["--json", "-"]));

    // The same command again resumes from that checkpoint and stops at the same step.
    let again = diverge(&out);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("step 2: the loss is NaN"), "{}", stderr(&again));
    assert_eq!(checkpoint_step(&good), 1);
}

/// Runs `cmd` and expects exit status 2 with `want` in a one-line message and no panic.
fn expect_bad_input(cmd: &mut Command, want: &str) {
    let out = run(cmd);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
    assert!(err.contains(want), "expected {want:?} in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err:?}");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Copies of the fixture checkpoint with one tensor removed, one tensor mis-shaped, and a model for
/// 12-d content (the store holds 24-d rows), each with what train and eval must say about it.
fn broken_checkpoints(dir: &Path) -> [(PathBuf, &'static str, &'static str); 3] {
    let (params, _) = checkpoint::load(&fixture("init.safetensors")).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        params.tensors().map(|(n, s, v)| (n.to_string(), s.to_vec(), v.to_vec())).collect();
    let meta = HashMap::from([("config".to_string(), params.config().to_json())]);
    let save = |name: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]| {
        let path = dir.join(name);
        let views: Vec<(&str, Vec<usize>, &[f32])> =
            tensors.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice())).collect();
        write_f32_safetensors(&path, &views, meta.clone()).unwrap();
        path
    };
    let missing: Vec<_> = tensors.iter().filter(|t| t.0 != "layers.1.ffn.down.bias").cloned().collect();
    let mut reshaped = tensors.clone();
    let up = reshaped.iter_mut().find(|t| t.0 == "layers.0.ffn.up.weight").unwrap();
    up.1 = vec![up.1[1], up.1[0]];
    let narrow = dir.join("narrow.safetensors");
    let cfg = PchConfig { d_content: 12, ..params.config().clone() };
    checkpoint::save(&narrow, &PchParams::<f32>::init(&cfg, 1).unwrap(), &[]).unwrap();
    let (gone, shape) = ("missing tensor layers.1.ffn.down.bias", "tensor layers.0.ffn.up.weight has shape [16, 32]");
    [
        (save("missing.safetensors", &missing), gone, gone),
        (save("reshaped.safetensors", &reshaped), shape, shape),
        (narrow, "content embeddings are 24-d, the model's d_content is 12", "the model reads 12-d content"),
    ]
}

#[test]
fn bad_training_input_names_the_thing_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The tiny preset, or the model of a checkpoint (model flags cannot be combined with --init).
    let train_from = |content: &Path, sequences: &Path, init: Option<&Path>| {
        let mut cmd = bin();
        cmd.arg("train").arg("--content").arg(content).arg("--sequences").arg(sequences);
        cmd.arg("--out").arg(d.join("run")).args(["--steps", "2"]);
        match init {
            Some(path) => cmd.arg("--init").arg(path),
            None => cmd.args(["--preset", "pch-tiny"]),
        };
        cmd
    };
    let train = |content: &Path, sequences: &Path| train_from(content, sequences, None);
    let (store, seqs) = (fixture("store"), fixture("sequences.jsonl"));
    let good = "{\"user\": \"a\", \"history\": [\"i1\", \"i2\"], \"targets\": [\"i3\"]}\n";

    let unknown = write(
        d,
        "unknown.jsonl",
        &format!("{good}{{\"user\": \"b\", \"history\": [\"i1\", \"i99\"], \"targets\": [\"i3\"]}}\n"),
    );
    expect_bad_input(&mut train(&store, &unknown), "unknown.jsonl line 2: item \"i99\" (in \"history\" of user \"b\")");
    let malformed = write(d, "malformed.jsonl", &format!("{good}{good}{{\"user\": \"c\", \"history\": [\"i1\"\n"));
    expect_bad_input(&mut train(&store, &malformed), "malformed.jsonl line 3: is not valid JSON");
    let no_targets = write(d, "no_targets.jsonl", &format!("{good}{{\"user\": \"d\", \"history\": [\"i1\"]}}\n"));
    expect_bad_input(&mut train(&store, &no_targets), "no_targets.jsonl line 2: has no \"targets\" list");
    expect_bad_input(&mut train(&store, &d.join("absent.jsonl")), "absent.jsonl: cannot open the sequences file");

    expect_bad_input(&mut train(&d.join("nowhere"), &seqs), "nowhere: not a finished embedding store");
    let unfinished = d.join("unfinished");
    std::fs::create_dir(&unfinished).unwrap();
    for name in ["embeddings.npy", "ids.txt"] {
        std::fs::copy(store.join(name), unfinished.join(name)).unwrap();
    }
    expect_bad_input(&mut train(&unfinished, &seqs), "unfinished: not a finished embedding store");

    for (path, want, _) in broken_checkpoints(d) {
        expect_bad_input(&mut train_from(&store, &seqs, Some(&path)), want);
    }
    expect_bad_input(train(&store, &seqs).args(["--tau", "0"]), "--tau must be a positive number, got 0");
    expect_bad_input(train(&store, &seqs).args(["--batch-users", "0"]), "--batch-users must be at least 1");
    expect_bad_input(train(&store, &seqs).args(["--history", "0"]), "--history must be at least 1");
    expect_bad_input(train(&store, &seqs).args(["--lr=-1"]), "--lr must be a non-negative number");
    expect_bad_input(train(&store, &seqs).args(["--beta2", "1"]), "--beta2 must be in [0, 1)");
    expect_bad_input(train(&store, &seqs).args(["--loss-positions", "first"]), "--loss-positions \"first\"");
    expect_bad_input(train(&store, &seqs).args(["--item-tower", "cross"]), "--item-tower \"cross\"");
    // The model comes from --init: a model flag beside it would be ignored, so it is refused.
    let out = run(train_from(&store, &seqs, Some(&fixture("init.safetensors"))).args(["--item-tower", "self"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("'--init <INIT>' cannot be used with '--item-tower <ITEM_TOWER>'"),
        "{}",
        stderr(&out)
    );
    assert!(!d.join("run").join("checkpoint.safetensors").exists(), "no bad run may write a checkpoint");
    expect_bad_input(bin().arg("train").arg("--resume").arg(d), "no train.json (not a training run directory)");
    // --resume takes the saved settings: one named beside it would be ignored, so it is refused.
    let out = run(bin().arg("train").arg("--resume").arg(d).args(["--lr", "1e-3"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("'--resume <RESUME>' cannot be used with '--lr <LR>'"), "{}", stderr(&out));
}

#[test]
fn bad_eval_input_names_the_thing_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let eval = |checkpoint: &Path| {
        let mut cmd = bin();
        cmd.arg("eval").arg("--checkpoint").arg(checkpoint).arg("--content").arg(fixture("store"));
        cmd.arg("--sequences").arg(fixture("sequences.jsonl"));
        cmd
    };
    let trained = fixture("trained.safetensors");
    for (path, _, want) in broken_checkpoints(d) {
        expect_bad_input(&mut eval(&path), want);
    }
    expect_bad_input(&mut eval(&d.join("absent.safetensors")), "absent.safetensors: cannot open");
    let not_safetensors = write(d, "text.safetensors", "not a safetensors file");
    expect_bad_input(&mut eval(&not_safetensors), "text.safetensors: not a readable safetensors file");
    expect_bad_input(eval(&trained).args(["--k", "0"]), "--k values must be at least 1");
    expect_bad_input(eval(&trained).args(["--k", "5,1,5"]), "--k lists 5 twice");
    let gallery = write(d, "gallery.txt", "i1\nzz\n");
    expect_bad_input(
        eval(&trained).arg("--gallery").arg(&gallery),
        "gallery.txt line 2: item \"zz\" is not in the content store",
    );
    expect_bad_input(eval(&trained).args(["--baseline", "random"]), "--baseline \"random\"");
}

/// The `k` rows of `store` most cosine-similar to row `q` (itself left out), ties by row: the definition.
fn nearest_by_definition(store: &ContentStore, q: usize, k: usize) -> Vec<String> {
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|x| *x as f64 * *x as f64).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let query = store.row(q);
    let mut rows: Vec<(f64, usize)> =
        (0..store.len()).filter(|&r| r != q).map(|r| (cos(&query, &store.row(r)), r)).collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    rows.iter().take(k).map(|&(_, r)| store.ids[r].clone()).collect()
}

#[test]
fn infer_writes_stores_that_neighbors_reads() {
    let dir = tempfile::tempdir().unwrap();
    let infer = |name: &str, tower: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut cmd = bin();
        cmd.arg("infer").arg("--checkpoint").arg(fixture("trained.safetensors")).arg("--content").arg(fixture("store"));
        succeed(cmd.args(["--tower", tower]).args(extra).arg("--out").arg(&out));
        out
    };
    let items = infer("items", "item", &[]);
    let users =
        infer("users", "user", &["--sequences", fixture("sequences.jsonl").to_str().unwrap(), "--history", "5"]);

    // --ids picks items in the order listed; each is embedded alone, so its row is the one of the full run.
    let ids = write(dir.path(), "ids.txt", "i7\ni3\n\ni30\n");
    let some = ContentStore::open(&infer("some", "item", &["--ids", ids.to_str().unwrap()])).unwrap();
    let all = ContentStore::open(&items).unwrap();
    assert_eq!(some.ids, ["i7", "i3", "i30"]);
    for (r, id) in some.ids.iter().enumerate() {
        let want = all.row(all.row_of(id).unwrap());
        assert!(some.row(r).iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-6), "{id}");
    }

    for (store_dir, queries) in [(&items, ["i3", "i17"]), (&users, ["u1", "u12"])] {
        let store = ContentStore::open(store_dir).unwrap();
        let meta = &store.meta;
        assert_eq!((meta["dim"].as_u64(), meta["normalized"].as_bool()), (Some(8), Some(true)), "{meta}");
        let mut cmd = bin();
        cmd.arg("neighbors").arg("--embeddings").arg(store_dir).arg("--query").args(queries);
        let out = succeed(cmd.args(["--k", "4", "--json", "-"]));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        for (entry, id) in report.as_array().unwrap().iter().zip(queries) {
            assert_eq!(entry["query"], id);
            let got: Vec<&str> =
                entry["neighbors"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
            let q = store.row_of(id).unwrap();
            assert_eq!(got, nearest_by_definition(&store, q, 4), "neighbours of {id}");
        }
    }
}

#[test]
fn bench_train_refuses_what_the_gpu_engine_cannot_run_in_one_sentence() {
    let bench = || {
        let mut cmd = bin();
        cmd.args(["bench", "train"]);
        cmd
    };
    expect_bad_input(bench().args(["--preset", "pch-tiny"]), "the GPU PCH tower needs heads of 64");
    expect_bad_input(bench().args(["--preset", "pch-huge"]), "unknown PCH preset \"pch-huge\"");
    expect_bad_input(bench().args(["--batch-users", "0"]), "--batch-users must be at least 1");
    expect_bad_input(bench().args(["--item-tower", "both"]), "--item-tower \"both\": expected causal or self");
    expect_bad_input(&mut bench(), "bench measures the CUDA engine; --device cpu has nothing to measure");
}

#[test]
fn bench_kernels_checks_a_training_preset_s_shapes_in_one_sentence() {
    let bench = || {
        let mut cmd = bin();
        cmd.args(["bench", "kernels"]);
        cmd
    };
    expect_bad_input(bench().args(["--preset", "pch-tiny"]), "the GPU PCH tower needs heads of 64");
    expect_bad_input(bench().args(["--preset", "pch-huge"]), "unknown PCH preset \"pch-huge\"");
    for flag in ["--batch-users", "--history", "--targets", "--gallery"] {
        expect_bad_input(bench().args(["--preset", "pch-base", flag, "0"]), &format!("{flag} must be at least 1"));
    }
    expect_bad_input(
        bench().args(["--preset", "pch-base", "--targets", "300"]),
        "the GPU InfoNCE kernel takes at most 256 targets per user, --targets is 300",
    );
    expect_bad_input(
        bench().args(["--preset", "pch-base"]),
        "bench measures the CUDA engine; --device cpu has nothing to measure",
    );
}
