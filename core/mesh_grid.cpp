// defines: MeshGrid, describe_dims (see mesh_grid.h).
#include "meshtrain/core/mesh_grid.h"

#include "meshtrain/core/text.h"

namespace meshtrain {
namespace {

std::string dims_text(const ParallelDims& d) {
  return cat("dp=", d.dp, " cp=", d.cp, " tp=", d.tp, " pp=", d.pp);
}

[[noreturn]] void unknown_dim(const std::string& dim) {
  throw LayoutError("unknown mesh dimension '" + dim +
                    "'; expected tp, cp, dp, pp, dp_cp or world");
}

} // namespace

MeshGrid MeshGrid::create(ParallelDims dims, int world_size) {
  if (world_size < 1) {
    throw LayoutError(cat("world size must be >= 1, got ", world_size));
  }
  int unknown = 0;
  for (const int v : {dims.dp, dims.cp, dims.tp, dims.pp}) {
    if (v != -1 && v < 1) {
      throw LayoutError(cat("parallel dims must be >= 1 or -1 (infer); got ", dims_text(dims)));
    }
    unknown += v == -1 ? 1 : 0;
  }
  if (unknown > 1) {
    throw LayoutError(
        cat("at most one of dp, cp, tp, pp may be -1 (infer); got ", dims_text(dims)));
  }
  const auto known_or_one = [](int v) { return v == -1 ? 1 : v; };
  const long long known = static_cast<long long>(known_or_one(dims.dp)) * known_or_one(dims.cp) *
                          known_or_one(dims.tp) * known_or_one(dims.pp);
  if (unknown == 1) {
    if (world_size % known != 0) {
      // Name the inferred dim and the product of the others, e.g. "cp x tp x pp = 2 (tp 2)".
      std::string inferred;
      std::string others;
      for (const auto& [name, v] :
           {std::pair{"dp", dims.dp}, {"cp", dims.cp}, {"tp", dims.tp}, {"pp", dims.pp}}) {
        (v == -1 ? inferred : others) +=
            (v == -1 || others.empty() ? "" : " x ") + std::string(name);
      }
      throw LayoutError(
          cat("cannot infer ", inferred, ": the world size ", world_size, " is not divisible by ",
              others, " = ", known, " (",
              describe_dims(ParallelDims{known_or_one(dims.dp), known_or_one(dims.cp),
                                         known_or_one(dims.tp), known_or_one(dims.pp)}),
              "); with ", world_size, world_size == 1 ? " rank, " : " ranks, ", others, " may be ",
              divisors_text(world_size)));
    }
    const int inferred = static_cast<int>(world_size / known);
    for (int* v : {&dims.dp, &dims.cp, &dims.tp, &dims.pp}) {
      if (*v == -1) {
        *v = inferred;
      }
    }
  } else if (known != world_size) {
    throw LayoutError(cat("dp (", dims.dp, ") x cp (", dims.cp, ") x tp (", dims.tp, ") x pp (",
                          dims.pp, ") = ", known, " must equal the world size ", world_size));
  }
  return MeshGrid(dims.dp, dims.cp, dims.tp, dims.pp);
}

int MeshGrid::size(const std::string& dim) const {
  if (dim == "tp") {
    return tp_;
  }
  if (dim == "cp") {
    return cp_;
  }
  if (dim == "dp") {
    return dp_;
  }
  if (dim == "pp") {
    return pp_;
  }
  if (dim == "dp_cp") {
    return dp_ * cp_;
  }
  if (dim == "world") {
    return world_size();
  }
  unknown_dim(dim);
}

void MeshGrid::check_rank(int rank) const {
  if (rank < 0 || rank >= world_size()) {
    throw LayoutError(cat("rank ", rank, " is outside the mesh of ", world_size(), " ranks"));
  }
}

MeshCoord MeshGrid::coord(int rank) const {
  check_rank(rank);
  MeshCoord c;
  c.tp = rank % tp_;
  c.cp = (rank / tp_) % cp_;
  c.dp = (rank / (tp_ * cp_)) % dp_;
  c.pp = rank / (tp_ * cp_ * dp_);
  return c;
}

int MeshGrid::rank(const MeshCoord& c) const {
  if (c.dp < 0 || c.dp >= dp_ || c.cp < 0 || c.cp >= cp_ || c.tp < 0 || c.tp >= tp_ || c.pp < 0 ||
      c.pp >= pp_) {
    throw LayoutError(cat("mesh coordinate (dp=", c.dp, ", cp=", c.cp, ", tp=", c.tp, ", pp=", c.pp,
                          ") is outside the grid ", dims_text(ParallelDims{dp_, cp_, tp_, pp_})));
  }
  return c.tp + c.cp * tp_ + c.dp * tp_ * cp_ + c.pp * tp_ * cp_ * dp_;
}

int MeshGrid::index(const std::string& dim, int rank) const {
  if (dim == "world") {
    check_rank(rank);
    return rank;
  }
  const auto c = coord(rank);
  if (dim == "tp") {
    return c.tp;
  }
  if (dim == "cp") {
    return c.cp;
  }
  if (dim == "dp") {
    return c.dp;
  }
  if (dim == "pp") {
    return c.pp;
  }
  if (dim == "dp_cp") {
    return c.dp * cp_ + c.cp;
  }
  unknown_dim(dim);
}

std::vector<int> MeshGrid::group_ranks(const std::string& dim, int rank) const {
  const int n = size(dim);
  std::vector<int> ranks;
  ranks.reserve(n);
  if (dim == "world") {
    for (int r = 0; r < n; ++r) {
      ranks.push_back(r);
    }
    return ranks;
  }
  auto c = coord(rank);
  for (int i = 0; i < n; ++i) {
    if (dim == "dp_cp") {
      c.dp = i / cp_;
      c.cp = i % cp_;
    } else {
      (dim == "tp" ? c.tp : dim == "cp" ? c.cp : dim == "dp" ? c.dp : c.pp) = i;
    }
    ranks.push_back(this->rank(c));
  }
  return ranks;
}

std::vector<std::vector<int>> MeshGrid::groups(const std::string& dim) const {
  std::vector<std::vector<int>> out;
  for (int r = 0; r < world_size(); ++r) {
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

std::string divisors_text(long long n) {
  std::vector<long long> found;
  for (long long d = 1; d <= n && found.size() < 16; ++d) {
    if (n % d == 0) {
      found.push_back(d);
    }
  }
  std::string out;
  for (size_t i = 0; i < found.size(); ++i) {
    out += (i == 0 ? "" : i + 1 == found.size() ? " or " : ", ") + std::to_string(found[i]);
  }
  return out;
}

std::string describe_dims(const ParallelDims& d) {
  std::string out;
  for (const auto& [name, v] : {std::pair{"dp", d.dp}, {"cp", d.cp}, {"tp", d.tp}, {"pp", d.pp}}) {
    if (v != 1) {
      out += (out.empty() ? "" : " x ") + std::string(name) + " " + std::to_string(v);
    }
  }
  return out.empty() ? "dp 1" : out;
}

} // namespace meshtrain
