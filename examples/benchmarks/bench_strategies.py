#!/usr/bin/env python3
"""Parallel strategies of the GPT side by side: speed, step split, memory, communication.

Runs train_gpt over a matrix of layouts on 2 and 4 real mpirun ranks (dp, tp, dp x tp, ZeRO
0/1/2/3, sequence parallel, recompute none/selective/full, fp32/bf16, micro-batches with
accumulation, context parallelism cp 2/4 with ring attention), a few steps each after warm-up, in --repeats passes over the matrix of which
each layout keeps its fastest (a slow moment of a shared machine then hits no layout alone),
and writes into --out:

  results.md    the table (also printed)
  results.csv   the same rows, machine-readable: keep one as a baseline for --compare
  throughput.png, step_split.png, memory.png, comm.png   the charts (python3-matplotlib)

Per layout (figures of rank 0, whose metrics train_gpt writes; the layouts here are
symmetric, so every rank's figures are alike): tokens/s over the measured steps; the mean
step split into forward, backward, optimizer (compute only) and exposed communication (the
training thread blocked in a collective), from the Trainer's metrics; the tracker's peak
live tensor bytes beside meshtrain-plan's estimate (docs/memory.md: Korthikanti et al.'s
activation terms plus the state); the bytes of collectives per step (train_gpt --count-comm) beside the
theoretical volume of comm_theory.py, key by key ("dp all_reduce", "tp all_gather", ...).

  bench_strategies.py --build build --data data/fortunes_train.bin            all layouts
  bench_strategies.py --quick                                                 < 5 min, 2 cores
  bench_strategies.py --quick --compare old/results.csv                       regressions
  bench_strategies.py --rows new/results.csv --compare old/results.csv        two kept runs

--compare BASELINE.csv prints, per layout found in both, the ratios of tokens/s and peak
bytes, flags a layout more than --tolerance (10%) slower or heavier, and exits 1 if any is.
--rows RESULTS.csv compares a kept results.csv instead of running anything.
The run exits 2 if measured communication differs from theory by more than --comm-tolerance
(5%) on any key. Uses Debian's python3-matplotlib (/usr/bin/python3).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comm_theory  # noqa: E402
from bench_peer import add_gpt_arguments, model_flags, parse_mpirun  # noqa: E402
from machine import describe_cpu  # noqa: E402

# (name, ranks, train_gpt flags). dp = ranks / (cp x tp).
LAYOUTS = [
    ("dp2", 2, []),
    ("tp2", 2, ["--tp", "2"]),
    ("tp2 sp", 2, ["--tp", "2", "--sequence-parallel"]),
    ("dp2 zero1", 2, ["--zero", "1"]),
    ("dp2 zero2", 2, ["--zero", "2"]),
    ("dp2 selective", 2, ["--recompute", "selective"]),
    ("dp2 full", 2, ["--recompute", "full"]),
    ("dp2 bf16", 2, ["--precision", "bf16"]),
    ("dp2 micro-batch 2", 2, ["--micro-batch-size", "2"]),
    ("tp2 sp full bf16", 2, ["--tp", "2", "--sequence-parallel", "--recompute", "full",
                             "--precision", "bf16"]),
    ("dp4", 4, []),
    ("tp4", 4, ["--tp", "4"]),
    ("dp2 tp2", 4, ["--tp", "2"]),
    ("dp2 tp2 sp", 4, ["--tp", "2", "--sequence-parallel"]),
    ("dp4 zero1", 4, ["--zero", "1"]),
    ("dp4 zero2", 4, ["--zero", "2"]),
    ("dp2 tp2 zero2 sp", 4, ["--tp", "2", "--zero", "2", "--sequence-parallel"]),
    ("dp2 zero3", 2, ["--zero", "3"]),
    ("dp2 zero3 no reshard", 2, ["--zero", "3", "--reshard-after-forward=false"]),
    ("dp2 zero3 prefetch 0", 2, ["--zero", "3", "--prefetch", "0"]),
    ("dp2 zero3 prefetch 2", 2, ["--zero", "3", "--prefetch", "2"]),
    ("dp4 zero3", 4, ["--zero", "3"]),
    ("dp2 tp2 zero3 sp", 4, ["--tp", "2", "--zero", "3", "--sequence-parallel"]),
    ("dp2 tp2 selective", 4, ["--tp", "2", "--recompute", "selective"]),
    ("dp4 bf16 micro-batch 2", 4, ["--precision", "bf16", "--micro-batch-size", "2"]),
    ("cp2", 2, ["--cp", "2"]),
    ("cp2 selective", 2, ["--cp", "2", "--recompute", "selective"]),
    ("cp4", 4, ["--cp", "4"]),
    ("cp2 tp2 sp", 4, ["--cp", "2", "--tp", "2", "--sequence-parallel"]),
    ("dp2 cp2 zero1", 4, ["--cp", "2", "--zero", "1"]),
]
QUICK = ["dp2", "tp2 sp", "dp2 zero2", "dp2 zero3", "dp2 full", "dp2 bf16", "dp2 micro-batch 2",
         "dp2 tp2", "dp4 zero1", "cp2"]

CSV_FIELDS = ["layout", "ranks", "dp", "cp", "tp", "tokens_per_s", "step_ms", "forward_ms",
              "backward_ms", "optimizer_ms", "comm_ms", "other_ms", "peak_bytes",
              "planned_bytes", "comm_bytes", "theory_bytes", "comm_error_pct", "flags"]


def flag_value(flags, name, default):
    return flags[flags.index(name) + 1] if name in flags else default


def theory(a, ranks, flags):
    tp = int(flag_value(flags, "--tp", "1"))
    cp = int(flag_value(flags, "--cp", "1"))
    dp = ranks // (tp * cp)
    micro = int(flag_value(flags, "--micro-batch-size", "0")) or a.batch_size // dp
    return comm_theory.theory_bytes(
        vocab_size=a.vocab_size, block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head,
        n_embd=a.n_embd, batch_size=a.batch_size, micro_batch_size=micro, dp=dp, tp=tp,
        zero=int(flag_value(flags, "--zero", "0")),
        sequence_parallel="--sequence-parallel" in flags,
        recompute=flag_value(flags, "--recompute", "none"),
        bf16=flag_value(flags, "--precision", "fp32") == "bf16", cp=cp,
        reshard_after_forward="--reshard-after-forward=false" not in flags)


def plan(a, ranks, flags):
    """meshtrain-plan's estimate of the layout's peak tensor bytes per rank (docs/memory.md:
    Korthikanti et al.'s activation terms plus parameters, gradients and optimizer state)."""
    dims = int(flag_value(flags, "--tp", "1")) * int(flag_value(flags, "--cp", "1"))
    cmd = ([os.path.join(a.build, "launch/meshtrain-plan"), "--json", "--batch-size",
            str(a.batch_size), "--dp", str(ranks // dims)] + model_flags(a) + flags)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit("meshtrain-plan failed:\n" + " ".join(cmd) + "\n" + done.stderr)
    return json.loads(done.stdout)["peak"]


def run_layout(a, name, ranks, flags, work):
    """Rank 0's metrics of the measured steps (after --warmup)."""
    metrics = os.path.join(work, name.replace(" ", "_") + ".jsonl")
    cmd = (a.mpirun + ["-np", str(ranks), "-x", f"MESHTRAIN_THREADS={a.threads}",
                       os.path.join(a.build, "examples/gpt/train_gpt"), "--data", a.data,
                       "--val-data", "", "--shuffle=false", "--steps", str(a.warmup + a.steps),
                       "--warmup", "1", "--batch-size", str(a.batch_size), "--progress", "off",
                       "--max-time", "0", "--count-comm", "--metrics", metrics]
           + model_flags(a) + flags)  # --warmup here is the learning-rate warmup
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"layout {name}: train_gpt failed (exit {done.returncode}):\n"
                 + " ".join(cmd) + "\n" + done.stdout[-2000:] + done.stderr[-2000:])
    steps = [json.loads(line) for line in open(metrics) if '"val_loss"' not in line]
    return [s for s in steps if s["step"] > a.warmup]


def summarize(a, name, ranks, flags, steps):
    tp = int(flag_value(flags, "--tp", "1"))
    cp = int(flag_value(flags, "--cp", "1"))
    n = len(steps)
    mean = lambda key: sum(s[key] for s in steps) / n  # noqa: E731
    row = {"layout": name, "ranks": ranks, "dp": ranks // (tp * cp), "cp": cp, "tp": tp,
           "flags": " ".join(flags)}
    row["step_ms"] = mean("step_ms")
    row["tokens_per_s"] = n * a.batch_size * a.block_size / (sum(s["step_ms"] for s in steps) / 1e3)
    for key in ("forward_ms", "backward_ms", "optimizer_ms", "comm_ms"):
        row[key] = mean(key)
    row["other_ms"] = row["step_ms"] - sum(row[k] for k in ("forward_ms", "backward_ms",
                                                             "optimizer_ms", "comm_ms"))
    row["peak_bytes"] = max(s["mem_tensor_peak_bytes"] for s in steps)
    row["planned_bytes"] = plan(a, ranks, flags)
    # Every step moves the same bytes; a step that did not is a finding of its own.
    measured = steps[-1].get("comm_bytes", {})
    if any(s.get("comm_bytes", {}) != measured for s in steps):
        print(f"warning: {name}: the steps moved different bytes", file=sys.stderr)
    expected = theory(a, ranks, flags)
    row["comm_bytes"] = sum(measured.values())
    row["theory_bytes"] = sum(expected.values())
    # The worst key: a missing or extra collective counts as a 100% error.
    errors = []
    for key in sorted(set(measured) | set(expected)):
        m, t = measured.get(key, 0), expected.get(key, 0)
        errors.append((abs(m - t) / t * 100 if t else (0.0 if m == 0 else 100.0), key, m, t))
    row["comm_error_pct"] = max(errors)[0] if errors else 0.0
    row["comm_detail"] = errors
    return row


def mib(b):
    return b / (1024 * 1024)


def planned_error(row):
    return (row["planned_bytes"] - row["peak_bytes"]) / row["peak_bytes"] * 100


def markdown(a, rows, seconds):
    lines = [describe_cpu(), f"GPT L={a.n_layer} C={a.n_embd} heads={a.n_head} T={a.block_size} "
             f"V={a.vocab_size}, global batch {a.batch_size}, {a.threads} thread(s) per rank, "
             f"mean of {a.steps} steps after {a.warmup}, best of {a.repeats} pass(es); "
             f"{seconds:.0f} s in all", "",
             "| layout | ranks | tokens/s | step ms | forward | backward | optimizer | "
             "exposed comm | other | peak MiB/rank | planned MiB | comm MiB/step | theory MiB | "
             "max key error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['ranks']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | "
            f"{r['comm_ms']:.1f} ({r['comm_ms'] / r['step_ms'] * 100:.0f}%) | "
            f"{r['other_ms']:.1f} | {mib(r['peak_bytes']):.1f} | "
            f"{mib(r['planned_bytes']):.1f} ({planned_error(r):+.0f}%) | "
            f"{mib(r['comm_bytes']):.3f} | "
            f"{mib(r['theory_bytes']):.3f} | {r['comm_error_pct']:.2f}% |")
    lines += ["", "Communication per step by key (measured / theory, bytes):", ""]
    for r in rows:
        detail = ", ".join(f"{key} {m:,}/{t:,}" for _, key, m, t in r["comm_detail"])
        lines.append(f"- {r['layout']}: {detail or 'none'}")
    return "\n".join(lines) + "\n"


def charts(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in rows]
    x = range(len(rows))

    def bar_chart(path, title, ylabel, series, labels=None):
        fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 5))
        bottom = [0.0] * len(rows)
        width = 0.8 / (1 if series[0][2] == "stack" else len(series))
        for i, (label, values, mode) in enumerate(series):
            if mode == "stack":
                ax.bar(x, values, 0.8, bottom=bottom, label=label)
                bottom = [b + v for b, v in zip(bottom, values)]
            else:
                ax.bar([p + (i - (len(series) - 1) / 2) * width for p in x], values, width,
                       label=label)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if labels:
            top = max(bottom) if series[0][2] == "stack" else 0
            for p, text in zip(x, labels):
                ax.text(p, top * 1.01, text, ha="center", va="bottom", fontsize=8)
            ax.set_ylim(0, top * 1.08)
        if len(series) > 1:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, path), dpi=100)
        plt.close(fig)

    bar_chart("throughput.png", "Throughput", "tokens/s",
              [("tokens/s", [r["tokens_per_s"] for r in rows], "side")])
    # Shares of the step, so that a slow layout (bf16 on CPU) does not flatten the others;
    # the step time itself is written above each bar.
    bar_chart("step_split.png", "Where a step goes (rank 0, mean; step ms above)",
                   "% of the step",
                   [(k.replace("_ms", "").replace("comm", "exposed comm"),
                     [max(r[k], 0.0) / r["step_ms"] * 100 for r in rows], "stack")
                    for k in ("forward_ms", "backward_ms", "optimizer_ms", "comm_ms",
                              "other_ms")],
                   labels=[f"{r['step_ms']:.0f}" for r in rows])
    bar_chart("memory.png", "Peak live tensor bytes per rank", "MiB",
              [("measured (tracker)", [mib(r["peak_bytes"]) for r in rows], "side"),
               ("planned (meshtrain-plan)", [mib(r["planned_bytes"]) for r in rows], "side")])
    bar_chart("comm.png", "Communication per step per rank", "MiB",
              [("measured", [mib(r["comm_bytes"]) for r in rows], "side"),
               ("theory", [mib(r["theory_bytes"]) for r in rows], "side")])


