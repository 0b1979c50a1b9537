"""Put a model file's page cache in a known state, or show it: how runtime/BENCHMARKS.md
(tenth session) timed decoding from 4 KiB against 2 MiB pages.

    python native/bench/page_cache.py small FILE   # drop its cached pages, read back in 4 KiB ones
    python native/bench/page_cache.py huge FILE    # drop them, read back through a MADV_HUGEPAGE map
    python native/bench/page_cache.py show FILE    # share of the file 2 MiB pages map when mapped

then e.g. `prosparse-bench -m FILE -p 0 -n 64 -t 1 -r 3` after each (note that the runtime
itself now rereads a file cached in 4 KiB pages once: gguf_file._map_in_huge_pages; to time
the old behaviour, run a build from before bde7f53). Linux only.
"""

from __future__ import annotations

import mmap
import os
import sys

from prosparse.gguf_file import _HUGE_PAGE, _MADV_POPULATE_READ, _pmd_mapped_bytes, advise_huge_pages


def cache_in_small_pages(path) -> None:
    """Drop the file's cached pages, then read it back without readahead: 4 KiB folios."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off in range(0, os.fstat(fd).st_size, 4096):
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)


def mapped_share(path, drop_first: bool) -> float:
    """Share of the file's 2 MiB-aligned span that 2 MiB pages map through a MADV_HUGEPAGE
    mapping, faulted in; drop_first: after dropping its cached pages (so the mapping reads it
    from disk, in 2 MiB folios where the kernel can)."""
    with open(path, "rb") as f:
        if drop_first:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        advise_huge_pages(mm)
        mm.madvise(_MADV_POPULATE_READ, 0, len(mm))
        share = (_pmd_mapped_bytes(mm) or 0) / (len(mm) // _HUGE_PAGE * _HUGE_PAGE)
        mm.close()
    return share


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("small", "huge", "show"):
        print(__doc__, file=sys.stderr)
        return 2
    what, path = argv
    if what == "small":
        cache_in_small_pages(path)
    print(f"{path}: 2 MiB pages map {100 * mapped_share(path, drop_first=what == 'huge'):.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
