#include "transport/connection.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace pccl {
namespace {

constexpr size_t kMaxIov = 64;
constexpr size_t kPipeMaxBytes = 1u << 20;  // the default fs.pipe-max-size

}  // namespace

int Connection::write(std::vector<std::shared_ptr<Collective>>& sent, std::atomic<uint64_t>& zeroCopyBytes,
                      std::atomic<uint64_t>& ringBytes) {
  const size_t hdr = sizeof(FrameHeader);
  // A frame about to start: its payload goes into the shared ring if the ring is up and
  // has room. Decided once per frame, in queue order, so the ring holds payloads in the
  // order their headers go out (the receiver finds them by that order alone).
  auto intoRing = [&](SendItem& item) {
    if (item.ringDecided) return;
    item.ringDecided = true;
    if (!txRing || !item.ringCandidate()) return;
    if (!txRing->put(item.data, item.header.length)) return;
    item.inRing = true;
    item.header.flags |= kFrameInRing;
    ringBytes.fetch_add(item.header.length, std::memory_order_relaxed);
  };
  // Completes the head item once all of it is in the socket (its spliced payload too).
  auto completeHead = [&] {
    SendItem& head = sendq.front();
    if (head.op) {
      head.op->onSent(head.header.length);
      sent.push_back(std::move(head.op));
    }
    sendq.pop_front();
    headSent = 0;
  };
  while (!sendq.empty()) {
    SendItem& front = sendq.front();
    // A payload handed to the kernel by reference (vmsplice) leaves the pipe first.
    if (pipeBytes > 0) {
      // SPLICE_F_MORE holds a partial TCP segment back for the bytes that follow: only
      // when some do, or the frame's tail would wait for the next send.
      const bool more = headSent < hdr + front.header.length || sendq.size() > 1;
      ssize_t n = ::splice(pipeRead.get(), nullptr, fd.get(), nullptr, pipeBytes,
                           SPLICE_F_NONBLOCK | SPLICE_F_MOVE | (more ? SPLICE_F_MORE : 0u));
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        return errno;
      }
      pipeBytes -= static_cast<size_t>(n);
      if (pipeBytes == 0 && headSent == hdr + front.wireLength()) completeHead();
      continue;
    }
    if (front.byReference() && headSent >= hdr) {
      const size_t off = headSent - hdr;
      iovec v{const_cast<uint8_t*>(front.data) + off, front.header.length - off};
      ssize_t n = ::vmsplice(pipeWrite.get(), &v, 1, SPLICE_F_NONBLOCK);
      if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
        return n < 0 ? errno : EPIPE;
      }
      headSent += static_cast<size_t>(n);
      pipeBytes = static_cast<size_t>(n);
      zeroCopyBytes.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
      continue;
    }
    iovec iov[kMaxIov];
    size_t iovCount = 0;
    size_t skip = headSent;
    bool more = false;
    for (auto it = sendq.begin(); it != sendq.end() && iovCount + 2 <= kMaxIov; ++it) {
      if (skip < hdr) {
        if (skip == 0) intoRing(*it);
        iov[iovCount++] = iovec{reinterpret_cast<uint8_t*>(&it->header) + skip, hdr - skip};
        skip = 0;
      } else {
        skip -= hdr;
      }
      if (it->byReference()) {  // its payload goes by reference, after this write
        more = true;
        break;
      }
      if (it->wireLength() > skip) {
        iov[iovCount++] = iovec{const_cast<uint8_t*>(it->data) + skip, it->wireLength() - skip};
      }
      skip = 0;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = iovCount;
    ssize_t n = ::sendmsg(fd.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT | (more ? MSG_MORE : 0));
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      return errno;
    }
    size_t written = static_cast<size_t>(n);
    while (written > 0 && !sendq.empty()) {
      SendItem& head = sendq.front();
      const size_t total = hdr + head.wireLength();
      const size_t limit = head.byReference() ? hdr : total;
      const size_t take = std::min(written, limit - headSent);
      headSent += take;
      written -= take;
      if (headSent == total) completeHead();
      else break;
    }
  }
  return 0;
}

