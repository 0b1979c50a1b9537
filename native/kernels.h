/* prosparse — tensor-type kernels.
 *
 * One traits row per tensor type (ggml's block layouts, ggml's type ids), one table per
 * instruction set. Model code never switches on a type: it looks the row up once.
 *
 * Kernels take float32 activations, except dot_q8: the integer types (Q8_0, Q4_0, Q4_1) also
 * have a dot with the activation vector quantised to 8 bits (ps_q8_vec), computed with integer
 * multiply-adds as llama.cpp does; and dot_bf16 (and ps_gemm_nt_bf16): where the CPU has
 * AVX512-BF16, BF16 rows times activations rounded to bf16, with vdpbf16ps. A "row" is ne0
 * weights of one type, stored as ne0 / block_size consecutive blocks; n is always a multiple of
 * block_size.
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

/* Instruction sets a kernel table can be built for; within an architecture, enum order is
 * preference order. A _VNNI / _DOTPROD level has the float kernels of the level below it and
 * its own int8 dot products (dot_q8). */
enum {
    PS_ISA_SCALAR       = 0,
    PS_ISA_AVX2         = 1, /* AVX2 + FMA + F16C; int8 products with vpmaddubsw          */
    PS_ISA_AVX2_VNNI    = 2, /* + AVX-VNNI: vpdpbusd on 256 bits                          */
    PS_ISA_AVX512       = 3, /* AVX-512 F/BW/VL; int8 products with vpmaddubsw            */
    PS_ISA_AVX512_VNNI  = 4, /* + AVX512-VNNI: vpdpbusd on 512 bits                       */
    PS_ISA_AVX512_BF16  = 5, /* + AVX512-BF16: vdpbf16ps for BF16 weights (dot_bf16)       */
    PS_ISA_NEON         = 6, /* int8 products with widening multiplies                    */
    PS_ISA_NEON_DOTPROD = 7, /* + the dot-product extension (sdot)                         */
    PS_ISA_COUNT        = 8,
};

/* n activations quantised to 8 bits per block of 32, as llama.cpp quantises the input of a
 * mat-vec (its Q8_1 blocks, with d and s kept in f32 and stored as three arrays):
 * x[i] ~ qs[i] * d[i/32], d = max |x| / 127 over the block, qs = x / d rounded to nearest
 * (ties to even), s = d * (sum of the block's qs), the term Q4_1's offset m multiplies (and
 * Q4_0's -8: its codes are used unsigned). A block whose largest |x| is below 1e-30 is zero. */
typedef struct {
    int8_t *qs;   /* (n)      */
    float  *d;    /* (n / 32) */
    float  *s;    /* (n / 32) */
    int8_t *q4;   /* (n) or NULL: qs regrouped for the AVX2 Q4 dots (below)  */
} ps_q8_vec;

/* q4: each whole four of blocks c..c+3 holds their 16-code halves in the order
 * lo(c) lo(c+2) hi(c) hi(c+2) lo(c+1) lo(c+3) hi(c+1) hi(c+3) (lo: codes 0-15 of a block, hi:
 * 16-31), the order in which the AVX2 Q4 dots pair a row's nibbles with them; the blocks after
 * the last whole four are not written. The AVX2 quantisers fill it when it is not NULL, and the
 * AVX2 Q4 dots read it when it is not NULL (else they regroup qs themselves, with the same
 * result). The other ISAs leave it alone. */

/* A prompt batch's activations in 8 bits, for the integer GEMM (gemm_q8): each token quantised
 * as ps_quantize_q8 quantises it, then interleaved in groups of 16 tokens so that one vector
 * holds 4 consecutive codes of each of 8 or 16 tokens. Group g's block b (of 32 codes per
 * token) is 8 steps of 16 x 4 bytes: qs[((g * n/32 + b) * 8 + step) * 64 + 4 * lane + i] is
 * code 4 * step + i of token 16 * g + lane. d, s (as ps_q8_vec's) and sum (the block's code
 * sum) are at [(g * n/32 + b) * 16 + lane]. Lanes past the batch are zeros. gemm_q8 needs the
 * codes in [-127, 127], as the quantiser makes them from finite input. */
