/* prosparse — the C runtime's public interface (also parsed by cffi; keep it plain C).
 *
 * Python opens and validates the GGUF, then hands the C model pointers into the memory map:
 * no tensor is copied. Shapes follow GGUF/ggml: ne0 is the row length (contiguous), ne1 the
 * number of rows. A weight W with y = W x has ne0 = len(x), ne1 = len(y).
 */
#ifndef PROSPARSE_H
#define PROSPARSE_H

#include <stdint.h>

enum { PS_ARCH_LLAMA = 0, PS_ARCH_MINICPM = 1 };
enum { PS_ACT_SILU = 0, PS_ACT_RELU = 1, PS_ACT_FATRELU = 2 };
/* How the FFN of a decoded token is computed (prompt batches always run dense):
 * DENSE: every neuron. EXACT: gate rows for all neurons, then up and down only for the
 * neurons the activation leaves non-zero. PREDICTOR: the layer's predictor picks the neurons
 * first; gate, up and down run for those alone. */
enum { PS_SPARSE_DENSE = 0, PS_SPARSE_EXACT = 1, PS_SPARSE_PREDICTOR = 2 };
/* How mat-muls read their input: F32 as it is; Q8 quantised, as llama.cpp does. In Q8 mode a
 * single token's input is quantised to 8 bits per block of 32 (ps_quantize_q8, once per vector)
 * for every weight whose type has an integer kernel (Q8_0, Q4_0, Q4_1), which then runs integer
 * dot products; a prompt batch's the same way, token by token, for the integer GEMM
 * (gemm_q8). BF16 weights, where the CPU has AVX512-BF16, read the input rounded to bf16 (a
 * single token's and a prompt's: vdpbf16ps); other float weights read float32 either way. */
enum { PS_ACTIVATIONS_F32 = 0, PS_ACTIVATIONS_Q8 = 1 };
/* What the predictor reads: the residual stream before ffn_norm (PowerInfer's choice for
 * LLaMA) or the normalised FFN input. */
enum { PS_PREDICTOR_INPUT_RESIDUAL = 0, PS_PREDICTOR_INPUT_NORMED = 1 };

typedef struct {
    const void *data;  /* first byte of the tensor inside the mapped file; NULL = absent */
    int32_t type;      /* PS_TYPE_* (ggml type id) */
    int64_t ne0;       /* elements per row */
    int64_t ne1;       /* rows (1 for a vector) */
} ps_tensor;

typedef struct {
    ps_tensor attn_norm;  /* (n_embd)                          */
    ps_tensor wq;         /* (n_head*head_dim rows, n_embd)     */
    ps_tensor wk;         /* (n_head_kv*head_dim rows, n_embd)  */
    ps_tensor wv;         /* (n_head_kv*head_dim rows, n_embd)  */
    ps_tensor wo;         /* (n_embd rows, n_head*head_dim)     */
    ps_tensor ffn_norm;   /* (n_embd)                           */
    ps_tensor ffn_gate;   /* (n_ff rows, n_embd): one row per neuron */
    ps_tensor ffn_up;     /* (n_ff rows, n_embd)                */
    ps_tensor ffn_down;   /* (n_embd rows, n_ff), or absent when ffn_down_t is given */
    ps_tensor ffn_down_t; /* (n_ff rows, n_embd): neuron i's output vector, contiguous */
    ps_tensor fc1;        /* predictor (rank rows, n_embd), optional */
    ps_tensor fc2;        /* predictor (n_ff rows, rank), optional   */
} ps_layer_weights;

typedef struct {
    int32_t arch;            /* PS_ARCH_*                                   */
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;        /* usually n_embd / n_head                     */
    int32_t n_ff;
    int32_t n_rot;           /* rotary dims per head (<= head_dim, even)    */
    float   rms_eps;
    float   rope_base;
    int32_t activation;      /* PS_ACT_* on the gate branch                 */
    float   act_threshold;   /* FATReLU: x kept when x >= threshold         */
    float   embd_scale;      /* token embedding multiplier (MiniCPM scale_emb; 1 for llama)  */
    float   residual_scale;  /* multiplier of each residual branch (1 for llama)             */
    float   logit_scale;     /* multiplier of the final hidden state before the head (1)     */
    int32_t predictor_input; /* PS_PREDICTOR_INPUT_*                                         */
} ps_config;

/* Per-layer activation counts, summed over the tokens evaluated while statistics are on. */
typedef struct {
    int64_t n_tokens;            /* tokens measured                                  */
    int64_t n_active;            /* neurons with act(gate) != 0 (the exact gate)      */
    int64_t n_predicted;         /* neurons the predictor marked active (predictor mode) */
    int64_t n_predicted_active;  /* of those, truly active                           */
    int64_t n_computed;          /* neurons whose up/down rows were read             */
} ps_layer_stats;

typedef struct ps_model ps_model;

