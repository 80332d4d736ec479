/* Standalone check of every ISA's kernels against the plain-C ones (NMSE + sentinels), no Python needed:
 *     make -C native test                       # native build, every ISA this CPU has
 *     make -C native test CC=aarch64-linux-gnu-gcc RUN=qemu-aarch64   # NEON under emulation
 * Matmuls: NMSE <= 5e-4; element-wise: <= 1e-7; a sentinel after every output; NaN never passes. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../edgellm.h"
#include "../kernels.h"

#define SENTINEL (-31337.25f)
#define NSENT 16

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd_u32(void) {   /* xorshift64*: reproducible across platforms */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}
static float rnd_uniform(void) { return (float)(rnd_u32() >> 8) / 16777216.0f; }   /* [0, 1) */
static float rnd_normal(void) {
    const float u = rnd_uniform() + 1e-7f, v = rnd_uniform();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}
static void fill_normal(float *x, int n, float scale) { for (int i = 0; i < n; i++) x[i] = rnd_normal() * scale; }

static float *out_buf(int n) {
    float *b = malloc(sizeof(float) * (size_t)(n + NSENT));
    for (int i = 0; i < n; i++) b[i] = NAN;             /* anything left unwritten fails */
    for (int i = 0; i < NSENT; i++) b[n + i] = SENTINEL;
    return b;
}

static int failures = 0, checks = 0;

