/* x86-64 kernels for AMX-INT8 (Sapphire Rapids and later), on top of the AVX512-VNNI table: the integer GEMMs
 * (32-blocks and K-quants) of AMX_MIN_TOKENS or more tokens (prefill, big decode batches) run their dot products
 * on the tile unit; fewer tokens stay on vpdpbusd (measured on a Sapphire-Rapids-class Xeon: up to 8 tokens a
 * step is bound by streaming the weights, and there the tile path's extra pass through a panel buffer costs as much
 * as it saves).
 *
 * One TDPBSUD / TDPBSSD multiplies an activation tile (up to 16 tokens x one q8a block of 32 int8) by a weight
 * tile (the same 32 inputs of 16 rows, in the tile unit's 4-byte groups) into 16 x 16 exact int32 sums: the
 * same integers the VNNI kernels add up. Each block's sums then leave the tile unit and go through the VNNI
 * kernels' float epilogue, operation for operation (cvt, multiply by the token's d, FMA with the rows' d, the
 * min / offset term), in 16-row vectors instead of 8: a token's result is the same bits here as in a one-token
 * step or on the VNNI table (batch invariance; tests/test_native_kernels.py compares them).
 *
 * The weights keep the 8-row interleaved layouts of the AVX2 / VNNI kernels (quants.h *_x8): the 4-byte groups of
 * an 8-row block are already the tile unit's layout, so two neighbouring row groups unpack (nibbles -> bytes) into
 * a 16-row panel per block, once per row pair for all the tokens of the call. The activation tile loads straight
 * from the q8a rows (stride = the row's bytes). The tile configuration is per thread: read back and loaded only when
 * it differs. K-quants: a panel block is a 32-input sub-block; Q6_K's are two 16-input halves. */
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,amx-tile,amx-int8")
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "edgellm.h"
#include "pairs512.h"

#define INLINE static inline __attribute__((always_inline))

enum { K_Q4_0, K_Q4_1, K_Q5_0, K_Q5_1, K_Q8_0, K_COUNT };
enum { AMX_MIN_TOKENS = 10 };

/* the VNNI kernels: one token, and a lone 8-row group at the end of a range */
static el_gemm_fn vnni_gemm[K_COUNT];

/* one block of a 16-row panel: the rows' scales as f32, and the 32 inputs x 16 rows as 8 tile rows of 64 bytes
 * (tile row j: inputs 4j..4j+3 of row 0, of row 1, ..., of row 15) */
typedef struct { float d[16], m[16]; uint8_t q[8][64]; } panel_blk;

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;
static _Thread_local panel_blk *panel;        /* this thread's panel buffer (freed when the thread ends) */
static _Thread_local int panel_cap;
static pthread_key_t panel_key;
static pthread_once_t panel_once = PTHREAD_ONCE_INIT;
static void panel_key_make(void) { pthread_key_create(&panel_key, free); }

static int panel_reserve(int nb) {
    if (panel_cap >= nb) return 1;
    pthread_once(&panel_once, panel_key_make);
    free(panel);
    panel = aligned_alloc(64, (size_t)nb * sizeof(panel_blk));
    panel_cap = panel ? nb : 0;
    pthread_setspecific(panel_key, panel);
    return panel != NULL;
}

/* two tile sets, one block each: sums 0, 1 (tokens x 16 int32), activations 2, 3 (tokens x kb int8), weights 4, 5
 * (kb / 4 x 64 bytes); kb = 32 inputs (the 32-blocks, Q4_K, Q5_K) or 16 (Q6_K's half sub-blocks) */
static void configure(int nt, int kb) {
    tile_config c, now;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 2; i++) { c.rows[i] = (uint8_t)nt; c.colsb[i] = 64; }
    for (int i = 2; i < 4; i++) { c.rows[i] = (uint8_t)nt; c.colsb[i] = (uint16_t)kb; }
    for (int i = 4; i < 6; i++) { c.rows[i] = (uint8_t)(kb / 4); c.colsb[i] = 64; }
    /* the thread's current configuration, read back (another library on this thread may have changed it) */
    _tile_storeconfig(&now);
    if (memcmp(&c, &now, sizeof c) != 0) _tile_loadconfig(&c);
}

