// What the direct all-reduces (AllReduceDirect, AllReduceDirectRsAg) share, and with them
// the all-to-all all-gather, reduce-scatter, broadcast and all-to-all exchange
// (all_gather.hpp, reduce_scatter.hpp, broadcast.hpp, all_to_all_direct.hpp): every peer of the epoch is a peer of the op (a pool
// to each, an all-to-all commit vote through Collective::enableDirectVote), contributions
// are reduced in rank order, and the caller's input is only ever sent, never written.
//
// Where the result is built: out of place in the output; in place aside, and copied
// into the caller's buffer on success, or with deferCommit at Engine::settle(commit)
// (then in the scratch, which the engine keeps for settle()). A failed op leaves the
// input as it was, with nothing to restore. Without deferCommit the op keeps the result
// in memory of its own, since the engine hands the scratch back just before the success
// that copies it out.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pccl/allreduce_ring.hpp"
#include "pccl/errors.hpp"
#include "pccl/reduce.hpp"

namespace pccl {

// The all-to-all collectives that are not all-reduces. Their codes follow
// AllReduceAlgorithm's in the shape digest, so a peer in one collective and a peer in
// another (or in an all-reduce) at the same step fail with ProtocolError.
enum class CollectiveKind : uint8_t {
  kAllGather = 16,
  kReduceScatter = 17,
  kBroadcast = 18,        // root scatters N-1 chunks, their owners pass them on
  kBroadcastDirect = 19,  // root sends the whole buffer to every peer (small payloads)
  kAllToAll = 20,         // block d of every input to rank d (all_to_all_direct.hpp)
};

class AllToAllReduce : public Collective {
 public:
  bool complete() const override { return received_ == expected_ && pendingSends_ == 0; }
  bool involves(uint64_t peer) const override;
  void forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const override;

  ScratchBuffer releaseScratch() override { return std::move(scratch_); }
  uint32_t shapeDigest() const override { return digest_; }
  bool holdsResult() const override { return inPlace_ && options_.deferCommit && nbytes_ > 0 && ring_.size > 1; }
  // As the ring's (AllReduceRing::sendsByReference): what the op sends changes only
  // after every peer held the result (committed or settled as a success) or after the
  // op failed for every peer (the arbiter heard first).
  bool sendsByReference() const override { return voting() && (!inPlace_ || options_.deferCommit); }
  // Conservative: any peer of the op while frames are missing. Whichever peer's
  // connection closes fails the op anyway (involves()); this only makes it fail before
  // reading what that peer may have sent by reference.
  bool awaitsDataFrom(uint64_t peer) const override { return involves(peer) && received_ < expected_; }
  void commitResult() override;

  // Shape digest carried by every frame: the ring's fields and the algorithm (an
  // AllReduceAlgorithm or a CollectiveKind), and a broadcast's root, so peers that
  // disagree on any of them (a ring peer and a direct one included) fail the op.
  static uint32_t digest(size_t count, DType dtype, ReduceOp op, size_t worldSize, uint64_t algorithm,
                         size_t root = 0);

 protected:
  // `peers`: the peer ids of the ring, in ring order (the rank order of the reduction).
  // `algorithm`: an AllReduceAlgorithm or a CollectiveKind, for the digest.
  AllToAllReduce(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers,
                 ScratchBuffer scratch, uint64_t algorithm);

  // Whether there is anything to exchange (N > 1 and a non-empty buffer).
  bool exchanges() const { return ring_.size > 1 && nbytes_ > 0; }
  // In place, builds the result aside: at `deferredAt` in the scratch with deferCommit,
  // else in memory of its own. Out of place it stays the output.
  void placeResult(size_t deferredAt);
  // With nothing to exchange the input is the result.
  void copyInputIfAlone();
  size_t rankOf(uint64_t peer) const;
  // Validates the digest of `h` from `peer` and that it is another peer of the op;
  // returns its rank. `name` says which collective and algorithm this peer runs, for the
  // message.
  size_t checkFrame(uint64_t peer, const FrameHeader& h, const char* name) const;
  ProtocolError badFrame(uint64_t peer, const std::string& why) const;

  // Bytes into the buffer where part `part` of `parts` begins: count / parts elements
  // each, the first count % parts one element more. With parts = N, the ring's chunks
  // (AllReduceRing::chunkBegin): rank c owns chunk c.
  size_t partBegin(size_t part, size_t parts) const;
  size_t segmentsIn(size_t bytes) const { return (bytes + segmentBytes_ - 1) / segmentBytes_; }
  size_t chunkBegin(size_t chunk) const { return partBegin(chunk, ring_.size); }
  size_t chunkBytes(size_t chunk) const { return chunkBegin(chunk + 1) - chunkBegin(chunk); }
  size_t segmentsOf(size_t chunk) const { return segmentsIn(chunkBytes(chunk)); }

  // Sends the whole input to every other peer, frames marked `phase`. Segment-major,
  // destinations staggered by rank: every peer gets its first segments from everyone
  // early.
  void sendInputToAll(FrameSink& sink, Phase phase);
  // Sends chunk k of the input to rank k, for every other rank; the same order.
  void sendChunksToOwners(FrameSink& sink);
  // Validates a frame of sendInputToAll (`phase`, a segment of the whole buffer) and
  // claims it in got[rank][segment]; returns the sender's rank.
  size_t claimInputSegment(uint64_t peer, const FrameHeader& h, const char* name, Phase phase,
                           std::vector<uint8_t>& got) const;
  // Validates that `h` carries a whole segment of the ring's chunk `chunk`; returns its
  // index within the chunk.
  size_t segmentOfChunk(uint64_t peer, const FrameHeader& h, size_t chunk) const;
  // Validates a frame of sendChunksToOwners (kReduceScatter, a segment of this rank's
  // chunk) and claims it in got[rank][segment]; returns the sender's rank.
  size_t claimOwnChunkSegment(uint64_t peer, const FrameHeader& h, const char* name, std::vector<uint8_t>& got) const;
  // dst = x_0 op x_1 op ... op x_{N-1} over `count` elements, one rounded step at a
  // time, then / N for AVG: the same steps on the same bytes on every peer.
  template <class Contribution>
  void reduceInRankOrder(uint8_t* dst, size_t count, Contribution contribution) const {
    reduceInto(options_.dtype, options_.op, dst, contribution(0), contribution(1), count);
    for (size_t k = 2; k < ring_.size; ++k) reduceInto(options_.dtype, options_.op, dst, dst, contribution(k), count);
    if (options_.op == ReduceOp::kAvg) finalizeAverage(options_.dtype, dst, count, ring_.size);
  }
  static size_t segmentBytesFor(const AllReduceOptions& options, size_t elemSize);

  AllReduceOptions options_;
  RingPosition ring_;
  std::vector<uint64_t> peers_;
  ScratchBuffer scratch_;
  bool inPlace_;
  size_t elemSize_;
  size_t nbytes_;
  size_t segmentBytes_ = 0;  // 0 with nothing to exchange
  uint32_t digest_;
  const uint8_t* in_;
  uint8_t* result_;  // the output; in place a scratch area (deferred) or ownResult_
  std::unique_ptr<uint8_t[]> ownResult_;
  size_t expected_ = 0;  // frames
  size_t received_ = 0;

 private:
  void onSuccess() override;
};

}  // namespace pccl
