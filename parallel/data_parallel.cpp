// defines: DataParallelReducer, NoSyncGuard, assign_buckets, global_mean_loss,
// global_token_count (see data_parallel.h for the design).
#include "meshtrain/parallel/data_parallel.h"

#include "meshtrain/core/errors.h"

#include <sstream>

namespace meshtrain {
NoSyncGuard::NoSyncGuard(NoSyncGuard&& other) noexcept : reducer_(other.reducer_) {
  other.reducer_ = nullptr;
}

NoSyncGuard::~NoSyncGuard() {
  if (reducer_ != nullptr) {
    reducer_->end_no_sync();
  }
}

DataParallelReducer::DataParallelReducer(const torch::nn::Module& model, const Mesh& mesh,
                                         BucketLayoutPtr layout, DataParallelOptions options)
    : layout_(std::move(layout)), options_(options), dp_(mesh.group("dp_cp")) {
  MT_CHECK(layout_ != nullptr, "DataParallelReducer: the bucket layout is null");
  MT_CHECK(options_.op() == ReduceOp::kSum || options_.op() == ReduceOp::kAvg,
           "DataParallelReducer: op must be sum or avg, got ", to_string(options_.op()));
  const int64_t dp = dp_->size();
  MT_CHECK(layout_->dp() == dp, "DataParallelReducer: the bucket layout is for dp ", layout_->dp(),
           ", the mesh's dp x cp group has ", dp, " ranks");
  layout_->check_model(model, "DataParallelReducer");

  const auto params = unique_trainable_parameters(model);
  const auto device = params.front().second.device();
  for (const auto& [name, p] : params) {
    MT_CHECK(p.device() == device, "DataParallelReducer: parameter '", name, "' is on ", p.device(),
             " but '", params.front().first, "' is on ", device);
  }
  grad_options_ = torch::TensorOptions().dtype(layout_->options().reduce_dtype()).device(device);

  const bool sharded = layout_->shards_gradients();
  slots_.resize(params.size());
  int64_t flat_numel = 0;
  for (const auto& layout_bucket : layout_->buckets()) {
    Bucket bucket;
    for (const auto& s : layout_bucket.slots) {
      auto& slot = slots_[s.param];
      slot.name = s.name;
      slot.param = params[s.param].second;
      slot.bucket = static_cast<int64_t>(buckets_.size());
      slot.offset = s.offset;
      slot.numel = s.numel;
      bucket.slots.push_back(static_cast<int64_t>(s.param));
    }
    bucket.padded = layout_bucket.padded;
    bucket.pending = static_cast<int64_t>(bucket.slots.size());
    flat_numel += sharded ? bucket.padded / dp : bucket.padded;
    buckets_.push_back(std::move(bucket));
  }
  // Zeros: the padding of every bucket must stay zero (it is summed with the others').
  flat_ = torch::zeros({flat_numel}, grad_options_);
  int64_t at = 0;
  for (auto& bucket : buckets_) {
    const int64_t n = sharded ? bucket.padded / dp : bucket.padded;
    (sharded ? bucket.shard : bucket.grads) = flat_.narrow(0, at, n);
    at += n;
  }

  if (options_.broadcast_parameters() && dp > 1) {
    torch::NoGradGuard no_grad;
    for (const auto& [name, p] : params) {
      auto buffer = p.is_contiguous() ? p.detach() : p.detach().contiguous();
      dp_->broadcast(buffer, /*root=*/0);
      if (!buffer.is_same(p)) {
        p.detach().copy_(buffer);
      }
    }
  }

  for (size_t i = 0; i < slots_.size(); ++i) {
    const auto index = static_cast<int64_t>(i);
    slots_[i].hook = slots_[i].param.register_hook(
        [this, index](const torch::Tensor& grad) { on_grad(index, grad); });
  }
}

DataParallelReducer::~DataParallelReducer() {
  for (auto& slot : slots_) {
    slot.param.remove_hook(slot.hook);
  }
  // Collectives still queued hold their own references to the buffers; wait anyway so no
  // rank leaves a reduction half done because this one was destroyed early.
  for (auto& bucket : buckets_) {
    if (bucket.work) {
      try {
        bucket.work->wait();
      } catch (...) { // NOLINT(bugprone-empty-catch): a destructor must not throw
      }
    }
  }
}

int64_t DataParallelReducer::bucket_numel(int64_t b) const {
  MT_CHECK(b >= 0 && b < num_buckets(), "DataParallelReducer::bucket_numel: bucket ", b,
           " is out of range [0, ", num_buckets(), ")");
  return buckets_[b].padded;
}

int64_t DataParallelReducer::grad_buffer_bytes() const {
  return flat_.numel() * static_cast<int64_t>(flat_.element_size());
}

NoSyncGuard DataParallelReducer::no_sync() {
  std::lock_guard<std::mutex> lock(mutex_);
  ++no_sync_depth_;
  return NoSyncGuard(this);
}

void DataParallelReducer::end_no_sync() {
  std::lock_guard<std::mutex> lock(mutex_);
  --no_sync_depth_;
  if (no_sync_depth_ == 0) {
    // The buckets hold the sums; autograd's copies are dead weight until the next pass.
    for (auto& slot : slots_) {
      slot.param.mutable_grad().reset();
    }
  }
}

void DataParallelReducer::ensure_staging(Bucket& bucket) {
  if (bucket.grads.defined()) {
    return;
  }
  // Zeros for the padding; the slots are overwritten by their first gradient.
  bucket.grads = torch::zeros({bucket.padded}, grad_options_);
  staging_bytes_ += bucket.grads.numel() * static_cast<int64_t>(bucket.grads.element_size());
  peak_staging_bytes_ = std::max(peak_staging_bytes_, staging_bytes_);
}

void DataParallelReducer::on_grad(int64_t index, const torch::Tensor& grad) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& slot = slots_[index];
  auto& bucket = buckets_[slot.bucket];
  // autograd stores `grad` into param.grad right after this hook. With param.grad undefined
  // it keeps autograd's tensor as is (no copy, and never adds into a bucket view handed out
  // by finish()).
  slot.param.mutable_grad().reset();
  if (phase_ == Phase::kReduced) {
    MT_CHECK(layout_->shards_gradients(), "DataParallelReducer: gradient of '", slot.name,
             "' arrived after finish() without zero_grad(): this step's gradients were already "
             "all-reduced; call zero_grad() before the next step, and wrap the accumulation "
             "micro-steps in no_sync()");
    phase_ = Phase::kAccumulating; // sharded: this pass adds another reduce-scatter
  }
  MT_CHECK(!bucket.launched, "DataParallelReducer: gradient of '", slot.name,
           "' arrived after its bucket ", slot.bucket,
           " was already issued for reduction. Either backward ran twice without finish() in "
           "between (wrap all accumulation micro-steps but the last in no_sync()), or the "
           "parameter receives gradients at several points of backward (use "
           "DataParallelOptions().overlap(false))");
  MT_CHECK(no_sync_depth_ == 0 || next_launch_ == 0,
           "DataParallelReducer: a no_sync() backward "
           "of '",
           slot.name,
           "' after a synchronising backward of the same step; only the last "
           "micro-step may run outside no_sync(), then finish()");
  ensure_staging(bucket);
  auto region = bucket.grads.narrow(0, slot.offset, slot.numel).view(grad.sizes());
  if (slot.in_buffer) {
    region.add_(grad);
  } else {
    region.copy_(grad);
    slot.in_buffer = true;
  }
  slot.seen = true;
  if (no_sync_depth_ > 0) {
    return;
  }
  if (!slot.counted) {
    slot.counted = true;
    --bucket.pending;
  }
  if (options_.overlap()) {
    launch_ready();
    poll_completed();
  }
}

