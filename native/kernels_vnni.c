/* x86-64 kernels for AVX512-VNNI at 256-bit width (EVEX vpdpbusd: AVX512VL + AVX512_VNNI), on top of the AVX2
 * table: the integer GEMMs change, and float weights (F32/F16/BF16) take 512-bit tiles. vpdpbusd does u8 x s8 -> 4 products -> int32 accumulate in one
 * instruction where AVX2 needs vpmaddubsw + vpaddw (+ vpmaddwd): half the vector work per block.
 * Same 8-row interleaved layouts as kernels_avx2.c (quants.h *_x8), so the repacked weights are shared. */
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "edgellm.h"
#include "pairs512.h"

#define INLINE static inline __attribute__((always_inline))
#define KEEP(v) __asm__("" : "+v"(v))   /* keep the accumulation chains in order (see kernels_avx2.c) */

INLINE __m256i bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

INLINE void store_rows(float *y, __m256 v, int nrows) {
    if (nrows == 8) { _mm256_storeu_ps(y, v); return; }
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    memcpy(y, tmp, (size_t)nrows * 4);
}

INLINE __m256i q5_high(__m256i hb, int g) {   /* bit g of each hb byte -> 0x10 (quants.h block_q5_*x8) */
    const __m256i m = _mm256_set1_epi8(0x10);
    switch (g) {
    case 0: return _mm256_and_si256(_mm256_slli_epi16(hb, 4), m);
    case 1: return _mm256_and_si256(_mm256_slli_epi16(hb, 3), m);
    case 2: return _mm256_and_si256(_mm256_slli_epi16(hb, 2), m);
    case 3: return _mm256_and_si256(_mm256_slli_epi16(hb, 1), m);
    case 4: return _mm256_and_si256(hb, m);
    case 5: return _mm256_and_si256(_mm256_srli_epi16(hb, 1), m);
    case 6: return _mm256_and_si256(_mm256_srli_epi16(hb, 2), m);
    default: return _mm256_and_si256(_mm256_srli_epi16(hb, 3), m);
    }
}

enum { K_Q4_0, K_Q4_1, K_Q5_0, K_Q5_1, K_Q8_0 };
enum { PF_GROUPS = 4 };     /* row groups ahead prefetched into L2 (the next one into L1) while one is computed */
enum { Q8_PRE_NB = 256 };   /* blocks (8192 inputs) up to which a Q8_0 GEMM of 2-16 tokens has its start terms once */

INLINE size_t x8_block_bytes(int kind) {   /* one block of a group of 8 rows */
    return kind == K_Q8_0 ? sizeof(block_q8_0x8) : kind == K_Q4_0 ? sizeof(block_q4_0x8)
         : kind == K_Q4_1 ? sizeof(block_q4_1x8) : kind == K_Q5_0 ? sizeof(block_q5_0x8) : sizeof(block_q5_1x8);
}

/* the hot spot on VNNI CPUs: 8 rows x NT tokens (NT <= 8: AVX-512VL's 32 registers hold 8 tokens' accumulators);
 * up to 4 tokens, two integer accumulators per token halve the vpdpbusd chains. Integer sums are exact, so a
 * token's result is the same bits in a tile of 1 or of 8 (the float epilogue is one sequence per token). */
INLINE void x8_tile(const uint8_t *wg, int nb, int kind, const uint8_t *x, size_t x_stride, int NT,
                    float *y, size_t y_stride, int nrows, const uint8_t *pf) {
    const int has_min = kind == K_Q4_1 || kind == K_Q5_1, q5 = kind == K_Q5_0 || kind == K_Q5_1;
    const size_t bsize = x8_block_bytes(kind);
    const float offset = kind == K_Q4_0 ? -8.0f : kind == K_Q5_0 ? -16.0f : 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const int two = NT <= 4;   /* a second accumulator per token */
    __m256 acc[8];
    for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wg + b * bsize;
        const uint8_t *qs = blk + (has_min ? 32 : 16);
        if (pf) {   /* the weights of a row group further on: DRAM streams in while this one computes */
            const uint8_t *p = pf + b * bsize, *q = blk + (size_t)nb * bsize;
            for (size_t o = 0; o < bsize; o += 64) {
                _mm_prefetch((const char *)p + o, _MM_HINT_T1);
                _mm_prefetch((const char *)q + o, _MM_HINT_T0);
            }
        }
        const block_q8a *a[8];
        for (int t = 0; t < NT; t++) a[t] = (const block_q8a *)(x + t * x_stride) + b;
        __m256i s0[8], s1[8];
        for (int t = 0; t < 8; t++) s0[t] = s1[t] = _mm256_setzero_si256();
        if (kind == K_Q8_0) {
            for (int g = 0; g < 8; g += 2) {
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
                const __m256i w1 = _mm256_loadu_si256((const __m256i *)(qs + 32 * g + 32));
                const __m256i aw0 = _mm256_abs_epi8(w0), aw1 = _mm256_abs_epi8(w1);  /* u8 operand: |w|, sign on a */
                for (int t = 0; t < NT; t++) {
                    s0[t] = _mm256_dpbusd_epi32(s0[t], aw0, _mm256_sign_epi8(bcast4(a[t]->qs + 4 * g), w0));
                    if (two) s1[t] = _mm256_dpbusd_epi32(s1[t], aw1, _mm256_sign_epi8(bcast4(a[t]->qs + 4 * g + 4), w1));
                    else s0[t] = _mm256_dpbusd_epi32(s0[t], aw1, _mm256_sign_epi8(bcast4(a[t]->qs + 4 * g + 4), w1));
                    KEEP(s0[t]); KEEP(s1[t]);
                }
            }
        } else {
            const __m256i hb = q5 ? _mm256_loadu_si256((const __m256i *)(qs + 128)) : _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                if (q5) { lo = _mm256_or_si256(lo, q5_high(hb, c)); hi = _mm256_or_si256(hi, q5_high(hb, c + 4)); }
                for (int t = 0; t < NT; t++) {
                    s0[t] = _mm256_dpbusd_epi32(s0[t], lo, bcast4(a[t]->qs + 4 * c));
                    if (two) s1[t] = _mm256_dpbusd_epi32(s1[t], hi, bcast4(a[t]->qs + 16 + 4 * c));
                    else s0[t] = _mm256_dpbusd_epi32(s0[t], hi, bcast4(a[t]->qs + 16 + 4 * c));
                    KEEP(s0[t]); KEEP(s1[t]);
                }
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const __m256 mw = has_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))) : dw;
        for (int t = 0; t < NT; t++) {
            const __m256 p = _mm256_cvtepi32_ps(two ? _mm256_add_epi32(s0[t], s1[t]) : s0[t]);
            if (has_min) {
                acc[t] = _mm256_fmadd_ps(dw, _mm256_mul_ps(p, _mm256_set1_ps(a[t]->d)), acc[t]);
                acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a[t]->s), acc[t]);
            } else if (kind == K_Q8_0) {
                acc[t] = _mm256_fmadd_ps(dw, _mm256_mul_ps(p, _mm256_set1_ps(a[t]->d)), acc[t]);
            } else {   /* d * (da * sum(q a) + offset * da * sum(a)) */
                acc[t] = _mm256_fmadd_ps(dw, _mm256_fmadd_ps(p, _mm256_set1_ps(a[t]->d), _mm256_set1_ps(offset * a[t]->s)), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) store_rows(y + t * y_stride, acc[t], nrows);
}

