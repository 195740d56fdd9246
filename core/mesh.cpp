// defines: MeshGrid and Mesh (see mesh.h).
#include "core/mesh.h"

#include "core/errors.h"

#include <c10/util/irange.h>

namespace meshtrain {

MeshGrid MeshGrid::create(ParallelDims dims, int world_size) {
  MT_CHECK(world_size >= 1, "world size must be >= 1, got ", world_size);
  int unknown = 0;
  for (const int v : {dims.dp, dims.tp, dims.pp}) {
    MT_CHECK(v == -1 || v >= 1, "parallel dims must be >= 1 or -1 (infer); got dp=", dims.dp,
             " tp=", dims.tp, " pp=", dims.pp);
    unknown += v == -1 ? 1 : 0;
  }
  MT_CHECK(unknown <= 1, "at most one of dp, tp, pp may be -1 (infer); got dp=", dims.dp,
           " tp=", dims.tp, " pp=", dims.pp);
  if (unknown == 1) {
    const int known = (dims.dp == -1 ? 1 : dims.dp) * (dims.tp == -1 ? 1 : dims.tp) *
                      (dims.pp == -1 ? 1 : dims.pp);
    MT_CHECK(world_size % known == 0, "cannot infer the layout: world size ", world_size,
             " is not divisible by the product of the given dims ", known, " (dp=", dims.dp,
             " tp=", dims.tp, " pp=", dims.pp, ")");
    const int inferred = world_size / known;
    (dims.dp == -1 ? dims.dp : dims.tp == -1 ? dims.tp : dims.pp) = inferred;
  }
  MT_CHECK(dims.dp * dims.tp * dims.pp == world_size, "dp (", dims.dp, ") x tp (", dims.tp,
           ") x pp (", dims.pp, ") = ", dims.dp * dims.tp * dims.pp, " must equal the world size ",
           world_size);
  return MeshGrid(dims.dp, dims.tp, dims.pp);
}

int MeshGrid::size(const std::string& dim) const {
  if (dim == "dp") {
    return dp_;
  }
  if (dim == "tp") {
    return tp_;
  }
  if (dim == "pp") {
    return pp_;
  }
  if (dim == "world") {
    return world_size();
  }
  MT_CHECK(false, "unknown mesh dimension '", dim, "'; expected dp, tp, pp or world");
  return 0;
}

void MeshGrid::check_rank(int rank) const {
  MT_CHECK(rank >= 0 && rank < world_size(), "rank ", rank, " is outside the mesh of ",
           world_size(), " ranks");
}

MeshCoord MeshGrid::coord(int rank) const {
  check_rank(rank);
  return MeshCoord{(rank / tp_) % dp_, rank % tp_, rank / (tp_ * dp_)};
}

int MeshGrid::rank(const MeshCoord& c) const {
  MT_CHECK(c.dp >= 0 && c.dp < dp_ && c.tp >= 0 && c.tp < tp_ && c.pp >= 0 && c.pp < pp_,
           "mesh coordinate (dp=", c.dp, ", tp=", c.tp, ", pp=", c.pp,
           ") is outside the grid dp=", dp_, " tp=", tp_, " pp=", pp_);
  return c.tp + c.dp * tp_ + c.pp * tp_ * dp_;
}

int MeshGrid::index(const std::string& dim, int rank) const {
  const auto c = coord(rank);
  if (dim == "world") {
    return rank;
  }
  if (dim == "dp") {
    return c.dp;
  }
  if (dim == "tp") {
    return c.tp;
  }
  if (dim == "pp") {
    return c.pp;
  }
  return size(dim); // throws the unknown-dimension message
}

std::vector<int> MeshGrid::group_ranks(const std::string& dim, int rank) const {
  const int n = size(dim);
  if (dim == "world") {
    std::vector<int> all(n);
    for (const auto r : c10::irange(n)) {
      all[r] = r;
    }
    return all;
  }
  std::vector<int> ranks;
  ranks.reserve(n);
  auto c = coord(rank);
  for (const auto i : c10::irange(n)) {
    (dim == "dp" ? c.dp : dim == "tp" ? c.tp : c.pp) = i;
    ranks.push_back(this->rank(c));
  }
  return ranks;
}

std::vector<std::vector<int>> MeshGrid::groups(const std::string& dim) const {
  std::vector<std::vector<int>> out;
  for (const auto r : c10::irange(world_size())) {
    auto g = group_ranks(dim, r);
    if (g.front() == r) {
      out.push_back(std::move(g));
    }
  }
  return out;
}

int MeshGrid::group_id(const std::string& dim, int rank) const {
  return group_ranks(dim, rank).front();
}

Mesh::Mesh(ParallelDims dims, CommunicatorPtr world)
    : grid_(MeshGrid::create(dims, world->size())), world_(std::move(world)),
      log_(std::make_shared<CommLog>()) {
  world_->set_log(log_);
  groups_["world"] = world_;
  // Every rank takes part in every split, in the same order (a split is collective).
  for (const char* dim : {"tp", "dp", "pp"}) {
    groups_[dim] = world_->split(grid_.group_id(dim, rank()), grid_.index(dim, rank()), dim);
  }
}

const CommunicatorPtr& Mesh::group(const std::string& dim) const {
  auto it = groups_.find(dim);
  MT_CHECK(it != groups_.end(), "unknown mesh dimension '", dim, "'; expected dp, tp, pp or world");
  return it->second;
}

} // namespace meshtrain
