// The engine's exception hierarchy: one root, typed subclasses for what callers
// handle differently. I/O failures (PeerLostError) are kept apart from invariant
// violations (PCCL_ENFORCE), which report file:line.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pccl {

constexpr uint64_t kNoPeer = UINT64_MAX;

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A connection to a peer broke (EOF, reset, write error) or could not be made.
class PeerLostError : public Error {
 public:
  PeerLostError(const std::string& what, uint64_t peer) : Error(what), peer_(peer) {}
  uint64_t peer() const { return peer_; }

 private:
  uint64_t peer_;
};

class TimeoutError : public Error {
 public:
  using Error::Error;
};

class AbortedError : public Error {
 public:
  using Error::Error;
};

// A peer sent something that breaks the wire protocol, or the peers of one
// collective disagree on its shape (count, dtype, operator).
class ProtocolError : public Error {
 public:
  ProtocolError(const std::string& what, uint64_t peer = kNoPeer) : Error(what), peer_(peer) {}
  uint64_t peer() const { return peer_; }

 private:
  uint64_t peer_;
};

// A connection handshake failed authentication: the shared secrets differ, or one
// side has a secret and the other has none.
class AuthError : public Error {
 public:
  AuthError(const std::string& what, uint64_t peer = kNoPeer) : Error(what), peer_(peer) {}
  uint64_t peer() const { return peer_; }

 private:
  uint64_t peer_;
};

class InvalidArgument : public Error {
 public:
  using Error::Error;
};

[[noreturn]] void enforceFailed(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace pccl

#define PCCL_ENFORCE(cond, msg)                                     \
  do {                                                              \
    if (!(cond)) ::pccl::enforceFailed(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)
