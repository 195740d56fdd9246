// defines: the single-process backend (MESHTRAIN_WITH_MPI=OFF): the world is one rank, so
// every collective is a group of one and never reaches the do_* calls below.
#include "core/backend.h"
#include "core/errors.h"

namespace meshtrain {
namespace {

class SelfCommunicator final : public Communicator {
public:
  explicit SelfCommunicator(const std::string& name) : Communicator(name, 0, 1) {}

protected:
  WorkPtr do_all_reduce(const at::Tensor&, ReduceOp) override { return unreachable(); }
  WorkPtr do_reduce_scatter(const at::Tensor&, const at::Tensor&, ReduceOp) override {
    return unreachable();
  }
  WorkPtr do_all_gather(const at::Tensor&, const at::Tensor&) override { return unreachable(); }
  WorkPtr do_broadcast(const at::Tensor&, int) override { return unreachable(); }
  // check_peer already rejects every peer of a one-rank group, so these never run.
  WorkPtr do_send(const at::Tensor&, int, int) override { return unreachable(); }
  WorkPtr do_recv(const at::Tensor&, int, int) override { return unreachable(); }
  WorkPtr do_barrier() override { return unreachable(); }
  std::shared_ptr<Communicator> do_split(int, int, const std::string& name) override {
    return std::make_shared<SelfCommunicator>(name);
  }
  void check_device(const char*, const at::Tensor&) const override {}

private:
  static WorkPtr unreachable() {
    MT_ASSERT(false, "a one-rank communicator reached a transport call");
    return nullptr;
  }
};

} // namespace

namespace backend {

const char* name() {
  return "single";
}
void init(int* /*argc*/, char*** /*argv*/) {}
void finalize() {}
CommunicatorPtr make_world() {
  return std::make_shared<SelfCommunicator>("world");
}
void node_local(const CommunicatorPtr& /*world*/, int* local_rank, int* local_size) {
  *local_rank = 0;
  *local_size = 1;
}

} // namespace backend
} // namespace meshtrain
