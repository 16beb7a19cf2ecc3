// The C API (<jitpatch/jitpatch.h>) over the C++ one. Every entry point catches every
// exception and turns bad input into a status: a C caller has no other way to see either.
// Uses no asmjit: this file is in libjitpatch.so (docs/c-api.md).
#include <jitpatch/jitpatch.h>

#include <jitpatch/code_heap.hpp>
#include <jitpatch/code_registry.hpp>
#include <jitpatch/emitter.hpp>
#include <jitpatch/error.hpp>
#include <jitpatch/grace.hpp>
#include <jitpatch/patch.hpp>
#include <jitpatch/runtime.hpp>
#include <jitpatch/safepoint.hpp>
#include <jitpatch/visibility.hpp>

#if defined(__x86_64__)
#include <jitpatch/arch/x86_64/insn.hpp>
#else
#include <jitpatch/arch/aarch64/insn.hpp>
#endif

#include <chrono>
#include <cinttypes>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

using namespace jitpatch;

// The enums and the reader record are shared with the C header by value and layout.
static_assert(JITPATCH_E_INVALID_ARGUMENT == static_cast<int>(Errc::invalid_argument));
static_assert(JITPATCH_E_OS_ERROR == static_cast<int>(Errc::os_error));
static_assert(JITPATCH_STRATEGY_NONE == static_cast<int>(Strategy::none));
static_assert(JITPATCH_STRATEGY_MEMBARRIER_GLOBAL == static_cast<int>(Strategy::membarrier_global));
static_assert(JITPATCH_OP_RSEQ_FENCE == static_cast<int>(Operation::rseq_fence));
static_assert(JITPATCH_SITE_CALL == static_cast<int>(SiteKind::call));
static_assert(JITPATCH_SITE_ENTRY == static_cast<int>(SiteKind::entry));
static_assert(JITPATCH_STATE_IN_HANDSHAKE == static_cast<int>(ThreadState::in_handshake));
static_assert(JITPATCH_HEAP_PROTECTION_FLIP == static_cast<int>(HeapStrategy::protection_flip));
static_assert(offsetof(jitpatch_grace_reader, ctr) == offsetof(detail::GraceReaderRecord, ctr));
static_assert(offsetof(jitpatch_grace_reader, symmetric) == offsetof(detail::GraceReaderRecord, symmetric));
static_assert(offsetof(jitpatch_grace_reader, qsbr) == offsetof(detail::GraceReaderRecord, qsbr));
static_assert(offsetof(jitpatch_grace_reader, tid) == offsetof(detail::GraceReaderRecord, tid));
static_assert(offsetof(jitpatch_grace_reader, phase) == offsetof(detail::GraceReaderRecord, phase));
static_assert(offsetof(jitpatch_grace_reader, wake_word) == offsetof(detail::GraceReaderRecord, wake_word));
static_assert(offsetof(jitpatch_grace_reader, domain) == offsetof(detail::GraceReaderRecord, domain));
static_assert(sizeof(bool) == 1 && sizeof(jitpatch_grace_reader) <= sizeof(detail::GraceReaderRecord));
// jitpatch_grace_section_mb_() tests bit 63 of the phase word and ctr for the mode.
static_assert(detail::kGraceSymmetric == 1ull << 63);
static_assert(detail::kGraceCount == 1 && detail::kGraceNestMask == 0xffffffffull);
static_assert(SafepointThread::kPollWordOffset == 0);

// The C handles. Creation and destruction only take the mutexes below: never a patch,
// publication or read-side path.
struct jitpatch_runtime {
  std::unique_ptr<Runtime> rt;
  std::mutex mu;
  std::size_t users = 0;  // jits, grace domains, safepoints made with it (guarded by mu)
};

struct jitpatch_grace_domain {
  jitpatch_runtime* owner = nullptr;
  std::unique_ptr<GraceDomain> owned;  // empty for a jit's own domain
  GraceDomain* d = nullptr;
  std::size_t riders = 0;  // safepoints using it for QSBR (guarded by owner->mu)
  bool jit_owned = false;  // a jit's domain (jitpatch_jit_grace): the jit destroys it
};

struct jitpatch_jit {
  jitpatch_runtime* owner = nullptr;
  // Construction order; destroyed in reverse (the domain drains retirements first).
  std::unique_ptr<CodeVisibility> vis;
  std::unique_ptr<CodeHeap> heap;
  std::unique_ptr<CodeRegistry> registry;
  std::unique_ptr<Emitter> emitter;
  std::unique_ptr<Patcher> patcher;
  jitpatch_grace_domain grace;
  std::mutex codes_mu;  // the live handles, freed with the jit
  jitpatch_code* codes = nullptr;
};

struct jitpatch_code {
  jitpatch_jit* jit;
  BlobRef ref;
  jitpatch_code* prev = nullptr;
  jitpatch_code* next = nullptr;
};

struct jitpatch_batch {
  jitpatch_jit* jit;
  PatchBatch b;
};

struct jitpatch_safepoints {
  jitpatch_runtime* owner = nullptr;
  std::unique_ptr<Safepoints> sp;
  jitpatch_grace_domain* grace = nullptr;
};

