// The WAN emulator's packet relay (see pccl/wan_relay.hpp for the link model).
#include "pccl/wan_relay.hpp"

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "pccl/errors.hpp"

namespace pccl {

namespace {

constexpr size_t kReadBytes = 65536;     // a TUN read returns one packet, at most 64 KiB
constexpr int kReadBudget = 64;          // packets read from one TUN before looking at others
constexpr uint64_t kStopToken = UINT64_MAX;  // epoll data of the stop eventfd
constexpr uint64_t kTimerToken = UINT64_MAX - 1;
constexpr int64_t kMaxLeadNs = 300000;  // timers go off at most this much ahead of a release
constexpr int64_t kWindowNs = 20000;    // packets due this soon go out with the current batch

int64_t nowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int64_t toNs(double seconds) { return int64_t(std::llround(seconds * 1e9)); }

[[noreturn]] void throwErrno(const std::string& what) { throw Error(what + ": " + std::strerror(errno)); }

void checkLink(const WanLink& l) {
  if (!(l.delaySeconds >= 0 && l.delaySeconds <= 60)) throw InvalidArgument("delay must be in [0, 60] s");
  if (!(l.jitterSeconds >= 0 && l.jitterSeconds <= 60)) throw InvalidArgument("jitter must be in [0, 60] s");
  if (!(l.loss >= 0 && l.loss <= 1)) throw InvalidArgument("loss must be in [0, 1]");
  if (!(l.queueSeconds >= 0 && l.queueSeconds <= 60)) throw InvalidArgument("queue must be in [0, 60] s");
}

void checkHost(const WanHost& h) {
  if (!(h.upQueueSeconds >= 0 && h.upQueueSeconds <= 60)) throw InvalidArgument("uplink queue must be in [0, 60] s");
  if (!(h.downQueueSeconds >= 0 && h.downQueueSeconds <= 60)) {
    throw InvalidArgument("downlink queue must be in [0, 60] s");
  }
}

// Serialization time of `bytes` at `bits` per second (> 0).
int64_t serializeNs(size_t bytes, uint64_t bits) { return int64_t(double(bytes) * 8e9 / double(bits)); }

}  // namespace

WanRelay::WanRelay(const std::vector<int>& tunFds, const std::vector<uint32_t>& addresses, const WanLink& link,
                   uint64_t seed, size_t maxPendingBytes)
    : hosts_(tunFds.size()), maxPendingBytes_(maxPendingBytes), rng_(seed) {
  if (hosts_ < 2) throw InvalidArgument("a WAN relay needs at least 2 hosts");
  if (addresses.size() != hosts_) throw InvalidArgument("one address per TUN fd");
  checkLink(link);
  addresses_ = addresses;
  links_.resize(hosts_ * hosts_);
  hostCut_.assign(hosts_, false);
  hostLinks_.resize(hosts_);
  for (size_t s = 0; s < hosts_; ++s) {
    for (size_t d = 0; d < hosts_; ++d) setLink(s, d, link);
    setHost(s, WanHost{});
  }
  try {
    for (int fd : tunFds) {
      int own = fcntl(fd, F_DUPFD_CLOEXEC, 3);
      if (own < 0) throwErrno("dup of a TUN fd");
      tunFds_.push_back(own);
      int flags = fcntl(own, F_GETFL);
      if (flags < 0 || fcntl(own, F_SETFL, flags | O_NONBLOCK) < 0) throwErrno("O_NONBLOCK on a TUN fd");
    }
    epollFd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epollFd_ < 0) throwErrno("epoll_create1");
    timerFd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (timerFd_ < 0) throwErrno("timerfd_create");
    stopFd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (stopFd_ < 0) throwErrno("eventfd");
    auto watch = [this](int fd, uint64_t token) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = token;
      if (epoll_ctl(epollFd_, EPOLL_CTL_ADD, fd, &ev) < 0) throwErrno("epoll_ctl");
    };
    for (size_t i = 0; i < hosts_; ++i) watch(tunFds_[i], i);
    watch(timerFd_, kTimerToken);
    watch(stopFd_, kStopToken);
  } catch (...) {
    for (int fd : {epollFd_, timerFd_, stopFd_}) {
      if (fd >= 0) close(fd);
    }
    for (int fd : tunFds_) close(fd);
    throw;
  }
}

WanRelay::~WanRelay() {
  stop();
  for (int fd : tunFds_) close(fd);
  close(epollFd_);
  close(timerFd_);
  close(stopFd_);
}

void WanRelay::start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] { run(); });
}

void WanRelay::stop() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    if (write(stopFd_, &one, sizeof one) < 0) {
      // An eventfd write fails only on counter overflow: the thread is being stopped anyway.
    }
    thread_.join();
  }
  std::lock_guard<std::mutex> lock(mu_);
  heap_ = {};
  pendingBytes_ = 0;
}

