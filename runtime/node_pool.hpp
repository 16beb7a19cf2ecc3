// A fixed-size node pool for the allocator's and emitter's node-based containers
// (std::map/std::set/std::unordered_set): freed nodes are kept on a free list and reused,
// so steady-state allocate/free in the code heap makes no malloc calls. Not thread-safe:
// each container is used under its owner's mutex.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <vector>

namespace jitpatch::detail {

class NodePool {
 public:
  NodePool() = default;
  NodePool(const NodePool&) = delete;
  NodePool& operator=(const NodePool&) = delete;
  ~NodePool() {
    for (void* c : chunks_) ::operator delete(c);
  }
  void* get(std::size_t size) {
    if (size_ == 0) size_ = size < sizeof(void*) ? sizeof(void*) : (size + alignof(std::max_align_t) - 1) & ~(alignof(std::max_align_t) - 1);
    if (size != 0 && size > size_) return ::operator new(size);  // not a node: bucket arrays etc.
    if (!free_) refill();
    void* n = free_;
    free_ = *static_cast<void**>(free_);
    return n;
  }
  void put(void* p, std::size_t size) {
    if (size > size_) {
      ::operator delete(p);
      return;
    }
    *static_cast<void**>(p) = free_;
    free_ = p;
  }

 private:
  void refill() {
    constexpr std::size_t kPerChunk = 256;
    auto* chunk = static_cast<char*>(::operator new(size_ * kPerChunk));
    chunks_.push_back(chunk);
    for (std::size_t i = 0; i < kPerChunk; ++i) put(chunk + i * size_, size_);
  }
  std::size_t size_ = 0;
  void* free_ = nullptr;
  std::vector<void*> chunks_;
};

// Stateful allocator over a NodePool; single-object allocations come from the pool,
// arrays (hash buckets) from the global heap.
template <class T>
class PoolAllocator {
 public:
  using value_type = T;
  explicit PoolAllocator(NodePool* pool) noexcept : pool_(pool) {}
  template <class U>
  PoolAllocator(const PoolAllocator<U>& o) noexcept : pool_(o.pool_) {}
  T* allocate(std::size_t n) {
    if (n == 1) return static_cast<T*>(pool_->get(sizeof(T)));
    return static_cast<T*>(::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n == 1) pool_->put(p, sizeof(T));
    else ::operator delete(p);
  }
  template <class U>
  bool operator==(const PoolAllocator<U>& o) const noexcept { return pool_ == o.pool_; }
  NodePool* pool_;
};

}  // namespace jitpatch::detail
