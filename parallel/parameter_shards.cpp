// defines: ParameterShards, GatheredParameters, full_sharding_units (see parameter_shards.h).
#include "meshtrain/parallel/parameter_shards.h"

#include "meshtrain/core/errors.h"

#include <c10/core/Allocator.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <map>
#include <sstream>
#include <unordered_map>

namespace meshtrain {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A gathered buffer's memory comes and goes while the tensor stays: the parameters are views
// of it and autograd keeps views of them, so the buffer is emptied in place (FSDP resizes the
// storage to 0 the same way) and refilled before the next use.
void free_storage(const torch::Tensor& t) {
  c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(c10::DataPtr(nullptr, t.device()));
  storage->set_nbytes(0);
}

void allocate_storage(const torch::Tensor& t) {
  c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  const auto nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  c10::Allocator* allocator =
      storage->allocator() != nullptr ? storage->allocator() : c10::GetAllocator(t.device().type());
  storage->set_data_ptr_noswap(allocator->allocate(nbytes));
  storage->set_nbytes(nbytes);
}

const char* phase_name(int64_t phase) {
  return phase == 0 ? "forward" : "backward";
}

} // namespace

// Identity in forward; its backward runs when the block output's gradient is complete, just
// before the block's own backward: the moment to gather the block's parameters again.
class PreBackwardGather : public torch::autograd::Function<PreBackwardGather> {
public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, int64_t shards,
                               int64_t block) {
    ctx->saved_data["shards"] = shards;
    ctx->saved_data["block"] = block;
    return x;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* shards = reinterpret_cast<ParameterShards*>(ctx->saved_data["shards"].toInt());
    shards->before_backward(ctx->saved_data["block"].toInt());
    return {grads[0], torch::Tensor(), torch::Tensor()};
  }
};

std::vector<std::vector<std::string>>
full_sharding_units(const torch::nn::Module& model,
                    const std::vector<std::shared_ptr<torch::nn::Module>>& blocks) {
  const auto params = unique_trainable_parameters(model);
  std::unordered_map<const void*, std::string> name_of;
  for (const auto& [name, p] : params) {
    name_of.emplace(p.unsafeGetTensorImpl(), name);
  }
  std::unordered_map<const void*, size_t> block_of;
  std::vector<std::vector<std::string>> units;
  for (size_t i = 0; i < blocks.size(); ++i) {
    std::vector<std::string> names;
    for (const auto& p : blocks[i]->parameters()) {
      const auto it = name_of.find(p.unsafeGetTensorImpl());
      if (!p.requires_grad() || it == name_of.end()) {
        continue;
      }
      const auto [owner, fresh] = block_of.emplace(p.unsafeGetTensorImpl(), i);
      MT_CHECK(fresh, "ZeRO-3: parameter '", it->second, "' is in blocks ", owner->second, " and ",
               i, "; each block is gathered on its own, so blocks cannot share parameters");
      names.push_back(it->second);
    }
    MT_CHECK(!names.empty(), "ZeRO-3: block ", i,
             " has no trainable parameters; ZeRO-3 gathers "
             "parameters a block at a time (merge it into a neighbour or freeze nothing there)");
    units.push_back(std::move(names));
  }
  std::reverse(units.begin(), units.end()); // bucket order: the last block's gradients come first
  std::vector<std::string> root;
  for (const auto& [name, p] : params) {
    if (block_of.count(p.unsafeGetTensorImpl()) == 0) {
      root.push_back(name);
    }
  }
  if (!root.empty()) {
    units.push_back(std::move(root));
  }
  return units;
}

