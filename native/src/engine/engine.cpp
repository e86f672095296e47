#include "pccl/engine.hpp"

#include <linux/sockios.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <future>

#include "pccl/hmac.hpp"

namespace pccl {
namespace {

// The MAC one side of a handshake proves the shared secret with (wire.hpp).
Digest256 handshakeMac(const std::string& secret, const char* label, const uint8_t* nonceA, const uint8_t* nonceC,
                       const Hello& hello, uint64_t acceptorId) {
  std::string msg(label);
  msg.append(reinterpret_cast<const char*>(nonceA), kNonceBytes);
  msg.append(reinterpret_cast<const char*>(nonceC), kNonceBytes);
  auto put = [&msg](const void* p, size_t n) { msg.append(static_cast<const char*>(p), n); };
  put(&hello.peerId, sizeof(hello.peerId));
  put(&acceptorId, sizeof(acceptorId));
  put(&hello.epoch, sizeof(hello.epoch));
  put(&hello.connIndex, sizeof(hello.connIndex));
  put(&hello.poolSize, sizeof(hello.poolSize));
  return hmacSha256(secret, msg.data(), msg.size());
}

constexpr size_t kMaxIov = 64;
constexpr uint32_t kZeroCopyMinBytes = 32u << 10;  // smaller payloads are copied
constexpr size_t kPipeMaxBytes = 1u << 20;         // the default fs.pipe-max-size
constexpr int kReadBudget = 64;  // frames or reads per connection per loop turn (fairness)
constexpr size_t kScratchPoolSize = 4;
constexpr size_t kMaxEvents = 4096;

}  // namespace

struct Engine::SendItem {
  FrameHeader header;
  const uint8_t* data;
  std::shared_ptr<Collective> op;  // null for control frames and state answers
  uint64_t exposure = 0;           // state answers: the exposure `data` points into
  std::shared_ptr<std::string> hold = nullptr;  // owns `data` when the engine made it
  bool splice = false;  // payload sent by reference (vmsplice + splice), not copied
};

struct Engine::MailFrame {
  FrameHeader header;
  uint64_t peer;
  std::vector<uint8_t> payload;
};

struct Engine::Connection {
  enum class Sink { kNone, kOp, kMailbox, kDiscard, kControl };

  Fd fd;
  uint64_t peer = kNoPeer;
  uint64_t epoch = 0;  // the epoch whose pool it belongs to (UINT64_MAX: not tied to one)
  bool outgoing = false;
  bool handshaking = false;
  bool dead = false;
  bool goodbye = false;  // the peer announced an orderly close
  bool paused = false;   // a header waits for room in the mailbox
  Clock::time_point handshakeDeadline;
  uint32_t interest = 0;

  Hello hello{};
  size_t helloGot = 0;
  bool awaitingProof = false;     // HelloAck sent with a challenge; AuthProof expected
  uint8_t nonce[kNonceBytes]{};   // the challenge sent
  AuthProof proof{};
  size_t proofGot = 0;

  FrameHeader header{};
  size_t headerGot = 0;
  Sink sink = Sink::kNone;
  std::shared_ptr<Collective> rxOp;
  uint8_t* dst = nullptr;
  std::vector<uint8_t> mail;
  size_t payloadGot = 0;

  std::deque<SendItem> sendq;
  size_t headSent = 0;  // bytes of the head item (header, then payload) already written
  // Zero-copy sends: a payload is vmspliced into this pipe (the pipe then refers to the
  // caller's pages) and spliced from it into the socket. pipeBytes: still in the pipe.
  Fd pipeRead, pipeWrite;
  size_t pipeBytes = 0;
  size_t pipeCapacity = 0;  // what F_SETPIPE_SZ was last asked for (or gave)
  bool dirty = false;
};

class Engine::Sink : public FrameSink {
 public:
  explicit Sink(Engine* engine) : engine_(engine) {}
  void sendFrame(Collective* op, uint64_t peer, size_t stripe, const FrameHeader& header,
                 const uint8_t* data) override {
    auto it = engine_->outgoing_.find(PoolKey{peer, op->key().epoch});
    if (it == engine_->outgoing_.end() || it->second.empty()) {
      throw PeerLostError("no connection to peer " + std::to_string(peer) + " in epoch " +
                              std::to_string(op->key().epoch),
                          peer);
    }
    Connection* c = it->second[stripe % it->second.size()];
    c->sendq.push_back(SendItem{header, data, op->shared_from_this(), 0, nullptr,
                                engine_->zeroCopy(c, *op, header)});
    if (!c->dirty) {
      c->dirty = true;
      engine_->dirty_.push_back(c);
    }
  }

