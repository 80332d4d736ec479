/* K-quant GEMMs over the 8-row interleaved layouts (quants.h block_q4_kx8 / q5_kx8 / q6_kx8), included by
 * kernels_avx2.c once per dot-product flavour: KQX(name) names the functions, KQ_ATTR is the target attribute,
 * KQ_DOT(acc, u8 weights, s8 activations) adds 8 lanes of 4-product sums (AVX2: vpmaddubsw + vpmaddwd + vpaddd;
 * AVX512-VNNI: vpdpbusd). As in the *_x8 kernels: one 32-byte load holds 4 quants of 8 rows, a 4-byte broadcast of
 * the activations meets it, each row's sum stays in its own lane; per 32-element sub-block (a q8a block) one FMA
 * applies the 8 rows' d*scale times the block's d, one more the mins (d*m times the block's d*sum(q)).
 * Q6_K: its two 16-element halves accumulate apart, lose 32 * (sum of the half's activations), take their int8
 * scales by vpmulld. Tiles: 8 rows x up to 4 tokens; groups of KQ_G row groups per token tile keep the
 * activations in L1 and the weights in L2. No include guard on purpose. */

KQ_ATTR static inline __attribute__((always_inline)) __m256i KQX(to_bit4)(__m256i v, int j) {  /* bit j -> bit 4 */
    return j <= 4 ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - j)) : _mm256_srl_epi16(v, _mm_cvtsi32_si128(j - 4));
}

/* the 8 rows' 6-bit scales and mins (12 bytes a row, GGUF's packing) as bytes [sub-block][row]: the bit moves
 * of the scalar decode done on all 8 rows at once (one u32 lane per row), then a byte transpose */
KQ_ATTR static inline __attribute__((always_inline)) void KQX(unpack_scales)(const uint8_t (*scales)[12],
                                                                            uint8_t sc[8][8], uint8_t mn[8][8]) {
    const __m256i idx = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);   /* row r's first u32 */
    const int *base = (const int *)scales;
    const __m256i u0 = _mm256_i32gather_epi32(base, idx, 4), u1 = _mm256_i32gather_epi32(base + 1, idx, 4);
    const __m256i u2 = _mm256_i32gather_epi32(base + 2, idx, 4);
    const __m256i m3f = _mm256_set1_epi32(0x3f3f3f3f), m0f = _mm256_set1_epi32(0x0f0f0f0f);
    const __m256i m03 = _mm256_set1_epi32(0x03030303);
    const __m256i v[4] = {
        _mm256_and_si256(u0, m3f),
        _mm256_or_si256(_mm256_and_si256(u2, m0f), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), m03), 4)),
        _mm256_and_si256(u1, m3f),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), m0f),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), m03), 4)),
    };
    /* lane (row) r, byte k -> byte 8k + r: bytes to [k][rows 0-3] per 128-bit half, then the halves interleaved */
    const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i mix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    uint8_t *out[4] = { sc[0], sc[4], mn[0], mn[4] };
    for (int i = 0; i < 4; i++)
        _mm256_store_si256((__m256i *)out[i], _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v[i], tr), mix));
}

#define KQ_PF 4   /* row groups ahead prefetched into L2 (the next one into L1), as kernels_vnni.c's x8 tiles */
/* the 16-row one-token kernels: the next pair of row groups into L2 as this pair's matching super-block is read, and
 * this pair's super-block 2 ahead into L1 (measured on 1.7B's matrices streaming from memory, 2 threads: Q6_K 23.0
 * -> 26.6 GB/s, Q4_K 26.1 -> 28.6 against 4 groups ahead / the next pair into L1) */
#define KQ_FAR 2
#define KQ_NEAR 2
/* most tokens of a 16-row Q4_K / Q5_K tile (512-bit); Q6_K's tile needs more registers and takes 4, as the 8-row ones */
#define KQ_T16 6
/* Prefetches are issued a part at a time through a super-block's work (part k of n of its lines at the start of
 * sub-block loop step k): all at once at its start, the misses of 2-4 streams x 18-27 lines overflowed the core's
 * queue of outstanding misses and streaming stalled (Zen 4, 1.7B matrices, 2 threads: Q6_K 17.5-22.0 -> 29.6-30.5
 * GB/s, Q4_K 19.7-24.2 -> 29.1-42.6). */
static inline __attribute__((always_inline)) size_t KQX(part_lines)(size_t bs, int k, int n, size_t *l1) {
    const size_t lines = (bs + 63) / 64;
    *l1 = lines * (size_t)(k + 1) / (size_t)n * 64;
    return lines * (size_t)k / (size_t)n * 64;
}

