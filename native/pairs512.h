/* Two neighbouring 8-row groups of the *_x8 layouts (quants.h) side by side in one 512-bit vector: the 16-row
 * kernels of kernels_vnni.c (one-token GEMV) and kernels_amx.c (panels) share these. Include after a
 * `#pragma GCC target` with avx512f/avx512bw/f16c (static inline functions only). */
#ifndef EDGELLM_PAIRS512_H
#define EDGELLM_PAIRS512_H
#include <immintrin.h>
#include <stdint.h>

/* 32 bytes of each group */
static inline __attribute__((always_inline)) __m512i el_pair256(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

/* 8 halves of each group -> 16 floats */
static inline __attribute__((always_inline)) __m512 el_halves16(const uint8_t *a, const uint8_t *b) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                   _mm_loadu_si128((const __m128i *)b), 1));
}

/* bit g of each byte of hb -> 0x10 (Q5's fifth bit, as kernels_vnni.c's q5_high) */
static inline __attribute__((always_inline)) __m512i el_q5_high512(__m512i hb, int g) {
    const __m512i m = _mm512_set1_epi8(0x10);
    return g <= 4 ? _mm512_and_si512(_mm512_sll_epi16(hb, _mm_cvtsi32_si128(4 - g)), m)
                  : _mm512_and_si512(_mm512_srl_epi16(hb, _mm_cvtsi32_si128(g - 4)), m);
}
#endif
