#include "pccl/all_gather.hpp"

#include <algorithm>
#include <cstring>

namespace pccl {

AllGather::AllGather(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers)
    : AllToAllReduce(options, ring, std::move(peers), ScratchBuffer{},
                     static_cast<uint64_t>(CollectiveKind::kAllGather)) {
  if (!exchanges()) return;
  segments_ = (nbytes_ + segmentBytes_ - 1) / segmentBytes_;
  got_.assign(ring_.size * segments_, 0);
  expected_ = (ring_.size - 1) * segments_;
}

void AllGather::start(FrameSink& sink) {
  uint8_t* own = result_ + ring_.rank * nbytes_;
  if (nbytes_ > 0 && own != in_) std::memcpy(own, in_, nbytes_);
  if (!exchanges()) return;
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
                                static_cast<uint8_t>(Phase::kAllGather)),
                     in_ + off);
    }
  }
}

uint8_t* AllGather::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = checkFrame(peer, h, "all-gather");
  if (h.phase != static_cast<uint8_t>(Phase::kAllGather)) throw badFrame(peer, "unknown phase");
  if (segmentBytes_ == 0 || h.offset % segmentBytes_ != 0 || h.offset >= nbytes_) {
    throw badFrame(peer, "segment out of bounds");
  }
  const size_t seg = h.offset / segmentBytes_;
  if (h.length != std::min(segmentBytes_, nbytes_ - h.offset)) throw badFrame(peer, "wrong segment length");
  uint8_t& got = got_[k * segments_ + seg];
  if (got) throw badFrame(peer, "duplicate segment");
  got = 1;
  return result_ + k * nbytes_ + h.offset;
}

void AllGather::onReceived(FrameSink& sink, const FrameHeader& h) {
  (void)sink;
  rxProgress_ += h.length;
  ++received_;
}

std::vector<MemoryRange> AllGather::landingRanges() const {
  if (!exchanges()) return {};
  return {MemoryRange{result_, ring_.size * nbytes_}};
}

}  // namespace pccl
