#include "pccl/prefault.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <system_error>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older libc headers lack it
#endif

namespace pccl {
namespace {

constexpr uintptr_t kHugePageBytes = 2u << 20;

// /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPagePresent = uint64_t{1} << 63;
constexpr uint64_t kPageFile = uint64_t{1} << 61;  // or shared: not a private anonymous page
constexpr uint64_t kPageExclusive = uint64_t{1} << 56;

// Whether another thread populates this page without a TLB flush per page: not mapped
// (or swapped out), or the huge zero page (present, not anonymous, not exclusive; one
// flush per 2 MiB). Not a present anonymous page: ours already, or the 4 KiB zero page.
bool cheapToPopulate(uint64_t entry) {
  if (!(entry & kPagePresent)) return true;
  return (entry & kPageFile) && !(entry & kPageExclusive);
}

uintptr_t pageBytes() {
  static const uintptr_t page = [] {
    long n = ::sysconf(_SC_PAGESIZE);
    return n > 0 ? static_cast<uintptr_t>(n) : uintptr_t{4096};
  }();
  return page;
}

// Whether this kernel knows MADV_POPULATE_WRITE, asked once on a page of our own (an
// EINVAL on the caller's memory may only mean that memory cannot be populated).
bool kernelPopulates() {
  static const bool supported = [] {
    const size_t page = pageBytes();
    void* p = ::mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    const bool ok = ::madvise(p, page, MADV_POPULATE_WRITE) == 0;
    ::munmap(p, page);
    return ok;
  }();
  return supported;
}

// The pages holding [data, data + bytes): each holds at least one byte of the range.
MemoryRange pagesOf(const MemoryRange& r) {
  const uintptr_t page = pageBytes();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(r.data) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(r.data) + r.bytes + page - 1) & ~(page - 1);
  return MemoryRange{reinterpret_cast<uint8_t*>(begin), end - begin};
}

}  // namespace

bool populateWritable(void* data, size_t bytes) {
  if (bytes == 0) return true;
  if (!kernelPopulates()) return false;
  const MemoryRange pages = pagesOf(MemoryRange{static_cast<uint8_t*>(data), bytes});
  return ::madvise(pages.data, pages.bytes, MADV_POPULATE_WRITE) == 0;
}

Prefaulter::Prefaulter(const PrefaultOptions& options) : options_(options) {
  options_.pieceBytes = std::max<size_t>(options_.pieceBytes, pageBytes());
  pagemap_ = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
}

Prefaulter::~Prefaulter() {
  stop();
  if (pagemap_ >= 0) ::close(pagemap_);
}

bool Prefaulter::worthPopulating(const std::vector<MemoryRange>& ranges) const {
  if (pagemap_ < 0) return true;
  const size_t page = pageBytes();
  constexpr size_t kBatch = 512;  // entries per read: one 2 MiB block
  uint64_t entries[kBatch];
  for (const MemoryRange& r : ranges) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(r.data) / page;
    const size_t pages = r.bytes / page;
    for (size_t i = 0; i < pages; i += kBatch) {
      const size_t n = std::min(kBatch, pages - i);
      const off_t at = static_cast<off_t>((first + i) * sizeof(uint64_t));
      if (::pread(pagemap_, entries, n * sizeof(uint64_t), at) != static_cast<ssize_t>(n * sizeof(uint64_t))) {
        return true;
      }
      if (std::any_of(entries, entries + n, cheapToPopulate)) return true;
    }
  }
  return false;
}

void Prefaulter::add(const void* owner, const std::vector<MemoryRange>& ranges) {
  Job job;
  job.owner = owner;
  size_t total = 0;
  for (const MemoryRange& r : ranges) {
    if (r.bytes == 0) continue;
    job.ranges.push_back(pagesOf(r));
    total += r.bytes;
  }
  if (job.ranges.empty() || total < options_.minBytes || !kernelPopulates()) return;
  if (!worthPopulating(job.ranges)) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return;
  if (!thread_.joinable()) {
    try {
      thread_ = std::thread([this] { run(); });
    } catch (const std::system_error&) {
      return;  // no thread to spare: the receive faults its pages in itself
    }
  }
  jobs_.push_back(std::move(job));
  work_.notify_one();
}

void Prefaulter::cancel(const void* owner) {
  std::unique_lock<std::mutex> lock(mu_);
  jobs_.erase(std::remove_if(jobs_.begin(), jobs_.end(), [owner](const Job& j) { return j.owner == owner; }),
              jobs_.end());
  if (busy_ == owner) {
    dropBusy_ = true;
    idle_.wait(lock, [this, owner] { return busy_ != owner; });
  }
}

