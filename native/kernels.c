/* prosparse — tensor-type kernels (see kernels.h).
 *
 * Layout of this file:
 *   block formats and f16/bf16 conversion
 *   scalar kernels: the plain reference for every type, and the only quantisers (from_float)
 *   SIMD kernels: per ISA, one "load 32 weights as floats" primitive (a quantised block or 32
 *     plain elements) and three generic loops over it (to_float, dot, axpy); the type is a
 *     compile-time constant in each instance, so the switch inside the primitive folds away
 *   the traits tables and CPU detection
 *
 * The file is compiled for baseline x86-64; SIMD functions carry target attributes and run
 * only after run-time detection says the CPU (and OS) support them.
 */
#include "kernels.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#define INLINE static inline __attribute__((always_inline))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* ---------------------------------------------------------------------------------------- */
/* Block formats (ggml's, byte for byte)                                                    */

#define QK 32 /* weights per block of every quantised type */

typedef struct { uint16_t d;    int8_t  qs[QK];     } block_q8_0; /* w = qs*d                */
typedef struct { uint16_t d;    uint8_t qs[QK / 2]; } block_q4_0; /* w = (nibble-8)*d       */
typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1; /* w = nibble*d + m        */
/* Q4: byte j holds element j in its low nibble and element j+16 in its high nibble.
 * SIMD kernels may decode a Q4 weight as one fma, nibble*d + off (off = -8d for Q4_0, m for
 * Q4_1): nibble*d is exact in f32 (4 x 11 significant bits), so the fma rounds as the
 * reference's (nibble-8)*d or nibble*d + m does (only a zero's sign may differ). */

_Static_assert(sizeof(block_q8_0) == 34, "q8_0 block");
_Static_assert(sizeof(block_q4_0) == 18, "q4_0 block");
_Static_assert(sizeof(block_q4_1) == 20, "q4_1 block");

/* ---------------------------------------------------------------------------------------- */
/* f16 / bf16                                                                               */

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float ps_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000 | man << 13); /* inf, NaN     */
    if (exp == 0) {                                                      /* 0, subnormal */
        const float v = (float)man * 0x1p-24f;                           /* exact        */
        return sign ? -v : v;
    }
    return f32_from_bits(sign | (exp + 127 - 15) << 23 | man << 13);
}

uint16_t ps_f32_to_f16(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffff;
    if (ax > 0x7f800000) return sign | 0x7e00 | (ax >> 13 & 0x3ff); /* NaN stays a quiet NaN */
    if (ax >= 0x47800000) return sign | 0x7c00;                    /* >= 2^16: inf          */
    if (ax < 0x38800000) {
        /* below 2^-14: a subnormal half. Adding 0.5 leaves the float with a resolution of
         * 2^-24, one half ulp, so the FPU's round-to-nearest-even does the rounding; a carry
         * to 0x400 is the smallest normal half, correctly encoded. */
        return sign | (uint16_t)(f32_bits(f32_from_bits(ax) + 0.5f) - 0x3f000000);
    }
    /* normal: rebias the exponent (127 -> 15) and round 23 -> 10 mantissa bits to nearest
     * even; a mantissa carry bumps the exponent, up to inf for [65520, 65536). */
    ax += ((uint32_t)(15 - 127) << 23) + 0xfff + ((ax >> 13) & 1);
    return sign | (uint16_t)(ax >> 13);
}

float ps_bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t ps_f32_to_bf16(float f) {
    const uint32_t x = f32_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 64); /* NaN: force quiet */
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);              /* nearest even     */
}

/* ---------------------------------------------------------------------------------------- */
/* Scalar: the reference kernels                                                            */

static void to_float_f32_scalar(const void *row, float *out, int64_t n) {
    memcpy(out, row, (size_t)n * sizeof(float));
}
static float dot_f32_scalar(const void *row, const float *x, int64_t n) {
    const float *w = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += w[i] * x[i];
    return sum;
}
static void axpy_f32_scalar(float a, const void *row, float *y, int64_t n) {
    const float *w = row;
    for (int64_t i = 0; i < n; i++) y[i] += a * w[i];
}
static void from_float_f32(const float *x, void *row, int64_t n) {
    memcpy(row, x, (size_t)n * sizeof(float));
}

static void to_float_f16_scalar(const void *row, float *out, int64_t n) {
    const uint16_t *w = row;
    for (int64_t i = 0; i < n; i++) out[i] = ps_f16_to_f32(w[i]);
}
static float dot_f16_scalar(const void *row, const float *x, int64_t n) {
    const uint16_t *w = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += ps_f16_to_f32(w[i]) * x[i];
    return sum;
}
static void axpy_f16_scalar(float a, const void *row, float *y, int64_t n) {
    const uint16_t *w = row;
    for (int64_t i = 0; i < n; i++) y[i] += a * ps_f16_to_f32(w[i]);
}
static void from_float_f16(const float *x, void *row, int64_t n) {
    uint16_t *w = row;
    for (int64_t i = 0; i < n; i++) w[i] = ps_f32_to_f16(x[i]);
}

