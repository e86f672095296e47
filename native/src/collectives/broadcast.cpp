#include "pccl/broadcast.hpp"

#include <algorithm>
#include <cstring>

namespace pccl {

Broadcast::Broadcast(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                     bool direct)
    : AllToAllReduce(options, ring, std::move(peers), ScratchBuffer{},
                     static_cast<uint64_t>(direct ? CollectiveKind::kBroadcastDirect : CollectiveKind::kBroadcast)),
      direct_(direct),
      root_(options.root) {
  PCCL_ENFORCE(root_ < ring_.size, "broadcast root outside the ring");
  if (!exchanges()) return;
  base_.assign(chunks() + 1, 0);
  for (size_t c = 0; c < chunks(); ++c) base_[c + 1] = base_[c] + segmentsOf(c);
  if (ring_.rank == root_) return;
  got_.assign(base_.back(), 0);
  expected_ = base_.back();
}

size_t Broadcast::chunkBegin(size_t chunk) const { return partBegin(chunk, chunks()); }

size_t Broadcast::segmentsOf(size_t chunk) const { return segmentsIn(chunkBegin(chunk + 1) - chunkBegin(chunk)); }

void Broadcast::send(FrameSink& sink, size_t rank, size_t seg, size_t off, size_t len, Phase phase,
                     const uint8_t* data) {
  ++pendingSends_;
  sink.sendFrame(this, peers_[rank], seg,
                 makeHeader(FrameType::kData, key(), static_cast<uint32_t>(len), digest_, off,
                            static_cast<uint8_t>(phase)),
                 data);
}

void Broadcast::start(FrameSink& sink) {
  if (ring_.rank != root_) return;  // the others wait for the root's bytes
  if (nbytes_ > 0 && result_ != in_) std::memcpy(result_, in_, nbytes_);
  if (!exchanges()) return;
  const size_t n = ring_.size;
  size_t most = 0;
  for (size_t c = 0; c < chunks(); ++c) most = std::max(most, segmentsOf(c));
  // Segment-major: every owner gets its first segments early and starts passing them on.
  for (size_t seg = 0; seg < most; ++seg) {
    for (size_t d = 1; d < n; ++d) {
      const size_t k = (root_ + d) % n;
      const size_t c = direct_ ? 0 : chunkOf(k);
      if (seg >= segmentsOf(c)) continue;
      const size_t off = chunkBegin(c) + seg * segmentBytes_;
      const size_t len = std::min(segmentBytes_, chunkBegin(c + 1) - off);
      send(sink, k, seg, off, len, direct_ ? Phase::kAllGather : Phase::kReduceScatter, in_ + off);
    }
  }
}

uint8_t* Broadcast::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = checkFrame(peer, h, direct_ ? "direct broadcast" : "broadcast");
  if (ring_.rank == root_ || segmentBytes_ == 0) throw badFrame(peer, "the root receives no data");
  // Scatter frames come from the root and carry our chunk; all-gather frames carry the
  // sender's chunk from its owner (direct mode: the whole buffer, from the root).
  size_t chunk;
  if (h.phase == static_cast<uint8_t>(Phase::kReduceScatter) && !direct_ && k == root_) {
    chunk = chunkOf(ring_.rank);
  } else if (h.phase == static_cast<uint8_t>(Phase::kAllGather) && direct_ && k == root_) {
    chunk = 0;
  } else if (h.phase == static_cast<uint8_t>(Phase::kAllGather) && !direct_ && k != root_) {
    chunk = chunkOf(k);
  } else {
    throw badFrame(peer, "unexpected phase or sender");
  }
  const size_t begin = chunkBegin(chunk);
  const size_t end = chunkBegin(chunk + 1);
  if (h.offset < begin || h.offset >= end || (h.offset - begin) % segmentBytes_ != 0) {
    throw badFrame(peer, "segment out of bounds");
  }
  const size_t seg = (h.offset - begin) / segmentBytes_;
  if (h.length != std::min(segmentBytes_, end - h.offset)) throw badFrame(peer, "wrong segment length");
  uint8_t& got = got_[base_[chunk] + seg];
  if (got) throw badFrame(peer, "duplicate segment");
  got = 1;
  return result_ + h.offset;
}

void Broadcast::onReceived(FrameSink& sink, const FrameHeader& h) {
  rxProgress_ += h.length;
  ++received_;
  if (h.phase != static_cast<uint8_t>(Phase::kReduceScatter)) return;
  // Our chunk from the root: pass it on to every other peer but the root, staggered.
  const size_t seg = (h.offset - chunkBegin(chunkOf(ring_.rank))) / segmentBytes_;
  for (size_t d = 1; d < ring_.size; ++d) {
    const size_t k = (ring_.rank + d) % ring_.size;
    if (k != root_) send(sink, k, seg, h.offset, h.length, Phase::kAllGather, result_ + h.offset);
  }
}

std::vector<MemoryRange> Broadcast::landingRanges() const {
  if (!exchanges() || ring_.rank == root_) return {};
  return {MemoryRange{result_, nbytes_}};
}

}  // namespace pccl
