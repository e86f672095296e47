// Direct reduce-scatter + all-gather: the ring's bytes, the direct op's latency. For mid
// and large payloads on high-latency links.
//
// The buffer is split into the ring's N chunks (chunkBegin), and chunk c is owned by
// rank c (ring order). Reduce-scatter: every peer sends chunk c of its input straight to
// rank c, in segments striped over the pool to that peer (the pools to every peer of the
// epoch, as AllReduceDirect opens them). Each contribution lands in its own scratch slot;
// once a segment of its chunk holds all N contributions, the owner reduces them in rank
// order, x_0 op x_1 op ... op x_{N-1} (reduceInto one step at a time, as AllReduceDirect
// does, so the bytes do not depend on who reduces), divides by N for AVG
// (finalizeAverage), and sends the reduced segment to every other peer. All-gather: those
// segments land in the result as they are, so every peer ends with the owners' exact
// bytes. Each peer sends and receives 2(N-1)/N x the buffer, as the ring does, but any
// byte is two one-way delays from its last post to every peer, where the ring takes
// 2(N-1).
//
// The commit vote goes all-to-all (Collective::enableDirectVote): a peer holding all N
// reduced chunks votes to every other peer at once, and commits once it also holds the
// votes of all N-1 others.
//
// Memory: the scratch holds the N-1 incoming contributions of the peer's own chunk,
// (N-1) x ceil(count/N) elements, about (N-1)/N x the buffer (AllReduceDirect needs
// (N-1) x the buffer), plus, in place with deferCommit, the result (one buffer).
//
// Where the result is built, and what a failed op leaves: AllToAllReduce. Unlike
// AllReduceDirect, the op also sends from the result (its all-gather), so a deferred
// in-place op that votes keeps its scratch until settle() whatever happened
// (defersRestore): bytes sent by reference from it are never reused by another op
// before the arbiter heard of the outcome.
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/allreduce_all_to_all.hpp"

namespace pccl {

class AllReduceDirectRsAg final : public AllToAllReduce {
 public:
  // Scratch bytes the op needs for `options` over `n` peers: N-1 slots of the largest
  // chunk, and in place with deferCommit the result.
  static size_t scratchBytes(const AllReduceOptions& options, size_t n);
  // `peers`: the peer ids of the ring, in ring order (rank c owns chunk c; the rank order
  // of the reduction). `scratch` holds scratchBytes().
  AllReduceDirectRsAg(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                      ScratchBuffer scratch);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  // Keeps the scratch (where the all-gather is sent from) until settle(); rollback()
  // has nothing to restore.
  bool defersRestore() const override { return holdsResult() && voting(); }

 private:
  uint8_t* slotOf(size_t rank) const;  // where rank's contribution to our chunk lands (not ours)
  const uint8_t* contribution(size_t rank, size_t chunkOffset) const;
  void reduceSegment(FrameSink& sink, size_t seg);

  size_t slotBytes_ = 0;         // the largest chunk
  std::vector<uint8_t> rsGot_;   // [rank][segment of our chunk] claimed by a frame
  std::vector<size_t> arrived_;  // contributions received per segment of our chunk
  std::vector<size_t> agBase_;   // first index in agGot_ of each chunk's segments
  std::vector<uint8_t> agGot_;   // [chunk's segment] claimed by an all-gather frame
};

}  // namespace pccl
