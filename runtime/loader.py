"""From a GGUF file to what the C model needs: hyper-parameters and tensor slots.

Everything a file could get wrong is checked here, with the file and key or tensor named:
the architecture, missing or ill-typed keys, missing tensors, unsupported tensor types and
shapes that do not fit the hyper-parameters. The C side checks shapes once more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import constants as K
from .gguf_file import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFError, GGUFFile, TensorInfo

# Tensor types the kernels implement (ggml ids).
SUPPORTED_TYPES = (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
)

# C enum values (native/prosparse.h)
ARCH_IDS = {K.ARCH_LLAMA: 0, K.ARCH_MINICPM: 1}
ACTIVATION_IDS = {K.ACT_SILU: 0, K.ACT_RELU: 1, K.ACT_FATRELU: 2}
PREDICTOR_INPUT_IDS = {K.PREDICTOR_INPUT_RESIDUAL: 0, K.PREDICTOR_INPUT_NORMED: 1}
SPARSE_MODES = {"dense": 0, "exact": 1, "predictor": 2}

# per-layer slots of ps_layer_weights and the GGUF tensor name of each
LAYER_SLOTS = {
    "attn_norm": K.ATTN_NORM, "wq": K.ATTN_Q, "wk": K.ATTN_K, "wv": K.ATTN_V, "wo": K.ATTN_OUT,
    "ffn_norm": K.FFN_NORM, "ffn_gate": K.FFN_GATE, "ffn_up": K.FFN_UP,
    "ffn_down": K.FFN_DOWN, "ffn_down_t": K.FFN_DOWN_T,
    "fc1": K.PREDICTOR_FC1, "fc2": K.PREDICTOR_FC2,
}


@dataclass
class ModelSpec:
    """Hyper-parameters (ps_config fields) and, per slot, the tensor that fills it."""
    arch: str
    config: dict[str, Any]
    context_length: int
    globals: dict[str, TensorInfo | None]             # tok_embd, output_norm, output
    layers: list[dict[str, TensorInfo | None]] = field(default_factory=list)
    predictor_thresholds: list[float] = field(default_factory=list)   # per layer
    powerinfer: bool = False                                           # PWRI file

    @property
    def has_predictor(self) -> bool:
        return all(l["fc1"] is not None for l in self.layers)

    @property
    def has_down_t(self) -> bool:
        return all(l["ffn_down_t"] is not None for l in self.layers)

    @property
    def best_sparse_mode(self) -> str:
        """predictor when the file has predictors, exact for ReLU/FATReLU, else dense; dense too
        where a sparse mode would need ffn_down transposed and it cannot be (untransposable)."""
        if self.activation == K.ACT_SILU or self.untransposable_down() is not None:
            return "dense"
        return "predictor" if self.has_predictor else "exact"

    def untransposable_down(self) -> TensorInfo | None:
        """The first plain ffn_down that a sparse mode would have to transpose and could not
        (transposable_down), or None."""
        for layer in self.layers:
            t = layer["ffn_down"]
            if layer["ffn_down_t"] is None and t is not None and not transposable_down(t):
                return t
        return None

    @property
    def activation(self) -> str:
        return next(k for k, v in ACTIVATION_IDS.items() if v == self.config["activation"])

    @property
    def n_params(self) -> int:
        tensors = [t for t in self.globals.values() if t] + [t for l in self.layers for t in l.values() if t]
        return sum(math.prod(t.shape) for t in tensors)


def _get(gf: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False):
    if key not in gf.metadata:
        if required:
            raise GGUFError(f"{gf.path}: metadata key {key!r} is missing")
        return default
    value = gf.metadata[key]
    if isinstance(value, bool) and kind is not bool:
        raise GGUFError(f"{gf.path}: metadata key {key!r} is a bool, expected {kind}")
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise GGUFError(f"{gf.path}: metadata key {key!r} = {value!r} has the wrong type "
                        f"(expected {getattr(kind, '__name__', kind)})")
    return value


def _positive(gf: GGUFFile, key: str, value: int) -> int:
    if value <= 0:
        raise GGUFError(f"{gf.path}: metadata key {key!r} = {value} must be positive")
    return value


def read_spec(gf: GGUFFile) -> ModelSpec:
    arch = _get(gf, K.KEY_ARCHITECTURE, str, required=True)
    if arch not in K.ARCHITECTURES:
        raise GGUFError(f"{gf.path}: architecture {arch!r} ({K.KEY_ARCHITECTURE}) is not supported; "
                        f"supported: {', '.join(K.ARCHITECTURES)}")

    def hp(name: str, kind=int, default=None, required=False):
        return _get(gf, K.arch_key(arch, name), kind, default, required)

    n_embd = _positive(gf, K.arch_key(arch, K.EMBEDDING_LENGTH), hp(K.EMBEDDING_LENGTH, required=True))
    n_layer = _positive(gf, K.arch_key(arch, K.BLOCK_COUNT), hp(K.BLOCK_COUNT, required=True))
    n_ff = _positive(gf, K.arch_key(arch, K.FEED_FORWARD_LENGTH), hp(K.FEED_FORWARD_LENGTH, required=True))
    n_head = _positive(gf, K.arch_key(arch, K.HEAD_COUNT), hp(K.HEAD_COUNT, required=True))
    n_head_kv = _positive(gf, K.arch_key(arch, K.HEAD_COUNT_KV), hp(K.HEAD_COUNT_KV, default=n_head))
    if n_head % n_head_kv:
        raise GGUFError(f"{gf.path}: {K.arch_key(arch, K.HEAD_COUNT)} = {n_head} is not a multiple of "
                        f"{K.arch_key(arch, K.HEAD_COUNT_KV)} = {n_head_kv}")
    if hp(K.KEY_LENGTH) is None and n_embd % n_head:
        raise GGUFError(f"{gf.path}: embedding length {n_embd} is not divisible by the head count {n_head}")
    head_dim = _positive(gf, K.arch_key(arch, K.KEY_LENGTH), hp(K.KEY_LENGTH, default=n_embd // n_head))
    n_rot = hp(K.ROPE_DIMENSION_COUNT, default=head_dim)
    if not (0 < n_rot <= head_dim and n_rot % 2 == 0):
        raise GGUFError(f"{gf.path}: {K.arch_key(arch, K.ROPE_DIMENSION_COUNT)} = {n_rot} must be even "
                        f"and at most the head size {head_dim}")

    powerinfer = gf.magic == K.POWERINFER_MAGIC
    # PowerInfer's files are ReLU models and say nothing of the activation
    activation = _get(gf, K.KEY_ACTIVATION, str, default=K.ACT_RELU if powerinfer else K.ACT_SILU)
    if activation not in ACTIVATION_IDS:
        raise GGUFError(f"{gf.path}: {K.KEY_ACTIVATION} = {activation!r} is not one of "
                        f"{', '.join(K.ACTIVATIONS)}")
    threshold = _get(gf, K.KEY_ACTIVATION_THRESHOLD, float, default=0.0)
    predictor_input = _get(gf, K.KEY_PREDICTOR_INPUT, str, default=K.PREDICTOR_INPUT_RESIDUAL)
    if predictor_input not in PREDICTOR_INPUT_IDS:
        raise GGUFError(f"{gf.path}: {K.KEY_PREDICTOR_INPUT} = {predictor_input!r} is not one of "
                        f"{', '.join(K.PREDICTOR_INPUTS)}")

    scales = {"embd_scale": 1.0, "residual_scale": 1.0, "logit_scale": 1.0}
    if arch == K.ARCH_MINICPM:
        scales = {
            "embd_scale": hp(K.EMBEDDING_SCALE, float, required=True),
            "residual_scale": hp(K.RESIDUAL_SCALE, float, required=True),
            "logit_scale": 1.0 / hp(K.LOGIT_SCALE, float, required=True),
        }

    globals_ = {
        "tok_embd": _tensor(gf, K.TOKEN_EMBD, required=True),
        "output_norm": _tensor(gf, K.OUTPUT_NORM, required=True),
        "output": _tensor(gf, K.OUTPUT, required=False),
    }
    n_vocab = globals_["tok_embd"].n_rows
    last = K.block_tensor(n_layer - 1, K.ATTN_NORM)
    if last not in gf.tensors:   # checked before anything loops over the layers: a corrupt count can be 2^32
        raise GGUFError(f"{gf.path}: tensor {last!r} is missing ({K.arch_key(arch, K.BLOCK_COUNT)} = {n_layer}; "
                        f"the file has {len(gf.tensors)} tensors)")
    config = dict(
        arch=ARCH_IDS[arch], n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff, n_rot=n_rot,
        rms_eps=hp(K.RMS_EPS, float, default=1e-5), rope_base=hp(K.ROPE_FREQ_BASE, float, default=10000.0),
        activation=ACTIVATION_IDS[activation], act_threshold=threshold, **scales,
        predictor_input=PREDICTOR_INPUT_IDS[predictor_input],
    )
    spec = ModelSpec(arch=arch, config=config, globals=globals_, powerinfer=powerinfer,
                     context_length=hp(K.CONTEXT_LENGTH, default=4096),
                     predictor_thresholds=_predictor_thresholds(gf, n_layer, powerinfer))
    for layer in range(n_layer):
        slots = {slot: _tensor(gf, K.block_tensor(layer, name), required=False) for slot, name in LAYER_SLOTS.items()}
        spec.layers.append(slots)
    _check_shapes(gf, spec)
    return spec


def _predictor_thresholds(gf: GGUFFile, n_layer: int, powerinfer: bool) -> list[float]:
    """Per-layer thresholds when the file has them (prosparse writes them into PowerInfer-format
    files too); else the one threshold, PowerInfer's key in PWRI files."""
    per_layer = gf.metadata.get(K.KEY_PREDICTOR_LAYER_THRESHOLDS)
    if per_layer is not None:
        values = np.asarray(per_layer, dtype=np.float64).ravel() if not isinstance(per_layer, str) else None
        if values is None or len(values) != n_layer:
            raise GGUFError(f"{gf.path}: {K.KEY_PREDICTOR_LAYER_THRESHOLDS} must hold one number per layer "
                            f"({n_layer})")
        return [float(v) for v in values]
    key = K.KEY_POWERINFER_SPARSE_THRESHOLD if powerinfer else K.KEY_PREDICTOR_THRESHOLD
    return [_get(gf, key, float, default=0.0)] * n_layer


