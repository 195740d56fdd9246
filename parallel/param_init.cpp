// defines: DeferredInit, ShardedModule::declare_parameter, the counter-based initial values,
// deferred_parameters, materialize, agree_init_seed, ReplicaHashes, check_replicas (see
// param_init.h).
#include "meshtrain/parallel/param_init.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/hash.h"
#include "meshtrain/parallel/shard_tensor.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

namespace meshtrain {
namespace {

thread_local bool deferred_active = false;
thread_local uint64_t deferred_seed = 0;

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
struct Philox {
  uint32_t x[4];
};

inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

inline Philox philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox{{c0, c1, c2, c3}};
}

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double kTwoToMinus32 = 1.0 / 4294967296.0;

// Both Box-Muller normals of pair `pair`: [0] for the even element, [1] for the odd.
inline void normal_pair(uint64_t pair, uint64_t name_hash, uint64_t seed, double out[2]) {
  const Philox bits = philox4x32_10(pair, name_hash, seed);
  const double u1 = (static_cast<double>(bits.x[0]) + 0.5) * kTwoToMinus32; // (0, 1)
  const double u2 = static_cast<double>(bits.x[1]) * kTwoToMinus32;         // [0, 1)
  const double r = std::sqrt(-2.0 * std::log(u1));
  out[0] = r * std::cos(kTwoPi * u2);
  out[1] = r * std::sin(kTwoPi * u2);
}

// Where local element i of a parameter sits in the whole unpadded tensor (-1: padding).
struct IndexMap {
  int64_t dim_size = 1; // local size of the cut dim (1 when replicated)
  int64_t inner = 1;    // elements after the cut dim
  int64_t piece = 1;    // local rows per block
  int64_t block = 1;    // rows per block in the whole (padded) tensor
  int64_t offset = 0;   // where this rank's cut starts inside each block
  int64_t unpadded = 1; // rows of the whole tensor without padding
  bool partitioned = false;

  IndexMap(torch::IntArrayRef local, const ShardSpec& spec) {
    if (!spec.is_partitioned()) {
      return;
    }
    MT_CHECK(spec.dim < static_cast<int64_t>(local.size()), "initial values: dim ", spec.dim,
             " of a parameter of sizes ", local);
    partitioned = true;
    dim_size = local[spec.dim];
    for (size_t d = spec.dim + 1; d < local.size(); ++d) {
      inner *= local[d];
    }
    MT_CHECK(spec.blocks >= 1 && dim_size % spec.blocks == 0, "initial values: ", dim_size,
             " local rows do not split into ", spec.blocks, " blocks");
    piece = dim_size / spec.blocks;
    block = spec.block_size();
    offset = spec.offset;
    unpadded = spec.unpadded_size > 0 ? spec.unpadded_size : spec.global_size;
  }

  int64_t global(int64_t i) const {
    if (!partitioned) {
      return i;
    }
    const int64_t k = i % inner;
    const int64_t j = (i / inner) % dim_size;
    const int64_t outer = i / (inner * dim_size);
    const int64_t row = (j / piece) * block + offset + j % piece;
    return row >= unpadded ? -1 : (outer * unpadded + row) * inner + k;
  }
};

} // namespace

DeferredInit::DeferredInit(uint64_t seed)
    : previous_active_(deferred_active), previous_seed_(deferred_seed) {
  deferred_active = true;
  deferred_seed = seed;
}

DeferredInit::~DeferredInit() {
  deferred_active = previous_active_;
  deferred_seed = previous_seed_;
}

bool DeferredInit::active() {
  return deferred_active;
}
uint64_t DeferredInit::seed() {
  return deferred_active ? deferred_seed : 0;
}

torch::Tensor deferred_placeholder(torch::IntArrayRef sizes, torch::Dtype dtype) {
  const std::vector<int64_t> strides(sizes.size(), 0);
  auto placeholder = torch::empty_strided(sizes, strides, torch::TensorOptions().dtype(dtype));
  // Its one element, through a one-element view (a fill of the placeholder itself would write
  // one location many times, which torch refuses).
  placeholder.as_strided({1}, {1}).fill_(std::numeric_limits<double>::quiet_NaN());
  return placeholder;
}

bool is_deferred_placeholder(const torch::Tensor& t) {
  if (!t.defined() || t.numel() <= 1) {
    return false;
  }
  for (const auto stride : t.strides()) {
    if (stride != 0) {
      return false;
    }
  }
  return true;
}

