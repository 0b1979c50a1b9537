"""Tensor-type kernels (native/kernels.c).

- the scalar table against gguf-py's quantisers and dequantisers, bit for bit;
- every SIMD table the CPU runs against its scalar twin, odd sizes included; axpy4 against four
  axpys of its own table (bit for bit) and of the scalar one;
- f16 conversions against numpy (all 65536 half bit patterns), bf16 against a float64 reference;
- 8-bit activations: the quantiser of every ISA against numpy, byte for byte; the scalar int8
  dots against a numpy model of ggml's quantise-then-integer-dot; every SIMD int8 dot against
  its scalar twin;
- lookups: row sizes, unknown types and ISAs, CPU detection.

Every buffer a kernel touches is malloc'ed at exactly its size, so that under AddressSanitizer
(tests/asan.sh) a read or write past a row's end is reported.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import cffi
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from prosparse._native import ffi, lib

# name -> (PS_TYPE_*, gguf type)
TYPES = {
    "f32": (lib.PS_TYPE_F32, GGMLQuantizationType.F32),
    "f16": (lib.PS_TYPE_F16, GGMLQuantizationType.F16),
    "bf16": (lib.PS_TYPE_BF16, GGMLQuantizationType.BF16),
    "q8_0": (lib.PS_TYPE_Q8_0, GGMLQuantizationType.Q8_0),
    "q4_0": (lib.PS_TYPE_Q4_0, GGMLQuantizationType.Q4_0),
    "q4_1": (lib.PS_TYPE_Q4_1, GGMLQuantizationType.Q4_1),
}
QUANTISED = ("q8_0", "q4_0", "q4_1")
ISAS = {"scalar": lib.PS_ISA_SCALAR, "avx2": lib.PS_ISA_AVX2, "avx2_vnni": lib.PS_ISA_AVX2_VNNI,
        "avx512": lib.PS_ISA_AVX512, "avx512_vnni": lib.PS_ISA_AVX512_VNNI,
        "avx512_bf16": lib.PS_ISA_AVX512_BF16, "neon": lib.PS_ISA_NEON, "neon_dotprod": lib.PS_ISA_NEON_DOTPROD}
X86_AVX512 = ("avx512", "avx512_vnni", "avx512_bf16")
# the CPU features each ISA's kernels need, as /proc/cpuinfo spells them
_AVX2 = {"avx2", "fma", "f16c"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl"}
CPU_FLAGS = {"avx2": _AVX2, "avx2_vnni": _AVX2 | {"avx_vnni"},
             "avx512": _AVX512, "avx512_vnni": _AVX512 | {"avx512_vnni"},
             "avx512_bf16": _AVX512 | {"avx512_vnni", "avx512_bf16"},
             "neon": {"asimd"}, "neon_dotprod": {"asimd", "asimddp"}}

SIZES_PLAIN = [1, 3, 17, 31, 33, 63, 64, 65, 100, 1001, 1536]
SIZES_BLOCKS = [32, 96, 160, 576, 1568]
REL_TOL = 1e-5  # of sum |w_i x_i|: float summation in another order


def sizes(name: str) -> list[int]:
    return SIZES_BLOCKS if name in QUANTISED else SIZES_PLAIN


def require_isa(isa_name: str) -> int:
    isa = ISAS[isa_name]
    if not lib.ps_kernels_isa_available(isa):
        pytest.skip(f"this CPU cannot run {isa_name} kernels")
    return isa


def traits(name: str, isa: int):
    t = lib.ps_type_traits_for(TYPES[name][0], isa)
    assert t != ffi.NULL, (name, isa)
    return t


# ------------------------------------------------------------------------------------------
# Exact-size buffers

_libc_ffi = cffi.FFI()
_libc_ffi.cdef("void *malloc(size_t size); void free(void *ptr);")
_libc = _libc_ffi.dlopen(None)


class Heap:
    """malloc'ed copies of arrays, exactly as large as the array (numpy and cffi may place small
    arrays inside larger pools, where AddressSanitizer cannot see an overrun)."""

    def __init__(self):
        self._blocks = []

    def put(self, array: np.ndarray, ctype: str):
        array = np.ascontiguousarray(array)
        block = _libc.malloc(array.nbytes)
        assert block != _libc_ffi.NULL
        self._blocks.append(block)
        _libc_ffi.memmove(block, array, array.nbytes)
        return ffi.cast(ctype, int(_libc_ffi.cast("uintptr_t", block)))

    def alloc(self, nbytes: int, ctype: str):
        return self.put(np.zeros(nbytes, np.uint8), ctype)

    def free(self):
        for block in self._blocks:
            _libc.free(block)
        self._blocks.clear()


@pytest.fixture
def heap():
    h = Heap()
    yield h
    h.free()


def read(ptr, dtype, count: int) -> np.ndarray:
    return np.frombuffer(ffi.buffer(ptr, count * np.dtype(dtype).itemsize), dtype).copy()


# ------------------------------------------------------------------------------------------
# Calling a traits row

def from_float(t, x: np.ndarray, heap: Heap) -> np.ndarray:
    n = len(x)
    nbytes = n // t.block_size * t.block_bytes
    row = heap.alloc(nbytes, "void *")
    t.from_float(heap.put(x.astype(np.float32), "float *"), row, n)
    return read(row, np.uint8, nbytes)


def to_float(t, row: np.ndarray, n: int, heap: Heap) -> np.ndarray:
    out = heap.alloc(4 * n, "float *")
    t.to_float(heap.put(row, "void *"), out, n)
    return read(out, np.float32, n)


def dot(t, row: np.ndarray, x: np.ndarray, heap: Heap) -> float:
    return t.dot(heap.put(row, "void *"), heap.put(x.astype(np.float32), "float *"), len(x))


def axpy(t, a: float, row: np.ndarray, y: np.ndarray, heap: Heap) -> np.ndarray:
    yp = heap.put(y.astype(np.float32), "float *")
    t.axpy(a, heap.put(row, "void *"), yp, len(y))
    return read(yp, np.float32, len(y))


def axpy4(t, a, rows, y: np.ndarray, heap: Heap) -> np.ndarray:
    yp = heap.put(y.astype(np.float32), "float *")
    row_ptrs = ffi.new("const void *[4]", [heap.put(row, "void *") for row in rows])
    t.axpy4(ffi.new("float[4]", list(a)), row_ptrs, yp, len(y))
    return read(yp, np.float32, len(y))


def random_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """Normal values whose scale varies block to block (1e-3 .. 1e3)."""
    scale = np.exp(rng.uniform(-7, 7, size=(n + 31) // 32)).repeat(32)[:n]
    return (rng.standard_normal(n) * scale).astype(np.float32)


def random_row(name: str, n: int, rng: np.random.Generator, heap: Heap) -> np.ndarray:
    """A row of type `name`: quantised random floats, then (quantised types) every code byte
    redrawn so that all codes occur, keeping each block's scales."""
    row = from_float(traits(name, lib.PS_ISA_SCALAR), random_floats(rng, n), heap)
    if name in QUANTISED:
        block_size, block_bytes = GGML_QUANT_SIZES[TYPES[name][1]]
        codes = block_size if name == "q8_0" else block_size // 2
        blocks = row.reshape(-1, block_bytes)
        blocks[:, -codes:] = rng.integers(0, 256, size=(len(blocks), codes), dtype=np.uint8)
    return row


def assert_axpy_close(got, a: float, w: np.ndarray, y: np.ndarray, expected):
    """Within a few roundings of y + a*w."""
    bound = 1e-6 * (np.abs(y) + np.abs(a * w.astype(np.float64))) + 1e-30
    assert np.all(np.abs(got - np.asarray(expected, np.float64)) <= bound)


# ------------------------------------------------------------------------------------------
# Lookups

@pytest.mark.parametrize("name", TYPES)
def test_traits_describe_ggml_layout(name):
    type_id, qtype = TYPES[name]
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    t = traits(name, -1)
    assert ffi.string(t.name).decode() == name
    assert (t.block_size, t.block_bytes) == (block_size, block_bytes)
    for n_blocks in (0, 1, 3, 48):
        assert lib.ps_row_bytes(type_id, n_blocks * block_size) == n_blocks * block_bytes
    assert lib.ps_row_bytes(type_id, -block_size) == 0
    if block_size > 1:
        assert lib.ps_row_bytes(type_id, block_size + 1) == 0
        assert lib.ps_row_bytes(type_id, block_size - 1) == 0


