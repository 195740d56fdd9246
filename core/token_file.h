// defines: TokenFile (a memory-mapped llm.c token file), write_token_file.
//
// Format (llm.c): a header of 256 little-endian int32 — [0] magic 20240520, [1] version 1,
// [2] token count N — then N uint16 tokens. Files from llm.c's data scripts load as they are.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace meshtrain {

constexpr int32_t kTokenFileMagic = 20240520;
constexpr int32_t kTokenFileVersion = 1;
constexpr int64_t kTokenHeaderBytes = 256 * sizeof(int32_t);

class TokenFile {
public:
  // Maps and validates the file (magic, version, exact size); throws naming the path and
  // the field. With vocab_size > 0 every token is checked to be < vocab_size.
  explicit TokenFile(const std::string& path, int64_t vocab_size = 0);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const std::string& path() const { return path_; }
  int64_t size() const { return count_; }
  const uint16_t* data() const { return tokens_; }
  // Tokens [start, start + length) as int64, shape [length].
  torch::Tensor slice(int64_t start, int64_t length) const;
  // Largest token id in the file (0 for an empty file).
  int64_t max_token() const;

private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint16_t* tokens_ = nullptr;
  int64_t count_ = 0;
};

// Writes `tokens` as an llm.c token file, atomically. Every token must fit uint16.
void write_token_file(const std::string& path, const std::vector<uint16_t>& tokens);

// Validates an in-memory image of a token file (what TokenFile checks before mapping); used by
// TokenFile and the fuzz target. Returns the token count.
int64_t validate_token_file_bytes(const char* bytes, size_t size, const std::string& source);

} // namespace meshtrain
