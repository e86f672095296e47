#include "pccl/state_fetch.hpp"

namespace pccl {

StateFetch::StateFetch(uint64_t tag, uint64_t source, uint64_t exposure, std::vector<FetchChunk> chunks,
                       double timeoutSeconds)
    : Collective(OpKey{kStateEpoch, tag, 0}, timeoutSeconds),
      source_(source),
      exposure_(exposure),
      chunks_(std::move(chunks)),
      received_(chunks_.size(), false),
      remaining_(chunks_.size()) {
  for (const FetchChunk& c : chunks_) {
    if (c.length == 0 || c.length > kMaxFramePayload) throw InvalidArgument("state chunk length out of range");
    requests_.push_back(StateRequest{exposure_, c.length});
  }
}

void StateFetch::start(FrameSink& sink) {
  for (size_t i = 0; i < chunks_.size(); ++i) {
    // digest: the entry; seq: the chunk index (wire.hpp).
    FrameHeader h = makeHeader(FrameType::kStateRequest, OpKey{kStateEpoch, key().tag, i}, sizeof(StateRequest),
                               chunks_[i].entry, chunks_[i].offset);
    ++pendingSends_;
    sink.sendFrame(this, source_, i, h, reinterpret_cast<const uint8_t*>(&requests_[i]));
  }
}

bool StateFetch::accepts(const FrameHeader& h) const {
  return h.type == static_cast<uint8_t>(FrameType::kStateData) && h.epoch == kStateEpoch && h.tag == key().tag;
}

uint8_t* StateFetch::receiveTarget(uint64_t peer, const FrameHeader& h) {
  if (peer != source_ || h.seq >= chunks_.size() || received_[h.seq]) {
    throw ProtocolError("unexpected state chunk from peer " + std::to_string(peer), peer);
  }
  const FetchChunk& c = chunks_[h.seq];
  if (h.digest != c.entry || h.offset != c.offset || h.length != c.length) {
    throw ProtocolError("state chunk from peer " + std::to_string(peer) + " does not match its request", peer);
  }
  return c.dst;
}

void StateFetch::onReceived(FrameSink&, const FrameHeader& h) {
  received_[h.seq] = true;
  --remaining_;
  rxProgress_ += h.length;
}

std::vector<MemoryRange> StateFetch::landingRanges() const {
  std::vector<MemoryRange> ranges;
  ranges.reserve(chunks_.size());
  for (const FetchChunk& c : chunks_) ranges.push_back(MemoryRange{c.dst, c.length});
  return ranges;
}

bool StateFetch::complete() const { return remaining_ == 0 && pendingSends_ == 0; }

}  // namespace pccl
