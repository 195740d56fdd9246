// defines: the checkpoint format and CheckpointManager (see checkpoint.h,
// docs/checkpoints.md).
#include "meshtrain/launch/checkpoint.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/file_io.h"
#include "meshtrain/parallel/shard_tensor.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <map>
#include <regex>
#include <set>
#include <sstream>

namespace meshtrain {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kFormat = "meshtrain-checkpoint";
constexpr int kVersion = 1;
constexpr const char* kMeta = "meta.json";
constexpr const char* kRngDefault = "rng.default";
constexpr const char* kRngShared = "rng.tracker.shared";
constexpr const char* kRngTensorParallel = "rng.tracker.tensor_parallel";

std::string two_digits(int v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%02d", v);
  return buf;
}

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string model_file(int tp_rank) {
  return "model-tp" + two_digits(tp_rank) + ".safetensors";
}

std::string optim_file(int dp_rank, int tp_rank) {
  return "optim-dp" + two_digits(dp_rank) + "-tp" + two_digits(tp_rank) + ".safetensors";
}

// FNV-1a, 64 bit: cheap, and enough to catch a torn or corrupted file.
uint64_t fnv1a64(const std::string& bytes) {
  uint64_t h = 14695981039346656037ULL;
  for (unsigned char c : bytes) {
    h = (h ^ c) * 1099511628211ULL;
  }
  return h;
}

std::string hex64(uint64_t v) {
  char buf[20];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// Every rank learns whether any rank failed; all then throw (this rank's own message, or a
// pointer to the rank that has one), so no rank is left waiting in a later collective.
void agree(const CommunicatorPtr& world, const std::string& local_error, const char* what) {
  auto flag = torch::tensor({local_error.empty() ? 0 : 1}, torch::kInt);
  world->all_reduce(flag, ReduceOp::kMax);
  if (flag.item<int>() == 0) {
    return;
  }
  MT_CHECK(local_error.empty(), local_error);
  MT_CHECK(false, what, " failed on another rank (see its message)");
}

template <typename Fn> std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

json spec_json(const ShardSpec& spec, const std::vector<int64_t>& global_shape) {
  return json{{"shape", global_shape},
              {"dim", spec.dim},
              {"blocks", spec.blocks},
              {"global_size", spec.global_size},
              {"unpadded_size", spec.unpadded_size}};
}

// The full (padded) shape of a parameter whose local shard is `local` under `spec`.
std::vector<int64_t> global_shape(const torch::Tensor& local, const ShardSpec& spec) {
  auto shape = local.sizes().vec();
  if (spec.is_partitioned()) {
    shape[spec.dim] = spec.global_size;
  }
  return shape;
}

// The shape without vocab padding.
std::vector<int64_t> unpadded_shape(std::vector<int64_t> shape, const ShardSpec& spec) {
  if (spec.is_partitioned()) {
    shape[spec.dim] = spec.unpadded_size;
  }
  return shape;
}

// The local shape of TP rank r's shard of a parameter (the same for every r).
std::vector<int64_t> local_shape(std::vector<int64_t> global, const ShardSpec& spec, int tp) {
  if (spec.is_partitioned()) {
    global[spec.dim] /= tp;
  }
  return global;
}

// A checkpoint file, read whole and checked against meta.json's size and checksum.
SafetensorsFile read_checked(const CheckpointInfo& info, const json& files,
                             const std::string& name) {
  const std::string path = (fs::path(info.path) / name).string();
  MT_CHECK(files.contains(name), path, ": not listed in ", kMeta, " (layout dp ", info.dp, " x cp ",
           info.cp, " x tp ", info.tp, ")");
  const std::string bytes = read_file(path);
  const auto& entry = files.at(name);
  MT_CHECK(static_cast<int64_t>(bytes.size()) == entry.at("bytes").get<int64_t>(), path, ": ",
           bytes.size(), " bytes, but ", kMeta, " records ", entry.at("bytes").get<int64_t>(),
           " (truncated or replaced)");
  MT_CHECK(hex64(fnv1a64(bytes)) == entry.at("fnv1a64").get<std::string>(), path,
           ": checksum fnv1a64 ", hex64(fnv1a64(bytes)), " differs from ", kMeta, "'s ",
           entry.at("fnv1a64").get<std::string>(), " (the file is corrupted)");
  return parse_safetensors(bytes, path);
}

std::string meta_path(const std::string& step_dir) {
  return (fs::path(step_dir) / kMeta).string();
}

// meta.json nests 4 levels (the root, "params", a parameter, its "shape"); anything much
// deeper is refused while parsing: printing or comparing a value recurses once per level, and
// a file of a million '[' would overflow the stack.
constexpr int kMaxJsonDepth = 64;

// Largest layout and sizes a meta.json may state: far above any real job, low enough that
// nothing sized by them (a vector per TP rank, a product of dims) can overflow or exhaust
// memory before the files themselves are read and checked.
constexpr int64_t kMaxRanks = 1 << 16;
constexpr int64_t kMaxCount = int64_t{1} << 50;

// A meta.json text, parsed and checked to be a checkpoint this build reads; `path` names it in
// errors. Every failure is a c10::Error: no JSON library exception gets out.
json parse_meta(const std::string& text, const std::string& path) {
  json meta;
  const json::parser_callback_t limit_depth = [&](int depth, json::parse_event_t event, json&) {
    if (event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) {
      MT_CHECK(depth < kMaxJsonDepth, path, ": JSON nested more than ", kMaxJsonDepth,
               " levels deep (meta.json needs 4)");
    }
    return true;
  };
  try {
    meta = json::parse(text, limit_depth);
  } catch (const json::exception& e) {
    MT_CHECK(false, path, ": not valid JSON (", e.what(), ")");
  }
  // find(), not value(): value() throws a JSON type_error when the field has another type.
  const auto format = meta.is_object() ? meta.find("format") : meta.end();
  MT_CHECK(format != meta.end() && format->is_string() && *format == kFormat, path,
           ": not a meshtrain checkpoint (\"format\" must be \"", kFormat, "\")");
  const auto version = meta.find("version");
  MT_CHECK(version != meta.end() && version->is_number_integer() && *version == kVersion, path,
           ": version ", version == meta.end() ? "(none)" : version->dump(),
           " is not supported (this build reads version ", kVersion, ")");
  return meta;
}

// Member `key` of `obj`, which must be an object holding it; `where` names `obj` in errors
// ("<path>: layout").
const json& member(const json& obj, const char* key, const std::string& where) {
  MT_CHECK(obj.is_object(), where, " must be a JSON object, not ", obj.type_name());
  const auto it = obj.find(key);
  MT_CHECK(it != obj.end(), where, " has no \"", key, "\" (missing field)");
  return *it;
}

// An integer in [lo, hi]. get<int>() would round a fraction, wrap a large integer, and is
// undefined behaviour for 1e300; those are refused here, naming the value.
int64_t integer(const json& value, const std::string& what, int64_t lo, int64_t hi) {
  const bool in_int64 =
      value.is_number_integer() &&
      !(value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX));
  const int64_t v = in_int64 ? value.get<int64_t>() : 0;
  MT_CHECK(in_int64 && v >= lo && v <= hi, what, " is ", value.dump(),
           "; it must be an integer in [", lo, ", ", hi, "]");
  return v;
}

int64_t integer_member(const json& obj, const char* key, const std::string& where, int64_t lo,
                       int64_t hi) {
  return integer(member(obj, key, where), where + "." + key, lo, hi);
}

// One entry of meta.json's "params", checked against itself and the TP size: what resharding,
// export and the compatibility check index with (dim into shape, global_size / (blocks x tp)).
std::pair<std::pair<std::string, ShardSpec>, std::vector<int64_t>>
parse_param(const json& p, const std::string& where, int64_t tp) {
  const json& name = member(p, "name", where);
  MT_CHECK(name.is_string(), where, ".name is ", name.dump(), "; it must be a string");
  const std::string at = where + " ('" + name.get<std::string>() + "')";
  const json& shape_json = member(p, "shape", at);
  MT_CHECK(shape_json.is_array(), at, ".shape must be an array of sizes, not ",
           shape_json.type_name());
  std::vector<int64_t> shape;
  int64_t elements = 1; // of the shape with 0s read as 1s: what torch's strides multiply
  for (size_t d = 0; d < shape_json.size(); ++d) {
    const std::string what = at + ".shape[" + std::to_string(d) + "]";
    shape.push_back(integer(shape_json[d], what, 0, kMaxCount));
    const int64_t factor = std::max<int64_t>(shape.back(), 1);
    MT_CHECK(elements <= kMaxCount / factor, at, ".shape ", c10::IntArrayRef(shape),
             " has more than ", kMaxCount, " elements");
    elements *= factor;
  }
  ShardSpec spec;
  spec.dim =
      static_cast<int>(integer_member(p, "dim", at, -1, static_cast<int64_t>(shape.size()) - 1));
  spec.blocks = integer_member(p, "blocks", at, 1, kMaxCount);
  spec.global_size = integer_member(p, "global_size", at, 0, kMaxCount);
  spec.unpadded_size = integer_member(p, "unpadded_size", at, 0, kMaxCount);
  if (spec.is_partitioned()) {
    MT_CHECK(spec.global_size == shape[spec.dim], at, ": global_size ", spec.global_size,
             " differs from shape[", spec.dim, "] = ", shape[spec.dim]);
    MT_CHECK(spec.global_size % (spec.blocks * tp) == 0, at, ": global_size ", spec.global_size,
             " is not divisible by blocks (", spec.blocks, ") x tp (", tp, ")");
    MT_CHECK(spec.unpadded_size <= spec.global_size &&
                 (spec.unpadded_size == spec.global_size || spec.blocks == 1),
             at, ": unpadded_size ", spec.unpadded_size, " must be at most global_size ",
             spec.global_size, ", and equal to it when blocks (", spec.blocks, ") > 1");
  }
  return {{name.get<std::string>(), spec}, std::move(shape)};
}

json read_meta(const std::string& step_dir) {
  const std::string path = meta_path(step_dir);
  MT_CHECK(fs::is_regular_file(path), step_dir, ": not a checkpoint (no ", kMeta, ")");
  return parse_meta(read_file(path), path);
}

// The ZeRO state names of a "<param>.<state>" key: the part after the last dot.
std::pair<std::string, std::string> split_state_key(const std::string& key) {
  const auto dot = key.rfind('.');
  MT_CHECK(dot != std::string::npos, "checkpoint: bad optimizer key '", key, "'");
  return {key.substr(0, dot), key.substr(dot + 1)};
}

// The complete checkpoints under `root` (step_<N> directories holding meta.json), newest
// first. Partial saves (.step_<N>.partial) and anything else are skipped.
std::vector<std::pair<long long, fs::path>> complete_checkpoints(const fs::path& root) {
  static const std::regex kName("step_([0-9]+)");
  std::vector<std::pair<long long, fs::path>> found;
  std::error_code ec;
  if (root.empty() || !fs::is_directory(root, ec)) {
    return found;
  }
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, m, kName) && fs::is_regular_file(entry.path() / kMeta, ec)) {
      found.emplace_back(std::stoll(m[1].str()), entry.path());
    }
  }
  std::sort(found.rbegin(), found.rend());
  return found;
}

