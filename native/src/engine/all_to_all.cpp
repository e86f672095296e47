// The engine's caller entry for the all-to-all collectives that are not all-reduces
// (all-gather, reduce-scatter, broadcast, all-to-all), and the connecting every one of them needs.
#include <limits>

#include "pccl/engine.hpp"

namespace pccl {

std::vector<uint64_t> Engine::connectToAll(const RingPosition& pos, const std::vector<PeerAddress>& ring,
                                           double timeoutSeconds) {
  if (pos.size > 1) {
    std::vector<PeerAddress> others;
    for (size_t i = 1; i < pos.size; ++i) others.push_back(ring[(pos.rank + i) % pos.size]);
    ensureConnected(others, pos.epoch, timeoutSeconds);
  }
  std::vector<uint64_t> ids;
  for (const auto& p : ring) ids.push_back(p.peerId);
  return ids;
}

std::shared_ptr<Collective> Engine::allToAll(CollectiveKind kind, const AllReduceOptions& in, size_t outputBytes,
                                             double connectTimeoutSeconds) {
  AllReduceOptions options = in;
  const size_t esize = elementSize(options.dtype);
  const bool broadcast = kind == CollectiveKind::kBroadcast || kind == CollectiveKind::kBroadcastDirect;
  const bool exchange = kind == CollectiveKind::kAllToAll;
  if (kind != CollectiveKind::kAllGather && kind != CollectiveKind::kReduceScatter && !broadcast && !exchange) {
    throw InvalidArgument("unknown collective kind");
  }
  if (kind == CollectiveKind::kReduceScatter) {
    if (!isValidReduceOp(static_cast<int>(options.op))) throw InvalidArgument("unknown reduce op");
  } else {
    options.op = ReduceOp::kSum;  // not used: peers must not disagree over it
  }
  if (!broadcast) options.root = 0;
  options.quant = QuantSpec{};
  options.algorithm = AllReduceAlgorithm::kRing;
  options.deferCommit = false;
  if (options.segmentBytes == 0) options.segmentBytes = options_.segmentBytes;
  RingPosition pos;
  std::vector<PeerAddress> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw AbortedError("engine is closed");
    pos = ring_;
    peers = ringPeers_;
  }
  const size_t n = pos.size;
  if (options.count > (std::numeric_limits<size_t>::max() / 2) / esize / n) {
    throw InvalidArgument("element count too large");
  }
  const size_t nbytes = options.count * esize;
  if (exchange && options.count % n != 0) {
    throw InvalidArgument("all-to-all: " + std::to_string(options.count) + " elements do not split into " +
                          std::to_string(n) + " equal blocks, one per peer");
  }
  size_t expect = nbytes;
  if (kind == CollectiveKind::kAllGather) expect = n * nbytes;
  if (kind == CollectiveKind::kReduceScatter) expect = ReduceScatter::chunkElements(options.count, n, pos.rank) * esize;
  if (outputBytes != expect) {
    throw InvalidArgument("output holds " + std::to_string(outputBytes) + " bytes where this op over " +
                          std::to_string(n) + " peers writes " + std::to_string(expect));
  }
  if (broadcast && options.root >= n) {
    throw InvalidArgument("broadcast root " + std::to_string(options.root) + " outside a ring of " + std::to_string(n));
  }
  if ((nbytes > 0 && options.input == nullptr) || (expect > 0 && options.output == nullptr)) {
    throw InvalidArgument("null buffer");
  }
  if (!broadcast && nbytes > 0 && expect > 0) {
    // Out of place; an all-gather's input may be this peer's own row of the output.
    const auto* inBegin = static_cast<const uint8_t*>(options.input);
    const auto* outBegin = static_cast<const uint8_t*>(options.output);
    const bool ownRow = kind == CollectiveKind::kAllGather && inBegin == outBegin + pos.rank * nbytes;
    const bool inPlace = exchange && inBegin == outBegin;  // rows built aside (AllToAll)
    if (!ownRow && !inPlace && inBegin < outBegin + expect && outBegin < inBegin + nbytes) {
      throw InvalidArgument("the input overlaps the output: this collective runs out of place");
    }
  }
  std::vector<uint64_t> ids = connectToAll(pos, peers, connectTimeoutSeconds);
  std::shared_ptr<Collective> op;
  if (kind == CollectiveKind::kAllGather) {
    op = std::make_shared<AllGather>(options, pos, std::move(ids));
  } else if (kind == CollectiveKind::kReduceScatter) {
    ScratchBuffer scratch;
    const size_t need = ReduceScatter::scratchBytes(options, n, pos.rank);
    if (need > 0) scratch = takeScratch(need);
    op = std::make_shared<ReduceScatter>(options, pos, std::move(ids), std::move(scratch));
  } else if (exchange) {
    op = std::make_shared<AllToAll>(options, pos, std::move(ids));
  } else {
    op = std::make_shared<Broadcast>(options, pos, std::move(ids), kind == CollectiveKind::kBroadcastDirect);
  }
  post([this, op] { startOp(op); });
  return op;
}

}  // namespace pccl
