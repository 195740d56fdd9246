#!/usr/bin/env python3
"""Sharded start-up against building the whole model on every rank: per-rank memory.

For each layout it runs bench_startup (a GPT declared and laid out, or with --whole built
whole on every rank first, then a few training steps) on real mpirun ranks, once with the
model and once with the same model cut to one layer, and prints per rank:
  RSS above 1 layer   peak RSS (ru_maxrss) minus the one-layer run's on the same rank: the
                      memory the model's size costs, from process start to the last step
  x model             that, as a multiple of the whole model's fp32 bytes
  tensor peak         the counting allocator's peak since process start (x model likewise)
  at start-up         the same two at the end of parallelize (before the first step)
  start-up s          construction + parallelize on the rank
Then one summary row per layout and construction (the worst rank).

  bench_startup.py --build build --data data/fortunes_train.bin              the 75.8M model
  bench_startup.py --build build --data ... --n-layer 4 --n-embd 128 --ranks 2 --layouts zero3
  bench_startup.py ... --init big.safetensors --init-base one_layer.safetensors   also --init

Memory does not depend on speed: the figures hold on a busy or oversubscribed machine.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peer import parse_mpirun  # noqa: E402
from machine import describe_cpu  # noqa: E402

LAYOUTS = {
    "zero3": ["--zero", "3"],
    "tp2 zero3": ["--tp", "2", "--zero", "3"],
    "tp2 zero1": ["--tp", "2", "--zero", "1"],
    "zero3 full": ["--zero", "3", "--recompute", "full"],
}

MIB = 1 << 20


def run(a, layout, n_layer, whole, init=""):
    cmd = parse_mpirun(a.mpirun) + ["-np", str(a.ranks), os.path.join(
        a.build, "examples", "benchmarks", "bench_startup"),
        "--n-layer", str(n_layer), "--n-embd", str(a.n_embd), "--n-head", str(a.n_head),
        "--block-size", str(a.block_size), "--steps", str(a.steps), "--data", a.data] + \
        LAYOUTS[layout] + (["--whole"] if whole else []) + (["--init", init] if init else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="build")
    p.add_argument("--data", default="data/fortunes_train.bin")
    p.add_argument("--mpirun", default="", help="the launcher and its options")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layouts", default="zero3,tp2 zero3",
                   help="comma-separated, of: " + ", ".join(LAYOUTS))
    p.add_argument("--constructions", default="declared,whole",
                   help="declared (sharded start-up), whole (every rank builds the model)")
    p.add_argument("--init", default="",
                   help="a safetensors file of the model (and one of the 1-layer model, "
                        "--init-base): every construction also starts from it")
    p.add_argument("--init-base", default="", help="the 1-layer model's file, for --init")
    a = p.parse_args()
    print(describe_cpu())
    print(f"bench_startup: GPT {a.n_layer} layers, C {a.n_embd}, {a.n_head} heads, T "
          f"{a.block_size}; {a.ranks} ranks; {a.steps} training steps\n")
    summary = []
    runs = [(c, "") for c in a.constructions.split(",")]
    if a.init:
        runs += [(c + " --init", a.init) for c in a.constructions.split(",")]
    for layout in a.layouts.split(","):
        for construction, init in runs:
            whole = construction.startswith("whole")
            big = run(a, layout, a.n_layer, whole, init)
            base = run(a, layout, 1, whole, a.init_base if init else "")
            model = big[0]["model_bytes"]
            print(f"### {layout}, {construction} (model {model / MIB:.1f} MiB fp32)\n")
            print("| rank | peak RSS MiB | 1 layer MiB | RSS above 1 layer MiB | x model | "
                  "tensor peak MiB | x model | at start-up: RSS above 1 layer x model | "
                  "tensor peak x model | start-up s |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            worst = [0.0] * 5
            for b, s in zip(big, base):
                above = b["peak_rss_bytes"] - s["peak_rss_bytes"]
                above_startup = b["startup_rss_bytes"] - s["startup_rss_bytes"]
                row = [above / model, b["tensor_peak_bytes"] / model, above_startup / model,
                       b["startup_tensor_bytes"] / model, b["startup_s"]]
                print(f"| {b['rank']} | {b['peak_rss_bytes'] / MIB:.0f} | "
                      f"{s['peak_rss_bytes'] / MIB:.0f} | {above / MIB:.0f} | {row[0]:.2f} | "
                      f"{b['tensor_peak_bytes'] / MIB:.0f} | {row[1]:.2f} | {row[2]:.2f} | "
                      f"{row[3]:.2f} | {row[4]:.2f} |")
                worst = [max(w, r) for w, r in zip(worst, row)]
            print()
            summary.append((layout, construction, worst))
    print("### worst rank (x the model's fp32 bytes; start-up s: the slowest rank)\n")
    print("| layout | construction | RSS above 1 layer | tensor peak | at start-up: RSS above "
          "1 layer | tensor peak | start-up s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for layout, construction, w in summary:
        print(f"| {layout} | {construction} | {w[0]:.2f} | {w[1]:.2f} | {w[2]:.2f} | {w[3]:.2f} | "
              f"{w[4]:.2f} |")


if __name__ == "__main__":
    main()
