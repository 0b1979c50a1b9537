"""Writing llama-architecture GGUF files from float weights in HF layout.

Names come from ``prosparse.constants``; quantisation from the ``gguf`` package (ggml's
reference quantisers). Output is written to a temporary file beside the target and renamed
at the end, so an error or Ctrl-C never leaves a half-written model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from prosparse import constants as K

# --outtype name → ggml type
OUTTYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
}

# HF parameter name (inside model.layers.N.) → GGUF tensor name (inside blk.N.)
HF_LAYER_NAMES = {
    "input_layernorm": K.ATTN_NORM,
    "self_attn.q_proj": K.ATTN_Q,
    "self_attn.k_proj": K.ATTN_K,
    "self_attn.v_proj": K.ATTN_V,
    "self_attn.o_proj": K.ATTN_OUT,
    "post_attention_layernorm": K.FFN_NORM,
    "mlp.gate_proj": K.FFN_GATE,
    "mlp.up_proj": K.FFN_UP,
    "mlp.down_proj": K.FFN_DOWN,
}


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows for rotate_half RoPE (pairs i, i + d/2); GGUF's llama uses adjacent
    pairs (2i, 2i + 1). llama.cpp's converter reorders the rows the same way."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: np.ndarray, ttype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """w (float) in the given type; 1-D tensors and rows that don't fit a block stay F32."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    block = quants.GGML_QUANT_SIZES[ttype][0]
    if w.ndim == 1 or w.shape[-1] % block:
        return w, GGMLQuantizationType.F32
    if ttype == GGMLQuantizationType.F32:
        return w, ttype
    if ttype == GGMLQuantizationType.F16:
        return w.astype(np.float16), ttype
    return quants.quantize(w, ttype), ttype


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    """Metadata with the GGUF value type llama.cpp uses for such a value."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata {key!r}: cannot store a {type(value).__name__}")


def write_llama_gguf(path: str | os.PathLike, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                     outtype: str = "f32", activation: str = K.ACT_SILU, threshold: float | None = None,
                     tokenizer_metadata: Mapping[str, Any] | None = None, name: str = "model") -> Path:
    """Writes a llama GGUF from an HF LlamaForCausalLM ``config`` (dict) and ``state_dict``
    (name → tensor/array). The gate activation and FATReLU threshold go into prosparse's
    keys; ``tokenizer_metadata`` (tokenizer.* keys, e.g. from another GGUF) is copied."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if activation not in K.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(K.ACTIVATIONS)}")
    ttype = OUTTYPES[outtype]
    arch = K.ARCH_LLAMA
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    n_embd = config["hidden_size"]
    head_dim = config.get("head_dim") or n_embd // n_head
    weights = {k: _to_numpy(v) for k, v in state_dict.items()}

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch)
        writer.add_string(K.KEY_NAME, name)
        hp = {
            K.CONTEXT_LENGTH: config.get("max_position_embeddings", 4096),
            K.EMBEDDING_LENGTH: n_embd,
            K.BLOCK_COUNT: config["num_hidden_layers"],
            K.FEED_FORWARD_LENGTH: config["intermediate_size"],
            K.HEAD_COUNT: n_head,
            K.HEAD_COUNT_KV: n_head_kv,
            K.KEY_LENGTH: head_dim,
            K.ROPE_DIMENSION_COUNT: head_dim,
            K.RMS_EPS: float(config.get("rms_norm_eps", 1e-6)),
            K.ROPE_FREQ_BASE: float(_rope_theta(config)),
            K.VOCAB_SIZE: config["vocab_size"],
        }
        for key, value in hp.items():
            _add_value(writer, K.arch_key(arch, key), value)
        writer.add_string(K.KEY_ACTIVATION, activation)
        if threshold is not None:
            writer.add_float32(K.KEY_ACTIVATION_THRESHOLD, float(threshold))
        for key, value in (tokenizer_metadata or {}).items():
            _add_value(writer, key, value)

        def add(gguf_name: str, w: np.ndarray) -> None:
            data, t = encode_tensor(w, ttype)
            writer.add_tensor(gguf_name, data, raw_dtype=t)

        add(K.TOKEN_EMBD, weights["model.embed_tokens.weight"])
        for i in range(config["num_hidden_layers"]):
            for hf_name, gguf_name in HF_LAYER_NAMES.items():
                w = weights[f"model.layers.{i}.{hf_name}.weight"]
                if gguf_name == K.ATTN_Q:
                    w = permute_for_rope(w, n_head)
                elif gguf_name == K.ATTN_K:
                    w = permute_for_rope(w, n_head_kv)
                add(K.block_tensor(i, gguf_name), w)
        add(K.OUTPUT_NORM, weights["model.norm.weight"])
        if "lm_head.weight" in weights and not config.get("tie_word_embeddings", False):
            add(K.OUTPUT, weights["lm_head.weight"])

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _rope_theta(config: Mapping[str, Any]) -> float:
    """transformers 5 keeps rope_theta inside rope_parameters; older configs at the top."""
    params = config.get("rope_parameters") or {}
    return params.get("rope_theta", config.get("rope_theta", 10000.0))


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    return t.detach().to(dtype=__import__("torch").float32).cpu().numpy()
