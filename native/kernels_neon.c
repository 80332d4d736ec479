/* AArch64 Advanced SIMD kernels, in two flavours from one source: "neon" (vmull/vpadal integer dots, any ARMv8-A)
 * and "neon-dotprod" (sdot, ARMv8.2-A+dotprod, compiled per function with target("arch=armv8.2-a+dotprod")). dispatch.c picks
 * one from getauxval(AT_HWCAP). Same signatures as kernels_generic.c; tested against it by tests/test_kernels.c
 * (under qemu-aarch64 on x86 hosts).
 *
 * Quantized weights stay in the GGUF layout here (no repack yet; float weights are repacked into 16-row strips,
 * see below): each row's blocks are unpacked once and dotted with up to
 * 4 tokens' activations (the prefill reuse); per block one int dot -> one float multiply-add into 4 lanes,
 * (K-quants: per 32-element sub-block one int dot and one scalar multiply-add with its own scale),
 * one horizontal sum per row and token at the end. A 4-row interleave (like the AVX2 x8 one, sized for sdot's
 * 4-byte lanes) is the next step for speed. Every weight type the x86 tables accelerate has a NEON GEMM here;
 * dequantize and RoPE use the generic kernels. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>
#include <string.h>
#include "kernels.h"
#include "edgellm.h"

#define INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------------------------- integer dots */
INLINE int32x4_t dot16_plain(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}
__attribute__((target("arch=armv8.2-a+dotprod"))) INLINE int32x4_t dot16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
}

/* Q5_0/Q5_1's fifth bits: bit j of the little-endian u32 qh belongs to element j. Each of a half's two qh bytes is
 * broadcast over 8 lanes and tested against 1, 2, 4 .. 128 (vtst: 0xff where set), giving 0x10 per set bit. */
INLINE uint8x16_t q5_high(const uint8_t *qh2) {
    static const uint8_t bit[16] = { 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128 };
    const uint8x16_t v = vcombine_u8(vdup_n_u8(qh2[0]), vdup_n_u8(qh2[1]));
    return vandq_u8(vtstq_u8(v, vld1q_u8(bit)), vdupq_n_u8(0x10));
}

/* kind: 0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q5_0, 4 Q5_1. One row r, tokens [t0, t0 + NT). The quants enter the integer dot
 * unsigned (0..15, 0..31) or as stored (Q8_0); Q4_0's -8, Q5_0's -16 and the mins go through the activations'
 * d*sum(q) (block_q8a.s), one multiply per block and token. */
#define ROW_KERNEL(NAME, DOT, ATTR)                                                                          \
    ATTR static void NAME(int kind, const uint8_t *row, int nb, const uint8_t *x, size_t x_stride, int NT,      \
                          float *y, size_t y_stride) {                                                        \
        float32x4_t acc[4] = { vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0) };              \
        float extra[4] = { 0, 0, 0, 0 };                                                                      \
        const size_t bsize = kind == 0 ? sizeof(block_q4_0) : kind == 1 ? sizeof(block_q4_1)                   \
                           : kind == 2 ? sizeof(block_q8_0) : kind == 3 ? sizeof(block_q5_0) : sizeof(block_q5_1); \
        const int has_min = kind == 1 || kind == 4;                                                           \
        for (int b = 0; b < nb; b++) {                                                                        \
            const uint8_t *blk = row + b * bsize;                                                             \
            el_half dh, mh = 0;                                                                               \
            memcpy(&dh, blk, 2);                                                                              \
            if (has_min) memcpy(&mh, blk + 2, 2);                                                             \
            const float d = el_half_to_float(dh), mn = has_min ? el_half_to_float(mh) : 0.0f;                 \
            int8x16_t w0, w1;                                                                                 \
            if (kind == 2) {                                                                                  \
                w0 = vld1q_s8((const int8_t *)blk + 2);                                                       \
                w1 = vld1q_s8((const int8_t *)blk + 18);                                                      \
            } else {   /* nibbles 0..15 (Q5: | 0x10 from qh) as int8 */                                      \
                const uint8_t *qh = blk + 2 + 2 * has_min;   /* Q5 only */                                    \
                const uint8x16_t q = vld1q_u8(blk + 2 + 2 * has_min + (kind >= 3 ? 4 : 0));                   \
                uint8x16_t lo = vandq_u8(q, vdupq_n_u8(0x0f)), hi = vshrq_n_u8(q, 4);                         \
                if (kind >= 3) { lo = vorrq_u8(lo, q5_high(qh)); hi = vorrq_u8(hi, q5_high(qh + 2)); }        \
                w0 = vreinterpretq_s8_u8(lo);                                                                 \
                w1 = vreinterpretq_s8_u8(hi);                                                                 \
            }                                                                                                 \
            for (int t = 0; t < NT; t++) {                                                                    \
                const block_q8a *a = (const block_q8a *)(x + t * x_stride) + b;                               \
                const int32x4_t p = DOT(DOT(vdupq_n_s32(0), w0, vld1q_s8(a->qs)), w1, vld1q_s8(a->qs + 16));  \
                acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(p), d * a->d);                                     \
                if (kind == 0) extra[t] -= 8.0f * d * a->s;                                                   \
                else if (kind == 3) extra[t] -= 16.0f * d * a->s;                                             \
                else if (has_min) extra[t] += mn * a->s;                                                      \
            }                                                                                                 \
        }                                                                                                     \
        for (int t = 0; t < NT; t++) y[t * y_stride] = vaddvq_f32(acc[t]) + extra[t];                       \
    }
