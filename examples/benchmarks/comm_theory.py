#!/usr/bin/env python3
"""Collective bytes per optimizer step of one rank of train_gpt, from first principles.

theory_bytes(...) predicts what `train_gpt --count-comm` writes as "comm_bytes" in each
metrics line: the bytes of every collective issued inside Trainer::train_step (the comm log is
cleared at its start and read at its end), summed per key "<group> <kind>", where <group> is a
Mesh communicator name ("dp", "tp", "world"; core/mesh.cpp) and <kind> a CollectiveKind
("all_reduce", "all_gather", "reduce_scatter", "broadcast"). Byte convention (core/comm_log.h):
all_reduce and broadcast count the tensor; all_gather the full OUTPUT (group size x shard);
reduce_scatter the full INPUT; a group of one rank records nothing (so a key whose group has
one rank never appears). Python 3 standard library only.

Notation
  L n_layer, C n_embd, T block_size (every sequence has T tokens), V vocab_size,
  Vp = V rounded up to a multiple of lcm(64, tp) (GPTConfig.pad_vocab_to_multiple_of = 64,
       train_gpt keeps the default; parallel/vocab_parallel_embedding.cpp),
  D = dp, t = tp (world = D*t), b = micro_batch_size (0: B/D), A = B / (D*b) micro-steps,
  N = b*T tokens of one micro-batch,
  e = bytes of an activation / parameter element: 4 (fp32) or 2 (--precision bf16, where
      model->to(bf16) makes parameters, activations and their gradients bf16),
  4 = bytes of the fp32 gradient-reduction dtype (DataParallelOptions.reduce_dtype defaults
      to float and the Trainer does not change it, so gradients are reduced in fp32 even
      under bf16), 8 = a double.

Tensor parallelism (group "tp", present when t > 1), per micro-batch, times A per step.
Megatron-LM's f/g conjugates (Shoeybi et al. 2019): a column-parallel input is an identity
forward / all-reduce backward; a row-parallel output an all-reduce forward / identity backward.

  Without sequence parallelism (parallel/mappings.cpp copy_to / reduce_from_tp_region):
    tp all_reduce, forward:  e*N*C   vocab-parallel embedding: sum of the partial lookups
                             2L*e*N*C  attn.c_proj and mlp.c_proj (row-parallel) outputs
                             4N + 8N  vocab-parallel cross-entropy: the max of the logits
                                      [N] and the stacked (sum-exp, target logit) [2, N],
                                      always fp32 (the logits are cast up before softmax)
    tp all_reduce, backward: 2L*e*N*C  input grads of attn.c_attn and mlp.c_fc
                             e*N*C     input grad of the tied lm_head (wte.logits)
    => (4L + 2)*e*N*C + 12N per micro-batch (+ 2L*e*N*C with full recompute, below).

  With sequence parallelism (Korthikanti et al. 2022): every all-reduce of an activation
  becomes an all-gather + reduce-scatter of the same [b, T, C] (full) size:
    tp all_gather:     forward  2L*e*N*C (inputs of c_attn, c_fc) + e*N*C (input of lm_head)
                       backward 2L*e*N*C (grads of the c_proj reduce-scatters)
                                + e*N*C (grad of the embedding's reduce-scatter)
                                + e*T*C  (wpe's gradient rows: the positions [1, T/t, C] are
                                          scattered in forward, so their grad is gathered)
    tp reduce_scatter: forward  2L*e*N*C (c_proj outputs) + e*N*C (embedding partial sums)
                       backward 2L*e*N*C (grads of the c_attn, c_fc gathers)
                                + e*N*C (grad of the lm_head input gather)
    tp all_reduce:     12N       (cross-entropy, as above)
                       (6L + 2)*C*e  backward of copy_params_to_sequence_parallel_region:
                                     per block ln_1 (2C), attn.c_proj.bias (C), ln_2 (2C),
                                     mlp.c_proj.bias (C); ln_f (2C) — the parameters
                                     replicated over tp whose gradients are partial sums over
                                     the local sequence shard, one all-reduce per module per
                                     micro-batch.
  Recompute (memory/recompute.cpp): full re-runs every block's forward in backward, so each
    block's forward collectives happen twice: + 2L*e*N*C tp all_reduce (or + 2L*e*N*C
    tp all_gather and + 2L*e*N*C tp reduce_scatter under sequence parallelism) per
    micro-batch. Selective re-runs only the attention core (QK^T, softmax, AV), which has no
    collectives: no change.
  Per step: tp all_reduce + 8 — the gradient norm (optim/clip.cpp global_grad_norm): the
    squared norm of the tp-partitioned gradients is summed over tp as one double.

Data parallelism (group "dp", present when D > 1), once per step (the reducer runs under
no_sync for all micro-steps but the last):
  Buckets (parallel/data_parallel.cpp assign_buckets): the per-rank trainable parameters in
  named_parameters() order, walked from the last to the first, packed greedily into buckets
  of at most 25 MiB of fp32 gradient (Trainer's bucket_bytes); bucket k has n_k elements and
  is padded to P_k = ceil(n_k / D)*D (zeros). Per-rank parameter numel (tp-sharded ones
  divided by t):  wte Vp*C/t, wpe T*C, per block ln_1 2C, c_attn 3C*C/t + 3C/t,
  attn.c_proj C*C/t + C, ln_2 2C, c_fc 4C*C/t + 4C/t, mlp.c_proj 4C*C/t + C; ln_f 2C
  (the lm_head is tied to wte, no parameter of its own).
  ZeRO 0 and 1 (DDP): dp all_reduce sum_k 4*P_k     (the padded fp32 bucket)
  ZeRO 2:             dp reduce_scatter sum_k 4*P_k (full padded fp32 bucket = input)
                      dp all_reduce + 16             (gradient norm: the partitioned and the
                                                      replicated squared sums, two doubles,
                                                      summed over the dp shards)
  ZeRO 1 and 2:       dp all_gather sum_k e*P_k      (optim/zero.cpp write_params_and_gather:
                                                      the updated parameter shards, in the
                                                      parameters' dtype, gathered in place
                                                      into the padded flat buffer)
  ZeRO 3 (parallel/parameter_shards.h): one bucket per block and one of the rest (wte, wpe,
  ln_f), each padded to a multiple of D; every micro-step (no no_sync):
                      dp reduce_scatter A * sum_k 4*P_k
                      dp all_gather     A * g * sum_k e*P_k (g = 2 with reshard-after-forward:
                                                      forward, and again for backward; 1 without)
                                      + A * (2 + 2L) * 24 * D (the order agreement before
                                                      each use: 3 int64 per rank)
                      dp all_reduce + 16             (gradient norm)
  Loss:               dp all_reduce + 8              (Trainer: the double loss share summed
                                                      over dp after the optimizer step)
  In wire terms (ring algorithms, per rank): an all-reduce of S bytes moves 2S(D-1)/D, a
  reduce-scatter or all-gather of S bytes S(D-1)/D. DDP: 2*4P(D-1)/D. ZeRO-2: 4P(D-1)/D +
  e*P(D-1)/D, as much as DDP in fp32 (Rajbhandari et al.: 2*Psi). ZeRO-1 here all-reduces the
  whole gradient although each rank reads only its 1/D, then gathers: 2*4P(D-1)/D +
  e*P(D-1)/D, 1.5x DDP in fp32 (the paper's stage 1 costs 2*Psi, as a reduce-scatter would).

Context parallelism (cp > 1; parallel/ring_attention.h, launch/parallelize.h): the cp ranks of
a group take the same b sequences, each its T/cp tokens (two chunks), so every per-token term
above uses N = b*T/cp, and wpe's gathered gradient rows under sequence parallelism are
e*(T/cp)*C. Ring attention exchanges blocks with the neighbours in the cp ring (group "cp",
kind "send_recv", counted as the bytes sent), per block and micro-step, with
kv = 2*b*(T/cp)*C/t (k and v of the local heads):
    forward   (cp-1) * e*kv       the key/value blocks travel once around the ring
    backward  (cp-1) * e*kv       again, overlapped with the backward compute
              + cp * 4*kv         the fp32 dk/dv accumulators, one hop per step and a last
                                  one home
    recompute (selective or full) + (cp-1) * e*kv: the ring's forward is replayed.
  The gradients (and ZeRO's shards, its parameter all-gather, the gradient norm at ZeRO 2 and
  the loss share) are reduced over the dp x cp ranks: group "dp_cp" with D = dp*cp in every
  dp formula above (the buckets are padded to a multiple of dp*cp). With cp = 1 that group
  is the "dp" communicator itself and keeps its name.

No "world" collective runs inside train_step in train_gpt (the fp16 GradScaler, whose found-inf
agreement is a world all_reduce, is not used: bf16 and fp32 need no loss scaling); the
stop-agreement (world all_reduce) and validation (dp all_reduce) run between steps and are not
counted.

Command line (train_gpt's flag names; --dp since train_gpt infers dp = world / tp):
  comm_theory.py --dp 2 --tp 2 --zero 1 --sequence-parallel [--terms]
  comm_theory.py --dp 1 --cp 2 --tp 2 --sequence-parallel
"""
import argparse
import json
import math
import sys

