/* Checks the active ISA's kernel table against the plain-C one (kernels_generic.c), plus the ISA choice itself.
 * Built with every core .c file; runs natively (x86: avx2 vs generic) and under qemu-aarch64 (native/tests/run_arm.sh).
 *
 *   test_neon_extra [--isa NAME] [--expect-isa NAME] [--expect-best NAME] [--expect-unsupported NAME] [--detect-only]
 *
 * The ISA under test is whatever dispatch.c picked, or the one --isa forces (as EDGELLM_ISA would). Tolerances: NMSE <= 5e-4
 * for gemms, <= 1e-7 element-wise, q8a blocks bit-identical; every output buffer ends in sentinels that must
 * survive, and a NaN anywhere fails (comparisons are written so that NaN never passes). Exit status 1 on failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "edgellm.h"
#include "kernels.h"

static int failures, checks;
static double worst_gemm[EL_NTYPES], worst_elem;
static const char *type_names[EL_NTYPES] = { "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                             "Q4_K", "Q5_K", "Q6_K" };
static const int ggml_types[EL_NTYPES] = { EL_F32, EL_F16, EL_BF16, EL_Q4_0, EL_Q4_1, EL_Q5_0, EL_Q5_1, EL_Q8_0,
                                           EL_Q4_K, EL_Q5_K, EL_Q6_K };

/* ------------------------------------------------------------------------------------------ helpers */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_u64(void) {   /* splitmix64 */
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next_u64() >> 40) * (1.0 / 16777216.0)); }
static void fill_uniform(float *x, int n, float lo, float hi) { for (int i = 0; i < n; i++) x[i] = uniform(lo, hi); }

static const uint32_t SENTINEL = 0x7fc0deadu;   /* a NaN with a payload: never a kernel's result */
static void put_sentinels(void *p, size_t n_floats) { for (size_t i = 0; i < n_floats; i++) memcpy((float *)p + i, &SENTINEL, 4); }
static int is_sentinel(const float *p) { return memcmp(p, &SENTINEL, 4) == 0; }

static void check(int ok, const char *what) {
    checks++;
    if (!ok) { failures++; fprintf(stderr, "FAIL: %s\n", what); }
}

