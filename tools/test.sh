#!/usr/bin/env bash
# The test command (README): `tools/test.sh [cargo test arguments]`.
#
# The test suite compiles every CUDA kernel with NVRTC for compute_70 and compute_90 and fails when NVRTC
# cannot be found (tests/nvrtc_compile.rs). This script makes sure NVRTC from CUDA 12 (the last release that
# targets the V100) is there, installing `nvidia-cuda-nvrtc-cu12` from the Python package index when the
# machine has none, points LEARN_KERN_CUDA_LIBS at it, and runs `cargo test`. No GPU is needed: without
# one, the GPU tests then run on the CPU emulator (below).
set -euo pipefail
cd "$(dirname "$0")/.."

# The folder holding libnvrtc.so.12: LEARN_KERN_CUDA_LIBS, a CUDA toolkit, the loader's cache, or python3's
# nvidia packages. Prints nothing when there is none.
nvrtc_dir() {
    local dir
    local libs="${LEARN_KERN_CUDA_LIBS:-}"
    for dir in ${libs//:/ } "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64; do
        [[ -e "$dir/libnvrtc.so.12" ]] && { echo "$dir"; return; }
    done
    if command -v ldconfig >/dev/null && ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so\.12 '; then
        ldconfig -p | sed -n 's/.*libnvrtc\.so\.12 .*=> \(.*\)\/libnvrtc\.so\.12$/\1/p' | head -n 1
        return
    fi
    command -v python3 >/dev/null || return 0
    python3 - <<'PY'
import glob, os, sys
for site in sys.path:
    for lib in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so.12"))):
        print(os.path.dirname(lib))
        sys.exit(0)
PY
}

dir="$(nvrtc_dir)"
if [[ -z "$dir" ]]; then
    echo "tools/test.sh: NVRTC 12 not found; installing nvidia-cuda-nvrtc-cu12 from the Python package index" >&2
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then
        python3 -m pip install --quiet 'nvidia-cuda-nvrtc-cu12>=12.0,<13'
    else
        python3 -m pip install --quiet --user 'nvidia-cuda-nvrtc-cu12>=12.0,<13' ||
            python3 -m pip install --quiet --user --break-system-packages 'nvidia-cuda-nvrtc-cu12>=12.0,<13'
    fi
    dir="$(nvrtc_dir)"
    [[ -n "$dir" ]] || { echo "tools/test.sh: NVRTC is still not found after installing it" >&2; exit 1; }
fi
echo "tools/test.sh: NVRTC from $dir" >&2
export LEARN_KERN_CUDA_LIBS="$dir${LEARN_KERN_CUDA_LIBS:+:$LEARN_KERN_CUDA_LIBS}"
# A one-off test build gains nothing from incremental state, and it would add ~0.5 GB to target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo test "$@"

# The whole suite on a machine without a GPU, where the GPU tests have just skipped: the GPU tests once more,
# on the CPU emulator of the CUDA driver (tools/cuda_emu; needs g++ on x86-64). LEARN_KERN_NO_EMULATOR=1
# leaves this out.
if [[ $# -eq 0 && -z "${LEARN_KERN_EMULATED:-}" && "${LEARN_KERN_NO_EMULATOR:-}" != 1 ]] &&
    ! nvidia-smi -L >/dev/null 2>&1; then
    if [[ "$(uname -m)" == x86_64 ]] && command -v g++ >/dev/null; then
        echo "tools/test.sh: no GPU here: the GPU tests again, on the CPU emulator (tools/cuda_emu)" >&2
        exec tools/cuda_emu/run.sh
    fi
    echo "tools/test.sh: no GPU and no g++ on x86-64: the GPU tests only skipped" >&2
fi
