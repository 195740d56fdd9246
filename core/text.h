// defines: cat — a string from any streamable parts, for messages in code that must not
// depend on LibTorch (c10::str's role there): mesh_grid.cpp, parallel_plan.cpp.
#pragma once

#include <sstream>
#include <string>

namespace meshtrain {

template <typename... Parts> std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

} // namespace meshtrain