static size_t block_bytes(int kind) {
    return kind == K_Q8_0 ? sizeof(block_q8_0x8) : kind == K_Q4_0 ? sizeof(block_q4_0x8)
         : kind == K_Q4_1 ? sizeof(block_q4_1x8) : kind == K_Q5_0 ? sizeof(block_q5_0x8) : sizeof(block_q5_1x8);
}

#define pair el_pair256      /* short names for this file */
#define q5_high el_q5_high512
#define scales16 el_halves16

/* row groups g0 and g0 + 1 (at w0 and w1), all nb blocks, into the thread's panel; pf (or NULL): the next pair's
 * first group, prefetched block by block so that its weights stream in while this pair computes */
static void unpack_pair(const uint8_t *w0, const uint8_t *w1, int nb, int kind, panel_blk *p, const uint8_t *pf) {
    const size_t bs = block_bytes(kind);
    const int has_min = kind == K_Q4_1 || kind == K_Q5_1, q5 = kind == K_Q5_0 || kind == K_Q5_1;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const size_t gstride = (size_t)(w1 - w0);
    for (int b = 0; b < nb; b++, w0 += bs, w1 += bs, p++) {
        if (pf) {
            for (size_t o = 0; o < bs; o += 64) {
                _mm_prefetch((const char *)pf + b * bs + o, _MM_HINT_T0);
                _mm_prefetch((const char *)pf + gstride + b * bs + o, _MM_HINT_T0);
            }
        }
        _mm512_store_ps(p->d, scales16(w0, w1));
        if (has_min) _mm512_store_ps(p->m, scales16(w0 + 16, w1 + 16));
        const uint8_t *q0 = w0 + (has_min ? 32 : 16), *q1 = w1 + (has_min ? 32 : 16);
        if (kind == K_Q8_0) {
            for (int j = 0; j < 8; j++) _mm512_store_si512((__m512i *)p->q[j], pair(q0 + 32 * j, q1 + 32 * j));
            continue;
        }
        const __m512i hb = q5 ? pair(q0 + 128, q1 + 128) : _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i raw = pair(q0 + 32 * c, q1 + 32 * c);
            __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            if (q5) { lo = _mm512_or_si512(lo, q5_high(hb, c)); hi = _mm512_or_si512(hi, q5_high(hb, c + 4)); }
            _mm512_store_si512((__m512i *)p->q[c], lo);
            _mm512_store_si512((__m512i *)p->q[4 + c], hi);
        }
    }
}

/* K-quants (Q4_K, Q5_K): row groups at w0, w1, all nsb super-blocks, into 8 panel blocks each (one per 32-input
 * sub-block). A panel block's d holds the rows' d * scale and m their dmin * min, the products kq_x8.h forms. */
