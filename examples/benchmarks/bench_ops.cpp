// defines: bench_ops — every op of a GPT training step's hot path, forward and backward, timed
// in fp32 and in bf16 on the machine it runs on, printed as a Markdown table. It is what the
// mixed-precision policy (DESIGN §3) is decided from: a CPU with native bf16 (avx512_bf16,
// amx_bf16) runs bf16 matrix products several times faster than fp32, while some of
// LibTorch's other bf16 kernels (layer_norm) are slower than fp32. "policy" marks what
// --precision bf16 runs where it differs from the op in the dtype ("native dtype").
//
//   bench_ops [--batch 8 --block-size 64 --n-embd 128 --n-head 4 --vocab 256 --repeats 50]
//
// Per op and dtype: --warmup untimed runs, then the median of --repeats forward passes and
// the median of --repeats forward + backward passes (the gradient of the output is ones);
// backward = the difference. One process, --threads torch threads (default 1, as one rank of
// a training job). The first line names the CPU and its bf16 extensions.
#include "meshtrain/core/cpu_features.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/parallel/parallel_layer_norm.h"
#include "meshtrain/parallel/parallel_model.h"
#include "meshtrain/parallel/parallel_transformer_block.h"
#include "meshtrain/parallel/vocab_parallel_cross_entropy.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

using namespace meshtrain;

namespace {

// One op of the hot path: `make` builds its inputs (leaves that require grad) in a dtype,
// `run` computes its output from them.
struct Op {
  std::string name;
  std::string shape;
  std::function<std::vector<torch::Tensor>(torch::Dtype)> make;
  std::function<torch::Tensor(const std::vector<torch::Tensor>&)> run;
};

struct Timing {
  double forward_ms = 0;
  double backward_ms = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Timing time_op(const Op& op, torch::Dtype dtype, int warmup, int repeats) {
  const auto inputs = op.make(dtype);
  const auto forward_backward = [&] {
    const auto y = op.run(inputs);
    y.backward(torch::ones_like(y));
  };
  for (int i = 0; i < warmup; ++i) {
    forward_backward();
  }
  using clock = std::chrono::steady_clock;
  const auto ms = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  std::vector<double> forward, both;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = clock::now();
    const auto y = op.run(inputs);
    forward.push_back(ms(t0, clock::now()));
  }
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = clock::now();
    forward_backward();
    both.push_back(ms(t0, clock::now()));
  }
  Timing out;
  out.forward_ms = median(forward);
  out.backward_ms = std::max(0.0, median(both) - out.forward_ms);
  return out;
}