__attribute__((noinline)) static void x8_tile1(const uint8_t *wg, int nb, int kind, const uint8_t *x, float *y,
                                               int nrows, const uint8_t *pf) {
    x8_tile(wg, nb, kind, x, 0, 1, y, 0, nrows, pf);
}

/* Q8_0's tiles run (w ^ 0x80) . a = w . a + 128 sum(a), so each token's accumulator starts at -128 sum(a): the
 * block's integer sum recovered from s = d * sum (|sum| <= 4064: s / d rounds back to it exactly; a zero or subnormal
 * d comes with zero bytes, see el_q8a_inv), for NT tokens in one vector division; start[t] for block b */
INLINE void q8_0_starts(const uint8_t *x, size_t x_stride, int NT, int b, int32_t *start) {
    float dd[8] __attribute__((aligned(32))), ss[8] __attribute__((aligned(32)));
    for (int t = 0; t < 8; t++) {
        const block_q8a *a = (const block_q8a *)(x + t * x_stride) + b;
        dd[t] = t < NT ? a->d : 0.0f;
        ss[t] = t < NT ? a->s : 0.0f;
    }
    const __m256 dv = _mm256_load_ps(dd);
    const __m256i isum = _mm256_cvtps_epi32(_mm256_maskz_div_ps(_mm256_cmp_ps_mask(dv, _mm256_setzero_ps(), _CMP_NEQ_UQ),
                                                                _mm256_load_ps(ss), dv));
    _mm256_storeu_si256((__m256i *)start, _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(isum, 7)));
}

/* 16 rows (two neighbouring row groups) x NT tokens in 512-bit vectors: the same integer sums and the same float
 * epilogue per row and token as x8_tile, in half the instructions per row. Q8_0 has no 512-bit vpsignb: the sign of
 * w moves onto the activations with a masked negation (the same bytes vpsignb gives, as a zero w contributes
 * nothing either way). NT = 1 is the decode step: the out-of-order window reaches further into the weights
 * streaming from memory. w1 = w0 + one group; pf: PF_GROUPS groups ahead (into L2), the next pair into L1. pre: Q8_0's
 * start terms of this token tile, 8 a block (q8_0_starts), computed once for every row pair, or NULL. */
INLINE void x16_tile(const uint8_t *w0, size_t gstride, int nb, int kind, const uint8_t *x, size_t x_stride, int NT,
                     float *y, size_t y_stride, int nrows, const uint8_t *pf, const int32_t *pre) {
    const int has_min = kind == K_Q4_1 || kind == K_Q5_1, q5 = kind == K_Q5_0 || kind == K_Q5_1;
    const size_t bsize = x8_block_bytes(kind);
    const float offset = kind == K_Q4_0 ? -8.0f : kind == K_Q5_0 ? -16.0f : 0.0f;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const int two = NT <= 4;   /* a second accumulator per token */
    const uint8_t *w1 = w0 + gstride;
    __m512 acc[8];
    for (int t = 0; t < 8; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *b0 = w0 + b * bsize, *b1 = w1 + b * bsize;
        if (pf) {
            for (size_t o = 0; o < bsize; o += 64) {
                _mm_prefetch((const char *)pf + b * bsize + o, _MM_HINT_T1);
                _mm_prefetch((const char *)pf + gstride + b * bsize + o, _MM_HINT_T1);
                _mm_prefetch((const char *)b0 + 2 * gstride + o, _MM_HINT_T0);
                _mm_prefetch((const char *)b0 + 3 * gstride + o, _MM_HINT_T0);
            }
        }
        const block_q8a *a[8];
        for (int t = 0; t < NT; t++) a[t] = (const block_q8a *)(x + t * x_stride) + b;
        const uint8_t *q0 = b0 + (has_min ? 32 : 16), *q1 = b1 + (q0 - b0);
        __m512i s0[8], s1[8];
        for (int t = 0; t < 8; t++) s0[t] = s1[t] = _mm512_setzero_si512();
        if (kind == K_Q8_0) {   /* u8 x s8 without a per-token sign step (q8_0_starts) */
            int32_t here[8];
            const int32_t *start = pre ? pre + 8 * b : here;
            if (!pre) q8_0_starts(x, x_stride, NT, b, here);
            for (int t = 0; t < NT; t++) s0[t] = _mm512_set1_epi32(start[t]);
            const __m512i bias = _mm512_set1_epi8((char)0x80);
            for (int g = 0; g < 8; g += 2) {
                const __m512i u0 = _mm512_xor_si512(el_pair256(q0 + 32 * g, q1 + 32 * g), bias);
                const __m512i u1 = _mm512_xor_si512(el_pair256(q0 + 32 * g + 32, q1 + 32 * g + 32), bias);
                for (int t = 0; t < NT; t++) {
                    int32_t l4, h4;
                    memcpy(&l4, a[t]->qs + 4 * g, 4);
                    memcpy(&h4, a[t]->qs + 4 * g + 4, 4);
                    s0[t] = _mm512_dpbusd_epi32(s0[t], u0, _mm512_set1_epi32(l4));
                    if (two) s1[t] = _mm512_dpbusd_epi32(s1[t], u1, _mm512_set1_epi32(h4));
                    else s0[t] = _mm512_dpbusd_epi32(s0[t], u1, _mm512_set1_epi32(h4));
                    KEEP(s0[t]); KEEP(s1[t]);
                }
            }
        } else {
            const __m512i hb = q5 ? el_pair256(q0 + 128, q1 + 128) : _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                const __m512i raw = el_pair256(q0 + 32 * c, q1 + 32 * c);
                __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                if (q5) { lo = _mm512_or_si512(lo, el_q5_high512(hb, c)); hi = _mm512_or_si512(hi, el_q5_high512(hb, c + 4)); }
                for (int t = 0; t < NT; t++) {
                    int32_t l4, h4;
                    memcpy(&l4, a[t]->qs + 4 * c, 4);
                    memcpy(&h4, a[t]->qs + 16 + 4 * c, 4);
                    s0[t] = _mm512_dpbusd_epi32(s0[t], lo, _mm512_set1_epi32(l4));
                    if (two) s1[t] = _mm512_dpbusd_epi32(s1[t], hi, _mm512_set1_epi32(h4));
                    else s0[t] = _mm512_dpbusd_epi32(s0[t], hi, _mm512_set1_epi32(h4));
                    KEEP(s0[t]); KEEP(s1[t]);
                }
            }
        }
        const __m512 dw = el_halves16(b0, b1);
        const __m512 mw = has_min ? el_halves16(b0 + 16, b1 + 16) : dw;
        for (int t = 0; t < NT; t++) {
            const __m512 p = _mm512_cvtepi32_ps(two ? _mm512_add_epi32(s0[t], s1[t]) : s0[t]);
            if (has_min) {
                acc[t] = _mm512_fmadd_ps(dw, _mm512_mul_ps(p, _mm512_set1_ps(a[t]->d)), acc[t]);
                acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a[t]->s), acc[t]);
            } else if (kind == K_Q8_0) {
                acc[t] = _mm512_fmadd_ps(dw, _mm512_mul_ps(p, _mm512_set1_ps(a[t]->d)), acc[t]);
            } else {   /* d * (da * sum(q a) + offset * da * sum(a)) */
                acc[t] = _mm512_fmadd_ps(dw, _mm512_fmadd_ps(p, _mm512_set1_ps(a[t]->d), _mm512_set1_ps(offset * a[t]->s)), acc[t]);
            }
        }
    }
    const __mmask16 keep = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * y_stride, keep, acc[t]);
}

