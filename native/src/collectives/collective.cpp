#include "pccl/collective.hpp"

#include <algorithm>

namespace pccl {

Collective::Collective(OpKey key, double timeoutSeconds) : key_(key) {
  auto now = Clock::now();
  if (timeoutSeconds < 0 || timeoutSeconds > 1e7) timeoutSeconds = 1e7;
  deadline_ = now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeoutSeconds));
}

bool Collective::wait(double timeoutSeconds) {
  std::unique_lock<std::mutex> lock(mu_);
  auto finished = [this] { return published_; };
  if (timeoutSeconds < 0) {
    cv_.wait(lock, finished);
    return true;
  }
  return cv_.wait_for(lock, std::chrono::duration<double>(timeoutSeconds), finished);
}

bool Collective::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return published_;
}

OpState Collective::state() const {
  std::lock_guard<std::mutex> lock(mu_);
  return state_;
}

uint64_t Collective::txBytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return txBytes_;
}

uint64_t Collective::rxBytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return rxBytes_;
}

void Collective::rethrow() const {
  std::lock_guard<std::mutex> lock(mu_);
  switch (errorKind_) {
    case ErrorKind::kNone:
      if (state_ == OpState::kRunning) throw Error("op is still running");
      return;
    case ErrorKind::kPeerLost:
      throw PeerLostError(errorMessage_, errorPeer_);
    case ErrorKind::kTimeout:
      throw TimeoutError(errorMessage_);
    case ErrorKind::kAborted:
      throw AbortedError(errorMessage_);
    case ErrorKind::kProtocol:
      throw ProtocolError(errorMessage_, errorPeer_);
    case ErrorKind::kInvalid:
      throw InvalidArgument(errorMessage_);
  }
}

void Collective::enableVote(size_t ringSize, uint64_t prevPeer, uint64_t nextPeer, uint32_t digest) {
  voteSize_ = ringSize;
  votePrev_ = prevPeer;
  voteNext_ = nextPeer;
  voteDigest_ = digest;
  if (ringSize <= 1) voted_.store(true, std::memory_order_release);
}

void Collective::enableDirectVote(std::vector<uint64_t> peers, size_t rank, uint32_t digest) {
  PCCL_ENFORCE(rank < peers.size(), "bad vote position");
  voteSize_ = peers.size();
  voteRank_ = rank;
  voteDigest_ = digest;
  votedFrom_.assign(peers.size(), 0);
  votePeers_ = std::move(peers);
  if (voteSize_ <= 1) voted_.store(true, std::memory_order_release);
}

size_t Collective::voteIndex(uint64_t peer) const {
  for (size_t k = 0; k < votePeers_.size(); ++k) {
    if (votePeers_[k] == peer) return k;
  }
  return votePeers_.size();
}

bool Collective::readyToCommit(FrameSink& sink) {
  if (voteSize_ <= 1) return true;
  if (!votePeers_.empty()) {  // all-to-all: one vote to every other peer, once
    if (voteSent_ == 0) {
      voteSent_ = 1;
      voted_.store(true, std::memory_order_release);
      if (!withholdVotes_) {
        for (size_t k = 0; k < votePeers_.size(); ++k) {
          if (k == voteRank_) continue;
          ++pendingSends_;  // complete() waits for them: the op outlives its last frame
          sink.sendFrame(this, votePeers_[k], 0,
                         makeHeader(FrameType::kCommit, key_, /*length=*/0, voteDigest_, /*offset=*/1), nullptr);
        }
        return false;
      }
    }
    return votesIn_ >= voteSize_ - 1;
  }
  const uint64_t count = std::min<uint64_t>(voteReceived_ + 1, voteSize_ - 1);
  if (count > voteSent_) {
    voteSent_ = count;
    voted_.store(true, std::memory_order_release);
    if (withholdVotes_) return voteReceived_ >= voteSize_ - 1;
    ++pendingSends_;  // complete() waits for it: the op outlives its last frame
    sink.sendFrame(this, voteNext_, 0, makeHeader(FrameType::kCommit, key_, /*length=*/0, voteDigest_, /*offset=*/count),
                   nullptr);
    return false;
  }
  return voteReceived_ >= voteSize_ - 1;
}

void Collective::checkVote(uint64_t peer, const FrameHeader& h) const {
  if (!votePeers_.empty()) {
    const size_t k = voteIndex(peer);
    if (voteSize_ <= 1 || h.digest != voteDigest_ || k >= voteSize_ || k == voteRank_ || h.offset != 1 ||
        votedFrom_[k]) {
      throw ProtocolError("bad commit vote from peer " + std::to_string(peer) + " " + describe(), peer);
    }
    return;
  }
  if (voteSize_ <= 1 || h.digest != voteDigest_ || peer != votePrev_ || h.offset == 0 || h.offset > voteSize_ - 1) {
    throw ProtocolError("bad commit vote from peer " + std::to_string(peer) + " " + describe(), peer);
  }
}

void Collective::onVote(uint64_t peer, const FrameHeader& h) {
  if (!votePeers_.empty()) {  // checkVote() made sure it is a first vote of another peer
    votedFrom_[voteIndex(peer)] = 1;
    ++votesIn_;
    return;
  }
  voteReceived_ = std::max<uint64_t>(voteReceived_, h.offset);
}

void Collective::onSent(uint32_t bytes) {
  --pendingSends_;
  txProgress_ += bytes;
}

std::string Collective::describe() const {
  return "(epoch " + std::to_string(key_.epoch) + ", tag " + std::to_string(key_.tag) + ", step " +
         std::to_string(key_.seq) + ")";
}

void Collective::succeed() {
  onSuccess();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != OpState::kRunning) return;
    state_ = OpState::kSucceeded;
    txBytes_ = txProgress_;
    rxBytes_ = rxProgress_;
    published_ = true;
  }
  cv_.notify_all();
}

void Collective::fail(ErrorKind kind, const std::string& message, uint64_t peer, bool publish) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != OpState::kRunning) return;
    state_ = OpState::kFailed;
    errorKind_ = kind;
    errorMessage_ = message + " " + describe();
    errorPeer_ = peer;
    txBytes_ = txProgress_;
    rxBytes_ = rxProgress_;
  }
  onFailure();  // before the caller can see the failure: an in-place input is back
  if (publish) this->publish();
}

void Collective::publish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (published_ || state_ == OpState::kRunning) return;
    published_ = true;
  }
  cv_.notify_all();
}

}  // namespace pccl
