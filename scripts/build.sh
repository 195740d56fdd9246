#!/usr/bin/env bash
# Configures and builds meshtrain into ./build (Release, Ninja, precompiled torch headers).
# Extra arguments go to CMake, e.g. scripts/build.sh -DMESHTRAIN_SANITIZE=ON
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${MESHTRAIN_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build_dir" -- -j"$(nproc)"
