// Tests of distributed checkpoints (launch/checkpoint.h): resume in the same layout is bit
// for bit the straight run; a checkpoint of one layout loads into another (tp 2->1, 1->2,
// dp 4->2, ZeRO 1->0 and 0->1/2, context parallelism cp 2/4 <-> cp 1) and continues within
// 1e-5 of the serial run; consolidated
// weights give the trainer's validation loss; corrupted, truncated, mismatched and partial
// checkpoints are refused or skipped with messages naming the file and the value.
#include <catch2/catch.hpp>

#include "meshtrain/launch/checkpoint.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

using namespace meshtrain;
using namespace meshtrain::testing;
namespace fs = std::filesystem;

namespace {

constexpr int kHalf = kSteps / 2;

// A layout on groups of `ranks` consecutive world ranks (each group its own mesh).
struct Layout {
  std::string name;
  int ranks; // 0: the whole world
  int tp;
  int zero;
  bool sp = false;
  int cp = 1;
};

struct Job {
  std::unique_ptr<Mesh> mesh;
  std::shared_ptr<gpt::GPTImpl> model;
  std::unique_ptr<Trainer> trainer;
  int color = 0; // which group of the world this rank is in
};

std::string model_json() {
  const auto c = tiny_config();
  return nlohmann::json{{"n_layer", c.n_layer()}, {"n_embd", c.n_embd()}}.dump();
}

Job make_job(const Layout& l, const TokenFiles& files, uint64_t seed = kSeed,
             bool loss_scaling = false) {
  const auto& world = test_runtime().world();
  const int ranks = l.ranks == 0 ? world->size() : l.ranks;
  Job job;
  job.color = world->rank() / ranks;
  const auto group = world->split(job.color, world->rank(), "job");
  job.mesh = std::make_unique<Mesh>(ParallelDims{-1, l.cp, l.tp, 1}, group);
  torch::manual_seed(seed);
  job.model = std::make_shared<gpt::GPTImpl>(tiny_config());
  job.trainer = std::make_unique<Trainer>(
      parallelize(job.model, *job.mesh, test_plan(*job.mesh, l.zero, l.sp), test_optimizer()),
      files.train, files.val, quiet_options().loss_scaling(loss_scaling));
  return job;
}

std::vector<double> train(Trainer& trainer, int steps) {
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) {
    losses.push_back(trainer.train_step().loss);
  }
  return losses;
}

CheckpointManager manager(const fs::path& dir) {
  return CheckpointManager(CheckpointOptions().dir(dir.string()).model_json(model_json()));
}

} // namespace

TEST_CASE("Checkpoint: 10 steps + save + resume 10 equal 20 straight steps, bit for bit",
          "[mpi][checkpoint]") {
  const int world = test_runtime().world_size();
  const TokenFiles files;
  const SharedDir dir;
  // dp x tp with ZeRO 1 (and sequence parallelism when there are 4 ranks).
  const Layout layout{"", 0, world == 4 ? 2 : 1, 1, world == 4};

  // With loss scaling (exact in fp32): its state travels in meta.json too.
  auto straight = make_job(layout, files, kSeed, true);
  const auto want = train(*straight.trainer, kSteps);
  const double want_val = straight.trainer->validate();

  auto first = make_job(layout, files, kSeed, true);
  train(*first.trainer, kHalf);
  const double scale = first.trainer->scaler()->scale();
  const int64_t clean = first.trainer->scaler()->clean_steps();
  auto saver = manager(dir.path);
  const auto saved = saver.save(*first.trainer);
  CHECK(fs::path(saved).filename() == "step_00000010");
  REQUIRE(latest_checkpoint(dir.path.string()) == saved);

  // Different initial weights: everything the continuation needs comes from the checkpoint.
  auto resumed = make_job(layout, files, kSeed + 1, true);
  resumed.trainer->scaler()->set_state(1, 0);
  auto loader = manager(dir.path);
  loader.load(saved, *resumed.trainer);
  CHECK(resumed.trainer->step() == kHalf);
  CHECK(resumed.trainer->scaler()->scale() == scale);
  CHECK(resumed.trainer->scaler()->clean_steps() == clean);
  const auto got = train(*resumed.trainer, kHalf);
  for (int s = 0; s < kHalf; ++s) {
    INFO(rank_tag() << "step " << kHalf + s + 1 << ": resumed " << got[s] << " vs straight "
                    << want[kHalf + s]);
    CHECK(got[s] == want[kHalf + s]);
  }
  CHECK(resumed.trainer->validate() == want_val);
}

