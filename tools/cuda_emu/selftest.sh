#!/usr/bin/env bash
# Builds and runs selftest.cpp against the emulator's objects (build.sh builds them). Prints "selftest: ok".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
emu="$(bash "$here/build.sh")"
g++ -std=c++17 -O2 -march=native -ffp-contract=off -fno-strict-aliasing -I "$here" -include "$here/runtime.h" \
    -o "$emu/selftest" "$here/selftest.cpp" "$emu/scheduler.o" "$emu/driver.o" -lpthread
"$emu/selftest"
