/* prosparse — tensor-type kernels (see kernels.h).
 *
 * Layout of this file:
 *   block formats and f16/bf16 conversion
 *   scalar kernels: the plain reference for every type, and the only quantisers (from_float)
 *   8-bit activations: the quantiser and the integer dots of Q8_0/Q4_0/Q4_1 (scalar reference)
 *   SIMD kernels: per ISA, one "load 32 weights as floats" primitive (a quantised block or 32
 *     plain elements) and four generic loops over it (to_float, dot, axpy, axpy4); the type is a
 *     compile-time constant in each instance, so the switch inside the primitive folds away.
 *     Then the ISA's quantiser and one generic int8 dot loop (the multiply-add instruction is
 *     a macro parameter: with and without VNNI / dotprod)
 *   the traits tables and CPU detection
 *
 * The file is compiled for baseline x86-64; SIMD functions carry target attributes and run
 * only after run-time detection says the CPU (and OS) support them.
 */
#include "kernels.h"

#include <float.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
/* AVX-VNNI intrinsics (and target("avxvnni")) arrived in gcc 11 and clang 12 */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define HAVE_AVX_VNNI 1
#else
#define HAVE_AVX_VNNI 0
#endif
/* AVX512-BF16 intrinsics (vdpbf16ps) arrived in gcc 10 and clang 9 */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define HAVE_AVX512_BF16 1
#else
#define HAVE_AVX512_BF16 0
#endif
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
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

/* ---------------------------------------------------------------------------------------- */
/* 8-bit activations: the quantiser and the integer dots (scalar reference)                 */

/* A block whose largest |x| is below this quantises to zeros: 127 / amax stays finite. */
#define Q8_MIN_AMAX 1e-30f

/* the scale of a block with largest magnitude amax, and its inverse (0, 0 for a zero block) */
INLINE void q8_scales(float amax, float *d, float *id) {
    *id = amax >= Q8_MIN_AMAX ? 127.0f / amax : 0.0f;
    *d = *id != 0.0f ? amax / 127.0f : 0.0f;
}

/* Every ISA rounds x * id to nearest, ties to even (the FPU's default mode, which
 * nearbyintf and the SIMD conversions both follow), so all produce the same bytes. */
static void quantize_q8_scalar(const float *x, const ps_q8_vec *out, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float amax = 0.0f, d, id;
        for (int j = 0; j < QK; j++) amax = MAX(amax, fabsf(x[j]));
        q8_scales(amax, &d, &id);
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            const int8_t q = (int8_t)nearbyintf(x[j] * id);
            out->qs[QK * i + j] = q;
            sum += q;
        }
        out->d[i] = d;
        out->s[i] = d * (float)sum;
    }
}

/* ggml's reference dots of these types with its Q8_0 / Q8_1 activation blocks: an exact
 * integer sum per block, then float. */
static float dot_q8_q8_0_scalar(const void *row, const ps_q8_vec *x, int64_t n) {
    const block_q8_0 *b = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK; i++) {
        const int8_t *xq = x->qs + QK * i;
        int32_t si = 0;
        for (int j = 0; j < QK; j++) si += b[i].qs[j] * xq[j];
        sum += (float)si * (ps_f16_to_f32(b[i].d) * x->d[i]);
    }
    return sum;
}
static float dot_q8_q4_0_scalar(const void *row, const ps_q8_vec *x, int64_t n) {
    const block_q4_0 *b = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK; i++) {
        const int8_t *xq = x->qs + QK * i;
        int32_t si = 0;
        for (int j = 0; j < QK / 2; j++)
            si += ((b[i].qs[j] & 0xf) - 8) * xq[j] + ((b[i].qs[j] >> 4) - 8) * xq[j + QK / 2];
        sum += (float)si * (ps_f16_to_f32(b[i].d) * x->d[i]);
    }
    return sum;
}
/* sum_j (q_j*d + m) * xq_j*dx = d*dx * sum_j q_j xq_j + m * s */
static float dot_q8_q4_1_scalar(const void *row, const ps_q8_vec *x, int64_t n) {
    const block_q4_1 *b = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK; i++) {
        const int8_t *xq = x->qs + QK * i;
        int32_t si = 0;
        for (int j = 0; j < QK / 2; j++) si += (b[i].qs[j] & 0xf) * xq[j] + (b[i].qs[j] >> 4) * xq[j + QK / 2];
        sum += (float)si * (ps_f16_to_f32(b[i].d) * x->d[i]) + ps_f16_to_f32(b[i].m) * x->s[i];
    }
    return sum;
}

/* The x86 dots compute, per block, one integer dot of unsigned and signed bytes (Q4: the codes
 * 0..15 as they are; Q8_0: |w| and x with w's sign), then add off * s with off = -8d (Q4_0) or
 * m (Q4_1): the Q4_1 formula above. (NEON multiplies signed bytes: Q4_0's codes minus 8.)
 * The f16 bits of block c's d and m (m: Q4_1): */
INLINE void block_halves(const void *row, int64_t c, int type, uint16_t *d, uint16_t *m) {
    switch (type) {
    case PS_TYPE_Q8_0: *d = ((const block_q8_0 *)row)[c].d, *m = 0; return;
    case PS_TYPE_Q4_0: *d = ((const block_q4_0 *)row)[c].d, *m = 0; return;
    default:           *d = ((const block_q4_1 *)row)[c].d, *m = ((const block_q4_1 *)row)[c].m; return;
    }
}

/* the 16 code bytes of Q4 block c */
INLINE const uint8_t *q4_codes(const void *row, int64_t c, int type) {
    return type == PS_TYPE_Q4_0 ? ((const block_q4_0 *)row)[c].qs : ((const block_q4_1 *)row)[c].qs;
}

/* Element i of a plain row, for the tails of the SIMD loops. */
INLINE float load1(const void *row, int64_t i, int type) {
    switch (type) {
    case PS_TYPE_F16:  return ps_f16_to_f32(((const uint16_t *)row)[i]);
    case PS_TYPE_BF16: return ps_bf16_to_f32(((const uint16_t *)row)[i]);
    default:           return ((const float *)row)[i];
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Prompt batches in int8 (ps_q8_batch, gemm_q8): the definition, and the scalar kernel      */

/* ps_q8_batch's interleaving: token t is lane t % 16 of group t / 16; a group's block b is 8
 * steps, step s holding each lane's weights 4s..4s+3 of the block (4 bytes per lane), so that
 * one vector of 32-bit lanes is one step of 8 or 16 tokens, and a 4-byte broadcast of a
 * weight row meets every token at once (vpdpbusd: 4 products per lane). */
#define GQ_LANES PS_Q8_BATCH_LANES
#define GQ_STEP_BYTES (GQ_LANES * 4)
#define GQ_BLOCK_BYTES (GQ_STEP_BYTES * QK / 4)

int64_t ps_q8_batch_groups(int64_t batch) { return (batch + GQ_LANES - 1) / GQ_LANES; }

/* lane l of group g, block b: the block's codes, scale, s and code sum (zeros for no token) */
static void q8_batch_put(const ps_q8_batch *out, int64_t nblk, int64_t g, int l, int64_t b, const int8_t *qs,
                         float d, float s) {
    int8_t *dst = out->qs + (g * nblk + b) * GQ_BLOCK_BYTES + 4 * l;
    int32_t sum = 0;
    for (int st = 0; st < QK / 4; st++) {
        if (qs) memcpy(dst + st * GQ_STEP_BYTES, qs + 4 * st, 4);
        else memset(dst + st * GQ_STEP_BYTES, 0, 4);
    }
    for (int j = 0; qs && j < QK; j++) sum += qs[j];
    const int64_t meta = (g * nblk + b) * GQ_LANES + l;
    out->d[meta] = d;
    out->s[meta] = s;
    out->sum[meta] = sum;
}

int ps_quantize_q8_batch_isa(int isa, const float *x, int64_t batch, int64_t n, const ps_q8_vec *tmp,
                             const ps_q8_batch *out) {
    const int64_t nblk = n / QK, groups = ps_q8_batch_groups(batch);
    for (int64_t t = 0; t < groups * GQ_LANES; t++) {
        if (t < batch && ps_quantize_q8_isa(isa, x + t * n, tmp, n) != 0) return -1;
        for (int64_t b = 0; b < nblk; b++)
            q8_batch_put(out, nblk, t / GQ_LANES, (int)(t % GQ_LANES), b, t < batch ? tmp->qs + b * QK : NULL,
                         t < batch ? tmp->d[b] : 0.0f, t < batch ? tmp->s[b] : 0.0f);
    }
    return 0;
}

/* The definition every ISA's gemm_q8 follows, bit for bit: for each row and token, over the
 * blocks in order, acc = fma(float(the block's exact integer dot), d_w * d_x, acc), then for
 * Q4_1 acc = fma(m, s_x, acc). Here a row's block is unpacked once, then meets a group's 16
 * tokens with the tokens innermost (a loop the compiler vectorises). */
static void gemm_q8_scalar(int type, const void *a, int64_t m, const ps_q8_batch *x, int64_t nb, int64_t k,
                           float *c, int64_t ldc) {
    const int64_t nblk = k / QK;
    const size_t row_bytes = ps_row_bytes(type, k);
    for (int64_t i = 0; i < m; i++) {
        const void *row = (const char *)a + (size_t)i * row_bytes;
        for (int64_t g = 0; g < ps_q8_batch_groups(nb); g++) {
            float acc[GQ_LANES] = { 0 };
            for (int64_t b = 0; b < nblk; b++) {
                int8_t w[QK];
                uint16_t dh, mh;
                block_halves(row, b, type, &dh, &mh);
                const float dw = ps_f16_to_f32(dh), mw = ps_f16_to_f32(mh);
                for (int e = 0; e < QK; e++) {
                    if (type == PS_TYPE_Q8_0) { w[e] = ((const block_q8_0 *)row)[b].qs[e]; continue; }
                    const uint8_t q = q4_codes(row, b, type)[e % (QK / 2)];
                    w[e] = (int8_t)((e < QK / 2 ? q & 0xf : q >> 4) - (type == PS_TYPE_Q4_0 ? 8 : 0));
                }
                const int8_t *xq = x->qs + (g * nblk + b) * GQ_BLOCK_BYTES;
                int32_t dot[GQ_LANES] = { 0 };
                for (int e = 0; e < QK; e++)
                    for (int l = 0; l < GQ_LANES; l++) dot[l] += w[e] * xq[(e / 4) * GQ_STEP_BYTES + 4 * l + e % 4];
                const int64_t meta = (g * nblk + b) * GQ_LANES;
                for (int l = 0; l < GQ_LANES; l++) {
                    acc[l] = fmaf((float)dot[l], dw * x->d[meta + l], acc[l]);
                    if (type == PS_TYPE_Q4_1) acc[l] = fmaf(mw, x->s[meta + l], acc[l]);
                }
            }
            for (int64_t l = 0; l < MIN(GQ_LANES, nb - g * GQ_LANES); l++) c[(g * GQ_LANES + l) * ldc + i] = acc[l];
        }
    }
}

#define GEMM_Q8_TYPE(TARGET, isa, t, TYPE)                                                     \
    TARGET static void gemm_q8_##t##_##isa(const void *a, int64_t m, const ps_q8_batch *x, int64_t nb, int64_t k, \
                                           float *c, int64_t ldc) {                            \
        gemm_q8_##isa(TYPE, a, m, x, nb, k, c, ldc);                                           \
    }
/* The loops around an ISA's tile, gq_tile_<isa>(a, row_bytes, R, T, type, x, nblk, g, out): the
 * tile multiplies R rows (R_FULL, or 1 for the rows left over) with T groups of 16 tokens from
 * group g (T_MAX, or 1 for the last group), into out[4 * t + r][lane]; this stores the lanes
 * that are tokens. */
#define GEMM_Q8_LOOPS(TARGET, isa, R_FULL, T_MAX)                                              \
    TARGET INLINE void gq_rows_##isa(const char *a, size_t row_bytes, const int R, const int type, \
                                     const ps_q8_batch *x, int64_t nb, int64_t nblk, float *c, int64_t ldc) { \
        float out[4 * T_MAX][GQ_LANES];                                                        \
        const int64_t groups = ps_q8_batch_groups(nb);                                         \
        for (int64_t g = 0; g < groups;) {                                                     \
            const int T = g + T_MAX <= groups ? T_MAX : 1;                                     \
            if (T == T_MAX) gq_tile_##isa(a, row_bytes, R, T_MAX, type, x, nblk, g, out);      \
            else            gq_tile_##isa(a, row_bytes, R, 1, type, x, nblk, g, out);          \
            for (int t = 0; t < T; t++, g++) {                                                 \
                const int64_t lanes = MIN(nb - g * GQ_LANES, GQ_LANES);                        \
                for (int64_t l = 0; l < lanes; l++)                                            \
                    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) c[(g * GQ_LANES + l) * ldc + r] = out[4 * t + r][l]; \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    TARGET INLINE void gemm_q8_##isa(const int type, const void *a, int64_t m, const ps_q8_batch *x, int64_t nb, \
                                     int64_t k, float *c, int64_t ldc) {                       \
        const size_t row_bytes = ps_row_bytes(type, k);                                        \
        const int64_t nblk = k / QK;                                                           \
        const int R = R_FULL;                                                                  \
        const char *ac = a;                                                                    \
        int64_t i = 0;                                                                         \
        for (; i + R <= m; i += R) gq_rows_##isa(ac + i * row_bytes, row_bytes, R, type, x, nb, nblk, c + i, ldc); \
        for (; i < m; i++) gq_rows_##isa(ac + i * row_bytes, row_bytes, 1, type, x, nb, nblk, c + i, ldc); \
    }
GEMM_Q8_TYPE(, scalar, q8_0, PS_TYPE_Q8_0)
GEMM_Q8_TYPE(, scalar, q4_0, PS_TYPE_Q4_0)
GEMM_Q8_TYPE(, scalar, q4_1, PS_TYPE_Q4_1)

/* The scalar axpy4: four axpys, one after the other (the definition the SIMD ones follow). */
#define SCALAR_AXPY4(t)                                                                        \
    static void axpy4_##t##_scalar(const float a[4], const void *const rows[4], float *y, int64_t n) { \
        for (int r = 0; r < 4; r++) axpy_##t##_scalar(a[r], rows[r], y, n);                    \
    }
SCALAR_AXPY4(f32)
SCALAR_AXPY4(f16)
SCALAR_AXPY4(bf16)
SCALAR_AXPY4(q8_0)
SCALAR_AXPY4(q4_0)
SCALAR_AXPY4(q4_1)

/* The per-ISA part of a traits row. */
typedef struct {
    void  (*to_float)(const void *row, float *out, int64_t n);
    float (*dot)(const void *row, const float *x, int64_t n);
    void  (*axpy)(float a, const void *row, float *y, int64_t n);
    void  (*axpy4)(const float a[4], const void *const rows[4], float *y, int64_t n);
} kernel_row;

static const kernel_row kernels_scalar[PS_TYPE_COUNT] = {
    [PS_TYPE_F32]  = { to_float_f32_scalar,  dot_f32_scalar,  axpy_f32_scalar,  axpy4_f32_scalar  },
    [PS_TYPE_F16]  = { to_float_f16_scalar,  dot_f16_scalar,  axpy_f16_scalar,  axpy4_f16_scalar  },
    [PS_TYPE_BF16] = { to_float_bf16_scalar, dot_bf16_scalar, axpy_bf16_scalar, axpy4_bf16_scalar },
    [PS_TYPE_Q8_0] = { to_float_q8_0_scalar, dot_q8_0_scalar, axpy_q8_0_scalar, axpy4_q8_0_scalar },
    [PS_TYPE_Q4_0] = { to_float_q4_0_scalar, dot_q4_0_scalar, axpy_q4_0_scalar, axpy4_q4_0_scalar },
    [PS_TYPE_Q4_1] = { to_float_q4_1_scalar, dot_q4_1_scalar, axpy_q4_1_scalar, axpy4_q4_1_scalar },
};

typedef void (*gemm_fn)(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                        int64_t k, float *c, int64_t ldc);

static void gemm_scalar(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                        int64_t k, float *c, int64_t ldc) {
    for (int64_t j = 0; j < nb; j++)
        for (int64_t i = 0; i < m; i++) c[j * ldc + i] = dot_f32_scalar(a + i * lda, b + j * ldb, k);
}

/* e^x, the same steps in every isa (so every table returns the same bits): x = n ln2 + r with
 * n = round(x log2 e) and ln2 in two parts (Cephes' expf), e^r by Cephes' degree-7 polynomial on
 * |r| <= ln2/2 evaluated with fmas, then 2^n applied as 2^(n/2) * 2^(n - n/2), so that results
 * down to the subnormals round once. Within 1 ulp of the exact value (tests); 0 below
 * EXP_X_MIN, inf above EXP_X_MAX, NaN for NaN. */
#define EXP_X_MIN -104.0f        /* e^-104 < half the smallest subnormal */
#define EXP_X_MAX 88.8f          /* e^88.8 > FLT_MAX */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f  /* few bits: n * EXP_LN2_HI is exact */
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

/* the float 2^e, for a normal exponent e */
static inline float pow2_scalar(int32_t e) { return f32_from_bits((uint32_t)(e + 127) << 23); }

static float exp1_scalar(float x) {
    if (x != x) return x + x;
    const float xc = x < EXP_X_MIN ? EXP_X_MIN : x > EXP_X_MAX ? EXP_X_MAX : x;
    const float n = nearbyintf(xc * EXP_LOG2E);
    const float r = fmaf(n, -EXP_LN2_LO, fmaf(n, -EXP_LN2_HI, xc));
    float p = fmaf(EXP_P0, r, EXP_P1);
    p = fmaf(p, r, EXP_P2);
    p = fmaf(p, r, EXP_P3);
    p = fmaf(p, r, EXP_P4);
    p = fmaf(p, r, EXP_P5);
    const float y = fmaf(p, r * r, r) + 1.0f;
    const int32_t e = (int32_t)n, e1 = e >> 1;
    return y * pow2_scalar(e1) * pow2_scalar(e - e1);
}

