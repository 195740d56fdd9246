// libFuzzer target: validate_token_file_bytes (core/token_file.h) on arbitrary bytes, the
// checks TokenFile makes before it trusts a mapped file. Any input must be accepted with a
// token count that matches the size exactly, or throw c10::Error (MT_CHECK).
#include "meshtrain/core/token_file.h"
#include "tests/fuzz/fuzz_common.h"

#include <cstddef>
#include <cstdint>
#include <memory>

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  meshtrain::meshtrain_fuzz_init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // An exact-size heap copy, so that ASan sees a read past the end of the file's bytes
  // (libFuzzer's own buffer is exact-size too, but this does not depend on it).
  std::unique_ptr<char[]> bytes(new char[size == 0 ? 1 : size]);
  std::copy(data, data + size, bytes.get());
  int64_t count = 0;
  try {
    count =
        meshtrain::validate_token_file_bytes(size == 0 ? nullptr : bytes.get(), size, "fuzz.bin");
  } catch (const c10::Error&) {
    return 0;
  }
  FUZZ_REQUIRE(count >= 0 && static_cast<uint64_t>(meshtrain::kTokenHeaderBytes) +
                                     2 * static_cast<uint64_t>(count) ==
                                 size);
  return 0;
}
