/* x86-64 kernels for AVX2 + FMA + F16C. Compiled for those instructions by the pragma below (never
 * -march=native), called only when dispatch.c found them on the CPU. Same signatures as kernels_generic.c.
 *
 * The hot spot of the whole runtime is gemm_q4x8 / gemm_q8_0x8: weights repacked 8 rows interleaved
 * (quants.h, *_x8), so for each 4-column group one 32-byte load holds all 8 rows; broadcasting the 4 matching
 * activation bytes to every lane, vpmaddubsw + vpmaddwd leave each row's partial dot in its own 32-bit lane.
 * No horizontal sums, one float FMA per block for 8 rows, and the scales of 8 rows convert in one vcvtph2ps. */
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include "kernels.h"
#include "edgellm.h"

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE int hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* An empty asm that "changes" v: GCC otherwise reassociates the chain of integer adds into a tree, computes
 * every vpmaddubsw of a block first and spills most of them (measured: 16+ stack round trips per block). */
#define KEEP(v) __asm__("" : "+x"(v))

INLINE __m256i bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

/* e^x, Cephes' expf method: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative error ~1e-7 */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* ------------------------------------------------------------------------------------ activation quantizer */
static void quantize_q8a(const float *x, block_q8a *y, int n) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < n / EL_QK; b++, x += EL_QK) {
        __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
               v3 = _mm256_loadu_ps(x + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f, id = el_q8a_inv(d);
        const __m256 vid = _mm256_set1_ps(id);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rnd));
        const int sum = hsum8i(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        /* packs work per 128-bit lane: the permute puts the 8 dwords back in element order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)y[b].qs, p);
        y[b].d = d;
        y[b].s = d * (float)sum;
    }
}

/* ------------------------------------------------------------------------------- repack: 8 rows interleaved */
/* qs bytes 4c..4c+3 of row i go to qs[c*32 + i*4 ..]; rows past n_out are zero (their outputs are never stored) */
static void repack_x8(const void *src, void *dst, int n_out, int n_in, size_t src_block, size_t n_scales,
                      size_t qs_bytes) {
    const int nb = n_in / EL_QK, ng = (n_out + 7) / 8;
    const size_t dst_block = 8 * src_block;
    for (int G = 0; G < ng; G++)
        for (int b = 0; b < nb; b++) {
            uint8_t *o = (uint8_t *)dst + ((size_t)G * nb + b) * dst_block;
            memset(o, 0, dst_block);
            for (int i = 0; i < 8 && G * 8 + i < n_out; i++) {
                const uint8_t *s = (const uint8_t *)src + ((size_t)(G * 8 + i) * nb + b) * src_block;
                for (size_t k = 0; k < n_scales; k++) memcpy(o + k * 16 + i * 2, s + k * 2, 2);
                const uint8_t *qs = s + n_scales * 2;
                uint8_t *oq = o + n_scales * 16;
                for (size_t c = 0; c < qs_bytes / 4; c++) memcpy(oq + c * 32 + i * 4, qs + c * 4, 4);
            }
        }
}
/* Q5: scales and nibbles as Q4 (the 4 qh bytes skipped), then the hb plane of quants.h */
static void repack_q5(const void *src, void *dst, int n_out, int n_in, size_t src_block, size_t n_scales) {
    const int nb = n_in / EL_QK, ng = (n_out + 7) / 8;
    const size_t dst_block = 8 * src_block;
    for (int G = 0; G < ng; G++)
        for (int b = 0; b < nb; b++) {
            uint8_t *o = (uint8_t *)dst + ((size_t)G * nb + b) * dst_block;
            memset(o, 0, dst_block);
            uint8_t *oq = o + n_scales * 16, *hb = oq + 128;
            for (int i = 0; i < 8 && G * 8 + i < n_out; i++) {
                const uint8_t *s = (const uint8_t *)src + ((size_t)(G * 8 + i) * nb + b) * src_block;
                for (size_t k = 0; k < n_scales; k++) memcpy(o + k * 16 + i * 2, s + k * 2, 2);
                uint32_t qh;
                memcpy(&qh, s + n_scales * 2, 4);
                const uint8_t *qs = s + n_scales * 2 + 4;
                for (int c = 0; c < 4; c++) memcpy(oq + c * 32 + i * 4, qs + c * 4, 4);
                for (int bb = 0; bb < 4; bb++) {
                    uint8_t v = 0;
                    for (int g = 0; g < 8; g++) v |= (uint8_t)(((qh >> (4 * g + bb)) & 1) << g);
                    hb[i * 4 + bb] = v;
                }
            }
        }
}
static void repack_q5_0(const void *s, void *d, int n_out, int n_in) { repack_q5(s, d, n_out, n_in, sizeof(block_q5_0), 1); }
static void repack_q5_1(const void *s, void *d, int n_out, int n_in) { repack_q5(s, d, n_out, n_in, sizeof(block_q5_1), 2); }
static void repack_q4_0(const void *s, void *d, int n_out, int n_in) { repack_x8(s, d, n_out, n_in, sizeof(block_q4_0), 1, 16); }
static void repack_q4_1(const void *s, void *d, int n_out, int n_in) { repack_x8(s, d, n_out, n_in, sizeof(block_q4_1), 2, 16); }
static void repack_q8_0(const void *s, void *d, int n_out, int n_in) { repack_x8(s, d, n_out, n_in, sizeof(block_q8_0), 1, 32); }

INLINE void store_rows(float *y, __m256 v, int nrows) {
    if (nrows == 8) { _mm256_storeu_ps(y, v); return; }
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    memcpy(y, tmp, (size_t)nrows * 4);
}

/* ---- the hot spot: 8 rows x NT tokens of Q4_0 / Q4_1 (has_min) ----
 * Column group outer, tokens inner: each unpacked 32-byte weight vector meets the NT tokens while in a register,
 * and the live set (NT int16 sums + NT float accumulators + 2 weight vectors + constants) stays within the 16
 * ymm registers for NT <= 4. */
INLINE void q4x8_tile(const uint8_t *wg, int nb, int has_min, const uint8_t *x, size_t x_stride, int NT,
                      float *y, size_t y_stride, int nrows) {
    const size_t bsize = has_min ? sizeof(block_q4_1x8) : sizeof(block_q4_0x8);
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wg + b * bsize;
        const uint8_t *qs = blk + (has_min ? 32 : 16);
        const block_q8a *a[4];
        for (int t = 0; t < NT; t++) a[t] = (const block_q8a *)(x + t * x_stride) + b;
        __m256i s16[4];
        for (int c = 0; c < 4; c++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            const __m256i lo = _mm256_and_si256(raw, m4);                              /* elements 4c..4c+3 */
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);        /* elements 16+4c..  */
            for (int t = 0; t < NT; t++) {
                /* u4 x s8 pairs <= 2*15*127; the eight of a block still fit int16 (30480) */
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(a[t]->qs + 4 * c)),
                                                   _mm256_maddubs_epi16(hi, bcast4(a[t]->qs + 16 + 4 * c)));
                s16[t] = c == 0 ? p : _mm256_add_epi16(s16[t], p);
                KEEP(s16[t]);
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        if (has_min) {
            const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
            for (int t = 0; t < NT; t++) {
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[t], ones));
                acc[t] = _mm256_fmadd_ps(dw, _mm256_mul_ps(p, _mm256_set1_ps(a[t]->d)), acc[t]);
                acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a[t]->s), acc[t]);
            }
        } else {   /* d * (da * sum(q a) - 8 * da * sum(a)) */
            for (int t = 0; t < NT; t++) {
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[t], ones));
                acc[t] = _mm256_fmadd_ps(dw, _mm256_fmadd_ps(p, _mm256_set1_ps(a[t]->d), _mm256_set1_ps(-8.0f * a[t]->s)), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) store_rows(y + t * y_stride, acc[t], nrows);
}