 private:
  Engine* engine_;
};

// ---------------------------------------------------------------- caller side

Engine::Engine(const EngineOptions& options) : options_(options), prefaulter_(PrefaultOptions{}) {
  if (options_.connectionsPerPeer < 1 || options_.connectionsPerPeer > 64) {
    throw InvalidArgument("connectionsPerPeer must be in [1, 64]");
  }
  if (options_.segmentBytes < 64) throw InvalidArgument("segmentBytes must be at least 64");
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

void Engine::setRing(uint64_t epoch, const std::vector<PeerAddress>& ring, size_t rank, double timeoutSeconds) {
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
  post([this, epoch] { setRingEpoch(epoch); });
  if (ring.size() > 1) ensureConnected(ring[(rank + 1) % ring.size()], epoch, timeoutSeconds);
}

void Engine::ensureConnected(const PeerAddress& peer, uint64_t epoch, double timeoutSeconds) {
  std::lock_guard<std::mutex> connectLock(connectMu_);
  const size_t k = static_cast<size_t>(options_.connectionsPerPeer);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = liveOutgoing_.find(PoolKey{peer.peerId, epoch});
    if (it != liveOutgoing_.end() && it->second >= k) return;
    if (it != liveOutgoing_.end() && it->second > 0) {
      // A partial pool (some connections broke): rebuild it whole.
      commands_.push_back([this, id = peer.peerId, epoch] {
        closePeer(id, epoch, epoch, ErrorKind::kPeerLost, "connection pool to peer " + std::to_string(id) + " is incomplete");
      });
    }
  }
  if (timeoutSeconds < 0 || timeoutSeconds > 1e7) timeoutSeconds = 1e7;
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeoutSeconds));
  std::vector<int> fds;
  try {
    for (size_t i = 0; i < k; ++i) {
      Fd fd = connectTcp(peer.host, peer.port, deadline, peer.peerId);
      tuneSocket(fd.get(), options_.socket);
      Hello hello{kHelloMagic, kProtocolVersion, options_.peerId, epoch, static_cast<uint32_t>(i),
                  static_cast<uint32_t>(k)};
      sendExact(fd.get(), &hello, sizeof(hello), deadline, peer.peerId);
      HelloAck ack{};
      recvExact(fd.get(), &ack, sizeof(ack), deadline, peer.peerId);
      if (ack.magic != kHelloMagic) throw ProtocolError("peer at " + peer.host + " did not answer the handshake", peer.peerId);
      if (ack.status != static_cast<uint32_t>(HelloStatus::kOk)) {
        throw ProtocolError("peer " + std::to_string(peer.peerId) + " refused the connection (status " +
                                std::to_string(ack.status) + ", protocol version " + std::to_string(kProtocolVersion) + ")",
                            peer.peerId);
      }
      if (ack.peerId != peer.peerId) {
        throw ProtocolError("the peer at " + peer.host + ":" + std::to_string(peer.port) + " is peer " +
                                std::to_string(ack.peerId) + ", expected " + std::to_string(peer.peerId),
                            peer.peerId);
      }
      if ((ack.flags & kHelloAuth) || !options_.secret.empty()) authenticateOutgoing(fd.get(), peer, ack, hello, deadline);
      setNonBlocking(fd.get(), true);
      fds.push_back(fd.release());
    }
  } catch (...) {
    for (int fd : fds) ::close(fd);
    throw;
  }
  // The progress thread owns the pools; wait until it has taken these, so the next
  // check (and the op posted next) sees them.
  auto added = std::make_shared<std::promise<void>>();
  auto ready = added->get_future();
  try {
    post([this, fds, added, id = peer.peerId, epoch] {
      for (int fd : fds) addConnection(Fd(fd), id, epoch, /*outgoing=*/true, /*handshaking=*/false);
      added->set_value();
    });
  } catch (...) {
    for (int fd : fds) ::close(fd);
    throw;
  }
  ready.wait();
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
  if (pos.size > 1 && quantized) {
    for (size_t i = 1; i < pos.size; ++i) ensureConnected(peers[(pos.rank + i) % pos.size], pos.epoch, connectTimeoutSeconds);
  } else if (pos.size > 1) {
    ensureConnected(peers[(pos.rank + 1) % pos.size], pos.epoch, connectTimeoutSeconds);
  }
  const size_t nbytes = options.count * esize;
  ScratchBuffer scratch;
  std::shared_ptr<Collective> op;
  if (quantized) {
    const size_t need = AllReduceQuantized::scratchBytes(options, pos.size);
    if (need > 0) scratch = takeScratch(need);
    std::vector<uint64_t> ids;
    for (const auto& p : peers) ids.push_back(p.peerId);
    if (ids.empty()) ids.push_back(options_.peerId);
    op = std::make_shared<AllReduceQuantized>(options, pos, std::move(ids), std::move(scratch));
  } else {
    if (options.input == options.output && nbytes > 0 && pos.size > 1) scratch = takeScratch(nbytes);
    op = std::make_shared<AllReduceRing>(options, pos, std::move(scratch));
  }
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

void Engine::abort(const std::shared_ptr<Collective>& op, const std::string& reason) {
  try {
    post([this, op, reason] { failOp(op.get(), ErrorKind::kAborted, "aborted: " + reason, kNoPeer); });
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
    sendGoodbye(c);
    closeConnection(c, ErrorKind::kAborted, "engine closed", /*quiet=*/true);
  }
  graveyard_.clear();
  connections_.clear();
  listenFd_.reset();  // refuse new connections at once
}

