/* The machine's bounds, measured: streaming read bandwidth (1..T threads summing a 2 GiB buffer, each reading its
 * part as one stream, then as 4 side by side), the f32 FMA
 * peak, the int8 dot-product peaks (AVX512-VNNI vpdpbusd at 256 and 512 bits, AMX-INT8 tdpbusd) per core.
 * BENCHMARKS.md's "% of peak" and "% of bandwidth" columns divide by these.
 *
 *     gcc -O2 -pthread -o /tmp/machine_peaks bench/machine_peaks.c && /tmp/machine_peaks [threads]
 *
 * x86-64 only (the ISA parts it lacks print "n/a"). Each figure is the best of 5 runs; independent
 * accumulators (12 FMA chains, 8 dpbusd chains, 4 tile accumulators) so latency never limits. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ---- bandwidth */
typedef struct { const float *p; size_t n; int streams; float sum; } part;

/* sum the part, reading `streams` equal pieces of it side by side (256 bytes of each in turn): one stream per thread
 * is the plain reader; several let the core's hardware prefetchers keep more lines in flight */
__attribute__((target("avx2"))) static void *sum_part(void *arg) {
    part *pt = arg;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const size_t len = pt->n / pt->streams / 64 * 64;
    for (size_t i = 0; i < len; i += 64)
        for (int s = 0; s < pt->streams; s++) {
            const float *q = pt->p + s * len + i;
            a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_load_ps(q), _mm256_load_ps(q + 8)));
            a1 = _mm256_add_ps(a1, _mm256_add_ps(_mm256_load_ps(q + 16), _mm256_load_ps(q + 24)));
            a2 = _mm256_add_ps(a2, _mm256_add_ps(_mm256_load_ps(q + 32), _mm256_load_ps(q + 40)));
            a3 = _mm256_add_ps(a3, _mm256_add_ps(_mm256_load_ps(q + 48), _mm256_load_ps(q + 56)));
        }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    pt->sum = t[0];
    return NULL;
}

