#!/usr/bin/env python3
"""meshtrain against PyTorch on the same GPT, global batch and threads per rank, in one run:
PyTorch DDP (gloo backend) against train_gpt with dp = 2 ranks, and one PyTorch process
against train_gpt with dp = 1, each in fp32 and in bf16. Prints global tokens/s of each side,
meshtrain's ratio, and each side's bf16 speed-up over its fp32.

    bench_peer.py --build build --data data/fortunes_train.bin [--steps 40 --repeats 2]
        [--precisions fp32,bf16]

bf16: PyTorch runs its forward and loss under torch.autocast("cpu", dtype=torch.bfloat16)
(the way a PyTorch user trains in bf16 on a CPU: fp32 parameters, the optimizer in fp32);
train_gpt runs --precision bf16 (its mixed-precision policy, DESIGN section 3). The first line
printed names the CPU and whether it has native bf16 (machine.py): bf16 figures depend on it.

Both sides: the nanoGPT architecture (examples/gpt/nanogpt_check.py's model for PyTorch),
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0, mean token
cross-entropy, batches of --batch-size sequences of --block-size tokens of the same
llm.c token file, --threads torch threads per rank. Each side runs --warmup steps first.

Both sides are timed alike, by rank 0's wall clock from the end of the last warm-up step to
the end of the last measured step: everything each side does per step is inside (PyTorch:
building the batch, forward, backward, clipping, the optimizer step, reading the loss;
meshtrain: the same plus its data prefetch, the metrics line and the per-step stop
agreement), read from a wall-clock timestamp per step (train_gpt's metrics "time", the
PyTorch worker's own). tokens/s is the measured steps' tokens over that time, the best of
--repeats runs (the sides alternate, so a slow moment of the machine does not land on one
side only). A second column gives meshtrain's tokens/s from its metrics' step_ms (the sum of
the Trainer's own step times), for comparison with earlier figures.

Ranks start with mpirun and what meshrun adds (--allow-run-as-root as root, --oversubscribe,
--bind-to none), so it runs as root with no OpenMPI variables set; --mpirun replaces it.
Uses Debian's python3-torch (/usr/bin/python3).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import describe_cpu  # noqa: E402


def worker(a):
    """One PyTorch rank (under mpirun when ranks > 1); rank 0 writes tokens/s to a.out."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(HERE, "..", "gpt"))
    from nanogpt_check import GPT, load_tokens

    torch.set_num_threads(a.threads)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    torch.manual_seed(a.seed)
    model = GPT(a.vocab_size, a.block_size, a.n_layer, a.n_head, a.n_embd)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=rank,
                                world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    # Matrices decay, vectors do not (nanoGPT's and train_gpt's groups).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": a.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95))

    tokens = load_tokens(a.data)
    T, B = a.block_size, a.batch_size
    local = B // world
    samples = (tokens.numel() - 1) // T
    autocast = a.worker_precision == "bf16"
    ends = []  # wall-clock time at the end of each step
    for step in range(a.warmup + a.steps):
        first = step * B + rank * local
        rows = torch.stack([tokens[((first + i) % samples) * T:][: T + 1] for i in range(local)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits_loss = model(rows[:, :-1], rows[:, 1:])  # mean over the local tokens
        opt.zero_grad(set_to_none=True)
        logits_loss.backward()  # DDP averages the gradients over the ranks
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = logits_loss.item()  # what a training loop reports every step
        ends.append(time.time())
    if world > 1:
        dist.barrier()
    if rank == 0:
        seconds = ends[-1] - ends[a.warmup - 1]
        with open(a.out, "w") as f:
            json.dump({"tokens_per_s": a.steps * B * T / seconds, "loss": loss}, f)


def default_mpirun():
    """mpirun with what meshrun adds (launch/meshrun.cpp): --allow-run-as-root when run as root
    (OpenMPI refuses root otherwise), --oversubscribe (ranks may outnumber cores) and
    --bind-to none (the benchmarks set threads per rank themselves)."""
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return ["mpirun"] + root + ["--oversubscribe", "--bind-to", "none"]


def parse_mpirun(text):
    """--mpirun's value: the launcher and its options, or default_mpirun() when not given."""
    return text.split() if text else default_mpirun()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_gpt_arguments(p):
    """The GPT and batch flags shared with bench_strategies.py (train_gpt's defaults)."""
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=256)


def model_flags(a):
    """train_gpt's flags of the model in `a` (add_gpt_arguments)."""
    return ["--vocab-size", str(a.vocab_size), "--block-size", str(a.block_size), "--n-layer",
            str(a.n_layer), "--n-head", str(a.n_head), "--n-embd", str(a.n_embd)]


def run_pytorch(a, ranks, precision, work):
    out = os.path.join(work, "pytorch.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out,
           "--worker-precision", precision,
           "--port", str(free_port())] + [arg for arg in sys.argv[1:] if arg != "--worker"]
    if ranks > 1:
        cmd = a.mpirun + ["-np", str(ranks)] + cmd
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)["tokens_per_s"]