void Engine::sendGoodbye(Connection* c) {
  if (!c->sendq.empty()) return;  // mid-frame: a bare EOF is all the peer can get
  FrameHeader bye = makeHeader(FrameType::kGoodbye, OpKey{});
  ssize_t w = ::send(c->fd.get(), &bye, sizeof(bye), MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)w;
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

void Engine::authenticateOutgoing(int fd, const PeerAddress& peer, const HelloAck& ack, const Hello& hello,
                                  Clock::time_point deadline) {
  const std::string who = "peer " + std::to_string(peer.peerId) + " at " + peer.host + ":" + std::to_string(peer.port);
  if (options_.secret.empty()) {
    throw AuthError(who + " requires a shared secret and this peer has none (set PCCL_SECRET)", peer.peerId);
  }
  if (!(ack.flags & kHelloAuth)) {
    throw AuthError(who + " does not authenticate (it has no shared secret); refusing to connect", peer.peerId);
  }
  AuthProof proof{};
  randomBytes(proof.nonce, kNonceBytes);
  Digest256 mine = handshakeMac(options_.secret, kConnectorLabel, ack.nonce, proof.nonce, hello, peer.peerId);
  std::memcpy(proof.mac, mine.data(), kMacBytes);
  sendExact(fd, &proof, sizeof(proof), deadline, peer.peerId);
  AuthResult result{};
  recvExact(fd, &result, sizeof(result), deadline, peer.peerId);
  if (result.magic != kHelloMagic) throw ProtocolError(who + " sent a malformed authentication result", peer.peerId);
  if (result.status != static_cast<uint32_t>(HelloStatus::kOk)) {
    throw AuthError(who + " refused the connection: authentication failed (the shared secrets differ)", peer.peerId);
  }
  Digest256 theirs = handshakeMac(options_.secret, kAcceptorLabel, ack.nonce, proof.nonce, hello, peer.peerId);
  if (!constantTimeEqual(theirs.data(), result.mac, kMacBytes)) {
    throw AuthError(who + " failed to prove the shared secret", peer.peerId);
  }
}

bool Engine::readAuthProof(Connection* c) {
  auto* dst = reinterpret_cast<uint8_t*>(&c->proof);
  ssize_t n = ::recv(c->fd.get(), dst + c->proofGot, sizeof(AuthProof) - c->proofGot, 0);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
    closeConnection(c, ErrorKind::kPeerLost, "handshake aborted", /*quiet=*/true);
    return false;
  }
  if (n < 0) return false;
  c->proofGot += static_cast<size_t>(n);
  if (c->proofGot < sizeof(AuthProof)) return true;
  Digest256 expected = handshakeMac(options_.secret, kConnectorLabel, c->nonce, c->proof.nonce, c->hello, options_.peerId);
  AuthResult result{kHelloMagic, static_cast<uint32_t>(HelloStatus::kOk), {}};
  const bool ok = constantTimeEqual(expected.data(), c->proof.mac, kMacBytes);
  if (ok) {
    Digest256 mine = handshakeMac(options_.secret, kAcceptorLabel, c->nonce, c->proof.nonce, c->hello, options_.peerId);
    std::memcpy(result.mac, mine.data(), kMacBytes);
  } else {
    result.status = static_cast<uint32_t>(HelloStatus::kAuthFailed);
  }
  ssize_t w = ::send(c->fd.get(), &result, sizeof(result), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (!ok || w != static_cast<ssize_t>(sizeof(result))) {
    // Established connections are untouched: only this one closes.
    closeConnection(c, ErrorKind::kProtocol, "authentication failed", /*quiet=*/true);
    return false;
  }
  c->awaitingProof = false;
  c->peer = c->hello.peerId;
  c->epoch = c->hello.epoch;
  c->handshaking = false;
  return true;
}

bool Engine::readHandshake(Connection* c) {
  if (c->awaitingProof) return readAuthProof(c);
  auto* dst = reinterpret_cast<uint8_t*>(&c->hello);
  ssize_t n = ::recv(c->fd.get(), dst + c->helloGot, sizeof(Hello) - c->helloGot, 0);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
    closeConnection(c, ErrorKind::kPeerLost, "handshake aborted", /*quiet=*/true);
    return false;
  }
  if (n < 0) return false;
  c->helloGot += static_cast<size_t>(n);
  if (c->helloGot < sizeof(Hello)) return true;
  HelloAck ack{kHelloMagic, static_cast<uint32_t>(HelloStatus::kOk), options_.peerId, 0, 0, {}};
  bool ok = true;
  if (c->hello.magic != kHelloMagic) {
    ack.status = static_cast<uint32_t>(HelloStatus::kBadMagic);
    ok = false;
  } else if (c->hello.version != kProtocolVersion) {
    ack.status = static_cast<uint32_t>(HelloStatus::kBadVersion);
    ok = false;
  }
  const bool challenge = ok && !options_.secret.empty();
  if (challenge) {
    try {
      randomBytes(c->nonce, kNonceBytes);
    } catch (const Error&) {
      closeConnection(c, ErrorKind::kProtocol, "no randomness for the handshake", /*quiet=*/true);
      return false;
    }
    ack.flags = kHelloAuth;
    std::memcpy(ack.nonce, c->nonce, kNonceBytes);
  }
  ssize_t w = ::send(c->fd.get(), &ack, sizeof(ack), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (!ok || w != static_cast<ssize_t>(sizeof(ack))) {
    closeConnection(c, ErrorKind::kProtocol, "handshake refused", /*quiet=*/true);
    return false;
  }
  if (challenge) {
    c->awaitingProof = true;  // peer and epoch are set once the proof checks out
    return true;
  }
  c->peer = c->hello.peerId;
  c->epoch = c->hello.epoch;
  c->handshaking = false;
  return true;
}

void Engine::onReadable(Connection* c) {
  for (int budget = kReadBudget; budget > 0 && !c->dead && !c->paused && !stopping_; --budget) {
    if (c->handshaking) {
      if (!readHandshake(c)) return;
      continue;
    }
    uint8_t* target;
    size_t want;
    if (c->headerGot < sizeof(FrameHeader)) {
      target = reinterpret_cast<uint8_t*>(&c->header) + c->headerGot;
      want = sizeof(FrameHeader) - c->headerGot;
    } else {
      const size_t left = c->header.length - c->payloadGot;
      switch (c->sink) {
        case Connection::Sink::kOp:
          target = c->dst + c->payloadGot;
          want = left;
          break;
        case Connection::Sink::kMailbox:
        case Connection::Sink::kControl:
          target = c->mail.data() + c->payloadGot;
          want = left;
          break;
        default:
          target = discard_.data();
          want = std::min(left, discard_.size());
          break;
      }
    }
    ssize_t n = ::recv(c->fd.get(), target, want, 0);
    if (n == 0) {
      closeConnection(c, ErrorKind::kPeerLost, "peer " + std::to_string(c->peer) + " closed the connection",
                      /*quiet=*/c->goodbye);
      return;
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      closeConnection(c, ErrorKind::kPeerLost,
                      "connection to peer " + std::to_string(c->peer) + " broke: " + std::strerror(errno), false);
      return;
    }
    if (c->headerGot < sizeof(FrameHeader)) {
      c->headerGot += static_cast<size_t>(n);
      if (c->headerGot == sizeof(FrameHeader)) dispatchHeader(c);
    } else {
      c->payloadGot += static_cast<size_t>(n);
      if (c->payloadGot == c->header.length) onFrameComplete(c);
    }
  }
}

void Engine::dispatchHeader(Connection* c) {
  const FrameHeader& h = c->header;
  const bool data = h.type == static_cast<uint8_t>(FrameType::kData) ||
                    h.type == static_cast<uint8_t>(FrameType::kStateData);
  const bool goodbye = h.type == static_cast<uint8_t>(FrameType::kGoodbye);
  const bool abort = h.type == static_cast<uint8_t>(FrameType::kAbort);
  const bool stateCtl = h.type == static_cast<uint8_t>(FrameType::kStateRequest) ||
                        h.type == static_cast<uint8_t>(FrameType::kStateRefused);
  const bool vote = h.type == static_cast<uint8_t>(FrameType::kCommit);
  if (h.magic != kFrameMagic || h.length > kMaxFramePayload || (data && h.length == 0) ||
      ((goodbye || vote) && h.length != 0) || (abort && h.length > kMaxAbortReason) ||
      !(data || goodbye || abort || stateCtl || vote)) {
    closeConnection(c, ErrorKind::kProtocol, "malformed frame from peer " + std::to_string(c->peer), false);
    return;
  }
  c->payloadGot = 0;
  if (h.type == static_cast<uint8_t>(FrameType::kGoodbye)) {
    c->goodbye = true;
    c->headerGot = 0;
    return;
  }
  if (abort) {
    c->mail.resize(h.length);
    c->sink = Connection::Sink::kControl;
    if (h.length == 0) onFrameComplete(c);
    return;
  }
  const bool stateControl = h.type == static_cast<uint8_t>(FrameType::kStateRequest) ||
                            h.type == static_cast<uint8_t>(FrameType::kStateRefused);
  if (stateControl) {
    if (c->epoch != kStateEpoch || h.length > kMaxAbortReason ||
        (h.type == static_cast<uint8_t>(FrameType::kStateRequest) && h.length != sizeof(StateRequest))) {
      closeConnection(c, ErrorKind::kProtocol, "malformed state frame from peer " + std::to_string(c->peer), false);
      return;
    }
    c->mail.resize(h.length);
    c->sink = Connection::Sink::kControl;
    if (h.length == 0) onFrameComplete(c);
    return;
  }
  if (h.epoch != c->epoch) {
    closeConnection(c, ErrorKind::kProtocol,
                    "peer " + std::to_string(c->peer) + " sent a frame of epoch " + std::to_string(h.epoch) +
                        " on a connection of epoch " + std::to_string(c->epoch),
                    false);
    return;
  }
  auto it = activeByTag_.find(h.tag);
  if (it != activeByTag_.end() && it->second->accepts(h)) {
    const auto& op = it->second;
    try {
      if (vote) {
        op->checkVote(c->peer, h);
      } else {
        c->dst = op->receiveTarget(c->peer, h);
      }
    } catch (const Error& e) {
      auto keep = op;
      failOp(keep.get(), errorKindOf(e), e.what(), errorPeerOf(e));
      closeConnection(c, errorKindOf(e), e.what(), /*quiet=*/true);
      return;
    }
    c->rxOp = op;
    c->sink = Connection::Sink::kOp;
  } else if (h.type == static_cast<uint8_t>(FrameType::kStateData)) {
    c->sink = Connection::Sink::kDiscard;  // answer to a fetch that has ended: never held
  } else {
    bool stale = h.epoch < currentEpoch_;
    if (it != activeByTag_.end()) {
      stale = stale || stepBefore(keyOf(h), it->second->key());
    } else {
      auto done = lastDoneByTag_.find(h.tag);
      if (done != lastDoneByTag_.end() && sameStep(done->second.key, keyOf(h)) && done->second.digest != h.digest) {
        // Our side of this op already finished (e.g. with nothing to send), but the
        // sender's op has another shape: it would wait forever. Tell it why.
        const std::string why = "peers disagree on the all-reduce: peer " + std::to_string(options_.peerId) +
                                " ran it with a different element count, dtype, operator or world size";
        struct Shape : Collective {
          explicit Shape(OpKey k) : Collective(k, 1) {}
          void start(FrameSink&) override {}
          uint8_t* receiveTarget(uint64_t, const FrameHeader&) override { return nullptr; }
          void onReceived(FrameSink&, const FrameHeader&) override {}
          bool complete() const override { return false; }
          bool involves(uint64_t) const override { return false; }
          void forEachPeer(void (*)(void*, uint64_t), void*) const override {}
        } shape(done->second.key);
        sendAbort(c, shape, ErrorKind::kProtocol, why);
        closeConnection(c, ErrorKind::kProtocol, why, /*quiet=*/true);
        return;
      }
      stale = stale || (done != lastDoneByTag_.end() && !stepBefore(done->second.key, keyOf(h)));
    }
    if (stale) {
      c->sink = Connection::Sink::kDiscard;
    } else {
      // Early frame of an op this peer has not posted yet. With no op running, leave
      // it in the kernel (stop reading this connection: TCP pushes back on the sender)
      // until an op is posted; that costs no copy. The same when the only op running
      // is the one before it on its tag: a connection carries a sender's frames in
      // order, so nothing that op still needs can queue behind this frame (a peer that
      // finished first no longer makes its neighbour copy its next op through the
      // mailbox). With other ops running, their frames may queue behind it, so hold it
      // in the mailbox (up to a cap) instead.
      const bool onlyItsTag = activeByTag_.size() == 1 && activeByTag_.begin()->first == h.tag;
      if (activeByTag_.empty() || onlyItsTag || mailboxBytes_ + h.length > options_.mailboxLimitBytes) {
        c->paused = true;
        updateInterest(c);
        return;
      }
      c->mail.resize(h.length);
      mailboxBytes_ += h.length;
      c->sink = Connection::Sink::kMailbox;
    }
  }
  if (h.length == 0) onFrameComplete(c);
}

void Engine::onFrameComplete(Connection* c) {
  FrameHeader h = c->header;
  auto sink = c->sink;
  auto op = std::move(c->rxOp);
  c->headerGot = 0;
  c->payloadGot = 0;
  c->sink = Connection::Sink::kNone;
  c->dst = nullptr;
  if (sink == Connection::Sink::kOp) {
    if (op->state() == OpState::kRunning) {
      try {
        Sink frames(this);
        if (h.type == static_cast<uint8_t>(FrameType::kCommit)) {
          op->onVote(h);
        } else {
          op->onReceived(frames, h);
        }
      } catch (const Error& e) {
        failOp(op.get(), errorKindOf(e), e.what(), errorPeerOf(e));
      }
      finishIfComplete(op.get());
    }
  } else if (sink == Connection::Sink::kControl) {
    std::vector<uint8_t> payload = std::move(c->mail);
    c->mail = {};
    std::string text(payload.begin(), payload.end());
    if (h.type == static_cast<uint8_t>(FrameType::kAbort)) {
      onAbortFrame(c, h, text);
    } else if (h.type == static_cast<uint8_t>(FrameType::kStateRequest)) {
      onStateRequest(c, h, payload);
    } else {  // kStateRefused
      auto it = activeByTag_.find(h.tag);
      if (it != activeByTag_.end() && it->second->key().epoch == kStateEpoch) {
        auto op = it->second;
        failOp(op.get(), ErrorKind::kPeerLost, "peer " + std::to_string(c->peer) + " refused: " + text, c->peer);
      }
    }
  } else if (sink == Connection::Sink::kMailbox) {
    MailFrame frame{h, c->peer, std::move(c->mail)};
    c->mail = {};
    // Its op may have been posted while the payload was still arriving.
    auto it = activeByTag_.find(h.tag);
    if (it != activeByTag_.end() && it->second->accepts(h)) {
      auto active = it->second;
      mailboxBytes_ -= frame.payload.size();
      deliverEarly(active, frame);
      finishIfComplete(active.get());
    } else {
      mailbox_[h.tag].push_back(std::move(frame));
    }
  }
  flushDirty();
}

void Engine::deliverEarly(const std::shared_ptr<Collective>& op, const MailFrame& frame) {
  if (op->state() != OpState::kRunning) return;
  try {
    if (frame.header.type == static_cast<uint8_t>(FrameType::kCommit)) {
      op->checkVote(frame.peer, frame.header);
      op->onVote(frame.header);
      return;
    }
    uint8_t* dst = op->receiveTarget(frame.peer, frame.header);
    std::memcpy(dst, frame.payload.data(), frame.header.length);
    Sink frames(this);
    op->onReceived(frames, frame.header);
  } catch (const Error& e) {
    failOp(op.get(), errorKindOf(e), e.what(), errorPeerOf(e));
  }
}

// Zero-copy send: the payload is vmspliced into the connection's pipe (the pipe then
// refers to the caller's pages) and spliced into the socket, so the kernel copies it
// once, into the receiver, instead of twice. The catch: a byte changed after the frame
// was queued but before the receiver read it arrives changed. Only ops that say this
// cannot matter (Collective::sendsByReference) go this way, and only payloads large
// enough for the pipe's two extra system calls to pay.
bool Engine::zeroCopy(Connection* c, const Collective& op, const FrameHeader& h) {
  if (!options_.zeroCopySend || h.length < kZeroCopyMinBytes || !op.sendsByReference()) return false;
  if (!c->pipeWrite.valid()) {
    int p[2];
    if (::pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) return false;  // copy instead
    c->pipeRead.reset(p[0]);
    c->pipeWrite.reset(p[1]);
  }
  // Room for a whole segment (plus the pages an unaligned one straddles); the kernel
  // may refuse (pipe-max-size, the user's pipe quota), and then it goes in pieces.
  const size_t want = std::min<size_t>(kPipeMaxBytes, (h.length + (8u << 10) + 4095) & ~size_t(4095));
  if (c->pipeCapacity < want) {
    const int got = ::fcntl(c->pipeWrite.get(), F_SETPIPE_SZ, static_cast<int>(want));
    c->pipeCapacity = got > 0 ? static_cast<size_t>(got) : want;  // refused: don't ask again per frame
  }
  return true;
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
  std::vector<std::shared_ptr<Collective>> progressed;
  const size_t hdr = sizeof(FrameHeader);
  // Completes the head item once all of it is in the socket (its spliced payload too).
  auto completeHead = [&] {
    SendItem& head = c->sendq.front();
    if (head.op) {
      head.op->onSent(head.header.length);
      progressed.push_back(std::move(head.op));
    }
    c->sendq.pop_front();
    c->headSent = 0;
  };
  auto fail = [&](int err) {
    // The peer may have said why it reset the stream (an abort frame): read that first.
    onReadable(c);
    if (!c->dead) {
      closeConnection(c, ErrorKind::kPeerLost,
                      "send to peer " + std::to_string(c->peer) + " failed: " + std::strerror(err), false);
    }
  };
  while (!c->sendq.empty()) {
    SendItem& front = c->sendq.front();
    // A payload handed to the kernel by reference (vmsplice) leaves the pipe first.
    if (c->pipeBytes > 0) {
      // SPLICE_F_MORE holds a partial TCP segment back for the bytes that follow: only
      // when some do, or the frame's tail would wait for the next send.
      const bool more = c->headSent < hdr + front.header.length || c->sendq.size() > 1;
      ssize_t n = ::splice(c->pipeRead.get(), nullptr, c->fd.get(), nullptr, c->pipeBytes,
                           SPLICE_F_NONBLOCK | SPLICE_F_MOVE | (more ? SPLICE_F_MORE : 0u));
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        return fail(errno);
      }
      c->pipeBytes -= static_cast<size_t>(n);
      if (c->pipeBytes == 0 && c->headSent == hdr + front.header.length) completeHead();
      continue;
    }
    if (front.splice && c->headSent >= hdr) {
      const size_t off = c->headSent - hdr;
      iovec v{const_cast<uint8_t*>(front.data) + off, front.header.length - off};
      ssize_t n = ::vmsplice(c->pipeWrite.get(), &v, 1, SPLICE_F_NONBLOCK);
      if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
        return fail(n < 0 ? errno : EPIPE);
      }
      c->headSent += static_cast<size_t>(n);
      c->pipeBytes = static_cast<size_t>(n);
      zeroCopyBytes_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
      continue;
    }
    iovec iov[kMaxIov];
    size_t iovCount = 0;
    size_t skip = c->headSent;
    bool more = false;
    for (auto it = c->sendq.begin(); it != c->sendq.end() && iovCount + 2 <= kMaxIov; ++it) {
      if (skip < hdr) {
        iov[iovCount++] = iovec{reinterpret_cast<uint8_t*>(&it->header) + skip, hdr - skip};
        skip = 0;
      } else {
        skip -= hdr;
      }
      if (it->splice) {  // its payload goes by reference, after this write
        more = true;
        break;
      }
      if (it->header.length > skip) {
        iov[iovCount++] = iovec{const_cast<uint8_t*>(it->data) + skip, it->header.length - skip};
      }
      skip = 0;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = iovCount;
    ssize_t n = ::sendmsg(c->fd.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT | (more ? MSG_MORE : 0));
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      return fail(errno);
    }
    size_t written = static_cast<size_t>(n);
    while (written > 0 && !c->sendq.empty()) {
      SendItem& head = c->sendq.front();
      const size_t total = hdr + head.header.length;
      const size_t limit = head.splice ? hdr : total;
      const size_t take = std::min(written, limit - c->headSent);
      c->headSent += take;
      written -= take;
      if (c->headSent == total) completeHead();
      else break;
    }
  }
  updateInterest(c);
  for (auto& op : progressed) finishIfComplete(op.get());
}

