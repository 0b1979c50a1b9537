"""A Hugging Face checkpoint directory, read without running any of its code.

config.json is parsed as JSON into ``Hyperparams``; weights are opened lazily (safetensors through
``safe_open``, ``.bin`` through ``torch.load(weights_only=True, mmap=True)``, sharded or not) and
each tensor is read only when the writer asks for it, so a 7B model converts in about one tensor
of memory beyond what the output needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from prosparse import constants as K

from .errors import ConversionError, MissingFileError, TensorError, UnsupportedModelError, read_json_object

CONFIG_FILE = "config.json"

# config.json "architectures"[0] and "model_type" → GGUF architecture
HF_ARCHITECTURES = {
    "LlamaForCausalLM": K.ARCH_LLAMA,
    "SparseLlamaForCausalLM": K.ARCH_LLAMA,      # ProSparse's LLaMA-2 releases
    "MiniCPMForCausalLM": K.ARCH_MINICPM,        # MiniCPM and MiniCPM-S
}
HF_MODEL_TYPES = {"llama": K.ARCH_LLAMA, "sparsellama": K.ARCH_LLAMA, "minicpm": K.ARCH_MINICPM}
# tie_word_embeddings when config.json does not say: the default of each model's config class
TIED_BY_DEFAULT = {K.ARCH_LLAMA: False, K.ARCH_MINICPM: True}

# weight files, in the order they are looked for
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"

# tensors a checkpoint may hold that the model does not use
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Hyperparams:
    """What the GGUF needs to know about the model, from config.json."""
    arch: str                      # K.ARCH_LLAMA or K.ARCH_MINICPM
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_base: float
    activation: str                # K.ACT_SILU / ACT_RELU / ACT_FATRELU
    threshold: float | None        # FATReLU threshold (only with fatrelu)
    tied_embeddings: bool          # no lm_head: the head is the token embedding
    # MiniCPM (llama.cpp's meaning; all 1 for llama):
    embedding_scale: float = 1.0   # embeddings × scale_emb
    residual_scale: float = 1.0    # each residual branch × scale_depth / √n_layer
    logit_scale: float = 1.0       # hidden_size / dim_model_base; llama.cpp divides the logits by it

    @property
    def is_sparse_capable(self) -> bool:
        """ReLU-family gate: neurons that are zero can be skipped."""
        return self.activation != K.ACT_SILU

    def with_threshold(self, threshold: float) -> "Hyperparams":
        """The FATReLU threshold overridden (0: plain ReLU). Only for ReLU-family models."""
        if not self.is_sparse_capable:
            raise UnsupportedModelError(
                f"--threshold {threshold}: the model's gate activation is {self.activation}, which has no "
                f"threshold; only ReLU/FATReLU models (hidden_act relu or fatrelu) take one")
        if threshold < 0 or not math.isfinite(threshold):
            raise UnsupportedModelError(f"--threshold {threshold}: the FATReLU threshold must be >= 0")
        if threshold == 0:
            return dataclasses.replace(self, activation=K.ACT_RELU, threshold=None)
        return dataclasses.replace(self, activation=K.ACT_FATRELU, threshold=float(threshold))


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise MissingFileError(f"{model_dir}: not a directory; give a Hugging Face checkpoint directory")
    if not path.is_file():
        raise MissingFileError(f"{path}: missing; a Hugging Face checkpoint directory needs its config.json")
    return read_json_object(path, UnsupportedModelError)


def hyperparams(config: Mapping[str, Any], source: str = CONFIG_FILE) -> Hyperparams:
    """Hyperparams from a config.json dict (``source`` names it in errors)."""
    arch = _architecture(config, source)

    def need(key: str, kind=int):
        if key not in config or config[key] is None:
            raise UnsupportedModelError(f"{source}: {key!r} is missing")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            what = "an integer" if kind is int else "a number"
            raise UnsupportedModelError(f"{source}: {key!r} = {value!r} is not {what}")
        if value <= 0:
            raise UnsupportedModelError(f"{source}: {key!r} = {value!r} must be positive")
        return kind(value)

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    n_head_kv = need("num_key_value_heads") if config.get("num_key_value_heads") is not None else n_head
    head_dim = need("head_dim") if config.get("head_dim") is not None else n_embd // n_head
    if config.get("head_dim") is None and n_embd % n_head:
        raise UnsupportedModelError(f"{source}: hidden_size {n_embd} is not divisible by num_attention_heads {n_head}")
    if n_head % n_head_kv:
        raise UnsupportedModelError(f"{source}: num_attention_heads {n_head} is not a multiple of "
                                    f"num_key_value_heads {n_head_kv}")
    _check_rope_scaling(config, source)
    activation, threshold = gate_activation(config, source)
    tied = config.get("tie_word_embeddings")
    hp = Hyperparams(
        arch=arch, n_vocab=need("vocab_size"), n_embd=n_embd, n_layer=need("num_hidden_layers"),
        n_ff=need("intermediate_size"), n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        context_length=int(config.get("max_position_embeddings") or 4096),
        rms_eps=float(config.get("rms_norm_eps") or 1e-6), rope_base=float(rope_theta(config)),
        activation=activation, threshold=threshold,
        tied_embeddings=TIED_BY_DEFAULT[arch] if tied is None else bool(tied),
    )
    if arch == K.ARCH_MINICPM:
        hp = dataclasses.replace(
            hp, embedding_scale=need("scale_emb", float),
            residual_scale=need("scale_depth", float) / math.sqrt(hp.n_layer),
            logit_scale=hp.n_embd / need("dim_model_base", float))
    return hp


def _architecture(config: Mapping[str, Any], source: str) -> str:
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    supported = (f"supported: architectures {', '.join(HF_ARCHITECTURES)} "
                 f"(model_type {', '.join(HF_MODEL_TYPES)})")
    by_name = HF_ARCHITECTURES.get(names[0]) if names else None
    by_type = HF_MODEL_TYPES.get(model_type) if model_type is not None else None
    if names and by_name is None:
        raise UnsupportedModelError(f"{source}: architecture {names[0]!r} is not supported; {supported}")
    if model_type is not None and by_type is None:
        raise UnsupportedModelError(f"{source}: model_type {model_type!r} is not supported; {supported}")
    if by_name is None and by_type is None:
        raise UnsupportedModelError(f"{source}: neither 'architectures' nor 'model_type' is given; {supported}")
    if by_name and by_type and by_name != by_type:
        raise UnsupportedModelError(f"{source}: architecture {names[0]!r} and model_type {model_type!r} "
                                    f"disagree; fix config.json")
    return by_name or by_type


def gate_activation(config: Mapping[str, Any], source: str = CONFIG_FILE) -> tuple[str, float | None]:
    """(activation, FATReLU threshold). FATReLU with threshold ``hidden_act_param`` when
    ``hidden_act`` is "fatrelu" or a ReLU model carries ``hidden_act_param`` > 0 (what
    prosparse.training exports); otherwise ``hidden_act`` itself."""
    act = str(config.get("hidden_act") or K.ACT_SILU).lower()
    param = config.get("hidden_act_param")
    if param is not None and (isinstance(param, bool) or not isinstance(param, (int, float))
                              or param < 0 or not math.isfinite(param)):
        raise UnsupportedModelError(f"{source}: hidden_act_param = {param!r} must be a number >= 0")
    if act == "swish":
        act = K.ACT_SILU
    if act == K.ACT_FATRELU or (act == K.ACT_RELU and param):
        return (K.ACT_FATRELU, float(param)) if param else (K.ACT_RELU, None)
    if act == K.ACT_RELU:
        return K.ACT_RELU, None
    if act == K.ACT_SILU:
        if param:
            raise UnsupportedModelError(f"{source}: hidden_act silu with hidden_act_param {param}: a threshold "
                                        f"needs a ReLU-family activation (relu or fatrelu)")
        return K.ACT_SILU, None
    raise UnsupportedModelError(f"{source}: hidden_act {config.get('hidden_act')!r} is not supported; "
                                f"prosparse runs silu, relu and fatrelu gates")


def rope_theta(config: Mapping[str, Any]) -> float:
    """transformers 5 keeps rope_theta inside rope_parameters; older configs at the top."""
    params = config.get("rope_parameters") or {}
    return params.get("rope_theta", config.get("rope_theta") or 10000.0)


def _check_rope_scaling(config: Mapping[str, Any], source: str) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise UnsupportedModelError(f"{source}: {key} type {kind!r} is not supported; prosparse implements "
                                        f"plain RoPE (rope_theta only)")


# ---------------------------------------------------------------------------------------------
# Expected tensors
# ---------------------------------------------------------------------------------------------

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_tensor(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}.weight"


def expected_shapes(hp: Hyperparams) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold (HF name → torch shape), in file order."""
    q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes = {EMBED: (hp.n_vocab, hp.n_embd)}
    for i in range(hp.n_layer):
        shapes.update({
            layer_tensor(i, "input_layernorm"): (hp.n_embd,),
            layer_tensor(i, "self_attn.q_proj"): (q_dim, hp.n_embd),
            layer_tensor(i, "self_attn.k_proj"): (kv_dim, hp.n_embd),
            layer_tensor(i, "self_attn.v_proj"): (kv_dim, hp.n_embd),
            layer_tensor(i, "self_attn.o_proj"): (hp.n_embd, q_dim),
            layer_tensor(i, "post_attention_layernorm"): (hp.n_embd,),
            layer_tensor(i, "mlp.gate_proj"): (hp.n_ff, hp.n_embd),
            layer_tensor(i, "mlp.up_proj"): (hp.n_ff, hp.n_embd),
            layer_tensor(i, "mlp.down_proj"): (hp.n_embd, hp.n_ff),
        })
    shapes[NORM] = (hp.n_embd,)
    if not hp.tied_embeddings:
        shapes[LM_HEAD] = (hp.n_vocab, hp.n_embd)
    return shapes


