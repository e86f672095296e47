// The data-plane engine of one peer: a TCP listener, pools of connections to other
// peers, and a progress thread (epoll) that owns every socket and drives the
// collectives in flight. Callers post ops and wait on them; nothing here talks to
// the master.
//
// Failure rule (as Gloo's): when an op fails (peer lost, timeout, abort, protocol
// error) the connections to its ring neighbours are poisoned, i.e. closed. The
// neighbours see EOF and fail their own op at once, so a failure spreads around the
// ring in a few hops instead of waiting for timeouts. The next op reconnects.
//
// Connection pools belong to an epoch: setRing(E) gives E its pools, ops of epoch E use
// only those, a broken connection fails only ops of its epoch, and poisoning after a
// failure in epoch E closes only pools of epochs <= E. So a late failure of an old op
// can never break the connections a retry in a newer epoch uses. When a newer ring is
// installed, ops of older epochs still running fail (as before: their epoch is over),
// and a pool of an older epoch to a peer that is in the new ring is kept for the new
// epoch when it is whole and idle (rebindPools): the connecting side sends kRebind and
// uses the pool for E only once the peer's kRebound came back (one round trip, no
// connect, no handshake, and the connections stay warm: no slow start). The rest of the
// older pools are closed; the accepting side keeps older incoming connections from
// peers of the new ring open for their owner to rebind or close.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "pccl/all_gather.hpp"
#include "pccl/all_to_all_direct.hpp"
#include "pccl/allreduce_direct.hpp"
#include "pccl/allreduce_direct_rsag.hpp"
#include "pccl/allreduce_quantized.hpp"
#include "pccl/allreduce_ring.hpp"
#include "pccl/broadcast.hpp"
#include "pccl/p2p.hpp"
#include "pccl/prefault.hpp"
#include "pccl/reduce_scatter.hpp"
#include "pccl/state_fetch.hpp"
#include "pccl/tcp.hpp"

