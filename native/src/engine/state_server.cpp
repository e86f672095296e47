// Serving exposed shared state to fetching peers (state_fetch.hpp has the fetching
// side): exposures come and go on the caller's thread; requests are answered on the
// progress thread, from the exposed memory itself, on the connection they came in on
// (a state connection the fetcher opened, or this peer's own pool to the fetcher).
#include <cstring>
#include <future>

#include "pccl/engine.hpp"
#include "transport/connection.hpp"

namespace pccl {

uint64_t Engine::exposeState(std::vector<StateRegion> regions) {
  const uint64_t id = nextExposure_++;
  postAndWait([this, id, regions = std::move(regions)]() mutable { exposures_[id] = Exposure{std::move(regions), 0}; });
  return id;
}

uint64_t Engine::unexposeState(uint64_t exposure) {
  auto served = std::make_shared<std::promise<uint64_t>>();
  auto result = served->get_future();
  try {
    post([this, exposure, served] {
      auto it = exposures_.find(exposure);
      const uint64_t bytes = it == exposures_.end() ? 0 : it->second.served;
      dropExposure(exposure);
      served->set_value(bytes);
    });
  } catch (const AbortedError&) {
    return 0;  // closed: the progress thread has stopped and sends nothing any more
  }
  return result.get();
}

void Engine::dropExposure(uint64_t exposure) {
  exposures_.erase(exposure);
  std::vector<Connection*> broken;
  for (auto& [fd, c] : connections_) {
    auto& q = c->sendq;
    for (size_t i = 0; i < q.size();) {
      if (q[i].exposure != exposure || q[i].inRing) {  // (a payload in the ring is a copy: it may go)
        ++i;
      } else if (i == 0 && c->headSent > 0) {
        broken.push_back(c.get());  // half on the wire: the stream cannot be resumed
        break;
      } else {
        q.erase(q.begin() + static_cast<std::ptrdiff_t>(i));
      }
    }
  }
  for (Connection* c : broken) {
    closeConnection(c, ErrorKind::kAborted, "state exposure withdrawn mid-chunk", /*quiet=*/true);
  }
}

void Engine::queueControl(Connection* c, const FrameHeader& h, std::string payload) {
  auto hold = std::make_shared<std::string>(std::move(payload));
  FrameHeader header = h;
  header.length = static_cast<uint32_t>(hold->size());
  queueItem(c, SendItem{header, reinterpret_cast<const uint8_t*>(hold->data()), nullptr, 0, hold});
}

void Engine::onStateRequest(Connection* c, const FrameHeader& h, const std::vector<uint8_t>& payload) {
  // On a pool opened ahead of its epoch (a fetch route to a joiner), an answer or a
  // refusal is no frame of an epoch: the epoch that keeps the pool may still take it at
  // once (Engine::rebindPools).
  struct KeepPrepared {
    Connection* c;
    bool prepared, carried;
    ~KeepPrepared() {
      c->prepared = prepared;
      c->carried = carried;
    }
  } keep{c, c->prepared, c->carried};
  StateRequest req{};
  std::memcpy(&req, payload.data(), sizeof(req));
  auto it = exposures_.find(req.exposure);
  std::string refusal;
  if (it == exposures_.end()) {
    refusal = "state exposure " + std::to_string(req.exposure) + " is not served (sync over?)";
  } else if (h.digest >= it->second.regions.size()) {
    refusal = "no state entry " + std::to_string(h.digest);
  } else if (req.length == 0 || req.length > kMaxFramePayload || h.offset > it->second.regions[h.digest].bytes ||
             req.length > it->second.regions[h.digest].bytes - h.offset) {
    refusal = "state range out of bounds";
  }
  // An answer names the request's chunk: same tag, seq (chunk), digest (entry), offset.
  if (!refusal.empty()) {
    queueControl(c, makeHeader(FrameType::kStateRefused, keyOf(h), 0, h.digest, h.offset), refusal);
    return;
  }
  const StateRegion& region = it->second.regions[h.digest];
  const FrameHeader answer =
      makeHeader(FrameType::kStateData, keyOf(h), static_cast<uint32_t>(req.length), h.digest, h.offset);
  SendItem item{answer, region.data + h.offset, nullptr, req.exposure, nullptr};
  maybeCorrupt(item);
  it->second.served += req.length;
  queueItem(c, std::move(item));
}

}  // namespace pccl
