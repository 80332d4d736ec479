/* Plain C kernels: the reference every ISA file is tested against (native/tests/test_kernels.c), and the
 * fallback on CPUs with nothing better. Written for clarity; the compiler's auto-vectoriser does the rest. */
#include <math.h>
#include <string.h>
#include "kernels.h"
#include "edgellm.h"

/* ------------------------------------------------------------------------------------------------ traits */
int el_type_index(int t) {
    switch (t) {
    case EL_F32: return EL_TI_F32;   case EL_F16: return EL_TI_F16;   case EL_BF16: return EL_TI_BF16;
    case EL_Q4_0: return EL_TI_Q4_0; case EL_Q4_1: return EL_TI_Q4_1; case EL_Q5_0: return EL_TI_Q5_0;
    case EL_Q5_1: return EL_TI_Q5_1; case EL_Q8_0: return EL_TI_Q8_0;
    case EL_Q4_K: return EL_TI_Q4_K; case EL_Q5_K: return EL_TI_Q5_K; case EL_Q6_K: return EL_TI_Q6_K;
    default: return -1;
    }
}

int el_type_block(int ti) { return ti <= EL_TI_BF16 ? 1 : ti >= EL_TI_Q4_K ? EL_QK_K : EL_QK; }

size_t el_type_block_bytes(int ti) {
    static const size_t bytes[EL_NTYPES] = {
        4, 2, 2, sizeof(block_q4_0), sizeof(block_q4_1), sizeof(block_q5_0), sizeof(block_q5_1), sizeof(block_q8_0),
        sizeof(block_q4_k), sizeof(block_q5_k), sizeof(block_q6_k)
    };
    return bytes[ti];
}

