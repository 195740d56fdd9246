// defines: ShardSpec and ShardedModule — how each parameter is laid out over the mesh.
// Clipping, checkpoints, resharding and export read this instead of guessing from shapes.
//
// A parameter without a spec is replicated over the tensor-parallel group.
#pragma once

#include <torch/torch.h>

#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

struct ShardSpec {
  int dim = -1;              // dimension cut over `group`; -1: replicated over `group`
  std::string group = "tp";  // mesh dimension the parameter is cut along
  int64_t global_size = 0;   // size along `dim` of the full (padded) parameter
  int64_t offset = 0;        // where this rank's shard starts along `dim`
  int64_t unpadded_size = 0; // size along `dim` without padding (vocab padding, DESIGN §4)
  // A replicated parameter used inside a sequence-parallel region (LayerNorm, a row-parallel
  // bias): each TP rank sees a different part of the sequence, so its gradient must be
  // all-reduced over TP. The TP layers do that inside autograd
  // (copy_params_to_sequence_parallel_region), so param.grad is final after backward.
  bool sequence_parallel = false;
  // The partitioned dim is made of `blocks` equal blocks laid end to end, and each block is
  // cut over `group` on its own (c_attn's [3C, C] weight is q|k|v: blocks = 3). This rank's
  // shard is its cut of every block, concatenated in block order; `offset` is where the cut
  // starts inside each block. With blocks == 1 this is one contiguous cut. Padding
  // (unpadded_size < global_size) is only used with blocks == 1.
  int64_t blocks = 1;

  bool is_partitioned() const { return dim >= 0; }
  // Size of one block along `dim` of the full (padded) parameter.
  int64_t block_size() const { return global_size / blocks; }
  static ShardSpec replicated() { return ShardSpec{}; }
};

// How a parameter's initial values are made (DESIGN §3 "Sharded start-up and init
// invariance"; parallel/param_init.h draws them): normal(0, std), zeros or ones. `seed` is the
// DeferredInit scope's at declaration; parallelize replaces it by rank 0's.
struct InitRule {
  enum class Kind { kNormal, kZeros, kOnes };
  Kind kind = Kind::kZeros;
  double std = 0.0;
  uint64_t seed = 0;

  static InitRule normal(double std) { return InitRule{Kind::kNormal, std, 0}; }
  static InitRule zeros() { return InitRule{Kind::kZeros, 0.0, 0}; }
  static InitRule ones() { return InitRule{Kind::kOnes, 0.0, 0}; }
};

// Mixin for layers that own sharded parameters: they record a spec per local parameter
// name (as registered with register_parameter), and the init rule of every parameter they
// declare with declare_parameter.
class ShardedModule {
public:
  virtual ~ShardedModule() = default;
  const std::map<std::string, ShardSpec>& shard_specs() const { return shard_specs_; }
  const std::map<std::string, InitRule>& init_rules() const { return init_rules_; }
  // Declared inside a DeferredInit scope and not yet given values: the parameter is a
  // placeholder with its local sizes and no storage (parallel/param_init.h).
  bool is_deferred(const std::string& param_name) const { return deferred_.count(param_name) > 0; }
  void mark_materialized(const std::string& param_name) { deferred_.erase(param_name); }

protected:
  void set_shard_spec(const std::string& param_name, ShardSpec spec) {
    shard_specs_[param_name] = std::move(spec);
  }

  // Registers parameter `name` of `self` (this module): `global_sizes` are the whole
  // parameter's (dim spec.dim of size spec.unpadded_size; spec.global_size with padding),
  // `spec` says which part of it this module holds (its cut over `parts` ranks; replicated:
  // the whole). Inside a DeferredInit scope the parameter is a placeholder of the local sizes
  // with no storage, to be given values by `rule` once laid out (parallelize); outside one it
  // gets them now, drawn as the layers always did (the whole tensor from the default
  // generator, then cut; padding zero). Returns the registered tensor. The one call a
  // model's own parameter needs to be deferred and checked like the library's.
  torch::Tensor declare_parameter(torch::nn::Module& self, const std::string& name,
                                  std::vector<int64_t> global_sizes, InitRule rule,
                                  ShardSpec spec = ShardSpec::replicated(), int parts = 1);

private:
  std::map<std::string, ShardSpec> shard_specs_;
  std::map<std::string, InitRule> init_rules_;
  std::set<std::string> deferred_;
};

// Spec of every parameter of `root`, keyed by its full dotted name (as
// root.named_parameters()); parameters of modules that are not ShardedModule are replicated.
inline std::vector<std::pair<std::string, ShardSpec>>
named_shard_specs(const torch::nn::Module& root) {
  std::map<std::string, ShardSpec> by_name;
  for (const auto& item : root.named_modules()) {
    const auto* sharded = dynamic_cast<const ShardedModule*>(item.value().get());
    if (sharded == nullptr) {
      continue;
    }
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& [local, spec] : sharded->shard_specs()) {
      by_name[prefix + local] = spec;
    }
  }
  std::vector<std::pair<std::string, ShardSpec>> out;
  for (const auto& p : root.named_parameters()) {
    auto it = by_name.find(p.key());
    out.emplace_back(p.key(), it == by_name.end() ? ShardSpec::replicated() : it->second);
  }
  return out;
}

} // namespace meshtrain
