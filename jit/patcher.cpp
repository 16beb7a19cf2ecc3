// The atomic patch protocol: validate, plan one aligned store per patch, write them all,
// serialize cores once.
#include <jitpatch/code_registry.hpp>
#include <jitpatch/listing.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/runtime.hpp>

#include <jitpatch/internal/signal_chain.hpp>

#include <capstone/capstone.h>
#include <sched.h>
#include <ucontext.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <new>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#else
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

namespace jitpatch {

namespace {
thread_local std::string t_detail;

// --- the SIGTRAP side of the breakpoint protocol --------------------------------------
// Process-wide: the handler is installed once (by the first Patcher) and stays, chaining
// to the handler that was there before. The state it reads is plain words accessed
// atomically; the tables it reads are never freed while a Patcher exists.
constinit std::byte* const* g_trap_sites = nullptr;  // sorted sites of the batch in flight
constinit std::size_t g_trap_count = 0;
constinit int g_trap_waiters = 0;
constinit bool g_trap_installed = false;
constinit struct sigaction g_prev_trap = {};
constinit std::mutex g_trap_mu;
// One breakpoint batch in flight per process: the SIGTRAP handler reads one table, and two
// Patchers (two heaps) must not publish theirs over each other.
constinit std::mutex g_breakpoint_mu;
// Code heaps with a live Patcher: a trap in them whose byte is no longer a trap was left
// by a batch that completed while the thread was on its way into the handler.
constexpr int kMaxHeaps = 16;
constinit std::byte* g_heap_begin[kMaxHeaps] = {};
constinit std::byte* g_heap_end[kMaxHeaps] = {};

bool in_trap_table(const std::byte* pc) {
  // Pairs with the store-release that publishes the table before the traps are written.
  std::byte* const* sites = __atomic_load_n(&g_trap_sites, __ATOMIC_ACQUIRE);
  const std::size_t n = __atomic_load_n(&g_trap_count, __ATOMIC_ACQUIRE);
  if (!sites) return false;
  std::size_t lo = 0, hi = n;
  while (lo < hi) {
    const std::size_t mid = (lo + hi) / 2;
    if (sites[mid] < pc) lo = mid + 1;
    else hi = mid;
  }
  return lo < n && sites[lo] == pc;
}

bool in_patched_heap(const std::byte* pc) {
  for (int i = 0; i < kMaxHeaps; ++i) {
    const std::byte* b = __atomic_load_n(&g_heap_begin[i], __ATOMIC_ACQUIRE);
    if (b && pc >= b && pc < __atomic_load_n(&g_heap_end[i], __ATOMIC_ACQUIRE)) return true;
  }
  return false;
}

bool is_trap_at(const std::byte* pc) {
#if defined(__x86_64__)
  return __atomic_load_n(reinterpret_cast<const std::uint8_t*>(pc), __ATOMIC_RELAXED) == arch::x86_64::kInt3;
#else
  return arch::aarch64::is_brk(__atomic_load_n(reinterpret_cast<const std::uint32_t*>(pc), __ATOMIC_RELAXED));
#endif
}

// Async-signal-safe: atomics, reads of code bytes, sched_yield.
void on_sigtrap(int sig, siginfo_t* si, void* ucv) {
  const int saved_errno = errno;
  auto* uc = static_cast<ucontext_t*>(ucv);
#if defined(__x86_64__)
  // INT3 leaves RIP one past itself (REFERENCE 2, "Traps as seen by a SIGTRAP handler").
  auto* pc = reinterpret_cast<std::byte*>(uc->uc_mcontext.gregs[REG_RIP] - 1);
#else
  auto* pc = reinterpret_cast<std::byte*>(uc->uc_mcontext.pc);  // BRK: the PC is the BRK itself
#endif
  bool ours = false;
  if (in_trap_table(pc)) {
    // A site of the batch in flight: wait until the batch is done (the site leaves the
    // table after the last serialization), then run the site again from its start.
    __atomic_fetch_add(&g_trap_waiters, 1, __ATOMIC_RELAXED);
    while (in_trap_table(pc)) ::sched_yield();
    __atomic_fetch_sub(&g_trap_waiters, 1, __ATOMIC_RELAXED);
    ours = true;
  } else if (in_patched_heap(pc) && !is_trap_at(pc)) {
    // The batch completed between this thread fetching the trap and the handler running.
    ours = true;
  }
  if (ours) {
#if defined(__x86_64__)
    uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(pc);
#else
    uc->uc_mcontext.pc = reinterpret_cast<std::uint64_t>(pc);
#endif
  } else {
    detail::chain_signal(g_prev_trap, sig, si, ucv);
  }
  errno = saved_errno;
}

Status install_trap_handler(std::byte* heap_begin, std::byte* heap_end) {
  std::lock_guard<std::mutex> g(g_trap_mu);
  int slot = -1;
  for (int i = 0; i < kMaxHeaps; ++i)
    if (!g_heap_begin[i]) {
      slot = i;
      break;
    }
  if (slot < 0) return Status(Errc::busy, 0, "too many code heaps with a Patcher (16)");
  if (!g_trap_installed) {
    struct sigaction sa = {};
    sa.sa_sigaction = on_sigtrap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(SIGTRAP, nullptr, &g_prev_trap) != 0 || ::sigaction(SIGTRAP, &sa, nullptr) != 0)
      return Status(Errc::os_error, errno, "installing the SIGTRAP handler");
    g_trap_installed = true;
  }
  // End before begin, both release: in_patched_heap() acquires begin first, so a handler
  // that sees a non-null begin sees its end.
  __atomic_store_n(&g_heap_end[slot], heap_end, __ATOMIC_RELEASE);
  __atomic_store_n(&g_heap_begin[slot], heap_begin, __ATOMIC_RELEASE);
  return {};
}

void forget_heap(std::byte* heap_begin) {
  std::lock_guard<std::mutex> g(g_trap_mu);
  for (int i = 0; i < kMaxHeaps; ++i)
    if (g_heap_begin[i] == heap_begin) {
      __atomic_store_n(&g_heap_begin[i], nullptr, __ATOMIC_RELEASE);
      break;
    }
}

// Instruction lengths of [code, code + n) decoded from its start; false if the bytes do
// not decode, or the last instruction runs past n.
bool whole_instructions(const std::uint8_t* code, std::size_t n, std::uint64_t address) {
  csh h;
#if defined(__x86_64__)
  if (cs_open(CS_ARCH_X86, CS_MODE_64, &h) != CS_ERR_OK) return false;
#else
  if (cs_open(CS_ARCH_ARM64, CS_MODE_ARM, &h) != CS_ERR_OK) return false;
#endif
  cs_insn* insn = cs_malloc(h);
  const std::uint8_t* p = code;
  std::size_t left = n;
  std::uint64_t at = address;
  while (left > 0 && cs_disasm_iter(h, &p, &left, &at, insn)) {
  }
  cs_free(insn, 1);
  cs_close(&h);
  return left == 0;
}

std::uint64_t addr(const void* p) { return reinterpret_cast<std::uint64_t>(p); }

// Records why a site failed, with what is there now, and returns the error.
Status reject(const char* reason, const std::byte* site) {
  t_detail = reason;
  t_detail += "\n";
  // A window around the site: the start may cut an instruction, the site line is marked.
  auto text = disassemble(site, 16, addr(site), host_isa(), {{addr(site), "<- site"}});
  if (text.ok()) t_detail += text.value();
  return Status(Errc::invalid_argument, 0, reason);
}
}  // namespace

