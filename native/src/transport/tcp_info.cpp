// TCP_INFO, read with the kernel's own struct (linux/tcp.h): the C library's copy in
// netinet/tcp.h ends before tcpi_min_rtt, and the two headers cannot share a file.
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>

#include "pccl/tcp.hpp"

namespace pccl {

TcpState tcpState(int fd) {
  constexpr uint32_t kInfiniteSsthresh = 0x7fffffff;
  tcp_info info{};
  socklen_t len = sizeof(info);
  TcpState state;
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return state;
  state.rttSeconds = info.tcpi_rtt * 1e-6;
  state.leftSlowStart = info.tcpi_snd_ssthresh < kInfiniteSsthresh;
  // A kernel older than 4.9 fills less of the struct: no minimum then.
  if (len >= offsetof(tcp_info, tcpi_min_rtt) + sizeof(info.tcpi_min_rtt) && info.tcpi_min_rtt != ~0U) {
    state.minRttSeconds = info.tcpi_min_rtt * 1e-6;
  }
  return state;
}

}  // namespace pccl