ParameterShards::ParameterShards(const torch::nn::Module& model,
                                 const std::vector<std::shared_ptr<torch::nn::Module>>& blocks,
                                 const Mesh& mesh, BucketLayoutPtr layout,
                                 ParameterShardsOptions options)
    : layout_(std::move(layout)), options_(options), dp_(mesh.group("dp_cp")),
      num_blocks_(static_cast<int64_t>(blocks.size())) {
  MT_CHECK(layout_ != nullptr && layout_->shards_parameters(),
           "ParameterShards: needs a ZeRO stage 3 bucket layout");
  MT_CHECK(layout_->dp() == dp_->size(), "ParameterShards: the bucket layout is for dp ",
           layout_->dp(), ", the mesh's dp x cp group has ", dp_->size(), " ranks");
  MT_CHECK(options_.prefetch() >= 0, "ParameterShards: prefetch (", options_.prefetch(),
           ") must be >= 0");
  layout_->check_model(model, "ParameterShards");
  MT_CHECK(layout_->options().units() == full_sharding_units(model, blocks),
           "ParameterShards: the bucket layout's units are not full_sharding_units(model, blocks)");
  const auto params = unique_trainable_parameters(model);
  std::vector<std::string> block_names(blocks.size());
  for (const auto& item : model.named_children()) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      for (const auto& sub : item.value()->named_modules(item.key())) {
        if (sub.value().get() == blocks[i].get()) {
          block_names[i] = sub.key();
        }
      }
    }
  }

  torch::NoGradGuard no_grad;
  const int rank = dp_->rank();
  units_.resize(layout_->num_buckets());
  for (int64_t b = 0; b < layout_->num_buckets(); ++b) {
    const bool is_block = b < num_blocks_;
    const int64_t index = is_block ? num_blocks_ - 1 - b : num_blocks_;
    Unit& unit = units_[index];
    unit.bucket = b;
    unit.is_block = is_block;
    unit.name = is_block ? "block " + std::to_string(index) +
                               (block_names[index].empty() ? "" : " (" + block_names[index] + ")")
                         : "the parameters outside the blocks (embedding, head)";
    const auto& bucket = layout_->buckets()[b];
    const auto& first = params[bucket.slots.front().param].second;
    unit.full = torch::zeros({bucket.padded}, first.options().requires_grad(false));
    const int64_t owned_begin = layout_->owned_begin(b, rank);
    const int64_t owned_end = owned_begin + layout_->owned_size(b);
    for (const auto& slot : bucket.slots) {
      const auto& p = params[slot.param].second;
      MT_CHECK(p.scalar_type() == first.scalar_type() && p.device() == first.device(),
               "ParameterShards: ", unit.name, " mixes dtypes or devices ('", slot.name, "' is ",
               p.scalar_type(), " on ", p.device(), "); use one per block");
      auto view = unit.full.narrow(0, slot.offset, slot.numel).view(p.sizes());
      // The part of the parameter inside this rank's shard: [lo, hi) of the bucket.
      const int64_t lo = std::clamp(slot.offset, owned_begin, owned_end);
      const int64_t hi = std::clamp(slot.offset + slot.numel, owned_begin, owned_end);
      if (!options_.fill() ||
          !options_.fill()(slot.name, unit.full.narrow(0, lo, hi - lo), lo - slot.offset)) {
        view.copy_(p.detach());
      }
      p.set_data(view);
      unit.params.push_back(p);
    }
    unit.shard = unit.full.narrow(0, owned_begin, owned_end - owned_begin).clone();
    expect_gradients(unit);
    free_storage(unit.full);
    unit.state = State::kFreed;
  }
  options_.fill(nullptr); // used at construction only; it may refer to the caller's state
  if (units_.size() > static_cast<size_t>(num_blocks_)) {
    root_ = num_blocks_;
  }
  for (size_t u = 0; u < units_.size(); ++u) {
    for (size_t k = 0; k < units_[u].params.size(); ++k) {
      auto& p = units_[u].params[k];
      const unsigned handle =
          p.register_hook([this, u, k](const torch::Tensor&) { on_gradient(u, k); });
      hooks_.emplace_back(p, handle);
    }
  }
}

ParameterShards::~ParameterShards() {
  for (auto& [param, handle] : hooks_) {
    param.remove_hook(handle);
  }
  for (auto& unit : units_) {
    if (unit.work) {
      try {
        unit.work->wait();
      } catch (...) { // NOLINT(bugprone-empty-catch): a destructor must not throw
      }
    }
  }
}

ParameterShards::Unit& ParameterShards::unit_of_block(int64_t block) {
  MT_CHECK(block >= 0 && block < num_blocks_, "ParameterShards: block ", block,
           " is out of range [0, ", num_blocks_, ")");
  return units_[block];
}

