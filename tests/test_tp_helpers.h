// defines: helpers shared by the tensor-parallel tests (tests/test_tp_*.cpp): the TP mesh
// (tp = world size), cuts of full tensors, relative checks that name rank and values, the
// serial twins of the TP layers (plain torch::nn modules with nanoGPT names) and
// run_twin(), which drives a TP module and its twin through two forward/backward/AdamW steps.
#pragma once

#include "meshtrain/core/mesh.h"
#include "meshtrain/parallel/shard_tensor.h"
#include "meshtrain/parallel/sharding.h"
#include "tests/harness.h"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>

namespace meshtrain::testing {

inline constexpr double kTol = 1e-5;
// Absolute floor of check_rel for elements near zero: the values here are O(0.01-1), and after
// AdamW steps the TP and serial runs (different reduction orders) differ by up to ~6e-7 in an
// element (measured at -np 2), fp32 rounding of such sums.
inline constexpr double kAtol = 1e-6;

// tp = world size, dp = pp = 1 (collective over the world).
inline Mesh tp_mesh() {
  return Mesh(ParallelDims{-1, 1, test_runtime().world_size(), 1}, test_runtime().world());
}

inline int tp_size(const Mesh& mesh) {
  return mesh.group("tp")->size();
}
inline int tp_rank(const Mesh& mesh) {
  return mesh.group("tp")->rank();
}

// This rank's chunk of `full` along `dim` for a group of `size` (a copy).
inline torch::Tensor chunk_of(const torch::Tensor& full, int64_t dim, int rank, int size) {
  const int64_t d = dim < 0 ? dim + full.dim() : dim;
  const int64_t n = full.size(d) / size;
  return full.narrow(d, rank * n, n).contiguous();
}

// Elementwise |a - e| <= atol + tol * |e| (all_close); the message names rank, what, the worst
// element and both values.
inline void check_rel(const std::string& what, const torch::Tensor& actual,
                      const torch::Tensor& expected, double tol = kTol, double atol = kAtol) {
  INFO(rank_tag() << what << ": actual sizes " << actual.sizes() << ", expected sizes "
                  << expected.sizes());
  REQUIRE(actual.sizes() == expected.sizes());
  CHECK(all_close(actual, expected, tol, atol));
}

// Bit-exact equality with the first differing index in the message.
inline void check_equal(const std::string& what, const torch::Tensor& actual,
                        const torch::Tensor& expected) {
  INFO(rank_tag() << what << ": actual sizes " << actual.sizes() << ", expected sizes "
                  << expected.sizes());
  REQUIRE(actual.sizes() == expected.sizes());
  const auto differ = (actual != expected).reshape({-1}).nonzero();
  if (differ.numel() > 0) {
    const int64_t i = differ[0].item<int64_t>();
    INFO(rank_tag() << what << ": " << differ.numel() << " elements differ, first at flat index "
                    << i << ": actual " << actual.reshape({-1})[i].item<double>() << ", expected "
                    << expected.reshape({-1})[i].item<double>());
    CHECK(differ.numel() == 0);
  } else {
    CHECK(differ.numel() == 0);
  }
}

// ---- serial twins: plain torch::nn modules with the TP layers' parameter names -----------

struct SerialAttentionImpl : torch::nn::Module {
  SerialAttentionImpl(int64_t c, int64_t h) : n_embd(c), n_head(h) {
    c_attn = register_module("c_attn", torch::nn::Linear(c, 3 * c));
    c_proj = register_module("c_proj", torch::nn::Linear(c, c));
  }
  // nanoGPT's CausalSelfAttention, dropout 0.
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1), d = n_embd / n_head;
    auto qkv = c_attn(x).split(n_embd, 2);
    auto q = qkv[0].view({b, t, n_head, d}).transpose(1, 2);
    auto k = qkv[1].view({b, t, n_head, d}).transpose(1, 2);
    auto v = qkv[2].view({b, t, n_head, d}).transpose(1, 2);
    auto att = torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(static_cast<double>(d)));
    auto causal = torch::tril(torch::ones({t, t})).view({1, 1, t, t});
    att = att.masked_fill(causal == 0, -std::numeric_limits<float>::infinity()).softmax(-1);
    auto y = torch::matmul(att, v).transpose(1, 2).contiguous().view({b, t, n_embd});
    return c_proj(y);
  }
  int64_t n_embd, n_head;
  torch::nn::Linear c_attn{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(SerialAttention);

struct SerialMLPImpl : torch::nn::Module {
  explicit SerialMLPImpl(int64_t c) {
    c_fc = register_module("c_fc", torch::nn::Linear(c, 4 * c));
    c_proj = register_module("c_proj", torch::nn::Linear(4 * c, c));
  }
  torch::Tensor forward(const torch::Tensor& x) { return c_proj(torch::gelu(c_fc(x))); }
  torch::nn::Linear c_fc{nullptr}, c_proj{nullptr};
};
TORCH_MODULE(SerialMLP);

struct SerialBlockImpl : torch::nn::Module {
  SerialBlockImpl(int64_t c, int64_t h) {
    ln_1 =
        register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c}).eps(1e-5)));
    attn = register_module("attn", SerialAttention(c, h));
    ln_2 =
        register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c}).eps(1e-5)));
    mlp = register_module("mlp", SerialMLP(c));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = x + attn(ln_1(x));
    return h + mlp(ln_2(h));
  }
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  SerialAttention attn{nullptr};
  SerialMLP mlp{nullptr};
};
TORCH_MODULE(SerialBlock);

