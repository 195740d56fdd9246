// defines: BucketLayout, assign_buckets, unique_trainable_parameters (see bucket_layout.h).
#include "meshtrain/parallel/bucket_layout.h"

#include "meshtrain/core/errors.h"

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <map>
#include <unordered_set>

namespace meshtrain {
namespace {

int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

} // namespace

std::vector<std::pair<std::string, torch::Tensor>>
unique_trainable_parameters(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::unordered_set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    const auto& p = item.value();
    // Identity of the tensor, not of its storage: two views of one buffer are two params.
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) {
      out.emplace_back(item.key(), p);
    }
  }
  return out;
}

std::vector<std::vector<int64_t>> assign_buckets(const std::vector<int64_t>& numels,
                                                 int64_t element_size, int64_t bucket_bytes) {
  MT_CHECK(bucket_bytes > 0, "assign_buckets: bucket_bytes must be > 0, got ", bucket_bytes);
  MT_CHECK(element_size > 0, "assign_buckets: element_size must be > 0, got ", element_size);
  std::vector<std::vector<int64_t>> buckets;
  int64_t bytes = 0;
  for (auto i = static_cast<int64_t>(numels.size()) - 1; i >= 0; --i) {
    const int64_t size = numels[i] * element_size;
    if (buckets.empty() || (bytes > 0 && bytes + size > bucket_bytes)) {
      buckets.emplace_back();
      bytes = 0;
    }
    buckets.back().push_back(i);
    bytes += size;
  }
  return buckets;
}

BucketLayout::BucketLayout(const torch::nn::Module& model, int dp, BucketLayoutOptions options)
    : options_(options), dp_(dp) {
  const auto dtype = options_.reduce_dtype();
  MT_CHECK(dp >= 1, "BucketLayout: dp (", dp, ") must be >= 1");
  MT_CHECK(options_.zero_stage() >= 0 && options_.zero_stage() <= 3, "BucketLayout: ZeRO stage (",
           options_.zero_stage(), ") must be 0, 1, 2 or 3");
  MT_CHECK(options_.zero_stage() == 3 || options_.units().empty(),
           "BucketLayout: units are for ZeRO stage 3; got them at stage ", options_.zero_stage());
  MT_CHECK(options_.zero_stage() != 3 || !options_.units().empty(),
           "BucketLayout: ZeRO stage 3 packs one bucket per block (the units parameters are "
           "gathered by); give BucketLayoutOptions::units");
  MT_CHECK(c10::isFloatingType(dtype), "BucketLayout: reduce_dtype must be a floating dtype ",
           "(Float, BFloat16, Half, Double), got ", dtype);
  MT_CHECK(options_.bucket_bytes() > 0, "BucketLayout: bucket_bytes must be > 0, got ",
           options_.bucket_bytes());
  const auto params = unique_trainable_parameters(model);
  MT_CHECK(!params.empty(), "BucketLayout: the model has no trainable parameters");
  for (const auto& [name, p] : params) {
    MT_CHECK(c10::isFloatingType(p.scalar_type()), "BucketLayout: parameter '", name,
             "' has dtype ", p.scalar_type(), "; only floating parameters can be trained");
    names_.push_back(name);
    numels_.push_back(p.numel());
  }
  const auto packing = options_.units().empty()
                           ? assign_buckets(numels_, static_cast<int64_t>(c10::elementSize(dtype)),
                                            options_.bucket_bytes())
                           : unit_packing(options_.units());
  for (const auto& indices : packing) {
    Bucket bucket;
    for (const int64_t i : indices) {
      bucket.slots.push_back(
          BucketSlot{names_[i], static_cast<size_t>(i), bucket.numel, numels_[i]});
      bucket.numel += numels_[i];
    }
    bucket.padded = round_up(std::max<int64_t>(bucket.numel, 1), dp_);
    numel_ += bucket.numel;
    padded_numel_ += bucket.padded;
    buckets_.push_back(std::move(bucket));
  }
}

// Bucket b holds units[b]'s parameters, in reverse registration order (as assign_buckets
// packs them). Returns indices into names_, like assign_buckets.
std::vector<std::vector<int64_t>>
BucketLayout::unit_packing(const std::vector<std::vector<std::string>>& units) const {
  std::map<std::string, int64_t> index;
  for (size_t i = 0; i < names_.size(); ++i) {
    index.emplace(names_[i], static_cast<int64_t>(i));
  }
  std::vector<int64_t> unit_of(names_.size(), -1);
  for (size_t u = 0; u < units.size(); ++u) {
    MT_CHECK(!units[u].empty(), "BucketLayout: unit ", u, " has no parameters");
    for (const auto& name : units[u]) {
      const auto it = index.find(name);
      MT_CHECK(it != index.end(), "BucketLayout: unit ", u, " names '", name,
               "', which is not a trainable parameter of the model (a tied weight counts under "
               "its first name)");
      MT_CHECK(unit_of[it->second] < 0, "BucketLayout: '", name, "' is in units ",
               unit_of[it->second], " and ", u, "; every parameter belongs to one unit");
      unit_of[it->second] = static_cast<int64_t>(u);
    }
  }
  for (size_t i = 0; i < names_.size(); ++i) {
    MT_CHECK(unit_of[i] >= 0, "BucketLayout: parameter '", names_[i], "' is in no unit");
  }
  std::vector<std::vector<int64_t>> packing(units.size());
  for (auto i = static_cast<int64_t>(names_.size()) - 1; i >= 0; --i) {
    packing[unit_of[i]].push_back(i);
  }
  return packing;
}

int64_t BucketLayout::owned_size(int64_t b) const {
  MT_CHECK(b >= 0 && b < num_buckets(), "BucketLayout: bucket ", b, " is out of range [0, ",
           num_buckets(), ")");
  return shards_optimizer_state() ? buckets_[b].padded / dp_ : buckets_[b].padded;
}

int64_t BucketLayout::owned_begin(int64_t b, int rank) const {
  MT_CHECK(rank >= 0 && rank < dp_, "BucketLayout: dp rank ", rank, " is out of range [0, ", dp_,
           ")");
  return shards_optimizer_state() ? rank * owned_size(b) : 0;
}

void BucketLayout::check_model(const torch::nn::Module& model, const char* who) const {
  const auto params = unique_trainable_parameters(model);
  MT_CHECK(params.size() == names_.size(), who, ": the model has ", params.size(),
           " trainable parameters, the bucket layout was built for ", names_.size(),
           "; build the layout from this model");
  for (size_t i = 0; i < params.size(); ++i) {
    MT_CHECK(params[i].first == names_[i] && params[i].second.numel() == numels_[i], who,
             ": trainable parameter ", i, " is '", params[i].first, "' (", params[i].second.numel(),
             " elements), the bucket layout has '", names_[i], "' (", numels_[i],
             " elements); build the layout from this model");
  }
}

} // namespace meshtrain
