/* prosparse — memory-read bandwidth: how fast this machine can stream bytes into the cores.
 *
 * Decoding one token reads every weight it uses once, so bytes/token x tokens/s is bounded by
 * this number; prosparse-bench reports decode speed as a share of it.
 *
 * Each thread sums its slice of the buffer as 64-bit words (wrapping adds: the cheapest
 * operation that still needs every byte loaded), with the widest loads the CPU has. The sum
 * is the same in every instruction set, so tests can check that the SIMD loops read every
 * byte (ps_read_sum); only the time matters to ps_read_bandwidth.
 */
#define _POSIX_C_SOURCE 199309L
#include "prosparse.h"
#include "kernels.h"
#include "threadpool.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

/* ------------------------------------------------------------------------------------------
 * Summing loops: whole 8-byte words, the tail zero-padded
 * ---------------------------------------------------------------------------------------- */

static uint64_t tail_word(const unsigned char *p, size_t n) {
    uint64_t w = 0;
    memcpy(&w, p, n);   /* little-endian machines: the same as a zero-padded load */
    return w;
}

static uint64_t sum_scalar(const unsigned char *p, size_t bytes) {
    uint64_t s[4] = { 0, 0, 0, 0 }, w;
    size_t i = 0;
    for (; i + 32 <= bytes; i += 32)
        for (int k = 0; k < 4; k++) { memcpy(&w, p + i + 8 * k, 8); s[k] += w; }
    for (; i + 8 <= bytes; i += 8) { memcpy(&w, p + i, 8); s[0] += w; }
    if (i < bytes) s[0] += tail_word(p + i, bytes - i);
    return s[0] + s[1] + s[2] + s[3];
}

/* The SIMD loops read four streams at once, one from each quarter of the slice: with 4 KiB
 * pages (file mappings, most heaps) one core's hardware prefetchers fill more lines in
 * flight that way than from one stream (measured on a Zen core: 40 vs 34 GB/s). */
#define STREAMS 4

#if defined(__x86_64__)
__attribute__((target("avx2")))
static uint64_t sum_avx2(const unsigned char *p, size_t bytes) {
    const size_t q = bytes / STREAMS / 64 * 64;   /* bytes per stream */
    const unsigned char *s0 = p, *s1 = p + q, *s2 = p + 2 * q, *s3 = p + 3 * q;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < q; i += 64) {
        a0 = _mm256_add_epi64(a0, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(s0 + i)),
                                                   _mm256_loadu_si256((const __m256i *)(s0 + i + 32))));
        a1 = _mm256_add_epi64(a1, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(s1 + i)),
                                                   _mm256_loadu_si256((const __m256i *)(s1 + i + 32))));
        a2 = _mm256_add_epi64(a2, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(s2 + i)),
                                                   _mm256_loadu_si256((const __m256i *)(s2 + i + 32))));
        a3 = _mm256_add_epi64(a3, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(s3 + i)),
                                                   _mm256_loadu_si256((const __m256i *)(s3 + i + 32))));
    }
    const __m256i a = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, a);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_scalar(p + STREAMS * q, bytes - STREAMS * q);
}

__attribute__((target("avx512f")))
static uint64_t sum_avx512(const unsigned char *p, size_t bytes) {
    const size_t q = bytes / STREAMS / 64 * 64;
    const unsigned char *s0 = p, *s1 = p + q, *s2 = p + 2 * q, *s3 = p + 3 * q;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < q; i += 64) {
        a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(s0 + i));
        a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(s1 + i));
        a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(s2 + i));
        a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(s3 + i));
    }
    const __m512i a = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a) + sum_scalar(p + STREAMS * q, bytes - STREAMS * q);
}
#endif

