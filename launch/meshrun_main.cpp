// defines: main of the meshrun program — parses and checks the flags (launch/meshrun.h), then
// runs mpirun/srun as a child process, forwards SIGINT/SIGTERM to it and exits with the job's
// status. Usage and exit codes: docs/launcher.md.
#include "meshtrain/launch/meshrun.h"

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

namespace {

using meshtrain::launch::UsageError;

// Written once by the parent, before the forwarded signals are unblocked (pid_t is an int,
// as sig_atomic_t is, on Linux).
volatile std::sig_atomic_t g_child = 0;

void forward_signal(int signal, siginfo_t* info, void* /*context*/) {
  // A terminal's Ctrl-C reaches the whole foreground process group, mpirun included; the
  // kernel marks those SI_KERNEL. Sending it again would give mpirun two interrupts for one
  // Ctrl-C and start its abort twice. Signals sent to meshrun alone (kill, a batch system, a
  // CI timeout) are forwarded.
  if (info != nullptr && info->si_code == SI_KERNEL) {
    return;
  }
  if (g_child > 0) {
    kill(static_cast<pid_t>(g_child), signal);
  }
}

// fork + execvp + wait. Returns the job's exit status (128+S when it died of signal S), 127
// when the launcher is not found, 126 when it cannot be executed, 1 when fork fails.
int run_job(const std::vector<std::string>& command) {
  const int forwarded[] = {SIGINT, SIGTERM};
  struct sigaction action {};
  action.sa_sigaction = forward_signal;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigset_t block;
  sigemptyset(&block);
  for (const int s : forwarded) {
    sigaction(s, &action, nullptr);
    sigaddset(&block, s);
  }
  // Held back until g_child is known, so a signal that arrives during fork is forwarded
  // rather than dropped.
  sigset_t previous;
  sigprocmask(SIG_BLOCK, &block, &previous);

  std::vector<char*> argv;
  for (const auto& word : command) {
    argv.push_back(const_cast<char*>(word.c_str()));
  }
  argv.push_back(nullptr);

  std::cout.flush();
  std::cerr.flush();
  const pid_t child = fork();
  if (child < 0) {
    std::fprintf(stderr, "meshrun: fork failed: %s\n", std::strerror(errno));
    return 1;
  }
  if (child == 0) {
    // The job gets default dispositions and the caller's signal mask.
    struct sigaction defaults {};
    defaults.sa_handler = SIG_DFL;
    for (const int s : forwarded) {
      sigaction(s, &defaults, nullptr);
    }
    sigprocmask(SIG_SETMASK, &previous, nullptr);
    execvp(argv[0], argv.data());
    const int error = errno;
    std::fprintf(stderr, "meshrun: cannot run '%s': %s\n", argv[0], std::strerror(error));
    _exit(error == ENOENT ? 127 : 126);
  }
  g_child = child;
  sigprocmask(SIG_SETMASK, &previous, nullptr);

  int status = 0;
  while (waitpid(child, &status, 0) < 0) {
    if (errno != EINTR) {
      std::fprintf(stderr, "meshrun: waiting for '%s' failed: %s\n", argv[0], std::strerror(errno));
      return 1;
    }
  }
  if (WIFEXITED(status)) {
    return WEXITSTATUS(status);
  }
  if (WIFSIGNALED(status)) {
    return 128 + WTERMSIG(status);
  }
  return 1;
}

} // namespace

int main(int argc, char** argv) {
  namespace launch = meshtrain::launch;
  std::vector<std::string> command;
  try {
    const auto parsed = launch::parse_launch_args(std::vector<std::string>(argv + 1, argv + argc));
    if (parsed.help) {
      std::cout << launch::launch_usage();
      return 0;
    }
    const auto context = launch::LaunchContext::detect(parsed.options);
    command = launch::build_launch_command(parsed.options, context);
    if (parsed.options.dry_run) {
      std::cout << launch::shell_quote(command) << '\n';
      return 0;
    }
  } catch (const UsageError& e) {
    // Nothing has been started yet.
    std::cerr << "meshrun: " << e.what() << '\n';
    return launch::kUsageExitCode;
  }
  return run_job(command);
}
