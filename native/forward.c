/* The whole forward step of a llama-style decoder in one call: embedding, every layer, final norm, logits.
 * Gemma 3 is the same loop with options from el_model_desc: embedding scale, per-head Q/K RMSNorm, per-layer
 * RoPE base/scale and sliding window, post-attention / post-FFN norms, GELU, its own attention scale.
 *
 * One el_pool_run per step; every thread walks the same layer loop and claims chunks of each stage; a stage
 * starts when the previous one is complete (7 per layer: the norm, the QKV matmuls, RoPE + cache write,
 * attention, the output projection + residual, the FFN norm, gate/up/act, down + residual).
 * Buffers are allocated once in el_model_new for n_batch tokens; the KV cache is Python's.
 */
#define _POSIX_C_SOURCE 200809L  /* posix_memalign, clock_gettime */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <time.h>
#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>
#include "edgellm.h"
#include "kernels.h"
#include <stdatomic.h>
#include "threadpool.h"
#include "weights.h"

typedef struct {
    el_weight *wq, *wk, *wv, *wo;        /* [n_head*hd, E], [n_kv*hd, E] x2, [E, n_head*hd] */
    el_weight *gate, *up, *down;         /* [F, E], [F, E], [E, F] */
    const float *attn_norm, *ffn_norm;   /* [E] */
    const float *q_norm, *k_norm;        /* [hd] (qk_norm) */
    const float *bq, *bk, *bv;           /* [n_head*hd], [n_kv*hd] x2 (Qwen2's projection biases), or NULL */
    const float *post_attn_norm, *post_ffn_norm;   /* [E] (post_norms) */
    int window;                          /* sliding window, 0 = global */
    int group_idx;                       /* index among the layers of its cache group (ring or full-context) */
    int rope_set;                        /* index of this layer's (base, scale) RoPE table */
} el_layer;

struct el_model {
    el_model_desc d;
    el_pool *pool;
    const el_kernels *k;                 /* element-wise ops; matmuls use each weight's own table */
    int release_sources;                 /* set_matrix gives a repacked source's pages back (el_model_release_sources) */
    const void *tok_embd;                /* [n_vocab, E] GGUF layout, borrowed: rows dequantized on lookup */
    int tok_embd_type;
    size_t tok_embd_row;
    int tok_embd_fd;                     /* >= 0: rows read from this file at tok_embd_off (el_model_set_embd_file) */
    int64_t tok_embd_off;
    const float *output_norm;            /* [E] */
    el_weight *output;                   /* [n_logits, E] (token_embd again when tied) */
    int n_logits;                        /* output's rows: n_vocab, or a draft's subset of the vocabulary */
    el_layer *layers;
    /* scratch for n_batch tokens */
    float *x;        /* [n_batch, E] residual stream */
    float *xb;       /* [n_batch, W] normed input / attention output, W = max(E, n_head*hd) */
    void *xq;        /* [n_batch] rows of q8a blocks for up to max(W, F) elements, xq_stride bytes apart */
    void *xq2;       /* same shape: the FFN product's blocks (xq still feeds other threads' gate/up rows) */
    size_t xq_stride;
    float *q, *kb, *vb;  /* [n_batch, n_head*hd], [n_batch, n_kv*hd] x2 */
    float *hg, *hu;  /* [n_batch, F] */
    float *tmp;      /* [n_batch, E] projection output before the residual add */
    float *cs;       /* [n_rope_sets, n_batch, rope_dim] cos/sin per token, one table per distinct (base, scale) */
    int n_rope_sets;
    float *rope_base, *rope_scale;   /* [n_rope_sets] */
    el_stage *stages;  /* [n_stages] claim / completion counters of one step */
    int n_stages;
    char *scratch;   /* per thread, scratch_n bytes: the attention kernel's scratch (scratch_attn floats), a query and
                      * an output tile, then (at byte scratch_ptr_at) the K and V block pointers of one walk
                      * (scratch_ptrs each) and the rows' lengths */
    size_t scratch_n, scratch_attn, scratch_ptr_at;
    int scratch_ctx, scratch_ptrs;   /* the longest context / block walk the scratch covers */
    int max_window;  /* the widest sliding window of any layer (0: none) */
};

/* Stage timing of thread 0, on when EDGELLM_PROFILE is set (printed to stderr by el_model_free): where a step's
 * time goes, to steer optimisation. Off, it costs one predictable branch per stage. */
enum { P_EMBD, P_NORM, P_QKV, P_ROPE, P_ATTN, P_WO, P_FFN_UP, P_FFN_DOWN, P_OUT, P_COUNT };
static const char *const prof_names[P_COUNT] = { "embd", "norm", "qkv", "rope+kv", "attn", "wo", "gate/up", "down", "output" };
static double prof_s[P_COUNT];
static int prof_on = -1;
static double prof_t0;
static double now_s(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + 1e-9 * ts.tv_nsec; }
#define PROF(ith, stage) do { if (prof_on && (ith) == 0) { const double t_ = now_s(); prof_s[stage] += t_ - prof_t0; prof_t0 = t_; } } while (0)

/* 64-byte aligned zeroed buffers from calloc, which hands out large blocks as fresh zero pages without writing
 * them: the n_batch-token scratch costs resident memory only as far as a step's tokens reach (a decode step
 * touches one token's rows, not n_batch). The block calloc returned sits just before the aligned pointer. */
static void *zalloc(size_t bytes) {
    char *raw = calloc(1, bytes + 64 + sizeof(void *));
    if (!raw) return NULL;
    char *p = raw + sizeof(void *);
    p += (64 - (uintptr_t)p % 64) % 64;
    memcpy(p - sizeof(void *), &raw, sizeof(void *));
    return p;
}
static void zfree(void *p) {
    if (!p) return;
    void *raw;
    memcpy(&raw, (char *)p - sizeof(void *), sizeof(void *));
    free(raw);
}

