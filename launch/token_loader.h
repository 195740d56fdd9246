// defines: TokenLoaderOptions, MicroBatch, TokenLoader — the layout-independent data order of
// DESIGN §3 over an llm.c token file, with a background prefetch of the next step.
//
// With N tokens and sequence length T there are S = floor((N-1)/T) samples; sample g is
// tokens [(g mod S)*T, (g mod S)*T + T + 1) (inputs = first T, targets = last T). Step s
// with global batch B consumes g = s*B + i, i in [0, B). DP rank r of D, micro-step m,
// micro-batch b takes i = m*D*b + r*b + j. With shuffle, (g mod S) goes through a seeded
// permutation drawn per epoch e = g / S (the same on every rank and every layout).
#pragma once

#include "meshtrain/core/token_file.h"

#include <torch/torch.h>

#include <future>
#include <map>
#include <memory>
#include <vector>

namespace meshtrain {

struct TokenLoaderOptions {
  int64_t seq_len = 256;    // T
  int64_t global_batch = 8; // B, sequences per optimizer step over all DP ranks
  int64_t micro_batch = 8;  // b, sequences per forward on one DP rank
  int dp_rank = 0;          // r
  int dp_size = 1;          // D
  bool shuffle = false;
  uint64_t seed = 1337;
  bool prefetch = true; // prepare step s+1 on a background thread during step s
};

struct MicroBatch {
  torch::Tensor inputs;  // [b, T] int64
  torch::Tensor targets; // [b, T] int64
};

class TokenLoader {
public:
  // Throws naming the values when B is not a multiple of b*D or the file is too short.
  TokenLoader(std::shared_ptr<const TokenFile> file, TokenLoaderOptions options);
  ~TokenLoader();

  int64_t num_samples() const { return num_samples_; }
  // M = B / (b * D): micro-steps per optimizer step on each DP rank.
  int64_t accumulation_steps() const { return accumulation_; }
  const TokenLoaderOptions& options() const { return options_; }
  const TokenFile& file() const { return *file_; }

  // The global sample index g -> its position in the file (sample number in [0, S)).
  int64_t sample_position(int64_t g) const;
  // This rank's M micro-batches of step `step` (pure: same answer every call).
  std::vector<MicroBatch> step_batches(int64_t step) const;
  // Sequential access with prefetch: returns step next_step() and advances.
  std::vector<MicroBatch> next();
  int64_t next_step() const { return next_step_; }
  void seek(int64_t step);

private:
  const std::vector<int64_t>& permutation(int64_t epoch) const;

  std::shared_ptr<const TokenFile> file_;
  TokenLoaderOptions options_;
  int64_t num_samples_ = 0;
  int64_t accumulation_ = 1;
  int64_t next_step_ = 0;
  std::future<std::vector<MicroBatch>> pending_;
  int64_t pending_step_ = -1;
  mutable std::mutex perm_mutex_;
  mutable std::map<int64_t, std::vector<int64_t>> permutations_; // epoch -> permutation
};

} // namespace meshtrain
