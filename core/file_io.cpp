// defines: read_file, write_file_atomic, fsync_directory (see file_io.h).
#include "meshtrain/core/file_io.h"

#include "meshtrain/core/errors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace meshtrain {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MT_CHECK(in.good(), "cannot open '", path, "': ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  MT_CHECK(!in.bad(), "error reading '", path, "'");
  return ss.str();
}

void fsync_directory(const std::string& dir) {
  const std::string path = dir.empty() ? "." : dir;
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY);
  MT_CHECK(fd >= 0, "cannot open directory '", path, "' to sync it: ", std::strerror(errno));
  // EINVAL: the file system cannot sync a directory (some network and FUSE file systems);
  // there is nothing more to make durable from here.
  const int sync_error = ::fsync(fd) == 0 ? 0 : errno;
  const int close_error = ::close(fd) == 0 ? 0 : errno;
  MT_CHECK(sync_error == 0 || sync_error == EINVAL, "syncing directory '", path,
           "' failed: ", std::strerror(sync_error));
  MT_CHECK(close_error == 0, "closing directory '", path, "' failed: ", std::strerror(close_error));
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::filesystem::path target(path);
  const auto tmp = target.string() + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MT_CHECK(fd >= 0, "cannot create '", tmp, "': ", std::strerror(errno));
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      MT_CHECK(false, "writing '", tmp, "' failed: ", std::strerror(err));
    }
    written += static_cast<size_t>(n);
  }
  // close() reports what a network file system could not write back (EIO, ENOSPC, EDQUOT).
  const char* failed = nullptr;
  int err = 0;
  if (::fsync(fd) != 0) {
    failed = "fsync";
    err = errno;
  }
  if (::close(fd) != 0 && failed == nullptr) {
    failed = "close";
    err = errno;
  }
  if (failed == nullptr && std::rename(tmp.c_str(), path.c_str()) != 0) {
    failed = "rename";
    err = errno;
  }
  if (failed != nullptr) {
    ::unlink(tmp.c_str());
    MT_CHECK(false, "could not complete '", path, "': ", failed, " failed: ", std::strerror(err));
  }
  fsync_directory(target.parent_path().string());
}

} // namespace meshtrain
