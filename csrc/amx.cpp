// AMX permission and status (amx.h): whether the amx paths may run in this process, asked once.
// Plain C++: the tile instructions themselves are in amx_kernels.cpp.
#include "amx.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#if defined(__linux__) && defined(__x86_64__)
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#endif

#if defined(__linux__) && defined(__x86_64__)
namespace {
const int ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
const int SELFCHECK_SECONDS = 20;
}  // namespace

// the self-check in a forked child: "" when it agreed, else why not
std::string amx_selfcheck_forked() {
    amx_selfcheck_prepare();  // the expected answers and every buffer, before the fork
    const pid_t pid = fork();
    if (pid == 0) {  // the child: no core file if a tile instruction kills it; the tiles, then out
        const rlimit no_core{0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        _exit(amx_selfcheck_run(true));
    }
    if (pid < 0) return std::string("fork for the self-check: ") + std::strerror(errno);
    int status = 0;
    for (int waited_ms = 0;; ++waited_ms) {
        const pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) break;
        if (r < 0 && errno != EINTR) return std::string("waiting for the self-check: ") + std::strerror(errno);
        if (waited_ms >= SELFCHECK_SECONDS * 1000) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return "the self-check did not finish in " + std::to_string(SELFCHECK_SECONDS) + " s";
        }
        const timespec ms{0, 1000000};
        nanosleep(&ms, nullptr);
    }
    if (WIFSIGNALED(status))
        return std::string("the self-check died with ") + strsignal(WTERMSIG(status)) + " (signal " +
               std::to_string(WTERMSIG(status)) + ")";
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (code == 1) return "the self-check's int8 tile sums differ from the software tile unit's";
    if (code == 2) return "the self-check's bf16 tile products differ from the software tile unit's";
    if (code != 0) return "the self-check exited with status " + std::to_string(code);
    return "";
}
#else
std::string amx_selfcheck_forked() { return "AMX is an x86-64 Linux feature"; }
#endif

namespace {

AmxState compute_state() {
    AmxState s{false, false, ""};
#if defined(__linux__) && defined(__x86_64__)
    const char* env = std::getenv("PORTINFER_CPU_AMX");
    if (env && (!std::strcmp(env, "0") || !std::strcmp(env, "off"))) {
        s.status = std::string("disabled: PORTINFER_CPU_AMX=") + env + " (the permission was not asked for)";
        return s;
    }
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-int8")) {
        s.status = "absent: this CPU does not report amx-tile, amx-bf16 and amx-int8";
        return s;
    }
    if (!amx_vector_isa()) {
        s.status = "absent: the CPU reports AMX without the AVX512-BF16 and AVX512-VNNI the amx paths also use";
        return s;
    }
    const std::string refused = amx_request_permission();
    if (!refused.empty()) {
        s.status = "refused: " + refused;
        return s;
    }
    const std::string failed = amx_selfcheck_forked();
    if (!failed.empty()) {
        s.status = "failed: " + failed;
        return s;
    }
    s.bf16 = s.int8 = true;
    s.status = "usable";
#else
    s.status = "absent: AMX is an x86-64 Linux feature here";
#endif
    return s;
}

}  // namespace

bool amx_vector_isa() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

std::string amx_request_permission() {
#if defined(__linux__) && defined(__x86_64__)
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
        return std::string("the kernel refused arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): ") +
               std::strerror(errno);
    unsigned long bits = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits) != 0 || !(bits & (1ul << XFEATURE_XTILEDATA)))
        return "arch_prctl(ARCH_REQ_XCOMP_PERM) succeeded, but ARCH_GET_XCOMP_PERM does not list XFEATURE_XTILEDATA";
    return "";
#else
    return "AMX is an x86-64 Linux feature";
#endif
}

const AmxState& amx_state() {
    static const AmxState state = compute_state();
    return state;
}
