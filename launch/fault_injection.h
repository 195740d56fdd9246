// defines: FaultKind, Fault, parse_faults, injected_faults, fault_due — test-only fault
// injection (docs/reliability.md). The environment variable MESHTRAIN_FAULT holds a comma-
// separated list of <kind>:<step>[:<rank>] (rank 0 when omitted):
//   crash:<s>:<r>         rank r kills itself (SIGKILL) at the start of step s (1-based, the
//                         step the progress line will show)
//   hang:<s>:<r>          rank r stops at the start of step s and never returns (the other
//                         ranks' collective watchdog ends the job)
//   nan:<s>:<r>           rank r's loss of step s is NaN (its gradients too; the Trainer's
//                         --nan-policy decides, identically on every rank)
//   kill-in-save:<s>:<r>  rank r kills itself inside the checkpoint save of step s, after its
//                         shards are written and before the checkpoint is complete
// Unset: no faults and no cost beyond one getenv at start-up. Programs opt in with
// install_fault_injection (train_gpt does); the faults reach the Trainer and the checkpoint
// manager through their hooks, never through calls in the training loop itself.
#pragma once

#include "meshtrain/launch/checkpoint.h"
#include "meshtrain/launch/trainer.h"

#include <cstdint>
#include <string>
#include <vector>

namespace meshtrain {

enum class FaultKind { kCrash, kHang, kNan, kKillInSave };
const char* to_string(FaultKind kind);

struct Fault {
  FaultKind kind;
  int64_t step = 0;
  int rank = 0;
};

// Throws naming the entry and what is allowed when `spec` is malformed.
std::vector<Fault> parse_faults(const std::string& spec);
// MESHTRAIN_FAULT, parsed once per process.
const std::vector<Fault>& injected_faults();
// True when MESHTRAIN_FAULT asks for `kind` at `step` on `rank`; prints a line to stderr
// saying so (the fault tests look for it).
bool fault_due(FaultKind kind, int64_t step, int rank);

// Installs MESHTRAIN_FAULT's faults for this rank: crash, hang and nan as Trainer hooks,
// kill-in-save as the checkpoint options' before_publish hook. Nothing when it is unset.
void install_fault_injection(Trainer& trainer, CheckpointOptions& checkpoints, int rank);

} // namespace meshtrain