/* part k of n of super-block i of the row groups ahead: bs bytes at pf (far, into L2) and at next (into L1) */
static inline __attribute__((always_inline)) void KQX(prefetch_sb)(const uint8_t *pf, const uint8_t *next, size_t bs,
                                                                  int k, int n) {
    size_t end;
    for (size_t o = KQX(part_lines)(bs, k, n, &end); o < end; o += 64) {
        _mm_prefetch((const char *)pf + o, _MM_HINT_T1);
        _mm_prefetch((const char *)next + o, _MM_HINT_T0);
    }
}

KQ_ATTR static inline __attribute__((always_inline)) void KQX(k4x8_tile)(const int q5, const uint8_t *wg, int nsb,
        const uint8_t *x, size_t x_stride, const int NT, float *y, size_t y_stride, int nrows, const uint8_t *pf) {
    const size_t bs = q5 ? sizeof(block_q5_kx8) : sizeof(block_q4_kx8);
    const __m256i m4 = _mm256_set1_epi8(15), h5 = _mm256_set1_epi8(0x10);
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nsb; i++) {
        const uint8_t *qs, *qh = NULL, (*scales)[12];
        const el_half *dp, *dmp;
        if (q5) {
            const block_q5_kx8 *b = (const block_q5_kx8 *)wg + i;
            qs = b->qs; qh = b->qh; dp = b->d; dmp = b->dmin; scales = b->scales;
        } else {
            const block_q4_kx8 *b = (const block_q4_kx8 *)wg + i;
            qs = b->qs; dp = b->d; dmp = b->dmin; scales = b->scales;
        }
        uint8_t sc[8][8] __attribute__((aligned(32))), mn[8][8] __attribute__((aligned(32)));   /* [sub-block][row] */
        KQX(unpack_scales)(scales, sc, mn);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dp));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dmp));
        for (int c = 0; c < 4; c++) {
            if (pf) KQX(prefetch_sb)(pf + i * bs, wg + ((size_t)nsb + i) * bs, bs, c, 4);
            __m256i aL[4], aH[4];
            for (int t = 0; t < NT; t++) aL[t] = aH[t] = _mm256_setzero_si256();
            for (int g = 0; g < 8; g++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + c * 256 + g * 32));
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (q5) {
                    const __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + g * 32));
                    lo = _mm256_or_si256(lo, _mm256_and_si256(KQX(to_bit4)(hb, 2 * c), h5));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(KQX(to_bit4)(hb, 2 * c + 1), h5));
                }
                for (int t = 0; t < NT; t++) {
                    const block_q8a *a = (const block_q8a *)(x + t * x_stride) + 8 * i + 2 * c;
                    aL[t] = KQ_DOT(aL[t], lo, bcast4(a[0].qs + 4 * g));
                    aH[t] = KQ_DOT(aH[t], hi, bcast4(a[1].qs + 4 * g));
                }
            }
            const __m256 sL = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc[2 * c]))));
            const __m256 sH = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc[2 * c + 1]))));
            const __m256 mL = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)mn[2 * c]))));
            const __m256 mH = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)mn[2 * c + 1]))));
            for (int t = 0; t < NT; t++) {
                const block_q8a *a = (const block_q8a *)(x + t * x_stride) + 8 * i + 2 * c;
                __m256 s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(aL[t]), _mm256_mul_ps(sL, _mm256_set1_ps(a[0].d)), acc[t]);
                s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(aH[t]), _mm256_mul_ps(sH, _mm256_set1_ps(a[1].d)), s);
                s = _mm256_fnmadd_ps(mL, _mm256_set1_ps(a[0].s), s);
                acc[t] = _mm256_fnmadd_ps(mH, _mm256_set1_ps(a[1].s), s);
            }
        }
    }
    for (int t = 0; t < NT; t++) store_rows(y + t * y_stride, acc[t], nrows);
}

#ifdef KQ_X16
/* 32 bytes of each of two row groups in one 512-bit vector */
KQ_ATTR static inline __attribute__((always_inline)) __m512i KQX(pair)(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}
/* bytes [sub-block j][row] of two groups' unpacked scales -> 16 floats */
KQ_ATTR static inline __attribute__((always_inline)) __m512 KQX(scales16)(const uint8_t *a, const uint8_t *b) {
    const __m128i v = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)a), _mm_loadl_epi64((const __m128i *)b));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
}

/* the 16-row one-token kernels' prefetch for super-block i of the pair (b0, b1 = b0 + gs): the next pair's at pf
 * into L2 (KQ_FAR), this pair's KQ_NEAR super-blocks ahead into L1 */
static inline __attribute__((always_inline)) void KQX(prefetch_pair)(const uint8_t *pf, size_t gs, const uint8_t *b0,
                                                                    const uint8_t *b1, size_t bs, int k, int n) {
    size_t end;
    for (size_t o = KQX(part_lines)(bs, k, n, &end); o < end; o += 64) {
        _mm_prefetch((const char *)pf + o, _MM_HINT_T1);
        _mm_prefetch((const char *)pf + gs + o, _MM_HINT_T1);
        _mm_prefetch((const char *)b0 + KQ_NEAR * bs + o, _MM_HINT_T0);
        _mm_prefetch((const char *)b1 + KQ_NEAR * bs + o, _MM_HINT_T0);
    }
}

