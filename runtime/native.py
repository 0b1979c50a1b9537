"""The C model behind cffi: builds ps_config / ps_tensor structs over the memory map."""

from __future__ import annotations

import numpy as np

from ._native import ffi, lib
from .gguf_file import GGUFFile, TensorInfo
from .loader import LAYER_SLOTS, ModelSpec

ERR_LEN = 512


class NativeError(RuntimeError):
    """The C runtime refused an operation; the message says why."""


class NativeModel:
    """Owns a ps_model. Keeps the GGUF mapping alive for as long as the model exists."""

    def __init__(self, gguf: GGUFFile, spec: ModelSpec, n_ctx: int, n_threads: int):
        self._gguf = gguf
        self.spec = spec
        self.n_vocab = spec.config["n_vocab"]
        self._base = ffi.from_buffer("char[]", gguf.buffer)   # pointer to the mapped file
        cfg = ffi.new("ps_config *", spec.config)
        tok_embd = self._tensor(spec.globals["tok_embd"])
        output_norm = self._tensor(spec.globals["output_norm"])
        output = self._tensor(spec.globals["output"])
        layers = ffi.new("ps_layer_weights[]", len(spec.layers))
        for i, slots in enumerate(spec.layers):
            for slot in LAYER_SLOTS:
                setattr(layers[i], slot, self._tensor(slots[slot])[0])
        err = ffi.new("char[]", ERR_LEN)
        ptr = lib.ps_model_create(cfg, tok_embd, output_norm, output, layers, n_ctx, n_threads, err, ERR_LEN)
        if ptr == ffi.NULL:
            raise NativeError(f"{gguf.path}: {ffi.string(err).decode(errors='replace')}")
        self._ptr = ffi.gc(ptr, lib.ps_model_free)
        self.n_ctx = n_ctx
        self.n_threads = n_threads

    def _tensor(self, t: TensorInfo | None):
        if t is None:
            return ffi.new("ps_tensor *", {"data": ffi.NULL, "type": 0, "ne0": 0, "ne1": 0})
        return ffi.new("ps_tensor *", {"data": self._base + t.offset, "type": int(t.type),
                                       "ne0": t.ne0, "ne1": t.n_rows})

    def eval(self, tokens, n_past: int, all_logits: bool = False) -> np.ndarray:
        """Logits (n_vocab,) of the last token, or (len(tokens), n_vocab) with all_logits."""
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(toks)
        out = np.empty((n if all_logits else 1, self.n_vocab), dtype=np.float32)
        err = ffi.new("char[]", ERR_LEN)
        rc = lib.ps_model_eval(self._ptr, ffi.from_buffer("int32_t[]", toks), n, n_past,
                               ffi.from_buffer("float[]", out), int(all_logits), err, ERR_LEN)
        if rc != 0:
            raise NativeError(ffi.string(err).decode(errors="replace"))
        return out if all_logits else out[0]

    def close(self) -> None:
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None:
            ffi.release(ptr)
        self._base = None
