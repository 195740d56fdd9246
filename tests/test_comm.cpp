// defines: the Communicator test cases — closed-form, rank-valued checks of every collective
// for every supported dtype, async Work semantics, argument errors, the across-rank agreement
// check and the counting log (CommLog).
//
// Multi-rank discipline: after the first collective of a test, only CHECK (never REQUIRE) is
// used on values, so a failure on one rank never makes it skip a collective its peers are
// waiting in (that would turn a failed check into a hang). Each [mpi] test builds its own
// communicators by splitting the world, so the shared world communicator's log and
// check-across-ranks flag are never changed.
//
// Operands are functions of (rank r, element index i) evaluated in double and cast to the
// dtype under test; every rank rebuilds every other rank's operand to get the expected result,
// so the checks hold for any world size n. Shapes: all_reduce/broadcast/send/recv [m];
// reduce_scatter input [n*m] -> output [m]; all_gather input [m] -> output [n*m].
#include <catch2/catch.hpp>

#include "meshtrain/core/comm_log.h"
#include "meshtrain/core/communicator.h"
#include "meshtrain/core/errors.h"
#include "meshtrain/core/mesh.h"
#include "tests/harness.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <vector>

using meshtrain::CollectiveKind;
using meshtrain::CommLog;
using meshtrain::CommunicatorPtr;
using meshtrain::ReduceOp;
using meshtrain::WorkPtr;
using meshtrain::testing::rank_tag;
using meshtrain::testing::test_runtime;

namespace {

const std::vector<at::ScalarType> kAllDtypes{at::kFloat, at::kDouble, at::kBFloat16, at::kHalf,
                                             at::kInt,   at::kLong,   at::kByte};
const std::vector<at::ScalarType> kFloatingDtypes{at::kFloat, at::kDouble, at::kBFloat16,
                                                  at::kHalf};
// 1 element, an odd count, and one large enough (256 Ki) that OpenMPI switches from its
// small-message algorithms (recursive doubling) to the segmented/ring ones.
const std::vector<int64_t> kCounts{1, 1037, 262147};

constexpr auto kLongWait = std::chrono::minutes(5);

// A fresh communicator over all ranks, so a test may set its log / check flag freely.
CommunicatorPtr fresh_world(const std::string& name = "test") {
  const auto& world = test_runtime().world();
  return world->split(0, world->rank(), name);
}

std::string describe(at::ScalarType dtype) {
  std::ostringstream os;
  os << dtype;
  return os.str();
}

// Relative tolerance for results that involve one division (avg): one unit in the last place
// of the dtype. Sums, max and min are compared exactly.
double ulp(at::ScalarType dtype) {
  switch (dtype) {
  case at::kFloat:
    return 0x1p-23;
  case at::kDouble:
    return 0x1p-52;
  case at::kBFloat16:
    return 0x1p-7;
  case at::kHalf:
    return 0x1p-10;
  default:
    return 0.0;
  }
}

// Element-wise actual == expected (|a - e| <= rel_tol * |e|; NaN never matches). On a
// mismatch the message names the rank, `what`, the first bad index, expected and actual.
void check_elements(const at::Tensor& actual, const at::Tensor& expected, const std::string& what,
                    double rel_tol = 0.0) {
  INFO(rank_tag() << what);
  CHECK(actual.scalar_type() == expected.scalar_type());
  CHECK(actual.numel() == expected.numel());
  if (actual.numel() != expected.numel()) {
    return;
  }
  // Every value used here is an integer below 2^53 or a small binary fraction, so the double
  // view is exact for every dtype, int64 included.
  const auto a = actual.reshape(-1).to(at::kDouble);
  const auto e = expected.reshape(-1).to(at::kDouble);
  const auto ok = (a - e).abs() <= e.abs() * rel_tol;
  const auto bad = at::logical_not(ok).nonzero().reshape(-1);
  const int64_t n_bad = bad.numel();
  std::ostringstream first;
  if (n_bad > 0) {
    const int64_t i = bad[0].item<int64_t>();
    first << "; first at index " << i << ": expected " << e[i].item<double>() << ", actual "
          << a[i].item<double>();
  }
  INFO(n_bad << " of " << a.numel() << " elements differ" << first.str());
  CHECK(n_bad == 0);
}

// An operand: values (in double) held by rank r of n at element positions i (a double tensor).
using Operand = std::function<at::Tensor(at::ScalarType, int r, int n, const at::Tensor& i)>;

// Sum/avg operand. Signed dtypes: (r+1)*(1 + i mod 5), negated at odd i (int64 scaled by 2^32
// to leave the int32 range; floating dtypes add 0.25 at i mod 4 == 1). uint8: at most two
// ranks contribute to an element — (i mod 200) on rank i mod n and 1 on rank (i+1) mod n — so
// the sum stays <= 200 for any group size and never wraps.
at::Tensor sum_operand(at::ScalarType dtype, int r, int n, const at::Tensor& i) {
  if (dtype == at::kByte) {
    const auto own = i.remainder(n).eq(r).to(at::kDouble) * i.remainder(200);
    const auto next = (i + 1).remainder(n).eq(r).to(at::kDouble);
    return own + next;
  }
  auto v = (i.remainder(5) + 1) * (r + 1) * (1 - 2 * i.remainder(2));
  if (dtype == at::kLong) {
    v = v * 0x1p32;
  }
  if (at::isFloatingType(dtype)) {
    v = v + i.remainder(4).eq(1).to(at::kDouble) * 0.25;
  }
  return v;
}

// Max/min operand: ((r + i) mod n) mod 250 + (i mod 4), so the rank holding the extreme
// rotates with i; shifted by -100 for signed and floating dtypes (negatives), +0.5 at odd i for
// floating dtypes, int64 scaled by 2^32. Max over ranks = min(n-1, 249) + i mod 4 (+ shifts).
at::Tensor minmax_operand(at::ScalarType dtype, int r, int n, const at::Tensor& i) {
  auto v = (i + r).remainder(n).remainder(250) + i.remainder(4);
  if (dtype != at::kByte) {
    v = v - 100;
  }
  if (dtype == at::kLong) {
    v = v * 0x1p32;
  }
  if (at::isFloatingType(dtype)) {
    v = v + i.remainder(2) * 0.5;
  }
  return v;
}

// Gather/broadcast/send payload: distinct per rank, r*1000 + (k mod 997) (+ r*2^40 for int64,
// (37r + k) mod 256 for uint8). Cast to the dtype on every rank alike, so the comparison is
// exact even where the dtype rounds.
at::Tensor payload(at::ScalarType dtype, int r, int64_t numel) {
  const auto k = at::arange(numel, at::kDouble);
  at::Tensor v;
  if (dtype == at::kByte) {
    v = (k + 37 * r).remainder(256);
  } else {
    v = k.remainder(997) + 1000.0 * r;
    if (dtype == at::kLong) {
      v = v + 0x1p40 * r;
    }
  }
  return v.to(dtype);
}

at::Tensor operand_tensor(const Operand& f, at::ScalarType dtype, int r, int n, int64_t numel) {
  return f(dtype, r, n, at::arange(numel, at::kDouble)).to(dtype);
}

// The reduction over all n ranks' operands, computed in double from the dtype-rounded inputs
// and rounded once to the dtype — exactly what a correct backend (fp32 accumulation for
// bf16/fp16, whose sums here are exact in fp32) returns.
at::Tensor reference(const Operand& f, ReduceOp op, at::ScalarType dtype, int n, int64_t numel) {
  const auto i = at::arange(numel, at::kDouble);
  at::Tensor acc;
  for (int r = 0; r < n; ++r) {
    const auto v = f(dtype, r, n, i).to(dtype).to(at::kDouble);
    if (!acc.defined()) {
      acc = v;
    } else if (op == ReduceOp::kMax) {
      acc = at::maximum(acc, v);
    } else if (op == ReduceOp::kMin) {
      acc = at::minimum(acc, v);
    } else {
      acc = acc + v;
    }
  }
  if (op == ReduceOp::kAvg) {
    acc = acc / n;
  }
  return acc.to(dtype);
}

const Operand& operand_for(ReduceOp op) {
  static const Operand sum = sum_operand;
  static const Operand minmax = minmax_operand;
  return op == ReduceOp::kMax || op == ReduceOp::kMin ? minmax : sum;
}

void check_all_reduce(const CommunicatorPtr& comm, ReduceOp op,
                      const std::vector<at::ScalarType>& dtypes) {
  const int n = comm->size();
  for (const auto dtype : dtypes) {
    for (const auto m : kCounts) {
      auto t = operand_tensor(operand_for(op), dtype, comm->rank(), n, m);
      comm->all_reduce(t, op);
      check_elements(t, reference(operand_for(op), op, dtype, n, m),
                     "all_reduce " + std::string(to_string(op)) + " " + describe(dtype) + " [" +
                         std::to_string(m) + "]",
                     op == ReduceOp::kAvg ? ulp(dtype) : 0.0);
    }
  }
}

// Runs the communicator's ring exchange without deadlock: each communicator runs its
// operations one at a time, and a large MPI_Send blocks until it is matched, so even ranks send
// first and odd ranks receive first (for odd n the chain still unwinds from rank n-1).
void ring_exchange(const CommunicatorPtr& comm, const at::Tensor& out, const at::Tensor& in,
                   int tag) {
  const int n = comm->size();
  const int right = (comm->rank() + 1) % n;
  const int left = (comm->rank() + n - 1) % n;
  if (comm->rank() % 2 == 0) {
    comm->send(out, right, tag);
    comm->recv(in, left, tag);
  } else {
    comm->recv(in, left, tag);
    comm->send(out, right, tag);
  }
}

} // namespace