/* NT (1..KQ_T16) tokens over two neighbouring row groups (16 rows) in 512-bit vectors: per row the same integer sums
 * and the same float operations in the same order as k4x8_tile, so the same bits, in half the vector instructions
 * (unpacking the nibbles is most of them: 32 registers hold 6 tokens' sums, so one unpacking serves up to 6).
 * w1 = w0 + gs; pf: the next pair (into L2, KQ_FAR); KQ_NEAR super-blocks ahead into L1. NT = 1 is the decode step. */
KQ_ATTR static inline __attribute__((always_inline)) void KQX(k4x16_tile)(const int q5, const uint8_t *w0, size_t gs,
        int nsb, const uint8_t *x, size_t x_stride, const int NT, float *y, size_t y_stride, int nrows, const uint8_t *pf) {
    const size_t bs = q5 ? sizeof(block_q5_kx8) : sizeof(block_q4_kx8);
    const __m512i m4 = _mm512_set1_epi8(15), h5 = _mm512_set1_epi8(0x10);
    __m512 acc[KQ_T16];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int i = 0; i < nsb; i++) {
        const uint8_t *b0 = w0 + i * bs, *b1 = b0 + gs;
        const block_q4_kx8 *h0 = (const block_q4_kx8 *)b0, *h1 = (const block_q4_kx8 *)b1;   /* same head in q5 */
        uint8_t sc[2][8][8] __attribute__((aligned(32))), mn[2][8][8] __attribute__((aligned(32)));
        KQX(unpack_scales)(h0->scales, sc[0], mn[0]);
        KQX(unpack_scales)(h1->scales, sc[1], mn[1]);
        const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)h0->d)),
                                                                 _mm_loadu_si128((const __m128i *)h1->d), 1));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)h0->dmin)),
                                                                    _mm_loadu_si128((const __m128i *)h1->dmin), 1));
        const uint8_t *qs0 = q5 ? ((const block_q5_kx8 *)b0)->qs : h0->qs, *qs1 = q5 ? ((const block_q5_kx8 *)b1)->qs : h1->qs;
        for (int c = 0; c < 4; c++) {
            if (pf) KQX(prefetch_pair)(pf + i * bs, gs, b0, b1, bs, c, 4);
            const block_q8a *a[KQ_T16];
            __m512i aL[KQ_T16], aH[KQ_T16];
            for (int t = 0; t < NT; t++) {
                a[t] = (const block_q8a *)(x + t * x_stride) + 8 * i + 2 * c;
                aL[t] = aH[t] = _mm512_setzero_si512();
            }
            for (int g = 0; g < 8; g++) {
                const __m512i v = KQX(pair)(qs0 + c * 256 + g * 32, qs1 + c * 256 + g * 32);
                __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                if (q5) {
                    const __m512i hb = KQX(pair)(((const block_q5_kx8 *)b0)->qh + g * 32, ((const block_q5_kx8 *)b1)->qh + g * 32);
                    lo = _mm512_ternarylogic_epi32(lo, 2 * c <= 4 ? _mm512_slli_epi16(hb, 4 - 2 * c) : _mm512_srli_epi16(hb, 2 * c - 4), h5, 0xf8);
                    hi = _mm512_ternarylogic_epi32(hi, 2 * c + 1 <= 4 ? _mm512_slli_epi16(hb, 3 - 2 * c) : _mm512_srli_epi16(hb, 2 * c - 3), h5, 0xf8);
                }
                for (int t = 0; t < NT; t++) {
                    int32_t l4, h4;
                    memcpy(&l4, a[t][0].qs + 4 * g, 4);
                    memcpy(&h4, a[t][1].qs + 4 * g, 4);
                    aL[t] = _mm512_dpbusd_epi32(aL[t], lo, _mm512_set1_epi32(l4));
                    aH[t] = _mm512_dpbusd_epi32(aH[t], hi, _mm512_set1_epi32(h4));
                }
            }
            const __m512 sL = _mm512_mul_ps(d, KQX(scales16)(sc[0][2 * c], sc[1][2 * c]));
            const __m512 sH = _mm512_mul_ps(d, KQX(scales16)(sc[0][2 * c + 1], sc[1][2 * c + 1]));
            const __m512 mL = _mm512_mul_ps(dmin, KQX(scales16)(mn[0][2 * c], mn[1][2 * c]));
            const __m512 mH = _mm512_mul_ps(dmin, KQX(scales16)(mn[0][2 * c + 1], mn[1][2 * c + 1]));
            for (int t = 0; t < NT; t++) {
                __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(aL[t]), _mm512_mul_ps(sL, _mm512_set1_ps(a[t][0].d)), acc[t]);
                s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(aH[t]), _mm512_mul_ps(sH, _mm512_set1_ps(a[t][1].d)), s);
                s = _mm512_fnmadd_ps(mL, _mm512_set1_ps(a[t][0].s), s);
                acc[t] = _mm512_fnmadd_ps(mH, _mm512_set1_ps(a[t][1].s), s);
            }
        }
    }
    const __mmask16 keep = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * y_stride, keep, acc[t]);
}