TEST_CASE("Checkpoint: a checkpoint of one layout continues in another within 1e-5",
          "[mpi][checkpoint]") {
  const int world = test_runtime().world_size();
  const TokenFiles files;

  // The serial run is the unresharded continuation of every layout (layout invariance).
  auto serial = make_job({"serial", 1, 1, 0}, files);
  const auto want = train(*serial.trainer, kSteps);
  const double want_val = serial.trainer->validate();

  CHECK(want.back() < want.front());

  // CTest runs this on 2 and on 4 ranks; alone (no mpirun) only the serial run above.
  std::vector<std::pair<Layout, Layout>> pairs;
  if (world == 2) {
    pairs = {{{"tp2", 0, 2, 0}, {"dp2 zero1", 0, 1, 1}},
             {{"dp2 zero1", 0, 1, 1}, {"tp2 sequence parallel", 0, 2, 0, true}},
             {{"tp2 zero0", 0, 2, 0}, {"serial", 1, 1, 0}},
             {{"serial", 1, 1, 0}, {"dp2 zero2", 0, 1, 2}},
             {{"cp2 zero1", 0, 1, 1, false, 2}, {"serial", 1, 1, 0}},
             {{"dp2 zero2", 0, 1, 2}, {"cp2 zero2", 0, 1, 2, false, 2}},
             {{"cp2 zero2", 0, 1, 2, false, 2}, {"cp2 zero2", 0, 1, 2, false, 2}},
             {{"dp2 zero3", 0, 1, 3}, {"serial", 1, 1, 0}},
             {{"dp2 zero3", 0, 1, 3}, {"dp2 zero3", 0, 1, 3}},
             {{"tp2 zero0", 0, 2, 0}, {"dp2 zero3", 0, 1, 3}}};
  } else if (world == 4) {
    pairs = {{{"dp4 zero1", 0, 1, 1}, {"dp2 x tp2 zero0", 0, 2, 0}},
             {{"dp2 x tp2 zero2", 0, 2, 2, true}, {"dp4 zero1", 0, 1, 1}},
             {{"dp4 zero2", 0, 1, 2}, {"dp2 zero1", 2, 1, 1}},
             {{"tp4", 0, 4, 0}, {"serial", 1, 1, 0}},
             {{"cp2 x dp2 zero1", 0, 1, 1, false, 2}, {"cp4 zero2", 0, 1, 2, false, 4}},
             {{"cp4 zero1", 0, 1, 1, false, 4}, {"dp2 x tp2 zero1 sp", 0, 2, 1, true}},
             {{"serial", 1, 1, 0}, {"cp2 x tp2 sp", 0, 2, 0, true, 2}},
             {{"dp4 zero3", 0, 1, 3}, {"dp2 zero1", 2, 1, 1}},
             {{"serial", 1, 1, 0}, {"dp2 x tp2 zero3", 0, 2, 3}},
             {{"dp2 x tp2 zero3 sp", 0, 2, 3, true}, {"tp4", 0, 4, 0}}};
  }
  for (const auto& [from, to] : pairs) {
    const SharedDir dir;
    {
      auto job = make_job(from, files);
      train(*job.trainer, kHalf);
      if (job.color == 0) { // groups smaller than the world: the first one saves
        manager(dir.path).save(*job.trainer);
      }
    }
    test_runtime().world()->barrier();
    const auto step_dir = resolve_checkpoint(dir.path.string());
    const auto info = read_checkpoint_info(step_dir);
    CHECK(info.step == kHalf);

    auto job = make_job(to, files, kSeed + 7);
    auto loader = manager(dir.path);
    loader.load(step_dir, *job.trainer);
    const auto got = train(*job.trainer, kHalf);
    for (int s = 0; s < kHalf; ++s) {
      INFO(rank_tag() << from.name << " -> " << to.name << ", step " << kHalf + s + 1 << ": "
                      << got[s] << " vs serial " << want[kHalf + s]);
      CHECK(std::abs(got[s] - want[kHalf + s]) <= 1e-5 * std::abs(want[kHalf + s]));
    }
    const double val = job.trainer->validate();
    CHECK(std::abs(val - want_val) <= 1e-5 * want_val);

    // The consolidated weights of the checkpoint, in a serial model, give the validation
    // loss of the run that wrote it (its step-10 state) within 1e-5.
    const auto weights = load_consolidated_weights(info);
    CHECK(weights.front().first == "transformer.wte.weight");
    CHECK(weights.front().second.size(0) == tiny_config().vocab_size());
    auto check = make_job({"serial", 1, 1, 0}, files, kSeed + 9);
    load_full_weights(*check.model, weights, 0, 1, "consolidated");
    check.trainer->optimizer().sync_master_from_params();
    auto reference = make_job({"serial", 1, 1, 0}, files);
    train(*reference.trainer, kHalf);
    const double ref_val = reference.trainer->validate();
    CHECK(std::abs(check.trainer->validate() - ref_val) <= 1e-5 * ref_val);
  }
}

