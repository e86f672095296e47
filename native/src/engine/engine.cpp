// The engine's caller API, its progress loop, and the lifecycle of an op on it
// (start, replay of early frames, completion, failure and poisoning, retirement). The
// rest of the engine: connections.cpp (its connections and their pools), frames.cpp
// (the receive path), state_server.cpp, fault_injection.cpp.
#include "pccl/engine.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <future>
#include <thread>

#include "transport/connection.hpp"
#include "transport/handshake.hpp"

namespace pccl {
namespace {

constexpr size_t kScratchPoolSize = 4;
constexpr size_t kMaxEvents = 4096;

}  // namespace

// ---------------------------------------------------------------- caller side

Engine::Engine(const EngineOptions& options) : options_(options), prefaulter_(PrefaultOptions{}) {
  if (options_.connectionsPerPeer < 0 || options_.connectionsPerPeer > 64) {
    throw InvalidArgument("connectionsPerPeer must be in [0, 64] (0: sized from the measured round trip)");
  }
  if (options_.segmentBytes < 64) throw InvalidArgument("segmentBytes must be at least 64");
  transport_ = probeTransport(options_.socket);
  // A congestion control the host refused is not asked for again on every connection.
  if (!transport_.congestionNote.empty()) options_.socket.congestionControl.clear();
  listenFd_ = listenTcp(options_.listenHost, options_.listenPort, 256);
  port_ = localPort(listenFd_.get());
  epollFd_.reset(::epoll_create1(EPOLL_CLOEXEC));
  wakeFd_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!epollFd_.valid() || !wakeFd_.valid()) throw Error("epoll/eventfd: " + std::string(std::strerror(errno)));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &listenFd_;
  ::epoll_ctl(epollFd_.get(), EPOLL_CTL_ADD, listenFd_.get(), &ev);
  ev.data.ptr = &wakeFd_;
  ::epoll_ctl(epollFd_.get(), EPOLL_CTL_ADD, wakeFd_.get(), &ev);
  discard_.resize(64 << 10);
  ring_.epoch = 0;
  ring_.size = 1;
  ring_.rank = 0;
  ringPeers_.push_back(PeerAddress{options_.peerId, options_.listenHost, port_});
  thread_ = std::thread([this] { run(); });
}

Engine::~Engine() { close(); }

void Engine::post(std::function<void()> command) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw AbortedError("engine is closed");
    commands_.push_back(std::move(command));
  }
  uint64_t one = 1;
  ssize_t n = ::write(wakeFd_.get(), &one, sizeof(one));
  (void)n;
}

void Engine::postAndWait(std::function<void()> command) {
  auto ran = std::make_shared<std::promise<void>>();
  auto done = ran->get_future();
  post([command = std::move(command), ran] {
    command();
    ran->set_value();
  });
  done.wait();
}

void Engine::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    commands_.push_back([this] { stopping_ = true; });
  }
  uint64_t one = 1;
  ssize_t n = ::write(wakeFd_.get(), &one, sizeof(one));
  (void)n;
  rebindCv_.notify_all();  // a caller waiting for kept pools gives up
  prepareCv_.notify_all();
  if (thread_.joinable()) thread_.join();
  prefaulter_.stop();
  eventsCv_.notify_all();
}

RingPosition Engine::ring() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ring_;
}

size_t Engine::liveConnections(uint64_t peer, uint64_t epoch) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = liveOutgoing_.find(PoolKey{peer, epoch});
  return it == liveOutgoing_.end() ? 0 : it->second;
}

std::vector<Connection*> Engine::fetchRoute(uint64_t source) const {
  std::vector<Connection*> route;
  for (const auto& [fd, c] : connections_) {
    if (c->outgoing || c->dead || c->handshaking || c->goodbye || c->peer != source || c->epoch >= kStateEpoch) {
      continue;
    }
    if (!route.empty() && c->epoch < route.front()->epoch) continue;
    if (!route.empty() && c->epoch > route.front()->epoch) route.clear();
    route.push_back(c.get());
  }
  std::sort(route.begin(), route.end(), [](Connection* a, Connection* b) { return a->fd.get() < b->fd.get(); });
  return route;
}

std::vector<Connection*> Engine::stateConnections(uint64_t source) {
  std::vector<Connection*> conns = fetchRoute(source);
  if (!conns.empty()) return conns;
  auto it = outgoing_.find(PoolKey{source, kStateEpoch});
  return it == outgoing_.end() ? conns : it->second;
}

void Engine::connectStateSources(const std::vector<PeerAddress>& sources, double timeoutSeconds) {
  std::vector<PeerAddress> unrouted;
  postAndWait([&] {
    for (const PeerAddress& p : sources) {
      if (fetchRoute(p.peerId).empty()) unrouted.push_back(p);
    }
  });
  ensureConnected(unrouted, kStateEpoch, timeoutSeconds);
}

double Engine::stateRoundTrip(uint64_t source) {
  double best = 0;
  postAndWait([&] {
    for (const auto& [fd, c] : connections_) {
      if (c->peer != source || c->dead || c->handshaking) continue;
      const TcpState tcp = tcpState(c->fd.get());
      const double rtt = tcp.minRttSeconds > 0 ? tcp.minRttSeconds : tcp.rttSeconds;
      if (rtt > 0 && (best == 0 || rtt < best)) best = rtt;
    }
  });
  return best;
}

