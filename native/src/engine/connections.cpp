// The engine's connections, on the progress thread: accepting and adding them, the
// pools of outgoing ones per (peer, epoch), queueing frames and flushing them, and
// closing, which fails the ops that needed a connection (transport/connection.cpp
// holds what a single stream does).
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include "pccl/engine.hpp"
#include "transport/connection.hpp"

namespace pccl {
namespace {

constexpr uint32_t kPaddingFrameBytes = 16u << 10;
// While a connection warms, the kernel holds at most about this much of its padding
// unsent (TCP_NOTSENT_LOWAT), a frame more in the queue: what comes next (a kRebind, an
// op's first frame) waits behind no more than that, even at the initial window.
constexpr int kWarmUnsentBytes = 16 << 10;

const uint8_t* paddingPayload() {
  static const std::vector<uint8_t> zeros(kPaddingFrameBytes);
  return zeros.data();
}

bool isPadding(const FrameHeader& h) { return h.type == static_cast<uint8_t>(FrameType::kPadding); }

}  // namespace

void Engine::acceptAll() {
  for (;;) {
    int fd = ::accept4(listenFd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or a transient error (EMFILE...): try again on the next event
    tuneSocket(fd, options_.socket);
    addConnection(Fd(fd), kNoPeer, 0, /*outgoing=*/false, /*handshaking=*/true);
  }
}

void Engine::addConnection(Fd fd, uint64_t peer, uint64_t epoch, bool outgoing, bool handshaking) {
  auto c = std::make_unique<Connection>();
  Connection* raw = c.get();
  raw->peer = peer;
  raw->epoch = epoch;
  raw->outgoing = outgoing;
  raw->handshaking = handshaking;
  auto timeout = std::chrono::duration<double>(options_.handshakeTimeoutSeconds);
  raw->handshakeDeadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout);
  raw->interest = EPOLLIN | EPOLLRDHUP;
  epoll_event ev{};
  ev.events = raw->interest;
  ev.data.ptr = raw;
  ::epoll_ctl(epollFd_.get(), EPOLL_CTL_ADD, fd.get(), &ev);
  int key = fd.get();
  raw->fd = std::move(fd);
  connections_[key] = std::move(c);
  if (outgoing) {
    outgoing_[PoolKey{peer, epoch}].push_back(raw);
    std::lock_guard<std::mutex> lock(mu_);
    ++liveOutgoing_[PoolKey{peer, epoch}];
  }
}

void Engine::queueFrame(Collective* op, uint64_t peer, size_t stripe, const FrameHeader& header,
                        const uint8_t* data) {
  Connection* c = nullptr;
  if (op->key().epoch == kStateEpoch) {  // a fetch: over the source's own pool, if it has one
    const std::vector<Connection*> route = fetchRoute(peer);
    if (!route.empty()) {
      c = route[stripe % route.size()];
      c->fetchRoute = true;
    }
  }
  if (c == nullptr) {
    auto it = outgoing_.find(PoolKey{peer, op->key().epoch});
    if (it == outgoing_.end() || it->second.empty()) {
      throw PeerLostError("no connection to peer " + std::to_string(peer) + " in epoch " +
                              std::to_string(op->key().epoch),
                          peer);
    }
    c = it->second[stripe % it->second.size()];
  }
  queueItem(c, SendItem{header, data, op->shared_from_this(), 0, nullptr, zeroCopy(c, *op, header)});
}

void Engine::queueItem(Connection* c, SendItem item) {
  stopWarming(c);  // what comes now is worth more than padding
  c->prepared = false;
  c->carried = true;
  if (!c->ringOffered && item.ringCandidate()) offerRing(c);
  c->sendq.push_back(std::move(item));
  if (!c->dirty) {
    c->dirty = true;
    dirty_.push_back(c);
  }
}

// The first large payload on a connection to a peer on this host offers the peer a
// shared ring (transport/shared_ring.hpp); payloads use it once the peer answers that it
// mapped it, and the stream until then or when it refuses.
void Engine::offerRing(Connection* c) {
  c->ringOffered = true;
  if (!options_.sharedMemory || c->handshaking || !c->peerIsLocal()) return;
  auto ring = SharedRing::create(options_.ringBytes);
  if (!ring) return;
  const RingOffer offer = ring->offer();
  c->txRing = std::move(ring);
  queueControl(c, makeHeader(FrameType::kRingOffer, OpKey{}),
               std::string(reinterpret_cast<const char*>(&offer), sizeof(offer)));
}

void Engine::onRingOffer(Connection* c, const std::vector<uint8_t>& payload) {
  RingOffer offer{};
  std::memcpy(&offer, payload.data(), sizeof(offer));
  // Refused: shared memory is off here, a ring is already mapped, the peer is on
  // another host, or its ring cannot be mapped from here (SharedRing::attach).
  bool mapped = false;
  if (options_.sharedMemory && !c->rxRing && c->peerIsLocal()) {
    c->rxRing = SharedRing::attach(offer);
    mapped = c->rxRing != nullptr;
  }
  const uint8_t refused = mapped ? 0 : 1;
  queueItem(c, SendItem{makeHeader(FrameType::kRingAnswer, OpKey{}, 0, 0, 0, refused), nullptr, nullptr});
}

void Engine::onRingAnswer(Connection* c, const FrameHeader& h) {
  if (!c->txRing || c->txRing->ready()) {
    closeConnection(c, ErrorKind::kProtocol, "peer " + std::to_string(c->peer) + " answered a ring never offered",
                    false);
    return;
  }
  if (h.phase == 0) {
    c->txRing->accepted();
  } else {
    c->txRing.reset();  // refused: payloads stay on the stream
  }
}

// A data frame whose payload is in the peer's ring (kFrameInRing), its sink decided:
// copied out (or skipped), then complete.
void Engine::takeFromRing(Connection* c) {
  uint8_t* dst = nullptr;
  if (c->sink == Connection::Sink::kOp) dst = c->dst;
  if (c->sink == Connection::Sink::kMailbox) dst = c->mail.data();
  c->rxRing->take(dst, c->header.length);
  c->payloadGot = c->header.length;
  countStateBytes(c, c->header.length);
  onFrameComplete(c);
}

// Large payloads of ops that allow it go by reference (Connection::preparePipe).
bool Engine::zeroCopy(Connection* c, const Collective& op, const FrameHeader& h) {
  if (!options_.zeroCopySend || h.length < kZeroCopyMinBytes || !op.sendsByReference()) return false;
  return c->preparePipe(h.length);
}

void Engine::flushDirty() {
  while (!dirty_.empty()) {
    std::vector<Connection*> batch;
    batch.swap(dirty_);
    for (Connection* c : batch) {
      c->dirty = false;
      if (!c->dead) flush(c);
    }
  }
}

void Engine::flush(Connection* c) {
  std::vector<std::shared_ptr<Collective>> sent;
  // A warming connection refills its padding while the socket takes it (a few turns at
  // most here; the next writable event brings the rest).
  for (int turn = 0; turn < 16; ++turn) {
    pad(c);
    if (const int err = c->write(sent, zeroCopyBytes_, ringBytes_)) {
      // The peer may have said why it reset the stream (an abort frame): read that first.
      onReadable(c);
      if (!c->dead) {
        closeConnection(c, ErrorKind::kPeerLost,
                        "send to peer " + std::to_string(c->peer) + " failed: " + std::strerror(err), false);
      }
      return;
    }
    if (!c->warming || !c->sendq.empty()) break;
  }
  updateInterest(c);
  for (auto& op : sent) finishIfComplete(op.get());
}

void Engine::startWarming(Connection* c, Clock::time_point until, uint64_t bytes) {
  if (c->dead || c->warming || bytes == 0) return;
  int lowat = 0;
  socklen_t len = sizeof(lowat);
  c->lowatBefore = ::getsockopt(c->fd.get(), IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, &len) == 0 ? lowat : -1;
  const int unsent = kWarmUnsentBytes;
  ::setsockopt(c->fd.get(), IPPROTO_TCP, TCP_NOTSENT_LOWAT, &unsent, sizeof(unsent));
  c->warming = true;
  c->warmUntil = until;
  c->warmLeft = bytes;
  flush(c);
}

void Engine::stopWarming(Connection* c) {
  if (!c->warming) return;
  c->warming = false;
  if (c->lowatBefore >= 0 && !c->dead) {
    ::setsockopt(c->fd.get(), IPPROTO_TCP, TCP_NOTSENT_LOWAT, &c->lowatBefore, sizeof(c->lowatBefore));
  }
}

void Engine::pad(Connection* c) {
  if (!c->warming) return;
  if (!c->sendq.empty()) return;
  // Done once TCP has left slow start: it has found what the path carries.
  if (c->dead || c->warmLeft == 0 || Clock::now() >= c->warmUntil || tcpState(c->fd.get()).leftSlowStart) {
    stopWarming(c);
    return;
  }
  const auto length = static_cast<uint32_t>(std::min<uint64_t>(kPaddingFrameBytes, c->warmLeft));
  OpKey key;
  key.epoch = c->epoch;
  c->sendq.push_back(SendItem{makeHeader(FrameType::kPadding, key, length), paddingPayload(), nullptr});
  c->warmLeft -= length;
  paddingBytes_.fetch_add(length, std::memory_order_relaxed);
}

void Engine::updateInterest(Connection* c) {
  if (c->dead) return;
  uint32_t want = EPOLLRDHUP | (c->paused ? 0u : static_cast<uint32_t>(EPOLLIN)) |
                  (c->sendq.empty() && !c->warming ? 0u : static_cast<uint32_t>(EPOLLOUT));
  if (want == c->interest) return;
  c->interest = want;
  epoll_event ev{};
  ev.events = want;
  ev.data.ptr = c;
  ::epoll_ctl(epollFd_.get(), EPOLL_CTL_MOD, c->fd.get(), &ev);
}

void Engine::closeConnection(Connection* c, ErrorKind kind, const std::string& reason, bool quiet) {
  if (c->dead) return;
  c->dead = true;
  const uint64_t peer = c->peer;
  ::epoll_ctl(epollFd_.get(), EPOLL_CTL_DEL, c->fd.get(), nullptr);
  if (c->sink == Connection::Sink::kMailbox) mailboxBytes_ -= c->mail.size();
  c->sendq.clear();
  c->rxOp.reset();
  if (c->rebinding) {
    c->rebinding = false;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = rebinding_.find(PoolKey{peer, c->rebindEpoch});
    if (it != rebinding_.end() && --it->second == 0) rebinding_.erase(it);
    rebindCv_.notify_all();
  } else if (c->outgoing) {
    const PoolKey key{peer, c->epoch};
    auto& pool = outgoing_[key];
    pool.erase(std::remove(pool.begin(), pool.end(), c), pool.end());
    if (pool.empty()) outgoing_.erase(key);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = liveOutgoing_.find(key);
    if (it != liveOutgoing_.end() && it->second > 0 && --it->second == 0) liveOutgoing_.erase(it);
  }
  c->resetIfUnsent();
  auto node = connections_.extract(c->fd.get());
  c->fd.reset();
  if (!node.empty()) graveyard_.push_back(std::move(node.mapped()));
  if (!quiet && !c->handshaking && peer != kNoPeer) {
    pushEvent(Event{EventKind::kPeerDisconnected, peer, reason});
  }
  if (peer == kNoPeer) return;
  // Frames held for later ops of this peer came from a stream that just broke.
  const uint64_t epoch = c->epoch;
  for (auto& [tag, box] : mailbox_) {
    for (auto it = box.begin(); it != box.end();) {
      if (it->peer == peer && it->header.epoch == epoch) {
        mailboxBytes_ -= it->payload.size();
        it = box.erase(it);
      } else {
        ++it;
      }
    }
  }
  std::vector<std::shared_ptr<Collective>> victims;
  for (auto& [tag, op] : activeByTag_) {
    const bool itsEpoch = epoch == UINT64_MAX || op->key().epoch == epoch;
    const bool itsRoute = c->fetchRoute && op->key().epoch == kStateEpoch;  // a fetch may be on it
    if (op->involves(peer) && (itsEpoch || itsRoute)) victims.push_back(op);
  }
  for (auto& op : victims) failOp(op.get(), kind, reason, peer);
  resumePaused();
}

// The predecessor closed a connection while an op still needs its frames. If the op
// sends by reference, so did the predecessor: its unread frames still refer to its
// pages, which it may rewrite once it has failed (settle(False) puts its input back).
// Fail the op now rather than read bytes that may no longer be the ones it sent: the
// predecessor cannot have committed, since this peer has not voted.
void Engine::failReadersByReference(Connection* c) {
  if (c->outgoing || c->handshaking) return;
  std::vector<std::shared_ptr<Collective>> doomed;
  for (auto& [tag, op] : activeByTag_) {
    if (op->key().epoch == c->epoch && op->sendsByReference() && op->awaitsDataFrom(c->peer)) doomed.push_back(op);
  }
  for (auto& op : doomed) {
    failOp(op.get(), ErrorKind::kPeerLost, "peer " + std::to_string(c->peer) + " closed the connection mid-op",
           c->peer);
  }
}

void Engine::closePeer(uint64_t peer, uint64_t minEpoch, uint64_t maxEpoch, ErrorKind kind, const std::string& reason) {
  std::vector<Connection*> doomed;
  for (auto& [fd, c] : connections_) {
    if (c->peer == peer && !c->dead && c->epoch >= minEpoch && c->epoch <= maxEpoch) doomed.push_back(c.get());
  }
  for (Connection* c : doomed) closeConnection(c, kind, reason, /*quiet=*/true);
}

namespace {

// Nothing of an op queued, half written or half read: padding does not count (it
// carries nothing, and a frame queued after it follows it on the stream).
bool idle(const Connection& c) {
  for (const SendItem& item : c.sendq) {
    if (!isPadding(item.header)) return false;
  }
  const bool reading = c.headerGot != 0 || c.sink != Connection::Sink::kNone;
  const bool readingPadding =
      c.headerGot == sizeof(FrameHeader) && c.sink == Connection::Sink::kDiscard && isPadding(c.header);
  return !c.dead && !c.paused && c.pipeBytes == 0 && (!reading || readingPadding);
}

}  // namespace

bool Engine::idleTo(uint64_t peer, uint64_t minEpoch, uint64_t maxEpoch) const {
  for (const auto& [fd, c] : connections_) {
    if (c->peer == peer && !c->dead && c->epoch >= minEpoch && c->epoch <= maxEpoch && !idle(*c)) return false;
  }
  return true;
}

void Engine::rebindPools(uint64_t epoch, const std::vector<uint64_t>& ring) {
  auto inRing = [&](uint64_t peer) {
    return peer != options_.peerId && std::find(ring.begin(), ring.end(), peer) != ring.end();
  };
  // The newest older pool to each peer of the ring, if it is whole and idle: nothing
  // queued or half read, no op left that involves the peer (setRingEpoch failed them).
  std::unordered_map<uint64_t, PoolKey> keep;
  for (auto& [key, pool] : outgoing_) {
    if (key.second >= epoch || key.second == kStateEpoch || !inRing(key.first)) continue;
    auto it = keep.find(key.first);
    if (it == keep.end() || it->second.second < key.second) keep[key.first] = key;
  }
  for (auto it = keep.begin(); it != keep.end();) {
    const auto& pool = outgoing_[it->second];
    size_t want = static_cast<size_t>(options_.connectionsPerPeer);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (want == 0) {
        auto size = poolSize_.find(it->first);
        want = size == poolSize_.end() ? 0 : size->second;
      }
      if (rebinding_.count(PoolKey{it->first, epoch})) want = 0;  // (one pool per epoch)
    }
    bool whole = want != 0 && pool.size() == want && !outgoing_.count(PoolKey{it->first, epoch});
    for (Connection* c : pool) whole = whole && idle(*c);
    it = whole ? std::next(it) : keep.erase(it);
  }
  std::vector<Connection*> old;
  for (auto& [fd, c] : connections_) {
    if (c->dead || c->handshaking || c->epoch >= epoch) continue;
    if (c->rebinding && c->rebindEpoch == epoch) continue;  // kept for this epoch already (a second pass)
    auto k = keep.find(c->peer);
    if (c->outgoing && k != keep.end() && k->second.second == c->epoch) continue;  // kept
    if (!c->outgoing && inRing(c->peer)) continue;  // its owner keeps it or closes it
    old.push_back(c.get());
  }
  for (Connection* c : old) {
    c->sendGoodbye();
    closeConnection(c, ErrorKind::kAborted, "epoch " + std::to_string(epoch) + " replaced this connection's epoch",
                    /*quiet=*/true);
  }
  OpKey key;
  key.epoch = epoch;
  const FrameHeader rebind = makeHeader(FrameType::kRebind, key);
  for (const auto& [peer, oldKey] : keep) {
    std::vector<Connection*> pool = std::move(outgoing_[oldKey]);
    outgoing_.erase(oldKey);
    bool early = true;
    for (Connection* c : pool) early = early && c->prepared;
    if (early) {  // opened ahead of this epoch: in its pool at once (kRebind still goes first)
      const PoolKey key{peer, epoch};
      {
        std::lock_guard<std::mutex> lock(mu_);
        liveOutgoing_.erase(oldKey);
        liveOutgoing_[key] += pool.size();
      }
      for (Connection* c : pool) {
        // Behind the padding queued so far; it warms on until the epoch's first frame.
        c->sendq.push_back(SendItem{rebind, nullptr, nullptr});
        c->prepared = false;
        c->carried = true;
        if (!c->dirty) {
          c->dirty = true;
          dirty_.push_back(c);
        }
        c->epoch = epoch;
        c->reboundEarly = true;
        outgoing_[key].push_back(c);
        connectionsKept_.fetch_add(1, std::memory_order_relaxed);
      }
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      liveOutgoing_.erase(oldKey);
      rebinding_[PoolKey{peer, epoch}] += pool.size();
    }
    for (Connection* c : pool) {
      c->rebinding = true;
      c->rebindEpoch = epoch;
      queueItem(c, SendItem{rebind, nullptr, nullptr});
    }
  }
}

