#include "pccl/allreduce_direct.hpp"

#include <algorithm>

namespace pccl {

size_t AllReduceDirect::scratchBytes(const AllReduceOptions& options, size_t n) {
  const size_t nbytes = options.count * elementSize(options.dtype);
  if (n <= 1 || nbytes == 0) return 0;
  return (n - 1) * nbytes + (options.input == options.output && options.deferCommit ? nbytes : 0);
}

AllReduceDirect::AllReduceDirect(const AllReduceOptions& options, const RingPosition& ring,
                                 std::vector<uint64_t> peers, ScratchBuffer scratch)
    : AllToAllReduce(options, ring, std::move(peers), std::move(scratch),
                     static_cast<uint64_t>(AllReduceAlgorithm::kDirect)) {
  if (!exchanges()) return;
  const size_t n = ring_.size;
  PCCL_ENFORCE(scratch_.size >= scratchBytes(options_, n), "direct all-reduce needs its scratch");
  placeResult((n - 1) * nbytes_);
  segments_ = (nbytes_ + segmentBytes_ - 1) / segmentBytes_;
  got_.assign(n * segments_, 0);
  arrived_.assign(segments_, 0);
  expected_ = (n - 1) * segments_;
}

uint8_t* AllReduceDirect::slotOf(size_t rank) const {
  // Slots of the other peers in rank order: ours is skipped.
  const size_t index = rank < ring_.rank ? rank : rank - 1;
  return scratch_.data.get() + index * nbytes_;
}

const uint8_t* AllReduceDirect::contribution(size_t rank) const { return rank == ring_.rank ? in_ : slotOf(rank); }

void AllReduceDirect::start(FrameSink& sink) {
  if (!exchanges()) return copyInputIfAlone();
  sendInputToAll(sink, Phase::kReduceScatter);
}

uint8_t* AllReduceDirect::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = claimInputSegment(peer, h, "direct", Phase::kReduceScatter, got_);
  return slotOf(k) + h.offset;
}

void AllReduceDirect::onReceived(FrameSink& sink, const FrameHeader& h) {
  (void)sink;
  rxProgress_ += h.length;
  ++received_;
  const size_t seg = h.offset / segmentBytes_;
  if (++arrived_[seg] == ring_.size - 1) reduceSegment(seg);
}

void AllReduceDirect::reduceSegment(size_t seg) {
  const size_t off = seg * segmentBytes_;
  const size_t len = std::min(segmentBytes_, nbytes_ - off);
  // Rank order, whoever we are: the same steps on the same bytes on every peer.
  reduceInRankOrder(result_ + off, len / elemSize_, [&](size_t k) { return contribution(k) + off; });
}

}  // namespace pccl
