// defines: the safetensors reader and writer (see safetensors.h).
#include "meshtrain/core/safetensors.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/file_io.h"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <memory>

namespace meshtrain {
namespace {

// A header larger than this is refused before it is parsed (the reference implementation
// uses the same bound): a corrupt length must not make us allocate gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100ULL * 1024 * 1024;
// A header nests 3 levels (the root, a tensor, its shape). Deeper input is refused while
// parsing: 40 MB of '[' took 40 s and 2.7 GB (ASan) to build as a JSON tree (fuzz harness).
constexpr int kMaxJsonDepth = 64;
// Elements of one tensor, counting a 0 in its shape as 1 (torch's strides are those
// products, in int64): far above any real tensor, far below an overflow.
constexpr uint64_t kMaxElements = 1ULL << 50;

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

at::ScalarType dtype_from_name(const std::string& name, const std::string& source,
                               const std::string& tensor) {
  for (const auto& d : kDtypes) {
    if (name == d.name) {
      return d.type;
    }
  }
  MT_CHECK(false, source, ": tensor '", tensor, "' has unsupported dtype '", name,
           "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
  return at::kFloat;
}

const char* dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes) {
    if (type == d.type) {
      return d.name;
    }
  }
  MT_CHECK(false, "safetensors cannot store dtype ", type);
  return "";
}

uint64_t read_u64_le(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) {
    v = (v << 8) | static_cast<uint8_t>(p[i]);
  }
  return v;
}

struct Entry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

} // namespace

bool SafetensorsFile::contains(const std::string& name) const {
  return std::any_of(tensors.begin(), tensors.end(),
                     [&](const auto& item) { return item.first == name; });
}

const torch::Tensor& SafetensorsFile::at(const std::string& name) const {
  for (const auto& item : tensors) {
    if (item.first == name) {
      return item.second;
    }
  }
  MT_CHECK(false, "safetensors: no tensor named '", name, "'");
  return tensors.front().second;
}

namespace {

// What the header says, checked against a file of `size` bytes: the tensors in data order.
struct Header {
  std::map<std::string, std::string> metadata;
  std::vector<Entry> entries; // by offset
  uint64_t data_begin = 0;
};

Header parse_header(const char* bytes, uint64_t size, const std::string& source) {
  MT_CHECK(size >= 8, source, ": ", size,
           " bytes is too short for a safetensors file (needs an 8-byte header length)");
  const uint64_t header_len = read_u64_le(bytes);
  MT_CHECK(header_len <= kMaxHeaderBytes, source, ": header length ", header_len,
           " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  MT_CHECK(header_len <= size - 8, source, ": header length ", header_len,
           " runs past the end of the file (", size, " bytes)");
  const uint64_t data_begin = 8 + header_len;
  const uint64_t data_size = size - data_begin;

  nlohmann::json header;
  const nlohmann::json::parser_callback_t limit_depth =
      [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json&) {
        if (event == nlohmann::json::parse_event_t::object_start ||
            event == nlohmann::json::parse_event_t::array_start) {
          MT_CHECK(depth < kMaxJsonDepth, source, ": JSON header nested more than ", kMaxJsonDepth,
                   " levels deep (a safetensors header needs 3)");
        }
        return true;
      };
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + data_begin, limit_depth);
  } catch (const nlohmann::json::exception& e) {
    MT_CHECK(false, source, ": malformed JSON header: ", e.what());
  }
  MT_CHECK(header.is_object(), source, ": the JSON header must be an object");

  Header file;
  std::vector<Entry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      MT_CHECK(value.is_object(), source, ": __metadata__ must be an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        MT_CHECK(mv.is_string(), source, ": __metadata__ value of '", mk, "' is not a string");
        file.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    MT_CHECK(value.is_object(), source, ": entry '", key, "' must be an object");
    MT_CHECK(value.contains("dtype") && value["dtype"].is_string(), source, ": tensor '", key,
             "' has no string 'dtype'");
    MT_CHECK(value.contains("shape") && value["shape"].is_array(), source, ": tensor '", key,
             "' has no 'shape' array");
    MT_CHECK(value.contains("data_offsets") && value["data_offsets"].is_array() &&
                 value["data_offsets"].size() == 2,
             source, ": tensor '", key, "' needs 'data_offsets' [begin, end]");
    Entry e{key, dtype_from_name(value["dtype"].get<std::string>(), source, key), {}, 0, 0};
    uint64_t numel = 1;
    uint64_t strided = 1; // numel with each 0 read as 1: the largest stride torch computes
    for (const auto& dim : value["shape"]) {
      MT_CHECK(dim.is_number_unsigned() || (dim.is_number_integer() && dim.get<int64_t>() >= 0),
               source, ": tensor '", key, "' has a shape entry that is not a non-negative integer");
      const auto d = dim.get<uint64_t>();
      // A 0 anywhere makes numel 0, but [0, 2^39, 2^39, 2^39] would still overflow the strides.
      MT_CHECK(d < (1ULL << 40) && strided <= kMaxElements / std::max<uint64_t>(d, 1), source,
               ": tensor '", key, "' has an absurd shape: dim ", e.shape.size(), " = ", d,
               " takes it past ", kMaxElements, " elements (zero dims counted as 1)");
      numel *= d;
      strided *= std::max<uint64_t>(d, 1);
      e.shape.push_back(static_cast<int64_t>(d));
    }
    for (const auto& off : value["data_offsets"]) {
      MT_CHECK(off.is_number_unsigned() || (off.is_number_integer() && off.get<int64_t>() >= 0),
               source, ": tensor '", key, "' has a data offset that is not a non-negative integer");
    }
    e.begin = value["data_offsets"][0].get<uint64_t>();
    e.end = value["data_offsets"][1].get<uint64_t>();
    MT_CHECK(e.begin <= e.end && e.end <= data_size, source, ": tensor '", key, "' data_offsets [",
             e.begin, ", ", e.end, "] are outside the data region of ", data_size, " bytes");
    const uint64_t expected = numel * c10::elementSize(e.dtype);
    MT_CHECK(e.end - e.begin == expected, source, ": tensor '", key, "' has ", e.end - e.begin,
             " bytes but dtype ", value["dtype"].get<std::string>(), " x shape needs ", expected);
    entries.push_back(std::move(e));
  }

  // The data region must be covered exactly once: no overlaps, no holes.
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) {
    by_offset.push_back(&e);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  uint64_t cursor = 0;
  for (const auto* e : by_offset) {
    MT_CHECK(e->begin == cursor, source, ": tensor '", e->name, "' starts at byte ", e->begin,
             " but the previous tensor ends at ", cursor, " (overlap or hole)");
    cursor = e->end;
  }
  MT_CHECK(cursor == data_size, source, ": tensors cover ", cursor, " bytes of a ", data_size,
           "-byte data region");
  // Keep the file's order (the JSON object is sorted by key, the data by offset).
  for (const auto* e : by_offset) {
    file.entries.push_back(*e);
  }
  file.data_begin = data_begin;
  return file;
}

