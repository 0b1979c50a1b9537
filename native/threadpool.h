/* prosparse — a persistent thread pool.
 *
 * ps_threadpool_run(pool, fn, ctx) runs fn(ctx, ith, nth) on every thread, the caller being
 * thread 0, and returns when all have finished. Workers spin briefly between tasks (the
 * forward pass dispatches a few hundred small tasks per token) and sleep when idle longer.
 */
#ifndef PROSPARSE_THREADPOOL_H
#define PROSPARSE_THREADPOOL_H

typedef void (*ps_task_fn)(void *ctx, int ith, int nth);
typedef struct ps_threadpool ps_threadpool;

/* NULL when a thread cannot be started (the caller reports it). n_threads >= 1. */
ps_threadpool *ps_threadpool_create(int n_threads);
void ps_threadpool_run(ps_threadpool *pool, ps_task_fn fn, void *ctx);
int  ps_threadpool_size(const ps_threadpool *pool);
void ps_threadpool_free(ps_threadpool *pool);

#endif
