// Point-to-point on the engine (the protocol and its failure rules: p2p.hpp): the caller
// entries, and on the progress thread the matching of offers to posted receives, the
// control frames (offer, accept, cancel), and what a failed or outdated op leaves behind.
#include <algorithm>

#include "pccl/engine.hpp"
#include "transport/connection.hpp"

namespace pccl {

// ---------------------------------------------------------------- caller side

std::shared_ptr<PointToPoint> Engine::sendTo(uint64_t peer, uint64_t tag, const void* data, size_t bytes,
                                             double timeoutSeconds, double connectTimeoutSeconds) {
  if (peer == kNoPeer) throw InvalidArgument("a send needs a destination peer");
  P2pOptions o;
  o.send = true;
  o.peer = peer;
  o.tag = tag;
  o.data = static_cast<uint8_t*>(const_cast<void*>(data));  // only read
  o.bytes = bytes;
  o.timeoutSeconds = timeoutSeconds;
  return postP2p(o, connectTimeoutSeconds);
}

std::shared_ptr<PointToPoint> Engine::recvFrom(uint64_t peer, uint64_t tag, void* data, size_t bytes,
                                               double timeoutSeconds, double connectTimeoutSeconds) {
  P2pOptions o;
  o.send = false;
  o.peer = peer;
  o.tag = tag;
  o.data = static_cast<uint8_t*>(data);
  o.bytes = bytes;
  o.timeoutSeconds = timeoutSeconds;
  return postP2p(o, connectTimeoutSeconds);
}

std::shared_ptr<PointToPoint> Engine::postP2p(const P2pOptions& in, double connectTimeoutSeconds) {
  P2pOptions options = in;
  options.segmentBytes = options_.segmentBytes;
  RingPosition pos;
  std::vector<PeerAddress> ring;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw AbortedError("engine is closed");
    pos = ring_;
    ring = ringPeers_;
  }
  if (options.peer == options_.peerId) throw InvalidArgument("point-to-point with this peer itself");
  if (options.peer == kNoPeer) {
    if (pos.size < 2) throw InvalidArgument("a receive from any peer needs another peer in the ring");
    connectToAll(pos, ring, connectTimeoutSeconds);
  } else {
    auto it = std::find_if(ring.begin(), ring.end(), [&](const PeerAddress& p) { return p.peerId == options.peer; });
    if (it == ring.end()) {
      throw InvalidArgument("peer " + std::to_string(options.peer) + " is not in the ring of epoch " +
                            std::to_string(pos.epoch));
    }
    ensureConnected(*it, pos.epoch, connectTimeoutSeconds);
  }
  const uint64_t opTag = kP2pTagBit | nextP2pTag_++;
  auto op = std::make_shared<PointToPoint>(options, pos.epoch, opTag, options_.peerId);
  post([this, op] { startP2p(op); });
  return op;
}

// ---------------------------------------------------------------- progress thread

void Engine::startP2p(const std::shared_ptr<PointToPoint>& op) {
  startOp(op);
  if (op->state() != OpState::kRunning) return;
  const OpKey& k = op->key();
  if (k.epoch < currentEpoch_) {
    failOp(op.get(), ErrorKind::kAborted, "the ring moved to epoch " + std::to_string(currentEpoch_), kNoPeer);
    return;
  }
  if (op->isSend()) {
    const FrameHeader offer = makeHeader(FrameType::kP2pOffer, OpKey{k.epoch, op->userTag(), k.tag}, 0, 0, op->bytes());
    if (!sendP2pControl(op->peer(), k.epoch, offer)) {
      failOp(op.get(), ErrorKind::kPeerLost, "no connection to peer " + std::to_string(op->peer()), op->peer());
    }
    return;
  }
  auto box = p2pOffers_.find(op->userTag());
  if (box != p2pOffers_.end()) {
    auto& offers = box->second;
    auto it = std::find_if(offers.begin(), offers.end(),
                           [&](const P2pOffer& o) { return op->mayTake(o.peer, o.epoch); });
    if (it != offers.end()) {
      const P2pOffer offer = *it;
      offers.erase(it);
      if (offers.empty()) p2pOffers_.erase(box);
      takeOffer(op, offer);
      return;
    }
  }
  p2pPosted_[op->userTag()].push_back(op);
}

void Engine::takeOffer(const std::shared_ptr<PointToPoint>& op, const P2pOffer& offer) {
  const OpKey& k = op->key();
  const bool sameSize = offer.bytes == op->bytes();
  const FrameHeader accept = makeHeader(FrameType::kP2pAccept, OpKey{k.epoch, offer.senderTag, k.tag}, 0, 0,
                                        op->bytes(), /*phase=*/sameSize ? 0 : 1);
  if (!sendP2pControl(offer.peer, k.epoch, accept)) {
    failOp(op.get(), ErrorKind::kPeerLost, "no connection to peer " + std::to_string(offer.peer), offer.peer);
    return;
  }
  if (!sameSize) {
    failOp(op.get(), ErrorKind::kProtocol,
           "peer " + std::to_string(offer.peer) + " sent " + std::to_string(offer.bytes) + " bytes with tag " +
               std::to_string(op->userTag()) + " to a receive of " + std::to_string(op->bytes()) + " bytes",
           offer.peer);
    return;
  }
  op->match(offer.peer, offer.senderTag);
  finishIfComplete(op.get());  // nothing to receive
}

