"""Writing GGUF files from float weights in HF layout, one tensor at a time.

A conversion is a list of ``PlannedTensor`` (GGUF name, shape, stored type, how to load it) and
a metadata dict. ``write_gguf`` writes the header from the plan, then loads, transforms,
quantises and writes each tensor in turn, so memory holds one tensor, not the model. Output goes
to a temporary file beside the target that is renamed at the end: an error or Ctrl-C never
leaves a half-written model. Names come from ``prosparse.constants``; quantisation from the
``gguf`` package (ggml's reference quantisers).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

from prosparse import constants as K
from prosparse.gguf_file import drop_cached_pages

from .checkpoint import (EMBED, LM_HEAD, NORM, DictTensors, Hyperparams, TensorSource, check_tensors,
                         hyperparams, layer_tensor)
from .errors import OutputExistsError

log = logging.getLogger("prosparse.convert")

# --outtype name → ggml type
OUTTYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
}
# general.file_type for each --outtype (llama.cpp's llama_ftype)
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
}
LAYOUT_DENSE = "dense"      # blk.N.ffn_down.weight, as llama.cpp
LAYOUT_SPARSE = "sparse"    # blk.N.ffn_down_t.weight: one contiguous n_embd vector per neuron
LAYOUTS = (LAYOUT_DENSE, LAYOUT_SPARSE)

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


def stored_type(shape: tuple[int, ...], ttype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a tensor of this (numpy) shape is stored in: 1-D tensors and rows that do not fill
    whole quantisation blocks stay F32."""
    block = quants.GGML_QUANT_SIZES[ttype][0]
    return GGMLQuantizationType.F32 if len(shape) == 1 or shape[-1] % block else ttype


def encode(w: np.ndarray, ttype: GGMLQuantizationType) -> np.ndarray:
    """float32 ``w`` as the bytes (or float array) of ``ttype``."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if ttype == GGMLQuantizationType.F32:
        return w
    if ttype == GGMLQuantizationType.F16:
        return w.astype(np.float16)
    return quants.quantize(w, ttype)


def encode_tensor(w: np.ndarray, ttype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """w (float) in the given type; 1-D tensors and rows that don't fit a block stay F32."""
    w = np.asarray(w, dtype=np.float32)
    actual = stored_type(w.shape, ttype)
    return encode(w, actual), actual


