#!/usr/bin/env bash
# learn-kern's embedding (or, with `train`, training-step) throughput against its peers, on the same GPU, same
# items, same token budget, in one run (SPEC §7), ending with one ratio table:
#   learn-kern bench embed           packed varlen batches, this engine
#   tools/peer/embed_hf.py batched   Hugging Face LlamaModel, fp16, SDPA, length-sorted padded batches
#   tools/peer/embed_hf.py bs1       the official LEARN extraction style: batch size 1, fp16
#
# usage: tools/bench-vs-peers.sh [embed] [--preset P] [--batch-tokens N] [--items N] [--bs1-items N] [--bin PATH]
#                                [--out DIR] [--profile N]
# Defaults: baichuan2-7b, 8192 tokens, 2048 items of 16–128 tokens, the first 256 of them for bs1 (a rate,
# so fewer items only shorten the run), target/release/learn-kern, reports in ./bench-out (or $OUT).
#
# Training steps the same way, with `train` first:
#   learn-kern bench train              this engine
#   tools/peer/train_torch.py eager     the official LEARN module structure (BertEncoder, causal mask), AMP fp16
#   tools/peer/train_torch.py compile   the same under torch.compile (compile time reported apart)
# usage: tools/bench-vs-peers.sh train [--preset P] [--batch-users B] [--history H] [--targets T] [--bin PATH]
#                                      [--out DIR] [--sides learn-kern,eager,compile] [--profile N]
# Defaults: pch-base, 30 users of 80 history and 40 target items (SPEC §7), all three sides. --sides runs only
# those named and keeps the others' reports from an earlier run of the same shape in DIR for the table
# (tools/gpu-check.sh runs torch.compile, the slow one to start, as a step of its own).
# --profile N: learn-kern profiles N more batches or updates after its timed ones (`bench --profile`: device
# time per kernel and GEMM shape in its report); its timed figures are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == train ]]; then
    shift
    preset=pch-base batch_users=30 history=80 targets=40
    bin=target/release/learn-kern out="${OUT:-bench-out}" sides=learn-kern,eager,compile profile=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --sides) sides="$2"; shift 2 ;;
            --profile) profile="$2"; shift 2 ;;
            --preset) preset="$2"; shift 2 ;;
            --batch-users) batch_users="$2"; shift 2 ;;
            --history) history="$2"; shift 2 ;;
            --targets) targets="$2"; shift 2 ;;
            --bin) bin="$2"; shift 2 ;;
            --out) out="$2"; shift 2 ;;
            *) echo "bench-vs-peers.sh train: unknown argument $1" >&2; exit 2 ;;
        esac
    done
    mkdir -p "$out"
    tag="train-$preset-$batch_users-$history-$targets"
    shape=(--preset "$preset" --batch-users "$batch_users" --history "$history" --targets "$targets")
    for side in ${sides//,/ }; do
        case "$side" in
            learn-kern | eager | compile) ;;
            *) echo "bench-vs-peers.sh train: --sides takes learn-kern, eager and compile, not $side" >&2; exit 2 ;;
        esac
    done
    # A side that fails (out of memory, say) leaves its row empty, the others still run, and the exit status
    # says so. A side that runs first drops its report from an earlier run, so no stale row shows.
    failed=0
    if [[ ",$sides," == *,learn-kern,* ]]; then
        rm -f "$out/learn-kern-$tag.json"
        "$bin" bench train --device cuda "${shape[@]}" --profile "$profile" --json "$out/learn-kern-$tag.json" \
            >/dev/null ||
            { echo "bench-vs-peers.sh: learn-kern bench train failed" >&2; failed=1; }
    fi
    for mode in eager compile; do
        [[ ",$sides," == *,$mode,* ]] || continue
        rm -f "$out/torch-$mode-$tag.json"
        python3 tools/peer/train_torch.py --mode "$mode" "${shape[@]}" --json "$out/torch-$mode-$tag.json" \
            >/dev/null || { echo "bench-vs-peers.sh: the PyTorch $mode peer failed" >&2; failed=1; }
    done
    python3 tools/peer/ratio_table.py "$out/learn-kern-$tag.json" "$out/torch-eager-$tag.json" \
        "$out/torch-compile-$tag.json" | tee "$out/table-$tag.txt"
    exit $failed
fi
if [[ "${1:-}" == embed ]]; then shift; fi

preset=baichuan2-7b batch_tokens=8192 items=2048 bs1_items=256 profile=0
bin=target/release/learn-kern out="${OUT:-bench-out}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --preset) preset="$2"; shift 2 ;;
        --batch-tokens) batch_tokens="$2"; shift 2 ;;
        --items) items="$2"; shift 2 ;;
        --bs1-items) bs1_items="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "bench-vs-peers.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
tag="$preset-$batch_tokens"
lengths="$out/lengths-$tag.txt"
rm -f "$out"/{learn-kern,hf-batched,hf-bs1}-"$tag".json  # no stale row from an earlier run

"$bin" bench embed --device cuda --preset "$preset" --batch-tokens "$batch_tokens" --items "$items" \
    --profile "$profile" --save-lengths "$lengths" --json "$out/learn-kern-$tag.json"
# A peer that fails (out of memory on a 16 GB card, say) leaves its row empty; the others still run, and the
# exit status says so.
failed=0
python3 tools/peer/embed_hf.py --preset "$preset" --lengths "$lengths" --mode batched \
    --batch-tokens "$batch_tokens" --json "$out/hf-batched-$tag.json" >/dev/null ||
    { echo "bench-vs-peers.sh: the batched Hugging Face peer failed" >&2; failed=1; }
python3 tools/peer/embed_hf.py --preset "$preset" --lengths "$lengths" --mode bs1 --max-items "$bs1_items" \
    --json "$out/hf-bs1-$tag.json" >/dev/null ||
    { echo "bench-vs-peers.sh: the batch-size-1 peer failed" >&2; failed=1; }
python3 tools/peer/ratio_table.py "$out/learn-kern-$tag.json" "$out/hf-batched-$tag.json" "$out/hf-bs1-$tag.json" |
    tee "$out/table-$tag.txt"
exit $failed
