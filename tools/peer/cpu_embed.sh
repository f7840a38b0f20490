#!/usr/bin/env bash
# CPU embed speed, learn-kern against PyTorch, side by side in one run (issue 2; SPEC §7).
#
#   tools/peer/cpu_embed.sh [WORK_DIR] [--reps N] [--json]
#
# Builds the release binary if needed, makes the 4-layer D=512 model (init-model --preset small --seed 0) and
# 512 catalogue items of 16-128 tokens in WORK_DIR (default /tmp/learn-kern-peer-embed), then runs, interleaved,
# N times each (default 3):
#   A  learn-kern embed --device cpu --threads 2 into a fresh store: wall time of the whole process, load included;
#   B  tools/peer/cpu_embed.py peer: transformers.LlamaModel float32, sorted padded batches of at most 8192 slots
#      (learn-kern's default --batch-tokens), 2 threads, forward + mean-pool + normalise timed after a warm-up
#      batch; it also checks its embeddings against A's store (cosine >= 0.999 per item).
# and prints the medians, the ratio ours/peer and the verdict against 0.7x (--json: the same as JSON).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY="$ROOT/tools/peer/cpu_embed.py"
WORK=/tmp/learn-kern-peer-embed
REPS=3
JSON=()
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS=$2; shift 2 ;;
        --json) JSON=(--json); shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        -*) echo "cpu_embed.sh: unknown option $1" >&2; exit 2 ;;
        *) WORK=$1; shift ;;
    esac
done
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
log() { echo "$@" >&2; }

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/learn-kern"
if [ ! -f "$WORK/model/config.json" ]; then
    "$BIN" init-model --preset small --seed 0 --out "$WORK/model" --quiet
fi
log "items: $(python3 "$PY" items --model "$WORK/model" --out "$WORK/items.jsonl")"

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
for rep in $(seq 1 "$REPS"); do
    rm -rf "$WORK/store"
    load=$(cut -d' ' -f1 /proc/loadavg)
    start=$(date +%s.%N)
    "$BIN" embed --device cpu --threads 2 --quiet --overwrite --model "$WORK/model" --items "$WORK/items.jsonl" \
        --out "$WORK/store" --json "$WORK/ours-$rep.json"
    end=$(date +%s.%N)
    python3 "$PY" ours --figures "$WORK/ours-$rep.json" --rep "$rep" --seconds "$(awk "BEGIN { print $end - $start }")" \
        --load "$load" --results "$RESULTS"
    log "rep $rep: learn-kern $(tail -n 1 "$RESULTS")"
    python3 "$PY" peer --model "$WORK/model" --items "$WORK/items.jsonl" --store "$WORK/store" --results "$RESULTS" \
        --rep "$rep" --threads 2 --batch-tokens 8192
    log "rep $rep: peer $(tail -n 1 "$RESULTS")"
done
python3 "$PY" report --results "$RESULTS" "${JSON[@]}"
