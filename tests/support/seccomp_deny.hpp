// seccomp filters that make membarrier fail the ways real systems do (fault tests only;
// install them in a forked child: a filter cannot be removed).
#pragma once

#include <seccomp.h>

#include <cstring>
#include <initializer_list>
#include <string>

namespace jitpatch::test {

// Make membarrier fail with `err`: every command (cmd_only < 0), or only the command
// `cmd_only` and the registration `reg_only`. "" on success, else what went wrong.
inline std::string deny_membarrier(int err, long cmd_only = -1, long reg_only = -1) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (!ctx) return "seccomp_init failed";
  int rc;
  if (cmd_only < 0) {
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(membarrier), 0);
  } else {
    // Spelled out rather than SCMP_A0(): the macro leaves datum_b unset, which Clang warns about.
    const scmp_arg_cmp is_cmd{0, SCMP_CMP_EQ, static_cast<scmp_datum_t>(cmd_only), 0};
    const scmp_arg_cmp is_reg{0, SCMP_CMP_EQ, static_cast<scmp_datum_t>(reg_only), 0};
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(membarrier), 1, is_cmd);
    if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(membarrier), 1, is_reg);
  }
  if (rc == 0) rc = seccomp_load(ctx);
  seccomp_release(ctx);
  return rc == 0 ? "" : std::string("seccomp: ") + std::strerror(-rc);
}

// Make membarrier fail with `err` for each command (or registration) in `cmds` (its first
// argument equal to one of them); every other command passes. "" on success.
inline std::string deny_membarrier_commands(int err, std::initializer_list<long> cmds) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (!ctx) return "seccomp_init failed";
  int rc = 0;
  for (long c : cmds) {
    const scmp_arg_cmp is_cmd{0, SCMP_CMP_EQ, static_cast<scmp_datum_t>(c), 0};
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), SCMP_SYS(membarrier), 1, is_cmd);
    if (rc != 0) break;
  }
  if (rc == 0) rc = seccomp_load(ctx);
  seccomp_release(ctx);
  return rc == 0 ? "" : std::string("seccomp: ") + std::strerror(-rc);
}

}  // namespace jitpatch::test
