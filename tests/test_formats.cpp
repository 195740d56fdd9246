// Tests of the file formats: safetensors (round trip, every rejection path), llm.c token
// files (round trip, bad magic/version, truncation, out-of-vocab tokens) and checkpoint
// meta.json parsing. The "found by fuzzing" cases are regressions of tests/fuzz findings
// (docs/reliability.md).
#include <catch2/catch.hpp>

#include "meshtrain/core/file_io.h"
#include "meshtrain/core/safetensors.h"
#include "meshtrain/core/token_file.h"
#include "meshtrain/launch/checkpoint.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>

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

TEST_CASE("safetensors: deep nesting and absurd zero-size shapes are refused (found by fuzzing)",
          "[formats]") {
  // 40 MB of '[' used to take 40 s and 2.7 GB to parse; now the parser stops at level 64.
  const std::string deep(1000, '[');
  CHECK_THROWS_WITH(parse_safetensors(image(R"({"__metadata__":)" + deep, 0), "f"),
                    Catch::Contains("nested more than 64 levels"));
  // numel is 0, but torch's strides would be 2^117: an int64 overflow.
  CHECK_THROWS_WITH(
      parse_safetensors(
          image(R"({"x":{"dtype":"F32","shape":[0,549755813887,549755813887,549755813887],)"
                R"("data_offsets":[0,0]}})",
                0),
          "f"),
      Catch::Contains("absurd shape") && Catch::Contains("dim 2 = 549755813887"));
  // A real zero-size tensor still loads.
  const auto ok = parse_safetensors(
      image(R"({"x":{"dtype":"F32","shape":[0,1024,1024],"data_offsets":[0,0]}})", 0), "f");
  CHECK(ok.at("x").sizes() == c10::IntArrayRef({0, 1024, 1024}));
}

TEST_CASE("token file: an empty file round-trips (UBSan: memcpy from null, found by fuzzing)",
          "[formats]") {
  const auto path = temp_path("empty_tokens.bin");
  write_token_file(path, {});
  CHECK(TokenFile(path).size() == 0);
  CHECK(TokenFile(path).max_token() == 0);
  std::remove(path.c_str());
}

namespace {

// A valid meta.json (tp 2) with `edit` applied: the JSON text parse_checkpoint_info reads.
std::string meta_text(const std::function<void(nlohmann::json&)>& edit = {}) {
  auto param = [](const std::string& name, std::vector<int64_t> shape, int dim, int64_t blocks,
                  int64_t global_size) {
    return nlohmann::json{{"name", name},
                          {"shape", shape},
                          {"dtype", "Float"},
                          {"dim", dim},
                          {"blocks", blocks},
                          {"global_size", global_size},
                          {"unpadded_size", global_size}};
  };
  nlohmann::json meta = {{"format", "meshtrain-checkpoint"},
                         {"version", 1},
                         {"step", 3},
                         {"layout", {{"dp", 1}, {"tp", 2}, {"zero", 1}, {"world", 2}}},
                         {"data", {{"global_batch", 8}, {"seq_len", 16}}},
                         {"model", {{"n_layer", 1}, {"n_embd", 8}}},
                         {"params",
                          {param("transformer.wte.weight", {256, 8}, 0, 1, 256),
                           param("transformer.h.0.attn.c_attn.weight", {24, 8}, 0, 3, 24),
                           param("transformer.ln_f.weight", {8}, -1, 1, 0)}},
                         {"files", nlohmann::json::object()}};
  if (edit) {
    edit(meta);
  }
  return meta.dump(1);
}

} // namespace

TEST_CASE("checkpoint meta.json: parsed from text, every field checked (found by fuzzing)",
          "[formats]") {
  const auto info = parse_checkpoint_info(meta_text(), "ckpt/step_00000003");
  CHECK(info.path == "ckpt/step_00000003");
  CHECK(info.step == 3);
  CHECK(info.tp == 2);
  CHECK(info.zero_stage == 1);
  REQUIRE(info.params.size() == 3);
  CHECK(info.params[1].second.blocks == 3);
  CHECK((info.global_shapes[0] == std::vector<int64_t>{256, 8}));

  const auto refused = [](const std::function<void(nlohmann::json&)>& edit) {
    return parse_checkpoint_info(meta_text(edit), "ckpt/step_00000003");
  };
  using nlohmann::json;
  // These used to escape as nlohmann::json type errors (not c10::Error) ...
  CHECK_THROWS_WITH(refused([](json& m) { m["format"] = 1; }),
                    Catch::Contains("not a meshtrain checkpoint"));
  CHECK_THROWS_WITH(refused([](json& m) { m["version"] = "1"; }),
                    Catch::Contains("version \"1\" is not supported"));
  // ... or were undefined behaviour (a double far outside int) or wrapped silently.
  CHECK_THROWS_WITH(refused([](json& m) { m["layout"]["dp"] = 1e300; }),
                    Catch::Contains("layout.dp is 1e+300; it must be an integer in [1, 65536]"));
  CHECK_THROWS_WITH(refused([](json& m) { m["layout"]["tp"] = 2147483648ULL; }),
                    Catch::Contains("layout.tp is 2147483648"));
  CHECK_THROWS_WITH(refused([](json& m) { m["step"] = 1.5; }),
                    Catch::Contains("step is 1.5; it must be an integer"));
  CHECK_THROWS_WITH(refused([](json& m) { m["data"].erase("seq_len"); }),
                    Catch::Contains("data has no \"seq_len\""));
  CHECK_THROWS_WITH(refused([](json& m) { m["params"] = 7; }),
                    Catch::Contains("params must be a JSON array, not number"));
  // A dim outside the shape used to index past the end of it (resharding, export).
  CHECK_THROWS_WITH(refused([](json& m) { m["params"][2]["dim"] = 1; }),
                    Catch::Contains("('transformer.ln_f.weight').dim is 1") &&
                        Catch::Contains("[-1, 0]"));
  CHECK_THROWS_WITH(refused([](json& m) { m["params"][0]["global_size"] = 255; }),
                    Catch::Contains("global_size 255 differs from shape[0] = 256"));
  CHECK_THROWS_WITH(refused([](json& m) { m["params"][1]["blocks"] = 5; }),
                    Catch::Contains("not divisible by blocks (5) x tp (2)"));
  CHECK_THROWS_WITH(refused([](json& m) {
                      m["params"][0]["shape"] = {-1, 8};
                    }),
                    Catch::Contains("shape[0] is -1"));
  // A deeply nested "model" overflowed the stack when printed.
  const std::string deep =
      "{\"format\":\"meshtrain-checkpoint\",\"version\":1,\"model\":" + std::string(100000, '[') +
      std::string(100000, ']') + "}";
  CHECK_THROWS_WITH(parse_checkpoint_info(deep, "ckpt/step_00000003"),
                    Catch::Contains("nested more than 64 levels"));
  CHECK_THROWS_WITH(parse_checkpoint_info("{\"format\":", "ckpt/step_00000003"),
                    Catch::Contains("ckpt/step_00000003/meta.json: not valid JSON"));
}
