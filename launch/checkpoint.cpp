// defines: the checkpoint format and CheckpointManager (see checkpoint.h,
// docs/checkpoints.md).
#include "meshtrain/launch/checkpoint.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/file_io.h"
#include "meshtrain/core/hash.h"
#include "meshtrain/parallel/param_init.h"
#include "meshtrain/parallel/shard_tensor.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fcntl.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
// meta.json's data.train_file field of the token file's sampled checksum.
constexpr const char* kDataChecksum = "fnv1a64_first_last_mib";
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

// Under pipeline parallelism (pp > 1) every file name also says its pp stage's rank.
std::string pp_part(int pp_rank, int pp) {
  return pp > 1 ? "pp" + two_digits(pp_rank) + "-" : "";
}

std::string model_file(int pp_rank, int tp_rank, int pp) {
  return "model-" + pp_part(pp_rank, pp) + "tp" + two_digits(tp_rank) + ".safetensors";
}

std::string optim_file(int pp_rank, int dp_rank, int tp_rank, int pp) {
  return "optim-" + pp_part(pp_rank, pp) + "dp" + two_digits(dp_rank) + "-tp" +
         two_digits(tp_rank) + ".safetensors";
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

// `text` on every rank of `world`, as `root` has it.
std::string broadcast_text(const CommunicatorPtr& world, const std::string& text, int root) {
  auto length = torch::tensor({static_cast<int64_t>(text.size())}, torch::kLong);
  world->broadcast(length, root);
  auto bytes = torch::zeros({length.item<int64_t>()}, torch::kByte);
  if (world->rank() == root && !text.empty()) {
    std::memcpy(bytes.data_ptr(), text.data(), text.size());
  }
  if (bytes.numel() > 0) {
    world->broadcast(bytes, root);
  }
  return std::string(static_cast<const char*>(bytes.data_ptr()), bytes.numel());
}

// What the ranks found together: whether any failed, whether any failure was `fatal`, and the
// message of the lowest failing rank (the same text on every rank).
struct Agreement {
  bool failed = false;
  bool fatal = false;
  int rank = -1;
  std::string message;
};

Agreement agree_on_error(const CommunicatorPtr& world, const std::string& local_error, bool fatal) {
  const int n = world->size();
  // max(n - rank) over the failing ranks is the lowest of them.
  auto flags = torch::tensor(
      {local_error.empty() ? 0 : n - world->rank(), !local_error.empty() && fatal ? 1 : 0},
      torch::kInt);
  world->all_reduce(flags, ReduceOp::kMax);
  Agreement agreed;
  if (flags[0].item<int>() == 0) {
    return agreed;
  }
  agreed.failed = true;
  agreed.fatal = flags[1].item<int>() != 0;
  agreed.rank = n - flags[0].item<int>();
  agreed.message = broadcast_text(world, local_error, agreed.rank);
  return agreed;
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

// meta.json nests 4 levels (the root, "params", a parameter, its "shape"), an optimizer file's
// "ranges" 2; anything much deeper is refused while parsing: printing or comparing a value
// recurses once per level, and a file of a million '[' would overflow the stack.
constexpr int kMaxJsonDepth = 64;

// `text` parsed as JSON nested at most kMaxJsonDepth levels; `path` names it in errors (a
// c10::Error: no JSON library exception gets out).
json parse_json(const std::string& text, const std::string& path) {
  const json::parser_callback_t limit_depth = [&](int depth, json::parse_event_t event, json&) {
    if (event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) {
      MT_CHECK(depth < kMaxJsonDepth, path, ": JSON nested more than ", kMaxJsonDepth,
               " levels deep");
    }
    return true;
  };
  try {
    return json::parse(text, limit_depth);
  } catch (const json::exception& e) {
    MT_CHECK(false, path, ": not valid JSON (", e.what(), ")");
  }
  return json();
}

// Largest layout and sizes a meta.json may state: far above any real job, low enough that
// nothing sized by them (a vector per TP rank, a product of dims) can overflow or exhaust
// memory before the files themselves are read and checked.
constexpr int64_t kMaxRanks = 1 << 16;
constexpr int64_t kMaxCount = int64_t{1} << 50;

// A meta.json text, parsed and checked to be a checkpoint this build reads; `path` names it in
// errors. Every failure is a c10::Error: no JSON library exception gets out.
json parse_meta(const std::string& text, const std::string& path) {
  const json meta = parse_json(text, path);
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
    // By division: blocks (up to 2^50) x tp (up to 2^16) does not fit in an int64.
    MT_CHECK(spec.global_size >= 1 && spec.global_size % spec.blocks == 0 &&
                 spec.global_size / spec.blocks % tp == 0,
             at, ": global_size ", spec.global_size, " is not divisible by blocks (", spec.blocks,
             ") x tp (", tp, ") (a partitioned dim holds at least one row per block and rank)");
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

// The parameters whose state this rank leaves out of its files: under pipeline parallelism the
// first and the last stage hold the same parameters outside the blocks (equal after every
// step), and only the first stage (pp rank 0) writes them.
std::set<std::string> written_by_another_stage(const Trainer& trainer) {
  if (trainer.mesh().index("pp") == 0) {
    return {};
  }
  const auto& shared = trainer.parallel().shared_parameters;
  return {shared.begin(), shared.end()};
}

// The whole model's parameter names in its order (under pipeline parallelism every stage's,
// not only this rank's): meta.json's "params" order.
std::vector<std::string> model_parameter_order(Trainer& trainer) {
  std::vector<std::string> names = trainer.parallel().all_parameters;
  if (names.empty()) {
    for (const auto& [name, spec] : named_shard_specs(trainer.model())) {
      names.push_back(name);
    }
  }
  return names;
}

// The complete checkpoints under `root` (step_<N> directories holding meta.json), newest
// first. Partial saves (.step_<N>.partial) and anything else are skipped. A .step_<N>.old
// holding meta.json stands for step N while step_<N> is absent: a re-save on a file system
// without an atomic exchange moves the previous one there for a moment (see publish). Throws
// naming the directory when N is beyond any step a checkpoint can record.
std::vector<std::pair<int64_t, fs::path>> complete_checkpoints(const fs::path& root) {
  static const std::regex kName("(\\.?)step_([0-9]+)(\\.old)?");
  std::map<int64_t, fs::path> found;
  std::map<int64_t, fs::path> moved_aside;
  std::error_code ec;
  if (root.empty() || !fs::is_directory(root, ec)) {
    return {};
  }
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (!std::regex_match(name, m, kName) || (m[1].length() > 0) != (m[3].length() > 0) ||
        !fs::is_regular_file(entry.path() / kMeta, ec)) {
      continue; // neither step_<N> nor .step_<N>.old, or no meta.json
    }
    const std::string digits = m[2].str();
    // No stoll: it throws std::out_of_range past 2^63, not the reader's error.
    int64_t step = 0;
    bool in_range = true;
    for (const char c : digits) {
      in_range = in_range && step <= (kMaxCount - (c - '0')) / 10;
      if (in_range) {
        step = step * 10 + (c - '0');
      }
    }
    MT_CHECK(in_range, entry.path().string(), ": step ", digits,
             " is beyond any step a checkpoint records (at most ", kMaxCount,
             "); rename or remove this directory");
    (m[3].length() > 0 ? moved_aside : found)[step] = entry.path();
  }
  for (const auto& [step, path] : moved_aside) {
    found.emplace(step, path); // only where step_<N> itself is absent
  }
  return {found.rbegin(), found.rend()};
}

// Replaces `dir` by `staged` (both in one directory) so that a complete checkpoint of that
// step exists at every instant: a new one is renamed into place; an existing one (a re-save of
// the step) is swapped with the new one in one renameat2(RENAME_EXCHANGE) and removed after.
// File systems without the exchange (EINVAL: some network file systems) get two renames,
// the previous checkpoint moved to .step_<N>.old first, which complete_checkpoints() takes for
// step N until the new one is in place. Durable (the parent directory is synced) on return.
void publish(const fs::path& staged, const fs::path& dir) {
  const fs::path parent = dir.parent_path();
  const fs::path old = parent / ("." + dir.filename().string() + ".old");
  if (!fs::exists(dir)) {
    fs::rename(staged, dir);
  } else if (::renameat2(AT_FDCWD, staged.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(staged); // the previous checkpoint, under the staging name now
  } else {
    const int err = errno;
    MT_CHECK(err == EINVAL || err == ENOSYS || err == ENOTSUP, "checkpoint: cannot swap ",
             staged.string(), " with ", dir.string(), ": ", std::strerror(err));
    fs::remove_all(old);
    fs::rename(dir, old);
    fs::rename(staged, dir);
  }
  fsync_directory(parent.string());
  fs::remove_all(old); // also what a crash between those two renames left
}

// What a checkpoint records of its training file: enough to notice another file, or another
// version of it, without reading it all — the token count and FNV-1a 64 of the first and the
// last MiB of its tokens (they overlap in a file under 2 MiB).
json data_file_json(const TokenFile& file) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(file.data());
  const size_t n = static_cast<size_t>(file.size()) * sizeof(uint16_t);
  const size_t part = std::min<size_t>(n, size_t{1} << 20);
  const uint64_t hash = fnv1a64(bytes + n - part, part, fnv1a64(bytes, part));
  return {{"path", file.path()}, {"tokens", file.size()}, {kDataChecksum, hex64(hash)}};
}

std::string bool_text(bool b) {
  return b ? "true" : "false";
}

// The data order of a run (DESIGN §3) follows from its token file, --shuffle and, when
// shuffling, the seed: a resume with any of them changed would silently train on another
// order. Each difference names the checkpoint's value and this run's. Fields a checkpoint of an
// older version lacks (the file) are not compared.
std::vector<std::string> data_differences(const json& data, const std::string& where,
                                          Trainer& trainer) {
  const auto& o = trainer.options();
  std::vector<std::string> differ;
  const json& shuffle = member(data, "shuffle", where + ": data");
  MT_CHECK(shuffle.is_boolean(), where, ": data.shuffle is ", shuffle.dump(),
           "; it must be true or false");
  if (shuffle.get<bool>() != o.shuffle()) {
    differ.push_back("shuffle is " + bool_text(shuffle.get<bool>()) + " in the checkpoint, " +
                     bool_text(o.shuffle()) + " in this run");
  } else if (o.shuffle()) {
    const json& seed = member(data, "data_seed", where + ": data");
    MT_CHECK(seed.is_number_unsigned() || (seed.is_number_integer() && seed.get<int64_t>() >= 0),
             where, ": data.data_seed is ", seed.dump(), "; it must be an integer >= 0");
    if (seed.get<uint64_t>() != o.data_seed()) {
      differ.push_back("data_seed (the shuffle's seed) is " + std::to_string(seed.get<uint64_t>()) +
                       " in the checkpoint, " + std::to_string(o.data_seed()) + " in this run");
    }
  }
  const auto file = data.find("train_file");
  if (file != data.end()) {
    const std::string at = where + ": data.train_file";
    const json& path = member(*file, "path", at);
    const int64_t tokens = integer_member(*file, "tokens", at, 0, kMaxCount);
    const json& checksum = member(*file, kDataChecksum, at);
    MT_CHECK(path.is_string() && checksum.is_string(), at, ": path and checksum must be strings");
    const json here = data_file_json(trainer.train_data());
    if (tokens != here.at("tokens").get<int64_t>()) {
      differ.push_back("the training file " + path.get<std::string>() + " had " +
                       std::to_string(tokens) + " tokens, this run's " +
                       here.at("path").get<std::string>() + " has " + here.at("tokens").dump());
    } else if (checksum != here.at(kDataChecksum)) {
      differ.push_back("the training file " + path.get<std::string>() +
                       " had first-and-last-MiB checksum " + checksum.get<std::string>() +
                       ", this run's " + here.at("path").get<std::string>() + " has " +
                       here.at(kDataChecksum).get<std::string>() + " (same token count)");
    }
  }
  return differ;
}

// Refuses a checkpoint of another model (a key on either side that the other lacks or values
// that differ), another data position or data order, or other parameters, naming the value in
// the checkpoint and in this run. With allow_data_change a changed data order is allowed and
// returned as warnings to print.
std::vector<std::string>
check_compatible(const CheckpointInfo& info, const json& meta, Trainer& trainer,
                 const std::vector<std::pair<std::string, ShardSpec>>& specs,
                 const json& want_model, bool allow_data_change) {
  const std::string where = (fs::path(info.path) / kMeta).string();
  const json& have_model = meta.at("model");
  for (const auto& [key, value] : want_model.items()) {
    MT_CHECK(have_model.contains(key) && have_model.at(key) == value, where, ": model ", key,
             " is ", have_model.contains(key) ? have_model.at(key).dump() : "absent",
             ", this run has ", value.dump());
  }
  for (const auto& [key, value] : have_model.items()) {
    MT_CHECK(want_model.contains(key), where, ": model ", key, " is ", value.dump(),
             ", this run has no ", key, " (a model of another kind or version)");
  }
  const int64_t global_batch = trainer.plan().global_batch;
  const int64_t seq_len = trainer.options().seq_len();
  MT_CHECK(info.global_batch == global_batch && info.seq_len == seq_len, where,
           ": trained with global batch ", info.global_batch, " x sequence length ", info.seq_len,
           "; this run has ", global_batch, " x ", seq_len,
           " (the data position is counted in such batches; use the same --batch-size and "
           "--block-size)");
  std::vector<std::string> warnings;
  const auto differ = data_differences(meta.at("data"), where, trainer);
  if (!differ.empty()) {
    std::string text;
    for (const auto& d : differ) {
      text += (text.empty() ? "" : "; ") + d;
    }
    MT_CHECK(allow_data_change, where, ": the training data differ from the checkpoint's: ", text,
             ". Resuming would continue on another data order; use the same --data, --shuffle "
             "and --seed, or pass --allow-data-change to continue on purpose");
    warnings.push_back("checkpoint: warning: continuing on changed data (--allow-data-change): " +
                       text);
  }
  // The whole model's names (every pipeline stage's), then this rank's parameters' shapes.
  const auto order = model_parameter_order(trainer);
  MT_CHECK(order.size() == info.params.size(), where, ": ", info.params.size(),
           " parameters; the model has ", order.size());
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < order.size(); ++i) {
    MT_CHECK(info.params[i].first == order[i], where, ": parameter ", i, " is '",
             info.params[i].first, "'; the model's is '", order[i], "'");
    index[order[i]] = i;
  }
  auto params = trainer.model().named_parameters();
  for (const auto& [name, spec] : specs) {
    const size_t i = index.at(name);
    const auto here = unpadded_shape(global_shape(params[name], spec), spec);
    const auto there = unpadded_shape(info.global_shapes[i], info.params[i].second);
    MT_CHECK(here == there, where, ": '", name, "' has shape ", c10::IntArrayRef(there),
             "; the model's is ", c10::IntArrayRef(here));
  }
  return warnings;
}

using Ranges = std::map<std::string, std::pair<int64_t, int64_t>>;

// An optimizer file's "ranges" metadata, {"<param>": [begin, end], ...}: which range of each
// flattened TP-local parameter the file holds. `where` names the file in errors.
Ranges parse_ranges(const SafetensorsFile& file, const std::string& where) {
  const auto it = file.metadata.find("ranges");
  MT_CHECK(it != file.metadata.end(), where, ": no \"ranges\" metadata");
  const json ranges = parse_json(it->second, where + ": \"ranges\" metadata");
  MT_CHECK(ranges.is_object(), where, ": \"ranges\" must be a JSON object, not ",
           ranges.type_name());
  Ranges out;
  for (const auto& [name, range] : ranges.items()) {
    const std::string at = where + ": ranges['" + name + "']";
    MT_CHECK(range.is_array() && range.size() == 2, at, " must be [begin, end], not ",
             range.dump());
    const int64_t begin = integer(range[0], at + "[0]", 0, kMaxCount);
    const int64_t end = integer(range[1], at + "[1]", begin, kMaxCount);
    out[name] = {begin, end};
  }
  return out;
}

// Whether `file` (written by the rank with this rank's coordinates) holds exactly the ranges
// this rank's optimizer owns, but for `skipped` parameters (another pipeline stage writes
// them): true in the same dp x tp x pp x ZeRO layout with the same buckets and stages.
bool owns_what_it_wrote(const SafetensorsFile& file, const std::string& where,
                        const ZeroOptimizer& optimizer, const std::set<std::string>& skipped) {
  if (file.metadata.count("ranges") == 0) {
    return false;
  }
  Ranges own;
  for (const auto& r : optimizer.owned_ranges()) {
    if (skipped.count(r.name) == 0) {
      own[r.name] = {r.begin, r.end};
    }
  }
  return parse_ranges(file, where) == own;
}

// One old TP rank's flat state tensor from the old DP ranks' pieces ([begin, end) each), which
// must cover [0, numel) exactly: a hole would stay zero, an overlap hide a piece. Checked before
// anything is allocated, so a size from meta.json can never size an allocation on its own.
torch::Tensor join_pieces(std::vector<std::pair<int64_t, torch::Tensor>> pieces, int64_t numel,
                          const std::string& what) {
  std::sort(pieces.begin(), pieces.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  int64_t covered = 0;
  std::vector<torch::Tensor> flat;
  for (const auto& [begin, piece] : pieces) {
    MT_CHECK(begin == covered, what, ": the optimizer files' pieces ",
             begin > covered ? "leave a hole at [" : "overlap at [", std::min(begin, covered), ", ",
             std::max(begin, covered), ") of its ", numel, " elements");
    covered += piece.numel();
    flat.push_back(piece.reshape({-1}));
  }
  MT_CHECK(covered == numel, what, ": the optimizer files' pieces cover [0, ", covered, ") of its ",
           numel, " elements");
  return torch::cat(flat);
}

// Every ZeRO state tensor ("<param>.<state>") of this rank's parameters (`specs`: its TP
// shards' specs) in the new layout, full (shaped like the TP-local parameter): each old TP
// rank's flat tensor is rebuilt from the old DP ranks' pieces, the old TP shards are assembled
// into the full tensor, and this rank's new shard is cut from it. Old ZeRO 0 replicas are
// whole, so DP rank 0's files suffice. Under an old pipeline layout each parameter is in the
// files of one pp stage (the shared ones in the first stage's); under a new one this rank
// takes only its stages' parameters.
std::map<std::string, torch::Tensor>
resharded_state(const CheckpointInfo& info, const json& meta,
                const std::vector<std::pair<std::string, ShardSpec>>& specs, int tp_rank, int tp) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < info.params.size(); ++i) {
    index[info.params[i].first] = i;
  }
  const std::map<std::string, ShardSpec> wanted(specs.begin(), specs.end());
  const auto old_local_shape = [&](size_t i) {
    return local_shape(info.global_shapes[i], info.params[i].second, info.tp);
  };
  // The optimizer state is sharded over the dp x cp ranks.
  const int readers = info.zero_stage == 0 ? 1 : info.dp * info.cp;
  // flat[t][key]: old TP rank t's flattened state tensor.
  std::vector<std::map<std::string, torch::Tensor>> flat(info.tp);
  for (int t = 0; t < info.tp; ++t) {
    // pieces[key]: (begin, piece) from each old DP rank's file.
    std::map<std::string, std::vector<std::pair<int64_t, torch::Tensor>>> pieces;
    for (int p = 0; p < info.pp; ++p) {
      for (int d = 0; d < readers; ++d) {
        const std::string name = optim_file(p, d, t, info.pp);
        const auto file = read_checked(info, meta.at("files"), name);
        const Ranges ranges = parse_ranges(file, name);
        for (const auto& [key, piece] : file.tensors) {
          if (key.rfind("rng.", 0) == 0) {
            continue;
          }
          const std::string param = split_state_key(key).first;
          MT_CHECK(index.count(param) > 0 && ranges.count(param) > 0, name, ": '", key,
                   "' belongs to no parameter of ", kMeta, " or has no recorded range");
          const auto [begin, end] = ranges.at(param);
          MT_CHECK(piece.numel() == end - begin, name, ": '", key, "' has ", piece.numel(),
                   " elements for range [", begin, ", ", end, ")");
          if (wanted.count(param) > 0) {
            pieces[key].emplace_back(begin, piece);
          }
        }
      }
    }
    for (auto& [key, list] : pieces) {
      const size_t i = index.at(split_state_key(key).first);
      const auto shape = old_local_shape(i);
      const std::string what = info.path + ": '" + key + "' of TP rank " + std::to_string(t);
      // The meta.json shape's element count is bounded (kMaxCount): no overflow here.
      flat[t][key] = join_pieces(std::move(list), c10::multiply_integers(shape), what).view(shape);
    }
  }
  std::map<std::string, torch::Tensor> out;
  for (const auto& [key, unused] : flat[0]) {
    const size_t i = index.at(split_state_key(key).first);
    std::vector<torch::Tensor> shards;
    for (int t = 0; t < info.tp; ++t) {
      MT_CHECK(flat[t].count(key) > 0, info.path, ": TP rank ", t, " has no '", key, "'");
      shards.push_back(flat[t].at(key));
    }
    torch::Tensor full = assemble_unsharded(shards, info.params[i].second);
    const ShardSpec& spec = wanted.at(info.params[i].first);
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
  // Absent in checkpoints written before pipeline parallelism.
  info.pp = layout.contains("pp")
                ? static_cast<int>(integer_member(layout, "pp", layout_at, 1, kMaxRanks))
                : 1;
  MT_CHECK(info.dp * info.cp <= kMaxRanks / info.tp / info.pp, layout_at, ": dp (", info.dp,
           ") x cp (", info.cp, ") x tp (", info.tp, ") x pp (", info.pp, ") exceeds ", kMaxRanks,
           " ranks");
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
  // shards[t]: TP rank t's parameters, from the files of every pp stage.
  std::vector<std::map<std::string, torch::Tensor>> shards(info.tp);
  for (int p = 0; p < info.pp; ++p) {
    for (int t = 0; t < info.tp; ++t) {
      const std::string name = model_file(p, t, info.pp);
      const auto file = read_checked(info, meta.at("files"), name);
      for (const auto& [key, tensor] : file.tensors) {
        MT_CHECK(shards[t].emplace(key, tensor).second, info.path, ": '", key, "' is in ", name,
                 " and in another pp stage's model file");
      }
    }
  }
  NamedTensors out;
  for (const auto& [name, spec] : info.params) {
    std::vector<torch::Tensor> pieces;
    for (int t = 0; t < info.tp; ++t) {
      const auto it = shards[t].find(name);
      MT_CHECK(it != shards[t].end(), info.path, ": no model file of TP rank ", t, " holds '", name,
               "'");
      pieces.push_back(it->second);
    }
    out.emplace_back(name, assemble_unsharded(pieces, spec).contiguous());
  }
  return out;
}

void load_full_weights(torch::nn::Module& model, const NamedTensors& weights, int tp_rank,
                       int tp_size, const std::string& source) {
  std::map<std::string, torch::Tensor> by_name(weights.begin(), weights.end());
  const auto specs = named_shard_specs(model);
  const auto params = model.named_parameters();
  WholeShapes wanted;
  for (const auto& [name, spec] : specs) {
    wanted.emplace_back(name, unpadded_shape(global_shape(params[name], spec), spec));
  }
  check_whole_weights(wanted, weights, source);
  const auto head = by_name.find("lm_head.weight");
  if (head != by_name.end() && by_name.count("transformer.wte.weight") > 0) {
    MT_CHECK(torch::equal(head->second, by_name.at("transformer.wte.weight")), source,
             ": lm_head.weight differs from transformer.wte.weight; this GPT ties them");
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, spec] : specs) {
    torch::Tensor local = by_name.at(name);
    if (spec.is_partitioned()) {
      local = cut_shard(pad_dim(local, spec.dim, spec.global_size), spec.dim, tp_rank, tp_size,
                        spec.blocks);
    }
    params[name].copy_(local);
  }
}