// A read-only mapping of a whole file, unmapped when the last tensor viewing it goes.
class Mapping {
public:
  explicit Mapping(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    MT_CHECK(fd >= 0, path, ": cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      MT_CHECK(false, path, ": cannot stat: ", std::strerror(err));
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    }
    const int err = errno;
    ::close(fd);
    MT_CHECK(data_ != MAP_FAILED, path, ": cannot map: ", std::strerror(err));
  }
  ~Mapping() {
    if (data_ != nullptr && data_ != MAP_FAILED) {
      ::munmap(data_, size_);
    }
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  const char* data() const { return static_cast<const char*>(data_); }
  uint64_t size() const { return size_; }

private:
  void* data_ = nullptr;
  uint64_t size_ = 0;
};

} // namespace

SafetensorsFile parse_safetensors(const std::string& bytes, const std::string& source) {
  const Header header = parse_header(bytes.data(), bytes.size(), source);
  SafetensorsFile file;
  file.metadata = header.metadata;
  for (const auto& e : header.entries) {
    auto t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype));
    if (e.end > e.begin) {
      std::memcpy(t.data_ptr(), bytes.data() + header.data_begin + e.begin, e.end - e.begin);
    }
    file.tensors.emplace_back(e.name, std::move(t));
  }
  return file;
}

SafetensorsFile load_safetensors(const std::string& path) {
  return parse_safetensors(read_file(path), path);
}

void release_pages(const SafetensorsFile& file, const torch::Tensor& tensor) {
  if (!file.mapped || tensor.numel() == 0) {
    return;
  }
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const auto end = begin + tensor.numel() * tensor.element_size();
  const uintptr_t first = begin / page * page;
  const uintptr_t last = (end + page - 1) / page * page;
  // A private read-only file mapping: the pages stay in the page cache, only unmapped here.
  ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

SafetensorsFile map_safetensors(const std::string& path) {
  auto mapping = std::make_shared<const Mapping>(path);
  const Header header = parse_header(mapping->data(), mapping->size(), path);
  SafetensorsFile file;
  file.metadata = header.metadata;
  file.mapped = true;
  for (const auto& e : header.entries) {
    const auto options = torch::TensorOptions().dtype(e.dtype);
    if (e.end == e.begin) {
      file.tensors.emplace_back(e.name, torch::empty(e.shape, options));
      continue;
    }
    // A view of the mapping (read-only: the tensors must not be written), which it keeps.
    auto* data = const_cast<char*>(mapping->data() + header.data_begin + e.begin);
    file.tensors.emplace_back(e.name, torch::from_blob(
                                          data, e.shape, [mapping](void*) {}, options));
  }
  return file;
}

std::string serialize_safetensors(const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) {
    header["__metadata__"] = metadata;
  }
  std::vector<torch::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    MT_CHECK(name != "__metadata__", "a tensor cannot be named __metadata__");
    MT_CHECK(!header.contains(name), "duplicate tensor name '", name, "'");
    auto t = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t n = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + n}}};
    offset += n;
    contiguous.push_back(std::move(t));
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' '); // keeps the data 8-byte aligned
  std::string out(8, '\0');
  uint64_t len = json.size();
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<char>((len >> (8 * i)) & 0xFF);
  }
  out += json;
  out.reserve(out.size() + offset);
  for (const auto& t : contiguous) {
    out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  }
  return out;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, serialize_safetensors(tensors, metadata));
}

} // namespace meshtrain
