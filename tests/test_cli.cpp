// Tests of the command-line helper every program uses (launch/cli.h, launch/training_flags.h):
// the parsers name the flag and what is allowed; booleans take every spelling; --warmup above
// --steps is lowered with a notice; --data naming a directory says so; the layout flags become
// a ParallelPlan that only ParallelPlan::validate checks; --precision bf16 warns on a CPU
// without native bf16, which cpu_info reads from /proc/cpuinfo.
#include <catch2/catch.hpp>

#include "meshtrain/core/cpu_features.h"
#include "meshtrain/launch/training_flags.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

using namespace meshtrain;
namespace cli = meshtrain::cli;

namespace {

// Parses `args` (after the program name) with the training flags of train_gpt.
cli::TrainingFlags training(std::vector<std::string> args) {
  cxxopts::Options options("test", "");
  cli::add_model_flags(options);
  cli::add_training_flags(options);
  args.insert(args.begin(), "test");
  std::vector<char*> argv;
  for (auto& arg : args) {
    argv.push_back(arg.data());
  }
  const cli::ParsedFlags parsed(options, static_cast<int>(argv.size()), argv.data());
  return cli::read_training_flags(parsed);
}

} // namespace

TEST_CASE("cli: the parsers name the flag and what is allowed", "[cli]") {
  CHECK(cli::parse_int("steps", "12", 1, 100) == 12);
  REQUIRE_THROWS_WITH(cli::parse_int("steps", "12x", 1, 100),
                      Catch::Equals("--steps 12x: not an integer"));
  REQUIRE_THROWS_WITH(cli::parse_int("n", "0", 1, 8), Catch::Equals("-n 0: must be in [1, 8]"));
  REQUIRE_THROWS_WITH(cli::parse_double("lr", "nan", 0, 1),
                      Catch::Equals("--lr nan: not a finite number"));
  REQUIRE_THROWS_WITH(cli::parse_double("dropout", "1", 0, 1, true),
                      Catch::Equals("--dropout 1: must be in [0, 1)"));
  REQUIRE_THROWS_WITH(cli::parse_uint64("seed", "-1"),
                      Catch::Equals("--seed -1: must be an integer in [0, 2^64)"));
  CHECK(cli::parse_size("budget", "64MiB") == 64 * 1024 * 1024);
  CHECK(cli::parse_size("budget", "1.5KB") == 1500);
  REQUIRE_THROWS_WITH(cli::parse_size("budget", "lots"),
                      Catch::Contains("--budget lots: expected a positive size"));
  for (const char* yes : {"true", "1", "yes", "on"}) {
    CHECK(cli::parse_bool("shuffle", yes));
  }
  for (const char* no : {"false", "0", "no", "off"}) {
    CHECK_FALSE(cli::parse_bool("shuffle", no));
  }
  REQUIRE_THROWS_WITH(cli::parse_bool("shuffle", "maybe"),
                      Catch::Equals("--shuffle maybe: must be true or false"));
}

TEST_CASE("cli: boolean flags take every spelling", "[cli]") {
  CHECK(training({}).shuffle); // default true
  CHECK_FALSE(training({"--shuffle", "false"}).shuffle);
  CHECK_FALSE(training({"--shuffle=false"}).shuffle);
  CHECK(training({"--shuffle"}).shuffle);
  CHECK(training({"--shuffle", "true", "--steps", "7"}).steps == 7);
  CHECK(training({"--sequence-parallel", "--tp", "2"}).plan.sequence_parallel);
  CHECK_FALSE(training({"--sequence-parallel", "no"}).plan.sequence_parallel);
  // A word after a boolean that is not a boolean stays a stray argument.
  REQUIRE_THROWS_WITH(training({"--shuffle", "sometimes"}),
                      Catch::Contains("unexpected argument 'sometimes'"));
}

