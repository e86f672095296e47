// Test-only fault injection (Engine::injectFault): armed from the caller's thread,
// each fault strikes the next `count` times its hook runs on the progress thread.
#include <string>

#include "pccl/engine.hpp"
#include "transport/connection.hpp"

namespace pccl {

void Engine::injectFault(const std::string& kind, int count) {
  if (kind == "corrupt_state") {
    post([this, count] { corruptStateChunks_ = count; });
  } else if (kind == "withhold_vote") {
    post([this, count] { withholdVoteOps_ = count; });
  } else {
    throw InvalidArgument("unknown fault '" + kind + "'");
  }
}

// "withhold_vote", when a voting op starts.
void Engine::maybeWithholdVotes(Collective* op) {
  if (withholdVoteOps_ > 0 && op->voting()) {
    --withholdVoteOps_;
    op->withholdVotes();
  }
}

// "corrupt_state", when a state chunk is answered: the answer carries a copy with one
// byte flipped instead of the exposed memory.
void Engine::maybeCorrupt(SendItem& answer) {
  if (corruptStateChunks_ <= 0) return;
  --corruptStateChunks_;
  const size_t length = answer.header.length;
  answer.hold = std::make_shared<std::string>(reinterpret_cast<const char*>(answer.data), length);
  (*answer.hold)[length / 2] ^= 0x01;
  answer.data = reinterpret_cast<const uint8_t*>(answer.hold->data());
  answer.exposure = 0;
}

}  // namespace pccl