static void exp_scalar(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = exp1_scalar(x[i]);
}

static int64_t keep_at_least_scalar(float *x, int64_t n, float min, int32_t *idx) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!(x[i] >= min)) x[i] = 0.0f;
        if (x[i] != 0.0f) idx[k++] = (int32_t)i;
    }
    return k;
}

static void scores_scalar(const float *q, const void *k, int64_t ld, int64_t n, int64_t hd, int k_type, float *out) {
    const size_t es = k_type == PS_TYPE_F16 ? 2 : 4;
    for (int64_t t = 0; t < n; t++)
        out[t] = (k_type == PS_TYPE_F16 ? dot_f16_scalar : dot_f32_scalar)((const char *)k + (size_t)(t * ld) * es, q, hd);
}

static void to_bf16_scalar(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = ps_f32_to_bf16(x[i]);
}

/* gemm16's definition: each (row, lane) one fma chain over i in order, from zero */
static void gemm16_scalar(const float *a, int64_t a_rs, int64_t a_ks, int64_t m, const float *b, int64_t ldb,
                          int64_t k, float *c, int64_t ldc) {
    for (int64_t r = 0; r < m; r++) {
        float acc[16] = { 0 };
        for (int64_t i = 0; i < k; i++) {
            const float x = a[r * a_rs + i * a_ks];
            for (int l = 0; l < 16; l++) acc[l] = fmaf(x, b[i * ldb + l], acc[l]);
        }
        for (int l = 0; l < 16; l++) c[r * ldc + l] = acc[l];
    }
}

/* weighted_sum over rows of type F32 or F16 (the KV cache's) */
static void weighted_sum_scalar(const float *w, int64_t n, const void *rows, int64_t ld, int64_t k, int type,
                                float *out) {
    for (int64_t i = 0; i < k; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < k; i++)
            out[i] += w[t] * (type == PS_TYPE_F16 ? ps_f16_to_f32(((const uint16_t *)rows)[t * ld + i])
                                                  : ((const float *)rows)[t * ld + i]);
}

/* axpy_nonzero's definition: each y[i] one fma chain over the rows with a non-zero a, in order */
static void axpy_nonzero_scalar(const float *a, int64_t n, const float *rows, int64_t ld, int64_t off, float *y,
                                int64_t k) {
    for (int64_t j = 0; j < n; j++)
        if (a[j] != 0.0f)
            for (int64_t i = 0; i < k; i++) y[i] = fmaf(a[j], rows[j * ld + off + i], y[i]);
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
    }                                                                                          \
    TARGET static void axpy4_##t##_##isa(const float a[4], const void *const rows[4], float *y, int64_t n) { \
        axpy4_##isa(a, rows, y, whole_blocks(n, TYPE), TYPE);                                  \
    }
#define SIMD_TABLE(isa)                                                                        \
    static const kernel_row kernels_##isa[PS_TYPE_COUNT] = {                                   \
        [PS_TYPE_F32]  = { to_float_f32_##isa,  dot_f32_##isa,  axpy_f32_##isa,  axpy4_f32_##isa  }, \
        [PS_TYPE_F16]  = { to_float_f16_##isa,  dot_f16_##isa,  axpy_f16_##isa,  axpy4_f16_##isa  }, \
        [PS_TYPE_BF16] = { to_float_bf16_##isa, dot_bf16_##isa, axpy_bf16_##isa, axpy4_bf16_##isa }, \
        [PS_TYPE_Q8_0] = { to_float_q8_0_##isa, dot_q8_0_##isa, axpy_q8_0_##isa, axpy4_q8_0_##isa }, \
        [PS_TYPE_Q4_0] = { to_float_q4_0_##isa, dot_q4_0_##isa, axpy_q4_0_##isa, axpy4_q4_0_##isa }, \
        [PS_TYPE_Q4_1] = { to_float_q4_1_##isa, dot_q4_1_##isa, axpy_q4_1_##isa, axpy4_q4_1_##isa }, \
    };
#define SIMD_ALL_TYPES(TARGET, isa)                                                            \
    SIMD_KERNELS(TARGET, isa, f32, PS_TYPE_F32)                                                \
    SIMD_KERNELS(TARGET, isa, f16, PS_TYPE_F16)                                                \
    SIMD_KERNELS(TARGET, isa, bf16, PS_TYPE_BF16)                                              \
    SIMD_KERNELS(TARGET, isa, q8_0, PS_TYPE_Q8_0)                                              \
    SIMD_KERNELS(TARGET, isa, q4_0, PS_TYPE_Q4_0)                                              \
    SIMD_KERNELS(TARGET, isa, q4_1, PS_TYPE_Q4_1)                                              \
    SIMD_TABLE(isa)

/* The int8 part of an ISA: its activation quantiser and a dot per integer type. */
typedef float (*dot_q8_fn)(const void *row, const ps_q8_vec *x, int64_t n);
typedef void (*dot4_q8_fn)(const void *const rows[4], const ps_q8_vec *x, int64_t n, float out[4]);
typedef void (*dot8_q8_fn)(const void *const rows[8], const ps_q8_vec *x, int64_t n, float out[8]);
typedef struct {
    void (*quantize)(const float *x, const ps_q8_vec *out, int64_t n);
    dot_q8_fn dot[PS_TYPE_COUNT]; /* NULL for the float types */
    dot4_q8_fn dot4[PS_TYPE_COUNT]; /* four rows at once; NULL where there is no such kernel */
    dot8_q8_fn dot8[PS_TYPE_COUNT]; /* eight rows at once; NULL likewise */
} q8_kernels;

/* the table of an ISA; the last two arguments initialise its dot4 (four-row) and dot8
 * (eight-row) entries */
#define Q8_TABLE(isa, quantize, ...)                                                           \
    static const q8_kernels q8_##isa = {                                                       \
        quantize, { [PS_TYPE_Q8_0] = dot_q8_q8_0_##isa, [PS_TYPE_Q4_0] = dot_q8_q4_0_##isa,     \
                    [PS_TYPE_Q4_1] = dot_q8_q4_1_##isa },                                      \
        __VA_ARGS__                                                                            \
    };
Q8_TABLE(scalar, quantize_q8_scalar, { NULL }, { NULL })

/* One ISA's int8 table: instantiates its generic dot_q8_<isa>(row, x, n_blocks, type) and, with
 * SIMD_Q8_DOT4 (SIMD_Q8_DOT8), the Q4 types' four-row (and eight-row) dots from its
 * dot4_q8_<isa> (dot8_q8_<isa>)(rows, x, n_blocks, type, out). */
#define SIMD_Q8_DOTS(TARGET, isa)                                                              \
    TARGET static float dot_q8_q8_0_##isa(const void *row, const ps_q8_vec *x, int64_t n) {    \
        return dot_q8_##isa(row, x, n / QK, PS_TYPE_Q8_0);                                     \
    }                                                                                          \
    TARGET static float dot_q8_q4_0_##isa(const void *row, const ps_q8_vec *x, int64_t n) {    \
        return dot_q8_##isa(row, x, n / QK, PS_TYPE_Q4_0);                                     \
    }                                                                                          \
    TARGET static float dot_q8_q4_1_##isa(const void *row, const ps_q8_vec *x, int64_t n) {    \
        return dot_q8_##isa(row, x, n / QK, PS_TYPE_Q4_1);                                     \
    }
#define SIMD_Q8(TARGET, isa, quantize)                                                         \
    SIMD_Q8_DOTS(TARGET, isa)                                                                  \
    Q8_TABLE(isa, quantize, { NULL }, { NULL })
/* the Q4 types' R-row dots (R = 4 or 8) from an ISA's dot<R>_q8_<isa>(rows, x, n_blocks, type, out) */
#define SIMD_Q8_ROWS_FN(TARGET, isa, R)                                                        \
    TARGET static void dot##R##_q8_q4_0_##isa(const void *const rows[R], const ps_q8_vec *x, int64_t n, float out[R]) { \
        dot##R##_q8_##isa(rows, x, n / QK, PS_TYPE_Q4_0, out);                                 \
    }                                                                                          \
    TARGET static void dot##R##_q8_q4_1_##isa(const void *const rows[R], const ps_q8_vec *x, int64_t n, float out[R]) { \
        dot##R##_q8_##isa(rows, x, n / QK, PS_TYPE_Q4_1, out);                                 \
    }
#define SIMD_Q8_DOT4(TARGET, isa, quantize)                                                    \
    SIMD_Q8_DOTS(TARGET, isa)                                                                  \
    SIMD_Q8_ROWS_FN(TARGET, isa, 4)                                                            \
    Q8_TABLE(isa, quantize, { [PS_TYPE_Q4_0] = dot4_q8_q4_0_##isa, [PS_TYPE_Q4_1] = dot4_q8_q4_1_##isa }, { NULL })
#define SIMD_Q8_DOT8(TARGET, isa, quantize)                                                    \
    SIMD_Q8_DOTS(TARGET, isa)                                                                  \
    SIMD_Q8_ROWS_FN(TARGET, isa, 4)                                                            \
    SIMD_Q8_ROWS_FN(TARGET, isa, 8)                                                            \
    Q8_TABLE(isa, quantize, { [PS_TYPE_Q4_0] = dot4_q8_q4_0_##isa, [PS_TYPE_Q4_1] = dot4_q8_q4_1_##isa }, \
             { [PS_TYPE_Q4_0] = dot8_q8_q4_0_##isa, [PS_TYPE_Q4_1] = dot8_q8_q4_1_##isa })

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

/* Q8_0 rows add (a d) q: one multiply per block, not one per 8 weights (a (d q) cost a vmulps
 * per vector). On a Zen 3 machine without AVX-512 (native/bench/bench_kernels, 1536 x 576)
 * axpy4 went from 10.5-13.1 to 14.4-15.9 GB/s, and exact-mode decode of a ~70%-sparse SmolLM2
 * Q8_0 (interleave.py --native, alternating builds, 1 thread) from 100-113 to 107-122 t/s: there
 * the sparse FFN's down vectors had cost as much as the dense down projection they replace. */
TARGET_AVX2 INLINE void axpy_q8_0_blocks_avx2(const float *a, const void *const *rows, int R, float *y, int64_t nb) {
    for (int64_t c = 0; c < nb; c++) {
        __m256 acc[4];
        for (int k = 0; k < 4; k++) acc[k] = _mm256_loadu_ps(y + 32 * c + 8 * k);
        for (int r = 0; r < R; r++) {
            const block_q8_0 *b = (const block_q8_0 *)rows[r] + c;
            const __m256 ad = _mm256_set1_ps(a[r] * _cvtsh_ss(b->d));
            for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(ad, i8x8_avx2(b->qs + 8 * k), acc[k]);
        }
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(y + 32 * c + 8 * k, acc[k]);
    }
}

TARGET_AVX2 INLINE void axpy_avx2(float a, const void *row, float *y, int64_t n, int type) {
    if (type == PS_TYPE_Q8_0) {
        axpy_q8_0_blocks_avx2(&a, &row, 1, y, n / QK);
        return;
    }
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

/* axpy's fmas for four rows in turn, on 32 columns of y held in registers */
TARGET_AVX2 INLINE void axpy4_avx2(const float *a, const void *const *rows, float *y, int64_t n, int type) {
    if (type == PS_TYPE_Q8_0) {
        axpy_q8_0_blocks_avx2(a, rows, 4, y, n / QK);
        return;
    }
    const __m256 va[4] = { _mm256_set1_ps(a[0]), _mm256_set1_ps(a[1]), _mm256_set1_ps(a[2]), _mm256_set1_ps(a[3]) };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 acc[4];
        for (int k = 0; k < 4; k++) acc[k] = _mm256_loadu_ps(y + i + 8 * k);
        for (int r = 0; r < 4; r++) {
            const w32_avx2 w = load32_avx2(rows[r], i / 32, type);
            for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(va[r], w.v[k], acc[k]);
        }
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(y + i + 8 * k, acc[k]);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 acc = _mm256_loadu_ps(y + i);
        for (int r = 0; r < 4; r++) acc = _mm256_fmadd_ps(va[r], load8_avx2(rows[r], i, type), acc);
        _mm256_storeu_ps(y + i, acc);
    }
    for (; i < n; i++)
        for (int r = 0; r < 4; r++) y[i] += a[r] * load1(rows[r], i, type);
}

SIMD_ALL_TYPES(TARGET_AVX2, avx2)

/* One R x T tile (R <= 3 rows, T <= 4 tokens; constants where it is inlined): R * T
 * accumulators, R + T loads per R * T fmas. a's rows are of any type load8_avx2 reads (the
 * callers: F32, F16), converted as they are loaded: halves convert exactly, so an F16 tile gives
 * the bits of the f32 GEMM on the converted rows. */
TARGET_AVX2 INLINE void gemm_tile_avx2(const void *a, int64_t lda, int R, const float *b, int64_t ldb, int T,
                                       int64_t k, float *c, int64_t ldc, int type) {
    const size_t es = type == PS_TYPE_F32 ? 4 : 2;   /* bytes per element of a */
    const int64_t k8 = k - k % 8;
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t p = 0; p < k8; p += 8) {
        __m256 va[3];
        for (int r = 0; r < R; r++) va[r] = load8_avx2((const char *)a + (size_t)(r * lda) * es, p, type);
        for (int t = 0; t < T; t++) {
            const __m256 vb = _mm256_loadu_ps(b + t * ldb + p);
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(va[r], vb, acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float s = hsum_avx2(acc[r][t]);
            for (int64_t p = k8; p < k; p++) s += load1((const char *)a + (size_t)(r * lda) * es, p, type) * b[t * ldb + p];
            c[t * ldc + r] = s;
        }
}

/* tiles of 3 rows x 4 tokens: 12 accumulators, 3 row and 1 token vector (all 16 registers), 7
 * loads per 12 fmas. Against the earlier 4 x 2 tiles (6 loads per 8 fmas), pp128 with
 * PROSPARSE_ISA=avx2_vnni on the Zen 5 machine (interleave.py --prompt, alternating builds):
 * 1 thread Q4_1 416-420 -> 483-492, Q8_0 409-416 -> 476-483, F16 405-417 -> 472-478 t/s;
 * 2 threads 794-815 -> 917-950. F16 rows are converted inside the tile (vcvtph2ps takes its
 * operand from memory), not first into a float tile: on a Zen 3 machine without AVX-512, F16
 * pp128 (alternating builds, 3 rounds) 300-304 -> 314-319 t/s on 1 thread, 588-597 -> 615-630
 * on 2. Tokens outer, rows inner: a group of four tokens (9 KB for 576 columns) stays in L1
 * while the take's rows go by, where rows outer read every group from L2 again for each three
 * rows (Zen 3, F16 pp128, 1 thread: 309-314 -> 331-338 t/s). */
TARGET_AVX2 INLINE void gemm_typed_avx2(const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                                        int64_t nb, int64_t k, float *c, int64_t ldc, int type) {
    const size_t es = type == PS_TYPE_F32 ? 4 : 2;
    const int64_t m3 = m - m % 3;
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {   /* four tokens stay in L1 while the rows go by */
        for (int64_t i = 0; i < m3; i += 3)
            gemm_tile_avx2((const char *)a + (size_t)(i * lda) * es, lda, 3, b + j * ldb, ldb, 4, k, c + j * ldc + i, ldc, type);
        for (int64_t i = m3; i < m; i++)
            gemm_tile_avx2((const char *)a + (size_t)(i * lda) * es, lda, 1, b + j * ldb, ldb, 4, k, c + j * ldc + i, ldc, type);
    }
    for (; j < nb; j++) {
        for (int64_t i = 0; i < m3; i += 3)
            gemm_tile_avx2((const char *)a + (size_t)(i * lda) * es, lda, 3, b + j * ldb, ldb, 1, k, c + j * ldc + i, ldc, type);
        for (int64_t i = m3; i < m; i++)
            gemm_tile_avx2((const char *)a + (size_t)(i * lda) * es, lda, 1, b + j * ldb, ldb, 1, k, c + j * ldc + i, ldc, type);
    }
}

TARGET_AVX2 static void gemm_avx2(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                                  int64_t k, float *c, int64_t ldc) {
    gemm_typed_avx2(a, lda, m, b, ldb, nb, k, c, ldc, PS_TYPE_F32);
}

TARGET_AVX2 static void gemm_f16_avx2(const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                                      int64_t k, float *c, int64_t ldc) {
    gemm_typed_avx2(a, lda, m, b, ldb, nb, k, c, ldc, PS_TYPE_F16);
}

/* exp1_scalar's steps on 8 lanes */
TARGET_AVX2 INLINE __m256 exp8_avx2(__m256 x) {
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_X_MIN)), _mm256_set1_ps(EXP_X_MAX));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_LN2_LO), _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_LN2_HI), xc));
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(EXP_P0), r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_cvtps_epi32(n), e1 = _mm256_srai_epi32(e, 1), bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(e, e1), bias), 23));
    const __m256 out = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
    return _mm256_blendv_ps(out, _mm256_add_ps(x, x), _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN stays NaN */
}

TARGET_AVX2 static void exp_avx2(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp8_avx2(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] = exp1_scalar(x[i]);
}

/* gemm16: tiles of 6 rows, each row's 16 lanes in two vectors (12 accumulators); per step two
 * loads of b and a broadcast of each row's a */
TARGET_AVX2 INLINE void gemm16_tile_avx2(const float *a, int64_t a_rs, int64_t a_ks, const int R, const float *b,
                                         int64_t ldb, int64_t k, float *c, int64_t ldc) {
    __m256 acc[6][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 b0 = _mm256_loadu_ps(b + i * ldb), b1 = _mm256_loadu_ps(b + i * ldb + 8);
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * a_rs + i * a_ks);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(c + r * ldc, acc[r][0]);
        _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    }
}

TARGET_AVX2 static void gemm16_avx2(const float *a, int64_t a_rs, int64_t a_ks, int64_t m, const float *b, int64_t ldb,
                                    int64_t k, float *c, int64_t ldc) {
    int64_t r = 0;
    for (; r + 6 <= m; r += 6) gemm16_tile_avx2(a + r * a_rs, a_rs, a_ks, 6, b, ldb, k, c + r * ldc, ldc);
    for (; r < m; r++) gemm16_tile_avx2(a + r * a_rs, a_rs, a_ks, 1, b, ldb, k, c + r * ldc, ldc);
}

