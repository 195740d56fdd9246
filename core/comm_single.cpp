// defines: the single-process backend (MESHTRAIN_WITH_MPI=OFF): the world is one rank, so
// every collective is a group of one and never reaches the do_* calls below.
#include "meshtrain/core/backend.h"
#include "meshtrain/core/errors.h"

namespace meshtrain {
namespace backend {

const char* name() {
  return "single";
}
void init(int* /*argc*/, char*** /*argv*/) {}
void finalize() {}
CommunicatorPtr make_world() {
  return make_self_communicator("world");
}
void node_local(const CommunicatorPtr& /*world*/, int* local_rank, int* local_size) {
  *local_rank = 0;
  *local_size = 1;
}

} // namespace backend
} // namespace meshtrain
