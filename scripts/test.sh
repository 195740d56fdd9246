#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (unit, multi-rank at -np 2 and -np 4,
# the out-of-tree consumer, example jobs). Ends with CTest's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ctest --test-dir "${MESHTRAIN_BUILD_DIR:-build}" --output-on-failure -j"$(nproc)"