// ---- closed-form results of every collective × dtype --------------------------------------

TEST_CASE("all_reduce sum matches the closed form for every dtype", "[mpi][comm]") {
  check_all_reduce(fresh_world(), ReduceOp::kSum, kAllDtypes);
}

TEST_CASE("all_reduce avg matches the closed form for every floating dtype", "[mpi][comm]") {
  check_all_reduce(fresh_world(), ReduceOp::kAvg, kFloatingDtypes);
}

TEST_CASE("all_reduce max and min match the closed form for every dtype", "[mpi][comm]") {
  const auto comm = fresh_world();
  check_all_reduce(comm, ReduceOp::kMax, kAllDtypes);
  check_all_reduce(comm, ReduceOp::kMin, kAllDtypes);
  // The closed form itself, spelled out once: max = min(n-1, 249) + i mod 4 - 100 at i = 0..3.
  const int n = comm->size();
  auto t = operand_tensor(minmax_operand, at::kInt, comm->rank(), n, 4);
  comm->all_reduce(t, ReduceOp::kMax);
  const int top = std::min(n - 1, 249) - 100;
  check_elements(t, at::tensor({top, top + 1, top + 2, top + 3}, at::kInt), "max closed form");
}

TEST_CASE("all_reduce bf16/fp16 sums are exact where 16-bit accumulation would round wrongly",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int r = comm->rank();
  // Element e: rank 0 holds big_e, ranks 1..2*floor((n-1)/2) hold 1 (an even number of ones),
  // the others 0. The exact sum big_e + 2*floor((n-1)/2) is representable (the spacing just
  // above big_e is 2), but accumulating in the 16-bit dtype rank by rank rounds each big_e + 1
  // (a tie) back to big_e, losing every one. From n = 3 on the cases are traps; at n = 2 there
  // is a single addition, which is correctly rounded either way.
  const int ones = 2 * ((n - 1) / 2);
  for (const auto& [dtype, big] : {std::pair{at::kBFloat16, 256.0}, std::pair{at::kHalf, 2048.0}}) {
    // 1.0, 1.5 and 1.75 x big: even last mantissa bits, so each tie big_e + 1 rounds down.
    const std::vector<double> bigs{big, 1.5 * big, 1.75 * big};
    std::vector<double> mine;
    for (const double b : bigs) {
      mine.push_back(r == 0 ? b : (r <= ones ? 1.0 : 0.0));
    }
    auto t = at::tensor(mine, at::kDouble).to(dtype);
    std::vector<double> exact;
    for (const double b : bigs) {
      exact.push_back(b + ones);
    }
    const auto expected = at::tensor(exact, at::kDouble).to(dtype);
    // The expected values are representable: rounding them to the dtype changes nothing.
    CHECK(at::equal(expected.to(at::kDouble), at::tensor(exact, at::kDouble)));
    // Naive accumulation in the dtype, rank by rank, is wrong whenever a one is added.
    auto naive = at::tensor(bigs, at::kDouble).to(dtype);
    for (int k = 0; k < ones; ++k) {
      naive = naive + at::ones_like(naive);
    }
    if (ones > 0) {
      INFO(rank_tag() << describe(dtype) << ": naive accumulation should lose the ones");
      CHECK_FALSE(at::equal(naive, expected));
    }
    comm->all_reduce(t, ReduceOp::kSum);
    check_elements(t, expected, "all_reduce sum trap " + describe(dtype));
    // reduce_scatter takes the same fp32 path: every chunk is the trap vector.
    auto input = at::tensor(mine, at::kDouble).to(dtype).repeat({n});
    auto output = at::empty({static_cast<int64_t>(bigs.size())}, dtype);
    comm->reduce_scatter(input, output, ReduceOp::kSum);
    check_elements(output, expected, "reduce_scatter sum trap " + describe(dtype));
  }
}