void DataParallelReducer::launch_ready() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    launch(buckets_[next_launch_++]);
  }
}

void DataParallelReducer::launch(Bucket& bucket) {
  MT_ASSERT(!bucket.launched, "bucket issued twice");
  if (layout_->shards_gradients()) {
    // The first reduction of a step lands in the shard; later ones (synchronised
    // accumulation) go through a temporary that complete() adds in.
    bucket.out = bucket.shard_fresh ? bucket.shard : torch::empty_like(bucket.shard);
    bucket.shard_fresh = false;
    bucket.work = dp_->reduce_scatter_async(bucket.grads, bucket.out, options_.op());
  } else {
    bucket.work = dp_->all_reduce_async(bucket.grads, options_.op());
  }
  bucket.launched = true;
}

void DataParallelReducer::complete(Bucket& bucket) {
  if (!bucket.work) {
    return;
  }
  bucket.work->wait();
  bucket.work.reset();
  if (layout_->shards_gradients()) {
    if (!bucket.out.is_same(bucket.shard)) {
      bucket.shard.add_(bucket.out);
    }
    bucket.out = torch::Tensor();
    staging_bytes_ -= bucket.grads.numel() * static_cast<int64_t>(bucket.grads.element_size());
    bucket.grads = torch::Tensor(); // the full-size staging is not kept
  }
}

void DataParallelReducer::poll_completed() {
  if (!layout_->shards_gradients()) {
    return; // nothing to free early; finish() waits
  }
  for (size_t b = 0; b < next_launch_; ++b) {
    auto& bucket = buckets_[b];
    if (bucket.work && bucket.work->is_completed()) {
      complete(bucket);
    }
  }
}

void DataParallelReducer::wait_in_flight() {
  for (auto& bucket : buckets_) {
    complete(bucket);
  }
}

