/* Weight quantizers of `edgellm quantize`: float32 -> F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K,
 * and whole tensors (or batches of tensors) decoded and encoded again on the thread pool.
 *
 * The methods are those of quant/reference.py, the numpy definitions, which follow ggml's reference quantizers
 * (`quantize_row_*_ref`, make_qkx2_quants, make_qx_quants); the arithmetic is float32, operation by operation
 * in the same order, so:
 *   - F16, BF16 and the 32-element types give the same bytes as gguf-py's gguf.quants (and the reference):
 *     Q8_0 rounds halves away from zero (C's roundf), the others truncate `v + 0.5` / `v + 8.5` / `v + 16.5`;
 *     the block maximum of Q4_0 / Q5_0 is the first element of largest magnitude, with its sign (numpy's
 *     argmax); f16 scales round to nearest even;
 *   - the K-quant searches sum over a sub-block left to right as ggml's C loops do, which gives ggml's bytes
 *     (tests compare with llama-cpp-python's libggml-base). Numpy's reference sums the same terms pairwise, so
 *     where two candidate grids tie within a rounding error it can keep the other one: 0.4% to 2.6% of the
 *     blocks on weight-like data (tests/test_quantize_native.py), with the same error.
 * The searches (Q4_K / Q5_K: 8 sub-blocks of 32; Q6_K: 16 groups of 16) run all sub-blocks of a super-block side
 * by side, one vector lane each (section "lanes"), each lane keeping its own left-to-right sums.
 *
 * Rounding to nearest even is done with the 1.5 * 2^23 trick (exact for |v| < 2^22, which covers every value
 * that is not clamped anyway): no libm call, vectorisable. No a*b+c here may become a fused multiply-add (which
 * rounds once instead of twice, so aarch64 would give other bytes): ISO C mode (-std=c11, the cffi build) does not
 * contract, and the pragma below keeps GNU mode from doing it.
 * Portable C11 plus GCC/clang generic vectors (no intrinsics): the same file builds for x86-64 and aarch64, and
 * native/tests/run_arm.sh checks that both give the same bytes.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")   /* also in GNU mode (-std=gnu11, native/Makefile), where GCC contracts */
#endif
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "edgellm.h"
#include "kernels.h"
#include "quants.h"
#include "threadpool.h"

#define GROUP_MAX_EPS 1e-15f   /* ggml: a group whose largest |x| is below this is all zeros */

/* ------------------------------------------------------------------------------------------------ helpers */
static inline float inverse(float d) { return d != 0.f ? 1.f / d : 0.f; }

static inline void put_u32le(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

/* ------------------------------------------------------------------------------------------ lanes */
/* The K-quant searches run every sub-block of a super-block side by side, one vector lane per sub-block, with
 * the compilers' generic vectors of 4 floats (SSE2 on any x86-64, NEON on aarch64; no intrinsics): Q4_K / Q5_K's
 * 8 sub-blocks are 2 vectors, Q6_K's 16 groups 4. Each lane does exactly the float operations of the scalar
 * method, in the same order: vectors change the speed, never a result. Comparisons give lanes of -1 / 0, used as
 * masks by `sel`. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));

static inline v4f splat(float v) { return (v4f){ v, v, v, v }; }
static inline v4f sel(v4i m, v4f a, v4f b) { return (v4f)((m & (v4i)a) | (~m & (v4i)b)); }
static inline v4f vabs(v4f a) { return (v4f)((v4i)a & 0x7fffffff); }
/* round half to even (numpy's rint, ggml's nearest_int) by adding and subtracting 1.5 * 2^23; values of 2^22 and
 * more are returned as they are (every caller clamps them to a small range) */
static inline v4f vrne(v4f v) { return sel(vabs(v) < 4194304.f, (v + 12582912.f) - 12582912.f, v); }
/* v clamped to [lo, hi]; NaN gives lo (so that an integer conversion after it is always defined) */
static inline v4f vclamp(v4f v, float lo, float hi) { return sel(v >= lo, sel(v <= hi, v, splat(hi)), splat(lo)); }
static inline int vany(v4i m) { return (m[0] | m[1] | m[2] | m[3]) != 0; }

/* --------------------------------------------------------------------------------------- plain types */
static void quant_f32(const float *x, void *y, int64_t n) { memcpy(y, x, (size_t)n * sizeof(float)); }

static void quant_f16(const float *x, void *vy, int64_t n) {
    el_half *y = vy;
    for (int64_t i = 0; i < n; i++) y[i] = el_float_to_half(x[i]);
}

static void quant_bf16(const float *x, void *vy, int64_t n) {
    el_bf16 *y = vy;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) y[i] = (el_bf16)((u >> 16) | 64);            /* NaN stays quiet NaN */
        else y[i] = (el_bf16)(((uint64_t)u + 0x7fffu + ((u >> 16) & 1)) >> 16);          /* nearest even */
    }
}