static void check(const char *isa, const char *what, const float *out, const float *ref, int n, double tol) {
    double num = 0, den = 0;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        if (!isfinite(out[i])) bad = 1;
        num += ((double)out[i] - ref[i]) * ((double)out[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    for (int i = 0; i < NSENT; i++) if (out[n + i] != SENTINEL) bad = 2;
    const double e = num / (den > 0 ? den : 1);
    checks++;
    if (bad || !(e <= tol)) {
        failures++;
        printf("FAIL %-8s %-28s nmse %.3g (tol %.1g)%s\n", isa, what, e, tol,
               bad == 1 ? " NaN" : bad == 2 ? " stray write past the output" : "");
    }
}

/* random GGUF-layout rows: random quants, realistic fp16 scales */
static void *random_weights(int type, int n_out, int n_in) {
    const size_t row = el_row_size(type, n_in), bytes = row * (size_t)n_out;
    uint8_t *w = malloc(bytes);
    if (type == EL_F32) { fill_normal((float *)w, n_out * n_in, 1.0f); return w; }
    if (type == EL_F16 || type == EL_BF16) {
        for (int i = 0; i < n_out * n_in; i++) {
            const float f = rnd_normal();
            uint32_t u; memcpy(&u, &f, 4);
            ((uint16_t *)w)[i] = type == EL_F16 ? el_float_to_half(f) : (uint16_t)(u >> 16);
        }
        return w;
    }
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)rnd_u32();
    const size_t bsz = el_type_block_bytes(el_type_index(type));
    for (size_t b = 0; b < bytes / bsz; b++) {
        uint8_t *blk = w + b * bsz;
        const el_half d = el_float_to_half((0.002f + 0.018f * rnd_uniform()) * (rnd_u32() & 1 ? 1 : -1));
        memcpy(type == EL_Q6_K ? blk + 208 : blk, &d, 2);
        if (type == EL_Q4_K || type == EL_Q5_K) {   /* dmin: positive, as the quantizer writes it */
            const el_half m = el_float_to_half(0.001f + 0.01f * rnd_uniform());
            memcpy(blk + 2, &m, 2);
        }
        if (type == EL_Q4_1 || type == EL_Q5_1) {
            const el_half m = el_float_to_half(0.2f * rnd_uniform() - 0.1f);
            memcpy(blk + 2, &m, 2);
        }
        if (type == EL_Q8_0)
            for (int j = 2; j < 34; j++) if (blk[j] == 0x80) blk[j] = 0x81;   /* ggml never emits -128 */
    }
    return w;
}

static const int TYPES[] = { EL_F32, EL_F16, EL_BF16, EL_Q4_0, EL_Q4_1, EL_Q5_0, EL_Q5_1, EL_Q8_0, EL_Q4_K, EL_Q5_K, EL_Q6_K };
static const char *const TYPE_NAMES[] = { "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K" };
static int is_kquant(int type) { return type == EL_Q4_K || type == EL_Q5_K || type == EL_Q6_K; }

static void test_matmul(const char *isa, el_pool *pool) {
    static const int shapes[][3] = { { 1, 32, 1 }, { 13, 96, 1 }, { 37, 160, 3 }, { 21, 64, 7 }, { 64, 320, 9 }, { 200, 576, 5 } };
    for (size_t ti = 0; ti < sizeof TYPES / sizeof *TYPES; ti++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            const int type = TYPES[ti], n_out = shapes[s][0], n_tok = shapes[s][2];
            int n_in = shapes[s][1] + (type == EL_F32 || type == EL_F16 || type == EL_BF16 ? 5 : 0);
            if (is_kquant(type)) n_in = (n_in + 255) / 256 * 256;   /* whole super-blocks */
            void *raw = random_weights(type, n_out, n_in);
            float *x = malloc(sizeof(float) * (size_t)n_tok * n_in);
            fill_normal(x, n_tok * n_in, 1.0f);
            el_set_isa("generic");
            el_weight *wg = el_weight_new(type, raw, n_out, n_in);
            float *ref = out_buf(n_tok * n_out);
            el_matmul(pool, wg, x, n_tok, ref);
            el_set_isa(isa);
            el_weight *wi = el_weight_new(type, raw, n_out, n_in);
            float *out = out_buf(n_tok * n_out);
            el_matmul(pool, wi, x, n_tok, out);
            char what[64];
            snprintf(what, sizeof what, "matmul %s %dx%d x%d", TYPE_NAMES[ti], n_out, n_in, n_tok);
            check(isa, what, out, ref, n_tok * n_out, 5e-4);
            /* the generic kernels against the exact float product of the dequantized weights */
            if (strcmp(isa, "generic") != 0 && n_out * n_tok >= 100) {   /* one dot product alone can sit near 0 */
                float *wf = malloc(sizeof(float) * (size_t)n_out * n_in), *exact = out_buf(n_tok * n_out);
                el_set_isa("generic");
                for (int r = 0; r < n_out; r++)
                    el_dequantize_row(type, (const char *)raw + r * el_row_size(type, n_in), wf + (size_t)r * n_in, n_in);
                for (int t = 0; t < n_tok; t++)
                    for (int r = 0; r < n_out; r++) {
                        double acc = 0;
                        for (int k = 0; k < n_in; k++) acc += (double)wf[(size_t)r * n_in + k] * x[(size_t)t * n_in + k];
                        exact[t * n_out + r] = (float)acc;
                    }
                snprintf(what, sizeof what, "matmul %s vs exact", TYPE_NAMES[ti]);
                check("generic", what, ref, exact, n_tok * n_out, 5e-4);
                el_set_isa(isa);
                free(wf); free(exact);
            }
            el_weight_free(wg); el_weight_free(wi);
            free(raw); free(x); free(ref); free(out);
        }
}

static void test_elementwise(const char *isa) {
    static const int sizes[] = { 1, 7, 33, 576, 1541 };
    char what[64];
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        const int n = sizes[s];
        float *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n);
        fill_normal(a, n, 4.0f);
        fill_normal(b, n, 1.0f);
        float *ref = out_buf(n), *out = out_buf(n);
#define PAIR(name, call)                                                   \
        el_set_isa("generic"); { float *y = ref; call; }                 \
        el_set_isa(isa); { float *y = out; call; }                        \
        snprintf(what, sizeof what, "%s n=%d", name, n);                 \
        check(isa, what, out, ref, n, 1e-7);
        PAIR("rmsnorm", el_rmsnorm(a, b, y, n, 1e-5f))
        PAIR("silu_mul", el_silu_mul(a, b, y, n))
        PAIR("gelu_mul", el_gelu_mul(a, b, y, n))
        PAIR("add", el_add(a, b, y, n))
        PAIR("softmax", (memcpy(y, a, sizeof(float) * n), el_softmax(y, n)))
        if (n % 32 == 0) {   /* q8a blocks, compared dequantized */
            PAIR("quantize_q8a", ({
                block_q8a *q = malloc(sizeof(block_q8a) * (n / 32));
                el_quantize_q8a(a, q, n);
                for (int i = 0; i < n; i++) y[i] = q[i / 32].d * q[i / 32].qs[i % 32];
                free(q);
            }))
        }
        free(a); free(b); free(ref); free(out);
    }
    for (size_t ti = 0; ti < sizeof TYPES / sizeof *TYPES; ti++) {
        const int n = is_kquant(TYPES[ti]) ? 512 : 160;
        void *raw = random_weights(TYPES[ti], 1, n);
        float *ref = out_buf(n), *out = out_buf(n);
        el_set_isa("generic"); el_dequantize_row(TYPES[ti], raw, ref, n);
        el_set_isa(isa); el_dequantize_row(TYPES[ti], raw, out, n);
        snprintf(what, sizeof what, "dequantize_row %s", TYPE_NAMES[ti]);
        check(isa, what, out, ref, n, 1e-7);
        free(raw); free(ref); free(out);
    }
    for (int neox = 0; neox < 2; neox++) {
        const int n_head = 3, hd = 64, n = n_head * hd;
        float *x = malloc(sizeof(float) * n), *ref = out_buf(n), *out = out_buf(n);
        fill_normal(x, n, 1.0f);
        memcpy(ref, x, sizeof(float) * n); memcpy(out, x, sizeof(float) * n);
        el_set_isa("generic"); el_rope(ref, n_head, hd, hd, 1234, 10000.0f, neox);
        el_set_isa(isa); el_rope(out, n_head, hd, hd, 1234, 10000.0f, neox);
        check(isa, neox ? "rope neox" : "rope normal", out, ref, n, 1e-7);
        free(x); free(ref); free(out);
    }
    /* attention over cache rows of each type (f32, f16, q8_0), stored as the forward step stores them */
    static const int kv_types[3] = { EL_F32, EL_F16, EL_Q8_0 };
    static const char *const kv_names[3] = { "f32", "f16", "q8_0" };
    static const int attn[][2] = { { 1, 64 }, { 7, 64 }, { 133, 64 }, { 5, 20 }, { 9, 128 }, { 4, 256 } };
    for (size_t s = 0; s < sizeof attn / sizeof *attn; s++)
        for (int ti = 0; ti < 3; ti++) {
            const int n_kv = attn[s][0], hd = attn[s][1], t = kv_types[ti];
            if (t == EL_Q8_0 && hd % 32) continue;
            float *q = malloc(sizeof(float) * hd), *kf = malloc(sizeof(float) * n_kv * hd), *vf = malloc(sizeof(float) * n_kv * hd);
            fill_normal(q, hd, 1.0f); fill_normal(kf, n_kv * hd, 1.0f); fill_normal(vf, n_kv * hd, 1.0f);
            const size_t rb = el_kv_row_size(t, hd);
            char *k = malloc(rb * n_kv), *v = malloc(rb * n_kv);
            for (int j = 0; j < n_kv; j++) { el_kv_store_row(t, kf + (size_t)j * hd, k + j * rb, hd); el_kv_store_row(t, vf + (size_t)j * hd, v + j * rb, hd); }
            const int ns = (int)el_attn_scratch_size(1, n_kv, hd);
            float *sr = out_buf(ns), *so = out_buf(ns), *ref = out_buf(hd), *out = out_buf(hd);
            el_set_isa("generic"); el_attn_head(q, k, t, v, t, n_kv, hd, 0.125f, sr, ref);
            el_set_isa(isa); el_attn_head(q, k, t, v, t, n_kv, hd, 0.125f, so, out);
            snprintf(what, sizeof what, "attn_head %s n_kv=%d hd=%d", kv_names[ti], n_kv, hd);
            check(isa, what, out, ref, hd, 1e-7);
            for (int i = 0; i < NSENT; i++) if (so[ns + i] != SENTINEL) { failures++; printf("FAIL %s attn_head scratch overrun\n", isa); break; }
            free(k); free(v); free(q); free(kf); free(vf); free(sr); free(so); free(ref); free(out);
        }
    /* rows spread over blocks (the paged cache): the same rows in shuffled blocks, starting mid-block, give the
     * contiguous result bit for bit on this ISA, and the generic one within tolerance */
    static const int walks[][3] = { { 1, 1, 64 }, { 70, 64, 64 }, { 133, 16, 64 }, { 9, 4, 20 }, { 65, 64, 128 }, { 100, 32, 256 } };
    for (size_t s = 0; s < sizeof walks / sizeof *walks; s++)
        for (int ti = 0; ti < 3; ti++) {
            const int n_kv = walks[s][0], block = walks[s][1], hd = walks[s][2], t = kv_types[ti];
            if (t == EL_Q8_0 && hd % 32) continue;
            const int off = (int)(rnd_u32() % (uint32_t)block), nb = (off + n_kv + block - 1) / block;
            float *q = malloc(sizeof(float) * hd), *kf = malloc(sizeof(float) * n_kv * hd), *vf = malloc(sizeof(float) * n_kv * hd);
            fill_normal(q, hd, 1.0f); fill_normal(kf, n_kv * hd, 1.0f); fill_normal(vf, n_kv * hd, 1.0f);
            const size_t rb = el_kv_row_size(t, hd);
            char *k = malloc(rb * n_kv), *v = malloc(rb * n_kv), *kp = malloc(rb * nb * block), *vp = malloc(rb * nb * block);
            const void **kb = malloc(sizeof(void *) * nb), **vb = malloc(sizeof(void *) * nb);
            for (int i = 0; i < nb; i++) {   /* table entry i -> pool block nb - 1 - i (reversed order) */
                kb[i] = kp + (size_t)(nb - 1 - i) * block * rb;
                vb[i] = vp + (size_t)(nb - 1 - i) * block * rb;
            }
            for (int j = 0; j < n_kv; j++) {
                el_kv_store_row(t, kf + (size_t)j * hd, k + j * rb, hd);
                el_kv_store_row(t, vf + (size_t)j * hd, v + j * rb, hd);
                const int slot = off + j;
                memcpy((char *)kb[slot / block] + (size_t)(slot % block) * rb, k + j * rb, rb);
                memcpy((char *)vb[slot / block] + (size_t)(slot % block) * rb, v + j * rb, rb);
            }
            const int ns = (int)el_attn_scratch_size(1, n_kv, hd);
            float *sr = out_buf(ns), *so = out_buf(ns), *ref = out_buf(hd), *out = out_buf(hd), *gen = out_buf(hd);
            const int32_t nkv[1] = { n_kv };
            el_set_isa(isa); el_attn_head(q, k, t, v, t, n_kv, hd, 0.125f, sr, ref);
            el_attn_blocks(q, 1, nkv, kb, vb, block, off, t, t, hd, 0.125f, so, out);
            snprintf(what, sizeof what, "attn_blocks %s n_kv=%d block=%d hd=%d (vs contiguous)", kv_names[ti], n_kv, block, hd);
            check(isa, what, out, ref, hd, 0.0);
            for (int i = 0; i < NSENT; i++) if (so[ns + i] != SENTINEL) { failures++; printf("FAIL %s attn_blocks scratch overrun\n", isa); break; }
            el_set_isa("generic"); el_attn_blocks(q, 1, nkv, kb, vb, block, off, t, t, hd, 0.125f, sr, gen);
            el_set_isa(isa);
            snprintf(what, sizeof what, "attn_blocks %s n_kv=%d block=%d hd=%d (vs generic)", kv_names[ti], n_kv, block, hd);
            check(isa, what, out, gen, hd, 1e-7);
            free(k); free(v); free(kp); free(vp); free(kb); free(vb); free(q); free(kf); free(vf);
            free(sr); free(so); free(ref); free(out); free(gen);
        }
}