static void to_float_bf16_scalar(const void *row, float *out, int64_t n) {
    const uint16_t *w = row;
    for (int64_t i = 0; i < n; i++) out[i] = ps_bf16_to_f32(w[i]);
}
static float dot_bf16_scalar(const void *row, const float *x, int64_t n) {
    const uint16_t *w = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += ps_bf16_to_f32(w[i]) * x[i];
    return sum;
}
static void axpy_bf16_scalar(float a, const void *row, float *y, int64_t n) {
    const uint16_t *w = row;
    for (int64_t i = 0; i < n; i++) y[i] += a * ps_bf16_to_f32(w[i]);
}
static void from_float_bf16(const float *x, void *row, int64_t n) {
    uint16_t *w = row;
    for (int64_t i = 0; i < n; i++) w[i] = ps_f32_to_bf16(x[i]);
}

/* Quantised types: dot sums each block in float, then scales by d (as ggml does). */

static void to_float_q8_0_scalar(const void *row, float *out, int64_t n) {
    const block_q8_0 *b = row;
    for (int64_t i = 0; i < n / QK; i++, out += QK) {
        const float d = ps_f16_to_f32(b[i].d);
        for (int j = 0; j < QK; j++) out[j] = b[i].qs[j] * d;
    }
}
static float dot_q8_0_scalar(const void *row, const float *x, int64_t n) {
    const block_q8_0 *b = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += b[i].qs[j] * x[j];
        sum += s * ps_f16_to_f32(b[i].d);
    }
    return sum;
}
static void axpy_q8_0_scalar(float a, const void *row, float *y, int64_t n) {
    const block_q8_0 *b = row;
    for (int64_t i = 0; i < n / QK; i++, y += QK) {
        const float d = ps_f16_to_f32(b[i].d);
        for (int j = 0; j < QK; j++) y[j] += a * (b[i].qs[j] * d);
    }
}
/* ggml's quantize_row_q8_0_ref: d = max|x| / 127, q = round(x / d) */
static void from_float_q8_0(const float *x, void *row, int64_t n) {
    block_q8_0 *b = row;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = MAX(amax, fabsf(x[j]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        b[i].d = ps_f32_to_f16(d);
        for (int j = 0; j < QK; j++) b[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

static void to_float_q4_0_scalar(const void *row, float *out, int64_t n) {
    const block_q4_0 *b = row;
    for (int64_t i = 0; i < n / QK; i++, out += QK) {
        const float d = ps_f16_to_f32(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            out[j]          = ((b[i].qs[j] & 0xf) - 8) * d;
            out[j + QK / 2] = ((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}
static float dot_q4_0_scalar(const void *row, const float *x, int64_t n) {
    const block_q4_0 *b = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float s = 0.0f;
        for (int j = 0; j < QK / 2; j++)
            s += ((b[i].qs[j] & 0xf) - 8) * x[j] + ((b[i].qs[j] >> 4) - 8) * x[j + QK / 2];
        sum += s * ps_f16_to_f32(b[i].d);
    }
    return sum;
}
static void axpy_q4_0_scalar(float a, const void *row, float *y, int64_t n) {
    const block_q4_0 *b = row;
    for (int64_t i = 0; i < n / QK; i++, y += QK) {
        const float d = ps_f16_to_f32(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            y[j]          += a * (((b[i].qs[j] & 0xf) - 8) * d);
            y[j + QK / 2] += a * (((b[i].qs[j] >> 4) - 8) * d);
        }
    }
}
/* ggml's quantize_row_q4_0_ref: d = (the x of largest magnitude) / -8, q = x/d + 8 */
static void from_float_q4_0(const float *x, void *row, int64_t n) {
    block_q4_0 *b = row;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++) {
            if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        b[i].d = ps_f32_to_f16(d);
        for (int j = 0; j < QK / 2; j++) {
            const float x0 = x[j] * id, x1 = x[j + QK / 2] * id;
            const uint8_t q0 = MIN(15, (int8_t)(x0 + 8.5f)), q1 = MIN(15, (int8_t)(x1 + 8.5f));
            b[i].qs[j] = q0 | (uint8_t)(q1 << 4);
        }
    }
}

static void to_float_q4_1_scalar(const void *row, float *out, int64_t n) {
    const block_q4_1 *b = row;
    for (int64_t i = 0; i < n / QK; i++, out += QK) {
        const float d = ps_f16_to_f32(b[i].d), m = ps_f16_to_f32(b[i].m);
        for (int j = 0; j < QK / 2; j++) {
            out[j]          = (b[i].qs[j] & 0xf) * d + m;
            out[j + QK / 2] = (b[i].qs[j] >> 4) * d + m;
        }
    }
}
/* sum_j (q_j*d + m) x_j = d * sum_j q_j x_j + m * sum_j x_j */
static float dot_q4_1_scalar(const void *row, const float *x, int64_t n) {
    const block_q4_1 *b = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float sq = 0.0f, sx = 0.0f;
        for (int j = 0; j < QK / 2; j++) {
            sq += (b[i].qs[j] & 0xf) * x[j] + (b[i].qs[j] >> 4) * x[j + QK / 2];
            sx += x[j] + x[j + QK / 2];
        }
        sum += sq * ps_f16_to_f32(b[i].d) + sx * ps_f16_to_f32(b[i].m);
    }
    return sum;
}
static void axpy_q4_1_scalar(float a, const void *row, float *y, int64_t n) {
    const block_q4_1 *b = row;
    for (int64_t i = 0; i < n / QK; i++, y += QK) {
        const float d = ps_f16_to_f32(b[i].d), m = ps_f16_to_f32(b[i].m);
        for (int j = 0; j < QK / 2; j++) {
            y[j]          += a * ((b[i].qs[j] & 0xf) * d + m);
            y[j + QK / 2] += a * ((b[i].qs[j] >> 4) * d + m);
        }
    }
}
/* ggml's quantize_row_q4_1_ref: m = min x, d = (max - min) / 15, q = (x - m)/d */
static void from_float_q4_1(const float *x, void *row, int64_t n) {
    block_q4_1 *b = row;
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < QK; j++) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        b[i].d = ps_f32_to_f16(d);
        b[i].m = ps_f32_to_f16(min);
        for (int j = 0; j < QK / 2; j++) {
            const float x0 = (x[j] - min) * id, x1 = (x[j + QK / 2] - min) * id;
            const uint8_t q0 = MIN(15, (int8_t)(x0 + 0.5f)), q1 = MIN(15, (int8_t)(x1 + 0.5f));
            b[i].qs[j] = q0 | (uint8_t)(q1 << 4);
        }
    }
}

/* Element i of a plain row, for the tails of the SIMD loops. */
INLINE float load1(const void *row, int64_t i, int type) {
    switch (type) {
    case PS_TYPE_F16:  return ps_f16_to_f32(((const uint16_t *)row)[i]);
    case PS_TYPE_BF16: return ps_bf16_to_f32(((const uint16_t *)row)[i]);
    default:           return ((const float *)row)[i];
    }
}

/* The per-ISA part of a traits row. */
typedef struct {
    void  (*to_float)(const void *row, float *out, int64_t n);
    float (*dot)(const void *row, const float *x, int64_t n);
    void  (*axpy)(float a, const void *row, float *y, int64_t n);
} kernel_row;

static const kernel_row kernels_scalar[PS_TYPE_COUNT] = {
    [PS_TYPE_F32]  = { to_float_f32_scalar,  dot_f32_scalar,  axpy_f32_scalar  },
    [PS_TYPE_F16]  = { to_float_f16_scalar,  dot_f16_scalar,  axpy_f16_scalar  },
    [PS_TYPE_BF16] = { to_float_bf16_scalar, dot_bf16_scalar, axpy_bf16_scalar },
    [PS_TYPE_Q8_0] = { to_float_q8_0_scalar, dot_q8_0_scalar, axpy_q8_0_scalar },
    [PS_TYPE_Q4_0] = { to_float_q4_0_scalar, dot_q4_0_scalar, axpy_q4_0_scalar },
    [PS_TYPE_Q4_1] = { to_float_q4_1_scalar, dot_q4_1_scalar, axpy_q4_1_scalar },
};

typedef void (*gemm_fn)(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                        int64_t k, float *c, int64_t ldc);

static void gemm_scalar(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                        int64_t k, float *c, int64_t ldc) {
    for (int64_t j = 0; j < nb; j++)
        for (int64_t i = 0; i < m; i++) c[j * ldc + i] = dot_f32_scalar(a + i * lda, b + j * ldb, k);
}

/* n rounded down to whole blocks: the generic SIMD loops below treat any n % 32 as a tail of
 * plain elements, so a quantised row's partial block (a caller's bug) must be cut off, as the
 * scalar kernels ignore it, rather than read as floats. */
INLINE int64_t whole_blocks(int64_t n, int type) {
    return type == PS_TYPE_F32 || type == PS_TYPE_F16 || type == PS_TYPE_BF16 ? n : n - n % QK;
}

/* One SIMD table: instantiates the ISA's generic loops for each type. */
#define SIMD_KERNELS(TARGET, isa, t, TYPE)                                                     \
    TARGET static void to_float_##t##_##isa(const void *row, float *out, int64_t n) {          \
        to_float_##isa(row, out, whole_blocks(n, TYPE), TYPE);                                 \
    }                                                                                          \
    TARGET static float dot_##t##_##isa(const void *row, const float *x, int64_t n) {          \
        return dot_##isa(row, x, whole_blocks(n, TYPE), TYPE);                                 \
    }                                                                                          \
    TARGET static void axpy_##t##_##isa(float a, const void *row, float *y, int64_t n) {       \
        axpy_##isa(a, row, y, whole_blocks(n, TYPE), TYPE);                                    \
    }
