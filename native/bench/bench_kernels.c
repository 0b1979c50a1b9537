/* Mat-vec throughput of every type x ISA: dot, axpy, axpy4 and (integer types) dot_q8 over the rows of
 * a (rows, cols) matrix, as the forward pass uses them. Reports weight bytes streamed per
 * second. The dot_q8 figure includes quantising x once per pass, as the forward pass does once
 * per mat-vec. Then the prompt GEMM of the integer types with a batch of PROMPT_TOKENS, in takes
 * of 16 rows as the forward pass runs it, in G multiply-adds per second: gemm_q8 (the batch
 * packed once per pass) against dequantising each take into a tile for the f32 GEMM. Time is
 * this thread's CPU time, so that other processes sharing the core (a busy machine) slow the
 * figures less.
 *
 *   gcc -std=c11 -O3 -pthread -Inative native/bench/bench_kernels.c native/kernels.c -lm \
 *       -o /tmp/bench_kernels && /tmp/bench_kernels [rows cols [best_of]]      (default 1536 576)
 *
 * With best_of, each mat-vec figure is the fastest of that many single passes instead of the
 * best of 5 runs of ~20 ms: on a host whose other tenants take the core in bursts, the fastest
 * pass of a matrix that fits in L2 (e.g. 256 576 3000) is the kernel's own speed.
 * BENCH_NO_Q4=1 in the environment leaves x without its codes in the AVX2 Q4 order (ps_q8_vec's
 * q4), as callers other than the runtime may.
 */
#define _POSIX_C_SOURCE 199309L
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { DOT, AXPY, AXPY4, DOT_Q8, DOT4_Q8, DOT8_Q8, DOT_BF16 };

static uint16_t *x_bf16;   /* (cols) x rounded to bf16, for DOT_BF16 */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define PROMPT_TOKENS 128
#define TAKE 16

/* seconds per pass of a prompt batch over the matrix (best of 5): gemm_q8 (q8 = 1) or
 * to_float + the f32 GEMM */
static double time_prompt(int type, int isa, int q8, const char *w, size_t row_bytes, int rows, int cols,
                          const float *xs, const ps_q8_vec *tmp, const ps_q8_batch *xb, float *tile, float *c) {
    const ps_type_traits *t = ps_type_traits_for(type, isa);
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        int passes = 0;
        const double t0 = now_s();
        do {
            if (q8) ps_quantize_q8_batch_isa(isa, xs, PROMPT_TOKENS, cols, tmp, xb);
            for (int r = 0; r + TAKE <= rows; r += TAKE) {
                if (q8) {
                    ps_gemm_q8_isa(isa, type, w + (size_t)r * row_bytes, TAKE, xb, PROMPT_TOKENS, cols, c + r, rows);
                    continue;
                }
                for (int q = 0; q < TAKE; q++) t->to_float(w + (size_t)(r + q) * row_bytes, tile + (size_t)q * cols, cols);
                ps_gemm_nt_f32_isa(isa, tile, cols, TAKE, xs, cols, PROMPT_TOKENS, cols, c + r, rows);
            }
            passes++;
        } while (now_s() - t0 < 0.05);
        const double per_pass = (now_s() - t0) / passes;
        if (per_pass < best) best = per_pass;
    }
    return best;
}

static int best_of;   /* 0: best of 5 runs of ~20 ms; else the fastest of this many single passes */

/* best of 5 runs of enough passes over the matrix to take ~20 ms each (or best_of runs of one
 * pass); returns seconds/pass */
