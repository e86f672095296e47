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
// poolSize (HandshakeTranscript). The secret never travels; both nonces are fresh
// per connection, so a recorded handshake replayed later fails. A connector with a
// secret refuses an acceptor that does not ask for one (it cannot prove itself).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pccl {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian");

constexpr uint32_t kProtocolVersion = 5;  // 3: point-to-point and rebind frames, the all-to-all kind; 4: shared rings; 5: padding
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

// What each side's MAC covers, after its label (kConnectorLabel, kAcceptorLabel). Never
// sent: both sides build it from the Hello, the acceptor's id and the two nonces.
struct HandshakeTranscript {
  uint8_t acceptorNonce[kNonceBytes];
  uint8_t connectorNonce[kNonceBytes];
  uint64_t connectorId;
  uint64_t acceptorId;
  uint64_t epoch;
  uint32_t connIndex;
  uint32_t poolSize;
};
static_assert(sizeof(HandshakeTranscript) == 64, "HandshakeTranscript is 64 bytes");

constexpr char kConnectorLabel[] = "pccl-data-v2 connector";
constexpr char kAcceptorLabel[] = "pccl-data-v2 acceptor";

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
  // Point-to-point (p2p.hpp), no payload, on stripe 0 of the epoch's pool so that a
  // sender's offers keep their order. kP2pOffer: sender -> receiver, "I have `offset`
  // bytes for user tag `tag`"; seq names the sender's op. kP2pAccept: receiver ->
  // sender, tag: the sender's op, seq: the receiver's op (the payload's kData frames
  // carry it), offset: the bytes the receive holds, phase 0: send them, 1: refused (the
  // sizes differ). kP2pCancel: sender -> receiver, the offer `seq` (user tag `tag`) is
  // withdrawn (its op failed before it was accepted; phase: the ErrorKind).
  kP2pOffer = 8,
  kP2pAccept = 9,
  kP2pCancel = 10,
  // Keeping a pool across a re-ring (Engine::rebindPools), no payload. kRebind: the
  // connecting side -> the accepting side, "from this frame on, this connection belongs
  // to the pool of `epoch`" (sent only when no frame of an older op is queued or half
  // written). kRebound: the answer; the connecting side sends frames of `epoch` on the
  // connection only after it, so a late failure of an older op on the accepting side
  // (which closes that peer's connections of older epochs) can never break it.
  kRebind = 11,
  kRebound = 12,
  // Same-host payloads through shared memory (transport/shared_ring.hpp). kRingOffer:
  // the sending side of a connection offers its ring (payload: RingOffer); kRingAnswer
  // (no payload; phase 0: mapped, 1: refused) comes back on the same connection. Data
  // frames flagged kFrameInRing after the answer have their payload in the ring.
  kRingOffer = 13,
  kRingAnswer = 14,
  // Bytes that carry nothing (the receiver reads and drops them): what a pool opened
  // ahead of a join sends while it waits to be rebound, so that its congestion window
  // has grown when the first op's data comes (Engine::prepare).
  kPadding = 15,
};
// FrameHeader.flags: the payload is in the sender's shared ring, not on the stream.
constexpr uint16_t kFrameInRing = 1;
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
  uint8_t phase;     // Phase (kData); ErrorKind (kAbort)
  uint16_t flags;    // kFrameInRing
  uint32_t length;   // payload bytes
  uint32_t digest;   // digest of the op's shape: peers that disagree fail loudly
  uint64_t epoch;
  uint64_t tag;
  uint64_t seq;      // the op's step within its tag
  uint64_t offset;   // byte offset of the payload within the op's buffer
};
static_assert(sizeof(FrameHeader) == 48, "FrameHeader is 48 bytes on the wire");

// Identity of an op: frames of other (epoch, tag, seq) never reach it.
struct OpKey {
  uint64_t epoch = 0;
  uint64_t tag = 0;
  uint64_t seq = 0;
};

inline OpKey keyOf(const FrameHeader& h) { return OpKey{h.epoch, h.tag, h.seq}; }
// The frames whose payload may travel in a shared ring (flagged kFrameInRing).
inline bool mayUseRing(const FrameHeader& h) {
  return h.type == static_cast<uint8_t>(FrameType::kData) || h.type == static_cast<uint8_t>(FrameType::kStateData);
}
// Ops of one tag run in order of (epoch, seq).
inline bool stepBefore(const OpKey& a, const OpKey& b) {
  return a.epoch < b.epoch || (a.epoch == b.epoch && a.seq < b.seq);
}
inline bool sameStep(const OpKey& a, const OpKey& b) { return a.epoch == b.epoch && a.seq == b.seq; }

// Every frame header is built here: magic set, flags zero, the op's key. What the
// other fields mean depends on the type (see FrameType).
inline FrameHeader makeHeader(FrameType type, const OpKey& key, uint32_t length = 0, uint32_t digest = 0,
                              uint64_t offset = 0, uint8_t phase = 0) {
  FrameHeader h{};
  h.magic = kFrameMagic;
  h.type = static_cast<uint8_t>(type);
  h.phase = phase;
  h.length = length;
  h.digest = digest;
  h.epoch = key.epoch;
  h.tag = key.tag;
  h.seq = key.seq;
  h.offset = offset;
  return h;
}

// The layouts above in Python's struct notation, for pccl_py's own codec of the
// handshake (the binding exports them; a Python test checks its copy against them).
// The checks below keep each one true to its struct: every field's offset, and the size.
constexpr char kHelloFormat[] = "<IIQQII";
constexpr char kHelloAckFormat[] = "<IIQII16s";
constexpr char kAuthProofFormat[] = "<16s32s";
constexpr char kAuthResultFormat[] = "<II32s";
constexpr char kHandshakeTranscriptFormat[] = "<16s16sQQQII";
constexpr char kFrameHeaderFormat[] = "<IBBHIIQQQQ";
constexpr char kStateRequestFormat[] = "<QQ";

