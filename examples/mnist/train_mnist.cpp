// defines: main of train_mnist — an MLP trained on Fashion-MNIST with plain data parallelism:
// every rank holds the whole model, takes its slice of each global batch, and the library's
// data-parallel reducer (parallel/data_parallel.h) averages the gradients over the ranks
// while backward runs. See docs/mnist.md.
//
//   mpirun -np 2 train_mnist --epochs 3 --metrics out/mnist.jsonl
//
// Exit codes: 0 done, 1 runtime failure (unreadable data, I/O), 2 bad command line.
#include "examples/mnist/mlp.h"
#include "examples/mnist/mnist_dataset.h"
#include "meshtrain/core/errors.h"
#include "meshtrain/core/mesh.h"
#include "meshtrain/core/runtime.h"
#include "meshtrain/core/safetensors.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/launch/job_exit.h"
#include "meshtrain/optim/lr_schedule.h"
#include "meshtrain/parallel/bucket_layout.h"
#include "meshtrain/parallel/data_parallel.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using meshtrain::agree_on_exit;
using meshtrain::message_of;

using meshtrain::CommunicatorPtr;
using meshtrain::ReduceOp;
namespace cli = meshtrain::cli;
using cli::kExitFailure;
using cli::kExitUsage;
using cli::UsageError;
namespace mnist = meshtrain::mnist;
using Clock = std::chrono::steady_clock;

constexpr int64_t kEvalChunk = 1000; // test images per forward pass during evaluation

struct Flags {
  bool help = false;
  std::string data_dir;
  int64_t epochs = 0;
  int64_t batch_size = 0; // global: split over the data-parallel ranks
  double lr = 0;
  uint64_t seed = 0;
  std::vector<int64_t> hidden;
  std::string metrics;              // empty: none
  int64_t limit_train = 0;          // 0: all training images
  int64_t steps = 0;                // 0: no limit
  std::string save_weights;         // empty: none
  std::string save_initial_weights; // empty: none
};

cxxopts::Options make_options() {
  cxxopts::Options options("train_mnist",
                           "Trains an MLP on Fashion-MNIST with data parallelism over the MPI "
                           "ranks (see docs/mnist.md).");
  // clang-format off
  options.add_options()
    ("data-dir", "directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
     cli::text(mnist::kDefaultDataDir))
    ("epochs", "passes over the training set", cli::text("3"))
    ("batch-size", "global batch size, split evenly over the ranks", cli::text("128"))
    ("lr", "peak learning rate of SGD (momentum 0.9), cosine-decayed to 0 over the run",
     cli::text("0.05"))
    ("seed", "seed of the initial weights and of the per-epoch shuffle", cli::text("1234"))
    ("hidden", "comma-separated hidden layer widths", cli::text("256,128"))
    ("metrics", "write one JSON object per epoch to this file (JSON Lines; rank 0)",
     cli::text(""))
    ("limit-train", "use only the first N training images (0: all)", cli::text("0"))
    ("steps", "stop after N optimizer steps in total (0: no limit)", cli::text("0"))
    ("save-weights", "write the final parameters to this safetensors file (rank 0)",
     cli::text(""))
    ("save-initial-weights", "write the parameters before the first step to this safetensors "
                             "file (rank 0)", cli::text(""))
    ("h,help", "print this help");
  // clang-format on
  return options;
}

std::vector<int64_t> parse_hidden(const std::string& text) {
  std::vector<int64_t> widths;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      widths.push_back(cli::parse_int("hidden", item, 1, 1 << 16));
    } catch (const UsageError& e) {
      throw UsageError("--hidden " + text + ": each width must be an integer in [1, 65536], got '" +
                       item + "'");
    }
  }
  if (widths.empty() || text.back() == ',') {
    throw UsageError("--hidden " + text + ": give one or more widths, e.g. 256,128");
  }
  return widths;
}

