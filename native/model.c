/* prosparse — the forward pass of LLaMA-family models (llama, minicpm).
 *
 * Reads top to bottom in the order of the math: embedding, then per layer rmsnorm, q/k/v,
 * RoPE, KV cache, attention, residual, rmsnorm, FFN, residual; then norm and head.
 * Weights stay in the caller's memory map; every type goes through the traits table.
 */
#define _GNU_SOURCE
#include "prosparse.h"
#include "kernels.h"
#include "threadpool.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prompt tokens are processed in chunks of at most this many (bounds the scratch memory). */
#define MAX_BATCH 128
/* Rows handed out to a thread at a time by a mat-mat (the tile a thread dequantises), and by
 * one whose every matrix goes through the typed GEMM as it is (no tile: direct_gemm_only). */
#define ROW_CHUNK 16
#define DIRECT_CHUNK 48
/* A mat-vec hands out larger chunks, about this many per thread: every take is an atomic on a
 * cache line the threads share, which costs as much as reading a few small rows. More than one
 * per thread lets a thread that got the core late take less (2 beat 4 by 3-8% at 2 threads). */
#define CHUNKS_PER_THREAD 2
/* Neurons a prompt's down projection takes together (down_t_task): their rows, dequantised,
 * fill a thread's down_tile. */
#define H_BLOCK 64
_Static_assert(H_BLOCK <= 64, "axpy_nonzero takes at most 64 rows");
/* The down projection's output is split among threads in units of this many floats (or of a
 * quantised type's 32-float blocks). A multiple of every SIMD step (AVX-512 16, AVX2 8, NEON 4):
 * the kernels' scalar tails round differently from their vector loops (no fused multiply-add),
 * so a slice must never start where a tail would begin, or the same element would be rounded
 * differently for another thread count. */
#define DOWN_UNIT 16
/* Columns of a prompt's down projection added at a time (down_t_task): H_BLOCK rows of this
 * many floats (36 KB) fit in L1; AVX-512 holds a token's 144 in nine registers */
#define DOWN_STRIP 144
_Static_assert(DOWN_UNIT % 16 == 0, "a slice starts on every kernel's vector step");
#define CACHE_LINE 64
#define MIN_I64(a, b) ((a) < (b) ? (a) : (b))

/* ------------------------------------------------------------------------------------------
 * Model and scratch state
 * ---------------------------------------------------------------------------------------- */

struct ps_model {
    ps_config c;
    ps_tensor tok_embd;          /* (n_vocab, n_embd) */
    ps_tensor output_norm;       /* (n_embd)          */
    ps_tensor output;            /* (n_vocab, n_embd), tok_embd when tied */
    ps_layer_weights *layers;    /* (n_layer)         */
    int32_t n_ctx;
    ps_threadpool *pool;

    /* KV cache */
    char *k_cache;               /* (n_layer, n_ctx, kv_dim) of kv_type, on a cache line */
    char *v_cache;               /* (n_layer, n_ctx, kv_dim) of kv_type, on a cache line */
    void *k_cache_mem, *v_cache_mem;   /* what was allocated for them (to free) */
    int32_t kv_type;             /* PS_TYPE_F32 or PS_TYPE_F16 */

    /* activations for a chunk of up to MAX_BATCH tokens */
    float *x;                    /* (batch, n_embd) residual stream        */
    float *xb;                   /* (batch, n_embd) normed input of a block */
    float *xb2;                  /* (batch, n_embd) output of a block      */
    float *q;                    /* (batch, q_dim)                         */
    float *k;                    /* (batch, kv_dim)                        */
    float *v;                    /* (batch, kv_dim)                        */
    float *att_out;              /* (batch, q_dim)                         */
    float *hb;                   /* (batch, n_ff) gate, then act(gate)*up  */
    float *hb2;                  /* (batch, n_ff) up                       */
    float *scores;               /* (n_threads, n_ctx) attention scores    */
    float *att_scratch;          /* (n_threads, att_prompt_floats) a prompt's attention tiles */
    float *att_part;             /* (n_head, spans of n_ctx, head_dim + 2): one token's
                                    attention by span, before the merge   */
    atomic_int *att_done;        /* (n_head_kv) spans finished, one token  */
    float *rope_inv_freq;        /* (n_rot/2) base^(-2i/n_rot), fixed      */
    float *rope_cos_sin;         /* (batch, n_rot) cos, sin of each position's angles, made
                                    once per chunk for every layer */
    float *row_buf;              /* (n_threads, ROW_CHUNK, max row length) dequantised weight rows */
    float *down_tile;            /* (n_threads, H_BLOCK, n_embd) a prompt's down_t rows, dequantised */
    int64_t row_buf_len;

    /* single-token inputs quantised to 8 bits (activations = Q8): one per vector a mat-vec reads */
    int32_t activations;         /* PS_ACTIVATIONS_*                               */
    int32_t q8_mode_applies;     /* some matrix has dot_q8, or dot_bf16 (BF16 rows) */
    ps_q8_vec xb_q8;             /* (n_embd) the normed input of a block           */
    ps_q8_vec att_q8;            /* (q_dim)  att_out                               */
    ps_q8_vec x_q8;              /* (n_embd) the residual, for the predictor       */
    ps_q8_vec hidden_q8;         /* (max rank) relu(fc1 x)                         */
    ps_q8_vec hb_q8;             /* (n_ff)   the down projection's input           */
    /* activations = Q8 and BF16 weights where the CPU has AVX512-BF16 (dot_bf16): a mat-mul's
     * input rounded to bf16, made by each mat-mul that has such a target */
    uint16_t *in_bf16;           /* (MAX_BATCH, max row length)                    */
    /* activations = Q8 and a matrix with an integer prompt kernel (gemm_q8): a prompt
     * mat-mul's input, quantised and interleaved by the first mat-mul that reads it */
    ps_q8_batch in_q8b;          /* (MAX_BATCH rounded up to 16, max row length)   */
    ps_q8_vec *in_q8b_tmp;       /* (n_threads) (max row length) a token on its way there */
    int32_t n_threads;
    int64_t in_q8b_gen;          /* bumped at each packing: which input in_q8b holds */

    /* sparse FFN */
    int32_t sparse_mode;         /* PS_SPARSE_*                                    */
    int32_t has_predictor;       /* every layer has fc1 and fc2                    */
    float *pred_threshold;       /* (n_layer) predictor decision thresholds        */
    float *pred_hidden;          /* (max rank) relu(fc1 x)                         */
    float *pred_logits;          /* (n_ff) fc2 relu(fc1 x)                         */
    int32_t *neurons;            /* (n_ff) indices of the neurons to compute       */
    int32_t *exact_active;       /* (n_ff) truly active neurons (stats in predictor mode) */

    int32_t stats_on;
    ps_layer_stats *stats;       /* (n_layer) */
    int64_t *neuron_counts;      /* (n_layer, n_ff) tokens in which each neuron was active */
};

static void set_error(char *err, int32_t err_len, const char *fmt, ...) {
    if (!err || err_len <= 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, (size_t)err_len, fmt, ap);
    va_end(ap);
}

static int kv_dim(const ps_config *c) { return c->n_head_kv * c->head_dim; }
static int q_dim(const ps_config *c) { return c->n_head * c->head_dim; }

/* ------------------------------------------------------------------------------------------
 * Matrix times a batch of vectors: out[b][r] = W[r] . in[b], rows shared out among threads
 * in chunks taken from a counter (balanced by work, whatever each row costs). A target may
 * name a subset of rows (a gathered mat-vec: the sparse FFN's active neurons); out stays
 * indexed by row. Up to three weights with the same input run in one dispatch (q/k/v).
 * A single token's input is read quantised to 8 bits by weights with an integer kernel
 * (activations = Q8): quantised once, when a mat-vec first needs it, then shared by every
 * mat-vec over the same input (q/k/v, gate/up, the predictor's fc1 on the normed input, the
 * sparse FFN's gathered gate and up rows).
 * ---------------------------------------------------------------------------------------- */

/* An input vector (or a batch of them), and its 8-bit copy once made. */
typedef struct {
    const float *f32;            /* (batch, n) */
    const ps_q8_vec *q8;         /* where the copy goes: (n) */
    int q8_ready;                /* q8 holds f32, quantised */
    int64_t q8b_gen;             /* a batch: m->in_q8b holds f32 while m->in_q8b_gen is this (0: never) */
} mat_input;

static mat_input input_of(const float *f32, const ps_q8_vec *q8) {
    return (mat_input){ f32, q8, 0, 0 };
}

typedef struct {
    const ps_tensor *w;
    float *out;                  /* (batch, w->ne1) */
    const int32_t *rows;         /* rows to compute, or NULL for all of them (batch 1 only) */
    int64_t n_rows;              /* length of rows[], or w->ne1 */
    const ps_tensor *next;       /* the matrix streamed after this one, whose first bytes are
                                  * prefetched while this one's last rows are read; or NULL */
} matmul_target;

typedef struct {
    ps_model *m;
    matmul_target t[3];
    int n_targets;
    const float *in;             /* (batch, ne0) */
    const ps_q8_vec *in_q8;      /* in quantised (batch 1, activations Q8), or NULL */
    const uint16_t *in_bf16;     /* in rounded to bf16 (activations Q8, a BF16 target with
                                  * dot_bf16), or NULL */
    const ps_q8_batch *in_q8b;   /* in quantised and interleaved (a batch, activations Q8, a
                                  * target with gemm_q8), or NULL */
    int batch;
    int64_t total_rows;          /* sum of n_rows over targets */
    int64_t chunk;               /* rows per take */
    _Alignas(CACHE_LINE) atomic_llong next_row;   /* alone on its line: the only shared write */
    char pad[CACHE_LINE - sizeof(atomic_llong)];
} matmul_job;

static matmul_target all_rows(const ps_tensor *w, float *out) {
    return (matmul_target){ w, out, NULL, w->ne1, NULL };
}

static matmul_target some_rows(const ps_tensor *w, float *out, const int32_t *rows, int64_t n_rows) {
    return (matmul_target){ w, out, rows, n_rows, NULL };
}

/* Gathered rows (the sparse FFN's active neurons) defeat the hardware prefetcher, which follows
 * sequential streams: ask for the row PREFETCH_AHEAD positions ahead while this one computes,
 * and for a take's first PREFETCH_AHEAD rows before it starts. 16 rows (~10 KB of Q8_0) rather
 * than 4: one core's gathered Q8_0 rows (10% of a file's rows) went from 10-13 to 18-29 GB/s in
 * a loop over the memory-mapped file; SmolLM2 exact-mode decode, 1 thread, Q8_0 with 10% / 30%
 * of neurons active: 329 -> 348 and 261 -> 301 tokens/s (runtime/BENCHMARKS.md).
 * Consecutive rows are asked for PREFETCH_BYTES ahead: the hardware prefetcher alone kept one
 * core's stream well below the memory bandwidth (SmolLM2 decode, 1 thread, f32 activations:
 * Q8_0 172-177 -> 211-215 tokens/s, F16 106 -> 138). */
#define PREFETCH_AHEAD 16
#define PREFETCH_BYTES 8192

/* every cache line of a row; a row need not start on a line (Q8_0's 612 bytes span 10 or 11) */
static inline void prefetch_row(const char *row, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 0);
    __builtin_prefetch(row + bytes - 1, 0, 0);
}

/* a row of a streamed matrix, a line at a time from its start: the line holding its last bytes
 * is the next row's first, asked for with that row (asking for it here too, as prefetch_row
 * does, made default-model decode 5% slower on one thread) */
static inline void prefetch_stream(const char *row, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 0);
}

