/* Weights (repacked or borrowed), the multithreaded matmul, and the single-op entry points on the active ISA. */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE   /* madvise, MADV_DONTNEED */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "edgellm.h"
#include "kernels.h"
#include "threadpool.h"
#include "weights.h"

/* ------------------------------------------------------------------------------------------------ weights */
/* Drop the whole pages of [lo, hi) from the process (MADV_DONTNEED): a file mapping reads them again if touched. */
static void drop_pages(const uint8_t *lo, const uint8_t *hi) {
#ifdef MADV_DONTNEED
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = ((uintptr_t)lo + page - 1) / page * page, b = (uintptr_t)hi / page * page;
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
#else
    (void)lo; (void)hi;
#endif
}

el_weight *el_weight_new(int type, const void *data, int n_out, int n_in) {
    return el_weight_new_release(type, data, n_out, n_in, 0);
}

el_weight *el_weight_new_release(int type, const void *data, int n_out, int n_in, int release) {
    el_init();
    const int ti = el_type_index(type);
    if (ti < 0 || n_out <= 0 || n_in <= 0 || n_in % el_type_block(ti)) return NULL;
    el_weight *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->type = type;
    w->ti = ti;
    w->n_out = n_out;
    w->n_in = n_in;
    w->k = el_k;   /* the layout below belongs to this table's gemm */
    const el_type_kernels *tk = &el_k->types[ti];
    w->act_q8a = tk->act_q8a;
    w->unit = tk->interleave > 0 ? tk->interleave : 1;
    if (tk->repack) {
        const int n_pad = (n_out + tk->interleave - 1) / tk->interleave * tk->interleave;
        const size_t bytes = (size_t)n_pad * el_row_size(type, n_in);
        /* big matrices on 2 MiB-aligned memory the kernel may back with huge pages (THP "madvise" mode): a decode
         * step streams every matrix, and 4 KiB pages cost a TLB walk each */
        const size_t align = bytes >= (4u << 20) ? (2u << 20) : 64;
        if (posix_memalign(&w->owned, align, bytes) != 0) { free(w); return NULL; }
#ifdef MADV_HUGEPAGE
        /* whole huge pages only: a huge page over the tail would be resident whole, up to 2 MiB more than the
         * matrix uses (peak RSS then varied with how many huge pages the kernel had free) */
        if (align > 64) madvise(w->owned, bytes / align * align, MADV_HUGEPAGE);
#endif
        if (!release) {
            tk->repack(data, w->owned, n_out, n_in);
        } else {
            /* groups of `interleave` rows are contiguous in both layouts: repack ~4 MiB at a time and give each
             * piece's source pages back at once, so the copy and the source are never both resident whole */
            const size_t row = el_row_size(type, n_in);
            int step = (int)((4u << 20) / (row * (size_t)w->unit)) * w->unit;
            if (step < w->unit) step = w->unit;
            for (int r = 0; r < n_out; r += step) {
                const int n = n_out - r < step ? n_out - r : step;
                tk->repack((const uint8_t *)data + (size_t)r * row, (uint8_t *)w->owned + (size_t)r * row, n, n_in);
                drop_pages((const uint8_t *)data + (size_t)r * row, (const uint8_t *)data + (size_t)(r + n) * row);
            }
        }
        w->data = w->owned;
    } else {
        w->data = data;   /* borrowed: the caller keeps the mmap alive */
    }
    return w;
}

void el_weight_free(el_weight *w) {
    if (!w) return;
    free(w->owned);
    free(w);
}

int el_weight_repacked(const el_weight *w) { return w->owned != NULL; }

int el_type_repacked(int type) {
    el_init();
    const int ti = el_type_index(type);
    return ti >= 0 && el_k->types[ti].repack != NULL;
}

size_t el_act_row_bytes(const el_weight *w) {
    return w->act_q8a ? (size_t)(w->n_in / EL_QK) * sizeof(block_q8a) : (size_t)w->n_in * sizeof(float);
}

void el_weight_gemm(const el_weight *w, int r0, int r1, const void *act, size_t act_stride, int n_tok,
                    float *y, size_t y_stride) {
    if (r0 < r1) w->k->types[w->ti].gemm(w->data, w->n_in, r0, r1, act, act_stride, n_tok, y, y_stride);
}

/* ------------------------------------------------------------------------------------------------ matmul */
typedef struct { const el_weight *w; const void *act; size_t stride; int n_tok; float *y; } matmul_job;

static void matmul_task(void *ctx, int ith, int nth) {
    const matmul_job *j = ctx;
    int r0, r1;
    el_split(j->w->n_out, j->w->unit, ith, nth, &r0, &r1);
    el_weight_gemm(j->w, r0, r1, j->act, j->stride, j->n_tok, j->y, (size_t)j->w->n_out);
}