// Replaces `dir` by `staged` (both in `root`) so that a crash at any moment leaves one of
// them complete under a name latest_checkpoint() accepts, or neither of the new one.
void publish(const fs::path& staged, const fs::path& dir) {
  const fs::path old = dir.parent_path() / ("." + dir.filename().string() + ".old");
  fs::remove_all(old);
  if (fs::exists(dir)) {
    fs::rename(dir, old);
  }
  fs::rename(staged, dir);
  fsync_directory(dir.parent_path().string());
  fs::remove_all(old);
}

// Refuses a checkpoint of another model, another data position or other parameters, naming
// the value in the checkpoint and in this run.
void check_compatible(const CheckpointInfo& info, const json& meta, Trainer& trainer,
                      const std::vector<std::pair<std::string, ShardSpec>>& specs,
                      const json& want_model) {
  const std::string where = (fs::path(info.path) / kMeta).string();
  const json& have_model = meta.at("model");
  for (const auto& [key, value] : want_model.items()) {
    MT_CHECK(have_model.contains(key) && have_model.at(key) == value, where, ": model ", key,
             " is ", have_model.contains(key) ? have_model.at(key).dump() : "absent",
             ", this run has ", value.dump());
  }
  const int64_t global_batch = trainer.plan().global_batch;
  const int64_t seq_len = trainer.options().seq_len();
  MT_CHECK(info.global_batch == global_batch && info.seq_len == seq_len, where,
           ": trained with global batch ", info.global_batch, " x sequence length ", info.seq_len,
           "; this run has ", global_batch, " x ", seq_len,
           " (the data position is counted in such batches; use the same --batch-size and "
           "--block-size)");
  MT_CHECK(specs.size() == info.params.size(), where, ": ", info.params.size(),
           " parameters; the model has ", specs.size());
  auto params = trainer.model().named_parameters();
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& [name, spec] = specs[i];
    MT_CHECK(info.params[i].first == name, where, ": parameter ", i, " is '", info.params[i].first,
             "'; the model's is '", name, "'");
    const auto here = unpadded_shape(global_shape(params[name], spec), spec);
    const auto there = unpadded_shape(info.global_shapes[i], info.params[i].second);
    MT_CHECK(here == there, where, ": '", name, "' has shape ", c10::IntArrayRef(there),
             "; the model's is ", c10::IntArrayRef(here));
  }
}