/* A streamed row's prefetch window (PREFETCH_BYTES past its start, `bytes` long) where it runs
 * past the end of its matrix, `left` bytes after the row's start: the part still in the
 * matrix, then the rest from the start of the matrix read next (next: NULL for none). Without
 * it each of a token's ~200 mat-vecs started on lines nothing had asked for. */
static void prefetch_across(const char *row, ptrdiff_t left, size_t bytes, const ps_tensor *next) {
    const size_t next_bytes = next ? ps_row_bytes(next->type, next->ne0) * (size_t)next->ne1 : 0;
    for (size_t off = 0; off < bytes; off += 64) {
        const ptrdiff_t at = PREFETCH_BYTES + (ptrdiff_t)off;
        if (at < left) __builtin_prefetch(row + at, 0, 0);
        else if ((size_t)(at - left) < next_bytes) __builtin_prefetch((const char *)next->data + (at - left), 0, 0);
    }
}

/* the first `bytes` of rows idx[j0 .. j0 + ahead) of base (rows row_bytes apart), the ones a
 * take asks for before its loop */
static inline void prefetch_first_rows_slice(const char *base, size_t row_bytes, size_t bytes, const int32_t *idx,
                                             int64_t j0, int64_t j1, int64_t ahead) {
    for (int64_t j = j0; j < j0 + ahead && j < j1; j++) prefetch_row(base + (size_t)idx[j] * row_bytes, bytes);
}

static inline void prefetch_first_rows(const char *base, size_t row_bytes, const int32_t *idx, int64_t j0, int64_t j1) {
    prefetch_first_rows_slice(base, row_bytes, row_bytes, idx, j0, j1, PREFETCH_AHEAD);
}

/* Rows *j.. of a target in groups of R (8: dot8_q8, 4: dot4_q8), as many whole groups as fit
 * before j1; *j moves past them. Each row's prefetch is asked for as in matmul_rows's loop. */
static inline void matmul_rows_q8(const matmul_target *t, const ps_type_traits *tt, int R, const ps_q8_vec *xq,
                                  int64_t *j, int64_t j1) {
    const ps_tensor *w = t->w;
    const int64_t n = w->ne0, rows = w->ne1;
    const size_t row_bytes = ps_row_bytes(w->type, n);
    const char *base = (const char *)w->data, *end = base + (size_t)rows * row_bytes;
    for (; *j + R <= j1; *j += R) {
        const void *row[8];
        int64_t r[8];
        float o[8];
        for (int q = 0; q < R; q++) {
            r[q] = t->rows ? t->rows[*j + q] : *j + q;
            row[q] = base + (size_t)r[q] * row_bytes;
            if (t->rows && *j + q + PREFETCH_AHEAD < t->n_rows)
                prefetch_row(base + (size_t)t->rows[*j + q + PREFETCH_AHEAD] * row_bytes, row_bytes);
            else if (!t->rows && end - (const char *)row[q] >= PREFETCH_BYTES + (ptrdiff_t)row_bytes)
                prefetch_stream((const char *)row[q] + PREFETCH_BYTES, row_bytes);
            else if (!t->rows)
                prefetch_across((const char *)row[q], end - (const char *)row[q], row_bytes, t->next);
        }
        if (R == 8) tt->dot8_q8(row, xq, n, o);
        else        tt->dot4_q8(row, xq, n, o);
        for (int q = 0; q < R; q++) t->out[r[q]] = o[q];
    }
}

/* Whether a batch reads rows of this type through the typed GEMM as they are: not BF16 rows
 * meeting bf16 activations, nor rows with an integer prompt kernel meeting a packed 8-bit batch
 * (their own GEMMs), and a type the typed GEMM takes (F32; F16 / BF16 where it converts them);
 * otherwise the rows are dequantised into the thread's tile first. */
static int batch_rows_direct(int type, const uint16_t *in_bf16, const ps_q8_batch *in_q8b) {
    const ps_type_traits *tt = ps_type_traits_for(type, -1);
    return !(in_bf16 && tt->dot_bf16) && !(in_q8b && tt->gemm_q8) && ps_gemm_nt_typed_supported(type);
}

/* Rows j0..j1 of a target. One token: a dot per row, integer when the type has an integer
 * kernel and in_q8 is given, bf16 when the type has a bf16 dot and in_bf16 is given. A batch:
 * BF16 rows with in_bf16 through the bf16 GEMM; F32 rows, and F16 / BF16 ones where the GEMM
 * converts them itself, through the typed GEMM; the others are dequantised once into the
 * thread's tile, then multiplied with every token at once. */
static void matmul_rows(const matmul_target *t, const float *in, const ps_q8_vec *in_q8, const uint16_t *in_bf16,
                        const ps_q8_batch *in_q8b, int batch, int64_t j0, int64_t j1, float *tile) {
    const ps_tensor *w = t->w;
    const ps_type_traits *tt = ps_type_traits_for(w->type, -1);
    const int64_t n = w->ne0, rows = w->ne1;
    const size_t row_bytes = ps_row_bytes(w->type, n);
    const char *base = (const char *)w->data;
    const uint16_t *xb16 = tt->dot_bf16 ? in_bf16 : NULL;   /* BF16 rows, bf16 activations */
    if (batch == 1) {
        const ps_q8_vec *xq = tt->dot_q8 ? in_q8 : NULL;
        const char *end = base + (size_t)rows * row_bytes;
        if (t->rows) prefetch_first_rows(base, row_bytes, t->rows, j0, j1);
        int64_t j = j0;
        /* eight rows per call, then four, where the type has such kernels. The prefetch lines
         * are written out in matmul_rows_q8's loop and again in the one below, not put in a
         * helper that both would call: such a helper compiled to a loop 20-25% slower in
         * decode (cause not found). */
        if (xq && tt->dot8_q8) matmul_rows_q8(t, tt, 8, xq, &j, j1);
        if (xq && tt->dot4_q8) matmul_rows_q8(t, tt, 4, xq, &j, j1);
        for (; j < j1; j++) {
            const int64_t r = t->rows ? t->rows[j] : j;
            const char *row = base + (size_t)r * row_bytes;
            if (t->rows && j + PREFETCH_AHEAD < t->n_rows)
                prefetch_row(base + (size_t)t->rows[j + PREFETCH_AHEAD] * row_bytes, row_bytes);
            else if (!t->rows && end - row >= PREFETCH_BYTES + (ptrdiff_t)row_bytes)
                prefetch_stream(row + PREFETCH_BYTES, row_bytes);
            else if (!t->rows)
                prefetch_across(row, end - row, row_bytes, t->next);
            t->out[r] = xq ? tt->dot_q8(row, xq, n) : xb16 ? tt->dot_bf16(row, xb16, n) : tt->dot(row, in, n);
        }
        return;
    }
    if (xb16) {
        for (int64_t j = j1; j < j1 + (j1 - j0) && j < rows; j++) prefetch_row(base + (size_t)j * row_bytes, row_bytes);
        ps_gemm_nt_bf16(base + (size_t)j0 * row_bytes, n, j1 - j0, xb16, n, batch, n, t->out + j0, rows);
        return;
    }
    if (in_q8b && tt->gemm_q8) {
        for (int64_t j = j1; j < j1 + (j1 - j0) && j < rows; j++) prefetch_row(base + (size_t)j * row_bytes, row_bytes);
        tt->gemm_q8(base + (size_t)j0 * row_bytes, j1 - j0, in_q8b, batch, n, t->out + j0, rows);
        return;
    }
    /* F32 rows as they are and F16 / BF16 rows where the GEMM converts them itself; others
     * dequantised into the thread's tile first */
    const int direct = batch_rows_direct(w->type, in_bf16, in_q8b);
    if (!direct)
        for (int64_t j = j0; j < j1; j++) tt->to_float(base + (size_t)j * row_bytes, tile + (j - j0) * n, n);
    /* the next tile's rows (this thread's or another's next take) start arriving while this
     * one multiplies: each tile's rows are read once per chunk, mostly from memory, and the
     * dequantisation otherwise waits for them */
    for (int64_t j = j1; j < j1 + (j1 - j0) && j < rows; j++) prefetch_row(base + (size_t)j * row_bytes, row_bytes);
    if (direct) ps_gemm_nt_typed(w->type, base + (size_t)j0 * row_bytes, n, j1 - j0, in, n, batch, n, t->out + j0, rows);
    else        ps_gemm_nt_f32(tile, n, j1 - j0, in, n, batch, n, t->out + j0, rows);
}

/* items per take of a single-token job: ~CHUNKS_PER_THREAD takes per thread, a multiple of 16 */
static int64_t work_chunk(int64_t items, int nth) {
    const int64_t per_take = (items + (int64_t)nth * CHUNKS_PER_THREAD - 1) / ((int64_t)nth * CHUNKS_PER_THREAD);
    return per_take <= 16 ? 16 : (per_take + 15) / 16 * 16;
}

/* a thread's scratch: ROW_CHUNK rows of the longest row */
static float *thread_tile(ps_model *m, int ith) { return m->row_buf + (int64_t)ith * ROW_CHUNK * m->row_buf_len; }

static void matmul_task(void *ctx, int ith, int nth) {
    matmul_job *job = ctx;
    float *tile = thread_tile(job->m, ith);
    for (;;) {
        int64_t start = atomic_fetch_add(&job->next_row, job->chunk);
        if (start >= job->total_rows) return;
        int64_t end = start + job->chunk < job->total_rows ? start + job->chunk : job->total_rows;
        /* map the global row range onto the targets it spans */
        int64_t offset = 0;
        for (int i = 0; i < job->n_targets && start < end; i++) {
            int64_t rows = job->t[i].n_rows;
            if (start < offset + rows) {
                int64_t stop = end < offset + rows ? end : offset + rows;
                matmul_rows(&job->t[i], job->in, job->in_q8, job->in_bf16, job->in_q8b, job->batch, start - offset,
                            stop - offset, tile);
                start = stop;
            }
            offset += rows;
        }
    }
}

/* in's 8-bit copy for a single-token matmul when activations are Q8 and some target's type has
 * an integer kernel (made now if not yet), else NULL. The targets share one row length, in's. */
static const ps_q8_vec *q8_input(const ps_model *m, const matmul_target *targets, int n_targets,
                                 mat_input *in, int batch) {
    if (batch != 1 || m->activations != PS_ACTIVATIONS_Q8) return NULL;
    int integer = 0;
    for (int i = 0; i < n_targets; i++) integer |= ps_type_traits_for(targets[i].w->type, -1)->dot_q8 != NULL;
    if (!integer) return NULL;
    if (!in->q8_ready) {
        ps_quantize_q8(in->f32, in->q8, targets[0].w->ne0);
        in->q8_ready = 1;
    }
    return in->q8;
}

/* Packing a batch for the integer GEMM, by groups of 16 tokens (each group's part of
 * ps_q8_batch is contiguous) shared among the threads: one thread took ~3.5% of a one-thread
 * prompt (~20 us for 128 tokens of 576), the other thread waiting. */
typedef struct {
    ps_model *m;
    const float *x;              /* (batch, n) */
    int batch;
    int64_t n;
} q8_pack_job;

static void q8_pack_task(void *ctx, int ith, int nth) {
    const q8_pack_job *job = ctx;
    const ps_q8_batch *all = &job->m->in_q8b;
    const int64_t n = job->n, lanes = PS_Q8_BATCH_LANES, meta = lanes * (n / 32);
    for (int64_t g = ith; g < ps_q8_batch_groups(job->batch); g += nth) {
        const ps_q8_batch part = { all->qs + g * lanes * n, all->d + g * meta, all->s + g * meta, all->sum + g * meta };
        const int64_t tokens = job->batch - g * lanes < lanes ? job->batch - g * lanes : lanes;
        ps_quantize_q8_batch(job->x + g * lanes * n, tokens, n, &job->m->in_q8b_tmp[ith], &part);
    }
}