/* f16 -> f32 for a source tensor, 4 at a time without branches: the same values as el_half_to_float.
 * Normal: exponent and mantissa shifted into place, exponent rebased by adding 224 then scaling by 2^-112 (exact,
 * and exponent 31 lands on 255: inf / NaN); subnormal (exponent 0): 0.5 + m 2^-24 built from bits, minus 0.5
 * (exact). Inf / NaN take their bits directly, so a NaN payload is kept as it is. */
static void dec_f16(const void *src, float *y, int64_t n) {
    const uint16_t *h = src;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        v4u w = { h[i], h[i + 1], h[i + 2], h[i + 3] };
        w <<= 16;
        const v4u sign = w & 0x80000000u, two_w = w + w;
        const v4f norm = (v4f)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
        const v4f sub = (v4f)((two_w >> 17) | (126u << 23)) - 0.5f;
        v4u bits = (v4u)sel((v4i)(two_w < (1u << 27)), sub, norm);
        bits = (v4u)sel((v4i)(two_w >= 0xF8000000u), (v4f)(0x7f800000u | ((two_w >> 4) & 0x007fffffu)), (v4f)bits);
        const v4f r = (v4f)(bits | sign);
        memcpy(y + i, &r, sizeof r);
    }
    for (; i < n; i++) y[i] = el_half_to_float(h[i]);
}

static void dec_bf16(const void *src, float *y, int64_t n) {
    const uint16_t *h = src;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t u = (uint32_t)h[i] << 16;
        memcpy(y + i, &u, 4);
    }
}

/* --------------------------------------------------------------------------------------- 32-element blocks */
/* each takes nb blocks of 32 floats; a block is 8 vectors of 4 */
static inline v4f vload(const float *p) { v4f v; memcpy(&v, p, sizeof v); return v; }
static inline v4i vtrunc(v4f v) { return (v4i){ (int32_t)v[0], (int32_t)v[1], (int32_t)v[2], (int32_t)v[3] }; }
static inline v4f vfloat(v4i v) { return (v4f){ (float)v[0], (float)v[1], (float)v[2], (float)v[3] }; }
static inline float hmax4(v4f m) {
    const float a = m[0] > m[1] ? m[0] : m[1], b = m[2] > m[3] ? m[2] : m[3];
    return a > b ? a : b;
}

static inline void load_block(const float *x, v4f v[8]) {
    for (int k = 0; k < 8; k++) v[k] = vload(x + 4 * k);
}

static inline float block_absmax(const v4f v[8]) {
    v4f m = vabs(v[0]);
    for (int k = 1; k < 8; k++) {
        const v4f a = vabs(v[k]);
        m = sel(a > m, a, m);
    }
    return hmax4(m);
}

/* the first element of largest magnitude, with its sign (numpy's x[argmax(|x|)]) */
static inline float block_signed_absmax(const v4f v[8]) {
    const float amax = block_absmax(v);
    for (int k = 0; k < 8; k++) {
        const v4i eq = vabs(v[k]) == amax;
        if (vany(eq))
            for (int j = 0; j < 4; j++)
                if (eq[j]) return v[k][j];
    }
    return amax;   /* NaN in the block */
}

static inline void block_min_max(const v4f v[8], float *lo, float *hi) {
    v4f mn = v[0], mx = v[0];
    for (int k = 1; k < 8; k++) {
        mn = sel(v[k] < mn, v[k], mn);
        mx = sel(v[k] > mx, v[k], mx);
    }
    float a = mn[0], b = mx[0];
    for (int j = 1; j < 4; j++) {
        a = mn[j] < a ? mn[j] : a;
        b = mx[j] > b ? mx[j] : b;
    }
    *lo = a;
    *hi = b;
}

/* C's (int) truncation of v, clamped to [0, hi] (only NaN / out-of-range values need the clamp) */
static inline v4i vtrunc_clamp(v4f v, float hi) {
    return vtrunc(sel(v >= 0.f, sel(v < hi, v, splat(hi)), splat(0.f)));
}

