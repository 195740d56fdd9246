// defines: column_parallel_fanout (see column_parallel_fanout.h).
#include "meshtrain/parallel/column_parallel_fanout.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"

namespace meshtrain {

std::vector<torch::Tensor> column_parallel_fanout(const std::vector<ColumnParallelLinear>& layers,
                                                  const torch::Tensor& x) {
  MT_CHECK(!layers.empty(), "column_parallel_fanout: no layers");
  const auto& first = layers.front();
  MT_CHECK(!first.is_empty(), "column_parallel_fanout: layer 0 is null");
  const auto& group = first->tp_group();
  const auto& o = first->options();
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& layer = layers[i];
    MT_CHECK(!layer.is_empty(), "column_parallel_fanout: layer ", i, " is null");
    MT_CHECK(layer->tp_group() == group, "column_parallel_fanout: layer ", i,
             " is laid out over another tp group than layer 0");
    MT_CHECK(layer->options().in_features() == o.in_features(), "column_parallel_fanout: layer ", i,
             " has in_features ", layer->options().in_features(), ", layer 0 has ", o.in_features(),
             "; they read one input");
    MT_CHECK(layer->options().sequence_parallel() == o.sequence_parallel(),
             "column_parallel_fanout: layer ", i, " has sequence_parallel ",
             layer->options().sequence_parallel(), ", layer 0 has ", o.sequence_parallel());
    MT_CHECK(!layer->options().gather_output(), "column_parallel_fanout: layer ", i,
             " gathers its output; use gather_output(false)");
  }
  MT_CHECK(x.dim() >= 1 && x.size(-1) == o.in_features(),
           "column_parallel_fanout: input has sizes ", x.sizes(),
           "; its last dim must be in_features (", o.in_features(), ")");
  // [B, T, in] on every rank; the layers' gradients w.r.t. it are summed by autograd before
  // the one collective of the region's backward.
  const auto input = o.sequence_parallel() ? gather_from_sequence_parallel_region(x, group)
                                           : copy_to_tp_region(x, group);
  std::vector<torch::Tensor> out;
  out.reserve(layers.size());
  for (const auto& layer : layers) {
    out.push_back(
        torch::nn::functional::linear(input, layer->weight, layer->bias)); // [B, T, out/tp]
  }
  return out;
}

} // namespace meshtrain