void Engine::onRebind(Connection* c, const FrameHeader& h) {
  if (c->outgoing || h.epoch <= c->epoch || h.epoch >= kStateEpoch) {
    closeConnection(c, ErrorKind::kProtocol,
                    "peer " + std::to_string(c->peer) + " sent an unexpected rebind to epoch " + std::to_string(h.epoch),
                    false);
    return;
  }
  c->epoch = h.epoch;
  queueItem(c, SendItem{makeHeader(FrameType::kRebound, keyOf(h)), nullptr, nullptr});
}

void Engine::onRebound(Connection* c, const FrameHeader& h) {
  if (c->outgoing && c->reboundEarly && h.epoch == c->epoch) {
    c->reboundEarly = false;
    return;
  }
  if (!c->outgoing || !c->rebinding || h.epoch != c->rebindEpoch) {
    closeConnection(c, ErrorKind::kProtocol,
                    "peer " + std::to_string(c->peer) + " confirmed a rebind to epoch " + std::to_string(h.epoch) +
                        " that was not asked for",
                    false);
    return;
  }
  c->rebinding = false;
  c->epoch = h.epoch;
  const PoolKey key{c->peer, c->epoch};
  outgoing_[key].push_back(c);
  connectionsKept_.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mu_);
  ++liveOutgoing_[key];
  auto it = rebinding_.find(key);
  if (it != rebinding_.end() && --it->second == 0) rebinding_.erase(it);
  rebindCv_.notify_all();
}

void Engine::dropRebinding(uint64_t peer, uint64_t epoch) {
  std::vector<Connection*> doomed;
  for (auto& [fd, c] : connections_) {
    if (c->peer == peer && c->rebinding && c->rebindEpoch == epoch && !c->dead) doomed.push_back(c.get());
  }
  for (Connection* c : doomed) {
    c->sendGoodbye();  // an orderly close: the peer reports no lost peer for it
    closeConnection(c, ErrorKind::kTimeout, "peer " + std::to_string(peer) + " did not confirm a kept connection",
                    /*quiet=*/true);
  }
}

void Engine::resumePaused() {
  std::vector<Connection*> paused;
  for (auto& [fd, c] : connections_) {
    if (c->paused && !c->dead) paused.push_back(c.get());
  }
  for (Connection* c : paused) {
    if (c->dead) continue;
    c->paused = false;
    dispatchHeader(c);
    updateInterest(c);
  }
}

}  // namespace pccl