el_model *el_model_new(const el_model_desc *desc) {
    el_init();
    el_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->d = *desc;
    m->tok_embd_fd = -1;
    const el_model_desc *d = &m->d;
    const size_t nb = (size_t)d->n_batch, E = d->n_embd, nq = (size_t)d->n_head * d->head_dim,
                 nkv = (size_t)d->n_head_kv * d->head_dim, F = d->n_ff;
    const size_t W = E > nq ? E : nq, WQ = W > F ? W : F;
    m->k = el_k;
    m->pool = el_pool_acquire(d->n_threads);
    m->layers = calloc((size_t)d->n_layer, sizeof(el_layer));
    m->x = zalloc(nb * E * 4);
    m->xb = zalloc(nb * W * 4);
    m->xq_stride = (WQ + EL_QK - 1) / EL_QK * sizeof(block_q8a);
    m->xq = zalloc(nb * m->xq_stride);
    m->xq2 = zalloc(nb * m->xq_stride);
    m->q = zalloc(nb * nq * 4);
    m->kb = zalloc(nb * nkv * 4);
    m->vb = zalloc(nb * nkv * 4);
    m->hg = zalloc(nb * F * 4);
    m->hu = zalloc(nb * F * 4);
    m->tmp = zalloc(nb * E * 4);
    m->rope_base = zalloc(sizeof(float) * (size_t)(d->n_layer > 0 ? d->n_layer : 1));
    m->rope_scale = zalloc(sizeof(float) * (size_t)(d->n_layer > 0 ? d->n_layer : 1));
    if (m->layers && m->rope_base && m->rope_scale) {
        m->n_rope_sets = 0;
        for (int l = 0; l < d->n_layer; l++) {
            const float base = d->layer_rope_base ? d->layer_rope_base[l] : d->rope_base;
            const float scale = d->layer_rope_scale ? d->layer_rope_scale[l] : 1.0f;
            int s = 0;
            while (s < m->n_rope_sets && !(m->rope_base[s] == base && m->rope_scale[s] == scale)) s++;
            if (s == m->n_rope_sets) { m->rope_base[s] = base; m->rope_scale[s] = scale; m->n_rope_sets++; }
            m->layers[l].rope_set = s;
            m->layers[l].window = d->layer_window && d->layer_window[l] > 0 ? d->layer_window[l] : 0;
        }
        int n_ring_layers = 0, n_full_layers = 0;
        for (int l = 0; l < d->n_layer; l++) {
            m->layers[l].group_idx = m->layers[l].window ? n_ring_layers++ : n_full_layers++;
            if (m->layers[l].window > m->max_window) m->max_window = m->layers[l].window;
        }
        if (m->n_rope_sets == 0) m->n_rope_sets = 1;
    }
    m->d.layer_rope_base = m->d.layer_rope_scale = NULL;   /* copied above: the caller's arrays may go */
    m->d.layer_window = NULL;
    m->cs = zalloc((size_t)(m->n_rope_sets > 0 ? m->n_rope_sets : 1) * nb * (size_t)d->rope_dim * 4);
    m->n_stages = 1 + 10 * d->n_layer + 2;   /* embd; per layer at most 10; final norm, output */
    m->stages = zalloc(sizeof(el_stage) * (size_t)m->n_stages);
    if (!m->pool || !m->layers || !m->x || !m->xb || !m->xq || !m->xq2 || !m->q || !m->kb || !m->vb || !m->hg || !m->hu ||
        !m->tmp || !m->cs || !m->stages || !m->rope_base || !m->rope_scale) {
        el_model_free(m);
        return NULL;
    }
    return m;
}

void el_model_free(el_model *m) {
    if (!m) return;
    if (prof_on > 0) {
        double tot = 0;
        for (int i = 0; i < P_COUNT; i++) tot += prof_s[i];
        for (int i = 0; i < P_COUNT; i++)
            fprintf(stderr, "edgellm profile %-8s %8.3f s %5.1f%%\n", prof_names[i], prof_s[i], 100 * prof_s[i] / (tot > 0 ? tot : 1));
        memset(prof_s, 0, sizeof prof_s);
    }
    if (m->layers)
        for (int l = 0; l < m->d.n_layer; l++) {
            el_layer *L = &m->layers[l];
            el_weight_free(L->wq); el_weight_free(L->wk); el_weight_free(L->wv); el_weight_free(L->wo);
            el_weight_free(L->gate); el_weight_free(L->up); el_weight_free(L->down);
        }
    el_weight_free(m->output);
    el_pool_release(m->pool);
    free(m->layers); zfree(m->x); zfree(m->xb); zfree(m->xq); zfree(m->xq2); zfree(m->q); zfree(m->kb); zfree(m->vb);
    zfree(m->hg); zfree(m->hu); zfree(m->tmp); zfree(m->cs); free(m->scratch); zfree(m->stages);
    zfree(m->rope_base); zfree(m->rope_scale);
    if (m->tok_embd_fd >= 0) close(m->tok_embd_fd);
    free(m);
}

/* ------------------------------------------------------------------------------------------- mlock */
static int lock_range(const void *p, size_t bytes) {
    if (!p || !bytes) return 0;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p / page * page;
    return mlock((const void *)a, (uintptr_t)p + bytes - a) == 0 ? 0 : -errno;
}
static int lock_weight(const el_weight *w) {
    if (!w) return 0;
    const int unit = w->unit > 0 ? w->unit : 1;   /* a repacked copy holds n_out rounded up to its interleave */
    return lock_range(w->data, (size_t)((w->n_out + unit - 1) / unit * unit) * el_row_size(w->type, w->n_in));
}

