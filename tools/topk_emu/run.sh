#!/usr/bin/env bash
# Runs kernels/topk.cu on the CPU, without a GPU or a CUDA toolkit: the kernel source with its `extern "C"`
# dropped, built with g++ over emu.cuh (threads as
# fibers, warp shuffles and votes, barriers) and checked by test.cpp against the definition, bit for bit.
# About two minutes on two cores; `tools/topk_emu/run.sh quick` runs two cases. A logic check, not a
# substitute for tests/cuda_topk.rs on a GPU (memory ordering and the real warp scheduler are not emulated).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/emu.cuh" "$work/common.cuh"
cp "$here/test.cpp" "$work/test.cpp"
sed -e 's/extern "C" __global__/__global__/' "$here/../../kernels/topk.cu" >"$work/topk_emu.cu"
g++ -O2 -std=c++17 -o "$work/test" "$work/test.cpp"
"$work/test" "$@"
