// defines: meshtrain_fuzz_init (what every fuzz target does once before the first input) and
// FUZZ_REQUIRE (an invariant of an accepted input; a failure aborts, which libFuzzer reports).
#pragma once

#include <c10/util/Logging.h>

#include <cstdio>
#include <cstdlib>
#include <string>

// Not MT_ASSERT: that throws c10::Error, which the targets catch as a clean rejection.
#define FUZZ_REQUIRE(cond)                                                                         \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      std::fprintf(stderr, "%s:%d: FUZZ_REQUIRE(%s) failed\n", __FILE__, __LINE__, #cond);         \
      std::abort();                                                                                \
    }                                                                                              \
  } while (false)

namespace meshtrain {

// A c10::Error records a symbolised C++ backtrace when it is made: most fuzz inputs are
// rejected with one, and the backtrace would cost more than the parse. Fuzzing only needs the
// message, so the fetcher is replaced by one that returns nothing.
inline void meshtrain_fuzz_init() {
  c10::SetStackTraceFetcher([] { return std::string(); });
}

} // namespace meshtrain