enum { PS_Q8_BATCH_LANES = 16 };   /* tokens per group of a ps_q8_batch */
typedef struct {
    int8_t  *qs;   /* (groups * 16 * n) */
    float   *d;    /* (groups * 16 * n / 32) */
    float   *s;    /* (groups * 16 * n / 32) */
    int32_t *sum;  /* (groups * 16 * n / 32) */
} ps_q8_batch;

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
    /* y[i] += a[0] * rows[0][i], then a[1] * rows[1][i], ... a[3] * rows[3][i]: the same
     * roundings as four axpy calls in that order, but y is loaded and stored once per block of
     * columns instead of once per row (the sparse down projection adds a row per neuron) */
    void  (*axpy4)(const float a[4], const void *const rows[4], float *y, int64_t n);
    /* returns sum over blocks of the integer dot of the block's codes with x's, times the
     * scales (+ the Q4 offset term); x from ps_quantize_q8. NULL for the float types. */
    float (*dot_q8)(const void *row, const ps_q8_vec *x, int64_t n);
    /* out[r] = dot_q8(rows[r], x, n) for r < 4, the same bits; x's loads and shuffles are
     * shared and the four sums formed together (AVX-512 VNNI Q4_1 in cache,
     * native/bench/bench_kernels: 42.9 against dot_q8's 32.3 GB/s). NULL where
     * there is no such kernel (AVX-512 and AVX2 have one for Q4_0 and Q4_1; Q8_0's ran slower from
     * memory than one row at a time): call dot_q8 per row. */
    void  (*dot4_q8)(const void *const rows[4], const ps_q8_vec *x, int64_t n, float out[4]);
    /* out[r] = dot_q8(rows[r], x, n) for r < 8, the same bits, as dot4_q8 for eight rows: half
     * the calls, each with twice the independent work to overlap its start and its sums'
     * reduction (50.9 GB/s where dot4_q8 has 42.9). A mat-vec calls it per eight rows, then
     * dot4_q8 and dot_q8 for the rest. NULL where there is no such kernel (AVX-512 has one for
     * Q4_0 and Q4_1). */
    void  (*dot8_q8)(const void *const rows[8], const ps_q8_vec *x, int64_t n, float out[8]);
    /* BF16 rows with bf16 activations (x from ps_f32_ops.to_bf16), as llama.cpp multiplies BF16
     * weights: returns sum_i row[i] * x[i], each pair of products exact and added in f32 by
     * vdpbf16ps. Only the AVX512_BF16 level has it (its BF16 row); NULL elsewhere. */
    float (*dot_bf16)(const void *row, const uint16_t *x, int64_t n);
    /* Prompt batches in int8: c[j*ldc + i] for the m rows i (consecutive, k weights each) and
     * the nb tokens j of x (ps_quantize_q8_batch of k floats per token): per row and token,
     * over the blocks in order, acc = fma(float(the exact integer dot of the block's codes),
     * d_w * d_x, acc), then for Q4_1 acc = fma(m, s_x, acc); the same bits in every isa that
     * has it (tiles of rows x 16 tokens, 4 codes per 32-bit lane: 2.3-3.4x the f32 GEMM on
     * dequantised rows). NULL for the float types. */
    void  (*gemm_q8)(const void *a, int64_t m, const ps_q8_batch *x, int64_t nb, int64_t k, float *c, int64_t ldc);
} ps_type_traits;

/* Picks the best instruction set this CPU supports (first call does the detection), or the
 * one the environment variable PROSPARSE_ISA names (ps_kernels_isa_name's spelling) where this
 * CPU supports it. */
int ps_kernels_best_isa(void);
/* 1 if this build and this CPU can run kernels for isa. */
int ps_kernels_isa_available(int isa);
const char *ps_kernels_isa_name(int isa);

/* Traits of `type` for `isa` (PS_ISA_* or -1 for the best available).
 * NULL if the type is unknown or the isa unavailable. */