ROW_KERNEL(row_plain, dot16_plain, )
ROW_KERNEL(row_sdot, dot16_sdot, __attribute__((target("arch=armv8.2-a+dotprod"))))

#define GEMM(NAME, ROW, KIND, BLOCK, ATTR)                                                                   \
    ATTR static void NAME(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,  \
                          float *y, size_t y_stride) {                                                        \
        const int nb = n_in / EL_QK;                                                                          \
        for (int r = r0; r < r1; r++) {                                                                       \
            const uint8_t *row = (const uint8_t *)w + (size_t)r * nb * sizeof(BLOCK);                         \
            for (int t = 0; t < n_tok; t += 4)                                                                \
                ROW(KIND, row, nb, (const uint8_t *)x + t * x_stride, x_stride, n_tok - t < 4 ? n_tok - t : 4,   \
                    y + t * y_stride + r, y_stride);                                                          \
        }                                                                                                     \
    }
GEMM(gemm_q4_0_plain, row_plain, 0, block_q4_0, )
GEMM(gemm_q4_1_plain, row_plain, 1, block_q4_1, )
GEMM(gemm_q8_0_plain, row_plain, 2, block_q8_0, )
GEMM(gemm_q5_0_plain, row_plain, 3, block_q5_0, )
GEMM(gemm_q5_1_plain, row_plain, 4, block_q5_1, )
GEMM(gemm_q4_0_sdot, row_sdot, 0, block_q4_0, __attribute__((target("arch=armv8.2-a+dotprod"))))
GEMM(gemm_q4_1_sdot, row_sdot, 1, block_q4_1, __attribute__((target("arch=armv8.2-a+dotprod"))))
GEMM(gemm_q8_0_sdot, row_sdot, 2, block_q8_0, __attribute__((target("arch=armv8.2-a+dotprod"))))
GEMM(gemm_q5_0_sdot, row_sdot, 3, block_q5_0, __attribute__((target("arch=armv8.2-a+dotprod"))))
GEMM(gemm_q5_1_sdot, row_sdot, 4, block_q5_1, __attribute__((target("arch=armv8.2-a+dotprod"))))

/* ---- K-quants (GGUF layout): a super-block is unpacked once into 16 vectors of 16 quants (Q6_K already minus
 * 32, signed), then each token's 8 q8a blocks are dotted sub-block by sub-block; a sub-block's integer sum takes
 * its scale (Q6_K: one per 16-element half) and one float multiply-add. */
