#!/usr/bin/env bash
# The unit and multi-rank tests under AddressSanitizer and UndefinedBehaviorSanitizer
# (docs/reliability.md, "Tests under ASan and UBSan"): a RelWithDebInfo build of the library
# and the test binary with -DMESHTRAIN_SANITIZE=ON in its own directory, then the serial test
# cases and the multi-rank cases at -np 2 (also -np 4 with --np4). Any ASan or UBSan report
# fails its test (the test main sets halt_on_error; leak checking is off: OpenMPI and LibTorch
# keep allocations alive to exit by design). Prints the time of each stage.
#
#   scripts/sanitize.sh [--np4]      MESHTRAIN_SANITIZE_BUILD_DIR (default build-asan)
#
# Not part of .ci/run: on the 2-core CI machine it would more than double the run (the
# figures are in docs/reliability.md). Run it before merging changes to memory handling,
# parsers or communication.
set -euo pipefail
cd "$(dirname "$0")/.."
build="${MESHTRAIN_SANITIZE_BUILD_DIR:-build-asan}"
np4=0
for arg in "$@"; do
  case $arg in
  --np4) np4=1 ;;
  *) echo "sanitize.sh: unknown argument '$arg' (--np4)" >&2; exit 2 ;;
  esac
done
jobs="$(nproc)"
stage() {
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - start)) s"
}
stage configure cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMESHTRAIN_SANITIZE=ON -DMESHTRAIN_BUILD_EXAMPLES=OFF >/dev/null
stage build cmake --build "$build" --target meshtrain_tests -- -j"$jobs"
stage "serial tests" ctest --test-dir "$build" -L serial -j"$jobs" --output-on-failure
stage "np2 tests" ctest --test-dir "$build" -R '^np2: ' -j"$jobs" --output-on-failure
if [ "$np4" -eq 1 ]; then
  stage "np4 tests" ctest --test-dir "$build" -R '^np4: ' -j"$jobs" --output-on-failure
fi
