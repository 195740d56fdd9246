#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (unit, multi-rank at -np 2 and -np 4,
# the out-of-tree consumer, example jobs), then fuzzes each file reader for 20 s (its own
# clang build in build-fuzz; docs/reliability.md). Ends with the fuzzers' table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ctest --test-dir "${MESHTRAIN_BUILD_DIR:-build}" --output-on-failure -j"$(nproc)"
scripts/fuzz.sh 20