TEST_CASE("reduce_scatter gives rank r the reduction of chunk r for every dtype and op",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  for (const auto op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
    for (const auto dtype : op == ReduceOp::kAvg ? kFloatingDtypes : kAllDtypes) {
      for (const int64_t m : {int64_t{1}, int64_t{257}, int64_t{65537}}) {
        // input [n*m]: element j belongs to chunk j / m; output [m].
        const auto input = operand_tensor(operand_for(op), dtype, me, n, n * m);
        auto output = at::full({m}, 7, dtype);
        comm->reduce_scatter(input, output, op);
        const auto expected = reference(operand_for(op), op, dtype, n, n * m).narrow(0, me * m, m);
        check_elements(output, expected,
                       "reduce_scatter " + std::string(to_string(op)) + " " + describe(dtype) +
                           " chunk [" + std::to_string(m) + "]",
                       op == ReduceOp::kAvg ? ulp(dtype) : 0.0);
      }
    }
  }
}

TEST_CASE("reduce_scatter into the rank's own chunk of its input (ZeRO-2 aliasing)",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  const int64_t m = 4099;
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kLong}) {
    auto input = operand_tensor(sum_operand, dtype, me, n, n * m);
    // output [m] is a view into input: MPI forbids that aliasing, the backend must not care.
    auto output = input.narrow(0, me * m, m);
    comm->reduce_scatter(input, output, ReduceOp::kSum);
    const auto expected =
        reference(sum_operand, ReduceOp::kSum, dtype, n, n * m).narrow(0, me * m, m);
    check_elements(output, expected, "aliased reduce_scatter " + describe(dtype));
  }
}

TEST_CASE("all_gather puts rank r's input at chunk r for every dtype, also in place",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  for (const auto dtype : kAllDtypes) {
    for (const auto m : kCounts) {
      std::vector<at::Tensor> chunks;
      for (int r = 0; r < n; ++r) {
        chunks.push_back(payload(dtype, r, m));
      }
      const auto expected = at::cat(chunks);
      // Separate buffers: input [m] -> output [n*m].
      auto output = at::zeros({n * m}, dtype);
      comm->all_gather(payload(dtype, me, m), output);
      check_elements(output, expected,
                     "all_gather " + describe(dtype) + " [" + std::to_string(m) + "]");
      // In place: the input is this rank's chunk of the output (MPI_IN_PLACE).
      auto inplace = at::zeros({n * m}, dtype);
      auto own = inplace.narrow(0, me * m, m);
      own.copy_(payload(dtype, me, m));
      comm->all_gather(own, inplace);
      check_elements(inplace, expected,
                     "in-place all_gather " + describe(dtype) + " [" + std::to_string(m) + "]");
    }
  }
}

TEST_CASE("broadcast leaves every rank with the root's tensor, for each root and dtype",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  for (const auto dtype : kAllDtypes) {
    for (const auto m : kCounts) {
      for (int root = 0; root < n; ++root) {
        auto t = payload(dtype, comm->rank(), m);
        comm->broadcast(t, root);
        check_elements(t, payload(dtype, root, m),
                       "broadcast " + describe(dtype) + " [" + std::to_string(m) + "] from root " +
                           std::to_string(root));
      }
    }
  }
}

TEST_CASE("send/recv around a ring delivers each rank's tensor to its right neighbour",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  if (n == 1) { // no neighbour (single-process build): the only peer is this rank itself
    CHECK_THROWS_WITH(comm->send(at::zeros({1}), 0), Catch::Contains("cannot send to itself"));
    return;
  }
  const int left = (me + n - 1) % n;
  for (std::size_t d = 0; d < kAllDtypes.size(); ++d) {
    const auto dtype = kAllDtypes[d];
    for (const auto m : kCounts) {
      auto in = at::zeros({m}, dtype);
      // A distinct tag per dtype: the receive matches only its own message.
      ring_exchange(comm, payload(dtype, me, m), in, static_cast<int>(d) + 11);
      check_elements(in, payload(dtype, left, m),
                     "recv " + describe(dtype) + " [" + std::to_string(m) + "] from rank " +
                         std::to_string(left));
    }
  }
}