/* A tiny random llama (2 layers, GQA, head_dim 16 so attention output needs its own quantize stage): the whole
 * forward step on this ISA vs generic (NMSE), and 1 vs 3 threads on this ISA (bit-identical: every output is
 * computed the same way whoever computes it). Prefill of 9 tokens (tiled attention), then 2 decode steps. */
static void run_tiny_model(const char *isa, int n_threads, float *logits /* [11, 64] */) {
    enum { V = 64, E = 64, L = 2, H = 4, HKV = 2, HD = 16, F = 96, CTX = 32 };
    static void *w[L][7], *embd;
    static float norm[L][2][E], onorm[E];
    static int init = 0;
    if (!init) {   /* same weights for every call */
        embd = random_weights(EL_Q8_0, V, E);
        const int types[7] = { EL_Q4_1, EL_Q4_0, EL_Q8_0, EL_Q4_1, EL_Q5_0, EL_Q4_1, EL_Q5_1 };
        const int shape[7][2] = { { H * HD, E }, { HKV * HD, E }, { HKV * HD, E }, { E, H * HD }, { F, E }, { F, E }, { E, F } };
        for (int l = 0; l < L; l++) {
            for (int i = 0; i < 7; i++) w[l][i] = random_weights(types[i], shape[i][0], shape[i][1]);
            for (int i = 0; i < E; i++) { norm[l][0][i] = 1.0f + 0.1f * rnd_normal(); norm[l][1][i] = 1.0f + 0.1f * rnd_normal(); }
        }
        for (int i = 0; i < E; i++) onorm[i] = 1.0f;
        init = 1;
    }
    el_set_isa(isa);
    el_model_desc d = { V, E, L, H, HKV, HD, F, HD, 0, EL_ACT_SILU, 1e-5f, 10000.0f, 16, n_threads };
    el_model *m = el_model_new(&d);
    const int types[7] = { EL_Q4_1, EL_Q4_0, EL_Q8_0, EL_Q4_1, EL_Q5_0, EL_Q4_1, EL_Q5_1 };
    const int slots[7] = { EL_T_WQ, EL_T_WK, EL_T_WV, EL_T_WO, EL_T_FFN_GATE, EL_T_FFN_UP, EL_T_FFN_DOWN };
    const int shape[7][2] = { { H * HD, E }, { HKV * HD, E }, { HKV * HD, E }, { E, H * HD }, { F, E }, { F, E }, { E, F } };
    int bad = el_model_set_tensor(m, EL_T_TOKEN_EMBD, -1, EL_Q8_0, embd, V, E) | el_model_set_tensor(m, EL_T_OUTPUT, -1, EL_Q8_0, embd, V, E)
            | el_model_set_tensor(m, EL_T_OUTPUT_NORM, -1, EL_F32, onorm, 1, E);
    for (int l = 0; l < L; l++) {
        for (int i = 0; i < 7; i++) bad |= el_model_set_tensor(m, slots[i], l, types[i], w[l][i], shape[i][0], shape[i][1]);
        bad |= el_model_set_tensor(m, EL_T_ATTN_NORM, l, EL_F32, norm[l][0], 1, E) | el_model_set_tensor(m, EL_T_FFN_NORM, l, EL_F32, norm[l][1], 1, E);
    }
    el_half *k = calloc((size_t)L * HKV * CTX * HD, 2), *v = calloc((size_t)L * HKV * CTX * HD, 2);
    static const int32_t table[1] = { 0 };   /* a contiguous cache: one block of CTX slots */
    el_cache cache = { .k = k, .v = v, .n_ctx = CTX, .type_k = EL_F16, .type_v = EL_F16,
                       .block = CTX, .n_blocks = 1, .n_table = 1, .table = table };
    const int32_t toks[11] = { 1, 5, 9, 33, 2, 63, 17, 40, 8, 12, 50 };
    int32_t pos[11];
    int8_t out[11];
    for (int i = 0; i < 11; i++) { pos[i] = i; out[i] = 1; }
    el_batch pre = { 9, toks, pos, NULL, out };
    bad |= el_model_forward(m, &pre, &cache, 1, logits);
    for (int i = 9; i < 11; i++) {
        el_batch step = { 1, toks + i, pos + i, NULL, NULL };
        bad |= el_model_forward(m, &step, &cache, 1, logits + i * V);
    }
    if (bad || !el_model_ready(m)) { failures++; printf("FAIL %s tiny model: setup or forward rejected\n", isa); }
    el_model_free(m);
    free(k); free(v);
}

