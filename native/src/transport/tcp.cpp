#include "pccl/tcp.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "pccl/errors.hpp"

namespace pccl {
namespace {

std::string errnoText(int err) { return std::strerror(err); }

int remainingMs(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left < 0 ? 0 : static_cast<int>(left);
}

sockaddr_storage resolve(const std::string& host, uint16_t port, socklen_t* len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* result = nullptr;
  std::string service = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &result);
  if (rc != 0 || result == nullptr) {
    throw InvalidArgument("cannot resolve '" + host + "': " + gai_strerror(rc));
  }
  sockaddr_storage addr{};
  std::memcpy(&addr, result->ai_addr, result->ai_addrlen);
  *len = result->ai_addrlen;
  freeaddrinfo(result);
  return addr;
}

// Waits for `events` on fd until the deadline. Returns false on timeout.
bool waitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, remainingMs(deadline));
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) return false;
  }
}

}  // namespace

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

int Fd::release() {
  int fd = fd_;
  fd_ = -1;
  return fd;
}

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Fd listenTcp(const std::string& host, uint16_t port, int backlog) {
  socklen_t len = 0;
  sockaddr_storage addr = resolve(host, port, &len);
  Fd fd(::socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) throw Error("socket(): " + errnoText(errno));
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    throw Error("bind(" + host + ":" + std::to_string(port) + "): " + errnoText(errno));
  }
  if (::listen(fd.get(), backlog) != 0) throw Error("listen(): " + errnoText(errno));
  setNonBlocking(fd.get(), true);
  return fd;
}

uint16_t localPort(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw Error("getsockname(): " + errnoText(errno));
  }
  if (addr.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
}

Fd connectTcp(const std::string& host, uint16_t port, Clock::time_point deadline, uint64_t peer) {
  socklen_t len = 0;
  sockaddr_storage addr = resolve(host, port, &len);
  const std::string where = host + ":" + std::to_string(port);
  // A peer's listener is bound before it registers, so a refused connection means the
  // peer is gone: fail at once (only EINTR-like hiccups are retried).
  for (;;) {
    Fd fd(::socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) throw Error("socket(): " + errnoText(errno));
    setNonBlocking(fd.get(), true);
    int rc = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), len);
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      if (!waitFor(fd.get(), POLLOUT, deadline)) {
        throw TimeoutError("connect to peer " + std::to_string(peer) + " at " + where + " timed out");
      }
      socklen_t errLen = sizeof(err);
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &errLen);
    }
    if (err == 0) {
      setNonBlocking(fd.get(), false);
      return fd;
    }
    if (Clock::now() >= deadline || err != EAGAIN) {
      throw PeerLostError("connect to peer " + std::to_string(peer) + " at " + where + ": " +
                              errnoText(err),
                          peer);
    }
    ::usleep(20000);
  }
}

void setNonBlocking(int fd, bool on) {
  int flags = ::fcntl(fd, F_GETFL, 0);
  flags = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  ::fcntl(fd, F_SETFL, flags);
}

// Linux >= 6.15 caps a socket's retransmission timeout (TCP_RTO_MAX_MS; the libc
// headers here may predate it). Without the cap, a link that was silent for a few
// seconds stays silent for up to twice as long after it heals: exponential backoff
// leaves the next retransmission seconds away. An older kernel refuses the option and
// keeps its own cap (120 s), which only costs time after an outage.
#ifndef TCP_RTO_MAX_MS
#define TCP_RTO_MAX_MS 44
#endif
constexpr int kRtoMaxMs = 1000;  // the smallest value the kernel accepts

