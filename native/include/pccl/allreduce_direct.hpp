// Direct all-reduce: one exchange, then an all-to-all commit vote. Latency-optimal, for
// small payloads (on a WAN link the ring's 2(N-1) hops plus its N-1 vote hops cost far
// more than the bytes).
//
// Every peer sends its whole input straight to every other peer (the pools to every
// peer of the epoch, as AllReduceQuantized opens them), split into segments striped
// over the pool. Each contribution lands in its own scratch slot; once a segment holds
// all N contributions, the peer reduces them in rank order, x_0 op x_1 op ... op x_{N-1}
// (reduceInto, one step at a time, so 16-bit floats round after each step as the ring's
// do), and divides by N for AVG (finalizeAverage, as the ring's owner does). Every peer
// runs the same steps on the same bytes, so every peer ends with the same bytes: no
// owner, no all-gather. Each peer sends and receives (N-1) x the buffer, where the ring
// moves 2(N-1)/N x: worth it while the buffer is small.
//
// The commit vote goes all-to-all (Collective::enableDirectVote): a peer that holds the
// result tells every other peer at once, and commits when it holds the result and the
// votes of all N-1 others. With the data exchange that is two one-way delays from the
// last post to every commit, where the ring takes 3(N-1).
//
// The caller's input is never written during the op, and is sent as it is (by
// reference when the op votes: see sendsByReference). Out of place, the result is built
// in the output. In place, it is built aside and copied into the caller's buffer on
// success, or with deferCommit at Engine::settle(commit) (then in the scratch, which the
// engine keeps for settle()): a failed op leaves the input as it was, with nothing to
// restore. Without deferCommit the op keeps the result in memory of its own, since the
// engine hands the scratch back just before the success that copies it out.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pccl/allreduce_ring.hpp"

namespace pccl {

class AllReduceDirect final : public Collective {
 public:
  // Scratch bytes the op needs for `options` over `n` peers: a slot per other peer's
  // contribution, and in place the result.
  static size_t scratchBytes(const AllReduceOptions& options, size_t n);
  // `peers`: the peer ids of the ring, in ring order (the rank order of the reduction).
  // `scratch` holds scratchBytes().
  AllReduceDirect(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                  ScratchBuffer scratch);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  bool complete() const override;
  bool involves(uint64_t peer) const override;
  void forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const override;

  ScratchBuffer releaseScratch() override { return std::move(scratch_); }
  uint32_t shapeDigest() const override { return digest_; }
  bool holdsResult() const override { return inPlace_ && options_.deferCommit && nbytes_ > 0 && ring_.size > 1; }
  // As the ring's (AllReduceRing::sendsByReference): the input is only ever sent, and
  // a peer may change it only after every peer held the result (committed or settled
  // as a success) or after the op failed for every peer (the arbiter heard first).
  bool sendsByReference() const override { return voting() && (!inPlace_ || options_.deferCommit); }
  // Conservative: any peer of the op while contributions are missing. Whichever peer's
  // connection closes fails the op anyway (involves()); this only makes it fail before
  // reading what that peer may have sent by reference.
  bool awaitsDataFrom(uint64_t peer) const override { return involves(peer) && received_ < expected_; }
  void commitResult() override;

  // Shape digest carried by every frame: the ring's fields and the algorithm, so peers
  // that disagree on any of them (a ring peer and a direct one included) fail the op.
  // AllReduceDirectRsAg's too, with its own algorithm.
  static uint32_t digest(size_t count, DType dtype, ReduceOp op, size_t worldSize,
                         AllReduceAlgorithm algorithm = AllReduceAlgorithm::kDirect);

 private:
  void onSuccess() override;
  size_t rankOf(uint64_t peer) const;
  uint8_t* slotOf(size_t rank) const;  // where rank's contribution lands (not ours)
  const uint8_t* contribution(size_t rank) const;
  void reduceSegment(size_t seg);

  AllReduceOptions options_;
  RingPosition ring_;
  std::vector<uint64_t> peers_;
  ScratchBuffer scratch_;
  bool inPlace_;
  size_t elemSize_;
  size_t nbytes_;
  size_t segmentBytes_ = 0;
  size_t segments_ = 0;
  uint32_t digest_;
  const uint8_t* in_;
  uint8_t* result_ = nullptr;    // the output; in place a scratch area (deferred) or ownResult_
  std::unique_ptr<uint8_t[]> ownResult_;
  std::vector<uint8_t> got_;     // [rank][segment] claimed by a frame
  std::vector<size_t> arrived_;  // contributions received per segment
  size_t expected_ = 0;          // frames
  size_t received_ = 0;
};

}  // namespace pccl
