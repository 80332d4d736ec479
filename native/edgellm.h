/* edgellm's C core: the one public header.
 *
 * The part between the CFFI-BEGIN / CFFI-END markers is read verbatim by cffi's cdef (build_native.py), so it
 * holds plain declarations only: no macros, no includes, no inline code. Everything else a kernel needs lives in
 * quants.h (block layouts) and kernels.h (the per-ISA dispatch table).
 *
 * Memory: Python owns the KV cache and the weights' mmap; C owns its scratch (allocated once in el_model_new)
 * and the repacked copies of the weights it chose to repack. Sizes are validated by the Python wrapper
 * (edgellm/backends/native.py) before any call; C trusts them.
 */
#ifndef EDGELLM_H
#define EDGELLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CFFI-BEGIN */
/* weight / tensor types: the GGML type ids (quant/__init__.py GGMLType) */
enum el_type {
    EL_F32 = 0, EL_F16 = 1, EL_Q4_0 = 2, EL_Q4_1 = 3, EL_Q5_0 = 6, EL_Q5_1 = 7, EL_Q8_0 = 8,
    EL_Q4_K = 12, EL_Q5_K = 13, EL_Q6_K = 14, EL_BF16 = 30
};

/* which tensor of a llama-style model el_model_set_tensor receives */
enum el_tensor {
    EL_T_TOKEN_EMBD = 0, EL_T_OUTPUT_NORM = 1, EL_T_OUTPUT = 2,
    EL_T_ATTN_NORM = 3, EL_T_WQ = 4, EL_T_WK = 5, EL_T_WV = 6, EL_T_WO = 7,
    EL_T_FFN_NORM = 8, EL_T_FFN_GATE = 9, EL_T_FFN_UP = 10, EL_T_FFN_DOWN = 11,
    /* Gemma 3 (and Qwen3's Q/K norms): per-head RMSNorm of Q and K ([head_dim]), RMSNorm of the attention / FFN
     * outputs ([n_embd]) */
    EL_T_ATTN_Q_NORM = 12, EL_T_ATTN_K_NORM = 13, EL_T_POST_ATTN_NORM = 14, EL_T_POST_FFN_NORM = 15,
    /* Qwen2: biases of the Q, K, V projections (F32 [n_head * head_dim], [n_head_kv * head_dim] x2), added before
     * the Q/K norms and RoPE; a layer has all three or none */
    EL_T_ATTN_Q_BIAS = 16, EL_T_ATTN_K_BIAS = 17, EL_T_ATTN_V_BIAS = 18
};

enum el_act { EL_ACT_SILU = 0, EL_ACT_GELU = 1 };

typedef struct el_pool el_pool;       /* persistent worker threads */
typedef struct el_weight el_weight;   /* a matrix [n_out, n_in], repacked for the active ISA when that pays */
typedef struct el_model el_model;

typedef struct el_model_desc {
    int n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff;
    int rope_dim;          /* rotated dimensions per head (<= head_dim) */
    int rope_neox;         /* 0: rotate (x[2i], x[2i+1]); 1: rotate (x[i], x[i + rope_dim/2]) */
    int act;               /* enum el_act: gate activation of the gated FFN */
    float rms_eps, rope_base;
    int n_batch;           /* most tokens one el_model_forward call may carry */
    int n_threads;
    /* Architecture options; all zero / NULL is llama. Per-layer arrays are copied by el_model_new. */
    float embd_scale;              /* token embeddings times this (0: 1) */
    float attn_scale;              /* Q.K scale (0: 1/sqrt(head_dim)) */
    int qk_norm;                   /* 1: EL_T_ATTN_Q_NORM / EL_T_ATTN_K_NORM are applied per head before RoPE */
    int post_norms;                /* 1: EL_T_POST_ATTN_NORM / EL_T_POST_FFN_NORM before each residual add */
    const float *layer_rope_base;  /* [n_layer] or NULL (rope_base everywhere) */
    const float *layer_rope_scale; /* [n_layer] position multiplier, or NULL (1) */
    const int32_t *layer_window;   /* [n_layer] sliding window (query at p sees (p - window, p]), 0 = global; NULL: all global */
} el_model_desc;

