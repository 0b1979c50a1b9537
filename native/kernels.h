/* prosparse — tensor-type kernels.
 *
 * One traits row per tensor type (ggml's block layouts, ggml's type ids), one table per
 * instruction set. Model code never switches on a type: it looks the row up once.
 *
 * All kernels take float32 activations. A "row" is ne0 weights of one type, stored as
 * ne0 / block_size consecutive blocks; n is always a multiple of block_size.
 */
#ifndef PROSPARSE_KERNELS_H
#define PROSPARSE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Tensor types; values are ggml's GGML_TYPE_* so GGUF type ids pass straight through. */
enum {
    PS_TYPE_F32  = 0,
    PS_TYPE_F16  = 1,
    PS_TYPE_Q4_0 = 2,
    PS_TYPE_Q4_1 = 3,
    PS_TYPE_Q8_0 = 8,
    PS_TYPE_BF16 = 30,
    PS_TYPE_COUNT = 31, /* size of lookup tables indexed by type id */
};

/* Instruction sets a kernel table can be built for. */
enum {
    PS_ISA_SCALAR = 0,
    PS_ISA_AVX2   = 1, /* AVX2 + FMA + F16C */
    PS_ISA_AVX512 = 2, /* AVX-512 F/BW/VL (VNNI/BF16 wait for int8/bf16 activations) */
    PS_ISA_NEON   = 3,
    PS_ISA_COUNT  = 4,
};

typedef struct {
    const char *name;      /* "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1" */
    int64_t block_size;    /* weights per block */
    size_t  block_bytes;   /* bytes per block */
    /* out[0..n) = dequantised row */
    void  (*to_float)(const void *row, float *out, int64_t n);
    /* row = quantised x (reference rounding, same as ggml's *_ref); used by tests and tools */
    void  (*from_float)(const float *x, void *row, int64_t n);
    /* returns sum_i row[i] * x[i] */
    float (*dot)(const void *row, const float *x, int64_t n);
    /* y[i] += a * row[i] */
    void  (*axpy)(float a, const void *row, float *y, int64_t n);
} ps_type_traits;

/* Picks the best instruction set this CPU supports (first call does the detection). */
int ps_kernels_best_isa(void);
/* 1 if this build and this CPU can run kernels for isa. */
int ps_kernels_isa_available(int isa);
const char *ps_kernels_isa_name(int isa);

/* Traits of `type` for `isa` (PS_ISA_* or -1 for the best available).
 * NULL if the type is unknown or the isa unavailable. */
const ps_type_traits *ps_type_traits_for(int type, int isa);

/* bytes of a row of n weights of this type; 0 if unknown type or n not a multiple of the block */
size_t ps_row_bytes(int type, int64_t n);

/* float32 helpers used by the forward pass, dispatched like the table above. */
float ps_dot_f32(const float *a, const float *b, int64_t n);
void  ps_axpy_f32(float a, const float *x, float *y, int64_t n);

/* Prompt batches: c[j*ldc + i] = a_i . b_j for the m rows a_i of a (row stride lda) and the
 * nb rows b_j of b (row stride ldb), every row k floats. Register-blocked tiles of rows x
 * tokens, so each loaded vector feeds several products. */
void ps_gemm_nt_f32(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                    int64_t k, float *c, int64_t ldc);
/* the same for one instruction set (tests compare them); returns -1 if isa is unavailable */
int ps_gemm_nt_f32_isa(int isa, const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                       int64_t nb, int64_t k, float *c, int64_t ldc);

/* f16 / bf16 scalar conversions (exact, round-to-nearest-even for float -> half). */
float    ps_f16_to_f32(uint16_t h);
uint16_t ps_f32_to_f16(float f);
float    ps_bf16_to_f32(uint16_t h);
uint16_t ps_f32_to_bf16(float f);

#endif
