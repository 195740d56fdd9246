// defines: SetupField, library_version_fields, parameter_fields, check_ranks_agree — the
// start-up agreement: before training, every rank brings its view of the job (library
// versions, the configuration, the model's parameter shapes and dtypes) and the ranks
// compare a hash of it. A rank that differs (another build, other flags, a different
// model) would otherwise fail later in a collective of the wrong size or hang; here every
// rank stops with the same message naming the fields and the ranks that differ.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/core/mesh.h"

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

using SetupField = std::pair<std::string, std::string>; // name, this rank's value

// "meshtrain version", "LibTorch version".
std::vector<SetupField> library_version_fields();
// One field per parameter: its shape and dtype ("[96, 32] Float").
std::vector<SetupField> parameter_fields(const torch::nn::Module& model);

// Collective over `group`: one all-gather of a 64-bit hash of the fields when they agree
// (the usual case); otherwise the fields themselves are gathered and every rank throws
// c10::Error with the same message: for each field that differs from rank 0's (at most
// eight listed), the ranks and their values.
void check_ranks_agree(const CommunicatorPtr& group, const std::vector<SetupField>& fields,
                       const std::string& what);

// check_ranks_agree on parameter_fields(model) among the ranks that hold the same parameters:
// every rank, or under pipeline parallelism the ranks of one pp stage. Collective over the
// mesh's world.
void check_parameters_agree(const Mesh& mesh, const torch::nn::Module& model);

} // namespace meshtrain