const torch::Tensor& ParameterShards::shard(int64_t bucket) const {
  MT_CHECK(bucket >= 0 && bucket < layout_->num_buckets(), "ParameterShards: bucket ", bucket,
           " is out of range [0, ", layout_->num_buckets(), ")");
  const int64_t index = bucket < num_blocks_ ? num_blocks_ - 1 - bucket : num_blocks_;
  return units_[index].shard;
}

int64_t ParameterShards::shard_bytes() const {
  int64_t bytes = 0;
  for (const auto& unit : units_) {
    bytes += unit.shard.numel() * static_cast<int64_t>(unit.shard.element_size());
  }
  return bytes;
}

int64_t ParameterShards::max_block_bytes() const {
  int64_t bytes = 0;
  for (int64_t i = 0; i < num_blocks_; ++i) {
    const auto& full = units_[i].full;
    bytes = std::max(bytes, full.numel() * static_cast<int64_t>(full.element_size()));
  }
  return bytes;
}

// Every rank says which unit it is about to run; all must say the same.
void ParameterShards::agree_on_use(Unit& unit, Phase phase) {
  const int64_t index = &unit - units_.data();
  const auto mine =
      torch::tensor({index, static_cast<int64_t>(phase), unit.uses[phase]}, torch::kLong);
  unit.uses[phase] += 1;
  auto all = torch::empty({3 * dp_->size()}, torch::kLong);
  dp_->all_gather(mine, all);
  const auto* v = all.data_ptr<int64_t>();
  bool same = true;
  for (int r = 1; r < dp_->size(); ++r) {
    same = same && std::equal(v, v + 3, v + 3 * r);
  }
  if (same) {
    return;
  }
  // Group the ranks by what they run: "block 1 ... (forward, time 3) on ranks 0, 2".
  std::map<std::vector<int64_t>, std::vector<int>> groups;
  for (int r = 0; r < dp_->size(); ++r) {
    groups[{v[3 * r], v[3 * r + 1], v[3 * r + 2]}].push_back(r);
  }
  std::ostringstream text;
  for (const auto& [what, ranks] : groups) {
    text << (text.tellp() > 0 ? "; " : "") << units_.at(what[0]).name << " (" << phase_name(what[1])
         << ", use " << what[2] + 1 << ") on rank" << (ranks.size() > 1 ? "s" : "");
    for (size_t i = 0; i < ranks.size(); ++i) {
      text << (i == 0 ? " " : ", ") << ranks[i];
    }
  }
  MT_CHECK(false, "ZeRO-3: the ", dp_->name(),
           " ranks are about to run different parts of the "
           "model: ",
           text.str(),
           ". Every rank must run every block the same number of times in "
           "the same order (its parameters are gathered from all of them); a block skipped or "
           "repeated on some ranks would gather the wrong parameters or wait forever");
}

void ParameterShards::issue_gather(Unit& unit) {
  if (unit.state != State::kFreed) {
    return;
  }
  allocate_storage(unit.full);
  unit.work = dp_->all_gather_async(unit.shard, unit.full);
  unit.state = State::kGathering;
  if (unit.is_block) {
    gathered_blocks_ += 1;
    peak_gathered_blocks_ = std::max(peak_gathered_blocks_, gathered_blocks_);
  }
}

void ParameterShards::wait_gathered(Unit& unit) {
  issue_gather(unit);
  if (unit.state == State::kGathering) {
    unit.work->wait();
    unit.work.reset();
    unit.state = State::kGathered;
  }
}

void ParameterShards::release(Unit& unit) {
  if (unit.state == State::kFreed) {
    return;
  }
  if (unit.work) {
    unit.work->wait();
    unit.work.reset();
  }
  free_storage(unit.full);
  unit.state = State::kFreed;
  if (unit.is_block) {
    gathered_blocks_ -= 1;
  }
}

