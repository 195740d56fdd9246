// defines: Mesh — the rank grid (core/mesh_grid.h) bound to one communicator per named
// dimension: "tp", "cp", "dp", "pp", "dp_cp" and "world". With cp = 1, group("dp_cp") is the
// "dp" communicator itself (the same ranks), so its traffic is counted and traced as "dp".
#pragma once

#include "meshtrain/core/comm_log.h"
#include "meshtrain/core/communicator.h"
#include "meshtrain/core/mesh_grid.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace meshtrain {

// The grid bound to real communicators. Construction is collective over `world`.
class Mesh {
public:
  Mesh(ParallelDims dims, CommunicatorPtr world);

  const MeshGrid& grid() const { return grid_; }
  int rank() const { return world_->rank(); }
  // This rank's coordinate along a named dimension.
  int index(const std::string& dim) const { return grid_.index(dim, rank()); }
  // The communicator of this rank's group along `dim` (see mesh_grid.h).
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
