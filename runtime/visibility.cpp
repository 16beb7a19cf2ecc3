// Making JIT code visible: the perf map, the jitdump file and the GDB JIT interface.
//
// Sources for the formats (cited where each is used):
//   [perf-map]  linux tools/perf/Documentation/jit-interface.txt
//   [jitdump]   linux tools/perf/Documentation/jitdump-specification.txt (format version 1)
//   [gdb-jit]   GDB manual, "JIT Compilation Interface": "JIT Declarations",
//               "Registering Code", "Unregistering Code"
//   [elf]       System V gABI, "Object Files" (ELF header, sections, symbol table), <elf.h>
#include <jitpatch/arch.hpp>
#include <jitpatch/visibility.hpp>

#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "sys.hpp"

// ---------------------------------------------------------------------------------------
// [gdb-jit] "JIT Declarations": the layout gdb reads out of the inferior. The types are
// ours (namespaced, so they cannot clash with an embedder's); only the two symbol names
// are the protocol.
namespace jitpatch::gdb_jit {

enum : std::uint32_t { JIT_NOACTION = 0, JIT_REGISTER_FN = 1, JIT_UNREGISTER_FN = 2 };

struct jit_code_entry {
  jit_code_entry* next_entry;
  jit_code_entry* prev_entry;
  const char* symfile_addr;
  std::uint64_t symfile_size;
};

struct jit_descriptor {
  std::uint32_t version;
  std::uint32_t action_flag;  // a jit_actions_t, 32 bits wide as the manual spells out
  jit_code_entry* relevant_entry;
  jit_code_entry* first_entry;
};

}  // namespace jitpatch::gdb_jit

// gdb puts a breakpoint on this function and, when it is hit, reads
// __jit_debug_descriptor.action_flag and .relevant_entry. Nothing in the program reads
// the descriptor, so the body must make the compiler keep both the call and the stores
// before it: noinline keeps the call (and the breakpoint address) real; the asm with a
// "memory" clobber tells the optimizer the function may read every store made before
// the call, so none is sunk past it (GCC's IPA would otherwise see an empty function).
// `used` and default visibility keep the symbol even with -fvisibility=hidden or
// --gc-sections, since gdb finds it by name in the symbol table.
extern "C" __attribute__((noinline, used, visibility("default"))) void __jit_debug_register_code() {
  asm volatile("" ::: "memory");
}

// [gdb-jit] "the debugger may check the version before we can set it": version 1 is in
// the static initializer (constinit: .data, no constructor runs).
// (The braced extern "C" form: `extern "C" T x = ...;` would be a definition declared extern.)
extern "C" {
__attribute__((used, visibility("default"))) constinit jitpatch::gdb_jit::jit_descriptor __jit_debug_descriptor = {
    1, jitpatch::gdb_jit::JIT_NOACTION, nullptr, nullptr};
}

