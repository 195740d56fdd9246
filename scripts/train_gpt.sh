#!/usr/bin/env bash
# The main job (README): prepares the fortunes corpus (once, into data/), trains the default
# GPT on 2 ranks with checkpoints in checkpoints/gpt (the last 2 kept: ~23 MiB each) and
# metrics in out/gpt.jsonl, then prints a text sample from the final checkpoint,
# tensor-parallel on 2 ranks. Extra arguments go to train_gpt (e.g. --tp 2, --steps 1000,
# --resume, --keep-checkpoints 0 to keep all). Each command is printed before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
build="${MESHTRAIN_BUILD_DIR:-build}"
run() {
  echo "+ $*"
  "$@"
}
if [ ! -f data/fortunes_train.bin ] || [ ! -f data/fortunes_val.bin ]; then
  mkdir -p data
  run "$build/examples/gpt/prepare_text" --train data/fortunes_train.bin \
    --val data/fortunes_val.bin /usr/share/games/fortunes
fi
mkdir -p out
run "$build/launch/meshrun" -n 2 -- "$build/examples/gpt/train_gpt" --checkpoint-dir checkpoints/gpt \
  --keep-checkpoints 2 --metrics out/gpt.jsonl "$@"
run "$build/launch/meshrun" -n 2 -- "$build/examples/gpt/sample_gpt" --checkpoint checkpoints/gpt