// Whether `file` (written by the rank with this rank's coordinates) holds exactly the ranges
// this rank's optimizer owns: true in the same dp x tp x ZeRO layout with the same buckets.
bool owns_what_it_wrote(const SafetensorsFile& file, const ZeroOptimizer& optimizer) {
  const auto it = file.metadata.find("ranges");
  if (it == file.metadata.end()) {
    return false;
  }
  json own = json::object();
  for (const auto& r : optimizer.owned_ranges()) {
    own[r.name] = {r.begin, r.end};
  }
  return json::parse(it->second) == own;
}

// Every ZeRO state tensor ("<param>.<state>") of this rank's TP shard in the new layout, full
// (shaped like the TP-local parameter): each old TP rank's flat tensor is rebuilt from the old
// DP ranks' pieces, the old TP shards are assembled into the full tensor, and this rank's new
// shard is cut from it. Old ZeRO 0 replicas are whole, so DP rank 0's files suffice.
std::map<std::string, torch::Tensor>
resharded_state(const CheckpointInfo& info, const json& meta,
                const std::vector<std::pair<std::string, ShardSpec>>& specs, int tp_rank, int tp) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < info.params.size(); ++i) {
    index[info.params[i].first] = i;
  }
  const auto old_local_shape = [&](size_t i) {
    return local_shape(info.global_shapes[i], info.params[i].second, info.tp);
  };
  // The optimizer state is sharded over the dp x cp ranks.
  const int readers = info.zero_stage == 0 ? 1 : info.dp * info.cp;
  // flat[t][key]: old TP rank t's flattened state tensor.
  std::vector<std::map<std::string, torch::Tensor>> flat(info.tp);
  for (int t = 0; t < info.tp; ++t) {
    for (int d = 0; d < readers; ++d) {
      const std::string name = optim_file(d, t);
      const auto file = read_checked(info, meta.at("files"), name);
      MT_CHECK(file.metadata.count("ranges") > 0, name, ": no \"ranges\" metadata");
      const json ranges = json::parse(file.metadata.at("ranges"));
      for (const auto& [key, piece] : file.tensors) {
        if (key.rfind("rng.", 0) == 0) {
          continue;
        }
        const std::string param = split_state_key(key).first;
        MT_CHECK(index.count(param) > 0 && ranges.contains(param), name, ": '", key,
                 "' belongs to no parameter of ", kMeta, " or has no recorded range");
        const int64_t begin = ranges.at(param).at(0).get<int64_t>();
        const int64_t end = ranges.at(param).at(1).get<int64_t>();
        auto& target = flat[t][key];
        if (!target.defined()) {
          target = torch::zeros({c10::multiply_integers(old_local_shape(index.at(param)))},
                                piece.options());
        }
        MT_CHECK(piece.numel() == end - begin && begin >= 0 && end <= target.numel(), name, ": '",
                 key, "' has ", piece.numel(), " elements for range [", begin, ", ", end, ")");
        target.narrow(0, begin, end - begin).copy_(piece.reshape({-1}));
      }
    }
  }
  std::map<std::string, torch::Tensor> out;
  for (const auto& [key, unused] : flat[0]) {
    const size_t i = index.at(split_state_key(key).first);
    std::vector<torch::Tensor> shards;
    for (int t = 0; t < info.tp; ++t) {
      MT_CHECK(flat[t].count(key) > 0, info.path, ": TP rank ", t, " has no '", key, "'");
      shards.push_back(flat[t].at(key).view(old_local_shape(i)));
    }
    torch::Tensor full = assemble_unsharded(shards, info.params[i].second);
    const ShardSpec& spec = specs[i].second;
    if (spec.is_partitioned()) {
      full =
          cut_shard(pad_dim(full, spec.dim, spec.global_size), spec.dim, tp_rank, tp, spec.blocks);
    }
    out[key] = full;
  }
  return out;
}

} // namespace

