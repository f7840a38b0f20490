//! tools/gpu-check.sh, the one script a GPU lease runs, does what the lease depends on, checked here with
//! stand-ins for the GPU binaries, nvidia-smi and the PyTorch peers: the steps run most wanted first; a
//! step stopped at the budget leaves the finished ones' summary, timings and archive in $OUT; the steps
//! left are not started; a second call skips what finished and completes the rest; a failing test binary
//! fails the call; a missing binary folder or an unknown step is one sentence and exit status 2.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// learn-kern's stand-in: writes the report `bench embed|train|kernels` would write; sleeps a minute when
/// FAKE_SLOW names the run (`train-256`, say), so the budget has something to stop.
const FAKE_LEARN_KERN: &str = r#"#!/usr/bin/env bash
kind=$2 json=/dev/null lengths=/dev/null b=0 preset=tiny profile=null
while [[ $# -gt 0 ]]; do
    case $1 in
        --json) json=$2; shift ;;
        --profile) (($2 > 0)) && profile='{"per": "update", "profiled_ms": 2.5, "measured_ms": 2.6,
                   "launches": [{"name": "infonce_dc_d64", "ms": 1.25, "share": 0.5, "calls": 1, "tflops": null}]}'
                   shift ;;
        --save-lengths) lengths=$2; shift ;;
        --batch-users) b=$2; shift ;;
        --preset) preset=$2; shift ;;
    esac
    shift
done
[[ "$kind-$b" == "${FAKE_SLOW:-}" ]] && sleep 60
case $kind in
    embed)
        printf '16\n32\n' >"$lengths"
        echo '{"bench": "embed", "engine": "learn-kern", "preset": "'$preset'", "tokens_per_s": 3000,
               "memory": {"device_used_bytes": 14e9, "weights_bytes": 13e9, "arena_bytes": 1e9}}' >"$json" ;;
    train)
        echo '{"bench": "train", "engine": "learn-kern", "preset": "pch-base", "batch_users": '$b',
               "history": 80, "targets": 40, "steps_per_s": 100, "tflops": 300, "gemm_peak_tflops": 600,
               "mfu": 0.5, "phases_ms": {"infonce": 2.5}, "infonce_fraction": 0.05, "profile": '"$profile"'}' >"$json" ;;
    kernels) echo "kernel rmsnorm_residual 10 us"; echo '{}' >"$json" ;;
esac
"#;

/// A GPU test binary's stand-in: fails when FAKE_FAIL names it.
const FAKE_TEST: &str = r#"#!/usr/bin/env bash
name=$(basename "$0")
echo "test a_kernel_against_the_cpu ... ok"
[[ "$name" != "${FAKE_FAIL:-}" ]] || { echo "test a_kernel_against_the_cpu ... FAILED"; exit 101; }
"#;

/// python3's stand-in: the peers write a report half as fast as learn-kern's; anything else is python3.
const FAKE_PYTHON: &str = r#"#!/usr/bin/env bash
case "${1:-}" in
    tools/peer/embed_hf.py | tools/peer/train_torch.py)
        peer=$1 json=/dev/null b=0
        while [[ $# -gt 0 ]]; do
            case $1 in --json) json=$2; shift ;; --batch-users) b=$2; shift ;; esac
            shift
        done
        if [[ $peer == tools/peer/embed_hf.py ]]; then
            echo '{"bench": "embed", "engine": "peer", "tokens_per_s": 1500}' >"$json"
        else
            echo '{"bench": "train", "engine": "peer", "preset": "pch-base", "batch_users": '$b',
                   "history": 80, "targets": 40, "steps_per_s": 50}' >"$json"
        fi ;;
    *) exec REAL_PYTHON "$@" ;;
esac
"#;

const TESTS: [&str; 7] =
    ["cuda_kernels", "cuda_train_kernels", "cuda_pch", "cuda_model", "cuda_train_step", "cuda_topk", "cuda_eval"];

struct Lease {
    dir: tempfile::TempDir,
    real_python: String,
}

