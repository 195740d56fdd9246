// defines: bench_context_parallel — the load balance of ring attention
// (parallel/ring_attention.h) over the cp group it is started with (cp = world size), for the
// balanced split (rank r holds chunks r and 2cp-1-r) against the contiguous one (rank r holds
// the r-th T/cp tokens), printed as Markdown tables:
//   per rank     the block pairs its forward computed (full, diagonal, skipped), counted by
//                the ring itself (RingAttentionOptions::work), their causal and computed
//                GFLOP, and the median forward + backward milliseconds over --steps calls
//   per split    max/min over the ranks of the causal FLOPs, the computed FLOPs and the time
// and, with --closed-form, the same counts at any cp without running (ring_attention_work).
//
//   mpirun -np 4 bench_context_parallel --seq-len 1024
//   bench_context_parallel --closed-form 8 --seq-len 4096
//
// The counts are exact; times on an oversubscribed machine are noisy (every rank shares the
// cores), so the FLOP ratios are the figure of record.
#include "meshtrain/core/cpu_features.h"
#include "meshtrain/core/runtime.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/parallel/context_parallel.h"
#include "meshtrain/parallel/ring_attention.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <vector>

using namespace meshtrain;

namespace {

struct RankFigures {
  RingAttentionWork work;
  double ms = 0;
};

double ratio(const std::vector<double>& v) {
  return *std::max_element(v.begin(), v.end()) / *std::min_element(v.begin(), v.end());
}

void print_table(const char* split, const std::vector<RankFigures>& ranks, bool timed) {
  std::printf("\n%s split\n\n| rank | chunks | full | diagonal | skipped | causal GFLOP | "
              "computed GFLOP |%s\n|---|---|---:|---:|---:|---:|---:|%s\n",
              split, timed ? " fwd+bwd ms |" : "", timed ? "---:|" : "");
  std::vector<double> causal, computed, ms;
  const int cp = static_cast<int>(ranks.size());
  for (int r = 0; r < cp; ++r) {
    const auto& w = ranks[r].work;
    const auto chunks = context_chunks(
        cp, r,
        std::string(split) == "balanced" ? ContextSplit::kBalanced : ContextSplit::kContiguous);
    std::printf("| %d | %lld, %lld | %lld | %lld | %lld | %.3f | %.3f |", r,
                static_cast<long long>(chunks[0]), static_cast<long long>(chunks[1]),
                static_cast<long long>(w.full_pairs), static_cast<long long>(w.diagonal_pairs),
                static_cast<long long>(w.skipped_pairs), w.causal_flops / 1e9,
                w.computed_flops / 1e9);
    if (timed) {
      std::printf(" %.1f |", ranks[r].ms);
    }
    std::printf("\n");
    causal.push_back(w.causal_flops);
    computed.push_back(w.computed_flops);
    ms.push_back(ranks[r].ms);
  }
  std::printf("\nmax/min over ranks: causal FLOPs %.3f, computed FLOPs %.3f", ratio(causal),
              ratio(computed));
  if (timed) {
    std::printf(", time %.2f", ratio(ms));
  }
  std::printf("\n");
}

} // namespace

