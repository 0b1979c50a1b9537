"""BF16 weights with bf16 activations (the AVX512_BF16 level, vdpbf16ps; native/kernels.c).

- to_bf16 (an activation vector rounded to bf16) in every ISA against a numpy model of
  round-to-nearest-even, specials included, bit for bit;
- dot_bf16 and the bf16 GEMM against float64 sums of the same bf16 values, odd lengths and
  strides included, on CPUs that have AVX512-BF16; elsewhere that there is no such kernel;
- that every element of a row and of the activations counts.

Buffers are malloc'ed at exactly their size (test_kernels.Heap): under AddressSanitizer
(tests/asan.sh) a read past a row's end is reported.
"""

from __future__ import annotations

import numpy as np
import pytest

from prosparse._native import ffi, lib

from test_kernels import ISAS, heap, random_floats, read, require_isa, traits  # noqa: F401 (heap: fixture)

BF16_ISA = "avx512_bf16"
SIZES = [1, 2, 3, 31, 32, 33, 63, 64, 65, 100, 576, 1001, 1536]


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """x rounded to bf16 bit patterns: nearest, ties to even; NaN kept, made quiet."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (b >> 16) | 0x40, rounded).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_bf16(isa: int, x: np.ndarray, heap) -> np.ndarray:
    out = heap.alloc(2 * len(x), "uint16_t *")
    lib.ps_f32_ops_for(isa).to_bf16(heap.put(x.astype(np.float32), "float *"), out, len(x))
    return read(out, np.uint16, len(x))


def special_floats() -> np.ndarray:
    bits = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000,       # zeros, infinities
            0x7FC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF,       # quiet and signalling NaNs
            0x00000001, 0x807FFFFF, 0x00008000, 0x00018000,       # subnormals, ties among them
            0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,       # ties to even, just past, just before
            0x7F7FFFFF, 0x7F7F8000, 0xFF7F7FFF]                    # rounding up to infinity, or not
    return np.array(bits, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("isa_name", ISAS)
def test_to_bf16_rounds_to_nearest_even_in_every_isa(isa_name, heap):
    isa = require_isa(isa_name)
    rng = np.random.default_rng(3)
    cases = [special_floats(), random_floats(rng, 1000), rng.integers(0, 2**32, 5000, dtype=np.uint32).view(np.float32)]
    cases += [random_floats(rng, n) for n in (1, 15, 17, 33)]           # the vector loops' tails
    for x in cases:
        assert np.array_equal(to_bf16(isa, x, heap), bf16_reference(x))
    x = special_floats()
    assert [lib.ps_f32_to_bf16(float(v)) for v in x] == bf16_reference(x).tolist()   # the scalar helper agrees


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("name", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_only_avx512_bf16_has_a_bf16_dot_and_only_for_bf16_rows(isa_name, name):
    isa = require_isa(isa_name)
    has = traits(name, isa).dot_bf16 != ffi.NULL
    assert has == (isa_name == BF16_ISA and name == "bf16")


def random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    return bf16_reference(random_floats(rng, n))


def dot_bf16(t, w: np.ndarray, x: np.ndarray, heap) -> float:
    return t.dot_bf16(heap.put(w, "void *"), heap.put(x, "uint16_t *"), len(w))


@pytest.mark.parametrize("n", SIZES)
def test_dot_bf16_is_the_sum_of_the_bf16_products(n, heap):
    """Each pair of bf16 products is exact in f32; only the f32 additions round."""
    t = traits("bf16", require_isa(BF16_ISA))
    rng = np.random.default_rng(n)
    for _ in range(5):
        w, x = random_bf16(rng, n), random_bf16(rng, n)
        prods = bf16_values(w).astype(np.float64) * bf16_values(x).astype(np.float64)
        got = dot_bf16(t, w, x, heap)
        assert abs(got - prods.sum()) <= 1e-5 * np.abs(prods).sum() + 1e-30


@pytest.mark.parametrize("n", [1, 33, 65, 100])
def test_every_element_of_a_bf16_dot_counts(n, heap):
    t = traits("bf16", require_isa(BF16_ISA))
    w = bf16_reference(np.ones(n, np.float32))
    x = bf16_reference(np.ones(n, np.float32))
    three = bf16_reference(np.array([3.0], np.float32))[0]
    assert dot_bf16(t, w, x, heap) == n
    for i in range(n):
        w3, x3 = w.copy(), x.copy()
        w3[i] = x3[i] = three
        assert dot_bf16(t, w3, x, heap) == n + 2, i
        assert dot_bf16(t, w, x3, heap) == n + 2, i


def gemm_bf16(isa: int, a: np.ndarray, lda: int, m: int, b: np.ndarray, ldb: int, nb: int, k: int, ldc: int, heap):
    c = heap.put(np.full(nb * ldc, np.nan, dtype=np.float32), "float *")
    rc = lib.ps_gemm_nt_bf16_isa(isa, heap.put(a, "void *"), lda, m, heap.put(b, "uint16_t *"), ldb, nb, k, c, ldc)
    return rc, read(c, np.float32, nb * ldc).reshape(nb, ldc)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("m,nb,k", [(16, 64, 576), (4, 4, 32), (7, 5, 33), (1, 1, 1), (13, 9, 1001), (16, 3, 1536),
                                    (5, 6, 31)])
def test_bf16_gemm_matches_numpy(isa_name, m, nb, k, heap):
    """c = b a^T over bf16 values, strides wider than the rows; nothing written past m. Other
    ISAs return -1 and write nothing (the forward pass then reads f32 activations)."""
    isa = require_isa(isa_name)
    rng = np.random.default_rng(m * 1000 + nb * 10 + k)
    lda, ldb, ldc = k + 3, k + 1, m + 2
    a, b = random_bf16(rng, m * lda), random_bf16(rng, nb * ldb)
    rc, got = gemm_bf16(isa, a, lda, m, b, ldb, nb, k, ldc, heap)
    if isa_name != BF16_ISA:
        assert rc == -1 and np.all(np.isnan(got))
        return
    assert rc == 0
    A = bf16_values(a).reshape(m, lda)[:, :k].astype(np.float64)
    B = bf16_values(b).reshape(nb, ldb)[:, :k].astype(np.float64)
    assert np.all(np.abs(got[:, :m] - B @ A.T) <= 1e-5 * (np.abs(B) @ np.abs(A).T) + 1e-30)
    assert np.all(np.isnan(got[:, m:]))


def test_bf16_gemm_support_follows_the_best_isa():
    best = ffi.string(lib.ps_kernels_isa_name(lib.ps_kernels_best_isa())).decode()
    assert lib.ps_gemm_nt_bf16_supported() == int(best == BF16_ISA)
