// defines: the meshrun launcher's flag parsing, checks and command building (see meshrun.h).
#include "meshtrain/launch/meshrun.h"

#include "meshtrain/parallel/parallel_plan.h"

#include <cxxopts.hpp>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

namespace meshtrain::launch {
namespace {

// Variables meshrun reads from its own environment (the rest of the environment reaches the
// ranks unchanged through mpirun/srun).
constexpr const char* kContextVariables[] = {"SLURM_JOB_ID", "SLURM_JOB_NUM_NODES",
                                             "SLURM_CPUS_ON_NODE"};

// A flag value that must be a whole number >= 1 ("-n", "--tp", "--cp", "--threads").
int parse_count(const std::string& flag, const std::string& text) {
  return static_cast<int>(cli::parse_int(flag, text, 1, INT_MAX));
}

// A positive integer from the context's environment, or `fallback` when absent or not a
// plain number.
int env_count(const LaunchContext& context, const char* name, int fallback) {
  const auto it = context.env.find(name);
  if (it == context.env.end()) {
    return fallback;
  }
  char* end = nullptr;
  const long value = std::strtol(it->second.c_str(), &end, 10);
  return end != it->second.c_str() && *end == '\0' && value >= 1 && value <= INT_MAX
             ? static_cast<int>(value)
             : fallback;
}

cxxopts::Options make_parser() {
  cxxopts::Options parser("meshrun",
                          "Starts a meshtrain job: checks the layout, then runs the program on N "
                          "ranks with mpirun (or srun inside a SLURM allocation).");
  parser.custom_help(
      "-n N [--tp T] [--cp C] [--hostfile F] [--threads K] [--bind core|none] [--dry-run] "
      "-- PROGRAM [ARGS...]");
  // Values are read as strings and checked by parse_count, for messages that name the rule.
  auto add = parser.add_options();
  add("n,np", "number of ranks to start (required, >= 1)", cxxopts::value<std::string>(), "N");
  add("tp", "tensor-parallel size: must divide N; exported to the ranks as MESHTRAIN_TP",
      cxxopts::value<std::string>()->default_value("1"), "T");
  add("cp",
      "context-parallel size (ring attention over the sequence): cp x tp must divide N; "
      "exported to the ranks as MESHTRAIN_CP",
      cxxopts::value<std::string>()->default_value("1"), "C");
  add("pp", "pipeline stages: pp x cp x tp must divide N; exported to the ranks as MESHTRAIN_PP",
      cxxopts::value<std::string>()->default_value("1"), "P");
  add("hostfile", "OpenMPI hostfile naming the hosts (and slots) to run on; not with SLURM",
      cxxopts::value<std::string>(), "F");
  add("threads",
      "torch/OpenMP threads per rank (MESHTRAIN_THREADS, OMP_NUM_THREADS); default: cores per "
      "node / ranks per node, at least 1",
      cxxopts::value<std::string>(), "K");
  add("bind",
      "pin each rank to a core ('core') or not ('none'); default: core when ranks per node <= "
      "cores, none otherwise",
      cxxopts::value<std::string>(), "core|none");
  add("dry-run", "print the command (shell-quoted) and exit 0 without running it");
  add("h,help", "print this help and exit");
  return parser;
}

} // namespace

std::string launch_usage() {
  std::string text = make_parser().help();
  text += "\nEnvironment given to every rank:\n"
          "  MESHTRAIN_TP=T           the --tp value (programs use it as their default --tp)\n"
          "  MESHTRAIN_CP=C           the --cp value (programs use it as their default --cp)\n"
          "  MESHTRAIN_PP=P           the --pp value (programs use it as their default --pp)\n"
          "  MESHTRAIN_WORLD_SIZE=N   the number of ranks\n"
          "  MESHTRAIN_THREADS=K      torch intra-op threads per rank (read by Runtime)\n"
          "  OMP_NUM_THREADS=K        the same, for OpenMP/BLAS\n"
          "\nInside a SLURM allocation (SLURM_JOB_ID set) the ranks start with\n"
          "  srun -n N --export=ALL,MESHTRAIN_TP=T,MESHTRAIN_CP=C,... PROGRAM ARGS\n"
          "otherwise with mpirun (adding --allow-run-as-root as root and --oversubscribe when\n"
          "the ranks per node exceed the cores).\n"
          "\nExit status: the job's exit status; 2 for a bad flag or layout (nothing is started);\n"
          "126/127 when the launcher program cannot be run; 128+S when the job dies of signal S.\n"
          "\nExample:\n"
          "  meshrun -n 4 --tp 2 -- ./train_gpt --steps 100\n"
          "See docs/launcher.md.\n";
  return text;
}

ParsedArgs parse_launch_args(const std::vector<std::string>& args) {
  ParsedArgs parsed;
  // Split at the first "--" ourselves: the program's own flags (e.g. its -n) must never be
  // read as meshrun's.
  const auto separator = std::find(args.begin(), args.end(), std::string("--"));
  std::vector<const char*> argv{"meshrun"};
  for (auto it = args.begin(); it != separator; ++it) {
    argv.push_back(it->c_str());
  }
  if (separator != args.end()) {
    parsed.options.program.assign(separator + 1, args.end());
  }

  auto parser = make_parser();
  cxxopts::ParseResult result;
  try {
    result = parser.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const std::exception& e) {
    // cxxopts' own messages ("Option 'x' does not exist", "... is missing an argument").
    throw UsageError(std::string(e.what()) + " (see meshrun --help)");
  }
  if (result.count("help") != 0) {
    parsed.help = true;
    return parsed;
  }
  if (!result.unmatched().empty()) {
    const auto& word = result.unmatched().front();
    throw UsageError("unexpected argument '" + word + "' before '--': the program goes after '--'" +
                     ", e.g. meshrun -n 2 -- " + word);
  }

  auto& options = parsed.options;
  if (result.count("n") == 0) {
    throw UsageError("-n is required: the number of ranks to start, e.g. meshrun -n 2 -- ./train");
  }
  options.ranks = parse_count("n", result["n"].as<std::string>());
  options.tp = parse_count("tp", result["tp"].as<std::string>());
  options.cp = parse_count("cp", result["cp"].as<std::string>());
  options.pp = parse_count("pp", result["pp"].as<std::string>());
  if (result.count("threads") != 0) {
    options.threads = parse_count("threads", result["threads"].as<std::string>());
  }
  if (result.count("bind") != 0) {
    const auto bind = result["bind"].as<std::string>();
    if (bind == "core") {
      options.bind = Binding::kCore;
    } else if (bind == "none") {
      options.bind = Binding::kNone;
    } else {
      throw UsageError("--bind must be 'core' or 'none', got '" + bind + "'");
    }
  }
  if (result.count("hostfile") != 0) {
    options.hostfile = result["hostfile"].as<std::string>();
    if (options.hostfile.empty()) {
      throw UsageError("--hostfile must name a file, got ''");
    }
  }
  options.dry_run = result.count("dry-run") != 0;
  check_launch_options(options);
  return parsed;
}

void check_launch_options(const LaunchOptions& options) {
  if (options.ranks < 1) {
    throw UsageError("-n must be an integer >= 1, got '" + std::to_string(options.ranks) + "'");
  }
  if (options.tp < 1) {
    throw UsageError("--tp must be an integer >= 1, got '" + std::to_string(options.tp) + "'");
  }
  if (options.cp < 1) {
    throw UsageError("--cp must be an integer >= 1, got '" + std::to_string(options.cp) + "'");
  }
  if (options.pp < 1) {
    throw UsageError("--pp must be an integer >= 1, got '" + std::to_string(options.pp) + "'");
  }
  // The layout as far as it is known before launch, checked by the one layout validator
  // (the program checks the rest against its model and batch).
  ParallelPlan plan;
  plan.dims.tp = options.tp;
  plan.dims.cp = options.cp;
  plan.dims.pp = options.pp;
  try {
    plan.validate(options.ranks);
  } catch (const LayoutError& e) {
    throw UsageError("-n " + std::to_string(options.ranks) + " --tp " + std::to_string(options.tp) +
                     (options.cp > 1 ? " --cp " + std::to_string(options.cp) : std::string()) +
                     (options.pp > 1 ? " --pp " + std::to_string(options.pp) : std::string()) +
                     ": " + e.what());
  }
  if (options.threads < 0) {
    throw UsageError("--threads must be an integer >= 1, got '" + std::to_string(options.threads) +
                     "'");
  }
  if (options.program.empty()) {
    throw UsageError("no program to run: give it after '--', e.g. meshrun -n " +
                     std::to_string(options.ranks) + " -- ./train --steps 10");
  }
  if (options.program.front().empty()) {
    throw UsageError("the program after '--' is an empty string");
  }
}

int count_hostfile_hosts(const std::string& text) {
  std::set<std::string> hosts;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::string host;
    if (words >> host) {
      hosts.insert(host);
    }
  }
  return static_cast<int>(hosts.size());
}