void Engine::updateInterest(Connection* c) {
  if (c->dead) return;
  uint32_t want = EPOLLRDHUP | (c->paused ? 0u : static_cast<uint32_t>(EPOLLIN)) |
                  (c->sendq.empty() ? 0u : static_cast<uint32_t>(EPOLLOUT));
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
  if (c->outgoing) {
    const PoolKey key{peer, c->epoch};
    auto& pool = outgoing_[key];
    pool.erase(std::remove(pool.begin(), pool.end(), c), pool.end());
    if (pool.empty()) outgoing_.erase(key);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = liveOutgoing_.find(key);
    if (it != liveOutgoing_.end() && it->second > 0 && --it->second == 0) liveOutgoing_.erase(it);
  }
  // Bytes still unsent in the kernel (the peer stopped reading: a paused stream, a
  // full window) would hold our FIN back forever: reset instead, so the peer learns
  // at once. With nothing pending, a normal close delivers what was sent, then FIN.
  int unsent = 0;
  if (::ioctl(c->fd.get(), SIOCOUTQNSD, &unsent) == 0 && unsent > 0) {
    linger hard{1, 0};
    ::setsockopt(c->fd.get(), SOL_SOCKET, SO_LINGER, &hard, sizeof(hard));
  }
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
    if (op->involves(peer) && (epoch == UINT64_MAX || op->key().epoch == epoch)) victims.push_back(op);
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

void Engine::startOp(const std::shared_ptr<Collective>& op) {
  const uint64_t tag = op->key().tag;
  if (activeByTag_.count(tag)) {
    op->fail(ErrorKind::kInvalid, "another op with tag " + std::to_string(tag) + " is still in flight");
    giveScratch(op->releaseScratch());
    return;
  }
  activeByTag_[tag] = op;
  if (withholdVoteOps_ > 0 && op->voting()) {
    --withholdVoteOps_;
    op->withholdVotes();
  }
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
    lastDoneByTag_[tag] = Finished{op->key(), it->second->shapeDigest()};
    activeByTag_.erase(it);
  }
}