__attribute__((noinline)) static void x16_gemv(const uint8_t *w0, size_t gstride, int nb, int kind, const uint8_t *x,
                                               float *y, int nrows, const uint8_t *pf) {
    x16_tile(w0, gstride, nb, kind, x, 0, 1, y, 0, nrows, pf, NULL);
}

/* one tile of NT (1..8, a constant in each case) tokens: TILE(NT) expands to the call */
#define NT_SWITCH(nt, TILE) \
    switch (nt) {           \
    case 8: TILE(8); break; \
    case 7: TILE(7); break; \
    case 6: TILE(6); break; \
    case 5: TILE(5); break; \
    case 4: TILE(4); break; \
    case 3: TILE(3); break; \
    case 2: TILE(2); break; \
    case 1: TILE(1); break; \
    default: break;         \
    }

/* Q8_0's start terms of a call's every token tile, computed once for all its row pairs: 2-16 tokens on the stack,
 * more (prefill) in a buffer each thread keeps (up to Q8_PRE_MAX bytes; past that, per tile as the tiles come) */
enum { Q8_PRE_MAX = 4 << 20 };
static pthread_key_t q8_pre_key;
static pthread_once_t q8_pre_once = PTHREAD_ONCE_INIT;
typedef struct { int32_t *p; size_t n; } q8_pre_buf;

static void q8_pre_free(void *b) { free(((q8_pre_buf *)b)->p); free(b); }
static void q8_pre_init(void) { pthread_key_create(&q8_pre_key, q8_pre_free); }

static int32_t *q8_pre_scratch(size_t n) {   /* n int32 of this thread's buffer, or NULL */
    if (n * sizeof(int32_t) > Q8_PRE_MAX || pthread_once(&q8_pre_once, q8_pre_init) != 0) return NULL;
    q8_pre_buf *b = pthread_getspecific(q8_pre_key);
    if (!b) {
        if (!(b = calloc(1, sizeof *b))) return NULL;
        if (pthread_setspecific(q8_pre_key, b) != 0) { free(b); return NULL; }
    }
    if (b->n < n) {
        free(b->p);
        b->p = malloc(n * sizeof(int32_t));
        b->n = b->p ? n : 0;
    }
    return b->p;
}

/* Rows in pairs of 8-row groups (x16_tile), a last lone group in x8_tile; tokens in tiles of 8. Each row's result
 * is the same bits whichever tile computes it and whatever the tile's token count. */
