#!/usr/bin/env bash
# The main job (README): prepares the fortunes corpus (once, into data/), trains the default
# GPT on 2 ranks with checkpoints in checkpoints/gpt (the last 2 kept: ~23 MiB each) and
# metrics in out/gpt.jsonl, then prints a text sample from the final checkpoint,
# tensor-parallel on 2 ranks. Extra arguments go to train_gpt (e.g. --tp 2, --steps 1000,
# --resume, --keep-checkpoints 0 to keep all). Each command is printed before it runs.
# On a CPU with native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo) it trains with
# --precision bf16: there the same 4500 steps take ~40% less time and end at the same or a
# lower validation loss (docs/memory.md); --precision fp32 as an argument overrides it.
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
precision=fp32
if grep -qw -e avx512_bf16 -e amx_bf16 /proc/cpuinfo 2>/dev/null; then
  precision=bf16
fi
mkdir -p out
run "$build/launch/meshrun" -n 2 -- "$build/examples/gpt/train_gpt" --checkpoint-dir checkpoints/gpt \
  --keep-checkpoints 2 --metrics out/gpt.jsonl --precision "$precision" "$@"
run "$build/launch/meshrun" -n 2 -- "$build/examples/gpt/sample_gpt" --checkpoint checkpoints/gpt