/* One sequence's KV cache: block tables into K/V memory owned by Python. Rows of head_dim elements of type_k /
 * type_v (EL_F16, EL_F32 or EL_Q8_0; el_kv_row_size bytes each).
 * Two layer groups. Group 0 holds the full-context layers (and every layer when k_swa is NULL):
 *     k, v: [n_full, n_blocks, n_head_kv, block, row]
 * block b of a layer holds, per kv head, `block` contiguous rows. Slot s (= position) is row s % block of block
 * table[s / block] (0 <= table[i] < n_blocks; a negative entry is a block the sequence does not hold).
 * Group 1 holds the sliding-window layers (desc.layer_window > 0) when k_swa is set, laid out the same way with
 * its own block, n_blocks_swa, table_swa, n_table_swa. Layers count in their own group, in layer order.
 * The paged cache (edgellm/kv/paged.py): block = 64 in both groups, one table entry per 64 positions, window
 * layers dropping the blocks no window sees any more. A contiguous cache (edgellm/kv_cache.py) is one block of
 * n_ctx slots (table {0}); its window layers a mirrored ring: n_ring > 0 puts position p in slot p % n_ring and
 * writes it again at slot p % n_ring + n_ring (one block of 2 * n_ring rows), so every window is a contiguous run.
 * swa_from: group 1 holds no position below it (a context shift dropped them). */
typedef struct el_cache {
    void *k;
    void *v;
    void *k_swa;
    void *v_swa;
    int type_k, type_v;
    int n_ctx;                 /* positions < n_ctx */
    int block, n_blocks, n_table;
    const int32_t *table;
    int block_swa, n_blocks_swa, n_table_swa;
    const int32_t *table_swa;
    int n_ring;
    int swa_from;
} el_cache;

/* A batch: token i goes to cache seq[i] at position pos[i] and attends over positions [0, pos[i]] of that cache
 * (its layer's window of them, on sliding-window layers).
 * Tokens of one sequence appear in strictly increasing position order (el_model_forward rejects the batch
 * otherwise). Logits are written, in batch order, for the
 * tokens with out[i] != 0 (out may be NULL: last token only; no flag set: no logits, e.g. a prompt chunk). */
typedef struct el_batch {
    int n_tokens;
    const int32_t *tokens;
    const int32_t *pos;
    const int32_t *seq;
    const int8_t *out;
} el_batch;

/* ---- instruction sets ---- */
const char *el_isa(void);                    /* active: "generic", "avx2", "avx512vnni", "neon", "neon-dotprod" */
int el_isa_available(const char *name);      /* 1 when this CPU can run it */
const char *el_isa_best(void);               /* best this CPU supports */
int el_set_isa(const char *name);            /* 0, or -1 if unknown / unsupported here */

/* ---- thread pool ---- */
enum { EL_MAX_THREADS = 512 };               /* more are refused by the Python side, capped here */
el_pool *el_pool_new(int n_threads);
void el_pool_free(el_pool *pool);
int el_pool_size(const el_pool *pool);
/* The process's one shared pool: the first holder's n_threads sets its size (later ones share it as it is); freed
 * when the last holder releases it. Every model (el_model_new) and the quantizer use it; runs from several threads
 * take turns. */
el_pool *el_pool_acquire(int n_threads);
void el_pool_release(el_pool *pool);

/* ---- weights and matmul ---- */
/* data: n_out rows of n_in elements in the GGUF layout; kept by pointer unless repacked (then copied). */
el_weight *el_weight_new(int type, const void *data, int n_out, int n_in);
/* the same; with release set, a repacked weight gives the source's pages back as it copies them (MADV_DONTNEED:
 * only for a file mapping, or memory nothing reads again) */
