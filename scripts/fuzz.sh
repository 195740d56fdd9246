#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz: safetensors, llm.c token files, checkpoint
# meta.json) with clang++, ASan and UBSan in their own build directory, and runs each for
# SECONDS seconds (default 60) from its seed corpus. Prints the executions and coverage of
# each target; exits non-zero when any target finds a crash, a sanitizer report, an escaped
# exception, a leak, an allocation over 512 MB or an input that takes over 10 s.
#
#   scripts/fuzz.sh [SECONDS]      MESHTRAIN_FUZZ_BUILD_DIR (default build-fuzz)
#
# Findings are written to $build/fuzz-artifacts/<target>-crash-<sha1> (reproduce with
# $build/tests/fuzz/fuzz_<target> <file>); inputs that grew coverage to $build/fuzz-corpus/.
# See docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
build="${MESHTRAIN_FUZZ_BUILD_DIR:-build-fuzz}"
targets=(safetensors token_file checkpoint_meta)
jobs="${MESHTRAIN_JOBS:-$(nproc)}"

command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (scripts/setup.sh)" >&2; exit 2; }
if [ ! -f "$build/build.ninja" ]; then
  # Only the fuzz targets are built: no tests, examples or MPI.
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DMESHTRAIN_FUZZ=ON \
    -DMESHTRAIN_BUILD_TESTS=OFF -DMESHTRAIN_BUILD_EXAMPLES=OFF -DMESHTRAIN_WITH_MPI=OFF >/dev/null
fi
ninja -C "$build" -j"$jobs" "${targets[@]/#/fuzz_}" >/dev/null

mkdir -p "$build/fuzz-artifacts"
status=0
printf '%-16s %10s %9s %6s %6s  %s\n' target executions exec/s cov ft result
for t in "${targets[@]}"; do
  mkdir -p "$build/fuzz-corpus/$t"
  log="$build/fuzz-artifacts/$t.log"
  dict=()
  [ -f "tests/fuzz/$t.dict" ] && dict=(-dict="tests/fuzz/$t.dict")
  rc=0
  # The first corpus directory receives new inputs; the seeds in the source tree stay as they are.
  "$build/tests/fuzz/fuzz_$t" "${dict[@]}" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 \
    -artifact_prefix="$build/fuzz-artifacts/$t-" \
    "$build/fuzz-corpus/$t" "tests/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  result=ok
  if [ "$rc" -ne 0 ]; then
    result="FINDING (exit $rc; see $log)"
    status=1
  fi
  printf '%-16s %10s %9s %6s %6s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" \
    "$result"
done
[ "$status" -eq 0 ] || ls "$build"/fuzz-artifacts/*-{crash,leak,oom,timeout}-* 2>/dev/null || true
exit "$status"
