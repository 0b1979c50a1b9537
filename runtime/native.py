"""The C model behind cffi: builds ps_config / ps_tensor structs over the memory map."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ._native import ffi, lib
from .gguf_file import GGUFFile, TensorInfo
from .loader import LAYER_SLOTS, SPARSE_MODES, ModelSpec, transpose_down

ERR_LEN = 512

# How mat-muls read their input (prosparse.h, PS_ACTIVATIONS_*): float32, or quantised: a single
# token's to 8 bits for the weights whose type has an integer kernel (Q8_0, Q4_0, Q4_1); any
# input to bf16 for BF16 weights where the CPU has AVX512-BF16.
ACTIVATIONS = {"f32": lib.PS_ACTIVATIONS_F32, "q8": lib.PS_ACTIVATIONS_Q8}
KV_TYPES = {"f32": lib.PS_TYPE_F32, "f16": lib.PS_TYPE_F16}


def check_name(kind: str, name: str, names) -> None:
    """ValueError unless name is one of names (a setting's: ACTIVATIONS, KV_TYPES, their keys)."""
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(names)}")


def has_integer_kernel(type_id: int) -> bool:
    """The tensor type has int8 kernels (dot_q8, and gemm_q8 for prompt batches): 8-bit
    activations in q8 mode."""
    t = lib.ps_type_traits_for(int(type_id), -1)
    return t != ffi.NULL and t.dot_q8 != ffi.NULL


class NativeError(RuntimeError):
    """The C runtime refused an operation; the message says why."""


ISA_ENV = "PROSPARSE_ISA"


def check_isa_request() -> None:
    """$PROSPARSE_ISA, when set, must name an instruction set this build and CPU can run (the
    kernels then use it instead of the best one, see native/kernels.h); else NativeError."""
    want = os.environ.get(ISA_ENV)
    if not want:
        return
    name = lambda isa: ffi.string(lib.ps_kernels_isa_name(isa)).decode()   # noqa: E731
    if name(lib.ps_kernels_best_isa()) != want:
        usable = [name(i) for i in range(lib.PS_ISA_COUNT) if lib.ps_kernels_isa_available(i)]
        raise NativeError(f"{ISA_ENV}={want!r} is not an instruction set this build and CPU can run; "
                          f"use one of: {', '.join(usable)} (or unset it for the best)")


@dataclass
class LayerStats:
    """Activation counts of one layer over the tokens measured (see ps_layer_stats)."""
    n_tokens: int
    n_active: int
    n_predicted: int
    n_predicted_active: int
    n_computed: int
    n_ff: int
    predictor: bool               # measured in predictor mode: the predicted counts mean something

    @property
    def sparsity(self) -> float:
        """Fraction of neurons whose activated gate is exactly zero."""
        return 1.0 - self.n_active / (self.n_tokens * self.n_ff) if self.n_tokens else float("nan")

    @property
    def predicted_sparsity(self) -> float:
        """Fraction of neurons the predictor marked inactive."""
        return 1.0 - self.n_predicted / (self.n_tokens * self.n_ff) if self.n_tokens and self.predictor else float("nan")

    @property
    def recall(self) -> float:
        """Truly active neurons the predictor marked active ÷ truly active neurons."""
        return self.n_predicted_active / self.n_active if self.predictor and self.n_active else float("nan")

    @property
    def computed_fraction(self) -> float:
        """Fraction of neurons whose up row and down vector were read."""
        return self.n_computed / (self.n_tokens * self.n_ff) if self.n_tokens else float("nan")


