// defines: CpuInfo, cpu_info, describe_cpu — what a figure or a precision choice depends on:
// the CPU model and whether it has native bf16 arithmetic (`avx512_bf16` or `amx_bf16` in
// /proc/cpuinfo's flags). Machines of one cloud type differ: on one with avx512_bf16 a bf16
// matrix product is ~4x faster than fp32, on one without it is emulated and slower than fp32.
// Every benchmark prints describe_cpu() above its figures; --precision bf16 warns with it
// where bf16 is emulated (examples/benchmarks/machine.py is the Python side).
#pragma once

#include <string>

namespace meshtrain {

struct CpuInfo {
  std::string model = "unknown CPU"; // /proc/cpuinfo "model name" of the first CPU
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
  // bf16 matrix products run in hardware (either extension).
  bool native_bf16() const { return avx512_bf16 || amx_bf16; }
};

// Reads `path` (a /proc/cpuinfo-format file) once per call; an unreadable file gives the
// defaults (unknown model, no native bf16).
CpuInfo cpu_info(const std::string& path = "/proc/cpuinfo");

// One line: "CPU: AMD EPYC 9R14 (avx512_bf16 yes, amx_bf16 no)", and where bf16 is not native,
// "; no native bf16: ..." saying why bf16 runs slower than fp32 here.
std::string describe_cpu(const CpuInfo& cpu = cpu_info());

} // namespace meshtrain