CheckpointInfo parse_checkpoint_info(const std::string& json_text, const std::string& step_dir) {
  const std::string path = meta_path(step_dir);
  const json meta = parse_meta(json_text, path);
  CheckpointInfo info;
  info.path = step_dir;
  info.step = integer(member(meta, "step", path + ":"), path + ": step", 0, kMaxCount);
  const std::string layout_at = path + ": layout";
  const json& layout = member(meta, "layout", path + ":");
  info.dp = static_cast<int>(integer_member(layout, "dp", layout_at, 1, kMaxRanks));
  // Absent in checkpoints of layouts without context parallelism written by hand or by tools.
  info.cp = layout.is_object() && layout.contains("cp")
                ? static_cast<int>(integer_member(layout, "cp", layout_at, 1, kMaxRanks))
                : 1;
  MT_CHECK(info.dp <= kMaxRanks / info.cp, layout_at, ": dp (", info.dp, ") x cp (", info.cp,
           ") exceeds ", kMaxRanks, " ranks");
  info.tp = static_cast<int>(integer_member(layout, "tp", layout_at, 1, kMaxRanks));
  info.zero_stage = static_cast<int>(integer_member(layout, "zero", layout_at, 0, 3));
  const std::string data_at = path + ": data";
  const json& data = member(meta, "data", path + ":");
  info.global_batch = integer_member(data, "global_batch", data_at, 1, kMaxCount);
  info.seq_len = integer_member(data, "seq_len", data_at, 1, kMaxCount);
  // The data position (DESIGN §3) is step x global_batch samples of seq_len tokens.
  MT_CHECK(info.step <= kMaxCount / info.global_batch / info.seq_len, path, ": step ", info.step,
           " x global_batch ", info.global_batch, " x seq_len ", info.seq_len, " tokens exceeds ",
           kMaxCount);
  const json& model = member(meta, "model", path + ":");
  MT_CHECK(model.is_object(), path, ": model must be a JSON object, not ", model.type_name());
  info.model_json = model.dump();
  const json& params = member(meta, "params", path + ":");
  MT_CHECK(params.is_array(), path, ": params must be a JSON array, not ", params.type_name());
  for (size_t i = 0; i < params.size(); ++i) {
    auto [param, shape] =
        parse_param(params[i], path + ": params[" + std::to_string(i) + "]", info.tp);
    info.params.push_back(std::move(param));
    info.global_shapes.push_back(std::move(shape));
  }
  return info;
}