def transposable_down(t: TensorInfo) -> bool:
    """Whether ffn_down (n_embd rows of n_ff) can become ffn_down_t (n_ff rows of n_embd) in its
    type: always for float types; a quantised one only where its n_embd outputs fill whole blocks."""
    return len(t.shape) == 2 and t.shape[1] % GGML_QUANT_SIZES[t.type][0] == 0


def transpose_down(gf: GGUFFile, t: TensorInfo) -> np.ndarray:
    """ffn_down (n_embd rows of n_ff) as ffn_down_t (n_ff rows of n_embd), in the same type.
    Exact for float types; quantised types are re-quantised along the new rows (one more
    rounding: converting with prosparse-convert, which transposes before quantising, is better)."""
    n_ff, n_embd = t.shape
    data = gf.tensor_data(t.name).reshape(n_embd, -1)
    if t.type == GGMLQuantizationType.F32:
        return np.ascontiguousarray(data.view(np.float32).T)
    if t.type == GGMLQuantizationType.F16:
        return np.ascontiguousarray(data.view(np.float16).T)
    if t.type == GGMLQuantizationType.BF16:
        return np.ascontiguousarray(data.view(np.uint16).T)
    from gguf import quants   # ggml's reference (de)quantisers; only this rare path needs gguf-py
    w = quants.dequantize(data, t.type).reshape(n_embd, n_ff)
    return quants.quantize(np.ascontiguousarray(w.T), t.type)


