// defines: CommStatusBoard, split_comm_id (see comm_status.h).
#include "meshtrain/core/comm_status.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/hash.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <new>
#include <set>
#include <sstream>
#include <type_traits>
#include <vector>

namespace meshtrain {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kMagic = 0x316174736873656dULL; // "meshsta1", stored last at creation
constexpr int32_t kVersion = 1;
constexpr int kSlots = 64;
constexpr const char* kPrefix = "meshtrain-status-";

// The file: a header, then one slot per communicator. Every field another process reads is
// an atomic of at most 64 bits, always lock-free: a plain load or store, also on a read-only
// mapping.
struct FileLayout {
  std::atomic<uint64_t> magic;
  std::atomic<int32_t> version;
  std::atomic<int32_t> world_rank;
  std::atomic<int32_t> world_size;
  std::atomic<int32_t> pid;
  char host[64];
  // The watchdog's thread stores the wall clock here at every poll (CommStatusBoard::beat):
  // a process that is stopped or dead stops doing so, also while it sits inside a collective
  // it has issued.
  std::atomic<int64_t> heartbeat_ns;
  std::atomic<int64_t> heartbeat_period_ns; // 0: no watchdog runs, no heartbeat
  CommStatusSlot slots[kSlots];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<int64_t>::is_always_lock_free &&
                  std::atomic<int32_t>::is_always_lock_free,
              "the status file needs lock-free 32- and 64-bit atomics");
static_assert(std::is_standard_layout<FileLayout>::value, "the status file is a fixed layout");

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) {
    return "?";
  }
  return buf;
}

// A copy of what one rank's file says.
struct GroupView {
  uint64_t id = 0;
  std::string name;
  int rank = 0;
  int size = 0;
  int64_t issued = 0;
  int64_t completed = 0;
  int issued_kind = 0;
  int completed_kind = 0;
  int64_t issued_ns = 0;
  int64_t completed_ns = 0;
  bool pending() const { return issued > completed; }
};

struct RankView {
  bool readable = false;
  std::string host;
  int pid = 0;
  int64_t heartbeat_ns = 0;
  int64_t heartbeat_period_ns = 0;
  std::vector<GroupView> groups;
  // The process has not shown a sign of life (its watchdog's poll) for three polls and a
  // second: stopped, frozen or dead. Unknown (false) without a heartbeat.
  bool silent(int64_t now) const {
    return heartbeat_period_ns > 0 &&
           now - heartbeat_ns > 3 * heartbeat_period_ns + int64_t{1'000'000'000};
  }
  const GroupView* group(uint64_t id) const {
    for (const auto& g : groups) {
      if (g.id == id) {
        return &g;
      }
    }
    return nullptr;
  }
};

// Maps `path` read-only and copies it out with atomic loads; unreadable: readable = false.
RankView read_view(const std::string& path) {
  RankView view;
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    return view;
  }
  struct stat st {};
  void* map = MAP_FAILED;
  if (::fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= sizeof(FileLayout)) {
    map = ::mmap(nullptr, sizeof(FileLayout), PROT_READ, MAP_SHARED, fd, 0);
  }
  ::close(fd);
  if (map == MAP_FAILED) {
    return view;
  }
  const auto* file = static_cast<const FileLayout*>(map);
  if (file->magic.load(std::memory_order_acquire) == kMagic &&
      file->version.load(std::memory_order_relaxed) == kVersion) {
    view.readable = true;
    view.host.assign(file->host, strnlen(file->host, sizeof(file->host)));
    view.pid = file->pid.load(std::memory_order_relaxed);
    view.heartbeat_ns = file->heartbeat_ns.load(std::memory_order_relaxed);
    view.heartbeat_period_ns = file->heartbeat_period_ns.load(std::memory_order_relaxed);
    for (const auto& slot : file->slots) {
      const uint64_t id = slot.id.load(std::memory_order_acquire);
      if (id == 0) {
        continue;
      }
      GroupView g;
      g.id = id;
      g.name.assign(slot.name, strnlen(slot.name, sizeof(slot.name)));
      g.rank = slot.rank.load(std::memory_order_relaxed);
      g.size = slot.size.load(std::memory_order_relaxed);
      g.issued = slot.issued.load(std::memory_order_acquire);
      g.completed = slot.completed.load(std::memory_order_acquire);
      g.issued_kind = slot.issued_kind.load(std::memory_order_relaxed);
      g.completed_kind = slot.completed_kind.load(std::memory_order_relaxed);
      g.issued_ns = slot.issued_ns.load(std::memory_order_relaxed);
      g.completed_ns = slot.completed_ns.load(std::memory_order_relaxed);
      view.groups.push_back(std::move(g));
    }
  }
  ::munmap(map, sizeof(FileLayout));
  return view;
}

