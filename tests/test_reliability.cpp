// Tests of the reliability pieces below the programs: the collective watchdog reports a
// collective that one rank never joins (kind, group, sequence number, bytes, the flight
// recorder), watches splits and the argument check too, names the rank holding a collective up
// from the ranks' status board (core/comm_status.h), and stays quiet otherwise; the start-up
// agreement stops every rank with a message naming the fields and ranks that differ;
// MESHTRAIN_FAULT's parser. The programs' behaviour under injected faults (crash, hang, NaN) is
// tested end to end by examples/gpt/check_faults.sh.
#include <catch2/catch.hpp>

#include "meshtrain/core/comm_watchdog.h"
#include "meshtrain/launch/fault_injection.h"
#include "meshtrain/launch/startup_check.h"
#include "tests/harness.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

// Restores the Runtime's own watchdog when a test is done with its own.
struct RestoreWatchdog {
  ~RestoreWatchdog() { test_runtime().set_comm_timeout(test_runtime().comm_timeout()); }
};

} // namespace

TEST_CASE("watchdog: a collective one rank is late for is reported with the flight recorder",
          "[reliability][mpi]") {
  const auto& world = test_runtime().world();
  const RestoreWatchdog restore;
  if (world->size() < 2) {
    // Single-process build: a group of one issues no collectives (DESIGN §2), so even a
    // deadline of 1 ms has nothing to report.
    std::atomic<bool> fired{false};
    CommWatchdogOptions options;
    options.timeout = std::chrono::milliseconds(1);
    options.on_expiry = [&](const std::string&) { fired = true; };
    CommWatchdog::start(options);
    auto t = torch::ones({4});
    world->all_reduce(t);
    world->barrier();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(CommWatchdog::get()->report().empty());
    CommWatchdog::stop();
    CHECK_FALSE(fired.load());
    CHECK(t[0].item<float>() == 1.0f);
    return;
  }
  std::mutex mutex;
  std::string report;
  CommWatchdogOptions options;
  options.timeout = std::chrono::milliseconds(300);
  options.rank = world->rank();
  options.on_expiry = [&](const std::string& text) {
    std::lock_guard<std::mutex> lock(mutex);
    report = text;
  };
  CommWatchdog::start(options);

  auto warm = torch::ones({4});
  world->all_reduce(warm); // completes: goes to the flight recorder
  world->barrier();
  auto late = torch::ones({256});
  if (world->rank() != 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500)); // rank 0 waits past 300 ms
  }
  world->all_reduce(late);
  CHECK(late[0].item<float>() == static_cast<float>(world->size()));
  CommWatchdog::stop(); // joins the watchdog thread: its handler has run if it was to

  std::lock_guard<std::mutex> lock(mutex);
  if (world->rank() == 0) {
    INFO(report);
    CHECK_THAT(report, Catch::Contains("rank 0: collective watchdog: all_reduce #") &&
                           Catch::Contains("on group 'world' (1024 bytes) has not completed") &&
                           Catch::Contains("last completed collectives") &&
                           Catch::Contains("all_reduce #") && Catch::Contains("(16 bytes)"));
  } else {
    CHECK(report.empty()); // its collectives all completed within the deadline
  }
}

namespace {

// Rank 0's watchdog report (every rank's watchdog has a 300 ms deadline) while the last rank
// starts `late` 1.5 s after the others; "" on the other ranks and when nothing was reported.
std::string report_when_last_rank_is_late(const std::function<void(bool late)>& exchange,
                                          std::shared_ptr<CommStatusBoard> status = nullptr) {
  const auto& world = test_runtime().world();
  std::mutex mutex;
  std::string report;
  CommWatchdogOptions options;
  options.timeout = std::chrono::milliseconds(300);
  options.rank = world->rank();
  options.status = std::move(status);
  options.on_expiry = [&](const std::string& text) {
    std::lock_guard<std::mutex> lock(mutex);
    report = text;
  };
  CommWatchdog::start(options);
  world->barrier();
  const bool late = world->rank() == world->size() - 1;
  if (late) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  }
  exchange(late);
  CommWatchdog::stop();
  world->barrier();
  std::lock_guard<std::mutex> lock(mutex);
  return world->rank() == 0 ? report : "";
}

std::string host_name() {
  char buf[256] = {};
  gethostname(buf, sizeof(buf) - 1);
  return buf;
}

} // namespace

TEST_CASE("watchdog: a split and the argument check are watched like every exchange",
          "[reliability][mpi]") {
  const auto& world = test_runtime().world();
  if (world->size() < 2) {
    CHECK(world->split(0, 0, "alone")->size() == 1); // nothing to wait for
    return;
  }
  const RestoreWatchdog restore;
  SECTION("split") {
    const auto report = report_when_last_rank_is_late(
        [&](bool) { CHECK(world->split(0, world->rank(), "late")->size() == world->size()); });
    if (world->rank() == 0) {
      INFO(report);
      CHECK_THAT(report, Catch::Contains("rank 0: collective watchdog: split #") &&
                             Catch::Contains("on group 'world' (0 bytes) has not completed"));
    }
  }
  SECTION("the across-rank argument check (MESHTRAIN_COMM_CHECK)") {
    world->set_check_across_ranks(true);
    const auto report = report_when_last_rank_is_late([&](bool) {
      auto t = torch::ones({8});
      world->all_reduce(t);
    });
    world->set_check_across_ranks(false);
    if (world->rank() == 0) {
      INFO(report);
      CHECK_THAT(report, Catch::Contains("rank 0: collective watchdog: argument check #") &&
                             Catch::Contains("on group 'world'"));
    }
  }
}