// Issues the gathers of the `prefetch` units after `from` in the direction `step` (+1: the
// forward order, the root after the last block; -1: the backward order, blocks only).
void ParameterShards::prefetch_blocks(int64_t from, int64_t step) {
  for (int64_t j = 0; j < options_.prefetch(); ++j) {
    const int64_t index = from + step * j;
    if (index < 0 || index > num_blocks_ || (index == num_blocks_ && (step < 0 || root_ < 0))) {
      return;
    }
    issue_gather(units_[index]);
  }
}

torch::Tensor ParameterShards::run_block(int64_t block, const BlockFn& fn, const torch::Tensor& x) {
  Unit& unit = unit_of_block(block);
  agree_on_use(unit, kForward);
  wait_gathered(unit);
  prefetch_blocks(block + 1, +1);
  auto y = fn(x);
  const bool backward_follows = torch::GradMode::is_enabled() && y.requires_grad();
  if (!backward_follows || options_.reshard_after_forward()) {
    release(unit);
  }
  if (backward_follows) {
    expect_gradients(unit);
    y = PreBackwardGather::apply(y, reinterpret_cast<int64_t>(this), block);
  }
  return y;
}

torch::Tensor ParameterShards::run_embedding(const RootFn& fn) {
  Unit* unit = root();
  if (unit == nullptr) {
    prefetch_blocks(0, +1);
    return fn();
  }
  agree_on_use(*unit, kForward);
  wait_gathered(*unit);
  prefetch_blocks(0, +1);
  auto y = fn();
  const bool backward_follows = torch::GradMode::is_enabled() && y.requires_grad();
  if (backward_follows) {
    expect_gradients(*unit);
  }
  if (!backward_follows || options_.reshard_after_forward()) {
    release(*unit);
  }
  return y;
}

torch::Tensor ParameterShards::run_head(const RootFn& fn) {
  Unit* unit = root();
  if (unit == nullptr) {
    return fn();
  }
  agree_on_use(*unit, kForward);
  wait_gathered(*unit);
  auto y = fn();
  // With gradients the head's backward comes next: kept until the root's gradients are in.
  if (!torch::GradMode::is_enabled() || !y.requires_grad()) {
    release(*unit);
  }
  return y;
}

void ParameterShards::ensure_gathered(int64_t block) {
  wait_gathered(unit_of_block(block));
}

void ParameterShards::before_backward(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  Unit& unit = unit_of_block(block);
  agree_on_use(unit, kBackward);
  wait_gathered(unit);
  prefetch_blocks(block - 1, -1);
}

// A gradient of one of unit u's parameters is ready (autograd stores it next). When the unit
// has all of them no node of this backward reads its parameters any more: free them. The
// reducer has copied each gradient into its bucket, so autograd's own copies of the previous
// finished unit are dropped too (this unit's last one is stored only after this hook).
void ParameterShards::on_gradient(size_t u, size_t param) {
  std::lock_guard<std::mutex> lock(mutex_);
  Unit& unit = units_[u];
  if (unit.arrived[param]) {
    return; // a second use of the parameter in this backward (a nested, recomputed one)
  }
  unit.arrived[param] = true;
  unit.pending -= 1;
  if (unit.pending > 0) {
    return;
  }
  release(unit);
  if (last_done_ >= 0) {
    for (auto& p : units_[last_done_].params) {
      p.mutable_grad().reset();
    }
  }
  last_done_ = static_cast<int64_t>(u);
}

void ParameterShards::gather_all() {
  for (auto& unit : units_) {
    issue_gather(unit);
  }
  for (auto& unit : units_) {
    wait_gathered(unit);
  }
}

void ParameterShards::release_all() {
  for (auto& unit : units_) {
    release(unit);
    expect_gradients(unit);
  }
  last_done_ = -1;
}

// A forward with gradients is about to use the unit: its backward delivers every gradient
// anew.
void ParameterShards::expect_gradients(Unit& unit) {
  unit.pending = static_cast<int64_t>(unit.params.size());
  unit.arrived.assign(unit.params.size(), false);
}

GatheredParameters::GatheredParameters(ParameterShards* shards) : shards_(shards) {
  if (shards_ != nullptr) {
    shards_->gather_all();
  }
}

GatheredParameters::~GatheredParameters() {
  if (shards_ != nullptr) {
    shards_->release_all();
  }
}

} // namespace meshtrain
