#include "transport/handshake.hpp"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

namespace pccl {

Digest256 handshakeMac(const std::string& secret, HandshakeRole role, const HandshakeTranscript& transcript) {
  std::string msg(role == HandshakeRole::kConnector ? kConnectorLabel : kAcceptorLabel);
  msg.append(reinterpret_cast<const char*>(&transcript), sizeof(transcript));
  return hmacSha256(secret, msg.data(), msg.size());
}

HandshakeTranscript makeTranscript(const Hello& hello, uint64_t acceptorId, const uint8_t* acceptorNonce,
                                   const uint8_t* connectorNonce) {
  HandshakeTranscript t{};
  std::memcpy(t.acceptorNonce, acceptorNonce, kNonceBytes);
  std::memcpy(t.connectorNonce, connectorNonce, kNonceBytes);
  t.connectorId = hello.peerId;
  t.acceptorId = acceptorId;
  t.epoch = hello.epoch;
  t.connIndex = hello.connIndex;
  t.poolSize = hello.poolSize;
  return t;
}

Hello makeHello(uint64_t peerId, uint64_t epoch, uint32_t connIndex, uint32_t poolSize) {
  return Hello{kHelloMagic, kProtocolVersion, peerId, epoch, connIndex, poolSize};
}

// ---------------------------------------------------------------- connector

namespace {

// The connector's answer to the acceptor's challenge, and its check of the acceptor's.
void authenticate(int fd, const PeerAddress& peer, const HelloAck& ack, const Hello& hello, const std::string& secret,
                  Clock::time_point deadline) {
  const std::string who = "peer " + std::to_string(peer.peerId) + " at " + peer.host + ":" + std::to_string(peer.port);
  if (secret.empty()) {
    throw AuthError(who + " requires a shared secret and this peer has none (set PCCL_SECRET)", peer.peerId);
  }
  if (!(ack.flags & kHelloAuth)) {
    throw AuthError(who + " does not authenticate (it has no shared secret); refusing to connect", peer.peerId);
  }
  AuthProof proof{};
  randomBytes(proof.nonce, kNonceBytes);
  const HandshakeTranscript transcript = makeTranscript(hello, peer.peerId, ack.nonce, proof.nonce);
  Digest256 mine = handshakeMac(secret, HandshakeRole::kConnector, transcript);
  std::memcpy(proof.mac, mine.data(), kMacBytes);
  sendExact(fd, &proof, sizeof(proof), deadline, peer.peerId);
  AuthResult result{};
  recvExact(fd, &result, sizeof(result), deadline, peer.peerId);
  if (result.magic != kHelloMagic) throw ProtocolError(who + " sent a malformed authentication result", peer.peerId);
  if (result.status != static_cast<uint32_t>(HelloStatus::kOk)) {
    throw AuthError(who + " refused the connection: authentication failed (the shared secrets differ)", peer.peerId);
  }
  Digest256 theirs = handshakeMac(secret, HandshakeRole::kAcceptor, transcript);
  if (!constantTimeEqual(theirs.data(), result.mac, kMacBytes)) {
    throw AuthError(who + " failed to prove the shared secret", peer.peerId);
  }
}

}  // namespace

void connectHandshake(int fd, const PeerAddress& peer, const Hello& hello, const std::string& secret,
                      Clock::time_point deadline) {
  sendExact(fd, &hello, sizeof(hello), deadline, peer.peerId);
  HelloAck ack{};
  recvExact(fd, &ack, sizeof(ack), deadline, peer.peerId);
  if (ack.magic != kHelloMagic) throw ProtocolError("peer at " + peer.host + " did not answer the handshake", peer.peerId);
  if (ack.status != static_cast<uint32_t>(HelloStatus::kOk)) {
    throw ProtocolError("peer " + std::to_string(peer.peerId) + " refused the connection (status " +
                            std::to_string(ack.status) + ", protocol version " + std::to_string(kProtocolVersion) + ")",
                        peer.peerId);
  }
  if (ack.peerId != peer.peerId) {
    throw ProtocolError("the peer at " + peer.host + ":" + std::to_string(peer.port) + " is peer " +
                            std::to_string(ack.peerId) + ", expected " + std::to_string(peer.peerId),
                        peer.peerId);
  }
  if ((ack.flags & kHelloAuth) || !secret.empty()) authenticate(fd, peer, ack, hello, secret, deadline);
}

// ---------------------------------------------------------------- acceptor

HandshakeAcceptor::Progress HandshakeAcceptor::fail(ErrorKind kind, const char* why) {
  failureKind_ = kind;
  failure_ = why;
  return Progress::kFailed;
}

HandshakeAcceptor::Progress HandshakeAcceptor::read(int fd, uint64_t selfId, const std::string& secret) {
  return awaitingProof_ ? readProof(fd, selfId, secret) : readHello(fd, selfId, secret);
}

HandshakeAcceptor::Progress HandshakeAcceptor::readHello(int fd, uint64_t selfId, const std::string& secret) {
  auto* dst = reinterpret_cast<uint8_t*>(&hello_);
  ssize_t n = ::recv(fd, dst + helloGot_, sizeof(Hello) - helloGot_, 0);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return fail(ErrorKind::kPeerLost, "handshake aborted");
  if (n < 0) return Progress::kBlocked;
  helloGot_ += static_cast<size_t>(n);
  if (helloGot_ < sizeof(Hello)) return Progress::kMore;
  HelloAck ack{kHelloMagic, static_cast<uint32_t>(HelloStatus::kOk), selfId, 0, 0, {}};
  bool ok = true;
  if (hello_.magic != kHelloMagic) {
    ack.status = static_cast<uint32_t>(HelloStatus::kBadMagic);
    ok = false;
  } else if (hello_.version != kProtocolVersion) {
    ack.status = static_cast<uint32_t>(HelloStatus::kBadVersion);
    ok = false;
  }
  const bool challenge = ok && !secret.empty();
  if (challenge) {
    try {
      randomBytes(nonce_, kNonceBytes);
    } catch (const Error&) {
      return fail(ErrorKind::kProtocol, "no randomness for the handshake");
    }
    ack.flags = kHelloAuth;
    std::memcpy(ack.nonce, nonce_, kNonceBytes);
  }
  ssize_t w = ::send(fd, &ack, sizeof(ack), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (!ok || w != static_cast<ssize_t>(sizeof(ack))) return fail(ErrorKind::kProtocol, "handshake refused");
  if (challenge) {
    awaitingProof_ = true;  // established once the proof checks out
    return Progress::kMore;
  }
  return Progress::kDone;
}

HandshakeAcceptor::Progress HandshakeAcceptor::readProof(int fd, uint64_t selfId, const std::string& secret) {
  auto* dst = reinterpret_cast<uint8_t*>(&proof_);
  ssize_t n = ::recv(fd, dst + proofGot_, sizeof(AuthProof) - proofGot_, 0);
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return fail(ErrorKind::kPeerLost, "handshake aborted");
  if (n < 0) return Progress::kBlocked;
  proofGot_ += static_cast<size_t>(n);
  if (proofGot_ < sizeof(AuthProof)) return Progress::kMore;
  const HandshakeTranscript transcript = makeTranscript(hello_, selfId, nonce_, proof_.nonce);
  Digest256 expected = handshakeMac(secret, HandshakeRole::kConnector, transcript);
  AuthResult result{kHelloMagic, static_cast<uint32_t>(HelloStatus::kOk), {}};
  const bool ok = constantTimeEqual(expected.data(), proof_.mac, kMacBytes);
  if (ok) {
    Digest256 mine = handshakeMac(secret, HandshakeRole::kAcceptor, transcript);
    std::memcpy(result.mac, mine.data(), kMacBytes);
  } else {
    result.status = static_cast<uint32_t>(HelloStatus::kAuthFailed);
  }
  ssize_t w = ::send(fd, &result, sizeof(result), MSG_NOSIGNAL | MSG_DONTWAIT);
  // Established connections are untouched: only this one closes.
  if (!ok || w != static_cast<ssize_t>(sizeof(result))) return fail(ErrorKind::kProtocol, "authentication failed");
  awaitingProof_ = false;
  return Progress::kDone;
}

}  // namespace pccl