#define KQ_ROW_KERNEL(NAME, DOT, ATTR)                                                                         \
    ATTR static void NAME(int ti, const uint8_t *row, int nsb, const uint8_t *x, size_t x_stride, int NT,       \
                          float *y, size_t y_stride) {                                                        \
        float sum[4] = { 0, 0, 0, 0 };                                                                        \
        const uint8x16_t m4 = vdupq_n_u8(15), b5 = vdupq_n_u8(0x10), b56 = vdupq_n_u8(0x30);                  \
        for (int i = 0; i < nsb; i++) {                                                                       \
            int8x16_t q[16];                                                                                  \
            float dsc[8], dmn[8], d6 = 0.0f;                                                                  \
            const int8_t *sc6 = NULL;                                                                         \
            if (ti == EL_TI_Q6_K) {                                                                           \
                const block_q6_k *b = (const block_q6_k *)row + i;                                            \
                for (int j = 0; j < 8; j++) {                                                                 \
                    const int h = j / 4, gq = j % 4;                                                          \
                    for (int hl = 0; hl < 2; hl++) {                                                          \
                        uint8x16_t lo = vld1q_u8(b->ql + 64 * h + 32 * (gq & 1) + 16 * hl);                   \
                        lo = gq >> 1 ? vshrq_n_u8(lo, 4) : vandq_u8(lo, m4);                                  \
                        const uint8x16_t hh = vld1q_u8(b->qh + 32 * h + 16 * hl);                             \
                        const uint8x16_t hi = vandq_u8(vshlq_u8(hh, vdupq_n_s8((int8_t)(4 - 2 * gq))), b56);  \
                        q[2 * j + hl] = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, hi)), vdupq_n_s8(32));      \
                    }                                                                                         \
                }                                                                                             \
                sc6 = b->scales;                                                                              \
                d6 = el_half_to_float(b->d);                                                                  \
            } else {                                                                                          \
                const uint8_t *qs, *qh = NULL, *scales;                                                       \
                el_half dh, mh;                                                                               \
                if (ti == EL_TI_Q4_K) {                                                                       \
                    const block_q4_k *b = (const block_q4_k *)row + i;                                        \
                    qs = b->qs; scales = b->scales; dh = b->d; mh = b->dmin;                                  \
                } else {                                                                                      \
                    const block_q5_k *b = (const block_q5_k *)row + i;                                        \
                    qs = b->qs; qh = b->qh; scales = b->scales; dh = b->d; mh = b->dmin;                      \
                }                                                                                             \
                for (int c = 0; c < 4; c++)                                                                   \
                    for (int hl = 0; hl < 2; hl++) {                                                          \
                        const uint8x16_t v = vld1q_u8(qs + 32 * c + 16 * hl);                                 \
                        uint8x16_t lo = vandq_u8(v, m4), hi = vshrq_n_u8(v, 4);                               \
                        if (qh) {                                                                             \
                            const uint8x16_t hb = vld1q_u8(qh + 16 * hl);                                     \
                            lo = vorrq_u8(lo, vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)(4 - 2 * c))), b5));   \
                            hi = vorrq_u8(hi, vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)(3 - 2 * c))), b5));   \
                        }                                                                                     \
                        q[4 * c + hl] = vreinterpretq_s8_u8(lo);                                              \
                        q[4 * c + 2 + hl] = vreinterpretq_s8_u8(hi);                                          \
                    }                                                                                         \
                uint8_t sc[8], mn[8];                                                                         \
                el_k4_scales(scales, sc, mn);                                                                 \
                const float d = el_half_to_float(dh), dmin = el_half_to_float(mh);                            \
                for (int j = 0; j < 8; j++) { dsc[j] = d * sc[j]; dmn[j] = dmin * mn[j]; }                    \
            }                                                                                                 \
            for (int t = 0; t < NT; t++) {                                                                    \
                const block_q8a *a = (const block_q8a *)(x + t * x_stride) + 8 * i;                           \
                float s = 0.0f;                                                                               \
                for (int j = 0; j < 8; j++) {                                                                 \
                    const int8x16_t a0 = vld1q_s8(a[j].qs), a1 = vld1q_s8(a[j].qs + 16);                      \
                    if (sc6) {                                                                                \
                        const int i0 = vaddvq_s32(DOT(vdupq_n_s32(0), q[2 * j], a0));                         \
                        const int i1 = vaddvq_s32(DOT(vdupq_n_s32(0), q[2 * j + 1], a1));                     \
                        s += d6 * a[j].d * (float)(sc6[2 * j] * i0 + sc6[2 * j + 1] * i1);                    \
                    } else {                                                                                  \
                        const int is = vaddvq_s32(DOT(DOT(vdupq_n_s32(0), q[2 * j], a0), q[2 * j + 1], a1));  \
                        s += dsc[j] * a[j].d * (float)is - dmn[j] * a[j].s;                                   \
                    }                                                                                         \
                }                                                                                             \
                sum[t] += s;                                                                                  \
            }                                                                                                 \
        }                                                                                                     \
        for (int t = 0; t < NT; t++) y[t * y_stride] = sum[t];                                                \
    }
