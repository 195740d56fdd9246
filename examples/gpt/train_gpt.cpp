// defines: main of train_gpt — trains the nanoGPT-architecture GPT (examples/gpt/gpt_model.h)
// on an llm.c token file in any layout of the MPI ranks (launch/cli.h's flags: dp x tp, ZeRO
// stage, sequence parallelism, recomputation, precision, micro-batches with gradient
// accumulation), applied by parallelize() (launch/parallelize.h). See docs/gpt.md.
//
//   prepare_text --train data/fortunes_train.bin --val data/fortunes_val.bin $FORTUNES
//   meshrun -n 2 -- train_gpt --metrics out/gpt.jsonl     (FORTUNES=/usr/share/games/fortunes)
//
// Exit codes: 0 done (also when stopped by --max-time or a signal), 1 runtime failure,
// 2 bad command line, files or layout.
#include "examples/gpt/gpt_model.h"
#include "meshtrain/core/mesh.h"
#include "meshtrain/core/runtime.h"
#include "meshtrain/core/token_file.h"
#include "meshtrain/core/trace.h"
#include "meshtrain/launch/checkpoint.h"
#include "meshtrain/launch/fault_injection.h"
#include "meshtrain/launch/job_exit.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/launch/startup_check.h"
#include "meshtrain/launch/trainer.h"
#include "meshtrain/launch/training_flags.h"
#include "meshtrain/memory/alloc_tracker.h"
#include "meshtrain/parallel/param_init.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

