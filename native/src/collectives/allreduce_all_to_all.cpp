#include "pccl/allreduce_all_to_all.hpp"

#include <algorithm>
#include <cstring>

namespace pccl {

uint32_t AllToAllReduce::digest(size_t count, DType dtype, ReduceOp op, size_t worldSize, uint64_t algorithm,
                                size_t root) {
  // FNV-1a, as the ring's, with the algorithm as a fifth field and a broadcast's root
  // (when not 0) as a sixth.
  uint64_t fields[6] = {static_cast<uint64_t>(count), static_cast<uint64_t>(dtype), static_cast<uint64_t>(op),
                        static_cast<uint64_t>(worldSize), algorithm, static_cast<uint64_t>(root)};
  uint32_t h = 2166136261u;
  for (size_t k = 0; k < (root != 0 ? 6u : 5u); ++k) {
    const uint64_t f = fields[k];
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint8_t>(f >> (8 * i));
      h *= 16777619u;
    }
  }
  return h;
}

size_t AllToAllReduce::segmentBytesFor(const AllReduceOptions& o, size_t elemSize) {
  size_t bytes = std::max(elemSize, o.segmentBytes - o.segmentBytes % elemSize);
  return std::min<size_t>(bytes, kMaxFramePayload - kMaxFramePayload % elemSize);
}

AllToAllReduce::AllToAllReduce(const AllReduceOptions& options, const RingPosition& ring,
                               std::vector<uint64_t> peers, ScratchBuffer scratch, uint64_t algorithm)
    : Collective(OpKey{ring.epoch, options.tag, options.seq}, options.timeoutSeconds),
      options_(options),
      ring_(ring),
      peers_(std::move(peers)),
      scratch_(std::move(scratch)),
      inPlace_(options.input == options.output),
      elemSize_(elementSize(options.dtype)),
      nbytes_(options.count * elemSize_),
      digest_(digest(options.count, options.dtype, options.op, ring.size, algorithm, options.root)),
      in_(static_cast<const uint8_t*>(options.input)),
      result_(static_cast<uint8_t*>(options.output)) {
  PCCL_ENFORCE(ring_.size >= 1 && ring_.rank < ring_.size && peers_.size() == ring_.size, "bad ring position");
  if (options_.vote) enableDirectVote(peers_, ring_.rank, digest_);
  if (exchanges()) segmentBytes_ = segmentBytesFor(options_, elemSize_);
}

void AllToAllReduce::placeResult(size_t deferredAt) {
  if (inPlace_ && options_.deferCommit) {
    result_ = scratch_.data.get() + deferredAt;
  } else if (inPlace_) {
    ownResult_.reset(new uint8_t[nbytes_]);
    result_ = ownResult_.get();
  }
}

void AllToAllReduce::copyInputIfAlone() {
  if (!inPlace_ && nbytes_ > 0) std::memcpy(result_, in_, nbytes_);
}

size_t AllToAllReduce::rankOf(uint64_t peer) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (peers_[k] == peer) return k;
  }
  return peers_.size();
}

ProtocolError AllToAllReduce::badFrame(uint64_t peer, const std::string& why) const {
  return ProtocolError("bad frame from peer " + std::to_string(peer) + ": " + why, peer);
}

size_t AllToAllReduce::checkFrame(uint64_t peer, const FrameHeader& h, const char* name) const {
  if (h.digest != digest_) {
    throw ProtocolError("peers disagree on the collective: peer " + std::to_string(peer) +
                            " sent a different element count, dtype, operator, world size, root or algorithm (this peer: " +
                            std::to_string(options_.count) + " x " + dtypeName(options_.dtype) + ", " +
                            reduceOpName(options_.op) + ", N=" + std::to_string(ring_.size) + ", " + name + ")",
                        peer);
  }
  const size_t k = rankOf(peer);
  if (k >= ring_.size || k == ring_.rank) throw badFrame(peer, "it is not a peer of this op");
  return k;
}

bool AllToAllReduce::involves(uint64_t peer) const {
  const size_t k = rankOf(peer);
  return ring_.size > 1 && k < ring_.size && k != ring_.rank;
}

void AllToAllReduce::forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (k != ring_.rank) fn(ctx, peers_[k]);
  }
}

