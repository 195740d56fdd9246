#!/usr/bin/env python3
"""The memory planner (meshtrain-plan) against the allocation tracker's measured peaks.

For each layout it runs train_gpt for a few steps on real mpirun ranks (the counting
allocator is installed there; rank 0 writes mem_state_bytes, mem_activation_peak_bytes and
mem_tensor_peak_bytes to its metrics) and asks meshtrain-plan --json for the same layout,
then prints one Markdown table row: measured, planned and the error of the state, the
activation peak and the total peak (the largest step after the first). A pipeline layout
(--pp) gives one row per pp rank ("s0", "s1", ...): rank 0's metrics carry every stage's
figures (mem_stage_*), and meshtrain-plan --json every stage's estimate ("stages").

  bench_memory_plan.py --build build --data data/fortunes_train.bin            all layouts
  bench_memory_plan.py --build build --data ... --quick --max-error 15         CTest's check
  bench_memory_plan.py --build build --data ... --match cp                     the cp rows
  bench_memory_plan.py --build build --data ... --match pp                     the pipelines

--max-error P: exit 1 when an activation or total peak is off by more than P percent.
Memory does not depend on speed, so figures are the same on a busy or oversubscribed machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peer import parse_mpirun  # noqa: E402
from machine import describe_cpu  # noqa: E402

SMALL = ["--n-layer", "4", "--n-embd", "128", "--n-head", "4", "--block-size", "64"]
DEEP = ["--n-layer", "8", "--n-embd", "128", "--n-head", "8", "--block-size", "128"]
LONG = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--block-size", "1024"]

# (name, ranks, model flags, layout flags shared by train_gpt and meshtrain-plan)
LAYOUTS = [
    ("dp1", 1, SMALL, []),
    ("dp2", 2, SMALL, ["--dp", "2"]),
    ("dp2 zero1", 2, SMALL, ["--dp", "2", "--zero", "1"]),
    ("dp2 zero2", 2, SMALL, ["--dp", "2", "--zero", "2"]),
    ("tp2", 2, SMALL, ["--tp", "2"]),
    ("tp2 sp", 2, SMALL, ["--tp", "2", "--sequence-parallel"]),
    ("dp2 tp2 zero1 sp", 4, SMALL, ["--dp", "2", "--tp", "2", "--zero", "1", "--sequence-parallel"]),
    ("dp2 selective", 2, SMALL, ["--dp", "2", "--recompute", "selective"]),
    ("dp2 full", 2, SMALL, ["--dp", "2", "--recompute", "full"]),
    ("dp2 bf16", 2, SMALL, ["--dp", "2", "--precision", "bf16"]),
    ("tp2 sp bf16", 2, SMALL, ["--tp", "2", "--sequence-parallel", "--precision", "bf16"]),
    ("dp2 zero2 bf16", 2, SMALL, ["--dp", "2", "--zero", "2", "--precision", "bf16"]),
    ("dp2 full bf16", 2, SMALL, ["--dp", "2", "--recompute", "full", "--precision", "bf16"]),
    # ZeRO-3: parameter shards, the gathered units in flight, the per-unit gradient staging.
    ("dp2 zero3", 2, SMALL, ["--dp", "2", "--zero", "3"]),
    ("dp4 zero3", 4, SMALL, ["--dp", "4", "--zero", "3"]),
    ("dp2 zero3 full", 2, SMALL, ["--dp", "2", "--zero", "3", "--recompute", "full"]),
    ("dp2 zero3 no reshard", 2, SMALL, ["--dp", "2", "--zero", "3",
                                        "--reshard-after-forward=false"]),
    ("dp2 tp2 zero3 sp", 4, SMALL, ["--dp", "2", "--tp", "2", "--zero", "3",
                                    "--sequence-parallel"]),
    ("dp1 micro-batch 4", 1, SMALL, ["--micro-batch-size", "4"]),
    # Two micro-steps of 2 sequences: the optimizer step's temporaries are the peak here.
    ("dp4 bf16 micro-batch 2", 4, SMALL, ["--dp", "4", "--precision", "bf16",
                                          "--micro-batch-size", "2"]),
    ("tp2 dropout 0.1", 2, SMALL + ["--dropout", "0.1"], ["--tp", "2"]),
    ("L8 T128 dp1", 1, DEEP, []),
    ("L8 T128 dp1 selective", 1, DEEP, ["--recompute", "selective"]),
    ("L8 T128 dp1 full", 1, DEEP, ["--recompute", "full"]),
    ("L8 T128 tp2 sp full", 2, DEEP, ["--tp", "2", "--sequence-parallel", "--recompute", "full"]),
    # Context parallelism: ring attention keeps no [T, T] scores; its blocks in flight.
    ("L8 T128 cp2", 2, DEEP, ["--cp", "2"]),
    ("L8 T128 cp4", 4, DEEP, ["--cp", "4"]),
    ("L8 T128 cp2 tp2 sp selective", 4, DEEP, ["--cp", "2", "--tp", "2", "--sequence-parallel",
                                             "--recompute", "selective"]),
    # The activation peak of a long sequence at cp 4 against cp 1 (docs/context-parallel.md).
    ("T1024 cp1", 1, LONG, []),
    ("T1024 cp4", 4, LONG, ["--cp", "4"]),
]
PIPE = ["--micro-batch-size", "4"]  # 4 micro-batches of the global batch 16 per step
LAYOUTS += [
    # Pipelines: each stage's blocks, the parameters outside the blocks on the first and the
    # last stage, the micro-batches in flight per the schedule (docs/memory.md).
    ("pp2 1f1b", 2, SMALL, ["--pp", "2"] + PIPE),
    ("pp2 gpipe", 2, SMALL, ["--pp", "2", "--pp-schedule", "gpipe"] + PIPE),
    ("pp2 interleaved v2", 2, SMALL, ["--pp", "2", "--pp-schedule", "interleaved",
                                      "--virtual-stages", "2"] + PIPE),
    ("pp2 zb-h1", 2, SMALL, ["--pp", "2", "--pp-schedule", "zb-h1"] + PIPE),
    ("pp2 dp2 1f1b zero1", 4, SMALL, ["--dp", "2", "--pp", "2", "--zero", "1",
                                      "--micro-batch-size", "2"]),
    ("pp4 1f1b", 4, SMALL, ["--pp", "4", "--micro-batch-size", "2"]),
    ("pp2 1f1b full", 2, SMALL, ["--pp", "2", "--recompute", "full"] + PIPE),
    ("pp2 1f1b bf16", 2, SMALL, ["--pp", "2", "--precision", "bf16"] + PIPE),
    ("pp2 tp2 sp gpipe", 4, SMALL, ["--pp", "2", "--tp", "2", "--sequence-parallel",
                                    "--pp-schedule", "gpipe"] + PIPE),
    ("L8 T128 pp2 1f1b 8 micro-batches", 2, DEEP, ["--pp", "2", "--micro-batch-size", "2"]),
]
QUICK = {"dp2 zero1", "dp2 zero2", "tp2 sp", "dp2 full", "dp2 bf16", "tp2 dropout 0.1",
         "dp4 bf16 micro-batch 2", "L8 T128 cp2", "pp2 1f1b", "pp2 zb-h1"}
KEYS = ("mem_state_bytes", "mem_activation_peak_bytes", "mem_tensor_peak_bytes")


def measure(args, ranks, model, layout, work):
    """Rank 0's figures of the largest step after the first; under a pipeline, a list of every
    pp rank's."""
    metrics = os.path.join(work, "metrics.jsonl")
    # train_gpt infers dp = ranks / tp; --dp is the planner's flag only.
    flags = [f for i, f in enumerate(layout) if f != "--dp" and (i == 0 or layout[i - 1] != "--dp")]
    cmd = args.mpirun + ["-np", str(ranks), "-x", "MESHTRAIN_THREADS=1",
                         os.path.join(args.build, "examples/gpt/train_gpt"),
                         "--data", args.data, "--val-data", "", "--steps", "3", "--warmup", "1",
                         "--batch-size", "16", "--progress", "off", "--max-time", "0",
                         "--metrics", metrics] + model + flags
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit("train_gpt failed:\n" + " ".join(cmd) + "\n" + done.stdout + done.stderr)
    steps = [json.loads(line) for line in open(metrics) if '"val_loss"' not in line]
    later = [s for s in steps if s["step"] >= 2]
    if "mem_stage_tensor_peak_bytes" in later[0]:
        stages = len(later[0]["mem_stage_tensor_peak_bytes"])
        return [{k: max(s[k.replace("mem_", "mem_stage_")][r] for s in later) for k in KEYS}
                for r in range(stages)]
    return {k: max(s[k] for s in later) for k in KEYS}