KQ_ROW_KERNEL(kq_row_plain, dot16_plain, )
KQ_ROW_KERNEL(kq_row_sdot, dot16_sdot, __attribute__((target("arch=armv8.2-a+dotprod"))))
#define KQ_GEMM(NAME, ROW, TI, BLOCK, ATTR)                                                                    \
    ATTR static void NAME(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,  \
                          float *y, size_t y_stride) {                                                        \
        const int nsb = n_in / EL_QK_K;                                                                       \
        for (int r = r0; r < r1; r++) {                                                                       \
            const uint8_t *row = (const uint8_t *)w + (size_t)r * nsb * sizeof(BLOCK);                        \
            for (int t = 0; t < n_tok; t += 4)                                                                \
                ROW(TI, row, nsb, (const uint8_t *)x + t * x_stride, x_stride, n_tok - t < 4 ? n_tok - t : 4,   \
                    y + t * y_stride + r, y_stride);                                                          \
        }                                                                                                     \
    }
KQ_GEMM(gemm_q4_k_plain, kq_row_plain, EL_TI_Q4_K, block_q4_k, )
KQ_GEMM(gemm_q5_k_plain, kq_row_plain, EL_TI_Q5_K, block_q5_k, )
KQ_GEMM(gemm_q6_k_plain, kq_row_plain, EL_TI_Q6_K, block_q6_k, )
KQ_GEMM(gemm_q4_k_sdot, kq_row_sdot, EL_TI_Q4_K, block_q4_k, __attribute__((target("arch=armv8.2-a+dotprod"))))
KQ_GEMM(gemm_q5_k_sdot, kq_row_sdot, EL_TI_Q5_K, block_q5_k, __attribute__((target("arch=armv8.2-a+dotprod"))))
KQ_GEMM(gemm_q6_k_sdot, kq_row_sdot, EL_TI_Q6_K, block_q6_k, __attribute__((target("arch=armv8.2-a+dotprod"))))

/* ------------------------------------------------------------------------------- activation quantizer */
static void quantize_q8a(const float *x, block_q8a *y, int n) {
    for (int b = 0; b < n / EL_QK; b++, x += EL_QK) {
        float32x4_t v[8];
        float32x4_t m = vdupq_n_f32(0);
        for (int i = 0; i < 8; i++) { v[i] = vld1q_f32(x + 4 * i); m = vmaxq_f32(m, vabsq_f32(v[i])); }
        const float d = vmaxvq_f32(m) / 127.0f, id = el_q8a_inv(d);
        int32x4_t s = vdupq_n_s32(0);
        for (int i = 0; i < 8; i += 2) {
            /* vcvtnq: round to nearest, ties to even, as the generic nearbyintf */
            const int32x4_t q0 = vcvtnq_s32_f32(vmulq_n_f32(v[i], id)), q1 = vcvtnq_s32_f32(vmulq_n_f32(v[i + 1], id));
            s = vaddq_s32(s, vaddq_s32(q0, q1));
            const int16x8_t h = vcombine_s16(vmovn_s32(q0), vmovn_s32(q1));
            vst1_s8(y[b].qs + 4 * i, vmovn_s16(h));
        }
        y[b].d = d;
        y[b].s = d * (float)vaddvq_s32(s);
    }
}

