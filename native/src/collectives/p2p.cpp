#include "pccl/p2p.hpp"

#include <algorithm>

namespace pccl {

PointToPoint::PointToPoint(const P2pOptions& options, uint64_t epoch, uint64_t opTag, uint64_t self)
    : Collective(OpKey{epoch, opTag, self}, options.timeoutSeconds), options_(options), peer_(options.peer) {
  if (options_.bytes > 0 && options_.data == nullptr) throw InvalidArgument("null buffer");
  options_.segmentBytes = std::clamp<size_t>(options_.segmentBytes, 64, kMaxFramePayload);
}

void PointToPoint::match(uint64_t source, uint64_t senderTag) {
  peer_.store(source, std::memory_order_release);
  remoteTag_ = senderTag;
  paired_ = true;
}

void PointToPoint::onAccepted(FrameSink& sink, uint64_t receiverTag) {
  remoteTag_ = receiverTag;
  paired_ = true;
  // Addressed to the receiving op: its key is (epoch, its tag, the receiver's id).
  const OpKey to{key().epoch, receiverTag, options_.peer};
  size_t stripe = 0;
  for (size_t at = 0; at < options_.bytes; at += options_.segmentBytes) {
    const size_t len = std::min(options_.segmentBytes, options_.bytes - at);
    ++pendingSends_;
    sink.sendFrame(this, options_.peer, stripe++,
                   makeHeader(FrameType::kData, to, static_cast<uint32_t>(len), /*digest=*/0, at),
                   options_.data + at);
  }
}

uint8_t* PointToPoint::receiveTarget(uint64_t peer, const FrameHeader& h) {
  if (options_.send || !paired_ || peer != this->peer() || h.offset > options_.bytes ||
      h.length > options_.bytes - h.offset) {
    throw ProtocolError("unexpected point-to-point payload from peer " + std::to_string(peer) + " " + describe(), peer);
  }
  return options_.data + h.offset;
}

void PointToPoint::onReceived(FrameSink&, const FrameHeader& h) {
  received_ += h.length;
  rxProgress_ += h.length;
}

bool PointToPoint::complete() const {
  if (options_.send) return paired_ && pendingSends_ == 0;
  return paired_ && received_ >= options_.bytes;
}

bool PointToPoint::involves(uint64_t peer) const {
  // An any-source receive not matched yet waits on every peer: losing one may lose its
  // sender.
  if (!options_.send && !paired_ && anySource()) return true;
  return peer == this->peer();
}

void PointToPoint::forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const {
  if (paired_) fn(ctx, peer());
}

std::vector<MemoryRange> PointToPoint::landingRanges() const {
  if (options_.send || options_.bytes == 0) return {};
  return {MemoryRange{options_.data, options_.bytes}};
}

}  // namespace pccl