const ps_type_traits *ps_type_traits_for(int type, int isa);

/* bytes of a row of n weights of this type; 0 if unknown type or n not a multiple of the block */
size_t ps_row_bytes(int type, int64_t n);

/* out = x[0..n) quantised (whole blocks of 32 only); the same bytes in every isa */
void ps_quantize_q8(const float *x, const ps_q8_vec *out, int64_t n);
/* the same for one instruction set (tests compare them); returns -1 if isa is unavailable */
int ps_quantize_q8_isa(int isa, const float *x, const ps_q8_vec *out, int64_t n);

/* groups of 16 tokens in a batch of `batch` (ps_q8_batch's sizes) */
int64_t ps_q8_batch_groups(int64_t batch);
/* out = x's batch rows of n floats (n a multiple of 32), each quantised as ps_quantize_q8 does
 * (through tmp, a ps_q8_vec of n), interleaved as ps_q8_batch says. Returns -1 if isa is
 * unavailable. */
int ps_quantize_q8_batch(const float *x, int64_t batch, int64_t n, const ps_q8_vec *tmp, const ps_q8_batch *out);
int ps_quantize_q8_batch_isa(int isa, const float *x, int64_t batch, int64_t n, const ps_q8_vec *tmp,
                             const ps_q8_batch *out);
/* type's gemm_q8 for one instruction set (tests compare them); -1, computing nothing, where
 * that isa has none, or k is not a multiple of 32 */
int ps_gemm_q8_isa(int isa, int type, const void *a, int64_t m, const ps_q8_batch *x, int64_t nb, int64_t k, float *c,
                   int64_t ldc);

/* float32 helpers used by the forward pass, dispatched like the table above. */
float ps_dot_f32(const float *a, const float *b, int64_t n);
void  ps_axpy_f32(float a, const float *x, float *y, int64_t n);

/* float32 operations of attention and activations, one table per instruction set: the
 * forward pass looks a table up once per task and calls through it (every ps_*_f32 wrapper
 * checks the dispatch, which costs as much as a head_dim-long product). */
typedef struct {
    /* y[i] = e^x[i] (y may be x): within 1.5 ulp (1 ulp at most over the tests' inputs),
     * subnormals and overflow included; the same bits in every isa */
    void (*exp)(const float *x, float *y, int64_t n);
    /* out[0..k) = sum over t < n of w[t] * rows[t*ld + 0..k), the rows of type v_type
     * (PS_TYPE_F32 or PS_TYPE_F16, the KV cache's): attention's weighted sum of value rows; out
     * is kept in registers while the rows stream past (F16 values convert exactly, so both
     * types take the same steps on the same numbers) */
    void (*weighted_sum)(const float *w, int64_t n, const void *rows, int64_t ld, int64_t k, int v_type, float *out);
    /* x[i] = x[i] >= min ? x[i] : 0 (NaN -> 0), then the indices of the non-zero x[i] go to
     * idx in increasing order; returns their count. The sparse FFN's gate: ReLU with min the
     * smallest positive float (x > 0), FATReLU with min its threshold. */
    int64_t (*keep_at_least)(float *x, int64_t n, float min, int32_t *idx);
    /* out[i] = x[i] rounded to bf16 (nearest even, NaN kept quiet): ps_f32_to_bf16's bits in
     * every isa; the input of dot_bf16 and ps_gemm_nt_bf16 */
    void (*to_bf16)(const float *x, uint16_t *out, int64_t n);
    /* out[t] = sum_i q[i] * k[t*ld + i] over i < hd, for t < n: attention's scores against the
     * keys of one KV head, of type k_type (PS_TYPE_F32 or PS_TYPE_F16, the KV cache's). A
     * position's score takes the same steps whatever n (AVX-512: 16 positions at a time, each
     * in its own accumulator, their sums reduced together; elsewhere the type's dot per row). */
    void (*scores)(const float *q, const void *k, int64_t ld, int64_t n, int64_t hd, int k_type, float *out);
    /* c[r*ldc + l] = sum over i < k of a[r*a_rs + i*a_ks] * b[i*ldb + l], for r < m and the 16
     * lanes l: a prompt's attention with 16 query tokens as the lanes (scores: a the keys, b the
     * queries transposed; weighted sums: a the values read down their columns, b the weights).
     * Each (r, l) is one fma chain over i in order from zero: the same bits in every isa. */
    void (*gemm16)(const float *a, int64_t a_rs, int64_t a_ks, int64_t m, const float *b, int64_t ldb, int64_t k,
                   float *c, int64_t ldc);
    /* y[i] for i < k: y[i] = fma(a[j], rows[j * ld + off + i], y[i]) for each j < n with a[j]
     * != 0, in order: each y[i] one fma chain, the same bits in every isa (and as the SIMD f32
     * axpy per such row; the scalar axpy does not fuse) (rows whose a is zero are never read). n <= 64 (the SIMD kernels take the
     * non-zero a as a 64-bit mask). A prompt's down projection from
     * ffn_down_t, a column strip at a time: y is kept in registers while the token's rows pass,
     * and the strip of the rows stays in L1 for the next token. */
    void (*axpy_nonzero)(const float *a, int64_t n, const float *rows, int64_t ld, int64_t off, float *y, int64_t k);
} ps_f32_ops;