/* ------------------------------------------------------------------------------------ float weights
 * F32 / F16 / BF16 matrices repacked at load into strips of 16 rows stored k-major (the x86 files' layout at
 * NEON's width: strip g holds, for each input k, the weights of rows 16g..16g+15; rows past n_out zero). Each
 * output is one f32 FMA chain over k = 0 .. n_in - 1 in order, in one lane: no reduction across lanes, so the
 * decode path (1-3 tokens, reading the strips directly) and the prefill tiles (a block of FKCN inputs widened to
 * f32 once, 16 rows x 6 tokens, partial sums kept in y between blocks) give every output bit for bit the same
 * value whatever the batch. f16 widens exactly (vcvt_f32_f16), bf16 by a shift; activations stay f32. */
enum { FSN = 16, FKCN = 256, FMRN = 6 };

static void repack_f32_s16(const void *s, void *d, int n_out, int n_in) { el_repack_strips(s, d, n_out, n_in, 4, FSN); }
static void repack_h_s16(const void *s, void *d, int n_out, int n_in) { el_repack_strips(s, d, n_out, n_in, 2, FSN); }

/* 4 floats of a row from element i: kind 0 f32, 1 f16, 2 bf16 (cache rows too) */
INLINE float32x4_t load4(const void *p, int kind, int i) {
    if (kind == 0) return vld1q_f32((const float *)p + i);
    if (kind == 1) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p + i)));
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)p + i), 16));
}

/* 4 packed weights from element e, widened to f32: kind 0 f32, 1 f16, 2 bf16 */
INLINE float32x4_t wload4(const void *p, size_t e, int kind) {
    return kind == 0 ? vld1q_f32((const float *)p + e) : load4((const uint16_t *)p + e, kind, 0);
}

INLINE void store4_rows(float *y, float32x4_t v, int n) {
    if (n >= 4) { vst1q_f32(y, v); return; }
    if (n <= 0) return;
    float tmp[4];
    vst1q_f32(tmp, v);
    memcpy(y, tmp, (size_t)n * 4);
}
INLINE float32x4_t load4_rows(const float *y, int n) {
    if (n >= 4) return vld1q_f32(y);
    float tmp[4] = { 0, 0, 0, 0 };
    if (n > 0) memcpy(tmp, y, (size_t)n * 4);
    return vld1q_f32(tmp);
}