@pytest.mark.parametrize("type_id", [-1, 4, 5, 6, 7, 9, 29, 31, 1000])
def test_unknown_type_has_no_traits(type_id):
    assert lib.ps_type_traits_for(type_id, -1) == ffi.NULL
    assert lib.ps_type_traits_for(type_id, lib.PS_ISA_SCALAR) == ffi.NULL
    assert lib.ps_row_bytes(type_id, 32) == 0


def test_isa_lookup():
    assert lib.ps_kernels_isa_available(lib.PS_ISA_SCALAR)
    best = lib.ps_kernels_best_isa()
    assert lib.ps_kernels_isa_available(best)
    available = [isa for isa in ISAS.values() if lib.ps_kernels_isa_available(isa)]
    assert best == max(available)  # enum order is preference order
    for name, isa in ISAS.items():
        assert ffi.string(lib.ps_kernels_isa_name(isa)).decode() == name
        t = lib.ps_type_traits_for(lib.PS_TYPE_Q4_0, isa)
        assert (t != ffi.NULL) == (isa in available)
    for bad in (-2, lib.PS_ISA_COUNT, 99):
        assert not lib.ps_kernels_isa_available(bad)
        assert lib.ps_type_traits_for(lib.PS_TYPE_F32, bad) == ffi.NULL
    assert lib.ps_type_traits_for(lib.PS_TYPE_F32, -1) == lib.ps_type_traits_for(lib.PS_TYPE_F32, best)


def test_isa_detection_matches_cpuinfo():
    """No ISA is skipped on a CPU that has it (Linux: /proc/cpuinfo lists what the kernel enabled)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    for name, needed in CPU_FLAGS.items():
        assert bool(lib.ps_kernels_isa_available(ISAS[name])) == needed.issubset(flags), name


# ------------------------------------------------------------------------------------------
# Scalar reference against gguf-py (which matches ggml's C reference bit for bit)

def special_blocks() -> np.ndarray:
    """Blocks of 32 that exercise the quantisers' edge cases: zeros, constants, rounding ties,
    equal magnitudes of both signs, tiny and large scales."""
    ramp = np.arange(32, dtype=np.float32)
    blocks = [
        np.zeros(32), np.full(32, 3.25), np.full(32, -7.0),
        np.r_[127.0, np.arange(31) - 15.5],          # q8_0: d = 1, ties at .5
        np.r_[-8.0, np.arange(31) / 2 - 7.5],        # q4_0: d = 1, ties at .5
        np.r_[0.0, 15.0, np.arange(30) / 2],         # q4_1: d = 1, ties at .5
        np.r_[-3.0, 3.0, ramp[:30] / 10],            # first of equal magnitudes wins
        np.r_[3.0, -3.0, ramp[:30] / 10],
        (ramp - 16) * 1e-6, (ramp - 16) * 3e-9, (ramp - 16) * 1e3,
    ]
    return np.concatenate(blocks).astype(np.float32)


@pytest.mark.parametrize("name", TYPES)
def test_scalar_from_float_matches_gguf(name, heap):
    rng = np.random.default_rng(1)
    t = traits(name, lib.PS_ISA_SCALAR)
    for x in [random_floats(rng, n) for n in sizes(name)] + [special_blocks()]:
        expected = quants.quantize(x, TYPES[name][1]).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(from_float(t, x, heap), expected, err_msg=f"n={len(x)}")


@pytest.mark.parametrize("name", TYPES)
def test_scalar_to_float_matches_gguf(name, heap):
    rng = np.random.default_rng(2)
    t = traits(name, lib.PS_ISA_SCALAR)
    for n in sizes(name):
        row = random_row(name, n, rng, heap)
        expected = quants.dequantize(row, TYPES[name][1]).astype(np.float32).reshape(-1)
        np.testing.assert_array_equal(to_float(t, row, n, heap).view(np.uint32),
                                      expected.view(np.uint32), err_msg=f"n={n}")


@pytest.mark.parametrize("name", TYPES)
def test_scalar_dot_axpy_match_numpy(name, heap):
    rng = np.random.default_rng(3)
    t = traits(name, lib.PS_ISA_SCALAR)
    for n in sizes(name):
        row, x, y = random_row(name, n, rng, heap), rng.standard_normal(n), rng.standard_normal(n)
        w = to_float(t, row, n, heap).astype(np.float64)
        x, y = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
        assert abs(dot(t, row, x, heap) - w @ x) <= REL_TOL * (np.abs(w * x).sum() + 1e-30)
        assert_axpy_close(axpy(t, -0.75, row, y, heap), -0.75, w, y, y - 0.75 * w)


# ------------------------------------------------------------------------------------------
# Every ISA against the scalar reference

@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_isa_matches_scalar(isa_name, name, heap):
    isa = require_isa(isa_name)
    ref, t = traits(name, lib.PS_ISA_SCALAR), traits(name, isa)
    rng = np.random.default_rng(4)
    for n in sizes(name):
        row = random_row(name, n, rng, heap)
        x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        w = to_float(ref, row, n, heap)
        # dequantisation is exact in every ISA (zeros may differ in sign: (8-8)*d vs 8d - 8d)
        np.testing.assert_array_equal(to_float(t, row, n, heap), w, err_msg=f"to_float n={n}")
        tol = REL_TOL * (np.abs(w.astype(np.float64) * x).sum() + 1e-30)
        assert abs(dot(t, row, x, heap) - dot(ref, row, x, heap)) <= tol, f"dot n={n}"
        assert_axpy_close(axpy(t, 1.7, row, y, heap), 1.7, w, y, axpy(ref, 1.7, row, y, heap))


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_every_element_counts(isa_name, name, heap):
    """Exact checks that see each position: dot with a one-hot x picks w[j]; axpy of a = 1
    into zeros reproduces the row."""
    isa = require_isa(isa_name)
    t = traits(name, isa)
    rng = np.random.default_rng(5)
    for n in sizes(name):
        row = random_row(name, n, rng, heap)
        w = to_float(traits(name, lib.PS_ISA_SCALAR), row, n, heap)
        for j in sorted({0, n // 2, n - 17, n - 2, n - 1} & set(range(n))):
            e = np.zeros(n, np.float32)
            e[j] = 1.0
            assert dot(t, row, e, heap) == w[j], f"n={n} j={j}"
        np.testing.assert_array_equal(axpy(t, 1.0, row, np.zeros(n, np.float32), heap), w,
                                      err_msg=f"n={n}")


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
def test_corrupted_block_changes_results(isa_name, name, heap):
    """The checks above can fail: a block with another scale or another code reads differently."""
    isa = require_isa(isa_name)
    t = traits(name, isa)
    rng = np.random.default_rng(6)
    n = 160
    row = random_row(name, n, rng, heap)
    x = rng.standard_normal(n).astype(np.float32)
    block_bytes = t.block_bytes
    w, d = to_float(t, row, n, heap), dot(t, row, x, heap)

    scaled = row.copy()
    scaled[2 * block_bytes + 1] ^= 0x04  # block 2: d's exponent
    assert dot(t, scaled, x, heap) != d
    changed = np.flatnonzero(to_float(t, scaled, n, heap) != w)
    assert changed.size and changed.min() >= 64 and changed.max() < 96

    recoded = row.copy()
    recoded[-1] ^= 0x11  # last block: its last code byte
    changed = np.flatnonzero(to_float(t, recoded, n, heap) != w)
    assert changed.size and changed.min() >= 128
    assert dot(t, recoded, x, heap) != d


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
def test_partial_block_is_not_read(isa_name, name, heap):
    """n is a multiple of the block by contract; if a caller breaks it, the trailing partial
    block is ignored (every ISA alike), never read past the row's whole blocks."""
    isa = require_isa(isa_name)
    t = traits(name, isa)
    rng = np.random.default_rng(7)
    row = random_row(name, 64, rng, heap)
    x = rng.standard_normal(80).astype(np.float32)
    assert dot(t, row, x, heap) == dot(t, row, x[:64], heap)
    y = axpy(t, 2.0, row, np.zeros(80, np.float32), heap)
    np.testing.assert_array_equal(y[64:], 0)
    np.testing.assert_array_equal(y[:64], axpy(t, 2.0, row, np.zeros(64, np.float32), heap))


