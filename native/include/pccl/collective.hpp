// A collective operation in flight: its outcome, its wait, and the hooks the
// engine's progress thread drives it through.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "pccl/errors.hpp"
#include "pccl/prefault.hpp"
#include "pccl/tcp.hpp"
#include "pccl/wire.hpp"

namespace pccl {

enum class OpState { kRunning, kSucceeded, kFailed };

class Collective;

// What a collective needs from the engine: frames out. Called on the progress thread.
class FrameSink {
 public:
  virtual ~FrameSink() = default;
  // Queues one frame to `peer` on the connection chosen by `stripe`. `data` must
  // stay valid and unchanged until the op finishes.
  virtual void sendFrame(Collective* op, uint64_t peer, size_t stripe, const FrameHeader& header,
                         const uint8_t* data) = 0;
};

// Scratch memory an op borrows (an in-place reduction's working buffer).
struct ScratchBuffer {
  std::unique_ptr<uint8_t[]> data;
  size_t size = 0;
};

class Collective : public std::enable_shared_from_this<Collective> {
 public:
  Collective(OpKey key, double timeoutSeconds);
  virtual ~Collective() = default;
  Collective(const Collective&) = delete;
  Collective& operator=(const Collective&) = delete;

  // ---- caller side (any thread)
  const OpKey& key() const { return key_; }
  // Blocks until the op finishes or `timeoutSeconds` pass (negative: no limit).
  // Returns whether it finished.
  bool wait(double timeoutSeconds);
  bool done() const;
  OpState state() const;
  // Throws the op's typed error if it failed; returns if it succeeded.
  void rethrow() const;
  uint64_t txBytes() const;
  uint64_t rxBytes() const;
  // Bytes received so far, while the op runs (for progress reports).
  uint64_t rxSoFar() const { return rxProgress_.load(std::memory_order_relaxed); }

  // ---- progress-thread side
  Clock::time_point deadline() const { return deadline_; }
  virtual void start(FrameSink& sink) = 0;
  // Where the payload of `header` (from `peer`) goes. Throws ProtocolError when the
  // frame does not belong in this op.
  virtual uint8_t* receiveTarget(uint64_t peer, const FrameHeader& header) = 0;
  virtual void onReceived(FrameSink& sink, const FrameHeader& header) = 0;
  void onSent(uint32_t bytes);
  virtual bool complete() const = 0;
  // Whether an incoming frame with this op's tag belongs to it.
  virtual bool accepts(const FrameHeader& h) const {
    return (h.type == static_cast<uint8_t>(FrameType::kData) || h.type == static_cast<uint8_t>(FrameType::kCommit)) &&
           h.epoch == key_.epoch && h.seq == key_.seq;
  }
  virtual ScratchBuffer releaseScratch() { return {}; }
  // Caller memory that incoming payloads land in straight from recv(), in the order
  // they are expected: the engine faults it in ahead of them (Prefaulter).
  virtual std::vector<MemoryRange> landingRanges() const { return {}; }
  // Whether the engine may send this op's payloads by reference (the kernel reads the
  // caller's pages when the receiver reads, not when the frame is queued). Only safe
  // when no peer can rely on a byte this peer changes before every peer holds the
  // result: see AllReduceRing::sendsByReference.
  virtual bool sendsByReference() const { return false; }
  // Whether a failed op leaves its caller's input to settle() to restore.
  virtual bool defersRestore() const { return false; }
  // Whether this op still needs payload frames from `peer`.
  virtual bool awaitsDataFrom(uint64_t peer) const { (void)peer; return false; }
  // Whether a successful op still holds its result (deferred commit).
  virtual bool holdsResult() const { return false; }
  // Copies a held result into the caller's buffer (deferred in-place ops).
  virtual void commitResult() {}
  // A deferred in-place op is settled without commit: put the caller's input back.
  virtual void rollback() {}
  // Digest of the op's shape, for late frames of a finished op (0: none).
  virtual uint32_t shapeDigest() const { return 0; }
  // Poisoning after a failure closes the neighbours' pools of epochs in
  // [poisonFloor(), key().epoch].
  virtual uint64_t poisonFloor() const { return 0; }
  virtual bool involves(uint64_t peer) const = 0;
  // Peers whose connections are poisoned when this op fails.
  virtual void forEachPeer(void (*fn)(void*, uint64_t), void* ctx) const = 0;
  void succeed();
  // Marks the op failed (the progress thread no longer drives it) and, with `publish`,
  // lets waiters see it; otherwise publish() does, once the engine has cleaned up.
  void fail(ErrorKind kind, const std::string& message, uint64_t peer = kNoPeer, bool publish = true);
  void publish();

