#include "transport/shared_ring.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>

#include "pccl/errors.hpp"
#include "pccl/hmac.hpp"

namespace pccl {
namespace {

constexpr size_t kPage = 4096;

// The ring's first page: the token the receiver checks, and the receiver's progress on
// a cache line of its own.
struct RingHeader {
  uint32_t magic;
  uint32_t reserved;
  uint8_t token[kRingTokenBytes];
  alignas(64) std::atomic<uint64_t> tail;  // bytes the receiver has read, ever
};
static_assert(sizeof(RingHeader) <= kPage, "the ring header fits its page");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "the tail is shared between processes");

RingHeader* headerOf(uint8_t* map) { return reinterpret_cast<RingHeader*>(map); }

}  // namespace

SharedRing::SharedRing(int fd, uint8_t* map, size_t mapBytes, size_t capacity)
    : fd_(fd), map_(map), mapBytes_(mapBytes), capacity_(capacity), data_(map + kPage) {}

SharedRing::~SharedRing() {
  if (map_ != nullptr) ::munmap(map_, mapBytes_);
  if (fd_ >= 0) ::close(fd_);
}

std::unique_ptr<SharedRing> SharedRing::create(size_t bytes) {
  const size_t capacity = (std::min(std::max(bytes, kMinRingBytes), kMaxRingBytes) + kPage - 1) & ~(kPage - 1);
  const int fd = ::memfd_create("pccl-ring", MFD_CLOEXEC);
  if (fd < 0) return nullptr;
  const size_t mapBytes = kPage + capacity;
  void* map = MAP_FAILED;
  if (::ftruncate(fd, static_cast<off_t>(mapBytes)) == 0) {
    map = ::mmap(nullptr, mapBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  if (map == MAP_FAILED) {
    ::close(fd);
    return nullptr;
  }
  auto* header = new (map) RingHeader{};
  header->magic = kRingOfferMagic;
  try {
    randomBytes(header->token, kRingTokenBytes);
  } catch (const Error&) {
    ::munmap(map, mapBytes);
    ::close(fd);
    return nullptr;
  }
  header->tail.store(0, std::memory_order_relaxed);
  return std::unique_ptr<SharedRing>(new SharedRing(fd, static_cast<uint8_t*>(map), mapBytes, capacity));
}

std::unique_ptr<SharedRing> SharedRing::attach(const RingOffer& offer) {
  if (offer.magic != kRingOfferMagic || offer.ringBytes < kMinRingBytes || offer.ringBytes > kMaxRingBytes ||
      offer.ringBytes % kPage != 0 || offer.fd < 0) {
    return nullptr;  // malformed
  }
  const std::string path = "/proc/" + std::to_string(offer.pid) + "/fd/" + std::to_string(offer.fd);
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return nullptr;  // another host, pid namespace or user
  const size_t mapBytes = kPage + offer.ringBytes;
  struct stat st{};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || static_cast<size_t>(st.st_size) != mapBytes) {
    ::close(fd);
    return nullptr;  // not a ring of the offered size
  }
  void* map = ::mmap(nullptr, mapBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);  // the mapping keeps the memory
  if (map == MAP_FAILED) return nullptr;
  const RingHeader* header = headerOf(static_cast<uint8_t*>(map));
  if (header->magic != kRingOfferMagic || std::memcmp(header->token, offer.token, kRingTokenBytes) != 0) {
    ::munmap(map, mapBytes);
    return nullptr;  // not the ring offered (the token differs)
  }
  auto ring = std::unique_ptr<SharedRing>(new SharedRing(-1, static_cast<uint8_t*>(map), mapBytes, offer.ringBytes));
  ring->ready_ = true;
  return ring;
}

RingOffer SharedRing::offer() const {
  RingOffer o{};
  o.magic = kRingOfferMagic;
  o.pid = static_cast<uint32_t>(::getpid());
  o.fd = fd_;
  o.ringBytes = capacity_;
  std::memcpy(o.token, headerOf(map_)->token, kRingTokenBytes);
  return o;
}

void SharedRing::accepted() {
  ready_ = true;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

uint64_t SharedRing::placeAt(size_t len) const {
  const uint64_t offset = cursor_ % capacity_;
  return offset + len > capacity_ ? cursor_ + (capacity_ - offset) : cursor_;
}

bool SharedRing::put(const uint8_t* data, size_t len) {
  if (!ready_ || len > capacity_) return false;
  const uint64_t start = placeAt(len);
  const uint64_t tail = headerOf(map_)->tail.load(std::memory_order_acquire);
  // A tail ahead of what was sent, or space the receiver has not freed: no room.
  if (tail > cursor_ || start + len - tail > capacity_) return false;
  std::memcpy(data_ + start % capacity_, data, len);
  cursor_ = start + len;
  return true;  // the header sent next (a system call) orders these bytes before it
}

void SharedRing::take(uint8_t* dst, size_t len) {
  const uint64_t start = placeAt(len);
  if (dst != nullptr) std::memcpy(dst, data_ + start % capacity_, len);
  cursor_ = start + len;
  headerOf(map_)->tail.store(cursor_, std::memory_order_release);
}

}  // namespace pccl
