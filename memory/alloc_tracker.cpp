// defines: the counting CPU allocator and AllocationTracker (see alloc_tracker.h).
#include "meshtrain/memory/alloc_tracker.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace meshtrain {
namespace {

thread_local MemoryTag current_tag = MemoryTag::kOther;
std::atomic<AllocationTracker*> installed{nullptr};

// The live counted allocations by data pointer: LibTorch's raw_allocate() requires the
// context of a DataPtr to be its data pointer, so size, tag and the underlying allocation
// (freed when its entry is erased) live here.
struct Counted {
  c10::DataPtr inner;
  int64_t bytes;
  MemoryTag tag;
};
std::mutex live_mutex;
std::unordered_map<void*, Counted> live;

// The allocator installed before ours: frees what was allocated before the install and is
// freed through whatever allocator is current (raw_deleter() is looked up at free time).
c10::DeleterFnPtr base_raw_deleter = nullptr;

void delete_counted(void* data) {
  Counted counted;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    auto node = live.extract(data);
    if (node.empty()) {
      base_raw_deleter(data);
      return;
    }
    counted = std::move(node.mapped());
  }
  installed.load()->on_free(counted.bytes, counted.tag);
} // counted.inner frees the memory here

class CountingAllocator final : public c10::Allocator {
public:
  explicit CountingAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    if (data == nullptr) { // empty tensors: nothing to count
      return inner;
    }
    const c10::Device device = inner.device();
    const MemoryTag tag = current_tag;
    {
      std::lock_guard<std::mutex> lock(live_mutex);
      live.emplace(data, Counted{std::move(inner), static_cast<int64_t>(n), tag});
    }
    installed.load()->on_allocate(static_cast<int64_t>(n), tag);
    return {data, data, &delete_counted, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_counted; }
  // LibTorch 2.x declares this pure virtual; 1.13 has no such member (so no `override`).
  void copy_data(void* dest, const void* src, std::size_t count) const {
    std::memcpy(dest, src, count);
  }

private:
  c10::Allocator* base_;
};

} // namespace

const char* to_string(MemoryTag tag) {
  switch (tag) {
  case MemoryTag::kOther:
    return "other";
  case MemoryTag::kParameters:
    return "parameters";
  case MemoryTag::kGradients:
    return "gradients";
  case MemoryTag::kOptimizer:
    return "optimizer";
  case MemoryTag::kActivations:
    return "activations";
  case MemoryTag::kCount:
    return "total";
  }
  return "?";
}

AllocationTracker& AllocationTracker::install() {
  static std::once_flag once;
  std::call_once(once, [] {
    static AllocationTracker tracker;
    installed.store(&tracker);
    // Priority above the default CPU allocator's, so a later default registration cannot
    // displace it.
    c10::Allocator* base = c10::GetCPUAllocator();
    base_raw_deleter = base->raw_deleter();
    static CountingAllocator allocator(base);
    c10::SetCPUAllocator(&allocator, /*priority=*/100);
  });
  return *installed.load();
}

AllocationTracker* AllocationTracker::get() {
  return installed.load();
}

int64_t AllocationTracker::current(MemoryTag tag) const {
  return current_[static_cast<int>(tag)].load();
}

int64_t AllocationTracker::peak(MemoryTag tag) const {
  return peak_[static_cast<int>(tag)].load();
}

void AllocationTracker::reset_peaks() {
  for (int i = 0; i < kSlots; ++i) {
    peak_[i].store(current_[i].load());
  }
}

void AllocationTracker::on_allocate(int64_t bytes, MemoryTag tag) {
  allocations_.fetch_add(1);
  for (const int slot : {static_cast<int>(tag), static_cast<int>(MemoryTag::kCount)}) {
    const int64_t now = current_[slot].fetch_add(bytes) + bytes;
    int64_t peak = peak_[slot].load();
    while (now > peak && !peak_[slot].compare_exchange_weak(peak, now)) {
    }
  }
}

void AllocationTracker::on_free(int64_t bytes, MemoryTag tag) {
  current_[static_cast<int>(tag)].fetch_sub(bytes);
  current_[static_cast<int>(MemoryTag::kCount)].fetch_sub(bytes);
}

MemoryTagScope::MemoryTagScope(MemoryTag tag) : previous_(current_tag) {
  current_tag = tag;
}

MemoryTagScope::~MemoryTagScope() {
  current_tag = previous_;
}

MemoryTag MemoryTagScope::current() {
  return current_tag;
}

int64_t peak_rss_bytes() {
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) != 0) {
    return 0;
  }
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

} // namespace meshtrain
