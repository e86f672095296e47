// The receive path, on the progress thread: bytes off a socket into frames, and each
// frame to where it belongs. A frame of a running op lands in the op's memory straight
// from recv(); one that arrives before its op is posted waits in the kernel or the
// mailbox; one of an op that is over here is discarded, or answered with an abort when
// the sender's op has another shape; control frames (abort, state requests) are read
// whole, then handled.
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "pccl/engine.hpp"
#include "transport/connection.hpp"

namespace pccl {
namespace {

constexpr int kReadBudget = 64;  // frames or reads per connection per loop turn (fairness)

bool is(const FrameHeader& h, FrameType type) { return h.type == static_cast<uint8_t>(type); }

// Whether a header is well formed: the magic, a known type, and a payload size that
// type allows.
bool wellFormed(const FrameHeader& h) {
  if (h.magic != kFrameMagic || h.length > kMaxFramePayload || (h.flags & ~kFrameInRing) != 0) return false;
  if ((h.flags & kFrameInRing) && !mayUseRing(h)) return false;
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kData:
    case FrameType::kStateData:
      return h.length != 0;
    case FrameType::kRingOffer:
      return h.length == sizeof(RingOffer);
    case FrameType::kRingAnswer:
    case FrameType::kGoodbye:
    case FrameType::kCommit:
    case FrameType::kP2pOffer:
    case FrameType::kP2pAccept:
    case FrameType::kP2pCancel:
    case FrameType::kRebind:
    case FrameType::kRebound:
      return h.length == 0;
    case FrameType::kAbort:
      return h.length <= kMaxAbortReason;
    case FrameType::kStateRequest:
    case FrameType::kStateRefused:
    case FrameType::kPadding:
      return true;
  }
  return false;  // an unknown type
}

}  // namespace

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
      countStateBytes(c, static_cast<uint64_t>(n));
      if (c->payloadGot == c->header.length) onFrameComplete(c);
    }
  }
}

void Engine::countStateBytes(Connection* c, uint64_t n) {
  if (c->header.type == static_cast<uint8_t>(FrameType::kStateData)) {
    c->stateRx += n;
    stateRxBytes_.fetch_add(n, std::memory_order_relaxed);
  } else if (c->header.type == static_cast<uint8_t>(FrameType::kPadding)) {
    c->stateRx += n;  // a route's padding: the windows a fetch will find (clampStateWindows' share)
    paddingRxBytes_.fetch_add(n, std::memory_order_relaxed);
  }
}

bool Engine::readHandshake(Connection* c) {
  using Progress = HandshakeAcceptor::Progress;
  switch (c->handshake.read(c->fd.get(), options_.peerId, options_.secret)) {
    case Progress::kBlocked:
      return false;
    case Progress::kMore:
      return true;
    case Progress::kFailed:
      closeConnection(c, c->handshake.failureKind(), c->handshake.failure(), /*quiet=*/true);
      return false;
    case Progress::kDone:
      break;
  }
  c->peer = c->handshake.hello().peerId;
  c->epoch = c->handshake.hello().epoch;
  c->handshaking = false;
  return true;
}

void Engine::dispatchHeader(Connection* c) {
  const FrameHeader& h = c->header;
  if (!wellFormed(h)) {
    closeConnection(c, ErrorKind::kProtocol, "malformed frame from peer " + std::to_string(c->peer), false);
    return;
  }
  if ((h.flags & kFrameInRing) && (!c->rxRing || h.length > c->rxRing->capacity())) {
    closeConnection(c, ErrorKind::kProtocol,
                    "peer " + std::to_string(c->peer) + " sent a payload through a ring this peer has not mapped", false);
    return;
  }
  c->payloadGot = 0;
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kGoodbye:
      c->goodbye = true;
      c->headerGot = 0;
      return;
    case FrameType::kAbort:
    case FrameType::kRingOffer:
      readControl(c);
      return;
    case FrameType::kPadding:
      c->sink = Connection::Sink::kDiscard;
      if (h.length == 0) onFrameComplete(c);
      return;
    case FrameType::kRingAnswer: {
      const FrameHeader frame = h;
      c->headerGot = 0;
      onRingAnswer(c, frame);
      return;
    }
    case FrameType::kRebind:
    case FrameType::kRebound: {
      const FrameHeader frame = h;
      c->headerGot = 0;
      if (is(frame, FrameType::kRebind)) {
        onRebind(c, frame);
      } else {
        onRebound(c, frame);
      }
      flushDirty();
      return;
    }
    case FrameType::kP2pOffer:
    case FrameType::kP2pAccept:
    case FrameType::kP2pCancel: {
      const FrameHeader frame = h;
      c->headerGot = 0;
      onP2pFrame(c, frame);
      flushDirty();
      return;
    }
    case FrameType::kStateRequest:
    case FrameType::kStateRefused: {
      // On a state connection, or on the server's own pool to the fetcher (a fetch route):
      // requests come in on its outgoing side, refusals on the fetcher's incoming side.
      const bool request = is(h, FrameType::kStateRequest);
      const bool routed = c->epoch == kStateEpoch || c->outgoing == request;
      if (!routed || h.length > kMaxAbortReason || (request && h.length != sizeof(StateRequest))) {
        closeConnection(c, ErrorKind::kProtocol, "malformed state frame from peer " + std::to_string(c->peer), false);
        return;
      }
      readControl(c);
      return;
    }
    default:  // kData, kStateData, kCommit
      dispatchOpFrame(c);
      return;
  }
}

