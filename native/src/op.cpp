#include "pccl/op.hpp"

namespace pccl {

Collective::Collective(OpKey key, double timeoutSeconds) : key_(key) {
  auto now = Clock::now();
  if (timeoutSeconds < 0 || timeoutSeconds > 1e7) timeoutSeconds = 1e7;
  deadline_ = now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeoutSeconds));
}

bool Collective::wait(double timeoutSeconds) {
  std::unique_lock<std::mutex> lock(mu_);
  auto finished = [this] { return state_ != OpState::kRunning; };
  if (timeoutSeconds < 0) {
    cv_.wait(lock, finished);
    return true;
  }
  return cv_.wait_for(lock, std::chrono::duration<double>(timeoutSeconds), finished);
}

bool Collective::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return state_ != OpState::kRunning;
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
  }
  cv_.notify_all();
}

void Collective::fail(ErrorKind kind, const std::string& message, uint64_t peer) {
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
  onFailure();
  cv_.notify_all();
}

}  // namespace pccl