/* group g's 5th bits as 0x10 in each byte: bit g of hb moved to bit 4 (16-bit shifts; the mask drops what
 * crosses from the neighbouring byte) */
INLINE __m256i q5_high(__m256i hb, int g) {
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

/* 8 rows x NT tokens of Q5_0 / Q5_1: as q4x8_tile with 5-bit quants; u5 x s8 pairs reach 2*31*127, so int16
 * holds the sums of 4 column groups, not 8: widen twice per block */
INLINE void q5x8_tile(const uint8_t *wg, int nb, int has_min, const uint8_t *x, size_t x_stride, int NT,
                      float *y, size_t y_stride, int nrows) {
    const size_t bsize = has_min ? sizeof(block_q5_1x8) : sizeof(block_q5_0x8);
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wg + b * bsize;
        const uint8_t *qs = blk + (has_min ? 32 : 16);
        const __m256i hb = _mm256_loadu_si256((const __m256i *)(qs + 128));
        const block_q8a *a[4];
        for (int t = 0; t < NT; t++) a[t] = (const block_q8a *)(x + t * x_stride) + b;
        __m256i s16[4], s32[4];
        for (int t = 0; t < 4; t++) s16[t] = s32[t] = _mm256_setzero_si256();   /* (quiets -Wmaybe-uninitialized) */
        for (int c = 0; c < 4; c++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, m4), q5_high(hb, c));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), q5_high(hb, c + 4));
            for (int t = 0; t < NT; t++) {
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(a[t]->qs + 4 * c)),
                                                   _mm256_maddubs_epi16(hi, bcast4(a[t]->qs + 16 + 4 * c)));
                if (c == 0 || c == 2) s16[t] = p;
                else {
                    const __m256i w32 = _mm256_madd_epi16(_mm256_add_epi16(s16[t], p), ones);
                    s32[t] = c == 1 ? w32 : _mm256_add_epi32(s32[t], w32);
                    KEEP(s32[t]);
                }
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        if (has_min) {
            const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
            for (int t = 0; t < NT; t++) {
                const __m256 p = _mm256_cvtepi32_ps(s32[t]);
                acc[t] = _mm256_fmadd_ps(dw, _mm256_mul_ps(p, _mm256_set1_ps(a[t]->d)), acc[t]);
                acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a[t]->s), acc[t]);
            }
        } else {   /* d * (da * sum(q a) - 16 * da * sum(a)) */
            for (int t = 0; t < NT; t++) {
                const __m256 p = _mm256_cvtepi32_ps(s32[t]);
                acc[t] = _mm256_fmadd_ps(dw, _mm256_fmadd_ps(p, _mm256_set1_ps(a[t]->d), _mm256_set1_ps(-16.0f * a[t]->s)), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) store_rows(y + t * y_stride, acc[t], nrows);
}

INLINE void q8x8_tile(const uint8_t *wg, int nb, const uint8_t *x, size_t x_stride, int NT,
                      float *y, size_t y_stride, int nrows) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    for (int b = 0; b < nb; b++) {
        const block_q8_0x8 *blk = (const block_q8_0x8 *)wg + b;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->d));
        __m256i w[8], aw[8];
        for (int g = 0; g < 8; g++) {
            w[g] = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * g));
            aw[g] = _mm256_sign_epi8(w[g], w[g]);   /* |w|: vpmaddubsw wants one unsigned operand */
        }
        for (int t = 0; t < NT; t++) {
            const block_q8a *a = (const block_q8a *)(x + t * x_stride) + b;
            __m256i s32 = _mm256_setzero_si256();
            for (int g = 0; g < 8; g++) {
                /* s8 x s8 pairs reach 2*127*127: no room to add two in int16, widen every group */
                const __m256i p = _mm256_maddubs_epi16(aw[g], _mm256_sign_epi8(bcast4(a->qs + 4 * g), w[g]));
                s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p, ones));
                KEEP(s32);
            }
            acc[t] = _mm256_fmadd_ps(dw, _mm256_mul_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(a->d)), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) store_rows(y + t * y_stride, acc[t], nrows);
}

