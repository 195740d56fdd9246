// defines: Mesh (see mesh.h).
#include "meshtrain/core/mesh.h"

#include "meshtrain/core/errors.h"

namespace meshtrain {

Mesh::Mesh(ParallelDims dims, CommunicatorPtr world)
    : grid_(MeshGrid::create(dims, world->size())), world_(std::move(world)),
      log_(std::make_shared<CommLog>()) {
  world_->set_log(log_);
  groups_["world"] = world_;
  // Every rank takes part in every split, in the same order (a split is collective).
  for (const char* dim : {"tp", "cp", "dp", "pp", "dp_cp"}) {
    groups_[dim] = world_->split(grid_.group_id(dim, rank()), grid_.index(dim, rank()), dim);
  }
}

const CommunicatorPtr& Mesh::group(const std::string& dim) const {
  auto it = groups_.find(dim);
  MT_CHECK(it != groups_.end(), "unknown mesh dimension '", dim,
           "'; expected tp, cp, dp, pp, dp_cp or world");
  return it->second;
}

} // namespace meshtrain