namespace {

namespace cli = meshtrain::cli;
namespace gpt = meshtrain::gpt;
using meshtrain::CommunicatorPtr;

// How to make the default corpus (docs/gpt.md), for a missing-file message.
constexpr const char* kDataHint =
    " (prepare the fortunes corpus with: prepare_text --train data/fortunes_train.bin --val "
    "data/fortunes_val.bin /usr/share/games/fortunes; see docs/gpt.md)";

struct Flags {
  bool help = false;
  meshtrain::PlanModel model;
  cli::TrainingFlags train;
  meshtrain::ParallelPlan plan; // validated against the world and the model
};

cxxopts::Options make_options() {
  cxxopts::Options options(
      "train_gpt", "Trains a nanoGPT-architecture GPT on an llm.c token file over the MPI ranks "
                   "(dp = world size / tp). See docs/gpt.md.");
  cli::add_model_flags(options);
  cli::add_training_flags(options);
  return options;
}

// Everything that needs neither files nor communication; the same verdict on every rank.
Flags parse_flags(int argc, char** argv, int world_size) {
  auto options = make_options();
  const cli::ParsedFlags parsed(options, argc, argv);
  Flags f;
  f.help = parsed.help();
  if (!f.help) {
    f.model = cli::read_model_flags(parsed);
    f.train = cli::read_training_flags(parsed);
    f.plan = cli::validate_layout(f.train.plan, world_size, meshtrain::shape_of(f.model));
  }
  return f;
}

gpt::GPTConfig model_config(const Flags& f) {
  return gpt::GPTConfig()
      .vocab_size(f.model.vocab_size)
      .block_size(f.model.block_size)
      .n_layer(f.model.n_layer)
      .n_head(f.model.n_head)
      .n_embd(f.model.n_embd)
      .dropout(f.model.dropout)
      .dropout_seed(f.train.seed + 1);
}

// What a checkpoint must agree on with the run that loads it (and what export and sampling
// rebuild the model from).
nlohmann::json model_json(const Flags& f) {
  return {{"architecture", "nanoGPT"},        {"vocab_size", f.model.vocab_size},
          {"block_size", f.model.block_size}, {"n_layer", f.model.n_layer},
          {"n_head", f.model.n_head},         {"n_embd", f.model.n_embd}};
}

// What every rank must agree on before training (launch/startup_check.h).
std::vector<meshtrain::SetupField> config_fields(const Flags& f) {
  auto fields = meshtrain::library_version_fields();
  for (auto& field : cli::model_fields(f.model)) {
    fields.push_back(std::move(field));
  }
  for (auto& field : cli::training_fields(f.train)) {
    fields.push_back(std::move(field));
  }
  return fields;
}

struct Data {
  std::shared_ptr<const meshtrain::TokenFile> train;
  std::shared_ptr<const meshtrain::TokenFile> val; // null: no validation
};

// Maps the token files and checks every token against the vocab and the files' lengths.
Data load_data(const Flags& f) {
  Data data;
  const int64_t vocab = f.model.vocab_size;
  const int64_t block = f.model.block_size;
  try {
    data.train = std::make_shared<const meshtrain::TokenFile>(f.train.data, vocab);
    if (!f.train.val_data.empty()) {
      data.val = std::make_shared<const meshtrain::TokenFile>(f.train.val_data, vocab);
    }
  } catch (const c10::Error& e) {
    throw cli::UsageError(std::string(e.what_without_backtrace()) + " (--vocab-size " +
                          std::to_string(vocab) + ")");
  }
  for (const auto& [flag, path, file] : {std::tuple{"--data", f.train.data, data.train},
                                         std::tuple{"--val-data", f.train.val_data, data.val}}) {
    if (file && (file->size() - 1) / block < 1) {
      throw cli::UsageError(
          std::string(flag) + " " + path + " has " + std::to_string(file->size()) +
          " tokens: too few for one sequence of --block-size " + std::to_string(block));
    }
  }
  return data;
}

void print_banner(const Flags& f, const meshtrain::Runtime& runtime, const gpt::GPTImpl& model,
                  const Data& data) {
  const auto& t = f.train;
  std::ostringstream out;
  out << "train_gpt: " << runtime.world_size() << " rank(s) [" << meshtrain::Runtime::backend_name()
      << "] = " << f.plan.describe() << ", " << torch::get_num_threads() << " thread(s)/rank\n";
  out << "  model: " << model.num_parameters() << " parameters, vocab " << f.model.vocab_size
      << " (padded " << model.padded_vocab_size() << "), block " << f.model.block_size << ", "
      << f.model.n_layer << " layers, " << f.model.n_head << " heads, embd " << f.model.n_embd
      << ", dropout " << f.model.dropout << "\n";
  out << "  data: " << t.data << " (" << data.train->size() << " tokens"
      << (t.shuffle ? ", shuffled" : "") << "), validation ";
  if (data.val) {
    out << t.val_data << " (" << data.val->size() << " tokens, " << t.val_batches
        << " batches every " << t.val_every << " steps)\n";
  } else {
    out << "none\n";
  }
  out << "  " << f.plan.global_batch * f.model.block_size << " tokens/step; " << t.steps
      << " steps, AdamW lr " << t.lr << " warmup " << t.warmup << " cosine to " << t.min_lr
      << ", wd " << t.weight_decay << ", clip " << t.grad_clip;
  if (t.max_time > 0) {
    out << ", time budget " << t.max_time << "s";
  }
  std::printf("%s\n", out.str().c_str());
  for (const auto& notice : t.notices) {
    std::printf("train_gpt: note: %s\n", notice.c_str());
  }
  std::fflush(stdout);
}

// The job proper: the same steps and collectives on every rank; rank 0 reports. Returns the
// exit code.
int train(const Flags& f, const meshtrain::Runtime& runtime, const meshtrain::Mesh& mesh,
          const Data& data) {
  const bool rank0 = runtime.rank() == 0;
  const auto& t = f.train;
  torch::manual_seed(t.seed);
  // Where to start: the checkpoint --resume names (or finds), else --init's weights, else
  // the seeded init.
  std::optional<std::string> resume_from;
  if (t.resume == "latest") {
    resume_from = meshtrain::latest_checkpoint(t.checkpoint_dir);
    if (!resume_from && rank0) {
      std::printf("train_gpt: --resume: no checkpoint in %s yet; starting fresh\n",
                  t.checkpoint_dir.c_str());
    }
  } else if (!t.resume.empty()) {
    resume_from = meshtrain::resolve_checkpoint(t.resume);
  }
  // The model is declared, not built: parallelize gives each rank only its part, every
  // value a function of (seed, name, index) or read from --init's mapped file, so any layout
  // starts from the serial model bit for bit and no rank holds the whole (DESIGN §3).
  std::shared_ptr<gpt::GPTImpl> model;
  {
    meshtrain::DeferredInit deferred(t.seed);
    model = std::make_shared<gpt::GPTImpl>(model_config(f));
  }
  auto options = meshtrain::ParallelizeOptions().optimizer(cli::optimizer_options(t));
  if (!t.init.empty() && !resume_from) {
    options.initial_weights(
        std::make_shared<const meshtrain::SafetensorsFile>(meshtrain::map_safetensors(t.init)));
    options.initial_weights_source(t.init);
    if (rank0) {
      std::printf("train_gpt: initial weights from %s\n", t.init.c_str());
    }
  }
  auto parallel = meshtrain::parallelize(model, mesh, f.plan, options);
  // Same flags but another build, or a model code change on some node: stop here.
  meshtrain::check_parameters_agree(mesh, *model);
  meshtrain::Trainer trainer(parallel, data.train, data.val,
                             cli::trainer_options(t, f.model.block_size));
  if (rank0) {
    print_banner(f, runtime, *model, data);
  }
  auto checkpoint_options = meshtrain::CheckpointOptions()
                                .dir(t.checkpoint_dir)
                                .save_every(t.save_every)
                                .keep_last(t.keep_checkpoints)
                                .model_json(model_json(f).dump())
                                .rng_tracker(model->rng_tracker())
                                .allow_data_change(t.allow_data_change);
  meshtrain::install_fault_injection(trainer, checkpoint_options, runtime.rank());
  std::optional<meshtrain::CheckpointManager> checkpoints;
  if (!t.checkpoint_dir.empty() || resume_from) {
    checkpoints.emplace(checkpoint_options);
  }
  if (resume_from && t.resume == "latest") {
    checkpoints->load_latest(t.checkpoint_dir, trainer); // skips a damaged newest one
  } else if (resume_from) {
    checkpoints->load(*resume_from, trainer);
  }
  if (!t.checkpoint_dir.empty()) {
    if (t.save_at_start && trainer.step() == 0) {
      checkpoints->save(trainer);
    }
    trainer.set_checkpoint_hook(checkpoints->hook());
  }
  if (t.count_comm) {
    mesh.group("world")->log()->enable(); // every group of the mesh shares this log
  }
  if (!t.trace.empty()) {
    meshtrain::Tracer::start(runtime.rank()).name_thread("train");
  }
  const auto result = trainer.fit();
  if (!t.trace.empty()) {
    const std::string path = t.trace + "/trace-rank" + std::to_string(runtime.rank()) + ".json";
    meshtrain::Tracer::get()->write(path);
    if (rank0) {
      std::printf("trace: %s/trace-rank<R>.json, one per rank (open in ui.perfetto.dev)\n",
                  t.trace.c_str());
      std::fflush(stdout);
    }
  }
  if (result.reason == meshtrain::StopReason::kNonFinite) {
    if (rank0) {
      std::fprintf(stderr,
                   "train_gpt: error: step %lld: the gradient norm is not finite; stopped before "
                   "applying it (--nan-policy stop; the last checkpoint and the parameters are "
                   "the previous step's)\n",
                   static_cast<long long>(result.steps + 1));
    }
    return cli::kExitFailure;
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  // First: only tensors allocated after it are counted (progress and metrics report them).
  meshtrain::AllocationTracker::install();
  const auto runtime = meshtrain::start_runtime(&argc, &argv, "train_gpt");
  if (!runtime) {
    return cli::kExitFailure;
  }
  const CommunicatorPtr& world = runtime->world();
  const bool rank0 = runtime->rank() == 0;

  // Set-up: every failure here is agreed on by all ranks, so all exit cleanly with one code.
  Flags flags;
  Data data;
  std::optional<meshtrain::Mesh> mesh;
  {
    int code = 0;
    std::string message;
    try {
      flags = parse_flags(argc, argv, runtime->world_size());
      if (!flags.help) {
        cli::check_training_paths(flags.train, rank0, kDataHint);
        if (flags.train.threads > 0) {
          torch::set_num_threads(flags.train.threads);
        }
        data = load_data(flags);
      }
    } catch (const cli::UsageError& e) {
      code = cli::kExitUsage;
      message = e.what();
    } catch (const std::exception& e) {
      code = cli::kExitFailure;
      message = meshtrain::message_of(e);
    }
    if ((code = meshtrain::agree_on_exit(world, code, message, "train_gpt")) != 0) {
      return code;
    }
    if (flags.help) {
      if (rank0) {
        std::cout << make_options().help() << "\n";
      }
      return 0;
    }
    // Every rank runs the same build with the same flags, or none trains.
    try {
      meshtrain::check_ranks_agree(world, config_fields(flags), "configuration");
      runtime->set_comm_timeout(flags.train.comm_timeout);
    } catch (const c10::Error& e) {
      if (rank0) {
        std::cerr << "train_gpt: error: " << meshtrain::message_of(e) << "\n";
      }
      return cli::kExitUsage;
    }
    // Collective: only after every rank is known to be ready for it.
    mesh.emplace(flags.plan.dims, world);
  }

  try {
    return train(flags, *runtime, *mesh, data);
  } catch (const std::exception& e) {
    return meshtrain::exit_after_failure("train_gpt", world, e, cli::kExitFailure);
  }
}