  // ---- commit vote (ops posted with AllReduceOptions::vote)
  // Once its data is complete, a peer tells its ring successor how many consecutive
  // peers, itself and those before it, hold the complete result (kCommit frames; the
  // count only grows, capped at N-1). A peer whose predecessor reports N-1 while it
  // holds the result itself knows that every peer holds it: it succeeds ("commits")
  // without asking anyone. So an op that one peer committed was complete everywhere,
  // and a peer that never voted proves that nobody committed: an outside arbiter can
  // then settle the peers whose op failed after voting without ever contradicting a
  // peer that committed (docs/protocol.md, "Commit vote").
  //
  // All-to-all mode (enableDirectVote, for ops whose data already goes from every peer
  // to every peer): once its data is complete, a peer sends its vote straight to each
  // other peer, and commits once it holds the result and votes from all N-1 others.
  // The same rule with other messengers: a vote still means "I hold the complete
  // result", a commit still needs every peer's vote, so the guarantees above hold as
  // they are. It costs one one-way delay instead of N-1 ring hops.
  bool voting() const { return voteSize_ > 1; }
  // Whether this peer cast its vote (it held the complete result). Any thread.
  bool voted() const { return voted_.load(std::memory_order_acquire); }
  // Progress thread, once complete(): sends this peer's count if it grew; returns true
  // when every peer holds the result (always true without a vote).
  bool readyToCommit(FrameSink& sink);
  // Progress thread: validates a kCommit frame from `peer` (throws ProtocolError).
  void checkVote(uint64_t peer, const FrameHeader& h) const;
  void onVote(uint64_t peer, const FrameHeader& h);
  // Test-only fault: this op's votes are counted as cast but never sent.
  void withholdVotes() { withholdVotes_ = true; }

 protected:
  virtual void onSuccess() {}
  virtual void onFailure() {}
  std::string describe() const;

  // Ops that vote call this from their constructor: N, ring neighbours, shape digest.
  void enableVote(size_t ringSize, uint64_t prevPeer, uint64_t nextPeer, uint32_t digest);
  // Ops that vote all-to-all call this instead: the op's peers (this one at `rank`).
  void enableDirectVote(std::vector<uint64_t> peers, size_t rank, uint32_t digest);

  uint64_t pendingSends_ = 0;  // progress thread only
  uint64_t txProgress_ = 0;
  std::atomic<uint64_t> rxProgress_{0};  // written by the progress thread, read by anyone

 private:
  OpKey key_;
  Clock::time_point deadline_;
  size_t voteSize_ = 0;  // 0/1: no vote
  uint64_t votePrev_ = kNoPeer;
  uint64_t voteNext_ = kNoPeer;
  uint32_t voteDigest_ = 0;
  uint64_t voteReceived_ = 0;  // the predecessor's latest count
  uint64_t voteSent_ = 0;
  // All-to-all mode (votePeers_ not empty): who has voted so far.
  std::vector<uint64_t> votePeers_;
  size_t voteRank_ = 0;
  std::vector<uint8_t> votedFrom_;
  size_t votesIn_ = 0;
  size_t voteIndex(uint64_t peer) const;
  bool withholdVotes_ = false;
  std::atomic<bool> voted_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  OpState state_ = OpState::kRunning;
  bool published_ = false;  // the outcome is visible to callers (wait, done)
  ErrorKind errorKind_ = ErrorKind::kNone;
  std::string errorMessage_;
  uint64_t errorPeer_ = kNoPeer;
  uint64_t txBytes_ = 0;
  uint64_t rxBytes_ = 0;
};

}  // namespace pccl