#define GEMM_X8(name, kind, block_t)                                                                    \
    static void name(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,  \
                     float *y, size_t y_stride) {                                                       \
        const int nb = n_in / EL_QK;                                                                    \
        const size_t gs = (size_t)nb * sizeof(block_t);                                                 \
        const uint8_t *xb = (const uint8_t *)x;                                                         \
        const int kd = kind;   /* for X16 / X8 */                                                       \
        /* Q8_0 of 2+ tokens with 2+ row pairs: the start terms once for all row pairs */              \
        int32_t pre_[2 * 8 * Q8_PRE_NB];                                                                \
        int32_t *pre = NULL;                                                                            \
        if (kind == K_Q8_0 && n_tok > 1 && r1 - r0 > 16)                                                \
            pre = n_tok <= 16 && nb <= Q8_PRE_NB ? pre_ : q8_pre_scratch((size_t)(n_tok + 7) / 8 * 8 * nb); \
        for (int t = 0; pre && t < n_tok; t += 8)                                                       \
            for (int b = 0; b < nb; b++)                                                                \
                q8_0_starts(xb + t * x_stride, x_stride, n_tok - t < 8 ? n_tok - t : 8, b,             \
                            pre + (t / 8) * 8 * nb + 8 * b);                                            \
        for (int r = r0; r < r1; r += 8) {                                                              \
            const uint8_t *wg = (const uint8_t *)w + (size_t)(r / 8) * gs;                              \
            const int nrows = r1 - r < 8 ? r1 - r : 8;                                                  \
            /* prefetch PF_GROUPS row groups ahead, during the first token tile only */                 \
            const uint8_t *pf = r + 8 * PF_GROUPS < r1 ? wg + (size_t)PF_GROUPS * gs : NULL;            \
            if (r + 8 < r1) {   /* two row groups in 512-bit vectors */                            \
                const int n16 = r1 - r < 16 ? r1 - r : 16;                                              \
                const uint8_t *pf16 = r + 8 * (PF_GROUPS + 1) < r1 ? pf : NULL;                         \
                if (n_tok == 1) x16_gemv(wg, gs, nb, kind, xb, y + r, n16, pf16);                       \
                for (int t = 0; n_tok > 1 && t < n_tok; t += 8, pf16 = NULL) {                          \
                    const int nt = n_tok - t < 8 ? n_tok - t : 8;                                       \
                    NT_SWITCH(nt, X16)                                                                  \
                }                                                                                       \
                r += 8;                                                                                 \
                continue;                                                                               \
            }                                                                                           \
            if (n_tok == 1) {                                                                           \
                x8_tile1(wg, nb, kind, xb, y + r, nrows, pf);                                           \
                continue;                                                                               \
            }                                                                                           \
            for (int t = 0; t < n_tok; t += 8, pf = NULL) {                                             \
                const int nt = n_tok - t < 8 ? n_tok - t : 8;                                           \
                NT_SWITCH(nt, X8)                                                                       \
            }                                                                                           \
        }                                                                                               \
    }
#define X16(NT) x16_tile(wg, gs, nb, kd, xb + t * x_stride, x_stride, NT, y + t * y_stride + r, y_stride, n16, pf16, \
                        pre ? pre + (t / 8) * 8 * nb : NULL)
#define X8(NT) x8_tile(wg, nb, kd, xb + t * x_stride, x_stride, NT, y + t * y_stride + r, y_stride, nrows, pf)
GEMM_X8(gemm_q4_0x8, K_Q4_0, block_q4_0x8)
GEMM_X8(gemm_q4_1x8, K_Q4_1, block_q4_1x8)
GEMM_X8(gemm_q5_0x8, K_Q5_0, block_q5_0x8)
GEMM_X8(gemm_q5_1x8, K_Q5_1, block_q5_1x8)
GEMM_X8(gemm_q8_0x8, K_Q8_0, block_q8_0x8)
#undef X16
#undef X8
#undef NT_SWITCH

/* ------------------------------------------------------------------------------ float weights (strips)
 * F32 / F16 / BF16 matrices are repacked at load into strips of 32 rows stored k-major: strip g holds, for each
 * input index k, the 32 weights of rows 32g..32g+31 (64 bytes of f16/bf16, 128 of f32; rows past n_out are
 * zero). Every output is then one chain of f32 FMAs over k = 0, 1, ..., n_in - 1 in order, in one lane of a
 * 16-row vector: acc = fma(w[k], x[k], acc) from acc = 0, weights widened exactly to f32, activations f32 as
 * given. Nothing is summed across lanes, so there is no reduction tree whose shape could depend on the tile.
 * Up to 12 tokens (decode, batched decode, draft verification) read the packed weights directly, widened in
 * registers: 1-3 tokens 4 strips at a time (8 chains per token), 4-6 tokens 2 strips, 7-12 tokens 1 strip (up to
 * 24 chains); prefill widens a strip's block of kc inputs to f32 once into a stack buffer and runs it against tiles
 * of 6 tokens (a strip pair) or 8 (a lone strip), the partial sums of the earlier k blocks kept in y itself between
 * blocks (stored and reloaded as the same f32 values). Both paths perform the same operations in the same order on
 * every output: a token's result is bit-identical alone or at any place of any batch. */
enum { FS = 32,      /* rows per strip */
       FKC = 128,    /* inputs per widened block (up to 32 KiB of f32 weights: two strips) */
       FRB = 128 };  /* rows per block of the prefill loop */

static void repack_f32_strips(const void *s, void *d, int n_out, int n_in) { el_repack_strips(s, d, n_out, n_in, 4, FS); }
static void repack_h_strips(const void *s, void *d, int n_out, int n_in) { el_repack_strips(s, d, n_out, n_in, 2, FS); }

/* 16 packed weights (element index e of the strip data) widened to f32: kind 0 f32, 1 f16, 2 bf16 */
INLINE __m512 wload16(const void *p, size_t e, int kind) {
    return kind == 0 ? _mm512_loadu_ps((const float *)p + e)
         : kind == 1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const el_half *)p + e)))
         : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const el_bf16 *)p + e))), 16));
}