/* 32 * the sums of each 16-element half of the token's q8a blocks (Q6_K's -32, as q6kx8_tile computes per tile) */
KQ_ATTR static inline __attribute__((always_inline)) void KQX(half_sums32)(const uint8_t *x, int nblk, int32_t *out) {
    const __m256i one8 = _mm256_set1_epi8(1), ones = _mm256_set1_epi16(1);
    for (int b = 0; b < nblk; b++) {
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(one8, _mm256_loadu_si256((const __m256i *)((const block_q8a *)x + b)->qs)), ones);
        const __m128i lo = _mm256_castsi256_si128(s), hi = _mm256_extracti128_si256(s, 1);
        const __m128i t = _mm_hadd_epi32(lo, hi);                 /* A01 A23 B01 B23 */
        const __m128i u = _mm_hadd_epi32(t, t);                   /* A B A B */
        _mm_storel_epi64((__m128i *)(out + 2 * b), _mm_slli_epi32(u, 5));
    }
}

/* One token of Q6_K over two neighbouring row groups in 512-bit vectors, the same integer sums and float operations
 * per row as q6kx8_tile (same bits). hs: half_sums32 of the token. */
KQ_ATTR static inline __attribute__((always_inline)) void KQX(k6x16_gemv)(const uint8_t *w0, size_t gs, int nsb,
        const uint8_t *x, const int32_t *hs, float *y, int nrows, const uint8_t *pf) {
    const size_t bs = sizeof(block_q6_kx8);
    const __m512i m4 = _mm512_set1_epi8(15), m2 = _mm512_set1_epi8(0x30);
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < nsb; i++) {
        const uint8_t *b0 = w0 + i * bs, *b1 = b0 + gs;
        const block_q6_kx8 *q0 = (const block_q6_kx8 *)b0, *q1 = (const block_q6_kx8 *)b1;
        const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0->d)),
                                                                 _mm_loadu_si128((const __m128i *)q1->d), 1));
        for (int h = 0; h < 2; h++) {   /* qh chunk h holds the high bits of sub-blocks 4h..4h+3 */
            __m512i hv[8], isum[4];
            for (int g = 0; g < 8; g++) hv[g] = KQX(pair)(q0->qh + h * 256 + g * 32, q1->qh + h * 256 + g * 32);
            for (int ch = 0; ch < 2; ch++) {   /* ql chunk 2h + ch: sub-block 4h + ch (low nibbles), 4h + ch + 2 (high) */
                if (pf) KQX(prefetch_pair)(pf + i * bs, gs, b0, b1, bs, 2 * h + ch, 4);
                __m512i v[8];
                for (int g = 0; g < 8; g++) v[g] = KQX(pair)(q0->ql + (2 * h + ch) * 256 + g * 32, q1->ql + (2 * h + ch) * 256 + g * 32);
                for (int nib = 0; nib < 2; nib++) {
                    const int gq = 2 * nib + ch, j = 4 * h + gq;
                    const block_q8a *a = (const block_q8a *)x + 8 * i + j;
                    __m512i aA = _mm512_setzero_si512(), aB = aA;
                    for (int g = 0; g < 8; g++) {
                        const __m512i lo = nib ? _mm512_and_si512(_mm512_srli_epi16(v[g], 4), m4) : _mm512_and_si512(v[g], m4);
                        const __m512i sh = 2 * gq <= 4 ? _mm512_slli_epi16(hv[g], 4 - 2 * gq) : _mm512_srli_epi16(hv[g], 2 * gq - 4);
                        const __m512i q = _mm512_ternarylogic_epi32(lo, sh, m2, 0xf8);   /* lo | (sh & 0x30) */
                        int32_t a4;
                        memcpy(&a4, a->qs + 4 * g, 4);
                        if (g < 4) aA = _mm512_dpbusd_epi32(aA, q, _mm512_set1_epi32(a4));
                        else aB = _mm512_dpbusd_epi32(aB, q, _mm512_set1_epi32(a4));
                    }
                    const __m512i sA = _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)q0->scales[2 * j]),
                                                                               _mm_loadl_epi64((const __m128i *)q1->scales[2 * j])));
                    const __m512i sB = _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)q0->scales[2 * j + 1]),
                                                                               _mm_loadl_epi64((const __m128i *)q1->scales[2 * j + 1])));
                    isum[gq] = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_sub_epi32(aA, _mm512_set1_epi32(hs[2 * (8 * i + j)])), sA),
                                                _mm512_mullo_epi32(_mm512_sub_epi32(aB, _mm512_set1_epi32(hs[2 * (8 * i + j) + 1])), sB));
                }
            }
            for (int gq = 0; gq < 4; gq++)   /* in sub-block order, as the tile */
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[gq]),
                                      _mm512_mul_ps(d, _mm512_set1_ps(((const block_q8a *)x + 8 * i + 4 * h + gq)->d)), acc);
        }
    }
    _mm512_mask_storeu_ps(y, nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1), acc);
}
#endif