LaunchContext LaunchContext::detect(const LaunchOptions& options) {
  LaunchContext context;
  // mpirun's default slot count is the number of physical cores it may use (hwloc), not
  // hardware threads: count distinct (package, core) pairs among the CPUs of our affinity
  // mask, so --oversubscribe and binding follow mpirun's view. Falls back to
  // hardware_concurrency() when the topology cannot be read.
  std::set<std::pair<std::string, std::string>> cores;
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof(mask), &mask) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &mask)) {
        continue;
      }
      const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
      std::ifstream package(dir + "physical_package_id");
      std::ifstream core(dir + "core_id");
      std::string package_id;
      std::string core_id;
      if (!(package >> package_id) || !(core >> core_id)) {
        cores.clear();
        break;
      }
      cores.emplace(package_id, core_id);
    }
  }
  context.cores = !cores.empty()
                      ? static_cast<int>(cores.size())
                      : static_cast<int>(std::max(1U, std::thread::hardware_concurrency()));
  context.root = geteuid() == 0;
  for (const char* name : kContextVariables) {
    if (const char* value = std::getenv(name)) {
      context.env[name] = value;
    }
  }
  if (!options.hostfile.empty()) {
    std::ifstream file(options.hostfile);
    if (!file) {
      throw UsageError("--hostfile '" + options.hostfile +
                       "' cannot be read: " + std::strerror(errno));
    }
    std::stringstream text;
    text << file.rdbuf();
    context.hostfile_hosts = count_hostfile_hosts(text.str());
    if (context.hostfile_hosts == 0) {
      throw UsageError("--hostfile '" + options.hostfile +
                       "' names no host (expected lines like 'node1 slots=8')");
    }
  }
  return context;
}