#if defined(__aarch64__)
static uint64_t sum_neon(const unsigned char *p, size_t bytes) {
    const size_t q = bytes / STREAMS / 64 * 64;
    const unsigned char *s[STREAMS] = { p, p + q, p + 2 * q, p + 3 * q };
    uint64x2_t a[STREAMS] = { vdupq_n_u64(0), vdupq_n_u64(0), vdupq_n_u64(0), vdupq_n_u64(0) };
    for (size_t i = 0; i < q; i += 64)
        for (int k = 0; k < STREAMS; k++)
            for (int j = 0; j < 64; j += 16) a[k] = vaddq_u64(a[k], vreinterpretq_u64_u8(vld1q_u8(s[k] + i + j)));
    return vaddvq_u64(vaddq_u64(vaddq_u64(a[0], a[1]), vaddq_u64(a[2], a[3]))) +
           sum_scalar(p + STREAMS * q, bytes - STREAMS * q);
}
#endif

typedef uint64_t (*sum_fn)(const unsigned char *p, size_t bytes);

static sum_fn sum_for(int isa) {
    if (!ps_kernels_isa_available(isa)) return NULL;
    switch (isa) {
    case PS_ISA_SCALAR: return sum_scalar;
#if defined(__x86_64__)
    case PS_ISA_AVX2:
    case PS_ISA_AVX2_VNNI:   return sum_avx2;
    case PS_ISA_AVX512:
    case PS_ISA_AVX512_VNNI:
    case PS_ISA_AVX512_BF16: return sum_avx512;
#endif
#if defined(__aarch64__)
    case PS_ISA_NEON:
    case PS_ISA_NEON_DOTPROD: return sum_neon;
#endif
    default:            return sum_scalar;   /* an available isa not named above */
    }
}

uint64_t ps_read_sum(const void *buf, size_t bytes, int32_t isa) {
    const sum_fn sum = sum_for(isa < 0 ? ps_kernels_best_isa() : isa);
    return sum ? sum((const unsigned char *)buf, bytes) : 0;
}

/* ------------------------------------------------------------------------------------------
 * Timed passes over the buffer, one slice per thread
 * ---------------------------------------------------------------------------------------- */

#define CACHE_LINE 64

typedef struct { uint64_t value; char pad[CACHE_LINE - sizeof(uint64_t)]; } padded_sum;

typedef struct {
    const unsigned char *buf;
    size_t bytes;
    sum_fn sum;
    padded_sum *result;          /* (n_threads), one cache line each */
} read_job;

/* slices start on cache-line boundaries so no line is fetched by two threads */
static void read_task(void *ctx, int ith, int nth) {
    read_job *job = ctx;
    const size_t lines = (job->bytes + CACHE_LINE - 1) / CACHE_LINE;
    size_t start = lines * (size_t)ith / (size_t)nth * CACHE_LINE;
    size_t end = lines * (size_t)(ith + 1) / (size_t)nth * CACHE_LINE;
    if (end > job->bytes) end = job->bytes;
    if (start > end) start = end;
    job->result[ith].value = job->sum(job->buf + start, end - start);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* the sums go here, so the compiler cannot drop the loads */
volatile uint64_t ps_read_sink;

double ps_read_bandwidth(const void *buf, size_t bytes, int32_t n_threads, int32_t repeats) {
    if (!buf || bytes == 0 || n_threads < 1 || n_threads > 512 || repeats < 1) return -1.0;
    read_job job = { .buf = buf, .bytes = bytes, .sum = sum_for(ps_kernels_best_isa()),
                     .result = aligned_alloc(CACHE_LINE, (size_t)n_threads * sizeof(padded_sum)) };
    ps_threadpool *pool = job.result ? ps_threadpool_create(n_threads) : NULL;
    if (!pool) { free(job.result); return -1.0; }
    ps_threadpool_run(pool, read_task, &job);   /* warm-up: page faults, thread wake-up */
    double best_s = 0.0;
    for (int r = 0; r < repeats; r++) {
        const double t0 = now_s();
        ps_threadpool_run(pool, read_task, &job);
        const double dt = now_s() - t0;
        if (r == 0 || dt < best_s) best_s = dt;
        uint64_t total = 0;
        for (int t = 0; t < n_threads; t++) total += job.result[t].value;
        ps_read_sink = total;
    }
    ps_threadpool_free(pool);
    free(job.result);
    return best_s > 0.0 ? (double)bytes / best_s : -1.0;
}