static void unpack_k_pair(const uint8_t *w0, const uint8_t *w1, int nsb, int q5, panel_blk *p, const uint8_t *pf) {
    const size_t bs = q5 ? sizeof(block_q5_kx8) : sizeof(block_q4_kx8);
    const size_t gstride = (size_t)(w1 - w0), qs_at = q5 ? offsetof(block_q5_kx8, qs) : offsetof(block_q4_kx8, qs);
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    for (int i = 0; i < nsb; i++, w0 += bs, w1 += bs, p += 8) {
        if (pf) {
            for (size_t o = 0; o < bs; o += 64) {
                _mm_prefetch((const char *)pf + i * bs + o, _MM_HINT_T0);
                _mm_prefetch((const char *)pf + gstride + i * bs + o, _MM_HINT_T0);
            }
        }
        const uint8_t *g[2] = { w0, w1 };
        float d[16], dmin[16];
        _mm512_storeu_ps(d, scales16(w0, w1));
        _mm512_storeu_ps(dmin, scales16(w0 + 16, w1 + 16));
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 8; r++) {   /* the 6-bit scales and mins of row r (as kq_x8.h) */
                const uint8_t *sc12 = g[h] + 32 + 12 * r;
                uint32_t u[3], v[4];
                memcpy(u, sc12, 12);
                v[0] = u[0] & 0x3f3f3f3fu;
                v[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
                v[2] = u[1] & 0x3f3f3f3fu;
                v[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
                const uint8_t *bb = (const uint8_t *)v;
                const int row = 8 * h + r;
                for (int j = 0; j < 8; j++) {
                    p[j].d[row] = d[row] * (float)bb[j];
                    p[j].m[row] = dmin[row] * (float)bb[8 + j];
                }
            }
        const uint8_t *q0 = w0 + qs_at, *q1 = w1 + qs_at;
        for (int c = 0; c < 4; c++)
            for (int gq = 0; gq < 8; gq++) {
                const __m512i raw = pair(q0 + c * 256 + gq * 32, q1 + c * 256 + gq * 32);
                __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                if (q5) {
                    const size_t qh_at = offsetof(block_q5_kx8, qh) + (size_t)gq * 32;
                    const __m512i hb = pair(w0 + qh_at, w1 + qh_at);
                    lo = _mm512_or_si512(lo, q5_high(hb, 2 * c));
                    hi = _mm512_or_si512(hi, q5_high(hb, 2 * c + 1));
                }
                _mm512_store_si512((__m512i *)p[2 * c].q[gq], lo);
                _mm512_store_si512((__m512i *)p[2 * c + 1].q[gq], hi);
            }
    }
}

/* Q6_K: a sub-block of 16 rows as two 16-input halves (weights q - 32 as signed bytes: sum((q - 32) a) is
 * kq_x8.h's sum(q a) - 32 sum(a), the same integer), the rows' int8 scales of both halves and their d */
typedef struct { float d[16]; int32_t sa[16], sb[16]; uint8_t q[8][64]; } panel6_blk;
static_assert(sizeof(panel6_blk) <= 2 * sizeof(panel_blk), "panel6_blk fits the panel buffer");

INLINE __m512i q6_high(__m512i hv, int j) {   /* bits j, j + 1 of each byte -> bits 4, 5 */
    const __m512i m = _mm512_set1_epi8(0x30);
    return j <= 4 ? _mm512_and_si512(_mm512_sll_epi16(hv, _mm_cvtsi32_si128(4 - j)), m)
                  : _mm512_and_si512(_mm512_srl_epi16(hv, _mm_cvtsi32_si128(j - 4)), m);
}

static void unpack_q6_pair(const uint8_t *w0, const uint8_t *w1, int nsb, panel6_blk *p, const uint8_t *pf) {
    const size_t bs = sizeof(block_q6_kx8), gstride = (size_t)(w1 - w0);
    const __m512i m4 = _mm512_set1_epi8(0x0f), k32 = _mm512_set1_epi8(32);
    for (int i = 0; i < nsb; i++, w0 += bs, w1 += bs, p += 8) {
        if (pf) {
            for (size_t o = 0; o < bs; o += 64) {
                _mm_prefetch((const char *)pf + i * bs + o, _MM_HINT_T0);
                _mm_prefetch((const char *)pf + gstride + i * bs + o, _MM_HINT_T0);
            }
        }
        const block_q6_kx8 *b0 = (const block_q6_kx8 *)w0, *b1 = (const block_q6_kx8 *)w1;
        const __m512 d = scales16((const uint8_t *)b0->d, (const uint8_t *)b1->d);
        for (int j = 0; j < 8; j++) {
            const int h = j / 4, gq = j % 4;
            _mm512_store_ps(p[j].d, d);
            _mm512_store_si512((__m512i *)p[j].sa, _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(
                _mm_loadl_epi64((const __m128i *)b0->scales[2 * j]), _mm_loadl_epi64((const __m128i *)b1->scales[2 * j]))));
            _mm512_store_si512((__m512i *)p[j].sb, _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(
                _mm_loadl_epi64((const __m128i *)b0->scales[2 * j + 1]), _mm_loadl_epi64((const __m128i *)b1->scales[2 * j + 1]))));
            const size_t lq = (size_t)(2 * h + (gq & 1)) * 256, hq = (size_t)h * 256;
            for (int g = 0; g < 8; g++) {
                const __m512i v = pair(b0->ql + lq + g * 32, b1->ql + lq + g * 32);
                const __m512i lo = gq >> 1 ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m4) : _mm512_and_si512(v, m4);
                const __m512i hi = q6_high(pair(b0->qh + hq + g * 32, b1->qh + hq + g * 32), 2 * gq);
                _mm512_store_si512((__m512i *)p[j].q[g], _mm512_sub_epi8(_mm512_or_si512(lo, hi), k32));
            }
        }
    }
}

