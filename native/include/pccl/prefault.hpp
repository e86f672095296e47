// Making receive destinations resident ahead of the bytes.
//
// Memory the caller allocated fresh (np.zeros, torch.empty, a new mmap) has no pages
// yet: the kernel faults in and zeroes each one inside recv(), on the progress thread
// and with the socket locked, as the bytes land. Into 4 KiB pages that costs more than
// the transfer itself. A Prefaulter faults such ranges in on a thread of its own, in
// the order the bytes are expected, a piece at a time, so the receive starts at once
// and finds its pages resident.
//
// It never writes a byte: madvise(MADV_POPULATE_WRITE) faults pages in writable as a
// write would, without storing anything, so a receive landing in the same page at the
// same time keeps its bytes. Kernels without it (before 5.14) answer EINVAL; the
// Prefaulter then does nothing and the receive faults the pages in as before. Where
// asked, the 2 MiB-aligned interior of each range is first opened to transparent huge
// pages (MADV_HUGEPAGE, a policy hint that changes no content): one fault per 2 MiB
// instead of 512. Only 2 MiB blocks with no page mapped yet are advised: elsewhere a
// huge page cannot form anyway, and advising splits the mapping under the process's
// mmap write lock, which stalls the receive's own faults.
//
// It populates only the pages another thread can populate cheaply, read from
// /proc/self/pagemap: pages not mapped yet (a new mapping needs no TLB flush) and the
// huge zero page (one flush per 2 MiB). A 4 KiB page mapped to the shared zero page (a
// read of untouched memory maps it there: hashing a joiner's fresh state does) must be
// replaced, and replacing a mapping while the progress thread runs this process on
// another CPU costs a TLB-shootdown interrupt per page: measured 60k of them and 1 s
// for 256 MiB, where recv() replaces them on its own CPU without any. Those are left to
// recv(), as are pages already ours. Without pagemap, mincore() tells the pages that
// are not mapped.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace pccl {

struct MemoryRange {
  uint8_t* data = nullptr;
  size_t bytes = 0;
};

// Faults the pages holding [data, data + bytes) in writable without changing a byte
// (MADV_POPULATE_WRITE). Returns false when the kernel cannot: too old, the range not
// mapped writable, or memory it cannot populate (device mappings); pages before the
// one it stopped at may have been faulted in, and no byte changed either way.
bool populateWritable(void* data, size_t bytes);

struct PrefaultOptions {
  size_t pieceBytes = 8u << 20;  // populated per call: also how long cancel() may wait
  size_t minBytes = 4u << 20;    // smaller jobs are left to the receive
  bool hugePages = true;
};

// Populates `ranges` as a Prefaulter would ahead of a receive (huge-page advice on the
// blocks with nothing mapped, then only the pages that are cheap to populate), on the
// calling thread, and returns the bytes populated. For memory whose bytes will arrive
// later: a shared state's buffers are populated from its construction on, while the
// peer still connects, so its first sync receives into resident pages.
uint64_t prefaultNow(const std::vector<MemoryRange>& ranges, const PrefaultOptions& options);

// Populates the ranges of queued jobs on one worker thread (started at the first job,
// joined by stop()). Jobs take turns a piece at a time, so several ops that fill one
// buffer between them (state fetches from several sources) are populated in address
// order. Thread-safe.
class Prefaulter {
 public:
  explicit Prefaulter(const PrefaultOptions& options);
  ~Prefaulter();
  Prefaulter(const Prefaulter&) = delete;
  Prefaulter& operator=(const Prefaulter&) = delete;

  // Queues `ranges` (in the order their bytes are expected) under `owner`. A job of
  // fewer than minBytes, or one added after stop(), is dropped.
  void add(const void* owner, const std::vector<MemoryRange>& ranges);
  // Drops what is left of `owner`'s jobs and waits for a piece of them being populated
  // (at most one): once it returns, the Prefaulter never touches that memory again.
  void cancel(const void* owner);
  // Waits until every job queued so far has been populated (or refused).
  void drain();
  // Drops every job and joins the worker. Idempotent.
  void stop();
  // Bytes populated so far.
  uint64_t populatedBytes() const;

 private:
  struct Job {
    const void* owner = nullptr;
    std::vector<MemoryRange> ranges;  // page-aligned, in order
    size_t next = 0;                  // cursor: ranges[next], at byte `offset`
    size_t offset = 0;
    bool advised = false;
  };
  void run();
  // Whether any page of `ranges` (page-aligned) is worth populating, read from the
  // pagemap on the caller's thread: a buffer received into before (every page present
  // and ours) queues no job, which would wake the worker, advise and re-read it for
  // nothing while the receive runs. True when the pagemap cannot tell.
  bool worthPopulating(const std::vector<MemoryRange>& ranges) const;
  // Worker thread, all on page-aligned ranges of at most pieceBytes:
  // Reads the pagemap entries of `pages` into entries_ (from mincore() without pagemap:
  // only the present bit). False when neither can tell (memory not mapped).
  bool readPages(const MemoryRange& pages);
  // Advises huge pages on the 2 MiB blocks inside `pages` that have no page mapped.
  void adviseHugePages(const MemoryRange& pages);
  // Populates the pages of `piece` worth populating from here; returns the bytes
  // populated, or -1 when the kernel refused (the job ends).
  int64_t populatePiece(const MemoryRange& piece);

  int pagemap_ = -1;                   // /proc/self/pagemap (pread only), or -1
  std::vector<uint64_t> entries_;      // worker thread: pagemap entries (readPages)
  std::vector<unsigned char> mapped_;  // worker thread: mincore() fallback

  PrefaultOptions options_;
  mutable std::mutex mu_;
  std::condition_variable work_;  // a job arrived, or stop
  std::condition_variable idle_;  // the worker finished a piece (or a job)
  std::deque<Job> jobs_;
  const void* busy_ = nullptr;  // owner of the piece being populated
  bool dropBusy_ = false;       // cancel() came for it: do not queue its job again
  bool stopping_ = false;
  uint64_t populated_ = 0;
  std::thread thread_;
};

}  // namespace pccl