void WanRelay::setLink(size_t src, size_t dst, const WanLink& link) {
  if (src >= hosts_ || dst >= hosts_) throw InvalidArgument("no such link");
  checkLink(link);
  std::lock_guard<std::mutex> lock(mu_);
  LinkState& l = at(src, dst);
  l.params = link;
  l.delayNs = toNs(link.delaySeconds);
  l.jitterNs = toNs(link.jitterSeconds);
  l.queueNs = toNs(link.queueSeconds);
}

WanLink WanRelay::link(size_t src, size_t dst) const {
  if (src >= hosts_ || dst >= hosts_) throw InvalidArgument("no such link");
  std::lock_guard<std::mutex> lock(mu_);
  return at(src, dst).params;
}

void WanRelay::setHost(size_t host, const WanHost& access) {
  if (host >= hosts_) throw InvalidArgument("no such host");
  checkHost(access);
  std::lock_guard<std::mutex> lock(mu_);
  HostState& h = hostLinks_[host];
  h.params = access;
  h.upQueueNs = toNs(access.upQueueSeconds);
  h.downQueueNs = toNs(access.downQueueSeconds);
}

WanHost WanRelay::host(size_t host) const {
  if (host >= hosts_) throw InvalidArgument("no such host");
  std::lock_guard<std::mutex> lock(mu_);
  return hostLinks_[host].params;
}

void WanRelay::setPartitioned(size_t host, bool on) {
  if (host >= hosts_) throw InvalidArgument("no such host");
  std::lock_guard<std::mutex> lock(mu_);
  hostCut_[host] = on;
}

void WanRelay::setLinkPartitioned(size_t src, size_t dst, bool on) {
  if (src >= hosts_ || dst >= hosts_) throw InvalidArgument("no such link");
  std::lock_guard<std::mutex> lock(mu_);
  at(src, dst).cut = on;
}

WanRelayStats WanRelay::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  WanRelayStats out;
  for (const LinkState& l : links_) out.links.push_back(l.stats);
  for (const HostState& h : hostLinks_) out.hosts.push_back(h.stats);
  out.unroutable = unroutable_;
  out.pendingPackets = heap_.size();
  out.pendingBytes = pendingBytes_;
  out.error = error_;
  return out;
}

bool WanRelay::cutLocked(size_t src, size_t dst) const { return at(src, dst).cut || hostCut_[src] || hostCut_[dst]; }

void WanRelay::run() {
  // Best effort, this thread only: wake on time (no timer slack) and ahead of ordinary
  // work (nice -10), so a loaded machine shifts release times as little as it can.
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  if (setpriority(PRIO_PROCESS, id_t(syscall(SYS_gettid)), -10) != 0) {
    // Not permitted (not root): run at the inherited priority.
  }
  epoll_event events[64];
  std::vector<bool> readable(hosts_);
  while (true) {
    int n = epoll_wait(epollFd_, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::string("epoll_wait: ") + std::strerror(errno);
      return;
    }
    std::fill(readable.begin(), readable.end(), false);
    for (int k = 0; k < n; ++k) {
      uint64_t token = events[k].data.u64;
      if (token == kStopToken) return;
      if (token == kTimerToken) {
        uint64_t expirations;
        if (read(timerFd_, &expirations, sizeof expirations) < 0) {
          // EAGAIN: re-armed since it fired; nothing to consume.
        }
        // How late this wakeup came (from idle, on a busy machine): the next timers are
        // set that much ahead of their packets' release times.
        int64_t late = std::clamp<int64_t>(nowNs() - timerAtNs_, 0, kMaxLeadNs);
        leadNs_ += (late - leadNs_) / 8;
        std::lock_guard<std::mutex> lock(mu_);
        armedNs_ = -1;
      } else {
        readable[token] = true;
      }
    }
    for (size_t i = 0; i < hosts_; ++i) {
      if (readable[i]) readFrom(i);
    }
    releaseDue(nowNs());
    armTimer();
  }
}

void WanRelay::readFrom(size_t host) {
  static thread_local std::vector<uint8_t> scratch(kReadBytes);
  for (int k = 0; k < kReadBudget; ++k) {
    ssize_t n = read(tunFds_[host], scratch.data(), scratch.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EAGAIN: drained (level-triggered epoll brings us back for the rest)
    }
    admit(host, scratch.data(), size_t(n), nowNs());
  }
}