/* rows of one 8-row group at a time; tokens 4 at a time so each unpacked weight block feeds 4 tokens while it
 * sits in registers/L1 (the prefill GEMM); a decode step is the NT = 1 case */
#define GEMM_X8(name, call_tile, block_t)                                                               \
    static void name(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,  \
                     float *y, size_t y_stride) {                                                       \
        const int nb = n_in / EL_QK;                                                                    \
        for (int r = r0; r < r1; r += 8) {                                                              \
            const uint8_t *wg = (const uint8_t *)w + (size_t)(r / 8) * nb * sizeof(block_t);            \
            const int nrows = r1 - r < 8 ? r1 - r : 8;                                                  \
            int t = 0;                                                                                  \
            for (; t + 4 <= n_tok; t += 4) call_tile(4);                                                \
            switch (n_tok - t) {                                                                        \
            case 3: call_tile(3); break;                                                                \
            case 2: call_tile(2); break;                                                                \
            case 1: call_tile(1); break;                                                                \
            default: break;                                                                             \
            }                                                                                           \
        }                                                                                               \
    }
#define TILE_Q4_0(NT) q4x8_tile(wg, nb, 0, (const uint8_t *)x + t * x_stride, x_stride, NT, y + t * y_stride + r, y_stride, nrows)
#define TILE_Q4_1(NT) q4x8_tile(wg, nb, 1, (const uint8_t *)x + t * x_stride, x_stride, NT, y + t * y_stride + r, y_stride, nrows)
#define TILE_Q8_0(NT) q8x8_tile(wg, nb, (const uint8_t *)x + t * x_stride, x_stride, NT, y + t * y_stride + r, y_stride, nrows)
#define TILE_Q5_0(NT) q5x8_tile(wg, nb, 0, (const uint8_t *)x + t * x_stride, x_stride, NT, y + t * y_stride + r, y_stride, nrows)
#define TILE_Q5_1(NT) q5x8_tile(wg, nb, 1, (const uint8_t *)x + t * x_stride, x_stride, NT, y + t * y_stride + r, y_stride, nrows)
GEMM_X8(gemm_q5_0x8, TILE_Q5_0, block_q5_0x8)
GEMM_X8(gemm_q5_1x8, TILE_Q5_1, block_q5_1x8)
GEMM_X8(gemm_q4_0x8, TILE_Q4_0, block_q4_0x8)
GEMM_X8(gemm_q4_1x8, TILE_Q4_1, block_q4_1x8)
GEMM_X8(gemm_q8_0x8, TILE_Q8_0, block_q8_0x8)

