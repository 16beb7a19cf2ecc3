// Command-line helpers shared by the example programs (jitpatch-bf, jitpatch-lang).
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace examples {

// The whole file ("-": standard input). False with errno set when it cannot be read.
inline bool read_file(const char* path, std::string* out) {
  std::FILE* f = std::strcmp(path, "-") == 0 ? stdin : std::fopen(path, "rb");
  if (!f) return false;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
  const bool ok = !std::ferror(f);
  if (f != stdin) std::fclose(f);
  return ok;
}

// A decimal count in [1, max]. strtoull alone would take "-1" as a huge value.
inline bool parse_count(const char* s, unsigned long long max, unsigned long long* out) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (errno || end == s || *end || v == 0 || v > max || *s == '-') return false;
  *out = v;
  return true;
}

}  // namespace examples