#define SIMD_TABLE(isa)                                                                        \
    static const kernel_row kernels_##isa[PS_TYPE_COUNT] = {                                   \
        [PS_TYPE_F32]  = { to_float_f32_##isa,  dot_f32_##isa,  axpy_f32_##isa  },             \
        [PS_TYPE_F16]  = { to_float_f16_##isa,  dot_f16_##isa,  axpy_f16_##isa  },             \
        [PS_TYPE_BF16] = { to_float_bf16_##isa, dot_bf16_##isa, axpy_bf16_##isa },             \
        [PS_TYPE_Q8_0] = { to_float_q8_0_##isa, dot_q8_0_##isa, axpy_q8_0_##isa },             \
        [PS_TYPE_Q4_0] = { to_float_q4_0_##isa, dot_q4_0_##isa, axpy_q4_0_##isa },             \
        [PS_TYPE_Q4_1] = { to_float_q4_1_##isa, dot_q4_1_##isa, axpy_q4_1_##isa },             \
    };
#define SIMD_ALL_TYPES(TARGET, isa)                                                            \
    SIMD_KERNELS(TARGET, isa, f32, PS_TYPE_F32)                                                \
    SIMD_KERNELS(TARGET, isa, f16, PS_TYPE_F16)                                                \
    SIMD_KERNELS(TARGET, isa, bf16, PS_TYPE_BF16)                                              \
    SIMD_KERNELS(TARGET, isa, q8_0, PS_TYPE_Q8_0)                                              \
    SIMD_KERNELS(TARGET, isa, q4_0, PS_TYPE_Q4_0)                                              \
    SIMD_KERNELS(TARGET, isa, q4_1, PS_TYPE_Q4_1)                                              \
    SIMD_TABLE(isa)

#if defined(__x86_64__)
/* ---------------------------------------------------------------------------------------- */
/* AVX2 + FMA + F16C: 32 weights = 4 x __m256                                               */

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

typedef struct { __m256 v[4]; } w32_avx2;

/* 8 plain elements from element i */
TARGET_AVX2 INLINE __m256 load8_avx2(const void *row, int64_t i, int type) {
    const __m128i *p = (const __m128i *)((const uint16_t *)row + i);
    switch (type) {
    case PS_TYPE_F16:  return _mm256_cvtph_ps(_mm_loadu_si128(p));
    case PS_TYPE_BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
    default:           return _mm256_loadu_ps((const float *)row + i);
    }
}

/* 8 signed bytes -> 8 floats */
TARGET_AVX2 INLINE __m256 i8x8_avx2(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* a Q4 block's 32 weights: bytes 0-7 widened to lanes give elements 0-7 (low nibbles) and
 * 16-23 (high), bytes 8-15 give 8-15 and 24-31 */
TARGET_AVX2 INLINE w32_avx2 q4_avx2(const uint8_t *qs, float d, float off) {
    const __m256 vd = _mm256_set1_ps(d), voff = _mm256_set1_ps(off);
    const __m256i m4 = _mm256_set1_epi32(0xf);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
    const __m256i q[4] = { _mm256_and_si256(b0, m4), _mm256_and_si256(b1, m4),
                           _mm256_srli_epi32(b0, 4), _mm256_srli_epi32(b1, 4) };
    w32_avx2 w;
    for (int k = 0; k < 4; k++) w.v[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[k]), vd, voff);
    return w;
}

/* weights 32c .. 32c+31 as floats (block c of a quantised row) */
TARGET_AVX2 INLINE w32_avx2 load32_avx2(const void *row, int64_t c, int type) {
    w32_avx2 w;
    switch (type) {
    case PS_TYPE_Q8_0: {
        const block_q8_0 *b = (const block_q8_0 *)row + c;
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(b->d));
        for (int k = 0; k < 4; k++) w.v[k] = _mm256_mul_ps(d, i8x8_avx2(b->qs + 8 * k));
        return w;
    }
    case PS_TYPE_Q4_0: {
        const block_q4_0 *b = (const block_q4_0 *)row + c;
        const float d = _cvtsh_ss(b->d);
        return q4_avx2(b->qs, d, -8 * d);
    }
    case PS_TYPE_Q4_1: {
        const block_q4_1 *b = (const block_q4_1 *)row + c;
        return q4_avx2(b->qs, _cvtsh_ss(b->d), _cvtsh_ss(b->m));
    }
    default:
        for (int k = 0; k < 4; k++) w.v[k] = load8_avx2(row, 32 * c + 8 * k, type);
        return w;
    }
}

TARGET_AVX2 INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Below, n % 32 != 0 only for plain types: their tails go 8 at a time, then one by one. */

TARGET_AVX2 INLINE void to_float_avx2(const void *row, float *out, int64_t n, int type) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_avx2 w = load32_avx2(row, i / 32, type);
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + i + 8 * k, w.v[k]);
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8_avx2(row, i, type));
    for (; i < n; i++) out[i] = load1(row, i, type);
}

TARGET_AVX2 INLINE float dot_avx2(const void *row, const float *x, int64_t n, int type) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_avx2 w = load32_avx2(row, i / 32, type);
        for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(w.v[k], _mm256_loadu_ps(x + i + 8 * k), acc[k]);
    }
    for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(load8_avx2(row, i, type), _mm256_loadu_ps(x + i), acc[0]);
    float sum = hsum_avx2(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; i < n; i++) sum += load1(row, i, type) * x[i];
    return sum;
}