static double time_pass(const ps_type_traits *t, int isa, int kernel, const char *w, size_t row_bytes,
                        int rows, int cols, const float *x, const ps_q8_vec *xq, float *y) {
    double best = 1e30;
    for (int rep = 0; rep < (best_of ? best_of : 5); rep++) {
        int passes = 0;
        const double t0 = now_s();
        do {
            if (kernel == DOT_Q8) ps_quantize_q8_isa(isa, x, xq, cols);
            if (kernel == DOT_BF16) ps_f32_ops_for(isa)->to_bf16(x, x_bf16, cols);
            if (kernel == DOT4_Q8 || kernel == DOT8_Q8) {   /* rows in fours (eights), as the mat-vec calls it */
                const int width = kernel == DOT4_Q8 ? 4 : 8;
                for (int r = 0; r + width <= rows; r += width) {
                    const void *rs[8];
                    float out[8];
                    for (int q = 0; q < width; q++) rs[q] = w + (size_t)(r + q) * row_bytes;
                    if (width == 4) t->dot4_q8(rs, xq, cols, out);
                    else            t->dot8_q8(rs, xq, cols, out);
                    for (int q = 0; q < width; q++) y[r % cols] += out[q];
                }
                passes++;
                continue;
            }
            if (kernel == AXPY4) {   /* rows in fours, as the sparse down projection calls it */
                for (int r = 0; r + 4 <= rows; r += 4) {
                    const void *rs[4] = { w + r * row_bytes, w + (r + 1) * row_bytes, w + (r + 2) * row_bytes,
                                          w + (r + 3) * row_bytes };
                    const float a[4] = { x[r % cols] * 1e-3f, x[(r + 1) % cols] * 1e-3f, x[(r + 2) % cols] * 1e-3f,
                                         x[(r + 3) % cols] * 1e-3f };
                    t->axpy4(a, rs, y, cols);
                }
                passes++;
                continue;
            }
            for (int r = 0; r < rows; r++) {
                const char *row = w + r * row_bytes;
                switch (kernel) {
                case DOT:  y[r % cols] += t->dot(row, x, cols); break;
                case AXPY: t->axpy(x[r % cols] * 1e-3f, row, y, cols); break;
                case DOT_BF16: y[r % cols] += t->dot_bf16(row, x_bf16, cols); break;
                default:   y[r % cols] += t->dot_q8(row, xq, cols); break;
                }
            }
            passes++;
        } while (now_s() - t0 < (best_of ? 0.0 : 0.02));
        const double per_pass = (now_s() - t0) / passes;
        if (per_pass < best) best = per_pass;
    }
    return best;
}

/* one column heading per ISA this CPU runs, each `width` wide, then a newline */
static void print_isas(int width) {
    for (int isa = 0; isa < PS_ISA_COUNT; isa++)
        if (ps_kernels_isa_available(isa)) printf(" %*s", width, ps_kernels_isa_name(isa));
    printf("\n");
}

/* rows x cols of src in type's blocks (malloc'ed), its name printed as the table row's start */
static char *matrix_of(int type, const float *src, int rows, int cols) {
    const ps_type_traits *ref = ps_type_traits_for(type, PS_ISA_SCALAR);
    const size_t row_bytes = ps_row_bytes(type, cols);
    char *w = malloc(row_bytes * rows);
    for (int r = 0; r < rows; r++) ref->from_float(src + (long)r * cols, w + r * row_bytes, cols);
    printf("%-6s", ref->name);
    return w;
}