/* eight lanes at a time: the kept values stored back, the indices of the non-zero ones appended
 * bit by bit from a mask. AVX2 had used the scalar loop, a branch per value, mispredicted at
 * the FFN's 10-30% density (1.5% of exact-mode decode on a Zen 3 core, perf). Exact mode on the
 * ~70%-sparse hot-first SmolLM2 files, ten alternating rounds of interleave.py --native, one
 * thread: Q4_1 median 136 -> 141 t/s, Q8_0 110.8 -> 110.6 (no difference). */
TARGET_AVX2 static int64_t keep_at_least_avx2(float *x, int64_t n, float min, int32_t *idx) {
    const __m256 vmin = _mm256_set1_ps(min);
    int64_t k = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 kept = _mm256_and_ps(v, _mm256_cmp_ps(v, vmin, _CMP_GE_OQ));
        _mm256_storeu_ps(x + i, kept);
        for (unsigned nz = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(kept, _mm256_setzero_ps(), _CMP_NEQ_UQ)); nz;
             nz &= nz - 1)
            idx[k++] = (int32_t)(i + __builtin_ctz(nz));
    }
    for (; i < n; i++) {
        if (!(x[i] >= min)) x[i] = 0.0f;
        if (x[i] != 0.0f) idx[k++] = (int32_t)i;
    }
    return k;
}

/* 32 columns at a time in 4 accumulators, kept in registers over all the rows */
TARGET_AVX2 static void scores_avx2(const float *q, const void *k, int64_t ld, int64_t n, int64_t hd, int k_type,
                                    float *out) {
    const size_t es = k_type == PS_TYPE_F16 ? 2 : 4;
    for (int64_t t = 0; t < n; t++) out[t] = dot_avx2((const char *)k + (size_t)(t * ld) * es, q, hd, k_type);
}

TARGET_AVX2 INLINE void weighted_sum_typed_avx2(const float *w, int64_t n, const void *rows, int64_t ld, int64_t k,
                                                int type, float *out) {
    const size_t es = type == PS_TYPE_F16 ? 2 : 4;
    const char *rb = rows;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps() };
        for (int64_t t = 0; t < n; t++) {
            const __m256 wt = _mm256_set1_ps(w[t]);
            const char *r = rb + (size_t)(t * ld) * es;
            for (int q = 0; q < 4; q++) acc[q] = _mm256_fmadd_ps(wt, load8_avx2(r, i + 8 * q, type), acc[q]);
        }
        for (int q = 0; q < 4; q++) _mm256_storeu_ps(out + i + 8 * q, acc[q]);
    }
    for (; i + 8 <= k; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; t++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w[t]), load8_avx2(rb + (size_t)(t * ld) * es, i, type), acc);
        _mm256_storeu_ps(out + i, acc);
    }
    if (i < k) weighted_sum_scalar(w, n, rb + (size_t)i * es, ld, k - i, type, out + i);
}
/* the type a constant in each call: its loads compile without a switch */
TARGET_AVX2 static void weighted_sum_avx2(const float *w, int64_t n, const void *rows, int64_t ld, int64_t k,
                                          int v_type, float *out) {
    if (v_type == PS_TYPE_F16) weighted_sum_typed_avx2(w, n, rows, ld, k, PS_TYPE_F16, out);
    else                       weighted_sum_typed_avx2(w, n, rows, ld, k, PS_TYPE_F32, out);
}

/* the rows with a non-zero a as a bit mask (n <= 64, as axpy_nonzero allows), so that the
 * kernel branches once per row it adds rather than once per row, mispredicted as often as which
 * ones are is random */
TARGET_AVX2 INLINE uint64_t nonzero_mask_avx2(const float *a, int64_t n) {
    uint64_t mask = 0;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        mask |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(a + j), _mm256_setzero_ps(),
                                                                      _CMP_NEQ_UQ)) << j;
    for (; j < n; j++) mask |= (uint64_t)(a[j] != 0.0f) << j;
    return mask;
}
/* y[0..8 NV) in NV registers while the rows whose bit is set in nonzero stream past */
TARGET_AVX2 INLINE void axpy_nonzero_pass_avx2(const float *a, uint64_t nonzero, const float *rows, int64_t ld,
                                               float *y, const int NV) {
    __m256 acc[8];
    for (int q = 0; q < NV; q++) acc[q] = _mm256_loadu_ps(y + 8 * q);
    for (uint64_t m = nonzero; m; m &= m - 1) {
        const int j = __builtin_ctzll(m);
        const __m256 s = _mm256_set1_ps(a[j]);
        const float *row = rows + j * ld;
        for (int q = 0; q < NV; q++) acc[q] = _mm256_fmadd_ps(s, _mm256_loadu_ps(row + 8 * q), acc[q]);
    }
    for (int q = 0; q < NV; q++) _mm256_storeu_ps(y + 8 * q, acc[q]);
}
/* y held in registers 64 columns at a time, then 32 (four chains of fmas in flight, not one),
 * then 8, while the rows with a non-zero a stream past */
TARGET_AVX2 static void axpy_nonzero_avx2(const float *a, int64_t n, const float *rows, int64_t ld, int64_t off,
                                          float *y, int64_t k) {
    const uint64_t nonzero = nonzero_mask_avx2(a, n);
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) axpy_nonzero_pass_avx2(a, nonzero, rows + off + i, ld, y + i, 8);
    for (; i + 32 <= k; i += 32) axpy_nonzero_pass_avx2(a, nonzero, rows + off + i, ld, y + i, 4);
    for (; i + 8 <= k; i += 8)   axpy_nonzero_pass_avx2(a, nonzero, rows + off + i, ld, y + i, 1);
    if (i < k) axpy_nonzero_scalar(a, n, rows, ld, off + i, y + i, k - i);
}

/* 8-bit activations. The packs below saturate nothing: |q| <= 127. */

/* the codes of four blocks (128 from qs) in ps_q8_vec's q4 order: lo(c) lo(c+2) | hi(c) hi(c+2)
 * | lo(c+1) lo(c+3) | hi(c+1) hi(c+3) */
TARGET_AVX2 INLINE void q4_regroup_avx2(const int8_t *qs, __m256i q[4]) {
    const __m256i *xq = (const __m256i *)qs;
    const __m256i x0 = _mm256_loadu_si256(xq), x1 = _mm256_loadu_si256(xq + 1);
    const __m256i x2 = _mm256_loadu_si256(xq + 2), x3 = _mm256_loadu_si256(xq + 3);
    q[0] = _mm256_permute2x128_si256(x0, x2, 0x20), q[1] = _mm256_permute2x128_si256(x0, x2, 0x31);
    q[2] = _mm256_permute2x128_si256(x1, x3, 0x20), q[3] = _mm256_permute2x128_si256(x1, x3, 0x31);
}

TARGET_AVX2 static void quantize_q8_avx2(const float *x, const ps_q8_vec *out, int64_t n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        __m256 v[4], vmax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[k], abs_mask));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        float d, id;
        q8_scales(_mm_cvtss_f32(m), &d, &id);
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));
        /* the packs interleave 128-bit lanes: dwords come out as 0,2,4,6,1,3,5,7 of the wanted order */
        const __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(out->qs + QK * i),
                            _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
        out->d[i] = d;
        out->s[i] = d * (float)_mm_cvtsi128_si32(s4);
    }
    if (!out->q4) return;
    for (int64_t c = 0; c + 4 <= n / QK; c += 4) {
        __m256i q[4];
        q4_regroup_avx2(out->qs + QK * c, q);
        for (int k = 0; k < 4; k++) _mm256_storeu_si256((__m256i *)(out->q4 + QK * c) + k, q[k]);
    }
}

/* Q8_0 block c of a row and x's block c as unsigned bytes u = |w| (-128 -> 128) and signed
 * bytes s = x with w's sign, whose products sum to the block's integer dot */
TARGET_AVX2 INLINE void q8_0_operands_avx2(const void *row, int64_t c, const int8_t *xq, __m256i *u, __m256i *s) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i w = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)row)[c].qs);
    *u = _mm256_sign_epi8(w, w);
    *s = _mm256_sign_epi8(x, w);
}

/* 8 int32 lanes, each the sum of 4 products u*s: vpmaddubsw's int16 pair sums cannot saturate
 * (u <= 128, |s| <= 127), then vpmaddwd adds pairs; AVX-VNNI's vpdpbusd does both */
TARGET_AVX2 INLINE __m256i mul_sum_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* x's d (or s) of blocks c and c+1 (c+1's is 0 when !two) */
TARGET_AVX2 INLINE __m128 load_pair_avx2(const float *v, int two) {
    return two ? _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)v)) : _mm_load_ss(v);
}

/* Q4 blocks c and c+1 (c+1 only when two): the lanes' scales, block c's d times x's d in lanes
 * 0-3, block c+1's in 4-7; *off accumulates the offset terms (Q4_1's m s in lanes 1 and 3,
 * Q4_0's d s in lanes 0 and 1, to be times -8). One vcvtph2ps converts both blocks' fields. */
TARGET_AVX2 INLINE __m256 q4_scales_avx2(const void *row, const ps_q8_vec *x, int64_t c, int type, int two,
                                         __m128 *off) {
    if (type == PS_TYPE_Q4_1) {
        const block_q4_1 *b = (const block_q4_1 *)row + c;
        uint32_t dm0, dm1 = 0;
        memcpy(&dm0, &b[0], sizeof dm0);
        if (two) memcpy(&dm1, &b[1], sizeof dm1);
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)((uint64_t)dm0 | (uint64_t)dm1 << 32)));
        const __m128 prod = _mm_mul_ps(dm, _mm_unpacklo_ps(load_pair_avx2(x->d + c, two), load_pair_avx2(x->s + c, two)));
        *off = _mm_add_ps(*off, prod);                                    /* d0dx0 m0s0 d1dx1 m1s1 */
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(prod), _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
    }
    const block_q4_0 *b = (const block_q4_0 *)row + c;
    const uint16_t d0 = b[0].d, d1 = two ? b[1].d : 0;
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)d0 | (uint32_t)d1 << 16)));   /* d0 d1 */
    *off = _mm_add_ps(*off, _mm_mul_ps(d, load_pair_avx2(x->s + c, two)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_mul_ps(d, load_pair_avx2(x->d + c, two))),
                                    _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* The Q4 dots' final sums of k = 1 or 4 rows: each row's lanes in hsum_avx2's tree (i + i+4,
 * then i + i+2, then i + i+1) plus its offset term (Q4_1's m s in lanes 1 and 3, Q4_0's d s in
 * lanes 0 and 1, times -8); four rows are transposed and summed with the same additions, so a
 * row's result does not depend on whether it came alone or in a four (the tests check it). */
TARGET_AVX2 INLINE void q4_finish_avx2(const __m256 *acc, const __m128 *off, int k, int type, float *out) {
    if (k == 1) {   /* the same additions, without the transposes */
        float o[4];
        _mm_storeu_ps(o, off[0]);
        const float sum = hsum_avx2(acc[0]);
        *out = type == PS_TYPE_Q4_0 ? sum - 8.0f * (o[0] + o[1]) : sum + (o[1] + o[3]);
        return;
    }
    __m128 h[4], o[4];
    for (int r = 0; r < 4; r++) {
        h[r] = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        o[r] = off[r];
    }
    _MM_TRANSPOSE4_PS(h[0], h[1], h[2], h[3]);
    _MM_TRANSPOSE4_PS(o[0], o[1], o[2], o[3]);
    const __m128 sum = _mm_add_ps(_mm_add_ps(h[0], h[2]), _mm_add_ps(h[1], h[3]));
    const __m128 res = type == PS_TYPE_Q4_0 ? _mm_sub_ps(sum, _mm_mul_ps(_mm_set1_ps(8.0f), _mm_add_ps(o[0], o[1])))
                                            : _mm_add_ps(sum, _mm_add_ps(o[1], o[3]));
    _mm_storeu_ps(out, res);
}

/* x's side of Q4 blocks c..c+3 for q4_step4: the code vectors regrouped as a row's are (its
 * vectors pair block c with c+2 and c+1 with c+3, lane k holding the block 2k further on),
 * low nibbles' halves then high nibbles' (x's q4, or qs regrouped here when there is no q4),
 * and the scales where a row's scales meet them:
 * Q4_1 d = dx0 s0 dx1 s1 | dx2 s2 dx3 s3 against the row's d0 m0 d1 m1 | d2 m2 d3 m3; Q4_0
 * d = dx0..dx3 twice against the row's d0..d3 twice, s = 0 | s0..s3 */
typedef struct { __m256i q[4]; __m256 d, s; } q4_x4_avx2;

TARGET_AVX2 INLINE q4_x4_avx2 q4_x4_avx2_of(const ps_q8_vec *x, int64_t c, int type, int pre) {
    const __m128 d = _mm_loadu_ps(x->d + c), s = _mm_loadu_ps(x->s + c);
    q4_x4_avx2 r = { { _mm256_setzero_si256() }, _mm256_set_m128(d, d), _mm256_set_m128(s, _mm_setzero_ps()) };
    if (pre) {
        const __m256i *q = (const __m256i *)(x->q4 + QK * c);
        for (int k = 0; k < 4; k++) r.q[k] = _mm256_loadu_si256(q + k);
    } else {
        q4_regroup_avx2(x->qs + QK * c, r.q);
    }
    if (type == PS_TYPE_Q4_1) r.d = _mm256_set_m128(_mm_unpackhi_ps(d, s), _mm_unpacklo_ps(d, s));
    return r;
}

/* a four-block step's offset sums folded into q4_step2's layout (Q4_1's m s in lanes 1 and 3,
 * Q4_0's d s in lanes 0 and 1) */
TARGET_AVX2 INLINE __m128 q4_fold_off_avx2(__m128 off, __m256 off4, int type) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(off4), _mm256_extractf128_ps(off4, 1));
    return _mm_add_ps(off, type == PS_TYPE_Q4_1 ? h : _mm_add_ps(h, _mm_movehl_ps(h, h)));
}

/* Int8 dots over nb blocks. Q8_0: one block per step into two alternating accumulators. Q4: two
 * blocks per step, their code bytes side by side in one vector (low nibbles are weights 0-15,
 * high nibbles 16-31) and x's halves regrouped to match, so that 128-bit lane k holds block
 * c+k's dot as 4 partial sums and one scale vector serves both blocks (as the AVX-512 Q4 steps
 * do with four); one accumulator and one offset sum per row. With two of each, dot4's four rows
 * took all 16 registers and spilled: Q4_1 dot4 in cache (native/bench/bench_kernels, 576
 * columns, on the Zen 5 machine) AVX2-VNNI 29 -> 32, AVX2 25.7 -> 28.2 GB/s; default-model
 * decode with PROSPARSE_ISA=avx2_vnni, 1 thread, alternating builds, 272-277 -> 279-290 t/s.
 * Whole fours of blocks go through q4_step4 first, two such vectors (blocks c and c+2, c+1 and
 * c+3), so that one vcvtph2ps converts the four blocks' scales and in-lane shuffles (not a
 * lane-crossing vpermps, two uops on Zen 3) spread them over the lanes; the two vpmaddubsw
 * products of a vector are added as int16 (|.| <= 2 x 2 x 15 x 127) before one vpmaddwd. On
 * the Zen 3 machine (no AVX-512; native/bench/bench_kernels 256 576 3000) Q4_1 dot4 13.3 ->
 * 14.3 GB/s, Q4_0 11.8 -> 12.7; default-model decode, 1 thread, alternating builds, median
 * 120 -> 133 t/s. With x's codes regrouped once per mat-vec by the quantiser (ps_q8_vec's q4)
 * instead of per four rows, the regrouped vectors are memory operands and dot4's four rows fit
 * the 16 registers again: Q4_1 dot4 14.3-14.4 -> 14.6-14.8, dot 11.1 -> 11.6, Q4_0 dot4 12.8
 * -> 13.2-13.4, dot 10.0 -> 11.1 (same command, fastest of 4 alternating runs); decode did not
 * move measurably (1 thread, alternating builds: median 136.8 -> 135.0 t/s, max 139.8 -> 143.2,
 * rounds +-8%). */