def _tensor(gf: GGUFFile, name: str, required: bool) -> TensorInfo | None:
    t = gf.tensors.get(name)
    if t is None:
        if required:
            raise GGUFError(f"{gf.path}: tensor {name!r} is missing")
        return None
    if t.type not in SUPPORTED_TYPES:
        raise GGUFError(f"{gf.path}: tensor {name!r} has type {t.type.name}, which prosparse does not "
                        f"support (supported: {', '.join(x.name for x in SUPPORTED_TYPES)}); "
                        f"re-convert or re-quantise the model")
    return t


def _check_shapes(gf: GGUFFile, spec: ModelSpec) -> None:
    c = spec.config
    dim, ff, q_dim, kv_dim = c["n_embd"], c["n_ff"], c["n_head"] * c["head_dim"], c["n_head_kv"] * c["head_dim"]

    def expect(t: TensorInfo | None, shape: tuple[int, ...], name: str, required: bool = True):
        if t is None:
            if required:
                raise GGUFError(f"{gf.path}: tensor {name!r} is missing")
            return
        if tuple(t.shape) != shape:
            raise GGUFError(f"{gf.path}: tensor {t.name!r} has shape {list(t.shape)}, expected {list(shape)} "
                            f"from the metadata")

    expect(spec.globals["tok_embd"], (dim, c["n_vocab"]), K.TOKEN_EMBD)
    expect(spec.globals["output_norm"], (dim,), K.OUTPUT_NORM)
    expect(spec.globals["output"], (dim, c["n_vocab"]), K.OUTPUT, required=False)
    for i, l in enumerate(spec.layers):
        name = lambda slot: K.block_tensor(i, LAYER_SLOTS[slot])  # noqa: E731
        expect(l["attn_norm"], (dim,), name("attn_norm"))
        expect(l["wq"], (dim, q_dim), name("wq"))
        expect(l["wk"], (dim, kv_dim), name("wk"))
        expect(l["wv"], (dim, kv_dim), name("wv"))
        expect(l["wo"], (q_dim, dim), name("wo"))
        expect(l["ffn_norm"], (dim,), name("ffn_norm"))
        expect(l["ffn_gate"], (dim, ff), name("ffn_gate"))
        expect(l["ffn_up"], (dim, ff), name("ffn_up"))
        if l["ffn_down"] is None and l["ffn_down_t"] is None:
            raise GGUFError(f"{gf.path}: layer {i} has neither {name('ffn_down')!r} nor {name('ffn_down_t')!r}")
        expect(l["ffn_down"], (ff, dim), name("ffn_down"), required=False)
        expect(l["ffn_down_t"], (dim, ff), name("ffn_down_t"), required=False)
        if (l["fc1"] is None) != (l["fc2"] is None):
            raise GGUFError(f"{gf.path}: layer {i} has only one of the predictor tensors "
                            f"{name('fc1')!r} and {name('fc2')!r}")
        if l["fc1"] is not None:
            rank = l["fc1"].n_rows
            expect(l["fc1"], (dim, rank), name("fc1"))
            expect(l["fc2"], (rank, ff), name("fc2"))