TARGET_AVX2 INLINE void axpy_avx2(float a, const void *row, float *y, int64_t n, int type) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_avx2 w = load32_avx2(row, i / 32, type);
        for (int k = 0; k < 4; k++) {
            float *yk = y + i + 8 * k;
            _mm256_storeu_ps(yk, _mm256_fmadd_ps(va, w.v[k], _mm256_loadu_ps(yk)));
        }
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8_avx2(row, i, type), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * load1(row, i, type);
}

SIMD_ALL_TYPES(TARGET_AVX2, avx2)

/* tiles of 4 rows x 2 tokens: 8 accumulators, 6 loads per 8 fmas */
TARGET_AVX2 static void gemm_avx2(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                                  int64_t k, float *c, int64_t ldc) {
    const int64_t k8 = k - k % 8;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const float *a0 = a + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
        int64_t j = 0;
        for (; j + 2 <= nb; j += 2) {
            const float *b0 = b + j * ldb, *b1 = b0 + ldb;
            __m256 acc[4][2];
            for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int64_t p = 0; p < k8; p += 8) {
                const __m256 vb0 = _mm256_loadu_ps(b0 + p), vb1 = _mm256_loadu_ps(b1 + p);
                const __m256 va[4] = { _mm256_loadu_ps(a0 + p), _mm256_loadu_ps(a1 + p),
                                       _mm256_loadu_ps(a2 + p), _mm256_loadu_ps(a3 + p) };
                for (int r = 0; r < 4; r++) {
                    acc[r][0] = _mm256_fmadd_ps(va[r], vb0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(va[r], vb1, acc[r][1]);
                }
            }
            const float *ar[4] = { a0, a1, a2, a3 };
            for (int r = 0; r < 4; r++)
                for (int t = 0; t < 2; t++) {
                    float s = hsum_avx2(acc[r][t]);
                    for (int64_t p = k8; p < k; p++) s += ar[r][p] * b[(j + t) * ldb + p];
                    c[(j + t) * ldc + i + r] = s;
                }
        }
        for (; j < nb; j++)
            for (int r = 0; r < 4; r++) c[j * ldc + i + r] = dot_avx2(a + (i + r) * lda, b + j * ldb, k, PS_TYPE_F32);
    }
    for (; i < m; i++)
        for (int64_t j = 0; j < nb; j++) c[j * ldc + i] = dot_avx2(a + i * lda, b + j * ldb, k, PS_TYPE_F32);
}

