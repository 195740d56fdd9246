// defines: the pure logic of the meshrun launcher — LaunchOptions (its flags), LaunchContext
// (what it knows about the machine: cores, root, SLURM variables, hostfile hosts),
// parse_launch_args, check_launch_options, build_launch_command, shell_quote, UsageError.
//
// Nothing here starts a process or reads the machine except LaunchContext::detect, so every
// decision (oversubscribe, binding, threads per rank, mpirun vs srun) is unit-tested with an
// injected context. launch/meshrun_main.cpp runs the command. See docs/launcher.md.
#pragma once

#include "meshtrain/launch/cli.h"

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace meshtrain::launch {

// A bad flag or layout: meshrun prints the message and exits with kUsageExitCode (the
// command-line helper's type and code, launch/cli.h).
using UsageError = cli::UsageError;
constexpr int kUsageExitCode = cli::kExitUsage;

enum class Binding { kAuto, kCore, kNone };

struct LaunchOptions {
  int ranks = 0; // -n; 0 means "not given"
  int tp = 1;    // --tp, exported as MESHTRAIN_TP
  int cp = 1;    // --cp, exported as MESHTRAIN_CP
  int pp = 1;    // --pp, exported as MESHTRAIN_PP
  std::string hostfile;
  bool dry_run = false;
  int threads = 0; // --threads; 0: cores per node / ranks per node, at least 1
  Binding bind = Binding::kAuto;
  std::vector<std::string> program; // the program and its arguments (after "--")
};

// What meshrun reads from the machine it runs on. Tests build one by hand.
struct LaunchContext {
  int cores = 1;     // std::thread::hardware_concurrency() of this machine
  bool root = false; // geteuid() == 0: OpenMPI refuses root without --allow-run-as-root
  // The environment variables meshrun looks at (SLURM_JOB_ID, SLURM_JOB_NUM_NODES,
  // SLURM_CPUS_ON_NODE); others may be present and are ignored.
  std::map<std::string, std::string> env;
  // Distinct hosts named in --hostfile; 0 when no hostfile is given.
  int hostfile_hosts = 0;

  // Reads this machine, this process's environment and options.hostfile (throws UsageError
  // when the hostfile cannot be read or names no host).
  static LaunchContext detect(const LaunchOptions& options);
};

struct ParsedArgs {
  LaunchOptions options;
  bool help = false; // --help: print launch_usage() and exit 0, nothing else is checked
};

// Parses the arguments after argv[0]. Everything after the first "--" is the program and is
// never interpreted. Throws UsageError naming the flag, the value and what is allowed.
ParsedArgs parse_launch_args(const std::vector<std::string>& args);

// The --help text: every flag, the environment the ranks receive, exit codes.
std::string launch_usage();

// Checks what can be checked without the machine: -n >= 1, --tp, --cp and --pp >= 1 with
// tp x cp x pp dividing -n (ParallelPlan::validate), --threads >= 1 when given, a program after
// "--". Throws UsageError.
void check_launch_options(const LaunchOptions& options);

// Distinct host names in the text of an OpenMPI hostfile ("host [slots=K ...]" lines,
// '#' comments). Pure; LaunchContext::detect uses it.
int count_hostfile_hosts(const std::string& text);

// How the ranks share a node, as meshrun assumes it (ranks spread evenly over the nodes).
struct NodeShare {
  int nodes = 1;          // SLURM_JOB_NUM_NODES, hostfile hosts, or 1
  int cores_per_node = 1; // SLURM_CPUS_ON_NODE inside SLURM, else this machine's cores
  int ranks_per_node = 1; // ceil(ranks / nodes)
  int threads = 1;        // --threads, else max(1, cores_per_node / ranks_per_node)
};
NodeShare node_share(const LaunchOptions& options, const LaunchContext& context);

// True inside a SLURM allocation (SLURM_JOB_ID set and not empty): ranks start with srun.
bool in_slurm(const LaunchContext& context);

// The full command line (argv[0] is "mpirun" or "srun"). Calls check_launch_options first;
// also throws UsageError for --hostfile inside SLURM.
std::vector<std::string> build_launch_command(const LaunchOptions& options,
                                              const LaunchContext& context);

// One line a POSIX shell reads back as the same words (for --dry-run).
std::string shell_quote(const std::vector<std::string>& words);

} // namespace meshtrain::launch