/* the VNNI kernels' epilogue for one block of a 16-row panel (sums c: tokens x 16 int32), 16 rows at once */
INLINE void epilogue(__m512 *acc, const int32_t (*c)[16], const panel_blk *p, const uint8_t *xb, size_t xs, int NT,
                     int kind) {
    const __m512 dw = _mm512_load_ps(p->d);
    for (int t = 0; t < NT; t++) {
        const block_q8a *a = (const block_q8a *)(xb + t * xs);
        const __m512 s = _mm512_cvtepi32_ps(_mm512_load_si512((const __m512i *)c[t]));
        if (kind == K_Q4_1 || kind == K_Q5_1) {
            acc[t] = _mm512_fmadd_ps(dw, _mm512_mul_ps(s, _mm512_set1_ps(a->d)), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_load_ps(p->m), _mm512_set1_ps(a->s), acc[t]);
        } else if (kind == K_Q8_0) {
            acc[t] = _mm512_fmadd_ps(dw, _mm512_mul_ps(s, _mm512_set1_ps(a->d)), acc[t]);
        } else {   /* d * (da * sum(q a) + offset * da * sum(a)) */
            const float offset = kind == K_Q4_0 ? -8.0f : -16.0f;
            acc[t] = _mm512_fmadd_ps(dw, _mm512_fmadd_ps(s, _mm512_set1_ps(a->d), _mm512_set1_ps(offset * a->s)), acc[t]);
        }
    }
}

#define DOT(c, a, b) do { if (kind == K_Q8_0) _tile_dpbssd(c, a, b); else _tile_dpbsud(c, a, b); } while (0)
/* block b's sums into cbuf: tile set 0 (sums 0, activations 2, weights 4) or set 1 (1, 3, 5) (tile numbers are
 * instruction immediates) */
#define PRODUCTS_SET(C, A, B, b, cbuf) do {                                                  \
        _tile_loadd(A, x + (size_t)(b) * sizeof(block_q8a) + qa, xs);                        \
        _tile_loadd(B, p[b].q, 64);                                                          \
        _tile_zero(C);                                                                       \
        DOT(C, A, B);                                                                        \
        _tile_stored(C, cbuf, 64);                                                           \
    } while (0)
#define PRODUCTS(set, b, cbuf) do {                                                          \
        if (set) PRODUCTS_SET(1, 3, 5, b, cbuf); else PRODUCTS_SET(0, 2, 4, b, cbuf);        \
    } while (0)

/* 16 rows (nrows valid) x NT tokens (the tiles configured for NT) over all nb blocks of the panel p; x: the tokens'
 * q8a rows. The accumulators stay in registers. The tile unit runs LAG blocks ahead of the epilogue (sums through
 * a ring of buffers, tile sets alternating): reading a tile's sums back right after TILESTORED stalls until the
 * store has landed, so each block's sums are read only after three more blocks have been issued. */
enum { LAG = 3, RING = 4 };
INLINE void tile16(const panel_blk *p, int nb, int kind, const uint8_t *x, size_t xs, int NT, float *y, size_t ys,
                   int nrows) {
    int32_t cb[RING][16][16] __attribute__((aligned(64)));
    const size_t qa = offsetof(block_q8a, qs);
    __m512 acc[16];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int i = 0; i < LAG && i < nb; i++) {
        if (i & 1) PRODUCTS(1, i, cb[i % RING]);
        else PRODUCTS(0, i, cb[i % RING]);
    }
    for (int b = 0; b < nb; b++) {
        const int n = b + LAG;
        if (n < nb) {
            if (n & 1) PRODUCTS(1, n, cb[n % RING]);
            else PRODUCTS(0, n, cb[n % RING]);
        }
        epilogue(acc, (const int32_t (*)[16])cb[b % RING], p + b, x + (size_t)b * sizeof(block_q8a), xs, NT, kind);
    }
    const __mmask16 mask = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * ys, mask, acc[t]);
}