#ifdef KQ_X16
/* NT (1..4) tokens of Q6_K over two neighbouring row groups in 512-bit vectors, sub-block by sub-block as
 * q6kx8_tile (the same integer sums and float operations per row: the same bits); hs[t]: half_sums32 of token t,
 * computed once for all the row pairs of a row block. */
KQ_ATTR static inline __attribute__((always_inline)) void KQX(k6x16_tile)(const uint8_t *w0, size_t gs, int nsb,
        const uint8_t *x, size_t x_stride, const int NT, const int32_t *hs, size_t hs_stride, float *y, size_t y_stride,
        int nrows, const uint8_t *pf) {
    const size_t bs = sizeof(block_q6_kx8);
    const __m512i m4 = _mm512_set1_epi8(15), m2 = _mm512_set1_epi8(0x30);
    __m512 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int i = 0; i < nsb; i++) {
        const uint8_t *b0 = w0 + i * bs, *b1 = b0 + gs;
        const block_q6_kx8 *q0 = (const block_q6_kx8 *)b0, *q1 = (const block_q6_kx8 *)b1;
        const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0->d)),
                                                                 _mm_loadu_si128((const __m128i *)q1->d), 1));
        for (int j = 0; j < 8; j++) {
            if (pf) KQX(prefetch_pair)(pf + i * bs, gs, b0, b1, bs, j, 8);
            const int h = j / 4, gq = j % 4, lq = (2 * h + (gq & 1)) * 256;
            __m512i aA[4], aB[4];
            for (int t = 0; t < NT; t++) aA[t] = aB[t] = _mm512_setzero_si512();
            for (int g = 0; g < 8; g++) {
                const __m512i v = KQX(pair)(q0->ql + lq + g * 32, q1->ql + lq + g * 32);
                const __m512i hv = KQX(pair)(q0->qh + h * 256 + g * 32, q1->qh + h * 256 + g * 32);
                const __m512i lo = gq >> 1 ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m4) : _mm512_and_si512(v, m4);
                const __m512i sh = 2 * gq <= 4 ? _mm512_slli_epi16(hv, 4 - 2 * gq) : _mm512_srli_epi16(hv, 2 * gq - 4);
                const __m512i q = _mm512_ternarylogic_epi32(lo, sh, m2, 0xf8);   /* lo | (sh & 0x30) */
                for (int t = 0; t < NT; t++) {
                    int32_t a4;
                    memcpy(&a4, ((const block_q8a *)(x + t * x_stride) + 8 * i + j)->qs + 4 * g, 4);
                    if (g < 4) aA[t] = _mm512_dpbusd_epi32(aA[t], q, _mm512_set1_epi32(a4));
                    else aB[t] = _mm512_dpbusd_epi32(aB[t], q, _mm512_set1_epi32(a4));
                }
            }
            const __m512i sA = _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)q0->scales[2 * j]),
                                                                       _mm_loadl_epi64((const __m128i *)q1->scales[2 * j])));
            const __m512i sB = _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)q0->scales[2 * j + 1]),
                                                                       _mm_loadl_epi64((const __m128i *)q1->scales[2 * j + 1])));
            for (int t = 0; t < NT; t++) {
                const int32_t *ht = hs + t * hs_stride + 2 * (8 * i + j);
                const __m512i isum = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_sub_epi32(aA[t], _mm512_set1_epi32(ht[0])), sA),
                                                      _mm512_mullo_epi32(_mm512_sub_epi32(aB[t], _mm512_set1_epi32(ht[1])), sB));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum),
                                         _mm512_mul_ps(d, _mm512_set1_ps(((const block_q8a *)(x + t * x_stride) + 8 * i + j)->d)), acc[t]);
            }
        }
    }
    const __mmask16 keep = nrows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + t * y_stride, keep, acc[t]);
}
#endif

