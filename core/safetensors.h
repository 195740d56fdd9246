// defines: SafetensorsFile, parse_safetensors, load_safetensors, serialize_safetensors,
// save_safetensors — the safetensors format (8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, raw data).
//
// Loading never executes anything and bounds-checks every field: header length against the
// file size, offsets against the data region, byte counts against dtype x shape, overlaps
// and holes. Every failure is a c10::Error naming the file and the field.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct SafetensorsFile {
  NamedTensors tensors; // in file order, each an owned CPU tensor (mapped: a view of the file)
  std::map<std::string, std::string> metadata;
  bool mapped = false; // made by map_safetensors

  bool contains(const std::string& name) const;
  const torch::Tensor& at(const std::string& name) const; // throws naming the missing key
};

// `source` names the bytes in error messages (usually the path).
SafetensorsFile parse_safetensors(const std::string& bytes, const std::string& source);
SafetensorsFile load_safetensors(const std::string& path);
// The same checks, but the file is mapped (mmap, read-only) instead of read: each tensor is a
// view of the mapping, which lives as long as any of them, and a page is read from disk only
// when touched. So a rank that reads the elements it keeps of a large file reads only those
// pages (sharded start-up, parallel/param_init.h). The tensors must not be written.
SafetensorsFile map_safetensors(const std::string& path);
// For a mapped file: this process stops mapping the pages under `tensor` (one of its tensors),
// so the pages of a tensor read in part do not stay resident in it (the kernel maps whole
// large folios of the page cache, not only the pages touched). Touching the tensor again maps
// them back. Does nothing for a file read into memory.
void release_pages(const SafetensorsFile& file, const torch::Tensor& tensor);

std::string serialize_safetensors(const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata = {});
// Written to a temporary name and renamed: the file is complete or absent.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

} // namespace meshtrain
