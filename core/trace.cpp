// defines: Tracer, TraceSpan, CollectiveLabelScope, comm_blocked_ns (see trace.h).
#include "meshtrain/core/trace.h"

#include "meshtrain/core/file_io.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <sstream>

namespace meshtrain {

namespace {

std::atomic<Tracer*> g_tracer{nullptr};
std::atomic<int64_t> g_comm_blocked_ns{0};
thread_local std::string t_collective_label;

// Labels are our own ("all_reduce dp 1.5 MiB"), but a group name comes from the user.
void append_json_string(std::ostringstream& out, const std::string& s) {
  out << '"';
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
      out << escaped;
    } else {
      out << c;
    }
  }
  out << '"';
}

} // namespace

Tracer::Tracer(int rank, int64_t max_events)
    : rank_(rank), max_events_(max_events), origin_(std::chrono::steady_clock::now()) {}

Tracer& Tracer::start(int rank, int64_t max_events) {
  static std::once_flag once;
  static std::unique_ptr<Tracer> tracer;
  std::call_once(once, [&] {
    tracer.reset(new Tracer(rank, max_events));
    g_tracer.store(tracer.get());
  });
  return *tracer;
}

Tracer* Tracer::get() {
  return g_tracer.load(std::memory_order_relaxed);
}

int64_t Tracer::now_us() const {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                               origin_)
      .count();
}

int Tracer::thread_index() {
  const auto [it, inserted] =
      tids_.emplace(std::this_thread::get_id(), static_cast<int>(tids_.size()));
  return it->second;
}

void Tracer::complete(std::string name, const char* category, int64_t begin_us, int64_t end_us) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (static_cast<int64_t>(events_.size()) >= max_events_) {
    ++dropped_;
    return;
  }
  events_.push_back({std::move(name), category, begin_us, end_us - begin_us, thread_index()});
}

void Tracer::name_thread(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  thread_names_[thread_index()] = name;
}

int64_t Tracer::dropped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return dropped_;
}

std::string Tracer::to_json() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::ostringstream out;
  out << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
  out << "{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":" << rank_
      << ",\"tid\":0,\"args\":{\"name\":\"rank " << rank_ << "\"}}";
  for (const auto& [tid, name] : thread_names_) {
    out << ",\n{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":" << rank_ << ",\"tid\":" << tid
        << ",\"args\":{\"name\":";
    append_json_string(out, name);
    out << "}}";
  }
  for (const auto& e : events_) {
    out << ",\n{\"ph\":\"X\",\"name\":";
    append_json_string(out, e.name);
    out << ",\"cat\":\"" << e.category << "\",\"pid\":" << rank_ << ",\"tid\":" << e.tid
        << ",\"ts\":" << e.begin_us << ",\"dur\":" << e.duration_us << "}";
  }
  out << "\n]}\n";
  return out.str();
}

void Tracer::write(const std::string& path) const {
  write_file_atomic(path, to_json());
}

TraceSpan::TraceSpan(const char* name, const char* category)
    : tracer_(Tracer::get()), name_(name), category_(category) {
  if (tracer_ != nullptr) {
    begin_us_ = tracer_->now_us();
  }
}

TraceSpan::~TraceSpan() {
  if (tracer_ != nullptr) {
    tracer_->complete(name_, category_, begin_us_, tracer_->now_us());
  }
}

CollectiveLabelScope::CollectiveLabelScope(std::string label)
    : previous_(std::move(t_collective_label)) {
  t_collective_label = std::move(label);
}

CollectiveLabelScope::~CollectiveLabelScope() {
  t_collective_label = std::move(previous_);
}

const std::string& CollectiveLabelScope::current() {
  return t_collective_label;
}

int64_t comm_blocked_ns() {
  return g_comm_blocked_ns.load(std::memory_order_relaxed);
}

void add_comm_blocked_ns(int64_t ns) {
  g_comm_blocked_ns.fetch_add(ns, std::memory_order_relaxed);
}

} // namespace meshtrain
