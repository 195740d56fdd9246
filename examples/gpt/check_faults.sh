#!/usr/bin/env bash
# Fault injection end to end (docs/reliability.md), real mpirun ranks, one CTest test per case:
#   check_faults.sh CASE BUILD_DIR MPIEXEC...
#   crash              rank 1 SIGKILLs itself at step 3: the job ends non-zero within 60 s and
#                      the metrics file holds only complete JSON lines
#   hang               rank 1 stops at step 3: rank 0's watchdog (--comm-timeout 3) reports the
#                      collective it waits in and its flight recorder; the job ends within 60 s
#   pp-hang-names-sender  pp 2: rank 0 (the first stage) stops at step 3 and never sends its
#                      activation: rank 1's watchdog reports its receive from rank 0 on the
#                      'pp' group and names rank 0 as holding the job up; ends within 60 s
#   nan-stop           rank 1's loss is NaN at step 3: every rank stops before the update, exit
#                      1 with the message; the checkpoint at the end is step 2's
#   nan-skip           the same with --nan-policy skip: step 3 is skipped, the run completes,
#                      and the losses equal those of a run where rank 0 got the NaN instead
#   config-mismatch    one rank started with another --n-layer: exit 2 before training, the
#                      message names --n-layer and the rank
#   kill-during-saves  rank 0 is killed inside the saves of steps 4, 6 and 8 in turn, each run
#                      resuming the last: the previous checkpoint is always complete and loads,
#                      and the final losses equal a straight run's
#   sigstop-names-rank a 4-rank dp 2 x tp 2 job (--comm-timeout 5); rank 3 is stopped from
#                      outside with SIGSTOP (no fault injection): the first watchdog report names
#                      rank 3 and this host as holding the job up, the job ends non-zero within
#                      60 s, and no rank is left behind
# Each case prints "elapsed: N s" for the fault matrix. Runs where the fixture left
# fortunes_{train,val}.bin (the build's examples/gpt directory).
set -euo pipefail
case_name=$1
build=$2
shift 2
mpiexec=("$@")
work=$(mktemp -d "${TMPDIR:-/tmp}/meshtrain_faults_${case_name}.XXXXXX")
trap 'rm -rf "$work"' EXIT
train=(--data fortunes_train.bin --val-data "" --steps 6 --warmup 1 --n-layer 2 --n-embd 32
       --n-head 4 --block-size 32 --batch-size 8 --progress lines --log-every 1 --max-time 0)
train_gpt=$build/examples/gpt/train_gpt

fail() { echo "FAIL: $*" >&2; exit 1; }
loss_at() { grep -E "\"step\":$2[,}]" "$1" | sed -E 's/.*"loss":([^,]*),.*/\1/'; }
# Runs the job, keeps its exit code in $code and its output in $work/out.log.
run_job() {
  local start=$SECONDS
  set +e
  "$@" > "$work/out.log" 2>&1
  code=$?
  set -e
  elapsed=$((SECONDS - start))
  cat "$work/out.log"
  echo "exit code: $code, elapsed: $elapsed s"
}
every_line_is_json() {
  /usr/bin/python3 -c 'import json,sys; [json.loads(l) for l in open(sys.argv[1])]' "$1" ||
    fail "$1 holds an incomplete line"
}

case $case_name in
crash)
  run_job env MESHTRAIN_FAULT=crash:3:1 "${mpiexec[@]}" -x MESHTRAIN_FAULT -np 2 "$train_gpt" \
    "${train[@]}" --metrics "$work/m.jsonl"
  [ "$code" -ne 0 ] || fail "the job exited 0 after a rank crashed"
  [ "$elapsed" -lt 60 ] || fail "the job took $elapsed s to end"
  grep -q "MESHTRAIN_FAULT: crash at step 3 on rank 1" "$work/out.log" || fail "no crash fired"
  every_line_is_json "$work/m.jsonl"
  ;;
