// /proc/self/maps readers for the W^X checks.
#pragma once

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace jitpatch::test {

struct Mapping {
  unsigned long begin = 0, end = 0;
  std::string perms;  // e.g. "r-xs"
  std::string path;
};

inline std::vector<Mapping> read_maps() {
  std::vector<Mapping> out;
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (!f) return out;
  char line[4096];
  while (std::fgets(line, sizeof line, f)) {
    Mapping m;
    char perms[8] = {};
    int path_at = 0;
    if (std::sscanf(line, "%lx-%lx %7s %*s %*s %*s %n", &m.begin, &m.end, perms, &path_at) < 3) continue;
    m.perms = perms;
    if (path_at > 0) {
      m.path = line + path_at;
      while (!m.path.empty() && (m.path.back() == '\n' || m.path.back() == ' ')) m.path.pop_back();
    }
    out.push_back(m);
  }
  std::fclose(f);
  return out;
}

// Every mapping that is writable and executable at once, as text ("" = none).
inline std::string writable_and_executable() {
  std::string bad;
  for (const Mapping& m : read_maps())
    if (m.perms.size() >= 3 && m.perms[1] == 'w' && m.perms[2] == 'x') {
      char buf[128];
      std::snprintf(buf, sizeof buf, "%lx-%lx %s ", m.begin, m.end, m.perms.c_str());
      bad += buf + m.path + "\n";
    }
  return bad;
}

// The permissions of the mapping containing `addr` ("" if unmapped).
inline std::string perms_at(const void* addr) {
  const auto a = reinterpret_cast<unsigned long>(addr);
  for (const Mapping& m : read_maps())
    if (a >= m.begin && a < m.end) return m.perms;
  return "";
}

}  // namespace jitpatch::test
