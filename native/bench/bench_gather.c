/* How fast one core reads scattered rows: the ceiling of the sparse FFN's gathered up rows and
 * down vectors. Reads a random fraction of the rows of a 512 MiB buffer, in increasing order
 * (as the active neurons come), summing every byte with AVX-512 loads (AVX2 where the compiler
 * is not given AVX-512) and nothing else, with
 * software prefetch of the rows `ahead` positions ahead (0: none), and reports GB/s; fraction 1
 * reads every row in order (a stream). Best of 3 passes.
 *
 *   gcc -std=c11 -O2 -march=native native/bench/bench_gather.c -o /tmp/bench_gather
 *   /tmp/bench_gather ROW_BYTES FRACTION AHEAD HUGE
 *       e.g. 640 0.15 16 1: 640-byte rows (SmolLM2's 612-byte Q8_0 rows, rounded to lines),
 *       15% of them, prefetch 16 rows ahead, the buffer asking for 2 MiB pages
 *
 * On the development machine (runtime/BENCHMARKS.md, 2026-11-29): 15% of 640-byte rows 18-23
 * GB/s with any prefetch distance (in one sitting 0, 8, 16 ahead: 19.4-20.0; 32: 18.6; 64:
 * 16.8) and 17.8 with 4 KiB pages, against 36-39 GB/s for all rows in order. On a Zen 3 machine
 * without AVX-512 (2026-11-29, twelfth session): 30% of 640-byte rows 8.3-10.0 GB/s, 10% 6.8,
 * against 18-20 for all of them; 1280- and 2560-byte rows 8.4-10.0 and 11.5-12.4.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define HUGE_PAGE (2u << 20)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s ROW_BYTES FRACTION AHEAD HUGE\n", argv[0]);
        return 1;
    }
    const size_t row_bytes = strtoul(argv[1], NULL, 10);
    const double fraction = atof(argv[2]);
    const int ahead = atoi(argv[3]), huge = atoi(argv[4]);
    if (row_bytes < 64 || row_bytes % 64 != 0 || !(fraction > 0 && fraction <= 1) || ahead < 0) {
        fprintf(stderr, "ROW_BYTES a multiple of 64, FRACTION in (0, 1], AHEAD >= 0\n");
        return 1;
    }
    const size_t n_rows = (512u << 20) / row_bytes, bytes = n_rows * row_bytes;
    char *map = mmap(NULL, bytes + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    char *buf = (char *)(((size_t)map + HUGE_PAGE - 1) & ~(size_t)(HUGE_PAGE - 1));
    madvise(buf, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(buf, 1, bytes);

    size_t *rows = malloc(n_rows * sizeof *rows), n = 0;
    if (!rows) { perror("malloc"); return 1; }
    srand(3);
    for (size_t i = 0; i < n_rows; i++)
        if (fraction >= 1 || rand() < fraction * RAND_MAX) rows[n++] = i;

    double best = 1e30;
#ifdef __AVX512F__
    __m512i acc = _mm512_setzero_si512();
#else
    __m256i acc = _mm256_setzero_si256();
#endif
    for (int pass = 0; pass < 3; pass++) {
        const double t0 = now_s();
        for (size_t j = 0; j < n; j++) {
            if (ahead && j + ahead < n) {
                const char *next = buf + rows[j + ahead] * row_bytes;
                for (size_t off = 0; off < row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_NTA);
            }
            const char *row = buf + rows[j] * row_bytes;
#ifdef __AVX512F__
            for (size_t off = 0; off < row_bytes; off += 64) acc = _mm512_add_epi64(acc, _mm512_loadu_si512(row + off));
#else
            for (size_t off = 0; off < row_bytes; off += 64)
                acc = _mm256_add_epi64(acc, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(row + off)),
                                                             _mm256_loadu_si256((const __m256i *)(row + off + 32))));
#endif
        }
        const double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    long long sum[8];
#ifdef __AVX512F__
    _mm512_storeu_si512(sum, acc);
#else
    _mm256_storeu_si256((__m256i *)sum, acc);
#endif
    printf("%zu-byte rows, %.0f%% of them, prefetch %d ahead, %s pages: %.1f GB/s (checksum %lld)\n", row_bytes,
           100 * fraction, ahead, huge ? "2 MiB" : "4 KiB", (double)n * row_bytes / best * 1e-9, sum[0]);
    free(rows);
    munmap(map, bytes + HUGE_PAGE);
    return 0;
}