AXPY4_COEFFICIENTS = ([1.7, -0.75, 3e4, -2e-3], [1e6, -1e6, 0.0, 1.0], [-5e-7, 0.5, 0.5, -1e5])


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_axpy4_is_four_axpys(isa_name, name, heap):
    """axpy4 adds its four rows in order with axpy's roundings: the same bits as four axpy
    calls of the same table, and within a few roundings per row of the scalar reference.
    Coefficients of very different sizes (cancelling, zero) so that a row added twice, left
    out, taken out of order or scaled by another row's coefficient shows."""
    isa = require_isa(isa_name)
    ref, t = traits(name, lib.PS_ISA_SCALAR), traits(name, isa)
    rng = np.random.default_rng(11)
    for n in sizes(name):
        rows = [random_row(name, n, rng, heap) for _ in range(4)]
        w = [to_float(ref, row, n, heap).astype(np.float64) for row in rows]
        for a in AXPY4_COEFFICIENTS:
            y = random_floats(rng, n)
            one_by_one, reference = y, y
            for r in range(4):
                one_by_one = axpy(t, a[r], rows[r], one_by_one, heap)
                reference = axpy(ref, a[r], rows[r], reference, heap)
            got = axpy4(t, a, rows, y, heap)
            np.testing.assert_array_equal(got, one_by_one, err_msg=f"n={n} a={a}")
            magnitude = np.abs(y) + sum(abs(a[r]) * np.abs(w[r]) for r in range(4))
            assert np.all(np.abs(got - reference) <= 4e-6 * magnitude + 1e-30), f"n={n} a={a}"
            exact = y + sum(a[r] * w[r] for r in range(4))
            assert np.all(np.abs(got - exact) <= 4e-6 * magnitude + 1e-30), f"n={n} a={a}"


# ------------------------------------------------------------------------------------------
# 8-bit activations: quantiser and integer dots

Q8_BLOCK_COUNTS = [1, 2, 3, 5, 6, 7, 17, 18, 49]   # every tail of the 2-, 4- and 8-block loops
Q8_MIN_AMAX = np.float32(1e-30)


def quantize_q8(isa: int, x: np.ndarray, heap: Heap, n_blocks: int | None = None, q4: bool = True):
    """x quantised by one ISA into exact-size buffers (n_blocks of them: default all of x's
    whole blocks), with the codes in the AVX2 Q4 order too (the q4 buffer) as the runtime asks
    unless not q4; returns the ps_q8_vec and its (qs, d, s) read back."""
    nb = len(x) // 32 if n_blocks is None else n_blocks
    vec = ffi.new("ps_q8_vec *", {"qs": heap.alloc(32 * nb, "int8_t *"), "d": heap.alloc(4 * nb, "float *"),
                                  "s": heap.alloc(4 * nb, "float *"),
                                  "q4": heap.alloc(32 * nb, "int8_t *") if q4 else ffi.NULL})
    assert lib.ps_quantize_q8_isa(isa, heap.put(x.astype(np.float32), "float *"), vec, len(x)) == 0
    return vec, (read(vec.qs, np.int8, 32 * nb), read(vec.d, np.float32, nb), read(vec.s, np.float32, nb))


def numpy_quantize_q8(x: np.ndarray):
    """The activation quantisation in float32 numpy: per block of 32, d = max|x| / 127,
    qs = x * (127 / max|x|) rounded half to even, s = d * sum(qs); a block below 1e-30 is zero."""
    b = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    ok = amax >= Q8_MIN_AMAX
    inv = np.where(ok, np.float32(127) / np.where(ok, amax, np.float32(1)), np.float32(0)).astype(np.float32)
    d = np.where(ok, amax / np.float32(127), np.float32(0)).astype(np.float32)
    qs = np.rint(b * inv[:, None]).astype(np.int8)
    s = (d * qs.astype(np.int32).sum(axis=1).astype(np.float32)).astype(np.float32)
    return qs.reshape(-1), d, s


def weight_codes(name: str, row: np.ndarray):
    """Per block of a quantised row: the integer codes (n_blocks, 32) as ggml's dot uses them
    (Q4_0: nibble - 8), d, and m (Q4_1; else None), all float32."""
    block_bytes = GGML_QUANT_SIZES[TYPES[name][1]][1]
    blocks = row.reshape(-1, block_bytes)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(-1)
    if name == "q8_0":
        return blocks[:, 2:].copy().view(np.int8).astype(np.int64), d, None
    nibbles = blocks[:, -16:].astype(np.int64)
    codes = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1)
    if name == "q4_0":
        return codes - 8, d, None
    return codes, d, blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(-1)


def numpy_dot_q8(name: str, row: np.ndarray, qs: np.ndarray, d: np.ndarray, s: np.ndarray):
    """ggml's reference dot of a weight row with quantised activations (ggml_vec_dot_q8_0_q8_0,
    _q4_0_q8_0, _q4_1_q8_1): an exact integer sum per block, then
    sum += isum * (d_w * d_x) [+ m * s for Q4_1], in float32, block by block.
    Returns the sum and the scale of its rounding error (sum of |block products|)."""
    codes, wd, wm = weight_codes(name, row)
    isum = (codes * qs.reshape(-1, 32).astype(np.int64)).sum(axis=1)
    terms = isum.astype(np.float32) * (wd * d)
    if wm is not None:
        terms = terms + wm * s
    total = np.float32(0)
    for t in terms:
        total = np.float32(total + t)
    abs_qs = np.abs(qs.reshape(-1, 32)).astype(np.int64)
    magnitude = (np.abs(codes) * abs_qs).sum(axis=1) * np.abs(wd * d)
    if wm is not None:
        magnitude = magnitude + np.abs(wm * s)
    if name == "q4_0":           # the SIMD kernels split the codes: nibble * x, then -8 * s
        magnitude = magnitude + 8 * abs_qs.sum(axis=1) * np.abs(wd * d)
    return float(total), float(magnitude.sum()) + 1e-30


def dot_q8(t, row: np.ndarray, vec, n: int, heap: Heap) -> float:
    return t.dot_q8(heap.put(row, "void *"), vec, n)