float initial_value(const InitRule& rule, uint64_t seed, const std::string& name,
                    int64_t global_index) {
  switch (rule.kind) {
  case InitRule::Kind::kZeros:
    return 0.0f;
  case InitRule::Kind::kOnes:
    return 1.0f;
  case InitRule::Kind::kNormal: {
    double pair[2];
    normal_pair(static_cast<uint64_t>(global_index) >> 1, fnv1a64(name), seed, pair);
    return static_cast<float>(rule.std * pair[global_index & 1]);
  }
  }
  return 0.0f;
}

void fill_initial_values(torch::Tensor out, int64_t first, torch::IntArrayRef local_sizes,
                         const std::string& name, const InitRule& rule, const ShardSpec& spec,
                         uint64_t seed) {
  MT_CHECK(out.dim() == 1 && out.is_contiguous() && out.is_floating_point(),
           "fill_initial_values: the output must be a 1-D contiguous floating tensor, got sizes ",
           out.sizes(), " of ", out.scalar_type());
  const int64_t n = out.numel();
  if (n == 0) {
    return;
  }
  torch::NoGradGuard no_grad;
  if (rule.kind != InitRule::Kind::kNormal) {
    // Padding rows of a ones-rule parameter would be 1 here; no layer pads one.
    out.fill_(rule.kind == InitRule::Kind::kOnes ? 1.0 : 0.0);
    return;
  }
  const IndexMap map(local_sizes, spec);
  const uint64_t name_hash = fnv1a64(name);
  auto values = out.scalar_type() == torch::kFloat ? out : torch::empty({n}, torch::kFloat);
  float* v = values.data_ptr<float>();
  // Rows of the cut dim are contiguous runs of `inner` (or the whole tensor when replicated)
  // consecutive global indices: each normal pair is computed once where both halves are kept.
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t g = map.global(first + i);
      if (g < 0) {
        v[i++] = 0.0f;
        continue;
      }
      double pair[2];
      normal_pair(static_cast<uint64_t>(g) >> 1, name_hash, seed, pair);
      v[i] = static_cast<float>(rule.std * pair[g & 1]);
      ++i;
      if ((g & 1) == 0 && i < end && map.global(first + i) == g + 1) {
        v[i++] = static_cast<float>(rule.std * pair[1]);
      }
    }
  });
  if (!values.is_same(out)) {
    out.copy_(values);
  }
}

void fill_from_whole(torch::Tensor out, int64_t first, torch::IntArrayRef local_sizes,
                     const ShardSpec& spec, const torch::Tensor& whole) {
  MT_CHECK(out.dim() == 1 && out.is_contiguous(),
           "fill_from_whole: the output must be a 1-D contiguous tensor, got sizes ", out.sizes());
  const int64_t n = out.numel();
  if (n == 0) {
    return;
  }
  torch::NoGradGuard no_grad;
  const IndexMap map(local_sizes, spec);
  auto index = torch::empty({n}, torch::kLong);
  int64_t* at = index.data_ptr<int64_t>();
  bool padded = false;
  for (int64_t i = 0; i < n; ++i) {
    at[i] = map.global(first + i);
    padded = padded || at[i] < 0;
  }
  // Only the indexed elements of `whole` are read (a mapped file: only their pages).
  auto values = whole.reshape({-1}).index_select(0, padded ? index.clamp_min(0) : index);
  if (padded) {
    values.masked_fill_(index < 0, 0);
  }
  out.copy_(values);
}

std::vector<int64_t> whole_sizes(const DeferredParameter& p) {
  auto sizes = p.param.sizes().vec();
  if (p.spec.is_partitioned()) {
    sizes[p.spec.dim] = p.spec.unpadded_size > 0 ? p.spec.unpadded_size : p.spec.global_size;
  }
  return sizes;
}

void fill_deferred(const DeferredParameter& p, const torch::Tensor& out, int64_t first,
                   uint64_t seed, const torch::Tensor& whole) {
  if (whole.defined()) {
    fill_from_whole(out, first, p.param.sizes(), p.spec, whole);
  } else {
    fill_initial_values(out, first, p.param.sizes(), p.name, p.rule, p.spec, seed);
  }
}

void check_whole_weights(const WholeShapes& wanted, const NamedTensors& weights,
                         const std::string& source) {
  std::map<std::string, const torch::Tensor*> by_name;
  for (const auto& [name, tensor] : weights) {
    by_name[name] = &tensor;
  }
  std::set<std::string> names;
  for (const auto& [name, want] : wanted) {
    names.insert(name);
    const auto it = by_name.find(name);
    MT_CHECK(it != by_name.end(), source, ": has no tensor '", name, "' (the model needs it)");
    MT_CHECK(it->second->sizes().vec() == want, source, ": '", name, "' has shape ",
             it->second->sizes(), "; the model needs ", c10::IntArrayRef(want),
             " (check --n-layer/--n-embd/--n-head/--block-size/--vocab-size)");
  }
  for (const auto& [name, tensor] : by_name) {
    MT_CHECK(names.count(name) > 0 || name == "lm_head.weight", source, ": tensor '", name,
             "' is not a parameter of the model");
  }
}