void Engine::failOp(Collective* op, ErrorKind kind, const std::string& message, uint64_t peer) {
  if (op->state() != OpState::kRunning) return;
  auto keep = op->shared_from_this();
  // The caller sees the failure only once the connections are closed (below): from then
  // on a neighbour still reading frames sent by reference knows they are from a failed
  // op (failReadersByReference), whatever the caller does with its buffers.
  op->fail(kind, message, peer, /*publish=*/false);
  struct PublishAtEnd {
    Collective* op;
    ~PublishAtEnd() { op->publish(); }
  } publishAtEnd{op};
  retire(op);
  // Poison: the neighbours' streams may hold frames of this op mid-flight.
  struct Ctx {
    Engine* self;
    Collective* op;
    ErrorKind kind;
    std::string message;
  } ctx{this, op, kind, message};
  op->forEachPeer(
      [](void* p, uint64_t id) {
        auto* x = static_cast<Ctx*>(p);
        // Tell the neighbour which op failed and why (where the stream allows it), then
        // close: a neighbour that posts the op later fails at once with the reason.
        for (auto& [fd, c] : x->self->connections_) {
          if (c->peer == id && !c->dead && !c->handshaking && c->epoch == x->op->key().epoch) {
            x->self->sendAbort(c.get(), *x->op, x->kind, x->message);
          }
        }
        x->self->closePeer(id, x->op->poisonFloor(), x->op->key().epoch, ErrorKind::kPeerLost,
                           "op failed: " + x->message);
      },
      &ctx);
}