KQ_ATTR static inline __attribute__((always_inline)) void KQX(q6kx8_tile)(const uint8_t *wg, int nsb,
        const uint8_t *x, size_t x_stride, const int NT, float *y, size_t y_stride, int nrows, const uint8_t *pf) {
    const size_t bs = sizeof(block_q6_kx8);
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(0x30), one8 = _mm256_set1_epi8(1);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < nsb; i++) {
        const block_q6_kx8 *b = (const block_q6_kx8 *)wg + i;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d));
        for (int j = 0; j < 8; j++) {
            if (pf) KQX(prefetch_sb)(pf + i * bs, wg + ((size_t)nsb + i) * bs, bs, j, 8);
            const int h = j / 4, gq = j % 4;
            const uint8_t *lq = b->ql + (2 * h + (gq & 1)) * 256, *hq = b->qh + h * 256;
            __m256i aA[4], aB[4];
            for (int t = 0; t < NT; t++) aA[t] = aB[t] = _mm256_setzero_si256();
            for (int g = 0; g < 8; g++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(lq + g * 32));
                const __m256i lo = gq >> 1 ? _mm256_and_si256(_mm256_srli_epi16(v, 4), m4) : _mm256_and_si256(v, m4);
                const __m256i hv = _mm256_loadu_si256((const __m256i *)(hq + g * 32));
                const __m256i hi = _mm256_and_si256(KQX(to_bit4)(hv, 2 * gq), m2);   /* bits 2gq, 2gq+1 -> 4, 5 */
                const __m256i q = _mm256_or_si256(lo, hi);
                for (int t = 0; t < NT; t++) {
                    const block_q8a *a = (const block_q8a *)(x + t * x_stride) + 8 * i + j;
                    if (g < 4) aA[t] = KQ_DOT(aA[t], q, bcast4(a->qs + 4 * g));
                    else aB[t] = KQ_DOT(aB[t], q, bcast4(a->qs + 4 * g));
                }
            }
            const __m256i sA = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b->scales[2 * j]));
            const __m256i sB = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b->scales[2 * j + 1]));
            for (int t = 0; t < NT; t++) {
                const block_q8a *a = (const block_q8a *)(x + t * x_stride) + 8 * i + j;
                /* 32 * the two halves' activation sums: [A x4 | B x4] after two hadds */
                __m256i bs = _mm256_madd_epi16(_mm256_maddubs_epi16(one8, _mm256_loadu_si256((const __m256i *)a->qs)), ones);
                bs = _mm256_hadd_epi32(bs, bs);
                bs = _mm256_slli_epi32(_mm256_hadd_epi32(bs, bs), 5);
                const __m256i cA = _mm256_permute2x128_si256(bs, bs, 0x00), cB = _mm256_permute2x128_si256(bs, bs, 0x11);
                const __m256i isum = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_sub_epi32(aA[t], cA), sA),
                                                      _mm256_mullo_epi32(_mm256_sub_epi32(aB[t], cB), sB));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(a->d)), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) store_rows(y + t * y_stride, acc[t], nrows);
}

/* one call of a tile of nt (1..4, a constant in each case) tokens: CALL(NT) expands to it */
#define KQ_NT4(nt, CALL)         \
    switch (nt) {                \
    case 4: CALL(4); break;      \
    case 3: CALL(3); break;      \
    case 2: CALL(2); break;      \
    default: CALL(1); break;     \
    }
#define KQ_NT6(nt, CALL)         \
    switch (nt) {                \
    case 6: CALL(6); break;      \
    case 5: CALL(5); break;      \
    default: KQ_NT4(nt, CALL)    \
    }
/* an 8-row tile over nt tokens (xt, yt, pf in scope), at most 4 at a time: the prefetching pass is the first */
#define KQ_BY4(nt, CALL)                                                                                         \
    for (int u_ = 0; u_ < (nt); u_ += 4) {                                                                       \
        const uint8_t *const xu_ = xt + u_ * x_stride;                                                           \
        float *const yu_ = yt + u_ * y_stride;                                                                   \
        const int nu_ = (nt) - u_ < 4 ? (nt) - u_ : 4;                                                           \
        __typeof__(pf) const pf_ = u_ == 0 ? pf : 0;                                                             \
        { const uint8_t *const xt = xu_; float *const yt = yu_; __typeof__(pf_) const pf = pf_; KQ_NT4(nu_, CALL) } \
    }
#define KQ_G 4   /* row groups (of 8) per token tile */

/* Row blocks of KQ_G groups, token tiles of 4 (of KQ_T16 where the flavour has 16-row tiles, call16: pairs of groups go
 * through them and a lone last group through the 8-row tile, 4 tokens at a time; the same bits either way). */
