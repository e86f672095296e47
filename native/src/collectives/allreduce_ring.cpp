#include "pccl/allreduce_ring.hpp"

#include <algorithm>
#include <cstring>

#include "pccl/reduce.hpp"

namespace pccl {

uint32_t AllReduceRing::digest(size_t count, DType dtype, ReduceOp op, size_t worldSize) {
  // FNV-1a over the fields that must agree.
  uint64_t fields[4] = {static_cast<uint64_t>(count), static_cast<uint64_t>(dtype),
                        static_cast<uint64_t>(op), static_cast<uint64_t>(worldSize)};
  uint32_t h = 2166136261u;
  for (uint64_t f : fields) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint8_t>(f >> (8 * i));
      h *= 16777619u;
    }
  }
  return h;
}

AllReduceRing::AllReduceRing(const AllReduceOptions& options, const RingPosition& ring, ScratchBuffer scratch)
    : Collective(OpKey{ring.epoch, options.tag, options.seq}, options.timeoutSeconds),
      options_(options),
      ring_(ring),
      scratch_(std::move(scratch)),
      inPlace_(options.input == options.output),
      elemSize_(elementSize(options.dtype)),
      nbytes_(options.count * elemSize_),
      digest_(digest(options.count, options.dtype, options.op, ring.size)),
      in_(static_cast<const uint8_t*>(options.input)),
      out_(static_cast<uint8_t*>(options.output)) {
  PCCL_ENFORCE(ring_.size >= 1 && ring_.rank < ring_.size, "bad ring position");
  segmentBytes_ = std::max(elemSize_, options.segmentBytes - options.segmentBytes % elemSize_);
  segmentBytes_ = std::min<size_t>(segmentBytes_, kMaxFramePayload - kMaxFramePayload % elemSize_);
  rsBuf_ = out_;
  if (inPlace_ && nbytes_ > 0 && ring_.size > 1) {  // N=1 in place: the input is the result
    PCCL_ENFORCE(scratch_.size >= nbytes_, "in-place all-reduce needs a scratch buffer");
    rsBuf_ = scratch_.data.get();  // reduce-scatter arrivals, then the input they replace
    backups_.reserve(nbytes_ / segmentBytes_ + ring_.size + 1);
  }
  const size_t n = ring_.size;
  ownedChunk_ = (ring_.rank + 1) % n;
  noForwardChunk_ = (ring_.rank + 2) % n;
  auto chunkBytes = [this](size_t c) { return chunkBegin(c + 1) - chunkBegin(c); };
  if (n > 1) {
    rsExpected_ = nbytes_ - chunkBytes(ring_.rank);
    agExpected_ = nbytes_ - chunkBytes(ownedChunk_);
  }
  if (options.vote) enableVote(n, ring_.prevPeer, ring_.nextPeer, digest_);
}

size_t AllReduceRing::chunkBegin(size_t chunk) const {
  const size_t n = ring_.size;
  const size_t base = options_.count / n;
  const size_t rem = options_.count % n;
  return (chunk * base + std::min(chunk, rem)) * elemSize_;
}

size_t AllReduceRing::chunkOf(size_t byteOffset) const {
  const size_t n = ring_.size;
  const size_t base = options_.count / n;
  const size_t rem = options_.count % n;
  const size_t elem = byteOffset / elemSize_;
  const size_t bigChunksEnd = rem * (base + 1);  // the first `rem` chunks hold one extra element
  if (elem < bigChunksEnd) return elem / (base + 1);
  return rem + (elem - bigChunksEnd) / base;
}

FrameHeader AllReduceRing::header(Phase phase, size_t offset, size_t length) const {
  return makeHeader(FrameType::kData, key(), static_cast<uint32_t>(length), digest_, offset,
                    static_cast<uint8_t>(phase));
}

void AllReduceRing::sendRange(FrameSink& sink, Phase phase, size_t begin, size_t end, const uint8_t* base) {
  for (size_t off = begin; off < end; off += segmentBytes_) {
    size_t len = std::min(segmentBytes_, end - off);
    ++pendingSends_;
    sink.sendFrame(this, ring_.nextPeer, off / segmentBytes_, header(phase, off, len), base + off);
  }
}

void AllReduceRing::start(FrameSink& sink) {
  if (ring_.size == 1) {
    if (out_ != in_ && nbytes_ > 0) std::memcpy(out_, in_, nbytes_);
    return;
  }
  const size_t own = ring_.rank;
  // In place, our own chunk is overwritten only by its all-gather, long after this:
  // it is kept a piece at a time while the reduce-scatter runs (backUpOwnChunk), so
  // the first frames leave at once.
  ownKept_ = chunkBegin(own);
  sendRange(sink, Phase::kReduceScatter, chunkBegin(own), chunkBegin(own + 1), in_);
}

void AllReduceRing::backUpOwnChunk(size_t upTo) {
  const size_t end = std::min(upTo, chunkBegin(ring_.rank + 1));
  if (rsBuf_ == out_ || ownKept_ >= end) return;
  streamCopy(rsBuf_ + ownKept_, in_ + ownKept_, end - ownKept_);
  backups_.push_back({ownKept_, end - ownKept_});
  ownKept_ = end;
}

