// defines: start_runtime, agree_on_exit, message_of, exit_after_failure — how a program's ranks
// start and end together with one exit code and one error message (train_mnist, train_gpt,
// sample_gpt).
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/core/runtime.h"

#include <exception>
#include <memory>
#include <string>

namespace meshtrain {

// The process's Runtime (MPI start-up); null when it cannot start, after printing
// "<program>: error: <why>" (the program then exits 1).
std::unique_ptr<Runtime> start_runtime(int* argc, char*** argv, const std::string& program);

// Every rank brings its exit code (0: fine) and message; all return the largest code. The
// lowest failing rank prints "<program>: error: <message>" (deterministic errors would
// otherwise be printed once per rank). Collective over `group`: without it a rank that
// failed alone would leave the others blocked in their next collective.
int agree_on_exit(const CommunicatorPtr& group, int code, const std::string& message,
                  const std::string& program);

// The message of an exception, without c10's C++ backtrace (not for users).
std::string message_of(const std::exception& e);

// For a failure on one rank after the set-up: prints "<program>: rank <r>: error: ..." and
// returns `code` on a world of one; on a larger world it ends the process at once without
// MPI_Finalize (the other ranks may wait in a collective that never completes, and finalizing
// would wait for them), so that mpirun stops the whole job.
int exit_after_failure(const std::string& program, const CommunicatorPtr& world,
                       const std::exception& e, int code);

} // namespace meshtrain
