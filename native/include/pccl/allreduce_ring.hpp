// Pipelined ring all-reduce.
//
// The buffer is split into N chunks (chunk c is owned by peer c-1), each chunk into
// segments. Reduce-scatter: peer r sends its own chunk r to its next neighbour; each
// segment it receives (chunk c, a partial reduction over the peers upstream) is
// reduced with its own contribution and passed on, until it reaches the chunk's
// owner, which then holds the full reduction (divided by N for AVG). All-gather: the
// owner sends its final bytes around the ring; every peer stores them and forwards
// them verbatim, so every peer ends with the owner's exact bytes.
//
// Frames are self-describing (phase, byte offset), so a segment's next step fires the
// moment it arrives: sending, receiving and reducing overlap, and segments are
// striped over the pool of connections to the neighbour. Each peer sends and
// receives 2(N-1)/N of the buffer.
//
// Out of place, the caller's input is never written. In place, the result is built in
// the caller's buffer with no final copy: a reduce-scatter segment arrives in a
// scratch buffer, and one pass (reduceSwap) writes the sum over our input while
// moving that input into the scratch; all-gather segments land in the caller's buffer
// directly. Every byte of input overwritten is kept, and a failed op restores it, so
// the input is intact after any failure (with deferCommit, at Engine::settle).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pccl/dtype.hpp"
#include "pccl/collective.hpp"
#include "pccl/quantize.hpp"

namespace pccl {

struct RingPosition {
  uint64_t epoch = 0;
  size_t size = 1;  // N
  size_t rank = 0;
  uint64_t prevPeer = kNoPeer;
  uint64_t nextPeer = kNoPeer;
};

// How an unquantized all-reduce moves its bytes; every peer must pick the same one (it
// is part of the shape digest). kRing: AllReduceRing, bandwidth-optimal. kDirect:
// AllReduceDirect, latency-optimal (one exchange and an all-to-all vote). kDirectRsAg:
// AllReduceDirectRsAg, the ring's bytes in two one-way delays (a direct reduce-scatter
// and all-gather, and an all-to-all vote).
enum class AllReduceAlgorithm : uint8_t { kRing = 0, kDirect = 1, kDirectRsAg = 2 };

struct AllReduceOptions {
  const void* input = nullptr;
  void* output = nullptr;  // may equal input (in place)
  size_t count = 0;
  DType dtype = DType::kFloat32;
  ReduceOp op = ReduceOp::kSum;
  uint64_t tag = 0;
  uint64_t seq = 0;
  double timeoutSeconds = -1;
  size_t segmentBytes = 1 << 20;
  // In place only: keep the result in scratch after success until the caller
  // commits it (Engine::settle). Lets an outside arbiter veto a data-plane success
  // without the caller's input being overwritten.
  bool deferCommit = false;
  // Commit vote (Collective::readyToCommit): the op succeeds only once every peer holds
  // the result; with deferCommit, a vote-failed op keeps its result for settle().
  bool vote = false;
  // kind != kNone: a quantized all-reduce (AllReduceQuantized; SUM and AVG of floats).
  QuantSpec quant;
  // Unquantized only (a quantized one has its own algorithm).
  AllReduceAlgorithm algorithm = AllReduceAlgorithm::kRing;
  // A broadcast's root (Engine::allToAll, CollectiveKind::kBroadcast*): its rank.
  size_t root = 0;
};

class AllReduceRing final : public Collective {
 public:
  // `scratch` is used (and must be at least count*elementSize bytes) when the
  // reduction is in place; it is handed back through releaseScratch().
  AllReduceRing(const AllReduceOptions& options, const RingPosition& ring, ScratchBuffer scratch);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  bool complete() const override;
  bool involves(uint64_t peer) const override;
  void forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const override;
  // Out of place: the output, chunk by chunk in the order the reduce-scatter brings
  // them (r-1, r-2, ...), our own chunk (filled by the all-gather) last. In place the
  // caller's buffer holds the input, so its pages are there already.
  std::vector<MemoryRange> landingRanges() const override;

  ScratchBuffer releaseScratch() override { return std::move(scratch_); }
  bool inPlace() const { return inPlace_; }
  uint32_t shapeDigest() const override { return digest_; }
  // Deferred in-place ops keep the input they overwrote until settle(): commit keeps
  // the result (already in place), rollback restores the input.
  bool holdsResult() const override { return inPlace_ && options_.deferCommit && nbytes_ > 0 && ring_.size > 1; }
  // A deferred in-place op that votes restores its input only at settle(), also when it
  // failed before voting, so that the restore comes after the arbiter heard of the
  // failure (zero-copy sends, below).
  bool defersRestore() const override { return holdsResult() && voting(); }
  // Payloads go by reference only when the op votes and, in place, defers its restore.
  // A byte this peer sent can then change before the successor reads it only (a) after
  // this peer committed or settled a success: every peer held the result, so had read
  // all it needed from us; (b) when the failed op is restored at settle(False) or a
  // retry reuses the buffer: the op failed for every peer, since a peer that failed
  // before voting never voted and so nobody committed, and the arbiter hears of the
  // failure before the restore. Out of place, only the caller changes the buffers,
  // after the op ended in one of those ways.
  bool sendsByReference() const override { return voting() && (!inPlace_ || options_.deferCommit); }
  bool awaitsDataFrom(uint64_t peer) const override {
    return ring_.size > 1 && peer == ring_.prevPeer && (rsReceived_ < rsExpected_ || agReceived_ < agExpected_);
  }
  void commitResult() override;
  void rollback() override;
  size_t nbytes() const { return nbytes_; }

  // Shape digest carried by every frame; peers that disagree fail the op.
  static uint32_t digest(size_t count, DType dtype, ReduceOp op, size_t worldSize);

 private:
  void onFailure() override;
  void restoreInput();
  void backUpOwnChunk(size_t upTo);  // in place: keep our own chunk's input up to byte upTo
  size_t chunkBegin(size_t chunk) const;
  size_t chunkOf(size_t byteOffset) const;
  void sendRange(FrameSink& sink, Phase phase, size_t begin, size_t end, const uint8_t* base);
  FrameHeader header(Phase phase, size_t offset, size_t length) const;

  AllReduceOptions options_;
  RingPosition ring_;
  ScratchBuffer scratch_;
  bool inPlace_;
  size_t elemSize_;
  size_t nbytes_;
  size_t segmentBytes_;
  uint32_t digest_;
  const uint8_t* in_;
  uint8_t* out_;      // the result: the output buffer (in place: the input)
  uint8_t* rsBuf_;    // reduce-scatter arrivals: out_, or in place the scratch
  std::vector<std::pair<size_t, size_t>> backups_;  // in place: (offset, bytes) of input kept in rsBuf_
  size_t ownKept_ = 0;  // in place: our own chunk is kept in rsBuf_ up to this byte
  size_t ownedChunk_;    // the chunk this peer finishes: (rank + 1) mod N
  size_t noForwardChunk_;  // all-gather chunk whose next hop is its owner: (rank + 2) mod N
  size_t rsExpected_ = 0;
  size_t agExpected_ = 0;
  size_t rsReceived_ = 0;
  size_t agReceived_ = 0;
};

}  // namespace pccl
