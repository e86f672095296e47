#include "pccl/errors.hpp"

#include <sstream>

namespace pccl {

const char* errorKindName(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kNone:
      return "";
    case ErrorKind::kPeerLost:
      return "PeerLost";
    case ErrorKind::kTimeout:
      return "Timeout";
    case ErrorKind::kAborted:
      return "Aborted";
    case ErrorKind::kProtocol:
      return "ProtocolError";
    case ErrorKind::kInvalid:
      return "InvalidArgument";
  }
  return "ProtocolError";
}

ErrorKind errorKindOf(const Error& e) {
  if (dynamic_cast<const PeerLostError*>(&e)) return ErrorKind::kPeerLost;
  if (dynamic_cast<const TimeoutError*>(&e)) return ErrorKind::kTimeout;
  if (dynamic_cast<const AbortedError*>(&e)) return ErrorKind::kAborted;
  if (dynamic_cast<const ProtocolError*>(&e)) return ErrorKind::kProtocol;
  if (dynamic_cast<const InvalidArgument*>(&e)) return ErrorKind::kInvalid;
  return ErrorKind::kProtocol;
}

uint64_t errorPeerOf(const Error& e) {
  if (auto* p = dynamic_cast<const PeerLostError*>(&e)) return p->peer();
  if (auto* p = dynamic_cast<const ProtocolError*>(&e)) return p->peer();
  return kNoPeer;
}

void enforceFailed(const char* expr, const char* file, int line, const std::string& msg) {
  std::ostringstream out;
  out << "invariant violated: " << expr << " at " << file << ":" << line << ": " << msg;
  throw Error(out.str());
}

}  // namespace pccl