Patcher::Patcher(Emitter& emitter, bool validate) noexcept
    : emitter_(&emitter), heap_(&emitter.heap()), registry_(emitter.registry()), validate_(validate) {}

Patcher::~Patcher() { forget_heap(heap_->rx_begin()); }

Result<std::unique_ptr<Patcher>> Patcher::create(Emitter& emitter, const PatcherOptions& options) noexcept {
  if (!emitter.registry())
    return Status(Errc::invalid_argument, 0, "the patcher needs an Emitter with a CodeRegistry");
  bool validate = options.validate;
#ifndef NDEBUG
  validate = true;  // debug builds always validate
#endif
  auto p = std::unique_ptr<Patcher>(new (std::nothrow) Patcher(emitter, validate));
  if (!p) return Status(Errc::out_of_memory);
  if (Status st = install_trap_handler(emitter.heap().rx_begin(), emitter.heap().rx_end()); !st) return st;
  return p;
}

int Patcher::trap_waiters() noexcept { return __atomic_load_n(&g_trap_waiters, __ATOMIC_RELAXED); }

const std::string& Patcher::last_error_detail() noexcept { return t_detail; }

PatcherStats Patcher::stats() const noexcept {
  PatcherStats s;
  s.patches = __atomic_load_n(&stats_.patches, __ATOMIC_RELAXED);
  s.batches = __atomic_load_n(&stats_.batches, __ATOMIC_RELAXED);
  s.serializations = __atomic_load_n(&stats_.serializations, __ATOMIC_RELAXED);
  s.veneers = __atomic_load_n(&stats_.veneers, __ATOMIC_RELAXED);
  return s;
}