torch::Tensor ShardedModule::declare_parameter(torch::nn::Module& self, const std::string& name,
                                               std::vector<int64_t> global_sizes, InitRule rule,
                                               ShardSpec spec, int parts) {
  MT_CHECK(dynamic_cast<ShardedModule*>(&self) == this,
           "declare_parameter: `self` must be the module that declares '", name, "'");
  MT_CHECK(parts >= 1, "declare_parameter: '", name, "': parts (", parts, ") must be >= 1");
  if (spec.is_partitioned()) {
    MT_CHECK(spec.dim < static_cast<int>(global_sizes.size()), "declare_parameter: '", name,
             "': the spec cuts dim ", spec.dim, " of sizes ", global_sizes);
    MT_CHECK(spec.global_size % parts == 0, "declare_parameter: '", name, "': ", spec.global_size,
             " rows do not split over ", parts, " ranks");
  }
  auto local_sizes = global_sizes;
  if (spec.is_partitioned()) {
    local_sizes[spec.dim] = spec.global_size / parts;
  }
  torch::NoGradGuard no_grad;
  torch::Tensor value;
  if (DeferredInit::active()) {
    rule.seed = DeferredInit::seed();
    value = deferred_placeholder(local_sizes, torch::kFloat);
    deferred_.insert(name);
  } else if (rule.kind == InitRule::Kind::kNormal) {
    // The eager draw: the whole unpadded tensor from the default generator, then this part.
    value = torch::empty(global_sizes).normal_(0.0, rule.std);
    if (spec.is_partitioned()) {
      const int64_t piece = spec.block_size() / parts;
      value = cut_shard(pad_dim(value, spec.dim, spec.global_size), spec.dim,
                        static_cast<int>(spec.offset / piece), parts, spec.blocks);
    }
  } else {
    value =
        rule.kind == InitRule::Kind::kOnes ? torch::ones(local_sizes) : torch::zeros(local_sizes);
  }
  init_rules_[name] = rule;
  set_shard_spec(name, spec);
  return self.register_parameter(name, value);
}

std::vector<DeferredParameter> deferred_parameters(const torch::nn::Module& root) {
  std::map<const void*, DeferredParameter> by_impl;
  // The root by reference: a model's constructor calls this before a shared_ptr holds it.
  std::vector<const torch::nn::Module*> modules{&root};
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    modules.push_back(item.value().get());
  }
  for (const auto* module : modules) {
    auto* owner = dynamic_cast<ShardedModule*>(const_cast<torch::nn::Module*>(module));
    if (owner == nullptr) {
      continue;
    }
    for (const auto& own : module->named_parameters(/*recurse=*/false)) {
      if (!owner->is_deferred(own.key())) {
        continue;
      }
      DeferredParameter p;
      p.param = own.value();
      p.rule = owner->init_rules().at(own.key());
      const auto spec = owner->shard_specs().find(own.key());
      p.spec = spec == owner->shard_specs().end() ? ShardSpec::replicated() : spec->second;
      p.owner = owner;
      p.local_name = own.key();
      by_impl.emplace(own.value().unsafeGetTensorImpl(), std::move(p));
    }
  }
  std::vector<DeferredParameter> out;
  std::set<const void*> seen;
  for (const auto& item : root.named_parameters()) {
    const void* impl = item.value().unsafeGetTensorImpl();
    auto it = by_impl.find(impl);
    if (it != by_impl.end() && seen.insert(impl).second) {
      it->second.name = item.key();
      out.push_back(it->second);
    }
  }
  return out;
}

void materialize(DeferredParameter& p, uint64_t seed, const torch::Tensor& whole) {
  torch::NoGradGuard no_grad;
  auto value = torch::empty(p.param.sizes(), p.param.options().requires_grad(false));
  fill_deferred(p, value.view({-1}), 0, seed, whole);
  p.param.set_data(value);
  p.owner->mark_materialized(p.local_name);
}

void materialize_all(torch::nn::Module& root) {
  for (auto& p : deferred_parameters(root)) {
    materialize(p, p.rule.seed);
  }
}

ModelDeclaration::ModelDeclaration() {
  if (!DeferredInit::active()) {
    own_.emplace(at::detail::getDefaultCPUGenerator().current_seed());
  }
}

void ModelDeclaration::finish(torch::nn::Module& model) {
  if (own_) {
    own_.reset();
    materialize_all(model);
  }
}