INLINE __mmask16 rows_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* decode: NS strips (rows r.. of the strips starting at w) x NT tokens, all of n_in; nr = valid rows from r */
INLINE void fgemv(const void *w, size_t sstride, int n_in, int kind, int NS, const float *x, size_t xs, int NT,
                  float *y, size_t ys, int nr) {
    __m512 acc[12][8];
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < 2 * NS; v++) acc[t][v] = _mm512_setzero_ps();
    const float *xt[12];
    for (int t = 0; t < NT; t++) xt[t] = (const float *)((const char *)x + t * xs);
    for (int k = 0; k < n_in; k++) {
        __m512 xb[12];
        for (int t = 0; t < NT; t++) xb[t] = _mm512_set1_ps(xt[t][k]);
        for (int v = 0; v < 2 * NS; v++) {
            const __m512 wv = wload16(w, (size_t)(v >> 1) * sstride + (size_t)k * FS + (v & 1) * 16, kind);
            for (int t = 0; t < NT; t++) acc[t][v] = _mm512_fmadd_ps(wv, xb[t], acc[t][v]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < 2 * NS; v++) _mm512_mask_storeu_ps(y + t * ys + v * 16, rows_mask(nr - v * 16), acc[t][v]);
}

/* prefill: a widened block wb [kc][16 NV] (NV / 2 strips side by side) x MR tokens (x at this block's first
 * input); first: start from zero, else from the partial sums in y; nr = valid rows from the block's first row */
INLINE void ftile(const float *wb, int NV, int kc, const float *x, size_t xs, int MR, float *y, size_t ys, int first,
                  int nr) {
    __m512 acc[8][4];
    const float *xt[8];
    for (int t = 0; t < MR; t++) xt[t] = (const float *)((const char *)x + t * xs);
    for (int t = 0; t < MR; t++)
        for (int v = 0; v < NV; v++)
            acc[t][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(rows_mask(nr - 16 * v), y + t * ys + 16 * v);
    for (int k = 0; k < kc; k++) {
        __m512 wv[4];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_load_ps(wb + (size_t)k * 16 * NV + 16 * v);
        for (int t = 0; t < MR; t++) {
            const __m512 xb = _mm512_set1_ps(xt[t][k]);
            for (int v = 0; v < NV; v++) acc[t][v] = _mm512_fmadd_ps(wv[v], xb, acc[t][v]);
        }
    }
    for (int t = 0; t < MR; t++)
        for (int v = 0; v < NV; v++) _mm512_mask_storeu_ps(y + t * ys + 16 * v, rows_mask(nr - 16 * v), acc[t][v]);
}

enum { FMR4 = 6,    /* tokens per tile of two strips (64 rows: 24 accumulators) */
       FMR2 = 8 };  /* tokens per tile of a lone strip (32 rows: 16 accumulators) */
#define FT(NV, MR) case MR: ftile(wb, NV, kc, xk, x_stride, MR, yt, y_stride, first, nr); break
INLINE void ftile_any(const float *wb, int nv, int kc, const float *xk, size_t x_stride, int mr, float *yt,
                      size_t y_stride, int first, int nr) {
    if (nv == 4)
        switch (mr) { FT(4, 1); FT(4, 2); FT(4, 3); FT(4, 4); FT(4, 5); FT(4, 6); default: break; }
    else
        switch (mr) { FT(2, 1); FT(2, 2); FT(2, 3); FT(2, 4); FT(2, 5); FT(2, 6); FT(2, 7); FT(2, 8); default: break; }
}
#undef FT

#define FV(NS, NT) fgemv(ws, sstride, n_in, kind, NS, xt, x_stride, NT, y + (size_t)t * y_stride + r, y_stride, r1 - r)
INLINE void gemm_strips(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,
                        float *y, size_t y_stride, int kind, int esize) {
    const size_t sstride = (size_t)FS * n_in;   /* elements per strip */
    if (n_tok <= 3) {
        for (int r = r0; r < r1; ) {   /* up to 4 strips a pass: 2 to 8 chains a token */
            const void *ws = (const char *)w + (size_t)(r / FS) * sstride * esize;
            const int left = (r1 - r + FS - 1) / FS, ns = left < 4 ? left : 4, t = 0;
            const float *xt = x;
            switch (ns * 4 + n_tok) {
            case 5: FV(1, 1); break;  case 6: FV(1, 2); break;  case 7: FV(1, 3); break;
            case 9: FV(2, 1); break;  case 10: FV(2, 2); break; case 11: FV(2, 3); break;
            case 13: FV(3, 1); break; case 14: FV(3, 2); break; case 15: FV(3, 3); break;
            default: if (n_tok == 1) FV(4, 1); else if (n_tok == 2) FV(4, 2); else FV(4, 3); break;
            }
            r += ns * FS;
        }
        return;
    }
    if (n_tok <= 6) {   /* a few tokens (batched decode, draft verification): the strips read once, 2 at a time */
        for (int r = r0; r < r1; ) {
            const void *ws = (const char *)w + (size_t)(r / FS) * sstride * esize;
            const int ns = r1 - r > FS ? 2 : 1, t = 0;
            const float *xt = x;
            switch (ns * 8 + n_tok) {
            case 12: FV(1, 4); break; case 13: FV(1, 5); break; case 14: FV(1, 6); break;
            case 20: FV(2, 4); break; case 21: FV(2, 5); break; default: FV(2, 6); break;
            }
            r += ns * FS;
        }
        return;
    }
    if (n_tok <= 12) {   /* 7-12 tokens (a batch of sequences, a long draft): one strip at a time, 24 chains */
        for (int r = r0; r < r1; r += FS) {
            const void *ws = (const char *)w + (size_t)(r / FS) * sstride * esize;
            const int t = 0;
            const float *xt = x;
            switch (n_tok) {
            case 7: FV(1, 7); break;   case 8: FV(1, 8); break;   case 9: FV(1, 9); break;
            case 10: FV(1, 10); break; case 11: FV(1, 11); break; default: FV(1, 12); break;
            }
        }
        return;
    }
    /* rows in blocks of FRB: a k block's activation columns (n_tok x FKC floats) and the block's partial sums stay
     * in L2 while every strip pair of the block passes over them */
    float wb[FKC * 2 * FS] __attribute__((aligned(64)));
    for (int rb = r0; rb < r1; rb += FRB) {
        const int rb1 = rb + FRB < r1 ? rb + FRB : r1;
        for (int k0 = 0; k0 < n_in; k0 += FKC) {
            const int kc = n_in - k0 < FKC ? n_in - k0 : FKC;
            for (int r = rb; r < rb1; r += 2 * FS) {
                const int ns = r + FS < rb1 ? 2 : 1, nv = 2 * ns, nr = r1 - r;
                const void *ws = (const char *)w + (size_t)(r / FS) * sstride * esize;
                for (int k = 0; k < kc; k++)
                    for (int v = 0; v < nv; v++)
                        _mm512_store_ps(wb + (size_t)k * 16 * nv + 16 * v,
                                        wload16(ws, (size_t)(v >> 1) * sstride + (size_t)(k0 + k) * FS + (v & 1) * 16, kind));
                const int mrmax = nv == 4 ? FMR4 : FMR2;
                for (int t = 0; t < n_tok; t += mrmax) {
                    const int mr = n_tok - t < mrmax ? n_tok - t : mrmax;
                    ftile_any(wb, nv, kc, (const float *)((const char *)x + t * x_stride) + k0, x_stride, mr,
                              y + (size_t)t * y_stride + r, y_stride, k0 == 0, nr);
                }
            }
        }
    }
}
#undef FV

static void gemm_f32_512(const void *w, int n_in, int r0, int r1, const void *x, size_t xs, int n_tok, float *y, size_t ys) {
    gemm_strips(w, n_in, r0, r1, x, xs, n_tok, y, ys, 0, 4);
}
static void gemm_f16_512(const void *w, int n_in, int r0, int r1, const void *x, size_t xs, int n_tok, float *y, size_t ys) {
    gemm_strips(w, n_in, r0, r1, x, xs, n_tok, y, ys, 1, 2);
}
static void gemm_bf16_512(const void *w, int n_in, int r0, int r1, const void *x, size_t xs, int n_tok, float *y, size_t ys) {
    gemm_strips(w, n_in, r0, r1, x, xs, n_tok, y, ys, 2, 2);
}

/* ------------------------------------------------------------------------------------------- attention */
/* Decode-sized attention (a kv head's few query rows: one token's query heads, or a short draft) over f16 / f32
 * caches, reading the cache rows where they lie: no chunk converted to f32 in scratch and read back. Each row gets
 * the AVX2 kernel's arithmetic bit for bit (kernels_avx2.c attn: a score is an 8-lane FMA chain over head_dim, then
 * ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), times the scale; the same softmax; each output lane an FMA chain over the
 * slots in order), so which kernel a row meets never shows in its bits. Up to 3 rows share each K / V load (24 ymm
 * accumulators of the 32). q8_0 caches, head_dim % 8 and more rows (prefill tiles, where converting a chunk once
 * for all rows pays) go to the AVX2 kernel. */
static void (*avx2_attn)(const float *, int, const int32_t *, const void *const *, const void *const *, int, int, int,
                         int, int, float, float *, float *);
static void (*avx2_softmax)(float *, int);
static const float zero_row[256];   /* stands for the slots past the walk in a last group of 8 */

enum { ATT_ROWS = 3, ATT_DIRECT_MAX = 6, ATT_PREFETCH = 256 * 1024 /* bytes of K + V asked for up front */ };

INLINE __m256 kv8(const void *row, int f16, int i) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
    return _mm256_loadu_ps((const float *)row + i);
}

/* a walk over cache rows: row j lies in blocks[(off + j) / block] at (off + j) % block; stepped without dividing */
typedef struct { const void *const *blocks; int block, r, bi; size_t rb; const char *row; } walk;

INLINE walk walk_at(const void *const *blocks, int block, int off, int j, size_t rb) {
    const int s = off + j;
    walk w = { blocks, block, s % block, s / block, rb, NULL };
    w.row = (const char *)blocks[w.bi] + (size_t)w.r * rb;
    return w;
}

INLINE void walk_next(walk *w) {   /* call only while another row follows (the next block must exist) */
    if (++w->r == w->block) {
        w->r = 0;
        w->row = (const char *)w->blocks[++w->bi];
    } else {
        w->row += w->rb;
    }
}

/* every line of rows [0, n) of a walk asked into L2 at once: decode reads the cache cold (the weights streamed
 * through since this layer's rows were written), and a task's few dozen KB then arrive in parallel rather than a
 * prefetch stream at a time (SmolLM2, 8 sequences: the attention stage -30%) */
INLINE void walk_prefetch(const void *const *blocks, int block, int off, int n, size_t rb) {
    for (int j = 0; j < n;) {
        const char *p;
        const int run = el_kv_run(blocks, block, off, j, n, rb, &p);   /* rows in one block */
        for (const char *e = p + (size_t)run * rb; p < e; p += 64) _mm_prefetch(p, _MM_HINT_T1);
        j += run;
    }
}

/* the scores of R rows of q (hd apart) against the 8 K rows kr[]: S[r * ld + 0..7] = score * scale */
INLINE void scores_rows(const float *q, const void *const *kr, int f16, int hd, int R, float scale, float *S,
                        size_t ld) {
    __m256 a[ATT_ROWS][8];
    for (int r = 0; r < R; r++)
        for (int k = 0; k < 8; k++) a[r][k] = _mm256_setzero_ps();
    for (int i = 0; i < hd; i += 8) {
        __m256 qv[ATT_ROWS];
        for (int r = 0; r < R; r++) qv[r] = _mm256_loadu_ps(q + (size_t)r * hd + i);
        for (int k = 0; k < 8; k++) {
            const __m256 kv = kv8(kr[k], f16, i);
            for (int r = 0; r < R; r++) a[r][k] = _mm256_fmadd_ps(qv[r], kv, a[r][k]);
        }
    }
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int r = 0; r < R; r++) {
        const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[r][0], a[r][1]), _mm256_hadd_ps(a[r][2], a[r][3]));
        const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[r][4], a[r][5]), _mm256_hadd_ps(a[r][6], a[r][7]));
        const __m256 sc = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        _mm256_storeu_ps(S + (size_t)r * ld, _mm256_mul_ps(sc, vscale));
    }
}

