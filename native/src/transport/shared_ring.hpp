// Payloads between two peers on the same host, through shared memory instead of TCP.
//
// Loopback TCP copies every payload twice (into the kernel, out of it) and runs the
// stack in between; a copy into memory both processes map and a copy out of it is
// 2.5x faster on the same cores. The sending side of a connection owns a ring (a
// memfd); the receiving side maps it through /proc/<pid>/fd/<fd>, which only works on
// the same host, in the same pid namespace, for the same user: the offer carries a
// random token the receiver checks in the mapping, so a wrong guess maps nothing.
//
// The headers still travel on the connection, in order; a header flagged
// kFrameInRing has its payload in the ring instead of after it. Both sides place
// payloads by the same rule (next position; wrap to the start when the payload would
// straddle the end), so positions are never sent. The receiver frees space by
// publishing how far it has read (`tail`); a sender that finds no room sends the
// payload on the connection as before, so a slow or paused receiver never blocks it.
// Copying into the ring is the send: the caller's buffer is free afterwards, as after
// a copy into the kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace pccl {

constexpr uint32_t kRingOfferMagic = 0x474e5250;  // "PRNG"
constexpr size_t kRingTokenBytes = 16;
constexpr size_t kMinRingBytes = 64u << 10;
constexpr size_t kMaxRingBytes = 256u << 20;
// Payloads below this go inline: one sendmsg() carries them with their header anyway.
constexpr uint32_t kRingMinPayload = 4096;

// kRingOffer's payload: where the receiver finds the sender's ring.
struct RingOffer {
  uint32_t magic;
  uint32_t pid;  // the sender's process
  int32_t fd;    // its memfd, opened by the receiver as /proc/<pid>/fd/<fd>
  uint32_t reserved;
  uint64_t ringBytes;  // payload capacity (the mapping is one page more)
  uint8_t token[kRingTokenBytes];
};
static_assert(sizeof(RingOffer) == 40, "RingOffer is 40 bytes on the wire");
constexpr char kRingOfferFormat[] = "<IIiIQ16s";

class SharedRing {
 public:
  // The sending side: a fresh ring of `bytes` (rounded to pages). Null when the
  // kernel gives none (no memfd, no memory): the connection then stays on TCP.
  static std::unique_ptr<SharedRing> create(size_t bytes);
  // The receiving side: maps the ring `offer` names. Null when it is
  // not reachable from here (another host or pid namespace, another user) or is not
  // the ring offered (the token differs).
  static std::unique_ptr<SharedRing> attach(const RingOffer& offer);
  ~SharedRing();
  SharedRing(const SharedRing&) = delete;
  SharedRing& operator=(const SharedRing&) = delete;

  RingOffer offer() const;
  // The receiver mapped the ring: the sender's file descriptor is no longer needed.
  void accepted();
  bool ready() const { return ready_; }
  size_t capacity() const { return capacity_; }

  // Sender: copies `len` bytes in at the next position if the receiver left room.
  bool put(const uint8_t* data, size_t len);
  // Receiver: copies the next payload of `len` bytes out (dst null: skips it) and
  // frees its space. The caller checked `len <= capacity()`.
  void take(uint8_t* dst, size_t len);

 private:
  SharedRing(int fd, uint8_t* map, size_t mapBytes, size_t capacity);
  uint64_t placeAt(size_t len) const;  // where the payload after `cursor_` starts

  int fd_ = -1;
  uint8_t* map_ = nullptr;
  size_t mapBytes_ = 0;
  size_t capacity_ = 0;
  uint8_t* data_ = nullptr;
  uint64_t cursor_ = 0;  // the sender's next free position, or the receiver's next unread one
  bool ready_ = false;
};

}  // namespace pccl