// Parses and validates everything that needs neither data nor files. Same result on every
// rank (same argv), so every rank reaches the same verdict.
Flags parse_flags(int argc, char** argv, int world_size) {
  auto options = make_options();
  const cli::ParsedFlags parsed(options, argc, argv);
  Flags f;
  f.help = parsed.help();
  if (f.help) {
    return f;
  }
  f.data_dir = parsed.str("data-dir");
  f.epochs = parsed.integer("epochs", 1, 1000000);
  f.batch_size = parsed.integer("batch-size", 1, int64_t{1} << 24);
  if (f.batch_size % world_size != 0) {
    throw UsageError("--batch-size " + std::to_string(f.batch_size) +
                     " is not divisible by the world size " + std::to_string(world_size) +
                     ": the global batch is split evenly over the ranks; use a multiple of " +
                     std::to_string(world_size));
  }
  f.lr = parsed.number("lr", 0.0, 1e3);
  if (f.lr <= 0) {
    throw UsageError("--lr " + parsed.str("lr") + ": must be a positive finite number");
  }
  f.seed = cli::parse_uint64("seed", parsed.str("seed"));
  f.hidden = parse_hidden(parsed.str("hidden"));
  f.limit_train = parsed.integer("limit-train", 0, cli::kMaxCount);
  f.steps = parsed.integer("steps", 0, cli::kMaxCount);
  if (parsed.given("metrics") && parsed.str("metrics").empty()) {
    throw UsageError("--metrics: give a file path");
  }
  f.metrics = parsed.str("metrics");
  for (const auto& [flag, path] : {std::pair{"save-weights", &f.save_weights},
                                   {"save-initial-weights", &f.save_initial_weights}}) {
    if (parsed.given(flag) && parsed.str(flag).empty()) {
      throw UsageError(std::string("--") + flag + ": give a file path");
    }
    *path = parsed.str(flag);
  }
  return f;
}

// Checks of flags against the file system. `on_rank0` ones concern files only rank 0 writes.
void check_paths(const Flags& f, bool on_rank0) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(f.data_dir)) {
    throw UsageError("--data-dir " + f.data_dir +
                     ": no such directory (install Debian's dataset-fashion-mnist, or point it "
                     "at a directory holding the four MNIST .gz files)");
  }
  for (const char* split : {"train", "t10k"}) {
    const auto paths = mnist::split_paths(f.data_dir, split);
    for (const auto& path : {paths.images, paths.labels}) {
      if (!fs::is_regular_file(path)) {
        throw UsageError("--data-dir " + f.data_dir + ": missing " + path);
      }
    }
  }
  if (!on_rank0) {
    return;
  }
  for (const auto& [flag, path] : {std::pair{"--save-weights", f.save_weights},
                                   {"--save-initial-weights", f.save_initial_weights}}) {
    if (path.empty()) {
      continue;
    }
    const fs::path parent = fs::absolute(path).parent_path();
    if (!fs::is_directory(parent)) {
      throw UsageError(std::string(flag) + " " + path + ": directory " + parent.string() +
                       " does not exist");
    }
  }
}

// Fraction of the test set classified correctly. Each rank scores its contiguous slice and
// the correct counts are summed over `group`, so the result covers the whole test set.
double evaluate(mnist::Mlp& model, const mnist::MnistSplit& test, const CommunicatorPtr& group) {
  torch::NoGradGuard no_grad;
  model->eval();
  const auto mine = mnist::even_slice(test.size(), group->size(), group->rank());
  int64_t correct = 0;
  for (int64_t begin = mine.begin; begin < mine.end; begin += kEvalChunk) {
    const int64_t n = std::min(kEvalChunk, mine.end - begin);
    const auto logits = model->forward(test.images.narrow(0, begin, n)); // [n, 10]
    correct += logits.argmax(1).eq(test.labels.narrow(0, begin, n)).sum().item<int64_t>();
  }
  auto total = torch::tensor({correct}, torch::kLong);
  group->all_reduce(total, ReduceOp::kSum);
  model->train();
  return static_cast<double>(total.item<int64_t>()) / static_cast<double>(test.size());
}

void set_lr(torch::optim::SGD& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) {
    static_cast<torch::optim::SGDOptions&>(group.options()).lr(lr);
  }
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string model_name(const mnist::Mlp& model) {
  std::ostringstream out;
  model->pretty_print(out);
  return out.str();
}

struct Data {
  mnist::MnistSplit train;
  mnist::MnistSplit test;
};

// Writes the model's parameters to `path` (rank 0's job).
void save_weights(const std::string& path, const mnist::Mlp& model, int64_t step, int world_size) {
  meshtrain::NamedTensors tensors;
  for (const auto& item : model->named_parameters()) {
    tensors.emplace_back(item.key(), item.value().detach().contiguous());
  }
  meshtrain::save_safetensors(path, tensors,
                              {{"format", "pt"},
                               {"model", model_name(model)},
                               {"steps", std::to_string(step)},
                               {"world_size", std::to_string(world_size)}});
  std::printf("saved %zu tensors to %s\n", tensors.size(), path.c_str());
}

