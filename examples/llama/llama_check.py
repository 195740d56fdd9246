#!/usr/bin/env python3
"""Loads a meshtrain export of a Llama (meshtrain-export's safetensors file, Hugging Face
LlamaForCausalLM names) into a plain PyTorch Llama and computes its validation loss the way
train_llama's Trainer does: the first --val-batches global batches of --batch-size sequences
of --block-size tokens of an llm.c token file (DESIGN section 3 order, no shuffle), mean token
cross-entropy in nats.

    llama_check.py --weights out/llama.safetensors --val data/fortunes_val.bin \
        --block-size 64 --batch-size 16 --val-batches 50 [--expect 1.7421 --tolerance 1e-4]

Uses only PyTorch (Debian's python3-torch): the safetensors file is parsed here, the model is
written out again from Hugging Face's modeling_llama conventions (RMSNorm in fp32, "rotate
half" RoPE, grouped-query attention by repeating the key/value heads, SwiGLU MLP, untied
lm_head unless the config ties it) and loaded with load_state_dict, so every name and every
(unpadded) shape is checked. The config comes from the file's "model" metadata. Exit 0 when
--expect is met (or not given), 1 when the loss differs by more than --tolerance (relative).

    llama_check.py --weights a.safetensors --same-as b.safetensors

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


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(T, D, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, C, H, Hkv, theta):
        super().__init__()
        self.H, self.Hkv, self.D, self.theta = H, Hkv, C // H, theta
        self.q_proj = nn.Linear(C, H * self.D, bias=False)
        self.k_proj = nn.Linear(C, Hkv * self.D, bias=False)
        self.v_proj = nn.Linear(C, Hkv * self.D, bias=False)
        self.o_proj = nn.Linear(H * self.D, C, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        cos, sin = rope_tables(T, self.D, self.theta)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.H // self.Hkv, dim=1)  # Hugging Face's repeat_kv
        v = v.repeat_interleave(self.H // self.Hkv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.D)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = att.softmax(dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, C, F_):
        super().__init__()
        self.gate_proj = nn.Linear(C, F_, bias=False)
        self.up_proj = nn.Linear(C, F_, bias=False)
        self.down_proj = nn.Linear(F_, C, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        C = c["n_embd"]
        self.input_layernorm = RMSNorm(C, c["rms_norm_eps"])
        self.self_attn = Attention(C, c["n_head"], c["n_kv_head"], c["rope_theta"])
        self.post_attention_layernorm = RMSNorm(C, c["rms_norm_eps"])
        self.mlp = MLP(C, c["ffn_dim"])

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["n_embd"])
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c["n_layer"])])
        self.norm = RMSNorm(c["n_embd"], c["rms_norm_eps"])


class LlamaForCausalLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = LlamaModel(c)
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        if c["tie_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, idx, targets):
        x = self.model.embed_tokens(idx)
        for layer in self.model.layers:
            x = layer(x)
        logits = self.lm_head(self.model.norm(x))
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
        print(f"llama_check: {a.weights} and {a.same_as} hold the same {len(state)} tensors")
        return 0
    if None in (a.val, a.block_size, a.batch_size, a.val_batches):
        p.error("give --val, --block-size, --batch-size and --val-batches (or --same-as)")
    config = json.loads(metadata["model"])
    if config.get("architecture") != "llama":
        sys.exit(f"{a.weights}: not a Llama export (architecture {config.get('architecture')})")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied model's export omits lm_head.weight (as Hugging Face files do); nothing else.
    allowed = ["lm_head.weight"] if config["tie_embeddings"] else []
    if unexpected or missing != allowed:
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
    print(f"llama_check: {a.weights}: {sum(t.numel() for t in state.values())} parameters "
          f"({len(state)} tensors), val_loss {val_loss:.6f} over {a.val_batches} batches of {B} x {T}")
    if a.expect is not None:
        rel = abs(val_loss - a.expect) / abs(a.expect)
        print(f"llama_check: meshtrain's val_loss {a.expect:.6f}, relative difference {rel:.2e} "
              f"(tolerance {a.tolerance:.0e})")
        return 0 if rel <= a.tolerance else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