hang)
  run_job env MESHTRAIN_FAULT=hang:3:1 "${mpiexec[@]}" -x MESHTRAIN_FAULT -np 2 "$train_gpt" \
    "${train[@]}" --comm-timeout 3
  [ "$code" -ne 0 ] || fail "the job exited 0 after a rank hung"
  [ "$elapsed" -lt 60 ] || fail "the job took $elapsed s to end"
  grep -q "MESHTRAIN_FAULT: hang at step 3 on rank 1" "$work/out.log" || fail "no hang fired"
  grep -Eq "rank 0: collective watchdog: [a-z_]+ #[0-9]+ on group '[a-z]+' \([0-9]+ bytes\) has not completed after" \
    "$work/out.log" || fail "no watchdog report"
  grep -q "last completed collectives on this rank" "$work/out.log" || fail "no flight recorder"
  ;;
pp-hang-names-sender)
  run_job env MESHTRAIN_FAULT=hang:3:0 "${mpiexec[@]}" -x MESHTRAIN_FAULT -np 2 "$train_gpt" \
    "${train[@]}" --pp 2 --micro-batch-size 2 --comm-timeout 3
  [ "$code" -ne 0 ] || fail "the job exited 0 after the first stage hung"
  [ "$elapsed" -lt 60 ] || fail "the job took $elapsed s to end"
  grep -q "MESHTRAIN_FAULT: hang at step 3 on rank 0" "$work/out.log" || fail "no hang fired"
  grep -Eq "rank 1: collective watchdog: recv #[0-9]+ from rank 0 on group 'pp' \([0-9]+ bytes\) has not completed after .* held up by rank 0 on host " \
    "$work/out.log" || fail "no watchdog report of the receive naming rank 0"
  grep -Eq "rank 0 \(host .*\) is rank 0 of group 'pp', the other end of this message; it waits in no collective that another rank holds up: it is the one holding the job up" \
    "$work/out.log" || fail "the report does not say what rank 0 does"
  ;;
nan-stop)
  run_job env MESHTRAIN_FAULT=nan:3:1 "${mpiexec[@]}" -x MESHTRAIN_FAULT -np 2 "$train_gpt" \
    "${train[@]}" --checkpoint-dir "$work/ckpt" --save-every 1 --metrics "$work/m.jsonl"
  [ "$code" -eq 1 ] || fail "expected exit code 1, got $code"
  grep -q "step 3: the gradient norm is not finite; stopped before applying it" \
    "$work/out.log" || fail "no message"
  [ -f "$work/ckpt/step_00000002/meta.json" ] || fail "step 2's checkpoint is missing"
  [ ! -e "$work/ckpt/step_00000003" ] || fail "a checkpoint of the NaN step was written"
  grep -q '"non_finite":true' "$work/m.jsonl" || fail "the metrics do not mark the step"
  every_line_is_json "$work/m.jsonl"
  ;;
nan-skip)
  for r in 0 1; do
    run_job env MESHTRAIN_FAULT=nan:3:$r "${mpiexec[@]}" -x MESHTRAIN_FAULT -np 2 "$train_gpt" \
      "${train[@]}" --nan-policy skip --metrics "$work/m$r.jsonl"
    [ "$code" -eq 0 ] || fail "the skip run (NaN on rank $r) failed with $code"
    grep -E '"step":3[,}]' "$work/m$r.jsonl" | grep -q '"skipped":true' ||
      fail "step 3 is not marked skipped"
  done
  for s in 4 5 6; do
    a=$(loss_at "$work/m0.jsonl" $s)
    b=$(loss_at "$work/m1.jsonl" $s)
    echo "step $s: NaN on rank 0 -> $a, on rank 1 -> $b"
    [ -n "$a" ] && [ "$a" = "$b" ] || fail "step $s differs: $a vs $b"
  done
  ;;
config-mismatch)
  run_job "${mpiexec[@]}" -np 1 "$train_gpt" "${train[@]}" : -np 1 "$train_gpt" "${train[@]}" \
    --n-layer 3
  [ "$code" -eq 2 ] || fail "expected exit code 2, got $code"
  grep -q "the ranks disagree on the configuration" "$work/out.log" || fail "no agreement error"
  grep -q -e "--n-layer: rank 0 has '2', rank 1 has '3'" "$work/out.log" || fail "field not named"
  if grep -q "step 1/" "$work/out.log"; then fail "a step ran"; fi
  ;;
