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
  for (const char* dim : {"tp", "cp", "dp", "pp"}) {
    groups_[dim] = world_->split(grid_.group_id(dim, rank()), grid_.index(dim, rank()), dim);
  }
  // Without context parallelism the gradient group is the dp group itself: one communicator
  // (and worker thread) fewer, and the counting log and traces keep naming it "dp".
  groups_["dp_cp"] = grid_.cp() == 1 ? groups_["dp"]
                                     : world_->split(grid_.group_id("dp_cp", rank()),
                                                     grid_.index("dp_cp", rank()), "dp_cp");
}

const CommunicatorPtr& Mesh::group(const std::string& dim) const {
  auto it = groups_.find(dim);
  MT_CHECK(it != groups_.end(), "unknown mesh dimension '", dim,
           "'; expected tp, cp, dp, pp, dp_cp or world");
  return it->second;
}

} // namespace meshtrain
