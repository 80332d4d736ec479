// edgellm's GPU kernels: CUDA C compiled at run time by NVRTC (through CuPy), no CUDA headers needed.
//
// Weights are repacked at upload (weights.py) into four formats, every block of 32 elements self-contained:
//   f32 / f16 / bf16   plain rows
//   q4   qs[16] per block (byte i: element i in the low nibble, element i + 16 in the high one) and float2
//        (scale, min) per block: w = scale * q - min          (Q4_0, Q4_1, Q4_K)
//   q5   q4 plus a 32-bit word of fifth bits per block: bit i is the high bit of element i   (Q5_0, Q5_1, Q5_K)
//   q8   qs[32] signed per block and float2 (scale of elements 0..15, of 16..31): w = scale * q   (Q8_0, Q6_K)
// Activations meet the integer formats as q8 blocks: int8 x[32] with float2 (d, s = d * sum(x)), so a block's
// dot product is an exact integer sum (dp4a) scaled once.
//
// Batch invariance: every output element (a row of a matrix for one token, an attention head for one token, a
// normed row) is computed by the same threads in the same order whatever else is in the launch: matrix rows
// split their blocks over the 32 lanes of one warp (lane l takes blocks l, l + 32, ...) and sum the lanes with
// one fixed butterfly; attention walks a token's keys in chunks fixed by its own position; norms reduce with a
// fixed block size. So a token's logits do not depend on the batch it rides in.
//
// HIP: nothing here is CUDA-only except the three conversion helpers (inline PTX) and __dp4a, which have HIP
// equivalents under EL_HIP (untested: no ROCm machine was available).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

#ifdef EL_HIP
__device__ __forceinline__ float h2f(u16 h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ u16 f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }
#define EL_DP4A(a, b, c) __builtin_amdgcn_sdot4((a), (b), (c), false)
#else
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#define EL_DP4A(a, b, c) __dp4a((a), (b), (c))
#endif
__device__ __forceinline__ float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Programmatic dependent launch (sm_90 and later; backend.py launches a graph's kernels with it): a kernel may
// start while the one before it in the stream is finishing. pdl_entry() waits until that kernel has completed and
// its writes are visible, then lets the next kernel start its own prologue; before it a kernel reads nothing but
// weights and writes nothing. A no-op for a normal launch, on older GPUs and under HIP.
#if !defined(EL_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void pdl_entry() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
#else
__device__ __forceinline__ void pdl_entry() {}
#endif

#define WARP 32
#define NEG_INF __int_as_float(0xff800000)
#define TT 8          // tokens per warp pass in the matrix kernels
#define MM_WARPS 4    // warps (rows) per block in the matrix kernels
#define MM_TOKENS 32  // tokens per block in the matrix kernels (grid y)
#define MAX_HD 256    // largest head_dim

enum { F_F32 = 0, F_F16 = 1, F_BF16 = 2, F_Q4 = 3, F_Q5 = 4, F_Q8 = 5 };
enum { KV_F32 = 0, KV_F16 = 1, KV_Q8_0 = 8 };

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ int warp_isum(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ------------------------------------------------------------------------------------------ element access
// One weight element (embedding rows, tests): format f, row r of K elements, column k.
__device__ float w_elem(int f, const void *w, const void *sc, const u32 *qh, long long r, int K, int k) {
    const long long i = r * K + k;
    const int b = k >> 5, e = k & 31;
    const long long blk = r * (K >> 5) + b;
    switch (f) {
    case F_F32: return ((const float *)w)[i];
    case F_F16: return h2f(((const u16 *)w)[i]);
    case F_BF16: return bf2f(((const u16 *)w)[i]);
    case F_Q4:
    case F_Q5: {
        const u8 byte = ((const u8 *)w)[blk * 16 + (e & 15)];
        int q = e < 16 ? (byte & 15) : (byte >> 4);
        if (f == F_Q5) q |= ((qh[blk] >> e) & 1) << 4;
        const float2 sm = ((const float2 *)sc)[blk];
        return sm.x * (float)q - sm.y;
    }
    default: {   // F_Q8
        const float2 s = ((const float2 *)sc)[blk];
        return (e < 16 ? s.x : s.y) * (float)((const i8 *)w)[blk * 32 + e];
    }
    }
}

// ------------------------------------------------------------------------------------------ q8 activations
// Quantize 32 values held one per lane (value v of lane l = element l of the block): writes q[l], and lane 0
// writes (d, d * sum q). Round half away from zero, d = amax / 127 (as the CPU's q8 activations).
__device__ __forceinline__ void warp_quant_block(float v, i8 *q, float2 *ds) {
    const int lane = threadIdx.x & 31;
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const int qi = (int)roundf(v * id);
    q[lane] = (i8)qi;
    const int s = warp_isum(qi);
    if (lane == 0) *ds = make_float2(d, d * (float)s);
}

// ------------------------------------------------------------------------------------------ embedding
// x[t] = row tokens[t] of the embedding matrix (any format) * scale. One block per token.
extern "C" __global__ void embed(int f, const void *w, const void *sc, const u32 *qh, int K,
                                 const int *tokens, float scale, float *x) {
    pdl_entry();
    const int t = blockIdx.x;
    const long long r = tokens[t];
    for (int k = threadIdx.x; k < K; k += blockDim.x) x[(long long)t * K + k] = w_elem(f, w, sc, qh, r, K, k) * scale;
}

// ------------------------------------------------------------------------------------------ norms
// The one reduction every RMSNorm uses (so that a fused and a separate norm give the same bits): lane l sums
// x[l], x[l + 32], ... in order, then one butterfly. Returns 1 / sqrt(mean(x^2) + eps) in every lane.
__device__ __forceinline__ float rms_scale(const float *x, int K, float eps) {
    const int lane = threadIdx.x & 31;
    float ss = 0.0f;
    int k = lane;
    for (; k + 96 < K; k += 128) {   // four loads in flight, summed in the same order
        const float a = x[k], b = x[k + 32], c = x[k + 64], d = x[k + 96];
        ss = __fmaf_rn(a, a, ss); ss = __fmaf_rn(b, b, ss); ss = __fmaf_rn(c, c, ss); ss = __fmaf_rn(d, d, ss);
    }
    for (; k < K; k += 32) ss = __fmaf_rn(x[k], x[k], ss);
    return 1.0f / sqrtf(__fdiv_rn(warp_sum(ss), (float)K) + eps);
}
__device__ __forceinline__ float normed(float x, float r, float w) { return __fmul_rn(__fmul_rn(x, r), w); }

// the gated FFN's activation: h = act(g) * u (no contractions: the fused and separate paths agree bit for bit)
__device__ __forceinline__ float act_mul1(float g, float u, int gelu) {
    float a;
    if (gelu) {   // tanh approximation, as ggml's GELU
        const float c = 0.7978845608028654f;   // sqrt(2 / pi)
        const float inner = __fmul_rn(c, __fadd_rn(g, __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, g), g), g)));
        a = __fmul_rn(__fmul_rn(0.5f, g), __fadd_rn(1.0f, tanhf(inner)));
    } else {
        a = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
    }
    return __fmul_rn(a, u);
}

// For each output row i (token idx ? idx[i] : i), one block (the rows staged in shared memory, 2K floats):
//   if pw: x[t] += rmsnorm(o[t]) * pw          (Gemma 3's post-norms: the sublayer's output, normed, added)
//   y[i] = rmsnorm(x[t]) * w, also as q8 blocks (yq, yds) when K % 32 == 0
// The sums of squares are rms_scale's (warp 0, lane order), the same bits as the norms fused into the matrices.
extern "C" __global__ void add_norm(float *x, const float *o, const float *pw, const float *w, const int *idx,
                                    int rows, int K, float eps, float *y, i8 *yq, float2 *yds) {
    pdl_entry();
    extern __shared__ float nsm[];
    __shared__ float rr[2];
    const int i = blockIdx.x;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (i >= rows) return;
    const long long t = idx ? idx[i] : i;
    float *xt = x + t * K;
    float *xs = nsm, *os = nsm + K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        xs[k] = xt[k];
        if (pw) os[k] = o[t * K + k];
    }
    __syncthreads();
    if (pw) {
        if (wid == 0) {
            const float r = rms_scale(os, K, eps);
            if (lane == 0) rr[0] = r;
        }
        __syncthreads();
        const float r = rr[0];
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const float v = __fadd_rn(xs[k], normed(os[k], r, pw[k]));
            xs[k] = v;
            xt[k] = v;
        }
        __syncthreads();
    }
    if (wid == 0) {
        const float r = rms_scale(xs, K, eps);
        if (lane == 0) rr[1] = r;
    }
    __syncthreads();
    const float r = rr[1];
    float *yi = y + (long long)i * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) yi[k] = normed(xs[k], r, w[k]);
    if (yq == 0 || (K & 31)) return;
    for (int b = wid; b < (K >> 5); b += nw)
        warp_quant_block(normed(xs[b * 32 + lane], r, w[b * 32 + lane]), yq + (long long)i * K + b * 32,
                         yds + (long long)i * (K >> 5) + b);
}

