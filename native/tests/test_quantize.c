/* The weight quantizers of quantize.c without Python: every type on fixed pseudo-random data, through one thread and
 * through a pool of 3 (same bytes), llama.cpp's test-quantize-fns error bound after a round trip, bad arguments.
 * Prints one "hash TYPE BYTES FNV" line per type: run_arm.sh compares them between the host build and the aarch64
 * one under qemu, so the encoders give the same bytes on both (no FMA contraction, no ISA-dependent rounding).
 * Exit status 1 on any failure. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "edgellm.h"

static int fails = 0;
#define CHECK(cond, ...) do { if (!(cond)) { printf("FAIL: " __VA_ARGS__); printf("\n"); fails++; } } while (0)

static uint64_t fnv(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ull; }
    return h;
}

int main(void) {
    const int rows = 48, n = 1024;
    const int types[] = { EL_F32, EL_F16, EL_BF16, EL_Q4_0, EL_Q4_1, EL_Q5_0, EL_Q5_1, EL_Q8_0, EL_Q4_K, EL_Q5_K, EL_Q6_K };
    const char *names[] = { "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K" };
    float *x = malloc(sizeof(float) * rows * n), *y = malloc(sizeof(float) * rows * n);
    uint8_t *a = malloc((size_t)rows * n * 4), *b = malloc((size_t)rows * n * 4);
    uint32_t s = 12345;
    for (int i = 0; i < rows * n; i++) {   /* heavy-tailed, like weights, plus a few corner blocks */
        s = s * 1664525u + 1013904223u;
        const float u = (float)(s >> 8) / 16777216.0f - 0.5f;
        x[i] = u * u * u * 0.3f + (i % 97 == 0 ? 0.05f : 0.f);
    }
    for (int i = 0; i < 256; i++) x[i] = 0.f;              /* zeros */
    for (int i = 256; i < 512; i++) x[i] = 0.25f;          /* constant */
    for (int i = 512; i < 768; i++) x[i] *= 1e-30f;         /* f16 underflow of the scales */
    el_pool *pool = el_pool_new(3);

    for (int t = 0; t < (int)(sizeof types / sizeof types[0]); t++) {
        const size_t want = (size_t)rows * el_row_size(types[t], n);
        memset(a, 0xAB, want);
        memset(b, 0xCD, want);
        const size_t na = el_quantize_rows(NULL, types[t], x, a, rows, n);
        const size_t nb = el_quantize_rows(pool, types[t], x, b, rows, n);
        CHECK(na == want && nb == want, "%s: %zu / %zu bytes written, %zu expected", names[t], na, nb, want);
        CHECK(memcmp(a, b, want) == 0, "%s: 3 threads gave other bytes than 1", names[t]);
        printf("hash %-4s %7zu %016llx\n", names[t], want, (unsigned long long)fnv(a, want));

        /* test-quantize-fns: 0.1 + 2 cos(i), sqrt(sum of squared errors) / n <= 0.002 */
        const int m = 32 * 128;
        float *v = malloc(sizeof(float) * m), *w = malloc(sizeof(float) * m);
        for (int i = 0; i < m; i++) v[i] = 0.1f + 2.f * cosf((float)i);
        el_quantize_rows(pool, types[t], v, a, 1, m);
        CHECK(el_dequantize_rows(pool, types[t], a, w, 1, m) == sizeof(float) * m, "%s: dequantize", names[t]);
        double err = 0;
        for (int i = 0; i < m; i++) err += ((double)w[i] - v[i]) * ((double)w[i] - v[i]);
        CHECK(sqrt(err) / m <= 0.002, "%s: round-trip error %g above 0.002", names[t], sqrt(err) / m);
        free(v);
        free(w);
    }
    /* requantize == dequantize then quantize */
    el_quantize_rows(NULL, EL_F16, x, a, rows, n);
    CHECK(el_requantize_rows(pool, EL_F16, a, EL_Q4_K, b, rows, n) == (size_t)rows * el_row_size(EL_Q4_K, n), "requantize");
    el_dequantize_rows(NULL, EL_F16, a, y, rows, n);
    uint8_t *c = malloc((size_t)rows * n);
    el_quantize_rows(NULL, EL_Q4_K, y, c, rows, n);
    CHECK(memcmp(b, c, (size_t)rows * el_row_size(EL_Q4_K, n)) == 0, "requantize F16 -> Q4_K differs from the two steps");
    /* bad arguments */
    CHECK(el_quantize_rows(NULL, 99, x, a, 1, 32) == 0, "unknown type accepted");
    CHECK(el_quantize_rows(NULL, EL_Q4_K, x, a, 1, 288) == 0, "row of 288 accepted for Q4_K");
    CHECK(el_quantize_rows(NULL, EL_Q4_0, x, a, 0, 32) == 0, "0 rows accepted");
    CHECK(el_quantize_rows(NULL, EL_Q4_0, NULL, a, 1, 32) == 0, "NULL source accepted");
    CHECK(el_requantize_batch(pool, NULL, 1) == 0, "NULL batch accepted");

    el_pool_free(pool);
    free(x); free(y); free(a); free(b); free(c);
    printf("test_quantize: %d failed\n", fails);
    return fails != 0;
}
