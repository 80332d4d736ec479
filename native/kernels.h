/* The per-ISA dispatch table: one signature per operation, one table per instruction set
 * (kernels_generic.c, kernels_avx2.c, kernels_neon.c), filled once at init (dispatch.c). Internal header. */
#ifndef EDGELLM_KERNELS_H
#define EDGELLM_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include "quants.h"
#include "edgellm.h"

/* compact index of the weight types the core knows (the traits table is indexed by it) */
enum { EL_TI_F32, EL_TI_F16, EL_TI_BF16, EL_TI_Q4_0, EL_TI_Q4_1, EL_TI_Q5_0, EL_TI_Q5_1, EL_TI_Q8_0,
       EL_TI_Q4_K, EL_TI_Q5_K, EL_TI_Q6_K, EL_NTYPES };
int el_type_index(int ggml_type);          /* -1 when unknown */
int el_type_block(int ti);                 /* elements per block */
size_t el_type_block_bytes(int ti);        /* bytes per block (GGUF layout) */

/* y[t * y_stride + r] = dot(row r of w, activation row t)  for r in [r0, r1), t in [0, n_tok).
 * w: the whole matrix in this ISA's layout for the type (interleave below); x: activation rows x_stride bytes
 * apart, q8a blocks (act_q8a) or float. r0 is a multiple of the interleave; r1 <= n_out may end a group early
 * (the kernel then writes only the rows that exist). */
typedef void (*el_gemm_fn)(const void *w, int n_in, int r0, int r1,
                           const void *x, size_t x_stride, int n_tok, float *y, size_t y_stride);

typedef struct el_type_kernels {
    int act_q8a;      /* 1: activations quantized to block_q8a; 0: float activations */
    int interleave;   /* rows interleaved by repack; 0: the GGUF layout is used as is (no repack) */
    void (*repack)(const void *src, void *dst, int n_out, int n_in);  /* dst holds ceil(n_out/interleave) groups */
    el_gemm_fn gemm;
} el_type_kernels;

typedef struct el_kernels {
    const char *name;
    el_type_kernels types[EL_NTYPES];
    void (*quantize_q8a)(const float *x, block_q8a *y, int n);
    void (*dequantize_row[EL_NTYPES])(const void *x, float *y, int n);
    void (*rmsnorm)(const float *x, const float *w, float *y, int n, float eps);
    /* cs: cos/sin pairs for this position, cs[2i] = cos(pos * base^(-2i/rope_dim)), cs[2i+1] = sin(...) */
    void (*rope)(float *x, int n_head, int head_dim, int rope_dim, const float *cs, int neox);
    void (*softmax)(float *x, int n);
    void (*silu_mul)(const float *g, const float *u, float *y, int n);
    void (*gelu_mul)(const float *g, const float *u, float *y, int n);
    void (*add)(const float *a, const float *b, float *y, int n);
    void (*to_f16)(const float *x, el_half *y, int n);   /* round to nearest even: K/V into the cache */
    /* n_q query rows (q, out: [n_q, head_dim]) over the cached rows of one kv head, read block by block: row j of
     * the walk is slot off + j, which lives in kb[(off + j) / block] at row (off + j) % block (V: vb). Query row i
     * attends walk rows [0, n_kv[i]). K / V rows are cache rows: k_type / v_type each EL_F16, EL_F32 or EL_Q8_0
     * (el_kv_row_bytes apart). scratch: el_attn_scratch(n_q, max n_kv, head_dim) floats.
     * Decode rows and prefill rows both come here: a row's result depends on its own query and slots only, never
     * on the other rows of the call or the tokens of the batch (batch invariance). */
    void (*attn)(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb,
                 int block, int off, int k_type, int v_type, int head_dim, float scale, float *scratch, float *out);
} el_kernels;

