/* Choosing the instruction set: once, at first use, from the CPU's features; EDGELLM_ISA may force a lower
 * level (tests run every level the machine has). x86-64: generic < avx2 < avx512vnni < amx; aarch64: generic <
 * neon < neon-dotprod. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "edgellm.h"
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

enum { ISA_GENERIC, ISA_AVX2, ISA_VNNI, ISA_AMX, ISA_NEON, ISA_NEON_DOTPROD, ISA_COUNT };
static const char *const isa_names[ISA_COUNT] = { "generic", "avx2", "avx512vnni", "amx", "neon", "neon-dotprod" };

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
/* AMX-INT8 usable by this process: the CPU has it (CPUID 7.0 EDX bits 24, 25), the OS saves the tile state (XCR0
 * bits 17, 18), and Linux grants this process the tile data state (arch_prctl, Linux 5.16+; the request is
 * process-wide and idempotent). A VM that hides or refuses any of it leaves AMX off. */
static int amx_usable(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;   /* OSXSAVE */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}
#endif

static el_kernels tables[ISA_COUNT];
static int isa_ok[ISA_COUNT];
static int isa_best = ISA_GENERIC;
static pthread_once_t once = PTHREAD_ONCE_INIT;
const el_kernels *el_k;

static int set_isa(const char *name);
static void detect(void) {
    isa_ok[ISA_GENERIC] = 1;
    el_fill_generic(&tables[ISA_GENERIC]);
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        isa_ok[ISA_AVX2] = 1;
        el_fill_avx2(&tables[ISA_AVX2]);
        isa_best = ISA_AVX2;
        if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw")) {
            isa_ok[ISA_VNNI] = 1;
            el_fill_vnni(&tables[ISA_VNNI]);
            isa_best = ISA_VNNI;
#if defined(__linux__)
            if (amx_usable()) {
                isa_ok[ISA_AMX] = 1;
                el_fill_amx(&tables[ISA_AMX]);
                isa_best = ISA_AMX;
            }
#endif
        }
    }
#elif defined(__aarch64__)
    /* Advanced SIMD is mandatory on AArch64; the dot-product extension (sdot) is optional */
    isa_ok[ISA_NEON] = 1;
    el_fill_neon(&tables[ISA_NEON], 0);
    isa_best = ISA_NEON;
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) {
        isa_ok[ISA_NEON_DOTPROD] = 1;
        el_fill_neon(&tables[ISA_NEON_DOTPROD], 1);
        isa_best = ISA_NEON_DOTPROD;
    }
#endif
#endif
    el_k = &tables[isa_best];
    const char *env = getenv("EDGELLM_ISA");
    if (env && *env) set_isa(env);   /* unknown or unsupported: keep the best */
}

void el_init(void) { pthread_once(&once, detect); }

static int set_isa(const char *name) {   /* without el_init: detect() calls it inside pthread_once */
    for (int i = 0; i < ISA_COUNT; i++)
        if (strcmp(name, isa_names[i]) == 0) {
            if (!isa_ok[i]) return -1;
            el_k = &tables[i];
            return 0;
        }
    return -1;
}

int el_set_isa(const char *name) { el_init(); return set_isa(name); }

const char *el_isa(void) { el_init(); return el_k->name; }

int el_isa_available(const char *name) {
    el_init();
    for (int i = 0; i < ISA_COUNT; i++)
        if (strcmp(name, isa_names[i]) == 0) return isa_ok[i];
    return 0;
}
const char *el_isa_best(void) { el_init(); return isa_names[isa_best]; }
