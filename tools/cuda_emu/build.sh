#!/usr/bin/env bash
# Builds the CUDA emulator into a folder (default target/cuda_emu): libcuda.so (the driver API over host
# memory, with every kernel of kernels/*.cu compiled for the CPU) and libcublas.so.12 (the same library:
# one work queue for both). Each kernel file is compiled as it is, with this folder's ptx.cuh standing in
# for kernels/ptx.cuh and runtime.h in front. Rebuilds only when a source changed. Needs g++ (C++17) on
# x86-64 and python3. Prints the folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/cuda_emu}"
mkdir -p "$out"

stamp="$(cat "$here"/*.h "$here"/*.cpp "$here"/*.cuh "$here/build.sh" "$root"/kernels/* | sha256sum | cut -c1-16)"
if [[ -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp" && -f "$out/libcuda.so" ]]; then
    echo "$out"
    exit 0
fi

src="$out/src"
rm -rf "$src" "$out"/*.o
mkdir -p "$src"
cp "$root"/kernels/*.cu "$root"/kernels/*.cuh "$src/"
cp "$here/ptx.cuh" "$src/ptx.cuh"
# Each kernel file registers its entry points at the end.
python3 - "$src" <<'PY'
import pathlib, re, sys
for cu in sorted(pathlib.Path(sys.argv[1]).glob("*.cu")):
    text = cu.read_text()
    names = re.findall(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(', text)
    if not names:
        sys.exit(f"build.sh: no kernel found in {cu.name}")
    text += '\n#include "registry.h"\n' + "".join(f"EMU_REGISTER({n})\n" for n in names)
    cu.write_text(text)
PY

flags=(-std=c++17 -O2 -fPIC -ffp-contract=off -fno-strict-aliasing -Wall -Wno-unused-function
       -Wno-unused-variable -Wno-unknown-pragmas -I "$here")
pids=()
for file in "$src"/*.cu; do
    g++ "${flags[@]}" -x c++ -include "$here/runtime.h" -c "$file" -o "$out/$(basename "$file" .cu).o" &
    pids+=($!)
done
for file in scheduler driver cublas; do
    g++ "${flags[@]}" -c "$here/$file.cpp" -o "$out/$file.o" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[[ $status == 0 ]] || { echo "build.sh: compiling the emulator failed" >&2; exit 1; }
g++ -shared -o "$out/libcuda.so" "$out"/*.o -lpthread
# No libcuda.so.1: NVRTC opens that name for the real driver's private tables, which this is not; cudarc
# asks for libcuda.so first.
rm -f "$out/libcuda.so.1"
ln -sf libcuda.so "$out/libcublas.so.12"
echo "$stamp" >"$out/stamp"
echo "$out"