size_t Engine::clampStateWindows(const std::vector<uint64_t>& sources, uint64_t windowBytes, bool starting) {
  size_t clamped = 0;
  postAndWait([&] {
    std::vector<Connection*> conns;
    for (uint64_t source : sources) {
      const std::vector<Connection*> more = stateConnections(source);
      conns.insert(conns.end(), more.begin(), more.end());
    }
    if (conns.empty()) return;
    // Shared among the connections that carried bytes since the last call (a fetch asks
    // each source on one connection); each idle one may take a share too. As a fetch
    // starts, the last one's tail says nothing: among those that ever carried state.
    size_t busy = 0;
    for (Connection* c : conns) busy += (starting ? c->stateRx != 0 : c->stateRx != c->stateRxClamped) ? 1 : 0;
    if (starting && busy == 0) busy = conns.size();
    const uint64_t share = std::max<uint64_t>(windowBytes / std::max<size_t>(busy, 1), kMinStateWindowBytes);
    const int clamp = static_cast<int>(std::min<uint64_t>(share, INT32_MAX));
    for (Connection* c : conns) {
      c->stateRxClamped = c->stateRx;
      if (c->epoch != kStateEpoch && c->clampBefore < 0) {  // a ring connection: its own clamp comes back later
        int before = 0;
        socklen_t len = sizeof(before);
        if (::getsockopt(c->fd.get(), IPPROTO_TCP, TCP_WINDOW_CLAMP, &before, &len) != 0) continue;
        c->clampBefore = before;
        fetchClamped_ = true;
      }
      if (::setsockopt(c->fd.get(), IPPROTO_TCP, TCP_WINDOW_CLAMP, &clamp, sizeof(clamp)) == 0) ++clamped;
    }
  });
  return clamped;
}

void Engine::releaseFetchClamps() {
  if (!fetchClamped_) return;
  fetchClamped_ = false;
  for (auto& [fd, c] : connections_) {
    if (c->clampBefore < 0) continue;
    if (!c->dead) ::setsockopt(c->fd.get(), IPPROTO_TCP, TCP_WINDOW_CLAMP, &c->clampBefore, sizeof(c->clampBefore));
    c->clampBefore = -1;
  }
}

void Engine::setRing(uint64_t epoch, const std::vector<PeerAddress>& ring, size_t rank, double timeoutSeconds,
                     bool connectAll) {
  if (ring.empty() || rank >= ring.size()) throw InvalidArgument("rank outside the ring");
  if (ring[rank].peerId != options_.peerId) {
    throw InvalidArgument("ring position " + std::to_string(rank) + " holds peer " +
                          std::to_string(ring[rank].peerId) + ", not this peer (" +
                          std::to_string(options_.peerId) + ")");
  }
  for (size_t i = 0; i < ring.size(); ++i) {
    for (size_t j = i + 1; j < ring.size(); ++j) {
      if (ring[i].peerId == ring[j].peerId) throw InvalidArgument("peer listed twice in the ring");
    }
  }
  RingPosition pos;
  pos.epoch = epoch;
  pos.size = ring.size();
  pos.rank = rank;
  pos.prevPeer = ring[(rank + ring.size() - 1) % ring.size()].peerId;
  pos.nextPeer = ring[(rank + 1) % ring.size()].peerId;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ring_ = pos;
    ringPeers_ = ring;
  }
  // Wait until the progress thread has moved on: the pools it keeps for `epoch` are
  // then known (rebinding_), and ensureConnected waits for them instead of opening more.
  // Their rebinds are on their way meanwhile.
  std::vector<uint64_t> ids;
  for (const PeerAddress& p : ring) ids.push_back(p.peerId);
  // Pools being opened ahead of this epoch (prepare) are kept for it once they are
  // open: wait for them (up to this call's timeout) rather than open second ones, and
  // then keep those that opened (rebindPools again: the pools kept by the first pass
  // are this epoch's already). A prepare done before the first pass is kept by it.
  auto preparingAny = [&] {
    for (uint64_t id : ids) {
      if (preparing_.count(id)) return true;
    }
    return false;
  };
  bool preparing = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    preparing = preparingAny();
  }
  postAndWait([this, epoch, ids] { setRingEpoch(epoch, ids); });
  const double waitSeconds = std::clamp(timeoutSeconds, 0.0, 1e7);
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(waitSeconds));
  {
    std::unique_lock<std::mutex> lock(mu_);
    prepareCv_.wait_until(lock, until, [&] {
      if (closed_ || !preparingAny()) return true;
      preparing = true;
      return false;
    });
  }
  if (preparing) postAndWait([this, epoch, ids] { rebindPools(epoch, ids); });
  if (ring.size() < 2) return;
  if (connectAll) {
    connectToAll(pos, ring, timeoutSeconds);
  } else {
    ensureConnected(ring[(rank + 1) % ring.size()], epoch, timeoutSeconds);
  }
}

void Engine::ensureConnected(const PeerAddress& peer, uint64_t epoch, double timeoutSeconds) {
  ensureConnected(std::vector<PeerAddress>{peer}, epoch, timeoutSeconds);
}