namespace pccl {

struct Connection;  // transport/connection.hpp (private to the engine)
struct SendItem;

struct EngineOptions {
  uint64_t peerId = 0;
  std::string listenHost = "127.0.0.1";
  uint16_t listenPort = 0;  // 0 picks a free port
  int connectionsPerPeer = 1;  // 0: sized per peer from the measured round trip (poolSizeFor)
  size_t segmentBytes = 512 << 10;
  SocketOptions socket;
  size_t mailboxLimitBytes = 256u << 20;  // frames that arrive before their op is posted
  double handshakeTimeoutSeconds = 10.0;
  // Shared secret: when set, every connection is authenticated both ways by HMAC
  // challenge-response in the handshake (wire.hpp). Empty: no authentication.
  std::string secret;
  // Large all-reduce payloads of voting ops go to the kernel by reference (vmsplice +
  // splice) instead of being copied: see Engine::zeroCopy. false: always copy.
  bool zeroCopySend = true;
  // Large receives into caller memory (a state fetch, an out-of-place all-reduce's
  // output) have their pages faulted in by a worker thread ahead of the bytes, instead
  // of one by one inside recv(): see prefault.hpp. false: recv() faults them in.
  bool prefault = true;
  // Payloads to peers on this host go through a shared-memory ring per connection
  // instead of loopback TCP (transport/shared_ring.hpp), when the peer can map it.
  // false: TCP only (and offers from peers are refused).
  bool sharedMemory = true;
  size_t ringBytes = 8u << 20;  // each ring's payload capacity
};

// One exposed shared-state entry: read-only memory other peers may fetch from.
struct StateRegion {
  const uint8_t* data = nullptr;
  size_t bytes = 0;
};

enum class EventKind { kPeerDisconnected = 0 };

struct Event {
  EventKind kind = EventKind::kPeerDisconnected;
  uint64_t peer = kNoPeer;
  std::string reason;
};

// connectionsPerPeer == 0 sizes each pool to carry this over the measured round trip.
constexpr double kAutoTargetBitsPerSecond = 1e9;
constexpr size_t kAutoMaxConnections = 8;
// The pool size connectionsPerPeer == 0 gives a peer at `rttSeconds` with a send buffer
// of `sendBufferBytes` (SO_SNDBUF as the kernel reports it), when `sharers` pools are
// opened together for one epoch (they share this host's link): Engine::poolSizeFor.
size_t autoPoolSize(double rttSeconds, size_t sendBufferBytes, size_t sharers);
// The most each connection of an auto-sized pool of `poolSize` sends (SO_MAX_PACING_RATE,
// bytes/s): its part of the share, with kAutoPacingHeadroom; 0 (not paced) for one.
constexpr double kAutoPacingHeadroom = 1.1;
uint64_t autoPacingRate(size_t sharers, size_t poolSize);
// How long a pool kept across a re-ring may wait for the peer's kRebound before it is
// given up and opened afresh.
constexpr double kRebindWaitSeconds = 1.0;

class Engine {
 public:
  explicit Engine(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  uint16_t port() const { return port_; }
  uint64_t peerId() const { return options_.peerId; }
  const EngineOptions& options() const { return options_; }

  // Makes `ring` (in ring order; this peer at `rank`) the ring of `epoch` and opens
  // the connection pool to the next neighbour unless it is already open; with
  // `connectAll`, the pools to every peer of the ring, all at once (what the direct and
  // quantized all-reduces need: opening them here saves the first op a second wave of
  // round trips). Frames of older epochs are dropped from then on. Blocks up to
  // `timeoutSeconds`; throws PeerLostError / TimeoutError when a peer cannot be reached.
  void setRing(uint64_t epoch, const std::vector<PeerAddress>& ring, size_t rank, double timeoutSeconds,
               bool connectAll = false);
  RingPosition ring() const;
  // Connections per pool to `peer`: connectionsPerPeer, or with 0 what its measured
  // round trip asked for (0 until a pool to it was opened).
  size_t poolSize(uint64_t peer) const;

  // Starts an all-reduce over the current ring. Reopens the connection pool to the
  // next neighbour if a failure closed it. The buffers must stay valid until the op
  // finishes (the binding guarantees it). A quantized one (options.quant) connects to
  // every peer of the ring (AllReduceQuantized), and so does a direct one
  // (options.algorithm, AllReduceDirect or AllReduceDirectRsAg).
  std::shared_ptr<Collective> allReduce(const AllReduceOptions& options, double connectTimeoutSeconds);

  // Starts an all-gather, reduce-scatter, broadcast or all-to-all (`kind`; all_gather.hpp,
  // reduce_scatter.hpp, broadcast.hpp, all_to_all_direct.hpp) over the current ring,
  // connecting to every peer of it first. options.count is the input's element count (an
  // all-to-all's a multiple of N); `outputBytes` is checked against what the op writes
  // over this ring (all-gather: N x the input; reduce-scatter: this rank's chunk;
  // broadcast, all-to-all: the input). Out of place (a broadcast or an all-to-all may pass
  // one buffer as input and output); options.quant, algorithm and deferCommit are not used.
  // The buffers must stay valid until the op finishes (the binding guarantees it).
  std::shared_ptr<Collective> allToAll(CollectiveKind kind, const AllReduceOptions& options, size_t outputBytes,
                                       double connectTimeoutSeconds);

  // Point-to-point (p2p.hpp) with `peer` of the current ring: a send of `bytes` from
  // `data`, or a receive into it (peer kNoPeer: from any peer). Opens the pools to the
  // peer (a receive from any peer: to every peer) first, up to connectTimeoutSeconds;
  // the op then fails with PeerLostError / TimeoutError / AbortedError, or
  // ProtocolError when the two sides' sizes differ. `data` must stay valid until the op
  // finishes (the binding guarantees it). A send succeeds once its bytes are with the
  // kernel; a receive once they are all in `data` (PointToPoint::peer() names the sender).
  std::shared_ptr<PointToPoint> sendTo(uint64_t peer, uint64_t tag, const void* data, size_t bytes,
                                       double timeoutSeconds, double connectTimeoutSeconds);
  std::shared_ptr<PointToPoint> recvFrom(uint64_t peer, uint64_t tag, void* data, size_t bytes,
                                         double timeoutSeconds, double connectTimeoutSeconds);

  // Ends a deferred-commit op that has finished: with `commit`, if it succeeded or
  // voted, the result stays in the caller's buffer; otherwise the caller's input is put
  // back. Then frees the scratch. A no-op for other ops (a failed op that neither voted
  // nor votes restored its input when it failed) and when called again. Caller thread.
  void settle(const std::shared_ptr<Collective>& op, bool commit);

  // Fails `op` with AbortedError (no-op if it already finished). Returns at once;
  // waiters wake within one loop turn. `keepIdleTo`: peers of the epoch that replaces
  // the op's (a re-ring): their connections stay open where they hold nothing of the op,
  // to be kept for that epoch (see failOp); empty: the op's peers' connections close.
  void abort(const std::shared_ptr<Collective>& op, const std::string& reason,
             const std::vector<uint64_t>& keepIdleTo = {});

  // Serves `regions` (entry i = regions[i]) to fetching peers until unexposeState();
  // the memory must stay valid and unchanged until then. Returns the exposure id.
  uint64_t exposeState(std::vector<StateRegion> regions);
  // Stops serving; queued answers from this exposure are dropped (a half-sent one
  // closes its connection). Blocks until done. Returns the bytes served.
  uint64_t unexposeState(uint64_t exposure);
  // Fetches `chunks` of the exposure `exposure` of `source` (each chunk's bytes land in
  // chunk.dst). One op per source; fails as a whole if the source fails or refuses.
  // Its state-transfer connections to the source: the source's own pool to this peer
  // of the newest ring epoch, where it has one (fetchRoute: a joiner's first sync finds
  // it warm, where a new connection would spend its first round trips in slow start);
  // otherwise this peer's state pool to the source, opened if need be.
  std::shared_ptr<StateFetch> fetchState(const PeerAddress& source, uint64_t exposure,
                                         std::vector<FetchChunk> chunks, double timeoutSeconds);
  // Opens the state pools to every source without a pool to this peer at once, so that
  // their round trips overlap; fetchState opens a source's on its first fetch, one
  // source after another (a few round trips each). Throws if any cannot be reached.
  void connectStateSources(const std::vector<PeerAddress>& sources, double timeoutSeconds);
  // The round trip to `source` as this peer's connections to it have measured it: the
  // smallest any of them has seen (TCP_INFO's minimum; the smoothed one on a kernel
  // without it), which a queue filled by a transfer does not inflate. Any connection
  // counts: a fetch route's own samples may all have been taken behind a full queue
  // (a joiner's downlink while its members pad their pools to it), where another pool's
  // first handshake was not. 0 when none is open or none has a sample.
  double stateRoundTrip(uint64_t source);
  // Bounds the receive window of this peer's state-transfer connections to `sources`
  // (TCP_WINDOW_CLAMP) so that together they advertise about `windowBytes`: each gets
  // the share of one that carried bytes since the last call (with `starting`, as a fetch
  // starts: of one that ever carried state, or of all where none has), at least
  // kMinStateWindowBytes. The kernel keeps a clamp for the socket's life and never
  // takes back window it has advertised, so it binds within a round trip. A ring
  // connection (a fetch route) gets its own clamp back when an op of its epoch starts.
  // Returns the connections clamped.
  size_t clampStateWindows(const std::vector<uint64_t>& sources, uint64_t windowBytes, bool starting = false);
  static constexpr uint64_t kMinStateWindowBytes = 256u << 10;
  // State bytes received so far (kStateData payload: what fetches are delivered).
  uint64_t stateRxBytes() const { return stateRxBytes_.load(std::memory_order_relaxed); }
  // Padding bytes received so far: what the pools warming ahead of a join deliver
  // (measured like a fetch's, so that a joiner's windows are bounded before its first).
  uint64_t paddingRxBytes() const { return paddingRxBytes_.load(std::memory_order_relaxed); }
  // Opens pools of `epoch` to `peers` ahead of the epoch that will need them (a join:
  // the joiner to the members, each member to the joiner, while the master admits it),
  // so that the new epoch keeps them (rebindPools: at once, as they have carried no op)
  // instead of opening them (two round trips or three). `sharers`: the pools this
  // host's link will be shared by (as for an epoch's pools). Then, where a connection's
  // round trip is `warmMinRttSeconds` or more, it sends padding for up to `warmSeconds`
  // and `warmBytes`, until TCP has left slow start or the connection carries the first
  // frame of an op: a new connection starts with small congestion and receive windows,
  // and over a long link the first op would spend round trips growing them. Blocks for
  // the connects (up to `timeoutSeconds`); throws if a peer cannot be reached. A peer
  // another prepare is still opening a pool to is left to that call.
  void prepare(const std::vector<PeerAddress>& peers, uint64_t epoch, size_t sharers, double timeoutSeconds,
               double warmSeconds, uint64_t warmBytes, double warmMinRttSeconds);

  // Test-only fault injection: "corrupt_state" flips one byte in each of the next
  // `count` state chunks this peer serves; "withhold_vote": the next `count` voting ops
  // posted here vote (and may commit) without telling their successor, so the peers
  // after this one cannot commit on their own.
  void injectFault(const std::string& kind, int count);

  // Closes every connection to `peer` (any epoch), failing ops that involve it.
  void disconnect(uint64_t peer, const std::string& reason);

  // Next event (a peer's connection broke), waiting up to `timeoutSeconds`.
  bool nextEvent(Event* event, double timeoutSeconds);

  // Fails all ops with AbortedError, says goodbye to every peer, joins the
  // progress thread and the prefault worker. Idempotent.
  void close();

  // Open outgoing connections to `peer` in the pool of `epoch`.
  size_t liveConnections(uint64_t peer, uint64_t epoch) const;

  // Outgoing connections this engine has opened so far, and the wall seconds callers
  // spent waiting for pools to open (connect + handshake): what a re-ring costs.
  uint64_t connectionsOpened() const { return connectionsOpened_.load(std::memory_order_relaxed); }
  double connectSeconds() const { return connectNanos_.load(std::memory_order_relaxed) * 1e-9; }
  // Connections kept across a re-ring (rebindPools) and confirmed by the peer so far.
  uint64_t connectionsKept() const { return connectionsKept_.load(std::memory_order_relaxed); }
  // Padding bytes sent so far by connections warming ahead of their epoch (prepare).
  uint64_t paddingBytes() const { return paddingBytes_.load(std::memory_order_relaxed); }

  // Payload bytes sent by reference (zero-copy) so far.
  uint64_t zeroCopyBytes() const { return zeroCopyBytes_.load(std::memory_order_relaxed); }
  // Payload bytes sent through shared rings to peers on this host.
  uint64_t sharedMemoryBytes() const { return ringBytes_.load(std::memory_order_relaxed); }
  // Bytes of receive destinations faulted in ahead of their payloads so far.
  uint64_t prefaultedBytes() const { return prefaulter_.populatedBytes(); }
  // The congestion control and socket buffers this engine's connections get.
  const TransportFacts& transport() const { return transport_; }

 private:
  struct MailFrame {
    FrameHeader header;
    uint64_t peer;
    std::vector<uint8_t> payload;
  };
  // What collectives send through: a frame goes to the pool of (peer, the op's epoch).
  class Sink final : public FrameSink {
   public:
    explicit Sink(Engine* engine) : engine_(engine) {}
    void sendFrame(Collective* op, uint64_t peer, size_t stripe, const FrameHeader& header,
                   const uint8_t* data) override {
      engine_->queueFrame(op, peer, stripe, header, data);
    }

   private:
    Engine* engine_;
  };
  using PoolKey = std::pair<uint64_t, uint64_t>;  // (peer, epoch)
  struct PoolKeyHash {
    size_t operator()(const PoolKey& k) const { return std::hash<uint64_t>()(k.first * 0x9E3779B97F4A7C15ull ^ k.second); }
  };

  // ---- caller side (engine.cpp)
  void post(std::function<void()> command);
  // Runs `command` on the progress thread and returns once it has run (throws as post()).
  void postAndWait(std::function<void()> command);
  void ensureConnected(const PeerAddress& peer, uint64_t epoch, double timeoutSeconds);
  // Opens the missing pools to `targets` all at once (and waits for those kept from an
  // older epoch to be confirmed).
  void ensureConnected(const std::vector<PeerAddress>& targets, uint64_t epoch, double timeoutSeconds);
  // The opening itself, under connectMu_ (prepare: outside it, for peers outside the ring).
  void openMissing(const std::vector<PeerAddress>& targets, uint64_t epoch, double timeoutSeconds, size_t sharers);
  // Opens the missing pools to every other peer of `ring` (ring order from `pos`);
  // returns the ring's peer ids in ring order.
  std::vector<uint64_t> connectToAll(const RingPosition& pos, const std::vector<PeerAddress>& ring,
                                     double timeoutSeconds);
  // The connections a pool needs to carry its share of kAutoTargetBitsPerSecond (one of
  // `sharers` pools) over the quickest round trip of its first connections `fds`.
  size_t poolSizeFor(const std::vector<Fd>& fds, size_t sharers) const;
  ScratchBuffer takeScratch(size_t bytes);
  void giveScratch(ScratchBuffer scratch);

  // ---- progress thread: the loop and the ops' lifecycle (engine.cpp)
  void run();
  void drainCommands();
  void startOp(const std::shared_ptr<Collective>& op);
  void finishIfComplete(Collective* op);
  // Stops faulting in `op`'s destinations; afterwards they are the caller's again.
  void endPrefault(Collective* op);
  // `keepIdleTo`: peers whose connections stay open when none of them holds anything of
  // the op (a re-ring that keeps them: setRingEpoch); null: close every op peer's.
  void failOp(Collective* op, ErrorKind kind, const std::string& message, uint64_t peer,
              const std::vector<uint64_t>* keepIdleTo = nullptr);
  void retire(Collective* op);
  void checkDeadlines();
  void pushEvent(Event event);
  void setRingEpoch(uint64_t epoch, const std::vector<uint64_t>& ring);

  // ---- progress thread: connections and their pools (connections.cpp)
  void acceptAll();
  void addConnection(Fd fd, uint64_t peer, uint64_t epoch, bool outgoing, bool handshaking);
  void queueFrame(Collective* op, uint64_t peer, size_t stripe, const FrameHeader& header, const uint8_t* data);
  // A fetch from `source` goes over the source's own connections to this peer of the
  // newest ring epoch (sorted by fd), where there are any: they have carried that
  // epoch's ops or the padding of a join (prepare), so their congestion windows are
  // open; the source answers a request on the connection it came in on.
  std::vector<Connection*> fetchRoute(uint64_t source) const;
  // The connections fetches from `source` use: its fetch route, else the state pool.
  std::vector<Connection*> stateConnections(uint64_t source);
  // Puts back the windows of ring connections a fetch bounded (clampStateWindows).
  void releaseFetchClamps();
  // Counts `n` payload bytes of the frame `c` is reading if it is state data or padding.
  void countStateBytes(Connection* c, uint64_t n);
  void queueItem(Connection* c, SendItem item);
  void offerRing(Connection* c);
  void onRingOffer(Connection* c, const std::vector<uint8_t>& payload);
  void onRingAnswer(Connection* c, const FrameHeader& h);
  void takeFromRing(Connection* c);
  bool zeroCopy(Connection* c, const Collective& op, const FrameHeader& h);
  void flush(Connection* c);
  void flushDirty();
  // Warming (prepare): padding whenever the socket takes more, until `until`, `bytes`,
  // or stopWarming (anything else queued but a prepared pool's kRebind).
  void startWarming(Connection* c, Clock::time_point until, uint64_t bytes);
  void stopWarming(Connection* c);
  void pad(Connection* c);
  void updateInterest(Connection* c);
  void closeConnection(Connection* c, ErrorKind kind, const std::string& reason, bool quiet);
  // Closes the connections to `peer` of epochs in [minEpoch, maxEpoch].
  void closePeer(uint64_t peer, uint64_t minEpoch, uint64_t maxEpoch, ErrorKind kind, const std::string& reason);
  // Whether every connection to `peer` of epochs in [minEpoch, maxEpoch] is idle: nothing
  // queued, half written or half read (the test rebindPools keeps a pool by).
  bool idleTo(uint64_t peer, uint64_t minEpoch, uint64_t maxEpoch) const;
  void failReadersByReference(Connection* c);
  void resumePaused();
  // Keeps whole, idle pools of older epochs to peers of `ring` for `epoch` (kRebind);
  // closes the other older connections (see the comment at the top).
  void rebindPools(uint64_t epoch, const std::vector<uint64_t>& ring);
  void onRebind(Connection* c, const FrameHeader& h);
  void onRebound(Connection* c, const FrameHeader& h);
  // Gives up on kept connections to `peer` for `epoch` whose kRebound did not come.
  void dropRebinding(uint64_t peer, uint64_t epoch);

  // ---- progress thread: the receive path, bytes to frames to ops (frames.cpp)
  void onReadable(Connection* c);
  bool readHandshake(Connection* c);
  void dispatchHeader(Connection* c);
  void dispatchOpFrame(Connection* c);
  bool routeUnclaimed(Connection* c, const Collective* sameTag);
  void readControl(Connection* c);
  void onFrameComplete(Connection* c);
  void deliverEarly(const std::shared_ptr<Collective>& op, const MailFrame& frame);
  void onAbortFrame(Connection* c, const FrameHeader& h, const std::string& reason);

  // ---- progress thread: serving shared state (state_server.cpp)
  struct Exposure {
    std::vector<StateRegion> regions;
    uint64_t served = 0;
  };
  void onStateRequest(Connection* c, const FrameHeader& h, const std::vector<uint8_t>& payload);
  void queueControl(Connection* c, const FrameHeader& h, std::string payload);
  void dropExposure(uint64_t exposure);

  // ---- progress thread: point-to-point matching (p2p.cpp)
  struct P2pOffer {
    uint64_t peer;
    uint64_t epoch;
    uint64_t senderTag;
    uint64_t bytes;
  };
  std::shared_ptr<PointToPoint> postP2p(const P2pOptions& options, double connectTimeoutSeconds);
  void startP2p(const std::shared_ptr<PointToPoint>& op);
  void onP2pFrame(Connection* c, const FrameHeader& h);
  void takeOffer(const std::shared_ptr<PointToPoint>& op, const P2pOffer& offer);
  // Queues a bare p2p control frame on stripe 0 of (peer, epoch); false: no such pool.
  bool sendP2pControl(uint64_t peer, uint64_t epoch, const FrameHeader& h);
  void onP2pFailed(PointToPoint* op, ErrorKind kind);
  void dropP2pBefore(uint64_t epoch);

  // ---- progress thread: test-only faults armed by injectFault() (fault_injection.cpp)
  void maybeWithholdVotes(Collective* op);
  void maybeCorrupt(SendItem& answer);

  EngineOptions options_;
  Fd listenFd_;
  uint16_t port_ = 0;
  Fd epollFd_;
  Fd wakeFd_;
  Prefaulter prefaulter_;  // before thread_: the progress thread uses it until joined
  std::thread thread_;

  // caller-side state
  mutable std::mutex mu_;
  std::deque<std::function<void()>> commands_;
  bool closed_ = false;
  RingPosition ring_;
  std::vector<PeerAddress> ringPeers_;
  std::unordered_map<PoolKey, size_t, PoolKeyHash> liveOutgoing_;  // mirror of the progress thread's pools
  std::unordered_map<uint64_t, size_t> poolSize_;  // connectionsPerPeer == 0: measured per peer (mu_)
  std::unordered_map<PoolKey, size_t, PoolKeyHash> rebinding_;  // kept connections awaiting kRebound (mu_)
  std::condition_variable rebindCv_;  // rebinding_ changed
  std::unordered_set<uint64_t> preparing_;  // peers a prepare() call is opening a pool to (mu_)
  std::condition_variable prepareCv_;               // preparing_ changed
  std::vector<ScratchBuffer> scratchPool_;
  std::deque<Event> events_;
  std::condition_variable eventsCv_;
  std::mutex connectMu_;  // one connect attempt per peer at a time

  // progress-thread state
  bool stopping_ = false;
  uint64_t currentEpoch_ = 0;
  std::unordered_map<int, std::unique_ptr<Connection>> connections_;
  std::unordered_map<PoolKey, std::vector<Connection*>, PoolKeyHash> outgoing_;
  std::unordered_map<uint64_t, std::shared_ptr<Collective>> activeByTag_;
  struct Finished {
    OpKey key;
    uint32_t digest;
  };
  std::unordered_map<uint64_t, Finished> lastDoneByTag_;
  // Ops a neighbour told us it failed (kAbort): a later post of one fails at once.
  struct Tombstone {
    OpKey key;
    ErrorKind kind;
    std::string reason;
    uint64_t peer;
  };
  std::deque<Tombstone> tombstones_;
  std::unordered_map<uint64_t, Exposure> exposures_;
  int corruptStateChunks_ = 0;
  int withholdVoteOps_ = 0;
  std::atomic<uint64_t> nextExposure_{1};
  std::atomic<uint64_t> zeroCopyBytes_{0};
  std::atomic<uint64_t> ringBytes_{0};
  std::atomic<uint64_t> connectionsOpened_{0};
  std::atomic<uint64_t> connectNanos_{0};
  TransportFacts transport_;
  std::atomic<uint64_t> connectionsKept_{0};
  std::atomic<uint64_t> paddingBytes_{0};
  std::atomic<uint64_t> stateRxBytes_{0};
  std::atomic<uint64_t> paddingRxBytes_{0};
  bool fetchClamped_ = false;  // a ring connection's window is bounded (clampBefore set)
  std::atomic<uint64_t> nextFetchTag_{1};
  std::unordered_map<uint64_t, std::deque<MailFrame>> mailbox_;
  // Point-to-point, by user tag: offers no receive has taken yet (arrival order) and
  // receives waiting for an offer (post order).
  std::atomic<uint64_t> nextP2pTag_{1};
  std::unordered_map<uint64_t, std::deque<P2pOffer>> p2pOffers_;
  std::unordered_map<uint64_t, std::deque<std::shared_ptr<PointToPoint>>> p2pPosted_;
  size_t mailboxBytes_ = 0;
  std::vector<uint8_t> discard_;
  std::vector<Connection*> dirty_;               // connections with frames queued since the last flush
  std::vector<std::unique_ptr<Connection>> graveyard_;  // closed this loop turn; freed at the next
};

}  // namespace pccl
