#include "pccl/all_to_all_direct.hpp"

#include <algorithm>
#include <cstring>

namespace pccl {

AllToAll::AllToAll(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers)
    : AllToAllReduce(options, ring, std::move(peers), ScratchBuffer{},
                     static_cast<uint64_t>(CollectiveKind::kAllToAll)) {
  PCCL_ENFORCE(options_.count % ring_.size == 0, "all-to-all needs a count divisible by the world size");
  blockBytes_ = nbytes_ / ring_.size;
  if (!exchanges()) return;
  placeResult(0);  // in place: rows built aside, copied over the input on success
  const size_t segments = segmentsOf(ring_.rank);
  got_.assign(ring_.size * segments, 0);
  expected_ = (ring_.size - 1) * segments;
}

void AllToAll::start(FrameSink& sink) {
  if (!exchanges()) return copyInputIfAlone();  // alone: the one block stays where it is
  std::memcpy(result_ + ring_.rank * blockBytes_, in_ + chunkBegin(ring_.rank), blockBytes_);
  sendChunksToOwners(sink);  // chunk d of the ring's split is block d
}

uint8_t* AllToAll::receiveTarget(uint64_t peer, const FrameHeader& h) {
  const size_t k = claimOwnChunkSegment(peer, h, "all-to-all", got_);
  return result_ + k * blockBytes_ + (h.offset - chunkBegin(ring_.rank));
}

void AllToAll::onReceived(FrameSink& sink, const FrameHeader& h) {
  (void)sink;
  rxProgress_ += h.length;
  ++received_;
}

std::vector<MemoryRange> AllToAll::landingRanges() const {
  if (!exchanges()) return {};
  return {MemoryRange{result_, nbytes_}};
}

}  // namespace pccl
