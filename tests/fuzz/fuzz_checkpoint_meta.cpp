// libFuzzer target: parse_checkpoint_info (launch/checkpoint.h) on arbitrary text, the checks
// a checkpoint's meta.json passes before a load or an export trusts it. Any input must parse
// into a consistent CheckpointInfo or throw c10::Error (MT_CHECK) — never let a JSON library
// exception, a crash or an ASan/UBSan report through.
#include "meshtrain/launch/checkpoint.h"
#include "tests/fuzz/fuzz_common.h"

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  meshtrain::meshtrain_fuzz_init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  meshtrain::CheckpointInfo info;
  try {
    info = meshtrain::parse_checkpoint_info(text, "fuzz/step_00000001");
  } catch (const c10::Error&) {
    return 0;
  }
  // Accepted: what resharding and export index with must be consistent.
  FUZZ_REQUIRE(info.params.size() == info.global_shapes.size());
  FUZZ_REQUIRE(info.dp >= 1 && info.tp >= 1 && info.step >= 0 && info.global_batch >= 1);
  for (size_t i = 0; i < info.params.size(); ++i) {
    const auto& spec = info.params[i].second;
    const auto& shape = info.global_shapes[i];
    FUZZ_REQUIRE(spec.dim >= -1 && spec.dim < static_cast<int64_t>(shape.size()));
    // By division, as the parser checks it: blocks x tp may overflow an int64.
    FUZZ_REQUIRE(!spec.is_partitioned() ||
                 (spec.global_size == shape[spec.dim] && spec.blocks >= 1 &&
                  spec.global_size >= spec.blocks && spec.global_size % spec.blocks == 0 &&
                  spec.global_size / spec.blocks % info.tp == 0));
  }
  return 0;
}
