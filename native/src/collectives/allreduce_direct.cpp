#include "pccl/allreduce_direct.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "pccl/errors.hpp"
#include "pccl/reduce.hpp"

namespace pccl {
namespace {

size_t segmentBytesFor(const AllReduceOptions& o, size_t elemSize) {
  size_t bytes = std::max(elemSize, o.segmentBytes - o.segmentBytes % elemSize);
  return std::min<size_t>(bytes, kMaxFramePayload - kMaxFramePayload % elemSize);
}

}  // namespace

uint32_t AllReduceDirect::digest(size_t count, DType dtype, ReduceOp op, size_t worldSize,
                                 AllReduceAlgorithm algorithm) {
  // FNV-1a, as the ring's, with the algorithm as a fifth field.
  uint64_t fields[5] = {static_cast<uint64_t>(count), static_cast<uint64_t>(dtype), static_cast<uint64_t>(op),
                        static_cast<uint64_t>(worldSize), static_cast<uint64_t>(algorithm)};
  uint32_t h = 2166136261u;
  for (uint64_t f : fields) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint8_t>(f >> (8 * i));
      h *= 16777619u;
    }
  }
  return h;
}

size_t AllReduceDirect::scratchBytes(const AllReduceOptions& options, size_t n) {
  const size_t nbytes = options.count * elementSize(options.dtype);
  if (n <= 1 || nbytes == 0) return 0;
  return (n - 1) * nbytes + (options.input == options.output && options.deferCommit ? nbytes : 0);
}

AllReduceDirect::AllReduceDirect(const AllReduceOptions& options, const RingPosition& ring,
                                 std::vector<uint64_t> peers, ScratchBuffer scratch)
    : Collective(OpKey{ring.epoch, options.tag, options.seq}, options.timeoutSeconds),
      options_(options),
      ring_(ring),
      peers_(std::move(peers)),
      scratch_(std::move(scratch)),
      inPlace_(options.input == options.output),
      elemSize_(elementSize(options.dtype)),
      nbytes_(options.count * elemSize_),
      digest_(digest(options.count, options.dtype, options.op, ring.size)),
      in_(static_cast<const uint8_t*>(options.input)),
      result_(static_cast<uint8_t*>(options.output)) {
  const size_t n = ring_.size;
  PCCL_ENFORCE(n >= 1 && ring_.rank < n && peers_.size() == n, "bad ring position");
  if (options_.vote) enableDirectVote(peers_, ring_.rank, digest_);
  if (n == 1 || nbytes_ == 0) return;
  PCCL_ENFORCE(scratch_.size >= scratchBytes(options_, n), "direct all-reduce needs its scratch");
  if (inPlace_ && options_.deferCommit) {
    result_ = scratch_.data.get() + (n - 1) * nbytes_;
  } else if (inPlace_) {
    ownResult_.reset(new uint8_t[nbytes_]);
    result_ = ownResult_.get();
  }
  segmentBytes_ = segmentBytesFor(options_, elemSize_);
  segments_ = (nbytes_ + segmentBytes_ - 1) / segmentBytes_;
  got_.assign(n * segments_, 0);
  arrived_.assign(segments_, 0);
  expected_ = (n - 1) * segments_;
}

size_t AllReduceDirect::rankOf(uint64_t peer) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (peers_[k] == peer) return k;
  }
  return peers_.size();
}

uint8_t* AllReduceDirect::slotOf(size_t rank) const {
  // Slots of the other peers in rank order: ours is skipped.
  const size_t index = rank < ring_.rank ? rank : rank - 1;
  return scratch_.data.get() + index * nbytes_;
}

const uint8_t* AllReduceDirect::contribution(size_t rank) const { return rank == ring_.rank ? in_ : slotOf(rank); }

void AllReduceDirect::start(FrameSink& sink) {
  const size_t n = ring_.size;
  if (n == 1 || nbytes_ == 0) {  // nothing to exchange: the input is the result
    if (!inPlace_ && nbytes_ > 0) std::memcpy(result_, in_, nbytes_);
    return;
  }
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
                                static_cast<uint8_t>(Phase::kReduceScatter)),
                     in_ + off);
    }
  }
}

uint8_t* AllReduceDirect::receiveTarget(uint64_t peer, const FrameHeader& h) {
  auto bad = [&](const std::string& why) -> ProtocolError {
    return ProtocolError("bad frame from peer " + std::to_string(peer) + ": " + why, peer);
  };
  if (h.digest != digest_) {
    throw ProtocolError("peers disagree on the all-reduce: peer " + std::to_string(peer) +
                            " sent a different element count, dtype, operator, world size or algorithm (this peer: " +
                            std::to_string(options_.count) + " x " + dtypeName(options_.dtype) + ", " +
                            reduceOpName(options_.op) + ", N=" + std::to_string(ring_.size) + ", direct)",
                        peer);
  }
  const size_t k = rankOf(peer);
  if (k >= ring_.size || k == ring_.rank) throw bad("it is not a peer of this op");
  if (h.phase != static_cast<uint8_t>(Phase::kReduceScatter)) throw bad("unknown phase");
  if (segmentBytes_ == 0 || h.offset % segmentBytes_ != 0 || h.offset >= nbytes_) throw bad("segment out of bounds");
  const size_t seg = h.offset / segmentBytes_;
  if (h.length != std::min(segmentBytes_, nbytes_ - h.offset)) throw bad("wrong segment length");
  uint8_t& got = got_[k * segments_ + seg];
  if (got) throw bad("duplicate segment");
  got = 1;
  return slotOf(k) + h.offset;
}

void AllReduceDirect::onReceived(FrameSink& sink, const FrameHeader& h) {
  (void)sink;
  rxProgress_ += h.length;
  ++received_;
  const size_t seg = h.offset / segmentBytes_;
  if (++arrived_[seg] == ring_.size - 1) reduceSegment(seg);
}

void AllReduceDirect::reduceSegment(size_t seg) {
  const size_t off = seg * segmentBytes_;
  const size_t len = std::min(segmentBytes_, nbytes_ - off);
  const size_t count = len / elemSize_;
  uint8_t* dst = result_ + off;
  // Rank order, whoever we are: the same steps on the same bytes on every peer.
  reduceInto(options_.dtype, options_.op, dst, contribution(0) + off, contribution(1) + off, count);
  for (size_t k = 2; k < ring_.size; ++k) {
    reduceInto(options_.dtype, options_.op, dst, dst, contribution(k) + off, count);
  }
  if (options_.op == ReduceOp::kAvg) finalizeAverage(options_.dtype, dst, count, ring_.size);
}

bool AllReduceDirect::complete() const { return received_ == expected_ && pendingSends_ == 0; }

bool AllReduceDirect::involves(uint64_t peer) const {
  const size_t k = rankOf(peer);
  return ring_.size > 1 && k < ring_.size && k != ring_.rank;
}

void AllReduceDirect::forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const {
  for (size_t k = 0; k < peers_.size(); ++k) {
    if (k != ring_.rank) fn(ctx, peers_[k]);
  }
}

void AllReduceDirect::onSuccess() {
  if (inPlace_ && nbytes_ > 0 && ring_.size > 1 && !options_.deferCommit) {
    std::memcpy(static_cast<uint8_t*>(options_.output), result_, nbytes_);
  }
}

void AllReduceDirect::commitResult() {
  PCCL_ENFORCE(state() == OpState::kSucceeded || voted(), "only a successful or voted op can be committed");
  if (holdsResult() && scratch_.data) std::memcpy(static_cast<uint8_t*>(options_.output), result_, nbytes_);
}

}  // namespace pccl
