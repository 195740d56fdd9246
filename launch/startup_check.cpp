// defines: library_version_fields, parameter_fields, check_ranks_agree (see startup_check.h).
#include "meshtrain/launch/startup_check.h"

#include "meshtrain/core/errors.h"

#include <torch/version.h>

#include <cstring>
#include <map>
#include <sstream>

namespace meshtrain {
namespace {

// FNV-1a, 64 bits: the fields in order, each "name=value" and a separator.
int64_t hash_of(const std::vector<SetupField>& fields) {
  uint64_t h = 1469598103934665603ULL;
  const auto add = [&](const std::string& text) {
    for (const unsigned char c : text) {
      h = (h ^ c) * 1099511628211ULL;
    }
    h = (h ^ 0xFFu) * 1099511628211ULL;
  };
  for (const auto& [name, value] : fields) {
    add(name);
    add(value);
  }
  return static_cast<int64_t>(h);
}

std::string serialize(const std::vector<SetupField>& fields) {
  std::string out;
  for (const auto& [name, value] : fields) {
    out += name + '\0' + value + '\0';
  }
  return out;
}

std::map<std::string, std::string> deserialize(const std::string& blob) {
  std::map<std::string, std::string> fields;
  size_t at = 0;
  while (at < blob.size()) {
    const size_t name_end = blob.find('\0', at);
    const size_t value_end = blob.find('\0', name_end + 1);
    if (name_end == std::string::npos || value_end == std::string::npos) {
      break;
    }
    fields[blob.substr(at, name_end - at)] = blob.substr(name_end + 1, value_end - name_end - 1);
    at = value_end + 1;
  }
  return fields;
}

// Every rank's blob, gathered: lengths first, then the bytes padded to the longest.
std::vector<std::string> gather_blobs(const CommunicatorPtr& group, const std::string& blob) {
  const int n = group->size();
  auto lengths = torch::empty({n}, torch::kLong);
  group->all_gather(torch::tensor({static_cast<int64_t>(blob.size())}, torch::kLong), lengths);
  const int64_t longest = lengths.max().item<int64_t>();
  auto mine = torch::zeros({longest}, torch::kUInt8);
  std::memcpy(mine.data_ptr(), blob.data(), blob.size());
  auto all = torch::empty({n * longest}, torch::kUInt8);
  group->all_gather(mine, all);
  std::vector<std::string> blobs;
  for (int r = 0; r < n; ++r) {
    const auto* bytes = all.data_ptr<uint8_t>() + r * longest;
    blobs.emplace_back(reinterpret_cast<const char*>(bytes), lengths[r].item<int64_t>());
  }
  return blobs;
}

} // namespace

std::vector<SetupField> library_version_fields() {
  return {{"meshtrain version", MESHTRAIN_VERSION}, {"LibTorch version", TORCH_VERSION}};
}

std::vector<SetupField> parameter_fields(const torch::nn::Module& model) {
  std::vector<SetupField> fields;
  for (const auto& p : model.named_parameters()) {
    std::ostringstream value;
    value << p.value().sizes() << " " << p.value().scalar_type();
    fields.emplace_back("parameter " + p.key(), value.str());
  }
  return fields;
}

void check_ranks_agree(const CommunicatorPtr& group, const std::vector<SetupField>& fields,
                       const std::string& what) {
  const int n = group->size();
  if (n == 1) {
    return;
  }
  auto hashes = torch::empty({n}, torch::kLong);
  group->all_gather(torch::tensor({hash_of(fields)}, torch::kLong), hashes);
  if ((hashes == hashes[0]).all().item<bool>()) {
    return;
  }
  const auto blobs = gather_blobs(group, serialize(fields));
  std::vector<std::map<std::string, std::string>> views;
  for (const auto& blob : blobs) {
    views.push_back(deserialize(blob));
  }
  // Every field name any rank has, against rank 0's value.
  std::map<std::string, std::map<int, std::string>> differing; // field -> rank -> value
  for (int r = 1; r < n; ++r) {
    for (const auto& [name, value] : views[r]) {
      const auto it = views[0].find(name);
      if (it == views[0].end() || it->second != value) {
        differing[name][r] = value;
      }
    }
    for (const auto& [name, value] : views[0]) {
      if (views[r].count(name) == 0) {
        differing[name][r] = "(absent)";
      }
    }
  }
  std::ostringstream message;
  message << "the ranks disagree on the " << what << " (" << differing.size()
          << " field(s) differ from rank 0's); every rank stops before training:";
  int listed = 0;
  for (const auto& [name, ranks] : differing) {
    if (++listed > 8) {
      message << "\n  ...";
      break;
    }
    const auto zero = views[0].find(name);
    message << "\n  " << name << ": rank 0 has '"
            << (zero == views[0].end() ? "(absent)" : zero->second) << "'";
    for (const auto& [r, value] : ranks) {
      message << ", rank " << r << " has '" << value << "'";
    }
  }
  MT_CHECK(false, message.str());
}

void check_parameters_agree(const Mesh& mesh, const torch::nn::Module& model) {
  const auto& world = mesh.group("world");
  const auto stage =
      mesh.grid().pp() == 1 ? world : world->split(mesh.index("pp"), world->rank(), "pp stage");
  check_ranks_agree(stage, parameter_fields(model), "model's parameter shapes and dtypes");
}

} // namespace meshtrain
