#!/usr/bin/env python3
"""Loads a meshtrain export (meshtrain-export's safetensors file) into a plain nanoGPT-style
PyTorch model and computes its validation loss the way train_gpt's Trainer does: the first
--val-batches global batches of --batch-size sequences of --block-size tokens of an llm.c
token file (DESIGN section 3 order, no shuffle), mean token cross-entropy in nats.

    nanogpt_check.py --weights out/gpt.safetensors --val data/fortunes_val.bin \
        --block-size 64 --batch-size 16 --val-batches 50 [--expect 1.7421 --tolerance 1e-4]

Uses only PyTorch (Debian's python3-torch): the safetensors file is parsed here, the model is
nanoGPT's architecture (model.py of karpathy/nanoGPT, written out again), loaded with
load_state_dict so every name and shape is checked. Exit 0 when --expect is met (or not
given), 1 when the loss differs by more than --tolerance (relative).

    nanogpt_check.py --weights a.safetensors --same-as b.safetensors

checks instead that two files hold the same tensors (names, shapes, values).
"""
import argparse
import json
import math
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = bytearray(data[base + begin : base + end])
        tensors[name] = torch.frombuffer(raw, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors, header.get("__metadata__", {})


def load_tokens(path):
    with open(path, "rb") as f:
        header = struct.unpack("<256i", f.read(1024))
        if header[0] != 20240520 or header[1] != 1:
            sys.exit(f"{path}: not an llm.c token file (magic {header[0]}, version {header[1]})")
        count = header[2]
        tokens = torch.frombuffer(bytearray(f.read(2 * count)), dtype=torch.int16)
    return tokens.to(torch.int64) & 0xFFFF


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--same-as")
    p.add_argument("--val")
    p.add_argument("--block-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--val-batches", type=int)
    p.add_argument("--expect", type=float)
    p.add_argument("--tolerance", type=float, default=1e-4)
    a = p.parse_args()

    state, metadata = load_safetensors(a.weights)
    if a.same_as:
        other, _ = load_safetensors(a.same_as)
        if list(state) != list(other):
            sys.exit(f"{a.weights} holds {list(state)}, {a.same_as} {list(other)}")
        for name, t in state.items():
            if t.shape != other[name].shape or not torch.equal(t, other[name]):
                sys.exit(f"{name} differs between {a.weights} and {a.same_as}")
        print(f"nanogpt_check: {a.weights} and {a.same_as} hold the same {len(state)} tensors")
        return 0
    if None in (a.val, a.block_size, a.batch_size, a.val_batches):
        p.error("give --val, --block-size, --batch-size and --val-batches (or --same-as)")
    config = json.loads(metadata["model"])
    model = GPT(config["vocab_size"], config["block_size"], config["n_layer"], config["n_head"],
                config["n_embd"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The export omits the tied lm_head.weight (as Hugging Face files do); nothing else.
    if unexpected or missing != ["lm_head.weight"]:
        sys.exit(f"{a.weights}: missing {missing}, unexpected {unexpected}")
    model.eval()

    tokens = load_tokens(a.val)
    T, B = a.block_size, a.batch_size
    samples = (tokens.numel() - 1) // T
    total = 0.0
    with torch.no_grad():
        for k in range(a.val_batches):
            g = [(k * B + i) % samples for i in range(B)]
            rows = torch.stack([tokens[s * T : s * T + T + 1] for s in g])
            total += model(rows[:, :-1], rows[:, 1:]).item()
    val_loss = total / a.val_batches
    print(f"nanogpt_check: {a.weights}: {sum(t.numel() for t in state.values())} parameters, "
          f"val_loss {val_loss:.6f} over {a.val_batches} batches of {B} x {T}")
    if a.expect is not None:
        rel = abs(val_loss - a.expect) / abs(a.expect)
        print(f"nanogpt_check: meshtrain's val_loss {a.expect:.6f}, relative difference {rel:.2e} "
              f"(tolerance {a.tolerance:.0e})")
        return 0 if rel <= a.tolerance else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
