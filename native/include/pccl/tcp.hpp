// Small helpers over POSIX TCP sockets. Every blocking helper takes a deadline.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace pccl {

using Clock = std::chrono::steady_clock;

// Where a peer's engine listens.
struct PeerAddress {
  uint64_t peerId = 0;
  std::string host;
  uint16_t port = 0;
};

struct SocketOptions {
  int bufferBytes = 0;  // SO_SNDBUF/SO_RCVBUF; 0 keeps the kernel's autotuning
  // TCP_CONGESTION of every data connection ("bbr"); empty keeps the host's default.
  // A host that does not offer it (no module, or not allowed to this process) keeps
  // its default: see TransportFacts.
  std::string congestionControl;
};

// What the data connections get from this host: the congestion control in use, why
// it is not the one asked for (empty when it is), and the largest send and receive
// buffers a connection can have (the kernel's figures, which count its bookkeeping:
// about two thirds carry payload).
struct TransportFacts {
  std::string congestionControl;
  std::string congestionNote;
  size_t sendBufferMax = 0;
  size_t recvBufferMax = 0;
};
TransportFacts probeTransport(const SocketOptions& options);

// Owns a file descriptor; closes it on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept;
  ~Fd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release();
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Binds and listens; port 0 picks a free port. Returns the socket (non-blocking).
Fd listenTcp(const std::string& host, uint16_t port, int backlog);
uint16_t localPort(int fd);

// Connects with a deadline; the returned socket is blocking. Throws PeerLostError.
Fd connectTcp(const std::string& host, uint16_t port, Clock::time_point deadline, uint64_t peer);

void setNonBlocking(int fd, bool on);
// The kernel's view of a connection (TCP_INFO): its smoothed round trip and the
// smallest it has seen (0 without a sample, or for a socket that is not TCP), and
// whether its congestion control has left slow start (BBR: its startup; Linux keeps no
// slow-start threshold across connections by default, tcp_no_ssthresh_metrics_save).
struct TcpState {
  double rttSeconds = 0;
  double minRttSeconds = 0;
  bool leftSlowStart = false;
};
TcpState tcpState(int fd);
void tuneSocket(int fd, const SocketOptions& options);

// Blocking exact-length I/O with a deadline, for handshakes. Throw PeerLostError /
// TimeoutError.
void sendExact(int fd, const void* data, size_t len, Clock::time_point deadline, uint64_t peer);
void recvExact(int fd, void* data, size_t len, Clock::time_point deadline, uint64_t peer);

}  // namespace pccl