namespace {

// meta.json's "params" entries by name: every parameter's TP spec, global shape and dtype.
// Under pipeline parallelism each stage describes the parameters it writes and the first rank
// of each stage sends them to rank 0 (collective over the world): complete on rank 0 only.
std::map<std::string, json>
describe_parameters(Trainer& trainer, const std::function<bool(const std::string&)>& written) {
  auto params = trainer.model().named_parameters();
  std::map<std::string, json> described;
  for (const auto& [name, spec] : named_shard_specs(trainer.model())) {
    if (written(name)) {
      json p = spec_json(spec, global_shape(params[name], spec));
      p["name"] = name;
      p["dtype"] = std::string(c10::toString(params[name].scalar_type()));
      described[name] = p;
    }
  }
  const Mesh& mesh = trainer.mesh();
  const CommunicatorPtr& world = mesh.group("world");
  const int pp = trainer.plan().dims.pp;
  for (int stage = 1; stage < pp; ++stage) {
    // The stage's first rank (dp, cp and tp rank 0): its TP shards' specs give global shapes.
    MeshCoord first;
    first.pp = stage;
    const int root = mesh.grid().rank(first);
    json mine = json::array();
    if (world->rank() == root) {
      for (const auto& [name, p] : described) {
        mine.push_back(p);
      }
    }
    const json theirs = json::parse(broadcast_text(world, mine.dump(), root));
    if (world->rank() == 0) {
      for (const auto& p : theirs) {
        described[p.at("name").get<std::string>()] = p;
      }
    }
  }
  return described;
}

} // namespace

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
  const int pp_rank = mesh.index("pp");
  const int pp = trainer.plan().dims.pp;
  const std::set<std::string> skipped = written_by_another_stage(trainer);
  const auto written = [&](const std::string& param) { return skipped.count(param) == 0; };
  const int64_t step = trainer.step();
  MT_CHECK(!options_.dir().empty(), "CheckpointManager::save: no checkpoint directory was given");
  const fs::path root = options_.dir();
  const fs::path dir = root / step_dir_name(step);
  const fs::path staged = root / ("." + step_dir_name(step) + ".partial");

  // 0. The copies of every parameter still agree (DESIGN §3 "Replicas agree"): a diverged copy
  //    is named instead of saved as the model. Collective; every rank throws alike.
  {
    const GatheredParameters whole(trainer.shards());
    check_replicas(trainer.model(), mesh, "at the checkpoint of step " + std::to_string(step));
  }

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

  // 2. Every rank writes its optimizer shard; DP rank 0 of each TP rank (and pp stage) its
  //    model shard. Sizes and checksums: [optim bytes, optim hash, model bytes, model hash]
  //    per rank. ZeRO-3 gathers the parameters for it (collective: every rank is here).
  auto sums = torch::zeros({4}, torch::kLong);
  error = error_of([&] {
    const GatheredParameters whole(trainer.shards());
    const ZeroStateDict state = trainer.optimizer().state_dict();
    NamedTensors tensors;
    json ranges = json::object();
    for (const auto& r : trainer.optimizer().owned_ranges()) {
      if (written(r.name)) {
        ranges[r.name] = {r.begin, r.end};
      }
    }
    for (const auto& [key, t] : state.tensors) {
      if (written(split_state_key(key).first)) {
        tensors.emplace_back(key, t.contiguous());
      }
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
    write_file_atomic((staged / optim_file(pp_rank, dp_rank, tp_rank, pp)).string(), optim);
    sums[0] = static_cast<int64_t>(optim.size());
    sums[1] = static_cast<int64_t>(fnv1a64(optim));
    if (dp_rank == 0) {
      NamedTensors params;
      for (const auto& p : trainer.model().named_parameters()) {
        if (written(p.key())) {
          params.emplace_back(p.key(), p.value().detach().contiguous());
        }
      }
      const std::string model = serialize_safetensors(params);
      write_file_atomic((staged / model_file(pp_rank, tp_rank, pp)).string(), model);
      sums[2] = static_cast<int64_t>(model.size());
      sums[3] = static_cast<int64_t>(fnv1a64(model));
    }
  });
  agree(world, error, "checkpoint: writing the shards");
  auto all_sums = torch::zeros({world->size() * 4}, torch::kLong);
  world->all_gather(sums, all_sums);
  const auto described = describe_parameters(trainer, written);
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
        const int p = mesh.grid().index("pp", r);
        const int d = mesh.grid().index("dp_cp", r);
        const int t = mesh.grid().index("tp", r);
        const auto record = [&](const std::string& name, int64_t bytes, int64_t hash) {
          files[name] = {{"bytes", bytes}, {"fnv1a64", hex64(static_cast<uint64_t>(hash))}};
          total_bytes += bytes;
        };
        record(optim_file(p, d, t, pp), rank_sums[0].item<int64_t>(), rank_sums[1].item<int64_t>());
        if (d == 0) {
          record(model_file(p, t, pp), rank_sums[2].item<int64_t>(), rank_sums[3].item<int64_t>());
        }
      }
      json params = json::array();
      for (const auto& name : model_parameter_order(trainer)) {
        const auto it = described.find(name);
        MT_CHECK(it != described.end(), "no pipeline stage wrote parameter '", name, "'");
        params.push_back(it->second);
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
                           {"data_seed", o.data_seed()},
                           {"train_file", data_file_json(trainer.train_data())}}},
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
      // Older checkpoints beyond keep_last go only once the new one is complete. Retention
      // counts this run's checkpoints: the one just written (always kept) and older ones.
      // Newer ones are from a run this one branched off (it resumed from an earlier step):
      // they are left alone, and named once, since --resume takes the newest.
      std::vector<std::string> newer;
      int64_t kept = 0;
      for (const auto& [n, path] : complete_checkpoints(root)) {
        if (n > step) {
          newer.push_back(path.filename().string());
        } else if (options_.keep_last() == 0 || kept < options_.keep_last()) {
          ++kept;
        } else {
          fs::remove_all(path);
        }
      }
      if (!newer.empty() && !warned_newer_) {
        warned_newer_ = true;
        std::ostringstream note;
        note << "checkpoint: warning: " << root.string() << " holds " << newer.size()
             << " checkpoint(s) newer than this run's step " << step << " (" << newer.back();
        if (newer.size() > 1) {
          note << " .. " << newer.front();
        }
        note << "), from the run this one branched off; they are kept (not counted by "
                "--keep-checkpoints), and --resume would take the newest: move them away to "
                "continue this run with --resume";
        std::fprintf(stderr, "%s\n", note.str().c_str());
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

namespace {

// What a rank read of a checkpoint before anything of the trainer changes: the optimizer
// state to load, the RNG states (same layout only), the scaler and warnings to print.
struct PreparedLoad {
  CheckpointInfo info;
  ZeroStateDict state;
  std::optional<SafetensorsFile> own; // this rank's own file, in the same layout
  json scaler;
  std::vector<std::string> warnings;
};

// Why a rank could not prepare a load: `error` empty when it could. `corrupt`: the checkpoint
// itself is unreadable or damaged (an older one may do); otherwise it is this run's (another
// model, batch or data: no checkpoint of this run will do).
struct PrepareError {
  std::string error;
  bool corrupt = false;
};

PrepareError prepare_load(const CheckpointOptions& options, const std::string& step_dir,
                          Trainer& trainer, PreparedLoad& out) {
  const Mesh& mesh = trainer.mesh();
  const int dp_rank = mesh.index("dp_cp");
  const int tp_rank = mesh.index("tp");
  const int pp_rank = mesh.index("pp");
  json meta;
  std::string error = error_of([&] {
    out.info = read_checkpoint_info(step_dir);
    meta = read_meta(step_dir);
    const std::string where = meta_path(step_dir);
    out.state.step = integer_member(member(meta, "optimizer", where + ":"), "step",
                                    where + ": optimizer", 0, kMaxCount);
    out.scaler = meta.value("scaler", json(nullptr));
    MT_CHECK(out.scaler.is_null() ||
                 (out.scaler.is_object() && out.scaler.contains("scale") &&
                  out.scaler.at("scale").is_number() && out.scaler.contains("clean_steps") &&
                  out.scaler.at("clean_steps").is_number_integer()),
             where, ": scaler must be null or {\"scale\": number, \"clean_steps\": integer}");
    MT_CHECK(meta.at("files").is_object(), where, ": files must be a JSON object");
  });
  if (!error.empty()) {
    return {error, true};
  }
  const auto specs = named_shard_specs(trainer.model());
  error = error_of([&] {
    out.warnings = check_compatible(out.info, meta, trainer, specs,
                                    json::parse(options.model_json()), options.allow_data_change());
  });
  if (!error.empty()) {
    return {error, false};
  }
  error = error_of([&] {
    const auto& info = out.info;
    auto& optimizer = trainer.optimizer();
    const int pp = trainer.plan().dims.pp;
    if (info.dp == mesh.group("dp")->size() && info.cp == mesh.group("cp")->size() &&
        info.tp == mesh.group("tp")->size() && info.pp == pp &&
        info.zero_stage == trainer.plan().zero_stage) {
      const std::string name = optim_file(pp_rank, dp_rank, tp_rank, pp);
      auto own = read_checked(info, meta.at("files"), name);
      const auto skipped = written_by_another_stage(trainer);
      if (owns_what_it_wrote(own, name, optimizer, skipped)) {
        // The same layout: this rank's RNG states and its own pieces, as it wrote them (the
        // last pipeline stage's shared parameters are in the first stage's files).
        MT_CHECK(own.contains(kRngDefault), name, ": no '", kRngDefault, "'");
        if (skipped.empty()) {
          for (const auto& [key, t] : own.tensors) {
            if (key.rfind("rng.", 0) != 0) {
              out.state.tensors[key] = t;
            }
          }
          out.own = std::move(own);
          return;
        }
        out.own = std::move(own);
      }
    }
    out.state.tensors = resharded_state(info, meta, specs, tp_rank, mesh.group("tp")->size());
  });
  return {error, !error.empty()};
}

// Puts a prepared load into the trainer (every rank prepared its part successfully).
void apply_load(const CheckpointOptions& options, PreparedLoad& prepared, Trainer& trainer) {
  trainer.optimizer().load_state_dict(prepared.state);
  if (prepared.own) {
    set_default_cpu_generator_state(prepared.own->at(kRngDefault));
    if (options.rng_tracker() && prepared.own->contains(kRngShared)) {
      options.rng_tracker()->set_state(
          {prepared.own->at(kRngShared), prepared.own->at(kRngTensorParallel)});
    }
  }
  if (trainer.scaler() != nullptr && prepared.scaler.is_object()) {
    trainer.scaler()->set_state(prepared.scaler.at("scale").get<double>(),
                                prepared.scaler.at("clean_steps").get<int64_t>());
  }
  trainer.set_step(prepared.info.step);
}

// "checkpoint: loading <dir> failed[ on rank R]: <message>"
std::string load_failure(const std::string& step_dir, const Agreement& agreed, int world_size) {
  std::string text = "checkpoint: loading " + step_dir + " failed";
  if (world_size > 1) {
    text += " on rank " + std::to_string(agreed.rank);
  }
  return text + ": " + agreed.message;
}

// Applies a load every rank prepared, agreed; prints the warnings once.
void finish_load(const CheckpointOptions& options, const std::string& step_dir,
                 PreparedLoad& prepared, Trainer& trainer) {
  const CommunicatorPtr& world = trainer.mesh().group("world");
  const std::string error = error_of([&] { apply_load(options, prepared, trainer); });
  const Agreement agreed = agree_on_error(world, error, true);
  MT_CHECK(!agreed.failed, load_failure(step_dir, agreed, world->size()));
  if (world->rank() == 0) {
    for (const auto& warning : prepared.warnings) {
      std::fprintf(stderr, "%s\n", warning.c_str());
    }
    std::fflush(stderr);
  }
  trainer.log("checkpoint: resumed from " + step_dir + " at step " +
              std::to_string(trainer.step()));
}

} // namespace

void CheckpointManager::load(const std::string& step_dir, Trainer& trainer) {
  const CommunicatorPtr& world = trainer.mesh().group("world");
  PreparedLoad prepared;
  const PrepareError prepare = prepare_load(options_, step_dir, trainer, prepared);
  const Agreement agreed = agree_on_error(world, prepare.error, !prepare.corrupt);
  MT_CHECK(!agreed.failed, load_failure(step_dir, agreed, world->size()));
  finish_load(options_, step_dir, prepared, trainer);
  last_saved_step_ = trainer.step();
}

std::optional<std::string> CheckpointManager::load_latest(const std::string& root,
                                                          Trainer& trainer) {
  const CommunicatorPtr& world = trainer.mesh().group("world");
  // Rank 0's listing decides, so that every rank tries the same candidates in the same order.
  std::string listing;
  std::string error = error_of([&] {
    for (const auto& [step, path] : complete_checkpoints(root)) {
      listing += path.string() + "\n";
    }
  });
  const Agreement listed = agree_on_error(world, world->rank() == 0 ? error : "", true);
  MT_CHECK(!listed.failed, "checkpoint: listing ", root, ": ", listed.message);
  listing = broadcast_text(world, listing, 0);
  std::vector<std::string> skipped;
  std::istringstream lines(listing);
  for (std::string step_dir; std::getline(lines, step_dir);) {
    PreparedLoad prepared;
    const PrepareError prepare = prepare_load(options_, step_dir, trainer, prepared);
    const Agreement agreed = agree_on_error(world, prepare.error, !prepare.corrupt);
    if (!agreed.failed) {
      finish_load(options_, step_dir, prepared, trainer);
      last_saved_step_ = trainer.step();
      return step_dir;
    }
    const std::string failure = load_failure(step_dir, agreed, world->size());
    MT_CHECK(!agreed.fatal, failure);
    // Damaged: an older checkpoint of the same run may do. Said on stderr, whatever --progress.
    if (world->rank() == 0) {
      const std::string where =
          world->size() > 1 ? " on rank " + std::to_string(agreed.rank) : std::string();
      std::fprintf(stderr, "checkpoint: warning: skipped %s, it does not verify%s: %s\n",
                   step_dir.c_str(), where.c_str(), agreed.message.c_str());
      std::fflush(stderr);
    }
    skipped.push_back(failure);
  }
  if (skipped.empty()) {
    return std::nullopt;
  }
  std::string all;
  for (const auto& s : skipped) {
    all += "\n  " + s;
  }
  MT_CHECK(false, "checkpoint: no checkpoint in ", root, " verifies (", skipped.size(),
           " tried, newest first):", all);
  return std::nullopt;
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