TEST_CASE("watchdog: the report names the rank that holds a collective up, its host and its "
          "last collective",
          "[reliability][mpi]") {
  const auto& world = test_runtime().world();
  const auto status = test_runtime().comm_status();
  if (world->size() < 2) {
    CHECK(status == nullptr); // one rank publishes nothing
    return;
  }
  REQUIRE(status != nullptr); // /dev/shm (or MESHTRAIN_COMM_STATUS_DIR) is writable here
  const RestoreWatchdog restore;
  // Pairs of ranks; the last rank is late for its pair's all_reduce. With 4 ranks, rank 0
  // waits in the world all_reduce for rank 2, which waits in its pair's for rank 3.
  const auto pair = world->split(world->rank() / 2, world->rank(), "pair");
  const int last = world->size() - 1;
  const auto report = report_when_last_rank_is_late(
      [&](bool) {
        auto p = torch::ones({4});
        pair->all_reduce(p);
        auto w = torch::ones({4});
        world->all_reduce(w);
      },
      status);
  if (world->rank() != 0) {
    return;
  }
  INFO(report);
  const std::string culprit = "rank " + std::to_string(last) + " (host " + host_name();
  CHECK_THAT(report, Catch::Contains("has not completed after") &&
                         Catch::Contains("held up by rank " + std::to_string(last) + " on host " +
                                         host_name() + "\n") &&
                         Catch::Contains(culprit) &&
                         Catch::Contains("it is the one holding the job up") &&
                         Catch::Contains("its last collective: "));
  if (world->size() == 4) {
    CHECK_THAT(report, Catch::Contains("all_reduce #") && Catch::Contains("on group 'world'") &&
                           Catch::Contains("rank 2 (host " + host_name()) &&
                           Catch::Contains("has not issued #") &&
                           Catch::Contains("it waits in all_reduce #1 on group 'pair'") &&
                           Catch::Contains("has not issued #1 on group 'pair'"));
  }
}

TEST_CASE("watchdog: no report while collectives complete in time", "[reliability][mpi]") {
  const auto& world = test_runtime().world();
  const RestoreWatchdog restore;
  std::atomic<bool> fired{false};
  CommWatchdogOptions options;
  options.timeout = std::chrono::milliseconds(2000);
  options.on_expiry = [&](const std::string&) { fired = true; };
  CommWatchdog::start(options);
  for (int i = 0; i < 50; ++i) {
    auto t = torch::ones({1000});
    world->all_reduce_async(t)->wait();
  }
  CHECK(CommWatchdog::get()->report().empty()); // nothing left in flight
  CommWatchdog::stop();
  CHECK_FALSE(fired.load());
}

TEST_CASE("start-up agreement: equal fields pass, a differing one stops every rank",
          "[reliability][mpi]") {
  const auto& world = test_runtime().world();
  std::vector<SetupField> same = {{"--n-layer", "4"}, {"--tp", "2"}};
  CHECK_NOTHROW(check_ranks_agree(world, same, "configuration"));

  auto differing = same;
  if (world->rank() == world->size() - 1) {
    differing[0].second = "5";
  }
  if (world->size() == 1) { // a group of one agrees with itself
    CHECK_NOTHROW(check_ranks_agree(world, differing, "configuration"));
    return;
  }
  const std::string last = std::to_string(world->size() - 1);
  REQUIRE_THROWS_WITH(check_ranks_agree(world, differing, "configuration"),
                      Catch::Contains("the ranks disagree on the configuration (1 field(s)") &&
                          Catch::Contains("--n-layer: rank 0 has '4', rank " + last + " has '5'") &&
                          !Catch::Contains("--tp"));
}

TEST_CASE("fault injection: MESHTRAIN_FAULT entries parse, bad ones name the entry",
          "[reliability]") {
  const auto faults = parse_faults("crash:3:1,hang:5,nan:2:0,kill-in-save:4");
  REQUIRE(faults.size() == 4);
  CHECK(faults[0].kind == FaultKind::kCrash);
  CHECK(faults[0].step == 3);
  CHECK(faults[0].rank == 1);
  CHECK(faults[1].kind == FaultKind::kHang);
  CHECK(faults[1].rank == 0);
  CHECK(faults[3].kind == FaultKind::kKillInSave);
  REQUIRE_THROWS_WITH(parse_faults("explode:3"), Catch::Contains("kind 'explode' is not crash"));
  REQUIRE_THROWS_WITH(parse_faults("crash:x"), Catch::Contains("'x' is not a number >= 0"));
  REQUIRE_THROWS_WITH(parse_faults("crash"), Catch::Contains("expected <kind>:<step>[:<rank>]"));
}