int main(int argc, char** argv) {
  Runtime runtime(&argc, &argv);
  cxxopts::Options options("bench_context_parallel",
                           "Load balance of ring attention: balanced vs contiguous split");
  // clang-format off
  options.add_options()
    ("batch", "sequences B", cli::text("2"))
    ("heads", "attention heads h", cli::text("4"))
    ("head-dim", "head size D", cli::text("32"))
    ("seq-len", "sequence length T (divisible by 2 x cp)", cli::text("1024"))
    ("steps", "timed forward + backward calls per split", cli::text("5"))
    ("closed-form", "print the counts of this cp without running (no MPI needed)",
     cli::text("0"))
    ("h,help", "print this help");
  // clang-format on
  const auto& world = runtime.world();
  int64_t b = 0, h = 0, d = 0, t = 0;
  int steps = 0, closed = 0;
  try {
    const cli::ParsedFlags flags(options, argc, argv);
    if (flags.help()) {
      std::cout << options.help() << "\n";
      return 0;
    }
    b = flags.integer("batch", 1, 1 << 16);
    h = flags.integer("heads", 1, 1 << 12);
    d = flags.integer("head-dim", 1, 1 << 12);
    t = flags.integer("seq-len", 2, 1 << 24);
    steps = static_cast<int>(flags.integer("steps", 1, 1 << 20));
    closed = static_cast<int>(flags.integer("closed-form", 0, 1 << 16));
    const int cp = closed > 0 ? closed : world->size();
    if (t % (2 * cp) != 0) {
      throw cli::UsageError("--seq-len " + std::to_string(t) +
                            ": must be divisible by 2 x cp = " + std::to_string(2 * cp));
    }
  } catch (const cli::UsageError& e) {
    std::cerr << "bench_context_parallel: " << e.what() << "\n";
    return cli::kExitUsage;
  }

  const bool rank0 = world->rank() == 0;
  if (closed > 0) {
    if (rank0) {
      std::printf("ring attention, closed form: cp %d, B %lld, h %lld, D %lld, T %lld\n", closed,
                  static_cast<long long>(b), static_cast<long long>(h), static_cast<long long>(d),
                  static_cast<long long>(t));
      for (const auto split : {ContextSplit::kBalanced, ContextSplit::kContiguous}) {
        std::vector<RankFigures> ranks(closed);
        for (int r = 0; r < closed; ++r) {
          ranks[r].work = ring_attention_work(b * h, t, d, closed, r, split);
        }
        print_table(to_string(split), ranks, false);
      }
    }
    return 0;
  }

  const int cp = world->size();
  const int rank = world->rank();
  if (rank0) {
    std::printf("%s\n", describe_cpu().c_str());
    std::printf("ring attention on %d rank(s) (cp = world), B %lld, h %lld, D %lld, T %lld, fp32, "
                "%d thread(s)/rank; median of %d forward + backward calls\n",
                cp, static_cast<long long>(b), static_cast<long long>(h), static_cast<long long>(d),
                static_cast<long long>(t), torch::get_num_threads(), steps);
  }
  auto gen = at::detail::createCPUGenerator(7);
  const auto q = at::randn({b, h, t, d}, gen);
  const auto k = at::randn({b, h, t, d}, gen);
  const auto v = at::randn({b, h, t, d}, gen);
  for (const auto split : {ContextSplit::kBalanced, ContextSplit::kContiguous}) {
    const auto local = [&](const torch::Tensor& x) {
      return take_context_chunks(x, 2, cp, rank, split).contiguous().requires_grad_();
    };
    const auto lq = local(q), lk = local(k), lv = local(v);
    std::vector<double> times;
    RankFigures mine;
    for (int s = 0; s < steps + 1; ++s) { // the first call warms up
      auto work = std::make_shared<RingAttentionWork>();
      world->barrier();
      const auto start = std::chrono::steady_clock::now();
      const auto out =
          ring_attention(lq, lk, lv, world, RingAttentionOptions().split(split).work(work));
      out.sum().backward();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count();
      if (s > 0) {
        times.push_back(ms);
      }
      mine.work = *work;
    }
    std::sort(times.begin(), times.end());
    mine.ms = times[times.size() / 2];
    // Rank 0 gathers every rank's figures: [full, diagonal, skipped, causal, computed, ms].
    auto row = torch::tensor({static_cast<double>(mine.work.full_pairs),
                              static_cast<double>(mine.work.diagonal_pairs),
                              static_cast<double>(mine.work.skipped_pairs), mine.work.causal_flops,
                              mine.work.computed_flops, mine.ms},
                             torch::kDouble);
    auto all = torch::empty({cp * 6}, torch::kDouble);
    world->all_gather(row, all);
    if (rank0) {
      std::vector<RankFigures> ranks(cp);
      for (int r = 0; r < cp; ++r) {
        const auto x = all.narrow(0, 6 * r, 6);
        ranks[r].work.full_pairs = static_cast<int64_t>(x[0].item<double>());
        ranks[r].work.diagonal_pairs = static_cast<int64_t>(x[1].item<double>());
        ranks[r].work.skipped_pairs = static_cast<int64_t>(x[2].item<double>());
        ranks[r].work.causal_flops = x[3].item<double>();
        ranks[r].work.computed_flops = x[4].item<double>();
        ranks[r].ms = x[5].item<double>();
      }
      print_table(to_string(split), ranks, true);
    }
  }
  return 0;
}
