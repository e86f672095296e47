#include "pccl/allreduce_direct_rsag.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "pccl/allreduce_direct.hpp"
#include "pccl/errors.hpp"
#include "pccl/reduce.hpp"

namespace pccl {
namespace {

size_t segmentBytesFor(const AllReduceOptions& o, size_t elemSize) {
  size_t bytes = std::max(elemSize, o.segmentBytes - o.segmentBytes % elemSize);
  return std::min<size_t>(bytes, kMaxFramePayload - kMaxFramePayload % elemSize);
}

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
    : Collective(OpKey{ring.epoch, options.tag, options.seq}, options.timeoutSeconds),
      options_(options),
      ring_(ring),
      peers_(std::move(peers)),
      scratch_(std::move(scratch)),
      inPlace_(options.input == options.output),
      elemSize_(elementSize(options.dtype)),
      nbytes_(options.count * elemSize_),
      digest_(AllReduceDirect::digest(options.count, options.dtype, options.op, ring.size,
                                      AllReduceAlgorithm::kDirectRsAg)),
      in_(static_cast<const uint8_t*>(options.input)),
      result_(static_cast<uint8_t*>(options.output)) {
  const size_t n = ring_.size;
  PCCL_ENFORCE(n >= 1 && ring_.rank < n && peers_.size() == n, "bad ring position");
  if (options_.vote) enableDirectVote(peers_, ring_.rank, digest_);
  if (n == 1 || nbytes_ == 0) return;
  PCCL_ENFORCE(scratch_.size >= scratchBytes(options_, n), "direct reduce-scatter all-reduce needs its scratch");
  slotBytes_ = largestChunkBytes(options_, n);
  if (inPlace_ && options_.deferCommit) {
    result_ = scratch_.data.get() + (n - 1) * slotBytes_;
  } else if (inPlace_) {
    ownResult_.reset(new uint8_t[nbytes_]);
    result_ = ownResult_.get();
  }
  segmentBytes_ = segmentBytesFor(options_, elemSize_);
  const size_t own = segmentsOf(ring_.rank);
  rsGot_.assign(n * own, 0);
  arrived_.assign(own, 0);
  agBase_.assign(n + 1, 0);
  for (size_t c = 0; c < n; ++c) agBase_[c + 1] = agBase_[c] + (c == ring_.rank ? 0 : segmentsOf(c));
  agGot_.assign(agBase_[n], 0);
  expected_ = (n - 1) * own + agBase_[n];
}

size_t AllReduceDirectRsAg::chunkBegin(size_t chunk) const {
  // The ring's chunking (AllReduceRing::chunkBegin): the first count % N chunks hold one
  // element more.
  const size_t n = ring_.size;
  const size_t base = options_.count / n;
  const size_t rem = options_.count % n;
  return (chunk * base + std::min(chunk, rem)) * elemSize_;
}

size_t AllReduceDirectRsAg::segmentsOf(size_t chunk) const {
  return (chunkBytes(chunk) + segmentBytes_ - 1) / segmentBytes_;
}

size_t AllReduceDirectRsAg::rankOf(uint64_t peer) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (peers_[k] == peer) return k;
  }
  return peers_.size();
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
  const size_t n = ring_.size;
  if (n == 1 || nbytes_ == 0) {  // nothing to exchange: the input is the result
    if (!inPlace_ && nbytes_ > 0) std::memcpy(result_, in_, nbytes_);
    return;
  }
  // Segment-major, destinations staggered by rank: every owner gets its first segments
  // from everyone early, and can start its all-gather early.
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

uint8_t* AllReduceDirectRsAg::receiveTarget(uint64_t peer, const FrameHeader& h) {
  auto bad = [&](const std::string& why) -> ProtocolError {
    return ProtocolError("bad frame from peer " + std::to_string(peer) + ": " + why, peer);
  };
  if (h.digest != digest_) {
    throw ProtocolError("peers disagree on the all-reduce: peer " + std::to_string(peer) +
                            " sent a different element count, dtype, operator, world size or algorithm (this peer: " +
                            std::to_string(options_.count) + " x " + dtypeName(options_.dtype) + ", " +
                            reduceOpName(options_.op) + ", N=" + std::to_string(ring_.size) + ", rsag)",
                        peer);
  }
  const size_t k = rankOf(peer);
  if (k >= ring_.size || k == ring_.rank) throw bad("it is not a peer of this op");
  if (segmentBytes_ == 0) throw bad("segment out of bounds");
  // Reduce-scatter frames carry a segment of our chunk; all-gather ones a segment of the
  // sender's chunk, reduced.
  size_t chunk;
  if (h.phase == static_cast<uint8_t>(Phase::kReduceScatter)) {
    chunk = ring_.rank;
  } else if (h.phase == static_cast<uint8_t>(Phase::kAllGather)) {
    chunk = k;
  } else {
    throw bad("unknown phase");
  }
  const size_t begin = chunkBegin(chunk);
  const size_t end = chunkBegin(chunk + 1);
  if (h.offset < begin || h.offset >= end || (h.offset - begin) % segmentBytes_ != 0) {
    throw bad("segment out of bounds");
  }
  const size_t seg = (h.offset - begin) / segmentBytes_;
  if (h.length != std::min(segmentBytes_, end - h.offset)) throw bad("wrong segment length");
  uint8_t& got = chunk == ring_.rank ? rsGot_[k * arrived_.size() + seg] : agGot_[agBase_[chunk] + seg];
  if (got) throw bad("duplicate segment");
  got = 1;
  return chunk == ring_.rank ? slotOf(k) + (h.offset - begin) : result_ + h.offset;
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
  const size_t count = len / elemSize_;
  uint8_t* dst = result_ + off;
  // Rank order, whoever owns the chunk: the same steps on the same bytes as any peer
  // (and as AllReduceDirect) would run.
  reduceInto(options_.dtype, options_.op, dst, contribution(0, chunkOff), contribution(1, chunkOff), count);
  for (size_t k = 2; k < ring_.size; ++k) {
    reduceInto(options_.dtype, options_.op, dst, dst, contribution(k, chunkOff), count);
  }
  if (options_.op == ReduceOp::kAvg) finalizeAverage(options_.dtype, dst, count, ring_.size);
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

bool AllReduceDirectRsAg::complete() const { return received_ == expected_ && pendingSends_ == 0; }

bool AllReduceDirectRsAg::involves(uint64_t peer) const {
  const size_t k = rankOf(peer);
  return ring_.size > 1 && k < ring_.size && k != ring_.rank;
}

void AllReduceDirectRsAg::forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (k != ring_.rank) fn(ctx, peers_[k]);
  }
}

void AllReduceDirectRsAg::onSuccess() {
  if (inPlace_ && nbytes_ > 0 && ring_.size > 1 && !options_.deferCommit) {
    std::memcpy(static_cast<uint8_t*>(options_.output), result_, nbytes_);
  }
}

void AllReduceDirectRsAg::commitResult() {
  PCCL_ENFORCE(state() == OpState::kSucceeded || voted(), "only a successful or voted op can be committed");
  if (holdsResult() && scratch_.data) std::memcpy(static_cast<uint8_t*>(options_.output), result_, nbytes_);
}

}  // namespace pccl