uint64_t agree_init_seed(const std::vector<DeferredParameter>& params,
                         const CommunicatorPtr& world) {
  uint64_t seed = params.empty() ? 0 : params.front().rule.seed;
  for (const auto& p : params) {
    MT_CHECK(p.rule.seed == seed, "sharded start-up: '", params.front().name,
             "' was declared under seed ", seed, " and '", p.name, "' under seed ", p.rule.seed,
             "; declare a model inside one DeferredInit scope");
  }
  auto value = torch::tensor({static_cast<int64_t>(seed)}, torch::kLong);
  world->broadcast(value, /*root=*/0);
  return static_cast<uint64_t>(value.item<int64_t>());
}

void ReplicaHashes::add(const std::string& name, const torch::Tensor& value, bool tp_replicated) {
  const auto bytes = value.detach().contiguous();
  entries_.push_back(
      Entry{name, fnv1a64(bytes.data_ptr(), bytes.numel() * bytes.element_size()), tp_replicated});
}

void ReplicaHashes::check(const Mesh& mesh, const std::string& when) const {
  const auto& world = mesh.group("world");
  // Every rank runs every collective below, mismatch or not (a rank that threw early would
  // leave its partners of the next group waiting); the first mismatch any rank found is then
  // everyone's error.
  std::string error;
  for (const char* dim : {"dp_cp", "tp"}) {
    const auto& group = mesh.group(dim);
    if (group->size() == 1) {
      continue;
    }
    std::vector<const Entry*> compared;
    for (const auto& e : entries_) {
      if (std::string(dim) != "tp" || e.tp_replicated) {
        compared.push_back(&e);
      }
    }
    const auto n = static_cast<int64_t>(compared.size());
    auto counts = torch::tensor({n}, torch::kLong);
    auto all_counts = torch::empty({group->size()}, torch::kLong);
    group->all_gather(counts, all_counts);
    bool same_count = true;
    for (int r = 0; r < group->size() && same_count; ++r) {
      same_count = all_counts[r].item<int64_t>() == n;
      if (!same_count && error.empty()) {
        error = "replica check " + when + ": the " + dim + " ranks hold different numbers of " +
                "parameters (" + std::to_string(n) + " on " + dim + " rank " +
                std::to_string(group->rank()) + ", " +
                std::to_string(all_counts[r].item<int64_t>()) + " on " + dim + " rank " +
                std::to_string(r) + "): the model differs between them";
      }
    }
    if (!same_count) {
      continue; // the whole group saw it: none of its ranks gathers the hashes
    }
    // Per rank: its world rank, then its hashes.
    auto mine = torch::empty({n + 1}, torch::kLong);
    auto* m = mine.data_ptr<int64_t>();
    m[0] = world->rank();
    for (int64_t i = 0; i < n; ++i) {
      m[i + 1] = static_cast<int64_t>(compared[i]->hash);
    }
    auto all = torch::empty({group->size() * (n + 1)}, torch::kLong);
    group->all_gather(mine, all);
    const auto* h = all.data_ptr<int64_t>();
    for (int64_t i = 0; i < n && error.empty(); ++i) {
      for (int r = 1; r < group->size() && error.empty(); ++r) {
        if (h[r * (n + 1) + i + 1] != h[i + 1]) {
          error = "replica check " + when + ": parameter '" + compared[i]->name +
                  "' differs between ranks " + std::to_string(h[0]) + " and " +
                  std::to_string(h[r * (n + 1)]) + " (" + dim + " ranks 0 and " +
                  std::to_string(r) +
                  ", which must hold the same copy): a per-rank seed or init, or a gradient "
                  "reduced on some ranks only";
        }
      }
    }
  }
  // The lowest rank with an error tells everyone (its message, at most 1 KiB).
  auto first = torch::tensor({error.empty() ? int64_t{world->size()} : int64_t{world->rank()}},
                             torch::kLong);
  world->all_reduce(first, ReduceOp::kMin);
  const auto reporter = static_cast<int>(first.item<int64_t>());
  if (reporter == world->size()) {
    return;
  }
  auto text = torch::zeros({1024}, torch::kByte);
  if (world->rank() == reporter) {
    std::memcpy(text.data_ptr(), error.data(), std::min<size_t>(error.size(), 1023));
  }
  world->broadcast(text, reporter);
  MT_CHECK(false, std::string(static_cast<const char*>(text.data_ptr())));
}

void check_replicas(const torch::nn::Module& model, const Mesh& mesh, const std::string& when) {
  ReplicaHashes hashes;
  const auto params = model.named_parameters();
  for (const auto& [name, spec] : named_shard_specs(model)) {
    const auto& value = params[name];
    if (!is_deferred_placeholder(value)) {
      hashes.add(name, value, !spec.is_partitioned() || spec.group != "tp");
    }
  }
  hashes.check(mesh, when);
}

} // namespace meshtrain