/* o[r][d0 .. d0 + 8 nv) += sum over slots j in [j0, j1) of P[r][j] * V[j][d0 ..] (each lane in slot order) */
INLINE void pv_rows(const float *P, size_t ld, const void *const *vb, int block, int off, size_t rb, int f16, int j0,
                    int j1, int d0, int nv, int R, float *o, int hd) {
    __m256 acc[ATT_ROWS][8];
    for (int r = 0; r < R; r++)
        for (int s = 0; s < nv; s++) acc[r][s] = _mm256_loadu_ps(o + (size_t)r * hd + d0 + 8 * s);
    if (j0 >= j1) return;
    walk w = walk_at(vb, block, off, j0, rb);
    for (int j = j0; j < j1; j++) {
        const void *row = w.row;
        if (j + 1 < j1) walk_next(&w);
        __m256 p[ATT_ROWS];
        for (int r = 0; r < R; r++) p[r] = _mm256_set1_ps(P[(size_t)r * ld + j]);
        for (int s = 0; s < nv; s++) {
            const __m256 v = kv8(row, f16, d0 + 8 * s);
            for (int r = 0; r < R; r++) acc[r][s] = _mm256_fmadd_ps(p[r], v, acc[r][s]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < nv; s++) _mm256_storeu_ps(o + (size_t)r * hd + d0 + 8 * s, acc[r][s]);
}

/* the 64-dim slice d0 of R rows' p.V: slots [0, lo) of all rows together, then each row's own [lo, end[r]); the
 * slice width and R constants where they can be, so the accumulators stay in registers */
INLINE void pv_set(const float *P, size_t ld, const void *const *blocks, int block, int off, size_t rb, int f16, int lo,
                   const int32_t *end, int d0, int hd, int R, float *o) {
    const int nv = (hd - d0) / 8 < 8 ? (hd - d0) / 8 : 8;
#define PV(P_, J0, J1, NV, RR, O_) pv_rows(P_, ld, blocks, block, off, rb, f16, J0, J1, d0, NV, RR, O_, hd)
    if (nv == 8 && R == 3) PV(P, 0, lo, 8, 3, o);
    else if (nv == 8 && R == 2) PV(P, 0, lo, 8, 2, o);
    else if (nv == 8) PV(P, 0, lo, 8, 1, o);
    else PV(P, 0, lo, nv, R, o);
    for (int r = 0; r < R; r++) {
        if (end[r] <= lo) continue;
        if (nv == 8) PV(P + (size_t)r * ld, lo, end[r], 8, 1, o + (size_t)r * hd);
        else PV(P + (size_t)r * ld, lo, end[r], nv, 1, o + (size_t)r * hd);
    }
#undef PV
}

/* R (1..3, a constant where inlined) rows: q [R][hd], n_kv [R], S [R][ld], out [R][hd] */
INLINE void attn_rows(const float *q, int R, const int32_t *n_kv, const void *const *kb, const void *const *vb,
                      int block, int off, int kf16, int vf16, int hd, float scale, float *S, size_t ld, int max_kv,
                      float *out) {
    const size_t krb = (size_t)hd * (kf16 ? 2 : 4), vrb = (size_t)hd * (vf16 ? 2 : 4);
    int lo = n_kv[0], hi = n_kv[0];
    for (int r = 1; r < R; r++) {
        lo = n_kv[r] < lo ? n_kv[r] : lo;
        hi = n_kv[r] > hi ? n_kv[r] : hi;
    }
    /* scores: groups of 8 slots; rows that end earlier drop out of the later groups (their bits do not change) */
    const int n_pf = hi < (int)(ATT_PREFETCH / (krb + vrb)) ? hi : (int)(ATT_PREFETCH / (krb + vrb));
    walk_prefetch(kb, block, off, n_pf, krb);   /* a long walk's later rows: the hardware's streams by then */
    walk_prefetch(vb, block, off, n_pf, vrb);
    walk w = walk_at(kb, block, off, 0, krb);
    for (int jb = 0; jb < hi; jb += 8) {
        const void *kr[8];
        for (int k = 0; k < 8; k++) {
            kr[k] = jb + k < max_kv ? (const void *)w.row : (const void *)zero_row;
            if (jb + k + 1 < max_kv) walk_next(&w);
        }
        int r0 = 0;
        while (r0 < R && n_kv[r0] <= jb) r0++;   /* n_kv ascends within a tile; a row with no slot here is done */
        if (jb < lo) scores_rows(q, kr, kf16, hd, R, scale, S + jb, ld);
        else
            for (int r = r0; r < R; r++)
                if (n_kv[r] > jb) scores_rows(q + (size_t)r * hd, kr, kf16, hd, 1, scale, S + (size_t)r * ld + jb, ld);
    }
    for (int r = 0; r < R; r++) avx2_softmax(S + (size_t)r * ld, n_kv[r]);
    memset(out, 0, sizeof(float) * (size_t)R * hd);
    for (int d0 = 0; d0 < hd; d0 += 64)   /* 8 accumulators = 64 dims of each row in registers */
        pv_set(S, ld, vb, block, off, vrb, vf16, lo, n_kv, d0, hd, R, out);
}

/* rows [j0, j0 + jn) of a walk as f32 rows in dst [round8(jn)][hd], the rows past jn zero: f16 widened exactly,
 * q8_0 as scale * int8 rounded once (kernels_avx2.c's kv_rows_float, the same values) */
INLINE void walk_rows_f32(const void *const *blocks, int block, int off, int j0, int jn, int type, int hd, float *dst) {
    const size_t rb = el_kv_row_bytes(type, hd);
    walk w = walk_at(blocks, block, off, j0, rb);
    for (int j = 0; j < jn; j++) {
        float *o = dst + (size_t)j * hd;
        if (type == EL_F32) memcpy(o, w.row, sizeof(float) * (size_t)hd);
        else if (type == EL_F16) for (int i = 0; i < hd; i += 8) _mm256_storeu_ps(o + i, kv8(w.row, 1, i));
        else {
            const block_q8_0 *b = (const block_q8_0 *)w.row;
            for (int i = 0; i < hd / EL_QK; i++) {
                const __m256 d = _mm256_set1_ps(_cvtsh_ss(b[i].d));
                for (int l = 0; l < EL_QK; l += 8)
                    _mm256_storeu_ps(o + i * EL_QK + l, _mm256_mul_ps(d, _mm256_cvtepi32_ps(
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b[i].qs + l))))));
            }
        }
        if (j + 1 < jn) walk_next(&w);
    }
    memset(dst + (size_t)jn * hd, 0, sizeof(float) * (size_t)hd * (size_t)((jn + 7) / 8 * 8 - jn));
}

