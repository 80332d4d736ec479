/* Block layouts of the GGML weight types edgellm's C core reads, declared once with their sizes checked.
 *
 * Layouts are those of the GGUF specification / ggml (ggml-common.h): a row of n elements is n/32 blocks
 * laid end to end, each block holding its scale(s) then packed quants. Plus two kinds of our own:
 *   - block_q8a: the 8-bit activation block every quantized dot product runs against (float scale, so
 *     activations lose nothing to an fp16 scale; `s` carries d*sum(q) for the offset/min terms);
 *   - *_x8: 8 weight rows interleaved block by block, the repacked layout of the AVX2 kernels
 *     (one 32-byte load feeds 8 rows at once; see kernels_avx2.c).
 * K-quants (Q4_K/Q5_K/Q6_K, 256-element super-blocks) run against the same block_q8a activations: a
 * super-block is 8 q8a blocks, and each 32-element sub-block (two 16-element halves for Q6_K) is dotted in
 * integers then scaled by its own 6-bit (8-bit for Q6_K) scale, so no second activation format is needed.
 */
#ifndef EDGELLM_QUANTS_H
#define EDGELLM_QUANTS_H

#include <stdint.h>
#include <assert.h>

typedef uint16_t el_half;  /* IEEE 754 binary16 bits */
typedef uint16_t el_bf16;  /* upper 16 bits of a binary32 */

#define EL_QK 32  /* elements per block of the 32-blocks (Q4_0 .. Q8_0, Q8A) */

/* Q4_0: w = d * (q - 8), q in 0..15.  qs[j]: low nibble = element j, high nibble = element j + 16. */
typedef struct { el_half d; uint8_t qs[EL_QK / 2]; } block_q4_0;
static_assert(sizeof(block_q4_0) == 2 + EL_QK / 2, "block_q4_0 size");

/* Q4_1: w = d * q + m, q in 0..15; nibbles as Q4_0. */
typedef struct { el_half d; el_half m; uint8_t qs[EL_QK / 2]; } block_q4_1;
static_assert(sizeof(block_q4_1) == 4 + EL_QK / 2, "block_q4_1 size");

/* Q5_0: w = d * (q - 16), q in 0..31; low 4 bits as Q4_0, bit 4 of element j = bit j of qh (little-endian u32). */
typedef struct { el_half d; uint8_t qh[4]; uint8_t qs[EL_QK / 2]; } block_q5_0;
static_assert(sizeof(block_q5_0) == 2 + 4 + EL_QK / 2, "block_q5_0 size");

/* Q5_1: w = d * q + m, q in 0..31; bits as Q5_0. */
typedef struct { el_half d; el_half m; uint8_t qh[4]; uint8_t qs[EL_QK / 2]; } block_q5_1;
static_assert(sizeof(block_q5_1) == 4 + 4 + EL_QK / 2, "block_q5_1 size");

/* Q8_0: w = d * q, q in -127..127. */
typedef struct { el_half d; int8_t qs[EL_QK]; } block_q8_0;
static_assert(sizeof(block_q8_0) == 2 + EL_QK, "block_q8_0 size");

/* Activation block: x ~ d * q with q = round(x / d), d = max|x| / 127; s = d * sum(q) (exact in the ints),
 * so Q4_0's "-8" and Q4_1/Q5_1's min term cost one multiply per block instead of a second dot product. */
typedef struct { float d; float s; int8_t qs[EL_QK]; } block_q8a;
static_assert(sizeof(block_q8a) == 8 + EL_QK, "block_q8a size");

/* ---- K-quants: 256-element super-blocks (EL_QK_K) of 8 sub-blocks of 32 ---- */
#define EL_QK_K 256

/* Q4_K: w = d * sc[j] * q - dmin * m[j] for sub-block j, q in 0..15; sc, m 6-bit, packed in `scales`
 * (j < 4: scales[j] & 63, scales[j+4] & 63; j >= 4: low 4 bits in scales[j+4] (sc low nibble, m high nibble),
 * top 2 bits in the spare top bits of scales[j-4] (sc) and scales[j] (m)).
 * qs: 32-byte chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles. */
typedef struct { el_half d; el_half dmin; uint8_t scales[12]; uint8_t qs[EL_QK_K / 2]; } block_q4_k;
static_assert(sizeof(block_q4_k) == 4 + 12 + EL_QK_K / 2, "block_q4_k size");

/* Q5_K: as Q4_K with a 5th bit: bit j of qh[l] is the high bit of element l of sub-block j. */
typedef struct { el_half d; el_half dmin; uint8_t scales[12]; uint8_t qh[EL_QK_K / 8]; uint8_t qs[EL_QK_K / 2]; } block_q5_k;
static_assert(sizeof(block_q5_k) == 4 + 12 + EL_QK_K / 8 + EL_QK_K / 2, "block_q5_k size");

/* Q6_K: w = d * scales[e / 16] * (q - 32), q in 0..63. Per 128-element half h: element 32g + l (g < 4, l < 32)
 * takes its low 4 bits from ql[64h + l + 32 (g & 1)] (low nibble for g < 2, high nibble for g >= 2) and its
 * high 2 bits from bits 2g, 2g+1 of qh[32h + l]. */