/* decode: NS strips x NT tokens over all of n_in; nr = valid rows from the first */
INLINE void fgemv4(const void *w, size_t sstride, int n_in, int kind, int NS, const float *x, size_t xs, int NT,
                   float *y, size_t ys, int nr) {
    float32x4_t acc[3][8];
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < 4 * NS; v++) acc[t][v] = vdupq_n_f32(0.0f);
    const float *xt[3];
    for (int t = 0; t < NT; t++) xt[t] = (const float *)((const char *)x + t * xs);
    for (int k = 0; k < n_in; k++) {
        float32x4_t xb[3];
        for (int t = 0; t < NT; t++) xb[t] = vld1q_dup_f32(xt[t] + k);
        for (int v = 0; v < 4 * NS; v++) {
            const float32x4_t wv = wload4(w, (size_t)(v >> 2) * sstride + (size_t)k * FSN + (v & 3) * 4, kind);
            for (int t = 0; t < NT; t++) acc[t][v] = vfmaq_f32(acc[t][v], wv, xb[t]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < 4 * NS; v++) store4_rows(y + t * ys + v * 4, acc[t][v], nr - v * 4);
}

/* prefill: one strip's widened block wb [kc][16] x MR tokens; first: from zero, else from the sums in y */
INLINE void ftile4(const float *wb, int kc, const float *x, size_t xs, int MR, float *y, size_t ys, int first, int nr) {
    float32x4_t acc[FMRN][4];
    const float *xt[FMRN];
    for (int t = 0; t < MR; t++) xt[t] = (const float *)((const char *)x + t * xs);
    for (int t = 0; t < MR; t++)
        for (int v = 0; v < 4; v++) acc[t][v] = first ? vdupq_n_f32(0.0f) : load4_rows(y + t * ys + 4 * v, nr - 4 * v);
    for (int k = 0; k < kc; k++) {
        float32x4_t wv[4];
        for (int v = 0; v < 4; v++) wv[v] = vld1q_f32(wb + k * FSN + 4 * v);
        for (int t = 0; t < MR; t++) {
            const float32x4_t xb = vld1q_dup_f32(xt[t] + k);
            for (int v = 0; v < 4; v++) acc[t][v] = vfmaq_f32(acc[t][v], wv[v], xb);
        }
    }
    for (int t = 0; t < MR; t++)
        for (int v = 0; v < 4; v++) store4_rows(y + t * ys + 4 * v, acc[t][v], nr - 4 * v);
}

#define FT(MR) case MR: ftile4(wb, kc, xk, x_stride, MR, yt, y_stride, first, nr); break
INLINE void ftile4_any(const float *wb, int kc, const float *xk, size_t x_stride, int mr, float *yt, size_t y_stride,
                       int first, int nr) {
    switch (mr) { FT(1); FT(2); FT(3); FT(4); FT(5); FT(6); default: break; }
}
#undef FT

#define FV(NS, NT) fgemv4(ws, sstride, n_in, kind, NS, xt, x_stride, NT, y + (size_t)t * y_stride + r, y_stride, r1 - r)
INLINE void gemm_strips_neon(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,
                             float *y, size_t y_stride, int kind, int esize) {
    const size_t sstride = (size_t)FSN * n_in;
    if (n_tok <= 3) {
        for (int t = 0; t < n_tok; t += 3) {
            const int nt = n_tok - t < 3 ? n_tok - t : 3;
            const float *xt = (const float *)((const char *)x + t * x_stride);
            for (int r = r0; r < r1; ) {   /* 1 token: up to 2 strips a pass (8 chains); 2-3: one (8, 12) */
                const void *ws = (const char *)w + (size_t)(r / FSN) * sstride * esize;
                const int ns = nt == 1 && r1 - r > FSN ? 2 : 1;
                if (ns == 2) FV(2, 1); else if (nt == 1) FV(1, 1); else if (nt == 2) FV(1, 2); else FV(1, 3);
                r += ns * FSN;
            }
        }
        return;
    }
    float wb[FKCN * FSN] __attribute__((aligned(16)));
    for (int r = r0; r < r1; r += FSN) {
        const void *ws = (const char *)w + (size_t)(r / FSN) * sstride * esize;
        const int nr = r1 - r;
        for (int k0 = 0; k0 < n_in; k0 += FKCN) {
            const int kc = n_in - k0 < FKCN ? n_in - k0 : FKCN;
            for (int k = 0; k < kc; k++)
                for (int v = 0; v < 4; v++) vst1q_f32(wb + k * FSN + 4 * v, wload4(ws, (size_t)(k0 + k) * FSN + 4 * v, kind));
            for (int t = 0; t < n_tok; t += FMRN) {
                const int mr = n_tok - t < FMRN ? n_tok - t : FMRN;
                ftile4_any(wb, kc, (const float *)((const char *)x + t * x_stride) + k0, x_stride, mr,
                           y + (size_t)t * y_stride + r, y_stride, k0 == 0, nr);
            }
        }
    }
}
#undef FV

#define GEMM_FLOAT(NAME, KIND, ESIZE)                                                                         \
    static void NAME(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok,         \
                     float *y, size_t y_stride) {                                                            \
        gemm_strips_neon(w, n_in, r0, r1, x, x_stride, n_tok, y, y_stride, KIND, ESIZE);                      \
    }
GEMM_FLOAT(gemm_f32, 0, 4)
GEMM_FLOAT(gemm_f16, 1, 2)
GEMM_FLOAT(gemm_bf16, 2, 2)

/* --------------------------------------------------------------------------------------- element-wise */
/* e^x, Cephes' expf method as in kernels_avx2.c */
INLINE float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.3762626647949f));
    const float32x4_t fx = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    x = vfmsq_f32(x, fx, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, fx, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500E-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), p, x);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), p, x);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), p, x);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), p, x);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), p, x);
    p = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), p, vmulq_f32(x, x));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

