// defines: fnv1a64 — the one byte hash of the library: checkpoint files' checksums and the
// replica check's parameter hashes (parallel/param_init.h). Cheap and enough to tell a torn
// file or a diverged copy from a good one; not a cryptographic hash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace meshtrain {

constexpr uint64_t kFnv1a64Offset = 14695981039346656037ULL;
constexpr uint64_t kFnv1a64Prime = 1099511628211ULL;

// FNV-1a, 64 bit, over n bytes; `h` continues an earlier hash.
inline uint64_t fnv1a64(const void* data, size_t n, uint64_t h = kFnv1a64Offset) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h = (h ^ bytes[i]) * kFnv1a64Prime;
  }
  return h;
}

inline uint64_t fnv1a64(const std::string& bytes, uint64_t h = kFnv1a64Offset) {
  return fnv1a64(bytes.data(), bytes.size(), h);
}

} // namespace meshtrain