// ------------------------------------------------------------------------------------------ matrices
// y[t, r] (+)= sum_k w[r, k] * x[t, k] for rows r < R, tokens t < T; y row stride ldy; res: added (may be y).
// One warp per row; a warp passes over its block's tokens TT at a time (the row's blocks read once per pass).
//
// Where the activations come from (the same values either way, so fusing never changes a bit):
//   SRC_Q     q8 blocks (xq, xds) / float rows x, written by a norm, the attention or act_mul
//   SRC_NORM  rmsnorm(x[t]) * nw computed here (llama's attention and FFN norms fused into Q/K/V and gate/up)
//   SRC_ACT   act(gu[t, :F]) * gu[t, F:] computed here (the FFN's activation fused into ffn_down; K = F)
enum { SRC_Q = 0, SRC_NORM = 1, SRC_ACT = 2, SRC_PNORM = 3 };

__device__ __forceinline__ void mm_store(float acc, float *y, const float *res, long long at, int lane) {
    acc = warp_sum(acc);
    if (lane == 0) y[at] = res ? __fadd_rn(res[at], acc) : acc;
}

// unpack 16 bytes of nibbles: lo[j] = elements 4j..4j+3, hi[j] = elements 16+4j..16+4j+3, one per byte
__device__ __forceinline__ void unpack4(uint4 v, int *lo, int *hi) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) { lo[j] = (int)(w[j] & 0x0F0F0F0Fu); hi[j] = (int)((w[j] >> 4) & 0x0F0F0F0Fu); }
}
// four fifth-bits (bits 4j..4j+3 of qh) moved to bit 4 of four bytes
__device__ __forceinline__ int fifth(u32 qh, int j) { return (int)(((((qh >> (4 * j)) & 15u) * 0x00204081u) & 0x01010101u) << 4); }

// 32 activation values v[] of one block as q8 (packed 4 per int) and (d, d * sum): what warp_quant_block gives
__device__ __forceinline__ void quant_lane_block(const float *v, int *xi, float2 &ds) {
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < 32; e++) amax = fmaxf(amax, fabsf(v[e]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        u32 word = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int q = (int)roundf(v[4 * j + k] * id);
            sum += q;
            word |= ((u32)(q & 0xff)) << (8 * k);
        }
        xi[j] = (int)word;
    }
    ds = make_float2(d, d * (float)sum);
}

// The activations of token t, block b (32 values) in float, from the source
template <int SRC>
__device__ __forceinline__ void src_block(const float *x, const float *nw, float r, int gelu, int K, long long t, int b,
                                          float *v) {
    if (SRC == SRC_ACT) {
        const float *g = x + t * 2 * K + 32 * b, *u = g + K;
#pragma unroll
        for (int e = 0; e < 32; e++) v[e] = act_mul1(g[e], u[e], gelu);
    } else {
        const float *xt = x + t * K + 32 * b;
#pragma unroll
        for (int e = 0; e < 32; e += 4) {
            const float4 a = *(const float4 *)(xt + e);
            if (SRC == SRC_NORM) {
                const float4 c = *(const float4 *)(nw + 32 * b + e);
                v[e] = normed(a.x, r, c.x); v[e + 1] = normed(a.y, r, c.y);
                v[e + 2] = normed(a.z, r, c.z); v[e + 3] = normed(a.w, r, c.w);
            } else {
                v[e] = a.x; v[e + 1] = a.y; v[e + 2] = a.z; v[e + 3] = a.w;
            }
        }
    }
}

