#include "pccl/allreduce_quantized.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "pccl/errors.hpp"

namespace pccl {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kMaxSegmentElems = size_t(1) << 24;  // keeps a uint16 segment under the frame cap

size_t roundUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

size_t segmentElemsFor(const AllReduceOptions& o) {
  const size_t es = elementSize(o.dtype);
  size_t elems = o.segmentBytes / es / kQuantBlockElems * kQuantBlockElems;
  return std::min(std::max(elems, kQuantBlockElems), kMaxSegmentElems);
}

// Sizes shared by the constructor and scratchBytes().
struct Sizes {
  size_t segElems;
  size_t segsPerChunk;
  size_t slotBytes;
  size_t stageBytes;  // one of the three staging areas
};

Sizes sizesFor(const AllReduceOptions& o, size_t n) {
  Sizes s{};
  const size_t maxChunk = (o.count + n - 1) / n;
  s.segElems = segmentElemsFor(o);
  s.segsPerChunk = std::max<size_t>(1, (maxChunk + s.segElems - 1) / s.segElems);
  s.slotBytes = roundUp(quantEncodedBytes(o.quant, o.dtype, std::min(s.segElems, std::max<size_t>(maxChunk, 1))));
  s.stageBytes = n * s.segsPerChunk * s.slotBytes;
  return s;
}

}  // namespace

uint32_t AllReduceQuantized::digest(const AllReduceOptions& o, size_t worldSize) {
  uint64_t fields[6] = {static_cast<uint64_t>(o.count),     static_cast<uint64_t>(o.dtype),
                        static_cast<uint64_t>(o.op),        static_cast<uint64_t>(worldSize),
                        static_cast<uint64_t>(o.quant.kind), static_cast<uint64_t>(o.quant.wire)};
  uint32_t h = 2166136261u;
  for (uint64_t f : fields) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint8_t>(f >> (8 * i));
      h *= 16777619u;
    }
  }
  return h;
}

size_t AllReduceQuantized::scratchBytes(const AllReduceOptions& options, size_t n) {
  if (n <= 1 || options.count == 0) return 0;
  Sizes s = sizesFor(options, n);
  return 3 * s.stageBytes;
}

AllReduceQuantized::AllReduceQuantized(const AllReduceOptions& options, const RingPosition& ring,
                                       std::vector<uint64_t> peers, ScratchBuffer scratch)
    : Collective(OpKey{ring.epoch, options.tag, options.seq}, options.timeoutSeconds),
      options_(options),
      ring_(ring),
      peers_(std::move(peers)),
      scratch_(std::move(scratch)),
      spec_(options.quant),
      inPlace_(options.input == options.output),
      elemSize_(elementSize(options.dtype)),
      nbytes_(options.count * elemSize_),
      digest_(digest(options, ring.size)),
      in_(static_cast<const uint8_t*>(options.input)),
      out_(static_cast<uint8_t*>(options.output)) {
  const size_t n = ring_.size;
  PCCL_ENFORCE(n >= 1 && ring_.rank < n && peers_.size() == n, "bad ring position");
  checkQuantizable(spec_, options_.dtype);
  if (options_.op != ReduceOp::kSum && options_.op != ReduceOp::kAvg) {
    throw InvalidArgument("a quantized all-reduce supports SUM and AVG only, not " +
                          std::string(reduceOpName(options_.op)));
  }
  if (options_.vote) enableVote(n, ring_.prevPeer, ring_.nextPeer, digest_);
  if (n == 1 || options_.count == 0) return;
  Sizes s = sizesFor(options_, n);
  PCCL_ENFORCE(scratch_.size >= 3 * s.stageBytes, "quantized all-reduce needs its scratch");
  segElems_ = s.segElems;
  segsPerChunk_ = s.segsPerChunk;
  slotBytes_ = s.slotBytes;
  uint8_t* base = scratch_.data.get();
  if (inPlace_) out_ = nullptr;  // decoded at the end (decodeAll)
  sendStage_ = base;
  rsStage_ = sendStage_ + s.stageBytes;
  agStage_ = rsStage_ + s.stageBytes;
  rsGot_.assign(n * segsPerChunk_, 0);
  agGot_.assign(n * segsPerChunk_, 0);
  rsCount_.assign(segsPerChunk_, 0);
  terms_.assign(n, nullptr);
  rsExpected_ = (n - 1) * segmentsOf(ring_.rank);
  for (size_t c = 0; c < n; ++c) {
    if (c != ring_.rank) agExpected_ += segmentsOf(c);
  }
}