static void test_tiny_model(const char *isa) {
    enum { N = 11 * 64 };
    float *ref = out_buf(N), *out = out_buf(N), *out3 = out_buf(N);
    run_tiny_model("generic", 2, ref);
    run_tiny_model(isa, 2, out);
    run_tiny_model(isa, 3, out3);
    double ss = 0;
    for (int i = 0; i < N; i++) ss += (double)ref[i] * ref[i];
    if (!(ss > 1e-3)) { failures++; printf("FAIL tiny model: logits are all zero (%g)\n", ss); }
    check(isa, "tiny llama forward vs generic", out, ref, N, 1e-3);
    checks++;
    if (memcmp(out, out3, sizeof(float) * N) != 0) { failures++; printf("FAIL %s tiny model: 2 and 3 threads differ\n", isa); }
    free(ref); free(out); free(out3);
}

int main(void) {
    static const char *const isas[] = { "generic", "avx2", "avx512vnni", "amx", "neon", "neon-dotprod" };
    el_pool *pool = el_pool_new(2);
    printf("best ISA here: %s\n", el_isa_best());
    for (size_t i = 0; i < sizeof isas / sizeof *isas; i++) {
        if (el_set_isa(isas[i]) != 0) continue;
        const int before = failures, nchecks = checks;
        test_matmul(isas[i], pool);
        test_elementwise(isas[i]);
        test_tiny_model(isas[i]);
        printf("%-13s %d checks, %d failed\n", isas[i], checks - nchecks, failures - before);
    }
    el_pool_free(pool);
    printf(failures ? "FAILED\n" : "OK\n");
    return failures ? 1 : 0;
}