template <int SRC>
__device__ void mm_int_body(int f, const u8 *w, const float2 *sc, const u32 *qh, const i8 *xq, const float2 *xds,
                            const float *x, const float *nw, float eps, int gelu, float *y, const float *res, int R,
                            int K, int T, int ldy) {
    pdl_entry();
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * MM_WARPS + (threadIdx.x >> 5);
    if (r >= R) return;
    const int nb = K >> 5;
    const int t_end = min(T, (int)(blockIdx.y + 1) * MM_TOKENS);
    for (int t0 = blockIdx.y * MM_TOKENS; t0 < t_end; t0 += TT) {
        const int nt = t_end - t0 < TT ? t_end - t0 : TT;
        float acc[TT], rs[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) {
            acc[t] = 0.0f;
            rs[t] = 0.0f;
            if (SRC == SRC_NORM && t < nt) rs[t] = rms_scale(x + (long long)(t0 + t) * K, K, eps);
        }
        for (int b = lane; b < nb; b += WARP) {
            const long long blk = (long long)r * nb + b;
            int lo[4], hi[4];
            float2 s = sc[blk];
            if (f == F_Q8) {
                const uint4 a = ((const uint4 *)(w + blk * 32))[0], c = ((const uint4 *)(w + blk * 32))[1];
                lo[0] = a.x; lo[1] = a.y; lo[2] = a.z; lo[3] = a.w; hi[0] = c.x; hi[1] = c.y; hi[2] = c.z; hi[3] = c.w;
            } else {
                unpack4(((const uint4 *)(w + blk * 16))[0], lo, hi);
                if (f == F_Q5) {
                    const u32 h = qh[blk];
#pragma unroll
                    for (int j = 0; j < 4; j++) { lo[j] |= fifth(h, j); hi[j] |= fifth(h, 4 + j); }
                }
            }
#pragma unroll
            for (int t = 0; t < TT; t++) {
                if (t < nt) {
                    int xi[8];
                    float2 d;
                    if (SRC == SRC_Q) {
                        const long long xb = (long long)(t0 + t) * nb + b;
                        const uint4 a = ((const uint4 *)(xq + xb * 32))[0], c = ((const uint4 *)(xq + xb * 32))[1];
                        xi[0] = a.x; xi[1] = a.y; xi[2] = a.z; xi[3] = a.w; xi[4] = c.x; xi[5] = c.y; xi[6] = c.z; xi[7] = c.w;
                        d = xds[xb];
                    } else {
                        float v[32];
                        src_block<SRC>(x, nw, rs[t], gelu, K, t0 + t, b, v);
                        quant_lane_block(v, xi, d);
                    }
                    int s0 = 0, s1 = 0;
                    s0 = EL_DP4A(lo[0], xi[0], s0); s0 = EL_DP4A(lo[1], xi[1], s0);
                    s0 = EL_DP4A(lo[2], xi[2], s0); s0 = EL_DP4A(lo[3], xi[3], s0);
                    s1 = EL_DP4A(hi[0], xi[4], s1); s1 = EL_DP4A(hi[1], xi[5], s1);
                    s1 = EL_DP4A(hi[2], xi[6], s1); s1 = EL_DP4A(hi[3], xi[7], s1);
                    if (f == F_Q8) {
                        acc[t] = __fmaf_rn(d.x, __fmaf_rn(s.x, (float)s0, __fmul_rn(s.y, (float)s1)), acc[t]);
                    } else {
                        acc[t] = __fmaf_rn(__fmul_rn(s.x, d.x), (float)(s0 + s1), acc[t]);
                        acc[t] = __fmaf_rn(-s.y, d.y, acc[t]);
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < TT; t++)
            if (t < nt) mm_store(acc[t], y, res, (long long)(t0 + t) * ldy + r, lane);
    }
}

// The same arithmetic for long runs of tokens (prefill): a block of MMT_WARPS warps (rows) shares each token
// tile's q8 activations through shared memory, 32 blocks of K at a time. Lane l still takes blocks l, l + 32, ...
// in order and the lanes are summed by the same butterfly, so every output has the bits mm_int gives it.
#define MMT_WARPS 16
#define MMT_TOK 16
extern "C" __global__ void mm_int_tiled(int f, const u8 *w, const float2 *sc, const u32 *qh, const i8 *xq,
                                        const float2 *xds, float *y, const float *res, int R, int K, int T, int ldy) {
    pdl_entry();
    __shared__ uint4 xs[MMT_TOK][32][2];
    __shared__ float2 ds[MMT_TOK][32];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int r = blockIdx.x * MMT_WARPS + wid;
    const int nb = K >> 5;
    const int t0 = blockIdx.y * MMT_TOK;
    const int nt = min(MMT_TOK, T - t0);
    float acc[MMT_TOK];
#pragma unroll
    for (int t = 0; t < MMT_TOK; t++) acc[t] = 0.0f;
    for (int c = 0; c < nb; c += 32) {
        __syncthreads();
        for (int i = threadIdx.x; i < MMT_TOK * 32; i += blockDim.x) {   // the tile's blocks c .. c + 31
            const int t = i >> 5, b = c + (i & 31);
            if (t < nt && b < nb) {
                const long long xb = (long long)(t0 + t) * nb + b;
                xs[t][i & 31][0] = ((const uint4 *)(xq + xb * 32))[0];
                xs[t][i & 31][1] = ((const uint4 *)(xq + xb * 32))[1];
                ds[t][i & 31] = xds[xb];
            }
        }
        __syncthreads();
        const int b = c + lane;
        if (r >= R || b >= nb) continue;
        const long long blk = (long long)r * nb + b;
        int lo[4], hi[4];
        const float2 s = sc[blk];
        if (f == F_Q8) {
            const uint4 a = ((const uint4 *)(w + blk * 32))[0], cc = ((const uint4 *)(w + blk * 32))[1];
            lo[0] = a.x; lo[1] = a.y; lo[2] = a.z; lo[3] = a.w; hi[0] = cc.x; hi[1] = cc.y; hi[2] = cc.z; hi[3] = cc.w;
        } else {
            unpack4(((const uint4 *)(w + blk * 16))[0], lo, hi);
            if (f == F_Q5) {
                const u32 h = qh[blk];
#pragma unroll
                for (int j = 0; j < 4; j++) { lo[j] |= fifth(h, j); hi[j] |= fifth(h, 4 + j); }
            }
        }
#pragma unroll
        for (int t = 0; t < MMT_TOK; t++) {
            if (t < nt) {
                const uint4 a = xs[t][lane][0], cc = xs[t][lane][1];
                const float2 d = ds[t][lane];
                int s0 = 0, s1 = 0;
                s0 = EL_DP4A(lo[0], (int)a.x, s0); s0 = EL_DP4A(lo[1], (int)a.y, s0);
                s0 = EL_DP4A(lo[2], (int)a.z, s0); s0 = EL_DP4A(lo[3], (int)a.w, s0);
                s1 = EL_DP4A(hi[0], (int)cc.x, s1); s1 = EL_DP4A(hi[1], (int)cc.y, s1);
                s1 = EL_DP4A(hi[2], (int)cc.z, s1); s1 = EL_DP4A(hi[3], (int)cc.w, s1);
                if (f == F_Q8) {
                    acc[t] = __fmaf_rn(d.x, __fmaf_rn(s.x, (float)s0, __fmul_rn(s.y, (float)s1)), acc[t]);
                } else {
                    acc[t] = __fmaf_rn(__fmul_rn(s.x, d.x), (float)(s0 + s1), acc[t]);
                    acc[t] = __fmaf_rn(-s.y, d.y, acc[t]);
                }
            }
        }
    }
    if (r >= R) return;
#pragma unroll
    for (int t = 0; t < MMT_TOK; t++)
        if (t < nt) mm_store(acc[t], y, res, (long long)(t0 + t) * ldy + r, lane);
}

// Prefill matrices on the tensor cores. Every (row, token, block) integer dot product is exact whatever computes
// it, so mma.sync (int8, m16n8k32; two m16n8k16 for q8's two half-block scales) gives the same int32 as dp4a; the
// float part then follows the one order of mm_int / mm_dec: slot l (the lane there) chains blocks l, l + 32, ...
// from 0 with the same two FMAs, and the 32 slots are summed as the warp butterfly sums them. Taking the slots in
// bit-reversed order (0, 16, 8, 24, ..) makes that butterfly an ordinary pairwise sum of consecutive values,
// kept in a stack of 5 per output. So a token's outputs have the same bits on this path as alone in a decode.
// Block: 8 warps, MMA_BN = 32 tokens x BM (64 or 32) rows, all of K staged in shared memory at once (weights as
// stored, rows padded so the fragment loads hit distinct banks); a warp takes 16 rows x (BM / 4) tokens.
#define MMA_BN 32

__device__ __forceinline__ void mma_16832(int *c, const u32 *a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(int *c, u32 a0, u32 a1, u32 b0) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}

__host__ __device__ constexpr int rev5(int i) {
    return ((i & 1) << 4) | ((i & 2) << 2) | (i & 4) | ((i & 8) >> 2) | ((i & 16) >> 4);
}

template <int BM>
__device__ void mm_int_mma_body(int f, const u8 *__restrict__ w, const float2 *__restrict__ sc,
                                const u32 *__restrict__ qh, const i8 *xq, const float2 *xds, float *y,
                                const float *res, int R, int K, int T, int ldy) {
    pdl_entry();
    extern __shared__ uint4 msm[];
    const int nb = K >> 5;
    const int wbytes = f == F_Q8 ? 32 : 16;
    const int ws = f == F_Q8 ? nb * 32 + 16 : ((nb & 1) ? nb * 16 : nb * 16 + 16);   // weight row stride (bytes)
    const int xst = nb * 32 + 16;                                                    // token stride (bytes)
    u8 *sw = (u8 *)msm;                              // [BM][ws]
    u8 *sx = sw + BM * ws;                           // [MMA_BN][xst]
    float2 *ssc = (float2 *)(sx + MMA_BN * xst);     // [BM][nb]
    float2 *sds = ssc + BM * nb;                     // [MMA_BN][nb]
    u32 *sqh = (u32 *)(sds + MMA_BN * nb);           // [BM][nb] (q5)
    const int r0 = blockIdx.x * BM, t0 = blockIdx.y * MMA_BN;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const int wq = wbytes / 16;
    for (int i = threadIdx.x; i < BM * nb * wq; i += blockDim.x) {
        const int row = i / (nb * wq), rem = i - row * (nb * wq);
        *(uint4 *)(sw + row * ws + rem * 16) =
            r0 + row < R ? ((const uint4 *)(w + (long long)(r0 + row) * nb * wbytes))[rem] : zero;
    }
    for (int i = threadIdx.x; i < MMA_BN * nb * 2; i += blockDim.x) {
        const int tk = i / (nb * 2), rem = i - tk * (nb * 2);
        *(uint4 *)(sx + tk * xst + rem * 16) = t0 + tk < T ? ((const uint4 *)(xq + (long long)(t0 + tk) * K))[rem] : zero;
    }
    for (int i = threadIdx.x; i < BM * nb; i += blockDim.x) {
        const bool ok = r0 + i / nb < R;
        ssc[i] = ok ? sc[(long long)r0 * nb + i] : make_float2(0.0f, 0.0f);
        if (f == F_Q5) sqh[i] = ok ? qh[(long long)r0 * nb + i] : 0u;
    }
    for (int i = threadIdx.x; i < MMA_BN * nb; i += blockDim.x)
        sds[i] = t0 + i / nb < T ? xds[(long long)t0 * nb + i] : make_float2(0.0f, 0.0f);
    __syncthreads();

    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int NS = BM / 32;                          // 8-token sub-tiles per warp
    const int mr = (wid % (BM / 16)) * 16;           // the warp's rows mr .. mr + 15
    const int nc = (wid / (BM / 16)) * NS * 8;       // its tokens nc .. nc + 8 NS - 1
    // outputs o = 4 j + q: row mr + g (+ 8 if q >= 2), token nc + 8 j + 2 tig + (q & 1)
    float st[5][4 * NS];
#pragma unroll
    for (int i = 0; i < 32; i++) {
        const int l = rev5(i);
        float p[4 * NS];
#pragma unroll
        for (int o = 0; o < 4 * NS; o++) p[o] = 0.0f;
        for (int b = l; b < nb; b += 32) {
            const u8 *wa = sw + (mr + g) * ws + b * wbytes + 4 * tig, *wb8 = wa + 8 * ws;
            u32 a[4];
            if (f == F_Q8) {
                a[0] = *(const u32 *)wa; a[1] = *(const u32 *)wb8; a[2] = *(const u32 *)(wa + 16); a[3] = *(const u32 *)(wb8 + 16);
            } else {
                const u32 x0 = *(const u32 *)wa, x1 = *(const u32 *)wb8;
                a[0] = x0 & 0x0F0F0F0Fu; a[2] = (x0 >> 4) & 0x0F0F0F0Fu;
                a[1] = x1 & 0x0F0F0F0Fu; a[3] = (x1 >> 4) & 0x0F0F0F0Fu;
                if (f == F_Q5) {
                    const u32 h0 = sqh[(mr + g) * nb + b], h1 = sqh[(mr + g + 8) * nb + b];
                    a[0] |= (u32)fifth(h0, tig); a[2] |= (u32)fifth(h0, 4 + tig);
                    a[1] |= (u32)fifth(h1, tig); a[3] |= (u32)fifth(h1, 4 + tig);
                }
            }
            const float2 s0 = ssc[(mr + g) * nb + b], s1 = ssc[(mr + g + 8) * nb + b];
#pragma unroll
            for (int j = 0; j < NS; j++) {
                const u8 *xb = sx + (nc + 8 * j + g) * xst + b * 32 + 4 * tig;
                const u32 b0 = *(const u32 *)xb, b1 = *(const u32 *)(xb + 16);
                const int tk = nc + 8 * j + 2 * tig;
                const float2 d0 = sds[tk * nb + b], d1 = sds[(tk + 1) * nb + b];
                float *pj = p + 4 * j;
                if (f == F_Q8) {
                    int c[4] = {0, 0, 0, 0}, e[4] = {0, 0, 0, 0};
                    mma_16816(c, a[0], a[1], b0);
                    mma_16816(e, a[2], a[3], b1);
                    pj[0] = __fmaf_rn(d0.x, __fmaf_rn(s0.x, (float)c[0], __fmul_rn(s0.y, (float)e[0])), pj[0]);
                    pj[1] = __fmaf_rn(d1.x, __fmaf_rn(s0.x, (float)c[1], __fmul_rn(s0.y, (float)e[1])), pj[1]);
                    pj[2] = __fmaf_rn(d0.x, __fmaf_rn(s1.x, (float)c[2], __fmul_rn(s1.y, (float)e[2])), pj[2]);
                    pj[3] = __fmaf_rn(d1.x, __fmaf_rn(s1.x, (float)c[3], __fmul_rn(s1.y, (float)e[3])), pj[3]);
                } else {
                    int c[4] = {0, 0, 0, 0};
                    mma_16832(c, a, b0, b1);
                    pj[0] = __fmaf_rn(-s0.y, d0.y, __fmaf_rn(__fmul_rn(s0.x, d0.x), (float)c[0], pj[0]));
                    pj[1] = __fmaf_rn(-s0.y, d1.y, __fmaf_rn(__fmul_rn(s0.x, d1.x), (float)c[1], pj[1]));
                    pj[2] = __fmaf_rn(-s1.y, d0.y, __fmaf_rn(__fmul_rn(s1.x, d0.x), (float)c[2], pj[2]));
                    pj[3] = __fmaf_rn(-s1.y, d1.y, __fmaf_rn(__fmul_rn(s1.x, d1.x), (float)c[3], pj[3]));
                }
            }
        }
#pragma unroll
        for (int o = 0; o < 4 * NS; o++) {   // the butterfly as a pairwise sum over the bit-reversed slots
            float v = p[o];
#pragma unroll
            for (int k = 0; k < 5; k++) {
                if ((i >> k) & 1) {
                    v = __fadd_rn(st[k][o], v);
                } else {
                    st[k][o] = v;
                    break;
                }
            }
            if (i == 31) p[o] = v;
        }
        if (i == 31) {
#pragma unroll
            for (int j = 0; j < NS; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    const int r = r0 + mr + g + (q >= 2 ? 8 : 0), t = t0 + nc + 8 * j + 2 * tig + (q & 1);
                    if (r < R && t < T) {
                        const long long at = (long long)t * ldy + r;
                        y[at] = res ? __fadd_rn(res[at], p[4 * j + q]) : p[4 * j + q];
                    }
                }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) mm_int_mma64(int f, const u8 *w, const float2 *sc, const u32 *qh,
        const i8 *xq, const float2 *xds, float *y, const float *res, int R, int K, int T, int ldy) {
    mm_int_mma_body<64>(f, w, sc, qh, xq, xds, y, res, R, K, T, ldy);
}
extern "C" __global__ void __launch_bounds__(256) mm_int_mma32(int f, const u8 *w, const float2 *sc, const u32 *qh,
        const i8 *xq, const float2 *xds, float *y, const float *res, int R, int K, int T, int ldy) {
    mm_int_mma_body<32>(f, w, sc, qh, xq, xds, y, res, R, K, T, ldy);
}

// Decode-sized steps (a few tokens): a block of DEC_WARPS warps prepares its tokens' q8 activations once, in
// shared memory (copied from xq/xds, or the norm / the FFN activation computed here a warp per 32-value block:
// the bits warp_quant_block gives, as add_norm and act_mul would), while the weights of each warp's first rows
// are already on their way. Warps take RU rows at a time (rows r0 .. r0 + RU - 1, then the grid's stride), lane
// l holding blocks l, l + 32, ... (at most NBL of them) of each: every output is summed exactly as mm_int and
// mm_int_tiled sum it (lane l's blocks in order, then the butterfly), so the bits do not depend on the path.
#define DEC_WARPS 8
#define DEC_RU 2

struct WRaw { uint4 a, c; u32 h; float2 s; };

__device__ __forceinline__ void w_load(int f, const u8 *__restrict__ w, const float2 *__restrict__ sc,
                                       const u32 *__restrict__ qh, long long blk, WRaw &o) {
    o.s = sc[blk];
    if (f == F_Q8) {
        const uint4 *p = (const uint4 *)(w + blk * 32);
        o.a = p[0];
        o.c = p[1];
    } else {
        o.a = *(const uint4 *)(w + blk * 16);
        if (f == F_Q5) o.h = qh[blk];
    }
}

// acc + one block's term for one token (the formula of mm_int_body)
__device__ __forceinline__ float blk_term(int f, const int *lo, const int *hi, float2 s, uint4 a, uint4 c, float2 d,
                                          float acc) {
    int s0 = 0, s1 = 0;
    s0 = EL_DP4A(lo[0], (int)a.x, s0); s0 = EL_DP4A(lo[1], (int)a.y, s0);
    s0 = EL_DP4A(lo[2], (int)a.z, s0); s0 = EL_DP4A(lo[3], (int)a.w, s0);
    s1 = EL_DP4A(hi[0], (int)c.x, s1); s1 = EL_DP4A(hi[1], (int)c.y, s1);
    s1 = EL_DP4A(hi[2], (int)c.z, s1); s1 = EL_DP4A(hi[3], (int)c.w, s1);
    if (f == F_Q8) return __fmaf_rn(d.x, __fmaf_rn(s.x, (float)s0, __fmul_rn(s.y, (float)s1)), acc);
    acc = __fmaf_rn(__fmul_rn(s.x, d.x), (float)(s0 + s1), acc);
    return __fmaf_rn(-s.y, d.y, acc);
}

template <int SRC, int NBL, int TTM>
__device__ void mm_dec_body(int f, const u8 *__restrict__ w, const float2 *__restrict__ sc, const u32 *__restrict__ qh,
                            const i8 *xq, const float2 *xds, const float *x, const float *nw, float eps, int gelu,
                            float *y, const float *res, int R, int K, int T, int ldy, int tpc, const float *po,
                            const float *pw, float *xout) {
    extern __shared__ uint4 dsm[];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int nb = K >> 5;
    const int t0 = blockIdx.y * tpc;
    const int nt = min(tpc, T - t0);
    uint4 *xs = dsm;                                  // [nt][nb] blocks of 32 int8 (two uint4 each)
    float *xf = (float *)(xs + 2 * tpc * nb);         // [nt][K] the rows to norm, then [K] nw (SRC_NORM, PNORM)
    float *of = xf + (tpc + 1) * K;                   // [nt][K] the sublayer's output, then [K] pw (SRC_PNORM)
    float2 *ds = (float2 *)(xf + (SRC == SRC_NORM ? (tpc + 1) * K : SRC == SRC_PNORM ? 2 * (tpc + 1) * K : 0));
    float *rsm = (float *)(ds + tpc * nb);            // [tpc] the norm's scale (SRC_NORM)
    const int rstep = gridDim.x * DEC_WARPS * DEC_RU;
    int r0 = (blockIdx.x * DEC_WARPS + wid) * DEC_RU;
    WRaw wr[DEC_RU][NBL];
#pragma unroll
    for (int u = 0; u < DEC_RU; u++)
#pragma unroll
        for (int j = 0; j < NBL; j++) {
            const int b = lane + 32 * j;
            if (r0 + u < R && b < nb) w_load(f, w, sc, qh, (long long)(r0 + u) * nb + b, wr[u][j]);
        }
    pdl_entry();   // the weights' loads are in flight while the kernel before finishes
    // the activations of tokens t0 .. t0 + nt - 1
    if (SRC == SRC_Q) {
        const uint4 *src = (const uint4 *)(xq + (long long)t0 * K);
        for (int i = threadIdx.x; i < 2 * nt * nb; i += blockDim.x) xs[i] = src[i];
        for (int i = threadIdx.x; i < nt * nb; i += blockDim.x) ds[i] = xds[(long long)t0 * nb + i];
    } else {
        if (SRC == SRC_NORM || SRC == SRC_PNORM) {
            const float4 *src = (const float4 *)(x + (long long)t0 * K);
            for (int i = threadIdx.x; i < nt * K / 4; i += blockDim.x) ((float4 *)xf)[i] = src[i];
            for (int i = threadIdx.x; i < K / 4; i += blockDim.x) ((float4 *)(xf + tpc * K))[i] = ((const float4 *)nw)[i];
            if (SRC == SRC_PNORM) {
                const float4 *osrc = (const float4 *)(po + (long long)t0 * K);
                for (int i = threadIdx.x; i < nt * K / 4; i += blockDim.x) ((float4 *)of)[i] = osrc[i];
                for (int i = threadIdx.x; i < K / 4; i += blockDim.x) ((float4 *)(of + tpc * K))[i] = ((const float4 *)pw)[i];
                __syncthreads();
                // add_norm's first half: x += rmsnorm(o) * pw (every block alike; block 0 writes the new rows)
                for (int t = wid; t < nt; t += DEC_WARPS) {
                    const float r = rms_scale(of + t * K, K, eps);
                    if (lane == 0) rsm[t] = r;
                }
                __syncthreads();
                for (int i = threadIdx.x; i < nt * K; i += blockDim.x) {
                    const int t = i / K, k = i - t * K;
                    const float v = __fadd_rn(xf[i], normed(of[i], rsm[t], of[tpc * K + k]));
                    xf[i] = v;
                    if (blockIdx.x == 0) xout[(long long)t0 * K + i] = v;
                }
            }
            __syncthreads();
            for (int t = wid; t < nt; t += DEC_WARPS) {
                const float r = rms_scale(xf + t * K, K, eps);
                if (lane == 0) rsm[t] = r;
            }
            __syncthreads();
        }
        const int ntask = nt * nb;
        for (int i0 = wid; i0 < ntask; i0 += 8 * DEC_WARPS) {   // eight blocks' loads in flight per warp
            float a[8], c[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * DEC_WARPS;
                if (i < ntask) {
                    const long long t = t0 + i / nb;
                    const int k = (i % nb) * 32 + lane;
                    if (SRC == SRC_ACT) { a[u] = x[t * 2 * K + k]; c[u] = x[t * 2 * K + K + k]; }
                    else { a[u] = xf[(i / nb) * K + k]; c[u] = xf[tpc * K + k]; }
                }
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * DEC_WARPS;
                if (i < ntask) {
                    const float v = SRC == SRC_ACT ? act_mul1(a[u], c[u], gelu) : normed(a[u], rsm[i / nb], c[u]);
                    warp_quant_block(v, (i8 *)(xs + 2 * i), ds + i);
                }
            }
        }
    }
    __syncthreads();
    for (; r0 < R; r0 += rstep) {
        float acc[DEC_RU][TTM];
#pragma unroll
        for (int u = 0; u < DEC_RU; u++)
#pragma unroll
            for (int t = 0; t < TTM; t++) acc[u][t] = 0.0f;
#pragma unroll
        for (int j = 0; j < NBL; j++) {
            const int b = lane + 32 * j;
            if (b < nb) {
#pragma unroll
                for (int u = 0; u < DEC_RU; u++) {
                    int lo[4], hi[4];
                    const WRaw &o = wr[u][j];
                    if (f == F_Q8) {
                        lo[0] = o.a.x; lo[1] = o.a.y; lo[2] = o.a.z; lo[3] = o.a.w;
                        hi[0] = o.c.x; hi[1] = o.c.y; hi[2] = o.c.z; hi[3] = o.c.w;
                    } else {
                        unpack4(o.a, lo, hi);
                        if (f == F_Q5) {
#pragma unroll
                            for (int q = 0; q < 4; q++) { lo[q] |= fifth(o.h, q); hi[q] |= fifth(o.h, 4 + q); }
                        }
                    }
#pragma unroll
                    for (int t = 0; t < TTM; t++)
                        if (t < nt) acc[u][t] = blk_term(f, lo, hi, o.s, xs[2 * (t * nb + b)], xs[2 * (t * nb + b) + 1],
                                                         ds[t * nb + b], acc[u][t]);
                }
            }
        }
        const int rn = r0 + rstep;   // the next rows' weights on their way during the sums and stores
#pragma unroll
        for (int u = 0; u < DEC_RU; u++)
#pragma unroll
            for (int j = 0; j < NBL; j++) {
                const int b = lane + 32 * j;
                if (rn + u < R && b < nb) w_load(f, w, sc, qh, (long long)(rn + u) * nb + b, wr[u][j]);
            }
#pragma unroll
        for (int u = 0; u < DEC_RU; u++)
#pragma unroll
            for (int t = 0; t < TTM; t++)
                if (t < nt && r0 + u < R) mm_store(acc[u][t], y, res, (long long)(t0 + t) * ldy + r0 + u, lane);
    }
}

#define DEC_ARGS MM_ARGS, int tpc, const float *po, const float *pw, float *xout
#define DEC_PASS MM_PASS, tpc, po, pw, xout
#define DEC_KERNELS(N, TTM) \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS) mm_dec_##N##_##TTM(DEC_ARGS) { mm_dec_body<SRC_Q, N, TTM>(DEC_PASS); } \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS) mm_dec_norm_##N##_##TTM(DEC_ARGS) { mm_dec_body<SRC_NORM, N, TTM>(DEC_PASS); } \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS) mm_dec_pnorm_##N##_##TTM(DEC_ARGS) { mm_dec_body<SRC_PNORM, N, TTM>(DEC_PASS); } \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS) mm_dec_act_##N##_##TTM(DEC_ARGS) { mm_dec_body<SRC_ACT, N, TTM>(DEC_PASS); }

// float weights (f32 / f16 / bf16) against float activations; lane l takes elements 8l..8l+7 of each 256
template <int SRC>
__device__ void mm_float_body(int f, const void *w, const float *x, const float *nw, float eps, int gelu, float *y,
                              const float *res, int R, int K, int T, int ldy) {
    pdl_entry();
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * MM_WARPS + (threadIdx.x >> 5);
    if (r >= R) return;
    const int t_end = min(T, (int)(blockIdx.y + 1) * MM_TOKENS);
    for (int t0 = blockIdx.y * MM_TOKENS; t0 < t_end; t0 += TT) {
        const int nt = t_end - t0 < TT ? t_end - t0 : TT;
        float acc[TT], rs[TT];
#pragma unroll
        for (int t = 0; t < TT; t++) {
            acc[t] = 0.0f;
            rs[t] = 0.0f;
            if (SRC == SRC_NORM && t < nt) rs[t] = rms_scale(x + (long long)(t0 + t) * K, K, eps);
        }
        for (int k = 8 * lane; k < K; k += 8 * WARP) {
            float wv[8];
            const long long i = (long long)r * K + k;
            if (f == F_F32) {
                const float4 a = ((const float4 *)((const float *)w + i))[0], b = ((const float4 *)((const float *)w + i))[1];
                wv[0] = a.x; wv[1] = a.y; wv[2] = a.z; wv[3] = a.w; wv[4] = b.x; wv[5] = b.y; wv[6] = b.z; wv[7] = b.w;
            } else {
                const uint4 a = ((const uint4 *)((const u16 *)w + i))[0];
                const u32 p[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if (f == F_F16) { wv[2 * j] = h2f((u16)(p[j] & 0xffff)); wv[2 * j + 1] = h2f((u16)(p[j] >> 16)); }
                    else { wv[2 * j] = bf2f((u16)(p[j] & 0xffff)); wv[2 * j + 1] = bf2f((u16)(p[j] >> 16)); }
                }
            }
#pragma unroll
            for (int t = 0; t < TT; t++) {
                if (t < nt) {
                    float xv[8];
                    const long long tt = t0 + t;
                    if (SRC == SRC_ACT) {
                        const float *g = x + tt * 2 * K + k, *u = g + K;
#pragma unroll
                        for (int e = 0; e < 8; e++) xv[e] = act_mul1(g[e], u[e], gelu);
                    } else {
                        const float *xt = x + tt * K + k;
                        const float4 a = ((const float4 *)xt)[0], b = ((const float4 *)xt)[1];
                        xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w; xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
                        if (SRC == SRC_NORM) {
#pragma unroll
                            for (int e = 0; e < 8; e++) xv[e] = normed(xv[e], rs[t], nw[k + e]);
                        }
                    }
                    float s = acc[t];
#pragma unroll
                    for (int e = 0; e < 8; e++) s = __fmaf_rn(wv[e], xv[e], s);
                    acc[t] = s;
                }
            }
        }
#pragma unroll
        for (int t = 0; t < TT; t++)
            if (t < nt) mm_store(acc[t], y, res, (long long)(t0 + t) * ldy + r, lane);
    }
}

// Grid: x over groups of MM_WARPS rows, y over runs of MM_TOKENS tokens. `x`: float rows (SRC_Q with float
// weights), the rows to norm (SRC_NORM, with nw and eps) or gate|up rows (SRC_ACT, with gelu).
#define MM_ARGS int f, const u8 *w, const float2 *sc, const u32 *qh, const i8 *xq, const float2 *xds, \
                const float *x, const float *nw, float eps, int gelu, float *y, const float *res, int R, int K, int T, int ldy
#define MM_PASS f, w, sc, qh, xq, xds, x, nw, eps, gelu, y, res, R, K, T, ldy
#define MMF_PASS f, w, x, nw, eps, gelu, y, res, R, K, T, ldy
DEC_KERNELS(1, 1)
DEC_KERNELS(2, 1)
DEC_KERNELS(4, 1)
DEC_KERNELS(1, 8)
DEC_KERNELS(2, 8)
DEC_KERNELS(4, 8)
extern "C" __global__ void mm_int(MM_ARGS) { mm_int_body<SRC_Q>(MM_PASS); }
extern "C" __global__ void mm_int_norm(MM_ARGS) { mm_int_body<SRC_NORM>(MM_PASS); }
extern "C" __global__ void mm_int_act(MM_ARGS) { mm_int_body<SRC_ACT>(MM_PASS); }
extern "C" __global__ void mm_float(MM_ARGS) { mm_float_body<SRC_Q>(MMF_PASS); }
extern "C" __global__ void mm_float_norm(MM_ARGS) { mm_float_body<SRC_NORM>(MMF_PASS); }
extern "C" __global__ void mm_float_act(MM_ARGS) { mm_float_body<SRC_ACT>(MMF_PASS); }

// ------------------------------------------------------------------------------------------ gated FFN
// h[t, i] = act(g[t, i]) * u[t, i] with g = gu[t, i], u = gu[t, F + i] (gu row stride 2F), and h's q8 blocks.
// One warp per 32-element block of one token.
extern "C" __global__ void act_mul(const float *gu, int F, int T, int gelu, float *h, i8 *hq, float2 *hds) {
    pdl_entry();
    const int lane = threadIdx.x & 31;
    const long long wi = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int nb = F >> 5;
    if (wi >= (long long)T * nb) return;
    const long long t = wi / nb;
    const int i = (int)(wi % nb) * 32 + lane;
    const float v = act_mul1(gu[t * 2 * F + i], gu[t * 2 * F + F + i], gelu);
    h[t * F + i] = v;
    if (hq) warp_quant_block(v, hq + t * F + i - lane, hds + t * nb + i / 32);
}

// ------------------------------------------------------------------------------------------ RoPE and the cache

// One head row of hd values held by a warp (v[i] = element lane + 32 i) into a cache row of `type` (when dst is
// not NULL); v becomes what a reader of that row gets back (kv_dims' arithmetic), so the fused decode attention
// can use the current position's row without reading it.
template <int ND>
__device__ __forceinline__ void warp_store_row(int type, float *v, u8 *dst) {
    const int lane = threadIdx.x & 31;
    if (type == KV_F16) {
#pragma unroll
        for (int i = 0; i < ND; i++) {
            const u16 hv = f2h(v[i]);
            if (dst) ((u16 *)dst)[lane + 32 * i] = hv;
            v[i] = h2f(hv);
        }
    } else if (type == KV_F32) {
        if (dst) {
#pragma unroll
            for (int i = 0; i < ND; i++) ((float *)dst)[lane + 32 * i] = v[i];
        }
    } else {   // q8_0: per 32 values, half d then 32 int8 (34 bytes); ggml's rounding (roundf)
#pragma unroll
        for (int i = 0; i < ND; i++) {
            const float d = warp_max(fabsf(v[i])) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            const int q = (int)roundf(v[i] * id);
            const u16 dh = f2h(d);
            if (dst) {
                u8 *o = dst + i * 34;
                ((i8 *)o)[2 + lane] = (i8)q;
                if (lane == 0) *(u16 *)o = dh;   // 34-byte blocks: the half is 2-byte aligned
            }
            v[i] = h2f(dh) * (float)(i8)q;
        }
    }
}

// cos / sin of theta_i = pos * pscale * base^(-2i / rope_dim), i < rope_dim / 2, in double as the CPU core
__device__ __forceinline__ void rope_table(float *cs, int p, float pscale, float base, int rope_dim) {
    for (int i = threadIdx.x; i < rope_dim / 2; i += blockDim.x) {
        const double th = (double)p * (double)pscale * pow((double)base, -2.0 * i / rope_dim);
        cs[2 * i] = (float)cos(th);
        cs[2 * i + 1] = (float)sin(th);
    }
}

// One q or k head held by a warp (v[i] = element lane + 32 i): per-head RMSNorm (nw not NULL: Gemma 3), then RoPE
// (pairs (j, j + rope_dim / 2) when neox, else (2j, 2j + 1)), in place; sh: hd floats of the warp's scratch.
template <int ND>
__device__ __forceinline__ void head_norm_rope(float *v, int rope_dim, int neox, const float *cs, const float *nw,
                                               float eps, float *sh) {
    const int lane = threadIdx.x & 31, half = rope_dim / 2;
    if (nw) {
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < ND; i++) ss = __fmaf_rn(v[i], v[i], ss);
        const float r = 1.0f / sqrtf(__fdiv_rn(warp_sum(ss), (float)(32 * ND)) + eps);
#pragma unroll
        for (int i = 0; i < ND; i++) v[i] = __fmul_rn(__fmul_rn(v[i], r), nw[lane + 32 * i]);
    }
#pragma unroll
    for (int i = 0; i < ND; i++) sh[lane + 32 * i] = v[i];
    __syncwarp();
#pragma unroll
    for (int i = 0; i < ND; i++) {
        const int e = lane + 32 * i;
        if (e < rope_dim) {
            int a, b, j;
            if (neox) { j = e % half; a = j; b = j + half; }
            else { j = e / 2; a = 2 * j; b = 2 * j + 1; }
            const float c = cs[2 * j], sn = cs[2 * j + 1];
            v[i] = e == a ? __fsub_rn(__fmul_rn(sh[a], c), __fmul_rn(sh[b], sn))
                          : __fadd_rn(__fmul_rn(sh[a], sn), __fmul_rn(sh[b], c));
        }
    }
    __syncwarp();
}

#define RS_MAX_WARPS 16

// For token t (one block, a warp per head): per-head RMSNorm of q and k (qn, kn non-NULL: Gemma 3), RoPE of q and
// k (q written back), then k and v into the cache slot of (seq[t], pos[t]). qkv: [T, ldq] with the n_head q heads,
// then the n_head_kv k heads, then the v heads. Each warp's first head is loaded before the angles are computed.
template <int ND>
__device__ void rope_store_body(float *qkv, int ldq, int n_head, int n_head_kv, int rope_dim, int neox, float base,
                                float pscale, const float *qn, const float *kn, float eps, const int *pos,
                                const int *seq, u8 *kc, u8 *vc, const int *table, int n_table, int krow, int vrow,
                                int type_k, int type_v, float *cs, float *shm) {
    const int hd = 32 * ND;
    const int t = blockIdx.x, p = pos[t];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float *q = qkv + (long long)t * ldq;
    const int nh = n_head + 2 * n_head_kv;
    float v[ND];
    if (w < nh) {
#pragma unroll
        for (int i = 0; i < ND; i++) v[i] = q[w * hd + lane + 32 * i];
    }
    rope_table(cs, p, pscale, base, rope_dim);
    __syncthreads();
    const int s = seq[t];
    const long long blk = table[(long long)s * n_table + p / 64], slot = p % 64;
    for (int h = w; h < nh; h += nw) {
        float *x = q + h * hd;   // q heads, k heads, v heads lie one after the other
        const int is_v = h >= n_head + n_head_kv, is_k = !is_v && h >= n_head;
        if (h != w) {
#pragma unroll
            for (int i = 0; i < ND; i++) v[i] = x[lane + 32 * i];
        }
        if (!is_v) {
            head_norm_rope<ND>(v, rope_dim, neox, cs, is_k ? kn : qn, eps, shm + w * hd);
#pragma unroll
            for (int i = 0; i < ND; i++) x[lane + 32 * i] = v[i];
        }
        if (is_k) warp_store_row<ND>(type_k, v, kc + ((blk * n_head_kv + (h - n_head)) * 64 + slot) * krow);
        if (is_v) warp_store_row<ND>(type_v, v, vc + ((blk * n_head_kv + (h - n_head - n_head_kv)) * 64 + slot) * vrow);
    }
}

extern "C" __global__ void rope_store(float *qkv, int ldq, int n_head, int n_head_kv, int hd, int rope_dim, int neox,
                                      float base, float pscale, const float *qn, const float *kn, float eps,
                                      const int *pos, const int *seq, u8 *kc, u8 *vc, const int *table, int n_table,
                                      int krow, int vrow, int type_k, int type_v) {
    pdl_entry();
    __shared__ float cs[MAX_HD];
    __shared__ float sh[RS_MAX_WARPS * MAX_HD];
#define RS_CASE(N) case N: rope_store_body<N>(qkv, ldq, n_head, n_head_kv, rope_dim, neox, base, pscale, qn, kn, eps, \
                                              pos, seq, kc, vc, table, n_table, krow, vrow, type_k, type_v, cs, sh); break;
    switch (hd / 32) {
        RS_CASE(1) RS_CASE(2) RS_CASE(3) RS_CASE(4) RS_CASE(5) RS_CASE(6) RS_CASE(7) RS_CASE(8)
    }
#undef RS_CASE
}

// ------------------------------------------------------------------------------------------ attention
// warps per (token, head): warp w takes key chunks w, w + AW, ... (32 positions each); wide heads take 8 (their
// chunks are 4x the loads of a 64-wide head's), the host launches 32 * AW threads (backend.py's attn_warps)
#ifndef EL_ATT_WIDE
#define EL_ATT_WIDE 1
#endif
#define AW (EL_ATT_WIDE && ND >= 8 ? 8 : 4)

// Dims lane * ND .. lane * ND + ND - 1 of a cache row (16-, 8- or 4-byte loads where they are aligned)
template <int ND>
__device__ __forceinline__ void kv_dims(int type, const u8 *row, int lane, float *v) {
    if (type == KV_F16) {
        const u16 *p = (const u16 *)row + lane * ND;
        if (ND == 8) {
            const uint4 a = *(const uint4 *)p;
            const u32 w4[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int j = 0; j < 4; j++) { v[2 * j] = h2f((u16)(w4[j] & 0xffff)); v[2 * j + 1] = h2f((u16)(w4[j] >> 16)); }
        } else if (ND == 4) {
            const uint2 a = *(const uint2 *)p;
            v[0] = h2f((u16)(a.x & 0xffff)); v[1] = h2f((u16)(a.x >> 16));
            v[2] = h2f((u16)(a.y & 0xffff)); v[3] = h2f((u16)(a.y >> 16));
        } else if (ND == 2) {
            const u32 a = *(const u32 *)p;
            v[0] = h2f((u16)(a & 0xffff)); v[1] = h2f((u16)(a >> 16));
        } else {
#pragma unroll
            for (int e = 0; e < ND; e++) v[e] = h2f(p[e]);
        }
    } else if (type == KV_F32) {
        const float *p = (const float *)row + lane * ND;
        if (ND % 4 == 0) {
#pragma unroll
            for (int e = 0; e < ND; e += 4) {
                const float4 a = *(const float4 *)(p + e);
                v[e] = a.x; v[e + 1] = a.y; v[e + 2] = a.z; v[e + 3] = a.w;
            }
        } else {
#pragma unroll
            for (int e = 0; e < ND; e++) v[e] = p[e];
        }
    } else {   // q8_0: 34-byte blocks (half d, 32 int8)
#pragma unroll
        for (int e = 0; e < ND; e++) {
            const int i = lane * ND + e;
            const u8 *o = row + (i >> 5) * 34;
            v[e] = h2f(*(const u16 *)o) * (float)((const i8 *)o)[2 + (i & 31)];
        }
    }
}

// One step of the transposing butterfly: of the 2 * OFF values a lane holds, it keeps the half named by its bit
// OFF and adds the partner's copy of that half (so after OFF = 16, 8, 4, 2, 1 lane j holds the sum for key j).
template <int OFF>
__device__ __forceinline__ void key_butterfly(float *sc, int lane) {
    const bool up = (lane & OFF) != 0;
#pragma unroll
    for (int i = 0; i < OFF; i++) {
        const float send = up ? sc[i] : sc[i + OFF];
        const float keep = up ? sc[i + OFF] : sc[i];
        sc[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
}

// out[t, h*hd ..] = softmax(scale * q.K) V over the keys token t sees in this layer: positions
// [first, pos[t]] of its sequence, first = max(pos - window + 1, 0) on window layers (and >= swa_from of the
// sequence in the window group). One block of AW warps per (token, query head); keys in chunks of 32 positions
// aligned to multiples of 32 (a chunk lies in one cache block), chunk c to warp c % AW. In a chunk, lane l holds
// dims l*ND .. l*ND + ND - 1 (ND = hd / 32) of q, of the output and of every key and value row it reads (rows
// read whole by the warp); the 32 keys' partial dot products are summed across lanes by one fixed transposing
// butterfly that leaves key j's score in lane j. Warps merged in a fixed order. The same kernel and the same
// order for every step, whatever the batch. Also writes the q8 blocks of out (oq, ods) when oq != NULL.
//
// FUSED (steps where every sequence has one token, decode): rope_store's work is done here first (its functions,
// so the same bits): warp 0 norms and rotates the q head, warp 1 the k head, warp 2 rounds the v head as the cache
// stores it; the block of the group's first query head writes the k and v rows. The current position's key and
// value then come from shared memory (every block of the group computes them alike), the rest from the cache.
template <int ND, int FUSED>
__device__ void attention_body(const float *qkv, int ldq, int n_head, int n_head_kv, int hd, float scale,
                               const int *pos, const int *seq, const int *swa_from, const u8 *kc, const u8 *vc,
                               const int *table, int n_table, int krow, int vrow, int window, int group,
                               int type_k, int type_v, float *out, i8 *oq, float2 *ods, int rope_dim, int neox,
                               float base, float pscale, const float *qn, const float *kn, float eps) {
    pdl_entry();
    __shared__ float wm[AW], wl[AW];
    __shared__ float wo[AW][32 * ND];
    __shared__ float hs[FUSED ? 3 : 1][32 * ND];   // this token's q, k, v heads (FUSED)
    __shared__ float cs[FUSED ? 32 * ND : 1];
    const int t = blockIdx.x / n_head, h = blockIdx.x % n_head;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kvh = h / (n_head / n_head_kv);
    const int p = pos[t], s = seq[t];
    int first = window ? max(p - window + 1, 0) : 0;
    if (group) first = max(first, swa_from[s]);
    float qv[ND], o[ND], hk[ND], hv[ND];   // hk, hv: this lane's dims of the current position's k and v (FUSED)
    if (FUSED) {
        const float *row = qkv + (long long)t * ldq;
        float v[ND];
        if (w < 3) {
            const int col = w == 0 ? h * hd : w == 1 ? (n_head + kvh) * hd : (n_head + n_head_kv + kvh) * hd;
#pragma unroll
            for (int i = 0; i < ND; i++) v[i] = row[col + lane + 32 * i];
        }
        rope_table(cs, p, pscale, base, rope_dim);
        __syncthreads();
        if (w < 3) {
            if (w < 2) head_norm_rope<ND>(v, rope_dim, neox, cs, w == 0 ? qn : kn, eps, wo[w]);
            if (w > 0) {
                u8 *dst = 0;
                if (h % (n_head / n_head_kv) == 0) {
                    const long long blk = table[(long long)s * n_table + p / 64];
                    const long long at = (blk * n_head_kv + kvh) * 64 + p % 64;
                    dst = w == 1 ? (u8 *)kc + at * krow : (u8 *)vc + at * vrow;
                }
                warp_store_row<ND>(w == 1 ? type_k : type_v, v, dst);
            }
#pragma unroll
            for (int i = 0; i < ND; i++) hs[w][lane + 32 * i] = v[i];
        }
        __syncthreads();
#pragma unroll
        for (int e = 0; e < ND; e++) {
            qv[e] = hs[0][lane * ND + e];
            hk[e] = hs[1][lane * ND + e];
            hv[e] = hs[2][lane * ND + e];
            o[e] = 0.0f;
        }
    } else {
        const float *q = qkv + (long long)t * ldq + h * hd + lane * ND;
#pragma unroll
        for (int e = 0; e < ND; e++) { qv[e] = q[e]; o[e] = 0.0f; }
    }
    float m = NEG_INF, l = 0.0f;
    const int *tab = table + (long long)s * n_table;
    const int KG = ND >= 8 ? 4 : 8;                          // key rows in flight
    const int VG = ND <= 2 ? 16 : ND <= 4 ? 8 : 4;           // value rows in flight
    for (int c = first / 32 + w; c <= p / 32; c += AW) {
        const int kp0 = 32 * c;
        const long long blk = tab[kp0 / 64];
        const long long row0 = (blk * n_head_kv + kvh) * 64 + (kp0 % 64);
        const u8 *kb = kc + row0 * krow, *vb = vc + row0 * vrow;
        const int jlo = max(first - kp0, 0), jhi = min(p - kp0, 31);   // keys of this chunk the token sees
        const int jp = FUSED && c == p / 32 ? p - kp0 : -1;            // the current position's row (FUSED)
        float sc[32];
#pragma unroll
        for (int g = 0; g < 32 / KG; g++) {   // KG key rows at a time (rows outside jlo..jhi: masked below)
            float kr[KG][ND];
            if (KG * g <= jhi && KG * g + KG - 1 >= jlo) {
#pragma unroll
                for (int u = 0; u < KG; u++) kv_dims<ND>(type_k, kb + (long long)(KG * g + u) * krow, lane, kr[u]);
                if (FUSED) {   // after the loads (all in flight together): the current row from registers
#pragma unroll
                    for (int u = 0; u < KG; u++)
#pragma unroll
                        for (int e = 0; e < ND; e++) kr[u][e] = KG * g + u == jp ? hk[e] : kr[u][e];
                }
            } else {
#pragma unroll
                for (int u = 0; u < KG; u++)
#pragma unroll
                    for (int e = 0; e < ND; e++) kr[u][e] = 0.0f;
            }
#pragma unroll
            for (int u = 0; u < KG; u++) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < ND; e++) a = fmaf(qv[e], kr[u][e], a);
                sc[KG * g + u] = a;
            }
        }
        key_butterfly<16>(sc, lane);   // lanes keep the half of the keys their bit 16, 8, .. names
        key_butterfly<8>(sc, lane);
        key_butterfly<4>(sc, lane);
        key_butterfly<2>(sc, lane);
        key_butterfly<1>(sc, lane);
        const int ok = lane >= jlo && lane <= jhi;
        const float sj = ok ? scale * sc[0] : NEG_INF;
        const float mn = fmaxf(m, warp_max(sj));
        const float e = ok ? expf(sj - mn) : 0.0f;
        const float corr = expf(m - mn);   // m = -inf at first: 0
        l = l * corr + warp_sum(e);
#pragma unroll
        for (int i = 0; i < ND; i++) o[i] *= corr;
        for (int j0 = jlo; j0 <= jhi; j0 += VG) {
            float vv[VG][ND];
#pragma unroll
            for (int u = 0; u < VG; u++) kv_dims<ND>(type_v, vb + (long long)min(j0 + u, jhi) * vrow, lane, vv[u]);
            if (FUSED) {
#pragma unroll
                for (int u = 0; u < VG; u++)
#pragma unroll
                    for (int e = 0; e < ND; e++) vv[u][e] = min(j0 + u, jhi) == jp ? hv[e] : vv[u][e];
            }
#pragma unroll
            for (int u = 0; u < VG; u++) {
                const float pj = __shfl_sync(0xffffffffu, e, min(j0 + u, 31));
                if (j0 + u <= jhi) {
#pragma unroll
                    for (int i = 0; i < ND; i++) o[i] = fmaf(pj, vv[u][i], o[i]);
                }
            }
        }
        m = mn;
    }
    // merge the warps in a fixed order
    if (lane == 0) { wm[w] = m; wl[w] = l; }
#pragma unroll
    for (int i = 0; i < ND; i++) wo[w][lane * ND + i] = o[i];
    __syncthreads();
    if (w != 0) return;
    float M = NEG_INF;
#pragma unroll
    for (int j = 0; j < AW; j++) M = fmaxf(M, wm[j]);
    float Lsum = 0.0f;
    float acc[ND];
#pragma unroll
    for (int i = 0; i < ND; i++) acc[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < AW; j++) {
        const float f = wm[j] == NEG_INF ? 0.0f : expf(wm[j] - M);
        Lsum += wl[j] * f;
#pragma unroll
        for (int i = 0; i < ND; i++) acc[i] = fmaf(wo[j][lane + 32 * i], f, acc[i]);
    }
    const float inv = 1.0f / Lsum;
    float *ot = out + (long long)t * n_head * hd + h * hd;
#pragma unroll
    for (int i = 0; i < ND; i++) {
        const float v = acc[i] * inv;
        ot[lane + 32 * i] = v;
        if (oq) {
            const long long at = (long long)t * n_head * hd + h * hd + 32 * i;
            warp_quant_block(v, oq + at, ods + at / 32);
        }
    }
}

#define ATT_ARGS const float *qkv, int ldq, int n_head, int n_head_kv, int hd, float scale, const int *pos, \
                 const int *seq, const int *swa_from, const u8 *kc, const u8 *vc, const int *table, int n_table, \
                 int krow, int vrow, int window, int group, int type_k, int type_v, float *out, i8 *oq, float2 *ods
#define ATT_PASS qkv, ldq, n_head, n_head_kv, hd, scale, pos, seq, swa_from, kc, vc, table, n_table, krow, vrow, \
                 window, group, type_k, type_v, out, oq, ods
#define ATT_KERNEL(N, BOUNDS) \
    extern "C" __global__ void BOUNDS attention##N(ATT_ARGS) { attention_body<N, 0>(ATT_PASS, 0, 0, 0.0f, 0.0f, 0, 0, 0.0f); } \
    extern "C" __global__ void BOUNDS attention_rope##N(ATT_ARGS, int rope_dim, int neox, float base, float pscale, \
                                                        const float *qn, const float *kn, float eps) { \
        attention_body<N, 1>(ATT_PASS, rope_dim, neox, base, pscale, qn, kn, eps); \
    }
#define NO_BOUNDS
ATT_KERNEL(1, NO_BOUNDS) ATT_KERNEL(2, NO_BOUNDS) ATT_KERNEL(3, NO_BOUNDS) ATT_KERNEL(4, NO_BOUNDS)
ATT_KERNEL(5, NO_BOUNDS) ATT_KERNEL(6, NO_BOUNDS) ATT_KERNEL(7, NO_BOUNDS)
#if EL_ATT_WIDE
ATT_KERNEL(8, __launch_bounds__(256, 2))   // 8 warps: at most 128 registers, two blocks a multiprocessor
#else
ATT_KERNEL(8, NO_BOUNDS)
#endif

// ------------------------------------------------------------------------------------------ tests and tools
// y[r, k] = w[r, k] as float (the repacked formats read back)
extern "C" __global__ void dequant(int f, const void *w, const void *sc, const u32 *qh, int R, int K, float *y) {
    pdl_entry();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)R * K) return;
    y[i] = w_elem(f, w, sc, qh, i / K, K, (int)(i % K));
}

// q8 blocks of x [T, K] (a standalone pass; the norms and the attention fuse it)
extern "C" __global__ void quant_q8(const float *x, int n_blocks, i8 *q, float2 *ds) {
    pdl_entry();
    const long long b = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= n_blocks) return;
    warp_quant_block(x[b * 32 + (threadIdx.x & 31)], q + b * 32, ds + b);
}

// ------------------------------------------------------------------------------------------ tensor parallelism
// The ranks' partial sums of a block half, gathered as parts[r * n + i] (rank r's element i), added in rank order,
// the same on every rank and for every batch: y[i] = (accumulate ? y[i] : 0) + ((parts[0] + parts[1]) + ...)
extern "C" __global__ void reduce_parts(float *y, const float *parts, long long n, int nparts, int accumulate) {
    pdl_entry();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = parts[i];
    for (int r = 1; r < nparts; r++) s = __fadd_rn(s, parts[r * n + i]);
    y[i] = accumulate ? __fadd_rn(y[i], s) : s;
}