/* Prefill tiles (more rows than attn_direct takes) and q8_0 caches: a chunk of EL_ATTN_KC K (then V) rows
 * converted to f32 once for all the rows, as the AVX2 kernel does, then read 3 query rows at a time with
 * attn_direct's register tiles (the AVX2 kernel reads it a row at a time: 9 loads per 8 FMAs). Same bits. */
static void attn_tiled(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb,
                       int block, int off, int k_type, int v_type, int hd, float scale, float *scratch, float *out) {
    enum { KC = EL_ATTN_KC };
    int max_kv = 0;
    for (int i = 0; i < n_q; i++) max_kv = n_kv[i] > max_kv ? n_kv[i] : max_kv;
    const size_t ld = (size_t)(max_kv + 7) / 8 * 8;
    float *S = scratch, *C = scratch + (size_t)n_q * ld;
    const void *const cb[1] = { C };
    const size_t crb = (size_t)hd * sizeof(float);
    for (int j0 = 0; j0 < max_kv; j0 += KC) {
        const int jn = max_kv - j0 < KC ? max_kv - j0 : KC;
        walk_rows_f32(kb, block, off, j0, jn, k_type, hd, C);
        for (int i = 0; i < n_q; i += ATT_ROWS) {
            const int R = n_q - i < ATT_ROWS ? n_q - i : ATT_ROWS;
            int lo = KC, hi = 0;   /* the slots of this chunk each row sees: [0, jmax) */
            for (int r = 0; r < R; r++) {
                const int jm = n_kv[i + r] - j0 < jn ? n_kv[i + r] - j0 : jn;
                lo = jm < lo ? jm : lo;
                hi = jm > hi ? jm : hi;
            }
            for (int jb = 0; jb < hi; jb += 8) {
                const void *kr[8];
                for (int k = 0; k < 8; k++) kr[k] = C + (size_t)(jb + k) * hd;
                float *Sj = S + (size_t)i * ld + j0 + jb;
                if (jb < lo) {
                    if (R == 3) scores_rows(q + (size_t)i * hd, kr, 0, hd, 3, scale, Sj, ld);
                    else if (R == 2) scores_rows(q + (size_t)i * hd, kr, 0, hd, 2, scale, Sj, ld);
                    else scores_rows(q + (size_t)i * hd, kr, 0, hd, 1, scale, Sj, ld);
                } else {
                    for (int r = 0; r < R; r++)
                        if (n_kv[i + r] - j0 > jb) scores_rows(q + (size_t)(i + r) * hd, kr, 0, hd, 1, scale, Sj + (size_t)r * ld, ld);
                }
            }
        }
    }
    for (int i = 0; i < n_q; i++) avx2_softmax(S + (size_t)i * ld, n_kv[i]);
    memset(out, 0, sizeof(float) * (size_t)n_q * hd);
    for (int j0 = 0; j0 < max_kv; j0 += KC) {
        const int jn = max_kv - j0 < KC ? max_kv - j0 : KC;
        walk_rows_f32(vb, block, off, j0, jn, v_type, hd, C);
        for (int i = 0; i < n_q; i += ATT_ROWS) {
            const int R = n_q - i < ATT_ROWS ? n_q - i : ATT_ROWS;
            int lo = KC;
            int32_t jm[ATT_ROWS];
            for (int r = 0; r < R; r++) {
                jm[r] = n_kv[i + r] - j0 < jn ? n_kv[i + r] - j0 : jn;
                jm[r] = jm[r] > 0 ? jm[r] : 0;
                lo = jm[r] < lo ? jm[r] : lo;
            }
            for (int d0 = 0; d0 < hd; d0 += 64)
                pv_set(S + (size_t)i * ld + j0, ld, cb, KC, 0, crb, 0, lo, jm, d0, hd, R, out + (size_t)i * hd);
        }
    }
}

