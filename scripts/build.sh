#!/usr/bin/env bash
# Configures and builds meshtrain into ./build (Release, Ninja, precompiled torch headers), then
# installs it into ./build/install and builds the Llama example (its own CMake project, on the
# installed package alone; docs/llama.md) into ./build/examples/llama.
# Extra arguments go to CMake, e.g. scripts/build.sh -DMESHTRAIN_SANITIZE=ON
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${MESHTRAIN_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build_dir" -- -j"$(nproc)"
cmake -D BUILD_DIR="$build_dir" -P examples/llama/build_against_install.cmake