kill-during-saves)
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" --steps 10 --metrics "$work/straight.jsonl" \
    > /dev/null
  ckpt=(--checkpoint-dir "$work/ckpt" --save-every 2 --resume --steps 10)
  for s in 4 6 8; do
    run_job env MESHTRAIN_FAULT=kill-in-save:$s "${mpiexec[@]}" -x MESHTRAIN_FAULT -np 2 \
      "$train_gpt" "${train[@]}" "${ckpt[@]}"
    [ "$code" -ne 0 ] || fail "the job killed in the save of step $s exited 0"
    previous=$(printf "%s/ckpt/step_%08d" "$work" $((s - 2)))
    [ -f "$previous/meta.json" ] || fail "step $((s - 2)) is not complete"
    [ ! -e "$(printf "%s/ckpt/step_%08d" "$work" "$s")" ] || fail "step $s looks complete"
  done
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" "${ckpt[@]}" --metrics "$work/last.jsonl" |
    tee "$work/last.log"
  grep -q "resumed from $work/ckpt/step_00000006 at step 6" "$work/last.log" ||
    fail "the last run did not resume from step 6"
  for s in 7 8 9 10; do
    want=$(loss_at "$work/straight.jsonl" $s)
    got=$(loss_at "$work/last.jsonl" $s)
    [ -n "$want" ] && [ "$want" = "$got" ] || fail "step $s: $got != straight $want"
  done
  ;;
sigstop-names-rank)
  target=3
  start=$SECONDS
  # --tag-output: every line says which rank printed it ("[1,R]<stderr>:...").
  "${mpiexec[@]}" --tag-output -np 4 "$train_gpt" --data fortunes_train.bin --val-data "" \
    --steps 1000000 --warmup 1 --n-layer 2 --n-embd 32 --n-head 4 --block-size 32 \
    --batch-size 8 --tp 2 --progress lines --log-every 1 --max-time 0 --comm-timeout 5 \
    > "$work/out.log" 2>&1 &
  mpirun_pid=$!
  rank_pid=""
  # Whatever happens: nothing of this job is left running, stopped or not.
  cleanup() {
    if [ -n "$rank_pid" ]; then kill -CONT "$rank_pid" 2>/dev/null || true; fi
    for p in $(pgrep -P "$mpirun_pid" 2>/dev/null || true) "$mpirun_pid"; do
      kill -KILL "$p" 2>/dev/null || true
    done
    rm -rf "$work"
  }
  trap cleanup EXIT
  for _ in $(seq 600); do
    grep -q "step 3/" "$work/out.log" && break
    kill -0 "$mpirun_pid" 2>/dev/null || { cat "$work/out.log"; fail "the job ended early"; }
    sleep 0.1
  done
  grep -q "step 3/" "$work/out.log" || { cat "$work/out.log"; fail "no step 3 within 60 s"; }
  # The ranks are mpirun's children; which is which, their environment says.
  for p in $(pgrep -P "$mpirun_pid"); do
    if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$target"; then
      rank_pid=$p
    fi
  done
  [ -n "$rank_pid" ] || fail "no process of rank $target among mpirun's children"
  kill -STOP "$rank_pid"
  echo "stopped rank $target (pid $rank_pid) at $((SECONDS - start)) s"
  for _ in $(seq 600); do
    kill -0 "$mpirun_pid" 2>/dev/null || break
    sleep 0.1
  done
  code=0
  if kill -0 "$mpirun_pid" 2>/dev/null; then
    cat "$work/out.log"
    fail "the job still runs 60 s after rank $target stopped"
  fi
  wait "$mpirun_pid" || code=$?
  elapsed=$((SECONDS - start))
  cat "$work/out.log"
  echo "exit code: $code, elapsed: $elapsed s"
  [ "$code" -ne 0 ] || fail "the job exited 0"
  first=$(grep -m1 "collective watchdog:" "$work/out.log" || true)
  [ -n "$first" ] || fail "no watchdog report"
  echo "first report: $first"
  grep -Fq "held up by rank $target on host $(hostname)" <<<"$first" ||
    fail "the first report does not name rank $target on host $(hostname)"
  # Its rank's next lines follow the chain to the stopped process.
  reporter=$(sed -E 's/^\[[0-9]+,([0-9]+)\].*/\1/' <<<"$first")
  grep -F "[1,$reporter]<stderr>:" "$work/out.log" | grep -Fq "rank $target (host $(hostname)" ||
    fail "the report does not describe rank $target"
  ;;
*)
  fail "unknown case '$case_name'"
  ;;
esac
echo "PASS: $case_name"
