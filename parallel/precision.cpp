// defines: parse_precision, to_string(Precision), element_bytes (see precision.h).
#include "meshtrain/parallel/precision.h"

#include "meshtrain/core/mesh_grid.h"

namespace meshtrain {

Precision parse_precision(const std::string& text) {
  if (text == "fp32") {
    return Precision::kFp32;
  }
  if (text == "bf16") {
    return Precision::kBf16;
  }
  if (text == "fp16") {
    return Precision::kFp16;
  }
  throw LayoutError("precision '" + text + "': must be fp32, bf16 or fp16");
}

const char* to_string(Precision precision) {
  switch (precision) {
  case Precision::kFp32:
    return "fp32";
  case Precision::kBf16:
    return "bf16";
  case Precision::kFp16:
    return "fp16";
  }
  return "?";
}

int64_t element_bytes(Precision precision) {
  return precision == Precision::kFp32 ? 4 : 2;
}

} // namespace meshtrain