/* ------------------------------------------------------------------------------------ activation quantizer */
static void quantize_q8a(const float *x, block_q8a *y, int n) {
    for (int b = 0; b < n / EL_QK; b++, x += EL_QK) {
        float amax = 0.0f;
        for (int j = 0; j < EL_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = el_q8a_inv(d);
        int sum = 0;
        for (int j = 0; j < EL_QK; j++) {
            /* nearbyintf: round half to even, as the SIMD versions' vroundps / vcvtnq */
            int q = (int)nearbyintf(x[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = d;
        y[b].s = d * (float)sum;
    }
}

/* ------------------------------------------------------------------------------------------ dequantizers */
static void deq_f32(const void *x, float *y, int n) { memcpy(y, x, (size_t)n * 4); }
static void deq_f16(const void *x, float *y, int n) {
    const el_half *h = x;
    for (int i = 0; i < n; i++) y[i] = el_half_to_float(h[i]);
}
static void deq_bf16(const void *x, float *y, int n) {
    const el_bf16 *h = x;
    for (int i = 0; i < n; i++) y[i] = el_bf16_to_float(h[i]);
}
static void deq_q4_0(const void *x, float *y, int n) {
    const block_q4_0 *b = x;
    for (int i = 0; i < n / EL_QK; i++, y += EL_QK) {
        const float d = el_half_to_float(b[i].d);
        for (int j = 0; j < 16; j++) {
            y[j] = d * ((b[i].qs[j] & 15) - 8);
            y[j + 16] = d * ((b[i].qs[j] >> 4) - 8);
        }
    }
}
static void deq_q4_1(const void *x, float *y, int n) {
    const block_q4_1 *b = x;
    for (int i = 0; i < n / EL_QK; i++, y += EL_QK) {
        const float d = el_half_to_float(b[i].d), m = el_half_to_float(b[i].m);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (b[i].qs[j] & 15) + m;
            y[j + 16] = d * (b[i].qs[j] >> 4) + m;
        }
    }
}
static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static void deq_q5_0(const void *x, float *y, int n) {
    const block_q5_0 *b = x;
    for (int i = 0; i < n / EL_QK; i++, y += EL_QK) {
        const float d = el_half_to_float(b[i].d);
        const uint32_t qh = load_u32(b[i].qh);
        for (int j = 0; j < 16; j++) {
            y[j] = d * ((int)((b[i].qs[j] & 15) | ((qh >> j & 1) << 4)) - 16);
            y[j + 16] = d * ((int)((b[i].qs[j] >> 4) | ((qh >> (j + 16) & 1) << 4)) - 16);
        }
    }
}
static void deq_q5_1(const void *x, float *y, int n) {
    const block_q5_1 *b = x;
    for (int i = 0; i < n / EL_QK; i++, y += EL_QK) {
        const float d = el_half_to_float(b[i].d), m = el_half_to_float(b[i].m);
        const uint32_t qh = load_u32(b[i].qh);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (int)((b[i].qs[j] & 15) | ((qh >> j & 1) << 4)) + m;
            y[j + 16] = d * (int)((b[i].qs[j] >> 4) | ((qh >> (j + 16) & 1) << 4)) + m;
        }
    }
}
static void deq_q8_0(const void *x, float *y, int n) {
    const block_q8_0 *b = x;
    for (int i = 0; i < n / EL_QK; i++, y += EL_QK) {
        const float d = el_half_to_float(b[i].d);
        for (int j = 0; j < EL_QK; j++) y[j] = d * b[i].qs[j];
    }
}

/* K-quants: element l of sub-block j (32 elements) of a super-block, as an unsigned quant */
static inline int q4k_q(const block_q4_k *b, int j, int l) { return (b->qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 15; }
static inline int q5k_q(const block_q5_k *b, int j, int l) {
    return ((b->qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 15) | (((b->qh[l] >> j) & 1) << 4);
}
static inline int q6k_q(const block_q6_k *b, int j, int l) {   /* j < 8: half j/4, group j%4 */
    const int h = j / 4, g = j % 4;
    return ((b->ql[64 * h + l + 32 * (g & 1)] >> (4 * (g >> 1))) & 15) | (((b->qh[32 * h + l] >> (2 * g)) & 3) << 4);
}
static void deq_q4_k(const void *x, float *y, int n) {
    const block_q4_k *b = x;
    for (int i = 0; i < n / EL_QK_K; i++) {
        uint8_t sc[8], mn[8];
        el_k4_scales(b[i].scales, sc, mn);
        const float d = el_half_to_float(b[i].d), dmin = el_half_to_float(b[i].dmin);
        for (int j = 0; j < 8; j++, y += 32)
            for (int l = 0; l < 32; l++) y[l] = d * sc[j] * q4k_q(&b[i], j, l) - dmin * mn[j];
    }
}
static void deq_q5_k(const void *x, float *y, int n) {
    const block_q5_k *b = x;
    for (int i = 0; i < n / EL_QK_K; i++) {
        uint8_t sc[8], mn[8];
        el_k4_scales(b[i].scales, sc, mn);
        const float d = el_half_to_float(b[i].d), dmin = el_half_to_float(b[i].dmin);
        for (int j = 0; j < 8; j++, y += 32)
            for (int l = 0; l < 32; l++) y[l] = d * sc[j] * q5k_q(&b[i], j, l) - dmin * mn[j];
    }
}
static void deq_q6_k(const void *x, float *y, int n) {
    const block_q6_k *b = x;
    for (int i = 0; i < n / EL_QK_K; i++) {
        const float d = el_half_to_float(b[i].d);
        for (int j = 0; j < 8; j++, y += 32)
            for (int l = 0; l < 32; l++) y[l] = d * b[i].scales[2 * j + l / 16] * (q6k_q(&b[i], j, l) - 32);
    }
}

/* ---------------------------------------------------------------------------- dot products, one row each */
/* quantized weights x q8a activations: integer sums per block, one float multiply-add per block */
static float dot_q4_0(int n, const void *w, const block_q8a *a) {
    const block_q4_0 *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK; i++) {
        int isum = 0;
        for (int j = 0; j < 16; j++)
            isum += (b[i].qs[j] & 15) * a[i].qs[j] + (b[i].qs[j] >> 4) * a[i].qs[j + 16];
        s += el_half_to_float(b[i].d) * (a[i].d * (float)isum - 8.0f * a[i].s);
    }
    return s;
}
static float dot_q4_1(int n, const void *w, const block_q8a *a) {
    const block_q4_1 *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK; i++) {
        int isum = 0;
        for (int j = 0; j < 16; j++)
            isum += (b[i].qs[j] & 15) * a[i].qs[j] + (b[i].qs[j] >> 4) * a[i].qs[j + 16];
        s += el_half_to_float(b[i].d) * a[i].d * (float)isum + el_half_to_float(b[i].m) * a[i].s;
    }
    return s;
}
static float dot_q5_0(int n, const void *w, const block_q8a *a) {
    const block_q5_0 *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK; i++) {
        const uint32_t qh = load_u32(b[i].qh);
        int isum = 0;
        for (int j = 0; j < 16; j++)
            isum += (int)((b[i].qs[j] & 15) | ((qh >> j & 1) << 4)) * a[i].qs[j]
                  + (int)((b[i].qs[j] >> 4) | ((qh >> (j + 16) & 1) << 4)) * a[i].qs[j + 16];
        s += el_half_to_float(b[i].d) * (a[i].d * (float)isum - 16.0f * a[i].s);
    }
    return s;
}
static float dot_q5_1(int n, const void *w, const block_q8a *a) {
    const block_q5_1 *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK; i++) {
        const uint32_t qh = load_u32(b[i].qh);
        int isum = 0;
        for (int j = 0; j < 16; j++)
            isum += (int)((b[i].qs[j] & 15) | ((qh >> j & 1) << 4)) * a[i].qs[j]
                  + (int)((b[i].qs[j] >> 4) | ((qh >> (j + 16) & 1) << 4)) * a[i].qs[j + 16];
        s += el_half_to_float(b[i].d) * a[i].d * (float)isum + el_half_to_float(b[i].m) * a[i].s;
    }
    return s;
}
static float dot_q8_0(int n, const void *w, const block_q8a *a) {
    const block_q8_0 *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK; i++) {
        int isum = 0;
        for (int j = 0; j < EL_QK; j++) isum += b[i].qs[j] * a[i].qs[j];
        s += el_half_to_float(b[i].d) * a[i].d * (float)isum;
    }
    return s;
}
/* K-quants x q8a: a super-block meets 8 activation blocks; sub-block j's integer dot is scaled by its own scale
 * (and Q4_K/Q5_K's min term is m[j] times the activation block's d*sum(q), already in s) */
