// Smallest real use of an installed jitpatch: create the runtime, run one barrier.
#include <jitpatch/jitpatch.hpp>

#include <cstdio>

int main() {
  auto rt = jitpatch::Runtime::create();
  if (!rt.ok()) {
    std::fprintf(stderr, "consumer: create: %s\n", rt.status().message().c_str());
    return 1;
  }
  jitpatch::Status s = (*rt)->process_barrier();
  if (!s.ok()) {
    std::fprintf(stderr, "consumer: process_barrier: %s\n", s.message().c_str());
    return 1;
  }
  std::puts("consumer: ok");
  return 0;
}