int el_model_lock(const el_model *m) {
    const size_t E = (size_t)m->d.n_embd, hd = (size_t)m->d.head_dim;
    int rc = lock_range(m->tok_embd, (size_t)m->d.n_vocab * m->tok_embd_row);
    if (!rc) rc = lock_range(m->output_norm, E * 4);
    if (!rc) rc = lock_weight(m->output);
    for (int l = 0; !rc && l < m->d.n_layer; l++) {
        const el_layer *L = &m->layers[l];
        const el_weight *ws[7] = { L->wq, L->wk, L->wv, L->wo, L->gate, L->up, L->down };
        for (int i = 0; !rc && i < 7; i++) rc = lock_weight(ws[i]);
        const float *vs[6] = { L->attn_norm, L->ffn_norm, L->post_attn_norm, L->post_ffn_norm, L->q_norm, L->k_norm };
        for (int i = 0; !rc && i < 6; i++) rc = lock_range(vs[i], (i < 4 ? E : hd) * 4);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------------- tensors */
void el_model_release_sources(el_model *m, int on) { m->release_sources = on != 0; }

int el_model_set_embd_file(el_model *m, int fd, int64_t offset) {
    if (m->tok_embd_fd >= 0) close(m->tok_embd_fd);
    m->tok_embd_fd = fd;
    m->tok_embd_off = offset;
    return 0;
}

#define EMBD_ROW_MAX 32768   /* rows up to this many bytes are read with pread (E <= 8192 in F32) */
/* token t's embedding row in the file's layout: read from the file into buf where set, else the mapping */
static const void *embd_row(const el_model *m, int32_t token, unsigned char *buf) {
    const size_t row = m->tok_embd_row;
    if (m->tok_embd_fd >= 0 && row <= EMBD_ROW_MAX) {
        const off_t at = (off_t)(m->tok_embd_off + (int64_t)token * (int64_t)row);
        size_t got = 0;
        while (got < row) {
            const ssize_t r = pread(m->tok_embd_fd, buf + got, row - got, at + (off_t)got);
            if (r <= 0) break;   /* an error or the end: the mapping still has the bytes */
            got += (size_t)r;
        }
        if (got == row) return buf;
    }
    return (const char *)m->tok_embd + (size_t)token * row;
}

static int set_matrix(el_model *m, el_weight **slot, int type, const void *data, int n_out, int n_in, int want_out,
                      int want_in) {
    if (n_out != want_out || n_in != want_in) return -1;
    el_weight *w = el_weight_new_release(type, data, n_out, n_in, m->release_sources);
    if (!w) return -1;
    el_weight_free(*slot);
    *slot = w;
    return 0;
}

int el_model_set_tensor(el_model *m, int which, int layer, int type, const void *data, int n_out, int n_in) {
    const el_model_desc *d = &m->d;
    const int E = d->n_embd, nq = d->n_head * d->head_dim, nkv = d->n_head_kv * d->head_dim, F = d->n_ff;
    if (which >= EL_T_ATTN_NORM && (layer < 0 || layer >= d->n_layer)) return -1;
    el_layer *L = which >= EL_T_ATTN_NORM ? &m->layers[layer] : NULL;
    const int is_norm = which == EL_T_OUTPUT_NORM || which == EL_T_ATTN_NORM || which == EL_T_FFN_NORM ||
                        which == EL_T_POST_ATTN_NORM || which == EL_T_POST_FFN_NORM;
    if (is_norm && (type != EL_F32 || n_out != 1 || n_in != E)) return -1;
    const int is_head_norm = which == EL_T_ATTN_Q_NORM || which == EL_T_ATTN_K_NORM;
    if (is_head_norm && (type != EL_F32 || n_out != 1 || n_in != d->head_dim)) return -1;
    const int is_bias = which == EL_T_ATTN_Q_BIAS || which == EL_T_ATTN_K_BIAS || which == EL_T_ATTN_V_BIAS;
    if (is_bias && (type != EL_F32 || n_out != 1 || n_in != (which == EL_T_ATTN_Q_BIAS ? nq : nkv))) return -1;
    switch (which) {
    case EL_T_TOKEN_EMBD: {
        const int ti = el_type_index(type);
        if (ti < 0 || n_out != d->n_vocab || n_in != E || E % el_type_block(ti)) return -1;
        m->tok_embd = data;
        m->tok_embd_type = type;
        m->tok_embd_row = el_row_size(type, E);
        return 0;
    }
    case EL_T_OUTPUT_NORM: m->output_norm = data; return 0;
    case EL_T_ATTN_NORM: L->attn_norm = data; return 0;
    case EL_T_FFN_NORM: L->ffn_norm = data; return 0;
    case EL_T_ATTN_Q_NORM: L->q_norm = data; return 0;
    case EL_T_ATTN_K_NORM: L->k_norm = data; return 0;
    case EL_T_POST_ATTN_NORM: L->post_attn_norm = data; return 0;
    case EL_T_POST_FFN_NORM: L->post_ffn_norm = data; return 0;
    case EL_T_ATTN_Q_BIAS: L->bq = data; return 0;
    case EL_T_ATTN_K_BIAS: L->bk = data; return 0;
    case EL_T_ATTN_V_BIAS: L->bv = data; return 0;
    case EL_T_OUTPUT: {   /* every row of the vocabulary, or a subset (the caller keeps which tokens they are) */
        if (n_out < 1 || n_out > d->n_vocab) return -1;
        const int rc = set_matrix(m, &m->output, type, data, n_out, n_in, n_out, E);
        if (rc == 0) m->n_logits = n_out;
        return rc;
    }
    case EL_T_WQ: return set_matrix(m, &L->wq, type, data, n_out, n_in, nq, E);
    case EL_T_WK: return set_matrix(m, &L->wk, type, data, n_out, n_in, nkv, E);
    case EL_T_WV: return set_matrix(m, &L->wv, type, data, n_out, n_in, nkv, E);
    case EL_T_WO: return set_matrix(m, &L->wo, type, data, n_out, n_in, E, nq);
    case EL_T_FFN_GATE: return set_matrix(m, &L->gate, type, data, n_out, n_in, F, E);
    case EL_T_FFN_UP: return set_matrix(m, &L->up, type, data, n_out, n_in, F, E);
    case EL_T_FFN_DOWN: return set_matrix(m, &L->down, type, data, n_out, n_in, E, F);
    default: return -1;
    }
}

int el_model_n_threads(const el_model *m) { return el_pool_size(m->pool); }


/* --------------------------------------------------------------------------------------- the step */
typedef struct {
    el_model *m;
    const el_batch *b;
    const el_cache *caches;
    float *logits;
    int n_out;
    const int *out_idx;   /* batch index of each logits row */
    int hidden;           /* 1: write the final-normed hidden states [n_out, n_embd] to logits instead; 2: every
                           * token's residual stream [n_tokens, n_embd] after the model's layers */
    const float *x_in;    /* the residual stream [n_tokens, n_embd] an earlier stage wrote, or NULL: the embeddings */
} fwd_ctx;

static inline void *xq_row(const el_model *m, int t) { return (char *)m->xq + (size_t)t * m->xq_stride; }

enum { ATTN_TILE = 16 };   /* most tokens per attention task */
enum { ATTN_SPLIT_BYTES = 256 * 1024 };   /* a kv head's K + V (f16) up to which decode splits its query heads */

/* tokens per attention task: up to ATTN_TILE, fewer when that would leave fewer than 4 tasks per thread */
static inline int attn_tile(int n, int n_head_kv, int nth) {
    int tile = n * n_head_kv / (4 * nth);
    return tile < 1 ? 1 : tile > ATTN_TILE ? ATTN_TILE : tile;
}

/* One layer of one cache (see el_cache): where its blocks are and how positions map to slots. */
typedef struct {
    char *k, *v;          /* this layer's block 0 */
    size_t krow, vrow;    /* bytes per row */
    size_t kblk, vblk;    /* bytes per block of one kv head (block rows) */
    int n_head_kv, block;
    const int32_t *table;
    int ring;             /* mirrored ring length (0: slot = position) */
    int from;             /* no position below it is cached */
} kv_layer;

static kv_layer layer_kv(const el_model *m, const el_cache *c, int l) {
    const el_layer *L = &m->layers[l];
    const int swa = c->k_swa && L->window, idx = c->k_swa ? L->group_idx : l, hd = m->d.head_dim;
    const int n_blocks = swa ? c->n_blocks_swa : c->n_blocks;
    kv_layer v;
    v.n_head_kv = m->d.n_head_kv;
    v.block = swa ? c->block_swa : c->block;
    v.krow = el_kv_row_bytes(c->type_k, hd);
    v.vrow = el_kv_row_bytes(c->type_v, hd);
    v.kblk = (size_t)v.block * v.krow;
    v.vblk = (size_t)v.block * v.vrow;
    const size_t layer_blocks = (size_t)idx * n_blocks * v.n_head_kv;
    v.k = (char *)(swa ? c->k_swa : c->k) + layer_blocks * v.kblk;
    v.v = (char *)(swa ? c->v_swa : c->v) + layer_blocks * v.vblk;
    v.table = swa ? c->table_swa : c->table;
    v.ring = swa ? c->n_ring : 0;
    v.from = swa ? c->swa_from : 0;
    return v;
}

/* block i of the table for kv head h: its first K / V row */
static inline char *kv_block_k(const kv_layer *v, int h, int i) { return v->k + ((size_t)v->table[i] * v->n_head_kv + h) * v->kblk; }
static inline char *kv_block_v(const kv_layer *v, int h, int i) { return v->v + ((size_t)v->table[i] * v->n_head_kv + h) * v->vblk; }
static inline int kv_slot(const kv_layer *v, int pos) { return v->ring ? pos % v->ring : pos; }
static inline char *kv_row_k(const kv_layer *v, int h, int slot) { return kv_block_k(v, h, slot / v->block) + (size_t)(slot % v->block) * v->krow; }
static inline char *kv_row_v(const kv_layer *v, int h, int slot) { return kv_block_v(v, h, slot / v->block) + (size_t)(slot % v->block) * v->vrow; }
/* the first position the query at pos sees in layer L */
static inline int kv_first(const el_layer *L, const kv_layer *v, int pos) {
    int first = L->window && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0;
    return first > v->from ? first : v->from;
}

/* ---- stages: work cut into chunks that threads claim, and a completion count instead of a barrier ----
 * A thread that the OS preempts (machines are shared; phones run other apps) holds nobody up unless it holds a
 * chunk: the others take the remaining chunks, and a late thread finds its stages done and catches up. Every
 * thread walks the same sequence of stages; a stage's chunks start only when the previous stage is complete. */
typedef struct { el_stage *st; int si; } sync_t;

static inline int claim(sync_t *s) {
    return atomic_fetch_add_explicit(&s->st[s->si].next, 1, memory_order_relaxed);
}

static inline void finish(sync_t *s, int n_done, int total) {
    el_stage *st = &s->st[s->si++];
    el_stage_complete(&st->done, &st->sleepers, n_done, total);
}

/* chunks of a stage: a few per thread, so a late thread's share is picked up by the others */
static inline int n_chunks(int units, int nth) {
    const int want = nth == 1 ? 1 : 4 * nth;
    return units < want ? (units > 0 ? units : 1) : want;
}

/* rows [r0, r1) of piece ch of NCH pieces of w (cut at w's interleave unit) */
static inline void piece(const el_weight *w, int ch, int nch, int *r0, int *r1) { el_split(w->n_out, w->unit, ch, nch, r0, r1); }

static void gemm_rows(const el_model *m, const el_weight *w, int r0, int r1, const void *xq, const float *xf,
                      int n_tok, float *y, size_t y_stride) {
    if (w->act_q8a) el_weight_gemm(w, r0, r1, xq, m->xq_stride, n_tok, y, y_stride);
    else el_weight_gemm(w, r0, r1, xf, (size_t)w->n_in * 4, n_tok, y, y_stride);
}

static void forward_task(void *ctx, int ith, int nth) {
    const fwd_ctx *c = ctx;
    el_model *m = c->m;
    const el_model_desc *d = &m->d;
    const el_kernels *k = m->k;
    const el_batch *b = c->b;
    const int n = b->n_tokens, E = d->n_embd, hd = d->head_dim, nq = d->n_head * hd,
              nkv = d->n_head_kv * hd, F = d->n_ff, group = d->n_head / d->n_head_kv;
    const float scale = d->attn_scale != 0.0f ? d->attn_scale : 1.0f / sqrtf((float)hd);
    const size_t cs_set = (size_t)d->n_batch * d->rope_dim;   /* floats between two RoPE tables */
    sync_t S = { m->stages, 0 };
    const int tch = n_chunks(n, nth);   /* token chunks */
    int ch, nd, t0, t1;

    /* embedding rows and this step's RoPE angles */
    const int embd_ti = c->x_in ? 0 : el_type_index(m->tok_embd_type);
    for (nd = 0; (ch = claim(&S)) < tch; nd++) {
        el_split(n, 1, ch, tch, &t0, &t1);
        for (int t = t0; t < t1; t++) {
            float *xt = m->x + (size_t)t * E;
            if (c->x_in) {   /* a later stage of a pipeline: the residual stream as the stage before left it */
                memcpy(xt, c->x_in + (size_t)t * E, sizeof(float) * (size_t)E);
            } else {
                union { unsigned char b[EMBD_ROW_MAX]; double align; } rb;   /* aligned as the blocks need */
                k->dequantize_row[embd_ti](embd_row(m, b->tokens[t], rb.b), xt, E);
                if (d->embd_scale != 0.0f && d->embd_scale != 1.0f)
                    for (int i = 0; i < E; i++) xt[i] *= d->embd_scale;
            }
            for (int s = 0; s < m->n_rope_sets; s++)
                el_rope_table(m->cs + s * cs_set + (size_t)t * d->rope_dim, b->pos[t], d->rope_dim, m->rope_base[s],
                              m->rope_scale[s]);
        }
    }
    finish(&S, nd, tch);
    PROF(ith, P_EMBD);

    for (int l = 0; l < d->n_layer; l++) {
        const el_layer *L = &m->layers[l];
        /* attention norm -> xb (float) and xq (q8a) */
        for (nd = 0; (ch = claim(&S)) < tch; nd++) {
            el_split(n, 1, ch, tch, &t0, &t1);
            for (int t = t0; t < t1; t++) {
                float *xb = m->xb + (size_t)t * E;
                k->rmsnorm(m->x + (size_t)t * E, L->attn_norm, xb, E, d->rms_eps);
                if (E % EL_QK == 0) k->quantize_q8a(xb, xq_row(m, t), E);
            }
        }
        finish(&S, nd, tch);
        PROF(ith, P_NORM);
        /* Q, K, V: chunk ch takes the ch-th piece of each */
        const int qch = n_chunks(nkv / (L->wk->unit > 0 ? L->wk->unit : 1), nth);
        for (nd = 0; (ch = claim(&S)) < qch; nd++) {
            int r0, r1;
            piece(L->wq, ch, qch, &r0, &r1); gemm_rows(m, L->wq, r0, r1, m->xq, m->xb, n, m->q, nq);
            piece(L->wk, ch, qch, &r0, &r1); gemm_rows(m, L->wk, r0, r1, m->xq, m->xb, n, m->kb, nkv);
            piece(L->wv, ch, qch, &r0, &r1); gemm_rows(m, L->wv, r0, r1, m->xq, m->xb, n, m->vb, nkv);
        }
        finish(&S, nd, qch);
        PROF(ith, P_QKV);
        /* (biases,) RoPE, then K and V of the new tokens into their cache slots */
        for (nd = 0; (ch = claim(&S)) < tch; nd++) {
            el_split(n, 1, ch, tch, &t0, &t1);
            for (int t = t0; t < t1; t++) {
                const float *cs = m->cs + L->rope_set * cs_set + (size_t)t * d->rope_dim;
                if (L->bq) {   /* Qwen2: the projections' biases */
                    k->add(m->q + (size_t)t * nq, L->bq, m->q + (size_t)t * nq, nq);
                    k->add(m->kb + (size_t)t * nkv, L->bk, m->kb + (size_t)t * nkv, nkv);
                    k->add(m->vb + (size_t)t * nkv, L->bv, m->vb + (size_t)t * nkv, nkv);
                }
                if (d->qk_norm) {   /* per-head RMSNorm (in place) before RoPE */
                    for (int h = 0; h < d->n_head; h++) {
                        float *qh = m->q + (size_t)t * nq + (size_t)h * hd;
                        k->rmsnorm(qh, L->q_norm, qh, hd, d->rms_eps);
                    }
                    for (int h = 0; h < d->n_head_kv; h++) {
                        float *kh = m->kb + (size_t)t * nkv + (size_t)h * hd;
                        k->rmsnorm(kh, L->k_norm, kh, hd, d->rms_eps);
                    }
                }
                k->rope(m->q + (size_t)t * nq, d->n_head, hd, d->rope_dim, cs, d->rope_neox);
                k->rope(m->kb + (size_t)t * nkv, d->n_head_kv, hd, d->rope_dim, cs, d->rope_neox);
                const el_cache *cc = &c->caches[b->seq ? b->seq[t] : 0];
                const kv_layer kv = layer_kv(m, cc, l);
                const int slot = kv_slot(&kv, b->pos[t]);
                for (int h = 0; h < d->n_head_kv; h++) {
                    const float *kt = m->kb + (size_t)t * nkv + h * hd, *vt = m->vb + (size_t)t * nkv + h * hd;
                    char *kr = kv_row_k(&kv, h, slot), *vr = kv_row_v(&kv, h, slot);
                    el_kv_store_row(cc->type_k, kt, kr, hd);
                    el_kv_store_row(cc->type_v, vt, vr, hd);
                    if (kv.ring) {   /* the mirror copy: windows never wrap */
                        memcpy(kv_row_k(&kv, h, slot + kv.ring), kr, kv.krow);
                        memcpy(kv_row_v(&kv, h, slot + kv.ring), vr, kv.vrow);
                    }
                }
            }
        }
        finish(&S, nd, tch);
        PROF(ith, P_ROPE);
        /* attention -> xb [n, nq], quantized per head when blocks allow (fuse_q). A task is a tile of tokens x one kv
         * head (the query heads sharing it): its rows share each converted K/V chunk. Every row gets the same
         * arithmetic whatever its tile (see el_kernels.attn), so the tiling follows the batch freely: few tokens
         * (decode) -> one token per task, or one query head when even that leaves threads idle. */
        const int fuse_q = L->wo->act_q8a && hd % EL_QK == 0;
        {
            float *scr = (float *)(m->scratch + (size_t)ith * m->scratch_n);
            const void **kb = (const void **)(m->scratch + (size_t)ith * m->scratch_n + m->scratch_ptr_at);
            const void **vb = kb + m->scratch_ptrs;
            int32_t *nkvs = (int32_t *)(vb + m->scratch_ptrs);
            float *qbuf = scr + m->scratch_attn, *obuf = qbuf + (size_t)ATTN_TILE * group * hd;
            /* few tokens: the query heads of a kv head split into gsplit tasks too, so every thread has work.
             * Each task reads the kv head's rows: from L2 over a short context, from memory over a long one
             * (SmolLM2 at 4096, a task per query head: 3x the cache's bytes), so there only as many as the
             * threads need. Rows are computed alike in any grouping: the bits do not depend on it. */
            int gsplit = 1;
            if (n * d->n_head_kv < 2 * nth) {
                int max_pos = 0;
                for (int t = 0; t < n; t++) max_pos = b->pos[t] > max_pos ? b->pos[t] : max_pos;
                const int span = L->window && L->window < max_pos + 1 ? L->window : max_pos + 1;
                if ((size_t)span * hd * 4 <= ATTN_SPLIT_BYTES) gsplit = group;
                else
                    while (gsplit < group && n * d->n_head_kv * gsplit < nth)
                        do gsplit++; while (group % gsplit);
            }
            const int per_head = gsplit > 1;
            const int tile = per_head ? 1 : attn_tile(n, d->n_head_kv, nth);
            const int n_tiles = (n + tile - 1) / tile;
            const int ach = n_tiles * d->n_head_kv * gsplit;
            for (nd = 0; (ch = claim(&S)) < ach; nd++) {
                const int task = ach - 1 - ch;     /* late tiles (longer rows) first */
                const int ti = task / (d->n_head_kv * gsplit), kvh = task / gsplit % d->n_head_kv;
                const int ng = group / gsplit, g0 = task % gsplit * ng;
                const int ta = ti * tile, tb = ta + tile < n ? ta + tile : n;
                for (int s0 = ta; s0 < tb;) {   /* runs of one sequence: they share a cache */
                    const int seq = b->seq ? b->seq[s0] : 0;
                    int s1 = s0 + 1;
                    while (s1 < tb && (b->seq ? b->seq[s1] : 0) == seq) s1++;
                    const el_cache *cc = &c->caches[seq];
                    const kv_layer kv = layer_kv(m, cc, l);
                    /* rows share a start when nothing cuts in front (global layers); else one token at a time */
                    const int shared = kv_first(L, &kv, b->pos[s1 - 1]) == 0;
                    for (int u0 = s0; u0 < s1; u0 = shared ? s1 : u0 + 1) {
                        const int u1 = shared ? s1 : u0 + 1;
                        const int first = kv_first(L, &kv, b->pos[u0]), sa = kv_slot(&kv, first);
                        const int last = b->pos[u1 - 1], b0 = sa / kv.block, b1 = (sa + last - first) / kv.block;
                        for (int i = b0; i <= b1; i++) {
                            kb[i - b0] = kv_block_k(&kv, kvh, i);
                            vb[i - b0] = kv_block_v(&kv, kvh, i);
                        }
                        int nr = 0;
                        for (int t = u0; t < u1; t++)
                            for (int g = g0; g < g0 + ng; g++, nr++) {
                                memcpy(qbuf + (size_t)nr * hd, m->q + (size_t)t * nq + (size_t)(kvh * group + g) * hd,
                                       sizeof(float) * hd);
                                nkvs[nr] = b->pos[t] + 1 - first;
                            }
                        k->attn(qbuf, nr, nkvs, kb, vb, kv.block, sa % kv.block, cc->type_k, cc->type_v, hd, scale,
                                scr, obuf);
                        nr = 0;
                        for (int t = u0; t < u1; t++)
                            for (int g = g0; g < g0 + ng; g++, nr++) {
                                const int h = kvh * group + g;
                                float *out = m->xb + (size_t)t * nq + h * hd;
                                memcpy(out, obuf + (size_t)nr * hd, sizeof(float) * hd);
                                if (fuse_q) k->quantize_q8a(out, (block_q8a *)xq_row(m, t) + h * hd / EL_QK, hd);
                            }
                    }
                    s0 = s1;
                }
            }
            finish(&S, nd, ach);
        }
        if (L->wo->act_q8a && !fuse_q) {
            for (nd = 0; (ch = claim(&S)) < tch; nd++) {
                el_split(n, 1, ch, tch, &t0, &t1);
                for (int t = t0; t < t1; t++) k->quantize_q8a(m->xb + (size_t)t * nq, xq_row(m, t), nq);
            }
            finish(&S, nd, tch);
        }
        PROF(ith, P_ATTN);
        /* output projection + residual, on the chunk's own rows */
        const int och = n_chunks(E / L->wo->unit, nth);
        for (nd = 0; (ch = claim(&S)) < och; nd++) {
            int r0, r1;
            piece(L->wo, ch, och, &r0, &r1);
            gemm_rows(m, L->wo, r0, r1, m->xq, m->xb, n, m->tmp, E);
            for (int t = 0; t < n && r0 < r1 && !d->post_norms; t++)
                k->add(m->x + (size_t)t * E + r0, m->tmp + (size_t)t * E + r0, m->x + (size_t)t * E + r0, r1 - r0);
        }
        finish(&S, nd, och);
        PROF(ith, P_WO);
        for (nd = 0; (ch = claim(&S)) < tch; nd++) {
            el_split(n, 1, ch, tch, &t0, &t1);
            for (int t = t0; t < t1; t++) {
                float *xb = m->xb + (size_t)t * E;
                if (d->post_norms) {   /* x += norm(attention output): the whole row is here now */
                    float *o = m->tmp + (size_t)t * E;
                    k->rmsnorm(o, L->post_attn_norm, o, E, d->rms_eps);
                    k->add(m->x + (size_t)t * E, o, m->x + (size_t)t * E, E);
                }
                k->rmsnorm(m->x + (size_t)t * E, L->ffn_norm, xb, E, d->rms_eps);
                if (E % EL_QK == 0) k->quantize_q8a(xb, xq_row(m, t), E);
            }
        }
        finish(&S, nd, tch);
        PROF(ith, P_NORM);
        /* gate and up on the same rows, then act(gate) * up and its q8a blocks (into xq2): rows cut at blocks */
        {
            const int unit = L->down->act_q8a ? EL_QK : (L->gate->unit > L->up->unit ? L->gate->unit : L->up->unit);
            const int fch = n_chunks(F / unit, nth);
            for (nd = 0; (ch = claim(&S)) < fch; nd++) {
                int r0, r1;
                el_split(F, unit, ch, fch, &r0, &r1);
                if (r0 >= r1) continue;
                gemm_rows(m, L->gate, r0, r1, m->xq, m->xb, n, m->hg, F);
                gemm_rows(m, L->up, r0, r1, m->xq, m->xb, n, m->hu, F);
                for (int t = 0; t < n; t++) {
                    float *g = m->hg + (size_t)t * F + r0;
                    if (d->act == EL_ACT_GELU) k->gelu_mul(g, m->hu + (size_t)t * F + r0, g, r1 - r0);
                    else k->silu_mul(g, m->hu + (size_t)t * F + r0, g, r1 - r0);
                    if (L->down->act_q8a)
                        k->quantize_q8a(g, (block_q8a *)((char *)m->xq2 + (size_t)t * m->xq_stride) + r0 / EL_QK, r1 - r0);
                }
            }
            finish(&S, nd, fch);
        }
        PROF(ith, P_FFN_UP);
        const int dch = n_chunks(E / L->down->unit, nth);
        for (nd = 0; (ch = claim(&S)) < dch; nd++) {
            int r0, r1;
            piece(L->down, ch, dch, &r0, &r1);
            gemm_rows(m, L->down, r0, r1, m->xq2, m->hg, n, m->tmp, E);
            for (int t = 0; t < n && r0 < r1 && !d->post_norms; t++)
                k->add(m->x + (size_t)t * E + r0, m->tmp + (size_t)t * E + r0, m->x + (size_t)t * E + r0, r1 - r0);
        }
        finish(&S, nd, dch);
        if (d->post_norms) {   /* x += norm(FFN output) */
            for (nd = 0; (ch = claim(&S)) < tch; nd++) {
                el_split(n, 1, ch, tch, &t0, &t1);
                for (int t = t0; t < t1; t++) {
                    float *o = m->tmp + (size_t)t * E;
                    k->rmsnorm(o, L->post_ffn_norm, o, E, d->rms_eps);
                    k->add(m->x + (size_t)t * E, o, m->x + (size_t)t * E, E);
                }
            }
            finish(&S, nd, tch);
        }
        PROF(ith, P_FFN_DOWN);
    }

    if (c->hidden == 2) {   /* the residual stream of every token, for layers that run elsewhere (a GPU, a stage) */
        for (nd = 0; (ch = claim(&S)) < tch; nd++) {
            el_split(n, 1, ch, tch, &t0, &t1);
            memcpy(c->logits + (size_t)t0 * E, m->x + (size_t)t0 * E, sizeof(float) * (size_t)(t1 - t0) * E);
        }
        finish(&S, nd, tch);
        return;
    }
    /* final norm of the tokens that want logits, then the vocabulary projection */
    if (c->n_out == 0) return;
    const int nch = n_chunks(c->n_out, nth);
    for (nd = 0; (ch = claim(&S)) < nch; nd++) {
        int o0, o1;
        el_split(c->n_out, 1, ch, nch, &o0, &o1);
        for (int i = o0; i < o1; i++) {
            float *xb = c->hidden ? c->logits + (size_t)i * E : m->xb + (size_t)i * E;
            k->rmsnorm(m->x + (size_t)c->out_idx[i] * E, m->output_norm, xb, E, d->rms_eps);
            if (E % EL_QK == 0 && !c->hidden) k->quantize_q8a(xb, xq_row(m, i), E);
        }
    }
    finish(&S, nd, nch);
    if (c->hidden) return;
    const int vch = n_chunks(m->n_logits / m->output->unit, nth) * 4;   /* the biggest matrix: finer chunks */
    for (nd = 0; (ch = claim(&S)) < vch; nd++) {
        int r0, r1;
        piece(m->output, ch, vch, &r0, &r1);
        gemm_rows(m, m->output, r0, r1, m->xq, m->xb, c->n_out, c->logits, m->n_logits);
    }
    finish(&S, nd, vch);
    PROF(ith, P_OUT);
}

static int forward(el_model *m, const el_batch *b, const el_cache *caches, int n_caches, float *logits, int hidden,
                   const float *x_in);

int el_model_forward(el_model *m, const el_batch *b, const el_cache *caches, int n_caches, float *logits) {
    return forward(m, b, caches, n_caches, logits, 0, NULL);
}

int el_model_forward_hidden(el_model *m, const el_batch *b, const el_cache *caches, int n_caches, float *hidden) {
    return forward(m, b, caches, n_caches, hidden, 1, NULL);
}

int el_model_forward_residual(el_model *m, const el_batch *b, const el_cache *caches, int n_caches, float *x) {
    return forward(m, b, caches, n_caches, x, 2, NULL);
}

int el_model_forward_stage(el_model *m, const el_batch *b, const el_cache *caches, int n_caches, const float *x_in,
                           float *out, int hidden) {
    return forward(m, b, caches, n_caches, out, m->output ? (hidden != 0) : 2, x_in);
}

/* every tensor a step needs: the layers', the embeddings unless the residual stream comes in, the output's unless
 * the residual stream goes out */
static int stage_ready(const el_model *m, int embd, int output) {
    for (int l = 0; l < m->d.n_layer; l++) {
        const el_layer *L = &m->layers[l];
        if (!L->wq || !L->wk || !L->wv || !L->wo || !L->gate || !L->up || !L->down || !L->attn_norm || !L->ffn_norm)
            return 0;
        if (m->d.qk_norm && (!L->q_norm || !L->k_norm)) return 0;
        if (m->d.post_norms && (!L->post_attn_norm || !L->post_ffn_norm)) return 0;
        if ((L->bq != NULL) != (L->bk != NULL) || (L->bq != NULL) != (L->bv != NULL)) return 0;
    }
    return (!embd || m->tok_embd) && (!output || (m->output_norm && m->output));
}

int el_model_ready(const el_model *m) { return stage_ready(m, 1, 1); }

int el_model_stage_ready(const el_model *m, int embd, int output) { return stage_ready(m, embd != 0, output != 0); }

static int forward(el_model *m, const el_batch *b, const el_cache *caches, int n_caches, float *logits, int hidden,
                   const float *x_in) {
    const el_model_desc *d = &m->d;
    const int n = b->n_tokens;
    if (n < 1 || n > d->n_batch || !stage_ready(m, x_in == NULL, hidden != 2) || n_caches < 1) return -1;
    for (int s = 0; s < n_caches; s++) {
        const el_cache *c = &caches[s];
        for (int kv = 0; kv < 2; kv++) {
            const int t = kv ? c->type_v : c->type_k;
            if (t != EL_F16 && t != EL_F32 && !(t == EL_Q8_0 && d->head_dim % EL_QK == 0)) return -1;
        }
        if (!c->k || !c->v || c->n_ctx < 1 || c->block < 1 || c->n_blocks < 1 || c->n_table < 1 || !c->table ||
            c->swa_from < 0 || c->n_ring < 0) return -1;
        if (c->k_swa && (!c->v_swa || c->block_swa < 1 || c->n_blocks_swa < 1 || c->n_table_swa < 1 ||
                         !c->table_swa || (c->n_ring && c->block_swa < 2 * c->n_ring))) return -1;
    }
    /* per sequence: positions strictly increase (a row's slots are those below its own), none below what the
     * window group still holds, no more tokens than a ring keeps windows for (the batch's first token still sees
     * what its last overwrote); every block a token reads or writes is in its table and in the pool */
    int small[48], *first = small, *last = small + 16, *count = small + 32;
    if (n_caches > 16) {
        first = malloc(3 * sizeof(int) * (size_t)n_caches);
        if (!first) return -1;
        last = first + n_caches;
        count = last + n_caches;
    }
    for (int s = 0; s < n_caches; s++) { first[s] = last[s] = -1; count[s] = 0; }
    int bad = 0, max_ctx = 0, max_ptrs = 2;
    for (int i = 0; i < n && !bad; i++) {
        const int s = b->seq ? b->seq[i] : 0;
        if (s < 0 || s >= n_caches || b->pos[i] < 0 || b->pos[i] >= caches[s].n_ctx ||
            b->tokens[i] < 0 || b->tokens[i] >= d->n_vocab || b->pos[i] <= last[s]) {
            bad = 1;
            break;
        }
        const el_cache *c = &caches[s];
        if (first[s] < 0) first[s] = b->pos[i];
        last[s] = b->pos[i];
        count[s]++;
        if (c->k_swa && (b->pos[i] < c->swa_from || (c->n_ring && c->n_ring < m->max_window + count[s]))) bad = 1;
        if (b->pos[i] + 1 > max_ctx) max_ctx = b->pos[i] + 1;
    }
    for (int s = 0; s < n_caches && !bad; s++) {
        if (count[s] == 0) continue;
        const el_cache *c = &caches[s];
        int b0 = 0, b1 = last[s] / c->block;
        if (b1 >= c->n_table) bad = 1;
        for (int i = b0; i <= b1 && !bad; i++) bad = c->table[i] < 0 || c->table[i] >= c->n_blocks;
        if (b1 + 2 > max_ptrs) max_ptrs = b1 + 2;
        if (!c->k_swa || bad) continue;
        if (c->n_ring) {
            b0 = 0;
            b1 = (2 * c->n_ring - 1) / c->block_swa;
        } else {
            const int lo = first[s] - m->max_window + 1 > c->swa_from ? first[s] - m->max_window + 1 : c->swa_from;
            b0 = (lo > 0 ? lo : 0) / c->block_swa;
            b1 = last[s] / c->block_swa;
        }
        if (b1 >= c->n_table_swa) bad = 1;
        for (int i = b0; i <= b1 && !bad; i++) bad = c->table_swa[i] < 0 || c->table_swa[i] >= c->n_blocks_swa;
        if (b1 - b0 + 2 > max_ptrs) max_ptrs = b1 - b0 + 2;
    }
    if (first != small) free(first);
    if (bad) return -1;
    if (max_ctx > m->scratch_ctx || max_ptrs > m->scratch_ptrs) {   /* grows with the longest context seen */
        const int ctx = (max_ctx + 255) / 256 * 256 > m->scratch_ctx ? (max_ctx + 255) / 256 * 256 : m->scratch_ctx;
        const int ptrs = (max_ptrs + 63) / 64 * 64 > m->scratch_ptrs ? (max_ptrs + 63) / 64 * 64 : m->scratch_ptrs;
        const int rows = ATTN_TILE * (d->n_head / d->n_head_kv);
        const size_t attn = (el_attn_scratch(rows, ctx, d->head_dim) + 15) / 16 * 16;
        const size_t floats = attn + 2 * (size_t)rows * d->head_dim;
        const size_t ptr_at = (floats * sizeof(float) + 63) / 64 * 64;
        const size_t want = (ptr_at + 2 * (size_t)ptrs * sizeof(void *) + (size_t)rows * sizeof(int32_t) + 63) / 64 * 64;
        char *p = realloc(m->scratch, want * el_pool_size(m->pool));
        if (!p) return -1;
        m->scratch = p;
        m->scratch_n = want;
        m->scratch_attn = attn;
        m->scratch_ptr_at = ptr_at;
        m->scratch_ctx = ctx;
        m->scratch_ptrs = ptrs;
    }
    int out_idx_small[64], *out_idx = out_idx_small, n_out = 0;
    if (n > 64) out_idx = malloc((size_t)n * sizeof(int));
    if (!out_idx) return -1;
    if (b->out) {
        for (int i = 0; i < n; i++) if (b->out[i]) out_idx[n_out++] = i;
    } else {
        out_idx[n_out++] = n - 1;
    }
    fwd_ctx c = { m, b, caches, logits, n_out, out_idx, hidden, x_in };
    if (prof_on < 0) prof_on = getenv("EDGELLM_PROFILE") != NULL;
    if (prof_on) prof_t0 = now_s();
    memset(m->stages, 0, sizeof(el_stage) * (size_t)m->n_stages);   /* published by el_pool_run's release */
    el_pool_run(m->pool, forward_task, &c);
    if (out_idx != out_idx_small) free(out_idx);
    return 0;
}