/* a batch's in, quantised and interleaved in m->in_q8b (made now if it holds another input),
 * when activations are Q8 and some target's type has an integer prompt kernel, else NULL */
static const ps_q8_batch *q8_batch_input(ps_model *m, const matmul_target *targets, int n_targets, mat_input *in,
                                         int batch) {
    if (batch == 1 || m->activations != PS_ACTIVATIONS_Q8 || !m->in_q8b.qs) return NULL;
    int integer = 0;
    for (int i = 0; i < n_targets; i++) integer |= ps_type_traits_for(targets[i].w->type, -1)->gemm_q8 != NULL;
    if (!integer) return NULL;
    if (in->q8b_gen == 0 || in->q8b_gen != m->in_q8b_gen) {
        q8_pack_job job = { m, in->f32, batch, targets[0].w->ne0 };
        ps_threadpool_run(m->pool, q8_pack_task, &job);
        in->q8b_gen = ++m->in_q8b_gen;
    }
    return &m->in_q8b;
}

/* in rounded to bf16 in m->in_bf16 when activations are Q8 and some target is BF16 with a bf16
 * dot (the CPU has AVX512-BF16), else NULL. Made afresh by each mat-mul (a vector of n_embd is
 * ~50 ns, a prompt's batch a few microseconds). The targets share one row length, in's. */
static const uint16_t *bf16_input(const ps_model *m, const matmul_target *targets, int n_targets, const float *in,
                                  int batch) {
    if (m->activations != PS_ACTIVATIONS_Q8 || !m->in_bf16) return NULL;
    int any = 0;
    for (int i = 0; i < n_targets; i++) any |= ps_type_traits_for(targets[i].w->type, -1)->dot_bf16 != NULL;
    if (!any) return NULL;
    ps_f32_ops_for(-1)->to_bf16(in, m->in_bf16, (int64_t)batch * targets[0].w->ne0);
    return m->in_bf16;
}

/* Whether a batch job's every target runs the typed GEMM on its rows as they are (F32, and F16
 * / BF16 where the GEMM converts them), needing no tile of dequantised rows: then its takes need
 * not fit the tile (ROW_CHUNK rows), and take DIRECT_CHUNK. Fewer, longer takes keep a group of
 * tokens in L1 over more rows, and 48 is a whole number of the AVX2 GEMM's 3-row tiles (16 left
 * a 1-row tile per take): F16 pp128 on a Zen 3 core 334 -> 351-353 t/s in alternating builds
 * (96: no better on one thread, worse on two). */
static int direct_gemm_only(const matmul_job *job) {
    for (int i = 0; i < job->n_targets; i++)
        if (!batch_rows_direct(job->t[i].w->type, job->in_bf16, job->in_q8b)) return 0;
    return 1;
}

/* The targets in one job, each streamed on into the next when that one reads all its rows, the
 * last into `next` (the matrix the forward pass reads after them, or NULL) */
static void matmul_then(ps_model *m, const matmul_target *targets, int n_targets, mat_input *in, int batch,
                        const ps_tensor *next) {
    matmul_job job = { .m = m, .n_targets = n_targets, .in = in->f32, .batch = batch,
                       .in_q8 = q8_input(m, targets, n_targets, in, batch),
                       .in_bf16 = bf16_input(m, targets, n_targets, in->f32, batch),
                       .in_q8b = q8_batch_input(m, targets, n_targets, in, batch) };
    for (int i = 0; i < n_targets; i++) {
        job.t[i] = targets[i];
        job.t[i].next = i + 1 < n_targets ? (targets[i + 1].rows ? NULL : targets[i + 1].w) : next;
        job.total_rows += targets[i].n_rows;
    }
    if (job.total_rows == 0) return;
    job.chunk = batch > 1 ? (direct_gemm_only(&job) ? DIRECT_CHUNK : ROW_CHUNK)
                          : work_chunk(job.total_rows, ps_threadpool_size(m->pool));
    atomic_init(&job.next_row, 0);
    ps_threadpool_run(m->pool, matmul_task, &job);
}

static void matmul(ps_model *m, const matmul_target *targets, int n_targets, mat_input *in, int batch) {
    matmul_then(m, targets, n_targets, in, batch, NULL);
}

static void matvec1_then(ps_model *m, const ps_tensor *w, float *out, mat_input *in, int batch, const ps_tensor *next) {
    matmul_target t = all_rows(w, out);
    matmul_then(m, &t, 1, in, batch, next);
}

static void matvec1(ps_model *m, const ps_tensor *w, float *out, mat_input *in, int batch) {
    matvec1_then(m, w, out, in, batch, NULL);
}

/* ------------------------------------------------------------------------------------------
 * Small per-token operations
 * ---------------------------------------------------------------------------------------- */

/* The sum of squares by the f32 dot kernel (a plain loop is one chain of n dependent adds:
 * ~0.5 us for 576 values, 61 times a token); F32 norm weights are read in place. */
