// All-to-all exchange (personalized all-to-all): block d of every peer's input goes to
// rank d.
//
// The input of each of the N peers holds N equal blocks (count / N elements each;
// count must be a multiple of N). Rank r's output holds N rows of one block: row s is
// rank s's block r, so rank r's own block r lands in its own row. Every peer sends block
// d straight to rank d (AllToAllReduce::sendChunksToOwners: segment-major, destinations
// staggered by rank, striped over the pool to that peer), and a received segment lands in
// its sender's row as it is: the exchange moves bytes, never computes, so the result is
// exact. Each peer sends and receives (N-1)/N x the input, the least an all-to-all can.
// The commit vote goes all-to-all, as the other collectives of this family.
//
// The input is only ever read. Out of place, the output is written as frames arrive: after
// a failure it holds no defined bytes, while the input is intact. In place (input and
// output one buffer), the rows are built aside and copied over the input only on success,
// so a failed op leaves the input as it was, ready for a retry.
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/allreduce_all_to_all.hpp"

namespace pccl {

class AllToAll final : public AllToAllReduce {
 public:
  // options.count: the elements of every peer's input, a multiple of ring.size;
  // options.output holds as many (it may be the input itself, for in place, but must not
  // overlap it otherwise). `peers`: the peer ids of the ring, in ring order (rank d gets
  // block d; row order).
  AllToAll(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  std::vector<MemoryRange> landingRanges() const override;

 private:
  size_t blockBytes_ = 0;
  std::vector<uint8_t> got_;  // [sender rank][segment of our block] claimed by a frame
};

}  // namespace pccl