/* ------------------------------------------------------------------------- f16 / bf16 to f32, 8 at a time */
INLINE __m256 load8_f16(const el_half *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
INLINE __m256 load8_bf16(const el_bf16 *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* ---------------------------------------------------------------------------- float weights (strips)
 * F32 / F16 / BF16 matrices are repacked at load into strips of 16 rows stored k-major (strip g holds, for each
 * input k, the weights of rows 16g..16g+15; rows past n_out are zero), as kernels_vnni.c does with 32-row strips:
 * each output is one f32 FMA chain over k = 0 .. n_in - 1 in order, in one lane (no reduction across lanes).
 * Decode (1-3 tokens) reads the strips directly; prefill widens a strip's block of FKC2 inputs to f32 once and
 * runs it against tiles of 6 tokens (12 accumulators), partial sums kept in y between blocks. Same operations in
 * the same order on every output whatever the batch: batch invariant. */
enum { FS2 = 16, FKC2 = 256, FMR2 = 6 };

static void repack_f32_s16(const void *s, void *d, int n_out, int n_in) { el_repack_strips(s, d, n_out, n_in, 4, FS2); }
static void repack_h_s16(const void *s, void *d, int n_out, int n_in) { el_repack_strips(s, d, n_out, n_in, 2, FS2); }

/* 8 packed weights from element e, widened to f32: kind 0 f32, 1 f16, 2 bf16 */
INLINE __m256 wload8(const void *p, size_t e, int kind) {
    return kind == 0 ? _mm256_loadu_ps((const float *)p + e)
         : kind == 1 ? load8_f16((const el_half *)p + e) : load8_bf16((const el_bf16 *)p + e);
}

INLINE __m256i lanes_mask(int n) {   /* lanes [0, n) set */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
INLINE void store8_rows(float *y, __m256 v, int n) {
    if (n >= 8) _mm256_storeu_ps(y, v);
    else if (n > 0) _mm256_maskstore_ps(y, lanes_mask(n), v);
}
INLINE __m256 load8_rows(const float *y, int n) {
    return n >= 8 ? _mm256_loadu_ps(y) : n > 0 ? _mm256_maskload_ps(y, lanes_mask(n)) : _mm256_setzero_ps();
}

/* decode: NS strips from w x NT tokens over all of n_in; nr = valid rows from the first */
INLINE void fgemv8(const void *w, size_t sstride, int n_in, int kind, int NS, const float *x, size_t xs, int NT,
                   float *y, size_t ys, int nr) {
    __m256 acc[3][8];
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < 2 * NS; v++) acc[t][v] = _mm256_setzero_ps();
    const float *xt[3];
    for (int t = 0; t < NT; t++) xt[t] = (const float *)((const char *)x + t * xs);
    for (int k = 0; k < n_in; k++) {
        __m256 xb[3];
        for (int t = 0; t < NT; t++) xb[t] = _mm256_broadcast_ss(xt[t] + k);
        for (int v = 0; v < 2 * NS; v++) {
            const __m256 wv = wload8(w, (size_t)(v >> 1) * sstride + (size_t)k * FS2 + (v & 1) * 8, kind);
            for (int t = 0; t < NT; t++) acc[t][v] = _mm256_fmadd_ps(wv, xb[t], acc[t][v]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < 2 * NS; v++) store8_rows(y + t * ys + v * 8, acc[t][v], nr - v * 8);
}

/* prefill: one strip's widened block wb [kc][16] x MR tokens; first: from zero, else from the sums in y */
INLINE void ftile8(const float *wb, int kc, const float *x, size_t xs, int MR, float *y, size_t ys, int first, int nr) {
    __m256 a0[FMR2], a1[FMR2];
    const float *xt[FMR2];
    for (int t = 0; t < MR; t++) xt[t] = (const float *)((const char *)x + t * xs);
    for (int t = 0; t < MR; t++) {
        a0[t] = first ? _mm256_setzero_ps() : load8_rows(y + t * ys, nr);
        a1[t] = first ? _mm256_setzero_ps() : load8_rows(y + t * ys + 8, nr - 8);
    }
    for (int k = 0; k < kc; k++) {
        const __m256 w0 = _mm256_load_ps(wb + k * FS2), w1 = _mm256_load_ps(wb + k * FS2 + 8);
        for (int t = 0; t < MR; t++) {
            const __m256 xb = _mm256_broadcast_ss(xt[t] + k);
            a0[t] = _mm256_fmadd_ps(w0, xb, a0[t]);
            a1[t] = _mm256_fmadd_ps(w1, xb, a1[t]);
        }
    }
    for (int t = 0; t < MR; t++) {
        store8_rows(y + t * ys, a0[t], nr);
        store8_rows(y + t * ys + 8, a1[t], nr - 8);
    }
}

#define FT(MR) case MR: ftile8(wb, kc, xk, x_stride, MR, yt, y_stride, first, nr); break
INLINE void ftile8_any(const float *wb, int kc, const float *xk, size_t x_stride, int mr, float *yt, size_t y_stride,
                       int first, int nr) {
    switch (mr) { FT(1); FT(2); FT(3); FT(4); FT(5); FT(6); default: break; }
}
#undef FT

#define FV(NS, NT) fgemv8(ws, sstride, n_in, kind, NS, xt, x_stride, NT, y + (size_t)t * y_stride + r, y_stride, r1 - r)
INLINE void gemm_strips16(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,
                          float *y, size_t y_stride, int kind, int esize) {
    const size_t sstride = (size_t)FS2 * n_in;
    if (n_tok <= 3) {
        for (int t = 0; t < n_tok; t += 3) {
            const int nt = n_tok - t < 3 ? n_tok - t : 3;
            const float *xt = (const float *)((const char *)x + t * x_stride);
            for (int r = r0; r < r1; ) {   /* 1 token: up to 4 strips a pass (8 chains); 2-3: up to 2 (12) */
                const void *ws = (const char *)w + (size_t)(r / FS2) * sstride * esize;
                const int left = (r1 - r + FS2 - 1) / FS2, most = nt == 1 ? 4 : 2, ns = left < most ? left : most;
                switch (ns * 4 + nt) {
                case 5: FV(1, 1); break;  case 6: FV(1, 2); break; case 7: FV(1, 3); break;
                case 9: FV(2, 1); break;  case 10: FV(2, 2); break; case 11: FV(2, 3); break;
                case 13: FV(3, 1); break; default: FV(4, 1); break;
                }
                r += ns * FS2;
            }
        }
        return;
    }
    float wb[FKC2 * FS2] __attribute__((aligned(32)));
    for (int r = r0; r < r1; r += FS2) {
        const void *ws = (const char *)w + (size_t)(r / FS2) * sstride * esize;
        const int nr = r1 - r;
        for (int k0 = 0; k0 < n_in; k0 += FKC2) {
            const int kc = n_in - k0 < FKC2 ? n_in - k0 : FKC2;
            for (int k = 0; k < kc; k++) {
                _mm256_store_ps(wb + k * FS2, wload8(ws, (size_t)(k0 + k) * FS2, kind));
                _mm256_store_ps(wb + k * FS2 + 8, wload8(ws, (size_t)(k0 + k) * FS2 + 8, kind));
            }
            for (int t = 0; t < n_tok; t += FMR2) {
                const int mr = n_tok - t < FMR2 ? n_tok - t : FMR2;
                ftile8_any(wb, kc, (const float *)((const char *)x + t * x_stride) + k0, x_stride, mr,
                           y + (size_t)t * y_stride + r, y_stride, k0 == 0, nr);
            }
        }
    }
}
#undef FV

#define GEMM_FLOAT(name, kind, esize)                                                                   \
    static void name(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,  \
                     float *y, size_t y_stride) {                                                       \
        gemm_strips16(w, n_in, r0, r1, x, x_stride, n_tok, y, y_stride, kind, esize);                   \
    }
GEMM_FLOAT(gemm_f32, 0, 4)
GEMM_FLOAT(gemm_f16, 1, 2)
GEMM_FLOAT(gemm_bf16, 2, 2)

/* ------------------------------------------------------------------------------------------- K-quants
 * Q4_K / Q5_K / Q6_K run against the same q8a activations as the 32-blocks (a super-block = 8 q8a blocks, one per
 * 32-element sub-block, whose own 6-bit / 8-bit scales apply after the integer dot): no second activation format,
 * and the forward step's quantize-once-per-input stays as it is. Their rows are repacked 8-interleaved at load
 * like Q4_0..Q8_0, so the kernels (kq_x8.h) have the same shape as the 32-block ones. */
static void repack_kx8(const void *src, void *dst, int n_out, int n_in, int ti) {
    const int nsb = n_in / EL_QK_K, ng = (n_out + 7) / 8;
    const size_t sb = el_type_block_bytes(ti), db = 8 * sb;
    for (int G = 0; G < ng; G++)
        for (int b = 0; b < nsb; b++) {
            uint8_t *o = (uint8_t *)dst + ((size_t)G * nsb + b) * db;
            memset(o, 0, db);
            for (int i = 0; i < 8 && G * 8 + i < n_out; i++) {
                const uint8_t *s = (const uint8_t *)src + ((size_t)(G * 8 + i) * nsb + b) * sb;
                if (ti == EL_TI_Q6_K) {
                    const block_q6_k *x = (const block_q6_k *)s;
                    block_q6_kx8 *y = (block_q6_kx8 *)o;
                    for (int c = 0; c < 4; c++)
                        for (int g = 0; g < 8; g++) memcpy(y->ql + c * 256 + g * 32 + i * 4, x->ql + c * 32 + g * 4, 4);
                    for (int c = 0; c < 2; c++)
                        for (int g = 0; g < 8; g++) memcpy(y->qh + c * 256 + g * 32 + i * 4, x->qh + c * 32 + g * 4, 4);
                    for (int k = 0; k < 16; k++) y->scales[k][i] = x->scales[k];
                    y->d[i] = x->d;
                } else {
                    const block_q4_k *x4 = (const block_q4_k *)s;   /* d, dmin, scales: same offsets in Q5_K */
                    const uint8_t *qs = ti == EL_TI_Q4_K ? x4->qs : ((const block_q5_k *)s)->qs;
                    block_q4_kx8 *y4 = (block_q4_kx8 *)o;           /* likewise d, dmin, scales in q5_kx8 */
                    uint8_t *oqs = ti == EL_TI_Q4_K ? y4->qs : ((block_q5_kx8 *)o)->qs;
                    y4->d[i] = x4->d;
                    y4->dmin[i] = x4->dmin;
                    memcpy(y4->scales[i], x4->scales, 12);
                    for (int c = 0; c < 4; c++)
                        for (int g = 0; g < 8; g++) memcpy(oqs + c * 256 + g * 32 + i * 4, qs + c * 32 + g * 4, 4);
                    if (ti == EL_TI_Q5_K)
                        for (int g = 0; g < 8; g++)
                            memcpy(((block_q5_kx8 *)o)->qh + g * 32 + i * 4, ((const block_q5_k *)s)->qh + g * 4, 4);
                }
            }
        }
}
static void repack_q4_k(const void *s, void *d, int n_out, int n_in) { repack_kx8(s, d, n_out, n_in, EL_TI_Q4_K); }
static void repack_q5_k(const void *s, void *d, int n_out, int n_in) { repack_kx8(s, d, n_out, n_in, EL_TI_Q5_K); }
static void repack_q6_k(const void *s, void *d, int n_out, int n_in) { repack_kx8(s, d, n_out, n_in, EL_TI_Q6_K); }

#define KQX(name) name##_avx2
#define KQ_ATTR
#define KQ_DOT(acc, w, a) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((w), (a)), ones))
#include "kq_x8.h"   /* no include guard: included once per flavour */
#undef KQX
#undef KQ_ATTR
#undef KQ_DOT
#define KQX(name) name##_vnni
#define KQ_ATTR __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define KQ_DOT(acc, w, a) _mm256_dpbusd_epi32((acc), (w), (a))
#define KQ_X16   /* 16-row kernels in 512-bit vectors */
#include "kq_x8.h"
#undef KQ_X16
#undef KQX
#undef KQ_ATTR
#undef KQ_DOT

/* kernels_vnni.c: the K-quant GEMMs with vpdpbusd (same repacked layouts) */
void el_avx2_kquants_vnni(el_kernels *k) {
    k->types[EL_TI_Q4_K].gemm = gemm_q4_kx8_vnni;
    k->types[EL_TI_Q5_K].gemm = gemm_q5_kx8_vnni;
    k->types[EL_TI_Q6_K].gemm = gemm_q6_k16_vnni;
}

/* --------------------------------------------------------------------------------------- element-wise */
static void rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) { const __m256 v = _mm256_loadu_ps(x + i); acc = _mm256_fmadd_ps(v, v, acc); }
    float ss = hsum8(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    const __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
    for (; i < n; i++) y[i] = x[i] * scale * w[i];
}

static void softmax(float *x, int n) {
    float mx = -INFINITY;
    int i = 0;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    float t[8];
    _mm256_storeu_ps(t, vm);
    for (int j = 0; j < 8; j++) mx = fmaxf(mx, t[j]);
    for (; i < n; i++) mx = fmaxf(mx, x[i]);
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmx));
        _mm256_storeu_ps(x + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum8(vs);
    for (; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    const float inv = 1.0f / sum;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
    for (; i < n; i++) x[i] *= inv;
}

static void silu_mul(const float *g, const float *u, float *y, int n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void gelu_mul(const float *g, const float *u, float *y, int n) {
    const float c = 0.7978845608028654f;  /* sqrt(2/pi) */
    const __m256 vc = _mm256_set1_ps(c), vk = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.0f),
                 two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 z = _mm256_mul_ps(vc, _mm256_fmadd_ps(_mm256_mul_ps(vk, v), _mm256_mul_ps(v, v), v));
        /* 1 + tanh(z) = 2 - 2 / (e^{2z} + 1) = 2 e^{2z} / (e^{2z} + 1) */
        /* 2z capped at 80: e stays finite so 2e / (e + 1) is 2, not inf / inf */
        const __m256 e = exp8(_mm256_min_ps(_mm256_mul_ps(two, z), _mm256_set1_ps(80.0f)));
        const __m256 th1 = _mm256_div_ps(_mm256_mul_ps(two, e), _mm256_add_ps(e, one));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, v), th1), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) {
        const float v = g[i];
        y[i] = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v))) * u[i];
    }
}