#define DOT_Q8_AVX2(TARGET, isa, MUL_SUM, MUL_SUM2)                                           \
    TARGET INLINE __m256 q8_0_step_##isa(const void *row, const ps_q8_vec *x, int64_t c, __m256 acc) { \
        __m256i u, s;                                                                          \
        q8_0_operands_avx2(row, c, x->qs + QK * c, &u, &s);                                    \
        const float d = _cvtsh_ss(((const block_q8_0 *)row)[c].d);                             \
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(MUL_SUM(u, s)), _mm256_set1_ps(d * x->d[c]), acc); \
    }                                                                                          \
    TARGET INLINE __m256 q4_step2_##isa(const void *row, const ps_q8_vec *x, int64_t c, int type, int two, \
                                        __m256 acc, __m128 *off) {                             \
        const __m128i c0 = _mm_loadu_si128((const __m128i *)q4_codes(row, c, type));           \
        const __m128i c1 = two ? _mm_loadu_si128((const __m128i *)q4_codes(row, c + 1, type)) : _mm_setzero_si128(); \
        const __m256i codes = _mm256_set_m128i(c1, c0), m4 = _mm256_set1_epi8(0x0f);           \
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x->qs + QK * c));              \
        const __m256i x1 = two ? _mm256_loadu_si256((const __m256i *)(x->qs + QK * (c + 1))) : _mm256_setzero_si256(); \
        const __m256i t = MUL_SUM2(_mm256_and_si256(codes, m4), _mm256_permute2x128_si256(x0, x1, 0x20), \
                                   _mm256_and_si256(_mm256_srli_epi16(codes, 4), m4),          \
                                   _mm256_permute2x128_si256(x0, x1, 0x31));                   \
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), q4_scales_avx2(row, x, c, type, two, off), acc); \
    }                                                                                          \
    TARGET INLINE __m256 q4_step4_##isa(const void *row, const q4_x4_avx2 *x, int64_t c, int type, __m256 acc, \
                                        __m256 *off) {                                         \
        __m128i h;                     /* the four blocks' scale fields, as f16 */              \
        if (type == PS_TYPE_Q4_1) {                                                            \
            const block_q4_1 *b = (const block_q4_1 *)row + c;                                 \
            uint32_t dm[4];                                                                    \
            for (int k = 0; k < 4; k++) memcpy(&dm[k], &b[k], sizeof dm[k]);                   \
            h = _mm_insert_epi64(_mm_cvtsi64_si128((long long)((uint64_t)dm[0] | (uint64_t)dm[1] << 32)), \
                                 (long long)((uint64_t)dm[2] | (uint64_t)dm[3] << 32), 1);     \
        } else {                                                                               \
            const block_q4_0 *b = (const block_q4_0 *)row + c;                                 \
            h = _mm_cvtsi64_si128((long long)((uint64_t)b[0].d | (uint64_t)b[1].d << 16 | (uint64_t)b[2].d << 32 | \
                                              (uint64_t)b[3].d << 48));                        \
            h = _mm_unpacklo_epi64(h, h);                                                      \
        }                                                                                      \
        const __m128i *q[4];                                                                   \
        for (int k = 0; k < 4; k++) q[k] = (const __m128i *)q4_codes(row, c + k, type);        \
        const __m256i m4 = _mm256_set1_epi8(0x0f);                                             \
        const __m256i ca = _mm256_set_m128i(_mm_loadu_si128(q[2]), _mm_loadu_si128(q[0]));    \
        const __m256i cb = _mm256_set_m128i(_mm_loadu_si128(q[3]), _mm_loadu_si128(q[1]));    \
        const __m256i ta = MUL_SUM2(_mm256_and_si256(ca, m4), x->q[0], _mm256_and_si256(_mm256_srli_epi16(ca, 4), m4), x->q[1]); \
        const __m256i tb = MUL_SUM2(_mm256_and_si256(cb, m4), x->q[2], _mm256_and_si256(_mm256_srli_epi16(cb, 4), m4), x->q[3]); \
        const __m256 f = _mm256_cvtph_ps(h), prod = _mm256_mul_ps(f, x->d);                    \
        __m256 sa, sb;                                                                         \
        if (type == PS_TYPE_Q4_1) {    /* d0dx0 m0s0 d1dx1 m1s1 | d2dx2 m2s2 d3dx3 m3s3 */      \
            *off = _mm256_add_ps(*off, prod);                                                  \
            sa = _mm256_permute_ps(prod, 0x00), sb = _mm256_permute_ps(prod, 0xaa);            \
        } else {                       /* d0dx0 d1dx1 d2dx2 d3dx3, twice */                     \
            *off = _mm256_fmadd_ps(f, x->s, *off);                                             \
            sa = _mm256_permutevar_ps(prod, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));        \
            sb = _mm256_permutevar_ps(prod, _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3));        \
        }                                                                                      \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ta), sa, acc);                                \
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(tb), sb, acc);                               \
    }                                                                                          \
    /* the whole fours of blocks of R rows (x's q4 read when pre, else qs regrouped); returns  \
     * where they end */                                                                       \
    TARGET INLINE int64_t q4_fours_##isa(const void *const *rows, int R, const ps_q8_vec *x, int64_t nb,\
                                         int type, int pre, __m256 *acc, __m256 *off4) {       \
        int64_t c = 0;                                                                         \
        for (; c + 4 <= nb; c += 4) {                                                          \
            const q4_x4_avx2 x4 = q4_x4_avx2_of(x, c, type, pre);                              \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                \
                acc[r] = q4_step4_##isa(rows[r], &x4, c, type, acc[r], &off4[r]);              \
        }                                                                                      \
        return c;                                                                              \
    }                                                                                          \
    TARGET INLINE float dot_q8_##isa(const void *row, const ps_q8_vec *x, int64_t nb, int type) {\
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                         \
        int64_t c = 0;                                                                         \
        if (type == PS_TYPE_Q8_0) {                                                            \
            for (; c + 2 <= nb; c += 2) {                                                      \
                acc0 = q8_0_step_##isa(row, x, c, acc0);                                       \
                acc1 = q8_0_step_##isa(row, x, c + 1, acc1);                                   \
            }                                                                                  \
            if (c < nb) acc0 = q8_0_step_##isa(row, x, c, acc0);                               \
            return hsum_avx2(_mm256_add_ps(acc0, acc1));                                       \
        }                                                                                      \
        __m128 off = _mm_setzero_ps();                                                         \
        __m256 off4 = _mm256_setzero_ps();                                                     \
        c = x->q4 ? q4_fours_##isa(&row, 1, x, nb, type, 1, &acc0, &off4)                      \
                  : q4_fours_##isa(&row, 1, x, nb, type, 0, &acc0, &off4);                     \
        off = q4_fold_off_avx2(off, off4, type);                                               \
        for (; c + 2 <= nb; c += 2) acc0 = q4_step2_##isa(row, x, c, type, 1, acc0, &off);     \
        if (c < nb) acc0 = q4_step2_##isa(row, x, c, type, 0, acc0, &off);                     \
        float out;                                                                             \
        q4_finish_avx2(&acc0, &off, 1, type, &out);                                            \
        return out;                                                                            \
    }                                                                                          \
    TARGET INLINE void dot4_q8_##isa(const void *const rows[4], const ps_q8_vec *x, int64_t nb, int type, \
                                     float out[4]) {                                           \
        __m256 acc[4];                                                                         \
        __m128 off[4];                                                                         \
        __m256 off4[4];                                                                        \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {                                  \
            acc[r] = _mm256_setzero_ps();                                                      \
            off[r] = _mm_setzero_ps();                                                         \
            off4[r] = _mm256_setzero_ps();                                                     \
        }                                                                                      \
        int64_t c = x->q4 ? q4_fours_##isa(rows, 4, x, nb, type, 1, acc, off4)                 \
                          : q4_fours_##isa(rows, 4, x, nb, type, 0, acc, off4);                \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) off[r] = q4_fold_off_avx2(off[r], off4[r], type); \
        for (; c + 2 <= nb; c += 2)                                                            \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)                                \
                acc[r] = q4_step2_##isa(rows[r], x, c, type, 1, acc[r], &off[r]);              \
        if (c < nb)                                                                            \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)                                \
                acc[r] = q4_step2_##isa(rows[r], x, c, type, 0, acc[r], &off[r]);              \
        q4_finish_avx2(acc, off, 4, type, out);                                                \
    }

TARGET_AVX2 INLINE __m256i mul_acc_avx2(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, mul_sum_avx2(u, s));
}
/* u0*s0 + u1*s1 summed in 4s, for Q4 codes (u <= 15): the two vpmaddubsw's int16 pair sums
 * (|.| <= 2*15*127) are added before the one vpmaddwd, which cannot overflow */
TARGET_AVX2 INLINE __m256i mul_sum2_q4_avx2(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                             _mm256_set1_epi16(1));
}
DOT_Q8_AVX2(TARGET_AVX2, avx2, mul_sum_avx2, mul_sum2_q4_avx2)
SIMD_Q8_DOT4(TARGET_AVX2, avx2, quantize_q8_avx2)

/* Prompt batches in int8 (gemm_q8_scalar's definition): tiles of R rows x one group of 16
 * tokens, the group as two vectors of 8 lanes. Per step of 4 weights, a row's 4 bytes are
 * broadcast and multiplied into both halves; per block, each lane's integer sum is scaled
 * into its float accumulator. Q8_0's codes go unsigned (+128, the sign bit flipped) and each
 * lane's sum starts at -128 x its token's code sum (Q4_0: the codes are unsigned already,
 * -8 x the sum), so the sums are exact integer dots. R = 4 for Q8_0 with VNNI (8 integer
 * accumulators; the float ones spill to L1, touched once per block) and 2 for Q4, whose codes
 * take 2-3 more steps to unpack, and for Q8_0 without VNNI: in cache (native/bench/bench_kernels'
 * prompt table, 1536 x 576, 128 tokens, Zen 5) 177 and 128 G multiply-adds/s with VNNI, against
 * 57 for dequantising into the f32 GEMM. The codes of x must lie in [-127, 127], as ps_quantize_q8 makes them from finite input
 * (the sign trick without VNNI needs it). */
#define GEMM_Q8_AVX2(TARGET, isa, MUL_ACC, VNNI)                                               \
    TARGET INLINE void gq_tile_##isa(const char *a, size_t row_bytes, const int R, const int T, const int type, \
                                     const ps_q8_batch *x, int64_t nblk, int64_t g, float out[][GQ_LANES]) { \
        __m256 f[4][2];                                                                        \
        __m256i acc[4][2];                                                                     \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) f[r][0] = f[r][1] = _mm256_setzero_ps(); \
        const __m256i m4 = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8((char)0x80);        \
        for (int64_t b = 0; b < nblk; b++) {                                                   \
            const int8_t *xq = x->qs + (g * nblk + b) * GQ_BLOCK_BYTES;                        \
            const int64_t meta = (g * nblk + b) * GQ_LANES;                                    \
            __m256i init[2];                                                                   \
            for (int h = 0; h < 2; h++) {                                                      \
                const __m256i sum = _mm256_loadu_si256((const __m256i *)(x->sum + meta + 8 * h)); \
                init[h] = type == PS_TYPE_Q4_1 || (type == PS_TYPE_Q8_0 && !VNNI) ? _mm256_setzero_si256() \
                        : _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum, type == PS_TYPE_Q8_0 ? 7 : 3)); \
            }                                                                                  \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[r][0] = init[0], acc[r][1] = init[1];              \
            _Pragma("GCC unroll 8") for (int s = 0; s < QK / 4; s++) {                         \
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + s * GQ_STEP_BYTES)); \
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + s * GQ_STEP_BYTES + 32)); \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                          \
                    int32_t w4;                                                                \
                    __m256i w;                                                                 \
                    if (type == PS_TYPE_Q8_0 && !VNNI) { /* |w| times x with w's sign */       \
                        memcpy(&w4, ((const block_q8_0 *)(a + r * row_bytes))[b].qs + 4 * s, 4); \
                        w = _mm256_set1_epi32(w4);                                             \
                        const __m256i u = _mm256_sign_epi8(w, w);                              \
                        acc[r][0] = MUL_ACC(acc[r][0], u, _mm256_sign_epi8(x0, w));            \
                        acc[r][1] = MUL_ACC(acc[r][1], u, _mm256_sign_epi8(x1, w));            \
                        continue;                                                              \
                    }                                                                          \
                    if (type == PS_TYPE_Q8_0) {                                                \
                        memcpy(&w4, ((const block_q8_0 *)(a + r * row_bytes))[b].qs + 4 * s, 4); \
                        w = _mm256_xor_si256(_mm256_set1_epi32(w4), flip);                     \
                    } else { /* steps 0-3: low nibbles (weights 0-15); 4-7: high (16-31) */    \
                        memcpy(&w4, q4_codes(a + r * row_bytes, b, type) + 4 * (s & 3), 4);    \
                        w = _mm256_set1_epi32(w4);                                             \
                        w = _mm256_and_si256(s < 4 ? w : _mm256_srli_epi16(w, 4), m4);         \
                    }                                                                          \
                    acc[r][0] = MUL_ACC(acc[r][0], w, x0);                                     \
                    acc[r][1] = MUL_ACC(acc[r][1], w, x1);                                     \
                }                                                                              \
            }                                                                                  \
            const __m256 d0 = _mm256_loadu_ps(x->d + meta), d1 = _mm256_loadu_ps(x->d + meta + 8); \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                              \
                uint16_t dh, mh;                                                               \
                block_halves(a + r * row_bytes, b, type, &dh, &mh);                            \
                const __m256 dw = _mm256_set1_ps(_cvtsh_ss(dh));                               \
                f[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_mul_ps(dw, d0), f[r][0]); \
                f[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), _mm256_mul_ps(dw, d1), f[r][1]); \
                if (type == PS_TYPE_Q4_1) {                                                    \
                    const __m256 mw = _mm256_set1_ps(_cvtsh_ss(mh));                           \
                    f[r][0] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x->s + meta), f[r][0]);      \
                    f[r][1] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x->s + meta + 8), f[r][1]);  \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                  \
            _mm256_storeu_ps(out[r], f[r][0]);                                                 \
            _mm256_storeu_ps(out[r] + 8, f[r][1]);                                             \
        }                                                                                      \
    }                                                                                          \
    GEMM_Q8_LOOPS(TARGET, isa, (type == PS_TYPE_Q8_0 && VNNI ? 4 : 2), 1)
GEMM_Q8_AVX2(TARGET_AVX2, avx2, mul_acc_avx2, 0)
GEMM_Q8_TYPE(TARGET_AVX2, avx2, q8_0, PS_TYPE_Q8_0)
GEMM_Q8_TYPE(TARGET_AVX2, avx2, q4_0, PS_TYPE_Q4_0)
GEMM_Q8_TYPE(TARGET_AVX2, avx2, q4_1, PS_TYPE_Q4_1)

#if HAVE_AVX_VNNI
#define TARGET_AVX2_VNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
TARGET_AVX2_VNNI INLINE __m256i mul_sum_avx2_vnni(__m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
}
TARGET_AVX2_VNNI INLINE __m256i mul_acc_avx2_vnni(__m256i acc, __m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(acc, u, s);
}
TARGET_AVX2_VNNI INLINE __m256i mul_sum2_q4_avx2_vnni(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
}
DOT_Q8_AVX2(TARGET_AVX2_VNNI, avx2_vnni, mul_sum_avx2_vnni, mul_sum2_q4_avx2_vnni)
SIMD_Q8_DOT4(TARGET_AVX2_VNNI, avx2_vnni, quantize_q8_avx2)
GEMM_Q8_AVX2(TARGET_AVX2_VNNI, avx2_vnni, mul_acc_avx2_vnni, 1)
GEMM_Q8_TYPE(TARGET_AVX2_VNNI, avx2_vnni, q8_0, PS_TYPE_Q8_0)
GEMM_Q8_TYPE(TARGET_AVX2_VNNI, avx2_vnni, q4_0, PS_TYPE_Q4_0)
GEMM_Q8_TYPE(TARGET_AVX2_VNNI, avx2_vnni, q4_1, PS_TYPE_Q4_1)
#endif

/* ---------------------------------------------------------------------------------------- */
/* AVX-512 F/BW/VL: 32 weights = 2 x __m512                                                 */

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
        int32_t dm;
        memcpy(&dm, b, sizeof dm);
        const __m512 f = _mm512_cvtph_ps(_mm256_set1_epi32(dm));
        return q4_avx512(b->qs, _mm512_fmadd_ps(iota, _mm512_moveldup_ps(f), _mm512_movehdup_ps(f)));
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

/* axpy's fmas for four rows in turn, on 32 columns of y held in registers */
TARGET_AVX512 INLINE void axpy4_avx512(const float *a, const void *const *rows, float *y, int64_t n, int type) {
    const __m512 va[4] = { _mm512_set1_ps(a[0]), _mm512_set1_ps(a[1]), _mm512_set1_ps(a[2]), _mm512_set1_ps(a[3]) };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 lo = _mm512_loadu_ps(y + i), hi = _mm512_loadu_ps(y + i + 16);
        for (int r = 0; r < 4; r++) {
            const w32_avx512 w = load32_avx512(rows[r], i / 32, type);
            lo = _mm512_fmadd_ps(va[r], w.lo, lo);
            hi = _mm512_fmadd_ps(va[r], w.hi, hi);
        }
        _mm512_storeu_ps(y + i, lo);
        _mm512_storeu_ps(y + i + 16, hi);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        __m512 yi = _mm512_maskz_loadu_ps(m, y + i);
        for (int r = 0; r < 4; r++) yi = _mm512_fmadd_ps(va[r], load16_masked_avx512(rows[r], i, m, type), yi);
        _mm512_mask_storeu_ps(y + i, m, yi);
    }
}

SIMD_ALL_TYPES(TARGET_AVX512, avx512)

/* the 16 sums of v[0..15]'s lanes, sum of v[i] in lane i: a transpose-and-add tree (45
 * instructions where 16 separate reductions take ~130, a tenth of a k = 576 tile's work) */
TARGET_AVX512 INLINE __m512 sum16_avx512(const __m512 v[16]) {
    __m512 s[8], u[4], w[2];
    /* per 128-bit chunk: halves of v[2i] and v[2i+1] side by side */
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    /* per chunk: the chunk's sums of v[4i .. 4i+3] */
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* add chunks pairwise (0+1, 2+3 of each operand), then again */
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}

/* a 4 x 4 tile's accumulators (token t, row r: acc[4t + r]) reduced together, token t's 4 rows
 * stored from 128-bit chunk t of the sums at c + t * ldc */
