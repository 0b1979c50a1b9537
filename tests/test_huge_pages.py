"""The runtime maps a model through 2 MiB pages even when the page cache holds it in 4 KiB ones
(gguf_file._map_in_huge_pages): decoding from 4 KiB pages was 5-23% slower."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest

from prosparse import Runtime
from prosparse.gguf_file import (_HUGE_PAGE, _MADV_POPULATE_READ, _huge_pages_enabled, _map_in_huge_pages,
                                 _pmd_mapped_bytes, advise_huge_pages)

pytestmark = pytest.mark.skipif(_MADV_POPULATE_READ is None, reason="Linux only (madvise, /proc/self/smaps)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "native" / "bench"))
from page_cache import cache_in_small_pages, mapped_share  # noqa: E402  (the benchmark's helpers)


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "blob.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(40 << 20))
        f.flush()
        os.fsync(f.fileno())
    if not _huge_pages_enabled():
        pytest.skip("transparent huge pages are off on this machine")
    if mapped_share(path, drop_first=True) < 0.75:   # the best this kernel can do
        pytest.skip("this kernel or file system maps no file through 2 MiB pages")
    return path


def test_small_page_cache_is_read_again_in_huge_pages(blob):
    cache_in_small_pages(blob)
    with open(blob, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        advise_huge_pages(mm)
        mm.madvise(_MADV_POPULATE_READ, 0, len(mm))
        assert (_pmd_mapped_bytes(mm) or 0) < _HUGE_PAGE * 4   # the setup: 4 KiB pages
        data = mm[: 1 << 20]
        mm, share = _map_in_huge_pages(f.fileno(), mm, len(mm))
        try:
            assert share >= 0.75
            assert (_pmd_mapped_bytes(mm) or 0) >= 0.75 * (len(mm) // _HUGE_PAGE * _HUGE_PAGE)
            assert mm[: 1 << 20] == data   # the same file, mapped again
        finally:
            mm.close()


def test_a_mapping_in_huge_pages_is_left_alone(blob):
    mapped_share(blob, drop_first=True)   # cached in 2 MiB folios
    with open(blob, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        advise_huge_pages(mm)
        same, share = _map_in_huge_pages(f.fileno(), mm, len(mm))
        try:
            assert same is mm and share >= 0.75
        finally:
            same.close()


@pytest.mark.smollm2
def test_runtime_maps_the_model_in_huge_pages(smollm2_path):
    if not _huge_pages_enabled() or mapped_share(smollm2_path, drop_first=True) < 0.75:
        pytest.skip("no 2 MiB pages for files on this machine")
    cache_in_small_pages(smollm2_path)
    with Runtime(smollm2_path, n_ctx=32, threads=1) as rt:
        assert rt._gguf.huge_page_share >= 0.75
        assert rt.generate("The capital of France is", max_tokens=4, temperature=0.0)