namespace jitpatch {

namespace {

// ---------------------------------------------------------------------------------------
// Process-wide state.

// [gdb-jit] "If the JIT is multi-threaded, then it is important that the JIT synchronize
// any modifications to this global data properly": the list is process-wide (several
// CodeVisibility objects share it), so is its mutex. A debugger that attaches with
// ptrace may still stop the process in the middle of an update; the protocol has no
// answer to that, and gdb copes by re-reading the list at its next stop.
constinit std::mutex g_gdb_mu;

// jit-<pid>.dump is opened with O_TRUNC: two writers in one process would destroy each
// other's records, so one CodeVisibility at a time owns it. Taken with a fully ordered
// try_cmpxchg (open_jitdump()), given back with store_release (~Impl()).
constinit bool g_jitdump_owned = false;

// Live CodeVisibility objects with the gdb sink on (CodeVisibility::gdb_expected()).
// Counted with relaxed RMWs and read with read_once: it orders nothing, it is a fact a
// heap created later reads; a heap created concurrently on another thread may miss it.
constinit std::size_t g_gdb_sinks = 0;

#if defined(__x86_64__)
constexpr std::uint16_t kElfMachine = EM_X86_64;  // 62
#elif defined(__aarch64__)
constexpr std::uint16_t kElfMachine = EM_AARCH64;  // 183
#else
#error "jitpatch supports x86-64 and aarch64 only"
#endif

std::uint64_t monotonic_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000u + static_cast<std::uint64_t>(ts.tv_nsec);
}

// Writes every byte of iov[0..n) with as few writev() calls as the kernel allows: one, in
// practice, so a record lands whole. On a regular file opened O_APPEND each writev()
// appends atomically (the kernel takes the inode lock for the whole call), which is what
// keeps lines from other writers of the same file, in this process or another, from
// interleaving with ours. A short write (disk full, a signal mid-way) is continued
// rather than reported, since a torn record is worse than a late one.
Status write_all(int fd, iovec* iov, int n, const char* context) noexcept {
  while (n > 0) {
    ssize_t w = ::writev(fd, iov, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status(Errc::os_error, errno, context);
    }
    auto done = static_cast<std::size_t>(w);
    while (n > 0 && done >= iov->iov_len) {
      done -= iov->iov_len;
      ++iov;
      --n;
    }
    if (n > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + done;
      iov->iov_len -= done;
    }
  }
  return {};
}

// ---------------------------------------------------------------------------------------
// [jitdump] structures. All fields are in the writer's byte order (the reader detects a
// swapped magic); sizes are fixed by the spec, checked below.

constexpr std::uint32_t kJitdumpMagic = 0x4A695444;  // "JiTD"
constexpr std::uint32_t kJitdumpVersion = 1;
constexpr std::uint32_t JIT_CODE_LOAD = 0;
constexpr std::uint32_t JIT_CODE_MOVE = 1;
constexpr std::uint32_t JIT_CODE_CLOSE = 3;

struct JitdumpHeader {
  std::uint32_t magic;
  std::uint32_t version;
  std::uint32_t total_size;  // of this header
  std::uint32_t elf_mach;
  std::uint32_t pad1;
  std::uint32_t pid;
  std::uint64_t timestamp;
  std::uint64_t flags;  // JITDUMP_FLAGS_ARCH_TIMESTAMP (bit 0) off: timestamps are CLOCK_MONOTONIC
};
static_assert(sizeof(JitdumpHeader) == 40);

struct JitdumpPrefix {
  std::uint32_t id;
  std::uint32_t total_size;  // of the whole record, prefix included
  std::uint64_t timestamp;
};
static_assert(sizeof(JitdumpPrefix) == 16);

// Followed by the NUL-terminated name, then code_size bytes of code.
struct JitdumpCodeLoad {
  JitdumpPrefix p;
  std::uint32_t pid;
  std::uint32_t tid;
  std::uint64_t vma;
  std::uint64_t code_addr;
  std::uint64_t code_size;
  std::uint64_t code_index;
};
static_assert(sizeof(JitdumpCodeLoad) == 56);

struct JitdumpCodeMove {
  JitdumpPrefix p;
  std::uint32_t pid;
  std::uint32_t tid;
  std::uint64_t vma;
  std::uint64_t old_code_addr;
  std::uint64_t new_code_addr;
  std::uint64_t code_size;
  std::uint64_t code_index;
};
static_assert(sizeof(JitdumpCodeMove) == 64);

// ---------------------------------------------------------------------------------------
// [gdb-jit] per-blob symbol file: a minimal ELF64 object that names the blob.
//
// Layout: ELF header | .shstrtab | .strtab | pad | .symtab | pad | section headers.
//   [0] null  [1] .text  [2] .symtab  [3] .strtab  [4] .shstrtab
//
// Choices, and why:
//   - ET_EXEC, so st_value is an absolute address ([elf] "Symbol Values": in executable
//     files it is a virtual address; in relocatable ones a section offset). gdb adds no
//     offset either way: it takes each allocated section's sh_addr as absolute when it
//     loads a JIT symbol file (the file "should contain all the absolute addresses").
//   - .text is SHT_NOBITS with SHF_ALLOC|SHF_EXECINSTR, sh_addr = blob address and
//     sh_size = blob size: the section tells gdb which addresses belong to this object
//     (and that they are code), without a copy of the bytes; gdb reads code from the live
//     process anyway, and the bytes may later be patched.
//   - One STT_FUNC STB_GLOBAL symbol with the blob's size, so pc lookup (backtraces,
//     `info symbol`, breakpoints by name) finds it.
//   - No program headers: gdb reads section headers only, and e_phnum = 0 is valid.
class ElfWriter {
 public:
  static std::vector<unsigned char> build(std::uintptr_t address, std::size_t size, const std::string& name) {
    static constexpr char kShstrtab[] = "\0.text\0.symtab\0.strtab\0.shstrtab";  // + the literal's NUL
    constexpr std::uint32_t kNameText = 1, kNameSymtab = 7, kNameStrtab = 15, kNameShstrtab = 23;
    static_assert(sizeof kShstrtab == 33);

    const std::size_t shstrtab_off = sizeof(Elf64_Ehdr);
    const std::size_t shstrtab_size = sizeof kShstrtab;
    const std::size_t strtab_off = shstrtab_off + shstrtab_size;
    const std::size_t strtab_size = 1 + name.size() + 1;  // "\0" name "\0"
    const std::size_t symtab_off = align8(strtab_off + strtab_size);
    const std::size_t symtab_size = 2 * sizeof(Elf64_Sym);
    const std::size_t shdr_off = align8(symtab_off + symtab_size);
    constexpr std::size_t kSections = 5;
    const std::size_t total = shdr_off + kSections * sizeof(Elf64_Shdr);

    std::vector<unsigned char> out(total, 0);
    unsigned char* b = out.data();

    Elf64_Ehdr eh{};
    std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
    eh.e_ident[EI_CLASS] = ELFCLASS64;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    eh.e_ident[EI_DATA] = ELFDATA2LSB;
#else
    eh.e_ident[EI_DATA] = ELFDATA2MSB;
#endif
    eh.e_ident[EI_VERSION] = EV_CURRENT;
    eh.e_ident[EI_OSABI] = ELFOSABI_NONE;  // plain System V: what Linux toolchains emit
    eh.e_type = ET_EXEC;
    eh.e_machine = kElfMachine;
    eh.e_version = EV_CURRENT;
    eh.e_entry = 0;
    eh.e_phoff = 0;
    eh.e_shoff = shdr_off;
    eh.e_flags = 0;
    eh.e_ehsize = sizeof(Elf64_Ehdr);
    eh.e_phentsize = 0;
    eh.e_phnum = 0;
    eh.e_shentsize = sizeof(Elf64_Shdr);
    eh.e_shnum = kSections;
    eh.e_shstrndx = 4;
    std::memcpy(b, &eh, sizeof eh);

    std::memcpy(b + shstrtab_off, kShstrtab, shstrtab_size);
    std::memcpy(b + strtab_off + 1, name.data(), name.size());  // leading and trailing NULs already zero

    Elf64_Sym syms[2]{};  // [0] is the mandatory null symbol
    syms[1].st_name = 1;
    syms[1].st_info = ELF64_ST_INFO(STB_GLOBAL, STT_FUNC);
    syms[1].st_other = STV_DEFAULT;
    syms[1].st_shndx = 1;  // .text
    syms[1].st_value = address;
    syms[1].st_size = size;
    std::memcpy(b + symtab_off, syms, sizeof syms);

    Elf64_Shdr sh[kSections]{};
    sh[1].sh_name = kNameText;
    sh[1].sh_type = SHT_NOBITS;
    sh[1].sh_flags = SHF_ALLOC | SHF_EXECINSTR;
    sh[1].sh_addr = address;
    sh[1].sh_offset = shstrtab_off;  // NOBITS occupies no file space; any in-file offset will do
    sh[1].sh_size = size;
    sh[1].sh_addralign = 1;  // the blob's real alignment is unknown here; 1 is always true

    sh[2].sh_name = kNameSymtab;
    sh[2].sh_type = SHT_SYMTAB;
    sh[2].sh_offset = symtab_off;
    sh[2].sh_size = symtab_size;
    sh[2].sh_link = 3;  // its string table
    sh[2].sh_info = 1;  // index of the first non-local symbol ([elf] "sh_link and sh_info")
    sh[2].sh_addralign = 8;
    sh[2].sh_entsize = sizeof(Elf64_Sym);

    sh[3].sh_name = kNameStrtab;
    sh[3].sh_type = SHT_STRTAB;
    sh[3].sh_offset = strtab_off;
    sh[3].sh_size = strtab_size;
    sh[3].sh_addralign = 1;

    sh[4].sh_name = kNameShstrtab;
    sh[4].sh_type = SHT_STRTAB;
    sh[4].sh_offset = shstrtab_off;
    sh[4].sh_size = shstrtab_size;
    sh[4].sh_addralign = 1;
    std::memcpy(b + shdr_off, sh, sizeof sh);
    return out;
  }

