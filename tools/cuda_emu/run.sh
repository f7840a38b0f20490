#!/usr/bin/env bash
# Runs the GPU test suite on the CPU emulator: `tools/cuda_emu/run.sh [cargo test arguments]`, by default
# every tests/cuda_*.rs. The tests see one emulated device (tools/cuda_emu/driver.cpp says what it is
# and what it cannot show) and run instead of skipping; NVRTC still compiles every kernel first, as on a
# GPU. Slow kernels are the emulator's, not the engine's: no figure from it means anything.
set -euo pipefail
cd "$(dirname "$0")/../.."
emu="$(bash tools/cuda_emu/build.sh)"
if [[ $# -eq 0 ]]; then
    set -- $(for t in tests/cuda_*.rs; do printf -- '--test %s ' "$(basename "$t" .rs)"; done)
fi
export LD_LIBRARY_PATH="$emu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LEARN_KERN_CUDA_LIBS="$emu${LEARN_KERN_CUDA_LIBS:+:$LEARN_KERN_CUDA_LIBS}"
export LEARN_KERN_EMULATED=1
exec tools/test.sh "$@"