void el_quantize_q8_0_blocks(const float *x, void *vy, int64_t nb) {   /* also the KV cache's q8_0 rows */
    block_q8_0 *y = vy;
    for (int64_t i = 0; i < nb; i++, x += EL_QK) {
        v4f v[8];
        load_block(x, v);
        const float d = block_absmax(v) / 127.f, id = inverse(d);
        y[i].d = el_float_to_half(d);
        int32_t q[EL_QK];
        for (int k = 0; k < 8; k++) {      /* C's roundf: halves away from zero; inf / NaN (subnormal d) give 0 */
            const v4f s = v[k] * id, a = sel(vabs(s) < 1073741824.f, vabs(s), splat(0.f));
            const v4i t = vtrunc(a), r = t - (v4i)(a - vfloat(t) >= 0.5f);   /* a - t is exact */
            const v4i neg = s < 0.f, qr = (r ^ neg) - neg;                      /* -r where s < 0 */
            memcpy(q + 4 * k, &qr, sizeof qr);
        }
        for (int j = 0; j < EL_QK; j++) y[i].qs[j] = (int8_t)q[j];
    }
}

static inline void pack4(const int32_t *q, uint8_t *qs) {
    for (int j = 0; j < EL_QK / 2; j++) qs[j] = (uint8_t)(q[j] | (q[j + 16] << 4));
}

static void quant_q4_0(const float *x, void *vy, int64_t nb) {
    block_q4_0 *y = vy;
    for (int64_t i = 0; i < nb; i++, x += EL_QK) {
        v4f v[8];
        load_block(x, v);
        const float d = block_signed_absmax(v) / -8.f, id = inverse(d);   /* the extreme maps to -8 */
        y[i].d = el_float_to_half(d);
        int32_t q[EL_QK];
        for (int k = 0; k < 8; k++) {
            const v4i t = vtrunc_clamp(v[k] * id + 8.5f, 15.f);
            memcpy(q + 4 * k, &t, sizeof t);
        }
        pack4(q, y[i].qs);
    }
}

static void quant_q4_1(const float *x, void *vy, int64_t nb) {
    block_q4_1 *y = vy;
    for (int64_t i = 0; i < nb; i++, x += EL_QK) {
        v4f v[8];
        load_block(x, v);
        float lo, hi;
        block_min_max(v, &lo, &hi);
        const float d = (hi - lo) / 15.f, id = inverse(d);
        y[i].d = el_float_to_half(d);
        y[i].m = el_float_to_half(lo);
        int32_t q[EL_QK];
        for (int k = 0; k < 8; k++) {
            const v4i t = vtrunc_clamp((v[k] - lo) * id + 0.5f, 15.f);
            memcpy(q + 4 * k, &t, sizeof t);
        }
        pack4(q, y[i].qs);
    }
}