def q8_activation_cases(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Random blocks of varying scale, then special blocks over the first ones: zeros, a
    block below the 1e-30 floor, rounding ties (max 127: x * 127/max = x), one negative
    spike, huge values."""
    x = random_floats(rng, 32 * n_blocks)
    special = [np.zeros(32), np.full(32, 1e-31) * rng.choice([-1, 1], 32),
               np.concatenate([[127.0], np.arange(31) - 15.5]),      # halves: ties to even
               np.concatenate([[-5.0], rng.uniform(-1, 1, 31)]),
               rng.standard_normal(32) * 1e30]
    for i, block in enumerate(special[:n_blocks]):
        x[32 * i:32 * i + 32] = block
    return x.astype(np.float32)


@pytest.mark.parametrize("isa_name", ISAS)
def test_quantize_q8_matches_numpy(isa_name, heap):
    isa = require_isa(isa_name)
    rng = np.random.default_rng(11)
    for nb in Q8_BLOCK_COUNTS:
        x = q8_activation_cases(rng, nb)
        _, got = quantize_q8(isa, x, heap)
        for name, g, e in zip(("qs", "d", "s"), got, numpy_quantize_q8(x)):
            np.testing.assert_array_equal(g, e, err_msg=f"{name} blocks={nb}")
    # the ties really are there, and round to even
    qs, _, _ = numpy_quantize_q8(q8_activation_cases(rng, 3))
    assert list(qs[64 + 1:64 + 5]) == [-16, -14, -14, -12]


@pytest.mark.parametrize("isa_name", ISAS)
def test_quantize_q8_writes_whole_blocks_only(isa_name, heap):
    """A partial block at the end (a caller's bug) is not quantised: buffers sized for the
    whole blocks are not overrun (AddressSanitizer watches them)."""
    isa = require_isa(isa_name)
    x = random_floats(np.random.default_rng(12), 80)
    _, got = quantize_q8(isa, x, heap, n_blocks=2)
    for g, e in zip(got, numpy_quantize_q8(x[:64])):
        np.testing.assert_array_equal(g, e)


def q4_order(qs: np.ndarray) -> np.ndarray:
    """ps_q8_vec's q4 of these codes: per whole four of blocks, the 16-code halves in the order
    lo(c) lo(c+2) hi(c) hi(c+2) lo(c+1) lo(c+3) hi(c+1) hi(c+3)."""
    fours = qs[:len(qs) // 128 * 128].reshape(-1, 4, 2, 16)      # four, block, half, code
    return fours[:, [0, 2, 0, 2, 1, 3, 1, 3], [0, 0, 1, 1, 0, 0, 1, 1]].reshape(-1)


@pytest.mark.parametrize("isa_name", ISAS)
def test_quantize_q8_fills_q4_where_its_dots_read_it(isa_name, heap):
    """The AVX2 quantisers write q4 in its documented order over the whole fours of blocks and
    nothing after them; the other ISAs, whose dots do not read it, leave it alone."""
    isa = require_isa(isa_name)
    rng = np.random.default_rng(26)
    for nb in Q8_BLOCK_COUNTS + [4, 8, 12]:
        x = q8_activation_cases(rng, nb)
        vec, (qs, _, _) = quantize_q8(isa, x, heap)
        sentinel = np.full(32 * nb, 0x5a, np.uint8)
        ffi.memmove(vec.q4, sentinel.tobytes(), 32 * nb)
        assert lib.ps_quantize_q8_isa(isa, heap.put(x, "float *"), vec, len(x)) == 0
        got = read(vec.q4, np.int8, 32 * nb)
        whole = nb // 4 * 128
        if isa_name in ("avx2", "avx2_vnni"):
            np.testing.assert_array_equal(got[:whole], q4_order(qs), err_msg=f"blocks={nb}")
            np.testing.assert_array_equal(got[whole:], sentinel[whole:].view(np.int8), err_msg=f"blocks={nb}")
        else:
            np.testing.assert_array_equal(got, sentinel.view(np.int8), err_msg=f"blocks={nb}")
    # the order really moves codes: block 2's first half comes second
    codes = np.arange(128, dtype=np.int64).astype(np.int8)
    assert list(q4_order(codes)[16:20]) == [64, 65, 66, 67]


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", ("q4_0", "q4_1"))
def test_q4_dots_give_the_same_bits_without_q4(isa_name, name, heap):
    """x without its q4 buffer (a caller that does not ask for it): every ISA's Q4 dots regroup
    qs themselves and give the bits they give with it, one row and four at a time."""
    isa = require_isa(isa_name)
    t = traits(name, isa)
    rng = np.random.default_rng(27)
    for nb in Q8_BLOCK_COUNTS + [4, 8, 12, 16]:
        n = 32 * nb
        x = q8_activation_cases(rng, nb)
        with_q4, _ = quantize_q8(isa, x, heap)
        without, _ = quantize_q8(isa, x, heap, q4=False)
        rows = [random_row(name, n, rng, heap) for _ in range(4)]
        results = []
        for vec in (with_q4, without):
            results.append(np.array([dot_q8(t, r, vec, n, heap) for r in rows], np.float32))
            if t.dot4_q8 != ffi.NULL:
                out = ffi.new("float[4]")
                t.dot4_q8(ffi.new("void *[4]", [heap.put(r, "void *") for r in rows]), vec, n, out)
                results.append(np.array(list(out), np.float32))
        for r in results[1:]:
            np.testing.assert_array_equal(r.view(np.uint32), results[0].view(np.uint32), err_msg=f"blocks={nb}")


@pytest.mark.parametrize("name", QUANTISED)
def test_scalar_dot_q8_matches_numpy_ggml_reference(name, heap):
    t = traits(name, lib.PS_ISA_SCALAR)
    rng = np.random.default_rng(13)
    for nb in Q8_BLOCK_COUNTS:
        n = 32 * nb
        row = random_row(name, n, rng, heap)
        vec, (qs, d, s) = quantize_q8(lib.PS_ISA_SCALAR, q8_activation_cases(rng, nb), heap)
        expected, magnitude = numpy_dot_q8(name, row, qs, d, s)
        assert abs(dot_q8(t, row, vec, n, heap) - expected) <= 1e-6 * magnitude, f"blocks={nb}"


@pytest.mark.parametrize("name", QUANTISED)
def test_dot_q8_is_close_to_the_float_dot(name, heap):
    """Quantising the activations costs at most a few half-steps of the 8-bit grid per block."""
    ref = traits(name, lib.PS_ISA_SCALAR)
    rng = np.random.default_rng(14)
    n = 32 * 18
    row = random_row(name, n, rng, heap)
    x = rng.standard_normal(n).astype(np.float32)
    vec, (_, d, _) = quantize_q8(lib.PS_ISA_SCALAR, x, heap)
    w = to_float(ref, row, n, heap).astype(np.float64)
    bound = (np.abs(w).reshape(-1, 32).sum(axis=1) * d / 2).sum()   # |x - x_q| <= d/2
    err = abs(dot_q8(ref, row, vec, n, heap) - w @ x)
    assert err <= bound
    assert err > 0                                                   # it is not the float dot


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_dot_q8_only_for_integer_types(isa_name, name):
    isa = require_isa(isa_name)
    assert (traits(name, isa).dot_q8 != ffi.NULL) == (name in QUANTISED)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
def test_simd_dot_q8_matches_scalar(isa_name, name, heap):
    isa = require_isa(isa_name)
    ref, t = traits(name, lib.PS_ISA_SCALAR), traits(name, isa)
    rng = np.random.default_rng(15)
    for nb in Q8_BLOCK_COUNTS:
        n = 32 * nb
        row = random_row(name, n, rng, heap)
        # the special cases, then plain random blocks: past 4 blocks the cases' 1e30 block sets
        # the tolerance, under which an error in any other block would pass unseen
        for x in (q8_activation_cases(rng, nb), random_floats(rng, n)):
            vec, (qs, d, s) = quantize_q8(isa, x, heap)
            _, magnitude = numpy_dot_q8(name, row, qs, d, s)
            got, expected = dot_q8(t, row, vec, n, heap), dot_q8(ref, row, vec, n, heap)
            assert abs(got - expected) <= 1e-6 * magnitude, f"blocks={nb}: {got} vs {expected}"


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("width", [4, 8])
def test_dot4_and_dot8_q8_give_dot_q8s_bits(isa_name, name, width, heap):
    """dot4_q8 (dot8_q8), where an isa has it, is four (eight) dot_q8 calls bit for bit: a
    mat-vec's rows give the same results whichever way its chunks fall (threads) and wherever a
    take's rows start."""
    isa = require_isa(isa_name)
    t = traits(name, isa)
    kernel = t.dot4_q8 if width == 4 else t.dot8_q8
    if kernel == ffi.NULL:
        has = ("avx2", "avx2_vnni", *X86_AVX512) if width == 4 else X86_AVX512
        assert isa_name not in has or name == "q8_0"
        return
    assert name != "q8_0" and (width == 4 or t.dot4_q8 != ffi.NULL)
    rng = np.random.default_rng(19)
    for nb in Q8_BLOCK_COUNTS + [4, 8, 12, 16, 36, 48]:
        n = 32 * nb
        rows = [random_row(name, n, rng, heap) for _ in range(width)]
        vec, _ = quantize_q8(isa, q8_activation_cases(rng, nb), heap)
        ptrs = ffi.new(f"void *[{width}]", [heap.put(r, "void *") for r in rows])
        out = ffi.new(f"float[{width}]")
        kernel(ptrs, vec, n, out)
        singles = np.array([dot_q8(t, r, vec, n, heap) for r in rows], dtype=np.float32)
        assert np.array_equal(np.array(list(out), dtype=np.float32).view(np.uint32), singles.view(np.uint32)), nb


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
def test_dot_q8_sees_every_element(isa_name, name, heap):
    """x = 127 at position j, zero elsewhere: d = 1 and qs[j] = 127, so the dot is 127 * w[j]."""
    isa = require_isa(isa_name)
    t = traits(name, isa)
    rng = np.random.default_rng(16)
    for nb in (1, 3, 5):
        n = 32 * nb
        row = random_row(name, n, rng, heap)
        w = to_float(traits(name, lib.PS_ISA_SCALAR), row, n, heap).astype(np.float64)
        for j in range(n):
            e = np.zeros(n, np.float32)
            e[j] = 127.0
            vec, (qs, d, s) = quantize_q8(isa, e, heap)
            _, magnitude = numpy_dot_q8(name, row, qs, d, s)
            assert abs(dot_q8(t, row, vec, n, heap) - 127 * w[j]) <= 1e-6 * magnitude, f"n={n} j={j}"


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
def test_dot_q8_corrupted_block_changes_result(isa_name, name, heap):
    isa = require_isa(isa_name)
    t = traits(name, isa)
    rng = np.random.default_rng(17)
    n = 160
    row = random_row(name, n, rng, heap)
    vec, _ = quantize_q8(isa, rng.standard_normal(n).astype(np.float32), heap)
    base = dot_q8(t, row, vec, n, heap)
    for byte in (2 * t.block_bytes + 1, len(row) - 1):   # block 2's d exponent, the last code byte
        changed = row.copy()
        changed[byte] ^= 0x14
        assert dot_q8(t, changed, vec, n, heap) != base, byte


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
def test_dot_q8_partial_block_is_not_read(isa_name, name, heap):
    isa = require_isa(isa_name)
    t = traits(name, isa)
    rng = np.random.default_rng(18)
    row = random_row(name, 64, rng, heap)
    vec, _ = quantize_q8(isa, rng.standard_normal(64).astype(np.float32), heap)
    assert dot_q8(t, row, vec, 80, heap) == dot_q8(t, row, vec, 64, heap)


# ------------------------------------------------------------------------------------------
# Prompt batches in int8 (ps_q8_batch, gemm_q8)

GEMM_Q8_SHAPES = [(16, 128, 576), (7, 17, 96), (1, 1, 32), (5, 33, 1568), (4, 16, 64), (13, 40, 160)]


def quantize_q8_batch(isa: int, x: np.ndarray, batch: int, n: int, heap: Heap):
    """x (batch, n) through ps_quantize_q8_batch_isa into exact-size buffers; returns the
    ps_q8_batch and its (qs, d, s, sum) read back."""
    lanes = lib.ps_q8_batch_groups(batch) * 16
    nm = lanes * n // 32
    out = ffi.new("ps_q8_batch *", {"qs": heap.alloc(lanes * n, "int8_t *"), "d": heap.alloc(4 * nm, "float *"),
                                    "s": heap.alloc(4 * nm, "float *"), "sum": heap.alloc(4 * nm, "int32_t *")})
    tmp, _ = quantize_q8(isa, np.zeros(n, np.float32), heap)        # scratch of n
    assert lib.ps_quantize_q8_batch_isa(isa, heap.put(x.astype(np.float32), "float *"), batch, n, tmp, out) == 0
    return out, (read(out.qs, np.int8, lanes * n), read(out.d, np.float32, nm), read(out.s, np.float32, nm),
                 read(out.sum, np.int32, nm))


def numpy_q8_batch(x: np.ndarray, batch: int, n: int):
    """ps_q8_batch's layout built in numpy: each token by numpy_quantize_q8, in groups of 16
    lanes, (group, block, step, lane, 4 codes); the lanes past the batch zeros."""
    groups, nblk = -(-batch // 16), n // 32
    qs = np.zeros((groups * 16, n), np.int8)
    d = np.zeros((groups * 16, nblk), np.float32)
    s = np.zeros((groups * 16, nblk), np.float32)
    for t in range(batch):
        qs[t], d[t], s[t] = numpy_quantize_q8(x[t])
    sums = qs.reshape(groups * 16, nblk, 32).astype(np.int32).sum(axis=2)
    inter = qs.reshape(groups, 16, nblk, 8, 4).transpose(0, 2, 3, 1, 4).reshape(-1)
    meta = lambda a: a.reshape(groups, 16, nblk).transpose(0, 2, 1).reshape(-1)
    return inter, meta(d), meta(s), meta(sums)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("batch,n", [(1, 32), (15, 64), (16, 576), (17, 96), (40, 160)])
def test_quantize_q8_batch_interleaves_what_the_quantiser_makes(isa_name, batch, n, heap):
    isa = require_isa(isa_name)
    rng = np.random.default_rng(batch * 100 + n)
    x = np.stack([q8_activation_cases(rng, n // 32) for _ in range(batch)])
    _, got = quantize_q8_batch(isa, x, batch, n, heap)
    for name, g, e in zip(("qs", "d", "s", "sum"), got, numpy_q8_batch(x, batch, n)):
        np.testing.assert_array_equal(g, e, err_msg=name)


def gemm_q8(isa: int, name: str, rows: np.ndarray, m: int, xb, nb: int, k: int, ldc: int, heap: Heap):
    """ps_gemm_q8_isa into a NaN-filled exact-size c; returns (rc, c as (nb, ldc))."""
    c = heap.put(np.full(nb * ldc, np.nan, dtype=np.float32), "float *")
    rc = lib.ps_gemm_q8_isa(isa, TYPES[name][0], heap.put(rows, "void *"), m, xb, nb, k, c, ldc)
    return rc, read(c, np.float32, nb * ldc).reshape(nb, ldc)


def gemm_q8_case(name: str, m: int, nb: int, k: int, heap: Heap):
    rng = np.random.default_rng(m * 10007 + nb * 101 + k)
    rows = np.concatenate([random_row(name, k, rng, heap) for _ in range(m)])
    x = np.stack([q8_activation_cases(rng, k // 32) if t % 3 == 0 else random_floats(rng, k) for t in range(nb)])
    return rows, x


@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("m,nb,k", GEMM_Q8_SHAPES)
def test_scalar_gemm_q8_matches_numpy(name, m, nb, k, heap):
    """The definition: per row and token, the exact integer dot of each block's codes scaled by
    d_w * d_x (+ m * s for Q4_1), summed over the blocks in float32."""
    rows, x = gemm_q8_case(name, m, nb, k, heap)
    xb, _ = quantize_q8_batch(lib.PS_ISA_SCALAR, x, nb, k, heap)
    rc, got = gemm_q8(lib.PS_ISA_SCALAR, name, rows, m, xb, nb, k, m + 3, heap)
    assert rc == 0
    assert np.all(np.isnan(got[:, m:]))                               # nothing written past m
    row_bytes = len(rows) // m
    for j in range(nb):
        qs, d, s = numpy_quantize_q8(x[j])
        for i in range(m):
            expected, magnitude = numpy_dot_q8(name, rows[i * row_bytes:(i + 1) * row_bytes], qs, d, s)
            assert abs(got[j, i] - expected) <= 1e-6 * magnitude, (j, i)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", QUANTISED)
def test_gemm_q8_of_every_isa_gives_the_scalar_bits(isa_name, name, heap):
    """Where an isa has the kernel, every shape (rows past a tile, tokens past a group of 16,
    a wider ldc) gives the scalar definition's bits (tests/kernels_check.c checks the NEON ones
    under qemu)."""
    isa = require_isa(isa_name)
    assert traits(name, isa).gemm_q8 != ffi.NULL
    for m, nb, k in GEMM_Q8_SHAPES:
        rows, x = gemm_q8_case(name, m, nb, k, heap)
        xb, _ = quantize_q8_batch(isa, x, nb, k, heap)
        rc, got = gemm_q8(isa, name, rows, m, xb, nb, k, m + 2, heap)
        _, want = gemm_q8(lib.PS_ISA_SCALAR, name, rows, m, xb, nb, k, m + 2, heap)
        assert rc == 0
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{m}x{nb}x{k}")


@pytest.mark.parametrize("name", TYPES)
def test_gemm_q8_only_for_integer_types(name, heap):
    has = traits(name, lib.PS_ISA_SCALAR).gemm_q8 != ffi.NULL
    assert has == (name in QUANTISED)
    xb, _ = quantize_q8_batch(lib.PS_ISA_SCALAR, np.ones((1, 32), np.float32), 1, 32, heap)
    rows = np.zeros(128, np.uint8)
    assert (gemm_q8(lib.PS_ISA_SCALAR, name, rows, 1, xb, 1, 32, 1, heap)[0] == 0) == has
    if name in QUANTISED:     # k not a whole number of blocks
        assert gemm_q8(lib.PS_ISA_SCALAR, name, rows, 1, xb, 1, 48, 1, heap)[0] == -1


# ------------------------------------------------------------------------------------------
# f16 / bf16

ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def assert_same_floats(got: np.ndarray, expected: np.ndarray):
    """Bit-equal, except that any NaN matches any NaN."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize("isa_name", ISAS)
def test_f16_to_f32_all_bit_patterns(isa_name, heap):
    isa = require_isa(isa_name)
    expected = ALL_HALVES.view(np.float16).astype(np.float32)
    assert_same_floats(to_float(traits("f16", isa), ALL_HALVES, len(ALL_HALVES), heap), expected)
    if isa == lib.PS_ISA_SCALAR:
        got = np.array([lib.ps_f16_to_f32(int(h)) for h in ALL_HALVES], np.float32)
        assert_same_floats(got, expected)


def f32_to_f16_cases(rng: np.random.Generator) -> np.ndarray:
    """Random bit patterns, every midpoint between neighbouring halves (the ties) and its float
    neighbours, and the edges of the range."""
    finite = ALL_HALVES[:0x7c00].view(np.float16).astype(np.float64)
    mid = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact: 12 significant bits
    edges = np.array([65504, 65519.99, 65520, 65536, 1e6, 2.0**-14, 2.0**-24, 2.0**-25,
                      2.0**-25 * 1.001, 2.0**-26, 1e-45, 0.0, np.inf], np.float32)
    cases = np.concatenate([rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
                            .view(np.float32), mid, np.nextafter(mid, np.float32(0)),
                            np.nextafter(mid, np.float32(np.inf)), edges])
    return np.concatenate([cases, -cases])


def test_f32_to_f16_rounds_like_numpy(heap):
    x = f32_to_f16_cases(np.random.default_rng(7))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    got = from_float(traits("f16", lib.PS_ISA_SCALAR), x, heap).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.all(got[nan] & 0x7e00 == 0x7e00)  # quiet NaNs
    for i in np.random.default_rng(8).choice(np.flatnonzero(~nan), 2000, replace=False):
        assert lib.ps_f32_to_f16(float(x[i])) == got[i]
    # and back: every half survives the round trip
    finite = ALL_HALVES[(ALL_HALVES & 0x7c00) != 0x7c00]
    back = from_float(traits("f16", lib.PS_ISA_SCALAR), finite.view(np.float16).astype(np.float32),
                      heap)
    np.testing.assert_array_equal(back.view(np.uint16), finite)


def test_bf16_conversions(heap):
    bf16 = traits("bf16", lib.PS_ISA_SCALAR)
    widened = ALL_HALVES.astype(np.uint32) << 16
    got = to_float(bf16, ALL_HALVES, len(ALL_HALVES), heap)
    np.testing.assert_array_equal(got.view(np.uint32), widened)
    assert lib.ps_bf16_to_f32(0x3fc0) == 1.5

    # f32 -> bf16 against an independent reference: the nearer of the two bf16 neighbours
    # (in float64), ties to the even one; past the largest bf16 the upper neighbour is 2^128.
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 1 << 16, 20_000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    bits = np.concatenate([bits, ties, ties ^ 1, np.array([0x7f7fffff, 0x7f7f8000, 0x7f800000,
                                                            0xff800000, 0x7fc00001, 0xffa00000],
                                                           np.uint32)])
    x = bits.view(np.float32)
    nan = np.isnan(x)
    lo = bits >> 16
    hi = lo + 1
    with np.errstate(over="ignore", invalid="ignore"):
        lo_v = (lo << 16).view(np.float32).astype(np.float64)
        hi_v = np.where((hi & 0x7fff) == 0x7f80, np.copysign(2.0**128, lo_v),
                        ((hi & 0xffff) << 16).astype(np.uint32).view(np.float32).astype(np.float64))
        dist_lo, dist_hi = np.abs(x - lo_v), np.abs(hi_v - x)
    expected = np.where((dist_hi < dist_lo) | ((dist_hi == dist_lo) & ((lo & 1) == 1)), hi, lo)
    expected = np.where(nan, lo | 0x40, expected).astype(np.uint16)  # NaN: forced quiet (ggml)
    got = from_float(bf16, x, heap).view(np.uint16)
    np.testing.assert_array_equal(got, expected)
    for i in rng.choice(np.flatnonzero(~nan), 2000, replace=False):
        assert lib.ps_f32_to_bf16(float(x[i])) == got[i]


# ------------------------------------------------------------------------------------------
# f32 helpers used by the forward pass

def test_dot_axpy_f32_dispatch(heap):
    rng = np.random.default_rng(10)
    for n in SIZES_PLAIN:
        a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        exact = a.astype(np.float64) @ b
        got = lib.ps_dot_f32(heap.put(a, "float *"), heap.put(b, "float *"), n)
        assert abs(got - exact) <= REL_TOL * np.abs(a.astype(np.float64) * b).sum()
        yp = heap.put(b, "float *")
        lib.ps_axpy_f32(0.5, heap.put(a, "float *"), yp, n)
        assert_axpy_close(read(yp, np.float32, n), 0.5, a, b, b + 0.5 * a.astype(np.float64))


def test_dot_f32_from_threads(heap):
    """The dispatch is shared by the forward pass's threads (cffi releases the GIL)."""
    n = 1001
    a, b = np.linspace(-1, 1, n, dtype=np.float32), np.linspace(2, -3, n, dtype=np.float32)
    ap, bp = heap.put(a, "float *"), heap.put(b, "float *")
    single = lib.ps_dot_f32(ap, bp, n)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: lib.ps_dot_f32(ap, bp, n), range(200)))
    assert results == [single] * 200


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("m,nb,k", [(16, 64, 576), (4, 4, 16), (7, 5, 33), (1, 1, 1), (13, 9, 1001), (16, 3, 1536)])
def test_gemm_matches_numpy(isa_name, m, nb, k, heap):
    isa = require_isa(isa_name)
    rng = np.random.default_rng(m * 1000 + nb * 10 + k)
    lda, ldb, ldc = k + 3, k + 1, m + 2                      # strides wider than the rows
    a = heap.put(random_floats(rng, m * lda), "float *")
    b = heap.put(random_floats(rng, nb * ldb), "float *")
    c = heap.put(np.full(nb * ldc, np.nan, dtype=np.float32), "float *")
    assert lib.ps_gemm_nt_f32_isa(isa, a, lda, m, b, ldb, nb, k, c, ldc) == 0
    A = read(a, np.float32, m * lda).reshape(m, lda)[:, :k].astype(np.float64)
    B = read(b, np.float32, nb * ldb).reshape(nb, ldb)[:, :k].astype(np.float64)
    got = read(c, np.float32, nb * ldc).reshape(nb, ldc)
    expected = B @ A.T
    scale = np.abs(B) @ np.abs(A).T
    assert np.all(np.abs(got[:, :m] - expected) <= 1e-5 * scale + 1e-30)
    assert np.all(np.isnan(got[:, m:]))                        # nothing written past m


def _best_isa_under(env_value: str) -> subprocess.CompletedProcess:
    code = ("from prosparse.native import check_isa_request, ffi, lib\n"
            "check_isa_request()\n"
            "print(ffi.string(lib.ps_kernels_isa_name(lib.ps_kernels_best_isa())).decode())")
    env = dict(os.environ, PROSPARSE_ISA=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("isa_name", ["scalar", "avx2"])
def test_prosparse_isa_picks_a_lower_instruction_set(isa_name):
    require_isa(isa_name)
    run = _best_isa_under(isa_name)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == isa_name


def test_prosparse_isa_refuses_a_name_this_cpu_cannot_run():
    unavailable = [n for n, isa in ISAS.items() if not lib.ps_kernels_isa_available(isa)]
    for value in ["avx9"] + unavailable[:1]:
        run = _best_isa_under(value)
        assert run.returncode != 0
        assert f"PROSPARSE_ISA={value!r} is not an instruction set" in run.stderr
        assert "scalar" in run.stderr                      # the names it could use instead


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", ["f16", "bf16"])
@pytest.mark.parametrize("m,nb,k", [(16, 64, 576), (7, 5, 33), (1, 1, 1), (13, 9, 1001)])
def test_typed_gemm_is_the_f32_gemm_of_the_converted_rows(isa_name, name, m, nb, k, heap):
    """ps_gemm_nt_typed_isa converts F16/BF16 rows inside the kernel: the same bits as the f32
    GEMM on the rows converted first, where the isa has such a kernel (AVX-512; F16 on AVX2
    too); elsewhere it returns -1 and writes nothing (the forward pass then converts into a
    tile itself)."""
    isa = require_isa(isa_name)
    t = traits(name, lib.PS_ISA_SCALAR)
    type_id = getattr(lib, f"PS_TYPE_{name.upper()}")
    rng = np.random.default_rng(m * 7 + nb * 3 + k)
    lda, ldb, ldc = k + 5, k + 1, m + 2
    rows = np.zeros(m * lda, dtype=np.uint16)
    src = random_floats(rng, m * lda)
    for r in range(m):     # each row through the type's own rounding
        t.from_float(ffi.from_buffer("float *", src[r * lda:(r + 1) * lda]),
                     ffi.from_buffer("void *", rows[r * lda:(r + 1) * lda]), lda)
    a = heap.put(rows, "void *")
    a32 = heap.put(to_float(t, rows, m * lda, heap), "float *")
    b = heap.put(random_floats(rng, nb * ldb), "float *")
    got = heap.put(np.full(nb * ldc, np.nan, dtype=np.float32), "float *")
    want = heap.put(np.full(nb * ldc, np.nan, dtype=np.float32), "float *")
    rc = lib.ps_gemm_nt_typed_isa(isa, type_id, a, lda, m, b, ldb, nb, k, got, ldc)
    if isa_name not in X86_AVX512 and not (name == "f16" and isa_name in ("avx2", "avx2_vnni")):
        assert rc == -1
        assert np.all(np.isnan(read(got, np.float32, nb * ldc)))
        return
    assert rc == 0
    assert lib.ps_gemm_nt_f32_isa(isa, a32, lda, m, b, ldb, nb, k, want, ldc) == 0
    g, w = read(got, np.float32, nb * ldc), read(want, np.float32, nb * ldc)
    assert np.array_equal(g.view(np.uint32), w.view(np.uint32))   # nan past m in both


def test_typed_gemm_refuses_quantised_rows_and_says_what_it_takes(heap):
    a = heap.put(np.zeros(64, dtype=np.uint8), "void *")
    b = heap.put(np.zeros(32, dtype=np.float32), "float *")
    c = heap.put(np.full(1, np.nan, dtype=np.float32), "float *")
    assert lib.ps_gemm_nt_typed(lib.PS_TYPE_Q8_0, a, 32, 1, b, 32, 1, 32, c, 1) == -1
    assert np.isnan(read(c, np.float32, 1)[0])
    assert lib.ps_gemm_nt_typed_supported(lib.PS_TYPE_Q8_0) == 0
    assert lib.ps_gemm_nt_typed_supported(lib.PS_TYPE_F32) == 1
    best = ffi.string(lib.ps_kernels_isa_name(lib.ps_kernels_best_isa())).decode()
    assert lib.ps_gemm_nt_typed_supported(lib.PS_TYPE_BF16) == int(best in X86_AVX512)
    assert lib.ps_gemm_nt_typed_supported(lib.PS_TYPE_F16) == int(best in X86_AVX512 + ("avx2", "avx2_vnni"))


# ------------------------------------------------------------------------------------------
# f32 operations of attention and activations (ps_f32_ops)

def exp_inputs() -> np.ndarray:
    """Every range the exp meets: softmax's (-inf, 0], SiLU's both signs, the edges where the
    result turns subnormal, zero or infinite, and specials."""
    rng = np.random.default_rng(11)
    specials = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 88.72, 88.73, 88.8, 89.0, 1e30, -1e30,
                -87.33, -87.34, -100.0, -103.0, -103.97, -103.98, -104.0, -200.0, 1e-8, -1e-8, 0.5 * np.log(2)]
    ramp = np.linspace(-105.0, 89.0, 200_001)
    return np.concatenate([specials, ramp, rng.uniform(-20, 20, 100_000), -rng.exponential(5, 100_000)]).astype(np.float32)


def ulp_error(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|got - e^x| in units of the last place of the float nearest e^x (subnormals: of the
    smallest subnormal), for finite results."""
    exact = np.exp(x.astype(np.float64))
    nearest = exact.astype(np.float32)
    ulp = np.spacing(np.abs(nearest)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / ulp


def run_exp(ops, x: np.ndarray, heap: Heap) -> np.ndarray:
    xp = heap.put(x, "float *")
    y = heap.put(np.full_like(x, 7.0), "float *")
    ops.exp(xp, y, x.size)
    return read(y, np.float32, x.size)


@pytest.mark.parametrize("isa_name", ISAS)
def test_exp_within_1_5_ulp(isa_name, heap):
    ops = lib.ps_f32_ops_for(require_isa(isa_name))
    x = exp_inputs()
    got = run_exp(ops, x, heap)
    with np.errstate(over="ignore"):
        finite = np.isfinite(np.exp(x.astype(np.float64)).astype(np.float32))
    err = ulp_error(got[finite], x[finite])
    assert np.all(err <= 1.5), x[finite][err > 1.5][:5]            # 0.98 at most, measured
    assert np.all(np.isposinf(got[~finite & ~np.isnan(x)]))           # overflow: inf
    assert np.all(np.isnan(got[np.isnan(x)]))
    assert got[x == -np.inf][0] == 0.0 and np.all(got[x <= -104.0] == 0.0)
    assert np.all(got[x == 0.0] == 1.0)


@pytest.mark.parametrize("isa_name", ISAS)
def test_exp_same_bits_as_scalar(isa_name, heap):
    """In place (y = x), every length's tail; the same steps give the same bits in every isa."""
    ops, ref = lib.ps_f32_ops_for(require_isa(isa_name)), lib.ps_f32_ops_for(lib.PS_ISA_SCALAR)
    x = exp_inputs()
    for n in [*SIZES_PLAIN, x.size]:
        xs = x[-n:]
        p = heap.put(xs, "float *")
        ops.exp(p, p, n)
        assert np.array_equal(read(p, np.float32, n), run_exp(ref, xs, heap), equal_nan=True), n


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("v_type", ["f32", "f16"])
@pytest.mark.parametrize("n,k", [(1, 64), (2, 64), (7, 64), (128, 64), (5, 1), (3, 17), (9, 100), (4, 129), (0, 33),
                                 (3, 128), (6, 80)])
def test_weighted_sum_matches_numpy(isa_name, v_type, n, k, heap):
    """Attention's sum of value rows (F32, or an F16 cache's)."""
    ops = lib.ps_f32_ops_for(require_isa(isa_name))
    rng = np.random.default_rng(n * 1000 + k)
    ld = k + 5                                                 # a stride wider than the rows
    w = rng.random(n).astype(np.float32)
    rows = random_floats(rng, max(n * ld - 5, 0))              # the last row ends at column k
    if v_type == "f16":
        rows = rows.astype(np.float16)
    out = heap.put(np.full(k + 1, np.nan, dtype=np.float32), "float *")
    ops.weighted_sum(heap.put(w, "float *"), n, heap.put(rows, "void *"), ld, k,
                     getattr(lib, f"PS_TYPE_{v_type.upper()}"), out)
    got = read(out, np.float32, k + 1)
    R = np.pad(rows.astype(np.float64), (0, 5)).reshape(n, ld)[:, :k] if n else np.zeros((0, k))
    expected = w.astype(np.float64) @ R
    assert np.all(np.abs(got[:k] - expected) <= 1e-5 * (np.abs(w) @ np.abs(R)) + 1e-30)
    assert np.isnan(got[k])                                     # nothing written past k


def scores(ops, q: np.ndarray, keys: np.ndarray, ld: int, n: int, hd: int, k_type: int, heap) -> np.ndarray:
    out = heap.put(np.full(n + 1, np.nan, dtype=np.float32), "float *")
    ops.scores(heap.put(q, "float *"), heap.put(keys, "void *"), ld, n, hd, k_type, out)
    return read(out, np.float32, n + 1)


def key_rows(rng, n: int, ld: int, hd: int, k_type: str) -> tuple[np.ndarray, np.ndarray]:
    """n keys ld elements apart, the last ending at element hd (so reading past it is an
    overrun), as stored (F32 or F16) and as float64."""
    x = random_floats(rng, max((n - 1) * ld + hd, 0))
    stored = x.astype(np.float16) if k_type == "f16" else x
    full = np.pad(stored.astype(np.float64), (0, ld - hd)).reshape(n, ld)[:, :hd] if n else np.zeros((0, hd))
    return stored, full


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("k_type", ["f32", "f16"])
@pytest.mark.parametrize("n,hd", [(1, 64), (15, 64), (16, 64), (17, 64), (100, 64), (40, 1), (33, 17), (20, 128),
                                  (5, 80), (0, 64)])
def test_scores_match_numpy(isa_name, k_type, n, hd, heap):
    """Attention's scores: q against n keys of the cache's type, a stride wider than a head."""
    ops = lib.ps_f32_ops_for(require_isa(isa_name))
    rng = np.random.default_rng(n * 100 + hd)
    ld = hd + 7
    q = random_floats(rng, hd)
    stored, K = key_rows(rng, n, ld, hd, k_type)
    got = scores(ops, q, stored, ld, n, hd, getattr(lib, f"PS_TYPE_{k_type.upper()}"), heap)
    expected = K @ q.astype(np.float64)
    assert np.all(np.abs(got[:n] - expected) <= 1e-5 * (np.abs(K) @ np.abs(q.astype(np.float64))) + 1e-30)
    assert np.isnan(got[n])                                     # nothing written past n


def gemm16(ops, a: np.ndarray, a_rs: int, a_ks: int, m: int, b: np.ndarray, ldb: int, k: int, heap: Heap):
    """ops.gemm16 into a NaN-filled exact-size c of m rows of 17 (a column past the lanes)."""
    c = heap.put(np.full(m * 17, np.nan, dtype=np.float32), "float *")
    ops.gemm16(heap.put(a.astype(np.float32), "float *"), a_rs, a_ks, m, heap.put(b.astype(np.float32), "float *"),
               ldb, k, c, 17)
    return read(c, np.float32, m * 17).reshape(m, 17)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("m,k", [(1, 1), (16, 64), (17, 64), (64, 256), (5, 3), (22, 100), (0, 8)])
def test_gemm16_matches_numpy_and_gives_the_scalar_bits(isa_name, m, k, heap):
    """A prompt's attention product with 16 tokens as lanes, a read along its rows (the keys)
    and down its columns (the values): numpy within float rounding, and the scalar kernel's
    bits (one fma chain per output, in order)."""
    ops, ref = lib.ps_f32_ops_for(require_isa(isa_name)), lib.ps_f32_ops_for(lib.PS_ISA_SCALAR)
    rng = np.random.default_rng(m * 1000 + k)
    ldb = 16 + 3
    b = random_floats(rng, max(k, 1) * ldb)
    B = b.reshape(-1, ldb)[:k, :16].astype(np.float64)
    for a_rs, a_ks, rows in ((k + 2, 1, max(m, 1)), (1, m + 3, max(k, 1))):   # along rows / down columns
        a = random_floats(rng, rows * max(a_rs, a_ks))
        A = np.array([[a[r * a_rs + i * a_ks] for i in range(k)] for r in range(m)], dtype=np.float64).reshape(m, k)
        got = gemm16(ops, a, a_rs, a_ks, m, b, ldb, k, heap)
        assert np.all(np.abs(got[:, :16] - A @ B) <= 1e-5 * (np.abs(A) @ np.abs(B)) + 1e-30)
        assert np.all(np.isnan(got[:, 16]))                   # nothing written past the 16 lanes
        want = gemm16(ref, a, a_rs, a_ks, m, b, ldb, k, heap)
        np.testing.assert_array_equal(got[:, :16].view(np.uint32), want[:, :16].view(np.uint32))


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("n,k", [(1, 16), (64, 576), (63, 288), (19, 96), (5, 7), (64, 1), (0, 32), (40, 140)])
def test_axpy_nonzero_adds_the_nonzero_rows_and_gives_the_scalar_bits(isa_name, n, k, heap):
    """A prompt's down projection from ffn_down_t: y plus the rows whose a is non-zero, a strip
    of columns from `off` on. numpy within float rounding; the scalar kernel's bits (one fma
    chain per element, in row order); a row whose a is zero (or -0) never read (it holds NaN
    here); a NaN a added like any other; nothing written past k."""
    ops, ref = lib.ps_f32_ops_for(require_isa(isa_name)), lib.ps_f32_ops_for(lib.PS_ISA_SCALAR)
    rng = np.random.default_rng(n * 1000 + k)
    off, ld = 3, k + 5
    a = random_floats(rng, max(n, 1))[:n]
    skipped = rng.random(n) < 0.6
    a[skipped] = 0.0
    a[skipped & (rng.random(n) < 0.5)] = -0.0
    rows = random_floats(rng, max(n, 1) * ld)[:n * ld].reshape(n, ld)
    rows[skipped] = np.nan
    y0 = random_floats(rng, k + 1)
    y0[k] = np.nan

    def run(table, a):
        y = heap.put(y0.copy(), "float *")
        table.axpy_nonzero(heap.put(a.astype(np.float32), "float *"), n,
                           heap.put(np.ascontiguousarray(rows, dtype=np.float32), "float *"), ld, off, y, k)
        return read(y, np.float32, k + 1)

    got = run(ops, a)
    assert np.isnan(got[k])                                       # nothing written past k
    used = rows[~skipped][:, off:off + k].astype(np.float64)
    want = y0[:k].astype(np.float64) + a[~skipped].astype(np.float64) @ used
    assert np.all(np.abs(got[:k] - want) <= 1e-5 * (np.abs(y0[:k]) + np.abs(a[~skipped]) @ np.abs(used)) + 1e-30)
    np.testing.assert_array_equal(got.view(np.uint32), run(ref, a).view(np.uint32))
    if n and (~skipped).any():
        a_nan = a.copy()
        a_nan[np.flatnonzero(~skipped)[0]] = np.nan
        assert np.all(np.isnan(run(ops, a_nan)[:k]))


@pytest.mark.parametrize("isa_name", ISAS)
def test_a_positions_score_does_not_depend_on_how_many_there_are(isa_name, heap):
    """Decoding scores one more position each step, a prompt all of them at once: a position's
    score takes the same steps either way (AVX-512 sums 16 positions together)."""
    ops = lib.ps_f32_ops_for(require_isa(isa_name))
    rng = np.random.default_rng(5)
    for k_type in ("f32", "f16"):
        stored, _ = key_rows(rng, 40, 64, 64, k_type)
        q = random_floats(rng, 64)
        type_id = getattr(lib, f"PS_TYPE_{k_type.upper()}")
        every = scores(ops, q, stored, 64, 40, 64, type_id, heap)[:40]
        for n in range(1, 40):
            assert np.array_equal(scores(ops, q, stored, 64, n, 64, type_id, heap)[:n].view(np.uint32),
                                  every[:n].view(np.uint32)), (k_type, n)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100, 1536])
@pytest.mark.parametrize("min_value", [float(np.finfo(np.float32).smallest_subnormal), 0.5, -0.25])
def test_keep_at_least_matches_numpy(isa_name, n, min_value, heap):
    """The sparse FFN's gate: values below min (and NaN) become 0, the indices of the non-zero
    values come out in order; ReLU is min = the smallest positive float (so -0.0, 0 and every
    negative go, every positive stays, subnormals included)."""
    ops = lib.ps_f32_ops_for(require_isa(isa_name))
    rng = np.random.default_rng(n + 7)
    x = rng.standard_normal(n).astype(np.float32)
    specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 0.5, -0.25, 0.49999997],
                        dtype=np.float32)
    x[:min(n, len(specials))] = specials[:min(n, len(specials))]
    xp = heap.put(np.concatenate([x, np.float32([7.0])]), "float *")      # a guard past n
    idx = heap.put(np.full(n + 1, -1, dtype=np.int32), "int32_t *")
    count = ops.keep_at_least(xp, n, min_value, idx)
    kept = np.where(x >= np.float32(min_value), x, np.float32(0))
    got = read(xp, np.float32, n + 1)
    assert np.array_equal(got[:n].view(np.uint32), kept.view(np.uint32))
    assert got[n] == 7.0                                                   # nothing written past n
    expected_idx = np.flatnonzero(kept != 0)
    assert count == len(expected_idx)
    assert np.array_equal(read(idx, np.int32, n + 1)[:count], expected_idx)


def test_f32_ops_lookup():
    assert lib.ps_f32_ops_for(-1) == lib.ps_f32_ops_for(lib.ps_kernels_best_isa())
    for bad in (-2, lib.PS_ISA_COUNT, 99):
        assert lib.ps_f32_ops_for(bad) == ffi.NULL