static float dot_q4_k(int n, const void *w, const block_q8a *a) {
    const block_q4_k *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK_K; i++, a += 8) {
        uint8_t sc[8], mn[8];
        el_k4_scales(b[i].scales, sc, mn);
        float sd = 0.0f, sm = 0.0f;
        for (int j = 0; j < 8; j++) {
            int isum = 0;
            for (int l = 0; l < 32; l++) isum += q4k_q(&b[i], j, l) * a[j].qs[l];
            sd += (float)(sc[j] * isum) * a[j].d;
            sm += (float)mn[j] * a[j].s;
        }
        s += el_half_to_float(b[i].d) * sd - el_half_to_float(b[i].dmin) * sm;
    }
    return s;
}
static float dot_q5_k(int n, const void *w, const block_q8a *a) {
    const block_q5_k *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK_K; i++, a += 8) {
        uint8_t sc[8], mn[8];
        el_k4_scales(b[i].scales, sc, mn);
        float sd = 0.0f, sm = 0.0f;
        for (int j = 0; j < 8; j++) {
            int isum = 0;
            for (int l = 0; l < 32; l++) isum += q5k_q(&b[i], j, l) * a[j].qs[l];
            sd += (float)(sc[j] * isum) * a[j].d;
            sm += (float)mn[j] * a[j].s;
        }
        s += el_half_to_float(b[i].d) * sd - el_half_to_float(b[i].dmin) * sm;
    }
    return s;
}
static float dot_q6_k(int n, const void *w, const block_q8a *a) {
    const block_q6_k *b = w;
    float s = 0.0f;
    for (int i = 0; i < n / EL_QK_K; i++, a += 8) {
        float sd = 0.0f;
        for (int j = 0; j < 8; j++) {
            int i0 = 0, i1 = 0;
            for (int l = 0; l < 16; l++) i0 += (q6k_q(&b[i], j, l) - 32) * a[j].qs[l];
            for (int l = 16; l < 32; l++) i1 += (q6k_q(&b[i], j, l) - 32) * a[j].qs[l];
            sd += (float)(b[i].scales[2 * j] * i0 + b[i].scales[2 * j + 1] * i1) * a[j].d;
        }
        s += el_half_to_float(b[i].d) * sd;
    }
    return s;
}
/* float weights x float activations */
static float dot_f32(int n, const void *w, const float *x) {
    const float *r = w; float s = 0.0f;
    for (int i = 0; i < n; i++) s += r[i] * x[i];
    return s;
}
static float dot_f16(int n, const void *w, const float *x) {
    const el_half *r = w; float s = 0.0f;
    for (int i = 0; i < n; i++) s += el_half_to_float(r[i]) * x[i];
    return s;
}
static float dot_bf16(int n, const void *w, const float *x) {
    const el_bf16 *r = w; float s = 0.0f;
    for (int i = 0; i < n; i++) s += el_bf16_to_float(r[i]) * x[i];
    return s;
}