// A far jump through a data slot, one per target, reused by every site that needs it.
// Emitted (and published, with a serialization if its memory is dirty) before any site
// points at it.
Result<std::byte*> Patcher::veneer_for(std::uint64_t target) noexcept {
  std::lock_guard<std::mutex> g(veneer_mu_);
  if (auto it = veneers_.find(target); it != veneers_.end()) return it->second->entry();
  auto b = emitter_->emit("jitpatch_veneer", [&](EmitContext& cx) {
    cx.far_jump_site(reinterpret_cast<const void*>(target), "target");
  });
  if (!b.ok()) return b.status();
  try {
    veneers_.emplace(target, *b);
  } catch (...) {
    (void)emitter_->free(*b);
    return Status(Errc::out_of_memory);
  }
  __atomic_fetch_add(&stats_.veneers, 1, __ATOMIC_RELAXED);
  return (*b)->entry();
}

Status Patcher::plan(const Request& r, Planned* out) noexcept {
  std::byte* site = r.site;
  // The site must be in live code: patching retired or freed code is an error, always
  // (this check is cheap and guards memory safety, so it does not depend on validate_).
  const CodeBlob* blob = registry_->find(site);
  if (!blob || blob->state() != BlobState::live) return reject("site is not in live code (freed, retired or unknown)", site);

  using Op = Request::Op;
  const bool slot_op = r.op == Op::write_slot;
  if (slot_op != (r.kind == SiteKind::data_slot)) return reject("operation does not match the site kind", site);
  if (r.op == Op::retarget && r.kind != SiteKind::call && r.kind != SiteKind::jump)
    return reject("retarget needs a call or jump site", site);
  if ((r.op == Op::toggle_on || r.op == Op::toggle_off) && r.kind != SiteKind::toggle && r.kind != SiteKind::entry)
    return reject("toggling needs a toggle or entry site", site);

  if (slot_op) {
    if (addr(site) % 8 != 0) return reject("data slot is not 8-byte aligned", site);
    *out = Planned{site, r.value, 8};
    return {};
  }

  std::uint64_t target = r.value;
#if defined(__x86_64__)
  namespace isa = arch::x86_64;
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(site);
  if (r.op == Op::retarget) {
    const std::uint8_t opcode = r.kind == SiteKind::call ? isa::kCallRel32Opcode : isa::kJmpRel32Opcode;
    if (validate_) {
      if (bytes[0] != opcode)
        return reject(r.kind == SiteKind::call ? "site does not hold a call rel32" : "site does not hold a jmp rel32", site);
      if (!isa::rel32_displacement_atomic(addr(site)))
        return reject("the rel32 displacement is not 4-byte aligned: no single atomic store covers it", site);
    }
    if (!isa::rel32_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    std::uint8_t insn[5];
    const auto enc = r.kind == SiteKind::call ? isa::encode_call_rel32(insn, addr(site), target)
                                              : isa::encode_jmp_rel32(insn, addr(site), target);
    if (enc != isa::InsnStatus::ok)
      return reject("target out of reach even through a veneer", site);
    *out = Planned{site + 1, isa::load_le32(insn + 1), 4};
    return {};
  }
  // Toggle / entry: NOP5 <-> jmp rel32 inside one aligned 8-byte word.
  if (validate_) {
    if (!isa::is_nop5(bytes) && bytes[0] != isa::kJmpRel32Opcode)
      return reject("toggle site holds neither the 5-byte NOP nor a jmp rel32", site);
    if (!isa::fits_aligned_8(addr(site), 5))
      return reject("toggle site crosses an aligned 8-byte word: no single atomic store covers it", site);
  }
  std::uint8_t insn[5];
  if (r.op == Op::toggle_on) {
    if (!isa::rel32_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    if (isa::encode_jmp_rel32(insn, addr(site), target) != isa::InsnStatus::ok)
      return reject("target out of reach even through a veneer", site);
  } else {
    (void)isa::encode_nop5(insn);
  }
  std::byte* word = reinterpret_cast<std::byte*>(isa::aligned_8_base(addr(site)));
  const std::uint64_t old_word = __atomic_load_n(reinterpret_cast<const std::uint64_t*>(word), __ATOMIC_RELAXED);
  *out = Planned{word, isa::splice_aligned_8(old_word, isa::aligned_8_offset(addr(site)), insn, 5), 8};
  return {};
#else
  namespace isa = arch::aarch64;
  const std::uint32_t old = __atomic_load_n(reinterpret_cast<const std::uint32_t*>(site), __ATOMIC_RELAXED);
  std::uint32_t insn = isa::kNop;
  if (r.op == Op::retarget || r.op == Op::toggle_on) {
    if (!isa::b_in_reach(addr(site), target)) {
      auto v = veneer_for(target);
      if (!v.ok()) return v.status();
      target = addr(*v);
    }
    const auto st = r.kind == SiteKind::call ? isa::encode_bl(&insn, addr(site), target)
                                             : isa::encode_b(&insn, addr(site), target);
    if (st != isa::InsnStatus::ok) return reject("target out of reach even through a veneer", site);
  }
  if (validate_) {
    if (r.kind == SiteKind::call && !isa::decode_bl(old, addr(site))) return reject("site does not hold a BL", site);
    if (r.kind == SiteKind::jump && !isa::decode_b(old, addr(site))) return reject("site does not hold a B", site);
    if ((r.kind == SiteKind::toggle || r.kind == SiteKind::entry) && !isa::is_nop(old) && !isa::decode_b(old, addr(site)))
      return reject("toggle site holds neither NOP nor B", site);
    if (!isa::concurrent_modification_allowed(old, insn))
      return reject("Arm ARM B2.2.5 does not allow this concurrent modification", site);
  }
  *out = Planned{site, insn, 4};
  return {};
#endif
}

Status Patcher::commit(const std::vector<Request>& requests, bool wait) noexcept {
  if (requests.empty()) return {};
  std::unique_lock<std::mutex> lock(commit_mu_, std::defer_lock);
  if (wait) lock.lock();
  else if (!lock.try_lock()) return Status(Errc::busy, 0, "another patch batch is being committed");
  t_detail.clear();

  // 1. Validate and plan everything; write nothing if anything is wrong.
  std::vector<Planned> plan_list;
  try {
    plan_list.resize(requests.size());
  } catch (...) {
    return Status(Errc::out_of_memory);
  }
  bool breakpoint = false;
  std::size_t planned = 0;
  for (const Request& r : requests) {
    if (r.op == Request::Op::replace) {
      if (Status st = validate_replace(r); !st) return st;
      breakpoint = true;
      continue;
    }
    if (Status st = plan(r, &plan_list[planned++]); !st) return st;
  }
  plan_list.resize(planned);
  if (breakpoint) return commit_breakpoint(requests, plan_list);

  // 2. One aligned store per patch. Executors see each word old or new. (plan() checked
  //    each site against the registry and its alignment: no second lookup here.)
  for (const Planned& p : plan_list)
    if (Status st = heap_->store_code_word_checked_by_caller(p.word, p.value, p.width); !st) return st;

  // 3. One serialization for the batch: when it returns, every core that runs threads of
  //    this process executed a core-serializing instruction after the stores above, so
  //    none can still run a stale copy of a patched instruction (SDM 9.1.3; on arm64 the
  //    context synchronization event the IC IVAU + DSB of flush_icache leaves to us).
  if (Status st = heap_->runtime().serialize_cores(); !st) return st;
  __atomic_fetch_add(&stats_.patches, plan_list.size(), __ATOMIC_RELAXED);
  __atomic_fetch_add(&stats_.batches, 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&stats_.serializations, 1, __ATOMIC_RELAXED);
  return {};
}

namespace {
const PatchSite* entry_site_of(const CodeBlob& blob) {
  for (const PatchSite& s : blob.sites())
    if (s.kind == SiteKind::entry) return &s;
  return nullptr;
}
}  // namespace

Status Patcher::retarget(const PatchSite& site, const void* target) noexcept {
  PatchBatch b(*this);
  b.retarget(site, target);
  return b.commit();
}
Status Patcher::set_toggle(const PatchSite& site, bool on) noexcept {
  PatchBatch b(*this);
  b.set_toggle(site, on);
  return b.commit();
}
Status Patcher::write_slot(const PatchSite& site, std::uint64_t value) noexcept {
  PatchBatch b(*this);
  b.write_slot(site, value);
  return b.commit();
}
Status Patcher::redirect_entry(const CodeBlob& blob, const void* target) noexcept {
  if (!entry_site_of(blob)) return Status(Errc::invalid_argument, 0, "blob was not emitted with a redirectable entry");
  PatchBatch b(*this);
  b.redirect_entry(blob, target);
  return b.commit();
}
Status Patcher::restore_entry(const CodeBlob& blob) noexcept {
  if (!entry_site_of(blob)) return Status(Errc::invalid_argument, 0, "blob was not emitted with a redirectable entry");
  PatchBatch b(*this);
  b.restore_entry(blob);
  return b.commit();
}

Status Patcher::validate_replace(const Request& r) noexcept {
  std::byte* at = r.site;
  if (r.length == 0 || r.length > 16) return reject("replace: 1 to 16 bytes", at);
  const CodeBlob* blob = registry_->find(at);
  if (!blob || blob->state() != BlobState::live) return reject("site is not in live code (freed, retired or unknown)", at);
  if (!blob->contains(at + r.length - 1)) return reject("replace: the bytes run past the end of the blob", at);
#if defined(__aarch64__)
  if (addr(at) % 4 != 0 || r.length % 4 != 0) return reject("replace: whole 4-byte instructions, 4-byte aligned", at);
#endif
  // Validation of the bytes themselves is always on for this protocol: a region that is
  // not whole instructions would leave a torn one behind.
  std::uint8_t old_bytes[16];
  std::memcpy(old_bytes, at, r.length);
  if (!whole_instructions(old_bytes, r.length, addr(at)))
    return reject("replace: the region does not end on an instruction boundary of the old code", at);
  if (!whole_instructions(r.bytes, r.length, addr(at)))
    return reject("replace: the new bytes are not whole instructions", at);
  return {};
}

Status Patcher::write_bytes(std::byte* at, const std::uint8_t* bytes, std::size_t n) noexcept {
  auto w = heap_->write(at, n);
  if (!w.ok()) return w.status();
  // Relaxed single-byte atomics: an executor may fetch these bytes concurrently; each
  // byte is old or new, and the trap in front guards the ones in between.
  for (std::size_t i = 0; i < n; ++i)
    __atomic_store_n(reinterpret_cast<std::uint8_t*>(w->data()) + i, bytes[i], __ATOMIC_RELAXED);
  return w->finish();
}

Status Patcher::commit_breakpoint(const std::vector<Request>& requests, std::vector<Planned>& atomic) noexcept {
  std::lock_guard<std::mutex> process_wide(g_breakpoint_mu);
  struct Site {
    std::byte* at;
    const Request* r;
    std::uint8_t original[16];
  };
  std::vector<Site> sites;
  try {
    for (const Request& r : requests)
      if (r.op == Request::Op::replace) {
        Site s{r.site, &r, {}};
        std::memcpy(s.original, r.site, r.length);
        sites.push_back(s);
      }
    std::sort(sites.begin(), sites.end(), [](const Site& a, const Site& b) { return a.at < b.at; });
    for (std::size_t i = 1; i < sites.size(); ++i)
      if (sites[i - 1].at + sites[i - 1].r->length > sites[i].at)
        return reject("replace: two replacements in one batch overlap", sites[i].at);
    std::vector<std::byte*> table;
    for (const Site& s : sites) table.push_back(s.at);
    if (table.capacity() > 0) retired_trap_tables_.push_back(std::move(trap_sites_));
    trap_sites_ = std::move(table);
  } catch (...) {
    return Status(Errc::out_of_memory);
  }
#if defined(__x86_64__)
  const std::uint8_t trap[1] = {arch::x86_64::kInt3};
  constexpr std::size_t head = 1;
#else
  std::uint8_t trap[4];
  const std::uint32_t brk = arch::aarch64::brk(0x4a50);  // "JP": our patch trap
  std::memcpy(trap, &brk, 4);
  constexpr std::size_t head = 4;
#endif
  Runtime& rt = heap_->runtime();
  // Publish the table before any trap is written: a thread that hits a trap must find its
  // site (store-release; the handler's load-acquire pairs with it).
  __atomic_store_n(&g_trap_count, trap_sites_.size(), __ATOMIC_RELEASE);
  __atomic_store_n(&g_trap_sites, trap_sites_.data(), __ATOMIC_RELEASE);
  auto round_done = [&](int round) {
    if (round_hook_) round_hook_(round, round_hook_arg_);
  };
  auto unpublish = [&] {
    __atomic_store_n(&g_trap_count, std::size_t(0), __ATOMIC_RELEASE);
    __atomic_store_n(&g_trap_sites, static_cast<std::byte* const*>(nullptr), __ATOMIC_RELEASE);
  };
  // Put every site back as it was (a failure midway): waiters then resume into old code.
  auto roll_back = [&](Status why) {
    for (const Site& s : sites) (void)write_bytes(s.at, s.original, s.r->length);
    (void)rt.serialize_cores();
    unpublish();
    return why;
  };

  // Round 1: the traps (and every atomic patch of the batch).
  for (const Site& s : sites)
    if (Status st = write_bytes(s.at, trap, head); !st) return roll_back(st);
  for (const Planned& p : atomic)
    if (Status st = heap_->store_code_word(p.word, p.value, p.width); !st) return roll_back(st);
  if (Status st = rt.serialize_cores(); !st) return roll_back(st);
  round_done(1);
  // Round 2: the bodies, behind the traps; no core can still be inside a stale copy.
  for (const Site& s : sites)
    if (s.r->length > head)
      if (Status st = write_bytes(s.at + head, s.r->bytes + head, s.r->length - head); !st) return roll_back(st);
  if (Status st = rt.serialize_cores(); !st) return roll_back(st);
  round_done(2);
  // Round 3: the new first bytes replace the traps.
  for (const Site& s : sites)
    if (Status st = write_bytes(s.at, s.r->bytes, head); !st) return roll_back(st);
  if (Status st = rt.serialize_cores(); !st) return roll_back(st);
  // Only now may trapped threads go: they re-run each site from its start.
  unpublish();
  round_done(3);
  __atomic_fetch_add(&stats_.patches, atomic.size() + sites.size(), __ATOMIC_RELAXED);
  __atomic_fetch_add(&stats_.batches, 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&stats_.serializations, 3, __ATOMIC_RELAXED);
  return {};
}

void PatchBatch::replace(std::byte* at, const void* bytes, std::size_t n) {
  Patcher::Request r{Patcher::Request::Op::replace, SiteKind::other, at, 0};
  r.length = static_cast<std::uint8_t>(n > 16 ? 0 : n);  // 0: rejected at commit
  if (n <= 16) std::memcpy(r.bytes, bytes, n);
  requests_.push_back(r);
}

void PatchBatch::retarget(const PatchSite& site, const void* target) {
  requests_.push_back({Patcher::Request::Op::retarget, site.kind, site.address, addr(target)});
}
void PatchBatch::set_toggle(const PatchSite& site, bool on) {
  requests_.push_back({on ? Patcher::Request::Op::toggle_on : Patcher::Request::Op::toggle_off, site.kind,
                       site.address, addr(site.target)});
}
void PatchBatch::write_slot(const PatchSite& site, std::uint64_t value) {
  requests_.push_back({Patcher::Request::Op::write_slot, site.kind, site.address, value});
}
void PatchBatch::redirect_entry(const CodeBlob& blob, const void* target) {
  if (const PatchSite* s = entry_site_of(blob))
    requests_.push_back({Patcher::Request::Op::toggle_on, SiteKind::entry, s->address, addr(target)});
  else  // planned as an invalid request so commit() reports it
    requests_.push_back({Patcher::Request::Op::toggle_on, SiteKind::other, blob.entry(), addr(target)});
}
void PatchBatch::restore_entry(const CodeBlob& blob) {
  if (const PatchSite* s = entry_site_of(blob))
    requests_.push_back({Patcher::Request::Op::toggle_off, SiteKind::entry, s->address, 0});
  else
    requests_.push_back({Patcher::Request::Op::toggle_off, SiteKind::other, blob.entry(), 0});
}

unsigned PatchBatch::rounds_needed() const noexcept {
  if (requests_.empty()) return 0;
  for (const auto& r : requests_)
    if (r.op == Patcher::Request::Op::replace) return 3;
  return 1;
}

Status PatchBatch::commit() noexcept {
  Status st = patcher_->commit(requests_, true);
  rounds_ = st.ok() ? rounds_needed() : 0;
  return st;
}
Status PatchBatch::try_commit() noexcept {
  Status st = patcher_->commit(requests_, false);
  rounds_ = st.ok() ? rounds_needed() : 0;
  return st;
}

}  // namespace jitpatch