impl Lease {
    fn new(real_python: String) -> Self {
        let lease = Lease { dir: tempfile::tempdir().expect("a temporary folder"), real_python };
        for folder in ["bin", "path", "out"] {
            fs::create_dir(lease.path(folder)).expect("a folder");
        }
        lease.script("bin/learn-kern", FAKE_LEARN_KERN);
        for t in TESTS {
            lease.script(&format!("bin/{t}"), FAKE_TEST);
        }
        lease.script("path/nvidia-smi", "#!/bin/sh\necho 'Stand-in GPU, 0.0, 1 MiB, 1 MHz'\n");
        lease.script("path/python3", &FAKE_PYTHON.replace("REAL_PYTHON", &lease.real_python));
        lease
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn script(&self, name: &str, text: &str) {
        let path = self.path(name);
        fs::write(&path, text).expect("a stand-in script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("made executable");
    }

    /// `tools/gpu-check.sh device ARGS`, with $OUT emptied first as the device tool does.
    fn device(&self, args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
        let out = self.path("out");
        fs::remove_dir_all(&out).and_then(|_| fs::create_dir(&out)).expect("$OUT emptied");
        let path = format!("{}:{}", self.path("path").display(), std::env::var("PATH").unwrap_or_default());
        let output = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/gpu-check.sh"))
            .arg("device")
            .args(args)
            .env("PATH", path)
            .env("OUT", &out)
            .env("GPU_CHECK_BIN", self.path("bin"))
            .env("GPU_CHECK_STATE", self.path("state"))
            .env("GPU_CHECK_MIN_SECONDS", "1")
            .envs(env.iter().copied())
            .output()
            .expect("bash runs");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output, text)
    }

    fn out(&self, name: &str) -> String {
        fs::read_to_string(self.path("out").join(name)).unwrap_or_else(|e| panic!("$OUT/{name}: {e}"))
    }
}

/// A lease of stand-ins, or `None` (said on stderr) where a tool the script runs is not installed.
fn lease() -> Option<Lease> {
    let found = |tool: &str| Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().ok();
    for tool in ["bash", "timeout", "tar", "python3"] {
        if !found(tool).is_some_and(|o| o.status.success()) {
            eprintln!("skipping: {tool} is not installed");
            return None;
        }
    }
    let python = found("python3").map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    Some(Lease::new(python))
}

#[test]
fn a_budget_stops_a_step_and_a_second_call_finishes_the_rest() {
    let Some(lease) = lease() else { return };

    // 35 s of budget, 10 kept for the archive: the quick steps pass (in a few seconds, with 25 to spare on
    // a loaded machine), train-256's learn-kern sleeps past it.
    let (first, text) = lease.device(&["all", "--budget", "35"], &[("FAKE_SLOW", "train-256")]);
    assert!(!first.status.success(), "a stopped step fails the call\n{text}");
    let summary = lease.out("summary.txt");
    for line in [
        "[probe] passed",
        "[tests] passed",
        "[embed-7b] passed",
        "[train-30] passed",
        "[train-256] stopped at the budget",
    ] {
        assert!(summary.contains(line), "no '{line}' in the summary\n{summary}");
    }
    for step in ["train-30-compile", "train-1024", "kernels-small"] {
        assert!(summary.contains(&format!("[{step}] not started")), "{step} started\n{summary}");
    }
    // Figures come back in the summary: learn-kern's row against the peer's (100 / 50 steps/s).
    assert!(summary.contains("cuda_topk: passed"), "{summary}");
    assert!(summary.contains("device in use 14.00 GB (limit 15 GB: ok)"), "{summary}");
    let train_30 = summary.split("[train-30] passed").nth(1).expect("train-30's report");
    assert!(train_30.lines().take(5).any(|l| l.starts_with("    peer") && l.trim_end().ends_with("2.00")), "{summary}");
    assert!(lease.out("steps.tsv").lines().any(|l| l.starts_with("train-256\tstopped at the budget\t")));
    let listing = Command::new("tar").arg("tzf").arg(lease.path("out/gpu-check.tar.gz")).output().expect("tar runs");
    let listing = String::from_utf8_lossy(&listing.stdout);
    for file in ["reports/cuda_topk.log", "reports/learn-kern-train-pch-base-30-80-40.json", "summary.txt"] {
        assert!(listing.lines().any(|l| l.ends_with(file)), "{file} is not in the archive\n{listing}");
    }

    // The warm machine's second call: what finished is skipped, the rest runs and passes.
    let (second, text) = lease.device(&["all", "--budget", "60"], &[]);
    assert!(second.status.success(), "{text}");
    let summary = lease.out("summary.txt");
    let second_call = summary.rsplit("=== gpu-check.sh device").next().expect("the second call's part");
    assert!(second_call.contains("[tests] passed in") && second_call.contains("(an earlier call"), "{second_call}");
    for step in [
        "train-256",
        "train-30-compile",
        "train-256-compile",
        "train-1024",
        "train-30-eager",
        "kernels-small",
        "kernels-train",
    ] {
        assert!(second_call.contains(&format!("[{step}] passed")), "{step} did not pass\n{second_call}");
    }
    assert!(second_call.contains("InfoNCE 2.50 ms = 5.0% of the update"), "{second_call}");
    assert!(second_call.contains("1.250 ms  50.0%  x1    infonce_dc_d64"), "the profile's lines\n{second_call}");

    // --again reruns a finished step; a failing test binary fails it and is named.
    let (third, text) = lease.device(&["tests", "--again"], &[("FAKE_FAIL", "cuda_topk")]);
    assert!(!third.status.success(), "{text}");
    let summary = lease.out("summary.txt");
    assert!(summary.contains("[tests] FAILED") && summary.contains("cuda_topk: FAILED"), "{summary}");
}

#[test]
fn bad_calls_are_one_sentence_and_status_2() {
    let Some(lease) = lease() else { return };
    let (unknown, text) = lease.device(&["warp-drive"], &[]);
    assert_eq!(unknown.status.code(), Some(2), "{text}");
    assert!(text.contains("no step or group named warp-drive"), "{text}");

    fs::remove_dir_all(lease.path("bin")).expect("the binaries removed");
    let (missing, text) = lease.device(&["all"], &[]);
    assert_eq!(missing.status.code(), Some(2), "{text}");
    assert!(text.contains("run tools/gpu-check.sh prepare first"), "{text}");
}
