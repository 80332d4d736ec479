/* Persistent worker threads; internal header. The caller is thread 0: el_pool_run runs fn on every thread and
 * returns when all are done; inside fn, stages (claim chunks, then el_stage_complete) order the work: a forward
 * step is one run with a few stages per layer, not one run per op. */
#ifndef EDGELLM_THREADPOOL_H
#define EDGELLM_THREADPOOL_H
#include "edgellm.h"

typedef void (*el_task_fn)(void *ctx, int ith, int nth);
void el_pool_run(el_pool *pool, el_task_fn fn, void *ctx);

/* One stage of a step: chunks are claimed with `next`; `done` counts finished chunks (cache-line sized so that
 * neighbouring stages do not share a line). */
#include <stdatomic.h>
typedef struct {
    _Alignas(64) atomic_int next;
    atomic_int done;
    atomic_int sleepers;
} el_stage;
/* add n_done to *done, then wait (spin, then sleep) until it reaches total; wakes sleepers when it does */
void el_stage_complete(atomic_int *done, atomic_int *sleepers, int n_done, int total);

/* [*r0, *r1): this thread's share of n items, cut at multiples of unit (the last share takes the remainder) */
static inline void el_split(int n, int unit, int ith, int nth, int *r0, int *r1) {
    const int units = (n + unit - 1) / unit, per = units / nth, extra = units % nth;
    const int u0 = ith * per + (ith < extra ? ith : extra), u1 = u0 + per + (ith < extra);
    *r0 = u0 * unit < n ? u0 * unit : n;
    *r1 = u1 * unit < n ? u1 * unit : n;
}
#endif
