// defines: cpu_info, describe_cpu (see cpu_features.h).
#include "meshtrain/core/cpu_features.h"

#include <fstream>
#include <sstream>

namespace meshtrain {
namespace {

std::string trim(const std::string& text) {
  const auto first = text.find_first_not_of(" \t");
  if (first == std::string::npos) {
    return "";
  }
  return text.substr(first, text.find_last_not_of(" \t") - first + 1);
}

} // namespace

CpuInfo cpu_info(const std::string& path) {
  CpuInfo out;
  std::ifstream in(path);
  bool have_model = false;
  bool have_flags = false;
  std::string line;
  while (std::getline(in, line) && !(have_model && have_flags)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) {
      continue;
    }
    const auto key = trim(line.substr(0, colon));
    const auto value = trim(line.substr(colon + 1));
    if (key == "model name" && !have_model) {
      out.model = value;
      have_model = true;
    } else if (key == "flags" && !have_flags) {
      std::istringstream flags(value);
      std::string flag;
      while (flags >> flag) {
        out.avx512_bf16 |= flag == "avx512_bf16";
        out.amx_bf16 |= flag == "amx_bf16";
      }
      have_flags = true;
    }
  }
  return out;
}

std::string describe_cpu(const CpuInfo& cpu) {
  std::string text = "CPU: " + cpu.model + " (avx512_bf16 " + (cpu.avx512_bf16 ? "yes" : "no") +
                     ", amx_bf16 " + (cpu.amx_bf16 ? "yes" : "no") + ")";
  if (!cpu.native_bf16()) {
    text += "; no native bf16: bf16 matrix products are emulated here and run slower than fp32";
  }
  return text;
}

} // namespace meshtrain