/* gemm over the GGUF layout: each output is one row dot; the ISA files replace this where it matters */
#define GEMM_Q8A(name, dot, block_t)                                                                   \
    static void name(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok, \
                     float *y, size_t y_stride) {                                                      \
        const size_t row_bytes = (size_t)n_in / (sizeof(block_t) >= 144 ? EL_QK_K : EL_QK) * sizeof(block_t); \
        for (int r = r0; r < r1; r++)                                                                  \
            for (int t = 0; t < n_tok; t++)                                                            \
                y[t * y_stride + r] = dot(n_in, (const char *)w + r * row_bytes,                       \
                                          (const block_q8a *)((const char *)x + t * x_stride));        \
    }
GEMM_Q8A(gemm_q4_0, dot_q4_0, block_q4_0)
GEMM_Q8A(gemm_q4_1, dot_q4_1, block_q4_1)
GEMM_Q8A(gemm_q5_0, dot_q5_0, block_q5_0)
GEMM_Q8A(gemm_q5_1, dot_q5_1, block_q5_1)
GEMM_Q8A(gemm_q8_0, dot_q8_0, block_q8_0)
GEMM_Q8A(gemm_q4_k, dot_q4_k, block_q4_k)
GEMM_Q8A(gemm_q5_k, dot_q5_k, block_q5_k)
GEMM_Q8A(gemm_q6_k, dot_q6_k, block_q6_k)

#define GEMM_F(name, dot, esize)                                                                       \
    static void name(const void *w, int n_in, int r0, int r1, const void *x, size_t x_stride, int n_tok, \
                     float *y, size_t y_stride) {                                                      \
        for (int r = r0; r < r1; r++)                                                                  \
            for (int t = 0; t < n_tok; t++)                                                            \
                y[t * y_stride + r] = dot(n_in, (const char *)w + (size_t)r * n_in * esize,             \
                                          (const float *)((const char *)x + t * x_stride));            \
    }
GEMM_F(gemm_f32, dot_f32, 4)
GEMM_F(gemm_f16, dot_f16, 2)
GEMM_F(gemm_bf16, dot_bf16, 2)

/* --------------------------------------------------------------------------------------- element-wise */
static void rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * scale * w[i];
}

void el_repack_strips(const void *src, void *dst, int n_out, int n_in, int es, int width) {
    enum { KB = 32 };   /* inputs per tile of the transpose: a cache line or two of each source row */
    const int ng = (n_out + width - 1) / width;
    const uint8_t *s = src;
    uint8_t *d = dst;
    for (int g = 0; g < ng; g++) {
        uint8_t *dg = d + (size_t)g * width * n_in * es;
        for (int k0 = 0; k0 < n_in; k0 += KB) {
            const int k1 = k0 + KB < n_in ? k0 + KB : n_in;
            for (int j = 0; j < width; j++) {
                const int r = g * width + j;
                const uint8_t *row = s + (size_t)r * n_in * es;
                if (r >= n_out)
                    for (int k = k0; k < k1; k++) memset(dg + ((size_t)k * width + j) * es, 0, (size_t)es);
                else if (es == 2)
                    for (int k = k0; k < k1; k++) memcpy(dg + ((size_t)k * width + j) * 2, row + (size_t)k * 2, 2);
                else
                    for (int k = k0; k < k1; k++) memcpy(dg + ((size_t)k * width + j) * 4, row + (size_t)k * 4, 4);
            }
        }
    }
}

