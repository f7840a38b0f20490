#!/usr/bin/env bash
# Everything the CUDA engine needs checked on a GPU, in one call of the device tool (SPEC §6, §7).
#
# Here (no GPU, the Rust toolchain):
#     tools/gpu-check.sh prepare
# builds the release binary and the GPU test binaries and copies them, stripped, into .gpu/ (ignored by git).
# Then, through the device tool, from the repository root, with `carry: [".gpu"]`:
#     bash tools/gpu-check.sh device [tests|bench|train|all]      (default all)
# which finds the CUDA libraries of the machine's Python packages and toolkit, runs the kernel, model and
# training-step tests against the CPU reference (tests), `bench kernels` and `bench embed` against the
# Hugging Face peers for small and baichuan2-7b (8192-token batches: peak memory must stay ≤ 15 GB)
# (bench), `bench train` against the PyTorch AMP peers, eager and torch.compile, at pch-base with B 30 and
# 256, and alone without CUDA graphs at B 1024 (the InfoNCE kernel's share of the update) and B 30 (what the
# graphs gain) (train), and ends with a summary. The
# device tool returns at most 8 files from $OUT, so the logs and JSON reports come back as one archive,
# $OUT/gpu-check-<what>.tar.gz, next to $OUT/summary-<what>.txt. `tests`, `bench` and `train` split the
# work over calls when one would pass the device tool's 10-minute limit.
set -uo pipefail
cd "$(dirname "$0")/.."

# The GPU test binaries (tests/cuda_*.rs), run one at a time on the device.
GPU_TESTS=(cuda_kernels cuda_train_kernels cuda_pch cuda_model cuda_train_step cuda_topk cuda_eval)

prepare() {
    set -e
    cargo build --release --bin learn-kern
    # The GPU tests in the dev profile (dependencies are optimised there too); their paths come from cargo.
    # The listing goes through a file: with every dependency's artifact in it, it is too long for argv.
    local listing
    listing="$(mktemp)"
    cargo test --no-run "${GPU_TESTS[@]/#/--test=}" --message-format=json 2>/dev/null >"$listing"
    mkdir -p .gpu
    strip -o .gpu/learn-kern target/release/learn-kern
    python3 - "$listing" <<'PY'
import json, shutil, subprocess, sys
for line in open(sys.argv[1]).read().splitlines():
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["kind"] == ["test"]:
        name = msg["target"]["name"]
        subprocess.run(["strip", "-o", f".gpu/{name}", msg["executable"]], check=True)
        print(f".gpu/{name}")
PY
    rm -f "$listing"
    du -ch .gpu/* | tail -n 1
    echo "now: device run 'bash tools/gpu-check.sh device' with carry [\".gpu\"]"
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

device() {
    local what="${1:-all}"
    local out=/tmp/gpu-check-$what
    rm -rf "$out" && mkdir -p "$out"
    export LEARN_KERN_CUDA_LIBS="$(cuda_lib_dirs)"
    export LEARN_KERN_REPO="$PWD" LEARN_KERN_BIN="$PWD/.gpu/learn-kern" LEARN_KERN_CACHE=/tmp/learn-kern-cache
    export RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
    local summary="$out/summary.txt"
    : >"$summary"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        echo "date: $(date -u +%FT%TZ)"
        echo "libraries: $LEARN_KERN_CUDA_LIBS"
    } | tee -a "$summary"
    local status=0
    if [[ "$what" == tests || "$what" == all ]]; then
        for t in "${GPU_TESTS[@]}"; do
            # One test at a time: they share the GPU, and a failure's output stays readable.
            if .gpu/$t --test-threads=1 --nocapture >"$out/$t.log" 2>&1; then
                echo "$t: passed" | tee -a "$summary"
            else
                status=1
                echo "$t: FAILED (see $t.log)" | tee -a "$summary"
            fi
            grep -E "^test |worst|cosine|skipping|throughput|agree|differ" "$out/$t.log" | tail -n 40
        done
    fi
    if [[ "$what" == bench || "$what" == all ]]; then
        for preset in small baichuan2-7b; do
            .gpu/learn-kern bench kernels --device cuda --preset "$preset" --json "$out/kernels-$preset.json" \
                2>&1 | tee -a "$summary" || status=1
        done
        for preset in small baichuan2-7b; do
            tools/bench-vs-peers.sh --preset "$preset" --batch-tokens 8192 --bin .gpu/learn-kern --out "$out" \
                2>"$out/bench-$preset.log" | tee -a "$summary" || status=1
        done
        python3 - "$out/learn-kern-baichuan2-7b-8192.json" <<'PY' | tee -a "$summary"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
used = r["memory"]["device_used_bytes"]
engine = r["memory"]["weights_bytes"] + r["memory"]["arena_bytes"]
print(f"baichuan2-7b at --batch-tokens 8192: engine allocations {engine / 1e9:.2f} GB, device in use {used / 1e9:.2f} GB "
      f"(limit 15 GB: {'ok' if used <= 15e9 else 'OVER'}); {100 * r['fraction_of_gemm_peak']:.0f}% of the GEMM peak "
      f"(target 80%)")
PY
    fi
    if [[ "$what" == train || "$what" == all ]]; then
        for b in 30 256; do
            tools/bench-vs-peers.sh train --preset pch-base --batch-users "$b" --history 80 --targets 40 \
                --bin .gpu/learn-kern --out "$out" 2>"$out/train-$b.log" | tee -a "$summary" || status=1
        done
        # Phase times need the eager step (a graph replay has none): B 1024 for the InfoNCE share, B 30 for
        # what the graphs gain.
        .gpu/learn-kern bench train --device cuda --preset pch-base --batch-users 1024 --history 80 --targets 40 \
            --cuda-graphs off --warmup 3 --steps 10 --json "$out/learn-kern-train-b1024.json" 2>&1 |
            tee -a "$summary" || status=1
        .gpu/learn-kern bench train --device cuda --preset pch-base --batch-users 30 --history 80 --targets 40 \
            --cuda-graphs off --json "$out/learn-kern-train-b30-eager.json" 2>&1 | tee -a "$summary" || status=1
        python3 - "$out" <<'PY' | tee -a "$summary"
import glob, json, os, sys
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
for b in (30, 256):
    ours = load(os.path.join(sys.argv[1], f"learn-kern-train-pch-base-{b}-80-40.json"))
    if ours:
        print(f"pch-base B {b}: MFU {100 * ours['mfu']:.0f}% of the measured GEMM rate"
              + (" (target at B 256: 50%)" if b == 256 else ""))
eager = load(os.path.join(sys.argv[1], "learn-kern-train-b30-eager.json"))
graphs = load(os.path.join(sys.argv[1], "learn-kern-train-pch-base-30-80-40.json"))
if eager and graphs:
    print(f"pch-base B 30: {graphs['steps_per_s']:.1f} steps/s with CUDA graphs, {eager['steps_per_s']:.1f} without")
big = load(os.path.join(sys.argv[1], "learn-kern-train-b1024.json"))
if big:
    print(f"B 1024: InfoNCE {big['phases_ms']['infonce']:.2f} ms = {100 * big['infonce_fraction']:.1f}% of the update "
          f"(target < 10%)")
PY
    fi
    if [[ -n "${OUT:-}" ]]; then
        tar czf "$OUT/gpu-check-$what.tar.gz" -C "$out" . && cp "$summary" "$OUT/summary-$what.txt"
    fi
    echo "=== summary ==="
    cat "$summary"
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    device) shift; device "$@" ;;
    *) echo "usage: tools/gpu-check.sh prepare | device [tests|bench|train|all]" >&2; exit 2 ;;
esac
