#!/usr/bin/env bash
# CTest cases of the benchmark tooling (docs/benchmarks.md), on real mpirun ranks:
#
#   trace       train_gpt --trace on 2 ranks writes one Chrome trace per rank that parses, with
#               forward / backward / optimizer spans on the training thread and the dp
#               all_reduce on the communicator's thread
#   strategies  bench_strategies.py on four layouts (ZeRO-3 among them): exit 0
#               (communication equals theory), the table, the CSV and four PNG charts; then
#               --compare of those rows (--rows: nothing is run again) against a baseline
#               doctored from them to be 2x faster and 2x lighter: exactly 0.50x and 2.00x,
#               flagged SLOWER and HEAVIER, exit 1. No speed is asserted (DESIGN §7): the
#               ratios come from the doctoring alone.
#   pipeline    bench_pipeline on 4 ranks (stage-cost mode, 2 ms actions): exit 0 and one table
#               row per schedule with its simulated bubble (3/11, 3/11, 3/19, 3/27); no
#               measured figure is asserted. Compute mode (the GPT, 2 ranks, 1 step): a row
#               per schedule with the same simulated bubbles at pp 2 m 8 (1/9, 1/9, 1/17,
#               1/25). A bad --schedules or --mode exits 2 naming the value.
#   ops         bench_ops (one process, 1 timed run per op): the CPU line names the model and
#               both bf16 extensions, the table has one row per op with four times and a
#               speed-up; --n-head not dividing --n-embd exits 2 naming both. No time asserted.
#
# usage: check_benchmarks.sh CASE BUILD_DIR MPIRUN [MPIRUN OPTIONS...]
set -euo pipefail
case_name=$1
build=$(cd "$2" && pwd)
shift 2
mpirun=("$@")
here=$(cd "$(dirname "$0")" && pwd)
python=/usr/bin/python3 # Debian's, with python3-matplotlib
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=$build/examples/gpt/fortunes_train.bin
small=(--n-layer 2 --n-embd 64 --n-head 2 --block-size 32 --batch-size 8)

fail() {
  echo "check_benchmarks $case_name: FAILED: $*" >&2
  exit 1
}

case $case_name in
trace)
  "${mpirun[@]}" -np 2 "$build/examples/gpt/train_gpt" --data "$data" --val-data "" \
    --steps 3 --warmup 1 --progress off "${small[@]}" --trace "$work/trace" >"$work/out.txt"
  grep -q "trace: $work/trace/trace-rank<R>.json" "$work/out.txt" || fail "no trace line"
  "$python" - "$work/trace" <<'EOF' || fail "trace content"
import json, sys
for rank in (0, 1):
    events = json.load(open(f"{sys.argv[1]}/trace-rank{rank}.json"))["traceEvents"]
    threads = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["pid"] == rank and e["dur"] >= 0 for e in spans), "pid / dur"
    on = lambda thread: {e["name"] for e in spans if threads.get(e["tid"]) == thread}
    train = on("train")
    for name in ("step", "forward", "backward", "optimizer", "reduce gradients"):
        assert name in train, f"rank {rank}: no {name} span on the training thread: {train}"
    assert sum(e["name"] == "step" for e in spans) == 3, "one step span per step"
    comm = {e["name"] for e in spans if e["cat"] == "comm"}
    assert any(n.startswith("all_reduce dp ") for n in comm), f"rank {rank}: comm spans {comm}"
    print(f"rank {rank}: {len(spans)} spans, threads {sorted(threads.values())}")
EOF
  ;;
