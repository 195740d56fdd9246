// defines: MT_CHECK (user errors, throws c10::Error with the message), MT_ASSERT (internal
// invariants) and CommError (a transport failure; MPI return codes are wrapped in
// comm_mpi.cpp with file:line).
// The library never calls exit(): every failure is an exception the caller can handle.
#pragma once

#include <c10/util/Exception.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace meshtrain {

// Thrown by communication backends when the transport itself fails (not a bad argument).
class CommError : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

} // namespace meshtrain

// A user error: the message names the values and what is allowed.
#define MT_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
// An internal invariant: a failure is a bug in meshtrain, not in the caller's input.
#define MT_ASSERT(cond, ...) TORCH_INTERNAL_ASSERT(cond, __VA_ARGS__)