el_weight *el_weight_new_release(int type, const void *data, int n_out, int n_in, int release);
void el_weight_free(el_weight *w);
int el_weight_repacked(const el_weight *w);
/* 1 when the active ISA repacks matrices of this GGUF type into a copy of its own (the GGUF bytes are then not read
 * after loading: the caller may give their pages back), 0 when it reads them in place */
int el_type_repacked(int type);
/* y[t, r] = sum_k x[t, k] * w[r, k]   for t < n_tok, r < n_out (float x and y, row-major) */
void el_matmul(el_pool *pool, const el_weight *w, const float *x, int n_tok, float *y);

/* ---- single ops on the active ISA (tests and tools; the forward step calls them internally) ---- */
size_t el_row_size(int type, int n);                       /* bytes of a row of n elements in GGUF layout */
void el_quantize_q8a(const float *x, void *y, int n);      /* n % 32 == 0; y: n/32 blocks of 40 bytes */
void el_dequantize_row(int type, const void *x, float *y, int n);
void el_rmsnorm(const float *x, const float *w, float *y, int n, float eps);
void el_rope(float *x, int n_head, int head_dim, int rope_dim, int pos, float base, int neox);
void el_softmax(float *x, int n);
void el_silu_mul(const float *g, const float *u, float *y, int n);
void el_gelu_mul(const float *g, const float *u, float *y, int n);
void el_add(const float *a, const float *b, float *y, int n);
void el_to_f16(const float *x, uint16_t *y, int n);          /* round to nearest even, as numpy */
/* one query head over n_kv cached rows of one kv head: k, v are [>= n_kv] rows of k_type / v_type;
 * scratch: el_attn_scratch_size(1, n_kv, head_dim) floats */
int el_attn_head(const float *q, const void *k, int k_type, const void *v, int v_type, int n_kv, int head_dim,
                 float scale, float *scratch, float *out);   /* 0, or -1 on a bad type / size (nothing read) */
/* n_q query rows [n_q, head_dim] over rows spread over blocks, as the forward step reads the cache: walk row j is
 * row (off + j) % block of block kb[(off + j) / block] (V: vb); query row i attends walk rows [0, n_kv[i]) */
size_t el_attn_scratch_size(int n_q, int max_kv, int head_dim);   /* floats */
int el_attn_blocks(const float *q, int n_q, const int32_t *n_kv, const void *const *kb, const void *const *vb, int block,
                   int off, int k_type, int v_type, int head_dim, float scale, float *scratch, float *out);
size_t el_kv_row_size(int type, int head_dim);               /* bytes of one cached K/V row */
void el_kv_store_row(int type, const float *x, void *dst, int head_dim);   /* as the forward step stores K/V */

/* ---- the whole forward step ---- */
el_model *el_model_new(const el_model_desc *desc);
void el_model_free(el_model *m);
/* layer = -1 for the global tensors; returns 0, or -1 when type/shape does not fit the slot. EL_T_OUTPUT may have
 * fewer rows than n_vocab (a subset of the vocabulary, chosen and mapped back by the caller: a draft model's head);
 * logits rows are then that many wide (n_logits below). */
int el_model_set_tensor(el_model *m, int which, int layer, int type, const void *data, int n_out, int n_in);
/* the next el_model_set_tensor calls give a repacked matrix's source pages back as they copy it (1), or not (0) */
void el_model_release_sources(el_model *m, int on);
/* the token embeddings' rows read with pread from fd (the model file; the model owns and closes it) at offset +
 * token * row bytes, instead of touching the borrowed mapping: a fault there can map a whole large page-cache folio
 * (MiBs) into the process for one row. -1 where this system has no pread; 0 on success. */