void WanRelay::admit(size_t src, const uint8_t* packet, size_t len, int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t dst = hosts_;
  if (len >= 20 && (packet[0] >> 4) == 4) {
    uint32_t addr = (uint32_t(packet[16]) << 24) | (uint32_t(packet[17]) << 16) | (uint32_t(packet[18]) << 8) |
                    uint32_t(packet[19]);
    for (size_t j = 0; j < hosts_; ++j) {
      if (addresses_[j] == addr) dst = j;
    }
  }
  if (dst == hosts_ || dst == src) {
    ++unroutable_;
    return;
  }
  if (pendingBytes_ + len > maxPendingBytes_) {
    ++at(src, dst).stats.droppedMemory;
    return;
  }
  // a. The source's uplink, shared by all its pairs: what it accepts leaves it, whatever
  // the network does to the packet next.
  HostState& up = hostLinks_[src];
  int64_t arrival = now;  // when the packet enters the pair link
  if (up.params.upBits > 0) {
    int64_t start = std::max(now, up.upFreeAtNs);
    if (start - now > up.upQueueNs) {
      ++up.stats.droppedUpQueue;
      return;
    }
    arrival = start + serializeNs(len, up.params.upBits);
    up.upFreeAtNs = arrival;
  }
  // b. The pair link.
  LinkState& l = at(src, dst);
  if (cutLocked(src, dst)) {
    ++l.stats.droppedPartition;
    return;
  }
  if (l.params.loss > 0 && std::uniform_real_distribution<double>(0.0, 1.0)(rng_) < l.params.loss) {
    ++l.stats.droppedLoss;
    return;
  }
  int64_t departure = arrival;
  if (l.params.rateBits > 0) {
    int64_t start = std::max(arrival, l.freeAtNs);
    if (start - arrival > l.queueNs) {
      ++l.stats.droppedQueue;
      return;
    }
    departure = start + serializeNs(len, l.params.rateBits);
  }
  l.freeAtNs = departure;
  int64_t delay = l.delayNs;
  if (l.jitterNs > 0) {
    delay += std::uniform_int_distribution<int64_t>(-l.jitterNs, l.jitterNs)(rng_);
    delay = std::max<int64_t>(delay, 0);
  }
  int64_t release = std::max(l.lastReleaseNs, departure + delay);
  l.lastReleaseNs = release;
  std::vector<uint8_t> data;
  if (!spare_.empty()) {
    data = std::move(spare_.back());
    spare_.pop_back();
  }
  data.assign(packet, packet + len);
  pendingBytes_ += len;
  // c. The destination's downlink, if it has a rate, when the packet reaches it.
  bool atDownlink = hostLinks_[dst].params.downBits > 0;
  heap_.push(Pending{release, seq_++, uint32_t(src), uint32_t(dst), atDownlink, std::move(data)});
}

void WanRelay::releaseDue(int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  while (!heap_.empty() && heap_.top().releaseNs <= now + kWindowNs) {
    // top() is const: the packet is moved out through a const_cast, then popped at once.
    Pending p = std::move(const_cast<Pending&>(heap_.top()));
    heap_.pop();
    if (p.atDownlink) {
      if (crossDownlink(p)) heap_.push(std::move(p));
      continue;
    }
    pendingBytes_ -= p.data.size();
    LinkState& l = at(p.src, p.dst);
    if (cutLocked(p.src, p.dst)) {
      ++l.stats.droppedPartition;
    } else {
      ssize_t w;
      do {
        w = write(tunFds_[p.dst], p.data.data(), p.data.size());
      } while (w < 0 && errno == EINTR);
      if (w == ssize_t(p.data.size())) {
        ++l.stats.packets;
        l.stats.bytes += p.data.size();
      } else {
        ++l.stats.writeErrors;
      }
    }
    if (spare_.size() < 4096) spare_.push_back(std::move(p.data));
  }
}

// The packet `p` reaches its destination's downlink at p.releaseNs. Packets reach it in
// time order (the heap's), so serving them here, in that order, is the downlink's FIFO.
// Returns true with p.releaseNs set to its downlink departure (deliver it then), false
// when the downlink queue drops it. mu_ held.
bool WanRelay::crossDownlink(Pending& p) {
  HostState& down = hostLinks_[p.dst];
  p.atDownlink = false;
  if (down.params.downBits == 0) return true;  // set to unlimited meanwhile
  int64_t start = std::max(p.releaseNs, down.downFreeAtNs);
  if (start - p.releaseNs > down.downQueueNs) {
    ++down.stats.droppedDownQueue;
    pendingBytes_ -= p.data.size();
    if (spare_.size() < 4096) spare_.push_back(std::move(p.data));
    return false;
  }
  down.downFreeAtNs = start + serializeNs(p.data.size(), down.params.downBits);
  p.releaseNs = down.downFreeAtNs;
  return true;
}

void WanRelay::armTimer() {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t next = heap_.empty() ? -1 : heap_.top().releaseNs;
  if (next == armedNs_) return;
  itimerspec spec{};
  if (next >= 0) {
    // Ahead by the wakeup latency seen lately, unless that is already past (then on time).
    int64_t at = next - leadNs_ > nowNs() ? next - leadNs_ : next;
    at = std::max<int64_t>(at, 1);  // an absolute time already past fires at once; 0 would disarm
    spec.it_value.tv_sec = at / 1000000000;
    spec.it_value.tv_nsec = at % 1000000000;
    timerAtNs_ = at;
  }
  if (timerfd_settime(timerFd_, TFD_TIMER_ABSTIME, &spec, nullptr) < 0) {
    error_ = std::string("timerfd_settime: ") + std::strerror(errno);
  }
  armedNs_ = next;
}

}  // namespace pccl