void Prefaulter::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    jobs_.clear();
  }
  work_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Prefaulter::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [this] { return stopping_ || (jobs_.empty() && busy_ == nullptr); });
}

uint64_t prefaultNow(const std::vector<MemoryRange>& ranges, const PrefaultOptions& options) {
  Prefaulter prefaulter(options);
  prefaulter.add(&prefaulter, ranges);
  prefaulter.drain();
  prefaulter.stop();
  return prefaulter.populatedBytes();
}

uint64_t Prefaulter::populatedBytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return populated_;
}

bool Prefaulter::readPages(const MemoryRange& pages) {
  const size_t page = pageBytes();
  const size_t n = pages.bytes / page;
  entries_.resize(n);
  if (pagemap_ >= 0) {
    const size_t bytes = n * sizeof(uint64_t);
    const off_t at = static_cast<off_t>(reinterpret_cast<uintptr_t>(pages.data) / page * sizeof(uint64_t));
    if (::pread(pagemap_, entries_.data(), bytes, at) == static_cast<ssize_t>(bytes)) return true;
  }
  mapped_.resize(n);
  if (::mincore(pages.data, pages.bytes, mapped_.data()) != 0) return false;
  for (size_t i = 0; i < n; ++i) entries_[i] = (mapped_[i] & 1) ? kPagePresent : 0;
  return true;
}

void Prefaulter::adviseHugePages(const MemoryRange& pages) {
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(pages.data) + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(pages.data) + pages.bytes) & ~(kHugePageBytes - 1);
  const size_t perBlock = kHugePageBytes / pageBytes();
  uintptr_t first = begin;  // the first block of the current run of unmapped blocks
  for (uintptr_t block = begin; block <= end; block += kHugePageBytes) {
    bool unmapped = false;
    if (block < end && readPages(MemoryRange{reinterpret_cast<uint8_t*>(block), kHugePageBytes})) {
      unmapped = std::none_of(entries_.begin(), entries_.begin() + static_cast<std::ptrdiff_t>(perBlock),
                              [](uint64_t e) { return (e & kPagePresent) != 0; });
    }
    if (unmapped) continue;
    if (block > first) ::madvise(reinterpret_cast<void*>(first), block - first, MADV_HUGEPAGE);
    first = block + kHugePageBytes;
  }
}

int64_t Prefaulter::populatePiece(const MemoryRange& piece) {
  const size_t page = pageBytes();
  const size_t n = piece.bytes / page;
  if (!readPages(piece)) return -1;
  int64_t populated = 0;
  for (size_t i = 0; i < n;) {
    if (!cheapToPopulate(entries_[i])) {
      ++i;
      continue;
    }
    size_t end = i + 1;
    while (end < n && cheapToPopulate(entries_[end])) ++end;
    if (!populateWritable(piece.data + i * page, (end - i) * page)) return -1;
    populated += static_cast<int64_t>((end - i) * page);
    i = end;
  }
  return populated;
}

void Prefaulter::run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
    if (stopping_) return;
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    const bool advise = options_.hugePages && !job.advised;
    job.advised = true;
    const MemoryRange& range = job.ranges[job.next];
    const MemoryRange piece{range.data + job.offset, std::min(options_.pieceBytes, range.bytes - job.offset)};
    job.offset += piece.bytes;
    if (job.offset == range.bytes) {
      ++job.next;
      job.offset = 0;
    }
    busy_ = job.owner;
    dropBusy_ = false;
    lock.unlock();
    if (advise) {
      // Ranges of one job that touch (an all-reduce's output chunks) are advised as one,
      // so the huge pages straddling their boundaries count too.
      std::vector<MemoryRange> spans = job.ranges;
      auto byAddress = [](const MemoryRange& a, const MemoryRange& b) { return a.data < b.data; };
      std::sort(spans.begin(), spans.end(), byAddress);
      MemoryRange span = spans.front();
      for (size_t i = 1; i <= spans.size(); ++i) {
        if (i < spans.size() && spans[i].data <= span.data + span.bytes) {
          span.bytes = std::max(span.bytes, static_cast<size_t>(spans[i].data + spans[i].bytes - span.data));
          continue;
        }
        adviseHugePages(span);
        if (i < spans.size()) span = spans[i];
      }
    }
    const int64_t populated = populatePiece(piece);
    const bool ok = populated >= 0;
    lock.lock();
    if (ok) populated_ += static_cast<uint64_t>(populated);
    // A piece that failed (memory that cannot be populated) ends its job.
    if (ok && !dropBusy_ && job.next < job.ranges.size()) jobs_.push_back(std::move(job));
    busy_ = nullptr;
    idle_.notify_all();
  }
}

}  // namespace pccl
