"""Shared fixtures: tiny random LLaMA models built with transformers, written to GGUF."""

from __future__ import annotations

import os

import numpy as np
import pytest

import prosparse

# tests/asan.sh: load the AddressSanitizer build of the C extension from its own directory
if os.environ.get("PROSPARSE_NATIVE_DIR"):
    prosparse.__path__.insert(0, os.environ["PROSPARSE_NATIVE_DIR"])


def pytest_configure(config):
    np.set_printoptions(precision=5, suppress=True)


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once into the cache)."""
    from prosparse.model_cache import default_model_path
    return default_model_path(progress=False)