// The documented init of a serial model, in named_parameters() order: every weight of dim
// >= 2 draws normal(0, 0.02) — c_proj weights normal(0, 0.02/sqrt(2*n_layer)) — LayerNorm
// weights are 1, biases 0. Call after torch::manual_seed(s) to get the model a TP model
// built after the same seed is cut from.
inline void init_serial(torch::nn::Module& twin, int64_t n_layer) {
  torch::NoGradGuard no_grad;
  for (auto& p : twin.named_parameters()) {
    const std::string& name = p.key();
    auto& t = p.value();
    if (t.dim() >= 2) {
      const bool proj = name.find("c_proj.weight") != std::string::npos;
      t.normal_(0.0, proj ? 0.02 / std::sqrt(2.0 * static_cast<double>(n_layer)) : 0.02);
    } else if (name.rfind("ln_", 0) == 0 || name.find(".ln_") != std::string::npos) {
      name.size() >= 6 && name.compare(name.size() - 6, 6, "weight") == 0 ? t.fill_(1.0)
                                                                          : t.fill_(0.0);
    } else {
      t.zero_();
    }
  }
}

// ---- run_twin ------------------------------------------------------------------------------

// How this rank's tensors relate to the twin's full ones.
struct TwinLayout {
  // full input -> this rank's input (identity when the input is replicated)
  std::function<torch::Tensor(const torch::Tensor&)> cut_input = [](const torch::Tensor& t) {
    return t.clone();
  };
  // full output (or a tensor shaped like it) -> this rank's output
  std::function<torch::Tensor(const torch::Tensor&)> cut_output = [](const torch::Tensor& t) {
    return t.clone();
  };
};

using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

// Every parameter of `par`, gathered and unpadded, equals (`exact`) or is close to the twin's
// parameter (or its grad with `grads`) of the same name.
inline void compare_params(const std::string& what, torch::nn::Module& par, torch::nn::Module& twin,
                           const CommunicatorPtr& group, bool grads, bool exact) {
  const auto twin_params = twin.named_parameters();
  const auto specs = named_shard_specs(par);
  const auto par_params = par.named_parameters();
  REQUIRE(specs.size() == twin_params.size());
  for (const auto& [name, spec] : specs) {
    const auto* expected = twin_params.find(name);
    INFO(rank_tag() << what << ": parameter " << name);
    REQUIRE(expected != nullptr);
    const auto& local = par_params[name];
    if (grads) {
      REQUIRE(local.grad().defined());
      REQUIRE(expected->grad().defined());
    }
    const auto full = gather_unsharded(grads ? local.grad() : local, spec, group);
    const auto want = grads ? expected->grad() : expected->detach();
    const std::string label = what + " " + name + (grads ? ".grad" : "");
    if (exact) {
      check_equal(label, full, want);
    } else {
      check_rel(label, full, want);
    }
  }
}

// Two steps of: forward both, compare outputs; backward of sum(y * w) (w fixed, random),
// compare input grads and gathered parameter grads; AdamW step on both, compare parameters.
// Before the first step the parameters must be bit-identical (init invariance).
inline void run_twin(const std::string& what, torch::nn::Module& par, torch::nn::Module& twin,
                     const CommunicatorPtr& group, const torch::Tensor& x_full,
                     const TwinLayout& layout, const Forward& par_forward,
                     const Forward& twin_forward) {
  compare_params(what + " init", par, twin, group, /*grads=*/false, /*exact=*/true);
  // eps 1e-4, not 1e-8: Adam divides each gradient element by its own magnitude, and some
  // gradients are exactly 0 in exact arithmetic (the key bias of c_attn: softmax is
  // invariant to it), so what is left is rounding noise (~1e-10) that differs between
  // layouts; with eps 1e-8 it would become steps of +-lr that differ. With 1e-4 that noise
  // moves a parameter by < 1e-8 while real gradients (>= 1e-3 here) still take Adam steps.
  // lr 1e-3, not 1e-2: Adam turns a gradient's relative rounding error into a parameter
  // error of about lr times it, so with weights ~0.08 and small, cancelling gradients
  // (relative error ~1e-4) lr 1e-2 gave 1.4e-5 relative; 1e-3 still moves weights by ~5%.
  const auto adamw = torch::optim::AdamWOptions(1e-3).weight_decay(0.1).eps(1e-4);
  torch::optim::AdamW opt_par(par.parameters(), adamw);
  torch::optim::AdamW opt_twin(twin.parameters(), adamw);
  const bool floating = x_full.is_floating_point();
  for (int step = 0; step < 2; ++step) {
    const std::string at = what + " step " + std::to_string(step);
    opt_par.zero_grad();
    opt_twin.zero_grad();
    auto xp = layout.cut_input(x_full).detach();
    auto xt = x_full.clone();
    if (floating) {
      xp.requires_grad_(true);
      xt.requires_grad_(true);
    }
    const auto yp = par_forward(xp);
    const auto yt = twin_forward(xt);
    check_rel(at + " output", yp, layout.cut_output(yt.detach()));
    torch::manual_seed(1000 + step); // the same loss weights on every rank
    const auto w = torch::randn(yt.sizes());
    (yp * layout.cut_output(w)).sum().backward();
    (yt * w).sum().backward();
    if (floating) {
      check_rel(at + " input grad", xp.grad(), layout.cut_input(xt.grad()));
    }
    compare_params(at, par, twin, group, /*grads=*/true, /*exact=*/false);
    opt_par.step();
    opt_twin.step();
    compare_params(at + " after AdamW", par, twin, group, /*grads=*/false, /*exact=*/false);
  }
}

} // namespace meshtrain::testing