void Engine::sendAbort(Connection* c, const Collective& op, ErrorKind kind, const std::string& reason) {
  if (c->headSent != 0) return;  // a frame is half on the wire: only EOF can follow
  c->sendq.clear();
  std::string text = reason.substr(0, kMaxAbortReason);
  FrameHeader h = makeHeader(FrameType::kAbort, op.key(), static_cast<uint32_t>(text.size()), /*digest=*/0,
                             /*offset=*/0, /*phase=*/static_cast<uint8_t>(kind));
  iovec iov[2] = {{&h, sizeof(h)}, {text.data(), text.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  ssize_t w = ::sendmsg(c->fd.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)w;  // best effort: the close that follows is the signal that always arrives
}

void Engine::onAbortFrame(Connection* c, const FrameHeader& h, const std::string& reason) {
  c->goodbye = true;  // the EOF that follows is this abort, not a crash
  ErrorKind kind = h.phase <= static_cast<uint8_t>(kLastErrorKind) ? static_cast<ErrorKind>(h.phase)
                                                                   : ErrorKind::kProtocol;
  // A neighbour's timeout or abort reaches us as a lost peer; a shape mismatch stays one.
  if (kind != ErrorKind::kProtocol) kind = ErrorKind::kPeerLost;
  tombstones_.push_back(Tombstone{keyOf(h), kind, reason, c->peer});
  while (tombstones_.size() > 1024) tombstones_.pop_front();
  auto it = activeByTag_.find(h.tag);
  if (it != activeByTag_.end() && it->second->key().epoch == h.epoch && it->second->key().seq == h.seq) {
    auto op = it->second;
    failOp(op.get(), kind, "peer " + std::to_string(c->peer) + " failed this op: " + reason, c->peer);
  }
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

void Engine::setRingEpoch(uint64_t epoch) {
  currentEpoch_ = std::max(currentEpoch_, epoch);
  // Pools of older epochs will never carry another frame.
  std::vector<Connection*> old;
  for (auto& [fd, c] : connections_) {
    if (!c->dead && !c->handshaking && c->epoch < currentEpoch_) old.push_back(c.get());
  }
  for (Connection* c : old) {
    sendGoodbye(c);
    closeConnection(c, ErrorKind::kAborted, "epoch " + std::to_string(currentEpoch_) + " replaced this connection's epoch",
                    /*quiet=*/true);
  }
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
}

void Engine::pushEvent(Event event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
    if (events_.size() > kMaxEvents) events_.pop_front();
  }
  eventsCv_.notify_all();
}

// ---------------------------------------------------------------- shared state

uint64_t Engine::exposeState(std::vector<StateRegion> regions) {
  const uint64_t id = nextExposure_++;
  auto done = std::make_shared<std::promise<void>>();
  auto ready = done->get_future();
  post([this, id, regions = std::move(regions), done]() mutable {
    exposures_[id] = Exposure{std::move(regions), 0};
    done->set_value();
  });
  ready.wait();
  return id;
}

uint64_t Engine::unexposeState(uint64_t exposure) {
  auto served = std::make_shared<std::promise<uint64_t>>();
  auto result = served->get_future();
  try {
    post([this, exposure, served] {
      auto it = exposures_.find(exposure);
      const uint64_t bytes = it == exposures_.end() ? 0 : it->second.served;
      dropExposure(exposure);
      served->set_value(bytes);
    });
  } catch (const AbortedError&) {
    return 0;  // closed: the progress thread has stopped and sends nothing any more
  }
  return result.get();
}

void Engine::dropExposure(uint64_t exposure) {
  exposures_.erase(exposure);
  std::vector<Connection*> broken;
  for (auto& [fd, c] : connections_) {
    auto& q = c->sendq;
    for (size_t i = 0; i < q.size();) {
      if (q[i].exposure != exposure) {
        ++i;
      } else if (i == 0 && c->headSent > 0) {
        broken.push_back(c.get());  // half on the wire: the stream cannot be resumed
        break;
      } else {
        q.erase(q.begin() + static_cast<std::ptrdiff_t>(i));
      }
    }
  }
  for (Connection* c : broken) {
    closeConnection(c, ErrorKind::kAborted, "state exposure withdrawn mid-chunk", /*quiet=*/true);
  }
}

std::shared_ptr<StateFetch> Engine::fetchState(const PeerAddress& source, uint64_t exposure,
                                               std::vector<FetchChunk> chunks, double timeoutSeconds) {
  ensureConnected(source, kStateEpoch, timeoutSeconds);
  const uint64_t tag = (uint64_t{1} << 63) | nextFetchTag_++;
  auto op = std::make_shared<StateFetch>(tag, source.peerId, exposure, std::move(chunks), timeoutSeconds);
  post([this, op] { startOp(op); });
  return op;
}

void Engine::injectFault(const std::string& kind, int count) {
  if (kind == "corrupt_state") {
    post([this, count] { corruptStateChunks_ = count; });
  } else if (kind == "withhold_vote") {
    post([this, count] { withholdVoteOps_ = count; });
  } else {
    throw InvalidArgument("unknown fault '" + kind + "'");
  }
}

void Engine::queueControl(Connection* c, const FrameHeader& h, std::string payload) {
  auto hold = std::make_shared<std::string>(std::move(payload));
  FrameHeader header = h;
  header.length = static_cast<uint32_t>(hold->size());
  c->sendq.push_back(SendItem{header, reinterpret_cast<const uint8_t*>(hold->data()), nullptr, 0, hold});
  if (!c->dirty) {
    c->dirty = true;
    dirty_.push_back(c);
  }
}

void Engine::onStateRequest(Connection* c, const FrameHeader& h, const std::vector<uint8_t>& payload) {
  StateRequest req{};
  std::memcpy(&req, payload.data(), sizeof(req));
  auto it = exposures_.find(req.exposure);
  std::string refusal;
  if (it == exposures_.end()) {
    refusal = "state exposure " + std::to_string(req.exposure) + " is not served (sync over?)";
  } else if (h.digest >= it->second.regions.size()) {
    refusal = "no state entry " + std::to_string(h.digest);
  } else if (req.length == 0 || req.length > kMaxFramePayload || h.offset > it->second.regions[h.digest].bytes ||
             req.length > it->second.regions[h.digest].bytes - h.offset) {
    refusal = "state range out of bounds";
  }
  // An answer names the request's chunk: same tag, seq (chunk), digest (entry), offset.
  if (!refusal.empty()) {
    queueControl(c, makeHeader(FrameType::kStateRefused, keyOf(h), 0, h.digest, h.offset), refusal);
    return;
  }
  const StateRegion& region = it->second.regions[h.digest];
  const FrameHeader answer =
      makeHeader(FrameType::kStateData, keyOf(h), static_cast<uint32_t>(req.length), h.digest, h.offset);
  SendItem item{answer, region.data + h.offset, nullptr, req.exposure, nullptr};
  if (corruptStateChunks_ > 0) {
    --corruptStateChunks_;
    item.hold = std::make_shared<std::string>(reinterpret_cast<const char*>(item.data), req.length);
    (*item.hold)[req.length / 2] ^= 0x01;
    item.data = reinterpret_cast<const uint8_t*>(item.hold->data());
    item.exposure = 0;
  }
  it->second.served += req.length;
  c->sendq.push_back(std::move(item));
  if (!c->dirty) {
    c->dirty = true;
    dirty_.push_back(c);
  }
}

}  // namespace pccl
