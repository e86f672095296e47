// Fetching ranges of another peer's exposed shared state.
//
// A serving peer exposes its state entries (read-only) under an exposure id. A
// fetching peer sends one kStateRequest per chunk, striped over its state-transfer
// connections to the source (the source's own pool to this peer where it has one,
// else this peer's state pool: Engine::fetchRoute); the source answers each on the
// connection it came in on, from the exposed memory (zero-copy), and the bytes land
// straight in the destination buffer. The op is all-or-nothing per source: the
// runtime spreads chunks over several sources with one op each, verifies what arrives
// by hash, and re-fetches elsewhere what a failed source or a corrupt chunk left
// behind.
#pragma once

#include <cstdint>
#include <vector>

#include "pccl/collective.hpp"

namespace pccl {

struct FetchChunk {
  uint32_t entry = 0;   // index of the entry in the source's exposure
  uint64_t offset = 0;  // byte offset within the entry
  uint64_t length = 0;
  uint8_t* dst = nullptr;
};

class StateFetch final : public Collective {
 public:
  StateFetch(uint64_t tag, uint64_t source, uint64_t exposure, std::vector<FetchChunk> chunks, double timeoutSeconds);

  void start(FrameSink& sink) override;
  bool accepts(const FrameHeader& h) const override;
  uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) override;
  void onReceived(FrameSink& sink, const FrameHeader& header) override;
  bool complete() const override;
  bool involves(uint64_t peer) const override { return peer == source_; }
  void forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const override { fn(ctx, source_); }
  uint64_t poisonFloor() const override { return kStateEpoch; }
  std::vector<MemoryRange> landingRanges() const override;
  uint64_t source() const { return source_; }

 private:
  uint64_t source_;
  uint64_t exposure_;
  std::vector<FetchChunk> chunks_;
  std::vector<StateRequest> requests_;  // request payloads; live until the op ends
  std::vector<bool> received_;
  size_t remaining_;
};

}  // namespace pccl