TARGET_AVX512 INLINE void store_tile4x4_avx512(const __m512 acc[16], float *c, int64_t ldc) {
    const __m512 sums = sum16_avx512(acc);
    _mm_storeu_ps(c, _mm512_extractf32x4_ps(sums, 0));
    _mm_storeu_ps(c + ldc, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(c + 2 * ldc, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(c + 3 * ldc, _mm512_extractf32x4_ps(sums, 3));
}

/* tiles of 4 rows x 4 tokens: 16 accumulators, 8 loads per 16 fmas; k's tail under a mask;
 * the tile's 16 sums reduced together, token t's 4 rows stored from 128-bit chunk t */
/* a's rows of type F32, F16 or BF16, converted as they are loaded (F16 pp128, 1 thread: the GEMM with
 * the conversion inside it made 190 -> 220 GFLOP/s of a separate conversion into a float tile
 * plus the f32 GEMM); the halves convert exactly, so the result is the f32 GEMM's on the
 * converted rows, bit for bit */
TARGET_AVX512 INLINE void gemm_typed_avx512(const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                                            int64_t nb, int64_t k, float *c, int64_t ldc, int type) {
    const size_t es = type == PS_TYPE_F32 ? 4 : 2;   /* bytes per element of a */
    const int64_t k16 = k - k % 16;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const char *ar[4] = { (const char *)a + i * lda * es, (const char *)a + (i + 1) * lda * es,
                               (const char *)a + (i + 2) * lda * es, (const char *)a + (i + 3) * lda * es };
        int64_t j = 0;
        for (; j + 4 <= nb; j += 4) {
            const float *br[4] = { b + j * ldb, b + (j + 1) * ldb, b + (j + 2) * ldb, b + (j + 3) * ldb };
            __m512 acc[16]; /* token t, row r: acc[4t + r] */
            for (int q = 0; q < 16; q++) acc[q] = _mm512_setzero_ps();
            for (int64_t p = 0; p < k16; p += 16) {
                __m512 va[4];
                for (int r = 0; r < 4; r++) va[r] = load16_avx512(ar[r], p, type);
                for (int t = 0; t < 4; t++) {
                    const __m512 vb = _mm512_loadu_ps(br[t] + p);
                    for (int r = 0; r < 4; r++) acc[4 * t + r] = _mm512_fmadd_ps(va[r], vb, acc[4 * t + r]);
                }
            }
            if (k16 < k) {
                const __mmask16 mask = tail_mask(k - k16);
                __m512 va[4];
                for (int r = 0; r < 4; r++) va[r] = load16_masked_avx512(ar[r], k16, mask, type);
                for (int t = 0; t < 4; t++) {
                    const __m512 vb = _mm512_maskz_loadu_ps(mask, br[t] + k16);
                    for (int r = 0; r < 4; r++) acc[4 * t + r] = _mm512_fmadd_ps(va[r], vb, acc[4 * t + r]);
                }
            }
            store_tile4x4_avx512(acc, c + j * ldc + i, ldc);
        }
        for (; j < nb; j++)
            for (int r = 0; r < 4; r++) c[j * ldc + i + r] = dot_avx512(ar[r], b + j * ldb, k, type);
    }
    for (; i < m; i++)
        for (int64_t j = 0; j < nb; j++) c[j * ldc + i] = dot_avx512((const char *)a + i * lda * es, b + j * ldb, k, type);
}

TARGET_AVX512 static void gemm_avx512(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                                      int64_t nb, int64_t k, float *c, int64_t ldc) {
    gemm_typed_avx512(a, lda, m, b, ldb, nb, k, c, ldc, PS_TYPE_F32);
}

TARGET_AVX512 static void gemm_f16_avx512(const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                                          int64_t nb, int64_t k, float *c, int64_t ldc) {
    gemm_typed_avx512(a, lda, m, b, ldb, nb, k, c, ldc, PS_TYPE_F16);
}

TARGET_AVX512 static void gemm_bf16_avx512(const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                                           int64_t nb, int64_t k, float *c, int64_t ldc) {
    gemm_typed_avx512(a, lda, m, b, ldb, nb, k, c, ldc, PS_TYPE_BF16);
}

/* the products of `rows` keys (at most 16) with q, key r in acc[r]: hd's whole 16s unmasked,
 * its tail under a mask, every row the same steps */
#define SCORES_ROWS_AVX512(rows)                                                               \
    do {                                                                                       \
        int64_t i = 0;                                                                         \
        for (; i + 16 <= hd; i += 16) {                                                        \
            const __m512 vq = _mm512_loadu_ps(q + i);                                          \
            _Pragma("GCC unroll 16") for (int r = 0; r < (rows); r++)                          \
                acc[r] = _mm512_fmadd_ps(load16_avx512(kb + (size_t)((t + r) * ld) * es, i, k_type), vq, acc[r]); \
        }                                                                                      \
        if (i < hd) {                                                                          \
            const __mmask16 m = tail_mask(hd - i);                                             \
            const __m512 vq = _mm512_maskz_loadu_ps(m, q + i);                                 \
            _Pragma("GCC unroll 16") for (int r = 0; r < (rows); r++)                          \
                acc[r] = _mm512_fmadd_ps(load16_masked_avx512(kb + (size_t)((t + r) * ld) * es, i, m, k_type), vq, acc[r]); \
        }                                                                                      \
    } while (0)

/* 16 positions at a time, their 16 sums reduced together (sum16_avx512: a twelfth of the
 * instructions of 16 reductions, which took as long as the products at head_dim 64); the last
 * few positions take the same steps, the rows past n neither read nor stored */
TARGET_AVX512 INLINE void scores_typed_avx512(const float *q, const void *k, int64_t ld, int64_t n, int64_t hd,
                                              int k_type, float *out) {
    const size_t es = k_type == PS_TYPE_F16 ? 2 : 4;
    const char *kb = k;
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 acc[16];
        _Pragma("GCC unroll 16") for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
        SCORES_ROWS_AVX512(16);
        _mm512_storeu_ps(out + t, sum16_avx512(acc));
    }
    if (t < n) {
        const int rows = (int)(n - t);
        __m512 acc[16];
        for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
        SCORES_ROWS_AVX512(rows);
        _mm512_mask_storeu_ps(out + t, tail_mask(rows), sum16_avx512(acc));
    }
}

/* gemm16: tiles of 16 rows, one vector of 16 lanes each (16 accumulators); per step one load of
 * b and a broadcast fma per row */
TARGET_AVX512 INLINE void gemm16_tile_avx512(const float *a, int64_t a_rs, int64_t a_ks, const int R, const float *b,
                                             int64_t ldb, int64_t k, float *c, int64_t ldc) {
    __m512 acc[16];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m512 bv = _mm512_loadu_ps(b + i * ldb);
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * a_rs + i * a_ks]), bv, acc[r]);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(c + r * ldc, acc[r]);
}

TARGET_AVX512 static void gemm16_avx512(const float *a, int64_t a_rs, int64_t a_ks, int64_t m, const float *b,
                                        int64_t ldb, int64_t k, float *c, int64_t ldc) {
    int64_t r = 0;
    for (; r + 16 <= m; r += 16) gemm16_tile_avx512(a + r * a_rs, a_rs, a_ks, 16, b, ldb, k, c + r * ldc, ldc);
    for (; r + 4 <= m; r += 4) gemm16_tile_avx512(a + r * a_rs, a_rs, a_ks, 4, b, ldb, k, c + r * ldc, ldc);
    for (; r < m; r++) gemm16_tile_avx512(a + r * a_rs, a_rs, a_ks, 1, b, ldb, k, c + r * ldc, ldc);
}

TARGET_AVX512 static void scores_avx512(const float *q, const void *k, int64_t ld, int64_t n, int64_t hd, int k_type,
                                        float *out) {
    if (k_type == PS_TYPE_F16) scores_typed_avx512(q, k, ld, n, hd, PS_TYPE_F16, out);
    else                       scores_typed_avx512(q, k, ld, n, hd, PS_TYPE_F32, out);
}

/* exp1_scalar's steps on 16 lanes */
TARGET_AVX512 INLINE __m512 exp16_avx512(__m512 x) {
    const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_X_MIN)), _mm512_set1_ps(EXP_X_MAX));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_LN2_LO), _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_LN2_HI), xc));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP_P0), r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_cvtps_epi32(n), e1 = _mm512_srai_epi32(e, 1), bias = _mm512_set1_epi32(127);
    const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e1, bias), 23));
    const __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(e, e1), bias), 23));
    const __m512 out = _mm512_mul_ps(_mm512_mul_ps(y, s1), s2);
    return _mm512_mask_add_ps(out, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x, x); /* NaN stays NaN */
}

TARGET_AVX512 static void exp_avx512(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, exp16_avx512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* sixteen lanes at a time: the kept values stored back, their indices compress-stored */
TARGET_AVX512 static int64_t keep_at_least_avx512(float *x, int64_t n, float min, int32_t *idx) {
    const __m512 vmin = _mm512_set1_ps(min);
    __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t k = 0;
    for (int64_t i = 0; i < n; i += 16, lane = _mm512_add_epi32(lane, _mm512_set1_epi32(16))) {
        const __mmask16 in = tail_mask(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(in, x + i);
        const __m512 kept = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, vmin, _CMP_GE_OQ), v);
        _mm512_mask_storeu_ps(x + i, in, kept);
        const __mmask16 nz = _mm512_mask_cmp_ps_mask(in, kept, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        _mm512_mask_compressstoreu_epi32(idx + k, nz, lane);
        k += __builtin_popcount((unsigned)nz);
    }
    return k;
}

/* the lanes of 16 from column i that exist in k columns */
TARGET_AVX512 INLINE __mmask16 column_mask(int64_t i, int64_t k) { return i >= k ? 0 : tail_mask(k - i); }

/* 64 columns at a time in 4 accumulators, kept in registers over all the rows (two rows per
 * step, into two sets: 8 independent fma chains) */
TARGET_AVX512 INLINE void weighted_sum_typed_avx512(const float *w, int64_t n, const void *rows, int64_t ld,
                                                    int64_t k, int type, float *out) {
    const size_t es = type == PS_TYPE_F16 ? 2 : 4;
    const char *rb = rows;
    for (int64_t i = 0; i < k; i += 64) {
        __mmask16 m[4];
        __m512 acc[2][4];
        for (int q = 0; q < 4; q++) {
            m[q] = column_mask(i + 16 * q, k);
            acc[0][q] = acc[1][q] = _mm512_setzero_ps();
        }
        int64_t t = 0;
        if (i + 64 <= k)   /* whole vectors: plain loads (masked ones that miss the cache ran slower) */
            for (; t + 2 <= n; t += 2) {
                const __m512 w0 = _mm512_set1_ps(w[t]), w1 = _mm512_set1_ps(w[t + 1]);
                const char *r0 = rb + (size_t)(t * ld) * es, *r1 = r0 + (size_t)ld * es;
                for (int q = 0; q < 4; q++) {
                    acc[0][q] = _mm512_fmadd_ps(w0, load16_avx512(r0, i + 16 * q, type), acc[0][q]);
                    acc[1][q] = _mm512_fmadd_ps(w1, load16_avx512(r1, i + 16 * q, type), acc[1][q]);
                }
            }
        for (; t + 2 <= n; t += 2) {
            const __m512 w0 = _mm512_set1_ps(w[t]), w1 = _mm512_set1_ps(w[t + 1]);
            const char *r0 = rb + (size_t)(t * ld) * es, *r1 = r0 + (size_t)ld * es;
            for (int q = 0; q < 4; q++) {
                acc[0][q] = _mm512_fmadd_ps(w0, load16_masked_avx512(r0, i + 16 * q, m[q], type), acc[0][q]);
                acc[1][q] = _mm512_fmadd_ps(w1, load16_masked_avx512(r1, i + 16 * q, m[q], type), acc[1][q]);
            }
        }
        if (t < n) {
            const __m512 w0 = _mm512_set1_ps(w[t]);
            for (int q = 0; q < 4; q++)
                acc[0][q] = _mm512_fmadd_ps(w0, load16_masked_avx512(rb + (size_t)(t * ld) * es, i + 16 * q, m[q], type),
                                            acc[0][q]);
        }
        for (int q = 0; q < 4; q++) _mm512_mask_storeu_ps(out + i + 16 * q, m[q], _mm512_add_ps(acc[0][q], acc[1][q]));
    }
}
TARGET_AVX512 static void weighted_sum_avx512(const float *w, int64_t n, const void *rows, int64_t ld, int64_t k,
                                              int v_type, float *out) {
    if (v_type == PS_TYPE_F16) weighted_sum_typed_avx512(w, n, rows, ld, k, PS_TYPE_F16, out);
    else                       weighted_sum_typed_avx512(w, n, rows, ld, k, PS_TYPE_F32, out);
}

/* y[0..r) (r <= 16 NV) in NV registers, the last one masked, while the rows whose bit is set in
 * nonzero stream past (NV <= 9) */
TARGET_AVX512 INLINE void axpy_nonzero_pass_avx512(const float *a, uint64_t nonzero, const float *rows, int64_t ld,
                                                   float *y, int64_t r, const int NV) {
    __mmask16 mk[9];
    __m512 acc[9];
    for (int q = 0; q < NV; q++) {
        mk[q] = r - 16 * q >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (r - 16 * q)) - 1);
        acc[q] = _mm512_maskz_loadu_ps(mk[q], y + 16 * q);
    }
    for (uint64_t m = nonzero; m; m &= m - 1) {
        const int j = __builtin_ctzll(m);
        const __m512 s = _mm512_set1_ps(a[j]);
        const float *row = rows + j * ld;
        for (int q = 0; q < NV; q++) acc[q] = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(mk[q], row + 16 * q), acc[q]);
    }
    for (int q = 0; q < NV; q++) _mm512_mask_storeu_ps(y + 16 * q, mk[q], acc[q]);
}
/* y held in registers up to 144 columns at a time (nine chains of fmas in flight; a narrower
 * remainder in as many registers as it needs) while the rows with a non-zero a stream past (a
 * bit mask of them first: a branch per row added, not per row). Nine rather than eight (with
 * model.c's strips of 144, not 128): SmolLM2 sparse-layout pp128 +0-6% on one thread, +4-6% on
 * two. */
TARGET_AVX512 static void axpy_nonzero_avx512(const float *a, int64_t n, const float *rows, int64_t ld, int64_t off,
                                              float *y, int64_t k) {
    uint64_t nonzero = 0;
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        nonzero |= (uint64_t)_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, a + j), _mm512_setzero_ps(),
                                                     _CMP_NEQ_UQ) << j;
    }
    for (int64_t i = 0; i < k; i += 144) {
        const int64_t r = k - i < 144 ? k - i : 144;
        const float *rw = rows + off + i;
        switch ((r + 15) / 16) {
        case 9: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 9); break;
        case 8: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 8); break;
        case 7: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 7); break;
        case 6: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 6); break;
        case 5: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 5); break;
        case 4: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 4); break;
        case 3: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 3); break;
        case 2: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 2); break;
        default: axpy_nonzero_pass_avx512(a, nonzero, rw, ld, y + i, r, 1); break;
        }
    }
}

/* 8-bit activations: two blocks per 512-bit vector */

TARGET_AVX512 static void quantize_q8_avx512(const float *x, const ps_q8_vec *out, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        float d, id;
        q8_scales(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))), &d, &id);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(out->qs + QK * i), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(out->qs + QK * i + 16), _mm512_cvtsepi32_epi8(q1));
        out->d[i] = d;
        out->s[i] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

/* Q8_0 blocks c and c+1 as u, s (see q8_0_operands_avx2), block c in the low half; with two = 0
 * only block c, the high half zero (nothing past it is read) */
TARGET_AVX512 INLINE void q8_0_operands_avx512(const void *row, int64_t c, const int8_t *xq, int two,
                                               __m512i *u, __m512i *s) {
    const __m512i x = two ? _mm512_loadu_si512(xq) : _mm512_maskz_loadu_epi8(0xffffffffULL, xq);
    const block_q8_0 *b = (const block_q8_0 *)row + c;
    const __m512i w0 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256((const __m256i *)b[0].qs), 0);
    const __m512i w = two ? _mm512_inserti64x4(w0, _mm256_loadu_si256((const __m256i *)b[1].qs), 1) : w0;
    *u = _mm512_abs_epi8(w);
    *s = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}

TARGET_AVX512 INLINE __m512i mul_sum_avx512(__m512i u, __m512i s) {
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}

/* The lanes' scales: Q8_0 block c's d times x's d in lanes 0-7, block c+1's in 8-15 (zero when
 * !two); one vcvtph2ps converts both blocks' d */
TARGET_AVX512 INLINE __m512 q8_0_scales_avx512(const void *row, const ps_q8_vec *x, int64_t c, int two) {
    const block_q8_0 *b = (const block_q8_0 *)row + c;
    const uint16_t d0 = b[0].d, d1 = two ? b[1].d : 0;
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)d0 | (uint32_t)d1 << 16)));   /* d0 d1 */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(_mm_mul_ps(d, load_pair_avx2(x->d + c, two))));
}

/* Q8_0's int8 dot: two blocks per step, four per loop into two accumulators, each step's scales
 * from the two blocks' f16 d. No four-row form: Q8_0 decode ran 5-10% slower from memory with
 * four rows interleaved (this step per row, the sums formed together), and also with four-block
 * steps like the Q4 types' below (one permute for four blocks' scales), though both were as
 * fast or faster in cache. */
#define DOT_Q8_0_AVX512(TARGET, isa, MUL_SUM)                                                  \
    TARGET INLINE __m512 q8_0_step_##isa(const void *row, const ps_q8_vec *x, int64_t c, int two, __m512 acc) { \
        __m512i u, s;                                                                          \
        q8_0_operands_avx512(row, c, x->qs + QK * c, two, &u, &s);                             \
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(MUL_SUM(u, s)), q8_0_scales_avx512(row, x, c, two), acc); \
    }                                                                                          \
    TARGET INLINE float q8_0_dot_##isa(const void *row, const ps_q8_vec *x, int64_t nb) {      \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();                         \
        int64_t c = 0;                                                                         \
        for (; c + 4 <= nb; c += 4) {                                                          \
            acc0 = q8_0_step_##isa(row, x, c, 1, acc0);                                        \
            acc1 = q8_0_step_##isa(row, x, c + 2, 1, acc1);                                    \
        }                                                                                      \
        if (c + 2 <= nb) {                                                                     \
            acc0 = q8_0_step_##isa(row, x, c, 1, acc0);                                        \
            c += 2;                                                                            \
        }                                                                                      \
        if (c < nb) acc1 = q8_0_step_##isa(row, x, c, 0, acc1);                                \
        return q8_hsum_avx512(_mm512_add_ps(acc0, acc1));                                   \
    }


/* The scales of Q4 blocks c..c+3 (left of them, 1-4; nothing past them is read): lanes
 * 4k..4k+3 hold block k's d times x's d. One permute of the blocks' first 64 bytes gathers
 * their f16 fields into 8 words (d0..d3, then Q4_1's m0..m3 or Q4_0's d0..d3 again), one
 * vcvtph2ps and one vmulps against x's d and s make d dx and the offset terms (m s or d s) of
 * all four blocks; that product is added into *off, whose upper 4 lanes (the offset terms) are
 * all that is used of it. */