// The training job proper. Every rank runs the same steps and the same collectives in the
// same order; rank 0 prints, writes the metrics and saves the weights.
void train(const Flags& f, const meshtrain::Runtime& runtime, const meshtrain::Mesh& mesh,
           const Data& data, std::ofstream* metrics) {
  const CommunicatorPtr& dp = mesh.group("dp");
  const bool rank0 = runtime.rank() == 0;
  const int64_t n_train = data.train.size();
  const int64_t local_batch = f.batch_size / dp->size();
  const int64_t steps_per_epoch = n_train / f.batch_size; // the last partial batch is dropped
  // The learning-rate schedule spans the planned epochs; --steps only cuts the run short, so
  // a run with --steps N repeats the first N steps of the full run exactly.
  const int64_t planned = f.epochs * steps_per_epoch;
  const int64_t total_steps = f.steps > 0 ? std::min(f.steps, planned) : planned;

  // Same seed on every rank -> the same initial weights everywhere, without a broadcast.
  torch::manual_seed(f.seed);
  mnist::Mlp model(mnist::MlpOptions(data.train.rows * data.train.cols, f.hidden, mnist::kClasses));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(f.lr).momentum(0.9));
  // Gradients averaged over dp (each rank's loss is a mean over its local batch, as with
  // PyTorch DDP), reduced in one bucket while backward runs.
  const auto buckets = std::make_shared<const meshtrain::BucketLayout>(*model, dp->size());
  meshtrain::DataParallelReducer reducer(*model, mesh, buckets,
                                         meshtrain::DataParallelOptions().op(ReduceOp::kAvg));
  // Cosine decay from the peak at step 0 towards 0 at the planned end: most of the run at a
  // high rate, then a gentle landing, so the last epoch's accuracy does not hinge on SGD's
  // noise. A function of the step alone: the same on every rank and for every layout.
  const meshtrain::WarmupCosineSchedule schedule(
      meshtrain::WarmupCosineOptions(f.lr).min_lr(0).warmup_steps(0).total_steps(planned));

  if (rank0) {
    std::printf("train_mnist: %d rank(s) [%s], %d thread(s)/rank; model %s, %lld parameters\n"
                "  %lld training images, global batch %lld (%lld per rank), %lld steps/epoch, "
                "%lld steps; SGD momentum 0.9, lr %g cosine-decayed to 0; test set %lld images\n",
                runtime.world_size(), meshtrain::Runtime::backend_name(), runtime.threads(),
                model_name(model).c_str(), static_cast<long long>(model->parameter_count()),
                static_cast<long long>(n_train), static_cast<long long>(f.batch_size),
                static_cast<long long>(local_batch), static_cast<long long>(steps_per_epoch),
                static_cast<long long>(total_steps), f.lr,
                static_cast<long long>(data.test.size()));
    std::fflush(stdout);
    if (!f.save_initial_weights.empty()) {
      save_weights(f.save_initial_weights, model, 0, runtime.world_size());
    }
  }

  const auto start = Clock::now();
  int64_t step = 0;
  double accuracy = 0;
  double lr_now = f.lr; // the rate of the latest step
  for (int64_t epoch = 0; epoch < f.epochs && step < total_steps; ++epoch) {
    const auto epoch_start = Clock::now();
    const auto order = mnist::epoch_order(n_train, f.seed, epoch); // int64 [n_train]
    double loss_sum = 0; // of this rank's local-mean losses
    int64_t epoch_steps = 0;
    for (int64_t s = 0; s < steps_per_epoch && step < total_steps; ++s, ++step, ++epoch_steps) {
      // Global batch: samples order[s*B, (s+1)*B); rank r takes its contiguous B/D of them.
      const auto idx = order.narrow(0, s * f.batch_size + dp->rank() * local_batch,
                                    local_batch);            // [b]
      const auto x = data.train.images.index_select(0, idx); // [b, 784]
      const auto y = data.train.labels.index_select(0, idx); // [b]
      lr_now = schedule.lr(step);
      set_lr(optimizer, lr_now);
      reducer.zero_grad();
      // Mean over the local b samples; averaging the gradients over the D ranks then gives
      // the gradient of the mean over all B samples (equal b on every rank).
      const auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
      loss.backward();
      reducer.finish(); // param.grad: the averaged gradients
      optimizer.step();
      loss_sum += loss.item<double>();
    }
    const double train_seconds = seconds_since(epoch_start);

    // Mean over the epoch's steps of the global-batch loss: the per-step global loss is the
    // average of the ranks' local means, so one average per epoch gives the same number.
    auto epoch_loss = torch::tensor({loss_sum / static_cast<double>(epoch_steps)}, torch::kDouble);
    dp->all_reduce(epoch_loss, ReduceOp::kAvg);
    accuracy = evaluate(model, data.test, dp);
    const double seconds = seconds_since(epoch_start);
    const double images_per_s =
        static_cast<double>(epoch_steps * f.batch_size) / std::max(train_seconds, 1e-9);

    if (rank0) {
      std::printf("epoch %lld/%lld  step %lld  train_loss %.4f  test_accuracy %.4f  "
                  "images/s %.0f  epoch %.2fs  elapsed %.2fs\n",
                  static_cast<long long>(epoch + 1), static_cast<long long>(f.epochs),
                  static_cast<long long>(step), epoch_loss.item<double>(), accuracy, images_per_s,
                  seconds, seconds_since(start));
      std::fflush(stdout);
      if (metrics != nullptr) {
        const nlohmann::json line = {
            {"epoch", epoch + 1},
            {"step", step},
            {"train_loss", epoch_loss.item<double>()},
            {"test_accuracy", accuracy},
            {"images_per_s", images_per_s},
            {"seconds", seconds},
            {"train_seconds", train_seconds},
            {"elapsed_s", seconds_since(start)},
            {"world_size", runtime.world_size()},
            {"batch_size", f.batch_size},
            {"lr", lr_now},
        };
        // One write of a whole line, then flush: a reader never sees half an object.
        *metrics << line.dump() + "\n" << std::flush;
        MT_CHECK(metrics->good(), "--metrics ", f.metrics, ": write failed");
      }
    }
  }

  if (rank0) {
    std::printf("done: %lld steps in %.2fs, test accuracy %.4f\n", static_cast<long long>(step),
                seconds_since(start), accuracy);
    std::fflush(stdout);
    if (!f.save_weights.empty()) {
      save_weights(f.save_weights, model, step, runtime.world_size());
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  const auto runtime = meshtrain::start_runtime(&argc, &argv, "train_mnist");
  if (!runtime) {
    return kExitFailure;
  }
  const CommunicatorPtr& world = runtime->world();
  const bool rank0 = runtime->rank() == 0;

  // Setup: every failure here is agreed on by all ranks, so all exit cleanly with one code.
  Flags flags;
  Data data;
  std::optional<meshtrain::Mesh> mesh;
  std::ofstream metrics;
  {
    int code = 0;
    std::string message;
    try {
      flags = parse_flags(argc, argv, runtime->world_size());
      if (!flags.help) {
        check_paths(flags, rank0);
        if (rank0 && !flags.metrics.empty()) {
          metrics.open(flags.metrics, std::ios::out | std::ios::trunc);
          if (!metrics) {
            throw UsageError("--metrics " + flags.metrics + ": cannot open for writing (" +
                             std::strerror(errno) + ")");
          }
        }
      }
    } catch (const UsageError& e) {
      code = kExitUsage;
      message = e.what();
    }
    if ((code = agree_on_exit(world, code, message, "train_mnist")) != 0) {
      return code;
    }
    if (flags.help) {
      if (rank0) {
        std::cout << make_options().help() << "\n";
      }
      return 0;
    }

    const auto load_start = Clock::now();
    try {
      // Every rank loads both splits whole: ~200 MB of float32, and no coordination needed.
      data.train = mnist::load_split(flags.data_dir, "train");
      data.test = mnist::load_split(flags.data_dir, "t10k");
      if (flags.limit_train > data.train.size()) {
        throw UsageError("--limit-train " + std::to_string(flags.limit_train) + " exceeds the " +
                         std::to_string(data.train.size()) + " training images");
      }
      if (flags.limit_train > 0) {
        data.train.images = data.train.images.narrow(0, 0, flags.limit_train); // [N, 784]
        data.train.labels = data.train.labels.narrow(0, 0, flags.limit_train); // [N]
      }
      if (flags.batch_size > data.train.size()) {
        throw UsageError("--batch-size " + std::to_string(flags.batch_size) + " exceeds the " +
                         std::to_string(data.train.size()) +
                         " training images: not even one step per epoch");
      }
      if (data.test.rows != data.train.rows || data.test.cols != data.train.cols) {
        throw std::runtime_error("test images are " + std::to_string(data.test.rows) + "x" +
                                 std::to_string(data.test.cols) + " but training images are " +
                                 std::to_string(data.train.rows) + "x" +
                                 std::to_string(data.train.cols));
      }
    } catch (const UsageError& e) {
      code = kExitUsage;
      message = e.what();
    } catch (const std::exception& e) {
      code = kExitFailure;
      message = message_of(e);
    }
    if ((code = agree_on_exit(world, code, message, "train_mnist")) != 0) {
      return code;
    }
    // Collective: only after every rank is known to be ready for it.
    mesh.emplace(meshtrain::ParallelDims{/*dp=*/-1}, world);
    if (rank0) {
      std::printf("loaded %s in %.2fs\n", flags.data_dir.c_str(), seconds_since(load_start));
    }
  }

  try {
    train(flags, *runtime, *mesh, data, metrics.is_open() ? &metrics : nullptr);
  } catch (const std::exception& e) {
    return meshtrain::exit_after_failure("train_mnist", world, e, kExitFailure);
  }
  return 0;
}
