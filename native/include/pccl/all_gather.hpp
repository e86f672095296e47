// All-to-all all-gather: every peer's input, in rank order, in every peer's output.
//
// Peer r's input (count elements) becomes row r of the output (N x count elements). Every
// peer sends its input straight to every other peer, in segments striped over the pool to
// that peer (segment-major, destinations staggered by rank, as AllReduceDirect sends),
// and copies it into its own row; a received segment lands in the sender's row as it is,
// so every peer ends with the same bytes. Each peer sends and receives (N-1)/N x the
// output, the least an all-gather can, and every byte is one one-way delay from its
// sender. The commit vote goes all-to-all (Collective::enableDirectVote), as the direct
// all-reduces' does.
//
// The input is only ever read. The output is written as frames arrive: after a failure it
// holds no defined bytes, while the input is intact, so the op can be retried.
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/allreduce_all_to_all.hpp"

namespace pccl {

class AllGather final : public AllToAllReduce {
 public:
  // options.count: the elements of every peer's input; options.output holds N x count
  // (it must not overlap the input, but for this peer's own row, which may be the input).
  // `peers`: the peer ids of the ring, in ring order (row order).
  AllGather(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  std::vector<MemoryRange> landingRanges() const override;

 private:
  size_t segments_ = 0;
  std::vector<uint8_t> got_;  // [rank][segment] claimed by a frame
};

}  // namespace pccl
