// defines: prepare_text — text files -> llm.c token files (byte-level, vocab 256) with a
// train/validation split by document.
//
// Documents are separated by lines holding only the separator (default "%", the format of
// Debian's fortunes files); every document goes whole to one split: document k goes to
// validation when floor((k+1)*f) > floor(k*f) for the validation fraction f, so about a
// fraction f of the documents, spread evenly over the corpus, are held out.
#include "meshtrain/core/errors.h"
#include "meshtrain/core/token_file.h"

#include <cxxopts.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

namespace fs = std::filesystem;

namespace {

// Regular files under each input (directories recursed), sorted, links to files skipped
// when the target is also listed (fortunes ships NAME.u8 -> NAME), *.dat index files skipped.
std::vector<fs::path> collect_inputs(const std::vector<std::string>& inputs) {
  std::vector<fs::path> files;
  for (const auto& in : inputs) {
    MT_CHECK(fs::exists(in), "input '", in, "' does not exist");
    if (fs::is_directory(in)) {
      for (const auto& entry : fs::recursive_directory_iterator(in)) {
        if (entry.is_regular_file() && !entry.is_symlink() && entry.path().extension() != ".dat") {
          files.push_back(entry.path());
        }
      }
    } else {
      files.emplace_back(in);
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

} // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("prepare_text",
                           "Turns text files into llm.c token files (byte-level, vocab 256) with "
                           "a train/validation split by document.");
  // clang-format off
  options.add_options()
    ("train", "output token file for training", cxxopts::value<std::string>())
    ("val", "output token file for validation", cxxopts::value<std::string>())
    ("val-fraction", "fraction of documents held out, in (0, 1)", cxxopts::value<double>()->default_value("0.1"))
    ("separator", "a line holding only this separates documents", cxxopts::value<std::string>()->default_value("%"))
    ("inputs", "text files or directories", cxxopts::value<std::vector<std::string>>())
    ("h,help", "print this help");
  // clang-format on
  options.parse_positional({"inputs"});
  options.positional_help("FILE_OR_DIR...");
  try {
    const auto args = options.parse(argc, argv);
    if (args.count("help") != 0U) {
      std::cout << options.help() << "\n";
      return 0;
    }
    MT_CHECK(args.count("train") != 0U && args.count("val") != 0U,
             "--train and --val output paths are required");
    MT_CHECK(args.count("inputs") != 0U, "give at least one input file or directory");
    const double fraction = args["val-fraction"].as<double>();
    MT_CHECK(fraction > 0.0 && fraction < 1.0, "--val-fraction ", fraction, " must be in (0, 1)");
    const auto separator = args["separator"].as<std::string>();
    const auto files = collect_inputs(args["inputs"].as<std::vector<std::string>>());
    MT_CHECK(!files.empty(), "no input files found");

    std::vector<uint16_t> train;
    std::vector<uint16_t> val;
    int64_t documents = 0;
    int64_t val_documents = 0;
    auto add_document = [&](const std::string& doc) {
      if (doc.empty()) {
        return;
      }
      const auto k = static_cast<double>(documents++);
      const bool held_out = std::floor((k + 1) * fraction) > std::floor(k * fraction);
      auto& out = held_out ? val : train;
      val_documents += held_out ? 1 : 0;
      for (const unsigned char c : doc) {
        out.push_back(c);
      }
    };
    for (const auto& path : files) {
      std::ifstream in(path, std::ios::binary);
      MT_CHECK(in.good(), "cannot read '", path.string(), "'");
      std::string line;
      std::string doc;
      while (std::getline(in, line)) {
        if (line == separator) {
          add_document(doc);
          doc.clear();
        } else {
          doc += line;
          doc += '\n';
        }
      }
      add_document(doc);
    }
    MT_CHECK(!train.empty() && !val.empty(), "the split left an empty side (", documents,
             " documents); add text or change --val-fraction");
    meshtrain::write_token_file(args["train"].as<std::string>(), train);
    meshtrain::write_token_file(args["val"].as<std::string>(), val);
    std::cout << "prepare_text: " << files.size() << " files, " << documents << " documents -> "
              << train.size() << " train tokens, " << val.size() << " validation tokens ("
              << val_documents << " documents)\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "prepare_text: " << e.what() << "\n";
    return 2;
  }
}
