// CodeVisibility: the perf map, jitdump and GDB JIT interface sinks, read back the way
// the tools read them (tiny parsers here, written from the format documents, not from
// the library's own structs).
#include <catch2/catch.hpp>

#include "support/env.hpp"

#include <jitpatch/visibility.hpp>

#include <elf.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
// GCC 12 reports a false -Wmaybe-uninitialized inside <regex> at -O1 with sanitizers
// (GCC bug 105562); the warning is in libstdc++, not here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace jitpatch;

// The GDB JIT interface as gdb sees it: by symbol name, with the layout from the gdb
// manual ("JIT Declarations"), declared independently of the library's definition.
namespace vis_test {
struct jit_code_entry {
  jit_code_entry* next_entry;
  jit_code_entry* prev_entry;
  const char* symfile_addr;
  std::uint64_t symfile_size;
};
struct jit_descriptor {
  std::uint32_t version;
  std::uint32_t action_flag;
  jit_code_entry* relevant_entry;
  jit_code_entry* first_entry;
};
}  // namespace vis_test
extern "C" vis_test::jit_descriptor __jit_debug_descriptor;

namespace {

#if defined(__x86_64__)
constexpr std::uint16_t kMachine = EM_X86_64;
#elif defined(__aarch64__)
constexpr std::uint16_t kMachine = EM_AARCH64;
#endif

// Executable code for the tests, made W^X: written while RW, then RX, never both.
// The bytes are a pattern (never executed) so the jitdump copy can be compared.
class TestCode {
 public:
  explicit TestCode(std::size_t bytes = 4096) : len_(round_up(bytes)) {
    void* p = ::mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    base_ = static_cast<unsigned char*>(p);
    for (std::size_t i = 0; i < len_; ++i) base_[i] = static_cast<unsigned char>(i * 7 + 3);
    REQUIRE(::mprotect(base_, len_, PROT_READ | PROT_EXEC) == 0);
  }
  ~TestCode() { ::munmap(base_, len_); }
  TestCode(const TestCode&) = delete;
  TestCode& operator=(const TestCode&) = delete;
  unsigned char* at(std::size_t off) const { return base_ + off; }