torch::Tensor DataParallelReducer::accumulated_grad(const torch::Tensor& param) {
  std::lock_guard<std::mutex> lock(mutex_);
  MT_CHECK(no_sync_depth_ == 0 && next_launch_ == 0 && phase_ == Phase::kAccumulating,
           "DataParallelReducer::accumulated_grad: only between the no_sync() passes of a step "
           "and finish()");
  for (auto& slot : slots_) {
    if (!slot.param.is_same(param)) {
      continue;
    }
    auto& bucket = buckets_[slot.bucket];
    ensure_staging(bucket);
    auto region = bucket.grads.narrow(0, slot.offset, slot.numel);
    if (!slot.in_buffer) {
      region.zero_();
      slot.in_buffer = true;
    }
    slot.seen = true;
    return region;
  }
  MT_CHECK(false, "DataParallelReducer::accumulated_grad: the parameter (sizes ", param.sizes(),
           ") is not one of the reducer's");
  return {};
}

std::vector<torch::Tensor> DataParallelReducer::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  MT_CHECK(no_sync_depth_ == 0, "DataParallelReducer::finish() called inside a no_sync() scope");
  if (phase_ == Phase::kReduced) {
    return results();
  }
  std::vector<std::string> missing;
  for (auto& slot : slots_) {
    if (!slot.seen && !options_.allow_unused()) {
      missing.push_back(slot.name);
    }
  }
  if (!missing.empty()) {
    std::ostringstream names;
    for (size_t i = 0; i < missing.size(); ++i) {
      names << (i ? ", " : "") << "'" << missing[i] << "'";
    }
    MT_CHECK(false, "DataParallelReducer::finish(): rank ", dp_->rank(), " of group '", dp_->name(),
             "': ", missing.size(),
             " parameter(s) received no gradient since "
             "zero_grad(): ",
             names.str(),
             ". Make them take part in the loss, freeze them "
             "(requires_grad false), or use DataParallelOptions().allow_unused(true) to treat "
             "their gradient as zero");
  }
  for (auto& slot : slots_) {
    if (!slot.in_buffer) {
      // Unused (allowed), or used only in earlier synchronised passes: contributes zero.
      auto& bucket = buckets_[slot.bucket];
      MT_ASSERT(!bucket.launched, "a bucket was issued with a missing gradient");
      ensure_staging(bucket);
      bucket.grads.narrow(0, slot.offset, slot.numel).zero_();
      slot.in_buffer = true;
    }
  }
  for (; next_launch_ < buckets_.size(); ++next_launch_) {
    launch(buckets_[next_launch_]);
  }
  wait_in_flight();

  for (auto& slot : slots_) {
    auto& param_grad = slot.param.mutable_grad();
    if (layout_->shards_gradients()) {
      param_grad.reset();
      slot.in_buffer = false; // the staging is gone; the next pass starts from zero
    } else {
      auto view =
          buckets_[slot.bucket].grads.narrow(0, slot.offset, slot.numel).view(slot.param.sizes());
      param_grad =
          view.scalar_type() == slot.param.scalar_type() ? view : view.to(slot.param.scalar_type());
    }
    slot.counted = false;
  }
  for (auto& bucket : buckets_) {
    bucket.pending = static_cast<int64_t>(bucket.slots.size());
    bucket.launched = false;
  }
  next_launch_ = 0;
  phase_ = Phase::kReduced;
  return results();
}

void DataParallelReducer::zero_grad() {
  std::lock_guard<std::mutex> lock(mutex_);
  wait_in_flight();
  for (auto& slot : slots_) {
    slot.in_buffer = false;
    slot.seen = false;
    slot.counted = false;
    slot.param.mutable_grad().reset();
  }
  for (auto& bucket : buckets_) {
    bucket.pending = static_cast<int64_t>(bucket.slots.size());
    bucket.launched = false;
    bucket.shard_fresh = true;
    if (layout_->shards_gradients() && bucket.grads.defined()) {
      staging_bytes_ -= bucket.grads.numel() * static_cast<int64_t>(bucket.grads.element_size());
      bucket.grads = torch::Tensor();
    }
  }
  next_launch_ = 0;
  phase_ = Phase::kAccumulating;
}

std::vector<torch::Tensor> DataParallelReducer::results() const {
  std::vector<torch::Tensor> out;
  for (const auto& bucket : buckets_) {
    out.push_back(layout_->shards_gradients() ? bucket.shard : bucket.grads);
  }
  return out;
}

torch::Tensor global_mean_loss(const torch::Tensor& token_loss_sum, int64_t global_tokens) {
  MT_CHECK(global_tokens > 0, "global_mean_loss: global_tokens must be > 0, got ", global_tokens);
  MT_CHECK(token_loss_sum.numel() == 1, "global_mean_loss: expects the summed loss (one ",
           "element), got a tensor of shape ", token_loss_sum.sizes());
  return token_loss_sum / static_cast<double>(global_tokens);
}

int64_t global_token_count(int64_t local_tokens, const Mesh& mesh) {
  MT_CHECK(local_tokens >= 0, "global_token_count: local_tokens must be >= 0, got ", local_tokens);
  auto count = torch::tensor({local_tokens}, torch::kLong);
  mesh.group("dp_cp")->all_reduce(count, ReduceOp::kSum);
  return count.item<int64_t>();
}

} // namespace meshtrain