/* ---------------------------------------------------------------------------------------- */
/* AVX-512 F/BW/VL: 32 weights = 2 x __m512                                                 */
/* VNNI and AVX512-BF16 would need the activations in int8 / bf16; with f32 activations
 * nothing here gains from them. */

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

typedef struct { __m512 lo, hi; } w32_avx512; /* elements 0-15, 16-31 */

TARGET_AVX512 INLINE __m512 bf16x16_avx512(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 plain elements from element i */
TARGET_AVX512 INLINE __m512 load16_avx512(const void *row, int64_t i, int type) {
    const __m256i *p = (const __m256i *)((const uint16_t *)row + i);
    switch (type) {
    case PS_TYPE_F16:  return _mm512_cvtph_ps(_mm256_loadu_si256(p));
    case PS_TYPE_BF16: return bf16x16_avx512(_mm256_loadu_si256(p));
    default:           return _mm512_loadu_ps((const float *)row + i);
    }
}

/* the elements of 16 from element i that mask selects; masked-off ones are not read */
TARGET_AVX512 INLINE __m512 load16_masked_avx512(const void *row, int64_t i, __mmask16 mask, int type) {
    const uint16_t *p = (const uint16_t *)row + i;
    switch (type) {
    case PS_TYPE_F16:  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
    case PS_TYPE_BF16: return bf16x16_avx512(_mm256_maskz_loadu_epi16(mask, p));
    default:           return _mm512_maskz_loadu_ps(mask, (const float *)row + i);
    }
}

TARGET_AVX512 INLINE __m512 i8x16_avx512(const int8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
}

/* a Q4 block's 32 weights, looked up in lut (the block's 16 possible values): permutexvar
 * indexes it with the low 4 bits of each lane */
TARGET_AVX512 INLINE w32_avx512 q4_avx512(const uint8_t *qs, __m512 lut) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
    return (w32_avx512){ _mm512_permutexvar_ps(q, lut), _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut) };
}

