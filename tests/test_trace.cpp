// Tests of core/trace.h: the Chrome trace recorder and the blocked-communication clock, on
// real ranks for the collectives.
#include "meshtrain/core/trace.h"
#include "tests/harness.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <chrono>
#include <string>
#include <thread>

using meshtrain::comm_blocked_ns;
using meshtrain::Tracer;
using meshtrain::TraceSpan;
using meshtrain::testing::rank_tag;
using meshtrain::testing::test_runtime;

namespace {

// The complete events of this process's trace whose name is `name`.
std::vector<nlohmann::json> events_named(const std::string& name) {
  const auto trace = nlohmann::json::parse(Tracer::get()->to_json());
  std::vector<nlohmann::json> found;
  for (const auto& e : trace["traceEvents"]) {
    if (e["ph"] == "X" && e["name"] == name) {
      found.push_back(e);
    }
  }
  return found;
}

constexpr auto kLate = std::chrono::milliseconds(500);
constexpr int64_t kBlockedAtLeastUs = 250'000; // of the 500 ms; slack for a busy machine

} // namespace

TEST_CASE("trace: spans and thread names become Chrome trace events", "[trace]") {
  auto& tracer = Tracer::start(test_runtime().rank());
  tracer.name_thread("train \"main\""); // quotes must be escaped in the JSON
  {
    const TraceSpan span("forward", "compute");
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  tracer.complete("all_reduce dp 1.0 KiB", "comm", 10, 35);

  const auto trace = nlohmann::json::parse(tracer.to_json()); // throws if malformed
  REQUIRE(trace.contains("traceEvents"));
  bool named = false;
  for (const auto& e : trace["traceEvents"]) {
    named = named ||
            (e["ph"] == "M" && e["name"] == "thread_name" && e["args"]["name"] == "train \"main\"");
  }
  CHECK(named);
  const auto forward = events_named("forward");
  REQUIRE(!forward.empty());
  CHECK(forward.back()["cat"] == "compute");
  CHECK(forward.back()["pid"] == test_runtime().rank());
  CHECK(forward.back()["dur"].get<int64_t>() >= 2000); // microseconds
  const auto comm = events_named("all_reduce dp 1.0 KiB");
  REQUIRE(!comm.empty());
  CHECK(comm.back()["ts"] == 10);
  CHECK(comm.back()["dur"] == 25);
}

TEST_CASE("trace: waiting for a late rank is blocked time, and the collective is in the trace",
          "[trace][mpi]") {
  auto& rt = test_runtime();
  Tracer::start(rt.rank());
  const auto& world = rt.world();
  const std::string label = "all_reduce world 4.0 KiB";
  for (const bool async : {false, true}) {
    INFO(rank_tag() << (async ? "all_reduce_async + wait" : "all_reduce"));
    auto tensor = torch::ones({1024}, torch::kFloat);
    world->barrier();
    if (rt.rank() == rt.world_size() - 1) {
      std::this_thread::sleep_for(kLate);
    }
    const int64_t before = comm_blocked_ns();
    if (async) {
      world->all_reduce_async(tensor)->wait();
    } else {
      world->all_reduce(tensor);
    }
    const int64_t blocked_us = (comm_blocked_ns() - before) / 1000;
    CHECK(tensor[0].item<float>() == static_cast<float>(rt.world_size()));
    if (rt.world_size() == 1) {
      CHECK(events_named(label).empty()); // a group of one is free: nothing ran, nothing waited
      continue;
    }
    if (rt.rank() == 0) {
      // Rank 0 waited for the late rank: inline in the call, or in Work::wait.
      CHECK(blocked_us >= kBlockedAtLeastUs);
      const auto waits = events_named(async ? "wait " + label : label);
      REQUIRE(!waits.empty());
      CHECK(waits.back()["dur"].get<int64_t>() >= kBlockedAtLeastUs);
      CHECK(waits.back()["cat"] == (async ? "wait" : "comm"));
    }
    // Whoever ran it (the worker, or the caller inline), the collective itself is a span.
    CHECK(!events_named(label).empty());
  }
}
