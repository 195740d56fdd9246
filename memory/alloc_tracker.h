// defines: MemoryTag, AllocationTracker, MemoryTagScope, peak_rss_bytes — a counting CPU allocator
// installed through c10 (SetCPUAllocator): current and peak bytes of live CPU tensors, in total and
// per tag (parameters, gradients, optimizer state, activations, other). Tags are per thread: an
// allocation belongs to the tag of the innermost MemoryTagScope of the thread making it.
//
// Only allocations made after install() are counted (tensors made before keep their original
// deleter and are invisible here), so install it first thing in a program or benchmark.
// The tracker delegates every allocation to the allocator that was installed before it.
// CUDA builds: the CUDA caching allocator's own statistics are the source there (issue 9).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

namespace meshtrain {

enum class MemoryTag : int { kOther, kParameters, kGradients, kOptimizer, kActivations, kCount };
const char* to_string(MemoryTag tag);

class AllocationTracker {
public:
  // Installs the counting allocator once per process (later calls return the same tracker).
  static AllocationTracker& install();
  // The tracker, or null before install().
  static AllocationTracker* get();

  int64_t current_bytes() const { return current(MemoryTag::kCount); }
  int64_t peak_bytes() const { return peak(MemoryTag::kCount); }
  // Bytes of one tag (kCount: all tags together).
  int64_t current(MemoryTag tag) const;
  int64_t peak(MemoryTag tag) const;
  int64_t allocations() const { return allocations_.load(); }
  // Starts a new peak window: every peak becomes its current value.
  void reset_peaks();

  // Called by the allocator.
  void on_allocate(int64_t bytes, MemoryTag tag);
  void on_free(int64_t bytes, MemoryTag tag);

private:
  AllocationTracker() = default;
  static constexpr int kSlots = static_cast<int>(MemoryTag::kCount) + 1; // + the total
  std::array<std::atomic<int64_t>, kSlots> current_{};
  std::array<std::atomic<int64_t>, kSlots> peak_{};
  std::atomic<int64_t> allocations_{0};
};

// Allocations of this thread inside the scope are counted under `tag` (scopes nest).
class MemoryTagScope {
public:
  explicit MemoryTagScope(MemoryTag tag);
  ~MemoryTagScope();
  MemoryTagScope(const MemoryTagScope&) = delete;
  MemoryTagScope& operator=(const MemoryTagScope&) = delete;
  static MemoryTag current();

private:
  MemoryTag previous_;
};

// Peak resident set size of this process in bytes since it started (getrusage's ru_maxrss,
// KiB on Linux): every allocation, torch's and ours, and mapped file pages; 0 if unknown.
int64_t peak_rss_bytes();

} // namespace meshtrain