TARGET_AVX512 INLINE __m512 q8_scales4_avx512(const void *row, const ps_q8_vec *x, int64_t c, int type, int left,
                                              __m256 *off) {
    const int bb = type == PS_TYPE_Q4_0 ? (int)sizeof(block_q4_0) : (int)sizeof(block_q4_1);
    const char *p = (const char *)row + c * bb;
    const int bytes = left * bb;     /* readable from p */
    const __mmask64 m0 = bytes >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1;
    const int w = bb / 2;            /* words per block */
    const int k2 = type == PS_TYPE_Q4_1 ? 1 : 0;   /* lanes 4-7: m (Q4_1) or d again */
    const __m512i idx = _mm512_zextsi128_si512(_mm_setr_epi16(0, w, 2 * w, 3 * w, k2, w + k2, 2 * w + k2, 3 * w + k2));
    const __m512i f16 = _mm512_permutexvar_epi16(idx, _mm512_maskz_loadu_epi8(m0, p));
    const __mmask8 mx = (__mmask8)((1u << left) - 1);
    const __m256 xds = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_maskz_loadu_ps(mx, x->d + c)),
                                            _mm_maskz_loadu_ps(mx, x->s + c), 1);
    const __m256 prod = _mm256_mul_ps(_mm256_cvtph_ps(_mm512_castsi512_si128(f16)), xds);
    *off = _mm256_add_ps(*off, prod);
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps256_ps512(prod));
}

/* The sum of a row's 16 lanes in a fixed tree: lanes i + i+8, then i + i+4, i + i+2, i + i+1.
 * q8_hsum4_avx512 forms four rows' sums with the same additions in the same order, so a Q4
 * type's dot4 gives its dot's bits. */
TARGET_AVX512 INLINE float q8_hsum_avx512(__m512 v) {
    const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

/* (sum of v0's lanes, ..., sum of v3's lanes), each in q8_hsum_avx512's tree: the 256-bit halves
 * of two rows side by side, then their 128-bit quarters, then pairs within each quarter */
TARGET_AVX512 INLINE __m128 q8_hsum4_avx512(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xee));
    const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xee));
    const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xdd));
    const __m512 w = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4e));      /* i + i+2 within quarters */
    const __m512 z = _mm512_add_ps(w, _mm512_permute_ps(w, 0xb1));      /* i + i+1 */
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12), z));
}

/* A Q4 row's accumulator with its offset terms (the upper 4 lanes of off: Q4_1's m s, Q4_0's
 * d s, which counts -8 times) added into lanes 4-7 */
TARGET_AVX512 INLINE __m512 q4_with_offsets_avx512(__m512 acc, __m256 off, int type) {
    const __m512 o = _mm512_castps256_ps512(off);
    return type == PS_TYPE_Q4_0 ? _mm512_mask3_fmadd_ps(o, _mm512_set1_ps(-8.0f), acc, 0xf0)
                                : _mm512_mask_add_ps(acc, 0xf0, acc, o);
}

/* word indices that gather four consecutive Q4 blocks' 16 code bytes each into 128-bit lanes
 * 0-3, from the 128 bytes of two vectors starting at the first block (permutex2var_epi16) */
TARGET_AVX512 INLINE __m512i q4_code_words(int type) {
    const int w = type == PS_TYPE_Q4_0 ? (int)sizeof(block_q4_0) / 2 : (int)sizeof(block_q4_1) / 2;
    const int first = type == PS_TYPE_Q4_0 ? 1 : 2;   /* the codes follow d (and m) */
    const __m512i lane = _mm512_setr_epi32(0, 0, 0, 0, w, w, w, w, 2 * w, 2 * w, 2 * w, 2 * w, 3 * w, 3 * w, 3 * w, 3 * w);
    /* dword i holds words 2i, 2i+1: within a lane, words 0..7 of the block's codes */
    const __m512i within = _mm512_setr_epi32(0x00010000, 0x00030002, 0x00050004, 0x00070006, 0x00010000, 0x00030002,
                                             0x00050004, 0x00070006, 0x00010000, 0x00030002, 0x00050004, 0x00070006,
                                             0x00010000, 0x00030002, 0x00050004, 0x00070006);
    const __m512i base = _mm512_add_epi32(lane, _mm512_set1_epi32(first));
    return _mm512_add_epi16(within, _mm512_or_si512(base, _mm512_slli_epi32(base, 16)));
}

/* Generic int8 dot over nb blocks. Q8_0: DOT_Q8_0_AVX512. The Q4 types: four blocks per step
 * (q4_quad: one word permute, two integer dots), converted and scaled (q8_scales4_avx512) into
 * one accumulator per row, the offset terms into another (a step costs more cycles than its
 * fma's latency, so a second accumulator hides nothing). dot4 / dot8 run four / eight rows'
 * steps side by side, x's loads and shuffles shared. Eight rows per call, not four, because a
 * call's start (loads to the first fma) and its sums' reduction are latency chains that the
 * next call hardly overlaps: 576-column Q4_1 rows (SmolLM2's q/k/v/o/gate/up) in cache,
 * native/bench/bench_kernels on Zen 5: dot4 42.9, dot8 50.9 GB/s; 1536 columns 59-61 either way. */
#define DOT_Q8_AVX512(TARGET, isa, MUL_SUM, MUL_ACC)                                           \
    DOT_Q8_0_AVX512(TARGET, isa, MUL_SUM)                                                      \
    /* Q4 blocks c..c+3 (left of them; nothing past them is read): 128-bit lane k holds block    \
     * c+k's integer dot as 4 partial sums. One word permute of the blocks' 80 (Q4_0: 72) bytes \
     * puts their code bytes side by side: the low nibbles are weights 0-15, the high nibbles    \
     * 16-31, so x's halves are regrouped to match (lower halves of the four blocks, then upper  \
     * halves: two shuffles, shared by dot4's rows). */                                         \
    TARGET INLINE __m512i q4_quad_##isa(const void *row, const ps_q8_vec *x, int64_t c, int type, int left) { \
        const int bb = type == PS_TYPE_Q4_0 ? (int)sizeof(block_q4_0) : (int)sizeof(block_q4_1); \
        const char *p = (const char *)row + c * bb;                                            \
        const int bytes = left * bb;                                                           \
        const __mmask64 m0 = bytes >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1;        \
        const __mmask64 m1 = bytes <= 64 ? 0 : ((__mmask64)1 << (bytes - 64)) - 1;             \
        const __m512i codes = _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi8(m0, p), q4_code_words(type), \
                                                        _mm512_maskz_loadu_epi8(m1, p + 64));  \
        const __m512i m4 = _mm512_set1_epi8(0x0f);                                             \
        const int8_t *xq = x->qs + QK * c;                                                     \
        const __m512i x0 = left >= 2 ? _mm512_loadu_si512(xq) : _mm512_maskz_loadu_epi8(0xffffffffULL, xq); \
        const __m512i x1 = left >= 4 ? _mm512_loadu_si512(xq + 64)                             \
                         : left == 3 ? _mm512_maskz_loadu_epi8(0xffffffffULL, xq + 64) : _mm512_setzero_si512(); \
        const __m512i lo = MUL_ACC(_mm512_setzero_si512(), _mm512_and_si512(codes, m4), _mm512_shuffle_i64x2(x0, x1, 0x88)); \
        return MUL_ACC(lo, _mm512_and_si512(_mm512_srli_epi16(codes, 4), m4), _mm512_shuffle_i64x2(x0, x1, 0xdd)); \
    }                                                                                          \
    TARGET INLINE __m512 q8_step4_##isa(const void *row, const ps_q8_vec *x, int64_t c, int type, int left, \
                                        __m512 acc, __m256 *off) {                             \
        const __m512i t = q4_quad_##isa(row, x, c, type, left);                                \
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), q8_scales4_avx512(row, x, c, type, left, off), acc); \
    }                                                                                          \
    TARGET INLINE float dot_q8_##isa(const void *row, const ps_q8_vec *x, int64_t nb, int type) { \
        if (type == PS_TYPE_Q8_0) return q8_0_dot_##isa(row, x, nb);                           \
        __m512 acc = _mm512_setzero_ps();                                                      \
        __m256 off = _mm256_setzero_ps();                                                      \
        int64_t c = 0;                                                                         \
        for (; c + 4 <= nb; c += 4) acc = q8_step4_##isa(row, x, c, type, 4, acc, &off);       \
        switch (nb - c) {                                                                      \
        case 3: acc = q8_step4_##isa(row, x, c, type, 3, acc, &off); break;                    \
        case 2: acc = q8_step4_##isa(row, x, c, type, 2, acc, &off); break;                    \
        case 1: acc = q8_step4_##isa(row, x, c, type, 1, acc, &off); break;                    \
        }                                                                                      \
        return q8_hsum_avx512(q4_with_offsets_avx512(acc, off, type));                         \
    }                                                                                          \
    /* R = 4 or 8 rows at once, each row's steps as in dot_q8 (x's loads and shuffles shared) */ \
    TARGET INLINE void dotr_q8_##isa(const void *const *rows, const ps_q8_vec *x, int64_t nb, int type, int R, \
                                     float *out) {                                             \
        __m512 acc[8];                                                                         \
        __m256 off[8];                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                  \
            acc[r] = _mm512_setzero_ps();                                                      \
            off[r] = _mm256_setzero_ps();                                                      \
        }                                                                                      \
        int64_t c = 0;                                                                         \
        for (; c + 4 <= nb; c += 4)                                                            \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                \
                acc[r] = q8_step4_##isa(rows[r], x, c, type, 4, acc[r], &off[r]);              \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                    \
            switch (nb - c) {                                                                  \
            case 3: acc[r] = q8_step4_##isa(rows[r], x, c, type, 3, acc[r], &off[r]); break;   \
            case 2: acc[r] = q8_step4_##isa(rows[r], x, c, type, 2, acc[r], &off[r]); break;   \
            case 1: acc[r] = q8_step4_##isa(rows[r], x, c, type, 1, acc[r], &off[r]); break;   \
            }                                                                                  \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r += 4)                                 \
            _mm_storeu_ps(out + r, q8_hsum4_avx512(q4_with_offsets_avx512(acc[r], off[r], type), \
                                                   q4_with_offsets_avx512(acc[r + 1], off[r + 1], type), \
                                                   q4_with_offsets_avx512(acc[r + 2], off[r + 2], type), \
                                                   q4_with_offsets_avx512(acc[r + 3], off[r + 3], type))); \
    }                                                                                          \
    TARGET INLINE void dot4_q8_##isa(const void *const rows[4], const ps_q8_vec *x, int64_t nb, int type, \
                                     float out[4]) {                                           \
        dotr_q8_##isa(rows, x, nb, type, 4, out);                                              \
    }                                                                                          \
    TARGET INLINE void dot8_q8_##isa(const void *const rows[8], const ps_q8_vec *x, int64_t nb, int type, \
                                     float out[8]) {                                           \
        dotr_q8_##isa(rows, x, nb, type, 8, out);                                              \
    }

TARGET_AVX512 INLINE __m512i mul_acc_avx512(__m512i acc, __m512i u, __m512i s) {
    return _mm512_add_epi32(acc, mul_sum_avx512(u, s));
}
DOT_Q8_AVX512(TARGET_AVX512, avx512, mul_sum_avx512, mul_acc_avx512)
SIMD_Q8_DOT8(TARGET_AVX512, avx512, quantize_q8_avx512)

/* Prompt batches in int8, as the AVX2 kernel (GEMM_Q8_AVX2) with a group of 16 tokens per
 * vector: tiles of 4 rows x 2 groups (8 integer and 8 float accumulators). In cache
 * (bench_kernels, as above): Q8_0 304, Q4_1 287 G multiply-adds/s, against 93-94 for
 * dequantising into the f32 GEMM; 6 or 8 rows ran slower for Q4_1. */
#define GEMM_Q8_AVX512(TARGET, isa, MUL_ACC, VNNI)                                             \
    TARGET INLINE void gq_tile_##isa(const char *a, size_t row_bytes, const int R, const int T, const int type, \
                                     const ps_q8_batch *x, int64_t nblk, int64_t g, float out[][GQ_LANES]) { \
        __m512 f[4][2];                                                                        \
        __m512i acc[4][2];                                                                     \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                    \
            _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) f[r][t] = _mm512_setzero_ps(); \
        const __m512i m4 = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8((char)0x80);        \
        for (int64_t b = 0; b < nblk; b++) {                                                   \
            const int8_t *xq[2];                                                               \
            int64_t meta[2];                                                                   \
            __m512i init[2];                                                                   \
            _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) {                              \
                xq[t] = x->qs + ((g + t) * nblk + b) * GQ_BLOCK_BYTES;                         \
                meta[t] = ((g + t) * nblk + b) * GQ_LANES;                                     \
                const __m512i sum = _mm512_loadu_si512(x->sum + meta[t]);                      \
                init[t] = type == PS_TYPE_Q4_1 || (type == PS_TYPE_Q8_0 && !VNNI) ? _mm512_setzero_si512() \
                        : _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, type == PS_TYPE_Q8_0 ? 7 : 3)); \
            }                                                                                  \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                \
                _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) acc[r][t] = init[t];       \
            _Pragma("GCC unroll 8") for (int s = 0; s < QK / 4; s++) {                         \
                __m512i xv[2];                                                                 \
                _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_si512(xq[t] + s * GQ_STEP_BYTES); \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                          \
                    int32_t w4;                                                                \
                    __m512i w;                                                                 \
                    if (type == PS_TYPE_Q8_0 && !VNNI) { /* |w| times x negated where w < 0 */ \
                        memcpy(&w4, ((const block_q8_0 *)(a + r * row_bytes))[b].qs + 4 * s, 4); \
                        w = _mm512_set1_epi32(w4);                                             \
                        const __mmask64 neg = _mm512_movepi8_mask(w);                          \
                        const __m512i u = _mm512_abs_epi8(w);                                  \
                        _Pragma("GCC unroll 2") for (int t = 0; t < T; t++)                    \
                            acc[r][t] = MUL_ACC(acc[r][t], u, _mm512_mask_sub_epi8(xv[t], neg, _mm512_setzero_si512(), xv[t])); \
                        continue;                                                              \
                    }                                                                          \
                    if (type == PS_TYPE_Q8_0) {                                                \
                        memcpy(&w4, ((const block_q8_0 *)(a + r * row_bytes))[b].qs + 4 * s, 4); \
                        w = _mm512_xor_si512(_mm512_set1_epi32(w4), flip);                     \
                    } else {                                                                   \
                        memcpy(&w4, q4_codes(a + r * row_bytes, b, type) + 4 * (s & 3), 4);    \
                        w = _mm512_set1_epi32(w4);                                             \
                        w = _mm512_and_si512(s < 4 ? w : _mm512_srli_epi16(w, 4), m4);         \
                    }                                                                          \
                    _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) acc[r][t] = MUL_ACC(acc[r][t], w, xv[t]);      \
                }                                                                              \
            }                                                                                  \
            __m512 dx[2];                                                                      \
            _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) dx[t] = _mm512_loadu_ps(x->d + meta[t]);               \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                              \
                uint16_t dh, mh;                                                               \
                block_halves(a + r * row_bytes, b, type, &dh, &mh);                            \
                const __m512 dw = _mm512_set1_ps(_cvtsh_ss(dh));                               \
                _Pragma("GCC unroll 2") for (int t = 0; t < T; t++)                            \
                    f[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][t]), _mm512_mul_ps(dw, dx[t]), f[r][t]); \
                if (type == PS_TYPE_Q4_1) {                                                    \
                    const __m512 mw = _mm512_set1_ps(_cvtsh_ss(mh));                           \
                    _Pragma("GCC unroll 2") for (int t = 0; t < T; t++)                        \
                        f[r][t] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(x->s + meta[t]), f[r][t]); \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                    \
            _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) _mm512_storeu_ps(out[4 * t + r], f[r][t]);             \
    }                                                                                          \
    GEMM_Q8_LOOPS(TARGET, isa, 4, 2)
GEMM_Q8_AVX512(TARGET_AVX512, avx512, mul_acc_avx512, 0)
GEMM_Q8_TYPE(TARGET_AVX512, avx512, q8_0, PS_TYPE_Q8_0)
GEMM_Q8_TYPE(TARGET_AVX512, avx512, q4_0, PS_TYPE_Q4_0)
GEMM_Q8_TYPE(TARGET_AVX512, avx512, q4_1, PS_TYPE_Q4_1)

#define TARGET_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
TARGET_AVX512_VNNI INLINE __m512i mul_sum_avx512_vnni(__m512i u, __m512i s) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
}
TARGET_AVX512_VNNI INLINE __m512i mul_acc_avx512_vnni(__m512i acc, __m512i u, __m512i s) {
    return _mm512_dpbusd_epi32(acc, u, s);
}
DOT_Q8_AVX512(TARGET_AVX512_VNNI, avx512_vnni, mul_sum_avx512_vnni, mul_acc_avx512_vnni)
SIMD_Q8_DOT8(TARGET_AVX512_VNNI, avx512_vnni, quantize_q8_avx512)
GEMM_Q8_AVX512(TARGET_AVX512_VNNI, avx512_vnni, mul_acc_avx512_vnni, 1)
GEMM_Q8_TYPE(TARGET_AVX512_VNNI, avx512_vnni, q8_0, PS_TYPE_Q8_0)
GEMM_Q8_TYPE(TARGET_AVX512_VNNI, avx512_vnni, q4_0, PS_TYPE_Q4_0)
GEMM_Q8_TYPE(TARGET_AVX512_VNNI, avx512_vnni, q4_1, PS_TYPE_Q4_1)

/* ps_f32_to_bf16 on 16 lanes (integer steps, not vcvtneps2bf16, so every ISA rounds alike) */
TARGET_AVX512 static void to_bf16_avx512(const float *x, uint16_t *out, int64_t n) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512i b = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, x + i));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, abs_mask), inf);
        r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(64));
        _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtepi32_epi16(r));
    }
}

#if HAVE_AVX512_BF16
/* AVX512-BF16: BF16 weights times bf16 activations, 32 pairs of products per vdpbf16ps */
#define TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma,f16c")))

