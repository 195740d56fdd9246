// Tests of the file formats: safetensors (round trip, every rejection path) and llm.c token
// files (round trip, bad magic/version, truncation, out-of-vocab tokens).
#include <catch2/catch.hpp>

#include "core/file_io.h"
#include "core/safetensors.h"
#include "core/token_file.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

using namespace meshtrain;

namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("meshtrain_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// A safetensors image with the given JSON header and `data_bytes` zero bytes of data.
std::string image(const std::string& json, size_t data_bytes) {
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  }
  return out + json + std::string(data_bytes, '\0');
}

} // namespace

TEST_CASE("safetensors: round trip keeps names, order, dtypes, shapes, values and metadata",
          "[formats]") {
  NamedTensors in = {{"b.weight", torch::randn({3, 4})},
                     {"a.bias", torch::arange(5, torch::kLong)},
                     {"half", torch::randn({2, 2}).to(torch::kBFloat16)},
                     {"empty", torch::empty({0, 3})}};
  const auto path = temp_path("roundtrip.safetensors");
  save_safetensors(path, in, {{"format", "pt"}});
  const auto out = load_safetensors(path);
  REQUIRE(out.tensors.size() == in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    CHECK(out.tensors[i].first == in[i].first);
    CHECK(out.tensors[i].second.scalar_type() == in[i].second.scalar_type());
    CHECK(out.tensors[i].second.sizes() == in[i].second.sizes());
    CHECK(torch::equal(out.tensors[i].second, in[i].second));
  }
  CHECK(out.metadata.at("format") == "pt");
  CHECK(out.contains("a.bias"));
  REQUIRE_THROWS_WITH(out.at("missing"), Catch::Contains("no tensor named 'missing'"));
  std::remove(path.c_str());
}

TEST_CASE("safetensors: the header is 8-byte aligned and little-endian", "[formats]") {
  const auto bytes = serialize_safetensors({{"x", torch::ones({3})}});
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) {
    n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  }
  CHECK((8 + n) % 8 == 0);
  CHECK(bytes.size() == 8 + n + 12);
}

TEST_CASE("safetensors: malformed files are rejected with the reason", "[formats]") {
  CHECK_THROWS_WITH(parse_safetensors("abc", "f"), Catch::Contains("too short"));
  std::string absurd(8, '\xff');
  CHECK_THROWS_WITH(parse_safetensors(absurd, "f"), Catch::Contains("exceeds the limit"));
  CHECK_THROWS_WITH(parse_safetensors(image("{}", 0).substr(0, 9), "f"),
                    Catch::Contains("runs past the end"));
  CHECK_THROWS_WITH(parse_safetensors(image("{\"x\": ", 0), "f"),
                    Catch::Contains("malformed JSON"));
  CHECK_THROWS_WITH(parse_safetensors(image("[1]", 0), "f"), Catch::Contains("must be an object"));
  CHECK_THROWS_WITH(
      parse_safetensors(image(R"({"x":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}})", 4), "f"),
      Catch::Contains("unsupported dtype 'Q7'"));
  CHECK_THROWS_WITH(
      parse_safetensors(image(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4), "f"),
      Catch::Contains("outside the data region"));
  CHECK_THROWS_WITH(
      parse_safetensors(image(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "f"),
      Catch::Contains("needs 12"));
  CHECK_THROWS_WITH(
      parse_safetensors(image(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                        "f"),
      Catch::Contains("not a non-negative integer"));
  CHECK_THROWS_WITH(
      parse_safetensors(image(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                              R"("y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                              8),
                        "f"),
      Catch::Contains("overlap or hole"));
  CHECK_THROWS_WITH(
      parse_safetensors(image(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8), "f"),
      Catch::Contains("cover 4 bytes of a 8-byte data region"));
  CHECK_THROWS_WITH(parse_safetensors(image(R"({"__metadata__":{"a":1}})", 0), "f"),
                    Catch::Contains("is not a string"));
  CHECK_THROWS_WITH(load_safetensors(temp_path("does_not_exist")), Catch::Contains("cannot open"));
}

TEST_CASE("token file: round trip, slices and the llm.c header", "[formats]") {
  const auto path = temp_path("tokens.bin");
  std::vector<uint16_t> tokens = {1, 2, 3, 65535, 0, 7};
  write_token_file(path, tokens);
  REQUIRE(std::filesystem::file_size(path) == 1024 + 12);
  TokenFile file(path);
  CHECK(file.size() == 6);
  CHECK(file.max_token() == 65535);
  CHECK(torch::equal(file.slice(2, 3), torch::tensor({3, 65535, 0}, torch::kLong)));
  CHECK_THROWS_WITH(file.slice(4, 3), Catch::Contains("outside the file's 6 tokens"));
  std::remove(path.c_str());
}

TEST_CASE("token file: bad magic, version, truncation and vocabulary are errors", "[formats]") {
  const auto path = temp_path("bad_tokens.bin");
  write_token_file(path, {1, 2, 300});
  auto bytes = read_file(path);
  CHECK_THROWS_WITH(TokenFile(path, 256), Catch::Contains("token 300 at position 2") &&
                                              Catch::Contains("vocab size 256"));
  CHECK(TokenFile(path, 301).size() == 3);

  auto write = [&](const std::string& b) { std::ofstream(path, std::ios::binary) << b; };
  auto corrupt = bytes;
  corrupt[0] = 'X';
  write(corrupt);
  CHECK_THROWS_WITH(TokenFile(path), Catch::Contains("bad magic"));
  corrupt = bytes;
  corrupt[4] = 2;
  write(corrupt);
  CHECK_THROWS_WITH(TokenFile(path), Catch::Contains("unsupported version 2"));
  write(bytes.substr(0, bytes.size() - 1));
  CHECK_THROWS_WITH(TokenFile(path), Catch::Contains("truncated"));
  write(bytes.substr(0, 100));
  CHECK_THROWS_WITH(TokenFile(path), Catch::Contains("shorter than the 1024-byte"));
  std::remove(path.c_str());
  CHECK_THROWS_WITH(TokenFile(path), Catch::Contains("cannot open token file"));
}
