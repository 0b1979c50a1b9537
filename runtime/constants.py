"""The GGUF layout of prosparse models: every key and tensor name, declared once.

Writer (``prosparse.convert``), reader (``prosparse.gguf_model``) and tests import these; a key
is never spelled twice as a string literal elsewhere.

Layout (see README, "The sparse GGUF layout"):
- standard GGUF v3 (magic ``GGUF``); PowerInfer's ``PWRI`` magic is read too;
- architecture ``llama`` or ``minicpm`` with llama.cpp's standard keys and tensor names;
- our own keys under ``prosparse.``: the gate activation and its threshold, the predictor.
"""

from __future__ import annotations

GGUF_MAGIC = b"GGUF"
POWERINFER_MAGIC = b"PWRI"

# --- architectures -----------------------------------------------------------------------
ARCH_LLAMA = "llama"
ARCH_MINICPM = "minicpm"
ARCHITECTURES = (ARCH_LLAMA, ARCH_MINICPM)

# --- general and per-architecture hyper-parameter keys (llama.cpp's names) ----------------
KEY_ARCHITECTURE = "general.architecture"
KEY_NAME = "general.name"
KEY_ALIGNMENT = "general.alignment"
KEY_FILE_TYPE = "general.file_type"


def arch_key(arch: str, name: str) -> str:
    """``{arch}.{name}``, e.g. ``llama.block_count``."""
    return f"{arch}.{name}"


# suffixes combined with the architecture by arch_key()
CONTEXT_LENGTH = "context_length"
EMBEDDING_LENGTH = "embedding_length"
BLOCK_COUNT = "block_count"
FEED_FORWARD_LENGTH = "feed_forward_length"
HEAD_COUNT = "attention.head_count"
HEAD_COUNT_KV = "attention.head_count_kv"
KEY_LENGTH = "attention.key_length"
RMS_EPS = "attention.layer_norm_rms_epsilon"
ROPE_DIMENSION_COUNT = "rope.dimension_count"
ROPE_FREQ_BASE = "rope.freq_base"
VOCAB_SIZE = "vocab_size"
# MiniCPM (llama.cpp's minicpm keys)
EMBEDDING_SCALE = "embedding_scale"
RESIDUAL_SCALE = "residual_scale"
LOGIT_SCALE = "logit_scale"

# --- prosparse's own keys ---------------------------------------------------------------
# Gate activation of the FFN: one of ACTIVATIONS. Absent = "silu" (any plain llama GGUF).
KEY_ACTIVATION = "prosparse.activation"
# FATReLU threshold t: the gate value x is kept when x >= t (f32). Only with "fatrelu".
KEY_ACTIVATION_THRESHOLD = "prosparse.activation_threshold"
# Predictor: rank of fc1 (u32) and the logit at or above which a neuron is predicted active
# (f32, default 0). Per-layer thresholds, when they differ, go in an f32 array.
KEY_PREDICTOR_RANK = "prosparse.predictor_rank"
KEY_PREDICTOR_THRESHOLD = "prosparse.predictor_threshold"
KEY_PREDICTOR_LAYER_THRESHOLDS = "prosparse.predictor_layer_thresholds"
# What the predictor reads: PREDICTOR_INPUTS[0] "residual" (the residual stream before ffn_norm,
# PowerInfer's choice and the default) or "normed" (the normalised FFN input).
KEY_PREDICTOR_INPUT = "prosparse.predictor_input"
PREDICTOR_INPUT_RESIDUAL = "residual"
PREDICTOR_INPUT_NORMED = "normed"
PREDICTOR_INPUTS = (PREDICTOR_INPUT_RESIDUAL, PREDICTOR_INPUT_NORMED)
# PowerInfer's key: its predictors' decision threshold (a neuron is predicted active when its
# predictor logit >= this; f32, optional, default 0). PowerInfer files carry no FATReLU threshold.
KEY_POWERINFER_SPARSE_THRESHOLD = "powerinfer.sparse_threshold"
# Set by prosparse-reorder: each layer's FFN neurons sorted by descending activation frequency
# ("activation_frequency"), and the calibration tokens counted (u64). Informational.
KEY_NEURON_ORDER = "prosparse.neuron_order"
KEY_NEURON_ORDER_TOKENS = "prosparse.neuron_order_tokens"
NEURON_ORDER_FREQUENCY = "activation_frequency"

ACT_SILU = "silu"
ACT_RELU = "relu"
ACT_FATRELU = "fatrelu"
ACTIVATIONS = (ACT_SILU, ACT_RELU, ACT_FATRELU)

# --- tokenizer keys (llama.cpp's names) --------------------------------------------------
KEY_TOKENIZER_MODEL = "tokenizer.ggml.model"
KEY_TOKENIZER_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS_ID = "tokenizer.ggml.bos_token_id"
KEY_EOS_ID = "tokenizer.ggml.eos_token_id"
KEY_EOT_ID = "tokenizer.ggml.eot_token_id"
KEY_EOM_ID = "tokenizer.ggml.eom_token_id"
KEY_UNK_ID = "tokenizer.ggml.unknown_token_id"
KEY_PAD_ID = "tokenizer.ggml.padding_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# --- tensor names --------------------------------------------------------------------------
TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"


def block_tensor(layer: int, name: str) -> str:
    """``blk.{layer}.{name}.weight``."""
    return f"blk.{layer}.{name}.weight"


ATTN_NORM = "attn_norm"
ATTN_Q = "attn_q"
ATTN_K = "attn_k"
ATTN_V = "attn_v"
ATTN_OUT = "attn_output"
FFN_NORM = "ffn_norm"
FFN_GATE = "ffn_gate"
FFN_UP = "ffn_up"
FFN_DOWN = "ffn_down"
# the down projection transposed: one contiguous n_embd vector per neuron (PowerInfer's name)
FFN_DOWN_T = "ffn_down_t"
# predictor: fc1 (rank rows of n_embd), ReLU, fc2 (n_ff rows of rank) (PowerInfer's names)
PREDICTOR_FC1 = "fc1"
PREDICTOR_FC2 = "fc2"