static double nmse(const float *got, const float *ref, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        const double d = (double)got[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;   /* NaN stays NaN */
}

/* ------------------------------------------------------------------------------- random weight matrices */
static size_t row_bytes(int ti, int n_in) { return (size_t)(n_in / el_type_block(ti)) * el_type_block_bytes(ti); }

/* valid rows of type ti: random quants, scales in a sane fp16 range; `worst` = largest quants (bound test) */
static void *make_weights(int ti, int n_out, int n_in, int worst) {
    const size_t rb = row_bytes(ti, n_in);
    uint8_t *w = malloc(rb * n_out);
    if (ti <= EL_TI_BF16) {
        for (size_t i = 0; i < (size_t)n_out * n_in; i++) {
            const float v = uniform(-1.0f, 1.0f);
            if (ti == EL_TI_F32) memcpy(w + 4 * i, &v, 4);
            else if (ti == EL_TI_F16) { el_half h = el_float_to_half(v); memcpy(w + 2 * i, &h, 2); }
            else { uint32_t u; memcpy(&u, &v, 4); el_bf16 h = (el_bf16)(u >> 16); memcpy(w + 2 * i, &h, 2); }
        }
        return w;
    }
    const size_t bb = el_type_block_bytes(ti);
    const int n_scales = (ti == EL_TI_Q4_1 || ti == EL_TI_Q5_1) ? 2 : 1;
    for (size_t b = 0; b < rb * n_out / bb; b++) {
        uint8_t *blk = w + b * bb;
        for (size_t j = 0; j < bb; j++) blk[j] = worst ? (ti == EL_TI_Q8_0 ? 0x80 : 0xff) : (uint8_t)next_u64();
        if (ti >= EL_TI_Q4_K) {   /* K-quants: super-block d (and dmin) of a realistic size; sub-block scales as drawn */
            const el_half d = el_float_to_half(uniform(0.0005f, 0.005f)), m = el_float_to_half(uniform(0.0002f, 0.002f));
            memcpy(blk + (ti == EL_TI_Q6_K ? 208 : 0), &d, 2);
            if (ti != EL_TI_Q6_K) memcpy(blk + 2, &m, 2);
            continue;
        }
        for (int s = 0; s < n_scales; s++) {
            const el_half h = el_float_to_half(s == 0 ? uniform(0.001f, 0.05f) : uniform(-0.2f, 0.2f));
            memcpy(blk + 2 * s, &h, 2);
        }
    }
    return w;
}

/* ------------------------------------------------------------------------------------------- gemm tests */
static void test_gemm(const el_kernels *k, const el_kernels *g, int ti, int n_out, int n_in, int n_tok, int worst) {
    char what[160];
    const el_type_kernels *tk = &k->types[ti];
    void *w = make_weights(ti, n_out, n_in, worst);
    /* this ISA's layout, with guard floats after the size el_weight_new allocates */
    const int il = tk->interleave > 0 ? tk->interleave : 1;
    const int n_pad = (n_out + il - 1) / il * il;
    const size_t wbytes = (size_t)n_pad * row_bytes(ti, n_in);
    void *wk = w;
    if (tk->repack) {
        wk = malloc(wbytes + 64);
        put_sentinels((char *)wk + wbytes, 16);
        tk->repack(w, wk, n_out, n_in);
        snprintf(what, sizeof what, "%s repack %dx%d: wrote past n_pad rows", type_names[ti], n_out, n_in);
        int ok = 1;
        for (int i = 0; i < 16; i++) ok &= is_sentinel((float *)((char *)wk + wbytes) + i);
        check(ok, what);
    }
    /* activations: floats, or q8a rows made by the generic quantizer (the quantizer is tested on its own) */
    float *xf = malloc(sizeof(float) * n_tok * n_in);
    fill_uniform(xf, n_tok * n_in, -2.0f, 2.0f);
    if (worst) for (int i = 0; i < n_tok * n_in; i++) xf[i] = (i / n_in) % 2 ? -1.5f : 1.5f;   /* all q = +-127 */
    const size_t xs = tk->act_q8a ? (size_t)(n_in / EL_QK) * sizeof(block_q8a) : (size_t)n_in * 4;
    void *x = xf;
    if (tk->act_q8a) {
        x = malloc(xs * n_tok);
        for (int t = 0; t < n_tok; t++) g->quantize_q8a(xf + (size_t)t * n_in, (block_q8a *)((char *)x + t * xs), n_in);
    }
    const size_t ys = (size_t)n_out + 3;   /* gaps between token rows must stay untouched too */
    const size_t ylen = (size_t)n_tok * ys + 8;
    float *ref = malloc(ylen * 4), *got = malloc(ylen * 4);
    put_sentinels(ref, ylen);
    g->types[ti].gemm(w, n_in, 0, n_out, x, xs, n_tok, ref, ys);

    /* whole range at once, then split as 1..3 threads would (el_split's cuts at multiples of the interleave),
     * then one middle slice alone */
    for (int pass = 0; pass < 5; pass++) {
        put_sentinels(got, ylen);
        int lo = 0, hi = n_out;
        if (pass == 0) {
            tk->gemm(wk, n_in, 0, n_out, x, xs, n_tok, got, ys);
        } else if (pass <= 3) {
            const int nth = pass, units = (n_out + il - 1) / il;
            for (int ith = 0; ith < nth; ith++) {
                const int per = units / nth, extra = units % nth;
                const int u0 = ith * per + (ith < extra ? ith : extra), u1 = u0 + per + (ith < extra);
                const int r0 = u0 * il < n_out ? u0 * il : n_out, r1 = u1 * il < n_out ? u1 * il : n_out;
                if (r0 < r1) tk->gemm(wk, n_in, r0, r1, x, xs, n_tok, got, ys);
            }
        } else {
            if (n_out <= il) continue;
            lo = il;
            hi = n_out - 1 > lo ? n_out - 1 : n_out;
            tk->gemm(wk, n_in, lo, hi, x, xs, n_tok, got, ys);
        }
        double worst_e = 0;
        int ok_sent = 1, ok_val = 1;
        for (int t = 0; t < n_tok; t++) {
            const double e = nmse(got + t * ys + lo, ref + t * ys + lo, hi - lo);
            if (!(e <= 5e-4)) ok_val = 0;
            if (!(e <= worst_e)) worst_e = e;   /* NaN sticks */
        }
        for (size_t i = 0; i < ylen; i++) {
            const int t = (int)(i / ys), r = (int)(i % ys);
            const int inside = t < n_tok && r >= lo && r < hi;
            if (!inside && !is_sentinel(got + i)) ok_sent = 0;
        }
        snprintf(what, sizeof what, "%s gemm n_out=%d n_in=%d n_tok=%d pass=%d%s: NMSE %.3g", type_names[ti], n_out,
                 n_in, n_tok, pass, worst ? " (extreme quants)" : "", worst_e);
        check(ok_val, what);
        snprintf(what, sizeof what, "%s gemm n_out=%d n_in=%d n_tok=%d pass=%d: wrote outside [r0,r1) x n_tok",
                 type_names[ti], n_out, n_in, n_tok, pass);
        check(ok_sent, what);
        if (!(worst_e <= worst_gemm[ti])) worst_gemm[ti] = worst_e;
    }
    if (wk != w) free(wk);
    if (x != xf) free(x);
    free(w); free(xf); free(ref); free(got);
}

/* the public path: el_weight_new (repack into its own buffer) + el_matmul on a thread pool, vs generic */
static void test_matmul(const el_kernels *g, int ti, int n_out, int n_in, int n_tok, el_pool *pool) {
    void *w = make_weights(ti, n_out, n_in, 0);
    float *x = malloc(sizeof(float) * n_tok * n_in), *y = malloc(sizeof(float) * (n_tok * n_out + 4)),
          *ref = malloc(sizeof(float) * n_tok * n_out);
    fill_uniform(x, n_tok * n_in, -1.0f, 1.0f);
    const size_t xs = g->types[ti].act_q8a ? (size_t)(n_in / EL_QK) * sizeof(block_q8a) : (size_t)n_in * 4;
    void *xq = x;
    if (g->types[ti].act_q8a) {
        xq = malloc(xs * n_tok);
        for (int t = 0; t < n_tok; t++) g->quantize_q8a(x + (size_t)t * n_in, (block_q8a *)((char *)xq + t * xs), n_in);
    }
    g->types[ti].gemm(w, n_in, 0, n_out, xq, xs, n_tok, ref, (size_t)n_out);
    put_sentinels(y, (size_t)n_tok * n_out + 4);
    el_weight *ew = el_weight_new(ggml_types[ti], w, n_out, n_in);
    el_matmul(pool, ew, x, n_tok, y);
    el_weight_free(ew);
    const double e = nmse(y, ref, n_tok * n_out);
    int ok = e <= 5e-4;
    for (int i = 0; i < 4; i++) ok &= is_sentinel(y + (size_t)n_tok * n_out + i);
    char what[128];
    snprintf(what, sizeof what, "%s el_matmul %dx%d, %d tokens, %d threads: NMSE %.3g", type_names[ti], n_out, n_in,
             n_tok, el_pool_size(pool), e);
    check(ok, what);
    if (!(e <= worst_gemm[ti])) worst_gemm[ti] = e;
    if (xq != x) free(xq);
    free(w); free(x); free(y); free(ref);
}

/* ------------------------------------------------------------------------------------ quantize_q8a test */
static void test_quantize(const el_kernels *k, const el_kernels *g) {
    const int n = 32 * 67;
    float *x = malloc(sizeof(float) * n);
    fill_uniform(x, n, -3.0f, 3.0f);
    for (int j = 0; j < 32; j++) x[j] = 0.0f;                          /* an all-zero block: d = 0 */
    for (int j = 0; j < 32; j++) x[32 + j] = (float)(j - 16) * 0.5f;   /* exact halves of the step: ties */
    for (int j = 0; j < 32; j++) x[64 + j] = j == 5 ? -1e-30f : 0.0f;  /* a tiny lone value */
    block_q8a *a = malloc(sizeof(block_q8a) * (n / 32 + 1)), *b = malloc(sizeof(block_q8a) * (n / 32 + 1));
    memset(a, 0x5a, sizeof(block_q8a) * (n / 32 + 1));
    memset(b, 0x5a, sizeof(block_q8a) * (n / 32 + 1));
    k->quantize_q8a(x, a, n);
    g->quantize_q8a(x, b, n);
    check(memcmp(a, b, sizeof(block_q8a) * (n / 32 + 1)) == 0, "quantize_q8a: blocks differ from generic (or wrote past n/32)");
    free(x); free(a); free(b);
}

/* ---------------------------------------------------------------------------------- element-wise tests */
static void check_elem(const char *name, int n, const float *got, const float *ref, int n_sent) {
    const double e = nmse(got, ref, n);
    int ok = e <= 1e-7;
    for (int i = 0; i < n_sent; i++) ok &= is_sentinel(got + n + i);
    char what[128];
    snprintf(what, sizeof what, "%s n=%d: NMSE %.3g (or sentinel overwritten)", name, n, e);
    check(ok, what);
    if (!(e <= worst_elem)) worst_elem = e;
}

static void test_elementwise(const el_kernels *k, const el_kernels *g) {
    static const int sizes[] = { 1, 3, 4, 7, 8, 31, 64, 100, 576, 2051 };
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        const int n = sizes[s], S = 8;
        float *a = malloc(4 * (n + S)), *b = malloc(4 * (n + S)), *r = malloc(4 * (n + S)), *o = malloc(4 * (n + S));
        fill_uniform(a, n, -12.0f, 12.0f);   /* wide enough for exp's and gelu's far ends */
        fill_uniform(b, n, -2.0f, 2.0f);
        put_sentinels(o, n + S);
        k->rmsnorm(a, b, o, n, 1e-5f); g->rmsnorm(a, b, r, n, 1e-5f); check_elem("rmsnorm", n, o, r, S);
        put_sentinels(o, n + S);
        k->silu_mul(a, b, o, n); g->silu_mul(a, b, r, n); check_elem("silu_mul", n, o, r, S);
        put_sentinels(o, n + S);
        k->gelu_mul(a, b, o, n); g->gelu_mul(a, b, r, n); check_elem("gelu_mul", n, o, r, S);
        put_sentinels(o, n + S);
        k->add(a, b, o, n); g->add(a, b, r, n); check_elem("add", n, o, r, S);
        put_sentinels(o, n + S);
        memcpy(o, a, 4 * n); memcpy(r, a, 4 * n);
        k->softmax(o, n); g->softmax(r, n); check_elem("softmax", n, o, r, S);
        free(a); free(b); free(r); free(o);
    }
    /* attention: f32, f16 and q8_0 cache rows (K and V of different types too), head sizes on and off the vector
     * path; q8_0 only where head_dim is whole blocks */
    static const int dims[] = { 64, 128, 256, 80, 36 }, kvs[] = { 1, 5, 33, 300 };
    static const int types[][2] = { { EL_F32, EL_F32 }, { EL_F16, EL_F16 }, { EL_Q8_0, EL_Q8_0 }, { EL_Q8_0, EL_F16 } };
    static const char *const tname[] = { "f32", "f16", "q8_0", "q8_0/f16" };
    for (int ti = 0; ti < 4; ti++)
        for (size_t di = 0; di < sizeof dims / sizeof *dims; di++)
            for (size_t ki = 0; ki < sizeof kvs / sizeof *kvs; ki++) {
                const int hd = dims[di], nkv = kvs[ki], S = 8, kt = types[ti][0], vt = types[ti][1];
                if ((kt == EL_Q8_0 || vt == EL_Q8_0) && hd % 32) continue;
                float *q = malloc(4 * hd), *kf = malloc(4 * (size_t)hd * nkv), *vf = malloc(4 * (size_t)hd * nkv);
                fill_uniform(q, hd, -1, 1); fill_uniform(kf, hd * nkv, -1, 1); fill_uniform(vf, hd * nkv, -1, 1);
                const size_t kr = el_kv_row_size(kt, hd), vr = el_kv_row_size(vt, hd);
                char *kc = malloc(kr * nkv), *vc = malloc(vr * nkv);
                for (int j = 0; j < nkv; j++) {
                    el_kv_store_row(kt, kf + (size_t)j * hd, kc + j * kr, hd);
                    el_kv_store_row(vt, vf + (size_t)j * hd, vc + j * vr, hd);
                }
                float *sc = malloc(4 * (nkv + S)), *sr = malloc(4 * nkv), *o = malloc(4 * (hd + S)), *r = malloc(4 * (hd + S));
                put_sentinels(sc, nkv + S);
                put_sentinels(o, hd + S);
                const float scale = 1.0f / sqrtf((float)hd);
                const void *kb[1] = { kc }, *vb[1] = { vc };
                const int32_t nk[1] = { nkv };
                k->attn(q, 1, nk, kb, vb, nkv, 0, kt, vt, hd, scale, sc, o);
                g->attn(q, 1, nk, kb, vb, nkv, 0, kt, vt, hd, scale, sr, r);
                char name[64];
                snprintf(name, sizeof name, "attn_head %s head_dim=%d n_kv=%d", tname[ti], hd, nkv);
                check_elem(name, hd, o, r, S);
                int ok = 1;
                for (int i = 0; i < S; i++) ok &= is_sentinel(sc + nkv + i);
                check(ok, "attn_head: wrote past scratch[n_kv]");
                free(q); free(kf); free(vf); free(kc); free(vc); free(sc); free(sr); free(o); free(r);
            }
}

