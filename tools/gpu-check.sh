#!/usr/bin/env bash
# Everything the CUDA engine needs checked on a GPU, sized to the device tool's lease (SPEC §6, §7).
#
# Here (the Rust toolchain, no GPU):
#     tools/gpu-check.sh prepare
# builds the release binary and the GPU test binaries, copies them stripped into .gpu/ (ignored by git) and
# checks that they fit what one device call carries. Then through the device tool, from the repository root,
# with `carry: [".gpu"]` and `timeout_s: 600`:
#     bash tools/gpu-check.sh device [all | tests | embed | train | STEP…] [--budget SECONDS] [--again]
#
# The checks are steps, most wanted first; `all` runs every one in this order:
#     probe           GPU, driver, CUDA libraries, torch; compiles the kernels once (NVRTC, cached in /tmp)
#     tests           tests/cuda_*.rs, the binaries side by side, each kernel and model against the CPU reference
#     embed-7b        bench embed, baichuan2-7b, 8192-token batches, against HF fp16 batched and batch size 1,
#                     and a profile of two batches (device time per kernel and GEMM shape: bench --profile)
#     train-30        bench train, pch-base, B 30, against PyTorch AMP eager
#     train-256       the same at B 256 (the MFU target), and a profile of three updates
#     train-30-compile, train-256-compile   the torch.compile peer at each (minutes of compiling each)
#     train-1024      learn-kern alone at B 1024 without CUDA graphs: the InfoNCE kernels' share of the update,
#                     and a profile
#     train-30-eager  learn-kern alone at B 30 without CUDA graphs: what the graphs gain, and a profile
#     embed-small     bench embed, small, against the same peers
#     kernels-7b, kernels-small   bench kernels: each embedding kernel against the measured copy and GEMM
#                     rates
#     kernels-train   bench kernels --preset pch-base: each training kernel the same way, at B 256
# Groups: tests = probe tests; embed = probe embed-7b embed-small kernels-7b kernels-small;
# train = probe, every train-* step and kernels-train.
#
# Each step runs under what is left of --budget (default 560 s, inside the tool's 600 s per call): a step
# is not started with less than its minimum left (MIN_SECONDS below, guesses until steps.tsv says better),
# and one that runs out is stopped (its finished reports still count). After every step the summary goes
# to $OUT/summary.txt, every log and JSON report into $OUT/gpu-check.tar.gz and each step's seconds to
# $OUT/steps.tsv, so a call stopped at the tool's limit still returns what it finished. State lives in
# /tmp/gpu-check on the device machine: a second call on the still-warm machine skips the steps that ran
# to the end (passed or failed) and goes on with the rest; --again runs them anew.
#
# For the script's own test (tests/gpu_check.rs): GPU_CHECK_BIN (default .gpu) holds the binaries,
# GPU_CHECK_STATE (default /tmp/gpu-check) the state, and GPU_CHECK_MIN_SECONDS, when set, replaces every
# step's minimum.
#
# A lease of 15 minutes of device time: `device all` (timeout_s 600) first; if steps were left, at once a
# second call `device all --budget S` with S the lease left (status: budget_left_s) less 60 s.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=(probe tests embed-7b train-30 train-256 train-30-compile train-256-compile train-1024 train-30-eager
    embed-small kernels-7b kernels-small kernels-train)
# Seconds a step needs to be worth starting.
declare -A MIN_SECONDS=(
    [probe]=20 [tests]=60 [embed-7b]=90 [train-30]=40 [train-256]=50 [train-30-compile]=120
    [train-256-compile]=120 [train-1024]=40 [train-30-eager]=30 [embed-small]=60 [kernels-7b]=40
    [kernels-small]=30 [kernels-train]=40
)
# The GPU test binaries (tests/cuda_*.rs).
GPU_TESTS="cuda_kernels cuda_train_kernels cuda_pch cuda_model cuda_train_step cuda_topk cuda_eval"
# What one device call carries at most (the device tool's limit), less the tracked files.
CARRY_LIMIT_MIB=64