/* 32 bf16 values from p + i, those past n as zeros (not read) */
TARGET_AVX512_BF16 INLINE __m512bh bf16x32_avx512_bf16(const uint16_t *p, int64_t i, int64_t n) {
    const __mmask32 m = n - i >= 32 ? ~(__mmask32)0 : ((__mmask32)1 << (n - i)) - 1;
    return (__m512bh)_mm512_maskz_loadu_epi16(m, p + i);
}

/* two accumulators, 64 weights a step; the tail's pairs masked to zero */
TARGET_AVX512_BF16 static float dot_bf16_avx512_bf16(const void *row, const uint16_t *x, int64_t n) {
    const uint16_t *w = row;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
    }
    for (; i < n; i += 32) acc0 = _mm512_dpbf16_ps(acc0, bf16x32_avx512_bf16(w, i, n), bf16x32_avx512_bf16(x, i, n));
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* tiles of 4 rows x 4 tokens: 16 accumulators along k, 8 loads per 16 vdpbf16ps (a's rows
 * and b's tokens are both bf16, so nothing is converted in the loop); the tile's 16 sums reduced
 * together as the f32 GEMM's, token t's 4 rows stored from 128-bit chunk t */
TARGET_AVX512_BF16 static void gemm_bf16_avx512_bf16(const void *a, int64_t lda, int64_t m, const uint16_t *b,
                                                     int64_t ldb, int64_t nb, int64_t k, float *c, int64_t ldc) {
    const uint16_t *a16 = a;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const uint16_t *ar[4] = { a16 + i * lda, a16 + (i + 1) * lda, a16 + (i + 2) * lda, a16 + (i + 3) * lda };
        int64_t j = 0;
        for (; j + 4 <= nb; j += 4) {
            const uint16_t *br[4] = { b + j * ldb, b + (j + 1) * ldb, b + (j + 2) * ldb, b + (j + 3) * ldb };
            __m512 acc[16]; /* token t, row r: acc[4t + r] */
            for (int q = 0; q < 16; q++) acc[q] = _mm512_setzero_ps();
            int64_t p = 0;
            for (; p + 32 <= k; p += 32) {
                __m512bh va[4];
                for (int r = 0; r < 4; r++) va[r] = (__m512bh)_mm512_loadu_si512(ar[r] + p);
                for (int t = 0; t < 4; t++) {
                    const __m512bh vb = (__m512bh)_mm512_loadu_si512(br[t] + p);
                    for (int r = 0; r < 4; r++) acc[4 * t + r] = _mm512_dpbf16_ps(acc[4 * t + r], va[r], vb);
                }
            }
            if (p < k) {
                __m512bh va[4];
                for (int r = 0; r < 4; r++) va[r] = bf16x32_avx512_bf16(ar[r], p, k);
                for (int t = 0; t < 4; t++) {
                    const __m512bh vb = bf16x32_avx512_bf16(br[t], p, k);
                    for (int r = 0; r < 4; r++) acc[4 * t + r] = _mm512_dpbf16_ps(acc[4 * t + r], va[r], vb);
                }
            }
            store_tile4x4_avx512(acc, c + j * ldc + i, ldc);
        }
        for (; j < nb; j++)
            for (int r = 0; r < 4; r++) c[j * ldc + i + r] = dot_bf16_avx512_bf16(ar[r], b + j * ldb, k);
    }
    for (; i < m; i++)
        for (int64_t j = 0; j < nb; j++) c[j * ldc + i] = dot_bf16_avx512_bf16(a16 + i * lda, b + j * ldb, k);
}
#endif
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

/* axpy's fmas for four rows in turn, on 32 columns of y held in registers */
INLINE void axpy4_neon(const float *a, const void *const *rows, float *y, int64_t n, int type) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        float32x4_t acc[8];
        for (int k = 0; k < 8; k++) acc[k] = vld1q_f32(y + i + 4 * k);
        for (int r = 0; r < 4; r++) {
            const w32_neon w = load32_neon(rows[r], i / 32, type);
            for (int k = 0; k < 8; k++) acc[k] = vfmaq_n_f32(acc[k], w.v[k], a[r]);
        }
        for (int k = 0; k < 8; k++) vst1q_f32(y + i + 4 * k, acc[k]);
    }
    for (; i + 4 <= n; i += 4) {
        float32x4_t acc = vld1q_f32(y + i);
        for (int r = 0; r < 4; r++) acc = vfmaq_n_f32(acc, load4_neon(rows[r], i, type), a[r]);
        vst1q_f32(y + i, acc);
    }
    for (; i < n; i++)
        for (int r = 0; r < 4; r++) y[i] += a[r] * load1(rows[r], i, type);
}

SIMD_ALL_TYPES(, neon)

/* exp1_scalar's steps on 4 lanes */
INLINE float32x4_t exp4_neon(float32x4_t x) {
    const float32x4_t xc = vminq_f32(vmaxq_f32(x, vdupq_n_f32(EXP_X_MIN)), vdupq_n_f32(EXP_X_MAX));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(xc, EXP_LOG2E));
    const float32x4_t r = vfmaq_n_f32(vfmaq_n_f32(xc, n, -EXP_LN2_HI), n, -EXP_LN2_LO);
    float32x4_t p = vfmaq_n_f32(vdupq_n_f32(EXP_P1), r, EXP_P0);
    p = vfmaq_f32(vdupq_n_f32(EXP_P2), p, r);
    p = vfmaq_f32(vdupq_n_f32(EXP_P3), p, r);
    p = vfmaq_f32(vdupq_n_f32(EXP_P4), p, r);
    p = vfmaq_f32(vdupq_n_f32(EXP_P5), p, r);
    const float32x4_t y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0f));
    const int32x4_t e = vcvtq_s32_f32(n), e1 = vshrq_n_s32(e, 1), bias = vdupq_n_s32(127);
    const float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(e1, bias), 23));
    const float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(e, e1), bias), 23));
    const float32x4_t out = vmulq_f32(vmulq_f32(y, s1), s2);
    return vbslq_f32(vceqq_f32(x, x), out, vaddq_f32(x, x)); /* NaN stays NaN */
}

static void exp_neon(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, exp4_neon(vld1q_f32(x + i)));
    for (; i < n; i++) y[i] = exp1_scalar(x[i]);
}

/* gemm16: tiles of 4 rows, each row's 16 lanes in four vectors (16 accumulators) */
INLINE void gemm16_tile_neon(const float *a, int64_t a_rs, int64_t a_ks, const int R, const float *b, int64_t ldb,
                             int64_t k, float *c, int64_t ldc) {
    float32x4_t acc[4][4];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 4; h++) acc[r][h] = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < k; i++) {
        float32x4_t bv[4];
        for (int h = 0; h < 4; h++) bv[h] = vld1q_f32(b + i * ldb + 4 * h);
        for (int r = 0; r < R; r++) {
            const float x = a[r * a_rs + i * a_ks];
            for (int h = 0; h < 4; h++) acc[r][h] = vfmaq_n_f32(acc[r][h], bv[h], x);
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 4; h++) vst1q_f32(c + r * ldc + 4 * h, acc[r][h]);
}

static void gemm16_neon(const float *a, int64_t a_rs, int64_t a_ks, int64_t m, const float *b, int64_t ldb, int64_t k,
                        float *c, int64_t ldc) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) gemm16_tile_neon(a + r * a_rs, a_rs, a_ks, 4, b, ldb, k, c + r * ldc, ldc);
    for (; r < m; r++) gemm16_tile_neon(a + r * a_rs, a_rs, a_ks, 1, b, ldb, k, c + r * ldc, ldc);
}

/* 32 columns at a time in 8 accumulators, kept in registers over all the rows */
static void scores_neon(const float *q, const void *k, int64_t ld, int64_t n, int64_t hd, int k_type, float *out) {
    const size_t es = k_type == PS_TYPE_F16 ? 2 : 4;
    for (int64_t t = 0; t < n; t++) out[t] = dot_neon((const char *)k + (size_t)(t * ld) * es, q, hd, k_type);
}

INLINE void weighted_sum_typed_neon(const float *w, int64_t n, const void *rows, int64_t ld, int64_t k, int type,
                                    float *out) {
    const size_t es = type == PS_TYPE_F16 ? 2 : 4;
    const char *rb = rows;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        float32x4_t acc[8];
        for (int q = 0; q < 8; q++) acc[q] = vdupq_n_f32(0.0f);
        for (int64_t t = 0; t < n; t++) {
            const char *r = rb + (size_t)(t * ld) * es;
            for (int q = 0; q < 8; q++) acc[q] = vfmaq_n_f32(acc[q], load4_neon(r, i + 4 * q, type), w[t]);
        }
        for (int q = 0; q < 8; q++) vst1q_f32(out + i + 4 * q, acc[q]);
    }
    for (; i + 4 <= k; i += 4) {
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int64_t t = 0; t < n; t++) acc = vfmaq_n_f32(acc, load4_neon(rb + (size_t)(t * ld) * es, i, type), w[t]);
        vst1q_f32(out + i, acc);
    }
    if (i < k) weighted_sum_scalar(w, n, rb + (size_t)i * es, ld, k - i, type, out + i);
}
static void weighted_sum_neon(const float *w, int64_t n, const void *rows, int64_t ld, int64_t k, int v_type,
                              float *out) {
    if (v_type == PS_TYPE_F16) weighted_sum_typed_neon(w, n, rows, ld, k, PS_TYPE_F16, out);
    else                       weighted_sum_typed_neon(w, n, rows, ld, k, PS_TYPE_F32, out);
}

/* y[0..4 NV) in NV registers while the rows whose bit is set in nonzero stream past */
INLINE void axpy_nonzero_pass_neon(const float *a, uint64_t nonzero, const float *rows, int64_t ld, float *y,
                                   const int NV) {
    float32x4_t acc[16];
    for (int q = 0; q < NV; q++) acc[q] = vld1q_f32(y + 4 * q);
    for (uint64_t m = nonzero; m; m &= m - 1) {
        const int j = __builtin_ctzll(m);
        const float *row = rows + j * ld;
        for (int q = 0; q < NV; q++) acc[q] = vfmaq_n_f32(acc[q], vld1q_f32(row + 4 * q), a[j]);
    }
    for (int q = 0; q < NV; q++) vst1q_f32(y + 4 * q, acc[q]);
}
/* y held in registers 64 columns at a time, then 16 (four chains of fmas in flight, not one),
 * then 4, while the rows with a non-zero a stream past (a bit mask of them first: a branch per
 * row added, not per row) */
static void axpy_nonzero_neon(const float *a, int64_t n, const float *rows, int64_t ld, int64_t off, float *y,
                              int64_t k) {
    uint64_t nonzero = 0;
    for (int64_t j = 0; j < n; j++) nonzero |= (uint64_t)(a[j] != 0.0f) << j;
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) axpy_nonzero_pass_neon(a, nonzero, rows + off + i, ld, y + i, 16);
    for (; i + 16 <= k; i += 16) axpy_nonzero_pass_neon(a, nonzero, rows + off + i, ld, y + i, 4);
    for (; i + 4 <= k; i += 4)   axpy_nonzero_pass_neon(a, nonzero, rows + off + i, ld, y + i, 1);
    if (i < k) axpy_nonzero_scalar(a, n, rows, ld, off + i, y + i, k - i);
}

/* 8-bit activations */

static void quantize_q8_neon(const float *x, const ps_q8_vec *out, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++, x += QK) {
        float32x4_t v[8], vmax = vdupq_n_f32(0.0f);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + 4 * k);
            vmax = vmaxq_f32(vmax, vabsq_f32(v[k]));
        }
        float d, id;
        q8_scales(vmaxvq_f32(vmax), &d, &id);
        int32x4_t sum = vdupq_n_s32(0);
        for (int k = 0; k < 8; k += 2) {
            /* vcvtnq: to nearest, ties to even */
            const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(v[k], id)), b = vcvtnq_s32_f32(vmulq_n_f32(v[k + 1], id));
            sum = vaddq_s32(sum, vaddq_s32(a, b));
            vst1_s8(out->qs + QK * i + 4 * k, vqmovn_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(b))));
        }
        out->d[i] = d;
        out->s[i] = d * (float)vaddvq_s32(sum);
    }
}

INLINE float f16_neon(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

/* block c's codes as signed bytes (elements 0-15, 16-31): Q8_0 as stored, Q4_0 minus 8 (so
 * its dot needs no offset term), Q4_1 as 0..15 */
INLINE void q8_codes_neon(const void *row, int64_t c, int type, int8x16_t *lo, int8x16_t *hi) {
    if (type == PS_TYPE_Q8_0) {
        const int8_t *qs = ((const block_q8_0 *)row)[c].qs;
        *lo = vld1q_s8(qs), *hi = vld1q_s8(qs + 16);
        return;
    }
    const uint8x16_t q = vld1q_u8(q4_codes(row, c, type));
    const int8x16_t bias = vdupq_n_s8(type == PS_TYPE_Q4_0 ? 8 : 0);
    *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0xf))), bias);
    *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), bias);
}

/* acc + the sums of 4 adjacent products a*b (|a*b| <= 128*127 fits the int16 products) */
INLINE int32x4_t dot_s8_neon(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}

/* Generic int8 dot over nb blocks, into two alternating accumulators. */
#define DOT_Q8_NEON(TARGET, isa, DOT_S8)                                                       \
    TARGET INLINE float32x4_t q8_step_##isa(const void *row, const ps_q8_vec *x, int64_t c, int type, \
                                            float32x4_t acc, float *off_sum) {                 \
        int8x16_t lo, hi;                                                                      \
        uint16_t dh, mh;                                                                       \
        q8_codes_neon(row, c, type, &lo, &hi);                                                 \
        block_halves(row, c, type, &dh, &mh);                                                  \
        const int8_t *xq = x->qs + QK * c;                                                     \
        const int32x4_t p = DOT_S8(DOT_S8(vdupq_n_s32(0), lo, vld1q_s8(xq)), hi, vld1q_s8(xq + 16)); \
        if (type == PS_TYPE_Q4_1) *off_sum += f16_neon(mh) * x->s[c];                          \
        return vfmaq_n_f32(acc, vcvtq_f32_s32(p), f16_neon(dh) * x->d[c]);                     \
    }                                                                                          \
    TARGET INLINE float dot_q8_##isa(const void *row, const ps_q8_vec *x, int64_t nb, int type) { \
        float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);                        \
        float off0 = 0.0f, off1 = 0.0f;                                                        \
        int64_t c = 0;                                                                         \
        for (; c + 2 <= nb; c += 2) {                                                          \
            acc0 = q8_step_##isa(row, x, c, type, acc0, &off0);                                \
            acc1 = q8_step_##isa(row, x, c + 1, type, acc1, &off1);                            \
        }                                                                                      \
        if (c < nb) acc0 = q8_step_##isa(row, x, c, type, acc0, &off0);                        \
        return vaddvq_f32(vaddq_f32(acc0, acc1)) + (off0 + off1);                              \
    }

DOT_Q8_NEON(, neon, dot_s8_neon)
SIMD_Q8(, neon, quantize_q8_neon)

/* acc + lane i's sum of the products a*b of bytes 4i..4i+3 (sdot's lanes; dot_s8_neon pairs
 * other bytes, which only a whole-vector sum may): pairs of int16 products (|a*b| <= 128*127)
 * added into int16 pairs, then into int32 */
INLINE int32x4_t dot4_s8_neon(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vpadalq_s16(acc, vpaddq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)), vmull_high_s8(a, b)));
}

/* Prompt batches in int8 (gemm_q8_scalar's definition), as the x86 kernels (GEMM_Q8_AVX2) with
 * signed codes (NEON multiplies signed bytes, so nothing is offset: Q4_0's codes less 8): tiles
 * of 2 rows x a group of 16 tokens in four vectors, 8 integer and 8 float accumulators. */