CheckpointInfo read_checkpoint_info(const std::string& step_dir) {
  const std::string path = meta_path(step_dir);
  MT_CHECK(fs::is_regular_file(path), step_dir, ": not a checkpoint (no ", kMeta, ")");
  return parse_checkpoint_info(read_file(path), step_dir);
}

std::optional<std::string> latest_checkpoint(const std::string& root) {
  const auto found = complete_checkpoints(root);
  if (found.empty()) {
    return std::nullopt;
  }
  return found.front().second.string();
}

std::string resolve_checkpoint(const std::string& path) {
  if (fs::is_regular_file(fs::path(path) / kMeta)) {
    return path;
  }
  MT_CHECK(fs::is_directory(path), path, ": no such checkpoint directory");
  const auto latest = latest_checkpoint(path);
  MT_CHECK(latest.has_value(), path,
           ": holds no complete checkpoint (no step_<N> directory with a ", kMeta, ")");
  return *latest;
}

NamedTensors load_consolidated_weights(const CheckpointInfo& info) {
  const json meta = read_meta(info.path);
  std::vector<SafetensorsFile> shards;
  for (int t = 0; t < info.tp; ++t) {
    shards.push_back(read_checked(info, meta.at("files"), model_file(t)));
  }
  NamedTensors out;
  for (const auto& [name, spec] : info.params) {
    std::vector<torch::Tensor> pieces;
    for (const auto& shard : shards) {
      pieces.push_back(shard.at(name));
    }
    out.emplace_back(name, assemble_unsharded(pieces, spec).contiguous());
  }
  return out;
}