def check_tensors(hp: Hyperparams, source: "TensorSource", where: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected (a bias the runtime
    would silently drop, say). Raises TensorError naming the tensor."""
    expected = expected_shapes(hp)
    names = set(source.names())
    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = (" config.json says tie_word_embeddings is false; if the head is tied, set it to true"
                if missing == [LM_HEAD] else "")
        raise TensorError(f"{where}: tensor {missing[0]!r} is missing{more}.{hint}")
    for name, shape in expected.items():
        actual = tuple(source.shape(name))
        if actual != shape:
            raise TensorError(f"{where}: tensor {name!r} has shape {list(actual)}, expected {list(shape)} "
                              f"from config.json")
    tolerated = {LM_HEAD} if hp.tied_embeddings else set()     # a saved copy of the tied head
    unexpected = sorted(n for n in names - expected.keys() - tolerated if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise TensorError(f"{where}: unexpected tensor {unexpected[0]!r}{more}; prosparse's {hp.arch} has no "
                          f"such weight (biases are not supported)")


# ---------------------------------------------------------------------------------------------
# Tensor sources
# ---------------------------------------------------------------------------------------------

class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def load(self, name: str) -> np.ndarray: ...          # float32


def to_float32(t: Any) -> np.ndarray:
    """A torch tensor or numpy array as float32 numpy (bf16 included)."""
    if isinstance(t, np.ndarray):
        return np.asarray(t, dtype=np.float32)
    import torch
    if not t.is_floating_point():
        raise TensorError(f"tensor of dtype {t.dtype} is not a floating-point weight")
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


class DictTensors:
    """An in-memory state dict (name → torch tensor or numpy array)."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self._tensors = state_dict

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def load(self, name: str) -> np.ndarray:
        return to_float32(self._tensors[name])


class CheckpointTensors:
    """The weights of a checkpoint directory: model.safetensors or pytorch_model.bin, or their
    sharded forms with an index json. Files are opened lazily (memory-mapped); ``close()``
    (or ``with``) releases them."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        files = self._weight_files()
        self.kind = "safetensors" if files[0].suffix == ".safetensors" else "bin"
        for path in files:
            for name in self._handle(path).keys():
                if name in self._file_of:
                    raise TensorError(f"{path}: tensor {name!r} is also in {self._file_of[name]}")
                self._file_of[name] = path

    def _weight_files(self) -> list[Path]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.dir / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise MissingFileError(f"{index}: not a weight index (no 'weight_map': {e})") from None
                files = [self.dir / f for f in dict.fromkeys(weight_map.values())]
                absent = [f for f in files if not f.is_file()]
                if absent:
                    raise MissingFileError(f"{absent[0]}: weight shard listed in {index.name} is missing")
                return files
        for single in (SAFETENSORS_FILE, BIN_FILE):
            if (self.dir / single).is_file():
                return [self.dir / single]
        for pattern in ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin"):
            if shards := sorted(self.dir.glob(pattern)):
                return shards
        raise MissingFileError(f"{self.dir}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_FILE}, "
                               f"{BIN_INDEX}, {BIN_FILE})")

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                try:
                    self._open[path] = safe_open(str(path), framework="pt", device="cpu")
                except Exception as e:                     # safetensors raises its own error types
                    raise MissingFileError(f"{path}: cannot read safetensors ({e})") from None
            else:
                self._open[path] = _load_bin(path)
        return self._open[path]

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self._file_of[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def load(self, name: str) -> np.ndarray:
        handle = self._handle(self._file_of[name])
        try:
            return to_float32(handle[name] if isinstance(handle, dict) else handle.get_tensor(name))
        except TensorError as e:
            raise TensorError(f"{self._file_of[name]}: {name!r}: {e}") from None

    def close(self) -> None:
        for handle in self._open.values():
            if hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)
        self._open.clear()

    def __enter__(self) -> "CheckpointTensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_torch_state_dict(path: Path, error: type[ConversionError]) -> dict:
    """A pytorch .bin/.pt state dict: weights only (no pickled code runs), memory-mapped when the
    file is in torch's zip format; ``error`` (naming the file) when it is not one."""
    import torch
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except Exception as e:                             # unpickling errors come in many types
        raise error(f"{path}: cannot read a weights-only state dict ({e})") from None
    if not isinstance(state, dict):
        raise error(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _load_bin(path: Path) -> dict:
    state = load_torch_state_dict(path, MissingFileError)
    return {k: v for k, v in state.items() if hasattr(v, "shape")}