static void rmsnorm(float *out, const float *x, const ps_tensor *weight, int n, float eps, float *tmp) {
    const float ss = ps_type_traits_for(PS_TYPE_F32, -1)->dot(x, x, n);
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    const float *w = weight->data;
    if (weight->type != PS_TYPE_F32) {
        ps_type_traits_for(weight->type, -1)->to_float(weight->data, tmp, n);
        w = tmp;
    }
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* RoPE, llama.cpp's "normal" mode: rotates adjacent pairs (2i, 2i+1) of each head's first
 * n_rot dims by pos * base^(-2i/n_rot). (HF's q/k weights are permuted at conversion so that
 * this equals HF's rotate_half form.) The angles of a position are computed once, for q and k. */
static void rope_angles(const ps_model *m, int pos, float *cos_sin) {
    for (int i = 0; i < m->c.n_rot / 2; i++) {
        const float theta = (float)pos * m->rope_inv_freq[i];
        cos_sin[2 * i] = cosf(theta);
        cos_sin[2 * i + 1] = sinf(theta);
    }
}

static void rope(float *vec, int n_heads, int head_dim, int n_rot, const float *cos_sin) {
    for (int i = 0; i < n_rot; i += 2) {
        const float cos_t = cos_sin[i], sin_t = cos_sin[i + 1];
        for (int h = 0; h < n_heads; h++) {
            float *p = vec + h * head_dim + i;
            const float x0 = p[0], x1 = p[1];
            p[0] = x0 * cos_t - x1 * sin_t;
            p[1] = x0 * sin_t + x1 * cos_t;
        }
    }
}

static float gate_activation(const ps_config *c, float g) {
    switch (c->activation) {
    case PS_ACT_RELU:    return g > 0.0f ? g : 0.0f;
    case PS_ACT_FATRELU: return g >= c->act_threshold ? g : 0.0f;
    default:             return g / (1.0f + expf(-g));
    }
}

/* ------------------------------------------------------------------------------------------
 * Attention, causal over the KV cache. A prompt: each (KV head, tile of 16 tokens) is one unit
 * (attend_prompt_tile, below). One token past ATT_SPAN positions: each (KV head, span of ATT_SPAN positions) is one unit,
 * which scores the span's keys and sums its values for every query head sharing that KV head
 * (GQA: SmolLM2's 9 query heads share 3 KV heads), so a span is read from memory once and
 * re-read from L1/L2 by the group's other heads, on one core; before, each query head read its
 * KV head's whole cache itself, and on two threads a KV head's three query heads mostly ran on
 * both cores. The spans' partial results (maximum score, sum of exponentials, unnormalised
 * weighted sum) are merged in span order by whichever thread finishes a group's last span. The
 * spans are fixed by position, not by thread count, so any number of threads gives the same
 * bits. Up to ATT_SPAN positions a token's units are its query heads (a span per KV head would
 * leave threads idle: 3 units on SmolLM2, 1 with a single KV head).
 * ---------------------------------------------------------------------------------------- */

#define SOFTMAX_LANES 16
#define ATT_SPAN 128

/* spans of ATT_SPAN positions in n positions */
static int64_t att_spans(int64_t n) { return (n + ATT_SPAN - 1) / ATT_SPAN; }

typedef struct {
    ps_model *m;
    int layer, batch, pos0;
    _Alignas(CACHE_LINE) atomic_int next;
    char pad[CACHE_LINE - sizeof(atomic_int)];
} attention_job;

/* One head over n positions of the cache (keys k, values v: the head's columns of the span's
 * first position, rows kvd elements apart): out = the weighted sum of the values by the
 * exponentials of the scaled scores less their maximum, not yet divided by the exponentials'
 * sum; *max_score and *sum are set. scores: n floats of scratch. */
static void attend_span(const ps_f32_ops *ops, const float *q, const char *k, const char *v, int kvd, int hd,
                        int kv_type, int n, float scale, float *scores, float *out, float *max_out, float *sum_out) {
    ops->scores(q, k, kvd, n, hd, kv_type, scores);
    /* the scaled scores' maximum and their exponentials' sum in SOFTMAX_LANES running values,
     * not one: a single max or sum chain waits on each step's latency (perf at depth 1000: the
     * two loops took 5% of a token) */
    float lane[SOFTMAX_LANES];
    for (int j = 0; j < SOFTMAX_LANES; j++) lane[j] = -INFINITY;
    int t = 0;
    for (; t + SOFTMAX_LANES <= n; t += SOFTMAX_LANES)
        for (int j = 0; j < SOFTMAX_LANES; j++) {
            scores[t + j] *= scale;
            lane[j] = scores[t + j] > lane[j] ? scores[t + j] : lane[j];
        }
    for (; t < n; t++) {
        scores[t] *= scale;
        lane[0] = scores[t] > lane[0] ? scores[t] : lane[0];
    }
    float max_score = lane[0];
    for (int j = 1; j < SOFTMAX_LANES; j++) max_score = lane[j] > max_score ? lane[j] : max_score;
    for (t = 0; t < n; t++) scores[t] -= max_score;
    ops->exp(scores, scores, n);
    for (int j = 0; j < SOFTMAX_LANES; j++) lane[j] = 0.0f;
    for (t = 0; t + SOFTMAX_LANES <= n; t += SOFTMAX_LANES)
        for (int j = 0; j < SOFTMAX_LANES; j++) lane[j] += scores[t + j];
    for (; t < n; t++) lane[0] += scores[t];
    float sum = 0.0f;
    for (int j = 0; j < SOFTMAX_LANES; j++) sum += lane[j];
    ops->weighted_sum(scores, n, v, kvd, hd, kv_type, out);
    *max_out = max_score;
    *sum_out = sum;
}

static void normalise(float *out, int hd, float sum) {
    const float inv_sum = 1.0f / sum;
    for (int i = 0; i < hd; i++) out[i] *= inv_sum;
}

/* A head's spans 0..n_spans-1 (their partial sums, then maximum and sum, in part: hd + 2
 * floats each) into its output, in span order; w: n_spans floats of scratch. The spans'
 * weights use the same exp as their scores (ops->exp), so the bits do not depend on libm. */
static void merge_spans(const ps_f32_ops *ops, const float *part, int n_spans, int hd, float *w, float *out) {
    float max_score = -INFINITY, sum = 0.0f;
    for (int s = 0; s < n_spans; s++) {
        const float mx = part[(size_t)s * (hd + 2) + hd];
        max_score = mx > max_score ? mx : max_score;
    }
    for (int s = 0; s < n_spans; s++) w[s] = part[(size_t)s * (hd + 2) + hd] - max_score;
    ops->exp(w, w, n_spans);
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int s = 0; s < n_spans; s++) {
        const float *p = part + (size_t)s * (hd + 2);
        sum += p[hd + 1] * w[s];
        for (int i = 0; i < hd; i++) out[i] += w[s] * p[i];
    }
    normalise(out, hd, sum);
}

/* A prompt's attention: units of (KV head, tile of ATT_TQ = 16 query tokens), the tokens being
 * the lanes of gemm16. Over spans of ATT_PSPAN positions (the span's keys and values converted
 * to f32 once when the cache is F16, then shared by the group's query heads), per head: the
 * scores S[p][j] = k_p . q_j (gemm16: the keys' rows against the queries transposed); the
 * softmax online over the spans (a running maximum and sum per token, the partial sums so far
 * rescaled when the maximum grows, as flash attention does); the values summed down their
 * columns, O[e][j] += sum_p v_p[e] S[p][j] (gemm16 again). A key or value is loaded once per 16
 * tokens of a head where the one-unit-per-token path loaded it once per token: perf of a
 * 1024-token prompt had put 61% of it in that path's scores, weighted sums and softmax. */
#define ATT_TQ 16
#define ATT_PSPAN 256

/* floats of one thread's scratch for attend_prompt_tile */
static int64_t att_prompt_floats(const ps_config *c) {
    const int64_t hd = c->head_dim, group = c->n_head / c->n_head_kv;
    return 2 * ATT_PSPAN * hd + ATT_PSPAN * ATT_TQ + hd * ATT_TQ * (2 * group + 1) + 2 * group * ATT_TQ + 2 * ATT_TQ;
}

static void attend_prompt_tile(ps_model *m, const ps_f32_ops *ops, const char *kc, const char *vc, int kvh, int t0,
                               int nt, int pos0, float *scr) {
    const ps_config *c = &m->c;
    const int hd = c->head_dim, kvd = kv_dim(c), qd = q_dim(c), group = c->n_head / c->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t es = ps_row_bytes(m->kv_type, 1), row = (size_t)kvd * es;
    float *kf = scr, *vf = kf + (size_t)ATT_PSPAN * hd;          /* (ATT_PSPAN, hd) a span, as f32 */
    float *st = vf + (size_t)ATT_PSPAN * hd;                     /* (ATT_PSPAN, 16) scores, then weights */
    float *qt = st + ATT_PSPAN * ATT_TQ;                         /* (group, hd, 16) queries transposed */
    float *ot = qt + (size_t)group * hd * ATT_TQ;                /* (group, hd, 16) weighted sums so far */
    float *os = ot + (size_t)group * hd * ATT_TQ;                /* (hd, 16) a span's weighted sums */
    float *mx = os + (size_t)hd * ATT_TQ, *sum = mx + group * ATT_TQ;   /* (group, 16) each */
    float *alpha = sum + group * ATT_TQ, *smax = alpha + ATT_TQ;        /* (16) each */
    const ps_type_traits *kt = ps_type_traits_for(m->kv_type, -1);
    for (int g = 0; g < group; g++) {
        const float *q = m->q + (int64_t)t0 * qd + (kvh * group + g) * hd;
        for (int e = 0; e < hd; e++)
            for (int j = 0; j < ATT_TQ; j++) qt[((size_t)g * hd + e) * ATT_TQ + j] = j < nt ? q[(int64_t)j * qd + e] : 0.0f;
        for (int j = 0; j < ATT_TQ; j++) mx[g * ATT_TQ + j] = -INFINITY, sum[g * ATT_TQ + j] = 0.0f;
    }
    memset(ot, 0, sizeof(float) * (size_t)group * hd * ATT_TQ);
    const int n = pos0 + t0 + nt;   /* the positions the tile's last token sees */
    for (int p0 = 0; p0 < n; p0 += ATT_PSPAN) {
        const int len = n - p0 < ATT_PSPAN ? n - p0 : ATT_PSPAN;
        const char *k8 = kc + (size_t)p0 * row + (size_t)kvh * hd * es, *v8 = vc + (size_t)p0 * row + (size_t)kvh * hd * es;
        const float *k = (const float *)k8, *v = (const float *)v8;
        int64_t ld = kvd;
        if (m->kv_type != PS_TYPE_F32) {
            for (int p = 0; p < len; p++) {
                kt->to_float(k8 + (size_t)p * row, kf + (size_t)p * hd, hd);
                kt->to_float(v8 + (size_t)p * row, vf + (size_t)p * hd, hd);
            }
            k = kf, v = vf, ld = hd;
        }
        for (int g = 0; g < group; g++) {
            float *gm = mx + g * ATT_TQ, *gs = sum + g * ATT_TQ, *go = ot + (size_t)g * hd * ATT_TQ;
            ops->gemm16(k, ld, 1, len, qt + (size_t)g * hd * ATT_TQ, ATT_TQ, hd, st, ATT_TQ);
            for (int j = 0; j < ATT_TQ; j++) smax[j] = -INFINITY;
            for (int p = 0; p < len; p++)
                for (int j = 0; j < ATT_TQ; j++) {   /* token j is at position pos0 + t0 + j */
                    float x = st[p * ATT_TQ + j] * scale;
                    x = p0 + p > pos0 + t0 + j ? -INFINITY : x;
                    st[p * ATT_TQ + j] = x;
                    smax[j] = x > smax[j] ? x : smax[j];
                }
            for (int j = 0; j < ATT_TQ; j++) {
                const float mnew = smax[j] > gm[j] ? smax[j] : gm[j];
                alpha[j] = gm[j] - mnew;   /* -inf on the first span: the sums so far are zero */
                gm[j] = mnew;
            }
            ops->exp(alpha, alpha, ATT_TQ);
            for (int p = 0; p < len; p++)
                for (int j = 0; j < ATT_TQ; j++) st[p * ATT_TQ + j] -= gm[j];
            ops->exp(st, st, (int64_t)len * ATT_TQ);
            for (int j = 0; j < ATT_TQ; j++) smax[j] = 0.0f;   /* now the span's sums */
            for (int p = 0; p < len; p++)
                for (int j = 0; j < ATT_TQ; j++) smax[j] += st[p * ATT_TQ + j];
            for (int j = 0; j < ATT_TQ; j++) gs[j] = gs[j] * alpha[j] + smax[j];
            ops->gemm16(v, 1, ld, hd, st, ATT_TQ, len, os, ATT_TQ);
            for (int e = 0; e < hd; e++)
                for (int j = 0; j < ATT_TQ; j++)
                    go[e * ATT_TQ + j] = go[e * ATT_TQ + j] * alpha[j] + os[e * ATT_TQ + j];
        }
    }
    for (int g = 0; g < group; g++)
        for (int j = 0; j < nt; j++) {
            float *out = m->att_out + (int64_t)(t0 + j) * qd + (kvh * group + g) * hd;
            const float inv = 1.0f / sum[g * ATT_TQ + j];
            for (int e = 0; e < hd; e++) out[e] = ot[((size_t)g * hd + e) * ATT_TQ + j] * inv;
        }
}

/* token b's head h over positions 0 .. pos0 + b, one unit (attend_span, normalised) */
static void attend_token(ps_model *m, const ps_f32_ops *ops, const char *kc, const char *vc, int b, int h, int pos0,
                         float *scores) {
    const ps_config *c = &m->c;
    const int hd = c->head_dim, kvd = kv_dim(c), kvh = h / (c->n_head / c->n_head_kv);
    const size_t es = ps_row_bytes(m->kv_type, 1);
    float *out = m->att_out + (int64_t)b * q_dim(c) + h * hd, max_score, sum;
    attend_span(ops, m->q + (int64_t)b * q_dim(c) + h * hd, kc + (size_t)kvh * hd * es, vc + (size_t)kvh * hd * es,
                kvd, hd, m->kv_type, pos0 + b + 1, 1.0f / sqrtf((float)hd), scores, out, &max_score, &sum);
    normalise(out, hd, sum);
}

/* whether the values of KV head kvh at positions p0 .. p0 + n - 1 are all finite: a tile's own
 * positions, which its earlier tokens mask with a weight of 0 but still multiply (0 x inf is
 * NaN; an F16 cache stores values past 65504 as inf) */
static int values_finite(const ps_model *m, const char *vc, int kvh, int p0, int n) {
    const int hd = m->c.head_dim, kvd = kv_dim(&m->c);
    for (int p = p0; p < p0 + n; p++)
        for (int e = 0; e < hd; e++) {
            const size_t at = (size_t)p * kvd + (size_t)kvh * hd + e;
            if (m->kv_type == PS_TYPE_F32 ? !isfinite(((const float *)vc)[at])
                                          : (((const uint16_t *)vc)[at] & 0x7c00) == 0x7c00)
                return 0;
        }
    return 1;
}

static void attention_task(void *ctx, int ith, int nth) {
    attention_job *job = ctx;
    ps_model *m = job->m;
    const ps_config *c = &m->c;
    const int hd = c->head_dim, kvd = kv_dim(c), group = c->n_head / c->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    /* the kernels, looked up once: ps_dot_f32 / ps_axpy_f32 check the dispatch on every call,
     * and on head_dim-long vectors that took 2.4% of a 1-thread F16 prompt's samples against
     * 3.5% for the products themselves (perf). The keys are scored by ops->scores (AVX-512: 16
     * positions at a time, the sums reduced together; one dot per position spent as long on
     * its reduction as on its products); the values are summed by the weighted sum of their
     * type, its accumulators in registers over all positions (F16 values had taken an axpy4
     * call per four positions, each loading and storing the output: 17% of a default-model
     * token at depth 1000, perf). */
    const ps_f32_ops *ops = ps_f32_ops_for(-1);
    const size_t es = ps_row_bytes(m->kv_type, 1), row = (size_t)kvd * es;
    const char *kc = m->k_cache + (size_t)job->layer * (size_t)m->n_ctx * row;
    const char *vc = m->v_cache + (size_t)job->layer * (size_t)m->n_ctx * row;
    float *scores = m->scores + (int64_t)ith * m->n_ctx;
    /* one token up to ATT_SPAN positions, or a batch too small to fill tiles of 16 tokens
     * (most of whose lanes would be padding): a unit per token and query head */
    if ((job->batch == 1 && job->pos0 + 1 <= ATT_SPAN) || (job->batch > 1 && job->batch < ATT_TQ / 2)) {
        for (int u; (u = atomic_fetch_add(&job->next, 1)) < job->batch * c->n_head;)
            attend_token(m, ops, kc, vc, u / c->n_head, u % c->n_head, job->pos0, scores);
        return;
    }
    if (job->batch == 1) {
        const int n = job->pos0 + 1, n_spans = (n + ATT_SPAN - 1) / ATT_SPAN;
        const int units = c->n_head_kv * n_spans, max_spans = att_spans(m->n_ctx);
        for (int u; (u = atomic_fetch_add(&job->next, 1)) < units;) {
            const int kvh = u / n_spans, s = u % n_spans, p0 = s * ATT_SPAN;
            const int len = n - p0 < ATT_SPAN ? n - p0 : ATT_SPAN;
            const char *k = kc + (size_t)p0 * row + (size_t)kvh * hd * es;
            const char *v = vc + (size_t)p0 * row + (size_t)kvh * hd * es;
            /* the span's values are asked for now, to arrive while the first head scores the
             * keys (the keys themselves at once: they are read right away). Default model,
             * depth 1000, alternating builds: 2 threads +15% (f32 and f16 cache) over one unit
             * per query head, 1 thread -3% (f32) / +-0 (f16); without this prefetch, 1 thread
             * f16 was 5% slower */
            for (int t = 0; t < len; t++) prefetch_row(v + (size_t)t * row, (size_t)hd * es);
            for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                float *part = m->att_part + ((size_t)h * max_spans + s) * (hd + 2);
                attend_span(ops, m->q + h * hd, k, v, kvd, hd, m->kv_type, len, scale, scores, part, &part[hd],
                            &part[hd + 1]);
            }
            /* the group's last span to finish merges the group (acq_rel: the other spans'
             * partial sums, written by other threads, are seen here) */
            if (atomic_fetch_add_explicit(&m->att_done[kvh], 1, memory_order_acq_rel) == n_spans - 1)
                for (int h = kvh * group; h < (kvh + 1) * group; h++)
                    merge_spans(ops, m->att_part + (size_t)h * max_spans * (hd + 2), n_spans, hd, scores,
                                m->att_out + h * hd);
        }
        return;
    }
    /* a prompt: the tiles with the most positions first, so the last takes are short */
    const int n_tiles = (job->batch + ATT_TQ - 1) / ATT_TQ, units = n_tiles * c->n_head_kv;
    float *scr = m->att_scratch + (int64_t)ith * att_prompt_floats(c);
    for (int u; (u = atomic_fetch_add(&job->next, 1)) < units;) {
        const int t0 = (n_tiles - 1 - u / c->n_head_kv) * ATT_TQ, kvh = u % c->n_head_kv;
        const int nt = job->batch - t0 < ATT_TQ ? job->batch - t0 : ATT_TQ;
        if (values_finite(m, vc, kvh, job->pos0 + t0, nt)) {
            attend_prompt_tile(m, ops, kc, vc, kvh, t0, nt, job->pos0, scr);
            continue;
        }
        for (int b = t0; b < t0 + nt; b++)   /* as decoding would: no masked position is read */
            for (int h = kvh * group; h < (kvh + 1) * group; h++) attend_token(m, ops, kc, vc, b, h, job->pos0, scores);
    }
}

