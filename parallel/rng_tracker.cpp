// defines: RngTracker and the default CPU generator helpers (see rng_tracker.h).
#include "meshtrain/parallel/rng_tracker.h"

#include "meshtrain/core/errors.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

namespace meshtrain {
namespace {

// A fresh generator of `device`'s kind, seeded with `seed` (independent of the default one).
at::Generator make_generator(const torch::Device& device, uint64_t seed) {
  auto gen = at::globalContext().defaultGenerator(device).clone();
  gen.set_current_seed(seed);
  return gen;
}

} // namespace

torch::Tensor default_cpu_generator_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_default_cpu_generator_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

RngTracker::RngTracker(RngTrackerOptions options, const CommunicatorPtr& tp_group)
    : options_(std::move(options)) {
  reseed(options_.seed(), tp_group);
}

void RngTracker::reseed(uint64_t seed, const CommunicatorPtr& tp_group) {
  MT_CHECK(tp_group != nullptr, "RngTracker: the tp communicator is null");
  options_.seed(seed);
  tp_rank_ = tp_group->rank();
  shared_ = make_generator(options_.device(), this->seed(RngStream::kShared));
  tensor_parallel_ = make_generator(options_.device(), this->seed(RngStream::kTensorParallel));
}

uint64_t RngTracker::seed(RngStream stream) const {
  return stream == RngStream::kShared
             ? options_.seed()
             : options_.seed() + options_.tp_offset() + static_cast<uint64_t>(tp_rank_);
}

at::Generator& RngTracker::generator(RngStream stream) {
  return stream == RngStream::kShared ? shared_ : tensor_parallel_;
}

torch::Tensor RngTracker::dropout(const torch::Tensor& x, double p, bool training,
                                  RngStream stream) {
  MT_CHECK(p >= 0.0 && p <= 1.0, "dropout probability must be in [0, 1], got ", p);
  if (!training || p == 0.0) {
    return x;
  }
  if (p == 1.0) {
    return x * 0;
  }
  MT_CHECK(x.device() == options_.device(), "RngTracker::dropout: activations on ", x.device(),
           " but the tracker's streams are on ", options_.device());
  torch::Tensor mask;
  {
    torch::NoGradGuard no_grad;
    // Scaled mask: 1/(1-p) where kept, 0 where dropped.
    mask = torch::empty_like(x).bernoulli_(1.0 - p, generator(stream)).div_(1.0 - p);
  }
  return x * mask;
}

RngTrackerState RngTracker::get_state() const {
  return RngTrackerState{shared_.get_state(), tensor_parallel_.get_state()};
}

void RngTracker::set_state(const RngTrackerState& state) {
  MT_CHECK(state.shared.defined() && state.tensor_parallel.defined(),
           "RngTracker::set_state: the state has an undefined stream");
  shared_.set_state(state.shared);
  tensor_parallel_.set_state(state.tensor_parallel);
}

RngTracker::ForkGuard::ForkGuard(RngTracker& tracker, RngStream stream)
    : stream_(tracker.generator(stream)),
      default_(at::globalContext().defaultGenerator(tracker.options().device())) {
  std::lock_guard<std::mutex> lock(default_.mutex());
  saved_default_ = default_.get_state();
  default_.set_state(stream_.get_state());
}

RngTracker::ForkGuard::~ForkGuard() {
  std::lock_guard<std::mutex> lock(default_.mutex());
  stream_.set_state(default_.get_state());
  default_.set_state(saved_default_);
}

} // namespace meshtrain
