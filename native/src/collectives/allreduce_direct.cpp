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
  const size_t n = ring_.size;
  // Segment-major, destinations staggered by rank: every peer gets its first segments
  // from everyone early.
  for (size_t seg = 0; seg < segments_; ++seg) {
    const size_t off = seg * segmentBytes_;
    const size_t len = std::min(segmentBytes_, nbytes_ - off);
    for (size_t d = 1; d < n; ++d) {
      const size_t k = (ring_.rank + d) % n;
      ++pendingSends_;
      sink.sendFrame(this, peers_[k], seg,
                     makeHeader(FrameType::kData, key(), static_cast<uint32_t>(len), digest_, off,
                                static_cast<uint8_t>(Phase::kReduceScatter)),
                     in_ + off);
    }
  }
}

uint8_t* AllReduceDirect::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = checkFrame(peer, h, "direct");
  if (h.phase != static_cast<uint8_t>(Phase::kReduceScatter)) throw badFrame(peer, "unknown phase");
  if (segmentBytes_ == 0 || h.offset % segmentBytes_ != 0 || h.offset >= nbytes_) {
    throw badFrame(peer, "segment out of bounds");
  }
  const size_t seg = h.offset / segmentBytes_;
  if (h.length != std::min(segmentBytes_, nbytes_ - h.offset)) throw badFrame(peer, "wrong segment length");
  uint8_t& got = got_[k * segments_ + seg];
  if (got) throw badFrame(peer, "duplicate segment");
  got = 1;
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