/* ------------------------------------------------------------------------------------------
 * The down projection from ffn_down_t: out[b] = sum over neurons i of h[b][i] * down_t[i].
 * Each thread owns a slice of out's elements (whole blocks of the rows, equal to a block) and
 * adds every neuron's piece of it in neuron order: no partial sums to add up afterwards, and
 * each element is summed in the same order whatever the number of threads, so one, two or
 * eight threads give the same bits (with each thread taking whole neurons instead, the sums
 * were split differently for every thread count, and greedy text from one and two threads
 * parted after a dozen tokens).
 * ---------------------------------------------------------------------------------------- */

typedef struct {
    ps_model *m;
    const ps_tensor *down_t;
    const float *h;              /* (batch, n_ff) activated neurons */
    int batch;
    const int32_t *neurons;      /* the neurons to add (batch 1 only), or NULL for all */
    int64_t n_neurons;
    float *out;                  /* (batch, n_embd) */
} down_t_job;

/* a row's slice for thread ith of nth: elements [*e0, *e1), on block boundaries (DOWN_UNIT
 * elements for the float types); the slices differ by at most one unit, and are empty when there
 * are more threads than units */
static void down_t_slice(const ps_tensor *w, int ith, int nth, int64_t *e0, int64_t *e1) {
    const int64_t bs = ps_type_traits_for(w->type, -1)->block_size, unit = bs > 1 ? bs : DOWN_UNIT;
    const int64_t units = (w->ne0 + unit - 1) / unit;
    *e0 = MIN_I64(units * ith / nth * unit, w->ne0);
    *e1 = MIN_I64(units * (ith + 1) / nth * unit, w->ne0);
}

static void down_t_task(void *ctx, int ith, int nth) {
    down_t_job *job = ctx;
    ps_model *m = job->m;
    const ps_tensor *w = job->down_t;
    const int64_t dim = w->ne0, ff = m->c.n_ff;
    int64_t e0, e1;
    down_t_slice(w, ith, nth, &e0, &e1);
    if (e0 >= e1) return;
    const int64_t len = e1 - e0;
    const ps_type_traits *tt = ps_type_traits_for(w->type, -1);
    const size_t row_bytes = ps_row_bytes(w->type, dim);
    const size_t offset = ps_row_bytes(w->type, e0), slice_bytes = ps_row_bytes(w->type, len);
    const char *base = (const char *)w->data + offset;   /* the slice of row 0 */
    for (int b = 0; b < job->batch; b++) memset(job->out + b * dim + e0, 0, (size_t)len * sizeof(float));
    float *acc = job->out + e0;
    if (job->batch > 1) {
        /* a prompt (every neuron: down_t_product takes a list with one token only), H_BLOCK
         * neurons at a time: the rows of those active for some token dequantised into the
         * thread's tile (row k for the block's neuron k), then a strip of DOWN_STRIP columns at
         * a time, every token adds its non-zero neurons' part of the strip (axpy_nonzero: the
         * token's strip of out in registers, one fma chain per element in neuron order, the bits
         * of an axpy per neuron). The tile's strip, 64 rows of 576 bytes, stays in L1 from one
         * token to the next. Whole rows at a time (axpy4 over the 576 columns, four non-zero
         * neurons per call) read each token's rows from L2: SmolLM2 at ~70% sparsity, pp128,
         * this is 1.23x as fast on one thread and 1.4x on two (runtime/BENCHMARKS.md, eleventh
         * session), with the same bits. */
        const ps_f32_ops *ops = ps_f32_ops_for(-1);
        float *tile = m->down_tile + (int64_t)ith * H_BLOCK * m->c.n_embd;
        for (int64_t j0 = 0; j0 < job->n_neurons; j0 += H_BLOCK) {
            const int nj = (int)MIN_I64(H_BLOCK, job->n_neurons - j0);
            int active[H_BLOCK] = { 0 };
            for (int b = 0; b < job->batch; b++)
                for (int k = 0; k < nj; k++) active[k] |= job->h[(int64_t)b * ff + j0 + k] != 0.0f;
            /* an inactive neuron's h is 0 for every token: its row is never read */
            for (int k = 0; k < nj; k++)
                if (active[k]) tt->to_float(base + (size_t)(j0 + k) * row_bytes, tile + (int64_t)k * len, len);
            /* strips as equal as whole 16-float units make them (576 columns: four of 144; 320:
             * 112, 112, 96, not 144 + 144 + 32) */
            const int64_t units = (len + 15) / 16, n_strips = (units + DOWN_STRIP / 16 - 1) / (DOWN_STRIP / 16);
            for (int64_t s = 0, s0 = 0; s < n_strips; s++) {
                const int64_t w = MIN_I64(16 * (units / n_strips + (s < units % n_strips)), len - s0);
                for (int b = 0; b < job->batch; b++)
                    ops->axpy_nonzero(job->h + (int64_t)b * ff + j0, nj, tile, len, s0, acc + (int64_t)b * dim + s0, w);
                s0 += w;
            }
        }
        return;
    }
    /* one token: the non-zero neurons four at a time (axpy4 loads and stores acc once per four
     * rows), the last few one by one */
    float group_h[4];
    const void *group_rows[4];
    int n_group = 0;
    /* every neuron: a slice of each row is a strided read the hardware prefetchers follow
     * poorly (two threads, sparse-layout file in dense mode: 10% slower without this) */
    const int sliced = slice_bytes < row_bytes;
    /* as many bytes ahead as PREFETCH_AHEAD whole rows: more slices than rows (two threads, Q4_1,
     * 16 slices ahead: exact mode 6-10% slower) */
    const int64_t ahead = PREFETCH_AHEAD * (int64_t)((row_bytes + slice_bytes - 1) / slice_bytes);
    if (job->neurons) prefetch_first_rows_slice(base, row_bytes, slice_bytes, job->neurons, 0, job->n_neurons, ahead);
    for (int64_t j = 0; j < job->n_neurons; j++) {
        const int64_t i = job->neurons ? job->neurons[j] : j;
        if (j + ahead < job->n_neurons && (job->neurons || sliced))
            prefetch_row(base + (size_t)(job->neurons ? job->neurons[j + ahead] : j + ahead) * row_bytes, slice_bytes);
        if (job->h[i] == 0.0f) continue;
        group_h[n_group] = job->h[i];
        group_rows[n_group] = base + (size_t)i * row_bytes;
        if (++n_group == 4) {
            tt->axpy4(group_h, group_rows, acc, len);
            n_group = 0;
        }
    }
    for (int r = 0; r < n_group; r++) tt->axpy(group_h[r], group_rows[r], acc, len);
}

/* out = the down projection of h over every neuron, or (one token only: batch 1) over the
 * listed ones; a batch with a list is not supported (no caller has one: prompts run dense) */
static void down_t_product(ps_model *m, const ps_tensor *down_t, const float *h, int batch,
                           const int32_t *neurons, int64_t n_neurons, float *out) {
    down_t_job job = { .m = m, .down_t = down_t, .h = h, .batch = batch, .neurons = neurons,
                       .n_neurons = n_neurons, .out = out };
    ps_threadpool_run(m->pool, down_t_task, &job);
}

/* ------------------------------------------------------------------------------------------
 * FFN, three ways. Gate and up have one row per neuron; a neuron whose activated gate is
 * zero contributes nothing, so its up row and its down vector need not be read.
 * In: xb (m->xb, the normed input), m->x (residual). Out: m->xb2.
 * ---------------------------------------------------------------------------------------- */

/* neurons[] = those of candidates (or all when NULL) whose activated gate is non-zero;
 * m->hb holds act(gate) afterwards. Returns their count. */
static int64_t collect_active(ps_model *m, const int32_t *candidates, int64_t n_candidates, int32_t *neurons) {
    /* ReLU / FATReLU keep a gate g >= min */
    const float min = m->c.activation == PS_ACT_RELU ? FLT_TRUE_MIN : m->c.act_threshold;
    if (!candidates && m->c.activation != PS_ACT_SILU)   /* all neurons: vectorised */
        return ps_f32_ops_for(-1)->keep_at_least(m->hb, n_candidates, min, neurons);
    float *hb = m->hb;
    int64_t n = 0;
    if (m->c.activation == PS_ACT_SILU) {
        for (int64_t j = 0; j < n_candidates; j++) {
            const int32_t i = candidates ? candidates[j] : (int32_t)j;
            hb[i] = gate_activation(&m->c, hb[i]);
            if (hb[i] != 0.0f) neurons[n++] = i;
        }
        return n;
    }
    /* a predicted neuron turns out active about as often as not: no branch on the outcome (a
     * mispredicted one per neuron cost 1-2% of predictor-mode decode, perf on Zen 3): a mask on
     * the gate's bits keeps it or makes it +0 (NaN: dropped), and a kept -0 counts as zero */
    for (int64_t j = 0; j < n_candidates; j++) {
        const int32_t i = candidates[j];
        uint32_t bits;
        memcpy(&bits, &hb[i], sizeof bits);
        bits &= 0u - (uint32_t)(hb[i] >= min);
        memcpy(&hb[i], &bits, sizeof bits);
        neurons[n] = i;
        n += (bits & 0x7fffffffu) != 0;
    }
    return n;
}

/* up rows and down vectors of the given neurons; m->hb holds their activated gates */
static void ffn_sparse_tail(ps_model *m, const ps_layer_weights *l, mat_input *xb, const int32_t *neurons,
                            int64_t n, const ps_tensor *next) {
    matmul_target up = some_rows(&l->ffn_up, m->hb2, neurons, n);
    matmul(m, &up, 1, xb, 1);
    for (int64_t j = 0; j < n; j++) m->hb[neurons[j]] *= m->hb2[neurons[j]];
    if (l->ffn_down_t.data) {
        down_t_product(m, &l->ffn_down_t, m->hb, 1, neurons, n, m->xb2);
    } else {
        /* plain ffn_down: rows are outputs, so every row is read; zeros cost nothing more */
        float *h = m->hb2;
        memset(h, 0, (size_t)m->c.n_ff * sizeof(float));
        for (int64_t j = 0; j < n; j++) h[neurons[j]] = m->hb[neurons[j]];
        mat_input hin = input_of(h, &m->hb_q8);
        matvec1_then(m, &l->ffn_down, m->xb2, &hin, 1, next);
        return;
    }
    /* the first bytes of the matrix read next, as a streamed mat-vec asks for them before its
     * end (prefetch_across) */
    if (next) {
        const size_t bytes = ps_row_bytes(next->type, next->ne0) * (size_t)next->ne1;
        prefetch_stream((const char *)next->data, bytes < PREFETCH_BYTES ? bytes : PREFETCH_BYTES);
    }
}