// How many connections a pool to a peer needs when the size is left to the engine
// (connectionsPerPeer == 0): enough windows to carry this peer's share of
// kAutoTargetBitsPerSecond over the measured round trip. One connection carries at most
// about two thirds of its send buffer per round trip (the rest is the kernel's
// bookkeeping): with this machine's caps (8 MiB explicit) that is about 450 Mbit/s at
// 100 ms, 1 connection below ~40 ms. `sharers`: the pools opened together, which the
// epoch's ops use at once (the direct algorithms send to every peer of the ring); they
// share this host's link, so each needs only its part. At N=4, RTT 50 ms, the default
// 4 MiB buffers, that is 1 connection per peer instead of 3, which measured up to 1.5x
// slower for the same 64 MiB all-reduce (docs/benchmarks.md, "Auto K by the link's share").
size_t autoPoolSize(double rttSeconds, size_t sendBufferBytes, size_t sharers) {
  if (rttSeconds <= 0 || sendBufferBytes == 0) return 1;
  const double windowBytes = static_cast<double>(sendBufferBytes) * 2.0 / 3.0;
  const double share = kAutoTargetBitsPerSecond / static_cast<double>(std::max<size_t>(sharers, 1));
  const double need = share / 8.0 * rttSeconds / windowBytes;
  return std::clamp<size_t>(static_cast<size_t>(std::ceil(need)), 1, kAutoMaxConnections);
}

// A pool of several connections has more window than the path's bandwidth-delay
// product (each connection's is sized for its part of the share, and rounding up adds
// more), and BBR lets each connection fill up to twice its estimate of that product:
// together they overflow a shallow queue at the bottleneck. At N=2 behind a 100 ms,
// 1 Gbit/s link with a 50 ms queue, 3 connections lost ~1,800 packets per 64 MiB
// all-reduce and took 0.86 s; each paced at a third of the share (x1.1), none were lost
// and it took 0.66 s (docs/benchmarks.md, "Pacing a pool at its share"). One connection
// is limited by its window (or is the whole pool): it is not paced.
uint64_t autoPacingRate(size_t sharers, size_t poolSize) {
  if (poolSize < 2) return 0;
  const double share = kAutoTargetBitsPerSecond / static_cast<double>(std::max<size_t>(sharers, 1));
  return static_cast<uint64_t>(share / 8.0 * kAutoPacingHeadroom / static_cast<double>(poolSize));
}

// The round trip is the smallest SYN round trip of the pool's first connections: a
// lost SYN-ACK makes one sample a second or more (the retransmission timer), which
// would size the pool for a link ten times longer than it is.
size_t Engine::poolSizeFor(const std::vector<Fd>& fds, size_t sharers) const {
  double rttSeconds = 0;
  int sndbuf = 0;
  for (const Fd& fd : fds) {
    int buf = 0;
    socklen_t blen = sizeof(buf);
    const double rtt = fd.valid() ? tcpState(fd.get()).rttSeconds : 0;
    if (rtt == 0 || ::getsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &buf, &blen) != 0 || buf <= 0) continue;
    if (rttSeconds == 0 || rtt < rttSeconds) rttSeconds = rtt;
    sndbuf = buf;
  }
  return autoPoolSize(rttSeconds, static_cast<size_t>(sndbuf), sharers);
}

void Engine::ensureConnected(const std::vector<PeerAddress>& targets, uint64_t epoch, double timeoutSeconds) {
  std::lock_guard<std::mutex> connectLock(connectMu_);
  // Pools kept from an older epoch (rebindPools) join this one when the peer's kRebound
  // arrives, about one round trip: the other pools open meanwhile. One that does not
  // come in time (the peer is stuck behind an op it has not posted, say) is given up
  // and opened afresh.
  std::vector<PeerAddress> kept, fresh;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const PeerAddress& peer : targets) (rebinding_.count(PoolKey{peer.peerId, epoch}) ? kept : fresh).push_back(peer);
  }
  const auto since = Clock::now();
  openMissing(fresh, epoch, timeoutSeconds, targets.size());
  if (kept.empty()) return;
  {
    const double waitSeconds = std::clamp(timeoutSeconds, 0.0, kRebindWaitSeconds);
    const auto until = since + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(waitSeconds));
    std::unique_lock<std::mutex> lock(mu_);
    auto settled = [&] {
      if (closed_) return true;
      for (const PeerAddress& peer : kept) {
        if (rebinding_.count(PoolKey{peer.peerId, epoch})) return false;
      }
      return true;
    };
    if (!rebindCv_.wait_until(lock, until, settled)) {
      for (const PeerAddress& peer : kept) {
        if (!rebinding_.count(PoolKey{peer.peerId, epoch})) continue;
        commands_.push_back([this, id = peer.peerId, epoch] { dropRebinding(id, epoch); });
      }
      lock.unlock();
      uint64_t one = 1;
      ssize_t n = ::write(wakeFd_.get(), &one, sizeof(one));
      (void)n;
      lock.lock();
      rebindCv_.wait(lock, settled);  // dropRebinding settles them at once
    }
  }
  openMissing(kept, epoch, timeoutSeconds, targets.size());  // given up, or broken since: opened afresh
}

