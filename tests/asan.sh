#!/usr/bin/env bash
# Rebuilds the C extension with AddressSanitizer, runs the tests that exercise native code,
# then restores the normal build. Run from the repository root inside the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."

restore() { python setup.py -q build_ext --inplace --force >/dev/null 2>&1; }
trap restore EXIT

PROSPARSE_SANITIZE=address python setup.py -q build_ext --inplace --force >/dev/null
LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_forward.py tests/test_sparse.py tests/test_gguf_errors.py "$@"
