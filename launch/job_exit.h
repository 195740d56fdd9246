// defines: agree_on_exit, message_of — how a training program's ranks end together with one
// exit code and one error message (shared by train_mnist and train_gpt).
#pragma once

#include "core/communicator.h"

#include <exception>
#include <string>

namespace meshtrain {

// Every rank brings its exit code (0: fine) and message; all return the largest code. The
// lowest failing rank prints "<program>: error: <message>" (deterministic errors would
// otherwise be printed once per rank). Collective over `group`: without it a rank that
// failed alone would leave the others blocked in their next collective.
int agree_on_exit(const CommunicatorPtr& group, int code, const std::string& message,
                  const std::string& program);

// The message of an exception, without c10's C++ backtrace (not for users).
std::string message_of(const std::exception& e);

} // namespace meshtrain