/* 32 values of 5 bits: low nibbles as Q4_0, bit 4 of element j in bit j of the little-endian qh */
static inline void pack5(const int32_t *q, uint8_t *qs, uint8_t *qh) {
    uint32_t h = 0;
    for (int j = 0; j < EL_QK / 2; j++) qs[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
    for (int j = 0; j < EL_QK; j++) h |= (uint32_t)((q[j] >> 4) & 1) << j;
    put_u32le(qh, h);
}

static void quant_q5_0(const float *x, void *vy, int64_t nb) {
    block_q5_0 *y = vy;
    for (int64_t i = 0; i < nb; i++, x += EL_QK) {
        v4f v[8];
        load_block(x, v);
        const float d = block_signed_absmax(v) / -16.f, id = inverse(d);
        int32_t q[EL_QK];
        for (int k = 0; k < 8; k++) {
            const v4i t = vtrunc_clamp(v[k] * id + 16.5f, 31.f);
            memcpy(q + 4 * k, &t, sizeof t);
        }
        y[i].d = el_float_to_half(d);
        pack5(q, y[i].qs, y[i].qh);
    }
}

static void quant_q5_1(const float *x, void *vy, int64_t nb) {
    block_q5_1 *y = vy;
    for (int64_t i = 0; i < nb; i++, x += EL_QK) {
        v4f v[8];
        load_block(x, v);
        float lo, hi;
        block_min_max(v, &lo, &hi);
        const float d = (hi - lo) / 31.f, id = inverse(d);
        int32_t q[EL_QK];
        /* (x - min) * id <= 31 (plus an ulp): + 0.5 and truncation stay below 32, as in ggml (no clamp there) */
        for (int k = 0; k < 8; k++) {
            const v4i t = vtrunc_clamp((v[k] - lo) * id + 0.5f, 31.f);
            memcpy(q + 4 * k, &t, sizeof t);
        }
        y[i].d = el_float_to_half(d);
        y[i].m = el_float_to_half(lo);
        pack5(q, y[i].qs, y[i].qh);
    }
}

/* ------------------------------------------------------------------------------------------ Q4_K, Q5_K */
#define K4_N 32    /* elements of a sub-block */
#define K4_V 2     /* vectors of 4 lanes: 8 sub-blocks, lane j of vector h = sub-block 4h + j */

/* One Q4_K / Q5_K super-block: fills d, dmin and the 12 scale bytes, returns the integers q[s][i] in [0, nmax].
 *
 * The search is ggml's make_qkx2_quants with weights w = rms(sub-block) + |x|: fit x ~ scale * L - min, L in
 * [0, nmax]; the min/max grid first, then nstep + 1 grids of (nmax + rmin + 0.1 k) / (max - min), each refitted
 * by weighted least squares, the best (weighted squared error) kept; a better fit also moves the min (and so the
 * grid) of the later tries, as in ggml. The min is never above 0 (it is stored negated). Then the 8 scales and
 * 8 mins become 6-bit multiples of the f16 d and dmin, and the elements are quantized again with what will be
 * decoded. */
static void k4_like(const float *x, int nmax, float rmin, int nstep, el_half *d, el_half *dmin,
                    uint8_t *scales, uint8_t q[8][K4_N]) {
    v4f xt[K4_N][K4_V], wt[K4_N][K4_V], L[K4_N][K4_V], la[K4_N][K4_V];
    v4f mn[K4_V], mx[K4_V], sw[K4_V], sx[K4_V], sc[K4_V], best[K4_V], scale[K4_V], mins[K4_V];
    v4i flat[K4_V];
    const float fnmax = (float)nmax;

    for (int s = 0; s < 8; s++)
        for (int i = 0; i < K4_N; i++) xt[i][s / 4][s % 4] = x[K4_N * s + i];
    for (int h = 0; h < K4_V; h++) {
        v4f sx2 = splat(0.f), av;
        for (int i = 0; i < K4_N; i++) sx2 += xt[i][h] * xt[i][h];
        for (int j = 0; j < 4; j++) av[j] = sqrtf(sx2[j] / 32.f);
        for (int i = 0; i < K4_N; i++) wt[i][h] = av + vabs(xt[i][h]);

        mn[h] = mx[h] = xt[0][h];
        sw[h] = wt[0][h];
        sx[h] = wt[0][h] * xt[0][h];
        for (int i = 1; i < K4_N; i++) {
            mn[h] = sel(xt[i][h] < mn[h], xt[i][h], mn[h]);
            mx[h] = sel(xt[i][h] > mx[h], xt[i][h], mx[h]);
            sw[h] += wt[i][h];
            sx[h] += wt[i][h] * xt[i][h];
        }
        mn[h] = sel(mn[h] > 0.f, splat(0.f), mn[h]);
        flat[h] = mx[h] == mn[h];            /* all elements equal: L = 0, scale 0 (those lanes compute garbage) */
        const v4f isc = fnmax / (mx[h] - mn[h]);
        sc[h] = 1.f / isc;
        best[h] = splat(0.f);
        for (int i = 0; i < K4_N; i++) {
            const v4f l = vclamp(vrne(isc * (xt[i][h] - mn[h])), 0.f, fnmax);
            const v4f diff = sc[h] * l + mn[h] - xt[i][h];
            L[i][h] = l;
            best[h] += wt[i][h] * (diff * diff);
        }
    }
    for (int k = 0; k <= nstep; k++) {
        const float num = rmin + 0.1f * (float)k + fnmax;
        for (int h = 0; h < K4_V; h++) {
            const v4f isc = num / (mx[h] - mn[h]);
            v4f sl = splat(0.f), sl2 = sl, sxl = sl;
            for (int i = 0; i < K4_N; i++) {
                const v4f l = vclamp(vrne(isc * (xt[i][h] - mn[h])), 0.f, fnmax);
                const v4f wl = wt[i][h] * l;
                la[i][h] = l;
                sl += wl;
                sl2 += wl * l;
                sxl += wl * xt[i][h];
            }
            const v4f D = sw[h] * sl2 - sl * sl;
            v4f a = (sw[h] * sxl - sx[h] * sl) / D, b = (sl2 * sx[h] - sl * sxl) / D;
            const v4i pos = b > 0.f;         /* a positive min cannot be stored: refit without one */
            a = sel(pos, sxl / sl2, a);
            b = sel(pos, splat(0.f), b);
            v4f cur = splat(0.f);
            for (int i = 0; i < K4_N; i++) {
                const v4f diff = a * la[i][h] + b - xt[i][h];
                cur += wt[i][h] * (diff * diff);
            }
            const v4i upd = (D > 0.f) & (cur < best[h]);
            if (!vany(upd)) continue;
            best[h] = sel(upd, cur, best[h]);
            sc[h] = sel(upd, a, sc[h]);
            mn[h] = sel(upd, b, mn[h]);
            for (int i = 0; i < K4_N; i++) L[i][h] = sel(upd, la[i][h], L[i][h]);
        }
    }
    float max_scale = 0.f, max_min = 0.f;
    for (int h = 0; h < K4_V; h++) {
        scale[h] = sel(flat[h], splat(0.f), sc[h]);
        mins[h] = -mn[h];
        for (int i = 0; i < K4_N; i++) L[i][h] = sel(flat[h], splat(0.f), L[i][h]);
        for (int j = 0; j < 4; j++) {
            max_scale = scale[h][j] > max_scale ? scale[h][j] : max_scale;
            max_min = mins[h][j] > max_min ? mins[h][j] : max_min;
        }
    }
    const float inv_scale = max_scale > 0.f ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0.f ? 63.f / max_min : 0.f;
    *d = el_float_to_half(max_scale / 63.f);
    *dmin = el_float_to_half(max_min / 63.f);
    const float df = el_half_to_float(*d), dmf = el_half_to_float(*dmin);
    uint8_t ls[8], lm[8];
    for (int h = 0; h < K4_V; h++) {
        const v4f vls = vclamp(vrne(inv_scale * scale[h]), 0.f, 63.f), vlm = vclamp(vrne(inv_min * mins[h]), 0.f, 63.f);
        for (int j = 0; j < 4; j++) {
            ls[4 * h + j] = (uint8_t)vls[j];
            lm[4 * h + j] = (uint8_t)vlm[j];
        }
        /* quantize again with d * sc and dmin * m as the f16 fields give them back; a lane whose stored scale is
         * 0 keeps the search's integers (ggml skips it: they decode to -dmin * m) */
        const v4f dl = df * vls, ml = dmf * vlm;
        const v4i keep = dl == 0.f;
        for (int i = 0; i < K4_N; i++) {
            const v4f v = sel(keep, L[i][h], vclamp(vrne((xt[i][h] + ml) / dl), 0.f, fnmax));
            for (int j = 0; j < 4; j++) q[4 * h + j][i] = (uint8_t)v[j];
        }
    }
    /* bytes 0-3 / 4-7: scales / mins 0-3 in the low 6 bits, top 2 bits of scales / mins 4-7 in the top 2 bits;
     * bytes 8-11: low 4 bits of scales 4-7 | low 4 bits of mins 4-7 << 4 */
    for (int j = 0; j < 4; j++) {
        scales[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        scales[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        scales[j + 8] = (uint8_t)((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
    }
}

static void quant_q4_k(const float *x, void *vy, int64_t nb) {
    block_q4_k *y = vy;
    for (int64_t b = 0; b < nb; b++, x += EL_QK_K) {
        uint8_t q[8][K4_N];
        k4_like(x, 15, -1.f, 20, &y[b].d, &y[b].dmin, y[b].scales, q);
        for (int c = 0; c < 4; c++)        /* chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high ones */
            for (int l = 0; l < 32; l++) y[b].qs[32 * c + l] = (uint8_t)(q[2 * c][l] | (q[2 * c + 1][l] << 4));
    }
}

static void quant_q5_k(const float *x, void *vy, int64_t nb) {
    block_q5_k *y = vy;
    for (int64_t b = 0; b < nb; b++, x += EL_QK_K) {
        uint8_t q[8][K4_N];
        k4_like(x, 31, -0.5f, 15, &y[b].d, &y[b].dmin, y[b].scales, q);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                y[b].qs[32 * c + l] = (uint8_t)((q[2 * c][l] & 15) | ((q[2 * c + 1][l] & 15) << 4));
        for (int l = 0; l < 32; l++) {     /* bit s of qh[l]: the 5th bit of element l of sub-block s */
            unsigned h = 0;
            for (int s = 0; s < 8; s++) h |= (unsigned)(q[s][l] >> 4) << s;
            y[b].qh[l] = (uint8_t)h;
        }
    }
}

/* ----------------------------------------------------------------------------------------------- Q6_K */
#define K6_N 16    /* elements of a group */
#define K6_V 4     /* vectors of 4 lanes: 16 groups, lane j of vector h = group 4h + j */

/* One Q6_K super-block. The search is ggml's make_qx_quants (rmse_type 1: weights x^2) with nmax 32:
 * x ~ scale * (L - 32), L - 32 in [-32, 31]; the grid where the element of largest |x| maps to -32, then 18
 * neighbours (32 + 0.1 k, k = -9..9), keeping the one that explains most of sum(w x^2). The 16 group scales then
 * become int8 multiples of the f16 d (the largest |scale| maps to -128) and the elements are quantized again. */
static void q6_k_block(const float *x, block_q6_k *y) {
    v4f xt[K6_N][K6_V], w[K6_N][K6_V], wx[K6_N][K6_V], la[K6_N][K6_V], L[K6_N][K6_V];
    v4f mx[K6_V], scale[K6_V], best[K6_V];
    v4i tiny[K6_V];
    const float nmax = 32.f;

    for (int s = 0; s < 16; s++)
        for (int i = 0; i < K6_N; i++) xt[i][s / 4][s % 4] = x[K6_N * s + i];
    for (int h = 0; h < K6_V; h++) {
        v4f amax = vabs(xt[0][h]);           /* the first element of largest |x|, with its sign */
        mx[h] = xt[0][h];
        for (int i = 1; i < K6_N; i++) {
            const v4f a = vabs(xt[i][h]);
            const v4i gt = a > amax;
            mx[h] = sel(gt, xt[i][h], mx[h]);
            amax = sel(gt, a, amax);
        }
        for (int i = 0; i < K6_N; i++) {
            w[i][h] = xt[i][h] * xt[i][h];
            wx[i][h] = w[i][h] * xt[i][h];
        }
        tiny[h] = ~(amax >= GROUP_MAX_EPS);  /* all-zero group: L = 0 (not 32) and scale 0, as ggml */
        mx[h] = sel(tiny[h], splat(1.f), mx[h]);
    }
    for (int pass = 0; pass < 19; pass++) {  /* the plain grid (k = 0) first, then k = -9..-1, 1..9 */
        const int k = pass == 0 ? 0 : (pass <= 9 ? pass - 10 : pass - 9);
        const float num = k == 0 ? -nmax : -(nmax + 0.1f * (float)k);
        for (int h = 0; h < K6_V; h++) {
            const v4f isc = num / mx[h];
            v4f slx = splat(0.f), sl2 = slx;
            for (int i = 0; i < K6_N; i++) {
                const v4f l = vclamp(vrne(isc * xt[i][h]), -nmax, nmax - 1.f);
                la[i][h] = l;
                slx += wx[i][h] * l;
                sl2 += (w[i][h] * l) * l;
            }
            if (k == 0) {
                scale[h] = sel(sl2 != 0.f, slx / sl2, splat(0.f));
                best[h] = scale[h] * slx;
                for (int i = 0; i < K6_N; i++) L[i][h] = la[i][h];
                continue;
            }
            const v4i upd = (sl2 > 0.f) & (slx * slx > best[h] * sl2);
            if (!vany(upd)) continue;
            scale[h] = sel(upd, slx / sl2, scale[h]);
            best[h] = sel(upd, scale[h] * slx, best[h]);
            for (int i = 0; i < K6_N; i++) L[i][h] = sel(upd, la[i][h], L[i][h]);
        }
    }
    float samax = -1.f, max_scale = 0.f;
    for (int h = 0; h < K6_V; h++) {
        scale[h] = sel(tiny[h], splat(0.f), scale[h]);
        for (int i = 0; i < K6_N; i++) L[i][h] = sel(tiny[h], splat(0.f), L[i][h] + nmax);
        for (int j = 0; j < 4; j++)          /* the first scale of largest magnitude, with its sign */
            if (fabsf(scale[h][j]) > samax) { samax = fabsf(scale[h][j]); max_scale = scale[h][j]; }
    }
    if (!(samax >= GROUP_MAX_EPS)) {         /* an all-zero block: all bytes 0 */
        memset(y, 0, sizeof *y);
        return;
    }
    const float iscale = -128.f / max_scale;
    y->d = el_float_to_half(1.f / iscale);
    const float df = el_half_to_float(y->d);
    uint8_t q[EL_QK_K];
    for (int h = 0; h < K6_V; h++) {
        const v4f r = vrne(iscale * scale[h]), sc = sel(r < 127.f, r, splat(127.f));
        for (int j = 0; j < 4; j++) y->scales[4 * h + j] = (int8_t)sc[j];
        const v4f dl = df * sc;
        const v4i keep = dl == 0.f;
        for (int i = 0; i < K6_N; i++) {
            const v4f v = sel(keep, L[i][h], vclamp(vrne(xt[i][h] / dl), -32.f, 31.f) + 32.f);
            for (int j = 0; j < 4; j++) q[K6_N * (4 * h + j) + i] = (uint8_t)v[j];
        }
    }
    /* per 128-element half h, groups g of 32: ql[l] = g0 | g2 << 4, ql[l + 32] = g1 | g3 << 4,
     * qh[l] = high 2 bits of g0 | g1 << 2 | g2 << 4 | g3 << 6 */
    for (int h = 0; h < 2; h++) {
        const uint8_t *g = q + 128 * h;
        uint8_t *ql = y->ql + 64 * h, *qh = y->qh + 32 * h;
        for (int l = 0; l < 32; l++) {
            ql[l] = (uint8_t)((g[l] & 15) | ((g[l + 64] & 15) << 4));
            ql[l + 32] = (uint8_t)((g[l + 32] & 15) | ((g[l + 96] & 15) << 4));
            qh[l] = (uint8_t)((g[l] >> 4) | ((g[l + 32] >> 4) << 2) | ((g[l + 64] >> 4) << 4) | ((g[l + 96] >> 4) << 6));
        }
    }
}

static void quant_q6_k(const float *x, void *vy, int64_t nb) {
    block_q6_k *y = vy;
    for (int64_t b = 0; b < nb; b++) q6_k_block(x + b * EL_QK_K, &y[b]);
}

/* --------------------------------------------------------------------------------------- whole tensors */
typedef void (*quant_fn)(const float *x, void *y, int64_t n_blocks);

static quant_fn quantizer(int ti) {
    switch (ti) {
    case EL_TI_F32: return quant_f32;   case EL_TI_F16: return quant_f16;   case EL_TI_BF16: return quant_bf16;
    case EL_TI_Q4_0: return quant_q4_0; case EL_TI_Q4_1: return quant_q4_1; case EL_TI_Q5_0: return quant_q5_0;
    case EL_TI_Q5_1: return quant_q5_1; case EL_TI_Q8_0: return el_quantize_q8_0_blocks; case EL_TI_Q4_K: return quant_q4_k;
    case EL_TI_Q5_K: return quant_q5_k; case EL_TI_Q6_K: return quant_q6_k;
    default: return NULL;
    }
}

/* Elements per claimed chunk: a multiple of every block size (256), small enough for a stack buffer of floats,
 * big enough that claiming costs nothing next to the work. Chunks are claimed from a shared counter, so a thread
 * slowed by a neighbour (a shared machine) takes fewer of them. */
#define CHUNK 4096

/* One tensor of a batch. src_ti / dst_ti: type index, or -1 for float32 rows (nothing to decode / to encode). */
typedef struct {
    int src_ti, dst_ti;
    const uint8_t *src;
    uint8_t *dst;
    int64_t n;                    /* elements */
    int64_t chunk1;               /* one past its last chunk, counted over the whole batch */
} part;

/* Several tensors in one run of the pool: their chunks are numbered one after the other and claimed from one
 * counter, so a batch of many small tensors costs one wake-up of the workers and one final wait, not one each. */
typedef struct {
    const part *parts;
    int n_parts;
    atomic_llong next;
} batch;

static inline size_t span_bytes(int ti, int64_t e) {   /* bytes of the first e elements (e: whole blocks) */
    return ti < 0 ? (size_t)e * sizeof(float) : (size_t)(e / el_type_block(ti)) * el_type_block_bytes(ti);
}

static void convert_chunk(const part *p, int64_t c, float *buf) {
    const int64_t e0 = c * CHUNK, m = (p->n - e0 < CHUNK) ? p->n - e0 : CHUNK;
    const uint8_t *src = p->src + span_bytes(p->src_ti, e0);
    uint8_t *dst = p->dst + span_bytes(p->dst_ti, e0);
    const float *x = buf;
    if (p->src_ti < 0) {
        x = (const float *)src;
    } else if (p->dst_ti < 0) {          /* decode only: straight into the output */
        el_k->dequantize_row[p->src_ti](src, (float *)dst, (int)m);
        return;
    } else if (p->src_ti == EL_TI_F16) {
        dec_f16(src, buf, m);
    } else if (p->src_ti == EL_TI_BF16) {
        dec_bf16(src, buf, m);
    } else {
        el_k->dequantize_row[p->src_ti](src, buf, (int)m);
    }
    quantizer(p->dst_ti)(x, dst, m / el_type_block(p->dst_ti));
}

static void batch_task(void *ctx, int ith, int nth) {
    (void)ith;
    (void)nth;
    batch *b = ctx;
    float buf[CHUNK];
    int k = 0;                           /* a thread's claims only grow: its part index only moves forward */
    const int64_t end = b->parts[b->n_parts - 1].chunk1;
    for (;;) {
        const int64_t c = atomic_fetch_add_explicit(&b->next, 1, memory_order_relaxed);
        if (c >= end) break;
        while (c >= b->parts[k].chunk1) k++;
        const int64_t chunk0 = k ? b->parts[k - 1].chunk1 : 0;
        convert_chunk(&b->parts[k], c - chunk0, buf);
    }
}

/* a part from the arguments, or n = -1 when they are bad */
static part make_part(int src_ti, const void *src, int dst_ti, void *dst, int n_rows, int n_per_row) {
    part p = { .src_ti = src_ti, .dst_ti = dst_ti, .src = src, .dst = dst, .n = -1 };
    if (!src || !dst || n_rows <= 0 || n_per_row <= 0) return p;
    if ((src_ti >= 0 && n_per_row % el_type_block(src_ti)) || (dst_ti >= 0 && n_per_row % el_type_block(dst_ti)))
        return p;
    p.n = (int64_t)n_rows * n_per_row;
    return p;
}

/* runs parts[0..n) (all valid, chunk1 not yet set); returns the bytes written */
static size_t run_parts(el_pool *pool, part *parts, int n) {
    el_init();
    int64_t chunks = 0;
    size_t bytes = 0;
    for (int i = 0; i < n; i++) {
        chunks += (parts[i].n + CHUNK - 1) / CHUNK;
        parts[i].chunk1 = chunks;
        bytes += span_bytes(parts[i].dst_ti, parts[i].n);
    }
    batch b = { .parts = parts, .n_parts = n };
    atomic_init(&b.next, 0);
    if (pool && el_pool_size(pool) > 1 && chunks > 1) el_pool_run(pool, batch_task, &b);
    else batch_task(&b, 0, 1);
    return bytes;
}

static size_t run_one(el_pool *pool, int src_ti, const void *src, int dst_ti, void *dst, int n_rows, int n_per_row) {
    part p = make_part(src_ti, src, dst_ti, dst, n_rows, n_per_row);
    return p.n < 0 ? 0 : run_parts(pool, &p, 1);
}

size_t el_quantize_rows(el_pool *pool, int type, const float *src, void *dst, int n_rows, int n_per_row) {
    const int ti = el_type_index(type);
    return ti < 0 ? 0 : run_one(pool, -1, src, ti, dst, n_rows, n_per_row);
}

size_t el_dequantize_rows(el_pool *pool, int type, const void *src, float *dst, int n_rows, int n_per_row) {
    const int ti = el_type_index(type);
    return ti < 0 ? 0 : run_one(pool, ti, src, -1, dst, n_rows, n_per_row);
}

size_t el_requantize_rows(el_pool *pool, int src_type, const void *src, int dst_type, void *dst,
                          int n_rows, int n_per_row) {
    const int si = el_type_index(src_type), di = el_type_index(dst_type);
    return si < 0 || di < 0 ? 0 : run_one(pool, si, src, di, dst, n_rows, n_per_row);
}

size_t el_requantize_batch(el_pool *pool, const el_quant_job *jobs, int n_jobs) {
    if (!jobs || n_jobs < 1) return 0;
    part *parts = malloc((size_t)n_jobs * sizeof *parts);
    if (!parts) return 0;
    size_t bytes = 0;
    int ok = 1;
    for (int i = 0; i < n_jobs && ok; i++) {
        const el_quant_job *j = &jobs[i];
        const int si = el_type_index(j->src_type), di = el_type_index(j->dst_type);
        parts[i] = make_part(si, j->src, di, j->dst, j->n_rows, j->n_per_row);
        ok = si >= 0 && di >= 0 && parts[i].n >= 0;
    }
    if (ok) bytes = run_parts(pool, parts, n_jobs);
    free(parts);
    return bytes;
}
