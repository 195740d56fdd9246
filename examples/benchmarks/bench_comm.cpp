// defines: bench_comm — times meshtrain's collectives (all_reduce, reduce_scatter, all_gather,
// broadcast) against the raw MPI calls on MPI_COMM_WORLD, on the same buffers in the same run,
// and prints one Markdown table (rank 0).
//
//   mpirun -np 2 --bind-to core ./bench_comm [--min-bytes 1K] [--max-bytes 64M] [--step 4]
//          [--iters 20] [--warmup 5] [--rounds 5]
//          [--ops all_reduce,reduce_scatter,all_gather,broadcast] [--async]
//
// Sizes and bandwidths follow nccl-tests (PERFORMANCE.md there): `bytes` is the whole payload
// — the tensor for all_reduce and broadcast, the full [n*m] input of reduce_scatter and the
// full [n*m] output of all_gather, in fp32 —, algbw = bytes / time and
// busbw = algbw * factor with factor 2(n-1)/n for all_reduce, (n-1)/n for reduce_scatter and
// all_gather, 1 for broadcast, so busbw is comparable across n and with the link speed.
//
// Timing: per round, a barrier, then `iters` back-to-back calls; the round's time per call is
// the slowest rank's mean. A size's figure is the median over `rounds` rounds, and the
// meshtrain and MPI rounds alternate (the one going first swaps each round) so that load from
// other processes on the machine hits both alike. Sums of zeros stay zero: no value drift,
// no denormals. Before timing, each collective's meshtrain result is compared bit for bit
// with MPI's on rank-dependent data.
//
// meshtrain's blocking calls run on the caller's thread when nothing else is pending (as the
// raw MPI call does); --async times *_async(...)->wait() instead, which always goes through
// the communicator's worker thread, to show what that hand-off costs.
//
// Only the MPI build has a raw MPI to compare with; elsewhere the program says so and exits 2.
#include "meshtrain/core/communicator.h"
#include "meshtrain/core/cpu_features.h"
#include "meshtrain/core/runtime.h"

#include <cstdio>

#if MESHTRAIN_WITH_MPI

#include <mpi.h>

#include "meshtrain/launch/cli.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

using meshtrain::CommunicatorPtr;
namespace cli = meshtrain::cli;

std::string format_bytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 20) && bytes % (int64_t{1} << 20) == 0) {
    return std::to_string(bytes >> 20) + " MiB";
  }
  if (bytes >= 1024 && bytes % 1024 == 0) {
    return std::to_string(bytes >> 10) + " KiB";
  }
  return std::to_string(bytes) + " B";
}

// One collective at one size: the buffers, the meshtrain call and the MPI call on them.
struct Case {
  std::function<void()> meshtrain;
  std::function<void()> mpi;
  // Compared after one call of each from the same inputs (the check before timing).
  std::function<at::Tensor()> result;
  std::function<void(int rank)> fill; // rank-dependent inputs, for the check
  std::function<void()> zero;         // all buffers to zero, for the timed calls
};

struct Collective {
  std::string name;
  double bus_factor; // busbw / algbw for this n
  // Elements of the payload must split into n equal chunks for reduce_scatter / all_gather.
  bool chunked;
  std::function<Case(const CommunicatorPtr&, int64_t count)> make;
};

