"""Reading GGUF files: metadata and memory-mapped tensors, every offset checked.

The file is mapped read-only once; tensors are views into that mapping (never copied) and the
C runtime receives pointers into it. Every length, count and offset read from the file is
checked against the file's size before it is used, so a truncated or lying file raises
``GGUFError`` naming the file and the key or tensor, never crashes.

Type ids, block sizes and value types come from the ``gguf`` package (ggml's own tables). We
parse the container ourselves rather than through ``gguf.GGUFReader``: that reader builds a
numpy object per metadata string (a 49k-token vocabulary takes over a second to open, we take
tens of milliseconds), rejects PowerInfer's ``PWRI`` magic, and checks no tensor bounds.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .constants import GGUF_MAGIC, KEY_ALIGNMENT, POWERINFER_MAGIC

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.FLOAT64: np.float64,
    GGUFValueType.BOOL: np.bool_,
}


class GGUFError(ValueError):
    """A GGUF file is malformed or unsupported; the message names the file and the place."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]        # ggml order: shape[0] is the contiguous row length (ne0)
    type: GGMLQuantizationType
    offset: int                   # absolute byte offset in the file
    n_bytes: int

    @property
    def ne0(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1


class GGUFFile:
    """A GGUF (or PowerInfer ``PWRI``) file, memory-mapped.

    ``metadata``: key → plain Python value (str, int, float, bool, or a list of them; numeric
    arrays longer than a few elements are numpy arrays). ``tensors``: name → TensorInfo.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise GGUFError(f"{self.path}: the file is empty, not a GGUF model")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror or e}") from e
        self.size = size
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    # --- public --------------------------------------------------------------------------
    @property
    def buffer(self) -> mmap.mmap:
        """The read-only mapping of the whole file (tensor offsets are relative to it)."""
        return self._mmap

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor, as a uint8 view into the mapping (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mmap, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    def close(self) -> None:
        mm, self._mmap = getattr(self, "_mmap", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # numpy views or C pointers still reference the map; it closes when they go
                pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- parsing -------------------------------------------------------------------------
    def _fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"truncated file: {what} needs {n} bytes at offset {self._pos}, "
                             f"but the file has {self.size} bytes")

    def _scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self._mmap, self._pos)
        self._pos += n
        return v

    def _string(self, what: str) -> str:
        n = self._scalar("<Q", what)
        self._need(n, what)
        raw = self._mmap[self._pos:self._pos + n]
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not valid UTF-8") from None

    def _value_type(self, what: str) -> GGUFValueType:
        raw = self._scalar("<I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._fail(f"{what} has unknown value type {raw}") from None

    def _value(self, vtype: GGUFValueType, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._string(f"the value of {key!r}")
        if vtype == GGUFValueType.ARRAY:
            etype = self._value_type(f"the element type of {key!r}")
            count = self._scalar("<Q", f"the length of {key!r}")
            if etype == GGUFValueType.ARRAY:
                raise self._fail(f"{key!r} is an array of arrays, which no model uses")
            if etype == GGUFValueType.STRING:
                if count > self.size:  # each string takes at least 8 bytes
                    raise self._fail(f"{key!r} claims {count} strings, more than the file holds")
                return [self._string(f"element {i} of {key!r}") for i in range(count)]
            dtype = np.dtype(_NUMPY_DTYPES[etype]).newbyteorder("<")
            self._need(count * dtype.itemsize, f"the array {key!r}")
            arr = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._pos).copy()
            self._pos += count * dtype.itemsize
            return arr.tolist() if count <= 16 else arr
        return self._scalar(_SCALAR_FORMATS[vtype], f"the value of {key!r}")

    def _parse(self) -> None:
        self._need(4, "the magic number")
        magic = bytes(self._mmap[0:4])
        if magic not in (GGUF_MAGIC, POWERINFER_MAGIC):
            raise self._fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r} "
                             f"or PowerInfer's {POWERINFER_MAGIC!r})")
        self.magic = magic
        self._pos = 4
        self.version = self._scalar("<I", "the version")
        if self.version not in SUPPORTED_VERSIONS:
            raise self._fail(f"GGUF version {self.version} is not supported "
                             f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        n_tensors = self._scalar("<Q", "the tensor count")
        n_kv = self._scalar("<Q", "the metadata count")
        # every key/value takes >= 12 bytes and every tensor info >= 24: cheap sanity bounds
        if n_kv * 12 > self.size or n_tensors * 24 > self.size:
            raise self._fail(f"truncated or corrupt file: the header claims {n_kv} metadata entries "
                             f"and {n_tensors} tensors, more than a {self.size}-byte file can hold")
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            self.metadata[key] = self._value(self._value_type(f"the type of {key!r}"), key)

        infos = []
        for i in range(n_tensors):
            name = self._string(f"the name of tensor #{i}")
            n_dims = self._scalar("<I", f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {name!r} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
            shape = tuple(self._scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims))
            raw_type = self._scalar("<I", f"the type of tensor {name!r}")
            offset = self._scalar("<Q", f"the data offset of tensor {name!r}")
            infos.append((name, shape, raw_type, offset))

        alignment = self.metadata.get(KEY_ALIGNMENT, DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"{KEY_ALIGNMENT} = {alignment!r} is not a positive power of two")
        self.alignment = alignment
        self.data_start = (self._pos + alignment - 1) // alignment * alignment

        for name, shape, raw_type, offset in infos:
            if name in self.tensors:
                raise self._fail(f"tensor {name!r} appears twice")
            self.tensors[name] = self._tensor_info(name, shape, raw_type, offset)

    def _tensor_info(self, name: str, shape: tuple[int, ...], raw_type: int, offset: int) -> TensorInfo:
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self._fail(f"tensor {name!r} has unknown type id {raw_type}") from None
        block_size, block_bytes = GGML_QUANT_SIZES[ttype]
        if any(d <= 0 for d in shape):
            raise self._fail(f"tensor {name!r} has an empty dimension in shape {list(shape)}")
        if shape[0] % block_size:
            raise self._fail(f"tensor {name!r}: row length {shape[0]} is not a multiple of the "
                             f"{ttype.name} block size {block_size}")
        n_elements = int(np.prod(shape, dtype=object))
        n_bytes = n_elements // block_size * block_bytes
        start = self.data_start + offset
        if offset % self.alignment:
            raise self._fail(f"tensor {name!r}: data offset {offset} is not aligned to {self.alignment}")
        if start + n_bytes > self.size:
            raise self._fail(f"tensor {name!r} ({ttype.name}, shape {list(shape)}, {n_bytes} bytes at "
                             f"offset {start}) extends past the end of the file ({self.size} bytes): "
                             f"the file is truncated or corrupt")
        return TensorInfo(name, shape, ttype, start, n_bytes)
