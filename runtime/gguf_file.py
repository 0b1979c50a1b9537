"""Reading GGUF files: metadata and memory-mapped tensors, every offset checked.

The file is mapped read-only once; tensors are views into that mapping (never copied) and the
C runtime receives pointers into it. Every length, count and offset read from the file is
checked against the file's size before it is used, so a truncated or lying file raises
``GGUFError`` naming the file and the key or tensor, never crashes.

We parse the container ourselves rather than through ``gguf.GGUFReader``: that reader builds a
numpy object per metadata string (a 49k-token vocabulary takes over a second to open, we take
tens of milliseconds), rejects PowerInfer's ``PWRI`` magic, and checks no tensor bounds. Nor do
we import the ``gguf`` package here: with its imports (yaml, sentencepiece, its tensor-name
tables) it costs ~6 MB of memory and ~50 ms on every run. ggml's type ids and block sizes, and
GGUF's value types, are copied below (a test compares them with gguf-py's); a type id newer than
the copy is looked up in gguf-py.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from .constants import GGUF_MAGIC, KEY_ALIGNMENT, POWERINFER_MAGIC

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Arrays of strings longer than this (a vocabulary, BPE merges) stay in the file until read.
EAGER_STRING_ARRAY_MAX = 16


class GGUFValueType(IntEnum):
    """Metadata value types (the GGUF specification; gguf-py's GGUFValueType)."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class GGMLQuantizationType(IntEnum):
    """ggml tensor type ids (gguf-py's GGMLQuantizationType, as of gguf 0.19)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_T = GGMLQuantizationType
# type -> (elements per block, bytes per block)
GGML_QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    _T.F32: (1, 4), _T.F16: (1, 2), _T.Q4_0: (32, 18), _T.Q4_1: (32, 20), _T.Q5_0: (32, 22),
    _T.Q5_1: (32, 24), _T.Q8_0: (32, 34), _T.Q8_1: (32, 40), _T.Q2_K: (256, 84),
    _T.Q3_K: (256, 110), _T.Q4_K: (256, 144), _T.Q5_K: (256, 176), _T.Q6_K: (256, 210),
    _T.Q8_K: (256, 292), _T.IQ2_XXS: (256, 66), _T.IQ2_XS: (256, 74), _T.IQ3_XXS: (256, 98),
    _T.IQ1_S: (256, 50), _T.IQ4_NL: (32, 18), _T.IQ3_S: (256, 110), _T.IQ2_S: (256, 82),
    _T.IQ4_XS: (256, 136), _T.I8: (1, 1), _T.I16: (1, 2), _T.I32: (1, 4), _T.I64: (1, 8),
    _T.F64: (1, 8), _T.IQ1_M: (256, 56), _T.BF16: (1, 2), _T.TQ1_0: (256, 54),
    _T.TQ2_0: (256, 66), _T.MXFP4: (32, 17), _T.NVFP4: (64, 36), _T.Q1_0: (128, 18),
}
del _T


def _ggml_type(raw: int) -> tuple[IntEnum, tuple[int, int]] | None:
    """The type with id ``raw`` and its block sizes; gguf-py is asked only about ids newer than
    our copy. None when neither knows it."""
    if raw in GGMLQuantizationType._value2member_map_:
        ttype = GGMLQuantizationType(raw)
        return ttype, GGML_QUANT_SIZES[ttype]
    import gguf
    try:
        ttype = gguf.GGMLQuantizationType(raw)
        return ttype, gguf.GGML_QUANT_SIZES[ttype]
    except (ValueError, KeyError):
        return None


_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_U64 = struct.Struct("<Q")
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


class _StringArray:
    """A long array of strings left in the file: its bytes (the mapping until the file is
    closed, then a copy) and where its elements lie. Lengths and bounds were checked when the
    file was opened; UTF-8 is checked when the strings are read."""

    def __init__(self, buf, start: int, end: int, count: int, key: str, path: Path):
        self._buf, self._start, self._end = buf, start, end
        self.count, self._key, self._path = count, key, path

    def __iter__(self) -> Iterator[str]:
        buf, pos, unpack = self._buf, self._start, _U64.unpack_from
        for i in range(self.count):
            (n,) = unpack(buf, pos)
            pos += 8
            try:
                yield str(buf[pos:pos + n], "utf-8")
            except UnicodeDecodeError:
                raise GGUFError(f"{self._path}: element {i} of {self._key!r} is not valid UTF-8") from None
            pos += n

    def detach(self) -> None:
        """Copy the bytes out of the mapping, which is about to close."""
        if not isinstance(self._buf, bytes):
            self._buf = bytes(self._buf[self._start:self._end])
            self._start, self._end = 0, len(self._buf)


class Metadata(Mapping):
    """GGUF metadata: key -> plain Python value. Long string arrays (a vocabulary, BPE merges)
    are decoded from the file on each access, a fresh list each time, so that a loaded model
    does not keep ~100k Python strings that only the tokenizer reads, once."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        return list(value) if isinstance(value, _StringArray) else value

    def iter_strings(self, key: str) -> Iterator[str]:
        """The elements of a string array one at a time, never all in memory at once (the
        tokenizer reads the BPE merges so: ~4 MB of strings for a 49k vocabulary). KeyError
        when ``key`` is missing."""
        return iter(self._values[key])

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Metadata({len(self)} keys: {', '.join(self._values)})"


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


def advise_huge_pages(mm: mmap.mmap) -> None:
    """Ask for 2 MiB pages (Linux transparent huge pages) for mm before its first access: a model
    read from disk through such a mapping lands in the page cache as 2 MiB folios, which this
    and every later mapping of the file then maps with one TLB entry per 2 MiB instead of per
    4 KiB (SmolLM2 Q8_0 decode on one core, runtime/BENCHMARKS.md: +3.6% dense, +4% sparse).
    A file already cached in small pages stays so until evicted. Only a hint: ignored where
    the kernel or platform has no such pages."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
        except OSError:
            pass


def drop_cached_pages(fd: int) -> None:
    """After a model file was written and fsynced: drop its (clean) pages from the page cache,
    so that the first run reads it back through the runtime's mapping, in 2 MiB folios, rather
    than mapping the 4 KiB pages the writes left (see advise_huge_pages). Only a hint."""
    advice = getattr(os, "POSIX_FADV_DONTNEED", None)
    if advice is not None:
        try:
            os.posix_fadvise(fd, 0, 0, advice)
        except OSError:
            pass


# Linux's madvise(MADV_POPULATE_READ) (5.14): fault a range in without touching it from Python
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)
_HUGE_PAGE = 2 << 20
_MIN_HUGE_MAP = 8 * _HUGE_PAGE      # smaller files are not worth a check


def _pmd_mapped_bytes(mm: mmap.mmap) -> int | None:
    """Bytes of mm's mapping that 2 MiB page-table entries map (FilePmdMapped in
    /proc/self/smaps), or None where that cannot be read."""
    view = np.frombuffer(mm, dtype=np.uint8, count=1)
    address = view.__array_interface__["data"][0]
    del view
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):   # a mapping's first line: start-end
                    start, _, end = head.partition("-")
                    inside = int(start, 16) <= address < int(end, 16)
                elif inside and line.startswith("FilePmdMapped:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _map_in_huge_pages(fd: int, mm: mmap.mmap, size: int) -> tuple[mmap.mmap, float | None]:
    """mm (or a new mapping of fd replacing it), faulted in, and the share of its 2 MiB-aligned
    span that 2 MiB pages map (None: not measured).

    A mapping asking for huge pages gets them only where the page cache holds the file in 2 MiB
    folios, and it keeps whatever folios earlier reads left: a file copied or read without that
    hint sits there in 4 KiB pages, and one-core decoding from such a mapping was 5-23% (SmolLM2
    Q4_1) and 12-14% (Q8_0) slower (runtime/BENCHMARKS.md, tenth session). So the mapping is faulted
    in now, and when huge pages map under 3/4 of it, the file's cached pages are dropped (a hint
    the kernel ignores for pages other processes map) and read again through a fresh mapping,
    first 4 MiB as a probe: a kernel or file system without huge file pages costs only that."""
    if (_MADV_POPULATE_READ is None or size < _MIN_HUGE_MAP or not _huge_pages_enabled()
            or size > _available_memory() // 2):   # a file that barely fits is read as it is used
        return mm, None
    span = size // _HUGE_PAGE * _HUGE_PAGE

    def populate(m: mmap.mmap, length: int) -> bool:
        try:
            m.madvise(_MADV_POPULATE_READ, 0, length)
            return True
        except (OSError, ValueError):
            return False

    if not populate(mm, size) or (mapped := _pmd_mapped_bytes(mm)) is None:
        return mm, None
    if mapped >= span * 3 // 4:
        return mm, mapped / span
    mm.close()
    probe = 2 * _HUGE_PAGE
    os.posix_fadvise(fd, 0, probe, os.POSIX_FADV_DONTNEED)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    advise_huge_pages(mm)
    if not populate(mm, probe) or not _pmd_mapped_bytes(mm):
        populate(mm, size)
        return mm, (_pmd_mapped_bytes(mm) or 0) / span
    os.posix_fadvise(fd, probe, 0, os.POSIX_FADV_DONTNEED)
    populate(mm, size)
    return mm, (_pmd_mapped_bytes(mm) or 0) / span


def _huge_pages_enabled() -> bool:
    """Transparent huge pages on (always) or on request (madvise)."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class GGUFFile:
    """A GGUF (or PowerInfer ``PWRI``) file, memory-mapped.

    ``metadata``: key → plain Python value (str, int, float, bool, or a list of them; numeric
    arrays longer than a few elements are numpy arrays, long string arrays are read from the
    file on access: see ``Metadata``). ``tensors``: name → TensorInfo.
    """

    def __init__(self, path: str | os.PathLike, huge_pages: bool = False):
        """huge_pages: fault the whole file in now, through 2 MiB pages where the kernel has them
        (see _map_in_huge_pages; the runtime asks for this, tools that read a few tensors do
        not). ``huge_page_share`` is then the share of the file they map, else None."""
        self.path = Path(path)
        self.huge_page_share: float | None = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise GGUFError(f"{self.path}: the file is empty, not a GGUF model")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                advise_huge_pages(self._mmap)
                if huge_pages:
                    self._mmap, self.huge_page_share = _map_in_huge_pages(f.fileno(), self._mmap, size)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror or e}") from e
        self.size = size
        self._pos = 0
        self.metadata = Metadata()
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
            for value in self.metadata._values.values():
                if isinstance(value, _StringArray):
                    value.detach()
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
                if count <= EAGER_STRING_ARRAY_MAX:
                    return [self._string(f"element {i} of {key!r}") for i in range(count)]
                return self._string_array(key, count)
            dtype = np.dtype(_NUMPY_DTYPES[etype]).newbyteorder("<")
            self._need(count * dtype.itemsize, f"the array {key!r}")
            arr = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._pos).copy()
            self._pos += count * dtype.itemsize
            return arr.tolist() if count <= 16 else arr
        return self._scalar(_SCALAR_FORMATS[vtype], f"the value of {key!r}")

    def _string_array(self, key: str, count: int) -> _StringArray:
        """Check the lengths of ``count`` strings and step over them."""
        mm, size, unpack = self._mmap, self.size, _U64.unpack_from
        start = pos = self._pos
        for i in range(count):
            n = unpack(mm, pos)[0] if pos + 8 <= size else -1
            if n < 0 or pos + 8 + n > size:
                self._pos = pos
                self._string(f"element {i} of {key!r}")   # raises the truncation error
            pos += 8 + n
        self._pos = pos
        return _StringArray(mm, start, pos, count, key, self.path)

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
        self.kv_spans: dict[str, tuple[int, int]] = {}   # key -> its bytes (key, type, value)
        for i in range(n_kv):
            start = self._pos
            key = self._string(f"metadata key #{i}")
            self.metadata._values[key] = self._value(self._value_type(f"the type of {key!r}"), key)
            self.kv_spans[key] = (start, self._pos)
        self.tensor_infos_span = (self._pos, 0)      # the tensor descriptions' bytes, set below

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
        self.tensor_infos_span = (self.tensor_infos_span[0], self._pos)

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
        known = _ggml_type(raw_type)
        if known is None:
            raise self._fail(f"tensor {name!r} has unknown type id {raw_type}")
        ttype, (block_size, block_bytes) = known
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