static void rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    float32x4_t acc = vdupq_n_f32(0);
    int i = 0;
    for (; i + 4 <= n; i += 4) { const float32x4_t v = vld1q_f32(x + i); acc = vfmaq_f32(acc, v, v); }
    float ss = vaddvq_f32(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), scale), vld1q_f32(w + i)));
    for (; i < n; i++) y[i] = x[i] * scale * w[i];
}

static void softmax(float *x, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, x[i]);
    float32x4_t vs = vdupq_n_f32(0);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t e = exp4(vsubq_f32(vld1q_f32(x + i), vdupq_n_f32(mx)));
        vst1q_f32(x + i, e);
        vs = vaddq_f32(vs, e);
    }
    float sum = vaddvq_f32(vs);
    for (; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    const float inv = 1.0f / sum;
    for (i = 0; i + 4 <= n; i += 4) vst1q_f32(x + i, vmulq_n_f32(vld1q_f32(x + i), inv));
    for (; i < n; i++) x[i] *= inv;
}

static void silu_mul(const float *g, const float *u, float *y, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(g + i), e = exp4(vnegq_f32(v));
        vst1q_f32(y + i, vmulq_f32(vdivq_f32(v, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(u + i)));
    }
    for (; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void gelu_mul(const float *g, const float *u, float *y, int n) {
    const float c = 0.7978845608028654f;  /* sqrt(2/pi) */
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(g + i);
        const float32x4_t z = vmulq_n_f32(vfmaq_f32(v, vmulq_n_f32(v, 0.044715f), vmulq_f32(v, v)), c);
        /* 1 + tanh(z) = 2 e^{2z} / (e^{2z} + 1), 2z capped so e stays finite */
        const float32x4_t e = exp4(vminq_f32(vmulq_n_f32(z, 2.0f), vdupq_n_f32(80.0f)));
        const float32x4_t th1 = vdivq_f32(vmulq_n_f32(e, 2.0f), vaddq_f32(e, vdupq_n_f32(1.0f)));
        vst1q_f32(y + i, vmulq_f32(vmulq_f32(vmulq_n_f32(v, 0.5f), th1), vld1q_f32(u + i)));
    }
    for (; i < n; i++) {
        const float v = g[i];
        y[i] = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v))) * u[i];
    }
}

static void add(const float *a, const float *b, float *y, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vaddq_f32(vld1q_f32(a + i), vld1q_f32(b + i)));
    for (; i < n; i++) y[i] = a[i] + b[i];
}

static void to_f16(const float *x, el_half *y, int n) {
    int i = 0;   /* vcvt_f16_f32 rounds per FPCR: to nearest even by default */
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = el_float_to_half(x[i]);
}

/* ------------------------------------------------------------------------------------------- attention */
static void (*generic_attn)(const float *, int, const int32_t *, const void *const *, const void *const *, int, int, int,
                            int, int, float, float *, float *);

/* cache row j as floats: f32 / f16 read in place (load4 kinds 0 / 1); q8_0 converted into tmp first */
INLINE const void *kv_row4(const void *base, int type, int j, int hd, float *tmp, int *kind) {
    const char *row = (const char *)base + (size_t)j * el_kv_row_bytes(type, hd);
    if (type != EL_Q8_0) { *kind = type == EL_F16; return row; }
    const block_q8_0 *b = (const block_q8_0 *)row;
    for (int i = 0; i < hd / EL_QK; i++) {
        const float32x4_t d = vdupq_n_f32(el_half_to_float(b[i].d));
        for (int l = 0; l < EL_QK; l += 8) {
            const int16x8_t w = vmovl_s8(vld1_s8(b[i].qs + l));
            vst1q_f32(tmp + i * EL_QK + l, vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)))));
            vst1q_f32(tmp + i * EL_QK + l + 4, vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_high_s16(w)))));
        }
    }
    *kind = 0;
    return tmp;
}

