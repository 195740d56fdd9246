// Tests of the meshrun launcher's pure logic: flag parsing, layout checks and the mpirun/srun
// command, with the machine (cores, root, SLURM variables, hostfile) injected. The real
// binary is exercised by the meshrun:* CTest cases (launch/check_meshrun.sh).
#include <catch2/catch.hpp>

#include "meshtrain/launch/meshrun.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using meshtrain::launch::Binding;
using meshtrain::launch::build_launch_command;
using meshtrain::launch::LaunchContext;
using meshtrain::launch::LaunchOptions;
using meshtrain::launch::parse_launch_args;
using Words = std::vector<std::string>;

namespace {

LaunchOptions options_for(int ranks, int tp = 1) {
  LaunchOptions options;
  options.ranks = ranks;
  options.tp = tp;
  options.program = {"./train", "--steps", "10"};
  return options;
}

LaunchContext machine(int cores, bool root) {
  LaunchContext context;
  context.cores = cores;
  context.root = root;
  return context;
}

// The value of `-x NAME=value` in an mpirun command ("" when absent).
std::string exported(const Words& command, const std::string& name) {
  for (size_t i = 0; i + 1 < command.size(); ++i) {
    if (command[i] == "-x" && command[i + 1].rfind(name + "=", 0) == 0) {
      return command[i + 1].substr(name.size() + 1);
    }
  }
  return "";
}

bool has(const Words& command, const std::string& word) {
  return std::find(command.begin(), command.end(), word) != command.end();
}

// The word after `flag` ("" when absent).
std::string after(const Words& command, const std::string& flag) {
  const auto it = std::find(command.begin(), command.end(), flag);
  return it != command.end() && it + 1 != command.end() ? *(it + 1) : "";
}

} // namespace

TEST_CASE("meshrun: mpirun command for 2 ranks on 2 cores", "[meshrun]") {
  const auto options = options_for(2, 2);
  CHECK(build_launch_command(options, machine(2, /*root=*/true)) ==
        Words{"mpirun",    "--allow-run-as-root",
              "-np",       "2",
              "--bind-to", "core",
              "-x",        "MESHTRAIN_TP=2",
              "-x",        "MESHTRAIN_CP=1",
              "-x",        "MESHTRAIN_PP=1",
              "-x",        "MESHTRAIN_WORLD_SIZE=2",
              "-x",        "MESHTRAIN_THREADS=1",
              "-x",        "OMP_NUM_THREADS=1",
              "./train",   "--steps",
              "10"});
  // Not root: OpenMPI needs no permission flag.
  CHECK_FALSE(has(build_launch_command(options, machine(2, false)), "--allow-run-as-root"));
}

TEST_CASE("meshrun: more ranks than cores oversubscribes, unbinds, one thread each", "[meshrun]") {
  const auto command = build_launch_command(options_for(4), machine(2, false));
  CHECK(command == Words{"mpirun",    "-np",
                         "4",         "--oversubscribe",
                         "--bind-to", "none",
                         "-x",        "MESHTRAIN_TP=1",
                         "-x",        "MESHTRAIN_CP=1",
                         "-x",        "MESHTRAIN_PP=1",
                         "-x",        "MESHTRAIN_WORLD_SIZE=4",
                         "-x",        "MESHTRAIN_THREADS=1",
                         "-x",        "OMP_NUM_THREADS=1",
                         "./train",   "--steps",
                         "10"});
  // Exactly as many ranks as cores still fits without oversubscribing.
  const auto fits = build_launch_command(options_for(2), machine(2, false));
  CHECK_FALSE(has(fits, "--oversubscribe"));
  CHECK(after(fits, "--bind-to") == "core");
}

TEST_CASE("meshrun: threads per rank are cores / ranks, at least 1", "[meshrun]") {
  CHECK(exported(build_launch_command(options_for(4), machine(16, false)), "MESHTRAIN_THREADS") ==
        "4");
  CHECK(exported(build_launch_command(options_for(3), machine(16, false)), "MESHTRAIN_THREADS") ==
        "5");
  CHECK(exported(build_launch_command(options_for(1), machine(16, false)), "OMP_NUM_THREADS") ==
        "16");
  CHECK(exported(build_launch_command(options_for(32), machine(16, false)), "MESHTRAIN_THREADS") ==
        "1");
  auto options = options_for(4);
  options.threads = 3; // --threads wins over the share of the cores
  const auto command = build_launch_command(options, machine(16, false));
  CHECK(exported(command, "MESHTRAIN_THREADS") == "3");
  CHECK(exported(command, "OMP_NUM_THREADS") == "3");
}