TEST_CASE("cli: training flags, a lowered warmup, the layout as a plan", "[cli]") {
  // A new user's first try: fewer steps than the default warmup.
  const auto f = training({"--steps", "20"});
  CHECK(f.warmup == 20);
  REQUIRE(f.notices.size() == 1);
  CHECK(f.notices[0] == "--warmup 50 is more than --steps 20: warming up over all 20 steps "
                        "instead");
  const auto layout = training({"--tp", "2", "--zero", "1", "--recompute", "selective",
                                "--micro-batch-size", "4", "--batch-size", "32"})
                          .plan;
  CHECK(layout.dims.tp == 2);
  CHECK(layout.dims.dp == -1); // inferred by validate
  CHECK(layout.zero_stage == 1);
  CHECK(layout.recompute == RecomputeMode::kSelective);
  CHECK(layout.micro_batch == 4);
  CHECK(layout.global_batch == 32);
  // The flags only read the layout; ParallelPlan::validate judges it (a usage error here).
  REQUIRE_THROWS_AS(
      cli::validate_layout(training({"--zero", "7"}).plan, 2, ModelShape{4, 4, 0, 64}),
      cli::UsageError);
  // --cp: context parallelism, checked by the same validator against the sequence length.
  CHECK(training({"--cp", "2"}).plan.dims.cp == 2);
  CHECK(training({}).plan.dims.cp == 1);
  CHECK(cli::validate_layout(training({"--cp", "2"}).plan, 4, ModelShape{4, 4, 0, 64}).dims.dp ==
        2);
  REQUIRE_THROWS_WITH(
      cli::validate_layout(training({"--cp", "4"}).plan, 4, ModelShape{4, 4, 0, 36}),
      Catch::Contains("layout on 4 ranks: context parallelism cp (4) needs the sequence length "
                      "(36) divisible by 2 x cp = 8"));
  REQUIRE_THROWS_WITH(training({"--recompute", "some"}),
                      Catch::Contains("--recompute some: recompute mode 'some'"));
  REQUIRE_THROWS_WITH(training({"--precision", "fp16"}), Catch::Contains("needs a CUDA build"));
  REQUIRE_THROWS_WITH(training({"--min-lr", "1", "--lr", "0.1"}),
                      Catch::Contains("--min-lr 1: must not exceed --lr 0.1"));
  REQUIRE_THROWS_WITH(training({"--resume"}), Catch::Contains("--resume needs --checkpoint-dir"));
}

TEST_CASE("cli: --data naming a directory says so", "[cli]") {
  namespace fs = std::filesystem;
  const auto dir = fs::temp_directory_path();
  auto f = training({"--data", dir.string(), "--val-data", ""});
  REQUIRE_THROWS_WITH(cli::check_training_paths(f, true, ""),
                      Catch::Equals("--data " + dir.string() +
                                    ": is a directory; give a token "
                                    "file"));
  f.data = (dir / "no_such_tokens.bin").string();
  REQUIRE_THROWS_WITH(cli::check_training_paths(f, true, " (hint)"),
                      Catch::EndsWith("no_such_tokens.bin: no such file (hint)"));
}

TEST_CASE("cli: cpu_info reads the model and the bf16 extensions; bf16 without them warns",
          "[cli]") {
  const auto dir = std::filesystem::temp_directory_path() / "meshtrain_test_cpuinfo";
  std::filesystem::create_directories(dir);
  const auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return (dir / name).string();
  };
  const auto with = cpu_info(write("with", "processor\t: 0\nmodel name\t: AMD EPYC 9R14\n"
                                           "flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
                                           "processor\t: 1\nmodel name\t: other\n"));
  CHECK(with.model == "AMD EPYC 9R14");
  CHECK(with.avx512_bf16);
  CHECK_FALSE(with.amx_bf16);
  CHECK(with.native_bf16());
  CHECK(describe_cpu(with) == "CPU: AMD EPYC 9R14 (avx512_bf16 yes, amx_bf16 no)");
  const auto amx = cpu_info(write("amx", "model name : Xeon\nflags : amx_bf16 amx_tile\n"));
  CHECK(amx.amx_bf16);
  CHECK(amx.native_bf16());
  const auto without = cpu_info(write("without", "model name\t: AMD EPYC 7B13\n"
                                                 "flags\t\t: avx2 avx512f avx512_bf16x\n"));
  CHECK_FALSE(without.native_bf16()); // a flag is a whole word
  CHECK(describe_cpu(without).find("no native bf16") != std::string::npos);
  const auto missing = cpu_info((dir / "absent").string());
  CHECK(missing.model == "unknown CPU");
  CHECK_FALSE(missing.native_bf16());
  std::filesystem::remove_all(dir);

  // --precision bf16 says it will be slower exactly on a CPU without native bf16.
  CHECK(cli::bf16_notice(with).empty());
  CHECK(cli::bf16_notice(amx).empty());
  const auto notice = cli::bf16_notice(without);
  CHECK(notice.find("--precision bf16 will be slower than fp32 on this machine") == 0);
  CHECK(notice.find("AMD EPYC 7B13") != std::string::npos);
  CHECK(notice.find("neither avx512_bf16 nor amx_bf16") != std::string::npos);
  // The flag parser prints it on this machine exactly when its CPU lacks native bf16.
  const auto notices = training({"--steps", "100", "--precision", "bf16"}).notices;
  if (cpu_info().native_bf16()) {
    CHECK(notices.empty());
  } else {
    REQUIRE(notices.size() == 1);
    CHECK(notices[0] == cli::bf16_notice(cpu_info()));
  }
}