void load_full_weights(torch::nn::Module& model, const NamedTensors& weights, int tp_rank,
                       int tp_size, const std::string& source) {
  std::map<std::string, torch::Tensor> by_name(weights.begin(), weights.end());
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  for (const auto& [name, spec] : named_shard_specs(model)) {
    auto it = by_name.find(name);
    MT_CHECK(it != by_name.end(), source, ": has no tensor '", name, "' (the model needs it)");
    used.insert(name);
    torch::Tensor param = model.named_parameters()[name];
    const auto want = unpadded_shape(global_shape(param, spec), spec);
    MT_CHECK(it->second.sizes().vec() == want, source, ": '", name, "' has shape ",
             it->second.sizes(), "; the model needs ", c10::IntArrayRef(want),
             " (check --n-layer/--n-embd/--n-head/--block-size/--vocab-size)");
    torch::Tensor local = it->second;
    if (spec.is_partitioned()) {
      local = cut_shard(pad_dim(local, spec.dim, spec.global_size), spec.dim, tp_rank, tp_size,
                        spec.blocks);
    }
    param.copy_(local);
  }
  for (const auto& [name, tensor] : by_name) {
    if (used.count(name) > 0) {
      continue;
    }
    if (name == "lm_head.weight" && by_name.count("transformer.wte.weight") > 0) {
      MT_CHECK(torch::equal(tensor, by_name.at("transformer.wte.weight")), source,
               ": lm_head.weight differs from transformer.wte.weight; this GPT ties them");
      continue;
    }
    MT_CHECK(false, source, ": tensor '", name, "' is not a parameter of the model");
  }
}

CheckpointManager::CheckpointManager(CheckpointOptions options) : options_(std::move(options)) {
  MT_CHECK(options_.save_every() >= 0 && options_.keep_last() >= 0,
           "CheckpointManager: save_every (", options_.save_every(), ") and keep_last (",
           options_.keep_last(), ") must be >= 0");
  json model;
  try {
    model = json::parse(options_.model_json());
  } catch (const json::exception& e) {
    MT_CHECK(false, "CheckpointManager: model_json is not valid JSON (", e.what(), ")");
  }
  MT_CHECK(model.is_object(), "CheckpointManager: model_json must be a JSON object");
}