namespace {

// Allocated on a thread's first failure: the module's TLS block stays small, which
// matters when the library is dlopen'ed (its initial-exec variables need static TLS).
thread_local std::unique_ptr<jitpatch_error> t_error;
const jitpatch_error g_no_error = {JITPATCH_OK, 0, nullptr, "ok"};
const jitpatch_error g_no_memory = {JITPATCH_E_OUT_OF_MEMORY, 0, "the error record", "out_of_memory: the error record"};
thread_local bool t_error_lost = false;  // the last failure found no memory for its record

jitpatch_error* error_record() noexcept {
  if (!t_error) t_error.reset(new (std::nothrow) jitpatch_error{});
  t_error_lost = !t_error;
  return t_error.get();
}

// The calling thread's attachments and readers made through the C API: the C++ objects
// are RAII handles owned by the thread, so they live here, and a thread that exits
// without detaching is detached by their destructors.
struct ThreadLocals {
  ThreadAttachment attachment;
  std::vector<std::pair<jitpatch_grace_reader*, GraceReader>> readers;
  std::vector<std::pair<jitpatch_safepoints*, SafepointAttachment>> safepoints;
};
thread_local ThreadLocals t_locals;

jitpatch_status fail(const Status& st, const std::string& detail = {}) noexcept {
  jitpatch_error* r = error_record();
  if (!r) return static_cast<jitpatch_status>(st.code());
  jitpatch_error& e = *r;
  e.status = static_cast<jitpatch_status>(st.code());
  e.sys_errno = st.sys_errno();
  e.step = st.context();
  std::string msg;
  try {
    msg = st.message();
    if (!detail.empty()) msg += " (" + detail + ")";
  } catch (...) {
    msg = st.name();
  }
  std::snprintf(e.message, sizeof e.message, "%s", msg.c_str());
  return e.status;
}

jitpatch_status fail(jitpatch_status code, const char* step) noexcept {
  jitpatch_error* r = error_record();
  if (!r) return code;
  jitpatch_error& e = *r;
  e.status = code;
  e.sys_errno = 0;
  e.step = step;
  std::snprintf(e.message, sizeof e.message, "%s: %s", jitpatch_status_name(code), step);
  return code;
}

jitpatch_status check(const Status& st) noexcept { return st.ok() ? JITPATCH_OK : fail(st); }

jitpatch_status null_arg(const char* what) noexcept { return fail(JITPATCH_E_INVALID_ARGUMENT, what); }

// Every entry point's body runs inside this: no exception crosses into C.
template <class F>
jitpatch_status guarded(F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return fail(JITPATCH_E_OUT_OF_MEMORY, "allocation failed");
  } catch (...) {
    return fail(JITPATCH_E_INTERNAL, "an unexpected C++ exception was caught at the C API boundary");
  }
}

bool add_user(jitpatch_runtime* rt) {
  std::lock_guard<std::mutex> g(rt->mu);
  ++rt->users;
  return true;
}
void remove_user(jitpatch_runtime* rt) {
  std::lock_guard<std::mutex> g(rt->mu);
  --rt->users;
}

// A C enum's value as the int it is. A C caller may pass any int; in C++, loading a value
// outside the enum's range is undefined (UBSan: -fsanitize=enum), so read the bytes.
template <class E>
int enum_value(const E& e) noexcept {
  static_assert(sizeof(E) == sizeof(int));
  int v;
  std::memcpy(&v, &e, sizeof v);
  return v;
}

bool valid_strategy(const jitpatch_strategy& s) {
  return enum_value(s) >= JITPATCH_STRATEGY_AUTOMATIC && enum_value(s) <= JITPATCH_STRATEGY_MEMBARRIER_GLOBAL;
}

std::chrono::steady_clock::time_point monotonic(std::uint64_t ns) {
  // libstdc++'s steady_clock is CLOCK_MONOTONIC in nanoseconds since its epoch.
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
}

// A code handle that is usable: not NULL, its blob not freed. The blob's generation
// (BlobRef) catches a handle whose function another call freed.
jitpatch_status usable_code(const jitpatch_code* code) {
  if (!code) return null_arg("a NULL code handle");
  if (!code->ref.valid()) return fail(JITPATCH_E_INVALID_ARGUMENT, "the code was freed");
  return JITPATCH_OK;
}

jitpatch_status site_of(jitpatch_batch* b, jitpatch_code* code, std::size_t site, const PatchSite** out) {
  if (!b) return null_arg("a NULL batch");
  if (jitpatch_status st = usable_code(code)) return st;
  if (code->jit != b->jit) return fail(JITPATCH_E_INVALID_ARGUMENT, "the code belongs to another jit than the batch");
  const auto& sites = code->ref->sites();
  if (site >= sites.size()) return fail(JITPATCH_E_INVALID_ARGUMENT, "no site with this index in the code");
  *out = &sites[site];
  return JITPATCH_OK;
}

void unlink_code(jitpatch_code* c) {
  jitpatch_jit* j = c->jit;
  std::lock_guard<std::mutex> g(j->codes_mu);
  if (c->prev) c->prev->next = c->next;
  else j->codes = c->next;
  if (c->next) c->next->prev = c->prev;
}

void json_string(std::string& out, const char* s) {
  out += '"';
  for (; *s; ++s) {
    if (*s == '"' || *s == '\\') out += '\\';
    if (static_cast<unsigned char>(*s) < 0x20) continue;
    out += *s;
  }
  out += '"';
}

}  // namespace

