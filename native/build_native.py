"""cffi build of the C runtime into ``prosparse._native`` (run by ``pip install``).

The public headers are the cdef: what C exports is declared exactly once.
``PROSPARSE_SANITIZE=address`` builds with AddressSanitizer (see README, "Testing").
``python native/build_native.py DIR`` builds a separate copy into DIR/prosparse/ (tests/asan.sh
uses it, so the installed extension is never replaced while something may be using it).
"""

import os
import re
import sys
from pathlib import Path

from cffi import FFI

NATIVE_DIR = Path(__file__).resolve().parent
HEADERS = ["kernels.h", "prosparse.h"]
SOURCES = ["kernels.c", "threadpool.c", "model.c", "membw.c"]


def _cdef_text(header: Path) -> str:
    """The header without preprocessor lines and comments: what cffi's parser accepts."""
    text = header.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


def _compile_args() -> tuple[list[str], list[str]]:
    compile_args = ["-std=c11", "-O3", "-pthread", "-fno-math-errno", "-Wall", "-Wextra",
                    "-Wno-unused-parameter"]
    link_args = ["-pthread", "-lm"]
    sanitize = os.environ.get("PROSPARSE_SANITIZE", "")
    if sanitize:
        compile_args = [a for a in compile_args if a != "-O3"] + [
            "-O1", "-g", f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        link_args += [f"-fsanitize={sanitize}"]
    return compile_args, link_args


def make_builder(path=os.path.relpath) -> FFI:
    """The extension's builder; sources named through ``path`` (setuptools wants them relative
    to the project root, a build in another directory needs them absolute)."""
    compile_args, link_args = _compile_args()
    builder = FFI()
    builder.cdef("\n".join(_cdef_text(NATIVE_DIR / h) for h in HEADERS))
    builder.set_source(
        "prosparse._native",
        "\n".join(f'#include "{h}"' for h in HEADERS),
        sources=[path(NATIVE_DIR / s) for s in SOURCES],
        include_dirs=[path(NATIVE_DIR)],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    make_builder(path=os.path.abspath).compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".")
