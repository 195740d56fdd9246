// defines: TokenFile and write_token_file (see token_file.h).
#include "meshtrain/core/token_file.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace meshtrain {

int64_t validate_token_file_bytes(const char* bytes, size_t size, const std::string& source) {
  MT_CHECK(size >= static_cast<size_t>(kTokenHeaderBytes), source, ": ", size,
           " bytes is shorter than the ", kTokenHeaderBytes, "-byte llm.c token header");
  int32_t header[3];
  std::memcpy(header, bytes, sizeof(header));
  MT_CHECK(header[0] == kTokenFileMagic, source, ": bad magic ", header[0], " (expected ",
           kTokenFileMagic, "; is this an llm.c token file?)");
  MT_CHECK(header[1] == kTokenFileVersion, source, ": unsupported version ", header[1],
           " (supported: ", kTokenFileVersion, ", uint16 tokens)");
  MT_CHECK(header[2] >= 0, source, ": negative token count ", header[2]);
  const int64_t count = header[2];
  const auto expected = static_cast<size_t>(kTokenHeaderBytes + count * 2);
  MT_CHECK(size == expected, source, ": header says ", count, " tokens (", expected,
           " bytes) but the file has ", size, " bytes", size < expected ? " (truncated)" : "");
  return count;
}

TokenFile::TokenFile(const std::string& path, int64_t vocab_size) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  MT_CHECK(fd >= 0, "cannot open token file '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    MT_CHECK(false, "cannot stat '", path, "': ", std::strerror(errno));
  }
  map_bytes_ = static_cast<size_t>(st.st_size);
  if (map_bytes_ > 0) {
    map_ = ::mmap(nullptr, map_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  }
  ::close(fd);
  MT_CHECK(map_bytes_ == 0 || map_ != MAP_FAILED, "cannot map '", path,
           "': ", std::strerror(errno));
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
  }
  try {
    count_ = validate_token_file_bytes(static_cast<const char*>(map_), map_bytes_, path);
  } catch (...) {
    if (map_ != nullptr) {
      ::munmap(map_, map_bytes_);
    }
    throw;
  }
  tokens_ = reinterpret_cast<const uint16_t*>(static_cast<const char*>(map_) + kTokenHeaderBytes);
  if (vocab_size > 0) {
    const int64_t top = max_token();
    if (top >= vocab_size) {
      const auto* bad =
          std::find_if(tokens_, tokens_ + count_, [&](uint16_t t) { return t >= vocab_size; });
      const auto where = bad - tokens_;
      const int bad_token = *bad; // read before the mapping goes away
      ::munmap(map_, map_bytes_);
      map_ = nullptr;
      MT_CHECK(false, path, ": token ", bad_token, " at position ", where,
               " is outside the vocabulary (vocab size ", vocab_size, ")");
    }
  }
}

TokenFile::~TokenFile() {
  if (map_ != nullptr) {
    ::munmap(map_, map_bytes_);
  }
}

torch::Tensor TokenFile::slice(int64_t start, int64_t length) const {
  MT_CHECK(start >= 0 && length >= 0 && start + length <= count_, path_, ": tokens [", start, ", ",
           start + length, ") are outside the file's ", count_, " tokens");
  auto out = torch::empty({length}, torch::kLong);
  auto* dst = out.data_ptr<int64_t>();
  std::copy(tokens_ + start, tokens_ + start + length, dst);
  return out;
}

int64_t TokenFile::max_token() const {
  return count_ == 0 ? 0 : *std::max_element(tokens_, tokens_ + count_);
}

void write_token_file(const std::string& path, const std::vector<uint16_t>& tokens) {
  MT_CHECK(tokens.size() <= static_cast<size_t>(INT32_MAX), "a token file holds at most ",
           INT32_MAX, " tokens, got ", tokens.size());
  std::string bytes(kTokenHeaderBytes + tokens.size() * 2, '\0');
  int32_t header[256] = {kTokenFileMagic, kTokenFileVersion, static_cast<int32_t>(tokens.size())};
  std::memcpy(bytes.data(), header, sizeof(header));
  if (!tokens.empty()) { // an empty vector's data() may be null, and memcpy's source may not
    std::memcpy(bytes.data() + kTokenHeaderBytes, tokens.data(), tokens.size() * 2);
  }
  write_file_atomic(path, bytes);
}

} // namespace meshtrain
