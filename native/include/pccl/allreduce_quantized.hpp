// Quantized all-reduce: direct reduce-scatter + direct all-gather.
//
// The buffer is split into N chunks; chunk c is owned by ring rank c. Reduce-scatter:
// every peer quantizes each chunk of its input once (kernels in quantize.hpp) and sends
// chunk c straight to its owner. The owner dequantizes the N-1 contributions and sums
// them with its own exact values in rank order, in full precision (float; double for
// float64), divides by N for AVG, and quantizes the sum once. All-gather: the owner
// sends those bytes to every peer; every peer, the owner included, decodes them with the
// same function, so all end with the same bytes.
//
// Why not the ring of the unquantized path: a ring carries partial sums, which must be
// re-quantized at every hop, so the error grows with N (PCCL's does). Here every value
// is quantized exactly twice (its contribution, then the chunk's sum) whatever N, and
// forwarded bytes are never re-encoded. The price is a connection pool to every peer
// of the epoch, not only the ring neighbours (opened at the first quantized op). Each
// peer sends (N-1)/N of the encoded buffer per phase, as a ring does.
//
// Frames carry the element offset of their segment (as a byte offset in the caller's
// buffer) and the encoded segment as payload; a segment's next step fires the moment
// its last contribution arrives, so quantizing, sending and reducing overlap.
// Out of place, each segment is decoded into the output as it arrives. In place, the
// input must survive a failure, so nothing is decoded during the op: on success (or on
// commit, for deferred ops) the encoded result, which every peer holds whole, is
// decoded straight into the caller's buffer. That replaces a float scratch result and
// its copy back with one decoding pass.
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/allreduce_ring.hpp"
#include "pccl/quantize.hpp"

namespace pccl {

class AllReduceQuantized final : public Collective {
 public:
  // Scratch bytes the op needs for `options` on a ring of `n` peers: the three encoded
  // staging areas (own contributions, contributions received, encoded results).
  static size_t scratchBytes(const AllReduceOptions& options, size_t n);
  // `peers`: the peer ids of the ring, in ring order. `scratch` holds scratchBytes().
  AllReduceQuantized(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                     ScratchBuffer scratch);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  bool complete() const override;
  bool involves(uint64_t peer) const override;
  void forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const override;

  ScratchBuffer releaseScratch() override { return std::move(scratch_); }
  uint32_t shapeDigest() const override { return digest_; }
  bool holdsResult() const override { return inPlace_ && options_.deferCommit && nbytes_ > 0 && ring_.size > 1; }
  void commitResult() override;

  static uint32_t digest(const AllReduceOptions& options, size_t worldSize);

 private:
  void onSuccess() override;
  void decodeAll(uint8_t* dst) const;
  size_t chunkBeginElem(size_t chunk) const;
  size_t chunkElems(size_t chunk) const;
  size_t segmentsOf(size_t chunk) const;
  size_t segmentElems(size_t chunk, size_t seg) const;
  size_t slot(size_t chunk, size_t seg) const { return (chunk * segsPerChunk_ + seg) * slotBytes_; }
  size_t rankOf(uint64_t peer) const;
  FrameHeader header(Phase phase, size_t chunk, size_t seg, size_t length) const;
  void finishSegment(FrameSink& sink, size_t seg);

  AllReduceOptions options_;
  RingPosition ring_;
  std::vector<uint64_t> peers_;
  ScratchBuffer scratch_;
  QuantSpec spec_;
  bool inPlace_;
  size_t elemSize_;
  size_t nbytes_;
  uint32_t digest_;
  size_t segElems_ = 0;     // elements per segment (a multiple of the quantization block)
  size_t segsPerChunk_ = 0;
  size_t slotBytes_ = 0;    // encoded bytes reserved per segment
  const uint8_t* in_;
  uint8_t* out_;
  uint8_t* sendStage_ = nullptr;  // [chunk][segment] this peer's encoded contributions
  uint8_t* rsStage_ = nullptr;    // [rank][segment] contributions to the owned chunk
  uint8_t* agStage_ = nullptr;    // [chunk][segment] the owners' encoded results
  std::vector<uint8_t> rsGot_;    // [rank][segment] received flags
  std::vector<uint8_t> agGot_;    // [chunk][segment]
  std::vector<size_t> rsCount_;   // contributions received per segment of the owned chunk
  std::vector<const uint8_t*> terms_;
  size_t rsExpected_ = 0;  // frames
  size_t agExpected_ = 0;
  size_t rsReceived_ = 0;
  size_t agReceived_ = 0;
};

}  // namespace pccl
