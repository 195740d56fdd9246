// Tests of checkpoints against hostile and mistaken input (launch/checkpoint.h): crafted
// meta.json sizes that would overflow or allocate absurdly, optimizer pieces that leave a hole,
// deeply nested metadata, step directory names beyond any step; --keep-checkpoints after a
// resume from an older step; a resume on another data order; a re-save of a step that leaves
// no moment without that step; a damaged newest checkpoint that --resume steps over.
#include <catch2/catch.hpp>

#include "meshtrain/core/file_io.h"
#include "meshtrain/core/safetensors.h"
#include "meshtrain/launch/checkpoint.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

using namespace meshtrain;
using namespace meshtrain::testing;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string model_json() {
  const auto c = tiny_config();
  return json{{"n_layer", c.n_layer()}, {"n_embd", c.n_embd()}}.dump();
}

// A serial job (one rank, its own mesh) on `files`, laid out by parallelize() with ZeRO
// stage `zero`.
struct SerialJob {
  Mesh mesh{ParallelDims{1, 1, 1, 1}, self_group()};
  std::unique_ptr<Trainer> trainer;
  SerialJob(const TokenFiles& files, TrainerOptions options = quiet_options(),
            std::shared_ptr<const TokenFile> train = nullptr, int zero = 0) {
    trainer = std::make_unique<Trainer>(tiny_gpt(mesh, test_plan(mesh, zero)),
                                        train ? train : files.train, files.val, options);
  }
  void train(int steps) {
    for (int s = 0; s < steps; ++s) {
      trainer->train_step();
    }
  }
};

CheckpointManager manager(const fs::path& dir, const std::string& model = model_json()) {
  return CheckpointManager(CheckpointOptions().dir(dir.string()).model_json(model));
}

// What checkpoint.cpp records for each file in meta.json.
std::string fnv1a64_hex(const std::string& bytes) {
  uint64_t h = 14695981039346656037ULL;
  for (unsigned char c : bytes) {
    h = (h ^ c) * 1099511628211ULL;
  }
  char buf[20];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

json read_json(const fs::path& path) {
  return json::parse(read_file(path.string()));
}

void write_json(const fs::path& path, const json& j) {
  std::ofstream(path) << j.dump(1);
}

// Replaces a checkpoint file by `bytes` and records its size and checksum in meta.json: a
// crafted file that passes the integrity checks, so only the content checks can refuse it.
void replace_file(const fs::path& step_dir, const std::string& name, const std::string& bytes) {
  std::ofstream(step_dir / name, std::ios::binary) << bytes;
  json meta = read_json(step_dir / "meta.json");
  meta["files"][name] = {{"bytes", bytes.size()}, {"fnv1a64", fnv1a64_hex(bytes)}};
  write_json(step_dir / "meta.json", meta);
}

// A minimal meta.json with one parameter.
json meta_with_param(const json& param, int tp) {
  return json{{"format", "meshtrain-checkpoint"},
              {"version", 1},
              {"step", 1},
              {"layout", {{"dp", 1}, {"tp", tp}, {"zero", 0}, {"world", tp}}},
              {"data", {{"global_batch", 1}, {"seq_len", 1}}},
              {"model", json::object()},
              {"params", json::array({param})},
              {"files", json::object()}};
}

} // namespace

TEST_CASE("Checkpoint meta.json: blocks x tp is checked by division, not by an overflowing "
          "product",
          "[checkpoint][hardening]") {
  // blocks 2^48 x tp 2^16 = 2^64: wraps to 0 in int64, and global_size % 0 divides by zero.
  const json param = {{"name", "w"},
                      {"shape", {int64_t{1} << 48}},
                      {"dim", 0},
                      {"blocks", int64_t{1} << 48},
                      {"global_size", int64_t{1} << 48},
                      {"unpadded_size", int64_t{1} << 48}};
  REQUIRE_THROWS_WITH(parse_checkpoint_info(meta_with_param(param, 65536).dump(), "crafted/step_1"),
                      Catch::Contains("global_size 281474976710656 is not divisible by blocks "
                                      "(281474976710656) x tp (65536)"));
  // The same file is in the fuzz corpus (tests/fuzz/corpus/checkpoint_meta/).
  const auto corpus = fs::path(__FILE__).parent_path() / "fuzz/corpus/checkpoint_meta" /
                      "blocks_times_tp_overflows.json";
  REQUIRE(fs::exists(corpus));
  REQUIRE_THROWS_WITH(parse_checkpoint_info(read_file(corpus.string()), "corpus/step_1"),
                      Catch::Contains("is not divisible by blocks (281474976710656) x tp (65536)"));
  // A partitioned dim of size 0 is no shard of anything.
  json empty = param;
  empty["shape"] = {0};
  empty["global_size"] = 0;
  empty["unpadded_size"] = 0;
  empty["blocks"] = 1;
  REQUIRE_THROWS_WITH(parse_checkpoint_info(meta_with_param(empty, 1).dump(), "crafted/step_1"),
                      Catch::Contains("global_size 0 is not divisible"));
}