/* the table of isa (-1: the best available); NULL if the isa is unavailable */
const ps_f32_ops *ps_f32_ops_for(int isa);

/* Prompt batches: c[j*ldc + i] = a_i . b_j for the m rows a_i of a (row stride lda) and the
 * nb rows b_j of b (row stride ldb), every row k floats. Register-blocked tiles of rows x
 * tokens, so each loaded vector feeds several products. */
void ps_gemm_nt_f32(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                    int64_t k, float *c, int64_t ldc);
/* the same for one instruction set (tests compare them); returns -1 if isa is unavailable */
int ps_gemm_nt_f32_isa(int isa, const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                       int64_t nb, int64_t k, float *c, int64_t ldc);

/* The same with a's rows (lda elements apart) of a_type: F32, or F16 / BF16 converted as they
 * are loaded (no float copy of a; the result is the f32 GEMM's on the converted rows, bit for
 * bit). Returns -1, computing nothing, if the isa (the best available, for ps_gemm_nt_typed)
 * has no such kernel: F16 and BF16 have one for AVX-512 only. */
int ps_gemm_nt_typed_supported(int a_type);   /* 1 if ps_gemm_nt_typed takes a_type here */
int ps_gemm_nt_typed(int a_type, const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t nb,
                     int64_t k, float *c, int64_t ldc);
int ps_gemm_nt_typed_isa(int isa, int a_type, const void *a, int64_t lda, int64_t m, const float *b, int64_t ldb,
                         int64_t nb, int64_t k, float *c, int64_t ldc);

/* Prompt batches of BF16 weights with bf16 activations (AVX512_BF16 only): c[j*ldc + i] = the
 * sum over k of a_i * b_j (dot_bf16's products, summed in another order), a's rows BF16 (lda
 * elements apart), b's bf16 (ldb apart), tiles of 4 rows x 4 tokens with vdpbf16ps. Returns -1,
 * computing nothing, where the isa has no such kernel. */
int ps_gemm_nt_bf16_supported(void);   /* 1 if the best available isa has it */
int ps_gemm_nt_bf16(const void *a, int64_t lda, int64_t m, const uint16_t *b, int64_t ldb, int64_t nb, int64_t k,
                    float *c, int64_t ldc);
int ps_gemm_nt_bf16_isa(int isa, const void *a, int64_t lda, int64_t m, const uint16_t *b, int64_t ldb, int64_t nb,
                        int64_t k, float *c, int64_t ldc);

/* f16 / bf16 scalar conversions (exact, round-to-nearest-even for float -> half). */
float    ps_f16_to_f32(uint16_t h);
uint16_t ps_f32_to_f16(float f);
float    ps_bf16_to_f32(uint16_t h);
uint16_t ps_f32_to_bf16(float f);

#endif
