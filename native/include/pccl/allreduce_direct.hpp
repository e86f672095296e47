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
// Where the result is built, and what a failed op leaves: AllToAllReduce.
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/allreduce_all_to_all.hpp"

namespace pccl {

class AllReduceDirect final : public AllToAllReduce {
 public:
  // Scratch bytes the op needs for `options` over `n` peers: a slot per other peer's
  // contribution, and in place with deferCommit the result.
  static size_t scratchBytes(const AllReduceOptions& options, size_t n);
  // `peers`: the peer ids of the ring, in ring order (the rank order of the reduction).
  // `scratch` holds scratchBytes().
  AllReduceDirect(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                  ScratchBuffer scratch);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;

 private:
  uint8_t* slotOf(size_t rank) const;  // where rank's contribution lands (not ours)
  const uint8_t* contribution(size_t rank) const;
  void reduceSegment(size_t seg);

  size_t segments_ = 0;
  std::vector<uint8_t> got_;     // [rank][segment] claimed by a frame
  std::vector<size_t> arrived_;  // contributions received per segment
};

}  // namespace pccl
