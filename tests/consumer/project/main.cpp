// defines: main of the out-of-tree consumer — a researcher's own small language model, written
// against the installed package only (<meshtrain/...> headers, find_package(meshtrain)):
// its own block (LayerNorm, a learned gain of its own, the library's attention, a SiLU MLP of
// column/row-parallel linears), an untied output head, declared under DeferredInit and
// trained through parallelize() and the Trainer.
//
// On 1 process it trains 20 steps serially and checks the loss falls. On 2 ranks it also
// trains dp2, tp2 (with sequence parallelism: within 1e-6), dp2 ZeRO-2 and dp2 ZeRO-3 and
// checks every step's loss against the serial run on this rank within 1e-5 relative and the
// copies of every parameter identical after training; and that a per-rank seed in the gain
// is named at start-up. Prints
// "consumer rank R/W ... OK" and exits 0 only when every check holds.
#include <meshtrain/meshtrain.h>

#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace meshtrain;

constexpr int64_t kVocab = 64;
constexpr int64_t kWidth = 32;
constexpr int64_t kHeads = 4;
constexpr int64_t kSeq = 16;
constexpr int64_t kLayers = 2;
constexpr int64_t kBatch = 8;
constexpr int kSteps = 20;

// x + attn(gain * norm1(x)); x + down(silu(up(norm2(x)))): not the GPT's block (no GELU, no
// biases in the MLP), built only from public parallel layers, with a learned gain of its own
// registered plainly (under sequence parallelism the library sums its gradient over tp).
// `noisy_gain` draws the gain from torch's generator (a per-rank seed makes the copies differ).
class MixerBlockImpl : public torch::nn::Module, public ParallelBlock {
public:
  explicit MixerBlockImpl(bool noisy_gain = false) {
    gain = register_parameter("gain", noisy_gain ? 0.5 + 0.01 * torch::randn({kWidth})
                                                 : torch::full({kWidth}, 0.5));
    norm1 = register_module("norm1", ParallelLayerNorm(ParallelLayerNormOptions(kWidth)));
    attn = register_module(
        "attn",
        ParallelSelfAttention(ParallelSelfAttentionOptions(kWidth, kHeads).n_layer(kLayers)));
    norm2 = register_module("norm2", ParallelLayerNorm(ParallelLayerNormOptions(kWidth)));
    up = register_module(
        "up",
        ColumnParallelLinear(
            ColumnParallelLinearOptions(kWidth, 2 * kWidth).bias(false).gather_output(false)));
    down = register_module(
        "down",
        RowParallelLinear(
            RowParallelLinearOptions(2 * kWidth, kWidth).bias(false).input_is_parallel(true)));
  }
  // [b, T, C] (sequence parallel: [b, T/tp, C]) -> the same.
  torch::Tensor forward(const torch::Tensor& x) override {
    const auto h = x + attn(gain * norm1(x));
    return h + down(torch::silu(up(norm2(h))));
  }

  torch::Tensor gain; // [C]
  ParallelLayerNorm norm1{nullptr}, norm2{nullptr};
  ParallelSelfAttention attn{nullptr};
  ColumnParallelLinear up{nullptr};
  RowParallelLinear down{nullptr};
};
TORCH_MODULE(MixerBlock);

class TinyLMImpl : public ParallelModel {
public:
  explicit TinyLMImpl(bool noisy_gain = false) {
    tokens = register_module("tokens",
                             VocabParallelEmbedding(VocabParallelEmbeddingOptions(kVocab, kWidth)));
    positions =
        register_module("positions", PositionEmbedding(PositionEmbeddingOptions(kSeq, kWidth)));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < kLayers; ++i) {
      layers->push_back(MixerBlock(noisy_gain));
    }
    norm = register_module("norm", ParallelLayerNorm(ParallelLayerNormOptions(kWidth)));
    head = register_module(
        "head", ColumnParallelLinear(
                    ColumnParallelLinearOptions(kWidth, kVocab).bias(false).gather_output(false)));
  }

  ModelShape shape() const override {
    ModelShape s;
    s.n_layer = kLayers;
    s.n_head = kHeads;
    s.seq_len = kSeq;
    s.n_embd = kWidth;
    return s;
  }
  torch::Tensor embed(const torch::Tensor& inputs) override {
    return tokens(inputs) + positions(inputs.size(1));
  }
  std::vector<std::shared_ptr<torch::nn::Module>> blocks() override { return layers->children(); }
  torch::Tensor head_loss(const torch::Tensor& x, const torch::Tensor& targets) override {
    // This rank's vocab columns [b, T, V/tp]; the cross-entropy never gathers them.
    const auto logits = head(norm(x));
    return vocab_parallel_cross_entropy(logits, targets, head->tp_group(),
                                        VocabParallelCrossEntropyOptions(kVocab))
        .sum;
  }

  VocabParallelEmbedding tokens{nullptr};
  PositionEmbedding positions{nullptr};
  torch::nn::ModuleList layers{nullptr};
  ParallelLayerNorm norm{nullptr};
  ColumnParallelLinear head{nullptr};
};