 private:
  static std::size_t round_up(std::size_t n) {
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
  }
  unsigned char* base_ = nullptr;
  std::size_t len_ = 0;
};

using test::EnvGuard;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/jitpatch-visibility-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

CodeVisibility::Options only(bool perf_map, bool jitdump, bool gdb, std::string dir = ".") {
  CodeVisibility::Options o;
  o.perf_map = perf_map;
  o.jitdump = jitdump;
  o.gdb = gdb;
  o.jitdump_dir = std::move(dir);
  o.use_environment = false;  // the tests say exactly what they enable
  return o;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// --- perf map ---------------------------------------------------------------------------
struct MapLine {
  std::uintptr_t start;
  std::size_t size;
  std::string name;
};

// Lines of the perf map whose name is `name`. Every line must be well formed
// ("START SIZE name", lower-case hex without 0x), ours or not.
std::vector<MapLine> perf_map_lines(const std::string& path, const std::string& name) {
  static const std::regex line_re("([0-9a-f]+) ([0-9a-f]+) (.+)");
  std::vector<MapLine> out;
  std::istringstream in(read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    std::smatch m;
    INFO("perf map line: " << line);
    REQUIRE(std::regex_match(line, m, line_re));
    if (m[3] == name)
      out.push_back({static_cast<std::uintptr_t>(std::stoull(m[1], nullptr, 16)),
                     static_cast<std::size_t>(std::stoull(m[2], nullptr, 16)), m[3]});
  }
  return out;
}

// --- jitdump (tools/perf/Documentation/jitdump-specification.txt) ----------------------
template <class T>
T get(const std::string& buf, std::size_t off) {
  REQUIRE(off + sizeof(T) <= buf.size());
  T v;
  std::memcpy(&v, buf.data() + off, sizeof v);
  return v;
}

struct DumpRecord {
  std::uint32_t id = 0;
  std::uint64_t timestamp = 0;
  std::uint32_t pid = 0, tid = 0;
  std::uint64_t vma = 0, code_addr = 0, old_addr = 0, new_addr = 0, code_size = 0, code_index = 0;
  std::string name;
  std::string code;
};

struct Dump {
  std::uint32_t magic = 0, version = 0, header_size = 0, elf_mach = 0, pad1 = 0, pid = 0;
  std::uint64_t timestamp = 0, flags = 0;
  std::vector<DumpRecord> records;
};

Dump parse_jitdump(const std::string& buf) {
  Dump d;
  d.magic = get<std::uint32_t>(buf, 0);
  d.version = get<std::uint32_t>(buf, 4);
  d.header_size = get<std::uint32_t>(buf, 8);
  d.elf_mach = get<std::uint32_t>(buf, 12);
  d.pad1 = get<std::uint32_t>(buf, 16);
  d.pid = get<std::uint32_t>(buf, 20);
  d.timestamp = get<std::uint64_t>(buf, 24);
  d.flags = get<std::uint64_t>(buf, 32);
  std::size_t off = d.header_size;
  while (off < buf.size()) {
    DumpRecord r;
    r.id = get<std::uint32_t>(buf, off);
    const auto total = get<std::uint32_t>(buf, off + 4);
    r.timestamp = get<std::uint64_t>(buf, off + 8);
    REQUIRE(total >= 16);
    REQUIRE(off + total <= buf.size());
    const std::size_t body = off + 16;
    if (r.id == 0) {  // JIT_CODE_LOAD: pid tid vma code_addr code_size code_index name\0 code
      r.pid = get<std::uint32_t>(buf, body);
      r.tid = get<std::uint32_t>(buf, body + 4);
      r.vma = get<std::uint64_t>(buf, body + 8);
      r.code_addr = get<std::uint64_t>(buf, body + 16);
      r.code_size = get<std::uint64_t>(buf, body + 24);
      r.code_index = get<std::uint64_t>(buf, body + 32);
      const std::size_t name_at = body + 40;
      const std::size_t nul = buf.find('\0', name_at);
      REQUIRE(nul != std::string::npos);
      r.name = buf.substr(name_at, nul - name_at);
      // perf inject reads the code as the last code_size bytes of the record.
      REQUIRE(r.code_size <= total);
      r.code = buf.substr(off + total - r.code_size, r.code_size);
      CHECK(nul + 1 + r.code_size == off + total);  // nothing between name and code, nothing after
    } else if (r.id == 1) {  // JIT_CODE_MOVE: pid tid vma old new size index
      REQUIRE(total == 64);
      r.pid = get<std::uint32_t>(buf, body);
      r.tid = get<std::uint32_t>(buf, body + 4);
      r.vma = get<std::uint64_t>(buf, body + 8);
      r.old_addr = get<std::uint64_t>(buf, body + 16);
      r.new_addr = get<std::uint64_t>(buf, body + 24);
      r.code_size = get<std::uint64_t>(buf, body + 32);
      r.code_index = get<std::uint64_t>(buf, body + 40);
    } else {
      CHECK(r.id == 3);  // JIT_CODE_CLOSE: the prefix only
      CHECK(total == 16);
    }
    d.records.push_back(r);
    off += total;
  }
  return d;
}

// --- GDB JIT interface: an ELF64 reader ------------------------------------------------
struct ElfFacts {
  bool ok = false;
  std::uint16_t type = 0, machine = 0;
  std::string symbol;
  std::uint64_t sym_value = 0, sym_size = 0;
  unsigned sym_type = 0, sym_bind = 0;
  std::uint64_t text_addr = 0, text_size = 0, text_flags = 0;
  std::uint32_t text_type = 0;
};

ElfFacts parse_elf(const char* data, std::uint64_t size) {
  ElfFacts f;
  const std::string buf(data, size);
  REQUIRE(buf.size() >= sizeof(Elf64_Ehdr));
  const auto eh = get<Elf64_Ehdr>(buf, 0);
  REQUIRE(std::memcmp(eh.e_ident, ELFMAG, SELFMAG) == 0);
  REQUIRE(eh.e_ident[EI_CLASS] == ELFCLASS64);
  CHECK(eh.e_ident[EI_VERSION] == EV_CURRENT);
  f.type = eh.e_type;
  f.machine = eh.e_machine;
  REQUIRE(eh.e_shentsize == sizeof(Elf64_Shdr));
  REQUIRE(eh.e_shoff + std::uint64_t{eh.e_shnum} * sizeof(Elf64_Shdr) <= buf.size());
  std::vector<Elf64_Shdr> sh(eh.e_shnum);
  for (unsigned i = 0; i < eh.e_shnum; ++i) sh[i] = get<Elf64_Shdr>(buf, eh.e_shoff + i * sizeof(Elf64_Shdr));
  REQUIRE(eh.e_shstrndx < eh.e_shnum);
  auto str = [&](const Elf64_Shdr& strtab, std::uint32_t off) {
    REQUIRE(strtab.sh_type == SHT_STRTAB);
    REQUIRE(strtab.sh_offset + off < buf.size());
    return std::string(buf.c_str() + strtab.sh_offset + off);
  };
  for (unsigned i = 0; i < sh.size(); ++i) {
    const std::string secname = str(sh[eh.e_shstrndx], sh[i].sh_name);
    if (secname == ".text") {
      f.text_addr = sh[i].sh_addr;
      f.text_size = sh[i].sh_size;
      f.text_flags = sh[i].sh_flags;
      f.text_type = sh[i].sh_type;
    }
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    REQUIRE(sh[i].sh_entsize == sizeof(Elf64_Sym));
    REQUIRE(sh[i].sh_link < sh.size());
    for (std::uint64_t s = 1; s < sh[i].sh_size / sizeof(Elf64_Sym); ++s) {
      const auto sym = get<Elf64_Sym>(buf, sh[i].sh_offset + s * sizeof(Elf64_Sym));
      REQUIRE(sym.st_shndx < sh.size());
      CHECK(str(sh[eh.e_shstrndx], sh[sym.st_shndx].sh_name) == ".text");
      f.symbol = str(sh[sh[i].sh_link], sym.st_name);
      f.sym_value = sym.st_value;
      f.sym_size = sym.st_size;
      f.sym_type = ELF64_ST_TYPE(sym.st_info);
      f.sym_bind = ELF64_ST_BIND(sym.st_info);
    }
  }
  f.ok = true;
  return f;
}

// The registered entries, checking the list's links on the way.
std::vector<vis_test::jit_code_entry*> gdb_entries() {
  std::vector<vis_test::jit_code_entry*> out;
  vis_test::jit_code_entry* prev = nullptr;
  for (auto* e = __jit_debug_descriptor.first_entry; e; e = e->next_entry) {
    CHECK(e->prev_entry == prev);
    out.push_back(e);
    prev = e;
  }
  return out;
}

// The entry whose symbol file names a function at `address`, or nullptr.
vis_test::jit_code_entry* gdb_entry_for(const void* address) {
  for (auto* e : gdb_entries())
    if (parse_elf(e->symfile_addr, e->symfile_size).sym_value == reinterpret_cast<std::uintptr_t>(address))
      return e;
  return nullptr;
}

}  // namespace

TEST_CASE("visibility: perf map gets one well-formed line per load and move", "[unit]") {
  TestCode code;
  auto vis = CodeVisibility::create(only(true, false, false));
  REQUIRE(vis.ok());
  const std::string path = (*vis)->perf_map_path();
  CHECK(path == "/tmp/perf-" + std::to_string(::getpid()) + ".map");

  REQUIRE((*vis)->on_load({code.at(0), 48, "jp_test perf_a"}).ok());  // spaces are allowed in names
  REQUIRE((*vis)->on_load({code.at(64), 0x123, "jp_test_perf_b"}).ok());
  auto a = perf_map_lines(path, "jp_test perf_a");
  REQUIRE(a.size() == 1);
  CHECK(a[0].start == reinterpret_cast<std::uintptr_t>(code.at(0)));
  CHECK(a[0].size == 48);
  auto b = perf_map_lines(path, "jp_test_perf_b");
  REQUIRE(b.size() == 1);
  CHECK(b[0].start == reinterpret_cast<std::uintptr_t>(code.at(64)));
  CHECK(b[0].size == 0x123);

  // A move appends a line at the new address (the map has no unload; the newest wins).
  REQUIRE((*vis)->on_move(code.at(0), {code.at(1024), 48, "jp_test perf_a"}).ok());
  a = perf_map_lines(path, "jp_test perf_a");
  REQUIRE(a.size() == 2);
  CHECK(a[1].start == reinterpret_cast<std::uintptr_t>(code.at(1024)));
  CHECK((*vis)->on_unload(code.at(1024)).ok());
  CHECK((*vis)->on_unload(code.at(64)).ok());
  CHECK(perf_map_lines(path, "jp_test perf_a").size() == 2);  // unload writes nothing
  vis->reset();
  ::unlink(path.c_str());
}

TEST_CASE("visibility: jitdump header and CODE_LOAD / CODE_MOVE / CODE_CLOSE parse back", "[unit]") {
  TempDir dir;
  TestCode code;
  auto vis = CodeVisibility::create(only(false, true, false, dir.path));
  REQUIRE(vis.ok());
  const std::string path = (*vis)->jitdump_path();
  CHECK(path == dir.path + "/jit-" + std::to_string(::getpid()) + ".dump");

  // perf record notices the file through an executable mapping of it (never writable).
  {
    std::istringstream maps(read_file("/proc/self/maps"));
    std::string line;
    bool found = false;
    while (std::getline(maps, line))
      if (line.find(path) != std::string::npos) {
        found = true;
        CHECK(line.find(" r-xp ") != std::string::npos);
      }
    CHECK(found);
  }

  REQUIRE((*vis)->on_load({code.at(16), 100, "jp_dump_f"}).ok());
  REQUIRE((*vis)->on_load({code.at(512), 33, "jp_dump_g"}).ok());
  REQUIRE((*vis)->on_move(code.at(16), {code.at(2048), 100, "jp_dump_f"}).ok());    // same image: MOVE
  REQUIRE((*vis)->on_move(code.at(512), {code.at(3072), 40, "jp_dump_g2"}).ok());  // new image: LOAD
  REQUIRE((*vis)->on_unload(code.at(2048)).ok());
  vis->reset();  // writes JIT_CODE_CLOSE

  const Dump d = parse_jitdump(read_file(path));
  CHECK(d.magic == 0x4A695444u);
  CHECK(d.version == 1);
  CHECK(d.header_size == 40);
  CHECK(d.elf_mach == kMachine);
  CHECK(d.pad1 == 0);
  CHECK(d.pid == static_cast<std::uint32_t>(::getpid()));
  CHECK(d.flags == 0);  // JITDUMP_FLAGS_ARCH_TIMESTAMP off: CLOCK_MONOTONIC
  REQUIRE(d.records.size() == 5);

  const DumpRecord& f = d.records[0];
  CHECK(f.id == 0);
  CHECK(f.pid == d.pid);
  CHECK(f.tid == static_cast<std::uint32_t>(::gettid()));
  CHECK(f.vma == reinterpret_cast<std::uintptr_t>(code.at(16)));
  CHECK(f.code_addr == f.vma);
  CHECK(f.code_size == 100);
  CHECK(f.name == "jp_dump_f");
  CHECK(f.code == std::string(reinterpret_cast<const char*>(code.at(16)), 100));

  const DumpRecord& g = d.records[1];
  CHECK(g.id == 0);
  CHECK(g.name == "jp_dump_g");
  CHECK(g.code_size == 33);
  CHECK(g.code == std::string(reinterpret_cast<const char*>(code.at(512)), 33));
  CHECK(g.code_index != f.code_index);

  const DumpRecord& mv = d.records[2];
  CHECK(mv.id == 1);
  CHECK(mv.pid == d.pid);
  CHECK(mv.old_addr == reinterpret_cast<std::uintptr_t>(code.at(16)));
  CHECK(mv.new_addr == reinterpret_cast<std::uintptr_t>(code.at(2048)));
  CHECK(mv.vma == mv.new_addr);
  CHECK(mv.code_size == 100);
  CHECK(mv.code_index == f.code_index);  // perf inject maps the new range to f's image

  const DumpRecord& g2 = d.records[3];
  CHECK(g2.id == 0);
  CHECK(g2.name == "jp_dump_g2");
  CHECK(g2.code_addr == reinterpret_cast<std::uintptr_t>(code.at(3072)));
  CHECK(g2.code_size == 40);
  CHECK(g2.code_index != f.code_index);
  CHECK(g2.code_index != g.code_index);

  CHECK(d.records[4].id == 3);  // JIT_CODE_CLOSE; the unload wrote nothing
  std::uint64_t last = d.timestamp;
  for (const auto& r : d.records) {
    CHECK(r.timestamp >= last);
    last = r.timestamp;
  }
}

TEST_CASE("visibility: one jitdump writer per process", "[unit]") {
  TempDir dir;
  auto a = CodeVisibility::create(only(false, true, false, dir.path));
  REQUIRE(a.ok());
  auto b = CodeVisibility::create(only(false, true, false, dir.path));
  REQUIRE_FALSE(b.ok());
  CHECK(b.status().code() == Errc::busy);
  auto c = CodeVisibility::create(only(true, false, true));  // the other sinks can coexist
  CHECK(c.ok());
  a->reset();
  auto d = CodeVisibility::create(only(false, true, false, dir.path));
  CHECK(d.ok());
  c->reset();
  ::unlink(("/tmp/perf-" + std::to_string(::getpid()) + ".map").c_str());
}

TEST_CASE("visibility: jitdump in a missing directory is an os_error", "[unit]") {
  auto v = CodeVisibility::create(only(false, true, false, "/nonexistent/jitpatch-visibility"));
  REQUIRE_FALSE(v.ok());
  CHECK(v.status().code() == Errc::os_error);
  CHECK(v.status().sys_errno() == ENOENT);
  // The failed attempt released the per-process jitdump slot.
  TempDir dir;
  CHECK(CodeVisibility::create(only(false, true, false, dir.path)).ok());
}

TEST_CASE("visibility: gdb descriptor lists a loaded blob whose ELF names it", "[unit]") {
  TestCode code;
  CHECK(__jit_debug_descriptor.version == 1);
  const std::size_t before = gdb_entries().size();
  auto vis = CodeVisibility::create(only(false, false, true));
  REQUIRE(vis.ok());
  REQUIRE((*vis)->on_load({code.at(32), 77, "jp_gdb_function"}).ok());

  CHECK(gdb_entries().size() == before + 1);
  vis_test::jit_code_entry* e = gdb_entry_for(code.at(32));
  REQUIRE(e != nullptr);
  CHECK(__jit_debug_descriptor.first_entry == e);  // newest first
  // The flag and pointer are for gdb's breakpoint only; they are cleared after the call.
  CHECK(__jit_debug_descriptor.action_flag == 0);
  CHECK(__jit_debug_descriptor.relevant_entry == nullptr);

  const ElfFacts elf = parse_elf(e->symfile_addr, e->symfile_size);
  REQUIRE(elf.ok);
  CHECK(elf.machine == kMachine);
  CHECK(elf.type == ET_EXEC);  // st_value is an absolute address
  CHECK(elf.symbol == "jp_gdb_function");
  CHECK(elf.sym_value == reinterpret_cast<std::uintptr_t>(code.at(32)));
  CHECK(elf.sym_size == 77);
  CHECK(elf.sym_type == STT_FUNC);
  CHECK(elf.sym_bind == STB_GLOBAL);
  CHECK(elf.text_addr == elf.sym_value);
  CHECK(elf.text_size == 77);
  CHECK(elf.text_type == SHT_NOBITS);
  CHECK(elf.text_flags == (SHF_ALLOC | SHF_EXECINSTR));

  // A move replaces the entry with one at the new address.
  REQUIRE((*vis)->on_move(code.at(32), {code.at(256), 77, "jp_gdb_function"}).ok());
  CHECK(gdb_entry_for(code.at(32)) == nullptr);
  REQUIRE(gdb_entry_for(code.at(256)) != nullptr);
  CHECK(gdb_entries().size() == before + 1);

  REQUIRE((*vis)->on_unload(code.at(256)).ok());
  CHECK(gdb_entry_for(code.at(256)) == nullptr);
  CHECK(gdb_entries().size() == before);
}

TEST_CASE("visibility: destruction unregisters every blob from gdb", "[unit]") {
  TestCode code;
  const std::size_t before = gdb_entries().size();
  auto vis = CodeVisibility::create(only(false, false, true));
  REQUIRE(vis.ok());
  for (int i = 0; i < 5; ++i)
    REQUIRE((*vis)->on_load({code.at(static_cast<std::size_t>(i) * 100), 50, "jp_gdb_many"}).ok());
  CHECK(gdb_entries().size() == before + 5);
  CHECK((*vis)->loaded_count() == 5);
  REQUIRE((*vis)->on_unload(code.at(200)).ok());  // unlink from the middle of the list
  CHECK(gdb_entries().size() == before + 4);
  vis->reset();
  CHECK(gdb_entries().size() == before);
}

TEST_CASE("visibility: bad input is invalid_argument and changes nothing", "[unit]") {
  TestCode code;
  auto vis = CodeVisibility::create(only(false, false, true));
  REQUIRE(vis.ok());
  CodeVisibility& v = **vis;
  auto code_of = [](Status st) { return st.code(); };

  CHECK(code_of(v.on_load({code.at(0), 16, nullptr})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({code.at(0), 16, ""})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({code.at(0), 16, "two\nlines"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({code.at(0), 0, "empty"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({nullptr, 16, "null"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({reinterpret_cast<void*>(~std::uintptr_t{0} - 7), 16, "wraps"})) ==
        Errc::invalid_argument);
  CHECK(code_of(v.on_unload(code.at(0))) == Errc::invalid_argument);
  CHECK(code_of(v.on_unload(nullptr)) == Errc::invalid_argument);
  CHECK(code_of(v.on_move(code.at(0), {code.at(64), 16, "x"})) == Errc::invalid_argument);
  CHECK(v.loaded_count() == 0);

  REQUIRE(v.on_load({code.at(100), 50, "jp_bad_a"}).ok());  // [100, 150)
  REQUIRE(v.on_load({code.at(200), 50, "jp_bad_b"}).ok());  // [200, 250)
  const std::size_t entries = gdb_entries().size();
  CHECK(code_of(v.on_load({code.at(100), 50, "same start"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({code.at(149), 10, "overlaps a's end"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({code.at(90), 11, "overlaps a's start"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_load({code.at(90), 200, "covers both"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_unload(code.at(120))) == Errc::invalid_argument);  // inside, not a start
  CHECK(code_of(v.on_move(code.at(100), {code.at(180), 50, "onto b"})) == Errc::invalid_argument);
  CHECK(code_of(v.on_move(code.at(100), {code.at(100), 50, nullptr})) == Errc::invalid_argument);
  CHECK(v.loaded_count() == 2);
  CHECK(gdb_entries().size() == entries);

  // Touching ranges are fine, and a move may overlap its own old range.
  CHECK(v.on_load({code.at(150), 50, "jp_bad_between"}).ok());
  CHECK(v.on_move(code.at(100), {code.at(90), 60, "jp_bad_a"}).ok());
  CHECK(v.on_unload(code.at(90)).ok());
  CHECK(code_of(v.on_unload(code.at(90))) == Errc::invalid_argument);  // twice
  const Status st = v.on_unload(code.at(90));
  CHECK(st.message().find("on_unload") != std::string::npos);
  CHECK(v.loaded_count() == 2);
}

TEST_CASE("visibility: the environment turns sinks on and off, bad values are refused", "[unit]") {
  TempDir dir;
  {
    EnvGuard g("JITPATCH_GDB", "1");
    EnvGuard j("JITPATCH_JITDUMP", "1");
    EnvGuard d("JITPATCH_JITDUMP_DIR", dir.path.c_str());
    EnvGuard p("JITPATCH_PERF_MAP", "0");
    CodeVisibility::Options o;
    o.perf_map = true;  // the environment overrides
    auto v = CodeVisibility::create(o);
    REQUIRE(v.ok());
    CHECK((*v)->options().gdb);
    CHECK((*v)->options().jitdump);
    CHECK_FALSE((*v)->options().perf_map);
    CHECK((*v)->perf_map_path().empty());
    CHECK((*v)->jitdump_path() == dir.path + "/jit-" + std::to_string(::getpid()) + ".dump");
  }
  {
    EnvGuard p("JITPATCH_PERF_MAP", "yes");
    auto v = CodeVisibility::create();
    REQUIRE_FALSE(v.ok());
    CHECK(v.status().code() == Errc::invalid_argument);
    CHECK(v.status().message().find("JITPATCH_PERF_MAP") != std::string::npos);
    // use_environment = false ignores it.
    CHECK(CodeVisibility::create(only(false, false, false)).ok());
  }
  {
    auto v = CodeVisibility::create();  // nothing set: everything off, still validates
    REQUIRE(v.ok());
    CHECK_FALSE((*v)->options().gdb);
    CHECK((*v)->on_unload(&dir).code() == Errc::invalid_argument);
  }
}

TEST_CASE("visibility: concurrent loads and unloads from several threads", "[unit]") {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 50;
  constexpr std::size_t kBlob = 16;
  TestCode code(kThreads * kPerThread * kBlob);
  const std::size_t before = gdb_entries().size();
  auto vis = CodeVisibility::create(only(true, false, true));
  REQUIRE(vis.ok());
  CodeVisibility& v = **vis;
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      const std::string name = "jp_conc_" + std::to_string(t);
      for (int i = 0; i < kPerThread; ++i) {
        void* at = code.at((static_cast<std::size_t>(t) * kPerThread + static_cast<std::size_t>(i)) * kBlob);
        if (!v.on_load({at, kBlob, name.c_str()}).ok()) ++failures[static_cast<std::size_t>(t)];
        if (i % 2 == 0 && !v.on_unload(at).ok()) ++failures[static_cast<std::size_t>(t)];
      }
    });
  for (auto& th : threads) th.join();
  for (int f : failures) CHECK(f == 0);
  CHECK(v.loaded_count() == kThreads * kPerThread / 2);
  CHECK(gdb_entries().size() == before + kThreads * kPerThread / 2);
  // Every line whole (perf_map_lines checks each one's format), none lost.
  for (int t = 0; t < kThreads; ++t)
    CHECK(perf_map_lines(v.perf_map_path(), "jp_conc_" + std::to_string(t)).size() == kPerThread);
  const std::string path = v.perf_map_path();
  vis->reset();
  CHECK(gdb_entries().size() == before);
  ::unlink(path.c_str());
}
