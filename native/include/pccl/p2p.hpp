// Point-to-point: one send or one receive between two peers of the current ring.
//
// Matching: a receive names its source (or any source) and a 64-bit user tag. The k-th
// send from A to B with tag T matches the k-th receive at B from A with tag T; a
// receive from any source takes the first offer with its tag (in arrival order) that
// no earlier-posted receive took. Receives are matched in the order they were posted.
//
// Rendezvous, no buffering of payloads: a send first offers its size (kP2pOffer, a bare
// header); the receiver matches the offer against its posted receives and, once one
// takes it, answers kP2pAccept naming its op; only then does the payload leave, as
// kData frames addressed to the receiving op, which land in the receive buffer straight
// from recv(). So no payload byte ever waits in the mailbox or pauses a connection, and
// `isend(x, peer); recv(y, peer)` on both sides cannot deadlock whatever the size: the
// progress threads read every stream all the time. The cost is one round trip per
// message. Offers nobody asked for yet wait at the receiver (a header each).
//
// Failure (Engine::failOp, as every op): an op that fails once matched (bytes may be in
// flight) poisons the connections of its epoch to its peer, so the peer's op fails at
// once (PeerLost) and so does any collective of that epoch involving that peer. One that
// fails before it was matched poisons nothing: an unaccepted send withdraws its offer
// (kP2pCancel; a receive that took it meanwhile fails), an unmatched receive just leaves
// the queue. Sizes that differ fail both ops (ProtocolError) and poison nothing.
#pragma once

#include <atomic>
#include <cstdint>

#include "pccl/collective.hpp"

namespace pccl {

// Engine tags of point-to-point ops: bit 62 set (collectives use tags below 2^62, state
// fetches set bit 63). Each op has its own, and its key's seq is its peer's id, so the
// keys of two peers' ops never collide (an abort frame names the sender's op).
constexpr uint64_t kP2pTagBit = uint64_t{1} << 62;
inline bool isP2pTag(uint64_t tag) { return (tag >> 62) == 1; }

struct P2pOptions {
  bool send = true;
  uint64_t peer = kNoPeer;  // the receiver (send) or the source (receive; kNoPeer: any)
  uint64_t tag = 0;         // the user's tag
  uint8_t* data = nullptr;  // send: read only
  size_t bytes = 0;
  size_t segmentBytes = 512 << 10;
  double timeoutSeconds = -1;
};

class PointToPoint final : public Collective {
 public:
  PointToPoint(const P2pOptions& options, uint64_t epoch, uint64_t opTag, uint64_t self);

  bool isSend() const { return options_.send; }
  uint64_t userTag() const { return options_.tag; }
  size_t bytes() const { return options_.bytes; }
  // The peer this op exchanges with: the receiver, the source asked for, or (any-source
  // receive) the sender it matched, kNoPeer until then. Any thread.
  uint64_t peer() const { return peer_.load(std::memory_order_acquire); }
  bool anySource() const { return options_.peer == kNoPeer; }

  // ---- progress thread
  // Whether bytes may be in flight: a send accepted, a receive matched.
  bool paired() const { return paired_; }
  // The other side's op tag once paired (the sender's, for a receive).
  uint64_t remoteTag() const { return remoteTag_; }
  bool mayTake(uint64_t source, uint64_t epoch) const {
    return epoch == key().epoch && (anySource() || source == options_.peer);
  }
  // Receive: takes the offer of `source`'s op `senderTag` (the sizes agree).
  void match(uint64_t source, uint64_t senderTag);
  // Send: the receiver's op `receiverTag` accepted; queues the payload.
  void onAccepted(FrameSink& sink, uint64_t receiverTag);
  // The peer withdrew (or refused) the pairing: the op fails without poisoning.
  void unpair() { paired_ = false; }

  void start(FrameSink&) override {}
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  bool complete() const override;
  bool involves(uint64_t peer) const override;
  void forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const override;
  std::vector<MemoryRange> landingRanges() const override;

 private:
  P2pOptions options_;
  std::atomic<uint64_t> peer_;
  bool paired_ = false;
  uint64_t remoteTag_ = 0;
  size_t received_ = 0;
};

}  // namespace pccl