 private:
  static std::size_t align8(std::size_t x) { return (x + 7) & ~std::size_t{7}; }
};

// One registered symbol file. The entry points into `elf`, which must stay put while the
// entry is linked: gdb reads it from our memory whenever it (re)attaches.
struct GdbNode {
  gdb_jit::jit_code_entry entry{};
  std::vector<unsigned char> elf;
};

// [gdb-jit] "Registering Code": link the entry, point relevant_entry at it, set
// action_flag to JIT_REGISTER_FN, call __jit_debug_register_code(). Order matters only in
// that everything is in place before the call; the mutex keeps other registrations out.
void gdb_register(GdbNode* node) noexcept {
  std::lock_guard<std::mutex> lock(g_gdb_mu);
  gdb_jit::jit_code_entry* e = &node->entry;
  e->symfile_addr = reinterpret_cast<const char*>(node->elf.data());
  e->symfile_size = node->elf.size();
  e->prev_entry = nullptr;
  e->next_entry = __jit_debug_descriptor.first_entry;
  if (e->next_entry) e->next_entry->prev_entry = e;
  __jit_debug_descriptor.first_entry = e;
  __jit_debug_descriptor.relevant_entry = e;
  __jit_debug_descriptor.action_flag = gdb_jit::JIT_REGISTER_FN;
  __jit_debug_register_code();
  // gdb acts on the flag only at the breakpoint: clearing them afterwards leaves no
  // stale pointer in the descriptor once the entry is freed.
  __jit_debug_descriptor.action_flag = gdb_jit::JIT_NOACTION;
  __jit_debug_descriptor.relevant_entry = nullptr;
}

// [gdb-jit] "Unregistering Code": unlink, point relevant_entry at the entry, set
// JIT_UNREGISTER_FN, call. gdb finds the objfile by the entry's address, so the entry's
// memory must stay valid until the call returns; the caller frees it afterwards.
void gdb_unregister(GdbNode* node) noexcept {
  std::lock_guard<std::mutex> lock(g_gdb_mu);
  gdb_jit::jit_code_entry* e = &node->entry;
  if (e->prev_entry) e->prev_entry->next_entry = e->next_entry;
  else __jit_debug_descriptor.first_entry = e->next_entry;
  if (e->next_entry) e->next_entry->prev_entry = e->prev_entry;
  __jit_debug_descriptor.relevant_entry = e;
  __jit_debug_descriptor.action_flag = gdb_jit::JIT_UNREGISTER_FN;
  __jit_debug_register_code();
  __jit_debug_descriptor.action_flag = gdb_jit::JIT_NOACTION;
  __jit_debug_descriptor.relevant_entry = nullptr;
  e->next_entry = e->prev_entry = nullptr;
}

// ---------------------------------------------------------------------------------------

struct Blob {
  std::size_t size = 0;
  std::string name;
  std::uint64_t code_index = 0;   // jitdump: the CODE_LOAD this blob's bytes came from
  std::unique_ptr<GdbNode> gdb;   // linked into the gdb list while this Blob exists
};
using BlobMap = std::map<std::uintptr_t, Blob>;

// Validates a CodeInfo the same way for on_load and on_move (whose contexts differ).
Status check_info(const CodeInfo& info, const char* ctx_null_address, const char* ctx_null_name,
                  const char* ctx_bad_name, const char* ctx_size, const char* ctx_wraps) noexcept {
  if (info.address == nullptr) return Status(Errc::invalid_argument, 0, ctx_null_address);
  if (info.name == nullptr) return Status(Errc::invalid_argument, 0, ctx_null_name);
  // A newline would end the perf map line early and forge the next one.
  if (info.name[0] == '\0' || std::strchr(info.name, '\n') != nullptr)
    return Status(Errc::invalid_argument, 0, ctx_bad_name);
  if (info.size == 0) return Status(Errc::invalid_argument, 0, ctx_size);
  const auto begin = reinterpret_cast<std::uintptr_t>(info.address);
  if (info.size > std::numeric_limits<std::uintptr_t>::max() - begin)
    return Status(Errc::invalid_argument, 0, ctx_wraps);
  return {};
}

// Whether [begin, begin + size) overlaps a blob in `m` other than the one at `ignore`
// (pass ignore = 0 for none: 0 is never a blob start). Blobs in `m` never overlap each
// other, so only the last blob starting before the range's end can reach into it.
bool overlaps(const BlobMap& m, std::uintptr_t begin, std::size_t size, std::uintptr_t ignore) noexcept {
  auto it = m.lower_bound(begin + size);
  if (it == m.begin()) return false;
  --it;
  if (it->first == ignore) {
    if (it == m.begin()) return false;
    --it;
  }
  return it->first + it->second.size > begin;
}

Status env_flag(const char* var, bool* out, const char* bad_value_context) noexcept {
  const char* v = std::getenv(var);
  if (v == nullptr || *v == '\0') return {};
  if (std::strcmp(v, "1") == 0) *out = true;
  else if (std::strcmp(v, "0") == 0) *out = false;
  else return Status(Errc::invalid_argument, 0, bad_value_context);
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------------

struct CodeVisibility::Impl {
  Options options;
  std::string perf_map_path;
  std::string jitdump_path;
  pid_t pid = 0;

  mutable std::mutex mu;  // everything below
  int perf_fd = -1;
  int jitdump_fd = -1;
  bool jitdump_owner = false;
  void* jitdump_marker = MAP_FAILED;
  std::size_t jitdump_marker_size = 0;
  std::uint64_t next_code_index = 0;
  BlobMap blobs;
  bool counted_gdb = false;  // counted in g_gdb_sinks

  ~Impl() {
    // No other thread may use the object while it is destroyed, but gdb registration
    // shares the process-wide list, which gdb_unregister() locks on its own.
    for (auto& [addr, blob] : blobs)
      if (blob.gdb) gdb_unregister(blob.gdb.get());
    blobs.clear();
    if (jitdump_fd >= 0) {
      // [jitdump] JIT_CODE_CLOSE: "the end of the jit runtime"; optional for perf, but it
      // marks a file that was closed on purpose rather than cut short.
      JitdumpPrefix close_rec{JIT_CODE_CLOSE, sizeof(JitdumpPrefix), monotonic_ns()};
      iovec iov{&close_rec, sizeof close_rec};
      (void)write_all(jitdump_fd, &iov, 1, "jitdump: write(JIT_CODE_CLOSE)");
    }
    if (jitdump_marker != MAP_FAILED) ::munmap(jitdump_marker, jitdump_marker_size);
    if (jitdump_fd >= 0) ::close(jitdump_fd);
    if (perf_fd >= 0) ::close(perf_fd);
    // Release: pairs with the try_cmpxchg in open_jitdump(): the next owner's O_TRUNC
    // open comes after this owner's last write and close.
    if (jitdump_owner) store_release(&g_jitdump_owned, false);
    if (counted_gdb) fetch_sub_relaxed(&g_gdb_sinks, std::size_t{1});  // orders nothing: see g_gdb_sinks
  }

  Status open_perf_map();
  Status open_jitdump();
  Status perf_map_line(std::uintptr_t address, std::size_t size, const std::string& name) noexcept;
  Status jitdump_load(std::uintptr_t address, std::size_t size, const std::string& name,
                      std::uint64_t code_index) noexcept;
  Status jitdump_move(std::uintptr_t old_address, std::uintptr_t new_address, std::size_t size,
                      std::uint64_t code_index) noexcept;
  // The jitdump CODE_LOAD record's total_size is 32 bits ([jitdump] record prefix).
  bool fits_jitdump(std::size_t size, const char* name) const noexcept {
    if (jitdump_fd < 0) return true;
    const std::size_t limit = std::numeric_limits<std::uint32_t>::max();
    const std::size_t fixed = sizeof(JitdumpCodeLoad) + std::strlen(name) + 1;
    return fixed <= limit && size <= limit - fixed;
  }
};

Status CodeVisibility::Impl::open_perf_map() {
  // [perf-map] "/tmp/perf-%d.map", %d the pid: the place perf report looks, fixed.
  perf_map_path = "/tmp/perf-" + std::to_string(pid) + ".map";
  // /tmp is world-writable: O_NOFOLLOW refuses a symlink planted there by someone else,
  // and the fstat() check refuses a file we do not own (perf report would ignore such a
  // file anyway). O_APPEND: see write_all().
  int fd = ::open(perf_map_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return Status(Errc::os_error, errno, "perf map: open(/tmp/perf-<pid>.map)");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return Status(Errc::os_error, e, "perf map: fstat(/tmp/perf-<pid>.map)");
  }
  if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    ::close(fd);
    return Status(Errc::os_error, EPERM, "perf map: /tmp/perf-<pid>.map is not a regular file owned by this user");
  }
  perf_fd = fd;
  return {};
}

Status CodeVisibility::Impl::open_jitdump() {
  if (options.jitdump_dir.empty()) return Status(Errc::invalid_argument, 0, "jitdump: empty jitdump_dir");
  bool expected = false;
  // Fully ordered (was acq_rel; not a hot path): its acquire half pairs with ~Impl()'s
  // store_release, so the previous owner's writes and close are done before we open.
  if (!try_cmpxchg(&g_jitdump_owned, &expected, true))
    return Status(Errc::busy, 0, "jitdump: another CodeVisibility of this process writes jit-<pid>.dump");
  jitdump_owner = true;

  // [jitdump] perf inject recognizes the file by its name, "jit-<pid>.dump", with the pid
  // of the process that mapped it.
  jitdump_path = options.jitdump_dir + "/jit-" + std::to_string(pid) + ".dump";
  // O_RDWR: mmap() needs a readable descriptor. O_TRUNC: a stale file of an earlier
  // process with the same pid must not prefix ours.
  int fd = ::open(jitdump_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return Status(Errc::os_error, errno, "jitdump: open(<jitdump_dir>/jit-<pid>.dump)");
  jitdump_fd = fd;

  JitdumpHeader h{};
  h.magic = kJitdumpMagic;
  h.version = kJitdumpVersion;
  h.total_size = sizeof(JitdumpHeader);
  h.elf_mach = kElfMachine;
  h.pad1 = 0;
  h.pid = static_cast<std::uint32_t>(pid);
  h.timestamp = monotonic_ns();
  h.flags = 0;
  iovec iov{&h, sizeof h};
  if (Status st = write_all(fd, &iov, 1, "jitdump: write(file header)"); !st) {
    ::unlink(jitdump_path.c_str());
    return st;
  }

  // [jitdump] "The jitdump file must be mmapped by the JIT runtime ... with PROT_EXEC":
  // perf record only records executable mappings by default, and this one is the marker
  // that tells perf inject which file holds the process's JIT records. Read+exec only:
  // never writable, and nothing ever executes or even reads it.
  const long page = ::sysconf(_SC_PAGESIZE);
  jitdump_marker_size = page > 0 ? static_cast<std::size_t>(page) : 4096;
  void* m = ::mmap(nullptr, jitdump_marker_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
  if (m == MAP_FAILED) {
    int e = errno;
    ::unlink(jitdump_path.c_str());
    // EPERM here is typically a jitdump_dir on a noexec mount.
    return Status(Errc::os_error, e, "jitdump: mmap(jit-<pid>.dump, PROT_READ|PROT_EXEC)");
  }
  jitdump_marker = m;
  return {};
}

Status CodeVisibility::Impl::perf_map_line(std::uintptr_t address, std::size_t size,
                                           const std::string& name) noexcept {
  if (perf_fd < 0) return {};
  // [perf-map] "START SIZE symbolname\n", START and SIZE in hex without 0x, the name the
  // rest of the line (it may contain spaces).
  char head[2 * 16 + 3];
  char* p = head;
  p = std::to_chars(p, head + sizeof head, static_cast<unsigned long>(address), 16).ptr;
  *p++ = ' ';
  p = std::to_chars(p, head + sizeof head, static_cast<unsigned long>(size), 16).ptr;
  *p++ = ' ';
  char nl = '\n';
  iovec iov[3] = {{head, static_cast<std::size_t>(p - head)},
                  {const_cast<char*>(name.data()), name.size()},
                  {&nl, 1}};
  return write_all(perf_fd, iov, 3, "perf map: write");
}

Status CodeVisibility::Impl::jitdump_load(std::uintptr_t address, std::size_t size, const std::string& name,
                                          std::uint64_t code_index) noexcept {
  if (jitdump_fd < 0) return {};
  JitdumpCodeLoad r{};
  r.p.id = JIT_CODE_LOAD;
  r.p.total_size = static_cast<std::uint32_t>(sizeof r + name.size() + 1 + size);  // fits_jitdump() checked
  r.p.timestamp = monotonic_ns();
  r.pid = static_cast<std::uint32_t>(pid);
  r.tid = static_cast<std::uint32_t>(sys::gettid());
  r.vma = address;  // [jitdump] "by default vma = code_addr"
  r.code_addr = address;
  r.code_size = size;
  r.code_index = code_index;
  // The code goes last with no padding after it: perf inject finds it at
  // (record + total_size - code_size), so anything after the code would shift it.
  iovec iov[3] = {{&r, sizeof r},
                  {const_cast<char*>(name.c_str()), name.size() + 1},
                  {reinterpret_cast<void*>(address), size}};
  return write_all(jitdump_fd, iov, 3, "jitdump: write(JIT_CODE_LOAD)");
}

Status CodeVisibility::Impl::jitdump_move(std::uintptr_t old_address, std::uintptr_t new_address,
                                          std::size_t size, std::uint64_t code_index) noexcept {
  if (jitdump_fd < 0) return {};
  JitdumpCodeMove r{};
  r.p.id = JIT_CODE_MOVE;
  r.p.total_size = sizeof r;
  r.p.timestamp = monotonic_ns();
  r.pid = static_cast<std::uint32_t>(pid);
  r.tid = static_cast<std::uint32_t>(sys::gettid());
  r.vma = new_address;
  r.old_code_addr = old_address;
  r.new_code_addr = new_address;
  r.code_size = size;
  // The index of the CODE_LOAD whose bytes moved: perf inject maps the new range to the
  // image it built for that load.
  r.code_index = code_index;
  iovec iov{&r, sizeof r};
  return write_all(jitdump_fd, &iov, 1, "jitdump: write(JIT_CODE_MOVE)");
}

// ---------------------------------------------------------------------------------------

Result<std::unique_ptr<CodeVisibility>> CodeVisibility::create(Options options) noexcept {
  try {
    if (options.use_environment) {
      if (Status st = env_flag("JITPATCH_PERF_MAP", &options.perf_map, "JITPATCH_PERF_MAP: expected 0 or 1"); !st)
        return st;
      if (Status st = env_flag("JITPATCH_JITDUMP", &options.jitdump, "JITPATCH_JITDUMP: expected 0 or 1"); !st)
        return st;
      if (Status st = env_flag("JITPATCH_GDB", &options.gdb, "JITPATCH_GDB: expected 0 or 1"); !st) return st;
      if (const char* dir = std::getenv("JITPATCH_JITDUMP_DIR"); dir && *dir) options.jitdump_dir = dir;
    }
    auto impl = std::make_unique<Impl>();
    impl->options = std::move(options);
    impl->pid = ::getpid();
    // On failure `impl` is destroyed here, closing whatever was opened.
    if (impl->options.perf_map)
      if (Status st = impl->open_perf_map(); !st) return st;
    if (impl->options.jitdump)
      if (Status st = impl->open_jitdump(); !st) return st;
    auto vis = std::unique_ptr<CodeVisibility>(new CodeVisibility(std::move(impl)));
    if (vis->impl_->options.gdb) {
      fetch_add_relaxed(&g_gdb_sinks, std::size_t{1});  // orders nothing: see g_gdb_sinks
      vis->impl_->counted_gdb = true;
    }
    return vis;
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "CodeVisibility::create");
  }
}

CodeVisibility::CodeVisibility(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
CodeVisibility::~CodeVisibility() = default;

const CodeVisibility::Options& CodeVisibility::options() const noexcept { return impl_->options; }
const std::string& CodeVisibility::perf_map_path() const noexcept { return impl_->perf_map_path; }
const std::string& CodeVisibility::jitdump_path() const noexcept { return impl_->jitdump_path; }

bool CodeVisibility::gdb_expected(bool use_environment) noexcept {
  if (read_once(g_gdb_sinks) != 0) return true;  // orders nothing: see g_gdb_sinks
  if (!use_environment) return false;
  const char* v = std::getenv("JITPATCH_GDB");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

std::size_t CodeVisibility::loaded_count() const noexcept {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->blobs.size();
}

Status CodeVisibility::on_load(const CodeInfo& info) noexcept {
  if (Status st = check_info(info, "on_load: null address", "on_load: null name",
                             "on_load: empty name or a name with a newline", "on_load: size 0",
                             "on_load: address + size wraps around");
      !st)
    return st;
  Impl& m = *impl_;
  const auto address = reinterpret_cast<std::uintptr_t>(info.address);
  std::lock_guard<std::mutex> lock(m.mu);
  if (overlaps(m.blobs, address, info.size, 0))
    return Status(Errc::invalid_argument, 0, "on_load: range overlaps a blob already loaded");
  if (!m.fits_jitdump(info.size, info.name))
    return Status(Errc::invalid_argument, 0, "on_load: blob too large for a jitdump record (4 GiB)");

  // Everything that can fail for lack of memory happens before any side effect.
  Blob* blob = nullptr;
  try {
    Blob b;
    b.size = info.size;
    b.name = info.name;
    b.code_index = m.next_code_index;
    if (m.options.gdb) {
      b.gdb = std::make_unique<GdbNode>();
      b.gdb->elf = ElfWriter::build(address, info.size, b.name);
    }
    blob = &m.blobs.emplace(address, std::move(b)).first->second;
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "on_load");
  }
  ++m.next_code_index;  // unique per CODE_LOAD ([jitdump] "unique identifier for the jitted code")

  if (blob->gdb) gdb_register(blob->gdb.get());
  // Both files are written even if the first fails; the first error is reported.
  Status st = m.perf_map_line(address, blob->size, blob->name);
  Status st2 = m.jitdump_load(address, blob->size, blob->name, blob->code_index);
  return !st ? st : st2;
}

Status CodeVisibility::on_move(const void* old_address, const CodeInfo& now) noexcept {
  if (Status st = check_info(now, "on_move: null new address", "on_move: null name",
                             "on_move: empty name or a name with a newline", "on_move: size 0",
                             "on_move: new address + size wraps around");
      !st)
    return st;
  Impl& m = *impl_;
  const auto old_addr = reinterpret_cast<std::uintptr_t>(old_address);
  const auto new_addr = reinterpret_cast<std::uintptr_t>(now.address);
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = old_address ? m.blobs.find(old_addr) : m.blobs.end();
  if (it == m.blobs.end()) return Status(Errc::invalid_argument, 0, "on_move: old_address is not a loaded blob");
  if (overlaps(m.blobs, new_addr, now.size, old_addr))
    return Status(Errc::invalid_argument, 0, "on_move: new range overlaps another loaded blob");
  if (!m.fits_jitdump(now.size, now.name))
    return Status(Errc::invalid_argument, 0, "on_move: blob too large for a jitdump record (4 GiB)");

  std::string name;
  std::unique_ptr<GdbNode> node;
  try {
    name = now.name;
    if (m.options.gdb) {
      node = std::make_unique<GdbNode>();
      node->elf = ElfWriter::build(new_addr, now.size, name);
    }
  } catch (const std::bad_alloc&) {
    return Status(Errc::out_of_memory, 0, "on_move");
  }

  // Re-key the map node in place: extract/insert of a node handle does not allocate.
  auto nh = m.blobs.extract(it);
  Blob& b = nh.mapped();
  // [jitdump] JIT_CODE_MOVE keeps the bytes, the size and the name of the original load;
  // when the size or the name changed, perf needs a fresh image: a new CODE_LOAD.
  const bool same_image = b.size == now.size && b.name == name;
  if (b.gdb) gdb_unregister(b.gdb.get());
  b.gdb = std::move(node);
  if (b.gdb) gdb_register(b.gdb.get());
  b.size = now.size;
  b.name = std::move(name);
  Status st = m.perf_map_line(new_addr, b.size, b.name);
  Status st2;
  if (same_image) {
    st2 = m.jitdump_move(old_addr, new_addr, b.size, b.code_index);
  } else {
    b.code_index = m.next_code_index++;
    st2 = m.jitdump_load(new_addr, b.size, b.name, b.code_index);
  }
  nh.key() = new_addr;
  m.blobs.insert(std::move(nh));
  return !st ? st : st2;
}

Status CodeVisibility::on_unload(const void* address) noexcept {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = address ? m.blobs.find(reinterpret_cast<std::uintptr_t>(address)) : m.blobs.end();
  if (it == m.blobs.end()) return Status(Errc::invalid_argument, 0, "on_unload: address is not a loaded blob");
  // Only gdb has an unregistration. The perf map and jitdump formats have no "unload"
  // record ([perf-map], [jitdump] record types: LOAD, MOVE, DEBUG_INFO, CLOSE,
  // UNWINDING_INFO); perf resolves an address to the newest load covering it.
  if (it->second.gdb) gdb_unregister(it->second.gdb.get());
  m.blobs.erase(it);
  return {};
}

}  // namespace jitpatch