def run_meshtrain(a, ranks, precision, work):
    metrics = os.path.join(work, "meshtrain.jsonl")
    cmd = a.mpirun + ["-np", str(ranks), "-x", f"MESHTRAIN_THREADS={a.threads}",
                      os.path.join(a.build, "examples/gpt/train_gpt"), "--data", a.data,
                      "--val-data", "", "--shuffle=false", "--warmup", "1", "--steps",
                      str(a.warmup + a.steps), "--batch-size", str(a.batch_size), "--lr",
                      str(a.lr), "--weight-decay", str(a.weight_decay), "--seed", str(a.seed),
                      "--progress", "off", "--max-time", "0", "--precision", precision,
                      "--metrics", metrics] + model_flags(a)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    steps = [json.loads(line) for line in open(metrics) if '"val_loss"' not in line]
    measured = [s for s in steps if s["step"] > a.warmup]
    last_warmup = [s for s in steps if s["step"] == a.warmup][0]
    tokens = len(measured) * a.batch_size * a.block_size
    wall = measured[-1]["time"] - last_warmup["time"]
    step_ms = sum(s["step_ms"] for s in measured) / 1e3
    return tokens / wall, tokens / step_ms


def comparison(ranks, precision):
    """A row's name: the two sides and their precision."""
    peer = f"PyTorch DDP (gloo) vs train_gpt dp={ranks}" if ranks > 1 else \
        "1 process: PyTorch vs train_gpt dp=1"
    return peer + (", autocast bf16 vs --precision bf16" if precision == "bf16" else ", fp32")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default="build")
    p.add_argument("--data", default="data/fortunes_train.bin")
    p.add_argument("--steps", type=int, default=40, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the DDP / dp comparison")
    add_gpt_arguments(p)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--mpirun", help="the MPI launcher and its options (default: mpirun "
                   "[--allow-run-as-root as root] --oversubscribe --bind-to none)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated: fp32 and/or bf16 (PyTorch: autocast bf16)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.mpirun = parse_mpirun(a.mpirun)
    if a.worker:
        return worker(a)
    precisions = a.precisions.split(",")
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        sys.exit(f"--precisions {a.precisions}: must list fp32 and/or bf16, comma-separated")
    if not os.path.isfile(a.data):
        sys.exit(f"--data {a.data}: no such file (make it with prepare_text, docs/gpt.md)")
    if not os.path.isfile(os.path.join(a.build, "examples/gpt/train_gpt")):
        sys.exit(f"--build {a.build}: no examples/gpt/train_gpt there (scripts/build.sh)")
    if a.batch_size % a.ranks != 0:
        sys.exit(f"--batch-size {a.batch_size} must be divisible by --ranks {a.ranks}")
    if a.warmup < 1 or a.steps < 1:
        sys.exit(f"--warmup {a.warmup} and --steps {a.steps} must be >= 1 (the wall clock "
                 "starts at the end of the last warm-up step)")

    print(describe_cpu(), flush=True)
    rows = []  # (ranks, precision, PyTorch tokens/s, meshtrain by wall clock, by step_ms)
    with tempfile.TemporaryDirectory() as work:
        for ranks in (a.ranks, 1):
            for precision in precisions:
                torch_best = mesh_best = mesh_step_best = 0.0
                for _ in range(a.repeats):
                    torch_best = max(torch_best, run_pytorch(a, ranks, precision, work))
                    wall, step_ms = run_meshtrain(a, ranks, precision, work)
                    mesh_best = max(mesh_best, wall)
                    mesh_step_best = max(mesh_step_best, step_ms)
                rows.append((ranks, precision, torch_best, mesh_best, mesh_step_best))
                print(f"{comparison(ranks, precision)}: PyTorch {torch_best:,.0f} tokens/s, "
                      f"meshtrain {mesh_best:,.0f} tokens/s (by step_ms {mesh_step_best:,.0f})",
                      flush=True)
    print(f"\n{describe_cpu()}\nGPT L={a.n_layer} C={a.n_embd} heads={a.n_head} T={a.block_size} "
          f"V={a.vocab_size}, global batch {a.batch_size}, {a.threads} thread(s) per rank, "
          f"best of {a.repeats} x {a.steps} steps after {a.warmup}; both sides by wall clock\n")
    print("| comparison | PyTorch tokens/s | meshtrain tokens/s | meshtrain / PyTorch | "
          "meshtrain tokens/s by step_ms | by step_ms / PyTorch |")
    print("|---|---:|---:|---:|---:|---:|")
    for ranks, precision, t, m, ms in rows:
        print(f"| {comparison(ranks, precision)} | {t:,.0f} | {m:,.0f} | {m / t:.2f}x | {ms:,.0f} "
              f"| {ms / t:.2f}x |")
    by = {(r, p): (t, m) for r, p, t, m, _ in rows}
    if "fp32" in precisions and "bf16" in precisions:
        print("\n| ranks | PyTorch bf16 / fp32 | meshtrain bf16 / fp32 |")
        print("|---:|---:|---:|")
        for ranks in (a.ranks, 1):
            (t32, m32), (t16, m16) = by[(ranks, "fp32")], by[(ranks, "bf16")]
            print(f"| {ranks} | {t16 / t32:.2f}x | {m16 / m32:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
