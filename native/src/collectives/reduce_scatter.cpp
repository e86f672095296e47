#include "pccl/reduce_scatter.hpp"

#include <algorithm>
#include <cstring>

namespace pccl {

size_t ReduceScatter::chunkElements(size_t count, size_t n, size_t c) {
  return count / n + (c < count % n ? 1 : 0);
}

size_t ReduceScatter::scratchBytes(const AllReduceOptions& options, size_t n, size_t rank) {
  if (n <= 1) return 0;
  return (n - 1) * chunkElements(options.count, n, rank) * elementSize(options.dtype);
}

ReduceScatter::ReduceScatter(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                             ScratchBuffer scratch)
    : AllToAllReduce(options, ring, std::move(peers), std::move(scratch),
                     static_cast<uint64_t>(CollectiveKind::kReduceScatter)) {
  if (!exchanges()) return;
  const size_t n = ring_.size;
  PCCL_ENFORCE(scratch_.size >= scratchBytes(options_, n, ring_.rank), "reduce-scatter needs its scratch");
  slotBytes_ = chunkBytes(ring_.rank);
  const size_t own = segmentsOf(ring_.rank);
  got_.assign(n * own, 0);
  arrived_.assign(own, 0);
  expected_ = (n - 1) * own;
}

uint8_t* ReduceScatter::slotOf(size_t rank) const {
  const size_t index = rank < ring_.rank ? rank : rank - 1;  // ours is skipped
  return scratch_.data.get() + index * slotBytes_;
}

const uint8_t* ReduceScatter::contribution(size_t rank, size_t chunkOffset) const {
  return rank == ring_.rank ? in_ + chunkBegin(ring_.rank) + chunkOffset : slotOf(rank) + chunkOffset;
}

void ReduceScatter::start(FrameSink& sink) {
  if (!exchanges()) return copyInputIfAlone();  // alone, our chunk is the whole input
  sendChunksToOwners(sink);
}

uint8_t* ReduceScatter::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = claimOwnChunkSegment(peer, h, "reduce-scatter", got_);
  return slotOf(k) + (h.offset - chunkBegin(ring_.rank));
}

void ReduceScatter::onReceived(FrameSink& sink, const FrameHeader& h) {
  (void)sink;
  rxProgress_ += h.length;
  ++received_;
  const size_t seg = (h.offset - chunkBegin(ring_.rank)) / segmentBytes_;
  if (++arrived_[seg] == ring_.size - 1) reduceSegment(seg);
}

void ReduceScatter::reduceSegment(size_t seg) {
  const size_t chunkOff = seg * segmentBytes_;
  const size_t len = std::min(segmentBytes_, slotBytes_ - chunkOff);
  // Rank order, whoever owns the chunk: the steps AllReduceDirectRsAg's owner runs.
  reduceInRankOrder(result_ + chunkOff, len / elemSize_, [&](size_t k) { return contribution(k, chunkOff); });
}

std::vector<MemoryRange> ReduceScatter::landingRanges() const {
  if (!exchanges() || slotBytes_ == 0) return {};
  return {MemoryRange{result_, slotBytes_}};
}

}  // namespace pccl