/* hb = act(gate) * up over a batch, in equal slices per thread (a prompt's expf calls are
 * several percent of its time: serial, they held the other thread waiting) */
typedef struct {
    ps_model *m;
    int64_t n;                   /* batch * n_ff */
    atomic_llong n_active;       /* nonzero activations, summed over threads */
} gate_job;

/* SiLU's e^-g a block at a time, through the vector exp */
#define GATE_BLOCK 256

static void gate_task(void *ctx, int ith, int nth) {
    gate_job *job = ctx;
    const ps_config *c = &job->m->c;
    float *hb = job->m->hb;
    const float *up = job->m->hb2;
    /* slice bounds on multiples of 16 floats, so no two threads write one cache line */
    const int64_t lines = (job->n + 15) / 16;
    const int64_t i0 = lines * ith / nth * 16, i1 = MIN_I64(lines * (ith + 1) / nth * 16, job->n);
    int64_t n_active = 0;
    if (c->activation == PS_ACT_SILU) {
        const ps_f32_ops *ops = ps_f32_ops_for(-1);
        float e[GATE_BLOCK];
        for (int64_t i = i0; i < i1; i += GATE_BLOCK) {
            const int64_t len = MIN_I64(GATE_BLOCK, i1 - i);
            for (int64_t j = 0; j < len; j++) e[j] = -hb[i + j];
            ops->exp(e, e, len);
            for (int64_t j = 0; j < len; j++) {
                const float a = hb[i + j] / (1.0f + e[j]);
                n_active += a != 0.0f;
                hb[i + j] = a * up[i + j];
            }
        }
    } else {
        /* ReLU / FATReLU as keep_at_least's "g >= min" (ReLU: min the smallest positive float,
         * so g > 0), written without a branch: the loop vectorises. With the activation's
         * switch inside the loop it compiled to a branch per value, mispredicted as often as
         * the pattern of active neurons is random (~11 cycles a value at 70% sparsity: 15% of
         * a sparse-layout prompt). */
        const float min = c->activation == PS_ACT_RELU ? FLT_TRUE_MIN : c->act_threshold;
        int32_t active = 0;   /* int32, so the loop vectorises: a slice has < batch * n_ff values */
        for (int64_t i = i0; i < i1; i++) {
            const float a = __builtin_isgreaterequal(hb[i], min) ? hb[i] : 0.0f;
            active += a != 0.0f;
            hb[i] = a * up[i];
        }
        n_active = active;
    }
    atomic_fetch_add(&job->n_active, n_active);
}

/* statistics: one more token in which each of these neurons was active */
static void count_neurons(int64_t *counts, const int32_t *neurons, int64_t n) {
    for (int64_t j = 0; j < n; j++) counts[neurons[j]]++;
}

static void ffn_dense(ps_model *m, const ps_layer_weights *l, mat_input *xb, int batch, ps_layer_stats *st,
                      int64_t *counts, const ps_tensor *next) {
    const ps_config *c = &m->c;
    matmul_target gate_up[2] = { all_rows(&l->ffn_gate, m->hb), all_rows(&l->ffn_up, m->hb2) };
    matmul_then(m, gate_up, 2, xb, batch, l->ffn_down.data ? &l->ffn_down : NULL);
    const int64_t n = (int64_t)batch * c->n_ff;
    if (counts)   /* from the raw gates, before gate_task multiplies in up (which could be 0) */
        for (int b = 0; b < batch; b++)
            for (int64_t i = 0; i < c->n_ff; i++) counts[i] += gate_activation(c, m->hb[b * c->n_ff + i]) != 0.0f;
    gate_job job = { .m = m, .n = n };
    atomic_init(&job.n_active, 0);
    if (batch > 1) ps_threadpool_run(m->pool, gate_task, &job);
    else gate_task(&job, 0, 1);   /* one token's n_ff values: less than a dispatch costs */
    if (st) {
        st->n_tokens += batch;
        st->n_active += atomic_load(&job.n_active);
        st->n_computed += n;
    }
    mat_input hin = input_of(m->hb, &m->hb_q8);
    if (l->ffn_down.data) matvec1_then(m, &l->ffn_down, m->xb2, &hin, batch, next);
    else down_t_product(m, &l->ffn_down_t, m->hb, batch, NULL, c->n_ff, m->xb2);
}

/* one token: all gate rows, then up/down for the active neurons only */
static void ffn_exact(ps_model *m, const ps_layer_weights *l, mat_input *xb, ps_layer_stats *st,
                      int64_t *counts, const ps_tensor *next) {
    matvec1(m, &l->ffn_gate, m->hb, xb, 1);
    const int64_t n = collect_active(m, NULL, m->c.n_ff, m->neurons);
    if (st) {
        st->n_tokens += 1;
        st->n_active += n;
        st->n_computed += n;
        count_neurons(counts, m->neurons, n);
    }
    ffn_sparse_tail(m, l, xb, m->neurons, n, next);
}

/* one token: the predictor picks neurons; gate/up/down run for those alone. A predicted
 * neuron whose gate turns out inactive is dropped (it contributes zero). */
static void ffn_predictor(ps_model *m, const ps_layer_weights *l, mat_input *xb, float threshold,
                          ps_layer_stats *st, int64_t *counts, const ps_tensor *next) {
    const ps_config *c = &m->c;
    mat_input residual = input_of(m->x, &m->x_q8);
    matvec1_then(m, &l->fc1, m->pred_hidden, c->predictor_input == PS_PREDICTOR_INPUT_NORMED ? xb : &residual, 1,
                 &l->fc2);
    for (int64_t r = 0; r < l->fc1.ne1; r++) m->pred_hidden[r] = m->pred_hidden[r] > 0.0f ? m->pred_hidden[r] : 0.0f;
    mat_input hidden = input_of(m->pred_hidden, &m->hidden_q8);
    matvec1(m, &l->fc2, m->pred_logits, &hidden, 1);
    /* without a branch: which logits pass is close to a coin toss at 20-50% predicted, and a
     * mispredicted branch per neuron cost 3% of predictor-mode decode (perf, Zen 3) */
    int64_t n_predicted = 0;
    for (int32_t i = 0; i < c->n_ff; i++) {
        m->neurons[n_predicted] = i;
        n_predicted += m->pred_logits[i] >= threshold;
    }

    int64_t n;
    if (st) {
        /* the exact gate of every neuron, to count what the predictor missed */
        matvec1(m, &l->ffn_gate, m->hb, xb, 1);
        const int64_t n_active = collect_active(m, NULL, c->n_ff, m->exact_active);
        st->n_active += n_active;
        count_neurons(counts, m->exact_active, n_active);
        n = 0;
        for (int64_t j = 0; j < n_predicted; j++)
            if (m->hb[m->neurons[j]] != 0.0f) m->neurons[n++] = m->neurons[j];
        st->n_tokens += 1;
        st->n_predicted += n_predicted;
        st->n_predicted_active += n;
    } else {
        matmul_target gate = some_rows(&l->ffn_gate, m->hb, m->neurons, n_predicted);
        matmul(m, &gate, 1, xb, 1);
        n = collect_active(m, m->neurons, n_predicted, m->neurons);
    }
    if (st) st->n_computed += n;
    ffn_sparse_tail(m, l, xb, m->neurons, n, next);
}

/* the first matrix layer L + 1 reads (the head's after the last layer) */
static const ps_tensor *next_layer_weights(const ps_model *m, int L) {
    return L + 1 < m->c.n_layer ? &m->layers[L + 1].wq : &m->output;
}

/* the first matrix the feed-forward reads whole, one token in the model's sparse mode */
static const ps_tensor *ffn_first_weights(const ps_model *m, const ps_layer_weights *l, int batch) {
    return batch == 1 && m->sparse_mode == PS_SPARSE_PREDICTOR ? &l->fc1 : &l->ffn_gate;
}

static void ffn(ps_model *m, int L, int batch) {
    const ps_layer_weights *l = &m->layers[L];
    ps_layer_stats *st = m->stats_on ? &m->stats[L] : NULL;
    int64_t *counts = st ? m->neuron_counts + (int64_t)L * m->c.n_ff : NULL;
    mat_input xb = input_of(m->xb, &m->xb_q8);
    const ps_tensor *next = next_layer_weights(m, L);
    if (batch == 1 && m->sparse_mode == PS_SPARSE_PREDICTOR) ffn_predictor(m, l, &xb, m->pred_threshold[L], st, counts, next);
    else if (batch == 1 && m->sparse_mode == PS_SPARSE_EXACT) ffn_exact(m, l, &xb, st, counts, next);
    else ffn_dense(m, l, &xb, batch, st, counts, next);
}

/* ------------------------------------------------------------------------------------------
 * The forward pass over a chunk of tokens
 * ---------------------------------------------------------------------------------------- */

static void forward_chunk(ps_model *m, const int32_t *tokens, int batch, int pos0, float *logits, int all_logits) {
    const ps_config *c = &m->c;
    const int dim = c->n_embd, qd = q_dim(c), kvd = kv_dim(c);
    const ps_type_traits *embd_tt = ps_type_traits_for(m->tok_embd.type, -1);
    const size_t embd_row_bytes = ps_row_bytes(m->tok_embd.type, dim);
    const ps_type_traits *kv = ps_type_traits_for(m->kv_type, -1);
    float *tmp = m->row_buf; /* thread 0's row buffer doubles as scratch for norm weights */

    for (int b = 0; b < batch; b++) {
        float *x = m->x + (int64_t)b * dim;
        embd_tt->to_float((const char *)m->tok_embd.data + (size_t)tokens[b] * embd_row_bytes, x, dim);
        if (c->embd_scale != 1.0f)
            for (int i = 0; i < dim; i++) x[i] *= c->embd_scale;
    }

    /* the positions' RoPE angles, the same in every layer */
    for (int b = 0; b < batch; b++) rope_angles(m, pos0 + b, m->rope_cos_sin + (int64_t)b * c->n_rot);

    for (int L = 0; L < c->n_layer; L++) {
        const ps_layer_weights *l = &m->layers[L];

        /* attention */
        for (int b = 0; b < batch; b++)
            rmsnorm(m->xb + (int64_t)b * dim, m->x + (int64_t)b * dim, &l->attn_norm, dim, c->rms_eps, tmp);
        matmul_target qkv[3] = { all_rows(&l->wq, m->q), all_rows(&l->wk, m->k), all_rows(&l->wv, m->v) };
        mat_input xb = input_of(m->xb, &m->xb_q8);
        matmul_then(m, qkv, 3, &xb, batch, &l->wo);
        for (int b = 0; b < batch; b++) {
            const int pos = pos0 + b;
            const float *cos_sin = m->rope_cos_sin + (int64_t)b * c->n_rot;
            rope(m->q + (int64_t)b * qd, c->n_head, c->head_dim, c->n_rot, cos_sin);
            rope(m->k + (int64_t)b * kvd, c->n_head_kv, c->head_dim, c->n_rot, cos_sin);
            /* in the cache's type (F32: a copy) */
            const size_t at = ((size_t)L * (size_t)m->n_ctx + (size_t)pos) * ps_row_bytes(m->kv_type, kvd);
            kv->from_float(m->k + (int64_t)b * kvd, m->k_cache + at, kvd);
            kv->from_float(m->v + (int64_t)b * kvd, m->v_cache + at, kvd);
        }
        attention_job att = { .m = m, .layer = L, .batch = batch, .pos0 = pos0 };
        atomic_init(&att.next, 0);
        for (int h = 0; h < c->n_head_kv; h++) atomic_store_explicit(&m->att_done[h], 0, memory_order_relaxed);
        ps_threadpool_run(m->pool, attention_task, &att);
        mat_input att_in = input_of(m->att_out, &m->att_q8);
        matvec1_then(m, &l->wo, m->xb2, &att_in, batch, ffn_first_weights(m, l, batch));
        for (int64_t i = 0; i < (int64_t)batch * dim; i++) m->x[i] += c->residual_scale * m->xb2[i];

        /* feed-forward */
        for (int b = 0; b < batch; b++)
            rmsnorm(m->xb + (int64_t)b * dim, m->x + (int64_t)b * dim, &l->ffn_norm, dim, c->rms_eps, tmp);
        ffn(m, L, batch);
        for (int64_t i = 0; i < (int64_t)batch * dim; i++) m->x[i] += c->residual_scale * m->xb2[i];
    }

    /* head: logits for every token of the chunk, or only the last */
    if (!logits) return;
    const int first = all_logits ? 0 : batch - 1;
    const int n_out = batch - first;
    for (int b = first; b < batch; b++) {
        float *xb = m->xb + (int64_t)(b - first) * dim;
        rmsnorm(xb, m->x + (int64_t)b * dim, &m->output_norm, dim, c->rms_eps, tmp);
        if (c->logit_scale != 1.0f)
            for (int i = 0; i < dim; i++) xb[i] *= c->logit_scale;
    }
    mat_input xb = input_of(m->xb, &m->xb_q8);
    matvec1(m, &m->output, logits, &xb, n_out);
}