prepare() {
    set -e
    cargo build --release --bin learn-kern
    # The GPU tests in the dev profile (dependencies are optimised there too); their paths come from cargo.
    # The listing goes through a file: with every dependency's artifact in it, it is too long for argv.
    local listing
    listing="$(mktemp)"
    # shellcheck disable=SC2086
    cargo test --no-run $(printf -- '--test=%s ' $GPU_TESTS) --message-format=json 2>/dev/null >"$listing"
    rm -rf .gpu && mkdir -p .gpu
    strip -o .gpu/learn-kern target/release/learn-kern
    python3 - "$listing" <<'PY'
import json, subprocess, sys
for line in open(sys.argv[1]).read().splitlines():
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["test"]:
        subprocess.run(["strip", "-o", f".gpu/{msg['target']['name']}", msg["executable"]], check=True)
PY
    rm -f "$listing"
    git check-ignore -q .gpu || { echo "gpu-check.sh: .gpu/ is not ignored by git" >&2; exit 1; }
    local carried tracked
    carried=$(du -sb .gpu | cut -f1)
    tracked=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
    awk -v n="$(ls .gpu | wc -l)" -v c="$carried" -v t="$tracked" -v limit="$CARRY_LIMIT_MIB" 'BEGIN {
        printf ".gpu: %d files, %.1f MiB; with the tracked files %.1f MiB of the %d MiB a call carries\n",
            n, c / 1048576, (c + t) / 1048576, limit }'
    if ((carried + tracked > CARRY_LIMIT_MIB * 1048576)); then
        echo "gpu-check.sh: too large for one device call" >&2
        exit 1
    fi
    echo "now: device run 'bash tools/gpu-check.sh device all' with carry [\".gpu\"] and timeout_s 600"
}

# Folders of CUDA libraries on the device machine: the Python packages' nvidia/*/lib (cuBLAS, NVRTC of
# CUDA 13 there) and the toolkit's lib64. The engine picks the sonames it prefers from these.
cuda_lib_dirs() {
    python3 - <<'PY'
import glob, os, sys
dirs = []
for site in sys.path:
    dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
dirs += [d for d in ("/usr/local/cuda/lib64",) if os.path.isdir(d)]
print(":".join(dict.fromkeys(dirs)))
PY
}

# --- The steps (step_NAME, with NAME's dashes as underscores): each writes its reports into $REPORTS and
# its output to stdout (the step's log). ---

step_probe() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    echo "libraries: $LEARN_KERN_CUDA_LIBS"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__)" 2>/dev/null || echo "torch: not importable (the peers will fail)"
    # The smallest real run: loads the CUDA libraries and compiles every kernel into the shared cache.
    "$BIN"/learn-kern bench kernels --device cuda --preset tiny --items 64 --json "$REPORTS/kernels-tiny.json"
}

step_tests() {
    # Side by side: the GPU has room for all, and the CPU references use the machine's 16 cores. Within a
    # binary one test at a time, so each log reads in order.
    local t status=0
    declare -A pids
    for t in $GPU_TESTS; do
        "$BIN/$t" --test-threads=1 --nocapture >"$REPORTS/$t.log" 2>&1 &
        pids[$t]=$!
    done
    for t in $GPU_TESTS; do
        if wait "${pids[$t]}"; then echo "$t: passed"; else echo "$t: FAILED"; status=1; fi
    done
    return $status
}

embed_vs_peers() {
    tools/bench-vs-peers.sh --preset "$1" --batch-tokens 8192 --bin "$BIN"/learn-kern --out "$REPORTS" "${@:2}"
}
step_embed_7b() { embed_vs_peers baichuan2-7b --profile 2; }
step_embed_small() { embed_vs_peers small; }

train_vs_peers() {
    tools/bench-vs-peers.sh train --preset pch-base --batch-users "$1" --history 80 --targets 40 \
        --bin "$BIN"/learn-kern --out "$REPORTS" --sides "$2" "${@:3}"
}
step_train_30() { train_vs_peers 30 learn-kern,eager; }
step_train_256() { train_vs_peers 256 learn-kern,eager --profile 3; }
step_train_30_compile() { train_vs_peers 30 compile; }
step_train_256_compile() { train_vs_peers 256 compile; }
# learn-kern alone at B $1 without CUDA graphs: phase times need the eager step (a graph replay has none).
train_eager() {
    "$BIN"/learn-kern bench train --device cuda --preset pch-base --batch-users "$1" --history 80 --targets 40 \
        --cuda-graphs off "${@:2}" --json "$REPORTS/learn-kern-train-b$1-eager.json"
}
step_train_1024() { train_eager 1024 --warmup 3 --steps 10 --profile 3; }
step_train_30_eager() { train_eager 30 --profile 5; }

kernels() { "$BIN"/learn-kern bench kernels --device cuda --preset "$1" --json "$REPORTS/kernels-$1.json"; }
step_kernels_7b() { kernels baichuan2-7b; }
step_kernels_small() { kernels small; }
step_kernels_train() { kernels pch-base; }