/* 1 / d of an activation block (block_q8a) of scale d = max|x| / 127. A block whose scale is zero or subnormal
 * quantizes to zeros: there 1 / d would overflow and the bytes saturate, so that s = d * sum(q) would not describe
 * them (the VNNI Q8_0 tiles recover sum(q) from s / d). Such a block's values are below 1.5e-36. */
static inline float el_q8a_inv(float d) { return d >= 1.17549435e-38f ? 1.0f / d : 0.0f; }

/* bytes of one cached K or V row of head_dim elements (q8_0: head_dim % 32 == 0) */
static inline size_t el_kv_row_bytes(int type, int head_dim) {
    return type == EL_Q8_0 ? (size_t)head_dim / EL_QK * sizeof(block_q8_0) : (size_t)head_dim * (type == EL_F16 ? 2 : 4);
}

/* row j of a cache block as float: f32 rows are returned in place, others converted into tmp [head_dim] */
static inline const float *el_kv_row(const void *base, int type, int j, int head_dim, float *tmp) {
    const char *row = (const char *)base + (size_t)j * el_kv_row_bytes(type, head_dim);
    if (type == EL_F32) return (const float *)row;
    if (type == EL_F16) {
        for (int i = 0; i < head_dim; i++) tmp[i] = el_half_to_float(((const el_half *)row)[i]);
    } else {
        const block_q8_0 *b = (const block_q8_0 *)row;
        for (int i = 0; i < head_dim / EL_QK; i++) {
            const float d = el_half_to_float(b[i].d);
            for (int l = 0; l < EL_QK; l++) tmp[i * EL_QK + l] = d * b[i].qs[l];
        }
    }
    return tmp;
}

/* nb blocks of 32 floats into Q8_0 (quantize.c): d = max|x| / 127, q = roundf(x / d), gguf.quants' bytes.
 * Weights and the KV cache's q8_0 rows both use it. */
void el_quantize_q8_0_blocks(const float *x, void *y, int64_t nb);

#define EL_ATTN_KC 64   /* walk rows per converted K/V chunk */
static inline size_t el_attn_scratch(int n_q, int max_kv, int head_dim) {
    return (size_t)n_q * (size_t)((max_kv + 7) / 8 * 8) + (size_t)EL_ATTN_KC * head_dim;
}

/* A walk over the cache rows [j, n) of a block table (see el_kernels.attn): the next run of rows that sit in one
 * block; *row points at row j, the return value is how many rows follow it contiguously. */
static inline int el_kv_run(const void *const *blocks, int block, int off, int j, int n, size_t row_bytes,
                            const char **row) {
    const int s = off + j, r = s % block, left = block - r;
    *row = (const char *)blocks[s / block] + (size_t)r * row_bytes;
    return left < n - j ? left : n - j;
}

extern const el_kernels *el_k;             /* the active table (dispatch.c) */
void el_init(void);                        /* idempotent; fills el_k from CPU features and EDGELLM_ISA */

void el_fill_generic(el_kernels *k);
#if defined(__x86_64__) || defined(_M_X64)
void el_fill_avx2(el_kernels *k);         /* starts from the generic table, overrides what it speeds up */
void el_fill_vnni(el_kernels *k);         /* AVX2 table + vpdpbusd GEMMs (AVX512-VNNI, 256-bit) */
void el_fill_amx(el_kernels *k);          /* VNNI table + tile GEMMs of 2+ tokens (AMX-INT8) */
#endif
#if defined(__aarch64__)
void el_fill_neon(el_kernels *k, int dotprod);
#endif

/* generic kernels other ISA files reuse where they have nothing better */
void el_generic_rope(float *x, int n_head, int head_dim, int rope_dim, const float *cs, int neox);
/* float rows (es = 2 or 4 bytes an element) into strips of `width` rows stored k-major: strip g holds, for each
 * input k, the elements of rows g*width .. g*width + width - 1 (rows past n_out zero); the AVX2 / AVX-512 float
 * GEMMs' layout */
void el_repack_strips(const void *src, void *dst, int n_out, int n_in, int es, int width);

#endif
