// defines: ParallelDims, MeshGrid (pure rank-grid arithmetic, no MPI), Mesh (the grid plus
// one communicator per named dimension: "tp", "dp", "pp", and "world").
//
// Rank order is tp fastest, then dp, then pp:  rank = tp + dp*TP + pp*TP*DP
// so the ranks of a tensor-parallel group are neighbours (same node, fastest links).
// Example (Megatron's): 16 ranks, tp=2, pp=4 -> dp=2; tp groups [0,1],[2,3],...,[14,15];
// dp groups [0,2],[1,3],[4,6],...; pp groups [0,4,8,12],[1,5,9,13],...
#pragma once

#include "core/comm_log.h"
#include "core/communicator.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace meshtrain {

struct ParallelDims {
  int dp = -1; // -1: infer from the world size and the others
  int tp = 1;
  int pp = 1;
};

struct MeshCoord {
  int dp = 0;
  int tp = 0;
  int pp = 0;
};

// A validated grid: dp*tp*pp == world size, all >= 1.
class MeshGrid {
public:
  // Resolves one -1 entry and validates; throws with the numbers on a bad layout.
  static MeshGrid create(ParallelDims dims, int world_size);

  int world_size() const { return dp_ * tp_ * pp_; }
  int dp() const { return dp_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  // Size of a named dimension: "dp", "tp", "pp" or "world".
  int size(const std::string& dim) const;

  MeshCoord coord(int rank) const;
  int rank(const MeshCoord& coord) const;
  // Coordinate of `rank` along `dim` ("world": the rank itself).
  int index(const std::string& dim, int rank) const;
  // The ranks that share every coordinate with `rank` except `dim`, ordered along `dim`.
  std::vector<int> group_ranks(const std::string& dim, int rank) const;
  // All groups of `dim`, ordered by their first rank.
  std::vector<std::vector<int>> groups(const std::string& dim) const;
  // An index that is equal for exactly the ranks of one `dim` group (a split color).
  int group_id(const std::string& dim, int rank) const;

private:
  MeshGrid(int dp, int tp, int pp) : dp_(dp), tp_(tp), pp_(pp) {}
  void check_rank(int rank) const;
  int dp_, tp_, pp_;
};

// The grid bound to real communicators. Construction is collective over `world`.
class Mesh {
public:
  Mesh(ParallelDims dims, CommunicatorPtr world);

  const MeshGrid& grid() const { return grid_; }
  int rank() const { return world_->rank(); }
  // This rank's coordinate along a named dimension.
  int index(const std::string& dim) const { return grid_.index(dim, rank()); }
  // The communicator of this rank's group along `dim` ("tp", "dp", "pp" or "world").
  const CommunicatorPtr& group(const std::string& dim) const;
  // The counting log shared by every communicator of this mesh.
  CommLog& comm_log() const { return *log_; }

private:
  MeshGrid grid_;
  CommunicatorPtr world_;
  std::shared_ptr<CommLog> log_;
  std::map<std::string, CommunicatorPtr> groups_;
};

} // namespace meshtrain
