// defines: the autograd functions behind parallel/mappings.h and the dim-aware collectives
// they are made of (all-reduce, all-gather, reduce-scatter and split along any dim).
#include "meshtrain/parallel/mappings.h"

#include "meshtrain/core/errors.h"

#include <torch/custom_class.h>

#include <utility>

namespace meshtrain {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// An autograd context can only hold IValues; the communicator rides in a registered
// custom class so that the context owns it until backward has run (no raw pointers, no
// global registry of groups).
struct GroupHolder : torch::CustomClassHolder {
  explicit GroupHolder(CommunicatorPtr g) : group(std::move(g)) {}
  CommunicatorPtr group;
};
const auto kGroupHolderClass = torch::class_<GroupHolder>("meshtrain", "CommGroup");

void save_group(AutogradContext* ctx, const CommunicatorPtr& group) {
  ctx->saved_data["group"] = c10::make_intrusive<GroupHolder>(group);
}

CommunicatorPtr saved_group(AutogradContext* ctx) {
  return ctx->saved_data["group"].toCustomClass<GroupHolder>()->group;
}

void check_group(const CommunicatorPtr& group, const char* call) {
  MT_CHECK(group != nullptr, call, ": the communicator is null");
}

// Normalises `dim`; when the tensor is to be split, checks that the group size divides it.
int64_t checked_dim(const torch::Tensor& x, int64_t dim, const CommunicatorPtr& group,
                    const char* call, bool split) {
  MT_CHECK(x.defined(), call, ": undefined tensor");
  MT_CHECK(x.dim() > 0, call, ": expects a tensor with at least one dim, got a scalar");
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  MT_CHECK(d >= 0 && d < x.dim(), call, ": dim ", dim, " is out of range for a tensor of sizes ",
           x.sizes());
  MT_CHECK(!split || x.size(d) % group->size() == 0, call, ": size ", x.size(d), " of dim ", d,
           " of a tensor of sizes ", x.sizes(), " must be divisible by the size (", group->size(),
           ") of group '", group->name(), "'");
  return d;
}

// Sequence functions expect [B, T, C]; their message speaks of the sequence length.
void check_sequence(const torch::Tensor& x, const CommunicatorPtr& group, const char* call) {
  check_group(group, call);
  MT_CHECK(x.defined(), call, ": undefined tensor");
  MT_CHECK(x.dim() > kSequenceDim, call,
           ": expects [B, T, C] activations (sequence dim 1), got a tensor of sizes ", x.sizes());
  MT_CHECK(x.size(kSequenceDim) % group->size() == 0, call,
           ": under sequence parallelism the sequence length T (", x.size(kSequenceDim),
           ") must be divisible by tp (", group->size(), "); tensor sizes ", x.sizes());
}

// ---- plain collectives along a dim (no autograd) ------------------------------------------

torch::Tensor all_reduce_sum(const torch::Tensor& x, const CommunicatorPtr& group) {
  // A fresh buffer: the input may be saved by autograd or used elsewhere.
  auto out = x.clone(at::MemoryFormat::Contiguous);
  group->all_reduce(out, ReduceOp::kSum);
  return out;
}

// [.., n, ..] (n along dim) -> [.., size*n, ..]; chunk r along dim is rank r's input.
torch::Tensor all_gather_dim(const torch::Tensor& x, int64_t dim, const CommunicatorPtr& group) {
  const auto front = x.movedim(dim, 0).contiguous(); // [n, ...]
  auto sizes = front.sizes().vec();
  sizes[0] *= group->size();
  auto out = torch::empty(sizes, front.options()); // [size*n, ...]
  group->all_gather(front, out);
  return out.movedim(0, dim).contiguous();
}

// [.., size*n, ..] -> [.., n, ..]: rank r gets the sum of every rank's chunk r along dim.
torch::Tensor reduce_scatter_dim(const torch::Tensor& x, int64_t dim,
                                 const CommunicatorPtr& group) {
  const auto front = x.movedim(dim, 0).contiguous(); // [size*n, ...]
  auto sizes = front.sizes().vec();
  sizes[0] /= group->size();
  auto out = torch::empty(sizes, front.options()); // [n, ...]
  group->reduce_scatter(front, out, ReduceOp::kSum);
  return out.movedim(0, dim).contiguous();
}

// [.., size*n, ..] -> [.., n, ..]: this rank's chunk along dim, no communication.
torch::Tensor split_dim(const torch::Tensor& x, int64_t dim, const CommunicatorPtr& group) {
  const int64_t n = x.size(dim) / group->size();
  return x.narrow(dim, group->rank() * n, n).contiguous();
}

// ---- autograd functions --------------------------------------------------------------------

struct CopyToTpRegion : torch::autograd::Function<CopyToTpRegion> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const CommunicatorPtr& group) {
    save_group(ctx, group);
    return x;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_reduce_sum(grads[0], saved_group(ctx)), torch::Tensor()};
  }
};

struct ReduceFromTpRegion : torch::autograd::Function<ReduceFromTpRegion> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const CommunicatorPtr& group) {
    return all_reduce_sum(x, group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grads[0], torch::Tensor()};
  }
};

// Forward collective `Fwd`, backward collective `Bwd`, both along a dim saved in ctx.
enum class DimOp { kSplit, kGather, kReduceScatter };

torch::Tensor apply_dim_op(DimOp op, const torch::Tensor& x, int64_t dim,
                           const CommunicatorPtr& group) {
  switch (op) {
  case DimOp::kSplit:
    return split_dim(x, dim, group);
  case DimOp::kGather:
    return all_gather_dim(x, dim, group);
  case DimOp::kReduceScatter:
    return reduce_scatter_dim(x, dim, group);
  }
  MT_ASSERT(false, "unknown DimOp");
  return {};
}