#define GEMM_Q8_NEON(TARGET, isa, DOT4)                                                        \
    TARGET INLINE void gq_tile_##isa(const char *a, size_t row_bytes, const int R, const int T, const int type, \
                                     const ps_q8_batch *x, int64_t nblk, int64_t g, float out[][GQ_LANES]) { \
        float32x4_t f[2][4];                                                                   \
        int32x4_t acc[2][4];                                                                   \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                    \
            _Pragma("GCC unroll 4") for (int h = 0; h < 4; h++) f[r][h] = vdupq_n_f32(0.0f);   \
        for (int64_t b = 0; b < nblk; b++) {                                                   \
            const int8_t *xq = x->qs + (g * nblk + b) * GQ_BLOCK_BYTES;                        \
            const int64_t meta = (g * nblk + b) * GQ_LANES;                                    \
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                \
                _Pragma("GCC unroll 4") for (int h = 0; h < 4; h++) acc[r][h] = vdupq_n_s32(0); \
            _Pragma("GCC unroll 8") for (int s = 0; s < QK / 4; s++) {                         \
                int8x16_t xv[4];                                                               \
                _Pragma("GCC unroll 4") for (int h = 0; h < 4; h++) xv[h] = vld1q_s8(xq + s * GQ_STEP_BYTES + 16 * h); \
                _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {                          \
                    int32_t w4;                                                                \
                    int8x16_t w;                                                               \
                    if (type == PS_TYPE_Q8_0) {                                                \
                        memcpy(&w4, ((const block_q8_0 *)(a + r * row_bytes))[b].qs + 4 * s, 4); \
                        w = vreinterpretq_s8_s32(vdupq_n_s32(w4));                             \
                    } else {                                                                   \
                        memcpy(&w4, q4_codes(a + r * row_bytes, b, type) + 4 * (s & 3), 4);    \
                        const uint8x16_t q = vreinterpretq_u8_s32(vdupq_n_s32(w4));            \
                        w = vreinterpretq_s8_u8(s < 4 ? vandq_u8(q, vdupq_n_u8(0xf)) : vshrq_n_u8(q, 4)); \
                        if (type == PS_TYPE_Q4_0) w = vsubq_s8(w, vdupq_n_s8(8));              \
                    }                                                                          \
                    _Pragma("GCC unroll 4") for (int h = 0; h < 4; h++) acc[r][h] = DOT4(acc[r][h], w, xv[h]); \
                }                                                                              \
            }                                                                                  \
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {                              \
                uint16_t dh, mh;                                                               \
                block_halves(a + r * row_bytes, b, type, &dh, &mh);                            \
                const float dw = f16_neon(dh), mw = f16_neon(mh);                              \
                _Pragma("GCC unroll 4") for (int h = 0; h < 4; h++) {                          \
                    const float32x4_t sc = vmulq_n_f32(vld1q_f32(x->d + meta + 4 * h), dw);    \
                    f[r][h] = vfmaq_f32(f[r][h], vcvtq_f32_s32(acc[r][h]), sc);                \
                    if (type == PS_TYPE_Q4_1) f[r][h] = vfmaq_f32(f[r][h], vdupq_n_f32(mw), vld1q_f32(x->s + meta + 4 * h)); \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                    \
            _Pragma("GCC unroll 4") for (int h = 0; h < 4; h++) vst1q_f32(out[r] + 4 * h, f[r][h]); \
    }                                                                                          \
    GEMM_Q8_LOOPS(TARGET, isa, 2, 1)
GEMM_Q8_NEON(, neon, dot4_s8_neon)
GEMM_Q8_TYPE(, neon, q8_0, PS_TYPE_Q8_0)
GEMM_Q8_TYPE(, neon, q4_0, PS_TYPE_Q4_0)
GEMM_Q8_TYPE(, neon, q4_1, PS_TYPE_Q4_1)

#if defined(__clang__)
#define TARGET_DOTPROD __attribute__((target("dotprod")))
#else
#define TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
TARGET_DOTPROD INLINE int32x4_t dot_s8_neon_dotprod(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
}
DOT_Q8_NEON(TARGET_DOTPROD, neon_dotprod, dot_s8_neon_dotprod)
SIMD_Q8(TARGET_DOTPROD, neon_dotprod, quantize_q8_neon)
GEMM_Q8_NEON(TARGET_DOTPROD, neon_dotprod, dot_s8_neon_dotprod)
GEMM_Q8_TYPE(TARGET_DOTPROD, neon_dotprod, q8_0, PS_TYPE_Q8_0)
GEMM_Q8_TYPE(TARGET_DOTPROD, neon_dotprod, q4_0, PS_TYPE_Q4_0)
GEMM_Q8_TYPE(TARGET_DOTPROD, neon_dotprod, q4_1, PS_TYPE_Q4_1)
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

/* NULL: not built for this architecture (a VNNI / dotprod level has its base's float kernels) */
static const kernel_row *const isa_kernels[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR]       = kernels_scalar,
#if defined(__x86_64__)
    [PS_ISA_AVX2]         = kernels_avx2,
    [PS_ISA_AVX2_VNNI]    = kernels_avx2,
    [PS_ISA_AVX512]       = kernels_avx512,
    [PS_ISA_AVX512_VNNI]  = kernels_avx512,
    [PS_ISA_AVX512_BF16]  = kernels_avx512,
#endif
#if defined(__aarch64__)
    [PS_ISA_NEON]         = kernels_neon,
    [PS_ISA_NEON_DOTPROD] = kernels_neon,
#endif
};

/* NULL: not built (an ISA without it is unavailable) */
static const q8_kernels *const isa_q8[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR]       = &q8_scalar,
#if defined(__x86_64__)
    [PS_ISA_AVX2]         = &q8_avx2,
#if HAVE_AVX_VNNI
    [PS_ISA_AVX2_VNNI]    = &q8_avx2_vnni,
#endif
    [PS_ISA_AVX512]       = &q8_avx512,
    [PS_ISA_AVX512_VNNI]  = &q8_avx512_vnni,
#if HAVE_AVX512_BF16
    [PS_ISA_AVX512_BF16]  = &q8_avx512_vnni,
#endif
#endif
#if defined(__aarch64__)
    [PS_ISA_NEON]         = &q8_neon,
    [PS_ISA_NEON_DOTPROD] = &q8_neon_dotprod,
#endif
};

static const ps_f32_ops f32_ops_scalar = { exp_scalar, weighted_sum_scalar, keep_at_least_scalar, to_bf16_scalar,
                                           scores_scalar, gemm16_scalar, axpy_nonzero_scalar };
#if defined(__x86_64__)
static const ps_f32_ops f32_ops_avx2 = { exp_avx2, weighted_sum_avx2, keep_at_least_avx2, to_bf16_scalar, scores_avx2,
                                         gemm16_avx2, axpy_nonzero_avx2 };
static const ps_f32_ops f32_ops_avx512 = { exp_avx512, weighted_sum_avx512, keep_at_least_avx512, to_bf16_avx512,
                                           scores_avx512, gemm16_avx512, axpy_nonzero_avx512 };
#endif
#if defined(__aarch64__)
static const ps_f32_ops f32_ops_neon = { exp_neon, weighted_sum_neon, keep_at_least_scalar, to_bf16_scalar, scores_neon,
                                         gemm16_neon, axpy_nonzero_neon };
#endif

/* NULL: not built (a VNNI / dotprod level has its base's) */
static const ps_f32_ops *const isa_f32_ops[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR]       = &f32_ops_scalar,
#if defined(__x86_64__)
    [PS_ISA_AVX2]         = &f32_ops_avx2,
    [PS_ISA_AVX2_VNNI]    = &f32_ops_avx2,
    [PS_ISA_AVX512]       = &f32_ops_avx512,
    [PS_ISA_AVX512_VNNI]  = &f32_ops_avx512,
    [PS_ISA_AVX512_BF16]  = &f32_ops_avx512,
#endif
#if defined(__aarch64__)
    [PS_ISA_NEON]         = &f32_ops_neon,
    [PS_ISA_NEON_DOTPROD] = &f32_ops_neon,
#endif
};

/* NULL: scalar (NEON has no tiled kernel yet) */
static const gemm_fn isa_gemm[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR]      = gemm_scalar,
#if defined(__x86_64__)
    [PS_ISA_AVX2]        = gemm_avx2,
    [PS_ISA_AVX2_VNNI]   = gemm_avx2,
    [PS_ISA_AVX512]      = gemm_avx512,
    [PS_ISA_AVX512_VNNI] = gemm_avx512,
    [PS_ISA_AVX512_BF16] = gemm_avx512,
#endif
};

static const char *const isa_names[PS_ISA_COUNT] = {
    [PS_ISA_SCALAR] = "scalar", [PS_ISA_AVX2] = "avx2", [PS_ISA_AVX2_VNNI] = "avx2_vnni",
    [PS_ISA_AVX512] = "avx512", [PS_ISA_AVX512_VNNI] = "avx512_vnni", [PS_ISA_AVX512_BF16] = "avx512_bf16",
    [PS_ISA_NEON] = "neon", [PS_ISA_NEON_DOTPROD] = "neon_dotprod",
};

#if defined(__x86_64__)
/* bit `bit` of register reg (0 eax .. 3 edx) of cpuid leaf 7, sub-leaf sub */
static int cpuid7_bit(unsigned sub, int reg, int bit) {
    unsigned r[4];
    if (!__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3])) return 0;
    return (r[reg] >> bit) & 1;
}
#endif

/* libgcc's __builtin_cpu_supports reports AVX / AVX-512 features only when the OS also
 * enables their register state (it checks XCR0 via xgetbv). A VNNI level is its base level
 * (whose check covers the registers it uses) plus a cpuid bit, read directly: gcc < 11 and
 * older clangs do not know "avxvnni" by name. */
static int cpu_supports(int isa) {
    switch (isa) {
    case PS_ISA_SCALAR: return 1;
#if defined(__x86_64__)
    case PS_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case PS_ISA_AVX2_VNNI:   /* AVX-VNNI: leaf 7.1, eax bit 4 */
        return cpu_supports(PS_ISA_AVX2) && cpuid7_bit(1, 0, 4);
    case PS_ISA_AVX512:
        return cpu_supports(PS_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case PS_ISA_AVX512_VNNI: /* AVX512_VNNI: leaf 7.0, ecx bit 11 */
        return cpu_supports(PS_ISA_AVX512) && cpuid7_bit(0, 2, 11);
    case PS_ISA_AVX512_BF16: /* AVX512_BF16: leaf 7.1, eax bit 5 */
        return cpu_supports(PS_ISA_AVX512_VNNI) && cpuid7_bit(1, 0, 5);
#endif
#if defined(__aarch64__)
    case PS_ISA_NEON: return 1; /* Advanced SIMD is part of AArch64 */
    case PS_ISA_NEON_DOTPROD:
#if defined(__linux__)
        return (getauxval(AT_HWCAP) >> 20) & 1; /* HWCAP_ASIMDDP */
#elif defined(__APPLE__)
        return 1; /* every Apple arm64 CPU has it */
#else
        return 0;
#endif
#endif
    default: return 0;
    }
}

/* Prompt batches in int8, per ISA and type; NULL for the float types. The scalar one is the
 * definition. */
typedef void (*gemm_q8_fn)(const void *a, int64_t m, const ps_q8_batch *x, int64_t nb, int64_t k, float *c,
                           int64_t ldc);
#define GEMM_Q8_ROW(isa) { [PS_TYPE_Q8_0] = gemm_q8_q8_0_##isa, [PS_TYPE_Q4_0] = gemm_q8_q4_0_##isa, \
                           [PS_TYPE_Q4_1] = gemm_q8_q4_1_##isa }
static const gemm_q8_fn isa_gemm_q8[PS_ISA_COUNT][PS_TYPE_COUNT] = {
    [PS_ISA_SCALAR]       = GEMM_Q8_ROW(scalar),
#if defined(__x86_64__)
    [PS_ISA_AVX2]         = GEMM_Q8_ROW(avx2),
#if HAVE_AVX_VNNI
    [PS_ISA_AVX2_VNNI]    = GEMM_Q8_ROW(avx2_vnni),
#endif
    [PS_ISA_AVX512]       = GEMM_Q8_ROW(avx512),
    [PS_ISA_AVX512_VNNI]  = GEMM_Q8_ROW(avx512_vnni),
#if HAVE_AVX512_BF16
    [PS_ISA_AVX512_BF16]  = GEMM_Q8_ROW(avx512_vnni),
#endif
#endif
#if defined(__aarch64__)
    [PS_ISA_NEON]         = GEMM_Q8_ROW(neon),
    [PS_ISA_NEON_DOTPROD] = GEMM_Q8_ROW(neon_dotprod),
#endif
};

/* NULL: the isa has no bf16 dot (only AVX512_BF16 has one, for BF16 rows) */
typedef float (*dot_bf16_fn)(const void *row, const uint16_t *x, int64_t n);
static const dot_bf16_fn isa_dot_bf16[PS_ISA_COUNT] = {
#if defined(__x86_64__) && HAVE_AVX512_BF16
    [PS_ISA_AVX512_BF16] = dot_bf16_avx512_bf16,
#endif
};

static ps_type_traits traits[PS_ISA_COUNT][PS_TYPE_COUNT];
static int available[PS_ISA_COUNT];
static int best_isa;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init_tables(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
#endif
    for (int isa = 0; isa < PS_ISA_COUNT; isa++) {
        available[isa] = isa_kernels[isa] != NULL && isa_q8[isa] != NULL && isa_f32_ops[isa] != NULL &&
                         cpu_supports(isa);
        if (!available[isa]) continue;
        best_isa = isa; /* enum order is preference order within an architecture */
        for (int t = 0; t < PS_TYPE_COUNT; t++) {
            if (!layouts[t].name) continue;
            const kernel_row *k = &isa_kernels[isa][t];
            traits[isa][t] = (ps_type_traits){ layouts[t].name, layouts[t].block_size, layouts[t].block_bytes,
                                               k->to_float, layouts[t].from_float, k->dot, k->axpy,
                                               k->axpy4, isa_q8[isa]->dot[t], isa_q8[isa]->dot4[t], isa_q8[isa]->dot8[t],
                                               t == PS_TYPE_BF16 ? isa_dot_bf16[isa] : NULL, isa_gemm_q8[isa][t] };
        }
    }
    /* PROSPARSE_ISA=<name> picks a lower instruction set this CPU has (to compare kernels, or
     * to see what a machine without AVX-512 gets); a name not available is ignored here, and
     * the Python runtime refuses it with the list of names (runtime/native.py) */
    const char *want = getenv("PROSPARSE_ISA");
    for (int isa = 0; want && isa < PS_ISA_COUNT; isa++)
        if (available[isa] && strcmp(want, isa_names[isa]) == 0) best_isa = isa;
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

const ps_f32_ops *ps_f32_ops_for(int isa) {
    ensure_init();
    if (isa == -1) isa = best_isa;
    return isa >= 0 && isa < PS_ISA_COUNT && available[isa] ? isa_f32_ops[isa] : NULL;
}

float ps_dot_f32(const float *a, const float *b, int64_t n) {
    ensure_init();
    return traits[best_isa][PS_TYPE_F32].dot(a, b, n);
}

void ps_axpy_f32(float a, const float *x, float *y, int64_t n) {
    ensure_init();
    traits[best_isa][PS_TYPE_F32].axpy(a, x, y, n);
}

int ps_quantize_q8_isa(int isa, const float *x, const ps_q8_vec *out, int64_t n) {
    ensure_init();
    if (isa < 0 || isa >= PS_ISA_COUNT || !available[isa]) return -1;
    isa_q8[isa]->quantize(x, out, n);
    return 0;
}

void ps_quantize_q8(const float *x, const ps_q8_vec *out, int64_t n) {
    ps_quantize_q8_isa(ps_kernels_best_isa(), x, out, n);
}

/* GEMMs whose a is F16 / BF16 (converted inside the kernel). Not BF16 on AVX2: its widening
 * and shift inside the tile made BF16 pp128 2-3% slower than converting into a float tile first
 * (Zen 3, alternating builds, 1 thread 300-306 -> 291-294 t/s), where F16 gained 4-5%. */
typedef void (*gemm_half_fn)(const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                             int64_t k, float *c, int64_t ldc);
static const gemm_half_fn isa_gemm_f16[PS_ISA_COUNT] = {
#if defined(__x86_64__)
    [PS_ISA_AVX2] = gemm_f16_avx2, [PS_ISA_AVX2_VNNI] = gemm_f16_avx2,
    [PS_ISA_AVX512] = gemm_f16_avx512, [PS_ISA_AVX512_VNNI] = gemm_f16_avx512, [PS_ISA_AVX512_BF16] = gemm_f16_avx512,
#endif
};
static const gemm_half_fn isa_gemm_bf16[PS_ISA_COUNT] = {
#if defined(__x86_64__)
    [PS_ISA_AVX512] = gemm_bf16_avx512, [PS_ISA_AVX512_VNNI] = gemm_bf16_avx512, [PS_ISA_AVX512_BF16] = gemm_bf16_avx512,
#endif
};

/* GEMMs of BF16 rows and bf16 activations: AVX512_BF16 only */
typedef void (*gemm_bf16act_fn)(const void *a, int64_t lda, int64_t m, const uint16_t *b, int64_t ldb, int64_t nb,
                                int64_t k, float *c, int64_t ldc);
static const gemm_bf16act_fn isa_gemm_bf16act[PS_ISA_COUNT] = {
#if defined(__x86_64__) && HAVE_AVX512_BF16
    [PS_ISA_AVX512_BF16] = gemm_bf16_avx512_bf16,
#endif
};

int ps_gemm_nt_bf16_isa(int isa, const void *a, int64_t lda, int64_t m, const uint16_t *b, int64_t ldb, int64_t nb,
                        int64_t k, float *c, int64_t ldc) {
    ensure_init();
    if (isa < 0 || isa >= PS_ISA_COUNT || !available[isa] || !isa_gemm_bf16act[isa]) return -1;
    isa_gemm_bf16act[isa](a, lda, m, b, ldb, nb, k, c, ldc);
    return 0;
}

int ps_gemm_nt_bf16_supported(void) { return isa_gemm_bf16act[ps_kernels_best_isa()] != NULL; }

int ps_gemm_nt_bf16(const void *a, int64_t lda, int64_t m, const uint16_t *b, int64_t ldb, int64_t nb, int64_t k,
                    float *c, int64_t ldc) {
    return ps_gemm_nt_bf16_isa(ps_kernels_best_isa(), a, lda, m, b, ldb, nb, k, c, ldc);
}

int ps_gemm_nt_typed_isa(int isa, int a_type, const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                         int64_t nb, int64_t k, float *c, int64_t ldc) {
    ensure_init();
    if (isa < 0 || isa >= PS_ISA_COUNT || !available[isa]) return -1;
    if (a_type == PS_TYPE_F32) return ps_gemm_nt_f32_isa(isa, a, lda, m, b, ldb, nb, k, c, ldc);
    const gemm_half_fn fn = a_type == PS_TYPE_F16 ? isa_gemm_f16[isa] : a_type == PS_TYPE_BF16 ? isa_gemm_bf16[isa] : NULL;
    if (!fn) return -1;
    fn(a, lda, m, b, ldb, nb, k, c, ldc);
    return 0;
}

int ps_gemm_nt_typed_supported(int a_type) {
    const int isa = ps_kernels_best_isa();
    return a_type == PS_TYPE_F32 || (a_type == PS_TYPE_F16 && isa_gemm_f16[isa]) ||
           (a_type == PS_TYPE_BF16 && isa_gemm_bf16[isa]);
}

int ps_gemm_nt_typed(int a_type, const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                     int64_t k, float *c, int64_t ldc) {
    return ps_gemm_nt_typed_isa(ps_kernels_best_isa(), a_type, a, lda, m, b, ldb, nb, k, c, ldc);
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

int ps_quantize_q8_batch(const float *x, int64_t batch, int64_t n, const ps_q8_vec *tmp, const ps_q8_batch *out) {
    return ps_quantize_q8_batch_isa(ps_kernels_best_isa(), x, batch, n, tmp, out);
}

int ps_gemm_q8_isa(int isa, int type, const void *a, int64_t m, const ps_q8_batch *x, int64_t nb, int64_t k, float *c,
                   int64_t ldc) {
    const ps_type_traits *t = ps_type_traits_for(type, isa);
    if (!t || !t->gemm_q8 || k % QK != 0) return -1;
    t->gemm_q8(a, m, x, nb, k, c, ldc);
    return 0;
}
