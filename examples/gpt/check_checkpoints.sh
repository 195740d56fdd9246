#!/usr/bin/env bash
# End-to-end checks of train_gpt's checkpoints with real mpirun ranks, one CTest test per case:
#   check_checkpoints.sh CASE BUILD_DIR MPIEXEC...
#   kill-during-save      rank 0 is SIGKILLed inside the save of step 4 (after its shards are
#                         written, before the checkpoint is complete): step 2 stays the latest,
#                         loads, and --resume from it reproduces the straight run's losses.
#   export-matches-pytorch  a tp 2 run's export loads into a plain nanoGPT PyTorch model
#                         (Debian's python3-torch) that reproduces train_gpt's validation loss
#                         within 1e-4; skipped (77) without python3-torch.
#   sample-runs-with-tp   sample_gpt prints the same text on tp 2 as on one rank.
#   corrupt-latest-falls-back  step 6's optimizer file of rank 1 has a flipped byte and step 4's
#                         meta.json is truncated: --resume names both as skipped and why,
#                         resumes from step 2 and re-saves steps 4 and 6 intact; with every
#                         checkpoint damaged, --resume fails naming them.
#   startup-np2, startup-np4  sharded start-up: the step-0 checkpoint (--save-at-start) of
#                         every layout on 2 (4) ranks exports to the same bytes as one rank's;
#                         and two layouts started with --init from the serial run's trained
#                         export (each rank reads its part of the mapped file) save it back
#                         unchanged at step 0.
# Runs in the build's examples/gpt directory, where the fixture left fortunes_{train,val}.bin.
set -euo pipefail
case_name=$1
build=$2
shift 2
mpiexec=("$@")
work=$(mktemp -d "${TMPDIR:-/tmp}/meshtrain_ckpt_${case_name}.XXXXXX")
trap 'rm -rf "$work"' EXIT
train=(--data fortunes_train.bin --val-data fortunes_val.bin --steps 6 --warmup 1 --n-layer 2
       --n-embd 32 --n-head 4 --block-size 32 --batch-size 8 --val-every 0 --val-batches 4
       --progress lines --log-every 1 --max-time 0)
train_gpt=$build/examples/gpt/train_gpt

fail() { echo "FAIL: $*" >&2; exit 1; }
# The "loss" of step $2 in the JSON Lines file $1 (keys are sorted: "step" comes last).
loss_at() { grep -E "\"step\":$2[,}]" "$1" | grep -v val_loss | sed -E 's/.*"loss":([^,]*),.*/\1/'; }
val_loss_of() { grep val_loss "$1" | tail -1 | sed -E 's/.*"val_loss":([^,}]*).*/\1/'; }

case $case_name in
kill-during-save)
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" --zero 1 --metrics "$work/straight.jsonl"
  set +e
  MESHTRAIN_FAULT=kill-in-save:4 "${mpiexec[@]}" -x MESHTRAIN_FAULT -np 2 "$train_gpt" \
    "${train[@]}" --zero 1 --checkpoint-dir "$work/ckpt" --save-every 2 > "$work/killed.log" 2>&1
  code=$?
  set -e
  cat "$work/killed.log"
  [ "$code" -ne 0 ] || fail "the killed job exited with 0"
  grep -q "MESHTRAIN_FAULT: kill-in-save at step 4 on rank 0" "$work/killed.log" || fail "no fault fired"
  [ -f "$work/ckpt/step_00000002/meta.json" ] || fail "step 2 is not complete"
  [ ! -e "$work/ckpt/step_00000004" ] || fail "the interrupted step 4 looks complete"
  ls -a "$work/ckpt"
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" --zero 1 --checkpoint-dir "$work/ckpt" \
    --save-every 2 --resume --metrics "$work/resumed.jsonl" | tee "$work/resumed.log"
  grep -q "resumed from $work/ckpt/step_00000002 at step 2" "$work/resumed.log" ||
    fail "did not resume from step 2"
  for s in 3 4 5 6; do
    want=$(loss_at "$work/straight.jsonl" $s)
    got=$(loss_at "$work/resumed.jsonl" $s)
    echo "step $s: straight $want, resumed $got"
    [ -n "$want" ] && [ "$want" = "$got" ] || fail "step $s: resumed loss $got != straight $want"
  done
  # The resumed run's save of step 4 replaced the partial one.
  [ -f "$work/ckpt/step_00000004/meta.json" ] && [ ! -e "$work/ckpt/.step_00000004.partial" ] ||
    fail "step 4 was not saved cleanly on the second try"
  ;;