template <DimOp Fwd, DimOp Bwd>
struct DimFunction : torch::autograd::Function<DimFunction<Fwd, Bwd>> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, int64_t dim,
                               const CommunicatorPtr& group) {
    save_group(ctx, group);
    ctx->saved_data["dim"] = dim;
    return apply_dim_op(Fwd, x, dim, group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t dim = ctx->saved_data["dim"].toInt();
    return {apply_dim_op(Bwd, grads[0], dim, saved_group(ctx)), torch::Tensor(), torch::Tensor()};
  }
};

using ScatterFn = DimFunction<DimOp::kSplit, DimOp::kGather>;
using GatherFn = DimFunction<DimOp::kGather, DimOp::kSplit>;
using GatherReduceScatterFn = DimFunction<DimOp::kGather, DimOp::kReduceScatter>;
using ReduceScatterGatherFn = DimFunction<DimOp::kReduceScatter, DimOp::kGather>;

struct CopyParams : torch::autograd::Function<CopyParams> {
  // A TensorList (not a std::vector) so that autograd sees each tensor as an input.
  static variable_list forward(AutogradContext* ctx, at::TensorList params,
                               const CommunicatorPtr& group) {
    save_group(ctx, group);
    return params.vec();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // One all-reduce for all of them: [sum of numels] packed in grads' order.
    std::vector<torch::Tensor> flat;
    flat.reserve(grads.size());
    for (const auto& g : grads) {
      flat.push_back(g.reshape({-1}));
    }
    auto packed = torch::cat(flat);
    saved_group(ctx)->all_reduce(packed, ReduceOp::kSum);
    variable_list out;
    out.reserve(grads.size() + 1);
    int64_t at = 0;
    for (const auto& g : grads) {
      out.push_back(packed.narrow(0, at, g.numel()).view(g.sizes()));
      at += g.numel();
    }
    out.emplace_back(); // no gradient for the group argument
    return out;
  }
};

} // namespace

torch::Tensor copy_to_tp_region(const torch::Tensor& x, const CommunicatorPtr& group) {
  check_group(group, "copy_to_tp_region");
  if (group->size() == 1) {
    return x;
  }
  return CopyToTpRegion::apply(x, group);
}

torch::Tensor reduce_from_tp_region(const torch::Tensor& x, const CommunicatorPtr& group) {
  check_group(group, "reduce_from_tp_region");
  if (group->size() == 1) {
    return x;
  }
  return ReduceFromTpRegion::apply(x, group);
}

torch::Tensor scatter_to_tp_region(const torch::Tensor& x, const CommunicatorPtr& group) {
  check_group(group, "scatter_to_tp_region");
  if (group->size() == 1) {
    return x;
  }
  const int64_t dim = checked_dim(x, -1, group, "scatter_to_tp_region", /*split=*/true);
  return ScatterFn::apply(x, dim, group);
}

torch::Tensor gather_from_tp_region(const torch::Tensor& x, const CommunicatorPtr& group) {
  check_group(group, "gather_from_tp_region");
  if (group->size() == 1) {
    return x;
  }
  const int64_t dim = checked_dim(x, -1, group, "gather_from_tp_region", /*split=*/false);
  return GatherFn::apply(x, dim, group);
}

torch::Tensor scatter_to_sequence_parallel_region(const torch::Tensor& x,
                                                  const CommunicatorPtr& group) {
  check_sequence(x, group, "scatter_to_sequence_parallel_region");
  if (group->size() == 1) {
    return x;
  }
  return ScatterFn::apply(x, kSequenceDim, group);
}

torch::Tensor gather_from_sequence_parallel_region(const torch::Tensor& x,
                                                   const CommunicatorPtr& group) {
  check_group(group, "gather_from_sequence_parallel_region");
  MT_CHECK(x.defined() && x.dim() > kSequenceDim,
           "gather_from_sequence_parallel_region: expects [B, T/tp, C] activations "
           "(sequence dim 1), got a tensor of sizes ",
           x.defined() ? x.sizes() : torch::IntArrayRef{});
  if (group->size() == 1) {
    return x;
  }
  return GatherReduceScatterFn::apply(x, kSequenceDim, group);
}

torch::Tensor reduce_scatter_to_sequence_parallel_region(const torch::Tensor& x,
                                                         const CommunicatorPtr& group) {
  check_sequence(x, group, "reduce_scatter_to_sequence_parallel_region");
  if (group->size() == 1) {
    return x;
  }
  return ReduceScatterGatherFn::apply(x, kSequenceDim, group);
}

std::vector<torch::Tensor>
copy_params_to_sequence_parallel_region(const std::vector<torch::Tensor>& params,
                                        const CommunicatorPtr& group) {
  check_group(group, "copy_params_to_sequence_parallel_region");
  for (size_t i = 0; i < params.size(); ++i) {
    MT_CHECK(params[i].defined(), "copy_params_to_sequence_parallel_region: tensor ", i,
             " is undefined");
    MT_CHECK(params[i].scalar_type() == params[0].scalar_type(),
             "copy_params_to_sequence_parallel_region: tensor ", i, " has dtype ",
             params[i].scalar_type(), ", tensor 0 has ", params[0].scalar_type(),
             "; their gradients are reduced in one buffer");
  }
  if (group->size() == 1 || params.empty()) {
    return params;
  }
  return CopyParams::apply(at::TensorList(params), group);
}

} // namespace meshtrain