TEST_CASE("Checkpoint: optimizer pieces must cover each parameter; a padded size from meta.json "
          "never sizes an allocation",
          "[checkpoint][hardening]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  SerialJob job(files);
  job.train(2);
  const fs::path step = manager(root).save(*job.trainer);
  const std::string optim = "optim-dp00-tp00.safetensors";
  const std::string original_optim = read_file((step / optim).string());
  const json original_meta = read_json(step / "meta.json");

  SECTION("a hole in a parameter's range") {
    // wpe's pieces cover [0, n - 1) of its n elements: the last one would silently stay 0.
    auto file = parse_safetensors(original_optim, optim);
    const std::string param = "transformer.wpe.weight";
    auto ranges = json::parse(file.metadata.at("ranges"));
    const int64_t n = ranges.at(param).at(1).get<int64_t>();
    ranges[param] = {0, n - 1};
    file.metadata["ranges"] = ranges.dump();
    for (auto& [key, tensor] : file.tensors) {
      if (key.rfind(param + ".", 0) == 0) {
        tensor = tensor.reshape({-1}).narrow(0, 0, n - 1).clone();
      }
    }
    replace_file(step, optim, serialize_safetensors(file.tensors, file.metadata));
    SerialJob fresh(files);
    REQUIRE_THROWS_WITH(manager(root).load(step.string(), *fresh.trainer),
                        Catch::Contains("'transformer.wpe.weight.") &&
                            Catch::Contains("cover [0, " + std::to_string(n - 1) + ") of its " +
                                            std::to_string(n) + " elements"));
  }
  SECTION("a padded global size of 2^40 rows for 256 real ones") {
    json meta = original_meta;
    for (auto& p : meta["params"]) {
      if (p["name"] == "transformer.wte.weight") {
        p["shape"][0] = int64_t{1} << 40;
        p["global_size"] = int64_t{1} << 40;
      }
    }
    write_json(step / "meta.json", meta);
    // Another ZeRO stage reshards: the pieces are checked against 2^45 elements, and refused,
    // before anything of that size exists (before: a 128 TiB allocation).
    SerialJob zero1(files, quiet_options(), nullptr, /*zero=*/1);
    REQUIRE_THROWS_WITH(manager(root).load(step.string(), *zero1.trainer),
                        Catch::Contains("'transformer.wte.weight.") &&
                            Catch::Contains("of its 35184372088832 elements"));
  }
  SECTION("ranges metadata nested 100000 levels deep") {
    auto file = parse_safetensors(original_optim, optim);
    file.metadata["ranges"] = std::string(100000, '[') + std::string(100000, ']');
    replace_file(step, optim, serialize_safetensors(file.tensors, file.metadata));
    SerialJob fresh(files);
    REQUIRE_THROWS_WITH(manager(root).load(step.string(), *fresh.trainer),
                        Catch::Contains("\"ranges\" metadata: JSON nested more than 64 levels"));
  }
}

TEST_CASE("Checkpoint: a step directory name beyond any step is refused with the reader's error",
          "[checkpoint][hardening]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  SerialJob job(files);
  job.train(1);
  manager(root).save(*job.trainer);
  const fs::path huge = root / "step_99999999999999999999"; // 20 digits: past 2^63
  fs::create_directories(huge);
  fs::copy_file(root / "step_00000001" / "meta.json", huge / "meta.json");
  REQUIRE_THROWS_AS(latest_checkpoint(root.string()), c10::Error);
  REQUIRE_THROWS_WITH(latest_checkpoint(root.string()),
                      Catch::Contains("step_99999999999999999999: step 99999999999999999999 is "
                                      "beyond any step a checkpoint records"));
}