TEST_CASE("meshrun: --bind overrides the automatic binding", "[meshrun]") {
  auto options = options_for(4);
  options.bind = Binding::kCore;
  const auto forced_core = build_launch_command(options, machine(2, false));
  CHECK(after(forced_core, "--bind-to") == "core");
  CHECK(has(forced_core, "--oversubscribe")); // binding does not change the slot count
  options = options_for(2);
  options.bind = Binding::kNone;
  CHECK(after(build_launch_command(options, machine(8, false)), "--bind-to") == "none");
}

TEST_CASE("meshrun: a hostfile spreads the ranks over its hosts", "[meshrun]") {
  using meshtrain::launch::count_hostfile_hosts;
  CHECK(count_hostfile_hosts("# cluster\nnode1 slots=2\n\n  node2 slots=2 # fast one\nnode1\n") ==
        2);
  CHECK(count_hostfile_hosts("# nothing but comments\n   \n") == 0);

  auto options = options_for(4);
  options.hostfile = "hosts.txt";
  auto context = machine(2, false);
  context.hostfile_hosts = 2;
  // 4 ranks over 2 hosts of 2 cores: 2 per node, so no oversubscription and core binding.
  const auto command = build_launch_command(options, context);
  CHECK(after(command, "--hostfile") == "hosts.txt");
  CHECK_FALSE(has(command, "--oversubscribe"));
  CHECK(after(command, "--bind-to") == "core");
  CHECK(exported(command, "MESHTRAIN_THREADS") == "1");
  const auto share = meshtrain::launch::node_share(options, context);
  CHECK(share.nodes == 2);
  CHECK(share.ranks_per_node == 2);
}

