// defines: DeferredInit, deferred_placeholder, is_deferred_placeholder, initial_value,
// fill_initial_values, DeferredParameter, deferred_parameters, materialize, materialize_all,
// ReplicaHashes — sharded start-up (DESIGN §3 "Sharded start-up and init invariance",
// "Replicas agree").
//
// Declaring. Inside a DeferredInit scope the layers of parallel/ (and a model's own
// parameters, ShardedModule::declare_parameter) register each parameter as a placeholder:
// its local sizes and dtype, one element of storage (stride 0 in every dim, NaN: a model run
// before it is laid out computes NaN, never plausible numbers), and an InitRule. parallelize
// cuts the placeholders to this rank's part (pipeline stage, tensor-parallel shard) without
// allocating them, and only then gives values to what the rank keeps: the whole parameter,
// or under ZeRO-3 only this rank's range of each block's flat buffer.
//
// Values. Element e of a parameter's whole (unpadded, serial) tensor, e its row-major index,
// is a pure function of (seed, parameter name, e):
//   normal(std): pair = e / 2; (x0, x1, x2, x3) = Philox4x32-10(counter = (pair lo, pair hi,
//                FNV-1a(name) lo, hi), key = (seed lo, seed hi)); u1 = (x0 + 0.5) 2^-32,
//                u2 = x1 2^-32; r = sqrt(-2 ln u1); value = std r cos(2 pi u2) for even e,
//                std r sin(2 pi u2) for odd e (Box-Muller; computed in double, rounded to fp32)
//   zeros, ones: 0, 1.   Vocabulary padding rows: 0.
// So any layout and rank count starts from the serial values bit for bit, and no rank draws
// another rank's part. The draw is N(0, std) like torch's normal_, but other numbers than a
// sequential generator's stream: a model declared outside a scope (eager) still draws from
// torch's default generator (see ShardedModule::declare_parameter).
//
// Replicas. Copies of a parameter (every dp x cp rank holds the same local parameters; the
// ranks of a tp group hold the same tp-replicated ones) are compared by hash: ReplicaHashes
// collects (name, FNV-1a of the bytes) and check() all-gathers them over the groups and
// throws naming the first parameter and two ranks that differ.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/core/mesh.h"
#include "meshtrain/core/safetensors.h"
#include "meshtrain/parallel/sharding.h"

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace meshtrain {

// The scope in which models are declared without storage (see above). Scopes nest; the
// innermost seed is the one rules record. Thread-local.
class DeferredInit {
public:
  explicit DeferredInit(uint64_t seed);
  ~DeferredInit();
  DeferredInit(const DeferredInit&) = delete;
  DeferredInit& operator=(const DeferredInit&) = delete;

  static bool active();
  static uint64_t seed(); // the innermost scope's; 0 outside every scope

private:
  bool previous_active_;
  uint64_t previous_seed_;
};

// A parameter without storage: `sizes`, `dtype`, one NaN element (all strides 0).
torch::Tensor deferred_placeholder(torch::IntArrayRef sizes, torch::Dtype dtype);
// True for what deferred_placeholder made (more than one element over one of storage).
bool is_deferred_placeholder(const torch::Tensor& t);

// The initial value of element `global_index` of the whole (unpadded) parameter `name`.
float initial_value(const InitRule& rule, uint64_t seed, const std::string& name,
                    int64_t global_index);

// Writes elements [first, first + out.numel()) of a parameter's local tensor (row-major,
// `local_sizes`; `spec` says where it sits in the whole tensor) into `out` (1-D, contiguous,
// any floating dtype; values made in fp32 and rounded to out's dtype).
void fill_initial_values(torch::Tensor out, int64_t first, torch::IntArrayRef local_sizes,
                         const std::string& name, const InitRule& rule, const ShardSpec& spec,
                         uint64_t seed);

// A parameter of a model still waiting for its values.
struct DeferredParameter {
  std::string name;    // its full name in the model (named_parameters())
  torch::Tensor param; // the placeholder, registered in the model
  InitRule rule;
  ShardSpec spec;
  ShardedModule* owner = nullptr;
  std::string local_name;
};

// The deferred parameters of `root` in named_parameters() order (a parameter reached twice,
// tied, once).
std::vector<DeferredParameter> deferred_parameters(const torch::nn::Module& root);

// The same elements read from `whole`, the parameter's whole unpadded tensor (any dtype; a
// mapped file's view: only these elements are touched); padding rows 0.
void fill_from_whole(torch::Tensor out, int64_t first, torch::IntArrayRef local_sizes,
                     const ShardSpec& spec, const torch::Tensor& whole);

// The sizes of p's whole unpadded tensor (what a file holds for it).
std::vector<int64_t> whole_sizes(const DeferredParameter& p);

// Elements [first, first + out.numel()) of p's local part: from `whole` when it is defined,
// else by p's rule under `seed`.
void fill_deferred(const DeferredParameter& p, const torch::Tensor& out, int64_t first,
                   uint64_t seed, const torch::Tensor& whole = {});

// Gives `p` its values (this rank's whole local part, in the placeholder's dtype; see
// fill_deferred), and marks it materialised.
void materialize(DeferredParameter& p, uint64_t seed, const torch::Tensor& whole = {});

// Throws naming `source` unless `weights` holds every (name, whole unpadded sizes) of `wanted`
// with those sizes and nothing else ("lm_head.weight" is allowed beside a model without one:
// a tied head, as Hugging Face and nanoGPT files may carry it). Reads no tensor data.
using WholeShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;
void check_whole_weights(const WholeShapes& wanted, const NamedTensors& weights,
                         const std::string& source);

// Every deferred parameter of `root` under its rule's own seed: what a model built outside
// parallelize (e.g. for one process) does at the end of its constructor.
void materialize_all(torch::nn::Module& root);

// What a model's constructor opens first and finishes last: it declares under the caller's
// DeferredInit scope when there is one (parallelize gives the values), else under a scope of
// its own, seeded with torch's default generator's seed (torch::manual_seed), and finish()
// then gives every parameter its values. So `torch::manual_seed(s); GPT model(config);`
// holds the values a DeferredInit(s) declaration laid out on any layout starts from.
class ModelDeclaration {
public:
  ModelDeclaration();
  void finish(torch::nn::Module& model);

private:
  std::optional<DeferredInit> own_;
};

// The seed every rank uses: rank 0's (collective over `world`). Throws naming two parameters
// when the local rules were declared under different seeds.
uint64_t agree_init_seed(const std::vector<DeferredParameter>& params,
                         const CommunicatorPtr& world);

// Hashes of replicated parameters, compared across the ranks that hold copies (see above).
class ReplicaHashes {
public:
  // `tp_replicated`: the ranks of this rank's tp group hold the same tensor too.
  void add(const std::string& name, const torch::Tensor& value, bool tp_replicated);
  // Collective over mesh.group("dp_cp") and mesh.group("tp") (every rank calls it with the
  // same names in the same order per group). Throws "parameter 'N' differs between ranks A
  // and B ..." naming `when` (at start-up, at the checkpoint of step S).
  void check(const Mesh& mesh, const std::string& when) const;

private:
  struct Entry {
    std::string name;
    uint64_t hash;
    bool tp_replicated;
  };
  std::vector<Entry> entries_;
};

// Every local parameter of `model` with values (whole: under ZeRO-3 gather first; deferred
// placeholders are skipped) into a ReplicaHashes and checked: start-up and checkpoints call it.
void check_replicas(const torch::nn::Module& model, const Mesh& mesh, const std::string& when);

} // namespace meshtrain
