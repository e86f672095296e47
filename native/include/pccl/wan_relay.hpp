// A WAN emulator's data path: a packet relay between N emulated hosts, each one a TUN
// device (IFF_TUN | IFF_NO_PI) whose other end lives in the host's network namespace.
//
// The relay reads IPv4 packets from TUN i, finds the host j that owns the destination
// address, and carries the packet through three stages:
//   a. host i's uplink (its access link towards the network), if it has a rate: a
//      drop-tail queue (its limit in time at the uplink rate), then serialization in
//      admission order, uplink departure = max(now, uplink free) + bytes*8/up;
//   b. the directed pair link i->j, from the uplink departure on:
//      1. partition: a cut link (or a cut host) drops everything, silently;
//      2. random loss (a seeded RNG);
//      3. a drop-tail queue, its limit expressed in time at the link rate;
//      4. serialization at `rateBits`: departure = max(arrival, link free) + bytes*8/rate;
//      5. one-way delay plus jitter (uniform in [-jitter, +jitter]), never reordering a
//         link: release = max(previous release on the link, departure + delay + sample);
//   c. host j's downlink, if it has a rate: packets of every pair into j meet there, so
//      it is served in the order they arrive (their pair release times), as a second
//      pass over the heap: when a packet's pair release comes due, its downlink
//      departure = max(release, downlink free) + bytes*8/down, or a drop if it would wait
//      longer than the downlink queue; the packet goes back into the heap for that time.
// A pair's packets arrive at the downlink in order and leave it in arrival order, so a
// pair never reorders. Released packets are written to TUN j at their release time,
// taken from a min-heap and timed by an absolute CLOCK_MONOTONIC timerfd, set ahead of
// the release by the wakeup latency seen lately (an EWMA, at most 300 us), so that on a
// loaded machine packets still leave close to their release times rather than
// consistently late. A link still cut when its packet is due drops the packet as well.
//
// One thread per relay (epoll over the TUN fds, the timerfd and a stop eventfd). Link
// and host parameters and partitions may change at any time from any thread: a change
// applies to packets that enter the link (or reach the downlink) afterwards; those
// queued keep their times.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <queue>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace pccl {

struct WanLink {
  double delaySeconds = 0.0;   // one-way
  double jitterSeconds = 0.0;  // added to the delay: uniform in [-jitter, +jitter], total >= 0
  uint64_t rateBits = 0;       // bits/s; 0: unlimited (no serialization, no queue)
  double loss = 0.0;           // probability that a packet is dropped
  double queueSeconds = 0.05;  // drop-tail limit: the wait for the link, at the link rate
};

// A host's access link: one uplink and one downlink shared by all its pairs, each with
// a rate (bits/s; 0: unlimited, no queue) and a drop-tail queue limit in time at it.
struct WanHost {
  uint64_t upBits = 0;
  uint64_t downBits = 0;
  double upQueueSeconds = 0.05;
  double downQueueSeconds = 0.05;
};

struct WanHostStats {
  uint64_t droppedUpQueue = 0;    // the uplink's queue was full
  uint64_t droppedDownQueue = 0;  // the downlink's queue was full
};

// Per directed link; packets/bytes are what reached the destination TUN.
struct WanLinkStats {
  uint64_t packets = 0;
  uint64_t bytes = 0;
  uint64_t droppedPartition = 0;
  uint64_t droppedLoss = 0;
  uint64_t droppedQueue = 0;
  uint64_t droppedMemory = 0;  // the relay's pending-bytes cap was reached
  uint64_t writeErrors = 0;
};

struct WanRelayStats {
  std::vector<WanLinkStats> links;  // hosts x hosts, row = source
  std::vector<WanHostStats> hosts;  // per host: its access link's drops
  uint64_t unroutable = 0;          // not IPv4, too short, or no host owns the destination
  uint64_t pendingPackets = 0;
  uint64_t pendingBytes = 0;
  std::string error;  // why the relay thread stopped on its own ("" while healthy)
};