def plan(args, model, layout):
    cmd = [os.path.join(args.build, "launch/meshtrain-plan"), "--json", "--batch-size", "16"]
    done = subprocess.run(cmd + model + layout, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit("meshtrain-plan failed:\n" + " ".join(cmd + model + layout) + "\n" + done.stderr)
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build", help="the build directory")
    parser.add_argument("--data", default="data/fortunes_train.bin", help="training token file")
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} layouts")
    parser.add_argument("--match", default="",
                        help="only layouts whose name contains this text (e.g. cp)")
    parser.add_argument("--max-error", type=float, default=0,
                        help="exit 1 if an activation or total peak is off by more (percent)")
    parser.add_argument("--mpirun", help="the MPI launcher and its options (default: mpirun "
                        "[--allow-run-as-root as root] --oversubscribe --bind-to none)")
    args = parser.parse_args()
    args.mpirun = parse_mpirun(args.mpirun)
    if not os.path.isfile(args.data):
        sys.exit(f"--data {args.data}: no such file (make it with prepare_text, docs/gpt.md)")

    mib = lambda b: f"{b / 2**20:.2f}"
    err = lambda planned, measured: 100.0 * (planned - measured) / measured
    print(describe_cpu())
    print("| layout | ranks | state MiB measured / planned | activations MiB measured / "
          "planned (error) | peak MiB measured / planned (error) |")
    print("|---|---|---|---|---|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as work:
        for name, ranks, model, layout in LAYOUTS:
            if (args.quick and name not in QUICK) or args.match not in name:
                continue
            measured = measure(args, ranks, model, layout, work)
            planned = plan(args, model, layout)
            rows = [(name, measured, planned)]
            if "stages" in planned and not isinstance(measured, list):
                sys.exit(f"{name}: train_gpt's metrics have no per-stage figures "
                         "(mem_stage_tensor_peak_bytes)")
            if isinstance(measured, list):  # a pipeline: one row per pp rank
                if len(measured) != len(planned["stages"]):
                    sys.exit(f"{name}: {len(measured)} stages measured, "
                             f"{len(planned['stages'])} planned")
                rows = [(f"{name} s{r}", m, p)
                        for r, (m, p) in enumerate(zip(measured, planned["stages"]))]
            for row, m, p in rows:
                act = err(p["activation_peak"], m["mem_activation_peak_bytes"])
                peak = err(p["peak"], m["mem_tensor_peak_bytes"])
                worst = max(worst, abs(act), abs(peak))
                print(f"| {row} | {ranks} | {mib(m['mem_state_bytes'])} / {mib(p['state'])} "
                      f"| {mib(m['mem_activation_peak_bytes'])} / {mib(p['activation_peak'])} "
                      f"({act:+.1f}%) | {mib(m['mem_tensor_peak_bytes'])} / {mib(p['peak'])} "
                      f"({peak:+.1f}%) |", flush=True)
    print(f"\nlargest error: {worst:.1f}%")
    if args.max_error > 0 and worst > args.max_error:
        print(f"FAIL: an estimate is off by {worst:.1f}% > {args.max_error}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
