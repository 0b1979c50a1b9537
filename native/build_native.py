"""cffi build of the C runtime into ``prosparse._native`` (run by ``pip install``).

The public headers are the cdef: what C exports is declared exactly once.
``PROSPARSE_SANITIZE=address`` builds with AddressSanitizer (see README, "Testing").
"""

import os
import re
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


ffibuilder = FFI()
ffibuilder.cdef("\n".join(_cdef_text(NATIVE_DIR / h) for h in HEADERS))
_compile, _link = _compile_args()
ffibuilder.set_source(
    "prosparse._native",
    "\n".join(f'#include "{h}"' for h in HEADERS),
    sources=[os.path.relpath(NATIVE_DIR / s) for s in SOURCES],
    include_dirs=[os.path.relpath(NATIVE_DIR)],
    extra_compile_args=_compile,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
