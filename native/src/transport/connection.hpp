// One data-plane connection as the engine's progress thread holds it: the socket, the
// handshake of an incoming one, the frame being read, and the frames queued to send.
// The engine decides where frames go and when a connection closes; this is only the
// stream: writing the queue out (payloads copied, or by reference through a pipe) and
// the frames that end a stream (goodbye, abort).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "pccl/collective.hpp"
#include "pccl/errors.hpp"
#include "pccl/tcp.hpp"
#include "pccl/wire.hpp"
#include "transport/handshake.hpp"
#include "transport/shared_ring.hpp"

namespace pccl {

// Payloads smaller than this are copied: the pipe's two extra system calls don't pay.
constexpr uint32_t kZeroCopyMinBytes = 32u << 10;

// One frame queued to send.
struct SendItem {
  FrameHeader header;
  const uint8_t* data;
  std::shared_ptr<Collective> op;  // null for control frames and state answers
  uint64_t exposure = 0;           // state answers: the exposure `data` points into
  std::shared_ptr<std::string> hold = nullptr;  // owns `data` when the engine made it
  bool splice = false;  // payload sent by reference (vmsplice + splice), not copied
  bool ringDecided = false;  // whether the shared ring was asked to take the payload
  bool inRing = false;       // it took it: only the header goes on the stream

  // A payload the shared ring may carry (kFrameInRing is valid on its types only).
  bool ringCandidate() const { return mayUseRing(header) && header.length >= kRingMinPayload; }
  // Payload bytes that follow the header on the stream.
  uint32_t wireLength() const { return inRing ? 0 : header.length; }
  bool byReference() const { return splice && !inRing; }
};

struct Connection {
  // Where the payload of the frame being read goes.
  enum class Sink { kNone, kOp, kMailbox, kDiscard, kControl };

  Fd fd;
  uint64_t peer = kNoPeer;
  uint64_t epoch = 0;  // the epoch whose pool it belongs to (UINT64_MAX: not tied to one)
  bool outgoing = false;
  bool handshaking = false;
  bool dead = false;
  bool goodbye = false;  // the peer announced an orderly close
  bool paused = false;   // a header waits for room in the mailbox
  // An outgoing connection kept for the pool of `rebindEpoch` (kRebind sent), not in
  // any pool until the peer's kRebound arrives.
  bool rebinding = false;
  uint64_t rebindEpoch = 0;
  // Opened ahead of its epoch (Engine::prepare) and has carried nothing but padding:
  // the peer never had an op with this peer on it, so an epoch that keeps it uses it at
  // once (kRebind goes first on the stream), without waiting for kRebound.
  bool prepared = false;
  bool carried = false;       // a frame other than padding was queued on it
  bool reboundEarly = false;  // kept that way: its kRebound is still to come
  // Warming (Engine::prepare): padding goes out whenever the socket takes more, until
  // `warmUntil`, `warmLeft` bytes, or the first frame of anything else.
  bool warming = false;
  Clock::time_point warmUntil;
  uint64_t warmLeft = 0;
  int lowatBefore = -1;  // TCP_NOTSENT_LOWAT before warming set its own (-1: unknown)
  // State-transfer connections: the state bytes received (kStateData payload, and the
  // padding of a pool warming ahead of a join), and as many as had been at the last
  // Engine::clampStateWindows.
  uint64_t stateRx = 0;
  uint64_t stateRxClamped = 0;
  // A connection of a ring epoch that this peer's fetches went out on (the source's own
  // pool to this peer: Engine::fetchRoute): its loss fails them. clampBefore: its
  // TCP_WINDOW_CLAMP before a fetch bounded it (-1: not bounded), put back when an op
  // of its epoch starts.
  bool fetchRoute = false;
  int clampBefore = -1;
  Clock::time_point handshakeDeadline;
  uint32_t interest = 0;
  HandshakeAcceptor handshake;  // incoming connections, until established

  FrameHeader header{};
  size_t headerGot = 0;
  Sink sink = Sink::kNone;
  std::shared_ptr<Collective> rxOp;
  uint8_t* dst = nullptr;
  std::vector<uint8_t> mail;
  size_t payloadGot = 0;

  std::deque<SendItem> sendq;
  size_t headSent = 0;  // bytes of the head item (header, then payload) already written
  // Zero-copy sends: a payload is vmspliced into this pipe (the pipe then refers to the
  // caller's pages) and spliced from it into the socket. pipeBytes: still in the pipe.
  Fd pipeRead, pipeWrite;
  size_t pipeBytes = 0;
  size_t pipeCapacity = 0;  // what F_SETPIPE_SZ was last asked for (or gave)
  bool dirty = false;       // in the engine's list of connections to flush

  // Same-host shortcut (transport/shared_ring.hpp). txRing: the ring this side sends
  // payloads through (offered; used once the peer's answer says it mapped it); rxRing:
  // the peer's ring this side reads. local: 0 unknown, 1 the peer is on this host, 2 not.
  std::unique_ptr<SharedRing> txRing;
  bool ringOffered = false;
  std::unique_ptr<SharedRing> rxRing;
  uint8_t local = 0;

  // Writes queued frames until the socket is full or the queue is empty. The ops of
  // frames now wholly in the socket are appended to `sent`; bytes sent by reference are
  // added to `zeroCopyBytes`, bytes through the shared ring to `ringBytes`. Returns 0,
  // or the errno that broke the stream.
  int write(std::vector<std::shared_ptr<Collective>>& sent, std::atomic<uint64_t>& zeroCopyBytes,
            std::atomic<uint64_t>& ringBytes);
  // Whether the peer's address is one of this host's (loopback, or this socket's own).
  bool peerIsLocal();
  // Readies the pipe for a payload of `length` bytes sent by reference; false: the
  // kernel gave no pipe, copy it instead.
  bool preparePipe(uint32_t length);
  // Announces an orderly close, unless a frame is queued (then only EOF can follow).
  void sendGoodbye();
  // Tells the peer that this peer failed the op `key`, and why; dropped if a frame is
  // half written. Best effort: the close that follows is the signal that always arrives.
  void sendAbort(const OpKey& key, ErrorKind kind, const std::string& reason);
  // Before closing: if the peer left bytes unread in the kernel, make the close a reset.
  void resetIfUnsent();
};

}  // namespace pccl