namespace format {
// Byte offset of field `index` of a little-endian, unpadded struct format (index = the
// number of fields: the size). B H I Q are 1 2 4 8 bytes; "Ns" is N bytes.
constexpr size_t offset(const char* f, size_t index) {
  size_t at = 0;
  size_t field = 0;
  for (size_t i = f[0] == '<' ? 1 : 0; f[i] != '\0' && field < index; ++i, ++field) {
    size_t count = 0;
    while (f[i] >= '0' && f[i] <= '9') count = count * 10 + static_cast<size_t>(f[i++] - '0');
    switch (f[i]) {
      case 'B': at += 1; break;
      case 'H': at += 2; break;
      case 'I': at += 4; break;
      case 'Q': at += 8; break;
      case 's': at += count; break;
      default: return SIZE_MAX;  // not a code this header uses
    }
  }
  return field == index ? at : SIZE_MAX;
}
}  // namespace format

#define PCCL_FIELD_AT(format_, index_, type_, field_) \
  static_assert(format::offset(format_, index_) == offsetof(type_, field_), #type_ "." #field_ " vs " #format_)
#define PCCL_SIZE_IS(format_, fields_, type_) \
  static_assert(format::offset(format_, fields_) == sizeof(type_), "size of " #type_ " vs " #format_)
PCCL_FIELD_AT(kHelloFormat, 0, Hello, magic);
PCCL_FIELD_AT(kHelloFormat, 1, Hello, version);
PCCL_FIELD_AT(kHelloFormat, 2, Hello, peerId);
PCCL_FIELD_AT(kHelloFormat, 3, Hello, epoch);
PCCL_FIELD_AT(kHelloFormat, 4, Hello, connIndex);
PCCL_FIELD_AT(kHelloFormat, 5, Hello, poolSize);
PCCL_SIZE_IS(kHelloFormat, 6, Hello);
PCCL_FIELD_AT(kHelloAckFormat, 0, HelloAck, magic);
PCCL_FIELD_AT(kHelloAckFormat, 1, HelloAck, status);
PCCL_FIELD_AT(kHelloAckFormat, 2, HelloAck, peerId);
PCCL_FIELD_AT(kHelloAckFormat, 3, HelloAck, flags);
PCCL_FIELD_AT(kHelloAckFormat, 4, HelloAck, reserved);
PCCL_FIELD_AT(kHelloAckFormat, 5, HelloAck, nonce);
PCCL_SIZE_IS(kHelloAckFormat, 6, HelloAck);
PCCL_FIELD_AT(kAuthProofFormat, 0, AuthProof, nonce);
PCCL_FIELD_AT(kAuthProofFormat, 1, AuthProof, mac);
PCCL_SIZE_IS(kAuthProofFormat, 2, AuthProof);
PCCL_FIELD_AT(kAuthResultFormat, 0, AuthResult, magic);
PCCL_FIELD_AT(kAuthResultFormat, 1, AuthResult, status);
PCCL_FIELD_AT(kAuthResultFormat, 2, AuthResult, mac);
PCCL_SIZE_IS(kAuthResultFormat, 3, AuthResult);
PCCL_FIELD_AT(kHandshakeTranscriptFormat, 0, HandshakeTranscript, acceptorNonce);
PCCL_FIELD_AT(kHandshakeTranscriptFormat, 1, HandshakeTranscript, connectorNonce);
PCCL_FIELD_AT(kHandshakeTranscriptFormat, 2, HandshakeTranscript, connectorId);
PCCL_FIELD_AT(kHandshakeTranscriptFormat, 3, HandshakeTranscript, acceptorId);
PCCL_FIELD_AT(kHandshakeTranscriptFormat, 4, HandshakeTranscript, epoch);
PCCL_FIELD_AT(kHandshakeTranscriptFormat, 5, HandshakeTranscript, connIndex);
PCCL_FIELD_AT(kHandshakeTranscriptFormat, 6, HandshakeTranscript, poolSize);
PCCL_SIZE_IS(kHandshakeTranscriptFormat, 7, HandshakeTranscript);
PCCL_FIELD_AT(kFrameHeaderFormat, 0, FrameHeader, magic);
PCCL_FIELD_AT(kFrameHeaderFormat, 1, FrameHeader, type);
PCCL_FIELD_AT(kFrameHeaderFormat, 2, FrameHeader, phase);
PCCL_FIELD_AT(kFrameHeaderFormat, 3, FrameHeader, flags);
PCCL_FIELD_AT(kFrameHeaderFormat, 4, FrameHeader, length);
PCCL_FIELD_AT(kFrameHeaderFormat, 5, FrameHeader, digest);
PCCL_FIELD_AT(kFrameHeaderFormat, 6, FrameHeader, epoch);
PCCL_FIELD_AT(kFrameHeaderFormat, 7, FrameHeader, tag);
PCCL_FIELD_AT(kFrameHeaderFormat, 8, FrameHeader, seq);
PCCL_FIELD_AT(kFrameHeaderFormat, 9, FrameHeader, offset);
PCCL_SIZE_IS(kFrameHeaderFormat, 10, FrameHeader);
PCCL_FIELD_AT(kStateRequestFormat, 0, StateRequest, exposure);
PCCL_FIELD_AT(kStateRequestFormat, 1, StateRequest, length);
PCCL_SIZE_IS(kStateRequestFormat, 2, StateRequest);
#undef PCCL_FIELD_AT
#undef PCCL_SIZE_IS

}  // namespace pccl