TEST_CASE("Checkpoint: --keep-checkpoints never deletes the checkpoint it just wrote, after a "
          "resume from an older step",
          "[checkpoint][hardening]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  {
    SerialJob job(files);
    auto saver = manager(root);
    for (int s = 0; s < 3; ++s) {
      job.train(2);
      saver.save(*job.trainer); // steps 2, 4, 6
    }
  }
  // Branch off at step 2 with keep_last 1: step 3 is this run's newest.
  SerialJob branch(files);
  auto keeper = CheckpointManager(
      CheckpointOptions().dir(root.string()).model_json(model_json()).keep_last(1));
  keeper.load((root / "step_00000002").string(), *branch.trainer);
  branch.train(1);
  const auto written = keeper.save(*branch.trainer);
  CHECK(fs::path(written).filename() == "step_00000003");
  CHECK(fs::exists(fs::path(written) / "meta.json"));
  // Older ones beyond keep_last go; the abandoned run's newer ones stay (docs/checkpoints.md).
  CHECK_FALSE(fs::exists(root / "step_00000002"));
  CHECK(fs::exists(root / "step_00000004" / "meta.json"));
  CHECK(fs::exists(root / "step_00000006" / "meta.json"));
  // Once this run passes them, they count as older ones.
  branch.train(4);
  keeper.save(*branch.trainer); // step 7
  CHECK(fs::exists(root / "step_00000007" / "meta.json"));
  CHECK_FALSE(fs::exists(root / "step_00000003"));
  CHECK_FALSE(fs::exists(root / "step_00000004"));
  CHECK_FALSE(fs::exists(root / "step_00000006"));
}

TEST_CASE("Checkpoint: a resume on another data order or another model is refused in both "
          "directions",
          "[checkpoint][hardening]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  SerialJob job(files, quiet_options().shuffle(true).data_seed(11));
  job.train(2);
  const std::string step = manager(root).save(*job.trainer);

  SerialJob unshuffled(files, quiet_options().shuffle(false));
  REQUIRE_THROWS_WITH(manager(root).load(step, *unshuffled.trainer),
                      Catch::Contains("the training data differ from the checkpoint's: shuffle "
                                      "is true in the checkpoint, false in this run") &&
                          Catch::Contains("--allow-data-change"));
  SerialJob reseeded(files, quiet_options().shuffle(true).data_seed(12));
  REQUIRE_THROWS_WITH(manager(root).load(step, *reseeded.trainer),
                      Catch::Contains("data_seed (the shuffle's seed) is 11 in the checkpoint, 12 "
                                      "in this run"));
  // Another file of the same length (another version of the data), and a longer one.
  const auto same_length =
      std::make_shared<const TokenFile>(files.write("other.bin", 7, files.train->size()), 256);
  SerialJob other_data(files, quiet_options().shuffle(true).data_seed(11), same_length);
  REQUIRE_THROWS_WITH(manager(root).load(step, *other_data.trainer),
                      Catch::Contains("had first-and-last-MiB checksum") &&
                          Catch::Contains("(same token count)"));
  const auto longer = std::make_shared<const TokenFile>(files.write("longer.bin", 1, 5000), 256);
  SerialJob longer_data(files, quiet_options().shuffle(true).data_seed(11), longer);
  REQUIRE_THROWS_WITH(manager(root).load(step, *longer_data.trainer),
                      Catch::Contains("the training file " + files.train->path() +
                                      " had 4000 "
                                      "tokens, this run's " +
                                      longer->path() + " has 5000"));
  // A model key only the checkpoint has.
  SerialJob same(files, quiet_options().shuffle(true).data_seed(11));
  REQUIRE_THROWS_WITH(manager(root, json{{"n_layer", 2}}.dump()).load(step, *same.trainer),
                      Catch::Contains("model n_embd is 32, this run has no n_embd"));
  // The same data loads.
  CHECK_NOTHROW(manager(root).load(step, *same.trainer));
  CHECK(same.trainer->step() == 2);
}