TEST_CASE("send_recv around a ring: every rank sends right and receives from the left at once",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  const int left = (me + n - 1) % n;
  const int right = (me + 1) % n;
  for (std::size_t d = 0; d < kAllDtypes.size(); ++d) {
    const auto dtype = kAllDtypes[d];
    for (const auto m : kCounts) {
      // All ranks exchange at the same moment: with blocking send then recv this is the
      // pattern that deadlocks once a message is too large to be buffered.
      auto in = at::zeros({m}, dtype);
      comm->send_recv(payload(dtype, me, m), right, in, left, static_cast<int>(d) + 31);
      check_elements(in, payload(dtype, left, m),
                     "send_recv " + describe(dtype) + " [" + std::to_string(m) + "] from rank " +
                         std::to_string(left));
    }
  }
  // Asynchronous, twice in flight (ring attention's block and gradient exchanges), with
  // compute in between: each completes with its own payload, in issue order.
  const int64_t m = 1 << 18;
  auto a_in = at::zeros({m}, at::kFloat);
  auto b_in = at::zeros({m}, at::kDouble);
  const auto a_out = payload(at::kFloat, me, m);
  const auto b_out = payload(at::kDouble, me, m);
  auto a = comm->send_recv_async(a_out, right, a_in, left);
  auto b = comm->send_recv_async(b_out, right, b_in, left);
  const auto busy = at::randn({256, 256}).matmul(at::randn({256, 256}));
  CHECK(busy.size(0) == 256);
  b->wait();
  CHECK(a->is_completed());
  a->wait();
  check_elements(a_in, payload(at::kFloat, left, m), "async send_recv float");
  check_elements(b_in, payload(at::kDouble, left, m), "async send_recv double");
  // Counted as one send_recv of the bytes sent (a group of one records nothing).
  if (n > 1) {
    auto log = std::make_shared<CommLog>();
    comm->set_log(log);
    log->enable();
    comm->send_recv(a_out, right, a_in, left);
    comm->set_log(nullptr);
    CHECK(log->count(CollectiveKind::kSendRecv) == 1);
    CHECK(log->bytes(CollectiveKind::kSendRecv) == m * 4);
  }
  REQUIRE_THROWS_WITH(comm->send_recv(at::zeros({4}), right, at::zeros({5}), left),
                      Catch::Contains("send_recv on group 'test': the send tensor (Float, 4 "
                                      "elements) and the receive tensor (Float, 5 elements) must "
                                      "have the same dtype and size"));
  REQUIRE_THROWS_WITH(comm->send_recv(a_in, n, b_in, left),
                      Catch::Contains("destination " + std::to_string(n) + " is not a rank"));
  REQUIRE_THROWS_WITH(comm->send_recv(a_in, right, a_in, left),
                      Catch::Contains("must not share memory"));
}