int32_t ps_model_eval(ps_model *m, const int32_t *tokens, int32_t n_tokens, int32_t n_past,
                      float *logits, int32_t all_logits, char *err, int32_t err_len) {
    if (!m || !tokens || (!logits && all_logits)) { set_error(err, err_len, "null argument"); return -1; }
    if (n_tokens <= 0) { set_error(err, err_len, "no tokens to evaluate"); return -1; }
    if (n_past < 0 || (int64_t)n_past + n_tokens > m->n_ctx) {
        set_error(err, err_len, "context full: %d tokens after %d past tokens exceed n_ctx = %d",
                  n_tokens, n_past, m->n_ctx);
        return -1;
    }
    for (int i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->c.n_vocab) {
            set_error(err, err_len, "token id %d at index %d is outside the vocabulary [0, %d)",
                      tokens[i], i, m->c.n_vocab);
            return -1;
        }
    }
    for (int done = 0; done < n_tokens;) {
        const int batch = n_tokens - done < MAX_BATCH ? n_tokens - done : MAX_BATCH;
        const int last_chunk = done + batch == n_tokens;
        /* an intermediate chunk of a prompt only fills the KV cache: no head (nor any chunk
         * without logits) */
        float *out = all_logits ? logits + (int64_t)done * m->c.n_vocab : last_chunk ? logits : NULL;
        forward_chunk(m, tokens + done, batch, n_past + done, out, all_logits);
        done += batch;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Construction: every tensor checked against the config before anything is computed
 * ---------------------------------------------------------------------------------------- */

static int check_tensor(const ps_tensor *t, const char *name, int64_t ne0, int64_t ne1, int required,
                        char *err, int32_t err_len) {
    if (!t->data) {
        if (!required) return 0;
        set_error(err, err_len, "tensor %s is missing", name);
        return -1;
    }
    const ps_type_traits *tt = ps_type_traits_for(t->type, -1);
    if (!tt) { set_error(err, err_len, "tensor %s has unsupported type id %d", name, t->type); return -1; }
    if (t->ne0 != ne0 || t->ne1 != ne1) {
        set_error(err, err_len, "tensor %s has shape (%lld, %lld), expected (%lld, %lld)", name,
                  (long long)t->ne0, (long long)t->ne1, (long long)ne0, (long long)ne1);
        return -1;
    }
    if (ne0 % tt->block_size != 0) {
        set_error(err, err_len, "tensor %s: row length %lld is not a multiple of the %s block size %lld",
                  name, (long long)ne0, tt->name, (long long)tt->block_size);
        return -1;
    }
    return 0;
}

static int check_config(const ps_config *c, int32_t n_ctx, int32_t n_threads, char *err, int32_t err_len) {
    if (c->arch != PS_ARCH_LLAMA && c->arch != PS_ARCH_MINICPM) {
        set_error(err, err_len, "unknown architecture id %d", c->arch); return -1;
    }
    if (c->n_vocab <= 0 || c->n_embd <= 0 || c->n_layer <= 0 || c->n_head <= 0 || c->n_head_kv <= 0 ||
        c->head_dim <= 0 || c->n_ff <= 0) {
        set_error(err, err_len, "hyper-parameters must be positive (n_vocab %d, n_embd %d, n_layer %d, "
                  "n_head %d, n_head_kv %d, head_dim %d, n_ff %d)", c->n_vocab, c->n_embd, c->n_layer,
                  c->n_head, c->n_head_kv, c->head_dim, c->n_ff);
        return -1;
    }
    if (c->n_head % c->n_head_kv != 0) {
        set_error(err, err_len, "n_head %d is not a multiple of n_head_kv %d", c->n_head, c->n_head_kv); return -1;
    }
    if (c->n_rot <= 0 || c->n_rot > c->head_dim || c->n_rot % 2 != 0) {
        set_error(err, err_len, "rope dimension count %d must be even and in (0, head_dim = %d]", c->n_rot, c->head_dim);
        return -1;
    }
    if (c->activation < PS_ACT_SILU || c->activation > PS_ACT_FATRELU) {
        set_error(err, err_len, "unknown activation id %d", c->activation); return -1;
    }
    if (!(c->rms_eps > 0.0f) || !(c->rope_base > 0.0f)) {
        set_error(err, err_len, "rms epsilon (%g) and rope base (%g) must be positive", c->rms_eps, c->rope_base);
        return -1;
    }
    if (c->predictor_input != PS_PREDICTOR_INPUT_RESIDUAL && c->predictor_input != PS_PREDICTOR_INPUT_NORMED) {
        set_error(err, err_len, "unknown predictor input id %d", c->predictor_input); return -1;
    }
    if (n_ctx <= 0) { set_error(err, err_len, "n_ctx must be positive, got %d", n_ctx); return -1; }
    if (n_threads < 1 || n_threads > 512) {
        set_error(err, err_len, "n_threads must be in [1, 512], got %d", n_threads); return -1;
    }
    return 0;
}

static int check_weights(const ps_config *c, const ps_tensor *tok_embd, const ps_tensor *output_norm,
                         const ps_tensor *output, const ps_layer_weights *layers, char *err, int32_t err_len) {
    const int64_t dim = c->n_embd, qd = q_dim(c), kvd = kv_dim(c), ff = c->n_ff;
    if (check_tensor(tok_embd, "token_embd.weight", dim, c->n_vocab, 1, err, err_len) ||
        check_tensor(output_norm, "output_norm.weight", dim, 1, 1, err, err_len) ||
        check_tensor(output, "output.weight", dim, c->n_vocab, 0, err, err_len))
        return -1;
    char name[64];
#define CHECK(field, tname, ne0, ne1, required)                                              \
    do {                                                                                      \
        snprintf(name, sizeof name, "blk.%d.%s.weight", L, tname);                            \
        if (check_tensor(&l->field, name, ne0, ne1, required, err, err_len)) return -1;       \
    } while (0)
    for (int L = 0; L < c->n_layer; L++) {
        const ps_layer_weights *l = &layers[L];
        CHECK(attn_norm, "attn_norm", dim, 1, 1);
        CHECK(wq, "attn_q", dim, qd, 1);
        CHECK(wk, "attn_k", dim, kvd, 1);
        CHECK(wv, "attn_v", dim, kvd, 1);
        CHECK(wo, "attn_output", qd, dim, 1);
        CHECK(ffn_norm, "ffn_norm", dim, 1, 1);
        CHECK(ffn_gate, "ffn_gate", dim, ff, 1);
        CHECK(ffn_up, "ffn_up", dim, ff, 1);
        CHECK(ffn_down, "ffn_down", ff, dim, 0);
        CHECK(ffn_down_t, "ffn_down_t", dim, ff, !l->ffn_down.data);
        if (l->fc1.data || l->fc2.data) {
            CHECK(fc1, "fc1", dim, l->fc1.ne1, 1);
            CHECK(fc2, "fc2", l->fc1.ne1, ff, 1);
        }
    }
#undef CHECK
    return 0;
}

/* zeroed, starting on a cache line (calloc puts large blocks 16 bytes past a page, small ones
 * anywhere 16 apart): a kernel's 64-byte loads of a tile or an input then never straddle two
 * lines, and threads that write neighbouring slices of one buffer (the down projection's
 * output) share no line */
static void *alloc_lines(int64_t bytes, int *failed) {
    const size_t n = ((size_t)(bytes > 0 ? bytes : 1) + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;
    void *p = aligned_alloc(CACHE_LINE, n);
    if (!p) *failed = 1;
    else memset(p, 0, n);
    return p;
}

static void *alloc_floats(int64_t n, int *failed) { return alloc_lines(n * (int64_t)sizeof(float), failed); }

/* a KV cache, starting on a cache line (attention's loads of a head's keys and values then
 * never straddle two): calloc'ed a line longer than needed, not aligned_alloc'ed and zeroed, so
 * its pages become resident as positions are written, not at once. *mem gets what to free. */
static char *alloc_cache(const ps_config *c, int32_t n_ctx, size_t elem, void **mem, int *failed) {
    *mem = calloc((size_t)c->n_layer * (size_t)n_ctx * (size_t)kv_dim(c) * elem + CACHE_LINE, 1);
    if (!*mem) { *failed = 1; return NULL; }
    return (char *)(((uintptr_t)*mem + CACHE_LINE - 1) & ~(uintptr_t)(CACHE_LINE - 1));
}

/* room for n values quantised to 8 bits (whole blocks of 32), with their codes in the AVX2 Q4
 * dots' order too where dots will read them (with_q4) */
static ps_q8_vec alloc_q8(int64_t n, int with_q4, int *failed) {
    return (ps_q8_vec){ alloc_lines(n, failed), alloc_floats(n / 32, failed), alloc_floats(n / 32, failed),
                        with_q4 ? alloc_lines(n, failed) : NULL };
}

static void free_q8(ps_q8_vec *v) {
    free(v->qs); free(v->d); free(v->s); free(v->q4);
}

/* whether a type has a kernel for activations in Q8 mode: an integer one (dot_q8), or a bf16 one
 * (dot_bf16: BF16 rows where the CPU has AVX512-BF16) */
static int has_dot_q8(int type) { return ps_type_traits_for(type, -1)->dot_q8 != NULL; }
static int has_dot_bf16(int type) { return ps_type_traits_for(type, -1)->dot_bf16 != NULL; }
static int has_gemm_q8(int type) { return ps_type_traits_for(type, -1)->gemm_q8 != NULL; }

/* 1 if some matrix a mat-mul reads is of a type for which has(type) */
static int any_matrix(const ps_model *m, int (*has)(int type)) {
    int any = has(m->output.type);
    for (int L = 0; L < m->c.n_layer; L++) {
        const ps_layer_weights *l = &m->layers[L];
        const ps_tensor *mats[] = { &l->wq, &l->wk, &l->wv, &l->wo, &l->ffn_gate, &l->ffn_up, &l->ffn_down,
                                    &l->fc1, &l->fc2 };
        for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++) any |= mats[i]->data && has(mats[i]->type);
    }
    return any;
}

ps_model *ps_model_create(const ps_config *cfg, const ps_tensor *tok_embd, const ps_tensor *output_norm,
                          const ps_tensor *output, const ps_layer_weights *layers, int32_t n_ctx,
                          int32_t n_threads, char *err, int32_t err_len) {
    if (!cfg || !tok_embd || !output_norm || !output || !layers) {
        set_error(err, err_len, "null argument"); return NULL;
    }
    if (check_config(cfg, n_ctx, n_threads, err, err_len) ||
        check_weights(cfg, tok_embd, output_norm, output, layers, err, err_len))
        return NULL;

    ps_model *m = calloc(1, sizeof *m);
    if (!m) { set_error(err, err_len, "out of memory"); return NULL; }
    m->c = *cfg;
    m->tok_embd = *tok_embd;
    m->output_norm = *output_norm;
    m->output = output->data ? *output : *tok_embd;
    m->n_ctx = n_ctx;
    m->n_threads = n_threads;

    const ps_config *c = &m->c;
    const int64_t dim = c->n_embd, kvd = kv_dim(c), qd = q_dim(c), ff = c->n_ff;
    int64_t max_row = dim > qd ? dim : qd;
    if (ff > max_row) max_row = ff;
    m->row_buf_len = max_row;
    int64_t max_rank = 1;
    m->has_predictor = 1;
    for (int L = 0; L < c->n_layer; L++) {
        if (!layers[L].fc1.data) m->has_predictor = 0;
        else if (layers[L].fc1.ne1 > max_rank) max_rank = layers[L].fc1.ne1;
    }
    if (max_rank > max_row) m->row_buf_len = max_row = max_rank;

    int failed = 0;
    m->layers = calloc((size_t)c->n_layer, sizeof(ps_layer_weights));
    if (!m->layers) failed = 1;
    else memcpy(m->layers, layers, (size_t)c->n_layer * sizeof(ps_layer_weights));
    m->kv_type = PS_TYPE_F32;
    m->k_cache = alloc_cache(c, n_ctx, sizeof(float), &m->k_cache_mem, &failed);
    m->v_cache = alloc_cache(c, n_ctx, sizeof(float), &m->v_cache_mem, &failed);
    m->x = alloc_floats(MAX_BATCH * dim, &failed);
    m->xb = alloc_floats(MAX_BATCH * dim, &failed);
    m->xb2 = alloc_floats(MAX_BATCH * dim, &failed);
    m->q = alloc_floats(MAX_BATCH * qd, &failed);
    m->k = alloc_floats(MAX_BATCH * kvd, &failed);
    m->v = alloc_floats(MAX_BATCH * kvd, &failed);
    m->att_out = alloc_floats(MAX_BATCH * qd, &failed);
    m->hb = alloc_floats(MAX_BATCH * ff, &failed);
    m->hb2 = alloc_floats(MAX_BATCH * ff, &failed);
    m->scores = alloc_floats((int64_t)n_threads * n_ctx, &failed);
    m->att_part = alloc_floats((int64_t)c->n_head * att_spans(n_ctx) * (c->head_dim + 2), &failed);
    m->att_scratch = alloc_floats((int64_t)n_threads * att_prompt_floats(c), &failed);
    m->att_done = calloc((size_t)c->n_head_kv, sizeof(atomic_int));
    if (!m->att_done) failed = 1;
    m->row_buf = alloc_floats((int64_t)n_threads * ROW_CHUNK * max_row, &failed);
    m->down_tile = alloc_floats((int64_t)n_threads * H_BLOCK * dim, &failed);
    m->pred_threshold = alloc_floats(c->n_layer, &failed);
    m->rope_inv_freq = alloc_floats(c->n_rot / 2, &failed);
    m->rope_cos_sin = alloc_floats((int64_t)MAX_BATCH * c->n_rot, &failed);
    m->pred_hidden = alloc_floats(max_rank, &failed);
    m->pred_logits = alloc_floats(ff, &failed);
    m->xb_q8 = alloc_q8(dim, 1, &failed);
    m->att_q8 = alloc_q8(qd, 1, &failed);
    m->x_q8 = alloc_q8(dim, 1, &failed);
    m->hidden_q8 = alloc_q8(max_rank, 1, &failed);
    m->hb_q8 = alloc_q8(ff, 1, &failed);
    if (m->layers && any_matrix(m, has_dot_bf16))
        m->in_bf16 = alloc_lines(MAX_BATCH * max_row * (int64_t)sizeof(uint16_t), &failed);
    if (m->layers && any_matrix(m, has_gemm_q8)) {
        const int64_t lanes = ps_q8_batch_groups(MAX_BATCH) * PS_Q8_BATCH_LANES;
        m->in_q8b = (ps_q8_batch){ alloc_lines(lanes * max_row, &failed), alloc_floats(lanes * max_row / 32, &failed),
                                   alloc_floats(lanes * max_row / 32, &failed),
                                   alloc_lines(lanes * max_row / 32 * (int64_t)sizeof(int32_t), &failed) };
        m->in_q8b_tmp = calloc((size_t)n_threads, sizeof(ps_q8_vec));
        if (!m->in_q8b_tmp) failed = 1;
        for (int i = 0; m->in_q8b_tmp && i < n_threads; i++) m->in_q8b_tmp[i] = alloc_q8(max_row, 0, &failed);
    }
    m->neurons = calloc((size_t)ff, sizeof(int32_t));
    m->exact_active = calloc((size_t)ff, sizeof(int32_t));
    m->stats = calloc((size_t)c->n_layer, sizeof(ps_layer_stats));
    m->neuron_counts = calloc((size_t)c->n_layer * (size_t)ff, sizeof(int64_t));
    if (!m->neurons || !m->exact_active || !m->stats || !m->neuron_counts) failed = 1;
    if (failed) {
        set_error(err, err_len, "out of memory allocating the KV cache and buffers (n_ctx = %d)", n_ctx);
        ps_model_free(m);
        return NULL;
    }
    for (int i = 0; i < c->n_rot / 2; i++) m->rope_inv_freq[i] = powf(c->rope_base, -2.0f * (float)i / (float)c->n_rot);
    m->activations = PS_ACTIVATIONS_Q8;
    m->q8_mode_applies = any_matrix(m, has_dot_q8) || m->in_bf16 != NULL;
    m->pool = ps_threadpool_create(n_threads);
    if (!m->pool) {
        set_error(err, err_len, "could not start %d threads", n_threads);
        ps_model_free(m);
        return NULL;
    }
    return m;
}

void ps_model_free(ps_model *m) {
    if (!m) return;
    ps_threadpool_free(m->pool);
    free(m->layers);
    free(m->k_cache_mem); free(m->v_cache_mem);
    free(m->x); free(m->xb); free(m->xb2);
    free(m->q); free(m->k); free(m->v); free(m->att_out);
    free(m->hb); free(m->hb2);
    free(m->scores); free(m->att_part); free(m->att_scratch); free(m->att_done); free(m->row_buf); free(m->down_tile); free(m->in_bf16);
    free(m->rope_inv_freq); free(m->rope_cos_sin);
    free(m->pred_threshold); free(m->pred_hidden); free(m->pred_logits);
    free_q8(&m->xb_q8); free_q8(&m->att_q8); free_q8(&m->x_q8); free_q8(&m->hidden_q8); free_q8(&m->hb_q8);
    free(m->in_q8b.qs); free(m->in_q8b.d); free(m->in_q8b.s); free(m->in_q8b.sum);
    for (int i = 0; m->in_q8b_tmp && i < m->n_threads; i++) free_q8(&m->in_q8b_tmp[i]);
    free(m->in_q8b_tmp);
    free(m->neurons); free(m->exact_active); free(m->stats); free(m->neuron_counts);
    free(m);
}

/* ------------------------------------------------------------------------------------------
 * Sparse mode, predictor thresholds and statistics
 * ---------------------------------------------------------------------------------------- */

int32_t ps_model_set_sparse_mode(ps_model *m, int32_t mode, char *err, int32_t err_len) {
    if (mode < PS_SPARSE_DENSE || mode > PS_SPARSE_PREDICTOR) {
        set_error(err, err_len, "unknown sparse mode %d", mode); return -1;
    }
    if (mode == PS_SPARSE_PREDICTOR && !m->has_predictor) {
        set_error(err, err_len, "predictor mode needs predictor tensors (blk.N.fc1.weight, blk.N.fc2.weight) "
                  "in every layer; this model has none"); return -1;
    }
    m->sparse_mode = mode;
    return 0;
}

int32_t ps_model_sparse_mode(const ps_model *m) { return m->sparse_mode; }

int32_t ps_model_set_activations(ps_model *m, int32_t mode, char *err, int32_t err_len) {
    if (mode != PS_ACTIVATIONS_F32 && mode != PS_ACTIVATIONS_Q8) {
        set_error(err, err_len, "unknown activations mode %d", mode); return -1;
    }
    m->activations = mode;
    return 0;
}

int32_t ps_model_activations(const ps_model *m) { return m->activations; }

int32_t ps_model_set_kv_type(ps_model *m, int32_t type, char *err, int32_t err_len) {
    if (type != PS_TYPE_F32 && type != PS_TYPE_F16) {
        set_error(err, err_len, "unknown KV cache type %d (F32 = %d or F16 = %d)", type, PS_TYPE_F32, PS_TYPE_F16);
        return -1;
    }
    const size_t elem = ps_row_bytes(type, 1);
    void *k_mem = NULL, *v_mem = NULL;
    int failed = 0;
    char *k = alloc_cache(&m->c, m->n_ctx, elem, &k_mem, &failed);
    char *v = alloc_cache(&m->c, m->n_ctx, elem, &v_mem, &failed);
    if (failed) {
        free(k_mem); free(v_mem);
        set_error(err, err_len, "out of memory allocating the KV cache (n_ctx = %d)", m->n_ctx);
        return -1;
    }
    free(m->k_cache_mem); free(m->v_cache_mem);
    m->k_cache = k, m->v_cache = v, m->k_cache_mem = k_mem, m->v_cache_mem = v_mem;
    m->kv_type = type;
    return 0;
}

int32_t ps_model_kv_type(const ps_model *m) { return m->kv_type; }
int32_t ps_model_q8_mode_applies(const ps_model *m) { return m->q8_mode_applies; }
int32_t ps_model_has_predictor(const ps_model *m) { return m->has_predictor; }

void ps_model_set_predictor_threshold(ps_model *m, int32_t layer, float threshold) {
    for (int L = 0; L < m->c.n_layer; L++)
        if (layer < 0 || layer == L) m->pred_threshold[L] = threshold;
}

float ps_model_predictor_threshold(const ps_model *m, int32_t layer) {
    return layer >= 0 && layer < m->c.n_layer ? m->pred_threshold[layer] : NAN;
}

void ps_model_set_stats(ps_model *m, int32_t enabled) { m->stats_on = enabled != 0; }

void ps_model_reset_stats(ps_model *m) {
    memset(m->stats, 0, (size_t)m->c.n_layer * sizeof(ps_layer_stats));
    memset(m->neuron_counts, 0, (size_t)m->c.n_layer * (size_t)m->c.n_ff * sizeof(int64_t));
}

void ps_model_get_stats(const ps_model *m, ps_layer_stats *out) {
    memcpy(out, m->stats, (size_t)m->c.n_layer * sizeof(ps_layer_stats));
}

int32_t ps_model_get_neuron_counts(const ps_model *m, int32_t layer, int64_t *out) {
    if (layer < 0 || layer >= m->c.n_layer) return -1;
    memcpy(out, m->neuron_counts + (int64_t)layer * m->c.n_ff, (size_t)m->c.n_ff * sizeof(int64_t));
    return 0;
}

int32_t ps_model_n_ctx(const ps_model *m) { return m->n_ctx; }
int32_t ps_model_n_threads(const ps_model *m) { return ps_threadpool_size(m->pool); }