class NativeModel:
    """Owns a ps_model. Keeps the GGUF mapping (and any tensors built at load) alive."""

    def __init__(self, gguf: GGUFFile, spec: ModelSpec, n_ctx: int, n_threads: int,
                 transpose_down_for_sparse: bool = False):
        check_isa_request()
        self._gguf = gguf
        self.spec = spec
        self.n_vocab = spec.config["n_vocab"]
        self._base = ffi.from_buffer("char[]", gguf.buffer)   # pointer to the mapped file
        self._owned: list[np.ndarray] = []                     # tensors made at load time
        cfg = ffi.new("ps_config *", spec.config)
        tok_embd = self._tensor(spec.globals["tok_embd"])
        output_norm = self._tensor(spec.globals["output_norm"])
        output = self._tensor(spec.globals["output"])
        layers = ffi.new("ps_layer_weights[]", len(spec.layers))
        for i, slots in enumerate(spec.layers):
            for slot in LAYER_SLOTS:
                setattr(layers[i], slot, self._tensor(slots[slot])[0])
            if transpose_down_for_sparse and slots["ffn_down_t"] is None:
                down = slots["ffn_down"]
                layers[i].ffn_down_t = self._owned_tensor(transpose_down(gguf, down), down, down.shape[::-1])[0]
                layers[i].ffn_down = self._tensor(None)[0]
        err = ffi.new("char[]", ERR_LEN)
        ptr = lib.ps_model_create(cfg, tok_embd, output_norm, output, layers, n_ctx, n_threads, err, ERR_LEN)
        if ptr == ffi.NULL:
            raise NativeError(f"{gguf.path}: {ffi.string(err).decode(errors='replace')}")
        self._ptr = ffi.gc(ptr, lib.ps_model_free)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        for layer, threshold in enumerate(spec.predictor_thresholds):
            lib.ps_model_set_predictor_threshold(self._ptr, layer, threshold)

    def _tensor(self, t: TensorInfo | None):
        if t is None:
            return ffi.new("ps_tensor *", {"data": ffi.NULL, "type": 0, "ne0": 0, "ne1": 0})
        return ffi.new("ps_tensor *", {"data": self._base + t.offset, "type": int(t.type),
                                       "ne0": t.ne0, "ne1": t.n_rows})

    def _owned_tensor(self, data: np.ndarray, like: TensorInfo, shape: tuple[int, int]):
        self._owned.append(data)
        return ffi.new("ps_tensor *", {"data": ffi.from_buffer(data), "type": int(like.type),
                                       "ne0": shape[0], "ne1": shape[1]})

    # --- evaluation ----------------------------------------------------------------------
    def eval(self, tokens, n_past: int, all_logits: bool = False, logits: bool = True) -> np.ndarray | None:
        """Logits (n_vocab,) of the last token, or (len(tokens), n_vocab) with all_logits;
        logits=False only fills the KV cache (no output head) and returns None."""
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(toks)
        out = np.empty((n if all_logits else 1, self.n_vocab), dtype=np.float32) if logits or all_logits else None
        err = ffi.new("char[]", ERR_LEN)
        rc = lib.ps_model_eval(self._ptr, ffi.from_buffer("int32_t[]", toks), n, n_past,
                               ffi.NULL if out is None else ffi.from_buffer("float[]", out), int(all_logits),
                               err, ERR_LEN)
        if rc != 0:
            raise NativeError(ffi.string(err).decode(errors="replace"))
        return out if all_logits or out is None else out[0]

    # --- activations and KV cache type (named settings, each a C getter and setter) --------
    def _get_named(self, getter, table: dict) -> str:
        value = getter(self._ptr)
        return next(k for k, v in table.items() if v == value)

    def _set_named(self, setter, table: dict, kind: str, name: str) -> None:
        check_name(kind, name, table)
        err = ffi.new("char[]", ERR_LEN)
        if setter(self._ptr, table[name], err, ERR_LEN) != 0:
            raise ValueError(ffi.string(err).decode(errors="replace"))

    @property
    def activations(self) -> str:
        return self._get_named(lib.ps_model_activations, ACTIVATIONS)

    @activations.setter
    def activations(self, mode: str) -> None:
        self._set_named(lib.ps_model_set_activations, ACTIVATIONS, "activations mode", mode)

    @property
    def kv_type(self) -> str:
        return self._get_named(lib.ps_model_kv_type, KV_TYPES)

    @kv_type.setter
    def kv_type(self, name: str) -> None:
        """Reallocates the KV cache, emptied: before evaluating."""
        self._set_named(lib.ps_model_set_kv_type, KV_TYPES, "KV cache type", name)

    @property
    def q8_mode_applies(self) -> bool:
        """The "q8" mode changes something: some matrix has an integer kernel (8-bit
        activations), or is BF16 on a CPU with AVX512-BF16 (bf16 activations)."""
        return bool(lib.ps_model_q8_mode_applies(self._ptr))

    # --- sparsity ------------------------------------------------------------------------
    @property
    def sparse_mode(self) -> str:
        mode = lib.ps_model_sparse_mode(self._ptr)
        return next(k for k, v in SPARSE_MODES.items() if v == mode)

    @sparse_mode.setter
    def sparse_mode(self, mode: str) -> None:
        if mode not in SPARSE_MODES:
            raise ValueError(f"unknown sparse mode {mode!r}; choose one of {', '.join(SPARSE_MODES)}")
        err = ffi.new("char[]", ERR_LEN)
        if lib.ps_model_set_sparse_mode(self._ptr, SPARSE_MODES[mode], err, ERR_LEN) != 0:
            raise ValueError(f"{self._gguf.path}: {ffi.string(err).decode(errors='replace')}")

    def predictor_thresholds(self) -> list[float]:
        return [lib.ps_model_predictor_threshold(self._ptr, i) for i in range(len(self.spec.layers))]

    def set_predictor_threshold(self, threshold: float, layer: int = -1) -> None:
        lib.ps_model_set_predictor_threshold(self._ptr, layer, float(threshold))

    def set_stats(self, enabled: bool) -> None:
        lib.ps_model_set_stats(self._ptr, int(enabled))

    def reset_stats(self) -> None:
        lib.ps_model_reset_stats(self._ptr)

    def stats(self) -> list[LayerStats]:
        n_layer = len(self.spec.layers)
        out = ffi.new("ps_layer_stats[]", n_layer)
        lib.ps_model_get_stats(self._ptr, out)
        n_ff, predictor = self.spec.config["n_ff"], self.sparse_mode == "predictor"
        return [LayerStats(s.n_tokens, s.n_active, s.n_predicted, s.n_predicted_active, s.n_computed, n_ff,
                           predictor) for s in out]

    def neuron_counts(self) -> np.ndarray:
        """(n_layer, n_ff) int64: per neuron, the measured tokens in which it was active."""
        n_layer, n_ff = len(self.spec.layers), self.spec.config["n_ff"]
        counts = np.zeros((n_layer, n_ff), dtype=np.int64)
        for layer in range(n_layer):
            lib.ps_model_get_neuron_counts(self._ptr, layer, ffi.cast("int64_t *", counts[layer].ctypes.data))
        return counts

    def close(self) -> None:
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None:
            ffi.release(ptr)
        self._base = None
        self._owned = []