FP32 = 4
DOUBLE = 8
BUCKET_BYTES = 25 * 1024 * 1024  # TrainerOptions.bucket_bytes default (train_gpt keeps it)
PAD_VOCAB_MULTIPLE = 64  # GPTConfig.pad_vocab_to_multiple_of default


def padded_vocab(vocab_size, tp, multiple=PAD_VOCAB_MULTIPLE):
    """Vp: vocab rounded up to a multiple of lcm(multiple, tp)."""
    step = multiple * tp // math.gcd(multiple, tp)
    return -(-vocab_size // step) * step


def local_parameters(*, vocab_size, block_size, n_layer, n_embd, tp):
    """(name, numel) of this rank's trainable parameters in named_parameters() order."""
    C, t = n_embd, tp
    out = [("transformer.wte.weight", padded_vocab(vocab_size, t) // t * C),
           ("transformer.wpe.weight", block_size * C)]
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        out += [(h + "ln_1.weight", C), (h + "ln_1.bias", C),
                (h + "attn.c_attn.weight", 3 * C // t * C), (h + "attn.c_attn.bias", 3 * C // t),
                (h + "attn.c_proj.weight", C * (C // t)), (h + "attn.c_proj.bias", C),
                (h + "ln_2.weight", C), (h + "ln_2.bias", C),
                (h + "mlp.c_fc.weight", 4 * C // t * C), (h + "mlp.c_fc.bias", 4 * C // t),
                (h + "mlp.c_proj.weight", C * (4 * C // t)), (h + "mlp.c_proj.bias", C)]
    out += [("transformer.ln_f.weight", C), ("transformer.ln_f.bias", C)]
    return out


def bucket_numels(numels, element_size=FP32, bucket_bytes=BUCKET_BYTES):
    """parallel/data_parallel.cpp assign_buckets: last parameter first, greedy by bytes."""
    buckets, nbytes = [], 0
    for n in reversed(numels):
        size = n * element_size
        if not buckets or (nbytes > 0 and nbytes + size > bucket_bytes):
            buckets.append(0)
            nbytes = 0
        buckets[-1] += n
        nbytes += size
    return buckets


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def theory_terms(*, vocab_size, block_size, n_layer, n_head, n_embd, batch_size,
                 micro_batch_size, dp, tp, zero, sequence_parallel, recompute, bf16, cp=1,
                 reshard_after_forward=True):
    """[(key, what, bytes)] of one step on one rank; theory_bytes sums them per key."""
    L, C, T, D, t = n_layer, n_embd, block_size, dp, tp
    b = micro_batch_size or batch_size // D
    if batch_size % (D * b):
        raise ValueError(f"batch_size {batch_size} is not a multiple of dp {D} x micro-batch {b}")
    if n_embd % n_head or n_head % t:
        raise ValueError(f"n_head {n_head} must divide n_embd {n_embd} and be divisible by tp {t}")
    if cp < 1 or (cp > 1 and T % (2 * cp)):
        raise ValueError(f"cp {cp}: 2 x cp must divide block_size {T}")
    if sequence_parallel and (t == 1 or (T // cp) % t):
        raise ValueError("sequence parallelism needs tp > 1 dividing block_size / cp")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute {recompute!r}: none, selective or full")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero {zero}: 0, 1, 2 or 3")
    A = batch_size // (D * b)
    e = 2 if bf16 else FP32
    N = b * T // cp  # this rank's tokens of a micro-batch
    act = e * N * C  # one [b, T, C] activation
    full = recompute == "full"
    terms = []

    def add(key, what, nbytes):
        terms.append((key, what, nbytes))

    if t > 1:
        per = f" (x{A} micro-steps)" if A > 1 else ""
        if not sequence_parallel:
            add("tp all_reduce", "embedding partial sums, forward: e*N*C" + per, A * act)
            add("tp all_reduce", "row-parallel c_proj outputs, forward: 2L*e*N*C" + per,
                A * 2 * L * act)
            add("tp all_reduce", "column-parallel input grads (c_attn, c_fc), backward: "
                "2L*e*N*C" + per, A * 2 * L * act)
            add("tp all_reduce", "lm_head input grad, backward: e*N*C" + per, A * act)
            if full:
                add("tp all_reduce", "full recompute: block forwards replayed: 2L*e*N*C" + per,
                    A * 2 * L * act)
        else:
            add("tp all_gather", "column-parallel inputs (c_attn, c_fc), forward: 2L*e*N*C" + per,
                A * 2 * L * act)
            add("tp all_gather", "lm_head input, forward: e*N*C" + per, A * act)
            add("tp all_gather", "grads of c_proj reduce-scatters, backward: 2L*e*N*C" + per,
                A * 2 * L * act)
            add("tp all_gather", "grad of the embedding reduce-scatter, backward: e*N*C" + per,
                A * act)
            add("tp all_gather", "wpe gradient rows, backward: e*(T/cp)*C" + per,
                A * e * T // cp * C)
            add("tp reduce_scatter", "row-parallel c_proj outputs, forward: 2L*e*N*C" + per,
                A * 2 * L * act)
            add("tp reduce_scatter", "embedding partial sums, forward: e*N*C" + per, A * act)
            add("tp reduce_scatter", "grads of c_attn, c_fc gathers, backward: 2L*e*N*C" + per,
                A * 2 * L * act)
            add("tp reduce_scatter", "grad of the lm_head input gather, backward: e*N*C" + per,
                A * act)
            add("tp all_reduce", "sequence-parallel param grads (ln_1, ln_2, c_proj biases, "
                "ln_f), backward: (6L+2)*C*e" + per, A * (6 * L + 2) * C * e)
            if full:
                add("tp all_gather", "full recompute: block forwards replayed: 2L*e*N*C" + per,
                    A * 2 * L * act)
                add("tp reduce_scatter", "full recompute: block forwards replayed: 2L*e*N*C"
                    + per, A * 2 * L * act)
        add("tp all_reduce", "vocab-parallel cross-entropy max [N] + (sum-exp, target) [2,N], "
            "fp32: 12N" + per, A * 12 * N)
        add("tp all_reduce", "gradient norm: partitioned squared sum, one double", DOUBLE)

    if cp > 1:
        per = f" (x{A} micro-steps)" if A > 1 else ""
        kv = 2 * b * (T // cp) * (C // t)  # elements of one k|v block of the local heads
        add("cp send_recv", f"ring attention forward: (cp-1)*e*kv per block, L={L}" + per,
            A * L * (cp - 1) * e * kv)
        add("cp send_recv", "ring attention backward: (cp-1)*e*kv + cp*4*kv (fp32 dk/dv) per "
            "block" + per, A * L * ((cp - 1) * e * kv + cp * FP32 * kv))
        if recompute != "none":
            add("cp send_recv", f"{recompute} recompute replays the ring's forward: "
                "(cp-1)*e*kv per block" + per, A * L * (cp - 1) * e * kv)

    G = D * cp  # the gradients are reduced over dp x cp
    g = "dp_cp" if cp > 1 else "dp"
    if G > 1:
        numels = [n for _, n in local_parameters(vocab_size=vocab_size, block_size=T,
                                                 n_layer=L, n_embd=C, tp=t)]
        if zero == 3:
            # One bucket per block and one of the rest (parallel/parameter_shards.h).
            per_block = (len(numels) - 4) // L
            units = [sum(numels[2 + i * per_block:2 + (i + 1) * per_block]) for i in range(L)]
            units.append(numels[0] + numels[1] + numels[-2] + numels[-1])
            padded = [round_up(n, G) for n in units]
        else:
            padded = [round_up(max(n, 1), G) for n in bucket_numels(numels)]
        flat = sum(padded)
        nb = f"{len(padded)} bucket(s), P_pad = {flat}"
        if zero == 3:
            per = f" (x{A} micro-steps)" if A > 1 else ""
            gathers = 2 if reshard_after_forward else 1
            add(f"{g} reduce_scatter", f"padded fp32 gradient units, every micro-step: "
                f"4*P_pad ({nb})" + per, A * FP32 * flat)
            add(f"{g} all_gather", f"parameter units gathered {gathers}x per micro-step "
                f"(forward{', again for backward' if gathers == 2 else ''}): e*P_pad" + per,
                A * gathers * e * flat)
            add(f"{g} all_gather", f"order agreement before each use (2 + 2L per micro-step): "
                f"3 int64 per rank" + per, A * (2 + 2 * L) * 3 * DOUBLE * G)
            add(f"{g} all_reduce", "gradient norm over the shards: two doubles", 2 * DOUBLE)
        elif zero == 2:
            add(f"{g} reduce_scatter", f"padded fp32 gradient buckets: 4*P_pad ({nb})",
                FP32 * flat)
            add(f"{g} all_reduce", "gradient norm over the shards: two doubles", 2 * DOUBLE)
        else:
            add(f"{g} all_reduce", f"padded fp32 gradient buckets: 4*P_pad ({nb})", FP32 * flat)
        if zero in (1, 2):
            add(f"{g} all_gather", f"updated parameter shards, param dtype: e*P_pad ({nb})",
                e * flat)
        add(f"{g} all_reduce", "loss share (a double)", DOUBLE)
    return terms


def theory_bytes(*, vocab_size, block_size, n_layer, n_head, n_embd, batch_size,
                 micro_batch_size, dp, tp, zero, sequence_parallel, recompute, bf16, cp=1,
                 reshard_after_forward=True):
    """{"<group> <kind>": bytes} of one optimizer step on one rank, as the Trainer reports."""
    out = {}
    for key, _, nbytes in theory_terms(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
            n_embd=n_embd, batch_size=batch_size, micro_batch_size=micro_batch_size, dp=dp,
            tp=tp, zero=zero, sequence_parallel=sequence_parallel, recompute=recompute,
            bf16=bf16, cp=cp, reshard_after_forward=reshard_after_forward):
        out[key] = out.get(key, 0) + nbytes
    return dict(sorted(out.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=0, help="0: batch-size / dp")
    p.add_argument("--dp", type=int, default=1,
                   help="DP ranks (train_gpt: world size / (cp x tp))")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks (ring attention)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--reshard-after-forward", default="true", choices=("true", "false"),
                   help="ZeRO-3: gather each block again for backward")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--terms", action="store_true", help="also list every term")
    a = p.parse_args(argv)
    kw = dict(vocab_size=a.vocab_size, block_size=a.block_size, n_layer=a.n_layer,
              n_head=a.n_head, n_embd=a.n_embd, batch_size=a.batch_size,
              micro_batch_size=a.micro_batch_size, dp=a.dp, tp=a.tp, cp=a.cp, zero=a.zero,
              sequence_parallel=a.sequence_parallel, recompute=a.recompute,
              bf16=a.precision == "bf16", reshard_after_forward=a.reshard_after_forward == "true")
    predicted = theory_bytes(**kw)
    if a.terms:
        for key, what, nbytes in theory_terms(**kw):
            print(f"  {key:<20} {nbytes:>12}  {what}")
    print(json.dumps(predicted, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