extern "C" {

const char* jitpatch_version(void) { return "0.1.0"; }

const jitpatch_error* jitpatch_last_error(void) {
  if (t_error_lost) return &g_no_memory;
  return t_error ? t_error.get() : &g_no_error;
}

const char* jitpatch_status_name(jitpatch_status status) {
  const int v = enum_value(status);
  if (v == JITPATCH_E_INTERNAL) return "internal";
  if (v < JITPATCH_OK || v > JITPATCH_E_OS_ERROR) return "unknown";
  return errc_name(static_cast<Errc>(v));
}

// ---- runtime ---------------------------------------------------------------------------

void jitpatch_runtime_options_init(jitpatch_runtime_options* o) {
  if (!o) return;
  const RuntimeOptions d;
  o->process_barrier = o->serialize_cores = o->rseq_fence = JITPATCH_STRATEGY_AUTOMATIC;
  o->signal = d.signal;
  o->use_environment = d.use_environment;
  o->ack_timeout_ms = static_cast<std::uint32_t>(d.ack_timeout.count());
}

jitpatch_status jitpatch_runtime_create(const jitpatch_runtime_options* options, jitpatch_runtime** out) {
  return guarded([&] {
    if (!out) return null_arg("runtime_create: NULL out");
    *out = nullptr;
    RuntimeOptions o;
    if (options) {
      if (!valid_strategy(options->process_barrier) || !valid_strategy(options->serialize_cores) ||
          !valid_strategy(options->rseq_fence))
        return fail(JITPATCH_E_INVALID_ARGUMENT, "runtime_create: a strategy that does not exist");
      o.process_barrier = static_cast<Strategy>(enum_value(options->process_barrier));
      o.serialize_cores = static_cast<Strategy>(enum_value(options->serialize_cores));
      o.rseq_fence = static_cast<Strategy>(enum_value(options->rseq_fence));
      o.signal = options->signal;
      o.use_environment = options->use_environment != 0;
      o.ack_timeout = std::chrono::milliseconds(options->ack_timeout_ms);
    }
    auto h = std::make_unique<jitpatch_runtime>();
    auto rt = Runtime::create(o);
    if (!rt.ok()) return fail(rt.status());
    h->rt = std::move(rt).value();
    *out = h.release();
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_runtime_destroy(jitpatch_runtime* rt) {
  return guarded([&] {
    if (!rt) return null_arg("runtime_destroy: a NULL runtime");
    {
      std::lock_guard<std::mutex> g(rt->mu);
      if (rt->users != 0)
        return fail(JITPATCH_E_BUSY, "runtime_destroy: jits, grace domains or safepoints made with it still exist");
    }
    delete rt;
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_thread_attach(jitpatch_runtime* rt) {
  return guarded([&] {
    if (!rt) return null_arg("thread_attach: a NULL runtime");
    if (t_locals.attachment.attached()) return fail(JITPATCH_E_ALREADY_ATTACHED, "thread_attach: attached already");
    auto a = rt->rt->attach_current_thread();
    if (!a.ok()) return fail(a.status());
    t_locals.attachment = std::move(a).value();
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_thread_detach(jitpatch_runtime* rt) {
  return guarded([&] {
    if (!rt) return null_arg("thread_detach: a NULL runtime");
    if (!t_locals.attachment.attached())
      return fail(JITPATCH_E_NOT_ATTACHED, "thread_detach: not attached through jitpatch_thread_attach");
    return check(t_locals.attachment.detach());
  });
}

jitpatch_status jitpatch_process_barrier(jitpatch_runtime* rt) {
  return guarded([&] { return rt ? check(rt->rt->process_barrier()) : null_arg("process_barrier: a NULL runtime"); });
}

jitpatch_status jitpatch_serialize_cores(jitpatch_runtime* rt) {
  return guarded([&] { return rt ? check(rt->rt->serialize_cores()) : null_arg("serialize_cores: a NULL runtime"); });
}

jitpatch_status jitpatch_rseq_fence(jitpatch_runtime* rt, int cpu) {
  return guarded([&] {
    if (!rt) return null_arg("rseq_fence: a NULL runtime");
    if (cpu < JITPATCH_ALL_CPUS) return fail(JITPATCH_E_INVALID_ARGUMENT, "rseq_fence: a negative cpu other than JITPATCH_ALL_CPUS");
    return check(rt->rt->rseq_fence(cpu));
  });
}

jitpatch_status jitpatch_runtime_strategy(jitpatch_runtime* rt, jitpatch_operation op, jitpatch_strategy* out) {
  return guarded([&] {
    if (!rt || !out) return null_arg("runtime_strategy: a NULL runtime or out");
    if (enum_value(op) < JITPATCH_OP_PROCESS_BARRIER || enum_value(op) > JITPATCH_OP_RSEQ_FENCE)
      return fail(JITPATCH_E_INVALID_ARGUMENT, "runtime_strategy: an operation that does not exist");
    *out = static_cast<jitpatch_strategy>(rt->rt->strategy(static_cast<Operation>(enum_value(op))));
    return JITPATCH_OK;
  });
}

const char* jitpatch_strategy_name(jitpatch_strategy s) {
  return valid_strategy(s) ? strategy_name(static_cast<Strategy>(enum_value(s))) : "unknown";
}

jitpatch_status jitpatch_runtime_report_json(jitpatch_runtime* rt, char* buffer, std::size_t capacity,
                                             std::size_t* needed) {
  return guarded([&] {
    if (!rt) return null_arg("runtime_report_json: a NULL runtime");
    if (!buffer && capacity) return null_arg("runtime_report_json: a NULL buffer with a nonzero capacity");
    const Capabilities& c = rt->rt->capabilities();
    std::string j;
    char num[64];
    auto kv_u = [&](const char* k, unsigned long long v, bool comma = true) {
      std::snprintf(num, sizeof num, "\"%s\": %llu%s", k, v, comma ? ", " : "");
      j += num;
    };
    auto kv_b = [&](const char* k, bool v, bool comma = true) {
      j += '"';
      j += k;
      j += v ? "\": true" : "\": false";
      if (comma) j += ", ";
    };
    j += "{\"tool\": \"jitpatch C API\", \"version\": \"0.1.0\", \"machine\": {\"arch\": ";
    json_string(j, c.arch);
    j += ", \"kernel_release\": ";
    json_string(j, c.kernel_release);
    j += ", ";
    kv_u("cpus_configured", c.cpus_configured);
    kv_u("cpus_online", c.cpus_online, false);
    j += "}, \"cpu_features\": {";
#if defined(__x86_64__)
    kv_b("x86_serialize", c.x86_serialize, false);
#else
    kv_u("ctr_el0", c.aarch64_ctr_el0, false);
#endif
    j += "}, \"membarrier\": {";
    kv_u("query_mask", c.membarrier_supported);
    kv_u("query_errno", static_cast<unsigned>(c.membarrier_query_errno));
    kv_u("registered_mask", c.membarrier_registered, false);
    j += "}, \"rseq\": {";
    kv_b("registered", c.rseq_registered);
    kv_u("size", c.rseq_size);
    std::snprintf(num, sizeof num, "\"offset\": %lld", static_cast<long long>(c.rseq_offset));
    j += num;
    j += "}, \"signal\": {";
    kv_u("number", static_cast<unsigned>(rt->rt->signal_number()), false);
    j += "}, \"operations\": [";
    for (int op = 0; op <= 2; ++op) {
      j += op ? ", {\"operation\": " : "{\"operation\": ";
      json_string(j, operation_name(static_cast<Operation>(op)));
      j += ", \"strategy\": ";
      json_string(j, strategy_name(rt->rt->strategy(static_cast<Operation>(op))));
      j += '}';
    }
    j += "]}\n";
    if (needed) *needed = j.size() + 1;
    if (capacity < j.size() + 1) {
      if (capacity) buffer[0] = '\0';
      return fail(JITPATCH_E_INVALID_ARGUMENT, "runtime_report_json: the buffer is too small (see *needed)");
    }
    std::memcpy(buffer, j.c_str(), j.size() + 1);
    return JITPATCH_OK;
  });
}

// ---- code ------------------------------------------------------------------------------

void jitpatch_jit_options_init(jitpatch_jit_options* o) {
  if (!o) return;
  const CodeHeapOptions h;
  const PatcherOptions p;
  *o = jitpatch_jit_options{};
  o->heap_reserve = h.reserve;
  o->heap_strategy = static_cast<jitpatch_heap_strategy>(h.strategy);
  o->use_environment = h.use_environment;
  o->validate_patches = p.validate;
  o->check_targets = p.check_targets;
  o->allow_flip_with_attached_threads = p.allow_flip_with_attached_threads;
}

jitpatch_status jitpatch_jit_create(jitpatch_runtime* rt, const jitpatch_jit_options* options, jitpatch_jit** out) {
  return guarded([&] {
    if (!rt || !out) return null_arg("jit_create: a NULL runtime or out");
    *out = nullptr;
    jitpatch_jit_options o;
    jitpatch_jit_options_init(&o);
    if (options) o = *options;
    if (enum_value(o.heap_strategy) < JITPATCH_HEAP_AUTOMATIC || enum_value(o.heap_strategy) > JITPATCH_HEAP_PROTECTION_FLIP)
      return fail(JITPATCH_E_INVALID_ARGUMENT, "jit_create: a heap strategy that does not exist");
    auto j = std::make_unique<jitpatch_jit>();
    j->owner = rt;
    // The parts in the order jitpatch::Jit makes them (visibility first: a live gdb sink
    // makes an automatic heap one gdb can write breakpoints into).
    CodeVisibility::Options vo;
    vo.perf_map = o.perf_map != 0;
    vo.jitdump = o.jitdump != 0;
    vo.gdb = o.gdb != 0;
    if (o.jitdump_dir) vo.jitdump_dir = o.jitdump_dir;
    vo.use_environment = o.use_environment != 0;
    auto vis = CodeVisibility::create(vo);
    if (!vis.ok()) return fail(vis.status());
    j->vis = std::move(vis).value();
    CodeHeapOptions ho;
    ho.reserve = o.heap_reserve;
    ho.strategy = static_cast<HeapStrategy>(enum_value(o.heap_strategy));
    ho.use_environment = o.use_environment != 0;
    auto heap = CodeHeap::create(*rt->rt, ho);
    if (!heap.ok()) return fail(heap.status());
    j->heap = std::move(heap).value();
    j->registry = std::make_unique<CodeRegistry>();
    j->emitter = std::make_unique<Emitter>(*j->heap, j->registry.get(), j->vis.get());
    PatcherOptions po;
    po.validate = o.validate_patches != 0;
    po.check_targets = o.check_targets != 0;
    po.allow_flip_with_attached_threads = o.allow_flip_with_attached_threads != 0;
    auto patcher = Patcher::create(*j->emitter, po);
    if (!patcher.ok()) return fail(patcher.status());
    j->patcher = std::move(patcher).value();
    auto grace = GraceDomain::create(*rt->rt);
    if (!grace.ok()) return fail(grace.status());
    j->grace.owner = rt;
    j->grace.jit_owned = true;
    j->grace.owned = std::move(grace).value();
    j->grace.d = j->grace.owned.get();
    add_user(rt);
    *out = j.release();
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_jit_destroy(jitpatch_jit* jit) {
  return guarded([&] {
    if (!jit) return null_arg("jit_destroy: a NULL jit");
    {
      std::lock_guard<std::mutex> g(jit->owner->mu);
      if (jit->grace.riders != 0 || jit->grace.d->reader_count() != 0)
        return fail(JITPATCH_E_BUSY, "jit_destroy: its grace domain still has readers or safepoints riding on it");
    }
    jitpatch_runtime* rt = jit->owner;
    // The domain first: it frees the retired code through the emitter.
    jit->grace.owned.reset();
    for (jitpatch_code* c = jit->codes; c;) {
      jitpatch_code* next = c->next;
      delete c;
      c = next;
    }
    delete jit;
    remove_user(rt);
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_code_publish(jitpatch_jit* jit, const char* name, const void* code, std::size_t size,
                                      const jitpatch_site_desc* sites, std::size_t nsites, std::size_t entry_offset,
                                      jitpatch_code** out, void** entry) {
  return guarded([&] {
    if (!jit || !out) return null_arg("code_publish: a NULL jit or out");
    *out = nullptr;
    if (entry) *entry = nullptr;
    if (nsites && !sites) return null_arg("code_publish: a NULL site table with a nonzero count");
    std::vector<RawSite> table(nsites);
    // A call/jump target that some part of the heap cannot reach directly is published
    // as a branch to the site itself and retargeted before this returns (nobody has the
    // entry yet): the patcher sends it through a veneer, a far jump through a data slot.
    const auto heap_lo = reinterpret_cast<std::uint64_t>(jit->heap->rx_begin());
    const auto heap_hi = reinterpret_cast<std::uint64_t>(jit->heap->rx_end());
    auto reaches = [&](std::uint64_t target) {
#if defined(__x86_64__)
      return arch::x86_64::rel32_in_reach(heap_lo, target) && arch::x86_64::rel32_in_reach(heap_hi, target);
#else
      return arch::aarch64::b_in_reach(heap_lo, target) && arch::aarch64::b_in_reach(heap_hi, target);
#endif
    };
    std::vector<std::pair<std::size_t, const void*>> far;
    for (std::size_t i = 0; i < nsites; ++i) {
      const jitpatch_site_desc& d = sites[i];
      if (enum_value(d.kind) < JITPATCH_SITE_CALL || enum_value(d.kind) > JITPATCH_SITE_ENTRY)
        return fail(JITPATCH_E_INVALID_ARGUMENT, "code_publish: a site kind that does not exist");
      RawSite& r = table[i];
      r.kind = static_cast<SiteKind>(enum_value(d.kind));
      r.offset = d.offset;
      r.target_is_offset = d.target == nullptr;
      r.target = d.target ? reinterpret_cast<std::uint64_t>(d.target) : d.target_offset;
      r.on = d.on != 0;
      if (d.name) r.name = d.name;
      const bool branch = d.kind == JITPATCH_SITE_CALL || d.kind == JITPATCH_SITE_JUMP;
      if (branch && d.target && !reaches(r.target)) {
        far.emplace_back(i, d.target);
        r.target = d.offset;
        r.target_is_offset = true;
      }
    }
    auto c = std::make_unique<jitpatch_code>(jitpatch_code{jit, {}});
    auto ref = jit->emitter->publish(name && *name ? name : "jitpatch_code", code, size, table.data(), nsites,
                                     entry_offset);
    if (!ref.ok()) return fail(ref.status());
    if (!far.empty()) {
      PatchBatch b(*jit->patcher);
      for (const auto& [i, target] : far) b.retarget((*ref)->sites()[i], target);
      if (Status st = b.commit(); !st) {
        const std::string detail = Patcher::last_error_detail();
        (void)jit->emitter->free(*ref);
        return fail(st, detail);
      }
    }
    c->ref = *ref;
    {
      std::lock_guard<std::mutex> g(jit->codes_mu);
      c->next = jit->codes;
      if (jit->codes) jit->codes->prev = c.get();
      jit->codes = c.get();
    }
    if (entry) *entry = c->ref->entry();
    *out = c.release();
    return JITPATCH_OK;
  });
}

void* jitpatch_code_entry(const jitpatch_code* code) { return code && code->ref.valid() ? code->ref->entry() : nullptr; }
void* jitpatch_code_start(const jitpatch_code* code) { return code && code->ref.valid() ? code->ref->begin() : nullptr; }
std::size_t jitpatch_code_size(const jitpatch_code* code) { return code && code->ref.valid() ? code->ref->size() : 0; }
std::size_t jitpatch_code_site_count(const jitpatch_code* code) {
  return code && code->ref.valid() ? code->ref->sites().size() : 0;
}

jitpatch_status jitpatch_code_site_address(const jitpatch_code* code, std::size_t site, void** out) {
  return guarded([&] {
    if (!out) return null_arg("code_site_address: a NULL out");
    if (jitpatch_status st = usable_code(code)) return st;
    if (site >= code->ref->sites().size()) return fail(JITPATCH_E_INVALID_ARGUMENT, "code_site_address: no such site");
    *out = code->ref->sites()[site].address;
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_code_free(jitpatch_code* code) {
  return guarded([&] {
    if (!code) return null_arg("code_free: a NULL code handle");
    if (Status st = code->jit->emitter->free(code->ref); !st) return fail(st);
    unlink_code(code);
    delete code;
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_code_retire(jitpatch_code* code) {
  return guarded([&] {
    if (!code) return null_arg("code_retire: a NULL code handle");
    if (Status st = retire_code(*code->jit->grace.d, *code->jit->emitter, code->ref); !st) return fail(st);
    unlink_code(code);
    delete code;
    return JITPATCH_OK;
  });
}

// ---- patching --------------------------------------------------------------------------

jitpatch_status jitpatch_batch_create(jitpatch_jit* jit, jitpatch_batch** out) {
  return guarded([&] {
    if (!jit || !out) return null_arg("batch_create: a NULL jit or out");
    *out = new jitpatch_batch{jit, PatchBatch(*jit->patcher)};
    return JITPATCH_OK;
  });
}

void jitpatch_batch_destroy(jitpatch_batch* batch) { delete batch; }

jitpatch_status jitpatch_batch_retarget(jitpatch_batch* batch, jitpatch_code* code, std::size_t site,
                                        const void* target) {
  return guarded([&] {
    const PatchSite* s = nullptr;
    if (jitpatch_status st = site_of(batch, code, site, &s)) return st;
    if (s->kind != SiteKind::call && s->kind != SiteKind::jump)
      return fail(JITPATCH_E_INVALID_ARGUMENT, "batch_retarget: the site is not a call or jump site");
    batch->b.retarget(*s, target);
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_batch_set_toggle(jitpatch_batch* batch, jitpatch_code* code, std::size_t site, int on) {
  return guarded([&] {
    const PatchSite* s = nullptr;
    if (jitpatch_status st = site_of(batch, code, site, &s)) return st;
    if (s->kind != SiteKind::toggle) return fail(JITPATCH_E_INVALID_ARGUMENT, "batch_set_toggle: the site is not a toggle");
    batch->b.set_toggle(*s, on != 0);
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_batch_write_slot(jitpatch_batch* batch, jitpatch_code* code, std::size_t site,
                                          std::uint64_t value) {
  return guarded([&] {
    const PatchSite* s = nullptr;
    if (jitpatch_status st = site_of(batch, code, site, &s)) return st;
    if (s->kind != SiteKind::data_slot)
      return fail(JITPATCH_E_INVALID_ARGUMENT, "batch_write_slot: the site is not a data slot");
    batch->b.write_slot(*s, value);
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_batch_redirect_entry(jitpatch_batch* batch, jitpatch_code* code, const void* target) {
  return guarded([&] {
    if (!batch) return null_arg("batch_redirect_entry: a NULL batch");
    if (jitpatch_status st = usable_code(code)) return st;
    if (code->jit != batch->jit) return fail(JITPATCH_E_INVALID_ARGUMENT, "batch_redirect_entry: code of another jit");
    batch->b.redirect_entry(*code->ref, target);
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_batch_restore_entry(jitpatch_batch* batch, jitpatch_code* code) {
  return guarded([&] {
    if (!batch) return null_arg("batch_restore_entry: a NULL batch");
    if (jitpatch_status st = usable_code(code)) return st;
    if (code->jit != batch->jit) return fail(JITPATCH_E_INVALID_ARGUMENT, "batch_restore_entry: code of another jit");
    batch->b.restore_entry(*code->ref);
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_batch_replace(jitpatch_batch* batch, void* at, const void* bytes, std::size_t n) {
  return guarded([&] {
    if (!batch || !at || !bytes) return null_arg("batch_replace: a NULL batch, address or bytes");
    if (n == 0 || n > 16) return fail(JITPATCH_E_INVALID_ARGUMENT, "batch_replace: 1 to 16 bytes");
    batch->b.replace(static_cast<std::byte*>(at), bytes, n);
    return JITPATCH_OK;
  });
}

std::size_t jitpatch_batch_size(const jitpatch_batch* batch) { return batch ? batch->b.size() : 0; }
void jitpatch_batch_clear(jitpatch_batch* batch) {
  if (batch) batch->b.clear();
}

jitpatch_status jitpatch_batch_commit(jitpatch_batch* batch) {
  return guarded([&] {
    if (!batch) return null_arg("batch_commit: a NULL batch");
    Status st = batch->b.commit();
    return st.ok() ? JITPATCH_OK : fail(st, Patcher::last_error_detail());
  });
}

jitpatch_status jitpatch_batch_try_commit(jitpatch_batch* batch) {
  return guarded([&] {
    if (!batch) return null_arg("batch_try_commit: a NULL batch");
    Status st = batch->b.try_commit();
    return st.ok() ? JITPATCH_OK : fail(st, Patcher::last_error_detail());
  });
}

// ---- reclamation -----------------------------------------------------------------------

void jitpatch_grace_options_init(jitpatch_grace_options* o) {
  if (!o) return;
  const GraceOptions d;
  o->symmetric = d.symmetric;
  o->background_reclaimer = d.background_reclaimer;
  o->retire_capacity = d.retire_capacity;
  o->spin_before_sleep = d.spin_before_sleep;
}

jitpatch_status jitpatch_grace_create(jitpatch_runtime* rt, const jitpatch_grace_options* options,
                                      jitpatch_grace_domain** out) {
  return guarded([&] {
    if (!rt || !out) return null_arg("grace_create: a NULL runtime or out");
    *out = nullptr;
    GraceOptions o;
    if (options) {
      o.symmetric = options->symmetric != 0;
      o.background_reclaimer = options->background_reclaimer != 0;
      o.retire_capacity = options->retire_capacity;
      o.spin_before_sleep = options->spin_before_sleep;
    }
    auto h = std::make_unique<jitpatch_grace_domain>();
    auto d = GraceDomain::create(*rt->rt, o);
    if (!d.ok()) return fail(d.status());
    h->owner = rt;
    h->owned = std::move(d).value();
    h->d = h->owned.get();
    add_user(rt);
    *out = h.release();
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_grace_destroy(jitpatch_grace_domain* domain) {
  return guarded([&] {
    if (!domain) return null_arg("grace_destroy: a NULL domain");
    jitpatch_runtime* rt = domain->owner;
    {
      std::lock_guard<std::mutex> g(rt->mu);
      if (domain->jit_owned) return fail(JITPATCH_E_INVALID_ARGUMENT, "grace_destroy: a jit's own domain (jit_destroy destroys it)");
      if (domain->riders != 0 || domain->d->reader_count() != 0)
        return fail(JITPATCH_E_BUSY, "grace_destroy: readers are registered or safepoints ride on it");
    }
    for (const auto& [r, reader] : t_locals.readers)
      if (reader.domain() == domain->d) return fail(JITPATCH_E_BUSY, "grace_destroy: this thread's reader is registered");
    delete domain;
    remove_user(rt);
    return JITPATCH_OK;
  });
}

jitpatch_grace_domain* jitpatch_jit_grace(jitpatch_jit* jit) { return jit ? &jit->grace : nullptr; }

jitpatch_status jitpatch_grace_register_reader(jitpatch_grace_domain* domain, jitpatch_reader_kind kind,
                                               jitpatch_grace_reader** out) {
  return guarded([&] {
    if (!domain || !out) return null_arg("grace_register_reader: a NULL domain or out");
    *out = nullptr;
    if (enum_value(kind) != JITPATCH_READER_CRITICAL_SECTION && enum_value(kind) != JITPATCH_READER_QSBR)
      return fail(JITPATCH_E_INVALID_ARGUMENT, "grace_register_reader: a reader kind that does not exist");
    t_locals.readers.reserve(t_locals.readers.size() + 1);  // the push_back below cannot throw then
    auto r = domain->d->register_reader(enum_value(kind) == JITPATCH_READER_QSBR ? ReaderKind::qsbr : ReaderKind::critical_section);
    if (!r.ok()) return fail(r.status());
    auto* rec = reinterpret_cast<jitpatch_grace_reader*>(r->record());
    t_locals.readers.emplace_back(rec, std::move(r).value());
    *out = rec;
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_grace_unregister_reader(jitpatch_grace_reader* reader) {
  return guarded([&] {
    if (!reader) return null_arg("grace_unregister_reader: a NULL reader");
    auto& v = t_locals.readers;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (v[i].first != reader) continue;
      if (v[i].second.in_section())
        return fail(JITPATCH_E_INVALID_ARGUMENT, "grace_unregister_reader: inside a read-side section");
      v.erase(v.begin() + static_cast<std::ptrdiff_t>(i));
      return JITPATCH_OK;
    }
    return fail(JITPATCH_E_INVALID_ARGUMENT, "grace_unregister_reader: not a reader this thread registered");
  });
}

jitpatch_status jitpatch_grace_synchronize(jitpatch_grace_domain* domain) {
  return guarded([&] { return domain ? check(domain->d->synchronize()) : null_arg("grace_synchronize: a NULL domain"); });
}

jitpatch_status jitpatch_grace_synchronize_until(jitpatch_grace_domain* domain, std::uint64_t deadline_ns) {
  return guarded([&] {
    return domain ? check(domain->d->synchronize(monotonic(deadline_ns))) : null_arg("grace_synchronize_until: a NULL domain");
  });
}

jitpatch_status jitpatch_grace_retire(jitpatch_grace_domain* domain, void* p, void (*fn)(void* p, void* ctx), void* ctx) {
  return guarded([&] {
    if (!domain || !fn) return null_arg("grace_retire: a NULL domain or callback");
    // The C++ callback takes (ctx, p); a small record carries the C one's three words.
    struct Call {
      void (*fn)(void*, void*);
      void* p;
      void* ctx;
    };
    auto* call = new Call{fn, p, ctx};
    Status st = domain->d->retire(call, [](void* q) {
      std::unique_ptr<Call> c(static_cast<Call*>(q));
      c->fn(c->p, c->ctx);
    });
    if (!st.ok()) delete call;
    return check(st);
  });
}

jitpatch_status jitpatch_grace_barrier(jitpatch_grace_domain* domain, std::uint64_t deadline_ns) {
  return guarded([&] {
    if (!domain) return null_arg("grace_barrier: a NULL domain");
    return check(deadline_ns ? domain->d->barrier(monotonic(deadline_ns)) : domain->d->barrier());
  });
}

void jitpatch_grace_wake_(void* domain) { detail::grace_wake(static_cast<GraceDomain*>(domain)); }

// ---- safepoints ------------------------------------------------------------------------

void jitpatch_safepoint_options_init(jitpatch_safepoint_options* o) {
  if (!o) return;
  const SafepointOptions d;
  *o = jitpatch_safepoint_options{};
  o->mode = JITPATCH_SAFEPOINT_AUTOMATIC;
  o->timeout_ms = static_cast<std::uint32_t>(d.timeout.count());
}

jitpatch_status jitpatch_safepoints_create(jitpatch_runtime* rt, const jitpatch_safepoint_options* options,
                                           jitpatch_safepoints** out) {
  return guarded([&] {
    if (!rt || !out) return null_arg("safepoints_create: a NULL runtime or out");
    *out = nullptr;
    SafepointOptions o;
    jitpatch_grace_domain* grace = nullptr;
    if (options) {
      if (enum_value(options->mode) < JITPATCH_SAFEPOINT_AUTOMATIC || enum_value(options->mode) > JITPATCH_SAFEPOINT_SYMMETRIC)
        return fail(JITPATCH_E_INVALID_ARGUMENT, "safepoints_create: a mode that does not exist");
      if (options->timeout_ms == 0) return fail(JITPATCH_E_INVALID_ARGUMENT, "safepoints_create: a zero timeout");
      o.mode = static_cast<SafepointMode>(enum_value(options->mode));
      o.poll_kinds = poll_word | (options->page_poll ? page_poll : 0u);
      o.timeout = std::chrono::milliseconds(options->timeout_ms);
      grace = options->grace;
      if (grace && grace->owner != rt)
        return fail(JITPATCH_E_INVALID_ARGUMENT, "safepoints_create: a grace domain of another runtime");
      o.grace = grace ? grace->d : nullptr;
    }
    auto h = std::make_unique<jitpatch_safepoints>();
    auto sp = Safepoints::create(*rt->rt, o);
    if (!sp.ok()) return fail(sp.status());
    h->owner = rt;
    h->sp = std::move(sp).value();
    h->grace = grace;
    {
      std::lock_guard<std::mutex> g(rt->mu);
      ++rt->users;
      if (grace) ++grace->riders;
    }
    *out = h.release();
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_safepoints_destroy(jitpatch_safepoints* sp) {
  return guarded([&] {
    if (!sp) return null_arg("safepoints_destroy: a NULL safepoints");
    if (sp->sp->thread_count() != 0) return fail(JITPATCH_E_BUSY, "safepoints_destroy: threads are still attached");
    if (sp->sp->in_stop()) return fail(JITPATCH_E_BUSY, "safepoints_destroy: from inside a stop");
    jitpatch_runtime* rt = sp->owner;
    jitpatch_grace_domain* grace = sp->grace;
    delete sp;
    std::lock_guard<std::mutex> g(rt->mu);
    --rt->users;
    if (grace) --grace->riders;
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_safepoint_attach(jitpatch_safepoints* sp, jitpatch_safepoint_thread** out) {
  return guarded([&] {
    if (!sp || !out) return null_arg("safepoint_attach: a NULL safepoints or out");
    *out = nullptr;
    t_locals.safepoints.reserve(t_locals.safepoints.size() + 1);
    auto a = sp->sp->attach_current_thread();
    if (!a.ok()) return fail(a.status());
    SafepointThread* t = a->thread();
    t_locals.safepoints.emplace_back(sp, std::move(a).value());
    *out = reinterpret_cast<jitpatch_safepoint_thread*>(t);
    return JITPATCH_OK;
  });
}

jitpatch_status jitpatch_safepoint_detach(jitpatch_safepoints* sp) {
  return guarded([&] {
    if (!sp) return null_arg("safepoint_detach: a NULL safepoints");
    auto& v = t_locals.safepoints;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (v[i].first != sp) continue;
      Status st = v[i].second.detach();
      if (!st.ok()) return fail(st);
      v.erase(v.begin() + static_cast<std::ptrdiff_t>(i));
      return JITPATCH_OK;
    }
    return fail(JITPATCH_E_NOT_ATTACHED, "safepoint_detach: this thread is not attached to it");
  });
}

jitpatch_status jitpatch_safepoint_enter_managed(void) {
  return guarded([] { return check(safepoint::enter_managed()); });
}
jitpatch_status jitpatch_safepoint_enter_native(void) {
  return guarded([] { return check(safepoint::enter_native()); });
}
jitpatch_status jitpatch_safepoint_enter_blocked(void) {
  return guarded([] { return check(safepoint::enter_blocked()); });
}

jitpatch_thread_state jitpatch_safepoint_state(const jitpatch_safepoint_thread* t) {
  if (!t) return JITPATCH_STATE_NATIVE;
  return static_cast<jitpatch_thread_state>(reinterpret_cast<const SafepointThread*>(t)->state());
}

void jitpatch_safepoint_poll_slow(jitpatch_safepoint_thread* t) {
  if (!t || reinterpret_cast<SafepointThread*>(t) != SafepointThread::current()) return;
  detail::safepoint_slow(reinterpret_cast<SafepointThread*>(t), __builtin_return_address(0));
}

jitpatch_status jitpatch_safepoint_stop_the_world(jitpatch_safepoints* sp, void (*fn)(void* ctx), void* ctx) {
  return guarded([&] {
    if (!sp || !fn) return null_arg("safepoint_stop_the_world: a NULL safepoints or callback");
    return check(sp->sp->stop_the_world([&] { fn(ctx); }));
  });
}

jitpatch_status jitpatch_safepoint_handshake(jitpatch_safepoints* sp, jitpatch_safepoint_thread* target,
                                             void (*fn)(jitpatch_safepoint_thread* t, void* ctx), void* ctx) {
  return guarded([&] {
    if (!sp || !target || !fn) return null_arg("safepoint_handshake: a NULL safepoints, target or callback");
    return check(sp->sp->handshake(reinterpret_cast<SafepointThread*>(target), [&](SafepointThread& t) {
      fn(reinterpret_cast<jitpatch_safepoint_thread*>(&t), ctx);
    }));
  });
}

jitpatch_status jitpatch_safepoint_handshake_all(jitpatch_safepoints* sp,
                                                 void (*fn)(jitpatch_safepoint_thread* t, void* ctx), void* ctx) {
  return guarded([&] {
    if (!sp || !fn) return null_arg("safepoint_handshake_all: a NULL safepoints or callback");
    return check(sp->sp->handshake_all([&](SafepointThread& t) {
      fn(reinterpret_cast<jitpatch_safepoint_thread*>(&t), ctx);
    }));
  });
}

}  // extern "C"
