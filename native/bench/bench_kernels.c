/* Mat-vec throughput of every type x ISA: dot and axpy over the rows of a (rows, cols) matrix,
 * as the forward pass uses them. Reports weight bytes streamed per second.
 *
 *   gcc -std=c11 -O3 -pthread -Inative native/bench/bench_kernels.c native/kernels.c -lm \
 *       -o /tmp/bench_kernels && /tmp/bench_kernels [rows cols]      (default 1536 576)
 */
#define _POSIX_C_SOURCE 199309L
#include "kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* best of 5 runs of enough passes over the matrix to take ~20 ms each; returns seconds/pass */
static double time_pass(const ps_type_traits *t, int axpy, const char *w, size_t row_bytes,
                        int rows, int cols, const float *x, float *y) {
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        int passes = 0;
        const double t0 = now_s();
        do {
            for (int r = 0; r < rows; r++) {
                if (axpy) t->axpy(x[r % cols] * 1e-3f, w + r * row_bytes, y, cols);
                else      y[r % cols] += t->dot(w + r * row_bytes, x, cols);
            }
            passes++;
        } while (now_s() - t0 < 0.02);
        const double per_pass = (now_s() - t0) / passes;
        if (per_pass < best) best = per_pass;
    }
    return best;
}

int main(int argc, char **argv) {
    const int rows = argc > 2 ? atoi(argv[1]) : 1536, cols = argc > 2 ? atoi(argv[2]) : 576;
    const int types[] = { PS_TYPE_F32, PS_TYPE_F16, PS_TYPE_BF16, PS_TYPE_Q8_0, PS_TYPE_Q4_0, PS_TYPE_Q4_1 };
    float *src = malloc(sizeof(float) * rows * cols), *x = malloc(sizeof(float) * cols), *y = calloc(cols, sizeof(float));
    for (long i = 0; i < (long)rows * cols; i++) src[i] = (float)((i * 7919) % 2001 - 1000) * 1e-3f;
    for (int i = 0; i < cols; i++) x[i] = (float)(i % 13) - 6.0f;

    printf("%d x %d, GB/s of weights (dot / axpy)\n%-6s", rows, cols, "");
    for (int isa = 0; isa < PS_ISA_COUNT; isa++)
        if (ps_kernels_isa_available(isa)) printf(" %17s", ps_kernels_isa_name(isa));
    printf("\n");
    for (size_t k = 0; k < sizeof(types) / sizeof(types[0]); k++) {
        const ps_type_traits *ref = ps_type_traits_for(types[k], PS_ISA_SCALAR);
        const size_t row_bytes = ps_row_bytes(types[k], cols);
        char *w = malloc(row_bytes * rows);
        for (int r = 0; r < rows; r++) ref->from_float(src + (long)r * cols, w + r * row_bytes, cols);
        printf("%-6s", ref->name);
        for (int isa = 0; isa < PS_ISA_COUNT; isa++) {
            const ps_type_traits *t = ps_type_traits_for(types[k], isa);
            if (!t) continue;
            const double gb = row_bytes * rows * 1e-9;
            printf("   %6.1f / %6.1f", gb / time_pass(t, 0, w, row_bytes, rows, cols, x, y),
                   gb / time_pass(t, 1, w, row_bytes, rows, cols, x, y));
        }
        printf("\n");
        free(w);
    }
    fprintf(stderr, "(checksum %g)\n", (double)y[0]);
    free(src); free(x); free(y);
    return 0;
}