std::string CheckpointManager::save(Trainer& trainer) {
  const auto start = std::chrono::steady_clock::now();
  const Mesh& mesh = trainer.mesh();
  const CommunicatorPtr& world = mesh.group("world");
  // The optimizer shards over dp x cp: its files are numbered by that index.
  const int dp_rank = mesh.index("dp_cp");
  const int tp_rank = mesh.index("tp");
  const int tp = mesh.group("tp")->size();
  const int64_t step = trainer.step();
  MT_CHECK(!options_.dir().empty(), "CheckpointManager::save: no checkpoint directory was given");
  const fs::path root = options_.dir();
  const fs::path dir = root / step_dir_name(step);
  const fs::path staged = root / ("." + step_dir_name(step) + ".partial");

  // 1. Rank 0 makes a fresh staging directory (a crashed save may have left one).
  std::string error;
  if (world->rank() == 0) {
    error = error_of([&] {
      fs::create_directories(root);
      fs::remove_all(staged);
      fs::create_directory(staged);
    });
    if (!error.empty()) {
      error = "checkpoint: cannot create " + staged.string() + ": " + error;
    }
  }
  agree(world, error, "checkpoint: creating the directory");

  // 2. Every rank writes its optimizer shard; DP rank 0 of each TP rank its model shard.
  //    Sizes and checksums: [optim bytes, optim hash, model bytes, model hash] per rank.
  auto sums = torch::zeros({4}, torch::kLong);
  error = error_of([&] {
    const ZeroStateDict state = trainer.optimizer().state_dict();
    NamedTensors tensors;
    json ranges = json::object();
    for (const auto& r : trainer.optimizer().owned_ranges()) {
      ranges[r.name] = {r.begin, r.end};
    }
    for (const auto& [key, t] : state.tensors) {
      tensors.emplace_back(key, t.contiguous());
    }
    tensors.emplace_back(kRngDefault, default_cpu_generator_state());
    if (options_.rng_tracker()) {
      const auto rng = options_.rng_tracker()->get_state();
      tensors.emplace_back(kRngShared, rng.shared);
      tensors.emplace_back(kRngTensorParallel, rng.tensor_parallel);
    }
    const std::string optim = serialize_safetensors(tensors, {{"dp_rank", std::to_string(dp_rank)},
                                                              {"tp_rank", std::to_string(tp_rank)},
                                                              {"ranges", ranges.dump()}});
    write_file_atomic((staged / optim_file(dp_rank, tp_rank)).string(), optim);
    sums[0] = static_cast<int64_t>(optim.size());
    sums[1] = static_cast<int64_t>(fnv1a64(optim));
    if (dp_rank == 0) {
      NamedTensors params;
      for (const auto& p : trainer.model().named_parameters()) {
        params.emplace_back(p.key(), p.value().detach().contiguous());
      }
      const std::string model = serialize_safetensors(params);
      write_file_atomic((staged / model_file(tp_rank)).string(), model);
      sums[2] = static_cast<int64_t>(model.size());
      sums[3] = static_cast<int64_t>(fnv1a64(model));
    }
  });
  agree(world, error, "checkpoint: writing the shards");
  auto all_sums = torch::zeros({world->size() * 4}, torch::kLong);
  world->all_gather(sums, all_sums);
  if (options_.before_publish()) {
    options_.before_publish()(step, world->rank());
  }

  // 3. Rank 0 describes the whole and publishes it with one rename.
  if (world->rank() == 0) {
    error = error_of([&] {
      json files = json::object();
      int64_t total_bytes = 0;
      for (int r = 0; r < world->size(); ++r) {
        const auto rank_sums = all_sums.narrow(0, 4 * r, 4);
        const int d = mesh.grid().index("dp_cp", r);
        const int t = mesh.grid().index("tp", r);
        const auto record = [&](const std::string& name, int64_t bytes, int64_t hash) {
          files[name] = {{"bytes", bytes}, {"fnv1a64", hex64(static_cast<uint64_t>(hash))}};
          total_bytes += bytes;
        };
        record(optim_file(d, t), rank_sums[0].item<int64_t>(), rank_sums[1].item<int64_t>());
        if (d == 0) {
          record(model_file(t), rank_sums[2].item<int64_t>(), rank_sums[3].item<int64_t>());
        }
      }
      json params = json::array();
      for (const auto& [name, spec] : named_shard_specs(trainer.model())) {
        json p = spec_json(spec, global_shape(trainer.model().named_parameters()[name], spec));
        p["name"] = name;
        p["dtype"] =
            std::string(c10::toString(trainer.model().named_parameters()[name].scalar_type()));
        params.push_back(p);
      }
      const auto& o = trainer.options();
      const auto& plan = trainer.plan();
      // The writer's layout (a reader reshards from dp, tp and zero; the rest is a record).
      const json layout = {{"dp", plan.dims.dp},
                           {"cp", plan.dims.cp},
                           {"tp", tp},
                           {"pp", plan.dims.pp},
                           {"zero", plan.zero_stage},
                           {"sequence_parallel", plan.sequence_parallel},
                           {"recompute", to_string(plan.recompute)},
                           {"precision", to_string(plan.precision)},
                           {"micro_batch", plan.micro_batch},
                           {"world", world->size()}};
      const json meta = {{"format", kFormat},
                         {"version", kVersion},
                         {"step", step},
                         {"layout", layout},
                         {"data",
                          {{"global_batch", plan.global_batch},
                           {"seq_len", o.seq_len()},
                           {"consumed_samples", step * plan.global_batch},
                           {"shuffle", o.shuffle()},
                           {"data_seed", o.data_seed()}}},
                         {"optimizer", {{"step", trainer.optimizer().step_count()}}},
                         {"scaler", trainer.scaler() == nullptr
                                        ? json(nullptr)
                                        : json{{"scale", trainer.scaler()->scale()},
                                               {"clean_steps", trainer.scaler()->clean_steps()}}},
                         {"model", json::parse(options_.model_json())},
                         {"params", params},
                         {"files", files}};
      write_file_atomic((staged / kMeta).string(), meta.dump(1));
      fsync_directory(staged.string());
      publish(staged, dir);
      // Older checkpoints beyond keep_last go only once the new one is complete.
      if (options_.keep_last() > 0) {
        const auto found = complete_checkpoints(root);
        for (size_t i = static_cast<size_t>(options_.keep_last()); i < found.size(); ++i) {
          fs::remove_all(found[i].second);
        }
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::ostringstream line;
      line << "checkpoint: saved " << dir.string() << " (" << files.size() << " files, "
           << (total_bytes + (1 << 19)) / (1 << 20) << " MiB, " << std::fixed
           << std::setprecision(2) << seconds << "s)";
      trainer.log(line.str());
    });
    if (!error.empty()) {
      error = "checkpoint: completing " + dir.string() + ": " + error;
    }
  }
  agree(world, error, "checkpoint: completing the save");
  last_saved_step_ = step;
  return dir.string();
}

void CheckpointManager::load(const std::string& step_dir, Trainer& trainer) {
  const Mesh& mesh = trainer.mesh();
  const int dp_rank = mesh.index("dp_cp");
  const int tp_rank = mesh.index("tp");
  std::string error = error_of([&] {
    const CheckpointInfo info = read_checkpoint_info(step_dir);
    const json meta = read_meta(step_dir);
    const auto specs = named_shard_specs(trainer.model());
    check_compatible(info, meta, trainer, specs, json::parse(options_.model_json()));

    ZeroStateDict state;
    state.step = meta.at("optimizer").at("step").get<int64_t>();
    auto& optimizer = trainer.optimizer();
    std::optional<SafetensorsFile> own;
    if (info.dp == mesh.group("dp")->size() && info.cp == mesh.group("cp")->size() &&
        info.tp == mesh.group("tp")->size() && info.zero_stage == trainer.plan().zero_stage) {
      own = read_checked(info, meta.at("files"), optim_file(dp_rank, tp_rank));
    }
    if (own && owns_what_it_wrote(*own, optimizer)) {
      // The same layout: this rank's own pieces, as it wrote them, and its RNG states.
      for (const auto& [key, t] : own->tensors) {
        if (key.rfind("rng.", 0) != 0) {
          state.tensors[key] = t;
        }
      }
      optimizer.load_state_dict(state);
      set_default_cpu_generator_state(own->at(kRngDefault));
      if (options_.rng_tracker() && own->contains(kRngShared)) {
        options_.rng_tracker()->set_state({own->at(kRngShared), own->at(kRngTensorParallel)});
      }
    } else {
      state.tensors = resharded_state(info, meta, specs, tp_rank, mesh.group("tp")->size());
      optimizer.load_state_dict(state);
    }
    const json& scaler = meta.value("scaler", json(nullptr));
    if (trainer.scaler() != nullptr && scaler.is_object()) {
      trainer.scaler()->set_state(scaler.at("scale").get<double>(),
                                  scaler.at("clean_steps").get<int64_t>());
    }
    trainer.set_step(info.step);
  });
  agree(mesh.group("world"), error, "checkpoint: loading");
  last_saved_step_ = trainer.step();
  trainer.log("checkpoint: resumed from " + step_dir + " at step " +
              std::to_string(trainer.step()));
}

CheckpointHook CheckpointManager::hook() {
  return [this](Trainer& trainer, CheckpointEvent event) {
    const int64_t step = trainer.step();
    const bool due = event == CheckpointEvent::kStep
                         ? options_.save_every() > 0 && step % options_.save_every() == 0
                         : true;
    if (due && step != last_saved_step_) {
      save(trainer);
    }
  };
}

} // namespace meshtrain
