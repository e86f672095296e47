#include "pccl/allreduce_direct_rsag.hpp"

#include <algorithm>

namespace pccl {
namespace {

size_t largestChunkBytes(const AllReduceOptions& o, size_t n) {
  return (o.count / n + (o.count % n != 0 ? 1 : 0)) * elementSize(o.dtype);
}

}  // namespace

size_t AllReduceDirectRsAg::scratchBytes(const AllReduceOptions& options, size_t n) {
  const size_t nbytes = options.count * elementSize(options.dtype);
  if (n <= 1 || nbytes == 0) return 0;
  return (n - 1) * largestChunkBytes(options, n) + (options.input == options.output && options.deferCommit ? nbytes : 0);
}

AllReduceDirectRsAg::AllReduceDirectRsAg(const AllReduceOptions& options, const RingPosition& ring,
                                         std::vector<uint64_t> peers, ScratchBuffer scratch)
    : AllToAllReduce(options, ring, std::move(peers), std::move(scratch),
                     static_cast<uint64_t>(AllReduceAlgorithm::kDirectRsAg)) {
  if (!exchanges()) return;
  const size_t n = ring_.size;
  PCCL_ENFORCE(scratch_.size >= scratchBytes(options_, n), "direct reduce-scatter all-reduce needs its scratch");
  slotBytes_ = largestChunkBytes(options_, n);
  placeResult((n - 1) * slotBytes_);
  const size_t own = segmentsOf(ring_.rank);
  rsGot_.assign(n * own, 0);
  arrived_.assign(own, 0);
  agBase_.assign(n + 1, 0);
  for (size_t c = 0; c < n; ++c) agBase_[c + 1] = agBase_[c] + (c == ring_.rank ? 0 : segmentsOf(c));
  agGot_.assign(agBase_[n], 0);
  expected_ = (n - 1) * own + agBase_[n];
}

uint8_t* AllReduceDirectRsAg::slotOf(size_t rank) const {
  // Slots of the other peers in rank order: ours is skipped.
  const size_t index = rank < ring_.rank ? rank : rank - 1;
  return scratch_.data.get() + index * slotBytes_;
}

const uint8_t* AllReduceDirectRsAg::contribution(size_t rank, size_t chunkOffset) const {
  return rank == ring_.rank ? in_ + chunkBegin(ring_.rank) + chunkOffset : slotOf(rank) + chunkOffset;
}

void AllReduceDirectRsAg::start(FrameSink& sink) {
  if (!exchanges()) return copyInputIfAlone();
  sendChunksToOwners(sink);  // every owner gets its first segments early: its all-gather starts early
}

uint8_t* AllReduceDirectRsAg::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = checkFrame(peer, h, "rsag");
  // Reduce-scatter frames carry a segment of our chunk; all-gather ones a segment of the
  // sender's chunk, reduced.
  size_t chunk;
  if (h.phase == static_cast<uint8_t>(Phase::kReduceScatter)) {
    chunk = ring_.rank;
  } else if (h.phase == static_cast<uint8_t>(Phase::kAllGather)) {
    chunk = k;
  } else {
    throw badFrame(peer, "unknown phase");
  }
  const size_t seg = segmentOfChunk(peer, h, chunk);
  uint8_t& got = chunk == ring_.rank ? rsGot_[k * arrived_.size() + seg] : agGot_[agBase_[chunk] + seg];
  if (got) throw badFrame(peer, "duplicate segment");
  got = 1;
  return chunk == ring_.rank ? slotOf(k) + (h.offset - chunkBegin(chunk)) : result_ + h.offset;
}

void AllReduceDirectRsAg::onReceived(FrameSink& sink, const FrameHeader& h) {
  rxProgress_ += h.length;
  ++received_;
  if (h.phase != static_cast<uint8_t>(Phase::kReduceScatter)) return;
  const size_t seg = (h.offset - chunkBegin(ring_.rank)) / segmentBytes_;
  if (++arrived_[seg] == ring_.size - 1) reduceSegment(sink, seg);
}

void AllReduceDirectRsAg::reduceSegment(FrameSink& sink, size_t seg) {
  const size_t chunkOff = seg * segmentBytes_;
  const size_t off = chunkBegin(ring_.rank) + chunkOff;
  const size_t len = std::min(segmentBytes_, chunkBegin(ring_.rank + 1) - off);
  uint8_t* dst = result_ + off;
  // Rank order, whoever owns the chunk: the same steps on the same bytes as any peer
  // (and as AllReduceDirect) would run.
  reduceInRankOrder(dst, len / elemSize_, [&](size_t k) { return contribution(k, chunkOff); });
  // All-gather: this segment's final bytes to every other peer, staggered by rank.
  for (size_t d = 1; d < ring_.size; ++d) {
    const size_t k = (ring_.rank + d) % ring_.size;
    ++pendingSends_;
    sink.sendFrame(this, peers_[k], seg,
                   makeHeader(FrameType::kData, key(), static_cast<uint32_t>(len), digest_, off,
                              static_cast<uint8_t>(Phase::kAllGather)),
                   dst);
  }
}

}  // namespace pccl