void Engine::prepare(const std::vector<PeerAddress>& asked, uint64_t epoch, size_t sharers, double timeoutSeconds,
                     double warmSeconds, uint64_t warmBytes, double warmMinRttSeconds) {
  if (epoch >= kStateEpoch) throw InvalidArgument("prepare: not a ring epoch");
  for (const PeerAddress& p : asked) {
    if (p.peerId == options_.peerId) throw InvalidArgument("prepare: a pool to this peer itself");
  }
  // Not under connectMu_: the pools are to peers outside the current ring, and an epoch
  // that needs one of them waits for this call instead (setRing), so that it keeps the
  // pool rather than open a second one. A peer that does not answer delays only that.
  // A peer another prepare is opening a pool to already is left to that one (a join's
  // knock, then its welcome or "joining", name the same peers): two would open two.
  std::vector<PeerAddress> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const PeerAddress& p : asked) {
      if (preparing_.insert(p.peerId).second) peers.push_back(p);
    }
  }
  if (peers.empty()) return;
  struct Done {
    Engine* self;
    const std::vector<PeerAddress>& peers;
    ~Done() {
      {
        std::lock_guard<std::mutex> lock(self->mu_);
        for (const PeerAddress& p : peers) self->preparing_.erase(p.peerId);
      }
      self->prepareCv_.notify_all();
    }
  } done{this, peers};
  openMissing(peers, epoch, timeoutSeconds, std::max<size_t>(sharers, 1));
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(warmSeconds));
  std::vector<uint64_t> ids;
  for (const PeerAddress& p : peers) ids.push_back(p.peerId);
  post([this, ids, epoch, until, warmSeconds, warmBytes, warmMinRttSeconds] {
    // A newer epoch came first: a pool that was open then is kept already (or closed);
    // one that opened since is still of `epoch`, for that epoch's setRing to keep.
    const bool late = epoch < currentEpoch_;
    for (uint64_t id : ids) {
      auto it = outgoing_.find(PoolKey{id, epoch});
      if (it == outgoing_.end()) continue;  // broken already
      for (Connection* c : it->second) c->prepared = !c->carried;  // (a second prepare finds it warming)
      if (late || warmSeconds <= 0 || warmBytes == 0) continue;
      for (Connection* c : it->second) {
        if (tcpState(c->fd.get()).rttSeconds < warmMinRttSeconds) continue;  // a short link: slow start is quick
        startWarming(c, until, warmBytes);
      }
    }
  });
}

void Engine::openMissing(const std::vector<PeerAddress>& targets, uint64_t epoch, double timeoutSeconds,
                         size_t sharers) {
  const bool autoSize = options_.connectionsPerPeer == 0;
  struct Pool {
    const PeerAddress* peer;
    size_t size;  // 0: not known yet (auto: measured on its first connection)
    std::vector<Fd> fds;
  };
  std::vector<Pool> missing;
  // TCP connects a pool of unknown size starts with: the largest measured so far, or
  // the most a pool may have when nothing was measured yet (a joiner's first pools).
  // At least two: the pool is sized by the quicker SYN, so one lost SYN-ACK (a sample
  // of a second or more) does not size it for a link ten times longer.
  size_t guess = 2;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, k] : poolSize_) guess = std::max(guess, k);
    if (poolSize_.empty()) guess = kAutoMaxConnections;
    for (const PeerAddress& peer : targets) {
      size_t k = static_cast<size_t>(options_.connectionsPerPeer);
      if (autoSize) {
        auto known = poolSize_.find(peer.peerId);
        k = known == poolSize_.end() ? 0 : known->second;
      }
      auto it = liveOutgoing_.find(PoolKey{peer.peerId, epoch});
      if (k > 0 && it != liveOutgoing_.end() && it->second >= k) continue;
      if (it != liveOutgoing_.end() && it->second > 0) {
        if (k == 0) continue;  // a pool whose size is being measured is complete by construction
        // A partial pool (some connections broke): rebuild it whole.
        commands_.push_back([this, id = peer.peerId, epoch] {
          closePeer(id, epoch, epoch, ErrorKind::kPeerLost, "connection pool to peer " + std::to_string(id) + " is incomplete");
        });
      }
      missing.push_back(Pool{&peer, k, {}});
    }
  }
  if (missing.empty()) return;
  const auto started = Clock::now();
  struct CountTime {
    std::atomic<uint64_t>& nanos;
    Clock::time_point started;
    ~CountTime() {
      nanos += static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started).count());
    }
  } countTime{connectNanos_, started};
  if (timeoutSeconds < 0 || timeoutSeconds > 1e7) timeoutSeconds = 1e7;
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeoutSeconds));
  auto connectOne = [&](const PeerAddress& peer) {
    Fd fd = connectTcp(peer.host, peer.port, deadline, peer.peerId);
    tuneSocket(fd.get(), options_.socket);
    return fd;
  };
  // `fd`: a connection connectOne() made already (a sizing probe), else a new one.
  auto openOne = [&](const PeerAddress& peer, size_t index, size_t count, Fd fd) {
    if (!fd.valid()) fd = connectOne(peer);
    const Hello hello = makeHello(options_.peerId, epoch, static_cast<uint32_t>(index), static_cast<uint32_t>(count));
    connectHandshake(fd.get(), peer, hello, options_.secret, deadline);
    setNonBlocking(fd.get(), true);
    connectionsOpened_.fetch_add(1, std::memory_order_relaxed);
    return fd;
  };
  // Every connection of every missing pool opens at once: one after another, each
  // costs its own round trips (connect, then the handshake), K x peers times over on a
  // long link. A pool of unknown size first makes TCP connections (as many as the
  // largest pool measured so far, or kAutoMaxConnections), the quickest of which sizes
  // the pool by its round trip (the kernel's, from the SYN); then their handshakes,
  // and the connects and handshakes of any more it needs, go together: 2 round trips
  // when the guess was enough (the extra connections close before their handshake),
  // else 3; not 2 x 2.
  auto wave = [&](bool first) {
    std::vector<std::pair<Pool*, size_t>> jobs;  // (pool, connection index)
    for (Pool& pool : missing) {
      if (first) {
        if (pool.size == 0) {
          pool.fds.resize(guess);
          for (size_t i = 0; i < guess; ++i) jobs.emplace_back(&pool, i);
        }
        continue;
      }
      pool.fds.resize(pool.size);  // connected ones beyond the size close here, before any handshake
      for (size_t i = 0; i < pool.size; ++i) jobs.emplace_back(&pool, i);
    }
    std::vector<std::exception_ptr> errors(jobs.size());
    auto run = [&](size_t j) {
      try {
        auto [pool, i] = jobs[j];
        if (first) {
          pool->fds[i] = connectOne(*pool->peer);
        } else {
          pool->fds[i] = openOne(*pool->peer, i, pool->size, std::move(pool->fds[i]));
        }
      } catch (...) {
        errors[j] = std::current_exception();
      }
    };
    std::vector<std::thread> helpers;
    for (size_t j = 1; j < jobs.size(); ++j) helpers.emplace_back(run, j);
    if (!jobs.empty()) run(0);
    for (auto& t : helpers) t.join();
    for (auto& error : errors) {
      if (error) std::rethrow_exception(error);  // the opened ones close with `missing`
    }
    if (!first) return;
    for (Pool& pool : missing) {
      if (pool.size != 0) continue;
      pool.size = poolSizeFor(pool.fds, sharers);
      std::lock_guard<std::mutex> lock(mu_);
      poolSize_[pool.peer->peerId] = pool.size;
    }
  };
  wave(true);
  wave(false);
  for (Pool& pool : missing) {
    if (options_.connectionsPerPeer != 0) break;
    const uint64_t rate = autoPacingRate(sharers, pool.size);
    if (rate == 0) continue;
    for (Fd& fd : pool.fds) ::setsockopt(fd.get(), SOL_SOCKET, SO_MAX_PACING_RATE, &rate, sizeof(rate));
  }
  std::vector<std::pair<uint64_t, int>> fds;  // (peer, fd), each pool's in its order
  for (Pool& pool : missing) {
    for (Fd& fd : pool.fds) fds.emplace_back(pool.peer->peerId, fd.release());
  }
  // The progress thread owns the pools; wait until it has taken these, so the next
  // check (and the op posted next) sees them.
  try {
    postAndWait([this, fds, epoch] {
      for (const auto& [id, fd] : fds) addConnection(Fd(fd), id, epoch, /*outgoing=*/true, /*handshaking=*/false);
    });
  } catch (...) {
    for (const auto& [id, fd] : fds) ::close(fd);
    throw;
  }
}

