# Cross toolchain: Debian 12 amd64 host -> aarch64 (arm64) Linux, run under qemu-user.
# Relies on Debian multiarch (no separate sysroot): arm64 -dev packages install into
# /usr/lib/aarch64-linux-gnu next to the amd64 ones, the arm64 libc/libstdc++ and the
# dynamic loader live in /usr/aarch64-linux-gnu (from g++-aarch64-linux-gnu).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Makes find_package() look in /usr/lib/aarch64-linux-gnu/cmake (asmjit's arm64 config)
# and find_library() in /usr/lib/aarch64-linux-gnu before any amd64 directory.
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)

# pkg-config would otherwise hand out the amd64 capstone.pc. PKG_CONFIG_LIBDIR replaces
# the default search path; clearing PKG_CONFIG_PATH keeps a user's amd64 paths out.
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "")

# catch_discover_tests and ctest run test binaries through this.
# -L: qemu resolves the guest's absolute paths under /usr/aarch64-linux-gnu first and
#   falls back to the host path, so the loader and libstdc++ come from the cross
#   toolchain (libc6-arm64-cross, libstdc++6-arm64-cross).
# LD_LIBRARY_PATH: the arm64 -dev packages pull in the multiarch libc6:arm64 (a newer
#   2.36 build in /lib/aarch64-linux-gnu), which the cross loader would otherwise pick
#   from its default directories. A loader and libc from different glibc builds hang in
#   the first pthread_create (spinning in libc; seen with qemu 7.2 here), so pin libc to
#   the loader's own build. libcapstone.so.4 is not in that directory: the loader falls
#   back to /usr/lib/aarch64-linux-gnu and finds the shared arm64 one, so Capstone needs
#   neither static linking nor an rpath.
# JITPATCH_QEMU_USER=1: tells the tests they run under qemu-user, for the few checks that
#   qemu-user itself cannot run (tests/support/child.hpp, under_qemu_user()); the same
#   binaries in a real arm64 kernel (or on an arm64 core) run them.
set(CMAKE_CROSSCOMPILING_EMULATOR
    qemu-aarch64;-L;/usr/aarch64-linux-gnu;-E;LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib;-E;JITPATCH_QEMU_USER=1)
