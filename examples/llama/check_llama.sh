#!/usr/bin/env bash
# End-to-end checks of train_llama / sample_llama with real mpirun ranks, one CTest test per
# case (registered by examples/llama/tests.cmake):
#   check_llama.sh CASE BUILD_DIR MPIEXEC...
#   export-matches-pytorch  a dp 2 x tp 2 run (4 ranks, vocab 200 padded to 256) exports with
#                         Hugging Face's names, unpadded, lm_head present (untied); a plain
#                         PyTorch Llama (llama_check.py, Debian's python3-torch) reproduces
#                         train_llama's validation loss within 1e-4; --init from the export on
#                         one rank starts from the same tensors. Skipped (77) without
#                         python3-torch.
#   reshard               a tp 2 + sequence-parallel run saves at step 3; resumed as dp 2
#                         ZeRO-1 and as 1 rank, steps 4-6 give the straight run's losses within
#                         1e-5 relative.
#   sample-runs-with-tp   a tied Llama: sample_llama prints the same text on tp 2 as on one
#                         rank, from the checkpoint and from its export.
# Runs where the gpt_fortunes fixture left fortunes_{train,val}.bin (build/examples/gpt).
set -euo pipefail
case_name=$1
build=$2
shift 2
mpiexec=("$@")
work=$(mktemp -d "${TMPDIR:-/tmp}/meshtrain_llama_${case_name}.XXXXXX")
trap 'rm -rf "$work"' EXIT
train=(--data fortunes_train.bin --val-data fortunes_val.bin --steps 6 --warmup 1 --n-layer 2
       --n-embd 32 --n-head 4 --n-kv-head 2 --ffn-dim 64 --block-size 32 --batch-size 8
       --val-every 0 --val-batches 4 --progress lines --log-every 1 --max-time 0)
train_llama=$build/examples/llama/train_llama
sample_llama=$build/examples/llama/sample_llama
export_bin=$build/install/bin/meshtrain-export
here=$(dirname "$0")

fail() { echo "FAIL: $*" >&2; exit 1; }
# The "loss" of step $2 in the JSON Lines file $1 (keys are sorted: "step" comes last).
loss_at() { grep -E "\"step\":$2[,}]" "$1" | grep -v val_loss | sed -E 's/.*"loss":([^,]*),.*/\1/'; }
val_loss_of() { grep val_loss "$1" | tail -1 | sed -E 's/.*"val_loss":([^,}]*).*/\1/'; }
# Exit 0 when |$1 - $2| <= $3 * |$2|.
within() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; m = b < 0 ? -b : b; exit !(d <= t * m) }'; }

case $case_name in
export-matches-pytorch)
  python=/usr/bin/python3
  if ! "$python" -c "import torch" 2>/dev/null; then
    echo "python3-torch is not installed: skipped"
    exit 77
  fi
  "${mpiexec[@]}" -np 4 "$train_llama" "${train[@]}" --vocab-size 200 --tp 2 \
    --checkpoint-dir "$work/ckpt" --metrics "$work/m.jsonl" | tee "$work/train.log"
  grep -q "dp 2 x tp 2" "$work/train.log" || fail "not a dp 2 x tp 2 run"
  "$export_bin" "$work/ckpt" "$work/llama.safetensors"
  want=$(val_loss_of "$work/m.jsonl")
  [ -n "$want" ] || fail "no val_loss in the metrics"
  "$python" "$here/llama_check.py" --weights "$work/llama.safetensors" \
    --val fortunes_val.bin --block-size 32 --batch-size 8 --val-batches 4 --expect "$want" \
    --tolerance 1e-4
  # Hugging Face's names, unpadded (V = 200), lm_head present: llama_check.py's strict load
  # checked them; the same file trains on (--init), here on one rank, tp 1.
  "$train_llama" "${train[@]}" --vocab-size 200 --steps 1 --init "$work/llama.safetensors" \
    --checkpoint-dir "$work/ckpt2" --save-at-start > "$work/init.log"
  grep -q "initial weights from $work/llama.safetensors" "$work/init.log" || fail "--init unused"
  "$export_bin" "$work/ckpt2/step_00000000" "$work/init.safetensors"
  "$python" "$here/llama_check.py" --weights "$work/init.safetensors" \
    --same-as "$work/llama.safetensors"
  ;;
reshard)
  "${mpiexec[@]}" -np 2 "$train_llama" "${train[@]}" --tp 2 --sequence-parallel \
    --checkpoint-dir "$work/ckpt" --save-every 3 --metrics "$work/straight.jsonl"
  [ -f "$work/ckpt/step_00000003/meta.json" ] || fail "no checkpoint at step 3"
  "${mpiexec[@]}" -np 2 "$train_llama" "${train[@]}" --zero 1 \
    --resume-from "$work/ckpt/step_00000003" --metrics "$work/dp2.jsonl" | tee "$work/dp2.log"
  grep -q "resumed from $work/ckpt/step_00000003 at step 3" "$work/dp2.log" || fail "dp2 did not resume"
  "$train_llama" "${train[@]}" --resume-from "$work/ckpt/step_00000003" \
    --metrics "$work/one.jsonl" | tee "$work/one.log"
  grep -q "resumed from $work/ckpt/step_00000003 at step 3" "$work/one.log" || fail "1 rank did not resume"
  for s in 4 5 6; do
    want=$(loss_at "$work/straight.jsonl" $s)
    for run in dp2 one; do
      got=$(loss_at "$work/$run.jsonl" $s)
      echo "step $s: straight tp2+SP $want, resumed as $run $got"
      [ -n "$want" ] && [ -n "$got" ] || fail "step $s: a loss is missing"
      within "$got" "$want" 1e-5 || fail "step $s: $run's loss $got is not within 1e-5 of $want"
    done
  done
  ;;
sample-runs-with-tp)
  "$train_llama" "${train[@]}" --tie-embeddings --checkpoint-dir "$work/ckpt" > /dev/null
  sample=("$sample_llama" --tokens 60 --prompt "The ")
  "${sample[@]}" --checkpoint "$work/ckpt" > "$work/tp1.txt"
  "${mpiexec[@]}" -np 2 "${sample[@]}" --checkpoint "$work/ckpt" > "$work/tp2.txt"
  "$export_bin" "$work/ckpt" "$work/tied.safetensors"
  "${mpiexec[@]}" -np 2 "${sample[@]}" --weights "$work/tied.safetensors" > "$work/export.txt"
  cat "$work/tp2.txt"
  [ "$(head -c 4 "$work/tp1.txt")" = "The " ] || fail "the sample does not start with the prompt"
  [ "$(wc -c < "$work/tp1.txt")" -eq 65 ] || fail "expected 4 + 60 bytes and a newline"
  cmp "$work/tp1.txt" "$work/tp2.txt" || fail "tp 2 sampled other text than one rank"
  cmp "$work/tp1.txt" "$work/export.txt" || fail "the export sampled other text than the checkpoint"
  ;;
*)
  fail "unknown case '$case_name'"
  ;;
esac
echo "PASS: $case_name"