/* weights 32c .. 32c+31 as floats */
TARGET_AVX512 INLINE w32_avx512 load32_avx512(const void *row, int64_t c, int type) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    switch (type) {
    case PS_TYPE_Q8_0: {
        const block_q8_0 *b = (const block_q8_0 *)row + c;
        const __m512 d = _mm512_set1_ps(_cvtsh_ss(b->d));
        return (w32_avx512){ _mm512_mul_ps(d, i8x16_avx512(b->qs)), _mm512_mul_ps(d, i8x16_avx512(b->qs + 16)) };
    }
    case PS_TYPE_Q4_0: {
        const block_q4_0 *b = (const block_q4_0 *)row + c;
        return q4_avx512(b->qs, _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8)), _mm512_set1_ps(_cvtsh_ss(b->d))));
    }
    case PS_TYPE_Q4_1: {
        const block_q4_1 *b = (const block_q4_1 *)row + c;
        return q4_avx512(b->qs, _mm512_fmadd_ps(iota, _mm512_set1_ps(_cvtsh_ss(b->d)), _mm512_set1_ps(_cvtsh_ss(b->m))));
    }
    default:
        return (w32_avx512){ load16_avx512(row, 32 * c, type), load16_avx512(row, 32 * c + 16, type) };
    }
}

/* Below, n % 32 != 0 only for plain types: their tails go 16 at a time under a mask. */

TARGET_AVX512 INLINE __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

TARGET_AVX512 INLINE void to_float_avx512(const void *row, float *out, int64_t n, int type) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_avx512 w = load32_avx512(row, i / 32, type);
        _mm512_storeu_ps(out + i, w.lo);
        _mm512_storeu_ps(out + i + 16, w.hi);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(out + i, m, load16_masked_avx512(row, i, m, type));
    }
}

/* two blocks per step into four accumulators: four independent fma chains */
TARGET_AVX512 INLINE float dot_avx512(const void *row, const float *x, int64_t n, int type) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const w32_avx512 w0 = load32_avx512(row, i / 32, type), w1 = load32_avx512(row, i / 32 + 1, type);
        acc0 = _mm512_fmadd_ps(w0.lo, _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(w0.hi, _mm512_loadu_ps(x + i + 16), acc1);
        acc2 = _mm512_fmadd_ps(w1.lo, _mm512_loadu_ps(x + i + 32), acc2);
        acc3 = _mm512_fmadd_ps(w1.hi, _mm512_loadu_ps(x + i + 48), acc3);
    }
    if (i + 32 <= n) {
        const w32_avx512 w = load32_avx512(row, i / 32, type);
        acc0 = _mm512_fmadd_ps(w.lo, _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(w.hi, _mm512_loadu_ps(x + i + 16), acc1);
        i += 32;
    }
    for (; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        acc2 = _mm512_fmadd_ps(load16_masked_avx512(row, i, m, type), _mm512_maskz_loadu_ps(m, x + i), acc2);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

TARGET_AVX512 INLINE void axpy_avx512(float a, const void *row, float *y, int64_t n, int type) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_avx512 w = load32_avx512(row, i / 32, type);
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, w.lo, _mm512_loadu_ps(y + i)));
        _mm512_storeu_ps(y + i + 16, _mm512_fmadd_ps(va, w.hi, _mm512_loadu_ps(y + i + 16)));
    }
    for (; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 yi = _mm512_fmadd_ps(va, load16_masked_avx512(row, i, m, type), _mm512_maskz_loadu_ps(m, y + i));
        _mm512_mask_storeu_ps(y + i, m, yi);
    }
}

SIMD_ALL_TYPES(TARGET_AVX512, avx512)

/* tiles of 4 rows x 4 tokens: 16 accumulators, 8 loads per 16 fmas; k's tail under a mask */
TARGET_AVX512 static void gemm_avx512(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                                      int64_t nb, int64_t k, float *c, int64_t ldc) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const float *ar[4] = { a + i * lda, a + (i + 1) * lda, a + (i + 2) * lda, a + (i + 3) * lda };
        int64_t j = 0;
        for (; j + 4 <= nb; j += 4) {
            const float *br[4] = { b + j * ldb, b + (j + 1) * ldb, b + (j + 2) * ldb, b + (j + 3) * ldb };
            __m512 acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
            for (int64_t p = 0; p < k; p += 16) {
                const __mmask16 mask = tail_mask(k - p);
                __m512 va[4], vb[4];
                for (int r = 0; r < 4; r++) va[r] = _mm512_maskz_loadu_ps(mask, ar[r] + p);
                for (int t = 0; t < 4; t++) vb[t] = _mm512_maskz_loadu_ps(mask, br[t] + p);
                for (int r = 0; r < 4; r++)
                    for (int t = 0; t < 4; t++) acc[r][t] = _mm512_fmadd_ps(va[r], vb[t], acc[r][t]);
            }
            for (int r = 0; r < 4; r++)
                for (int t = 0; t < 4; t++) c[(j + t) * ldc + i + r] = _mm512_reduce_add_ps(acc[r][t]);
        }
        for (; j < nb; j++)
            for (int r = 0; r < 4; r++) c[j * ldc + i + r] = dot_avx512(ar[r], b + j * ldb, k, PS_TYPE_F32);
    }
    for (; i < m; i++)
        for (int64_t j = 0; j < nb; j++) c[j * ldc + i] = dot_avx512(a + i * lda, b + j * ldb, k, PS_TYPE_F32);
}
#endif /* __x86_64__ */