/* K-quants: kq_x8.h's epilogue for a pair of sub-blocks (sums cL, cH), 16 rows at once, op for op */
INLINE void epilogue_k(__m512 *acc, const int32_t (*cL)[16], const int32_t (*cH)[16], const panel_blk *p,
                       const uint8_t *xb, size_t xs, int NT) {
    const __m512 sL = _mm512_load_ps(p[0].d), sH = _mm512_load_ps(p[1].d);
    const __m512 mL = _mm512_load_ps(p[0].m), mH = _mm512_load_ps(p[1].m);
    for (int t = 0; t < NT; t++) {
        const block_q8a *a = (const block_q8a *)(xb + t * xs);
        __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const __m512i *)cL[t])),
                                   _mm512_mul_ps(sL, _mm512_set1_ps(a[0].d)), acc[t]);
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const __m512i *)cH[t])),
                            _mm512_mul_ps(sH, _mm512_set1_ps(a[1].d)), v);
        v = _mm512_fnmadd_ps(mL, _mm512_set1_ps(a[0].s), v);
        acc[t] = _mm512_fnmadd_ps(mH, _mm512_set1_ps(a[1].s), v);
    }
}

/* as tile16, a unit being a pair of sub-blocks (both tile sets; the epilogue needs both sums) */
enum { LAG_K = 2 };
INLINE void tile16_k(const panel_blk *p, int nb, const uint8_t *x, size_t xs, int NT, float *y, size_t ys, int nrows) {
    const int kind = K_Q4_1;   /* DOT: unsigned weights (tdpbsud) */
    int32_t cb[RING][2][16][16] __attribute__((aligned(64)));
    const size_t qa = offsetof(block_q8a, qs);
    const int np = nb / 2;
    __m512 acc[16];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
#define PRODUCTS_PAIR(u) do { PRODUCTS_SET(0, 2, 4, 2 * (u), cb[(u) % RING][0]);                          \
                              PRODUCTS_SET(1, 3, 5, 2 * (u) + 1, cb[(u) % RING][1]); } while (0)
    for (int i = 0; i < LAG_K && i < np; i++) PRODUCTS_PAIR(i);
    for (int u = 0; u < np; u++) {
        if (u + LAG_K < np) PRODUCTS_PAIR(u + LAG_K);
        epilogue_k(acc, (const int32_t (*)[16])cb[u % RING][0], (const int32_t (*)[16])cb[u % RING][1], p + 2 * u,
                   x + (size_t)(2 * u) * sizeof(block_q8a), xs, NT);
    }
#undef PRODUCTS_PAIR
    const __mmask16 mask = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * ys, mask, acc[t]);
}

/* Q6_K: a unit is a sub-block, its halves on the two tile sets (16-input tiles: configure(nt, 16)); kq_x8.h's
 * epilogue: isum = sumA * scaleA + sumB * scaleB (exact integers), then one FMA with d * the block's d */
INLINE void tile16_q6(const panel6_blk *p, int nb, const uint8_t *x, size_t xs, int NT, float *y, size_t ys, int nrows) {
    int32_t cb[RING][2][16][16] __attribute__((aligned(64)));
    const size_t qa = offsetof(block_q8a, qs);
    __m512 acc[16];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
#define HALF(C, A, B, u, half, cbuf) do {                                                    \
        _tile_loadd(A, x + (size_t)(u) * sizeof(block_q8a) + qa + 16 * (half), xs);          \
        _tile_loadd(B, p[u].q[4 * (half)], 64);                                              \
        _tile_zero(C);                                                                       \
        _tile_dpbssd(C, A, B);                                                               \
        _tile_stored(C, cbuf, 64);                                                           \
    } while (0)