bool Engine::sendP2pControl(uint64_t peer, uint64_t epoch, const FrameHeader& h) {
  auto it = outgoing_.find(PoolKey{peer, epoch});
  if (it == outgoing_.end() || it->second.empty()) return false;
  queueItem(it->second.front(), SendItem{h, nullptr, nullptr});
  return true;
}

void Engine::onP2pFrame(Connection* c, const FrameHeader& h) {
  if (h.epoch != c->epoch) {
    closeConnection(c, ErrorKind::kProtocol,
                    "peer " + std::to_string(c->peer) + " sent a point-to-point frame of epoch " +
                        std::to_string(h.epoch) + " on a connection of epoch " + std::to_string(c->epoch),
                    false);
    return;
  }
  const uint64_t from = c->peer;
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kP2pOffer: {
      if (h.epoch < currentEpoch_) return;  // its sender fails when the old pools close
      const P2pOffer offer{from, h.epoch, h.seq, h.offset};
      auto posted = p2pPosted_.find(h.tag);
      if (posted != p2pPosted_.end()) {
        auto& ops = posted->second;
        auto it = std::find_if(ops.begin(), ops.end(), [&](const std::shared_ptr<PointToPoint>& op) {
          return op->state() == OpState::kRunning && op->mayTake(from, h.epoch);
        });
        if (it != ops.end()) {
          auto op = *it;
          ops.erase(it);
          if (ops.empty()) p2pPosted_.erase(posted);
          takeOffer(op, offer);
          return;
        }
      }
      p2pOffers_[h.tag].push_back(offer);
      return;
    }
    case FrameType::kP2pAccept: {
      auto it = activeByTag_.find(h.tag);
      auto* op = it == activeByTag_.end() || !isP2pTag(h.tag) ? nullptr : static_cast<PointToPoint*>(it->second.get());
      if (op == nullptr || !op->isSend() || op->paired() || op->peer() != from || op->key().epoch != h.epoch) {
        // The send is over (it failed, and its cancel crossed this accept): tell the
        // receiver, whose op took the offer.
        if (h.phase == 0) {
          sendP2pControl(from, h.epoch,
                         makeHeader(FrameType::kP2pCancel, OpKey{h.epoch, 0, h.tag}, 0, 0, 0,
                                    static_cast<uint8_t>(ErrorKind::kAborted)));
        }
        return;
      }
      auto keep = it->second;
      if (h.phase != 0) {
        failOp(op, ErrorKind::kProtocol,
               "peer " + std::to_string(from) + " receives " + std::to_string(h.offset) + " bytes with tag " +
                   std::to_string(op->userTag()) + " where this send has " + std::to_string(op->bytes()),
               from);
        return;
      }
      try {
        Sink frames(this);
        op->onAccepted(frames, h.seq);
      } catch (const Error& e) {
        failOp(op, errorKindOf(e), e.what(), errorPeerOf(e));
        return;
      }
      finishIfComplete(op);
      return;
    }
    case FrameType::kP2pCancel: {
      auto box = p2pOffers_.find(h.tag);
      if (box != p2pOffers_.end()) {
        auto& offers = box->second;
        auto it = std::find_if(offers.begin(), offers.end(),
                               [&](const P2pOffer& o) { return o.peer == from && o.senderTag == h.seq; });
        if (it != offers.end()) {
          offers.erase(it);
          if (offers.empty()) p2pOffers_.erase(box);
          return;
        }
      }
      // A receive took the offer already: it fails, with nothing in flight to poison.
      for (auto& [tag, active] : activeByTag_) {
        if (!isP2pTag(tag)) continue;
        auto* op = static_cast<PointToPoint*>(active.get());
        if (!op->isSend() && op->paired() && op->peer() == from && op->remoteTag() == h.seq) {
          auto keep = active;
          op->unpair();
          failOp(op, ErrorKind::kPeerLost, "peer " + std::to_string(from) + " withdrew its send", from);
          return;
        }
      }
      return;
    }
    default:
      return;
  }
}

void Engine::onP2pFailed(PointToPoint* op, ErrorKind kind) {
  const OpKey& k = op->key();
  if (op->paired()) return;  // failOp poisons the connections to the peer
  if (op->isSend()) {
    // Withdraw the offer (no-op when the pool is gone: the receiver saw it close).
    sendP2pControl(op->peer(), k.epoch,
                   makeHeader(FrameType::kP2pCancel, OpKey{k.epoch, op->userTag(), k.tag}, 0, 0, 0,
                              static_cast<uint8_t>(kind)));
    return;
  }
  auto posted = p2pPosted_.find(op->userTag());
  if (posted == p2pPosted_.end()) return;
  auto& ops = posted->second;
  ops.erase(std::remove_if(ops.begin(), ops.end(), [&](const auto& p) { return p.get() == op; }), ops.end());
  if (ops.empty()) p2pPosted_.erase(posted);
}

void Engine::dropP2pBefore(uint64_t epoch) {
  for (auto it = p2pOffers_.begin(); it != p2pOffers_.end();) {
    auto& offers = it->second;
    offers.erase(std::remove_if(offers.begin(), offers.end(), [&](const P2pOffer& o) { return o.epoch < epoch; }),
                 offers.end());
    it = offers.empty() ? p2pOffers_.erase(it) : std::next(it);
  }
  std::vector<std::shared_ptr<Collective>> old;
  for (auto& [tag, op] : activeByTag_) {
    if (isP2pTag(tag) && op->key().epoch < epoch) old.push_back(op);
  }
  for (auto& op : old) {
    failOp(op.get(), ErrorKind::kAborted, "the ring moved to epoch " + std::to_string(epoch), kNoPeer);
  }
}

}  // namespace pccl
