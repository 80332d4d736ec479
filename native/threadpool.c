/* The thread pool: workers spin a short while between jobs (a decode step follows the previous one within
 * microseconds of Python work), then sleep on a condition variable so an idle runtime costs no CPU. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include "threadpool.h"
#include <unistd.h>
#include <sys/types.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
/* sleep while *addr == val / wake everyone sleeping on addr (process-private futex) */
static void futex_wait(atomic_int *addr, int val) { syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0); }
static void futex_wake(atomic_int *addr) { syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0); }
#else
static void futex_wait(atomic_int *addr, int val) { (void)addr; (void)val; sched_yield(); }
static void futex_wake(atomic_int *addr) { (void)addr; }
#endif

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* Spin budgets, in time (a pause lasts 10 to 140 cycles depending on the core, so counts mean nothing):
 * - idle workers between steps spin 2 ms: a decode step follows the previous one after the driver's sampling
 *   (tens to hundreds of microseconds), and a futex wake-up would add its latency to every token;
 * - a thread waiting for a stage to complete spins 200 us: longer, the others were preempted (shared machines)
 *   or hold a big prefill chunk, and sleeping hands the core back. */
#define SPIN_IDLE_NS 2000000L
#define SPIN_WAIT_NS 200000L

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* true while the spin that started at *t0 (0: not yet) is within budget; reads the clock every 64 calls */
static inline int keep_spinning(int *spins, long *t0, long budget_ns) {
    if ((++*spins & 63) != 0) return 1;
    const long t = now_ns();
    if (*t0 == 0) *t0 = t;
    return t - *t0 < budget_ns;
}

struct el_pool {
    int n;
    pid_t pid;             /* the process that owns the workers: a forked child has none */
    pthread_t *threads;
    el_task_fn fn;
    void *ctx;
    atomic_int job;        /* generation of the current job */
    atomic_int done;       /* workers finished with it */
    atomic_int done_sleeper;
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t run_mu;   /* one run at a time: callers on several threads (two models) take turns */
    int refs;                 /* holders of the shared pool (el_pool_acquire) */
};

/* The process's pool (el_pool_acquire / el_pool_release): every model loaded in a process shares one set of
 * worker threads, so a draft model beside its target, or two models served at once, never oversubscribe the
 * cores. */
static el_pool *shared_pool;
static pthread_mutex_t shared_mu = PTHREAD_MUTEX_INITIALIZER;

typedef struct { el_pool *p; int ith; } worker_arg;

static void *worker(void *arg_) {
    worker_arg *arg = arg_;
    el_pool *p = arg->p;
    const int ith = arg->ith;
    free(arg);
    int seen = 0;
    for (;;) {
        int spins = 0;
        long t0 = 0;
        while (atomic_load_explicit(&p->job, memory_order_acquire) == seen && !atomic_load(&p->stop)) {
            if (keep_spinning(&spins, &t0, SPIN_IDLE_NS)) { cpu_relax(); continue; }
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->job) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        seen = atomic_load_explicit(&p->job, memory_order_acquire);
        p->fn(p->ctx, ith, p->n);
        if (atomic_fetch_add_explicit(&p->done, 1, memory_order_seq_cst) == p->n - 2 &&
            atomic_load_explicit(&p->done_sleeper, memory_order_seq_cst))
            futex_wake(&p->done);
    }
    return NULL;
}

el_pool *el_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > EL_MAX_THREADS) n_threads = EL_MAX_THREADS;   /* Python refuses more with a clear error */
    el_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads;
    p->pid = getpid();
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    pthread_mutex_init(&p->run_mu, NULL);
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) n_threads = p->n = 1;   /* no room for the table: the calling thread alone */
    for (int i = 1; i < n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) { p->n = i; break; }
        a->p = p;
        a->ith = i;
        if (pthread_create(&p->threads[i], NULL, worker, a) != 0) {  /* run with fewer threads */
            free(a);
            p->n = i;
            break;
        }
    }
    return p;
}

void el_pool_free(el_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->run_mu);
    free(p->threads);
    free(p);
}

el_pool *el_pool_acquire(int n_threads) {
    pthread_mutex_lock(&shared_mu);
    if (shared_pool && shared_pool->pid != getpid()) shared_pool = NULL;   /* a forked child: the parent's, unusable */
    if (!shared_pool) shared_pool = el_pool_new(n_threads);
    el_pool *p = shared_pool;
    if (p) p->refs++;
    pthread_mutex_unlock(&shared_mu);
    return p;
}

void el_pool_release(el_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&shared_mu);
    const int last = --p->refs == 0 && p == shared_pool;
    if (last) shared_pool = NULL;
    pthread_mutex_unlock(&shared_mu);
    if (last) el_pool_free(p);
}

int el_pool_size(const el_pool *p) { return p->n; }

void el_pool_run(el_pool *p, el_task_fn fn, void *ctx) {
    /* after fork() only the calling thread exists: run alone (every task splits work by nth) */
    if (p->n == 1 || getpid() != p->pid) { fn(ctx, 0, 1); return; }
    pthread_mutex_lock(&p->run_mu);
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    pthread_mutex_lock(&p->mu);   /* pairs with the sleepers' check: no lost wake-up */
    atomic_fetch_add_explicit(&p->job, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    fn(ctx, 0, p->n);
    int spins = 0, d;
    long t0 = 0;
    while ((d = atomic_load_explicit(&p->done, memory_order_acquire)) < p->n - 1) {
        if (keep_spinning(&spins, &t0, SPIN_WAIT_NS)) { cpu_relax(); continue; }
        atomic_store_explicit(&p->done_sleeper, 1, memory_order_seq_cst);
        if (atomic_load_explicit(&p->done, memory_order_seq_cst) == d) futex_wait(&p->done, d);
        atomic_store_explicit(&p->done_sleeper, 0, memory_order_seq_cst);
    }
    pthread_mutex_unlock(&p->run_mu);
}

void el_stage_complete(atomic_int *done, atomic_int *sleepers, int n_done, int total) {
    int v = n_done ? atomic_fetch_add_explicit(done, n_done, memory_order_seq_cst) + n_done
                   : atomic_load_explicit(done, memory_order_acquire);
    if (v >= total) {
        if (n_done && atomic_load_explicit(sleepers, memory_order_seq_cst) > 0) futex_wake(done);
        return;
    }
    int spins = 0;
    long t0 = 0;
    while ((v = atomic_load_explicit(done, memory_order_acquire)) < total) {
        if (keep_spinning(&spins, &t0, SPIN_WAIT_NS)) { cpu_relax(); continue; }
        atomic_fetch_add_explicit(sleepers, 1, memory_order_seq_cst);
        if (atomic_load_explicit(done, memory_order_seq_cst) == v) futex_wait(done, v);
        atomic_fetch_sub_explicit(sleepers, 1, memory_order_seq_cst);
    }
}