static void attn_row(const float *q, const void *const *kb, const void *const *vb, int block, int off, int n_kv,
                     int k_type, int v_type, int hd, float scale, float *scores, float *out) {
    float tmp[256];
    int kind;
    const size_t krow = el_kv_row_bytes(k_type, hd), vrow = el_kv_row_bytes(v_type, hd);
    for (int j = 0; j < n_kv;) {
        const char *row;
        for (int run = el_kv_run(kb, block, off, j, n_kv, krow, &row); run > 0; run--, j++, row += krow) {
            const void *kj = kv_row4(row, k_type, 0, hd, tmp, &kind);
            float32x4_t acc = vdupq_n_f32(0);
            for (int i = 0; i < hd; i += 4) acc = vfmaq_f32(acc, vld1q_f32(q + i), load4(kj, kind, i));
            scores[j] = vaddvq_f32(acc) * scale;
        }
    }
    softmax(scores, n_kv);
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int j = 0; j < n_kv;) {
        const char *row;
        for (int run = el_kv_run(vb, block, off, j, n_kv, vrow, &row); run > 0; run--, j++, row += vrow) {
            const void *vj = kv_row4(row, v_type, 0, hd, tmp, &kind);
            for (int i = 0; i < hd; i += 4) vst1q_f32(out + i, vfmaq_n_f32(vld1q_f32(out + i), load4(vj, kind, i), scores[j]));
        }
    }
}

static void attn(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb,
                 int block, int off, int k_type, int v_type, int hd, float scale, float *scratch, float *out) {
    if (hd % 4 || hd > 256 || ((k_type == EL_Q8_0 || v_type == EL_Q8_0) && hd % EL_QK)) {
        generic_attn(q, n_q, n_kv, kb, vb, block, off, k_type, v_type, hd, scale, scratch, out);
        return;
    }
    for (int i = 0; i < n_q; i++)
        attn_row(q + (size_t)i * hd, kb, vb, block, off, n_kv[i], k_type, v_type, hd, scale, scratch, out + (size_t)i * hd);
}

/* ------------------------------------------------------------------------------------------------ table */
void el_fill_neon(el_kernels *k, int dotprod) {
    el_fill_generic(k);
    k->name = dotprod ? "neon-dotprod" : "neon";
    generic_attn = k->attn;
    k->types[EL_TI_Q4_0].gemm = dotprod ? gemm_q4_0_sdot : gemm_q4_0_plain;
    k->types[EL_TI_Q4_1].gemm = dotprod ? gemm_q4_1_sdot : gemm_q4_1_plain;
    k->types[EL_TI_Q8_0].gemm = dotprod ? gemm_q8_0_sdot : gemm_q8_0_plain;
    k->types[EL_TI_Q5_0].gemm = dotprod ? gemm_q5_0_sdot : gemm_q5_0_plain;
    k->types[EL_TI_Q5_1].gemm = dotprod ? gemm_q5_1_sdot : gemm_q5_1_plain;
    k->types[EL_TI_Q4_K].gemm = dotprod ? gemm_q4_k_sdot : gemm_q4_k_plain;
    k->types[EL_TI_Q5_K].gemm = dotprod ? gemm_q5_k_sdot : gemm_q5_k_plain;
    k->types[EL_TI_Q6_K].gemm = dotprod ? gemm_q6_k_sdot : gemm_q6_k_plain;
    k->types[EL_TI_F32] = (el_type_kernels){ 0, FSN, repack_f32_s16, gemm_f32 };   /* 16-row k-major strips */
    k->types[EL_TI_F16] = (el_type_kernels){ 0, FSN, repack_h_s16, gemm_f16 };
    k->types[EL_TI_BF16] = (el_type_kernels){ 0, FSN, repack_h_s16, gemm_bf16 };
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
typedef int el_neon_unused;  /* ISO C forbids an empty translation unit */
#endif