static void add(const float *a, const float *b, float *y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    for (; i < n; i++) y[i] = a[i] + b[i];
}

static void to_f16(const float *x, el_half *y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = el_float_to_half(x[i]);
}

/* ------------------------------------------------------------------------------------------- attention */
static void (*generic_attn)(const float *, int, const int32_t *, const void *const *, const void *const *, int, int, int,
                            int, int, float, float *, float *);

/* 8 floats of an f32 / f16 cache row from element i (i % 8 == 0) */
INLINE __m256 kv_load8(const void *row, int type, int i) {
    if (type == EL_F16) return load8_f16((const el_half *)row + i);
    return _mm256_loadu_ps((const float *)row + i);
}

/* the 8 int8 of a q8_0 block from element l (l % 8 == 0), as floats (the block's scale not applied) */
INLINE __m256 q8_load8(const block_q8_0 *b, int l) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + l))));
}

/* Rows [j0, j0 + jn) of a block walk as floats: dst [round8(jn)][hd], the rows past jn zero (f16 exactly widened;
 * q8_0 as scale * int8, rounded once) */
INLINE void kv_rows_float(const void *const *blocks, int block, int off, int j0, int jn, int type, int hd, float *dst) {
    const size_t rb = el_kv_row_bytes(type, hd);
    float *o = dst;
    for (int j = j0; j < j0 + jn;) {
        const char *row;
        for (int run = el_kv_run(blocks, block, off, j, j0 + jn, rb, &row); run > 0; run--, j++, row += rb, o += hd) {
            if (type == EL_F32) memcpy(o, row, sizeof(float) * (size_t)hd);
            else if (type == EL_F16) for (int i = 0; i < hd; i += 8) _mm256_storeu_ps(o + i, kv_load8(row, EL_F16, i));
            else {
                const block_q8_0 *b = (const block_q8_0 *)row;
                for (int i = 0; i < hd / EL_QK; i++) {
                    const __m256 d = _mm256_set1_ps(_cvtsh_ss(b[i].d));
                    for (int l = 0; l < EL_QK; l += 8) _mm256_storeu_ps(o + i * EL_QK + l, _mm256_mul_ps(d, q8_load8(b + i, l)));
                }
            }
        }
    }
    memset(o, 0, sizeof(float) * (size_t)hd * (size_t)((jn + 7) / 8 * 8 - jn));
}

