/* el_weight's insides, shared by ops.c and forward.c; internal header. */
#ifndef EDGELLM_WEIGHTS_H
#define EDGELLM_WEIGHTS_H
#include "kernels.h"

struct el_weight {
    int type, ti, n_out, n_in;
    int act_q8a;               /* activations it multiplies: q8a blocks or float */
    int unit;                  /* rows interleaved in its layout: split work at multiples of it */
    const void *data;          /* layout of k's gemm: the mmap (borrowed) or `owned` (repacked) */
    void *owned;
    const el_kernels *k;
};

size_t el_act_row_bytes(const el_weight *w);
void el_weight_gemm(const el_weight *w, int r0, int r1, const void *act, size_t act_stride, int n_tok,
                    float *y, size_t y_stride);
void el_rope_table(float *cs, int pos, int rope_dim, float base, float scale);
#endif