size_t AllReduceQuantized::chunkBeginElem(size_t chunk) const {
  const size_t n = ring_.size;
  const size_t base = options_.count / n;
  const size_t rem = options_.count % n;
  return chunk * base + std::min(chunk, rem);
}

size_t AllReduceQuantized::chunkElems(size_t chunk) const { return chunkBeginElem(chunk + 1) - chunkBeginElem(chunk); }

size_t AllReduceQuantized::segmentsOf(size_t chunk) const { return (chunkElems(chunk) + segElems_ - 1) / segElems_; }

size_t AllReduceQuantized::segmentElems(size_t chunk, size_t seg) const {
  return std::min(segElems_, chunkElems(chunk) - seg * segElems_);
}

size_t AllReduceQuantized::rankOf(uint64_t peer) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (peers_[k] == peer) return k;
  }
  return peers_.size();
}

FrameHeader AllReduceQuantized::header(Phase phase, size_t chunk, size_t seg, size_t length) const {
  return makeHeader(FrameType::kData, key(), static_cast<uint32_t>(length), digest_,
                    (chunkBeginElem(chunk) + seg * segElems_) * elemSize_, static_cast<uint8_t>(phase));
}

void AllReduceQuantized::start(FrameSink& sink) {
  const size_t n = ring_.size;
  if (n == 1 || options_.count == 0) {  // nothing to exchange: the exact input is the result
    if (out_ != in_ && nbytes_ > 0) std::memcpy(out_, in_, nbytes_);
    return;
  }
  // Segment-major, owners staggered by rank: every owner gets its first segments early.
  for (size_t seg = 0; seg < segsPerChunk_; ++seg) {
    for (size_t d = 1; d < n; ++d) {
      const size_t c = (ring_.rank + d) % n;
      if (seg >= segmentsOf(c)) continue;
      const size_t elems = segmentElems(c, seg);
      const size_t first = chunkBeginElem(c) + seg * segElems_;
      uint8_t* dst = sendStage_ + slot(c, seg);
      quantize(spec_, options_.dtype, in_ + first * elemSize_, elems, dst);
      ++pendingSends_;
      sink.sendFrame(this, peers_[c], seg, header(Phase::kReduceScatter, c, seg, quantEncodedBytes(spec_, options_.dtype, elems)),
                     dst);
    }
  }
}

uint8_t* AllReduceQuantized::receiveTarget(uint64_t peer, const FrameHeader& h) {
  auto bad = [&](const std::string& why) -> ProtocolError {
    return ProtocolError("bad frame from peer " + std::to_string(peer) + ": " + why, peer);
  };
  if (h.digest != digest_) {
    throw ProtocolError("peers disagree on the all-reduce: peer " + std::to_string(peer) +
                            " sent a different element count, dtype, operator, world size or quantization (this peer: " +
                            std::to_string(options_.count) + " x " + dtypeName(options_.dtype) + ", " +
                            reduceOpName(options_.op) + ", N=" + std::to_string(ring_.size) + ", quantized " +
                            quantKindName(spec_.kind) + " to " + dtypeName(spec_.wire) + ")",
                        peer);
  }
  const size_t k = rankOf(peer);
  if (k >= ring_.size || k == ring_.rank) throw bad("it is not a peer of this ring");
  if (segElems_ == 0 || h.offset % elemSize_ != 0 || h.offset >= nbytes_) throw bad("segment out of bounds");
  const size_t elem = h.offset / elemSize_;
  // The chunk holding `elem` (the first `rem` chunks hold one extra element).
  const size_t base = options_.count / ring_.size;
  const size_t rem = options_.count % ring_.size;
  const size_t bigEnd = rem * (base + 1);
  const size_t chunk = elem < bigEnd ? elem / (base + 1) : rem + (elem - bigEnd) / base;
  const size_t within = elem - chunkBeginElem(chunk);
  if (within % segElems_ != 0) throw bad("segment not on a segment boundary");
  const size_t seg = within / segElems_;
  if (h.length != quantEncodedBytes(spec_, options_.dtype, segmentElems(chunk, seg))) throw bad("wrong segment length");
  if (h.phase == static_cast<uint8_t>(Phase::kReduceScatter)) {
    if (chunk != ring_.rank) throw bad("reduce-scatter segment of a chunk this peer does not own");
    uint8_t& got = rsGot_[k * segsPerChunk_ + seg];
    if (got) throw bad("duplicate reduce-scatter segment");
    got = 1;
    return rsStage_ + slot(k, seg);
  }
  if (h.phase == static_cast<uint8_t>(Phase::kAllGather)) {
    if (chunk != k) throw bad("all-gather segment of a chunk the sender does not own");
    uint8_t& got = agGot_[chunk * segsPerChunk_ + seg];
    if (got) throw bad("duplicate all-gather segment");
    got = 1;
    return agStage_ + slot(chunk, seg);
  }
  throw bad("unknown phase");
}