#if defined(__aarch64__)
/* ---------------------------------------------------------------------------------------- */
/* NEON: 32 weights = 8 x float32x4_t                                                       */

typedef struct { float32x4_t v[8]; } w32_neon;

/* 4 plain elements from element i */
INLINE float32x4_t load4_neon(const void *row, int64_t i, int type) {
    const uint16_t *p = (const uint16_t *)row + i;
    switch (type) {
    case PS_TYPE_F16:  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
    case PS_TYPE_BF16: return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
    default:           return vld1q_f32((const float *)row + i);
    }
}

/* 16 signed bytes -> 4 x 4 floats, in order */
INLINE void i8x16_neon(int8x16_t q, float32x4_t *out) {
    const int16x8_t lo = vmovl_s8(vget_low_s8(q)), hi = vmovl_s8(vget_high_s8(q));
    out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    out[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
    out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    out[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

/* a Q4 block's 32 weights: low nibbles are elements 0-15, high nibbles 16-31 */
INLINE w32_neon q4_neon(const uint8_t *qs, float d, float off) {
    const uint8x16_t q = vld1q_u8(qs);
    const float32x4_t voff = vdupq_n_f32(off);
    w32_neon w;
    i8x16_neon(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0xf))), w.v);
    i8x16_neon(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), w.v + 4);
    for (int k = 0; k < 8; k++) w.v[k] = vfmaq_n_f32(voff, w.v[k], d);
    return w;
}

INLINE w32_neon load32_neon(const void *row, int64_t c, int type) {
    w32_neon w;
    switch (type) {
    case PS_TYPE_Q8_0: {
        const block_q8_0 *b = (const block_q8_0 *)row + c;
        const float d = ps_f16_to_f32(b->d);
        i8x16_neon(vld1q_s8(b->qs), w.v);
        i8x16_neon(vld1q_s8(b->qs + 16), w.v + 4);
        for (int k = 0; k < 8; k++) w.v[k] = vmulq_n_f32(w.v[k], d);
        return w;
    }
    case PS_TYPE_Q4_0: {
        const block_q4_0 *b = (const block_q4_0 *)row + c;
        const float d = ps_f16_to_f32(b->d);
        return q4_neon(b->qs, d, -8 * d);
    }
    case PS_TYPE_Q4_1: {
        const block_q4_1 *b = (const block_q4_1 *)row + c;
        return q4_neon(b->qs, ps_f16_to_f32(b->d), ps_f16_to_f32(b->m));
    }
    default:
        for (int k = 0; k < 8; k++) w.v[k] = load4_neon(row, 32 * c + 4 * k, type);
        return w;
    }
}

INLINE void to_float_neon(const void *row, float *out, int64_t n, int type) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_neon w = load32_neon(row, i / 32, type);
        for (int k = 0; k < 8; k++) vst1q_f32(out + i + 4 * k, w.v[k]);
    }
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, load4_neon(row, i, type));
    for (; i < n; i++) out[i] = load1(row, i, type);
}

INLINE float dot_neon(const void *row, const float *x, int64_t n, int type) {
    float32x4_t acc[4] = { vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0) };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_neon w = load32_neon(row, i / 32, type);
        for (int k = 0; k < 8; k++) acc[k % 4] = vfmaq_f32(acc[k % 4], w.v[k], vld1q_f32(x + i + 4 * k));
    }
    for (; i + 4 <= n; i += 4) acc[0] = vfmaq_f32(acc[0], load4_neon(row, i, type), vld1q_f32(x + i));
    float sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for (; i < n; i++) sum += load1(row, i, type) * x[i];
    return sum;
}

INLINE void axpy_neon(float a, const void *row, float *y, int64_t n, int type) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const w32_neon w = load32_neon(row, i / 32, type);
        for (int k = 0; k < 8; k++) {
            float *yk = y + i + 4 * k;
            vst1q_f32(yk, vfmaq_n_f32(vld1q_f32(yk), w.v[k], a));
        }
    }
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), load4_neon(row, i, type), a));
    for (; i < n; i++) y[i] += a * load1(row, i, type);
}

SIMD_ALL_TYPES(, neon)
#endif /* __aarch64__ */

/* ---------------------------------------------------------------------------------------- */
/* Traits tables and CPU detection                                                          */