strategies)
  run=("$python" "$here/bench_strategies.py" --build "$build" --data "$data" --steps 2 --warmup 1
    --layouts "dp2,tp2 sp,dp2 zero2,dp2 zero3" "--mpirun=${mpirun[*]}")
  "${run[@]}" --out "$work/now" || fail "bench_strategies exited $?"
  for f in results.md results.csv throughput.png step_split.png memory.png comm.png; do
    [[ -s $work/now/$f ]] || fail "no $f"
  done
  for f in "$work"/now/*.png; do
    [[ $(head -c 4 "$f" | tail -c 3) == PNG ]] || fail "$f is not a PNG"
  done
  grep -q "| dp2 zero2 | 2 |" "$work/now/results.md" || fail "no dp2 zero2 row"
  # A baseline twice as fast and half as heavy: every layout regressed.
  "$python" - "$work/now/results.csv" "$work/baseline.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows:
    r["tokens_per_s"] = float(r["tokens_per_s"]) * 2
    r["peak_bytes"] = float(r["peak_bytes"]) / 2
with open(sys.argv[2], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=rows[0].keys())
    w.writeheader()
    w.writerows(rows)
EOF
  code=0
  "$python" "$here/bench_strategies.py" --rows "$work/now/results.csv" \
    --compare "$work/baseline.csv" >"$work/compare.txt" || code=$?
  cat "$work/compare.txt"
  [[ $code == 1 ]] || fail "--compare against a faster baseline exited $code, expected 1"
  for layout in "dp2" "tp2 sp" "dp2 zero2" "dp2 zero3"; do
    grep -Fqx "| $layout | 0.50x | 2.00x | SLOWER HEAVIER |" "$work/compare.txt" ||
      fail "$layout not flagged at 0.50x / 2.00x, slower and heavier"
  done
  # The same rows against themselves: nothing flagged, exit 0.
  "$python" "$here/bench_strategies.py" --rows "$work/now/results.csv" \
    --compare "$work/now/results.csv" >"$work/same.txt" || fail "rows against themselves exited $?"
  grep -Fqx "| dp2 | 1.00x | 1.00x | ok |" "$work/same.txt" || fail "dp2 against itself not ok"
  ;;
pipeline)
  "${mpirun[@]}" -np 4 "$build/examples/benchmarks/bench_pipeline" --cost-ms 2 --steps 1 \
    --message-kib 4 >"$work/out.txt" || fail "bench_pipeline exited $?"
  for row in "gpipe, pp 4, 8 micro-batches .* 0.273 \|" "1f1b, pp 4, 8 micro-batches .* 0.273 \|" \
    "interleaved, pp 4, 8 micro-batches, 2 virtual stages .* 0.158 \|" \
    "zb-h1, pp 4, 8 micro-batches .* 0.111 \|"; do
    grep -Eq "^\| $row" "$work/out.txt" || fail "no row matching '$row'"
  done
  "${mpirun[@]}" -np 2 "$build/examples/benchmarks/bench_pipeline" --mode compute --steps 1 \
    --n-layer 4 --n-embd 32 --block-size 16 >"$work/compute.txt" || fail "compute mode exited $?"
  grep -q "compute mode, pp 2" "$work/compute.txt" || fail "no compute-mode header"
  for row in "gpipe, pp 2, 8 micro-batches .* 0.111 \|" "1f1b, pp 2, 8 micro-batches .* 0.111 \|" \
    "interleaved, pp 2, 8 micro-batches, 2 virtual stages .* 0.059 \|" \
    "zb-h1, pp 2, 8 micro-batches .* 0.040 \|"; do
    grep -Eq "^\| $row" "$work/compute.txt" || fail "no compute row matching '$row'"
  done
  code=0
  "${mpirun[@]}" -np 2 "$build/examples/benchmarks/bench_pipeline" --mode fast \
    >/dev/null 2>"$work/err.txt" || code=$?
  [[ $code == 2 ]] || fail "--mode fast exited $code, expected 2"
  grep -q "mode fast: must be stage-cost or compute" "$work/err.txt" || fail "--mode not named"
  code=0
  "${mpirun[@]}" -np 2 "$build/examples/benchmarks/bench_pipeline" --schedules 1f1b,2f2b \
    >/dev/null 2>"$work/err.txt" || code=$?
  [[ $code == 2 ]] || fail "--schedules 2f2b exited $code, expected 2"
  grep -q "schedules 2f2b: pipeline schedule '2f2b': must be gpipe, 1f1b, interleaved or zb-h1" \
    "$work/err.txt" || fail "the message does not name the schedule"
  ;;
ops)
  "$build/examples/benchmarks/bench_ops" --repeats 1 --warmup 0 --batch 2 --block-size 16 \
    --n-embd 32 --n-head 2 --vocab 64 >"$work/out.txt"
  grep -Eq "^bench_ops: CPU: .+ \(avx512_bf16 (yes|no), amx_bf16 (yes|no)\)" "$work/out.txt" ||
    fail "no CPU line: $(head -1 "$work/out.txt")"
  rows=$(grep -Ec "^\| [a-z].* \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|$" \
    "$work/out.txt")
  [[ $rows == 18 ]] || fail "$rows op rows, expected 18"
  grep -q "^| whole transformer block (policy) |" "$work/out.txt" || fail "no block row"
  code=0
  "$build/examples/benchmarks/bench_ops" --n-embd 30 --n-head 4 >/dev/null 2>"$work/err.txt" ||
    code=$?
  [[ $code == 2 ]] || fail "--n-head 4 with --n-embd 30 exited $code, expected 2"
  grep -q "n-embd 30 must be divisible by --n-head 4" "$work/err.txt" || fail "not named"
  ;;
*)
  fail "unknown case (trace, strategies, pipeline, ops)"
  ;;
esac
echo "check_benchmarks $case_name: ok"