uint8_t* AllReduceRing::receiveTarget(uint64_t peer, const FrameHeader& h) {
  auto bad = [&](const std::string& why) -> ProtocolError {
    return ProtocolError("bad frame from peer " + std::to_string(peer) + ": " + why, peer);
  };
  if (h.digest != digest_) {
    throw ProtocolError("peers disagree on the all-reduce: peer " + std::to_string(peer) +
                            " sent a different element count, dtype, operator or world size (this peer: " +
                            std::to_string(options_.count) + " x " + dtypeName(options_.dtype) + ", " +
                            reduceOpName(options_.op) + ", N=" + std::to_string(ring_.size) + ")",
                        peer);
  }
  if (peer != ring_.prevPeer) throw bad("it is not this peer's ring predecessor");
  if (h.length == 0 || h.offset % elemSize_ != 0 || h.length % elemSize_ != 0 || h.offset > nbytes_ ||
      h.length > nbytes_ - h.offset) {
    throw bad("segment out of bounds");
  }
  const size_t chunk = chunkOf(h.offset);
  if (h.offset + h.length > chunkBegin(chunk + 1)) throw bad("segment crosses a chunk boundary");
  if (h.phase == static_cast<uint8_t>(Phase::kReduceScatter)) {
    if (chunk == ring_.rank || rsReceived_ + h.length > rsExpected_) throw bad("unexpected reduce-scatter segment");
  } else if (h.phase == static_cast<uint8_t>(Phase::kAllGather)) {
    if (chunk == ownedChunk_ || agReceived_ + h.length > agExpected_) throw bad("unexpected all-gather segment");
    if (chunk == ring_.rank) backUpOwnChunk(SIZE_MAX);  // about to overwrite our own input
  } else {
    throw bad("unknown phase");
  }
  return (h.phase == static_cast<uint8_t>(Phase::kReduceScatter) ? rsBuf_ : out_) + h.offset;
}

void AllReduceRing::onReceived(FrameSink& sink, const FrameHeader& h) {
  const size_t off = h.offset;
  const size_t len = h.length;
  rxProgress_ += len;
  const size_t chunk = chunkOf(off);
  if (h.phase == static_cast<uint8_t>(Phase::kReduceScatter)) {
    rsReceived_ += len;
    // The payload (partial reduction from upstream) sits in rsBuf_; fold in our own
    // contribution. In place, the sum replaces our input in the caller's buffer and
    // the input moves to rsBuf_ (restored from there if the op fails).
    if (rsBuf_ != out_) {
      reduceSwap(options_.dtype, options_.op, rsBuf_ + off, out_ + off, len / elemSize_);
      backups_.push_back({off, len});
      backUpOwnChunk(ownKept_ + segmentBytes_);
    } else {
      reduceInto(options_.dtype, options_.op, out_ + off, out_ + off, in_ + off, len / elemSize_);
    }
    if (chunk == ownedChunk_) {
      if (options_.op == ReduceOp::kAvg) finalizeAverage(options_.dtype, out_ + off, len / elemSize_, ring_.size);
      sendRange(sink, Phase::kAllGather, off, off + len, out_);
    } else {
      sendRange(sink, Phase::kReduceScatter, off, off + len, out_);
    }
  } else {
    agReceived_ += len;
    if (chunk != noForwardChunk_) sendRange(sink, Phase::kAllGather, off, off + len, out_);
  }
}

bool AllReduceRing::complete() const {
  return rsReceived_ == rsExpected_ && agReceived_ == agExpected_ && pendingSends_ == 0;
}

bool AllReduceRing::involves(uint64_t peer) const {
  return ring_.size > 1 && (peer == ring_.prevPeer || peer == ring_.nextPeer);
}

void AllReduceRing::forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const {
  if (ring_.size == 1) return;
  fn(ctx, ring_.prevPeer);
  if (ring_.nextPeer != ring_.prevPeer) fn(ctx, ring_.nextPeer);
}

std::vector<MemoryRange> AllReduceRing::landingRanges() const {
  std::vector<MemoryRange> ranges;
  if (inPlace_ || ring_.size == 1 || nbytes_ == 0) return ranges;
  const size_t n = ring_.size;
  for (size_t k = 1; k <= n; ++k) {
    const size_t chunk = (ring_.rank + n - k) % n;
    ranges.push_back(MemoryRange{out_ + chunkBegin(chunk), chunkBegin(chunk + 1) - chunkBegin(chunk)});
  }
  return ranges;
}

void AllReduceRing::onFailure() {
  // Deferred and voting: the result may still be declared a success (if this peer
  // voted), and the restore waits for the arbiter's verdict anyway; settle() decides.
  if (!defersRestore()) restoreInput();
}

void AllReduceRing::commitResult() {
  PCCL_ENFORCE(state() == OpState::kSucceeded || voted(), "only a successful or voted op can be committed");
  // The result is already in the caller's buffer.
}

void AllReduceRing::rollback() { restoreInput(); }

void AllReduceRing::restoreInput() {
  if (rsBuf_ == out_ || !scratch_.data) return;  // out of place, or the backup is gone
  for (const auto& [off, len] : backups_) std::memcpy(out_ + off, rsBuf_ + off, len);
  backups_.clear();
}

}  // namespace pccl