// A learnable byte pattern with some noise, the same on every rank.
std::string write_tokens(const std::string& dir) {
  std::vector<uint16_t> data(6000);
  uint32_t state = 12345;
  for (size_t i = 0; i < data.size(); ++i) {
    state = state * 1664525U + 1013904223U;
    data[i] =
        static_cast<uint16_t>((state >> 24) % 5 == 0 ? (state >> 8) % kVocab : (i * 7) % kVocab);
  }
  const auto path = dir + "/tokens.bin";
  write_token_file(path, data);
  return path;
}

ParallelPlan plan_of(const Mesh& mesh, int zero, bool sequence_parallel) {
  ParallelPlan plan;
  plan.dims = mesh.grid().dims();
  plan.zero_stage = zero;
  plan.sequence_parallel = sequence_parallel;
  plan.global_batch = kBatch;
  return plan;
}

// Declared, not built: parallelize gives each rank only its part of the library's layers, the
// serial values whatever the layout.
std::shared_ptr<TinyLMImpl> declare_model(bool noisy_gain = false) {
  DeferredInit deferred(1234);
  return std::make_shared<TinyLMImpl>(noisy_gain);
}

std::vector<double> train(const Mesh& mesh, int zero, bool sequence_parallel,
                          const std::shared_ptr<const TokenFile>& tokens) {
  auto parallel = parallelize(
      declare_model(), mesh, plan_of(mesh, zero, sequence_parallel),
      ParallelizeOptions().optimizer(ZeroOptions().adamw(AdamWOptions(3e-3).weight_decay(0.1))));
  Trainer trainer(
      parallel, tokens, nullptr,
      TrainerOptions().steps(kSteps).seq_len(kSeq).lr(3e-3).min_lr(3e-4).warmup_steps(2).progress(
          ProgressStyle::kOff));
  std::vector<double> losses;
  for (int s = 0; s < kSteps; ++s) {
    losses.push_back(trainer.train_step().loss);
  }
  // The gains (and every other copy) are still identical on the ranks that hold them.
  GatheredParameters gathered(parallel.shards.get());
  check_replicas(*parallel.model, mesh, "after training");
  return losses;
}

} // namespace

int main(int argc, char** argv) {
  try {
    Runtime runtime(&argc, &argv);
    const int world = runtime.world_size();
    const int rank = runtime.rank();
    const auto dir =
        std::filesystem::temp_directory_path() / ("meshtrain_consumer_" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    const auto tokens = std::make_shared<const TokenFile>(write_tokens(dir.string()), kVocab);

    // The serial run, on this rank alone.
    const Mesh serial_mesh(ParallelDims{1, 1, 1, 1}, make_self_communicator());
    const auto serial = train(serial_mesh, 0, false, tokens);
    bool ok = serial.back() < serial.front() - 0.5; // it learns
    std::string report =
        "serial " + std::to_string(serial.front()) + " -> " + std::to_string(serial.back());

    struct Layout {
      const char* name;
      int tp;
      int zero;
      bool sp;
    };
    if (world == 2) {
      for (const Layout& l : {Layout{"dp2", 1, 0, false}, Layout{"tp2 sp", 2, 0, true},
                              Layout{"dp2 zero2", 1, 2, false}, Layout{"dp2 zero3", 1, 3, false}}) {
        const Mesh mesh(ParallelDims{-1, 1, l.tp, 1}, runtime.world());
        const auto losses = train(mesh, l.zero, l.sp, tokens);
        double worst = 0;
        for (int s = 0; s < kSteps; ++s) {
          worst = std::max(worst, std::abs(losses[s] - serial[s]) / std::abs(serial[s]));
        }
        // Sequence parallelism: the gain's gradient summed over tp keeps it within 1e-6.
        ok = ok && worst <= (l.sp ? 1e-6 : 1e-5);
        std::ostringstream line;
        line << ", " << l.name << " worst relative step error " << std::scientific
             << std::setprecision(1) << worst;
        report += line.str();
      }
    }
    if (world == 2) {
      // A per-rank seed in a model's own parameter: named at start-up instead of trained.
      torch::manual_seed(99 + rank);
      const Mesh mesh(ParallelDims{1, 1, 2, 1}, runtime.world());
      std::string error;
      try {
        parallelize(declare_model(/*noisy_gain=*/true), mesh, plan_of(mesh, 0, true));
      } catch (const c10::Error& e) {
        error = e.what_without_backtrace();
      }
      const bool named = error.find("parameter 'layers.0.gain' differs between ranks 0 and 1") !=
                         std::string::npos;
      ok = ok && named;
      report += named ? ", per-rank seed named" : ", per-rank seed NOT caught: " + error;
    }
    std::filesystem::remove_all(dir);
    std::cout << "consumer rank " << rank << "/" << world << " (" << Runtime::backend_name()
              << "): " << report << " " << (ok ? "OK" : "WRONG") << std::endl;
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "consumer: " << e.what() << std::endl;
    return 1;
  }
}