/* What a type is, independent of the ISA. */
static const struct {
    const char *name;
    int64_t block_size;
    size_t block_bytes;
    void (*from_float)(const float *x, void *row, int64_t n);
} layouts[PS_TYPE_COUNT] = {
    [PS_TYPE_F32]  = { "f32",  1,  sizeof(float),      from_float_f32  },
    [PS_TYPE_F16]  = { "f16",  1,  sizeof(uint16_t),   from_float_f16  },
    [PS_TYPE_BF16] = { "bf16", 1,  sizeof(uint16_t),   from_float_bf16 },
    [PS_TYPE_Q8_0] = { "q8_0", QK, sizeof(block_q8_0), from_float_q8_0 },
    [PS_TYPE_Q4_0] = { "q4_0", QK, sizeof(block_q4_0), from_float_q4_0 },
    [PS_TYPE_Q4_1] = { "q4_1", QK, sizeof(block_q4_1), from_float_q4_1 },
};

/* NULL: not built for this architecture */
static const kernel_row *const isa_kernels[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR] = kernels_scalar,
#if defined(__x86_64__)
    [PS_ISA_AVX2]   = kernels_avx2,
    [PS_ISA_AVX512] = kernels_avx512,
#endif
#if defined(__aarch64__)
    [PS_ISA_NEON]   = kernels_neon,
#endif
};

/* NULL: scalar (NEON has no tiled kernel yet) */
static const gemm_fn isa_gemm[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR] = gemm_scalar,
#if defined(__x86_64__)
    [PS_ISA_AVX2]   = gemm_avx2,
    [PS_ISA_AVX512] = gemm_avx512,
#endif
};

static const char *const isa_names[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR] = "scalar", [PS_ISA_AVX2] = "avx2", [PS_ISA_AVX512] = "avx512", [PS_ISA_NEON] = "neon",
};

/* libgcc's __builtin_cpu_supports reports AVX / AVX-512 features only when the OS also
 * enables their register state (it checks XCR0 via xgetbv). */
static int cpu_supports(int isa) {
    switch (isa) {
    case PS_ISA_SCALAR: return 1;
#if defined(__x86_64__)
    case PS_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case PS_ISA_AVX512:
        return cpu_supports(PS_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
#if defined(__aarch64__)
    case PS_ISA_NEON: return 1; /* Advanced SIMD is part of AArch64 */
#endif
    default: return 0;
    }
}

static ps_type_traits traits[PS_ISA_COUNT][PS_TYPE_COUNT];
static int available[PS_ISA_COUNT];
static int best_isa;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init_tables(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
#endif
    for (int isa = 0; isa < PS_ISA_COUNT; isa++) {
        available[isa] = isa_kernels[isa] != NULL && cpu_supports(isa);
        if (!available[isa]) continue;
        best_isa = isa; /* enum order is preference order within an architecture */
        for (int t = 0; t < PS_TYPE_COUNT; t++) {
            if (!layouts[t].name) continue;
            const kernel_row *k = &isa_kernels[isa][t];
            traits[isa][t] = (ps_type_traits){ layouts[t].name, layouts[t].block_size, layouts[t].block_bytes,
                                               k->to_float, layouts[t].from_float, k->dot, k->axpy };
        }
    }
}

static inline void ensure_init(void) { pthread_once(&init_once, init_tables); }

int ps_kernels_best_isa(void) {
    ensure_init();
    return best_isa;
}

int ps_kernels_isa_available(int isa) {
    ensure_init();
    return isa >= 0 && isa < PS_ISA_COUNT && available[isa];
}

const char *ps_kernels_isa_name(int isa) {
    return isa >= 0 && isa < PS_ISA_COUNT ? isa_names[isa] : "unknown";
}

const ps_type_traits *ps_type_traits_for(int type, int isa) {
    ensure_init();
    if (isa == -1) isa = best_isa;
    if (type < 0 || type >= PS_TYPE_COUNT || !layouts[type].name) return NULL;
    if (isa < 0 || isa >= PS_ISA_COUNT || !available[isa]) return NULL;
    return &traits[isa][type];
}

size_t ps_row_bytes(int type, int64_t n) {
    if (type < 0 || type >= PS_TYPE_COUNT || !layouts[type].name) return 0;
    if (n < 0 || n % layouts[type].block_size != 0) return 0;
    return (size_t)(n / layouts[type].block_size) * layouts[type].block_bytes;
}

float ps_dot_f32(const float *a, const float *b, int64_t n) {
    ensure_init();
    return traits[best_isa][PS_TYPE_F32].dot(a, b, n);
}

void ps_axpy_f32(float a, const float *x, float *y, int64_t n) {
    ensure_init();
    traits[best_isa][PS_TYPE_F32].axpy(a, x, y, n);
}

int ps_gemm_nt_f32_isa(int isa, const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                       int64_t nb, int64_t k, float *c, int64_t ldc) {
    ensure_init();
    if (isa < 0 || isa >= PS_ISA_COUNT || !available[isa]) return -1;
    (isa_gemm[isa] ? isa_gemm[isa] : gemm_scalar)(a, lda, m, b, ldb, nb, k, c, ldc);
    return 0;
}

void ps_gemm_nt_f32(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                    int64_t k, float *c, int64_t ldc) {
    ps_gemm_nt_f32_isa(ps_kernels_best_isa(), a, lda, m, b, ldb, nb, k, c, ldc);
}