static void attn_direct(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb,
                        int block, int off, int k_type, int v_type, int hd, float scale, float *scratch, float *out) {
    const int kf = k_type == EL_F16, vf = v_type == EL_F16;
    if (hd % 8 || hd > 256) {
        avx2_attn(q, n_q, n_kv, kb, vb, block, off, k_type, v_type, hd, scale, scratch, out);
        return;
    }
    if (n_q > ATT_DIRECT_MAX || (!kf && k_type != EL_F32) || (!vf && v_type != EL_F32)) {
        attn_tiled(q, n_q, n_kv, kb, vb, block, off, k_type, v_type, hd, scale, scratch, out);
        return;
    }
    int max_kv = 0;
    for (int i = 0; i < n_q; i++) max_kv = n_kv[i] > max_kv ? n_kv[i] : max_kv;
    const size_t ld = (size_t)(max_kv + 7) / 8 * 8;
    for (int i = 0; i < n_q; i += ATT_ROWS) {
        const int R = n_q - i < ATT_ROWS ? n_q - i : ATT_ROWS;
        const float *qi = q + (size_t)i * hd;
        float *Si = scratch + (size_t)i * ld, *oi = out + (size_t)i * hd;
#define ATT_CASE(RR, KF, VF) attn_rows(qi, RR, n_kv + i, kb, vb, block, off, KF, VF, hd, scale, Si, ld, max_kv, oi)
#define ATT_TYPES(RR) do { if (kf && vf) ATT_CASE(RR, 1, 1); else if (kf) ATT_CASE(RR, 1, 0); \
                           else if (vf) ATT_CASE(RR, 0, 1); else ATT_CASE(RR, 0, 0); } while (0)
        if (R == 3) ATT_TYPES(3);
        else if (R == 2) ATT_TYPES(2);
        else ATT_TYPES(1);
#undef ATT_TYPES
#undef ATT_CASE
    }
}

void el_avx2_kquants_vnni(el_kernels *k);   /* kernels_avx2.c */

void el_fill_vnni(el_kernels *k) {
    el_fill_avx2(k);   /* same layouts and element-wise ops; repack functions stay the AVX2 ones */
    k->name = "avx512vnni";
    avx2_attn = k->attn;
    avx2_softmax = k->softmax;
    k->attn = attn_direct;
    el_avx2_kquants_vnni(k);   /* Q4_K/Q5_K prefill with vpdpbusd; Q6_K and decode as AVX2 */
    k->types[EL_TI_Q4_0].gemm = gemm_q4_0x8;
    k->types[EL_TI_Q4_1].gemm = gemm_q4_1x8;
    k->types[EL_TI_Q5_0].gemm = gemm_q5_0x8;
    k->types[EL_TI_Q5_1].gemm = gemm_q5_1x8;
    k->types[EL_TI_Q8_0].gemm = gemm_q8_0x8;
    k->types[EL_TI_F32].gemm = gemm_f32_512;
    k->types[EL_TI_F16].gemm = gemm_f16_512;
    k->types[EL_TI_BF16].gemm = gemm_bf16_512;
    for (int ti = EL_TI_F32; ti <= EL_TI_BF16; ti++) {   /* 32-row k-major strips (see above) */
        k->types[ti].interleave = FS;
        k->types[ti].repack = ti == EL_TI_F32 ? repack_f32_strips : repack_h_strips;
    }
}
#else
typedef int el_vnni_unused;
#endif