TEST_CASE("meshrun: LaunchContext::detect reads the machine and the hostfile", "[meshrun]") {
  char path[] = "/tmp/meshrun_hostsXXXXXX";
  const int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  const std::string text = "alpha slots=4\nbeta slots=4\ngamma slots=4\n";
  REQUIRE(write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
  close(fd);

  auto options = options_for(6);
  options.hostfile = path;
  const auto context = LaunchContext::detect(options);
  CHECK(context.hostfile_hosts == 3);
  CHECK(context.cores >= 1);
  CHECK(context.root == (geteuid() == 0));
  std::remove(path);

  REQUIRE_THROWS_WITH(LaunchContext::detect(options),
                      Catch::Contains(std::string("--hostfile '") + path + "' cannot be read") &&
                          Catch::Contains("No such file or directory"));
}

TEST_CASE("meshrun: inside SLURM the ranks start with srun", "[meshrun]") {
  auto context = machine(2, /*root=*/true);
  context.env = {{"SLURM_JOB_ID", "42"}};
  CHECK(build_launch_command(options_for(4, 2), context) ==
        Words{"srun", "-n", "4", "--cpu-bind=none",
              "--export=ALL,MESHTRAIN_TP=2,MESHTRAIN_CP=1,MESHTRAIN_PP=1,MESHTRAIN_WORLD_SIZE=4,"
              "MESHTRAIN_THREADS=1,OMP_NUM_THREADS=1",
              "./train", "--steps", "10"});
  // The allocation's nodes and CPUs decide the share, not the machine meshrun runs on.
  context.env = {{"SLURM_JOB_ID", "42"}, {"SLURM_JOB_NUM_NODES", "2"}, {"SLURM_CPUS_ON_NODE", "8"}};
  const auto multi = build_launch_command(options_for(4, 2), context);
  CHECK(multi[3] == "--cpu-bind=cores");
  CHECK(multi[4] == "--export=ALL,MESHTRAIN_TP=2,MESHTRAIN_CP=1,MESHTRAIN_PP=1,MESHTRAIN_WORLD_"
                    "SIZE=4,MESHTRAIN_THREADS=4,"
                    "OMP_NUM_THREADS=4");
  CHECK_FALSE(has(multi, "--allow-run-as-root"));

  auto options = options_for(4);
  options.hostfile = "hosts.txt";
  REQUIRE_THROWS_WITH(build_launch_command(options, context),
                      Catch::Contains("--hostfile is not used inside a SLURM allocation") &&
                          Catch::Contains("SLURM_JOB_ID=42"));
  // An empty SLURM_JOB_ID is not an allocation.
  context.env = {{"SLURM_JOB_ID", ""}};
  CHECK(build_launch_command(options_for(2), context).front() == "mpirun");
}

TEST_CASE("meshrun: flags before '--', the program untouched after it", "[meshrun]") {
  const auto parsed = parse_launch_args({"-n", "8",          "--tp",  "2",         "--cp",
                                         "2",  "--hostfile", "hosts", "--dry-run", "--threads",
                                         "3",  "--bind",     "none",  "--",        "./train",
                                         "-n", "7",          "--tp",  "5",         "--"});
  REQUIRE_FALSE(parsed.help);
  const auto& options = parsed.options;
  CHECK(options.ranks == 8);
  CHECK(options.tp == 2);
  CHECK(options.cp == 2);
  CHECK(options.hostfile == "hosts");
  CHECK(options.dry_run);
  CHECK(options.threads == 3);
  CHECK(options.bind == Binding::kNone);
  CHECK(options.program == Words{"./train", "-n", "7", "--tp", "5", "--"});

  const auto defaults = parse_launch_args({"--np", "2", "--", "true"}).options;
  CHECK(defaults.ranks == 2);
  CHECK(defaults.tp == 1);
  CHECK(defaults.cp == 1);
  CHECK(defaults.threads == 0);
  CHECK(defaults.bind == Binding::kAuto);
  CHECK_FALSE(defaults.dry_run);
  CHECK(defaults.hostfile.empty());

  // --help needs nothing else and checks nothing else.
  CHECK(parse_launch_args({"--help"}).help);
  CHECK(parse_launch_args({"-n", "3", "--tp", "2", "-h"}).help);
}

TEST_CASE("meshrun: bad flags name the value and what is allowed", "[meshrun]") {
  // The acceptance case: `meshrun -n 3 --tp 2 -- true` stops before launching anything.
  REQUIRE_THROWS_AS(parse_launch_args({"-n", "3", "--tp", "2", "--", "true"}),
                    meshtrain::launch::UsageError);
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "3", "--tp", "2", "--", "true"}),
                      Catch::Contains("-n 3 --tp 2: cannot infer dp: the world size 3 is not "
                                      "divisible by cp x tp x pp = 2 (tp 2)") &&
                          Catch::Contains("may be 1 or 3"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "12", "--tp", "5", "--", "true"}),
                      Catch::Contains("may be 1, 2, 3, 4, 6 or 12"));
  // --cp goes through the same validator (cp x tp must divide -n).
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "4", "--tp", "2", "--cp", "3", "--", "true"}),
                      Catch::Contains("-n 4 --tp 2 --cp 3: cannot infer dp: the world size 4 is "
                                      "not divisible by cp x tp x pp = 6"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2", "--cp", "0", "--", "true"}),
                      Catch::Equals("--cp 0: must be in [1, 2147483647]"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "0", "--", "true"}),
                      Catch::Equals("-n 0: must be in [1, 2147483647]"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "two", "--", "true"}),
                      Catch::Equals("-n two: not an integer"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "-4", "--", "true"}),
                      Catch::Equals("-n -4: must be in [1, 2147483647]"));
  REQUIRE_THROWS_WITH(parse_launch_args({"--", "true"}), Catch::StartsWith("-n is required"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2", "--tp", "0", "--", "true"}),
                      Catch::Equals("--tp 0: must be in [1, 2147483647]"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2", "--threads", "0", "--", "true"}),
                      Catch::Equals("--threads 0: must be in [1, 2147483647]"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2", "--bind", "socket", "--", "true"}),
                      Catch::Equals("--bind must be 'core' or 'none', got 'socket'"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2"}),
                      Catch::StartsWith("no program to run: give it after '--'"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2", "--"}), Catch::StartsWith("no program to run"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2", "./train"}),
                      Catch::StartsWith("unexpected argument './train' before '--'"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n", "2", "--gpus", "4", "--", "true"}),
                      Catch::Contains("gpus") && Catch::Contains("see meshrun --help"));
  REQUIRE_THROWS_WITH(parse_launch_args({"-n"}),
                      Catch::Contains("n") && Catch::Contains("see meshrun --help"));
  // Options built in code are checked the same way before a command is built.
  REQUIRE_THROWS_WITH(build_launch_command(options_for(6, 4), machine(2, false)),
                      Catch::Contains("-n 6 --tp 4: cannot infer dp"));
}

TEST_CASE("meshrun: --help documents every flag", "[meshrun]") {
  const auto help = meshtrain::launch::launch_usage();
  for (const char* flag : {"-n, --np", "--tp", "--hostfile", "--dry-run", "--threads", "--bind",
                           "--help", "MESHTRAIN_TP", "MESHTRAIN_WORLD_SIZE", "MESHTRAIN_THREADS",
                           "OMP_NUM_THREADS", "SLURM_JOB_ID"}) {
    INFO(flag);
    CHECK(help.find(flag) != std::string::npos);
  }
}

TEST_CASE("meshrun: --dry-run output is shell-quoted", "[meshrun]") {
  using meshtrain::launch::shell_quote;
  CHECK(shell_quote({"mpirun", "-np", "2", "-x", "MESHTRAIN_TP=1", "./a.out", "--lr=3e-4",
                     "x,y"}) == "mpirun -np 2 -x MESHTRAIN_TP=1 ./a.out --lr=3e-4 x,y");
  CHECK(shell_quote({"echo", "two words", "it's", "", "$HOME", "a*b"}) ==
        R"(echo 'two words' 'it'\''s' '' '$HOME' 'a*b')");
}