@dataclasses.dataclass
class PlannedTensor:
    """One tensor of the output: its GGUF name, numpy shape (rows, row length), stored type, and
    a function giving its float32 data in that shape."""
    name: str
    shape: tuple[int, ...]
    ttype: GGMLQuantizationType
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, type_size = quants.GGML_QUANT_SIZES[self.ttype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * type_size


def plan(name: str, shape: tuple[int, ...], outtype: str, load: Callable[[], np.ndarray]) -> PlannedTensor:
    return PlannedTensor(name, tuple(shape), stored_type(tuple(shape), OUTTYPES[outtype]), load)


# ---------------------------------------------------------------------------------------------
# The model: metadata and tensors
# ---------------------------------------------------------------------------------------------

def model_metadata(hp: Hyperparams, outtype: str, name: str = "model") -> dict[str, Any]:
    """general.*, the architecture's hyper-parameters and prosparse's activation keys."""
    arch = hp.arch
    meta: dict[str, Any] = {
        K.KEY_NAME: name,
        K.KEY_FILE_TYPE: int(FILE_TYPES[outtype]),
        K.arch_key(arch, K.CONTEXT_LENGTH): hp.context_length,
        K.arch_key(arch, K.EMBEDDING_LENGTH): hp.n_embd,
        K.arch_key(arch, K.BLOCK_COUNT): hp.n_layer,
        K.arch_key(arch, K.FEED_FORWARD_LENGTH): hp.n_ff,
        K.arch_key(arch, K.HEAD_COUNT): hp.n_head,
        K.arch_key(arch, K.HEAD_COUNT_KV): hp.n_head_kv,
        K.arch_key(arch, K.KEY_LENGTH): hp.head_dim,
        K.arch_key(arch, K.ROPE_DIMENSION_COUNT): hp.head_dim,
        K.arch_key(arch, K.RMS_EPS): float(hp.rms_eps),
        K.arch_key(arch, K.ROPE_FREQ_BASE): float(hp.rope_base),
        K.arch_key(arch, K.VOCAB_SIZE): hp.n_vocab,
    }
    if arch == K.ARCH_MINICPM:
        meta[K.arch_key(arch, K.EMBEDDING_SCALE)] = float(hp.embedding_scale)
        meta[K.arch_key(arch, K.RESIDUAL_SCALE)] = float(hp.residual_scale)
        meta[K.arch_key(arch, K.LOGIT_SCALE)] = float(hp.logit_scale)
    meta[K.KEY_ACTIVATION] = hp.activation
    if hp.activation == K.ACT_FATRELU:
        meta[K.KEY_ACTIVATION_THRESHOLD] = float(hp.threshold or 0.0)
    return meta


def model_tensors(hp: Hyperparams, source: TensorSource, outtype: str, layout: str,
                  where: str = "checkpoint") -> list[PlannedTensor]:
    """The model's tensors in file order, checked against ``hp`` first (names and shapes, before
    anything is written). Q/K rows are permuted for GGUF's RoPE; with the sparse layout the down
    projection is stored transposed as ffn_down_t."""
    check_tensors(hp, source, where)
    shapes = {name: tuple(source.shape(name)) for name in source.names()}

    def load(hf_name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        def run() -> np.ndarray:
            w = source.load(hf_name)
            return transform(w) if transform else w
        return run

    out = [plan(K.TOKEN_EMBD, shapes[EMBED], outtype, load(EMBED))]
    for i in range(hp.n_layer):
        for hf_part, gguf_part in HF_LAYER_NAMES.items():
            hf_name, shape, transform = layer_tensor(i, hf_part), shapes[layer_tensor(i, hf_part)], None
            if gguf_part == K.ATTN_Q:
                transform = lambda w: permute_for_rope(w, hp.n_head)        # noqa: E731
            elif gguf_part == K.ATTN_K:
                transform = lambda w: permute_for_rope(w, hp.n_head_kv)     # noqa: E731
            elif gguf_part == K.FFN_DOWN and layout == LAYOUT_SPARSE:
                gguf_part, shape, transform = K.FFN_DOWN_T, shape[::-1], np.transpose
            out.append(plan(K.block_tensor(i, gguf_part), shape, outtype, load(hf_name, transform)))
    out.append(plan(K.OUTPUT_NORM, shapes[NORM], outtype, load(NORM)))
    if not hp.tied_embeddings:
        out.append(plan(K.OUTPUT, shapes[LM_HEAD], outtype, load(LM_HEAD)))
    return out


def fell_back_to_f32(tensors: list[PlannedTensor], outtype: str) -> list[PlannedTensor]:
    """Matrices that stay F32 because their rows do not fill whole blocks of ``outtype``."""
    wanted = OUTTYPES[outtype]
    return [t for t in tensors if len(t.shape) > 1 and t.ttype != wanted]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def check_output(path: Path, force: bool) -> None:
    """Refuses a directory, a missing parent directory, or an existing file without force."""
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a directory; give the output file's path")
    if not path.parent.is_dir():
        raise OutputExistsError(f"{path.parent}: the output directory does not exist")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; pass --force to overwrite it")


def write_gguf(path: str | os.PathLike, arch: str, metadata: Mapping[str, Any], tensors: list[PlannedTensor],
               magic: bytes = K.GGUF_MAGIC, force: bool = False, progress: bool = False) -> Path:
    """Writes the file: header and metadata, then each tensor loaded, encoded and written in
    turn. ``magic`` replaces GGUF's (PowerInfer's ``PWRI``) before the file gets its name."""
    path = Path(path)
    check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    writer = None
    try:
        writer = GGUFWriter(tmp, arch)
        for key, value in metadata.items():
            _add_value(writer, key, value)
        if any(t.ttype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) for t in tensors):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _progress_bar(sum(t.nbytes for t in tensors), progress) as bar:
            for t in tensors:
                bar.set_postfix_str(t.name, refresh=False)
                writer.write_tensor_data(encode(t.load(), t.ttype))
                bar.update(t.nbytes)
        writer.close()
        with open(tmp, "r+b") as f:
            if magic != K.GGUF_MAGIC:
                f.write(magic)
            f.flush()
            os.fsync(f.fileno())
            drop_cached_pages(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _progress_bar(total_bytes: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing", file=sys.stderr, dynamic_ncols=True)


class _NoProgress:
    """tqdm's interface, doing nothing (no tqdm needed when nobody watches)."""

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
                     tokenizer_metadata: Mapping[str, Any] | None = None, name: str = "model",
                     layout: str = LAYOUT_DENSE) -> Path:
    """Writes a GGUF from an HF LlamaForCausalLM (or MiniCPM) ``config`` (dict) and ``state_dict``
    (name → tensor/array), overwriting ``path``. The gate activation and FATReLU threshold given
    here go into prosparse's keys (config.json's own are ignored); ``tokenizer_metadata``
    (tokenizer.* keys, e.g. from another GGUF) is copied."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if activation not in K.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(K.ACTIVATIONS)}")
    config = {k: v for k, v in config.items() if k not in ("hidden_act", "hidden_act_param")}
    hp = dataclasses.replace(hyperparams(config), activation=activation,
                             threshold=threshold if activation == K.ACT_FATRELU else None)
    meta = model_metadata(hp, outtype, name)
    if activation == K.ACT_FATRELU and threshold is None:
        del meta[K.KEY_ACTIVATION_THRESHOLD]
    meta.update(tokenizer_metadata or {})
    tensors = model_tensors(hp, DictTensors(state_dict), outtype, layout, where="state dict")
    return write_gguf(path, hp.arch, meta, tensors, force=True)