/* ------------------------------------------------------------------------------------------------ main */
int main(int argc, char **argv) {
    const char *expect_isa = NULL, *expect_best = NULL;
    int detect_only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--expect-isa") && i + 1 < argc) expect_isa = argv[++i];
        else if (!strcmp(argv[i], "--expect-best") && i + 1 < argc) expect_best = argv[++i];
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {   /* force, as EDGELLM_ISA would */
            const char *name = argv[++i];
            char what[96];
            snprintf(what, sizeof what, "el_set_isa(\"%s\") refused", name);
            check(el_set_isa(name) == 0, what);
        }
        else if (!strcmp(argv[i], "--expect-unsupported") && i + 1 < argc) {
            const char *name = argv[++i];
            const char *before = el_isa();
            char what[96];
            snprintf(what, sizeof what, "el_set_isa(\"%s\") accepted on a CPU without it", name);
            check(el_set_isa(name) == -1, what);
            el_set_isa(before);
        } else if (!strcmp(argv[i], "--detect-only")) detect_only = 1;
        else { fprintf(stderr, "usage: %s [--isa NAME] [--expect-isa NAME] [--expect-best NAME] [--expect-unsupported NAME] [--detect-only]\n", argv[0]); return 2; }
    }
    el_init();
    const el_kernels *k = el_k;
    el_kernels gen;
    el_fill_generic(&gen);
    const char *env = getenv("EDGELLM_ISA");
    printf("isa: active %s, best %s (EDGELLM_ISA=%s)\n", el_isa(), el_isa_best(), env ? env : "");
    if (expect_isa) check(strcmp(el_isa(), expect_isa) == 0, "active ISA is not the expected one");
    if (expect_best) check(strcmp(el_isa_best(), expect_best) == 0, "best ISA is not the expected one");
    if (!detect_only) {
        test_quantize(k, &gen);
        static const int outs[] = { 1, 3, 4, 5, 8, 13, 64 }, ins[] = { 32, 64, 256, 1024 }, toks[] = { 1, 2, 3, 4, 5, 7 };
        for (int ti = 0; ti < EL_NTYPES; ti++) {
            for (size_t o = 0; o < sizeof outs / sizeof *outs; o++)
                for (size_t i = 0; i < sizeof ins / sizeof *ins; i++)
                    for (size_t t = 0; t < sizeof toks / sizeof *toks; t++)
                        if ((outs[o] * ins[i] <= 64 * 256 || toks[t] <= 2) && ins[i] % el_type_block(ti) == 0)
                            test_gemm(k, &gen, ti, outs[o], ins[i], toks[t], 0);
            if (ti >= EL_TI_Q4_0) test_gemm(k, &gen, ti, 8, 256, 5, 1);   /* largest |quant| x |activation|: int16 bounds */
            /* uneven shapes through the pool: leftover rows of the last group, 3 threads */
            el_pool *pool = el_pool_new(3);
            test_matmul(&gen, ti, 67, 512, 1, pool);
            test_matmul(&gen, ti, 130, 256, 6, pool);
            el_pool_free(pool);
        }
        test_elementwise(k, &gen);
        printf("worst gemm NMSE vs generic (limit 5e-4):");
        for (int ti = 0; ti < EL_NTYPES; ti++)
            printf(" %s %.2g%s", type_names[ti], worst_gemm[ti], k->types[ti].gemm == gen.types[ti].gemm ? "(generic)" : "");
        printf("\nworst element-wise NMSE (limit 1e-7): %.2g\n", worst_elem);
    }
    printf("%s: %d checks, %d failed (%s)\n", failures ? "FAIL" : "OK", checks, failures, el_isa());
    return failures ? 1 : 0;
}