size_t Engine::poolSize(uint64_t peer) const {
  if (options_.connectionsPerPeer > 0) return static_cast<size_t>(options_.connectionsPerPeer);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = poolSize_.find(peer);
  return it == poolSize_.end() ? 0 : it->second;
}

ScratchBuffer Engine::takeScratch(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = scratchPool_.end();
    for (auto it = scratchPool_.begin(); it != scratchPool_.end(); ++it) {
      if (it->size >= bytes && (best == scratchPool_.end() || it->size < best->size)) best = it;
    }
    if (best != scratchPool_.end()) {
      ScratchBuffer out = std::move(*best);
      scratchPool_.erase(best);
      return out;
    }
  }
  ScratchBuffer fresh;
  fresh.data.reset(new uint8_t[bytes]);
  fresh.size = bytes;
  return fresh;
}

void Engine::giveScratch(ScratchBuffer scratch) {
  if (!scratch.data) return;
  std::lock_guard<std::mutex> lock(mu_);
  scratchPool_.push_back(std::move(scratch));
  if (scratchPool_.size() > kScratchPoolSize) {
    auto smallest = std::min_element(scratchPool_.begin(), scratchPool_.end(),
                                     [](const ScratchBuffer& a, const ScratchBuffer& b) { return a.size < b.size; });
    scratchPool_.erase(smallest);
  }
}

