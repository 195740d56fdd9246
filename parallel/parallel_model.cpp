// defines: parallel_blocks (see parallel_model.h).
#include "meshtrain/parallel/parallel_model.h"

#include "meshtrain/core/errors.h"

namespace meshtrain {

std::vector<ParallelBlock*> parallel_blocks(ParallelModel& model) {
  std::vector<ParallelBlock*> out;
  const auto modules = model.blocks();
  for (size_t i = 0; i < modules.size(); ++i) {
    auto* block = dynamic_cast<ParallelBlock*>(modules[i].get());
    MT_CHECK(block != nullptr, "model block ", i, " (", modules[i]->name(),
             ") is not a ParallelBlock: derive its module class from meshtrain::ParallelBlock "
             "(parallel/parallel_model.h)");
    out.push_back(block);
  }
  return out;
}

} // namespace meshtrain
