// All-to-all reduce-scatter: chunk c of the reduction of every peer's input, on rank c.
//
// The input is split into the ring's N chunks (the first count % N hold one element
// more, as AllReduceRing and AllReduceDirectRsAg split it). Every peer sends chunk c of
// its input straight to rank c, in segments striped over the pool to that peer; each
// contribution lands in its own scratch slot, and once a segment holds all N, the owner
// reduces them in rank order, x_0 op x_1 op ... op x_{N-1}, one rounded step at a time,
// and divides by N for AVG, straight into its output: the same steps on the same bytes
// as the direct all-reduces (so chunk c is bit-identical to rank c's part of their
// result). This is the reduce-scatter half of AllReduceDirectRsAg without its all-gather.
// Each peer sends and receives (N-1)/N x the input. The commit vote goes all-to-all.
//
// Memory: the scratch holds the N-1 incoming contributions of this peer's chunk. The
// input is only ever read; the output is written as segments complete, so after a
// failure it holds no defined bytes, while the input is intact.
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/allreduce_all_to_all.hpp"

namespace pccl {

class ReduceScatter final : public AllToAllReduce {
 public:
  // Elements of chunk `c` of `count` over `n` peers.
  static size_t chunkElements(size_t count, size_t n, size_t c);
  // Scratch bytes the op needs on `rank` of `n`: N-1 slots of its chunk.
  static size_t scratchBytes(const AllReduceOptions& options, size_t n, size_t rank);
  // options.count: the elements of every peer's input; options.output holds chunk
  // `ring.rank` (chunkElements). `peers`: the peer ids of the ring, in ring order (rank c
  // owns chunk c; the rank order of the reduction). `scratch` holds scratchBytes().
  ReduceScatter(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                ScratchBuffer scratch);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  std::vector<MemoryRange> landingRanges() const override;

 private:
  uint8_t* slotOf(size_t rank) const;  // where rank's contribution to our chunk lands (not ours)
  const uint8_t* contribution(size_t rank, size_t chunkOffset) const;
  void reduceSegment(size_t seg);

  size_t slotBytes_ = 0;         // our chunk
  std::vector<uint8_t> got_;     // [rank][segment of our chunk] claimed by a frame
  std::vector<size_t> arrived_;  // contributions received per segment of our chunk
};

}  // namespace pccl
