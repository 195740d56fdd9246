#!/usr/bin/env bash
# End-to-end checks of the meshrun binary, one per CTest test (launch/CMakeLists.txt):
#   check_meshrun.sh CASE PATH_TO_MESHRUN
# Each case runs the real program and checks its exit status and output; the pure logic is
# unit-tested in tests/test_meshrun.cpp.
set -u
case_name=$1
meshrun=$2
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

fail() {
  echo "FAIL ($case_name): $*" >&2
  exit 1
}

# Runs meshrun with the given arguments; sets rc, out, err.
run() {
  "$meshrun" "$@" >"$scratch/out" 2>"$scratch/err"
  rc=$?
  out=$(cat "$scratch/out")
  err=$(cat "$scratch/err")
  printf '$ meshrun %s\n[exit %s]\n[stdout]\n%s\n[stderr]\n%s\n' "$*" "$rc" "$out" "$err"
}

expect_rc() { [ "$rc" -eq "$1" ] || fail "exit status $rc, expected $1"; }
expect_in() { grep -qE -e "$2" <<<"$1" || fail "no match for /$2/"; }

case "$case_name" in
rejects-tp-not-dividing-n)
  run -n 3 --tp 2 -- true
  expect_rc 2
  expect_in "$err" '-n 3 --tp 2: cannot infer dp: the world size 3 is not divisible by cp x tp x pp = 2'
  ;;
bad-layout-starts-nothing)
  # The job would create the marker; a rejected layout must not start it.
  run -n 3 --tp 2 -- touch "$scratch/marker"
  expect_rc 2
  [ ! -e "$scratch/marker" ] || fail "the job ran although the layout was rejected"
  run -n 2 --bind socket -- touch "$scratch/marker"
  expect_rc 2
  expect_in "$err" "--bind must be 'core' or 'none', got 'socket'"
  [ ! -e "$scratch/marker" ] || fail "the job ran although --bind was rejected"
  ;;
help-lists-every-flag)
  run --help
  expect_rc 0
  for flag in '-n, --np' '--tp' '--cp' '--hostfile' '--dry-run' '--threads' '--bind' '--help' \
    MESHTRAIN_TP MESHTRAIN_CP MESHTRAIN_PP MESHTRAIN_WORLD_SIZE MESHTRAIN_THREADS OMP_NUM_THREADS srun; do
    grep -qF -e "$flag" <<<"$out" || fail "--help does not mention $flag"
  done
  ;;
runs-two-ranks)
  run -n 2 -- true
  expect_rc 0
  ;;
ranks-receive-layout-env)
  run -n 2 --tp 2 -- env
  expect_rc 0
  for line in OMPI_COMM_WORLD_RANK=0 OMPI_COMM_WORLD_RANK=1; do
    expect_in "$out" "^$line\$"
  done
  [ "$(grep -c '^MESHTRAIN_TP=2$' <<<"$out")" -eq 2 ] || fail "MESHTRAIN_TP=2 not on both ranks"
  [ "$(grep -c '^MESHTRAIN_CP=1$' <<<"$out")" -eq 2 ] || fail "MESHTRAIN_CP=1 not on both ranks"
  [ "$(grep -c '^MESHTRAIN_WORLD_SIZE=2$' <<<"$out")" -eq 2 ] ||
    fail "MESHTRAIN_WORLD_SIZE=2 not on both ranks"
  [ "$(grep -cE '^MESHTRAIN_THREADS=[1-9][0-9]*$' <<<"$out")" -eq 2 ] ||
    fail "MESHTRAIN_THREADS not on both ranks"
  [ "$(grep -cE '^OMP_NUM_THREADS=[1-9][0-9]*$' <<<"$out")" -eq 2 ] ||
    fail "OMP_NUM_THREADS not on both ranks"
  ;;
failing-job-fails)
  run -n 2 -- false
  [ "$rc" -ne 0 ] || fail "meshrun -n 2 -- false exited 0"
  [ "$rc" -ne 2 ] || fail "exit status 2 is meshrun's usage error, not the job's failure"
  ;;
returns-job-exit-code)
  run -n 1 -- sh -c 'exit 7'
  expect_rc 7
  ;;
slurm-dry-run-uses-srun)
  SLURM_JOB_ID=1 SLURM_JOB_NUM_NODES=2 SLURM_CPUS_ON_NODE=8 \
    run --dry-run -n 4 --tp 2 -- touch "$scratch/marker" 'two words'
  expect_rc 0
  [ ! -e "$scratch/marker" ] || fail "--dry-run ran the job"
  expect_in "$out" "^srun -n 4 --cpu-bind=cores --export=ALL,MESHTRAIN_TP=2,MESHTRAIN_CP=1,MESHTRAIN_PP=1,MESHTRAIN_WORLD_SIZE=4,MESHTRAIN_THREADS=4,OMP_NUM_THREADS=4 touch [^ ]+/marker 'two words'\$"
  ;;
mpirun-dry-run)
  run --dry-run -n 2 --tp 2 --threads 3 --bind none -- touch "$scratch/marker"
  expect_rc 0
  [ ! -e "$scratch/marker" ] || fail "--dry-run ran the job"
  expect_in "$out" "^mpirun (--allow-run-as-root )?-np 2 (--oversubscribe )?--bind-to none -x MESHTRAIN_TP=2 -x MESHTRAIN_CP=1 -x MESHTRAIN_PP=1 -x MESHTRAIN_WORLD_SIZE=2 -x MESHTRAIN_THREADS=3 -x OMP_NUM_THREADS=3 touch "
  ;;
forwards-sigterm)
  # The rank records its pid and sleeps; SIGTERM to meshrun alone must stop the job.
  # shellcheck disable=SC2016 # $$ and $1 belong to the rank's shell
  "$meshrun" -n 1 -- sh -c 'echo $$ >"$1.tmp" && mv "$1.tmp" "$1" && exec sleep 60' sh \
    "$scratch/pid" &
  launcher=$!
  while [ ! -s "$scratch/pid" ]; do
    kill -0 "$launcher" 2>/dev/null || fail "meshrun exited before the job started"
    sleep 0.1
  done
  job=$(cat "$scratch/pid")
  kill -TERM "$launcher"
  wait "$launcher"
  rc=$?
  echo "meshrun exited with $rc after SIGTERM"
  [ "$rc" -ne 0 ] || fail "meshrun exited 0 after SIGTERM"
  # The rank may be reaped a moment after mpirun returns; a zombie counts as stopped.
  for _ in $(seq 50); do
    state=$(awk '{print $3}' "/proc/$job/stat" 2>/dev/null || echo gone)
    if [ "$state" = gone ] || [ "$state" = Z ]; then
      echo "PASS ($case_name)"
      exit 0
    fi
    sleep 0.1
  done
  kill -KILL "$job" 2>/dev/null
  fail "the job (pid $job) still runs after meshrun got SIGTERM"
  ;;
*)
  fail "unknown case"
  ;;
esac
echo "PASS ($case_name)"