/* Builds a model over the given tensors (pointers are kept, not copied: the caller keeps the
 * mapping alive until ps_model_free). Checks every shape and type against cfg; on any problem
 * returns NULL and writes a message naming the tensor into err. */
ps_model *ps_model_create(const ps_config *cfg,
                          const ps_tensor *tok_embd,     /* (n_vocab rows, n_embd) */
                          const ps_tensor *output_norm,  /* (n_embd)               */
                          const ps_tensor *output,       /* (n_vocab rows, n_embd); data NULL = tied */
                          const ps_layer_weights *layers,/* n_layer entries        */
                          int32_t n_ctx, int32_t n_threads,
                          char *err, int32_t err_len);
void ps_model_free(ps_model *m);

/* Runs n_tokens tokens at positions n_past .. n_past+n_tokens-1 (the KV cache keeps what was
 * evaluated before; positions past n_past are overwritten). Writes n_vocab logits of the last
 * token, or of every token when all_logits != 0 (n_tokens * n_vocab floats); logits = NULL
 * (with all_logits = 0) only fills the KV cache, skipping the output head.
 * Returns 0, or -1 with a message in err (token id out of range, context full, ...). */
int32_t ps_model_eval(ps_model *m, const int32_t *tokens, int32_t n_tokens, int32_t n_past,
                      float *logits, int32_t all_logits, char *err, int32_t err_len);

/* Selects the FFN mode for decoding (PS_SPARSE_*). Returns 0, or -1 with a message when the
 * model lacks what the mode needs (predictor tensors). */
int32_t ps_model_set_sparse_mode(ps_model *m, int32_t mode, char *err, int32_t err_len);
int32_t ps_model_sparse_mode(const ps_model *m);
/* Predictor decision threshold of one layer (or every layer when layer < 0): a neuron is
 * predicted active when its predictor logit >= threshold. */
void ps_model_set_predictor_threshold(ps_model *m, int32_t layer, float threshold);
float ps_model_predictor_threshold(const ps_model *m, int32_t layer);
int32_t ps_model_has_predictor(const ps_model *m);

/* Selects PS_ACTIVATIONS_* (default Q8). Returns 0, or -1 with a message for an unknown mode. */
int32_t ps_model_set_activations(ps_model *m, int32_t mode, char *err, int32_t err_len);
int32_t ps_model_activations(const ps_model *m);
/* The type the KV cache stores keys and values in: PS_TYPE_F32 (default) or PS_TYPE_F16 (half
 * the memory, and half the bytes a token reads from it; keys and values rounded to f16, as
 * llama.cpp stores them). Reallocates the cache, emptied: call it before evaluating. Returns 0,
 * or -1 with a message (another type; out of memory, the old cache kept). */
int32_t ps_model_set_kv_type(ps_model *m, int32_t type, char *err, int32_t err_len);
int32_t ps_model_kv_type(const ps_model *m);
/* 1 if Q8 mode changes something: some matrix the model multiplies by has an integer kernel
 * (Q8_0, Q4_0, Q4_1), or is BF16 and the CPU has AVX512-BF16 (activations rounded to bf16) */
int32_t ps_model_q8_mode_applies(const ps_model *m);

/* Statistics: while on, every evaluated token counts into per-layer ps_layer_stats; in
 * predictor mode the exact gate is computed as well, to measure recall (slower). */
void ps_model_set_stats(ps_model *m, int32_t enabled);
void ps_model_reset_stats(ps_model *m);
/* copies n_layer entries into out */
void ps_model_get_stats(const ps_model *m, ps_layer_stats *out);
/* For each of one layer's n_ff neurons, the number of tokens measured in which its activated
 * gate was non-zero (exactly: predictor mode measures the true gate). Copies n_ff counts into
 * out; returns 0, or -1 for a layer out of range. */
int32_t ps_model_get_neuron_counts(const ps_model *m, int32_t layer, int64_t *out);

int32_t ps_model_n_ctx(const ps_model *m);
int32_t ps_model_n_threads(const ps_model *m);

/* Memory-read bandwidth (native/membw.c; prosparse-bench reports decode as a share of it).
 * ps_read_bandwidth: n_threads threads each sum a slice of buf with the widest SIMD loads;
 * returns bytes/second of the best of `repeats` timed passes (after one untimed pass), or -1
 * on a bad argument or a thread that cannot start. buf should be far larger than the caches.
 * ps_read_sum: the wrapping sum of buf's 64-bit little-endian words (a zero-padded tail), by
 * the loop of one instruction set (PS_ISA_*, -1 = best); 0 if that isa is unavailable. The
 * same in every isa: tests use it to check that the timed loops read every byte. */
#include <stddef.h>
double   ps_read_bandwidth(const void *buf, size_t bytes, int32_t n_threads, int32_t repeats);
uint64_t ps_read_sum(const void *buf, size_t bytes, int32_t isa);

#endif