static double bandwidth(const float *buf, size_t n, int threads, int streams) {
    double best = 0;
    for (int r = 0; r < 5; r++) {
        pthread_t th[64];
        part pt[64];
        const double t0 = now();
        for (int i = 0; i < threads; i++) {
            pt[i].p = buf + n / threads * i;
            pt[i].n = n / threads;
            pt[i].streams = streams;
            pthread_create(&th[i], NULL, sum_part, &pt[i]);
        }
        for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
        const double gbs = n * 4.0 / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

/* ---- compute peaks: one core, independent chains, counts of instructions per second */
#define REPS 50000000L
__attribute__((target("avx512f"))) static double fma_zmm(void) {
    long n = REPS;
    const double t0 = now();
    __asm__ volatile(
        "vxorps %%zmm0,%%zmm0,%%zmm0\n vmovaps %%zmm0,%%zmm1\n vmovaps %%zmm0,%%zmm2\n vmovaps %%zmm0,%%zmm3\n"
        "vmovaps %%zmm0,%%zmm4\n vmovaps %%zmm0,%%zmm5\n vmovaps %%zmm0,%%zmm6\n vmovaps %%zmm0,%%zmm7\n"
        "vmovaps %%zmm0,%%zmm8\n vmovaps %%zmm0,%%zmm9\n vmovaps %%zmm0,%%zmm10\n vmovaps %%zmm0,%%zmm11\n"
        "1:\n"
        "vfmadd231ps %%zmm12,%%zmm13,%%zmm0\n vfmadd231ps %%zmm12,%%zmm13,%%zmm1\n vfmadd231ps %%zmm12,%%zmm13,%%zmm2\n"
        "vfmadd231ps %%zmm12,%%zmm13,%%zmm3\n vfmadd231ps %%zmm12,%%zmm13,%%zmm4\n vfmadd231ps %%zmm12,%%zmm13,%%zmm5\n"
        "vfmadd231ps %%zmm12,%%zmm13,%%zmm6\n vfmadd231ps %%zmm12,%%zmm13,%%zmm7\n vfmadd231ps %%zmm12,%%zmm13,%%zmm8\n"
        "vfmadd231ps %%zmm12,%%zmm13,%%zmm9\n vfmadd231ps %%zmm12,%%zmm13,%%zmm10\n vfmadd231ps %%zmm12,%%zmm13,%%zmm11\n"
        "dec %0\n jnz 1b\n"
        : "+r"(n)::"zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11");
    return REPS * 12.0 * 16 / (now() - t0) / 1e9;   /* f32 multiply-adds */
}

#define DP8(R) "vpdpbusd %%" R "12,%%" R "13,%%" R "0\n vpdpbusd %%" R "12,%%" R "13,%%" R "1\n" \
               "vpdpbusd %%" R "12,%%" R "13,%%" R "2\n vpdpbusd %%" R "12,%%" R "13,%%" R "3\n" \
               "vpdpbusd %%" R "12,%%" R "13,%%" R "4\n vpdpbusd %%" R "12,%%" R "13,%%" R "5\n" \
               "vpdpbusd %%" R "12,%%" R "13,%%" R "6\n vpdpbusd %%" R "12,%%" R "13,%%" R "7\n"
__attribute__((target("avx512f,avx512vl,avx512vnni"))) static double vnni(int zmm) {
    long n = REPS;
    const double t0 = now();
    if (zmm)
        __asm__ volatile("1:\n" DP8("zmm") "dec %0\n jnz 1b\n" : "+r"(n)::"zmm0", "zmm1", "zmm2", "zmm3", "zmm4",
                         "zmm5", "zmm6", "zmm7");
    else
        __asm__ volatile("1:\n" DP8("ymm") "dec %0\n jnz 1b\n" : "+r"(n)::"ymm0", "ymm1", "ymm2", "ymm3", "ymm4",
                         "ymm5", "ymm6", "ymm7");
    return REPS * 8.0 * (zmm ? 64 : 32) / (now() - t0) / 1e9;   /* int8 multiply-adds */
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;
__attribute__((target("amx-tile,amx-int8"))) static double amx(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 0;
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
    _tile_loadconfig(&c);
    static uint8_t a[1024] __attribute__((aligned(64)));
    _tile_loadd(4, a, 64); _tile_loadd(5, a, 64); _tile_loadd(6, a, 64); _tile_loadd(7, a, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const long n = REPS / 10;
    const double t0 = now();
    for (long i = 0; i < n; i++) {   /* 2 x 2 blocking: each A and B tile feeds two products */
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
    }
    const double dt = now() - t0;
    _tile_release();
    return n * 4.0 * 16 * 16 * 64 / dt / 1e9;
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    const size_t n = (size_t)1 << 29;   /* 2 GiB of floats */
    float *buf = aligned_alloc(64, n * 4);
    if (!buf) { fprintf(stderr, "no memory for 2 GiB\n"); return 1; }
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
    for (int streams = 1; streams <= 4; streams *= 4) {
        printf("streaming read, 2 GiB buffer, %d stream%s a thread:", streams, streams > 1 ? "s" : "");
        for (int t = 1; t <= threads; t++) printf("  %d thread%s %.1f GB/s", t, t > 1 ? "s" : "", bandwidth(buf, n, t, streams));
        printf("\n");
    }
    free(buf);
    __builtin_cpu_init();
    double best;
    best = 0; for (int r = 0; r < 5; r++) { double v = fma_zmm(); if (v > best) best = v; }
    printf("f32 FMA (zmm), one core: %.1f GMAC/s\n", __builtin_cpu_supports("avx512f") ? best : 0.0);
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) {
        for (int z = 0; z < 2; z++) {
            best = 0; for (int r = 0; r < 5; r++) { double v = vnni(z); if (v > best) best = v; }
            printf("int8 vpdpbusd (%s), one core: %.1f GMAC/s\n", z ? "zmm" : "ymm", best);
        }
    } else {
        printf("int8 vpdpbusd: n/a\n");
    }
    best = 0; for (int r = 0; r < 5; r++) { double v = amx(); if (v > best) best = v; }
    if (best > 0) printf("int8 AMX tdpbusd, one core: %.1f GMAC/s\n", best);
    else printf("int8 AMX: n/a\n");
    return 0;
}