int el_model_set_embd_file(el_model *m, int fd, int64_t offset);
int el_model_ready(const el_model *m);      /* 1 when every tensor is set */
/* 1 when the tensors a stage of a pipeline needs are set: every layer's, the token embeddings if embd (the first
 * stage), output_norm and output if output (the last stage) */
int el_model_stage_ready(const el_model *m, int embd, int output);
int el_model_n_threads(const el_model *m);  /* threads of the (shared) pool it runs on */
/* mlock every byte the forward step reads of the weights (repacked copies, and the caller's mmap where borrowed):
 * 0, or -errno (ENOMEM / EPERM past RLIMIT_MEMLOCK) */
int el_model_lock(const el_model *m);
/* logits: [number of output tokens, n_logits] (n_logits: EL_T_OUTPUT's rows, n_vocab unless a subset was set);
 * returns 0, or -1 on a bad batch */
int el_model_forward(el_model *m, const el_batch *batch, const el_cache *caches, int n_caches, float *logits);
/* the same step, writing the final-normed hidden states [number of output tokens, n_embd] (embeddings) instead
 * of logits */
int el_model_forward_hidden(el_model *m, const el_batch *batch, const el_cache *caches, int n_caches, float *hidden);
/* the same step through the model's layers only, writing every token's residual stream [n_tokens, n_embd]: a model
 * holding the first layers of a bigger one (the rest on a GPU) */
int el_model_forward_residual(el_model *m, const el_batch *batch, const el_cache *caches, int n_caches, float *x);
/* one stage of a pipeline: the model holds a contiguous range of a bigger model's layers (renumbered from 0, their
 * own KV caches). x_in: the residual stream [n_tokens, n_embd] the stage before wrote, or NULL to start from the
 * token embeddings (the first stage). out: logits [number of output tokens, n_vocab] when the model has its output
 * tensors (the last stage; hidden: the final-normed hidden states [number of output tokens, n_embd] instead), else
 * every token's residual stream [n_tokens, n_embd] after its layers. Bit for bit the numbers of one model running
 * every layer. */
int el_model_forward_stage(el_model *m, const el_batch *batch, const el_cache *caches, int n_caches,
                           const float *x_in, float *out, int hidden);
/* ---- quantization (quantize.c) ---- */
/* Whole tensors of n_rows rows of n_per_row elements, on pool's threads (NULL: the calling thread only). Types:
 * EL_F32, EL_F16, EL_BF16, EL_Q4_0, EL_Q4_1, EL_Q5_0, EL_Q5_1, EL_Q8_0, EL_Q4_K, EL_Q5_K, EL_Q6_K; n_per_row a
 * multiple of the types' blocks. Each returns the bytes written to dst, 0 on bad arguments (unknown type, NULL
 * buffer, n_rows or n_per_row < 1, a row that is not whole blocks). The encoders are those of quant/reference.py
 * (gguf.quants' bytes for F16/BF16 and the 32-element types; ggml's searches for the K-quants). */
size_t el_quantize_rows(el_pool *pool, int type, const float *src, void *dst, int n_rows, int n_per_row);
size_t el_dequantize_rows(el_pool *pool, int type, const void *src, float *dst, int n_rows, int n_per_row);
/* src_type -> dst_type without a float copy of the tensor (decoded a few thousand elements at a time) */
size_t el_requantize_rows(el_pool *pool, int src_type, const void *src, int dst_type, void *dst,
                          int n_rows, int n_per_row);
/* several tensors in one run of the pool (one wake-up and one wait for all: small tensors cost no barrier each);
 * returns the bytes written by all, 0 (and nothing written) when any job is bad or n_jobs < 1 */
typedef struct {
    int src_type;
    const void *src;
    int dst_type;
    void *dst;
    int n_rows;
    int n_per_row;
} el_quant_job;
size_t el_requantize_batch(el_pool *pool, const el_quant_job *jobs, int n_jobs);
/* CFFI-END */

#ifdef __cplusplus
}
#endif

#endif
