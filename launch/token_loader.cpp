// defines: TokenLoader (see token_loader.h).
#include "meshtrain/launch/token_loader.h"

#include "meshtrain/core/errors.h"

#include <numeric>
#include <random>

namespace meshtrain {

TokenLoader::TokenLoader(std::shared_ptr<const TokenFile> file, TokenLoaderOptions options)
    : file_(std::move(file)), options_(options) {
  const auto& o = options_;
  MT_CHECK(o.seq_len >= 1, "sequence length must be >= 1, got ", o.seq_len);
  MT_CHECK(o.micro_batch >= 1, "micro-batch size must be >= 1, got ", o.micro_batch);
  MT_CHECK(o.dp_size >= 1 && o.dp_rank >= 0 && o.dp_rank < o.dp_size, "dp rank ", o.dp_rank,
           " is outside dp size ", o.dp_size);
  MT_CHECK(o.global_batch >= 1 && o.global_batch % (o.micro_batch * o.dp_size) == 0,
           "global batch ", o.global_batch, " must be a multiple of micro-batch ", o.micro_batch,
           " x dp ", o.dp_size, " = ", o.micro_batch * o.dp_size);
  num_samples_ = (file_->size() - 1) / o.seq_len;
  MT_CHECK(file_->size() >= 1 && num_samples_ >= 1, file_->path(), " has ", file_->size(),
           " tokens: too few for one sample of sequence length ", o.seq_len, " (needs ",
           o.seq_len + 1, ")");
  accumulation_ = o.global_batch / (o.micro_batch * o.dp_size);
}

TokenLoader::~TokenLoader() {
  if (pending_.valid()) {
    pending_.wait();
  }
}

const std::vector<int64_t>& TokenLoader::permutation(int64_t epoch) const {
  std::lock_guard<std::mutex> lock(perm_mutex_);
  auto it = permutations_.find(epoch);
  if (it != permutations_.end()) {
    return it->second;
  }
  // Fisher-Yates with a fixed engine: identical on every rank, layout and LibTorch version.
  std::vector<int64_t> perm(num_samples_);
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 engine(options_.seed * 1000003ULL + static_cast<uint64_t>(epoch));
  for (int64_t i = num_samples_ - 1; i > 0; --i) {
    std::uniform_int_distribution<int64_t> pick(0, i);
    std::swap(perm[i], perm[pick(engine)]);
  }
  if (permutations_.size() > 2) {
    permutations_.erase(permutations_.begin()); // only the current and next epoch matter
  }
  return permutations_.emplace(epoch, std::move(perm)).first->second;
}

int64_t TokenLoader::sample_position(int64_t g) const {
  const int64_t local = g % num_samples_;
  return options_.shuffle ? permutation(g / num_samples_)[local] : local;
}

std::vector<MicroBatch> TokenLoader::step_batches(int64_t step) const {
  const auto& o = options_;
  const int64_t T = o.seq_len;
  std::vector<MicroBatch> out;
  out.reserve(accumulation_);
  for (int64_t m = 0; m < accumulation_; ++m) {
    auto window = torch::empty({o.micro_batch, T + 1}, torch::kLong); // [b, T+1]
    for (int64_t j = 0; j < o.micro_batch; ++j) {
      const int64_t i = m * o.dp_size * o.micro_batch + o.dp_rank * o.micro_batch + j;
      const int64_t g = step * o.global_batch + i;
      window[j].copy_(file_->slice(sample_position(g) * T, T + 1));
    }
    out.push_back({window.narrow(1, 0, T).contiguous(), window.narrow(1, 1, T).contiguous()});
  }
  return out;
}

std::vector<MicroBatch> TokenLoader::next() {
  std::vector<MicroBatch> batches;
  if (pending_.valid() && pending_step_ == next_step_) {
    batches = pending_.get();
  } else {
    if (pending_.valid()) {
      pending_.wait();
    }
    batches = step_batches(next_step_);
  }
  ++next_step_;
  if (options_.prefetch) {
    pending_step_ = next_step_;
    pending_ = std::async(std::launch::async, [this, s = next_step_] { return step_batches(s); });
  }
  return batches;
}

void TokenLoader::seek(int64_t step) {
  MT_CHECK(step >= 0, "cannot seek the loader to step ", step);
  next_step_ = step;
}

} // namespace meshtrain