export-matches-pytorch)
  python=/usr/bin/python3
  if ! "$python" -c "import torch" 2>/dev/null; then
    echo "python3-torch is not installed: skipped"
    exit 77
  fi
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" --tp 2 --checkpoint-dir "$work/ckpt" \
    --metrics "$work/m.jsonl"
  "$build/launch/meshtrain-export" "$work/ckpt" "$work/gpt.safetensors"
  want=$(val_loss_of "$work/m.jsonl")
  "$python" "$(dirname "$0")/nanogpt_check.py" --weights "$work/gpt.safetensors" \
    --val fortunes_val.bin --block-size 32 --batch-size 8 --val-batches 4 --expect "$want" \
    --tolerance 1e-4
  # --init starts a run (here on one rank, tp 1) from the export: its step-0 checkpoint
  # exports to the same tensors.
  "$train_gpt" "${train[@]}" --steps 1 --init "$work/gpt.safetensors" \
    --checkpoint-dir "$work/ckpt2" --save-at-start > "$work/init.log"
  grep -q "initial weights from $work/gpt.safetensors" "$work/init.log" || fail "--init unused"
  "$build/launch/meshtrain-export" "$work/ckpt2/step_00000000" "$work/init.safetensors"
  "$python" "$(dirname "$0")/nanogpt_check.py" --weights "$work/init.safetensors" \
    --same-as "$work/gpt.safetensors"
  ;;
startup-np2 | startup-np4)
  if [ "$case_name" = startup-np2 ]; then
    np=2
    layouts=("--zero 3" "--tp 2" "--tp 2 --sequence-parallel" "--pp 2" "--cp 2")
    init_layouts=("--zero 3" "--tp 2 --sequence-parallel")
  else
    np=4
    layouts=("--tp 2 --zero 1" "--tp 2 --sequence-parallel --zero 3" "--pp 2 --tp 2" "--pp 2 --zero 1"
             "--cp 2 --tp 2" "--zero 3")
    init_layouts=("--tp 2 --sequence-parallel --zero 3" "--pp 2 --tp 2")
  fi
  start() { # $1: a name, $2: ranks, the rest: the layout's flags
    local name=$1 ranks=$2
    shift 2
    local launch=()
    if [ "$ranks" -gt 1 ]; then launch=("${mpiexec[@]}" -np "$ranks"); fi
    "${launch[@]}" "$train_gpt" "${train[@]}" "$@" --steps 1 --checkpoint-dir "$work/$name" \
      --save-at-start > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; fail "$name failed"; }
    "$build/launch/meshtrain-export" "$work/$name/step_00000000" "$work/$name.safetensors" \
      > /dev/null
  }
  header_size() { od -An -t u8 -N 8 "$1" | tr -d ' '; }
  tensor_bytes() { tail -c +$((9 + $(header_size "$1"))) "$1"; }
  header_of() { head -c $((8 + $(header_size "$1"))) "$1" | tail -c +9 | sed -E 's|"source":"[^"]*"||; s| *$||'; }
  start serial 1
  for layout in "${layouts[@]}"; do
    name=$(echo "$layout" | tr -d ' -')
    # shellcheck disable=SC2086 # the layout's flags split on purpose
    start "$name" $np $layout
    # The same tensors, byte for byte, and the same header but for its "source" (the path).
    cmp <(tensor_bytes "$work/serial.safetensors") <(tensor_bytes "$work/$name.safetensors") ||
      fail "np$np $layout: the step-0 export's tensors differ from the serial run's"
    cmp <(header_of "$work/serial.safetensors") <(header_of "$work/$name.safetensors") ||
      fail "np$np $layout: the step-0 export's header differs from the serial run's"
    echo "np$np $layout: step-0 export identical to the serial run's ($(stat -c %s \
      "$work/$name.safetensors") bytes)"
  done
  # The serial run's step 1 (trained: not the seed's values) as --init.
  "$build/launch/meshtrain-export" "$work/serial" "$work/trained.safetensors" > /dev/null
  for layout in "${init_layouts[@]}"; do
    name=init$(echo "$layout" | tr -d ' -')
    # shellcheck disable=SC2086 # the layout's flags split on purpose
    start "$name" $np $layout --init "$work/trained.safetensors"
    grep -q "initial weights from $work/trained.safetensors" "$work/$name.log" || fail "--init unused"
    cmp <(tensor_bytes "$work/trained.safetensors") <(tensor_bytes "$work/$name.safetensors") ||
      fail "np$np $layout --init: the step-0 export differs from the --init file's tensors"
    echo "np$np $layout --init: step-0 export identical to the --init file's tensors"
  done
  ;;