/* scores of one query row against 8 float K rows (K: [8][hd]): per row an 8-lane FMA chain over head_dim, then the
 * lanes summed by one fixed tree ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), four rows' trees at once by hadd. A slot's
 * score depends on its own row only: whatever the other 7, whichever call. */
INLINE __m256 scores8(const float *q, const float *K, int hd) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + hd + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 2 * hd + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 3 * hd + i), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 4 * hd + i), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 5 * hd + i), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 6 * hd + i), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 7 * hd + i), a7);
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* o[0 .. 8*NV) += sum_j p[j] * V[j][0 .. 8*NV): NV accumulators stay in registers when NV is a constant; each
 * element sums its slots in order */
INLINE void pv_slice(const float *p, const float *V, int hd, int jmax, int NV, float *o) {
    __m256 acc[8];
    for (int s = 0; s < NV; s++) acc[s] = _mm256_loadu_ps(o + 8 * s);
    for (int j = 0; j < jmax; j++) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const float *vr = V + (size_t)j * hd;
        for (int s = 0; s < NV; s++) acc[s] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * s), acc[s]);
    }
    for (int s = 0; s < NV; s++) _mm256_storeu_ps(o + 8 * s, acc[s]);
}

/* n_q query rows sharing a start slot; two passes over the slots in chunks of EL_ATTN_KC, each chunk of K (then V)
 * converted to float once for all rows: scores (scores8), softmax per row, then p . V. Decode (the query heads of
 * one token) and prefill (a tile of tokens) run this same arithmetic per row. */