// "stopped" etc. from /proc/<pid>/stat (only meaningful for a process on this host).
std::string process_state(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!in || !std::getline(in, stat)) {
    return "process gone";
  }
  const auto paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) {
    return "state unknown";
  }
  switch (stat[paren + 2]) {
  case 'R':
    return "running";
  case 'S':
    return "sleeping";
  case 'D':
    return "in uninterruptible I/O";
  case 'T':
    return "stopped (a signal)";
  case 't':
    return "stopped (a debugger)";
  case 'Z':
    return "exited (zombie)";
  default:
    return std::string("state ") + stat[paren + 2];
  }
}

std::string seconds_ago(int64_t ns, int64_t now) {
  std::ostringstream s;
  s.precision(3);
  s << static_cast<double>(now - ns) / 1e9 << " s ago";
  return s.str();
}

// The report's line for ranks whose status file this rank cannot read: `who` is one rank
// (plural false) or several.
std::string unpublished(const std::string& who, bool plural) {
  return "  " + who + (plural ? " publish" : " publishes") +
         " no status here (on another node? MESHTRAIN_COMM_STATUS_DIR on a shared file system "
         "reaches " +
         (plural ? "them" : "it") + ")\n";
}

std::string kind_name(int kind) {
  return to_string(static_cast<CollectiveKind>(kind));
}

// Removes files in `dir` of processes on this host that no longer exist (a job that crashed
// or was killed cannot remove its own).
void remove_stale(const std::string& dir, const std::string& host) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(kPrefix, 0) != 0) {
      continue;
    }
    const RankView view = read_view(entry.path().string());
    if (view.readable && view.host == host && view.pid > 0 && ::kill(view.pid, 0) != 0 &&
        errno == ESRCH) {
      fs::remove(entry.path(), ec);
    }
  }
}

} // namespace

uint64_t split_comm_id(uint64_t parent, int64_t split_index, int color) {
  // FNV-1a over the three numbers, never 0 (a free slot) nor the world's 1.
  uint64_t h = kFnv1a64Offset;
  for (const uint64_t v : {parent, static_cast<uint64_t>(split_index),
                           static_cast<uint64_t>(static_cast<uint32_t>(color))}) {
    for (int b = 0; b < 8; ++b) {
      const auto byte = static_cast<unsigned char>((v >> (8 * b)) & 0xff);
      h = fnv1a64(&byte, 1, h);
    }
  }
  return h <= kWorldCommId ? h + 2 : h;
}

std::string CommStatusBoard::default_dir() {
  const char* env = std::getenv("MESHTRAIN_COMM_STATUS_DIR");
  if (env != nullptr && *env != '\0') {
    const std::string dir = env;
    return dir == "off" ? "" : dir;
  }
  return ::access("/dev/shm", W_OK | X_OK) == 0 ? "/dev/shm" : "";
}

