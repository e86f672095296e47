// All-to-all broadcast: the root's buffer in every peer's buffer.
//
// Scatter mode (CollectiveKind::kBroadcast): the buffer is split into N-1 chunks, one per
// peer other than the root (in rank order, the first count % (N-1) one element larger).
// The root sends each chunk straight to its owner, in segments striped over the pool to
// it; an owner stores each segment it receives and passes it on at once to every other
// peer but the root. So the root sends the buffer once (the least a broadcast can), every
// other peer receives it once and sends (N-2)/(N-1) of it, and any byte is two one-way
// delays from the root. Direct mode (kBroadcastDirect, for small payloads): the root
// sends the whole buffer to every peer, one one-way delay at (N-1) x the bytes. Every
// peer stores the root's bytes as they are. The commit vote goes all-to-all.
//
// The root's buffer is only ever read. Another peer's buffer is written as frames arrive:
// after a failure it holds no defined bytes (it is the broadcast's output there).
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/allreduce_all_to_all.hpp"

namespace pccl {

class Broadcast final : public AllToAllReduce {
 public:
  // options.count: the buffer's elements; options.root: the root's rank. The root sends
  // from options.input (and copies it into options.output when that is another buffer);
  // every other peer receives into options.output. `peers`: the peer ids of the ring, in
  // ring order.
  Broadcast(const AllReduceOptions& options, const RingPosition& ring, std::vector<uint64_t> peers, bool direct);

  void start(FrameSink& sink) override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  std::vector<MemoryRange> landingRanges() const override;
  // Copied, never sent by reference, although it could be (what it sends changes only
  // after every peer held the result or the op failed for every peer): a broadcast only
  // moves bytes, and by reference (vmsplice + splice) it measured slower on loopback,
  // 64 MiB at N=2 in 24.3 ms against 19.1 ms copied (gloo 16.6-18.7), 16 MiB 6.1 vs 5.2.
  bool sendsByReference() const override { return false; }

 private:
  size_t chunks() const { return direct_ ? 1 : ring_.size - 1; }
  // Its chunks are not the ring's (N-1 of them, or 1): these hide AllToAllReduce's.
  size_t chunkBegin(size_t chunk) const;  // bytes into the buffer
  size_t segmentsOf(size_t chunk) const;
  size_t ownerOf(size_t chunk) const { return chunk < root_ ? chunk : chunk + 1; }  // scatter mode
  size_t chunkOf(size_t rank) const { return rank < root_ ? rank : rank - 1; }
  void send(FrameSink& sink, size_t rank, size_t seg, size_t off, size_t len, Phase phase, const uint8_t* data);

  bool direct_;
  size_t root_;
  std::vector<size_t> base_;  // first index in got_ of each chunk's segments
  std::vector<uint8_t> got_;  // [chunk's segment] claimed by a frame (not on the root)
};

}  // namespace pccl