TEST_CASE("Checkpoint: corrupted, truncated, mismatched and partial checkpoints", "[checkpoint]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  auto job = make_job({"serial", 1, 1, 0}, files);
  train(*job.trainer, 2);
  auto saver = CheckpointManager(
      CheckpointOptions().dir(root.string()).model_json(model_json()).keep_last(2));
  saver.save(*job.trainer);
  train(*job.trainer, 1);
  const auto step3 = saver.save(*job.trainer);
  train(*job.trainer, 1);
  const auto step4 = saver.save(*job.trainer);
  // keep_last 2: step 2 is gone once step 4 is complete.
  CHECK_FALSE(fs::exists(root / "step_00000002"));
  CHECK(fs::exists(step3));

  // A crashed save (a staging directory) and a directory without meta.json are never latest.
  fs::create_directories(root / ".step_00000009.partial");
  fs::create_directories(root / "step_00000008");
  CHECK(latest_checkpoint(root.string()) == step4);
  CHECK(resolve_checkpoint(root.string()) == step4);
  REQUIRE_THROWS_WITH(resolve_checkpoint((root / "step_00000008").string()),
                      Catch::Contains("holds no complete checkpoint"));
  REQUIRE_THROWS_WITH(resolve_checkpoint((root / "nope").string()),
                      Catch::Contains("no such checkpoint directory"));

  auto fresh = make_job({"serial", 1, 1, 0}, files);
  auto loader = manager(root);
  // A flipped byte in an optimizer shard.
  const auto optim = fs::path(step4) / "optim-dp00-tp00.safetensors";
  {
    std::fstream f(optim, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-5, std::ios::end);
    f.put('\x7f');
  }
  REQUIRE_THROWS_WITH(loader.load(step4, *fresh.trainer),
                      Catch::Contains("optim-dp00-tp00.safetensors: checksum fnv1a64"));
  // A truncated model shard.
  const auto model_file = fs::path(step3) / "model-tp00.safetensors";
  fs::resize_file(model_file, fs::file_size(model_file) - 100);
  REQUIRE_THROWS_WITH(load_consolidated_weights(read_checkpoint_info(step3)),
                      Catch::Contains("model-tp00.safetensors: ") &&
                          Catch::Contains("(truncated or replaced)"));
  // Another model, another batch.
  auto other_model =
      CheckpointManager(CheckpointOptions().dir(root.string()).model_json(R"({"n_layer": 3})"));
  REQUIRE_THROWS_WITH(other_model.load(step3, *fresh.trainer),
                      Catch::Contains("model n_layer is 2, this run has 3"));
  Mesh mesh(ParallelDims{1, 1, 1, 1}, self_group());
  auto eight = test_plan(mesh);
  eight.global_batch = 8;
  Trainer other_batch(tiny_gpt(mesh, eight), files.train, nullptr, quiet_options());
  auto& model = other_batch.model();
  REQUIRE_THROWS_WITH(loader.load(step3, other_batch),
                      Catch::Contains("trained with global batch 16 x sequence length 16; this "
                                      "run has 8 x 16"));
  // Not a checkpoint at all.
  REQUIRE_THROWS_WITH(read_checkpoint_info(files.dir.string()),
                      Catch::Contains("not a checkpoint (no meta.json)"));

  // Full weights: a tied lm_head.weight is accepted; a missing, misshapen or unknown tensor,
  // or an untied lm_head, is refused naming it.
  auto weights = load_consolidated_weights(read_checkpoint_info(step4));
  const auto wte = weights.front().second;
  auto with_head = weights;
  with_head.emplace_back("lm_head.weight", wte.clone());
  load_full_weights(model, with_head, 0, 1, "tied.safetensors");
  CHECK(torch::equal(model.named_parameters()["transformer.wte.weight"], wte));
  with_head.back().second = wte + 1;
  REQUIRE_THROWS_WITH(load_full_weights(model, with_head, 0, 1, "untied.safetensors"),
                      Catch::Contains("untied.safetensors: lm_head.weight differs"));
  auto missing = weights;
  missing.erase(missing.begin() + 1);
  REQUIRE_THROWS_WITH(load_full_weights(model, missing, 0, 1, "missing.safetensors"),
                      Catch::Contains("missing.safetensors: has no tensor "
                                      "'transformer.wpe.weight'"));
  auto misshapen = weights;
  misshapen.front().second = wte.narrow(1, 0, 16);
  REQUIRE_THROWS_WITH(load_full_weights(model, misshapen, 0, 1, "small.safetensors"),
                      Catch::Contains("small.safetensors: 'transformer.wte.weight' has shape "
                                      "[256, 16]; the model needs [256, 32]"));
  auto extra = weights;
  extra.emplace_back("transformer.h.9.ln_1.weight", wte);
  REQUIRE_THROWS_WITH(load_full_weights(model, extra, 0, 1, "extra.safetensors"),
                      Catch::Contains("'transformer.h.9.ln_1.weight' is not a parameter"));
}