#define PRODUCTS_SUB(u) do { HALF(0, 2, 4, u, 0, cb[(u) % RING][0]); HALF(1, 3, 5, u, 1, cb[(u) % RING][1]); } while (0)
    for (int i = 0; i < LAG_K && i < nb; i++) PRODUCTS_SUB(i);
    for (int u = 0; u < nb; u++) {
        if (u + LAG_K < nb) PRODUCTS_SUB(u + LAG_K);
        const __m512 d = _mm512_load_ps(p[u].d);
        const __m512i sa = _mm512_load_si512((const __m512i *)p[u].sa), sb = _mm512_load_si512((const __m512i *)p[u].sb);
        const uint8_t *xb = x + (size_t)u * sizeof(block_q8a);
        for (int t = 0; t < NT; t++) {
            const block_q8a *a = (const block_q8a *)(xb + t * xs);
            const __m512i isum = _mm512_add_epi32(
                _mm512_mullo_epi32(_mm512_load_si512((const __m512i *)cb[u % RING][0][t]), sa),
                _mm512_mullo_epi32(_mm512_load_si512((const __m512i *)cb[u % RING][1][t]), sb));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(a->d)), acc[t]);
        }
    }
#undef PRODUCTS_SUB
#undef HALF
    const __mmask16 mask = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * ys, mask, acc[t]);
}
#undef PRODUCTS
#undef PRODUCTS_SET

/* One driver for the three families: the 32-blocks (kind = K_*), Q4_K / Q5_K (kind = 1 for Q5_K) and Q6_K. Row
 * pairs are unpacked into the thread's panel (the next pair prefetched meanwhile), then every tile of up to 16
 * tokens runs over it; a lone last row group, and calls of fewer than AMX_MIN_TOKENS tokens, go to the VNNI
 * kernel `vnni` (the same sums and epilogue). */
enum { F_BLOCKS, F_KQUANT, F_Q6K };
#define TILE_CASE(N) case N:                                                                                  \
    if (fam == F_BLOCKS) tile16(panel, nb, kind, xt, x_stride, N, yt, y_stride, nrows);                        \
    else if (fam == F_KQUANT) tile16_k(panel, nb, xt, x_stride, N, yt, y_stride, nrows);                       \
    else tile16_q6((const panel6_blk *)panel, nb, xt, x_stride, N, yt, y_stride, nrows);                       \
    break
INLINE void amx_drive(int fam, int kind, el_gemm_fn vnni, const void *w, int n_in, int r0, int r1, const void *x,
                      size_t x_stride, int n_tok, float *y, size_t y_stride) {
    if (n_tok < AMX_MIN_TOKENS) { vnni(w, n_in, r0, r1, x, x_stride, n_tok, y, y_stride); return; }
    const int nb = n_in / EL_QK, nsb = n_in / EL_QK_K;
    const size_t gstride = fam == F_BLOCKS ? (size_t)nb * block_bytes(kind)
                         : (size_t)nsb * (fam == F_Q6K ? sizeof(block_q6_kx8) : kind ? sizeof(block_q5_kx8)
                                                                                      : sizeof(block_q4_kx8));
    if (!panel_reserve(fam == F_Q6K ? 2 * nb : nb)) { vnni(w, n_in, r0, r1, x, x_stride, n_tok, y, y_stride); return; }
    for (int r = r0; r < r1; r += 16) {
        if (r + 8 >= r1) {   /* a lone row group */
            vnni(w, n_in, r, r1, x, x_stride, n_tok, y, y_stride);
            break;
        }
        const uint8_t *w0 = (const uint8_t *)w + (size_t)(r / 8) * gstride;
        const uint8_t *pf = r + 16 + 8 < r1 ? w0 + 2 * gstride : NULL;
        if (fam == F_BLOCKS) unpack_pair(w0, w0 + gstride, nb, kind, panel, pf);
        else if (fam == F_KQUANT) unpack_k_pair(w0, w0 + gstride, nsb, kind, panel, pf);
        else unpack_q6_pair(w0, w0 + gstride, nsb, (panel6_blk *)panel, pf);
        const int nrows = r1 - r < 16 ? r1 - r : 16;
        for (int t = 0; t < n_tok; t += 16) {
            const int nt = n_tok - t < 16 ? n_tok - t : 16;
            const uint8_t *xt = (const uint8_t *)x + t * x_stride;
            float *yt = y + (size_t)t * y_stride + r;
            configure(nt, fam == F_Q6K ? 16 : 32);
            switch (nt) {
            TILE_CASE(2); TILE_CASE(3); TILE_CASE(4); TILE_CASE(5); TILE_CASE(6); TILE_CASE(7); TILE_CASE(8);
            TILE_CASE(9); TILE_CASE(10); TILE_CASE(11); TILE_CASE(12); TILE_CASE(13); TILE_CASE(14); TILE_CASE(15);
            TILE_CASE(16); default: TILE_CASE(1);
            }
        }
    }
}
#undef TILE_CASE