TEST_CASE("Checkpoint: allow_data_change resumes on another data order on purpose",
          "[checkpoint][hardening]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  SerialJob job(files, quiet_options().shuffle(true));
  job.train(2);
  const std::string step = manager(root).save(*job.trainer);
  SerialJob unshuffled(files, quiet_options().shuffle(false));
  auto allowing = CheckpointManager(
      CheckpointOptions().dir(root.string()).model_json(model_json()).allow_data_change(true));
  CHECK_NOTHROW(allowing.load(step, *unshuffled.trainer));
  CHECK(unshuffled.trainer->step() == 2);
}

TEST_CASE("Checkpoint: a re-save of a step leaves a complete step_N at every instant",
          "[checkpoint][hardening]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  SerialJob job(files);
  job.train(1);
  auto saver = manager(root);
  const fs::path step = saver.save(*job.trainer);
  // A reader polls step_N/meta.json while the same step is saved again and again.
  std::atomic<bool> done{false};
  std::atomic<int64_t> polls{0};
  std::atomic<int64_t> missing{0};
  std::thread reader([&] {
    while (!done.load()) {
      std::error_code ec;
      if (!fs::is_regular_file(step / "meta.json", ec)) {
        ++missing;
      }
      ++polls;
    }
  });
  for (int i = 0; i < 100; ++i) {
    saver.save(*job.trainer);
  }
  done = true;
  reader.join();
  INFO(polls.load() << " polls during 100 re-saves");
  CHECK(polls.load() > 100);
  CHECK(missing.load() == 0);
  CHECK_FALSE(fs::exists(root / ".step_00000001.old"));
  CHECK_FALSE(fs::exists(root / ".step_00000001.partial"));
}

TEST_CASE("file_io: syncing a directory reports its errors", "[hardening]") {
  REQUIRE_THROWS_WITH(fsync_directory("/nonexistent/meshtrain/dir"),
                      Catch::Contains("cannot open directory '/nonexistent/meshtrain/dir'"));
}

TEST_CASE("Checkpoint: load_latest skips a damaged newest checkpoint, naming it, and fails when "
          "none verifies",
          "[checkpoint][hardening]") {
  const TokenFiles files;
  const fs::path root = files.dir / "ckpt";
  {
    SerialJob job(files);
    auto saver = manager(root);
    for (int s = 0; s < 3; ++s) {
      job.train(1);
      saver.save(*job.trainer); // steps 1, 2, 3
    }
  }
  // Step 3: a flipped byte in its optimizer file; step 2: a truncated meta.json.
  {
    std::fstream f(root / "step_00000003" / "optim-dp00-tp00.safetensors",
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-5, std::ios::end);
    f.put('\x7f');
  }
  fs::resize_file(root / "step_00000002" / "meta.json", 40);
  SerialJob fresh(files);
  auto loader = manager(root);
  const auto loaded = loader.load_latest(root.string(), *fresh.trainer);
  REQUIRE(loaded.has_value());
  CHECK(fs::path(*loaded).filename() == "step_00000001");
  CHECK(fresh.trainer->step() == 1);

  // None verifies: an error naming each.
  fs::resize_file(root / "step_00000001" / "meta.json", 10);
  SerialJob none(files);
  REQUIRE_THROWS_WITH(loader.load_latest(root.string(), *none.trainer),
                      Catch::Contains("no checkpoint in " + root.string() + " verifies (3 tried") &&
                          Catch::Contains("step_00000003 failed: ") &&
                          Catch::Contains("checksum fnv1a64") &&
                          Catch::Contains("step_00000001/meta.json: not valid JSON"));
  CHECK(none.trainer->step() == 0);
  // A checkpoint of another model is not stepped over: that is this run's mistake.
  SerialJob other(files);
  auto other_model = manager(root, json{{"n_layer", 3}, {"n_embd", 32}}.dump());
  fs::remove_all(root / "step_00000001");
  fs::remove_all(root / "step_00000002");
  SerialJob job(files);
  job.train(4);
  manager(root).save(*job.trainer); // step 4, intact
  REQUIRE_THROWS_WITH(other_model.load_latest(root.string(), *other.trainer),
                      Catch::Contains("model n_layer is 2, this run has 3"));
}
