// defines: parse_faults, injected_faults, fault_due, inject_step_start_faults (see
// fault_injection.h).
#include "meshtrain/launch/fault_injection.h"

#include "meshtrain/core/errors.h"

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <thread>

namespace meshtrain {

const char* to_string(FaultKind kind) {
  switch (kind) {
  case FaultKind::kCrash:
    return "crash";
  case FaultKind::kHang:
    return "hang";
  case FaultKind::kNan:
    return "nan";
  case FaultKind::kKillInSave:
    return "kill-in-save";
  }
  return "?";
}

std::vector<Fault> parse_faults(const std::string& spec) {
  std::vector<Fault> faults;
  std::stringstream entries(spec);
  std::string entry;
  while (std::getline(entries, entry, ',')) {
    std::vector<std::string> parts;
    std::stringstream fields(entry);
    std::string field;
    while (std::getline(fields, field, ':')) {
      parts.push_back(field);
    }
    const auto number = [&](size_t i) {
      char* end = nullptr;
      const long long v = std::strtoll(parts[i].c_str(), &end, 10);
      MT_CHECK(!parts[i].empty() && *end == '\0' && v >= 0, "MESHTRAIN_FAULT entry '", entry,
               "': '", parts[i], "' is not a number >= 0");
      return v;
    };
    MT_CHECK(parts.size() == 2 || parts.size() == 3, "MESHTRAIN_FAULT entry '", entry,
             "': expected <kind>:<step>[:<rank>] with kind crash, hang, nan or kill-in-save");
    Fault f;
    if (parts[0] == "crash") {
      f.kind = FaultKind::kCrash;
    } else if (parts[0] == "hang") {
      f.kind = FaultKind::kHang;
    } else if (parts[0] == "nan") {
      f.kind = FaultKind::kNan;
    } else {
      MT_CHECK(parts[0] == "kill-in-save", "MESHTRAIN_FAULT entry '", entry, "': kind '", parts[0],
               "' is not crash, hang, nan or kill-in-save");
      f.kind = FaultKind::kKillInSave;
    }
    f.step = number(1);
    f.rank = parts.size() == 3 ? static_cast<int>(number(2)) : 0;
    faults.push_back(f);
  }
  return faults;
}

const std::vector<Fault>& injected_faults() {
  static const std::vector<Fault> faults = [] {
    const char* spec = std::getenv("MESHTRAIN_FAULT");
    return spec == nullptr ? std::vector<Fault>{} : parse_faults(spec);
  }();
  return faults;
}

bool fault_due(FaultKind kind, int64_t step, int rank) {
  for (const auto& f : injected_faults()) {
    if (f.kind == kind && f.step == step && f.rank == rank) {
      std::fprintf(stderr, "MESHTRAIN_FAULT: %s at step %lld on rank %d\n", to_string(kind),
                   static_cast<long long>(step), rank);
      std::fflush(nullptr);
      return true;
    }
  }
  return false;
}

void install_fault_injection(Trainer& trainer, CheckpointOptions& checkpoints, int rank) {
  if (injected_faults().empty()) {
    return;
  }
  TrainerHooks hooks;
  hooks.at_step_start = [rank](int64_t step) {
    if (fault_due(FaultKind::kCrash, step, rank)) {
      std::raise(SIGKILL);
    }
    if (fault_due(FaultKind::kHang, step, rank)) {
      for (;;) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
      }
    }
  };
  hooks.on_loss = [rank](int64_t step, const torch::Tensor& loss) {
    return fault_due(FaultKind::kNan, step, rank) ? loss * std::numeric_limits<double>::quiet_NaN()
                                                  : loss;
  };
  trainer.set_hooks(std::move(hooks));
  // After every shard of the save is written, before the checkpoint is completed: the crash
  // the atomic rename exists for.
  checkpoints.before_publish([](int64_t step, int rank_in_save) {
    if (fault_due(FaultKind::kKillInSave, step, rank_in_save)) {
      std::raise(SIGKILL);
    }
  });
}

} // namespace meshtrain