void AllToAllReduce::onSuccess() {
  if (ownResult_) {  // in place without deferCommit: built aside (placeResult)
    std::memcpy(static_cast<uint8_t*>(options_.output), result_, nbytes_);
  }
}

void AllToAllReduce::commitResult() {
  PCCL_ENFORCE(state() == OpState::kSucceeded || voted(), "only a successful or voted op can be committed");
  if (holdsResult() && scratch_.data) std::memcpy(static_cast<uint8_t*>(options_.output), result_, nbytes_);
}

size_t AllToAllReduce::partBegin(size_t part, size_t parts) const {
  return (part * (options_.count / parts) + std::min(part, options_.count % parts)) * elemSize_;
}

void AllToAllReduce::sendInputToAll(FrameSink& sink, Phase phase) {
  const size_t n = ring_.size;
  const size_t segments = segmentsIn(nbytes_);
  for (size_t seg = 0; seg < segments; ++seg) {
    const size_t off = seg * segmentBytes_;
    const size_t len = std::min(segmentBytes_, nbytes_ - off);
    for (size_t d = 1; d < n; ++d) {
      ++pendingSends_;
      sink.sendFrame(this, peers_[(ring_.rank + d) % n], seg,
                     makeHeader(FrameType::kData, key(), static_cast<uint32_t>(len), digest_, off,
                                static_cast<uint8_t>(phase)),
                     in_ + off);
    }
  }
}

void AllToAllReduce::sendChunksToOwners(FrameSink& sink) {
  const size_t n = ring_.size;
  size_t most = 0;
  for (size_t c = 0; c < n; ++c) most = std::max(most, segmentsOf(c));
  for (size_t seg = 0; seg < most; ++seg) {
    for (size_t d = 1; d < n; ++d) {
      const size_t k = (ring_.rank + d) % n;
      if (seg >= segmentsOf(k)) continue;
      const size_t off = chunkBegin(k) + seg * segmentBytes_;
      const size_t len = std::min(segmentBytes_, chunkBegin(k + 1) - off);
      ++pendingSends_;
      sink.sendFrame(this, peers_[k], seg,
                     makeHeader(FrameType::kData, key(), static_cast<uint32_t>(len), digest_, off,
                                static_cast<uint8_t>(Phase::kReduceScatter)),
                     in_ + off);
    }
  }
}

size_t AllToAllReduce::claimInputSegment(uint64_t peer, const FrameHeader& h, const char* name, Phase phase,
                                         std::vector<uint8_t>& got) const {
  const size_t k = checkFrame(peer, h, name);
  if (h.phase != static_cast<uint8_t>(phase)) throw badFrame(peer, "unknown phase");
  if (segmentBytes_ == 0 || h.offset % segmentBytes_ != 0 || h.offset >= nbytes_) {
    throw badFrame(peer, "segment out of bounds");
  }
  const size_t seg = h.offset / segmentBytes_;
  if (h.length != std::min(segmentBytes_, nbytes_ - h.offset)) throw badFrame(peer, "wrong segment length");
  uint8_t& claimed = got[k * segmentsIn(nbytes_) + seg];
  if (claimed) throw badFrame(peer, "duplicate segment");
  claimed = 1;
  return k;
}

size_t AllToAllReduce::segmentOfChunk(uint64_t peer, const FrameHeader& h, size_t chunk) const {
  const size_t begin = chunkBegin(chunk);
  const size_t end = chunkBegin(chunk + 1);
  if (segmentBytes_ == 0 || h.offset < begin || h.offset >= end || (h.offset - begin) % segmentBytes_ != 0) {
    throw badFrame(peer, "segment out of bounds");
  }
  if (h.length != std::min(segmentBytes_, end - h.offset)) throw badFrame(peer, "wrong segment length");
  return (h.offset - begin) / segmentBytes_;
}

size_t AllToAllReduce::claimOwnChunkSegment(uint64_t peer, const FrameHeader& h, const char* name,
                                            std::vector<uint8_t>& got) const {
  const size_t k = checkFrame(peer, h, name);
  if (h.phase != static_cast<uint8_t>(Phase::kReduceScatter)) throw badFrame(peer, "unknown phase");
  uint8_t& claimed = got[k * segmentsOf(ring_.rank) + segmentOfChunk(peer, h, ring_.rank)];
  if (claimed) throw badFrame(peer, "duplicate segment");
  claimed = 1;
  return k;
}

}  // namespace pccl