std::shared_ptr<Collective> Engine::allReduce(const AllReduceOptions& in, double connectTimeoutSeconds) {
  AllReduceOptions options = in;
  const size_t esize = elementSize(options.dtype);
  if (!isValidReduceOp(static_cast<int>(options.op))) throw InvalidArgument("unknown reduce op");
  const bool quantized = options.quant.kind != QuantKind::kNone;
  if (quantized) {
    checkQuantizable(options.quant, options.dtype);
    if (options.op != ReduceOp::kSum && options.op != ReduceOp::kAvg) {
      throw InvalidArgument(std::string("a quantized all-reduce supports SUM and AVG only, not ") +
                            reduceOpName(options.op));
    }
  }
  const bool rsag = options.algorithm == AllReduceAlgorithm::kDirectRsAg;
  const bool direct = options.algorithm == AllReduceAlgorithm::kDirect || rsag;  // pools to every peer
  if (options.algorithm != AllReduceAlgorithm::kRing && !direct) throw InvalidArgument("unknown all-reduce algorithm");
  if (quantized && direct) throw InvalidArgument("a quantized all-reduce has its own algorithm: pass kRing");
  if (options.count > (SIZE_MAX / 2) / esize) throw InvalidArgument("element count too large");
  if (options.count > 0 && (options.input == nullptr || options.output == nullptr)) {
    throw InvalidArgument("null buffer");
  }
  if (options.segmentBytes == 0) options.segmentBytes = options_.segmentBytes;
  RingPosition pos;
  std::vector<PeerAddress> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw AbortedError("engine is closed");
    pos = ring_;
    peers = ringPeers_;
  }
  std::vector<uint64_t> ids;
  if (quantized || direct) {
    ids = connectToAll(pos, peers, connectTimeoutSeconds);
  } else if (pos.size > 1) {
    ensureConnected(peers[(pos.rank + 1) % pos.size], pos.epoch, connectTimeoutSeconds);
  }
  const size_t nbytes = options.count * esize;
  ScratchBuffer scratch;
  std::shared_ptr<Collective> op;
  if (quantized) {
    const size_t need = AllReduceQuantized::scratchBytes(options, pos.size);
    if (need > 0) scratch = takeScratch(need);
    if (ids.empty()) ids.push_back(options_.peerId);
    op = std::make_shared<AllReduceQuantized>(options, pos, std::move(ids), std::move(scratch));
  } else if (rsag) {
    const size_t need = AllReduceDirectRsAg::scratchBytes(options, pos.size);
    if (need > 0) scratch = takeScratch(need);
    op = std::make_shared<AllReduceDirectRsAg>(options, pos, std::move(ids), std::move(scratch));
  } else if (direct) {
    const size_t need = AllReduceDirect::scratchBytes(options, pos.size);
    if (need > 0) scratch = takeScratch(need);
    op = std::make_shared<AllReduceDirect>(options, pos, std::move(ids), std::move(scratch));
  } else {
    if (options.input == options.output && nbytes > 0 && pos.size > 1) scratch = takeScratch(nbytes);
    op = std::make_shared<AllReduceRing>(options, pos, std::move(scratch));
  }
  post([this, op] { startOp(op); });
  return op;
}

std::shared_ptr<StateFetch> Engine::fetchState(const PeerAddress& source, uint64_t exposure,
                                               std::vector<FetchChunk> chunks, double timeoutSeconds) {
  bool routed = false;
  postAndWait([&] { routed = !fetchRoute(source.peerId).empty(); });
  if (!routed) ensureConnected(source, kStateEpoch, timeoutSeconds);
  const uint64_t tag = (uint64_t{1} << 63) | nextFetchTag_++;
  auto op = std::make_shared<StateFetch>(tag, source.peerId, exposure, std::move(chunks), timeoutSeconds);
  post([this, op] { startOp(op); });
  return op;
}

void Engine::settle(const std::shared_ptr<Collective>& op, bool commit) {
  if (!op->done()) throw InvalidArgument("settle() needs a finished op");
  // Only a deferred op that succeeded, voted or defers its restore still holds its
  // scratch (retire() left it to us; it released the others' on the progress thread,
  // maybe just now).
  const bool held = op->state() == OpState::kSucceeded || op->voted();
  if (!op->holdsResult() || !(held || op->defersRestore())) return;
  if (commit && held) {
    op->commitResult();
  } else {
    op->rollback();
  }
  giveScratch(op->releaseScratch());
}

void Engine::abort(const std::shared_ptr<Collective>& op, const std::string& reason,
                   const std::vector<uint64_t>& keepIdleTo) {
  try {
    post([this, op, reason, keepIdleTo] {
      failOp(op.get(), ErrorKind::kAborted, "aborted: " + reason, kNoPeer, keepIdleTo.empty() ? nullptr : &keepIdleTo);
    });
  } catch (const AbortedError&) {
    // Engine closed: every op has already been failed.
  }
}

void Engine::disconnect(uint64_t peer, const std::string& reason) {
  post([this, peer, reason] { closePeer(peer, 0, UINT64_MAX, ErrorKind::kPeerLost, reason); });
}

bool Engine::nextEvent(Event* event, double timeoutSeconds) {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return !events_.empty() || closed_; };
  if (timeoutSeconds < 0) {
    eventsCv_.wait(lock, ready);
  } else if (!eventsCv_.wait_for(lock, std::chrono::duration<double>(timeoutSeconds), ready)) {
    return false;
  }
  if (events_.empty()) return false;
  *event = std::move(events_.front());
  events_.pop_front();
  return true;
}

// ---------------------------------------------------------------- progress thread

