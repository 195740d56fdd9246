// defines: read_file, write_file_atomic, fsync_directory — whole-file I/O with the
// "written completely or not at all" guarantee: data goes to a temporary name in the same
// directory, is fsync'ed, then renamed over the target (rename is atomic on POSIX).
#pragma once

#include <string>

namespace meshtrain {

// Reads the whole file; throws naming the path and the OS error.
std::string read_file(const std::string& path);

// Writes `bytes` to `path` atomically: a crash leaves either the old file or the new one.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Makes a rename inside `dir` durable. Throws naming the directory when it cannot be opened,
// synced (a file system that cannot sync directories, EINVAL, is accepted) or closed.
void fsync_directory(const std::string& dir);

} // namespace meshtrain
