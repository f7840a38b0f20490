#!/usr/bin/env bash
# The test command (README): `tools/test.sh [cargo test arguments]`.
#
# The test suite compiles every CUDA kernel with NVRTC and fails when NVRTC cannot be found
# (tests/nvrtc_compile.rs): NVRTC from CUDA 12, the last release that targets the V100, for compute_70 and
# compute_90, and NVRTC from CUDA 13.0, what PyTorch's cu130 wheels and the lent H100/H200 machines carry,
# for sm_90. This script finds both, installing `nvidia-cuda-nvrtc-cu12` / `nvidia-cuda-nvrtc` from the
# Python package index when the machine has none, points LEARN_KERN_CUDA_LIBS and LEARN_KERN_NVRTC13_LIBS at
# them, and runs `cargo test`. No GPU is needed: without one, the GPU tests then run on the CPU emulator
# (below).
set -euo pipefail
cd "$(dirname "$0")/.."

# The folder holding libnvrtc.so.$1: one of the folders in $2 (`:`-separated), for 12 also a CUDA toolkit
# or the loader's cache, else python3's nvidia packages. Prints nothing when there is none.
nvrtc_dir() {
    local major="$1" dirs="$2" dir
    [[ $major == 12 ]] && dirs+=":${CUDA_HOME:-/nonexistent}/lib64:/usr/local/cuda/lib64"
    for dir in ${dirs//:/ }; do
        [[ -e "$dir/libnvrtc.so.$major" ]] && { echo "$dir"; return; }
    done
    if [[ $major == 12 ]] && command -v ldconfig >/dev/null && ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so\.12 '; then
        ldconfig -p | sed -n 's/.*libnvrtc\.so\.12 .*=> \(.*\)\/libnvrtc\.so\.12$/\1/p' | head -n 1
        return
    fi
    command -v python3 >/dev/null || return 0
    python3 - "$major" <<'PY'
import glob, os, sys
for site in sys.path:
    for lib in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", f"libnvrtc.so.{sys.argv[1]}"))):
        print(os.path.dirname(lib))
        sys.exit(0)
PY
}

# Prints the folder of NVRTC $1, looked for as nvrtc_dir does and installed as the package $3 when missing.
ensure_nvrtc() {
    local dir
    dir="$(nvrtc_dir "$1" "$2")"
    if [[ -z "$dir" ]]; then
        echo "tools/test.sh: NVRTC $1 not found; installing $3 from the Python package index" >&2
        if [[ -n "${VIRTUAL_ENV:-}" ]]; then
            python3 -m pip install --quiet "$3" >&2
        else
            python3 -m pip install --quiet --user "$3" >&2 ||
                python3 -m pip install --quiet --user --break-system-packages "$3" >&2
        fi
        dir="$(nvrtc_dir "$1" "$2")"
        [[ -n "$dir" ]] || { echo "tools/test.sh: NVRTC $1 is still not found after installing it" >&2; exit 1; }
    fi
    echo "tools/test.sh: NVRTC $1 from $dir" >&2
    echo "$dir"
}

dir="$(ensure_nvrtc 12 "${LEARN_KERN_CUDA_LIBS:-}" 'nvidia-cuda-nvrtc-cu12>=12.0,<13')"
export LEARN_KERN_CUDA_LIBS="$dir${LEARN_KERN_CUDA_LIBS:+:$LEARN_KERN_CUDA_LIBS}"
LEARN_KERN_NVRTC13_LIBS="$(ensure_nvrtc 13 "${LEARN_KERN_NVRTC13_LIBS:-}" 'nvidia-cuda-nvrtc>=13.0,<13.1')"
export LEARN_KERN_NVRTC13_LIBS
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