// A control frame's payload is read whole (into c->mail), then handled.
void Engine::readControl(Connection* c) {
  c->mail.resize(c->header.length);
  c->sink = Connection::Sink::kControl;
  if (c->header.length == 0) onFrameComplete(c);
}

// A frame of an op: its payload goes straight into the op if it runs here and takes
// the frame; otherwise routeUnclaimed() decides.
void Engine::dispatchOpFrame(Connection* c) {
  const FrameHeader& h = c->header;
  // State answers may come over the source's pool to this peer (a fetch route).
  const bool routedState = is(h, FrameType::kStateData) && h.epoch == kStateEpoch && !c->outgoing;
  if (h.epoch != c->epoch && !routedState) {
    closeConnection(c, ErrorKind::kProtocol,
                    "peer " + std::to_string(c->peer) + " sent a frame of epoch " + std::to_string(h.epoch) +
                        " on a connection of epoch " + std::to_string(c->epoch),
                    false);
    return;
  }
  auto it = activeByTag_.find(h.tag);
  const Collective* sameTag = it == activeByTag_.end() ? nullptr : it->second.get();
  if (sameTag != nullptr && sameTag->accepts(h)) {
    std::shared_ptr<Collective> op = it->second;  // held: failing it drops it from activeByTag_
    try {
      if (is(h, FrameType::kCommit)) {
        op->checkVote(c->peer, h);
      } else {
        c->dst = op->receiveTarget(c->peer, h);
      }
    } catch (const Error& e) {
      failOp(op.get(), errorKindOf(e), e.what(), errorPeerOf(e));
      closeConnection(c, errorKindOf(e), e.what(), /*quiet=*/true);
      return;
    }
    c->rxOp = std::move(op);
    c->sink = Connection::Sink::kOp;
  } else if (is(h, FrameType::kStateData)) {
    c->sink = Connection::Sink::kDiscard;  // answer to a fetch that has ended: never held
  } else if (!routeUnclaimed(c, sameTag)) {
    return;
  }
  if (h.flags & kFrameInRing) {
    takeFromRing(c);
  } else if (h.length == 0) {
    onFrameComplete(c);
  }
}

// A frame no running op takes (`sameTag`: the op running on its tag, if any). Its op is
// over here (stale: discarded), or it ended here with another shape (the sender is told
// and the connection closed), or it is early (held). Returns whether reading goes on.
bool Engine::routeUnclaimed(Connection* c, const Collective* sameTag) {
  const FrameHeader& h = c->header;
  const OpKey key = keyOf(h);
  bool stale = h.epoch < currentEpoch_;
  if (sameTag != nullptr) {
    stale = stale || stepBefore(key, sameTag->key());
  } else {
    auto done = lastDoneByTag_.find(h.tag);
    if (done != lastDoneByTag_.end() && sameStep(done->second.key, key) && done->second.digest != h.digest) {
      // Our side of this op already finished (e.g. with nothing to send), but the
      // sender's op has another shape: it would wait forever. Tell it why.
      const std::string why = "peers disagree on the all-reduce: peer " + std::to_string(options_.peerId) +
                              " ran it with a different element count, dtype, operator or world size";
      c->sendAbort(done->second.key, ErrorKind::kProtocol, why);
      closeConnection(c, ErrorKind::kProtocol, why, /*quiet=*/true);
      return false;
    }
    stale = stale || (done != lastDoneByTag_.end() && !stepBefore(done->second.key, key));
  }
  // A point-to-point receive is running before its sender may send a byte, and its tag
  // is never reused: a frame for one that is not running is late.
  if (isP2pTag(h.tag)) stale = true;
  if (stale) {
    c->sink = Connection::Sink::kDiscard;
    return true;
  }
  // Early frame of an op this peer has not posted yet. With no op running, leave it in
  // the kernel (stop reading this connection: TCP pushes back on the sender) until an
  // op is posted; that costs no copy. The same when the only op running is the one
  // before it on its tag: a connection carries a sender's frames in order, so nothing
  // that op still needs can queue behind this frame (a peer that finished first no
  // longer makes its neighbour copy its next op through the mailbox). With other ops
  // running, their frames may queue behind it, so hold it in the mailbox (up to a cap)
  // instead.
  const bool onlyItsTag = activeByTag_.size() == 1 && activeByTag_.begin()->first == h.tag;
  if (activeByTag_.empty() || onlyItsTag || mailboxBytes_ + h.length > options_.mailboxLimitBytes) {
    c->paused = true;
    updateInterest(c);
    return false;
  }
  c->mail.resize(h.length);
  mailboxBytes_ += h.length;
  c->sink = Connection::Sink::kMailbox;
  return true;
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
          op->onVote(c->peer, h);
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
    } else if (h.type == static_cast<uint8_t>(FrameType::kRingOffer)) {
      onRingOffer(c, payload);
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
      op->onVote(frame.peer, frame.header);
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

}  // namespace pccl
