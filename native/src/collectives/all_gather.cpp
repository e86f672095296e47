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
  if (exchanges()) sendInputToAll(sink, Phase::kAllGather);
}

uint8_t* AllGather::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = claimInputSegment(peer, h, "all-gather", Phase::kAllGather, got_);
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