void Engine::run() {
  epoll_event events[64];
  while (!stopping_) {
    graveyard_.clear();
    int timeoutMs = 100;
    auto now = Clock::now();
    for (auto& [tag, op] : activeByTag_) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(op->deadline() - now).count() + 1;
      timeoutMs = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(timeoutMs, left)));
    }
    int n = ::epoll_wait(epollFd_.get(), events, 64, timeoutMs);
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < n && !stopping_; ++i) {
      void* tagPtr = events[i].data.ptr;
      if (tagPtr == &wakeFd_) {
        uint64_t count;
        ssize_t r = ::read(wakeFd_.get(), &count, sizeof(count));
        (void)r;
        drainCommands();
        continue;
      }
      if (tagPtr == &listenFd_) {
        acceptAll();
        continue;
      }
      auto* c = static_cast<Connection*>(tagPtr);
      if (c->dead) continue;
      const uint32_t ev = events[i].events;
      // On errors and hang-ups, read first: frames queued before a reset (an abort
      // with its reason, say) are still delivered; recv() reports the error after them.
      if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) failReadersByReference(c);
        if (c->paused && (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
          closeConnection(c, ErrorKind::kPeerLost, "peer " + std::to_string(c->peer) + " closed the connection", false);
          continue;
        }
        onReadable(c);
      }
      if (!c->dead && (ev & EPOLLOUT)) flush(c);
    }
    drainCommands();
    checkDeadlines();
    flushDirty();
  }
  // Shutdown: fail what is left, say goodbye, close everything.
  std::vector<std::shared_ptr<Collective>> ops;
  for (auto& [tag, op] : activeByTag_) ops.push_back(op);
  for (auto& op : ops) failOp(op.get(), ErrorKind::kAborted, "engine closed", kNoPeer);
  std::vector<Connection*> all;
  for (auto& [fd, c] : connections_) all.push_back(c.get());
  for (Connection* c : all) {
    if (c->dead || c->handshaking) continue;
    c->sendGoodbye();
    closeConnection(c, ErrorKind::kAborted, "engine closed", /*quiet=*/true);
  }
  graveyard_.clear();
  connections_.clear();
  listenFd_.reset();  // refuse new connections at once
}

void Engine::drainCommands() {
  for (;;) {
    std::function<void()> command;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (commands_.empty()) return;
      command = std::move(commands_.front());
      commands_.pop_front();
    }
    command();
    flushDirty();
  }
}

void Engine::setRingEpoch(uint64_t epoch, const std::vector<uint64_t>& ring) {
  currentEpoch_ = std::max(currentEpoch_, epoch);
  dropP2pBefore(currentEpoch_);
  // Ops of older epochs still running are over: they fail as closing their pools made
  // them fail (a connection kept for the new epoch must not keep them waiting).
  std::vector<std::shared_ptr<Collective>> stale;
  for (auto& [tag, op] : activeByTag_) {
    if (op->key().epoch < currentEpoch_ && !isP2pTag(tag)) stale.push_back(op);
  }
  for (auto& op : stale) {
    failOp(op.get(), ErrorKind::kAborted, "epoch " + std::to_string(currentEpoch_) + " replaced this op's epoch",
           kNoPeer, &ring);
  }
  // Pools of older epochs never carry another frame of theirs: kept for this one, or closed.
  rebindPools(currentEpoch_, ring);
  for (auto it = mailbox_.begin(); it != mailbox_.end();) {
    auto& box = it->second;
    for (auto f = box.begin(); f != box.end();) {
      if (f->header.epoch < currentEpoch_) {
        mailboxBytes_ -= f->payload.size();
        f = box.erase(f);
      } else {
        ++f;
      }
    }
    it = box.empty() ? mailbox_.erase(it) : std::next(it);
  }
  // A connection paused on an early frame of an older epoch's op reads on: the frame
  // is stale now (discarded), and what follows it (a peer's kRebind) is wanted.
  resumePaused();
}

void Engine::pushEvent(Event event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
    if (events_.size() > kMaxEvents) events_.pop_front();
  }
  eventsCv_.notify_all();
}

void Engine::startOp(const std::shared_ptr<Collective>& op) {
  const uint64_t tag = op->key().tag;
  if (activeByTag_.count(tag)) {
    op->fail(ErrorKind::kInvalid, "another op with tag " + std::to_string(tag) + " is still in flight");
    giveScratch(op->releaseScratch());
    return;
  }
  activeByTag_[tag] = op;
  if (op->key().epoch < kStateEpoch) releaseFetchClamps();  // its frames may come over a fetch's route
  maybeWithholdVotes(op.get());
  for (const Tombstone& t : tombstones_) {
    const OpKey& k = op->key();
    if (t.key.epoch == k.epoch && t.key.tag == k.tag && t.key.seq == k.seq) {
      failOp(op.get(), t.kind, "peer " + std::to_string(t.peer) + " failed this op: " + t.reason, t.peer);
      return;
    }
  }
  // Before the first request leaves: the worker faults the destination in while the
  // bytes are on their way.
  if (options_.prefault) prefaulter_.add(op.get(), op->landingRanges());
  Sink frames(this);
  try {
    op->start(frames);
  } catch (const Error& e) {
    failOp(op.get(), errorKindOf(e), e.what(), errorPeerOf(e));
  }
  // Replay frames that arrived before the op was posted. Taken out of the mailbox
  // first: a delivery can fail the op, and failing closes connections, which purges
  // mailbox entries.
  auto box = mailbox_.find(tag);
  if (box != mailbox_.end()) {
    std::deque<MailFrame> held = std::move(box->second);
    mailbox_.erase(box);
    std::deque<MailFrame> later;
    for (auto& frame : held) {
      mailboxBytes_ -= frame.payload.size();
      if (op->accepts(frame.header)) {
        deliverEarly(op, frame);
      } else if (!stepBefore(keyOf(frame.header), op->key())) {
        mailboxBytes_ += frame.payload.size();
        later.push_back(std::move(frame));
      }
    }
    if (!later.empty()) {
      auto& box2 = mailbox_[tag];
      for (auto& frame : later) box2.push_back(std::move(frame));
    }
  }
  // Frames left waiting in the kernel for this op reach it before it can be judged
  // complete (an op with nothing to exchange must still see a peer's mismatch).
  resumePaused();
  flushDirty();
  finishIfComplete(op.get());
}