static void attn(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb,
                 int block, int off, int k_type, int v_type, int hd, float scale, float *scratch, float *out) {
    if (hd % 8 || hd > 256) {
        generic_attn(q, n_q, n_kv, kb, vb, block, off, k_type, v_type, hd, scale, scratch, out);
        return;
    }
    enum { KC = EL_ATTN_KC };
    int max_kv = 0;
    for (int i = 0; i < n_q; i++) max_kv = n_kv[i] > max_kv ? n_kv[i] : max_kv;
    const size_t ld = (size_t)(max_kv + 7) / 8 * 8;
    float *S = scratch, *C = scratch + (size_t)n_q * ld;
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int j0 = 0; j0 < max_kv; j0 += KC) {
        const int jn = max_kv - j0 < KC ? max_kv - j0 : KC;
        kv_rows_float(kb, block, off, j0, jn, k_type, hd, C);
        for (int i = 0; i < n_q; i++) {
            const int jmax = n_kv[i] - j0 < jn ? n_kv[i] - j0 : jn;
            for (int jb = 0; jb < jmax; jb += 8)
                _mm256_storeu_ps(S + (size_t)i * ld + j0 + jb, _mm256_mul_ps(scores8(q + (size_t)i * hd, C + (size_t)jb * hd, hd), vscale));
        }
    }
    for (int i = 0; i < n_q; i++) softmax(S + (size_t)i * ld, n_kv[i]);
    memset(out, 0, sizeof(float) * (size_t)n_q * hd);
    for (int j0 = 0; j0 < max_kv; j0 += KC) {
        const int jn = max_kv - j0 < KC ? max_kv - j0 : KC;
        kv_rows_float(vb, block, off, j0, jn, v_type, hd, C);
        for (int i = 0; i < n_q; i++) {
            const int jmax = n_kv[i] - j0 < jn ? n_kv[i] - j0 : jn;
            if (jmax <= 0) continue;
            const float *p = S + (size_t)i * ld + j0;
            float *o = out + (size_t)i * hd;
            for (int d0 = 0; d0 < hd; d0 += 64) {   /* 8 accumulators = 64 dims in registers */
                const int nv = (hd - d0) / 8 < 8 ? (hd - d0) / 8 : 8;
                if (nv == 8) pv_slice(p, C + d0, hd, jmax, 8, o + d0);
                else pv_slice(p, C + d0, hd, jmax, nv, o + d0);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ table */
void el_fill_avx2(el_kernels *k) {
    el_fill_generic(k);
    k->name = "avx2";
    generic_attn = k->attn;
    k->types[EL_TI_Q4_0] = (el_type_kernels){ 1, 8, repack_q4_0, gemm_q4_0x8 };
    k->types[EL_TI_Q4_1] = (el_type_kernels){ 1, 8, repack_q4_1, gemm_q4_1x8 };
    k->types[EL_TI_Q8_0] = (el_type_kernels){ 1, 8, repack_q8_0, gemm_q8_0x8 };
    k->types[EL_TI_F32] = (el_type_kernels){ 0, FS2, repack_f32_s16, gemm_f32 };   /* 16-row k-major strips */
    k->types[EL_TI_F16] = (el_type_kernels){ 0, FS2, repack_h_s16, gemm_f16 };
    k->types[EL_TI_BF16] = (el_type_kernels){ 0, FS2, repack_h_s16, gemm_bf16 };
    k->types[EL_TI_Q5_0] = (el_type_kernels){ 1, 8, repack_q5_0, gemm_q5_0x8 };
    k->types[EL_TI_Q5_1] = (el_type_kernels){ 1, 8, repack_q5_1, gemm_q5_1x8 };
    k->types[EL_TI_Q4_K] = (el_type_kernels){ 1, 8, repack_q4_k, gemm_q4_kx8_avx2 };   /* q8a activations */
    k->types[EL_TI_Q5_K] = (el_type_kernels){ 1, 8, repack_q5_k, gemm_q5_kx8_avx2 };
    k->types[EL_TI_Q6_K] = (el_type_kernels){ 1, 8, repack_q6_k, gemm_q6_kx8_avx2 };
    k->quantize_q8a = quantize_q8a;
    k->rmsnorm = rmsnorm;
    k->softmax = softmax;
    k->silu_mul = silu_mul;
    k->gelu_mul = gelu_mul;
    k->add = add;
    k->to_f16 = to_f16;
    k->attn = attn;
}
#else
typedef int el_avx2_unused;
#endif
