// The data-plane handshake (wire.hpp), both sides over one codec: the Hello the
// connector sends, the HelloAck the acceptor answers with, and the MAC each side
// proves the shared secret with. The connector runs it blocking on the caller's thread
// (Engine::ensureConnected); the acceptor runs it without blocking on the progress
// thread, a piece each time the socket is readable. pccl_py/wire/auth.py speaks the
// connector side too; the binding exports the layouts it is checked against.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "pccl/errors.hpp"
#include "pccl/hmac.hpp"
#include "pccl/tcp.hpp"
#include "pccl/wire.hpp"

namespace pccl {

enum class HandshakeRole { kConnector, kAcceptor };

// HMAC-SHA256(secret, label of `role` || transcript): the proof `role` sends.
Digest256 handshakeMac(const std::string& secret, HandshakeRole role, const HandshakeTranscript& transcript);

// The transcript of the handshake that opened with `hello`, answered by `acceptorId`.
HandshakeTranscript makeTranscript(const Hello& hello, uint64_t acceptorId, const uint8_t* acceptorNonce,
                                   const uint8_t* connectorNonce);

Hello makeHello(uint64_t peerId, uint64_t epoch, uint32_t connIndex, uint32_t poolSize);

// The connector's side, blocking until `deadline`: sends `hello` to `peer` (its socket
// `fd`), checks that the answer comes from that peer, and proves the secret when either
// side has one (an empty `secret`: none). Throws PeerLostError, TimeoutError,
// ProtocolError or AuthError; the caller closes the socket.
void connectHandshake(int fd, const PeerAddress& peer, const Hello& hello, const std::string& secret,
                      Clock::time_point deadline);

// The acceptor's side of one incoming connection, non-blocking: read() takes what the
// socket holds and answers once a message is whole. The caller closes the connection
// when it fails, and gives up on it at its handshake deadline.
class HandshakeAcceptor {
 public:
  enum class Progress {
    kBlocked,  // nothing more to read now
    kMore,     // read part of a message: call again
    kDone,     // established: hello() says who connected
    kFailed,   // refused or broken: failureKind(), failure()
  };

  // `selfId`: this peer's id; `secret`: challenge the connector when not empty.
  Progress read(int fd, uint64_t selfId, const std::string& secret);
  const Hello& hello() const { return hello_; }
  ErrorKind failureKind() const { return failureKind_; }
  const char* failure() const { return failure_; }

 private:
  Progress readHello(int fd, uint64_t selfId, const std::string& secret);
  Progress readProof(int fd, uint64_t selfId, const std::string& secret);
  Progress fail(ErrorKind kind, const char* why);

  Hello hello_{};
  size_t helloGot_ = 0;
  bool awaitingProof_ = false;     // HelloAck sent with a challenge; AuthProof expected
  uint8_t nonce_[kNonceBytes]{};   // the challenge sent
  AuthProof proof_{};
  size_t proofGot_ = 0;
  ErrorKind failureKind_ = ErrorKind::kNone;
  const char* failure_ = "";
};

}  // namespace pccl