#define KQ_GEMM_X8(fname, call, call16, has16, gemv)                                                                        \
    KQ_ATTR static void fname(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok, \
                              float *y, size_t y_stride) {                                                       \
        const int nsb = n_in / EL_QK_K;                                                                          \
        if (n_tok == 1) r0 = gemv(w, nsb, r0, r1, (const uint8_t *)x, y);   /* the rows it leaves: below */     \
        const int tile = has16 ? KQ_T16 : 4;                                                                     \
        for (int rb = r0; rb < r1; rb += 8 * KQ_G) {                                                             \
            const int re = rb + 8 * KQ_G < r1 ? rb + 8 * KQ_G : r1;                                              \
            for (int t = 0; t < n_tok; t += tile) {                                                              \
                const int nt = n_tok - t < tile ? n_tok - t : tile;                                              \
                const uint8_t *xt = (const uint8_t *)x + t * x_stride;                                           \
                for (int r = rb; r < re; r += 8) {                                                               \
                    const int nrows = r1 - r < 8 ? r1 - r : 8;                                                   \
                    const int pf = t == 0 && r + 8 * KQ_PF < r1;   /* the first token tile streams the weights */\
                    float *yt = y + t * y_stride + r;                                                            \
                    if (has16 && r + 8 < re) {                                                                                                                            \
                        const int n16 = r1 - r < 16 ? r1 - r : 16;                                               \
                        const int pf16 = t == 0 && r + 8 * (KQ_FAR + 2) <= r1;                                   \
                        KQ_NT6(nt, call16)                                                                       \
                        r += 8;                                                                                  \
                        continue;                                                                                \
                    }                                                                                            \
                    KQ_BY4(nt, call)                                                                             \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }
#define KQ_CALL_Q4(NT) KQX(k4x8_tile)(0, (const uint8_t *)w + (size_t)(r / 8) * nsb * sizeof(block_q4_kx8), nsb, xt, x_stride, NT, yt, y_stride, nrows, \
    pf ? (const uint8_t *)w + (size_t)(r / 8 + KQ_PF) * nsb * sizeof(block_q4_kx8) : NULL)
#define KQ_CALL_Q5(NT) KQX(k4x8_tile)(1, (const uint8_t *)w + (size_t)(r / 8) * nsb * sizeof(block_q5_kx8), nsb, xt, x_stride, NT, yt, y_stride, nrows, \
    pf ? (const uint8_t *)w + (size_t)(r / 8 + KQ_PF) * nsb * sizeof(block_q5_kx8) : NULL)
#define KQ_CALL_Q6(NT) KQX(q6kx8_tile)((const uint8_t *)w + (size_t)(r / 8) * nsb * sizeof(block_q6_kx8), nsb, xt, x_stride, NT, yt, y_stride, nrows, \
    pf ? (const uint8_t *)w + (size_t)(r / 8 + KQ_PF) * nsb * sizeof(block_q6_kx8) : NULL)
#define KQ_NONE16(NT) ((void)n16, (void)pf16)
#ifdef KQ_X16
#define KQ_HAS16 1
#define KQ_C16(q5, blk, NT) KQX(k4x16_tile)(q5, (const uint8_t *)w + (size_t)(r / 8) * nsb * sizeof(blk), (size_t)nsb * sizeof(blk), nsb, \
    xt, x_stride, NT, yt, y_stride, n16, pf16 ? (const uint8_t *)w + (size_t)(r / 8 + KQ_FAR) * nsb * sizeof(blk) : NULL)
#define KQ_CALL16_Q4(NT) KQ_C16(0, block_q4_kx8, NT)
#define KQ_CALL16_Q5(NT) KQ_C16(1, block_q5_kx8, NT)
/* one token: pairs of row groups through k4x16_tile; returns where the rows left to the tiles begin */
#define KQ_GEMV_X16(name, q5, blk)                                                                               \
    KQ_ATTR static int name(const void *w, int nsb, int r, int r1, const uint8_t *x, float *y) {               \
        const size_t gs = (size_t)nsb * sizeof(blk);                                                             \
        for (; r + 8 < r1; r += 16)                                                                              \
            KQX(k4x16_tile)(q5, (const uint8_t *)w + (size_t)(r / 8) * gs, gs, nsb, x, 0, 1, y + r, 0, r1 - r,   \
                            r + 8 * (KQ_FAR + 2) <= r1 ? (const uint8_t *)w + (size_t)(r / 8 + KQ_FAR) * gs : NULL); \
        return r;                                                                                                \
    }
KQ_GEMV_X16(KQX(gemv_q4_k), 0, block_q4_kx8)
KQ_GEMV_X16(KQX(gemv_q5_k), 1, block_q5_kx8)
#undef KQ_GEMV_X16
KQ_ATTR static int KQX(gemv_q6_k)(const void *w, int nsb, int r, int r1, const uint8_t *x, float *y) {
    int32_t hs[2 * 8 * 256];   /* half sums of up to 256 super-blocks (65536 inputs); longer rows go to the tiles */
    if (nsb > 256) return r;
    KQX(half_sums32)(x, 8 * nsb, hs);
    const size_t gs = (size_t)nsb * sizeof(block_q6_kx8);
    for (; r + 8 < r1; r += 16)
        KQX(k6x16_gemv)((const uint8_t *)w + (size_t)(r / 8) * gs, gs, nsb, x, hs, y + r, r1 - r,
                        r + 8 * (KQ_FAR + 2) <= r1 ? (const uint8_t *)w + (size_t)(r / 8 + KQ_FAR) * gs : NULL);
    return r;
}
#else
#define KQ_HAS16 0
#define KQ_CALL16_Q4 KQ_NONE16
#define KQ_CALL16_Q5 KQ_NONE16
#define KQX_GEMV_NONE(name) static inline int name(const void *w, int nsb, int r, int r1, const uint8_t *x, float *y) { \
    (void)w; (void)nsb; (void)r1; (void)x; (void)y; return r; }