// A leaf of `sizes` in `dtype`: normal draws scaled by `scale`, requiring grad.
torch::Tensor leaf(torch::IntArrayRef sizes, torch::Dtype dtype, double scale = 1.0) {
  return (torch::randn(sizes) * scale).to(dtype).requires_grad_(true);
}

} // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("bench_ops", "fp32 and bf16 times of a GPT step's ops");
  // clang-format off
  options.add_options()
    ("batch", "sequences B", cli::text("8"))
    ("block-size", "sequence length T", cli::text("64"))
    ("n-embd", "width C", cli::text("128"))
    ("n-head", "heads H", cli::text("4"))
    ("vocab", "vocabulary V", cli::text("256"))
    ("repeats", "timed runs per op and dtype", cli::text("50"))
    ("warmup", "untimed runs first", cli::text("5"))
    ("threads", "torch threads", cli::text("1"))
    ("h,help", "print this help");
  // clang-format on
  int64_t b = 0, t = 0, c = 0, h = 0, v = 0;
  int repeats = 0, warmup = 0;
  try {
    const cli::ParsedFlags flags(options, argc, argv);
    if (flags.help()) {
      std::cout << options.help() << "\n";
      return 0;
    }
    b = flags.integer("batch", 1, 1 << 16);
    t = flags.integer("block-size", 1, 1 << 16);
    c = flags.integer("n-embd", 1, 1 << 16);
    h = flags.integer("n-head", 1, 1 << 10);
    v = flags.integer("vocab", 1, 1 << 20);
    repeats = static_cast<int>(flags.integer("repeats", 1, 1 << 20));
    warmup = static_cast<int>(flags.integer("warmup", 0, 1 << 20));
    torch::set_num_threads(static_cast<int>(flags.integer("threads", 1, 1 << 12)));
    if (c % h != 0) {
      throw cli::UsageError("--n-embd " + std::to_string(c) + " must be divisible by --n-head " +
                            std::to_string(h));
    }
  } catch (const cli::UsageError& e) {
    std::cerr << "bench_ops: " << e.what() << "\n";
    return cli::kExitUsage;
  }
  const int64_t d = c / h;
  torch::manual_seed(1337);
  const auto idx = torch::randint(0, v, {b, t});
  const auto bt = [&](int64_t width) {
    return "[" + std::to_string(b) + ", " + std::to_string(t) + ", " + std::to_string(width) + "]";
  };
  const std::string heads = "[" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                            std::to_string(t) + ", " + std::to_string(d) + "]";
  const std::string scores = "[" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                             std::to_string(t) + ", " + std::to_string(t) + "]";
  const auto linear = [&](const std::string& name, int64_t in, int64_t out) {
    return Op{name, bt(in) + " x [" + std::to_string(out) + ", " + std::to_string(in) + "]",
              [=](torch::Dtype dt) {
                return std::vector<torch::Tensor>{leaf({b, t, in}, dt), leaf({out, in}, dt, 0.02),
                                                  leaf({out}, dt, 0.0)};
              },
              [](const std::vector<torch::Tensor>& x) { return torch::linear(x[0], x[1], x[2]); }};
  };
  ParallelLayerNorm norm{ParallelLayerNormOptions(c)};
  auto block = ParallelTransformerBlock(ParallelTransformerBlockOptions(c, h));

  std::vector<Op> ops = {
      {"embedding (wte)", "[" + std::to_string(v) + ", " + std::to_string(c) + "]",
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({v, c}, dt, 0.02)};
       },
       [&](const std::vector<torch::Tensor>& x) { return torch::embedding(x[0], idx); }},
      {"layer_norm, policy (fp32 statistics)", bt(c),
       [&](torch::Dtype dt) {
         norm->to(dt); // as parallelize's precision step converts the parameters
         return std::vector<torch::Tensor>{leaf({b, t, c}, dt)};
       },
       [&](const std::vector<torch::Tensor>& x) { return norm->forward(x[0]); }},
      {"layer_norm, native dtype", bt(c),
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, t, c}, dt), leaf({c}, dt), leaf({c}, dt, 0.0)};
       },
       [=](const std::vector<torch::Tensor>& x) {
         return torch::layer_norm(x[0], {c}, x[1], x[2], 1e-5);
       }},
      linear("linear c_attn", c, 3 * c),
      {"q k^T (attention scores), contiguous heads", heads + " x " + heads,
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, h, t, d}, dt), leaf({b, h, t, d}, dt)};
       },
       [](const std::vector<torch::Tensor>& x) {
         return torch::matmul(x[0], x[1].transpose(-2, -1));
       }},
      {"q k^T on views of the fused qkv (before)", heads + " x " + heads,
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, t, 3 * c}, dt)};
       },
       [=](const std::vector<torch::Tensor>& x) {
         const auto parts = x[0].split(c, -1);
         const auto q = parts[0].view({b, t, h, d}).transpose(1, 2);
         const auto k = parts[1].view({b, t, h, d}).transpose(1, 2);
         return torch::matmul(q, k.transpose(-2, -1));
       }},
      {"scale, causal mask, softmax (policy)", scores,
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, h, t, t}, dt)};
       },
       [=](const std::vector<torch::Tensor>& x) {
         return causal_softmax(x[0], 1.0 / std::sqrt(double(d)));
       }},
      {"scale, masked_fill, softmax (before)", scores,
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, h, t, t}, dt)};
       },
       [=](const std::vector<torch::Tensor>& x) {
         const auto future = torch::ones({t, t}, torch::kBool).triu(1);
         return (x[0] * (1.0 / std::sqrt(double(d))))
             .masked_fill(future, -std::numeric_limits<float>::infinity())
             .softmax(-1);
       }},
      {"probs v (attention values)", scores + " x " + heads,
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, h, t, t}, dt, 0.1), leaf({b, h, t, d}, dt)};
       },
       [](const std::vector<torch::Tensor>& x) { return torch::matmul(x[0], x[1]); }},
      {"merge heads (transpose, copy)", heads,
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, h, t, d}, dt)};
       },
       [=](const std::vector<torch::Tensor>& x) {
         return x[0].transpose(1, 2).contiguous().view({b, t, c});
       }},
      linear("linear attn.c_proj", c, c),
      {"residual add", bt(c) + " + " + bt(c),
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, t, c}, dt), leaf({b, t, c}, dt)};
       },
       [](const std::vector<torch::Tensor>& x) { return x[0] + x[1]; }},
      linear("linear mlp.c_fc", c, 4 * c),
      {"gelu (erf)", bt(4 * c),
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, t, 4 * c}, dt)};
       },
       [](const std::vector<torch::Tensor>& x) { return torch::gelu(x[0]); }},
      linear("linear mlp.c_proj", 4 * c, c),
      {"head (logits, tied wte)",
       bt(c) + " x [" + std::to_string(v) + ", " + std::to_string(c) + "]",
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, t, c}, dt), leaf({v, c}, dt, 0.02)};
       },
       [](const std::vector<torch::Tensor>& x) { return torch::linear(x[0], x[1]); }},
      {"cross-entropy (fp32 softmax)", bt(v),
       [=](torch::Dtype dt) {
         return std::vector<torch::Tensor>{leaf({b, t, v}, dt)};
       },
       [&](const std::vector<torch::Tensor>& x) {
         return vocab_parallel_cross_entropy(x[0], idx, make_self_communicator(),
                                             VocabParallelCrossEntropyOptions(v))
             .sum;
       }},
      {"whole transformer block (policy)", bt(c),
       [&](torch::Dtype dt) {
         block->to(dt); // as parallelize's precision step converts the parameters
         return std::vector<torch::Tensor>{leaf({b, t, c}, dt)};
       },
       [&](const std::vector<torch::Tensor>& x) { return block->forward(x[0]); }},
  };

  const CpuInfo cpu = cpu_info();
  std::printf("bench_ops: %s\n", describe_cpu(cpu).c_str());
  std::printf("GPT ops at B %lld, T %lld, C %lld, H %lld, V %lld; %d thread(s); median of %d "
              "runs after %d; ms\n\n",
              static_cast<long long>(b), static_cast<long long>(t), static_cast<long long>(c),
              static_cast<long long>(h), static_cast<long long>(v), torch::get_num_threads(),
              repeats, warmup);
  std::printf("| op | shape | fp32 fwd | fp32 bwd | bf16 fwd | bf16 bwd | bf16 speed-up |\n");
  std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
  for (const auto& op : ops) { // once untimed: the first allocations of every size fault pages in
    time_op(op, torch::kFloat, 1, 1);
    time_op(op, torch::kBFloat16, 1, 1);
  }
  for (const auto& op : ops) {
    const Timing fp32 = time_op(op, torch::kFloat, warmup, repeats);
    const Timing bf16 = time_op(op, torch::kBFloat16, warmup, repeats);
    std::printf("| %s | %s | %.3f | %.3f | %.3f | %.3f | %.2fx |\n", op.name.c_str(),
                op.shape.c_str(), fp32.forward_ms, fp32.backward_ms, bf16.forward_ms,
                bf16.backward_ms,
                (fp32.forward_ms + fp32.backward_ms) / (bf16.forward_ms + bf16.backward_ms));
  }
  if (!cpu.native_bf16()) {
    std::printf("\nThis CPU has no native bf16: the bf16 columns are LibTorch's emulation and "
                "say nothing about a CPU with avx512_bf16 or amx_bf16.\n");
  }
  return 0;
}