sample-runs-with-tp)
  "$train_gpt" "${train[@]}" --checkpoint-dir "$work/ckpt" > /dev/null
  sample=("$build/examples/gpt/sample_gpt" --checkpoint "$work/ckpt" --tokens 60 --prompt "The ")
  "${sample[@]}" > "$work/tp1.txt"
  "${mpiexec[@]}" -np 2 "${sample[@]}" > "$work/tp2.txt"
  cat "$work/tp2.txt"
  [ "$(head -c 4 "$work/tp1.txt")" = "The " ] || fail "the sample does not start with the prompt"
  [ "$(wc -c < "$work/tp1.txt")" -eq 65 ] || fail "expected 4 + 60 bytes and a newline"
  cmp "$work/tp1.txt" "$work/tp2.txt" || fail "tp 2 sampled other text than one rank"
  ;;
corrupt-latest-falls-back)
  ckpt=(--checkpoint-dir "$work/ckpt" --save-every 2)
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" "${ckpt[@]}" > /dev/null
  flip_byte() { # the 5th byte from the end of $1
    printf '\x7f' | dd of="$1" bs=1 seek=$(($(stat -c %s "$1") - 5)) conv=notrunc status=none
  }
  flip_byte "$work/ckpt/step_00000006/optim-dp01-tp00.safetensors"
  truncate -s 40 "$work/ckpt/step_00000004/meta.json"
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" "${ckpt[@]}" --resume --steps 8 \
    > "$work/resumed.log" 2>&1 || { cat "$work/resumed.log"; fail "--resume failed"; }
  cat "$work/resumed.log"
  grep -q "skipped $work/ckpt/step_00000006, it does not verify on rank 1: .*optim-dp01-tp00.safetensors: checksum fnv1a64" \
    "$work/resumed.log" || fail "step 6 not named as skipped, with its checksum"
  grep -q "skipped $work/ckpt/step_00000004, it does not verify on rank 0: .*meta.json: not valid JSON" \
    "$work/resumed.log" || fail "step 4 not named as skipped, with its meta.json"
  grep -q "resumed from $work/ckpt/step_00000002 at step 2" "$work/resumed.log" ||
    fail "did not resume from step 2"
  # The run saved 4, 6 and 8 again, replacing the damaged ones: the next resume takes step 8.
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" "${ckpt[@]}" --resume --steps 8 \
    > "$work/again.log" 2>&1 || { cat "$work/again.log"; fail "the second --resume failed"; }
  grep -q "resumed from $work/ckpt/step_00000008 at step 8" "$work/again.log" ||
    fail "the second --resume did not take step 8"
  if grep -q "skipped" "$work/again.log"; then fail "an intact checkpoint was skipped"; fi
  # Nothing verifies: an error naming each, exit 1, no step.
  for f in "$work"/ckpt/step_*/optim-dp00-tp00.safetensors; do flip_byte "$f"; done
  code=0
  "${mpiexec[@]}" -np 2 "$train_gpt" "${train[@]}" "${ckpt[@]}" --resume --steps 10 \
    > "$work/none.log" 2>&1 || code=$?
  cat "$work/none.log"
  [ "$code" -eq 1 ] || fail "expected exit code 1 when no checkpoint verifies, got $code"
  grep -q "no checkpoint in $work/ckpt verifies (4 tried, newest first)" "$work/none.log" ||
    fail "no error naming the checkpoints tried"
  if grep -q "step 9/" "$work/none.log"; then fail "a step ran"; fi
  ;;
*)
  fail "unknown case '$case_name'"
  ;;
esac
echo "PASS: $case_name"