void Engine::finishIfComplete(Collective* op) {
  if (op->state() != OpState::kRunning || !op->complete()) return;
  auto keep = op->shared_from_this();
  if (op->voting()) {
    bool ready = false;
    try {
      Sink frames(this);
      ready = op->readyToCommit(frames);
    } catch (const Error& e) {
      failOp(op, errorKindOf(e), e.what(), errorPeerOf(e));
      return;
    }
    if (!ready) {
      flushDirty();  // the vote goes out now; its send completion calls us again
      return;
    }
  }
  // Hand the scratch back before the waiter wakes: a caller that posts its next op at
  // once then finds it in the pool instead of allocating (and faulting in) a new one.
  if (!op->holdsResult()) giveScratch(op->releaseScratch());
  endPrefault(op);
  op->succeed();
  retire(op);
}

void Engine::endPrefault(Collective* op) {
  // The caller may free the destination once it sees the outcome: nothing of the
  // worker's may touch it after that. Usually the worker finished long ago.
  if (options_.prefault) prefaulter_.cancel(op);
}

void Engine::retire(Collective* op) {
  auto keep = op->shared_from_this();
  endPrefault(op);  // a failed op: before publish() lets its caller see the failure
  const uint64_t tag = op->key().tag;
  auto it = activeByTag_.find(tag);
  if (it != activeByTag_.end() && it->second.get() == op) {
    // A successful deferred op keeps its scratch (its result, or in place the input it
    // replaced) until settle().
    // So does one that failed after voting: the arbiter may still declare it a success.
    // A voting one keeps it whatever happened: its restore waits for settle().
    if (!((op->state() == OpState::kSucceeded || op->voted() || op->defersRestore()) && op->holdsResult())) {
      giveScratch(it->second->releaseScratch());
    }
    // Point-to-point tags are never reused (no late frame can find one: frames.cpp).
    if (!isP2pTag(tag)) lastDoneByTag_[tag] = Finished{op->key(), it->second->shapeDigest()};
    activeByTag_.erase(it);
  }
}

void Engine::failOp(Collective* op, ErrorKind kind, const std::string& message, uint64_t peer,
                    const std::vector<uint64_t>* keepIdleTo) {
  if (op->state() != OpState::kRunning) return;
  auto keep = op->shared_from_this();
  // The caller sees the failure only once the connections are closed (below): from then
  // on a neighbour still reading frames sent by reference knows they are from a failed
  // op (failReadersByReference), whatever the caller does with its buffers.
  op->fail(kind, message, peer, /*publish=*/false);
  if (isP2pTag(op->key().tag)) onP2pFailed(static_cast<PointToPoint*>(op), kind);
  struct PublishAtEnd {
    Collective* op;
    ~PublishAtEnd() { op->publish(); }
  } publishAtEnd{op};
  retire(op);
  // Poison: the neighbours' streams may hold frames of this op mid-flight.
  // A re-ring's peers whose connections hold nothing of the op keep them, warm, for the
  // new epoch (rebindPools): every frame of the op that still arrives is of an older
  // epoch than the engine's, so it is discarded, and nothing of it is left to send.
  struct Ctx {
    Engine* self;
    Collective* op;
    ErrorKind kind;
    std::string message;
    const std::vector<uint64_t>* keepIdleTo;
  } ctx{this, op, kind, message, keepIdleTo};
  op->forEachPeer(
      [](void* p, uint64_t id) {
        auto* x = static_cast<Ctx*>(p);
        const auto* keep = x->keepIdleTo;
        const bool stays = keep != nullptr && std::find(keep->begin(), keep->end(), id) != keep->end();
        if (stays && x->self->idleTo(id, x->op->poisonFloor(), x->op->key().epoch)) return;
        // Tell the neighbour which op failed and why (where the stream allows it), then
        // close: a neighbour that posts the op later fails at once with the reason.
        for (auto& [fd, c] : x->self->connections_) {
          if (c->peer == id && !c->dead && !c->handshaking && c->epoch == x->op->key().epoch) {
            c->sendAbort(x->op->key(), x->kind, x->message);
          }
        }
        x->self->closePeer(id, x->op->poisonFloor(), x->op->key().epoch, ErrorKind::kPeerLost,
                           "op failed: " + x->message);
      },
      &ctx);
}

void Engine::checkDeadlines() {
  auto now = Clock::now();
  std::vector<std::shared_ptr<Collective>> late;
  for (auto& [tag, op] : activeByTag_) {
    if (op->deadline() <= now) late.push_back(op);
  }
  for (auto& op : late) failOp(op.get(), ErrorKind::kTimeout, "timed out", kNoPeer);
  std::vector<Connection*> stuck;
  for (auto& [fd, c] : connections_) {
    if (c->handshaking && c->handshakeDeadline <= now) stuck.push_back(c.get());
  }
  for (Connection* c : stuck) closeConnection(c, ErrorKind::kTimeout, "handshake timed out", /*quiet=*/true);
}

}  // namespace pccl