// Zero-copy send: the payload is vmspliced into the connection's pipe (the pipe then
// refers to the caller's pages) and spliced into the socket, so the kernel copies it
// once, into the receiver, instead of twice. The catch: a byte changed after the frame
// was queued but before the receiver read it arrives changed. Only ops that say this
// cannot matter (Collective::sendsByReference) go this way (the engine decides), and
// only payloads large enough for the pipe's two extra system calls to pay.
bool Connection::preparePipe(uint32_t length) {
  if (!pipeWrite.valid()) {
    int p[2];
    if (::pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) return false;  // copy instead
    pipeRead.reset(p[0]);
    pipeWrite.reset(p[1]);
  }
  // Room for a whole segment (plus the pages an unaligned one straddles); the kernel
  // may refuse (pipe-max-size, the user's pipe quota), and then it goes in pieces.
  const size_t want = std::min<size_t>(kPipeMaxBytes, (length + (8u << 10) + 4095) & ~size_t(4095));
  if (pipeCapacity < want) {
    const int got = ::fcntl(pipeWrite.get(), F_SETPIPE_SZ, static_cast<int>(want));
    pipeCapacity = got > 0 ? static_cast<size_t>(got) : want;  // refused: don't ask again per frame
  }
  return true;
}

bool Connection::peerIsLocal() {
  if (local == 0) {
    sockaddr_storage self{};
    sockaddr_storage peer{};
    socklen_t selfLen = sizeof(self);
    socklen_t peerLen = sizeof(peer);
    bool yes = false;
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&self), &selfLen) == 0 &&
        ::getpeername(fd.get(), reinterpret_cast<sockaddr*>(&peer), &peerLen) == 0 && self.ss_family == peer.ss_family) {
      if (peer.ss_family == AF_INET) {
        const in_addr a = reinterpret_cast<const sockaddr_in*>(&peer)->sin_addr;
        const in_addr b = reinterpret_cast<const sockaddr_in*>(&self)->sin_addr;
        yes = (ntohl(a.s_addr) >> 24) == 127 || a.s_addr == b.s_addr;
      } else if (peer.ss_family == AF_INET6) {
        const in6_addr& a = reinterpret_cast<const sockaddr_in6*>(&peer)->sin6_addr;
        const in6_addr& b = reinterpret_cast<const sockaddr_in6*>(&self)->sin6_addr;
        yes = IN6_IS_ADDR_LOOPBACK(&a) || std::memcmp(&a, &b, sizeof(a)) == 0 ||
              (IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127);
      }
    }
    local = yes ? 1 : 2;
  }
  return local == 1;
}

void Connection::sendGoodbye() {
  if (!sendq.empty()) return;  // mid-frame: a bare EOF is all the peer can get
  FrameHeader bye = makeHeader(FrameType::kGoodbye, OpKey{});
  ssize_t w = ::send(fd.get(), &bye, sizeof(bye), MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)w;
}

void Connection::sendAbort(const OpKey& key, ErrorKind kind, const std::string& reason) {
  if (headSent != 0) return;  // a frame is half on the wire: only EOF can follow
  sendq.clear();
  std::string text = reason.substr(0, kMaxAbortReason);
  FrameHeader h = makeHeader(FrameType::kAbort, key, static_cast<uint32_t>(text.size()), /*digest=*/0,
                             /*offset=*/0, /*phase=*/static_cast<uint8_t>(kind));
  iovec iov[2] = {{&h, sizeof(h)}, {text.data(), text.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  ssize_t w = ::sendmsg(fd.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)w;  // best effort: the close that follows is the signal that always arrives
}

// Bytes still unsent in the kernel (the peer stopped reading: a paused stream, a full
// window) would hold our FIN back forever: reset instead, so the peer learns at once.
// With nothing pending, a normal close delivers what was sent, then FIN.
void Connection::resetIfUnsent() {
  int unsent = 0;
  if (::ioctl(fd.get(), SIOCOUTQNSD, &unsent) == 0 && unsent > 0) {
    linger hard{1, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &hard, sizeof(hard));
  }
}

}  // namespace pccl
