#!/usr/bin/env python3
"""meshtrain against PyTorch on the same GPT, global batch and threads per rank, in one run:
PyTorch DDP (gloo backend) against train_gpt with dp = 2 ranks, and one PyTorch process
against train_gpt with dp = 1. Prints global tokens/s of each side and meshtrain's ratio.

    bench_peer.py --build build --data data/fortunes_train.bin [--steps 40 --repeats 2]

Both sides: the nanoGPT architecture (examples/gpt/nanogpt_check.py's model for PyTorch),
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0, mean token
cross-entropy, fp32, batches of --batch-size sequences of --block-size tokens of the same
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
    ends = []  # wall-clock time at the end of each step
    for step in range(a.warmup + a.steps):
        first = step * B + rank * local
        rows = torch.stack([tokens[((first + i) % samples) * T:][: T + 1] for i in range(local)])
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


def run_pytorch(a, ranks, work):
    out = os.path.join(work, "pytorch.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out,
           "--port", str(free_port())] + [arg for arg in sys.argv[1:] if arg != "--worker"]
    if ranks > 1:
        cmd = a.mpirun + ["-np", str(ranks)] + cmd
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)["tokens_per_s"]


def run_meshtrain(a, ranks, work):
    metrics = os.path.join(work, "meshtrain.jsonl")
    cmd = a.mpirun + ["-np", str(ranks), "-x", f"MESHTRAIN_THREADS={a.threads}",
                      os.path.join(a.build, "examples/gpt/train_gpt"), "--data", a.data,
                      "--val-data", "", "--shuffle=false", "--warmup", "1", "--steps",
                      str(a.warmup + a.steps), "--batch-size", str(a.batch_size), "--lr",
                      str(a.lr), "--weight-decay", str(a.weight_decay), "--seed", str(a.seed),
                      "--progress", "off", "--max-time", "0", "--metrics", metrics] + model_flags(a)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    steps = [json.loads(line) for line in open(metrics) if '"val_loss"' not in line]
    measured = [s for s in steps if s["step"] > a.warmup]
    last_warmup = [s for s in steps if s["step"] == a.warmup][0]
    tokens = len(measured) * a.batch_size * a.block_size
    wall = measured[-1]["time"] - last_warmup["time"]
    step_ms = sum(s["step_ms"] for s in measured) / 1e3
    return tokens / wall, tokens / step_ms


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
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.mpirun = parse_mpirun(a.mpirun)
    if a.worker:
        return worker(a)
    if not os.path.isfile(a.data):
        sys.exit(f"--data {a.data}: no such file (make it with prepare_text, docs/gpt.md)")
    if not os.path.isfile(os.path.join(a.build, "examples/gpt/train_gpt")):
        sys.exit(f"--build {a.build}: no examples/gpt/train_gpt there (scripts/build.sh)")
    if a.batch_size % a.ranks != 0:
        sys.exit(f"--batch-size {a.batch_size} must be divisible by --ranks {a.ranks}")
    if a.warmup < 1 or a.steps < 1:
        sys.exit(f"--warmup {a.warmup} and --steps {a.steps} must be >= 1 (the wall clock "
                 "starts at the end of the last warm-up step)")

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for ranks, name in ((a.ranks, f"{a.ranks} ranks: PyTorch DDP (gloo) vs train_gpt dp={a.ranks}"),
                            (1, "1 process: PyTorch vs train_gpt dp=1")):
            torch_best = mesh_best = mesh_step_best = 0.0
            for _ in range(a.repeats):
                torch_best = max(torch_best, run_pytorch(a, ranks, work))
                wall, step_ms = run_meshtrain(a, ranks, work)
                mesh_best = max(mesh_best, wall)
                mesh_step_best = max(mesh_step_best, step_ms)
            rows.append((name, torch_best, mesh_best, mesh_step_best))
            print(f"{name}: PyTorch {torch_best:,.0f} tokens/s, meshtrain {mesh_best:,.0f} "
                  f"tokens/s (by step_ms {mesh_step_best:,.0f})", flush=True)
    print(f"\nGPT L={a.n_layer} C={a.n_embd} heads={a.n_head} T={a.block_size} "
          f"V={a.vocab_size}, global batch {a.batch_size}, {a.threads} thread(s) per rank, "
          f"best of {a.repeats} x {a.steps} steps after {a.warmup}; both sides by wall clock\n")
    print("| comparison | PyTorch tokens/s | meshtrain tokens/s | meshtrain / PyTorch | "
          "meshtrain tokens/s by step_ms | by step_ms / PyTorch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, m, ms in rows:
        print(f"| {name} | {t:,.0f} | {m:,.0f} | {m / t:.2f}x | {ms:,.0f} | {ms / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
