// Data-plane wire format. Every connection starts with a handshake; after it, the
// stream is a sequence of frames, each a fixed header followed by `length` payload
// bytes. Integers are little-endian (the engine refuses to build big-endian).
//
// Handshake (connector C, acceptor A):
//   C -> A  Hello
//   A -> C  HelloAck (flags & kHelloAuth: A has a shared secret; nonce: fresh, random)
// and, only when A asked for authentication (mutual challenge-response):
//   C -> A  AuthProof  nonce_c, HMAC-SHA256(secret, "pccl-data-v2 connector" || transcript)
//   A -> C  AuthResult status, HMAC-SHA256(secret, "pccl-data-v2 acceptor" || transcript)
// transcript = nonce_a || nonce_c || C's peer id || A's peer id || epoch || connIndex ||
// poolSize (integers little-endian). The secret never travels; both nonces are fresh
// per connection, so a recorded handshake replayed later fails. A connector with a
// secret refuses an acceptor that does not ask for one (it cannot prove itself).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pccl {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian");

constexpr uint32_t kProtocolVersion = 2;
constexpr uint32_t kHelloMagic = 0x53484350;  // "PCHS"
constexpr uint32_t kFrameMagic = 0x46444350;  // "PCDF"
constexpr uint32_t kMaxFramePayload = 64u << 20;

// Sent by the connecting side.
struct Hello {
  uint32_t magic;
  uint32_t version;
  uint64_t peerId;     // the connecting peer
  uint64_t epoch;      // the connecting peer's epoch when it connected (informational)
  uint32_t connIndex;  // index within the pool of connections to this neighbour
  uint32_t poolSize;
};
static_assert(sizeof(Hello) == 32, "Hello is 32 bytes on the wire");

enum class HelloStatus : uint32_t { kOk = 0, kBadVersion = 1, kBadMagic = 2, kAuthFailed = 3 };

constexpr uint32_t kHelloAuth = 1;  // HelloAck.flags: the acceptor requires authentication
constexpr size_t kNonceBytes = 16;
constexpr size_t kMacBytes = 32;

// Sent back by the accepting side.
struct HelloAck {
  uint32_t magic;
  uint32_t status;  // HelloStatus
  uint64_t peerId;  // the accepting peer
  uint32_t flags;   // kHelloAuth
  uint32_t reserved;
  uint8_t nonce[kNonceBytes];  // the acceptor's challenge (zero without authentication)
};
static_assert(sizeof(HelloAck) == 40, "HelloAck is 40 bytes on the wire");

// The connector's answer to the challenge.
struct AuthProof {
  uint8_t nonce[kNonceBytes];  // the connector's challenge
  uint8_t mac[kMacBytes];
};
static_assert(sizeof(AuthProof) == 48, "AuthProof is 48 bytes on the wire");

// The acceptor's verdict, and its own proof when the connector's was right.
struct AuthResult {
  uint32_t magic;
  uint32_t status;  // HelloStatus: kOk or kAuthFailed
  uint8_t mac[kMacBytes];
};
static_assert(sizeof(AuthResult) == 40, "AuthResult is 40 bytes on the wire");

// kGoodbye (no payload) announces an orderly close: the EOF that follows is not a crash.
// kAbort names an op (epoch, tag, seq) the sender failed, with the reason as payload
// (phase carries the error kind); the sender closes the connection next.
//
// Shared-state transfer, on connections of the state pool (epoch kStateEpoch):
// kStateRequest asks the peer for bytes of one exposed entry (digest: entry index,
// offset: byte offset in the entry, tag: the fetch op, seq: the chunk index; payload:
// StateRequest); kStateData answers with the bytes (same header fields);
// kStateRefused says why not (payload: reason text).
enum class FrameType : uint8_t {
  kData = 1,
  kGoodbye = 2,
  kAbort = 3,
  kStateRequest = 4,
  kStateData = 5,
  kStateRefused = 6,
  // Commit vote of an all-reduce (no payload; `offset` carries the count, see
  // Collective::readyToCommit).
  kCommit = 7,
};
constexpr uint32_t kMaxAbortReason = 1024;
constexpr uint64_t kStateEpoch = UINT64_MAX - 1;  // pool used by state transfers (never retired)
constexpr uint64_t kNoEpoch = UINT64_MAX;         // a connection tied to no pool (the master's)

struct StateRequest {
  uint64_t exposure;  // which exposure of the serving peer
  uint64_t length;    // bytes asked for
};
static_assert(sizeof(StateRequest) == 16, "StateRequest is 16 bytes on the wire");

// Phases of a ring collective.
enum class Phase : uint8_t { kReduceScatter = 0, kAllGather = 1 };

struct FrameHeader {
  uint32_t magic;
  uint8_t type;      // FrameType
  uint8_t phase;     // Phase
  uint16_t reserved;
  uint32_t length;   // payload bytes
  uint32_t digest;   // digest of the op's shape: peers that disagree fail loudly
  uint64_t epoch;
  uint64_t tag;
  uint64_t seq;      // the op's step within its tag
  uint64_t offset;   // byte offset of the payload within the op's buffer
};
static_assert(sizeof(FrameHeader) == 48, "FrameHeader is 48 bytes on the wire");

}  // namespace pccl