void el_matmul(el_pool *pool, const el_weight *w, const float *x, int n_tok, float *y) {
    matmul_job j = { w, x, (size_t)w->n_in * sizeof(float), n_tok, y };
    void *q = NULL;
    if (w->act_q8a) {
        j.stride = el_act_row_bytes(w);
        q = malloc(j.stride * (size_t)n_tok);
        for (int t = 0; t < n_tok; t++)
            w->k->quantize_q8a(x + (size_t)t * w->n_in, (block_q8a *)((char *)q + t * j.stride), w->n_in);
        j.act = q;
    }
    el_pool_run(pool, matmul_task, &j);
    free(q);
}

/* ---------------------------------------------------------------------------------------- single ops */
size_t el_row_size(int type, int n) {
    const int ti = el_type_index(type);
    if (ti < 0) return 0;
    return (size_t)(n / el_type_block(ti)) * el_type_block_bytes(ti);
}

void el_quantize_q8a(const float *x, void *y, int n) { el_init(); el_k->quantize_q8a(x, y, n); }
void el_dequantize_row(int type, const void *x, float *y, int n) { el_init(); el_k->dequantize_row[el_type_index(type)](x, y, n); }
void el_rmsnorm(const float *x, const float *w, float *y, int n, float eps) { el_init(); el_k->rmsnorm(x, w, y, n, eps); }
void el_softmax(float *x, int n) { el_init(); el_k->softmax(x, n); }
void el_silu_mul(const float *g, const float *u, float *y, int n) { el_init(); el_k->silu_mul(g, u, y, n); }
void el_gelu_mul(const float *g, const float *u, float *y, int n) { el_init(); el_k->gelu_mul(g, u, y, n); }
void el_to_f16(const float *x, uint16_t *y, int n) { el_init(); el_k->to_f16(x, y, n); }
void el_add(const float *a, const float *b, float *y, int n) { el_init(); el_k->add(a, b, y, n); }

void el_rope_table(float *cs, int pos, int rope_dim, float base, float scale) {
    /* theta_i = (pos * scale) * base^(-2i/rope_dim), in double so long contexts keep their angles exact in float */
    const double p = (double)pos * (double)scale;
    for (int i = 0; i < rope_dim / 2; i++) {
        const double theta = p * pow((double)base, -2.0 * i / rope_dim);
        cs[2 * i] = (float)cos(theta);
        cs[2 * i + 1] = (float)sin(theta);
    }
}

void el_rope(float *x, int n_head, int head_dim, int rope_dim, int pos, float base, int neox) {
    el_init();
    float cs[512];
    if (rope_dim > 512) return;   /* the wrapper never asks this */
    el_rope_table(cs, pos, rope_dim, base, 1.0f);
    el_k->rope(x, n_head, head_dim, rope_dim, cs, neox);
}

/* what the attention kernels accept: a cache row type, head_dim within their stack buffers, whole q8_0 blocks */
static int attn_args_ok(int k_type, int v_type, int head_dim, int n_kv) {
    if (head_dim < 1 || head_dim > 512 || n_kv < 1) return 0;
    for (int i = 0; i < 2; i++) {
        const int t = i ? v_type : k_type;
        if (t != EL_F32 && t != EL_F16 && t != EL_Q8_0) return 0;
        if (t == EL_Q8_0 && head_dim % EL_QK) return 0;
    }
    return 1;
}

int el_attn_head(const float *q, const void *k, int k_type, const void *v, int v_type, int n_kv, int head_dim,
                 float scale, float *scratch, float *out) {
    el_init();
    if (!attn_args_ok(k_type, v_type, head_dim, n_kv)) return -1;
    const void *kb[1] = { k }, *vb[1] = { v };
    const int32_t nkv[1] = { n_kv };
    el_k->attn(q, 1, nkv, kb, vb, n_kv, 0, k_type, v_type, head_dim, scale, scratch, out);
    return 0;
}

size_t el_attn_scratch_size(int n_q, int max_kv, int head_dim) { return el_attn_scratch(n_q, max_kv, head_dim); }

int el_attn_blocks(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb, int block,
                   int off, int k_type, int v_type, int head_dim, float scale, float *scratch, float *out) {
    el_init();
    if (n_q < 1 || !attn_args_ok(k_type, v_type, head_dim, 1) || block < 1 || off < 0 || !kb || !vb) return -1;
    int max_kv = 0;
    for (int i = 0; i < n_q; i++) {
        if (n_kv[i] < 1) return -1;
        if (n_kv[i] > max_kv) max_kv = n_kv[i];
    }
    for (int b = 0; b <= (off + max_kv - 1) / block; b++) if (!kb[b] || !vb[b]) return -1;
    el_k->attn(q, n_q, n_kv, kb, vb, block, off, k_type, v_type, head_dim, scale, scratch, out);
    return 0;
}

size_t el_kv_row_size(int type, int head_dim) { return el_kv_row_bytes(type, head_dim); }

void el_kv_store_row(int type, const float *x, void *dst, int head_dim) {   /* the forward step stores with it too */
    el_init();
    if (type == EL_F16) el_k->to_f16(x, dst, head_dim);
    else if (type == EL_Q8_0) el_quantize_q8_0_blocks(x, dst, head_dim / EL_QK);
    else memcpy(dst, x, (size_t)head_dim * 4);
}