std::shared_ptr<CommStatusBoard> CommStatusBoard::create(const std::string& dir,
                                                         const std::string& job, int world_rank,
                                                         int world_size) {
  MT_CHECK(!dir.empty() && fs::is_directory(dir), "comm status: '", dir,
           "' is not a directory (MESHTRAIN_COMM_STATUS_DIR)");
  std::shared_ptr<CommStatusBoard> board(new CommStatusBoard());
  board->dir_ = dir;
  board->job_ = job;
  board->world_rank_ = world_rank;
  board->world_size_ = world_size;
  board->shared_dir_ = fs::weakly_canonical(dir) != fs::path("/dev/shm");
  board->path_ = board->file_of(world_rank);
  const std::string host = host_name();
  remove_stale(dir, host);

  const int fd = ::open(board->path_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  MT_CHECK(fd >= 0, "comm status: cannot create '", board->path_, "': ", std::strerror(errno));
  const bool sized = ::ftruncate(fd, sizeof(FileLayout)) == 0;
  const int size_error = errno;
  void* map = sized ? ::mmap(nullptr, sizeof(FileLayout), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                    : MAP_FAILED;
  const int map_error = errno;
  ::close(fd);
  if (map == MAP_FAILED) {
    ::unlink(board->path_.c_str());
    MT_CHECK(false, "comm status: cannot ", sized ? "map '" : "size '", board->path_,
             "': ", std::strerror(sized ? map_error : size_error));
  }
  board->map_ = map;
  board->map_bytes_ = sizeof(FileLayout);
  // The file is zero-filled: every slot free, every counter 0.
  auto* file = new (map) FileLayout;
  file->version.store(kVersion, std::memory_order_relaxed);
  file->world_rank.store(world_rank, std::memory_order_relaxed);
  file->world_size.store(world_size, std::memory_order_relaxed);
  file->pid.store(static_cast<int32_t>(::getpid()), std::memory_order_relaxed);
  std::strncpy(file->host, host.c_str(), sizeof(file->host) - 1);
  file->magic.store(kMagic, std::memory_order_release);
  return board;
}

CommStatusBoard::~CommStatusBoard() {
  if (map_ != nullptr) {
    ::munmap(map_, map_bytes_);
    ::unlink(path_.c_str());
  }
}

std::string CommStatusBoard::file_of(int world_rank) const {
  return (fs::path(dir_) / (kPrefix + job_ + ".rank" + std::to_string(world_rank))).string();
}

CommStatusSlot* CommStatusBoard::acquire(uint64_t id, const std::string& name, int rank, int size) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto* file = static_cast<FileLayout*>(map_);
  for (auto& slot : file->slots) {
    if (slot.id.load(std::memory_order_relaxed) != 0) {
      continue;
    }
    std::memset(slot.name, 0, sizeof(slot.name));
    std::strncpy(slot.name, name.c_str(), sizeof(slot.name) - 1);
    slot.rank.store(rank, std::memory_order_relaxed);
    slot.size.store(size, std::memory_order_relaxed);
    slot.issued.store(0, std::memory_order_relaxed);
    slot.completed.store(0, std::memory_order_relaxed);
    slot.issued_ns.store(0, std::memory_order_relaxed);
    slot.completed_ns.store(0, std::memory_order_relaxed);
    slot.id.store(id, std::memory_order_release);
    return &slot;
  }
  return nullptr;
}

void CommStatusBoard::release(CommStatusSlot* slot) {
  if (slot != nullptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    slot->id.store(0, std::memory_order_release);
  }
}

void CommStatusBoard::issued(CommStatusSlot* slot, int64_t sequence, CollectiveKind kind) {
  if (slot == nullptr) {
    return;
  }
  slot->issued_kind.store(static_cast<int32_t>(kind), std::memory_order_relaxed);
  slot->issued_ns.store(now_ns(), std::memory_order_relaxed);
  slot->issued.store(sequence, std::memory_order_release);
}

void CommStatusBoard::completed(CommStatusSlot* slot, uint64_t id, int64_t sequence,
                                CollectiveKind kind) {
  if (slot == nullptr || slot->id.load(std::memory_order_acquire) != id) {
    return;
  }
  // Collectives of one communicator complete in issue order, but two threads may report two of
  // them out of order: keep the largest.
  int64_t seen = slot->completed.load(std::memory_order_relaxed);
  while (seen < sequence) {
    if (slot->completed.compare_exchange_weak(seen, sequence, std::memory_order_release)) {
      slot->completed_kind.store(static_cast<int32_t>(kind), std::memory_order_relaxed);
      slot->completed_ns.store(now_ns(), std::memory_order_relaxed);
      return;
    }
  }
}

void CommStatusBoard::beat(std::chrono::nanoseconds period) {
  auto* file = static_cast<FileLayout*>(map_);
  file->heartbeat_period_ns.store(period.count(), std::memory_order_relaxed);
  file->heartbeat_ns.store(now_ns(), std::memory_order_relaxed);
  flush();
}

void CommStatusBoard::flush() const {
  if (shared_dir_ && map_ != nullptr) {
    ::msync(map_, map_bytes_, MS_SYNC);
  }
}

std::string CommStatusBoard::explain(uint64_t group_id, const std::string& group, int64_t sequence,
                                     std::string* culprits, int peer) const {
  std::vector<RankView> ranks(world_size_);
  for (int r = 0; r < world_size_; ++r) {
    ranks[r] = read_view(file_of(r));
  }
  const std::string self_host = ranks[world_rank_].readable ? ranks[world_rank_].host : host_name();
  const int64_t now = now_ns();
  std::ostringstream out;
  std::vector<std::string> roots;
  std::set<int> seen = {world_rank_};

  const auto who = [&](int r) {
    std::ostringstream s;
    s << "rank " << r << " (host " << ranks[r].host << ", pid " << ranks[r].pid;
    if (ranks[r].host == self_host) {
      s << ", " << process_state(ranks[r].pid);
    }
    s << ")";
    return s.str();
  };
  const auto last_collective = [&](const RankView& view) {
    const GroupView* latest = nullptr;
    for (const auto& g : view.groups) {
      if (g.issued > 0 && (latest == nullptr || g.issued_ns > latest->issued_ns)) {
        latest = &g;
      }
    }
    if (latest == nullptr) {
      return std::string("none yet");
    }
    std::ostringstream s;
    s << kind_name(latest->issued_kind) << " #" << latest->issued << " on group '" << latest->name
      << "', issued " << seconds_ago(latest->issued_ns, now)
      << (latest->pending() ? ", not completed" : ", completed");
    return s.str();
  };
  // The ranks of group `id` (other than `waiter`) that hold #seq up: those that have not
  // issued it, and those that issued it but stopped responding before it completed.
  // `members`/`size`: how many ranks of the group publish here, and its size.
  const auto holders = [&](uint64_t id, int64_t seq, int waiter, int* members, int* size) {
    std::vector<int> found;
    *members = 0;
    *size = 0;
    for (int r = 0; r < world_size_; ++r) {
      const GroupView* g = ranks[r].readable ? ranks[r].group(id) : nullptr;
      if (g == nullptr) {
        continue;
      }
      ++*members;
      *size = g->size;
      if (r != waiter && (g->issued < seq || (g->completed < seq && ranks[r].silent(now)))) {
        found.push_back(r);
      }
    }
    return found;
  };

  // Who holds up #seq on group `id` that rank `waiter` waits in. A rank that stopped
  // responding, or that waits in no collective someone else holds up, is a root: the one
  // holding the job up. Any other waits in a collective itself: who holds that one up?
  std::function<void(uint64_t, const std::string&, int64_t, int, int)> visit;
  // Rank r, which holds a wait up (`why`: how), and what it does itself.
  const auto holder = [&](int r, const std::string& why, int depth) {
    const RankView& view = ranks[r];
    out << "  " << who(r) << why;
    if (view.silent(now)) {
      out << "; it does not respond (its last sign of life " << seconds_ago(view.heartbeat_ns, now)
          << "): it is the one holding the job up; its last collective: " << last_collective(view)
          << "\n";
      roots.push_back("rank " + std::to_string(r) + " on host " + view.host);
      return;
    }
    std::vector<const GroupView*> blocking;
    for (const auto& g : view.groups) {
      int m = 0;
      int s = 0;
      if (g.pending() && !holders(g.id, g.issued, r, &m, &s).empty()) {
        blocking.push_back(&g);
      }
    }
    if (blocking.empty() || depth > 16) {
      out << "; it waits in no collective that another rank holds up: it is the one "
             "holding the job up (busy outside collectives, or blocked elsewhere); its "
             "last collective: "
          << last_collective(view) << "\n";
      roots.push_back("rank " + std::to_string(r) + " on host " + view.host);
      return;
    }
    for (const GroupView* g : blocking) {
      out << "; it waits in " << kind_name(g->issued_kind) << " #" << g->issued << " on group '"
          << g->name << "' (issued " << seconds_ago(g->issued_ns, now) << ")";
    }
    out << "\n";
    for (const GroupView* g : blocking) {
      visit(g->id, g->name, g->issued, r, depth + 1);
    }
  };
  visit = [&](uint64_t id, const std::string& name, int64_t seq, int waiter, int depth) {
    int members = 0;
    int size = 0;
    const auto held_by = holders(id, seq, waiter, &members, &size);
    if (members < size) {
      out << unpublished(std::to_string(size - members) + " of the " + std::to_string(size) +
                             " ranks of group '" + name + "'",
                         true);
    }
    for (const int r : held_by) {
      if (!seen.insert(r).second) {
        continue;
      }
      const GroupView* mine = ranks[r].group(id);
      std::ostringstream why;
      if (mine->issued < seq) {
        why << " has not issued #" << seq << " on group '" << name << "' (its last there: #"
            << mine->issued << ")";
      } else {
        why << " issued #" << seq << " on group '" << name << "' but did not complete it";
      }
      holder(r, why.str(), depth);
    }
  };

  if (peer >= 0) {
    // A send or receive waits for its peer alone: which world rank is it, and what does it do?
    for (int r = 0; r < world_size_; ++r) {
      const GroupView* g = ranks[r].readable ? ranks[r].group(group_id) : nullptr;
      if (g != nullptr && g->rank == peer && seen.insert(r).second) {
        holder(r,
               " is rank " + std::to_string(peer) + " of group '" + group +
                   "', the other end of this message",
               0);
      }
    }
    if (roots.empty() && out.tellp() == 0) {
      out << unpublished("rank " + std::to_string(peer) + " of group '" + group + "'", false);
    }
  } else {
    int members = 0;
    int size = 0;
    if (holders(group_id, sequence, world_rank_, &members, &size).empty() && members == size &&
        size > 0) {
      out << "  every rank of group '" << group << "' has issued #" << sequence
          << " and responds: the ranks issued different collectives at this point, or the "
             "transport itself is stuck\n";
    }
    visit(group_id, group, sequence, world_rank_, 0);
  }
  if (culprits != nullptr) {
    culprits->clear();
    for (size_t i = 0; i < roots.size(); ++i) {
      *culprits += (i > 0 ? ", " : "") + roots[i];
    }
  }
  return out.str();
}

} // namespace meshtrain
