#!/usr/bin/env bash
# End to end on MovieLens-100K (research use only; the data is read in place, never copied into the repo):
# titles and genres → content embeddings from a random-weight `small` Baichuan2-layout model → time-ordered
# sequences (each user's last 20% of ratings are targets, 10% of users held out) → PCH training → test H@K
# beside the most-popular baseline. The training flags are the configuration recorded in BENCHMARKS.md, with
# why each matters (TRAIN_FLAGS adds more; a flag named twice is refused).
#
# Usage: [SEED=N (training seed)] tools/movielens/run.sh [ML100K_DIR] [WORK_DIR]   (defaults: seed 0, ../shared/data/ml-100k,
#        /tmp/learn-kern-ml100k)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
data=${1:-$here/../shared/data/ml-100k}
work=${2:-/tmp/learn-kern-ml100k}
bin=${LEARN_KERN:-$here/target/release/learn-kern}
[ -x "$bin" ] || (cd "$here" && cargo build --release)
mkdir -p "$work"
set -x
python3 "$here/tools/movielens/items.py" "$data/u.item" > "$work/items.jsonl"
"$bin" init-model --preset small --seed 0 --out "$work/model" --overwrite
"$bin" embed --model "$work/model" --items "$work/items.jsonl" --out "$work/content" --overwrite
"$bin" sequences --interactions "$data/u.data" --time-col 3 --target-fraction 0.2 --test-users 0.1 --seed 0 \
    --train-out "$work/train.jsonl" --test-out "$work/test.jsonl"
"$bin" train --content "$work/content" --sequences "$work/train.jsonl" --out "$work/run" --overwrite \
    --preset pch-tiny --d-model 128 --heads 4 --layers 2 --d-ff 256 --d-out 64 \
    --history 80 --targets 40 --batch-users 64 --epochs 50 --lr 2e-3 --item-tower self --logq-correction \
    --seed "${SEED:-0}" ${TRAIN_FLAGS:-}
"$bin" eval --checkpoint "$work/run/checkpoint.safetensors" --content "$work/content" --sequences "$work/test.jsonl" \
    --k 50,100 --baseline popular --popularity-from "$work/train.jsonl" --json "$work/eval.json"
head -1 "$work/run/train.log.jsonl"; tail -1 "$work/run/train.log.jsonl"