namespace {

// The `index`-th number of a /proc/sys file (0 when it cannot be read).
long readSysctl(const char* path, int index) {
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return 0;
  long value = 0;
  for (int i = 0; i <= index; ++i) {
    if (std::fscanf(f, "%ld", &value) != 1) {
      value = 0;
      break;
    }
  }
  std::fclose(f);
  return value;
}

// With no size asked for, a buffer is left to autotuning, which grows it up to
// tcp_wmem/tcp_rmem's maximum (per network namespace; the kernel's default send maximum
// is 4 MiB: about 330 Mbit/s through one connection at 100 ms). An explicit size may
// reach twice net.core.wmem_max/rmem_max instead: where that is larger, ask for it.
// Returns the largest buffer the socket can have (the kernel's figure).
size_t raiseToExplicitCap(int fd, int option, const char* autoMaxPath, const char* explicitMaxPath) {
  const long autoMax = readSysctl(autoMaxPath, 2);
  const long explicitMax = readSysctl(explicitMaxPath, 0);
  if (explicitMax <= 0 || 2 * explicitMax <= autoMax || explicitMax > INT32_MAX) {
    return static_cast<size_t>(std::max<long>(autoMax, 0));
  }
  int size = static_cast<int>(explicitMax);  // the kernel doubles it (bookkeeping overhead)
  ::setsockopt(fd, SOL_SOCKET, option, &size, sizeof(size));
  return static_cast<size_t>(2 * explicitMax);
}

struct BufferCaps {
  size_t send = 0;
  size_t recv = 0;
};

// Sets the buffers; returns the largest each can grow to where the kernel's limits say
// (autotuning or the explicit cap), zero where an explicit size was set (read it back).
BufferCaps tuneBuffers(int fd, const SocketOptions& options) {
  if (options.bufferBytes > 0) {
    int size = options.bufferBytes;
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    return BufferCaps{};
  }
  return BufferCaps{
      raiseToExplicitCap(fd, SO_SNDBUF, "/proc/sys/net/ipv4/tcp_wmem", "/proc/sys/net/core/wmem_max"),
      raiseToExplicitCap(fd, SO_RCVBUF, "/proc/sys/net/ipv4/tcp_rmem", "/proc/sys/net/core/rmem_max")};
}

// Asks for the congestion control; returns 0 or the errno of the refusal.
int setCongestionControl(int fd, const std::string& name) {
  if (name.empty()) return 0;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name.data(), static_cast<socklen_t>(name.size())) == 0) {
    return 0;
  }
  return errno;
}

std::string congestionControlOf(int fd) {
  char name[32] = {};
  socklen_t len = sizeof(name) - 1;
  if (::getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name, &len) != 0) return "";
  return std::string(name, ::strnlen(name, len));
}

}  // namespace

// Called once a connection is established (connected or accepted): a route's congctl
// is applied at connect() over a congestion control asked for before it.
void tuneSocket(int fd, const SocketOptions& options) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  int rtoMax = kRtoMaxMs;
  ::setsockopt(fd, IPPROTO_TCP, TCP_RTO_MAX_MS, &rtoMax, sizeof(rtoMax));
  setCongestionControl(fd, options.congestionControl);
  tuneBuffers(fd, options);
}

TransportFacts probeTransport(const SocketOptions& options) {
  TransportFacts facts;
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) throw Error("socket(): " + errnoText(errno));
  const int refused = setCongestionControl(fd.get(), options.congestionControl);
  facts.congestionControl = congestionControlOf(fd.get());
  if (refused == EPERM) {
    facts.congestionNote = options.congestionControl + " is not allowed to this process (add it to "
                           "net.ipv4.tcp_allowed_congestion_control, or run with CAP_NET_ADMIN)";
  } else if (refused == ENOENT) {
    facts.congestionNote = options.congestionControl + " is not available on this host (modprobe tcp_" +
                           options.congestionControl + ")";
  } else if (refused != 0) {
    facts.congestionNote = options.congestionControl + " was refused: " + errnoText(refused);
  }
  const BufferCaps caps = tuneBuffers(fd.get(), options);
  facts.sendBufferMax = caps.send;
  facts.recvBufferMax = caps.recv;
  if (options.bufferBytes > 0) {  // the kernel's figure for the size asked (doubled, capped)
    int got = 0;
    socklen_t len = sizeof(got);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &got, &len) == 0 && got > 0) facts.sendBufferMax = got;
    len = sizeof(got);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &got, &len) == 0 && got > 0) facts.recvBufferMax = got;
  }
  return facts;
}

void sendExact(int fd, const void* data, size_t len, Clock::time_point deadline, uint64_t peer) {
  auto* p = static_cast<const char*>(data);
  while (len > 0) {
    if (!waitFor(fd, POLLOUT, deadline)) {
      throw TimeoutError("handshake with peer " + std::to_string(peer) + " timed out");
    }
    ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) throw PeerLostError("send to peer " + std::to_string(peer) + ": " + errnoText(errno), peer);
    p += n;
    len -= static_cast<size_t>(n);
  }
}

void recvExact(int fd, void* data, size_t len, Clock::time_point deadline, uint64_t peer) {
  auto* p = static_cast<char*>(data);
  while (len > 0) {
    if (!waitFor(fd, POLLIN, deadline)) {
      throw TimeoutError("handshake with peer " + std::to_string(peer) + " timed out");
    }
    ssize_t n = ::recv(fd, p, len, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n == 0) throw PeerLostError("peer " + std::to_string(peer) + " closed the connection", peer);
    if (n < 0) throw PeerLostError("recv from peer " + std::to_string(peer) + ": " + errnoText(errno), peer);
    p += n;
    len -= static_cast<size_t>(n);
  }
}

}  // namespace pccl