# The ten longest launches of a learn-kern report's profile (bench --profile), when it has one.
profile_lines() {
    python3 - "$1" <<'PY'
import json, sys
try:
    p = json.load(open(sys.argv[1])).get("profile") or {}
except (OSError, ValueError):
    sys.exit(0)
if p.get("launches"):
    print(f"profile: {p['profiled_ms']:.2f} ms of device time per {p['per']} (measured {p['measured_ms']:.2f} ms):")
for l in (p.get("launches") or [])[:10]:
    rate = f", {l['tflops']:.0f} TFLOP/s" if l.get("tflops") else ""
    print(f"  {l['ms']:8.3f} ms {100 * l['share']:5.1f}%  x{l['calls']:<4g} {l['name']}{rate}")
PY
}

# What the summary keeps of a step: its figures, read back from the reports (so a step stopped halfway
# still shows what finished), and its log's telling lines.
report() {
    local step="$1" log="$2"
    case "$step" in
        probe) head -n 3 "$log"; grep -E "NVRTC|origin|error|Error" "$log" | head -n 5 ;;
        tests)
            grep -E "^cuda_" "$log"
            for t in $GPU_TESTS; do
                grep -E "^test .*(FAILED|ignored)|panicked|skipping|throughput|worst|cosine" "$REPORTS/$t.log" |
                    sed "s/^/  $t: /" | head -n 20
            done
            # Padded and unpadded training steps held to 1e-2 because cuBLAS rounded a padded shape otherwise.
            grep -h "differ in bits" "$REPORTS"/cuda_train_step.log 2>/dev/null | sed "s/^/  cuda_train_step: /"
            ;;
        embed-7b | embed-small)
            local tag="${step#embed-}"
            [[ "$tag" == 7b ]] && tag=baichuan2-7b
            python3 tools/peer/ratio_table.py "$REPORTS"/{learn-kern,hf-batched,hf-bs1}-"$tag"-8192.json
            python3 - "$REPORTS/learn-kern-$tag-8192.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
used = r["memory"]["device_used_bytes"]
engine = r["memory"]["weights_bytes"] + r["memory"]["arena_bytes"]
print(f"{r['preset']} at --batch-tokens 8192: engine allocations {engine / 1e9:.2f} GB, device in use "
      f"{used / 1e9:.2f} GB (limit 15 GB: {'ok' if used <= 15e9 else 'OVER'})")
PY
            profile_lines "$REPORTS/learn-kern-$tag-8192.json"
            ;;
        train-30 | train-256 | train-30-compile | train-256-compile)
            local b="${step#train-}"
            local tag="train-pch-base-${b%-compile}-80-40"
            python3 tools/peer/ratio_table.py "$REPORTS"/{learn-kern,torch-eager,torch-compile}-"$tag".json
            [[ "$step" == *-compile ]] || profile_lines "$REPORTS/learn-kern-$tag.json"
            ;;
        train-1024 | train-30-eager)
            local b="${step#train-}"
            python3 - "$REPORTS" "${b%-eager}" <<'PY'
import json, os, sys
try:
    r = json.load(open(os.path.join(sys.argv[1], f"learn-kern-train-b{sys.argv[2]}-eager.json")))
except (OSError, ValueError):
    sys.exit(0)
line = f"pch-base B {r['batch_users']} without CUDA graphs: {r['steps_per_s']:.2f} steps/s, MFU {100 * r['mfu']:.0f}%"
if sys.argv[2] == "1024":
    line += f"; InfoNCE {r['phases_ms']['infonce']:.2f} ms = {100 * r['infonce_fraction']:.1f}% of the update (target < 10%)"
else:
    try:
        g = json.load(open(os.path.join(sys.argv[1], "learn-kern-train-pch-base-30-80-40.json")))
        line += f"; with graphs {g['steps_per_s']:.2f} steps/s ({g['steps_per_s'] / r['steps_per_s']:.2f}×)"
    except (OSError, ValueError):
        pass
print(line)
PY
            profile_lines "$REPORTS/learn-kern-train-b${b%-eager}-eager.json"
            ;;
        kernels-*) tail -n 20 "$log" ;;
    esac
}

# Step names from the command line's words (groups expanded), in STEPS order.
select_steps() {
    local want=" " word
    for word in "$@"; do
        case "$word" in
            all) want+="${STEPS[*]} " ;;
            tests) want+="probe tests " ;;
            embed | bench) want+="probe embed-7b embed-small kernels-7b kernels-small " ;;
            train)
                want+="probe train-30 train-256 train-30-compile train-256-compile train-1024 train-30-eager "
                want+="kernels-train "
                ;;
            *)
                [[ " ${STEPS[*]} " == *" $word "* ]] || { echo "gpu-check.sh: no step or group named $word" >&2; return 2; }
                want+="$word "
                ;;
        esac
    done
    local step
    for step in "${STEPS[@]}"; do
        [[ "$want" != *" $step "* ]] || echo "$step"
    done
}

