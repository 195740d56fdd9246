#include "meshtrain/launch/job_exit.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>

namespace meshtrain {

std::unique_ptr<Runtime> start_runtime(int* argc, char*** argv, const std::string& program) {
  try {
    return std::make_unique<Runtime>(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << program << ": error: " << message_of(e) << "\n";
    return nullptr;
  }
}

int agree_on_exit(const CommunicatorPtr& group, int code, const std::string& message,
                  const std::string& program) {
  auto codes = torch::zeros({group->size()}, torch::kInt); // [world]
  group->all_gather(torch::tensor({code}, torch::kInt), codes);
  const auto* c = codes.data_ptr<int>();
  int worst = 0;
  int first_failing = -1;
  for (int r = 0; r < group->size(); ++r) {
    worst = std::max(worst, c[r]);
    if (c[r] != 0 && first_failing < 0) {
      first_failing = r;
    }
  }
  if (first_failing == group->rank()) {
    std::cerr << program << ": error: " << message << "\n";
  }
  return worst;
}

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

int exit_after_failure(const std::string& program, const CommunicatorPtr& world,
                       const std::exception& e, int code) {
  std::cerr << program << ": rank " << world->rank() << ": error: " << message_of(e) << "\n";
  if (world->size() > 1) {
    std::fflush(nullptr);
    std::_Exit(code);
  }
  return code;
}

} // namespace meshtrain