KQX_GEMV_NONE(KQX(gemv_q4_k))
KQX_GEMV_NONE(KQX(gemv_q5_k))
KQX_GEMV_NONE(KQX(gemv_q6_k))
#undef KQX_GEMV_NONE
#endif
KQ_GEMM_X8(KQX(gemm_q4_kx8), KQ_CALL_Q4, KQ_CALL16_Q4, KQ_HAS16, KQX(gemv_q4_k))
KQ_GEMM_X8(KQX(gemm_q5_kx8), KQ_CALL_Q5, KQ_CALL16_Q5, KQ_HAS16, KQX(gemv_q5_k))
KQ_GEMM_X8(KQX(gemm_q6_kx8), KQ_CALL_Q6, KQ_NONE16, 0, KQX(gemv_q6_k))
#ifdef KQ_X16
/* Q6_K with 16-row tiles: row blocks of 8 groups; each token tile's half sums (half_sums32) computed once a block,
 * on the stack for rows of up to 64 super-blocks (16384 inputs; longer rows: the 8-row kernel) */
enum { KQ6_G = 8, KQ6_MAXSB = 64 };
KQ_ATTR static void KQX(gemm_q6_k16)(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,
                                     float *y, size_t y_stride) {
    const int nsb = n_in / EL_QK_K;
    if (nsb > KQ6_MAXSB) {
        KQX(gemm_q6_kx8)(w, n_in, r0, r1, x, x_stride, n_tok, y, y_stride);
        return;
    }
    if (n_tok == 1) r0 = KQX(gemv_q6_k)(w, nsb, r0, r1, (const uint8_t *)x, y);
    const size_t gs = (size_t)nsb * sizeof(block_q6_kx8), hstride = 2 * 8 * KQ6_MAXSB;
    int32_t hs[4 * 2 * 8 * KQ6_MAXSB];
    for (int rb = r0; rb < r1; rb += 8 * KQ6_G) {
        const int re = rb + 8 * KQ6_G < r1 ? rb + 8 * KQ6_G : r1;
        for (int t = 0; t < n_tok; t += 4) {
            const int nt = n_tok - t < 4 ? n_tok - t : 4;
            const uint8_t *xt = (const uint8_t *)x + t * x_stride;
            int sums = 0;
            for (int r = rb; r < re; r += 8) {
                const uint8_t *wg = (const uint8_t *)w + (size_t)(r / 8) * gs;
                float *yt = y + t * y_stride + r;
                if (r + 8 < re) {
                    if (!sums)
                        for (int u = 0; u < nt; u++) KQX(half_sums32)(xt + u * x_stride, 8 * nsb, hs + u * hstride);
                    sums = 1;
                    const int n16 = r1 - r < 16 ? r1 - r : 16;
                    const uint8_t *pf = t == 0 && r + 8 * (KQ_FAR + 2) <= r1 ? wg + KQ_FAR * gs : NULL;
#define KQ6_16(NT) KQX(k6x16_tile)(wg, gs, nsb, xt, x_stride, NT, hs, hstride, yt, y_stride, n16, pf)
                    KQ_NT4(nt, KQ6_16)
#undef KQ6_16
                    r += 8;
                    continue;
                }
                const int nrows = r1 - r < 8 ? r1 - r : 8;
                const uint8_t *pf = t == 0 && r + 8 * KQ_PF < r1 ? wg + KQ_PF * gs : NULL;
#define KQ6_8(NT) KQX(q6kx8_tile)(wg, nsb, xt, x_stride, NT, yt, y_stride, nrows, pf)
                KQ_NT4(nt, KQ6_8)
#undef KQ6_8
            }
        }
    }
}
#endif
#undef KQ_CALL_Q4
#undef KQ_CALL_Q5
#undef KQ_CALL_Q6
#undef KQ_GEMM_X8
#undef KQ_NT4
#undef KQ_NT6
#undef KQ_BY4
#undef KQ_T16
#undef KQ_NONE16
#undef KQ_HAS16
#undef KQ_CALL16_Q4
#undef KQ_CALL16_Q5
#ifdef KQ_C16
#undef KQ_C16
#endif
#undef KQ_G
#undef KQ_PF
#undef KQ_FAR
#undef KQ_NEAR