void AllReduceQuantized::onReceived(FrameSink& sink, const FrameHeader& h) {
  rxProgress_ += h.length;
  const size_t elem = h.offset / elemSize_;
  if (h.phase == static_cast<uint8_t>(Phase::kReduceScatter)) {
    ++rsReceived_;
    const size_t seg = (elem - chunkBeginElem(ring_.rank)) / segElems_;
    if (++rsCount_[seg] == ring_.size - 1) finishSegment(sink, seg);
    return;
  }
  ++agReceived_;
  if (out_ == nullptr) return;  // in place: decoded on success
  // The sender owns the chunk (checked in receiveTarget).
  const size_t base = options_.count / ring_.size;
  const size_t rem = options_.count % ring_.size;
  const size_t bigEnd = rem * (base + 1);
  const size_t chunk = elem < bigEnd ? elem / (base + 1) : rem + (elem - bigEnd) / base;
  const size_t seg = (elem - chunkBeginElem(chunk)) / segElems_;
  dequantize(spec_, options_.dtype, agStage_ + slot(chunk, seg), segmentElems(chunk, seg), out_ + elem * elemSize_);
}

void AllReduceQuantized::finishSegment(FrameSink& sink, size_t seg) {
  const size_t me = ring_.rank;
  const size_t n = ring_.size;
  const size_t elems = segmentElems(me, seg);
  const size_t first = chunkBeginElem(me) + seg * segElems_;
  for (size_t k = 0; k < n; ++k) terms_[k] = k == me ? nullptr : rsStage_ + slot(k, seg);
  uint8_t* encoded = agStage_ + slot(me, seg);
  const size_t divisor = options_.op == ReduceOp::kAvg ? n : 1;
  reduceQuantized(spec_, options_.dtype, in_ + first * elemSize_, me, terms_.data(), n, elems, divisor, encoded,
                  out_ == nullptr ? nullptr : out_ + first * elemSize_);
  const size_t length = quantEncodedBytes(spec_, options_.dtype, elems);
  for (size_t d = 1; d < n; ++d) {
    const size_t k = (me + d) % n;
    ++pendingSends_;
    sink.sendFrame(this, peers_[k], seg, header(Phase::kAllGather, me, seg, length), encoded);
  }
}

bool AllReduceQuantized::complete() const {
  return rsReceived_ == rsExpected_ && agReceived_ == agExpected_ && pendingSends_ == 0;
}

bool AllReduceQuantized::involves(uint64_t peer) const {
  return ring_.size > 1 && peer != peers_[ring_.rank] && rankOf(peer) < ring_.size;
}

void AllReduceQuantized::forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (k != ring_.rank) fn(ctx, peers_[k]);
  }
}

void AllReduceQuantized::decodeAll(uint8_t* dst) const {
  for (size_t c = 0; c < ring_.size; ++c) {
    for (size_t seg = 0; seg < segmentsOf(c); ++seg) {
      const size_t first = chunkBeginElem(c) + seg * segElems_;
      dequantize(spec_, options_.dtype, agStage_ + slot(c, seg), segmentElems(c, seg), dst + first * elemSize_);
    }
  }
}

void AllReduceQuantized::onSuccess() {
  if (inPlace_ && nbytes_ > 0 && ring_.size > 1 && !options_.deferCommit) {
    decodeAll(static_cast<uint8_t*>(options_.output));
  }
}

void AllReduceQuantized::commitResult() {
  PCCL_ENFORCE(state() == OpState::kSucceeded || voted(), "only a successful or voted op can be committed");
  if (holdsResult() && scratch_.data) decodeAll(static_cast<uint8_t*>(options_.output));
}

}  // namespace pccl
