// libFuzzer target: parse_safetensors (core/safetensors.h) on arbitrary bytes. Any input must
// parse or throw c10::Error (MT_CHECK); anything else — another exception, a crash, an
// ASan/UBSan report, a huge allocation, a hang — is a finding. A parsed file must also
// serialize and parse back to the same tensors.
#include "meshtrain/core/safetensors.h"
#include "tests/fuzz/fuzz_common.h"

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  meshtrain::meshtrain_fuzz_init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  meshtrain::SafetensorsFile file;
  try {
    file = meshtrain::parse_safetensors(bytes, "fuzz.safetensors");
  } catch (const c10::Error&) {
    return 0; // a rejection with a message: the expected outcome for most inputs
  }
  // Accepted: the round trip must hold (the writer accepts whatever the reader returns).
  const auto again = meshtrain::parse_safetensors(
      meshtrain::serialize_safetensors(file.tensors, file.metadata), "fuzz.roundtrip");
  FUZZ_REQUIRE(again.tensors.size() == file.tensors.size() && again.metadata == file.metadata);
  for (size_t i = 0; i < file.tensors.size(); ++i) {
    FUZZ_REQUIRE(again.tensors[i].first == file.tensors[i].first);
    FUZZ_REQUIRE(again.tensors[i].second.sizes() == file.tensors[i].second.sizes());
  }
  return 0;
}