typedef struct { uint8_t ql[EL_QK_K / 2]; uint8_t qh[EL_QK_K / 4]; int8_t scales[EL_QK_K / 16]; el_half d; } block_q6_k;
static_assert(sizeof(block_q6_k) == EL_QK_K / 2 + EL_QK_K / 4 + EL_QK_K / 16 + 2, "block_q6_k size");

/* unpack Q4_K/Q5_K's 12 scale bytes into 8 scales and 8 mins */
static inline void el_k4_scales(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 15) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* ---- repacked layouts: 8 rows interleaved (AVX2 kernels) ----
 * Block b of rows r..r+7 of a matrix.  qs is cut in 4-byte groups: group g (elements 4g..4g+3 of the block
 * for Q8_0; bytes 4g..4g+3 of qs, i.e. two element groups per nibble, for Q4) of row i sits at
 * qs[g*32 + i*4 .. +3]: one 32-byte load holds the same 4 columns of all 8 rows, so a broadcast of 4
 * activation bytes and one maddubs give every row's partial dot in its own 32-bit lane (no horizontal sums). */
typedef struct { el_half d[8]; uint8_t qs[8 * EL_QK / 2]; } block_q4_0x8;
static_assert(sizeof(block_q4_0x8) == 8 * sizeof(block_q4_0), "block_q4_0x8 size");

typedef struct { el_half d[8]; el_half m[8]; uint8_t qs[8 * EL_QK / 2]; } block_q4_1x8;
static_assert(sizeof(block_q4_1x8) == 8 * sizeof(block_q4_1), "block_q4_1x8 size");

typedef struct { el_half d[8]; int8_t qs[8 * EL_QK]; } block_q8_0x8;
static_assert(sizeof(block_q8_0x8) == 8 * sizeof(block_q8_0), "block_q8_0x8 size");

/* Q5: qs as Q4_x8, plus hb: byte (row i, b) of hb[i*4 + b] holds in bit g the 5th bit of element 4g+b of row i,
 * so one shift and one mask give group g's high bits for all 8 rows (kernels_avx2.c). Same bytes as 8 blocks. */
typedef struct { el_half d[8]; uint8_t qs[8 * EL_QK / 2]; uint8_t hb[32]; } block_q5_0x8;
static_assert(sizeof(block_q5_0x8) == 8 * sizeof(block_q5_0), "block_q5_0x8 size");

typedef struct { el_half d[8]; el_half m[8]; uint8_t qs[8 * EL_QK / 2]; uint8_t hb[32]; } block_q5_1x8;
static_assert(sizeof(block_q5_1x8) == 8 * sizeof(block_q5_1), "block_q5_1x8 size");

/* K-quants, 8 rows interleaved per super-block (same bytes as 8 GGUF blocks): the quant bytes cut into 4-byte groups
 * as the *_x8 above: byte group g of 32-byte chunk c of row i sits at [c*256 + g*32 + i*4]; scales stay per row. */
typedef struct { el_half d[8]; el_half dmin[8]; uint8_t scales[8][12]; uint8_t qs[8 * EL_QK_K / 2]; } block_q4_kx8;
static_assert(sizeof(block_q4_kx8) == 8 * sizeof(block_q4_k), "block_q4_kx8 size");
typedef struct { el_half d[8]; el_half dmin[8]; uint8_t scales[8][12]; uint8_t qh[8 * EL_QK_K / 8]; uint8_t qs[8 * EL_QK_K / 2]; } block_q5_kx8;
static_assert(sizeof(block_q5_kx8) == 8 * sizeof(block_q5_k), "block_q5_kx8 size");
/* Q6_K: ql's 4 chunks and qh's 2 chunks interleaved as above; scales[k][i] = scale k of row i */
typedef struct { uint8_t ql[8 * EL_QK_K / 2]; uint8_t qh[8 * EL_QK_K / 4]; int8_t scales[16][8]; el_half d[8]; } block_q6_kx8;
static_assert(sizeof(block_q6_kx8) == 8 * sizeof(block_q6_k), "block_q6_kx8 size");

/* ---- scalar conversions (portable; ISA files use their own instructions in hot loops) ---- */
static inline float el_half_to_float(el_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);              /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);      /* normal: rebias 15 -> 127 */
    } else if (man == 0) {
        bits = sign;                                          /* zero */
    } else {                                                  /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    union { uint32_t u; float f; } v = { bits };
    return v.f;
}

static inline el_half el_float_to_half(float f) {
    /* round to nearest even, as numpy's float32 -> float16 and F16C's vcvtps2ph with imm 0 */
    union { float f; uint32_t u; } v = { f };
    uint32_t x = v.u, sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (el_half)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (el_half)(sign | 0x7c00);   /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                   /* below the smallest normal half */
        if (ax < 0x33000000u) return (el_half)sign;           /* < half of the smallest subnormal */
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;                             /* 14 - (e - 127) + 10 - 23 ... => 126 - e */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (el_half)(sign | r);
    }
    uint32_t r = ((ax >> 13) - (112u << 10));
    uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (el_half)(sign | r);
}

static inline float el_bf16_to_float(el_bf16 h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

#endif
