// defines: Precision, parse_precision, to_string(Precision), element_bytes — the number
// formats a layout can train in (DESIGN §3 "Mixed precision"). Pure C++ (no tensors): the
// planner and meshrun use it without LibTorch.
#pragma once

#include <cstdint>
#include <string>

namespace meshtrain {

// kFp32: everything in fp32. kBf16 / kFp16: the compute dtype of the model's parameters and
// activations; master weights, optimizer state, gradient reduction and the loss stay fp32.
enum class Precision { kFp32, kBf16, kFp16 };

// "fp32", "bf16" or "fp16"; throws LayoutError naming the value otherwise.
Precision parse_precision(const std::string& text);
const char* to_string(Precision precision);
// Bytes of one element: 4 (fp32) or 2 (bf16, fp16).
int64_t element_bytes(Precision precision);

} // namespace meshtrain
