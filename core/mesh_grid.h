// defines: LayoutError, ParallelDims, MeshCoord, MeshGrid — the rank grid as pure arithmetic
// (no MPI, no tensors: meshrun links it without LibTorch).
//
// Rank order is tp fastest, then cp, then dp, then pp (DESIGN §2, Megatron's order):
//   rank = tp + cp*TP + dp*TP*CP + pp*TP*CP*DP
// so the ranks of a tensor-parallel group are neighbours (same node, fastest links) and
// pipeline stages are the farthest apart. Example (Megatron's): 16 ranks, tp=2, pp=4 ->
// dp=2; tp groups [0,1],[2,3],...,[14,15]; dp groups [0,2],[1,3],[4,6],...; pp groups
// [0,4,8,12],[1,5,9,13],...
//
// Named dimensions: "tp", "cp", "dp", "pp", "dp_cp" (the ranks that differ only in dp and
// cp: the group gradients are reduced over) and "world".
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace meshtrain {

// A layout that cannot run on the ranks (or the model) it was given. The message names the
// value and what is allowed; programs turn it into a usage error (exit 2).
class LayoutError : public std::invalid_argument {
public:
  using std::invalid_argument::invalid_argument;
};

struct ParallelDims {
  int dp = -1; // -1: infer from the world size and the others
  int cp = 1;
  int tp = 1;
  int pp = 1;
};

struct MeshCoord {
  int dp = 0;
  int cp = 0;
  int tp = 0;
  int pp = 0;
};

// A validated grid: dp*cp*tp*pp == world size, all >= 1.
class MeshGrid {
public:
  // Resolves one -1 entry and validates; throws LayoutError with the numbers.
  static MeshGrid create(ParallelDims dims, int world_size);

  int world_size() const { return dp_ * cp_ * tp_ * pp_; }
  int dp() const { return dp_; }
  int cp() const { return cp_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  ParallelDims dims() const { return ParallelDims{dp_, cp_, tp_, pp_}; }
  // Size of a named dimension (see above).
  int size(const std::string& dim) const;

  MeshCoord coord(int rank) const;
  int rank(const MeshCoord& coord) const;
  // Coordinate of `rank` along `dim` ("world": the rank itself; "dp_cp": dp*CP + cp).
  int index(const std::string& dim, int rank) const;
  // The ranks that share every coordinate with `rank` except `dim`, ordered along `dim`.
  std::vector<int> group_ranks(const std::string& dim, int rank) const;
  // All groups of `dim`, ordered by their first rank.
  std::vector<std::vector<int>> groups(const std::string& dim) const;
  // An index that is equal for exactly the ranks of one `dim` group (a split color).
  int group_id(const std::string& dim, int rank) const;

private:
  MeshGrid(int dp, int cp, int tp, int pp) : dp_(dp), cp_(cp), tp_(tp), pp_(pp) {}
  void check_rank(int rank) const;
  int dp_, cp_, tp_, pp_;
};

// The numbers that divide n, as "1, 2 or 4" (the values a dimension may take, for hints).
std::string divisors_text(long long n);

// "dp 2 x tp 2" style text of the dimensions above one (all of them when every one is 1):
// what messages and banners print.
std::string describe_dims(const ParallelDims& dims);

} // namespace meshtrain
