// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), self-contained so the engine builds
// on machines without OpenSSL headers. Used only by the connection handshake, never on
// the per-byte path. Tested against the RFC 4231 vectors (tests/test_auth.py).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace pccl {

using Digest256 = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t len);
  Digest256 finish();

 private:
  void block(const uint8_t* p);

  uint32_t h_[8];
  uint8_t buf_[64];
  size_t bufLen_ = 0;
  uint64_t totalBytes_ = 0;
};

Digest256 hmacSha256(const std::string& key, const void* data, size_t len);

// Compares in time independent of where the inputs differ.
bool constantTimeEqual(const uint8_t* a, const uint8_t* b, size_t len);

// Fills `out` with bytes from the kernel's CSPRNG (getrandom). Throws Error on failure.
void randomBytes(uint8_t* out, size_t len);

}  // namespace pccl