bool in_slurm(const LaunchContext& context) {
  const auto it = context.env.find("SLURM_JOB_ID");
  return it != context.env.end() && !it->second.empty();
}

NodeShare node_share(const LaunchOptions& options, const LaunchContext& context) {
  NodeShare share;
  // Nodes are assumed alike and evenly filled: meshrun cannot see remote machines, and this
  // is how SLURM's block distribution and a hostfile with equal slots place the ranks.
  if (in_slurm(context)) {
    share.nodes = env_count(context, "SLURM_JOB_NUM_NODES", 1);
    share.cores_per_node = env_count(context, "SLURM_CPUS_ON_NODE", std::max(1, context.cores));
  } else {
    share.nodes = std::max(1, context.hostfile_hosts);
    share.cores_per_node = std::max(1, context.cores);
  }
  const int ranks = std::max(1, options.ranks);
  share.nodes = std::min(share.nodes, ranks);
  share.ranks_per_node = (ranks + share.nodes - 1) / share.nodes;
  share.threads = options.threads > 0 ? options.threads
                                      : std::max(1, share.cores_per_node / share.ranks_per_node);
  return share;
}

std::vector<std::string> build_launch_command(const LaunchOptions& options,
                                              const LaunchContext& context) {
  check_launch_options(options);
  const auto share = node_share(options, context);
  const bool bind_core =
      options.bind == Binding::kCore ||
      (options.bind == Binding::kAuto && share.ranks_per_node <= share.cores_per_node);
  const std::string n = std::to_string(options.ranks);
  const std::string k = std::to_string(share.threads);
  const std::vector<std::pair<std::string, std::string>> rank_env = {
      {"MESHTRAIN_TP", std::to_string(options.tp)},
      {"MESHTRAIN_CP", std::to_string(options.cp)},
      {"MESHTRAIN_PP", std::to_string(options.pp)},
      {"MESHTRAIN_WORLD_SIZE", n},
      {"MESHTRAIN_THREADS", k},
      {"OMP_NUM_THREADS", k}};

  std::vector<std::string> command;
  if (in_slurm(context)) {
    if (!options.hostfile.empty()) {
      throw UsageError("--hostfile is not used inside a SLURM allocation (SLURM_JOB_ID=" +
                       context.env.at("SLURM_JOB_ID") +
                       "): srun places the ranks on the allocation's nodes");
    }
    // srun needs neither a root flag nor oversubscription: the allocation bounds the tasks.
    command = {"srun", "-n", n, bind_core ? "--cpu-bind=cores" : "--cpu-bind=none"};
    // ALL keeps the caller's environment, as mpirun does; the rest is the layout.
    std::string exports = "--export=ALL";
    for (const auto& [name, value] : rank_env) {
      exports += "," + name + "=" + value;
    }
    command.push_back(exports);
  } else {
    command = {"mpirun"};
    if (context.root) {
      command.emplace_back("--allow-run-as-root");
    }
    command.insert(command.end(), {"-np", n});
    if (share.ranks_per_node > share.cores_per_node) {
      command.emplace_back("--oversubscribe");
    }
    command.insert(command.end(), {"--bind-to", bind_core ? "core" : "none"});
    if (!options.hostfile.empty()) {
      command.insert(command.end(), {"--hostfile", options.hostfile});
    }
    for (const auto& [name, value] : rank_env) {
      command.insert(command.end(), {"-x", name + "=" + value});
    }
  }
  command.insert(command.end(), options.program.begin(), options.program.end());
  return command;
}

std::string shell_quote(const std::vector<std::string>& words) {
  std::string line;
  for (const auto& word : words) {
    if (!line.empty()) {
      line += ' ';
    }
    const bool plain =
        !word.empty() && word.find_first_not_of("abcdefghijklmnopqrstuvwxyz"
                                                "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                "0123456789_@%+=:,./-") == std::string::npos;
    if (plain) {
      line += word;
      continue;
    }
    // Inside single quotes nothing is special except the quote itself: close, escape, reopen.
    line += '\'';
    for (const char c : word) {
      line += c == '\'' ? std::string("'\\''") : std::string(1, c);
    }
    line += '\'';
  }
  return line;
}

} // namespace meshtrain::launch
