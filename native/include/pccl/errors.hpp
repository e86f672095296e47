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

// Why an op failed. The values travel in kAbort frames (FrameHeader::phase) and so
// never change. errorKindName() is each kind's stable name: the pccl_py error class the
// binding raises for it, and its pccl_py FailureKind value ("" for kNone).
enum class ErrorKind : uint8_t { kNone = 0, kPeerLost = 1, kTimeout = 2, kAborted = 3, kProtocol = 4, kInvalid = 5 };
constexpr ErrorKind kLastErrorKind = ErrorKind::kInvalid;

const char* errorKindName(ErrorKind kind);
// The kind of a caught error (kProtocol for one of no typed kind) and the peer it names.
ErrorKind errorKindOf(const Error& e);
uint64_t errorPeerOf(const Error& e);

[[noreturn]] void enforceFailed(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace pccl

#define PCCL_ENFORCE(cond, msg)                                     \
  do {                                                              \
    if (!(cond)) ::pccl::enforceFailed(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)