TEST_CASE("barrier lets no rank leave before every rank has arrived", "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  namespace fs = std::filesystem;
  // Rank 0 names a fresh directory (its pid) and shares the name; every rank drops a marker
  // file, the last rank only after a pause, then all pass the barrier and look for n markers.
  // Ranks of these tests share a node, hence a file system.
  auto id = at::tensor({static_cast<int64_t>(::getpid())}, at::kLong);
  comm->broadcast(id, 0);
  const auto dir =
      fs::temp_directory_path() / ("meshtrain_barrier_" + std::to_string(id.item<int64_t>()));
  if (me == 0) {
    fs::create_directories(dir);
  }
  comm->barrier(); // the directory exists before anyone writes into it
  if (me == n - 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  std::ofstream(dir / ("rank_" + std::to_string(me))) << me;
  comm->barrier();
  int found = 0;
  for (int r = 0; r < n; ++r) {
    found += fs::exists(dir / ("rank_" + std::to_string(r))) ? 1 : 0;
  }
  INFO(rank_tag() << "markers found after the barrier in " << dir);
  CHECK(found == n);
  comm->barrier(); // nobody is still looking when rank 0 removes the directory
  if (me == 0) {
    fs::remove_all(dir);
  }
}

// ---- async Work ----------------------------------------------------------------------------

TEST_CASE("async operations in flight at once complete in issue order with correct values",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  const int64_t m = 262147;
  // Issue 6 all_reduces, an all_gather and a broadcast without waiting in between.
  std::vector<at::Tensor> sums;
  std::vector<WorkPtr> works;
  for (int k = 0; k < 6; ++k) {
    sums.push_back(at::full({m}, k + me, at::kFloat));
    works.push_back(comm->all_reduce_async(sums.back()));
  }
  auto gathered = at::zeros({n * m}, at::kLong);
  works.push_back(comm->all_gather_async(payload(at::kLong, me, m), gathered));
  auto bcast = payload(at::kInt, me, m);
  works.push_back(comm->broadcast_async(bcast, n - 1));
  // Wait on the last one only: issue order is execution order, so when it is done every
  // earlier operation must be done too.
  CHECK(works.back()->wait(kLongWait));
  for (std::size_t w = 0; w < works.size(); ++w) {
    INFO(rank_tag() << "work " << w << " of " << works.size());
    CHECK(works[w]->is_completed());
    CHECK(works[w]->wait(std::chrono::milliseconds(0))); // done: returns true at once
  }
  for (int k = 0; k < 6; ++k) {
    // sum over r of (k + r) = n*k + n(n-1)/2
    check_elements(sums[k], at::full({m}, n * k + n * (n - 1) / 2, at::kFloat),
                   "async all_reduce " + std::to_string(k));
  }
  std::vector<at::Tensor> chunks;
  for (int r = 0; r < n; ++r) {
    chunks.push_back(payload(at::kLong, r, m));
  }
  check_elements(gathered, at::cat(chunks), "async all_gather");
  check_elements(bcast, payload(at::kInt, n - 1, m), "async broadcast");
}

TEST_CASE("a blocking call issued behind pending async work runs after it, in issue order",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int n = comm->size();
  const int me = comm->rank();
  const int64_t m = 65537;
  // Blocking calls may run on the caller's thread, but only when nothing is pending: here
  // the async all_reduces are ahead of it, so they must be complete when it returns.
  std::vector<at::Tensor> pending;
  std::vector<WorkPtr> works;
  for (int k = 0; k < 4; ++k) {
    pending.push_back(at::full({m}, k * 10 + me, at::kDouble));
    works.push_back(comm->all_reduce_async(pending.back(), ReduceOp::kMax));
  }
  auto blocking = at::full({m}, me + 1, at::kInt);
  comm->all_reduce(blocking);
  for (int k = 0; k < 4; ++k) {
    INFO(rank_tag() << "async all_reduce " << k << " issued before the blocking one");
    CHECK(works[k]->is_completed());
    check_elements(pending[k], at::full({m}, k * 10 + n - 1, at::kDouble),
                   "async max " + std::to_string(k));
  }
  check_elements(blocking, at::full({m}, n * (n + 1) / 2, at::kInt), "blocking sum");
  // And the other way round: async work issued after a blocking call still completes.
  auto after = at::full({m}, 1.0f);
  CHECK(comm->all_reduce_async(after)->wait(kLongWait));
  check_elements(after, at::full({m}, static_cast<float>(n)), "async after blocking");
}

TEST_CASE("Work::wait(timeout) returns false while a recv is pending and true once it is done",
          "[mpi][comm]") {
  const auto data_comm = fresh_world("data");
  const auto signal_comm = fresh_world("signal");
  const int me = data_comm->rank();
  const int64_t m = 1000;
  if (data_comm->size() == 1) { // no peer (single-process build): async work is complete at once
    auto t = at::ones({m});
    auto work = data_comm->all_reduce_async(t);
    CHECK(work->is_completed());
    CHECK(work->wait(std::chrono::milliseconds(0)));
    return;
  }
  // Rank 0 sends only after rank 1 tells it (on another communicator) that it has seen its
  // receive still pending, so the pending state below is certain, not a race.
  if (me == 1) {
    auto in = at::zeros({m}, at::kDouble);
    auto work = data_comm->recv_async(in, 0, 3);
    CHECK_FALSE(work->wait(std::chrono::milliseconds(20)));
    CHECK_FALSE(work->is_completed());
    signal_comm->send(at::ones({1}, at::kInt), 0);
    CHECK(work->wait(kLongWait));
    CHECK(work->is_completed());
    check_elements(in, payload(at::kDouble, 0, m), "recv after the go signal");
  } else if (me == 0) {
    auto go = at::zeros({1}, at::kInt);
    signal_comm->recv(go, 1);
    CHECK(go.item<int>() == 1);
    auto work = data_comm->send_async(payload(at::kDouble, 0, m), 1, 3);
    CHECK(work->wait(kLongWait));
    CHECK(work->is_completed());
  }
  data_comm->barrier();
}

TEST_CASE("a transport failure (truncated recv) is rethrown by Work::wait as CommError",
          "[mpi][comm]") {
  const auto comm = fresh_world();
  const int me = comm->rank();
  if (comm->size() == 1) { // no peer (single-process build)
    CHECK_THROWS_WITH(comm->recv(at::zeros({4}), 0), Catch::Contains("cannot receive from itself"));
    return;
  }
  // 8 elements sent into a 4-element receive: MPI reports a truncation on the receiver, the
  // worker thread catches it and wait() rethrows it with the MPI call and file:line.
  if (me == 0) {
    comm->send(at::arange(8, at::kInt), 1, 5);
  } else if (me == 1) {
    auto small = at::zeros({4}, at::kInt);
    auto work = comm->recv_async(small, 0, 5);
    CHECK_THROWS_AS(work->wait(), meshtrain::CommError);
    CHECK_THROWS_WITH(work->wait(), Catch::Contains("MPI_Irecv of 16 bytes failed") &&
                                        Catch::Contains("comm_mpi.cpp"));
    CHECK(work->is_completed());
  }
  comm->barrier(); // the communicator is still usable after a failed operation
  auto t = at::ones({3}, at::kInt);
  comm->all_reduce(t);
  check_elements(t, at::full({3}, comm->size(), at::kInt), "all_reduce after the failure");
}

// ---- argument errors -------------------------------------------------------------------------

TEST_CASE("Communicator errors: non-contiguous and undefined tensors name the call and strides",
          "[comm]") {
  const auto& world = test_runtime().world();
  const auto strided = at::zeros({4, 6}).t(); // sizes [6, 4], strides [1, 6]
  const auto ok = at::zeros({24});
  const auto contiguity = Catch::Contains("must be contiguous (got sizes [6, 4], strides [1, 6])");
  REQUIRE_THROWS_WITH(world->all_reduce(strided),
                      Catch::Contains("all_reduce on group 'world': tensor") && contiguity);
  REQUIRE_THROWS_WITH(world->broadcast(strided, 0),
                      Catch::Contains("broadcast on group 'world': tensor") && contiguity);
  REQUIRE_THROWS_WITH(world->all_gather(strided, at::zeros({24 * world->size()})),
                      Catch::Contains("all_gather on group 'world': input") && contiguity);
  REQUIRE_THROWS_WITH(world->reduce_scatter(ok, strided),
                      Catch::Contains("reduce_scatter on group 'world': output") && contiguity);
  REQUIRE_THROWS_WITH(world->send(strided, 0), Catch::Contains("send") && contiguity);
  REQUIRE_THROWS_WITH(world->recv(strided, 0), Catch::Contains("recv") && contiguity);
  REQUIRE_THROWS_WITH(
      world->all_reduce(at::Tensor()),
      Catch::Contains("all_reduce on group 'world': tensor is an undefined tensor"));
}

TEST_CASE("Communicator errors: unsupported dtypes are rejected with the supported list",
          "[comm]") {
  const auto& world = test_runtime().world();
  const auto supported =
      Catch::Contains("supported: Float, Double, BFloat16, Half, Int, Long, Byte");
  REQUIRE_THROWS_WITH(world->all_reduce(at::zeros({3}, at::kBool)),
                      Catch::Contains("all_reduce on group 'world': tensor has dtype Bool") &&
                          supported);
  REQUIRE_THROWS_WITH(world->broadcast(at::zeros({3}, at::kComplexFloat), 0),
                      Catch::Contains("has dtype ComplexFloat") && supported);
  REQUIRE_THROWS_WITH(world->all_gather(at::zeros({3}, at::kShort), at::zeros({3}, at::kShort)),
                      Catch::Contains("all_gather on group 'world': input has dtype Short") &&
                          supported);
  REQUIRE_THROWS_WITH(world->send(at::zeros({3}, at::kChar), 0),
                      Catch::Contains("send on group 'world': tensor has dtype Char") && supported);
}

TEST_CASE("Communicator errors: avg on integer dtypes and mismatched input/output dtypes",
          "[comm]") {
  const auto& world = test_runtime().world();
  const int n = world->size();
  // Checked even where the group is of one rank and the call would be a no-op.
  REQUIRE_THROWS_WITH(world->all_reduce(at::zeros({3}, at::kInt), ReduceOp::kAvg),
                      Catch::Contains("all_reduce on group 'world': op avg needs a floating "
                                      "dtype, got Int"));
  REQUIRE_THROWS_WITH(
      world->reduce_scatter(at::zeros({2 * n}, at::kByte), at::zeros({2}, at::kByte),
                            ReduceOp::kAvg),
      Catch::Contains("reduce_scatter on group 'world': op avg needs a floating dtype, got Byte"));
  REQUIRE_THROWS_WITH(
      world->reduce_scatter(at::zeros({2 * n}, at::kFloat), at::zeros({2}, at::kDouble)),
      Catch::Contains("input dtype Float differs from output dtype Double"));
  REQUIRE_THROWS_WITH(
      world->all_gather(at::zeros({2}, at::kBFloat16), at::zeros({2 * n}, at::kHalf)),
      Catch::Contains("all_gather on group 'world': input dtype BFloat16 differs from output "
                      "dtype Half"));
}

TEST_CASE("Communicator errors: all_gather and reduce_scatter sizes name the group size and "
          "element counts",
          "[mpi][comm]") {
  // Local checks: every rank throws the same error before any transport call.
  const auto& world = test_runtime().world();
  const int n = world->size();
  std::ostringstream gather;
  gather << "all_gather on group 'world': output has " << 3 * n + 1
         << " elements, expected group size " << n << " x input elements 3 = " << 3 * n;
  REQUIRE_THROWS_WITH(world->all_gather(at::zeros({3}), at::zeros({3 * n + 1})),
                      Catch::Contains(gather.str()));
  std::ostringstream scatter;
  scatter << "reduce_scatter on group 'world': input has " << 2 * n + 1
          << " elements, expected group size " << n << " x output elements 2 = " << 2 * n;
  REQUIRE_THROWS_WITH(world->reduce_scatter(at::zeros({2 * n + 1}), at::zeros({2})),
                      Catch::Contains(scatter.str()));
  // The output of all_gather counts elements, not rows: [n, 3] for a [3] input is fine, a
  // [3] output for a [3] input is not (unless n == 1).
  if (n > 1) {
    REQUIRE_THROWS_WITH(world->all_gather(at::zeros({3}), at::zeros({3})),
                        Catch::Contains("output has 3 elements, expected group size"));
  }
}

TEST_CASE("Communicator errors: bad broadcast roots, send/recv peers and tags", "[mpi][comm]") {
  const auto& world = test_runtime().world();
  const int n = world->size();
  const int me = world->rank();
  const auto t = at::zeros({2});
  std::ostringstream root;
  root << "broadcast on group 'world': root " << n << " is not a rank of this group (size " << n
       << ")";
  REQUIRE_THROWS_WITH(world->broadcast(t, n), Catch::Contains(root.str()));
  REQUIRE_THROWS_WITH(world->broadcast(t, -1), Catch::Contains("root -1 is not a rank"));
  REQUIRE_THROWS_WITH(world->send(t, n),
                      Catch::Contains("send on group 'world': destination " + std::to_string(n) +
                                      " is not a rank of this group"));
  REQUIRE_THROWS_WITH(world->recv(t, -2),
                      Catch::Contains("recv on group 'world': source -2 is not a rank"));
  REQUIRE_THROWS_WITH(world->send(t, me),
                      Catch::Contains("rank " + std::to_string(me) + " cannot send to itself"));
  REQUIRE_THROWS_WITH(world->recv(t, me), Catch::Contains("rank " + std::to_string(me) +
                                                          " cannot receive from itself"));
  const int peer = (me + 1) % n;
  if (n > 1) {
    REQUIRE_THROWS_WITH(world->send(t, peer, -1),
                        Catch::Contains("send on group 'world': tag -1 must be >= 0"));
    REQUIRE_THROWS_WITH(world->recv(t, peer, -7),
                        Catch::Contains("recv on group 'world': tag -7 must be >= 0"));
  }
}

// ---- across-rank agreement -------------------------------------------------------------------

TEST_CASE("across-rank check: different sizes throw on every rank, naming each rank's numel",
          "[mpi][comm]") {
  const auto comm = fresh_world("agree");
  comm->set_check_across_ranks(true);
  const int n = comm->size();
  const int me = comm->rank();
  // Each rank's call is valid on its own (the local checks pass everywhere), so every rank
  // reaches the agreement exchange — a fixed-size all_gather of descriptors — and every rank
  // sees the same mismatch and throws. Nothing is left half-issued, hence no hang.
  if (n == 1) { // nobody to disagree with (single-process build)
    CHECK_NOTHROW(comm->all_reduce(at::zeros({1})));
    return;
  }
  auto t = at::zeros({me + 1});
  CHECK_THROWS_WITH(comm->all_reduce(t),
                    Catch::Contains("all_reduce on group 'agree': ranks disagree") &&
                        Catch::Contains("rank 0: all_reduce numel 1 dtype Float op sum") &&
                        Catch::Contains("rank 1: all_reduce numel 2 dtype Float op sum"));
  CHECK_THROWS_WITH(comm->reduce_scatter(at::zeros({n * (me + 1)}), at::zeros({me + 1})),
                    Catch::Contains("reduce_scatter on group 'agree': ranks disagree") &&
                        Catch::Contains("rank 1: reduce_scatter numel " + std::to_string(2 * n)));
  CHECK_THROWS_WITH(comm->all_gather(at::zeros({me + 2}), at::zeros({n * (me + 2)})),
                    Catch::Contains("all_gather on group 'agree': ranks disagree") &&
                        Catch::Contains("rank 0: all_gather numel 2"));
  CHECK_THROWS_WITH(comm->broadcast(at::zeros({me + 1}), 0),
                    Catch::Contains("broadcast on group 'agree': ranks disagree"));
  // The communicator is still in step afterwards: matching calls pass and compute.
  auto same = at::full({5}, me + 1.0);
  CHECK_NOTHROW(comm->all_reduce(same));
  check_elements(same, at::full({5}, n * (n + 1) / 2.0), "all_reduce after the mismatches");
}

TEST_CASE("across-rank check: different dtype, op, root or call are named too", "[mpi][comm]") {
  const auto comm = fresh_world("agree");
  comm->set_check_across_ranks(true);
  const int n = comm->size();
  const int me = comm->rank();
  if (n == 1) { // nobody to disagree with (single-process build)
    CHECK_NOTHROW(comm->broadcast(at::zeros({4}), 0));
    return;
  }
  const auto disagree = Catch::Contains("ranks disagree");
  CHECK_THROWS_WITH(comm->all_reduce(at::zeros({4}, me == 0 ? at::kDouble : at::kFloat)),
                    disagree && Catch::Contains("rank 0: all_reduce numel 4 dtype Double") &&
                        Catch::Contains("rank 1: all_reduce numel 4 dtype Float"));
  CHECK_THROWS_WITH(comm->all_reduce(at::zeros({4}), me == 0 ? ReduceOp::kMax : ReduceOp::kSum),
                    disagree && Catch::Contains("op max") && Catch::Contains("op sum"));
  CHECK_THROWS_WITH(
      comm->broadcast(at::zeros({4}), me == 0 ? 0 : n - 1),
      disagree && Catch::Contains("rank 0: broadcast numel 4 dtype Float root 0") &&
          Catch::Contains("rank 1: broadcast numel 4 dtype Float root " + std::to_string(n - 1)));
  // Same numel, dtype and op/root code (sum = 0, root 0) but different calls.
  const auto t = at::zeros({4});
  CHECK_THROWS_WITH(me == 0 ? comm->all_reduce(t) : comm->broadcast(t, 0),
                    disagree && Catch::Contains("rank 0: all_reduce") &&
                        Catch::Contains("rank 1: broadcast"));
  // Agreeing calls pass, and the check adds nothing to the counting log.
  auto log = std::make_shared<CommLog>();
  comm->set_log(log);
  log->enable();
  auto ones = at::ones({4}, at::kInt);
  CHECK_NOTHROW(comm->all_reduce(ones));
  check_elements(ones, at::full({4}, n, at::kInt), "checked all_reduce");
  CHECK(log->records().size() == 1);
}

// ---- counting mode and groups of one ---------------------------------------------------------

TEST_CASE("CommLog: disabled by default; count and bytes filter by kind and group", "[comm]") {
  CommLog log;
  log.record(CollectiveKind::kAllReduce, "dp", 100);
  CHECK(log.records().empty());
  CHECK_FALSE(log.enabled());
  log.enable();
  log.record(CollectiveKind::kAllReduce, "dp", 100);
  log.record(CollectiveKind::kAllReduce, "tp", 40);
  log.record(CollectiveKind::kAllGather, "tp", 64);
  CHECK(log.count(CollectiveKind::kAllReduce) == 2);
  CHECK(log.bytes(CollectiveKind::kAllReduce) == 140);
  CHECK(log.count(CollectiveKind::kAllReduce, "tp") == 1);
  CHECK(log.bytes(CollectiveKind::kAllReduce, "tp") == 40);
  CHECK(log.bytes(CollectiveKind::kAllGather, "dp") == 0);
  CHECK(log.count(CollectiveKind::kBarrier) == 0);
  CHECK(std::string(to_string(CollectiveKind::kReduceScatter)) == "reduce_scatter");
  log.clear();
  CHECK(log.records().empty());
  CHECK(log.enabled()); // clear() empties, it does not switch off
}

TEST_CASE("CommLog records kind, group and bytes of every call exactly", "[mpi][comm]") {
  const auto comm = fresh_world("counted");
  const int n = comm->size();
  auto log = std::make_shared<CommLog>();
  comm->set_log(log);
  comm->all_reduce(at::zeros({10})); // log not enabled yet: not recorded
  CHECK(log->records().empty());
  log->enable();
  comm->all_reduce(at::zeros({10})); // 10 x 4 B
  comm->reduce_scatter(at::zeros({6 * n}, at::kBFloat16), at::zeros({6}, at::kBFloat16)); // input
  comm->all_gather(at::zeros({3}, at::kLong), at::zeros({3 * n}, at::kLong));             // output
  comm->broadcast(at::zeros({5}, at::kByte), 0);                                          // 5 x 1 B
  if (n > 1) {
    ring_exchange(comm, at::zeros({2}, at::kDouble), at::zeros({2}, at::kDouble), 0);
  }
  comm->barrier();
  auto child = comm->split(comm->rank() % 2, comm->rank(), "child"); // shares the log
  const bool child_multi = child->size() > 1;
  child->all_reduce(at::zeros({7}, at::kHalf));
  log->enable(false);
  comm->all_reduce(at::zeros({10})); // switched off again: not recorded
  using K = CollectiveKind;
  // send/recv order follows the ring parity used by ring_exchange.
  const bool even = comm->rank() % 2 == 0;
  std::vector<std::tuple<K, std::string, int64_t>> expected{
      {K::kAllReduce, "counted", 40},
      {K::kReduceScatter, "counted", 12 * n},
      {K::kAllGather, "counted", 24 * n},
      {K::kBroadcast, "counted", 5},
      {even ? K::kSend : K::kRecv, "counted", 16},
      {even ? K::kRecv : K::kSend, "counted", 16},
      {K::kBarrier, "counted", 0}};
  if (n == 1) { // a group of one records nothing (single-process build)
    expected.clear();
  }
  if (child_multi) {
    expected.emplace_back(K::kAllReduce, "child", 14);
  }
  const auto got = log->records();
  INFO(rank_tag() << "records: expected " << expected.size() << ", got " << got.size());
  CHECK(got.size() == expected.size());
  for (std::size_t k = 0; k < std::min(got.size(), expected.size()); ++k) {
    const auto& [kind, group, bytes] = expected[k];
    INFO(rank_tag() << "record " << k << ": expected " << to_string(kind) << " '" << group << "' "
                    << bytes << " B, got " << to_string(got[k].kind) << " '" << got[k].group << "' "
                    << got[k].bytes << " B");
    CHECK(got[k].kind == kind);
    CHECK(got[k].group == group);
    CHECK(got[k].bytes == bytes);
  }
  CHECK(log->count(K::kAllReduce, "counted") == (n > 1 ? 1 : 0));
  CHECK(log->bytes(K::kAllGather) == (n > 1 ? 24 * n : 0));
}

TEST_CASE("a group of one: every call is a local no-op that returns completed work and is not "
          "counted",
          "[mpi][comm]") {
  // Each rank splits off alone, whatever the world size.
  const auto& world = test_runtime().world();
  const auto self = world->split(world->rank(), 0, "self");
  REQUIRE(self->size() == 1);
  auto log = std::make_shared<CommLog>();
  self->set_log(log);
  log->enable();
  const int me = world->rank();
  for (const auto op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
    auto t = payload(at::kFloat, me, 9);
    auto work = self->all_reduce_async(t, op);
    CHECK(work->is_completed());
    CHECK(work->wait(std::chrono::milliseconds(0)));
    check_elements(t, payload(at::kFloat, me, 9),
                   std::string("one-rank all_reduce ") + to_string(op));
  }
  auto out = at::zeros({9}, at::kInt);
  self->all_gather(payload(at::kInt, me, 9), out);
  check_elements(out, payload(at::kInt, me, 9), "one-rank all_gather copies input to output");
  auto scattered = at::zeros({9}, at::kBFloat16);
  self->reduce_scatter(payload(at::kBFloat16, me, 9), scattered);
  check_elements(scattered, payload(at::kBFloat16, me, 9), "one-rank reduce_scatter copies");
  auto b = payload(at::kLong, me, 9);
  self->broadcast(b, 0);
  check_elements(b, payload(at::kLong, me, 9), "one-rank broadcast");
  CHECK(self->barrier_async()->is_completed());
  CHECK(log->records().empty());
}

TEST_CASE("Mesh counting: a tp group of one records nothing, dp and world record exactly",
          "[mpi][comm][mesh]") {
  const auto base = fresh_world("world");
  const int n = base->size();
  const int me = base->rank();
  meshtrain::Mesh mesh(meshtrain::ParallelDims{-1, 1, 1, 1}, base);
  auto& log = mesh.comm_log();
  log.enable();
  const auto& tp = mesh.group("tp");
  REQUIRE(tp->size() == 1);
  auto t = at::full({8}, me + 1.0);
  tp->all_reduce(t);
  tp->broadcast(t, 0);
  auto gathered = at::zeros({8});
  tp->all_gather(t, gathered);
  tp->reduce_scatter(t, gathered);
  tp->barrier();
  CHECK(log.records().empty());
  check_elements(t, at::full({8}, me + 1.0), "tp (one rank) all_reduce leaves the tensor");
  // dp spans the whole world here: one record per call, tagged with the group's name.
  const auto& dp = mesh.group("dp");
  dp->all_reduce(t);
  check_elements(t, at::full({8}, n * (n + 1) / 2.0), "dp all_reduce");
  mesh.group("world")->all_gather(at::zeros({2}, at::kDouble), at::zeros({2 * n}, at::kDouble));
  const auto got = log.records();
  if (n == 1) { // dp and world are groups of one as well (single-process build)
    CHECK(got.empty());
    return;
  }
  REQUIRE(got.size() == 2); // same on every rank
  CHECK(got[0].kind == CollectiveKind::kAllReduce);
  CHECK(got[0].group == "dp");
  CHECK(got[0].bytes == 32);
  CHECK(got[1].kind == CollectiveKind::kAllGather);
  CHECK(got[1].group == "world");
  CHECK(got[1].bytes == 16 * n);
  CHECK(log.count(CollectiveKind::kAllReduce, "tp") == 0);
}

// ---- the worker thread and the process ---------------------------------------------------------

TEST_CASE("a communicator's worker thread leaves the process's torch thread count alone",
          "[comm]") {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  {
    const auto comm = fresh_world("threads");
    const auto child = comm->split(0, comm->rank(), "threads_child");
    auto t = at::ones({4096}, at::kBFloat16); // bf16: the worker converts to fp32 and back
    comm->all_reduce_async(t)->wait();
    child->all_reduce_async(t)->wait();
  } // destroying the communicators joins their workers: all they ever did is done by now
  // A thread started now picks up the process-wide setting (ATen initialises each thread's
  // count from it on first use), so a worker that changed the global count shows up here.
  int seen_by_new_thread = 0;
  std::thread([&] { seen_by_new_thread = at::get_num_threads(); }).join();
  const int seen_here = at::get_num_threads();
  at::set_num_threads(before);
  CHECK(seen_here == 2);
  CHECK(seen_by_new_thread == 2);
}