int main(int argc, char **argv) {
    const int rows = argc > 2 ? atoi(argv[1]) : 1536, cols = argc > 2 ? atoi(argv[2]) : 576;
    best_of = argc > 3 ? atoi(argv[3]) : 0;
    if (rows <= 0 || cols <= 0 || cols % 32 != 0 || best_of < 0) {
        fprintf(stderr, "rows must be positive, cols a positive multiple of 32, best_of >= 0\n");
        return 1;
    }
    const int types[] = { PS_TYPE_F32, PS_TYPE_F16, PS_TYPE_BF16, PS_TYPE_Q8_0, PS_TYPE_Q4_0, PS_TYPE_Q4_1 };
    float *src = malloc(sizeof(float) * rows * cols), *x = malloc(sizeof(float) * cols), *y = calloc(cols, sizeof(float));
    x_bf16 = malloc(sizeof(uint16_t) * cols);
    const ps_q8_vec xq = { malloc(cols), malloc(sizeof(float) * (cols / 32)), malloc(sizeof(float) * (cols / 32)),
                           getenv("BENCH_NO_Q4") ? NULL : malloc(cols) };   /* as the runtime quantises */
    for (long i = 0; i < (long)rows * cols; i++) src[i] = (float)((i * 7919) % 2001 - 1000) * 1e-3f;
    for (int i = 0; i < cols; i++) x[i] = (float)(i % 13) - 6.0f;

    printf("%d x %d, GB/s of weights: dot / axpy / axpy4 / dot_q8 (integer types; BF16: dot_bf16 where an ISA has "
           "it) / dot4_q8 / dot8_q8 (where an ISA has them)\n%-6s",
           rows, cols, "");
    print_isas(53);
    for (size_t k = 0; k < sizeof(types) / sizeof(types[0]); k++) {
        const size_t row_bytes = ps_row_bytes(types[k], cols);
        char *w = matrix_of(types[k], src, rows, cols);
        for (int isa = 0; isa < PS_ISA_COUNT; isa++) {
            const ps_type_traits *t = ps_type_traits_for(types[k], isa);
            if (!t) continue;
            const double gb = row_bytes * rows * 1e-9;
            printf("   %6.1f / %6.1f / %6.1f", gb / time_pass(t, isa, DOT, w, row_bytes, rows, cols, x, &xq, y),
                   gb / time_pass(t, isa, AXPY, w, row_bytes, rows, cols, x, &xq, y),
                   gb / time_pass(t, isa, AXPY4, w, row_bytes, rows, cols, x, &xq, y));
            if (t->dot_q8)        printf(" / %6.1f", gb / time_pass(t, isa, DOT_Q8, w, row_bytes, rows, cols, x, &xq, y));
            else if (t->dot_bf16) printf(" / %6.1f", gb / time_pass(t, isa, DOT_BF16, w, row_bytes, rows, cols, x, &xq, y));
            else                  printf("   %6s", "-");
            if (t->dot4_q8) printf(" / %6.1f", gb / time_pass(t, isa, DOT4_Q8, w, row_bytes, rows, cols, x, &xq, y));
            else            printf("   %6s", "-");
            if (t->dot8_q8) printf(" / %6.1f", gb / time_pass(t, isa, DOT8_Q8, w, row_bytes, rows, cols, x, &xq, y));
            else            printf("   %6s", "-");
        }
        printf("\n");
        free(w);
    }
    /* the prompt GEMM */
    float *xs = malloc(sizeof(float) * PROMPT_TOKENS * cols), *tile = malloc(sizeof(float) * TAKE * cols);
    float *c = malloc(sizeof(float) * PROMPT_TOKENS * rows);
    const int64_t lanes = ps_q8_batch_groups(PROMPT_TOKENS) * 16;
    const ps_q8_batch xb = { malloc(lanes * cols), malloc(sizeof(float) * lanes * cols / 32),
                             malloc(sizeof(float) * lanes * cols / 32), malloc(sizeof(int32_t) * lanes * cols / 32) };
    for (long i = 0; i < (long)PROMPT_TOKENS * cols; i++) xs[i] = (float)((i * 104729) % 2003 - 1001) * 1e-3f;
    printf("\nprompt GEMM, %d tokens, G multiply-adds/s: gemm_q8 / dequantised into the f32 GEMM\n%-6s",
           PROMPT_TOKENS, "");
    print_isas(17);
    for (size_t k = 3; k < sizeof(types) / sizeof(types[0]); k++) {   /* the integer types */
        const size_t row_bytes = ps_row_bytes(types[k], cols);
        char *w = matrix_of(types[k], src, rows, cols);
        const double gmac = (double)rows * cols * PROMPT_TOKENS * 1e-9;
        for (int isa = 0; isa < PS_ISA_COUNT; isa++) {
            if (!ps_kernels_isa_available(isa)) continue;
            printf("   %6.1f / %6.1f", gmac / time_prompt(types[k], isa, 1, w, row_bytes, rows, cols, xs, &xq, &xb, tile, c),
                   gmac / time_prompt(types[k], isa, 0, w, row_bytes, rows, cols, xs, &xq, &xb, tile, c));
        }
        printf("\n");
        free(w);
    }
    free(xs); free(tile); free(c); free(xb.qs); free(xb.d); free(xb.s); free(xb.sum);
    fprintf(stderr, "(checksum %g)\n", (double)y[0]);
    free(src); free(x); free(y); free(xq.qs); free(xq.d); free(xq.s);
    return 0;
}
