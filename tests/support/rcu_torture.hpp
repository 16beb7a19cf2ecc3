// RCU torture shared by the stress and fault tests: readers traverse a linked list that
// writers replace and retire; a retired node is poisoned, then really freed. A reader
// that ever sees poison, or a node whose payload does not match its key, saw memory
// reclaimed under it (under ASan the freed node is a heap-use-after-free report instead).
// No Catch2 assertions inside (not thread-safe): failures come back as counts.
#pragma once

#include <jitpatch/jitpatch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

namespace jitpatch::test {


inline constexpr std::uint64_t kLive = 0x4c4956454c495645ull;    // "LIVELIVE"
inline constexpr std::uint64_t kPoison = 0xdeaddeaddeaddeadull;

struct Node {
  std::uint64_t magic;
  std::uint64_t key;
  std::uint64_t payload[6];  // each = key * (i + 1)
  Node* next;
};

inline Node* make_list(std::uint64_t base, int n) {
  Node* head = nullptr;
  for (int i = n - 1; i >= 0; --i) {
    auto* x = new Node;
    x->magic = kLive;
    x->key = base + static_cast<std::uint64_t>(i);
    for (int k = 0; k < 6; ++k) x->payload[k] = x->key * static_cast<std::uint64_t>(k + 1);
    x->next = head;
    head = x;
  }
  return head;
}

inline void poison_and_free_list(void* p) {
  for (auto* x = static_cast<Node*>(p); x;) {
    Node* n = x->next;
    // Relaxed atomic stores: a reader racing with this is exactly the bug under test, and
    // TSan should report it as such rather than as a plain-store race of this test.
    write_once(x->magic, kPoison);
    for (auto& w : x->payload) write_once(w, kPoison);
    delete x;
    x = n;
  }
}

enum class Mode { asymmetric, symmetric, qsbr };

struct TortureResult {
  long reads = 0, writes = 0, bad = 0, errors = 0;
};

inline TortureResult torture(Runtime& rt, Mode mode, bool use_retire, std::chrono::milliseconds duration) {
  GraceOptions o;
  o.symmetric = mode == Mode::symmetric;
  o.retire_capacity = 64;
  auto dr = GraceDomain::create(rt, o);
  if (!dr.ok()) return {0, 0, 0, 1};
  auto& d = *dr.value();
  Node* head = make_list(1000, 8);
  std::atomic<bool> stop{false};
  std::atomic<long> reads{0}, writes{0}, bad{0};
  // Catch2 assertions are not thread-safe: threads count their failures here instead.
  std::atomic<long> errors{0};

  auto reader_body = [&] {
    auto r = d.register_reader(mode == Mode::qsbr ? ReaderKind::qsbr : ReaderKind::critical_section);
    if (!r.ok()) {
      errors.fetch_add(1);
      return;
    }
    long n = 0, b = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      if (mode != Mode::qsbr) r->lock();
      // Acquire: pairs with the writer's release publication of a fully built list.
      for (Node* x = load_acquire(&head); x; x = x->next) {
        const std::uint64_t m = read_once(x->magic);
        if (m != kLive) ++b;
        for (int k = 0; k < 6; ++k)
          if (read_once(x->payload[k]) != x->key * static_cast<std::uint64_t>(k + 1)) ++b;
      }
      if (mode != Mode::qsbr) r->unlock();
      else r->quiescent();
      ++n;
    }
    if (mode == Mode::qsbr) r->offline();
    reads.fetch_add(n);
    bad.fetch_add(b);
  };
  auto writer_body = [&](std::uint64_t seed) {
    long w = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      Node* fresh = make_list(seed * 100000 + static_cast<std::uint64_t>(w) * 16, 8);
      // Was an acq_rel exchange; the LKMM has no acq_rel RMW, so the fully ordered xchg()
      // (a superset: release publishes the fresh list, acquire orders the poisoning after
      // the other writer's initialization of `old`). x86: the same XCHG; arm64: + DMB ISH.
      Node* old = xchg(&head, fresh);
      if (use_retire) {
        if (!d.retire(old, poison_and_free_list).ok()) errors.fetch_add(1);
      } else {
        if (!d.synchronize().ok()) {
          errors.fetch_add(1);  // no grace period: leak rather than free under readers
          break;
        }
        poison_and_free_list(old);
      }
      ++w;
    }
    writes.fetch_add(w);
  };

  std::vector<std::thread> ts;
  const int readers = 3;
  for (int i = 0; i < readers; ++i) ts.emplace_back(reader_body);
  for (std::uint64_t i = 1; i <= 2; ++i) ts.emplace_back(writer_body, i);
  std::this_thread::sleep_for(duration);
  stop.store(true);
  for (auto& t : ts) t.join();
  const long barrier_failed = d.barrier().ok() ? 0 : 1;
  poison_and_free_list(head);
  return {reads.load(), writes.load(), bad.load(), errors.load() + barrier_failed};
}

}  // namespace jitpatch::test
