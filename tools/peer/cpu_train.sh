#!/usr/bin/env bash
# CPU training-step speed, learn-kern against PyTorch, side by side in one run (issue 3; SPEC §7).
#
#   tools/peer/cpu_train.sh [WORK_DIR] [--small] [--steps N] [--warmup W] [--reps R] [--attn eager|sdpa] [--json]
#
# Builds the release binary if needed; in WORK_DIR (default /tmp/learn-kern-peer-train) writes a content store
# of 1000 random unit f16 rows of 512 dims, 120 users with 80-100 history items and 40-50 targets, and one
# BERT-initialised PCH checkpoint (pch-base: d_model 768, 12 layers, 12 heads, d_ff 3072, d_out 64; --small:
# d_model 256, 4 layers, 4 heads, d_ff 1024) that both sides start from. Checks the peer's dense loss against
# the term-by-term reference, then runs, interleaved, R times each (default 3), N steps each (default 6; the
# first W, default 2, are warm-up and left out):
#   A  learn-kern train --device cpu --threads 2 --no-shuffle --batch-users 30 --history 80 --targets 40
#      --init CHECKPOINT: step times from train.log.jsonl's elapsed_s;
#   B  tools/peer/cpu_train.py peer: the same steps in PyTorch float32 eager, 2 threads;
# and prints the median step times, the ratio of steps/s ours/peer and the verdict against 0.7x (--json: the
# same as JSON). It fails if the two sides' losses differ by more than 1e-3 (relative) at any step.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY="$ROOT/tools/peer/cpu_train.py"
WORK=/tmp/learn-kern-peer-train
STEPS=6
REPS=3
WARMUP=2
SHAPE=base
ATTN=eager
JSON=()
while [ $# -gt 0 ]; do
    case "$1" in
        --small) SHAPE=small; shift ;;
        --steps) STEPS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --attn) ATTN=$2; shift 2 ;;
        --json) JSON=(--json); shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        -*) echo "cpu_train.sh: unknown option $1" >&2; exit 2 ;;
        *) WORK=$1; shift ;;
    esac
done
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
log() { echo "$@" >&2; }

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/learn-kern"
python3 "$PY" check >&2
if [ ! -f "$WORK/content/meta.json" ] || [ ! -f "$WORK/sequences.jsonl" ]; then
    python3 "$PY" data --out "$WORK" >&2
fi
INIT="$WORK/init-$SHAPE.safetensors"
if [ "$SHAPE" = small ]; then
    python3 "$PY" init --out "$INIT" --small >&2
else
    python3 "$PY" init --out "$INIT" >&2
fi

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
for rep in $(seq 1 "$REPS"); do
    # A fresh run directory: `train --overwrite` with unchanged settings resumes a finished run (does nothing).
    rm -rf "$WORK/run"
    load=$(cut -d' ' -f1 /proc/loadavg)
    "$BIN" train --device cpu --threads 2 --quiet --no-shuffle --steps "$STEPS" --batch-users 30 --history 80 \
        --targets 40 --content "$WORK/content" --sequences "$WORK/sequences.jsonl" --init "$INIT" \
        --out "$WORK/run" --overwrite --checkpoint-every "$STEPS"
    python3 "$PY" ours --log "$WORK/run/train.log.jsonl" --steps "$STEPS" --rep "$rep" --load "$load" --warmup "$WARMUP" \
        --results "$RESULTS"
    log "rep $rep: learn-kern done (load $load)"
    python3 "$PY" peer --init "$INIT" --content "$WORK/content" --sequences "$WORK/sequences.jsonl" \
        --steps "$STEPS" --warmup "$WARMUP" --rep "$rep" --threads 2 --attn "$ATTN" --results "$RESULTS"
    log "rep $rep: PyTorch done"
done
python3 "$PY" report --results "$RESULTS" "${JSON[@]}"