std::vector<Collective> collectives(int n, bool async) {
  const double nd = n;
  std::vector<Collective> all;
  // In place, as in meshtrain: tensor [count].
  all.push_back({"all_reduce", 2.0 * (nd - 1) / nd, false,
                 [async](const CommunicatorPtr& world, int64_t count) {
                   auto buf = at::zeros({count}, at::kFloat);
                   return Case{
                       [world, buf, async] {
                         if (async) {
                           world->all_reduce_async(buf)->wait();
                         } else {
                           world->all_reduce(buf);
                         }
                       },
                       [buf] {
                         MPI_Allreduce(MPI_IN_PLACE, buf.data_ptr(), static_cast<int>(buf.numel()),
                                       MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                       },
                       [buf] { return buf.clone(); },
                       [buf](int rank) {
                         buf.copy_(at::arange(buf.numel(), at::kFloat).remainder(97) + rank);
                       },
                       [buf] { buf.zero_(); }};
                 }});
  // input [count] -> output [count / n].
  all.push_back({"reduce_scatter", (nd - 1) / nd, true,
                 [n, async](const CommunicatorPtr& world, int64_t count) {
                   auto in = at::zeros({count}, at::kFloat);
                   auto out = at::zeros({count / n}, at::kFloat);
                   return Case{[world, in, out, async] {
                                 if (async) {
                                   world->reduce_scatter_async(in, out)->wait();
                                 } else {
                                   world->reduce_scatter(in, out);
                                 }
                               },
                               [in, out] {
                                 MPI_Reduce_scatter_block(in.data_ptr(), out.data_ptr(),
                                                          static_cast<int>(out.numel()), MPI_FLOAT,
                                                          MPI_SUM, MPI_COMM_WORLD);
                               },
                               [out] { return out.clone(); },
                               [in](int rank) {
                                 in.copy_(at::arange(in.numel(), at::kFloat).remainder(89) + rank);
                               },
                               [in, out] {
                                 in.zero_();
                                 out.zero_();
                               }};
                 }});
  // input [count / n] -> output [count].
  all.push_back(
      {"all_gather", (nd - 1) / nd, true, [n, async](const CommunicatorPtr& world, int64_t count) {
         auto in = at::zeros({count / n}, at::kFloat);
         auto out = at::zeros({count}, at::kFloat);
         return Case{[world, in, out, async] {
                       if (async) {
                         world->all_gather_async(in, out)->wait();
                       } else {
                         world->all_gather(in, out);
                       }
                     },
                     [in, out] {
                       MPI_Allgather(in.data_ptr(), static_cast<int>(in.numel()), MPI_FLOAT,
                                     out.data_ptr(), static_cast<int>(in.numel()), MPI_FLOAT,
                                     MPI_COMM_WORLD);
                     },
                     [out] { return out.clone(); }, [in](int rank) { in.fill_(rank + 0.5); },
                     [in, out] {
                       in.zero_();
                       out.zero_();
                     }};
       }});
  // In place from root 0: tensor [count].
  all.push_back({"broadcast", 1.0, false, [async](const CommunicatorPtr& world, int64_t count) {
                   auto buf = at::zeros({count}, at::kFloat);
                   return Case{[world, buf, async] {
                                 if (async) {
                                   world->broadcast_async(buf, 0)->wait();
                                 } else {
                                   world->broadcast(buf, 0);
                                 }
                               },
                               [buf] {
                                 MPI_Bcast(buf.data_ptr(), static_cast<int>(buf.numel()), MPI_FLOAT,
                                           0, MPI_COMM_WORLD);
                               },
                               [buf] { return buf.clone(); },
                               [buf](int rank) { buf.fill_(rank + 1.0); }, [buf] { buf.zero_(); }};
                 }});
  return all;
}

// Seconds per call of `fn` over `iters` calls: the slowest rank's mean.
double time_round(const std::function<void()>& fn, int iters) {
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = MPI_Wtime();
  for (int i = 0; i < iters; ++i) {
    fn();
  }
  double mine = (MPI_Wtime() - start) / iters;
  double slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t mid = v.size() / 2;
  return v.size() % 2 == 1 ? v[mid] : 0.5 * (v[mid - 1] + v[mid]);
}

// meshtrain and MPI must agree bit for bit: same communicator layout, same MPI algorithm.
bool results_agree(Case& c, int rank) {
  c.fill(rank);
  c.meshtrain();
  const auto ours = c.result();
  c.fill(rank);
  c.mpi();
  const auto theirs = c.result();
  int ok = at::equal(ours, theirs) ? 1 : 0;
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  c.zero();
  return all_ok == 1;
}

std::string mpi_library() {
  char version[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(version, &len);
  std::string text(version, len);
  return text.substr(0, text.find_first_of(",\n"));
}

int run(int argc, char** argv) {
  meshtrain::Runtime runtime(&argc, &argv);
  const auto& world = runtime.world();
  const int n = world->size();
  const bool printer = world->rank() == 0;

  cxxopts::Options options("bench_comm",
                           "meshtrain collectives vs raw MPI (nccl-tests bandwidth formulas)");
  // clang-format off
  options.add_options()
    ("min-bytes", "smallest payload (K/M/G suffixes)", cli::text("1K"))
    ("max-bytes", "largest payload", cli::text("64M"))
    ("step", "size factor between rows (2 or 4 for powers of 2)", cli::text("4"))
    ("iters", "timed calls per round", cli::text("20"))
    ("warmup", "untimed calls of each implementation per size", cli::text("5"))
    ("rounds", "timed rounds per implementation (median reported)", cli::text("5"))
    ("ops", "comma-separated collectives",
     cli::text("all_reduce,reduce_scatter,all_gather,broadcast"))
    ("async", "time meshtrain's *_async(...)->wait() (always via the worker thread) instead "
              "of the blocking calls", cli::boolean())
    ("h,help", "print this help");
  // clang-format on
  int64_t min_bytes = 0;
  int64_t max_bytes = 0;
  int step = 0;
  int iters = 0;
  int warmup = 0;
  int rounds = 0;
  std::vector<std::string> ops;
  bool async = false;
  try {
    const cli::ParsedFlags flags(options, argc, argv);
    if (flags.help()) {
      if (printer) {
        std::cout << options.help() << "\n";
      }
      return 0;
    }
    min_bytes = cli::parse_size("min-bytes", flags.str("min-bytes"));
    max_bytes = cli::parse_size("max-bytes", flags.str("max-bytes"));
    step = static_cast<int>(flags.integer("step", 2, 1 << 20));
    iters = static_cast<int>(flags.integer("iters", 1, 1 << 20));
    warmup = static_cast<int>(flags.integer("warmup", 0, 1 << 20));
    rounds = static_cast<int>(flags.integer("rounds", 1, 1 << 20));
    async = flags.flag("async");
    std::stringstream list(flags.str("ops"));
    for (std::string op; std::getline(list, op, ',');) {
      ops.push_back(op);
    }
    if (min_bytes > max_bytes) {
      throw cli::UsageError("--min-bytes " + flags.str("min-bytes") +
                            " must not exceed --max-bytes " + flags.str("max-bytes"));
    }
  } catch (const cli::UsageError& e) {
    // Every rank parses the same argv, so every rank fails alike and none waits for another.
    if (printer) {
      std::cerr << "bench_comm: " << e.what() << "\n";
    }
    return cli::kExitUsage;
  }

  std::map<std::string, Collective> by_name;
  for (auto& c : collectives(n, async)) {
    by_name.emplace(c.name, c);
  }
  for (const auto& op : ops) {
    if (by_name.count(op) == 0) {
      if (printer) {
        std::cerr << "bench_comm: unknown op '" << op
                  << "' (all_reduce, reduce_scatter, all_gather, broadcast)\n";
      }
      return 2;
    }
  }

  if (printer) {
    std::printf("%s\n", meshtrain::describe_cpu().c_str());
    std::printf("bench_comm: %d ranks, fp32, %s, meshtrain backend %s, torch threads %d\n", n,
                mpi_library().c_str(), meshtrain::Runtime::backend_name(), runtime.threads());
    std::printf("iters %d x rounds %d (median of per-round means, slowest rank), warmup %d; "
                "meshtrain calls: %s\n\n",
                iters, rounds, warmup, async ? "*_async()->wait()" : "blocking");
    std::printf("| collective | bytes | meshtrain time (us) | meshtrain busbw (GB/s) | MPI time "
                "(us) | MPI busbw (GB/s) | ratio |\n");
    std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  }
  for (const auto& op : ops) {
    const auto& coll = by_name.at(op);
    bool checked = false;
    for (int64_t bytes = min_bytes; bytes <= max_bytes; bytes *= step) {
      // fp32 elements; reduce_scatter / all_gather payloads are n equal chunks.
      int64_t count = bytes / 4;
      if (coll.chunked) {
        count -= count % n;
      }
      if (count == 0) {
        continue;
      }
      const int64_t payload = count * 4;
      Case c = coll.make(world, count);
      if (!checked) {
        if (!results_agree(c, world->rank())) {
          if (printer) {
            std::cerr << "bench_comm: meshtrain's " << op << " differs from MPI's\n";
          }
          return 1;
        }
        checked = true;
      }
      for (int i = 0; i < warmup; ++i) {
        c.meshtrain();
        c.mpi();
      }
      std::vector<double> ours;
      std::vector<double> theirs;
      for (int r = 0; r < rounds; ++r) {
        if (r % 2 == 0) {
          ours.push_back(time_round(c.meshtrain, iters));
          theirs.push_back(time_round(c.mpi, iters));
        } else {
          theirs.push_back(time_round(c.mpi, iters));
          ours.push_back(time_round(c.meshtrain, iters));
        }
      }
      const double t_ours = median(ours);
      const double t_theirs = median(theirs);
      // algbw = bytes / time (GB/s = 1e9 B/s, as nccl-tests); busbw = algbw * factor.
      const double bus_ours = payload / t_ours / 1e9 * coll.bus_factor;
      const double bus_theirs = payload / t_theirs / 1e9 * coll.bus_factor;
      if (printer) {
        std::printf("| %s | %s | %.1f | %.3f | %.1f | %.3f | %.2f |\n", op.c_str(),
                    format_bytes(payload).c_str(), t_ours * 1e6, bus_ours, t_theirs * 1e6,
                    bus_theirs, t_theirs / t_ours);
        std::fflush(stdout);
      }
    }
  }
  if (printer) {
    std::printf("\nratio = MPI time / meshtrain time (= meshtrain busbw / MPI busbw). busbw "
                "factors at n=%d: all_reduce %.3f, reduce_scatter and all_gather %.3f, "
                "broadcast 1.\n",
                n, 2.0 * (n - 1) / n, (n - 1.0) / n);
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  return run(argc, argv);
}

#else

int main() {
  std::fprintf(stderr, "bench_comm needs the MPI build (configure with -DMESHTRAIN_WITH_MPI=ON)\n");
  return 2;
}

#endif