void el_generic_rope(float *x, int n_head, int head_dim, int rope_dim, const float *cs, int neox) {
    const int half = rope_dim / 2;
    for (int h = 0; h < n_head; h++, x += head_dim) {
        for (int i = 0; i < half; i++) {
            /* normal: adjacent pairs (GGUF llama weights are permuted for it); neox: halves */
            const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
            const float c = cs[2 * i], s = cs[2 * i + 1], a = x[i0], b = x[i1];
            x[i0] = a * c - b * s;
            x[i1] = a * s + b * c;
        }
    }
}

static void softmax(float *x, int n) {
    float mx = -INFINITY, sum = 0.0f;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, x[i]);
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - mx); sum += x[i]; }
    const float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

static void silu_mul(const float *g, const float *u, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void gelu_mul(const float *g, const float *u, float *y, int n) {
    const float c = 0.7978845608028654f; /* sqrt(2/pi): GELU's tanh approximation, as ggml_gelu */
    for (int i = 0; i < n; i++) {
        const float v = g[i];
        y[i] = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v))) * u[i];
    }
}

static void add(const float *a, const float *b, float *y, int n) {
    for (int i = 0; i < n; i++) y[i] = a[i] + b[i];
}

static void to_f16(const float *x, el_half *y, int n) {
    for (int i = 0; i < n; i++) y[i] = el_float_to_half(x[i]);
}

static void attn_row(const float *q, const void *const *kb, const void *const *vb, int block, int off, int n_kv,
                     int k_type, int v_type, int head_dim, float scale, float *scores, float *out) {
    float tmp[512];   /* head_dim <= 512 (checked by the callers) */
    const size_t krow = el_kv_row_bytes(k_type, head_dim), vrow = el_kv_row_bytes(v_type, head_dim);
    for (int j = 0; j < n_kv;) {
        const char *row;
        for (int run = el_kv_run(kb, block, off, j, n_kv, krow, &row); run > 0; run--, j++, row += krow) {
            const float *kj = el_kv_row(row, k_type, 0, head_dim, tmp);
            float s = 0.0f;
            for (int i = 0; i < head_dim; i++) s += q[i] * kj[i];
            scores[j] = s * scale;
        }
    }
    softmax(scores, n_kv);
    for (int i = 0; i < head_dim; i++) out[i] = 0.0f;
    for (int j = 0; j < n_kv;) {
        const char *row;
        for (int run = el_kv_run(vb, block, off, j, n_kv, vrow, &row); run > 0; run--, j++, row += vrow) {
            const float p = scores[j], *vj = el_kv_row(row, v_type, 0, head_dim, tmp);
            for (int i = 0; i < head_dim; i++) out[i] += p * vj[i];
        }
    }
}

static void attn(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb,
                 int block, int off, int k_type, int v_type, int head_dim, float scale, float *scratch, float *out) {
    for (int i = 0; i < n_q; i++)
        attn_row(q + (size_t)i * head_dim, kb, vb, block, off, n_kv[i], k_type, v_type, head_dim, scale, scratch,
                 out + (size_t)i * head_dim);
}

/* ------------------------------------------------------------------------------------------------ table */
void el_fill_generic(el_kernels *k) {
    memset(k, 0, sizeof *k);
    k->name = "generic";
    const el_gemm_fn gemm[EL_NTYPES] = { gemm_f32, gemm_f16, gemm_bf16, gemm_q4_0, gemm_q4_1,
                                         gemm_q5_0, gemm_q5_1, gemm_q8_0, gemm_q4_k, gemm_q5_k, gemm_q6_k };
    void (*deq[EL_NTYPES])(const void *, float *, int) = { deq_f32, deq_f16, deq_bf16, deq_q4_0, deq_q4_1,
                                                           deq_q5_0, deq_q5_1, deq_q8_0, deq_q4_k, deq_q5_k,
                                                           deq_q6_k };
    for (int t = 0; t < EL_NTYPES; t++) {
        k->types[t].act_q8a = t >= EL_TI_Q4_0;
        k->types[t].interleave = 0;
        k->types[t].repack = NULL;
        k->types[t].gemm = gemm[t];
        k->dequantize_row[t] = deq[t];
    }
    k->quantize_q8a = quantize_q8a;
    k->rmsnorm = rmsnorm;
    k->rope = el_generic_rope;
    k->softmax = softmax;
    k->silu_mul = silu_mul;
    k->gelu_mul = gelu_mul;
    k->add = add;
    k->to_f16 = to_f16;
    k->attn = attn;
}