# What comes back from the device tool: $OUT's summary, step timings and one archive of every report.
save() {
    [[ -n "${OUT:-}" ]] || return 0
    cp "$1/summary.txt" "$1/steps.tsv" "$OUT/"
    tar czf "$OUT/gpu-check.tar.gz" -C "$1" reports summary.txt steps.tsv
}

device() {
    local budget=560 again=0 words=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --budget) budget="$2"; shift 2 ;;
            --again) again=1; shift ;;
            *) words+=("$1"); shift ;;
        esac
    done
    [[ ${#words[@]} -gt 0 ]] || words=(all)
    local steps
    steps="$(select_steps "${words[@]}")" || exit 2
    local deadline=$((SECONDS + budget))

    local state="${GPU_CHECK_STATE:-/tmp/gpu-check}"
    export BIN="${GPU_CHECK_BIN:-.gpu}" REPORTS="$state/reports"
    if [[ ! -x "$BIN/learn-kern" ]]; then
        echo "gpu-check.sh: $BIN/learn-kern is missing: run tools/gpu-check.sh prepare first and carry $BIN" >&2
        exit 2
    fi
    chmod +x "$BIN"/* 2>/dev/null  # in case the copy that carried them dropped the mode
    mkdir -p "$REPORTS" "$state/status"
    ((again)) && rm -f "$state/status"/*
    export LEARN_KERN_CUDA_LIBS
    LEARN_KERN_CUDA_LIBS="$(cuda_lib_dirs)"
    export LEARN_KERN_REPO="$PWD" LEARN_KERN_BIN="$(cd "$BIN" && pwd)/learn-kern" LEARN_KERN_CACHE=/tmp/learn-kern-cache
    export RUST_BACKTRACE=1 PYTHONUNBUFFERED=1 GPU_TESTS
    export -f $(compgen -A function | grep -E '^(step_|embed_vs_peers|train_vs_peers|train_eager|kernels)')
    local summary="$state/summary.txt"
    echo "=== gpu-check.sh device ${words[*]} --budget $budget, $(date -u +%FT%TZ) ===" >>"$summary"
    [[ -f "$state/steps.tsv" ]] || printf 'step\tstatus\tseconds\tdate\n' >"$state/steps.tsv"

    local step status=0
    for step in $steps; do
        local log="$REPORTS/$step.log" left=$((deadline - SECONDS - 10))
        local least="${GPU_CHECK_MIN_SECONDS:-${MIN_SECONDS[$step]}}"
        if [[ "$step" != probe && "$(cat "$state/status/probe" 2>/dev/null)" == FAILED* ]]; then
            echo "[$step] not started: the probe failed" | tee -a "$summary"
            continue
        fi
        if [[ -f "$state/status/$step" ]]; then
            echo "[$step] $(cat "$state/status/$step") (an earlier call; --again reruns it)" | tee -a "$summary"
            continue
        fi
        if ((left < least)); then
            echo "[$step] not started: $left s of the budget left, it needs $least" | tee -a "$summary"
            continue
        fi
        echo "[$step] running (up to $left s)" >&2
        local start=$SECONDS rc
        timeout --kill-after=10 "$left" bash -c "step_${step//-/_}" >"$log" 2>&1
        rc=$?
        local took=$((SECONDS - start)) outcome
        case $rc in
            0) outcome=passed ;;
            124 | 137) outcome="stopped at the budget" ;;
            *) outcome="FAILED (exit $rc)" ;;
        esac
        # A stopped step runs again in a later call; one that ran to the end does not.
        [[ $rc == 124 || $rc == 137 ]] || echo "$outcome in $took s" >"$state/status/$step"
        [[ $rc == 0 ]] || status=1
        printf '%s\t%s\t%s\t%s\n' "$step" "$outcome" "$took" "$(date -u +%FT%TZ)" >>"$state/steps.tsv"
        { echo "[$step] $outcome in $took s"; report "$step" "$log" 2>&1 | sed 's/^/    /'; } | tee -a "$summary"
        save "$state"
    done
    save "$state"
    echo "=== summary ==="
    cat "$summary"
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    device) shift; device "$@" ;;
    *)
        echo "usage: tools/gpu-check.sh prepare | device [all|tests|embed|train|STEP…] [--budget S] [--again]" >&2
        exit 2
        ;;
esac