static el_gemm_fn vnni_kgemm[2], vnni_q6gemm;   /* Q4_K, Q5_K; Q6_K */
static void gemm_q4_k_amx(const void *w, int n_in, int r0, int r1, const void *x, size_t xs, int n_tok, float *y,
                          size_t ys) { amx_drive(F_KQUANT, 0, vnni_kgemm[0], w, n_in, r0, r1, x, xs, n_tok, y, ys); }
static void gemm_q5_k_amx(const void *w, int n_in, int r0, int r1, const void *x, size_t xs, int n_tok, float *y,
                          size_t ys) { amx_drive(F_KQUANT, 1, vnni_kgemm[1], w, n_in, r0, r1, x, xs, n_tok, y, ys); }
static void gemm_q6_k_amx(const void *w, int n_in, int r0, int r1, const void *x, size_t xs, int n_tok, float *y,
                          size_t ys) { amx_drive(F_Q6K, 0, vnni_q6gemm, w, n_in, r0, r1, x, xs, n_tok, y, ys); }

#define AMX_GEMM(name, kind)                                                                                    \
    static void name(const void *w, int n_in, int r0, int r1, const void *x, size_t xs, int n_tok, float *y,    \
                     size_t ys) { amx_drive(F_BLOCKS, kind, vnni_gemm[kind], w, n_in, r0, r1, x, xs, n_tok, y, ys); }
AMX_GEMM(gemm_q4_0_amx, K_Q4_0)
AMX_GEMM(gemm_q4_1_amx, K_Q4_1)
AMX_GEMM(gemm_q5_0_amx, K_Q5_0)
AMX_GEMM(gemm_q5_1_amx, K_Q5_1)
AMX_GEMM(gemm_q8_0_amx, K_Q8_0)

void el_fill_amx(el_kernels *k) {
    el_fill_vnni(k);
    k->name = "amx";
    static const int ti[K_COUNT] = { EL_TI_Q4_0, EL_TI_Q4_1, EL_TI_Q5_0, EL_TI_Q5_1, EL_TI_Q8_0 };
    static const el_gemm_fn amx[K_COUNT] = { gemm_q4_0_amx, gemm_q4_1_amx, gemm_q5_0_amx, gemm_q5_1_amx, gemm_q8_0_amx };
    for (int i = 0; i < K_COUNT; i++) {
        vnni_gemm[i] = k->types[ti[i]].gemm;
        k->types[ti[i]].gemm = amx[i];
    }
    vnni_kgemm[0] = k->types[EL_TI_Q4_K].gemm;
    vnni_kgemm[1] = k->types[EL_TI_Q5_K].gemm;
    k->types[EL_TI_Q4_K].gemm = gemm_q4_k_amx;
    k->types[EL_TI_Q5_K].gemm = gemm_q5_k_amx;
    vnni_q6gemm = k->types[EL_TI_Q6_K].gemm;
    k->types[EL_TI_Q6_K].gemm = gemm_q6_k_amx;
}
#else
typedef int el_amx_unused;
#endif