def compare(rows, baseline_path, tolerance):
    """Per-layout ratios against a kept results.csv; True when some layout regressed."""
    with open(baseline_path, newline="") as f:
        base = {r["layout"]: r for r in csv.DictReader(f)}
    print(f"\nagainst {baseline_path} (flagged: more than {tolerance:.0f}% slower or heavier)\n")
    print("| layout | tokens/s now / then | peak bytes now / then | verdict |")
    print("|---|---:|---:|---|")
    regressed = False
    for r in rows:
        b = base.get(r["layout"])
        if b is None:
            print(f"| {r['layout']} | — | — | not in the baseline |")
            continue
        speed = r["tokens_per_s"] / float(b["tokens_per_s"])
        memory = r["peak_bytes"] / float(b["peak_bytes"])
        flags = []
        if speed < 1 - tolerance / 100:
            flags.append("SLOWER")
        if memory > 1 + tolerance / 100:
            flags.append("HEAVIER")
        regressed = regressed or bool(flags)
        print(f"| {r['layout']} | {speed:.2f}x | {memory:.2f}x | {' '.join(flags) or 'ok'} |")
    return regressed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default="build")
    p.add_argument("--data", default="data/fortunes_train.bin")
    p.add_argument("--out", default="bench-strategies", help="folder of the results and charts")
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK)} layouts, fewer steps")
    p.add_argument("--layouts", help="comma-separated layout names (default: all, or --quick's)")
    p.add_argument("--steps", type=int, help="measured steps per layout (default 15; quick 6)")
    p.add_argument("--warmup", type=int, help="steps before measuring (default 3; quick 2)")
    p.add_argument("--repeats", type=int,
                   help="passes over the layouts; each keeps its fastest (default 2; quick 1)")
    add_gpt_arguments(p)
    p.add_argument("--compare", metavar="BASELINE.csv", help="a results.csv of an earlier run")
    p.add_argument("--rows", metavar="RESULTS.csv",
                   help="with --compare: compare this kept results.csv instead of running")
    p.add_argument("--tolerance", type=float, default=10, help="percent, for --compare")
    p.add_argument("--comm-tolerance", type=float, default=5,
                   help="percent: measured communication against theory")
    p.add_argument("--mpirun", help="the MPI launcher and its options (default: mpirun "
                   "[--allow-run-as-root as root] --oversubscribe --bind-to none)")
    a = p.parse_args()
    a.mpirun = parse_mpirun(a.mpirun)
    if a.rows:
        if not a.compare:
            sys.exit("--rows needs --compare BASELINE.csv")
        for path, flag in ((a.rows, "--rows"), (a.compare, "--compare")):
            if not os.path.isfile(path):
                sys.exit(f"{flag} {path}: no such file (a results.csv of an earlier run)")
        with open(a.rows, newline="") as f:
            rows = [dict(r, tokens_per_s=float(r["tokens_per_s"]),
                         peak_bytes=float(r["peak_bytes"])) for r in csv.DictReader(f)]
        return 1 if compare(rows, a.compare, a.tolerance) else 0
    a.steps = a.steps or (6 if a.quick else 15)
    a.warmup = a.warmup or (2 if a.quick else 3)
    a.repeats = a.repeats or (1 if a.quick else 2)
    names = {n for n, _, _ in LAYOUTS}
    chosen = (a.layouts.split(",") if a.layouts
              else QUICK if a.quick else [n for n, _, _ in LAYOUTS])
    unknown = [n for n in chosen if n not in names]
    if unknown:
        sys.exit(f"--layouts: unknown {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if not os.path.isfile(a.data):
        sys.exit(f"--data {a.data}: no such file (make it with prepare_text, docs/gpt.md)")
    if not os.path.isfile(os.path.join(a.build, "examples/gpt/train_gpt")):
        sys.exit(f"--build {a.build}: no examples/gpt/train_gpt there (scripts/build.sh)")
    if a.compare and not os.path.isfile(a.compare):
        sys.exit(f"--compare {a.compare}: no such file (a results.csv of an earlier run)")
    os.makedirs(a.out, exist_ok=True)

    # Each pass runs every layout once; a layout keeps its fastest pass, so that a slow moment
    # of the machine does not land on one layout only.
    best = {}
    begin = time.time()
    runs = [(name, ranks, flags) for name, ranks, flags in LAYOUTS if name in chosen]
    with tempfile.TemporaryDirectory() as work:
        for rep in range(a.repeats):
            for i, (name, ranks, flags) in enumerate(runs):
                print(f"[pass {rep + 1}/{a.repeats}, {i + 1}/{len(runs)}] {name}: {ranks} ranks "
                      f"{' '.join(flags)}", flush=True)
                row = summarize(a, name, ranks, flags, run_layout(a, name, ranks, flags, work))
                if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = row
    rows = [best[name] for name, _, _ in runs]
    seconds = time.time() - begin

    table = markdown(a, rows, seconds)
    print("\n" + table)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    charts(rows, a.out)
    print(f"wrote {a.out}/results.md, results.csv, throughput.png, step_split.png, memory.png, "
          f"comm.png ({seconds:.0f} s)")

    code = 0
    off = [r for r in rows if r["comm_error_pct"] > a.comm_tolerance]
    if off:
        print(f"communication off theory by more than {a.comm_tolerance}%: "
              + ", ".join(f"{r['layout']} ({r['comm_error_pct']:.1f}%)" for r in off))
        code = 2
    if a.compare and compare(rows, a.compare, a.tolerance):
        code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
