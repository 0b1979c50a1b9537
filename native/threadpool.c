/* prosparse — persistent thread pool (see threadpool.h). */
#define _GNU_SOURCE
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* Spin iterations before a worker goes to sleep: long enough to bridge the gap between two
 * operations of one forward pass, short enough not to burn a core between tokens. */
#define SPIN_ITERATIONS 200000
/* While spinning, give the core away now and then: when another process shares the cores,
 * the thread being waited for may need this one's time slice. */
#define YIELD_EVERY 1024

typedef struct {
    ps_threadpool *pool;
    int ith;
    pthread_t thread;
} worker;

struct ps_threadpool {
    int n_threads;
    worker *workers;            /* n_threads - 1 entries: thread 0 is the caller */

    ps_task_fn fn;              /* the current task; written before generation is bumped */
    void *ctx;
    atomic_int generation;      /* bumped once per task */
    atomic_int n_done;          /* workers finished with the current generation */
    atomic_int n_sleeping;      /* workers blocked on wake */
    atomic_int stop;

    pthread_mutex_t lock;
    pthread_cond_t wake;
};

static void *worker_main(void *arg) {
    worker *w = arg;
    ps_threadpool *pool = w->pool;
    int seen = 0;
    for (;;) {
        /* wait for a new generation: spin, then sleep */
        int gen = atomic_load(&pool->generation);
        for (int i = 1; gen == seen && i < SPIN_ITERATIONS; i++) {
            if (i % YIELD_EVERY == 0) sched_yield();
            else cpu_relax();
            gen = atomic_load(&pool->generation);
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool->lock);
            atomic_fetch_add(&pool->n_sleeping, 1);
            while ((gen = atomic_load(&pool->generation)) == seen)
                pthread_cond_wait(&pool->wake, &pool->lock);
            atomic_fetch_sub(&pool->n_sleeping, 1);
            pthread_mutex_unlock(&pool->lock);
        }
        seen = gen;
        if (atomic_load(&pool->stop)) return NULL;
        pool->fn(pool->ctx, w->ith, pool->n_threads);
        atomic_fetch_add(&pool->n_done, 1);
    }
}

static void bump_generation(ps_threadpool *pool) {
    atomic_fetch_add(&pool->generation, 1);
    /* seq_cst: a worker that registered as sleeping before this point is woken; one that
     * registers after it sees the new generation before waiting. */
    if (atomic_load(&pool->n_sleeping) > 0) {
        pthread_mutex_lock(&pool->lock);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->lock);
    }
}

ps_threadpool *ps_threadpool_create(int n_threads) {
    if (n_threads < 1) return NULL;
    ps_threadpool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pool->workers = calloc((size_t)n_threads, sizeof(worker));
    if (!pool->workers) { free(pool); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        worker *w = &pool->workers[i - 1];
        w->pool = pool;
        w->ith = i;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            pool->n_threads = i; /* join the ones that started */
            ps_threadpool_free(pool);
            return NULL;
        }
    }
    return pool;
}

void ps_threadpool_run(ps_threadpool *pool, ps_task_fn fn, void *ctx) {
    if (pool->n_threads == 1) { fn(ctx, 0, 1); return; }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->n_done, 0);
    bump_generation(pool);
    fn(ctx, 0, pool->n_threads);
    for (int i = 1; atomic_load(&pool->n_done) < pool->n_threads - 1; i++) {
        if (i % YIELD_EVERY == 0) sched_yield();
        else cpu_relax();
    }
}

int ps_threadpool_size(const ps_threadpool *pool) { return pool->n_threads; }

void ps_threadpool_free(ps_threadpool *pool) {
    if (!pool) return;
    atomic_store(&pool->stop, 1);
    bump_generation(pool);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->workers[i - 1].thread, NULL);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->wake);
    free(pool->workers);
    free(pool);
}
