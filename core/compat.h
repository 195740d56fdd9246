// defines: the few spots where LibTorch 1.13 (Debian, CPU) and 2.x (GPU machines) differ.
// Everything else in meshtrain uses the public C++ API common to both; a version difference
// found later goes here and nowhere else.
#pragma once

#include <torch/torch.h>

#include <string>

namespace meshtrain::compat {

// "1.13.1" style version string of the LibTorch we were compiled against.
inline std::string torch_version() {
#if defined(TORCH_VERSION)
  return TORCH_VERSION;
#else
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
#endif
}

} // namespace meshtrain::compat