class WanRelay {
 public:
  // tunFds[i] is host i's TUN (the relay dups it: the caller keeps and closes its own);
  // addresses[i] its IPv4 address in host byte order. Every link starts as `link`.
  WanRelay(const std::vector<int>& tunFds, const std::vector<uint32_t>& addresses, const WanLink& link,
           uint64_t seed, size_t maxPendingBytes);
  WanRelay(const WanRelay&) = delete;
  WanRelay& operator=(const WanRelay&) = delete;
  ~WanRelay();

  void start();  // starts the relay thread (once)
  void stop();   // stops and joins it, drops what is pending; idempotent

  size_t hosts() const { return hosts_; }
  void setLink(size_t src, size_t dst, const WanLink& link);
  WanLink link(size_t src, size_t dst) const;
  void setHost(size_t host, const WanHost& access);  // every host starts unlimited
  WanHost host(size_t host) const;
  void setPartitioned(size_t host, bool on);  // every link to and from `host`
  void setLinkPartitioned(size_t src, size_t dst, bool on);
  WanRelayStats stats() const;

 private:
  struct LinkState {
    WanLink params;
    int64_t delayNs = 0;
    int64_t jitterNs = 0;
    int64_t queueNs = 0;
    bool cut = false;
    int64_t freeAtNs = 0;       // when the link's last accepted packet has been serialized
    int64_t lastReleaseNs = 0;  // release time of its last accepted packet
    WanLinkStats stats;
  };
  struct HostState {
    WanHost params;
    int64_t upQueueNs = 0;
    int64_t downQueueNs = 0;
    int64_t upFreeAtNs = 0;    // when the uplink has serialized its last accepted packet
    int64_t downFreeAtNs = 0;  // the same for the downlink
    WanHostStats stats;
  };
  struct Pending {
    int64_t releaseNs;  // when it reaches the destination's downlink (atDownlink), else its TUN
    uint64_t seq;       // ties keep arrival order
    uint32_t src;
    uint32_t dst;
    bool atDownlink;  // its pair release time: it has still to cross the downlink
    std::vector<uint8_t> data;
  };
  struct Later {
    bool operator()(const Pending& a, const Pending& b) const {
      return a.releaseNs != b.releaseNs ? a.releaseNs > b.releaseNs : a.seq > b.seq;
    }
  };

  void run();
  void readFrom(size_t host);
  void admit(size_t src, const uint8_t* packet, size_t len, int64_t now);
  void releaseDue(int64_t now);
  bool crossDownlink(Pending& p);
  void armTimer();
  bool cutLocked(size_t src, size_t dst) const;
  LinkState& at(size_t src, size_t dst) { return links_[src * hosts_ + dst]; }
  const LinkState& at(size_t src, size_t dst) const { return links_[src * hosts_ + dst]; }

  const size_t hosts_;
  const size_t maxPendingBytes_;
  std::vector<int> tunFds_;  // owned (dups)
  std::vector<uint32_t> addresses_;
  int epollFd_ = -1;
  int timerFd_ = -1;
  int stopFd_ = -1;
  std::thread thread_;

  mutable std::mutex mu_;  // everything below
  std::vector<LinkState> links_;
  std::vector<HostState> hostLinks_;
  std::vector<bool> hostCut_;
  std::priority_queue<Pending, std::vector<Pending>, Later> heap_;
  std::vector<std::vector<uint8_t>> spare_;  // buffers of released packets, reused
  std::mt19937_64 rng_;
  uint64_t seq_ = 0;
  uint64_t pendingBytes_ = 0;
  uint64_t unroutable_ = 0;
  int64_t armedNs_ = -1;  // the release time the timer is set for (-1: disarmed)
  int64_t timerAtNs_ = 0;  // relay thread only: when the timer is set to go off
  int64_t leadNs_ = 0;     // relay thread only: recent wakeup lateness (EWMA)
  std::string error_;
};

}  // namespace pccl
