#!/usr/bin/env bash
# Runs the tests that exercise native code against a copy of the C extension built with
# AddressSanitizer in a temporary directory (the installed extension is left alone; conftest.py
# puts $PROSPARSE_NATIVE_DIR first on prosparse's path). Run from the repository root, in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
PROSPARSE_SANITIZE=address python native/build_native.py "$build" >/dev/null
PROSPARSE_NATIVE_DIR="$build/prosparse" \
LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_forward.py tests/test_sparse.py \
    tests/test_gguf_errors.py tests/test_perplexity.py tests/test_bench.py tests/test_reorder.py tests/test_kv_cache.py \
    tests/test_kernels_bf16.py "$@"
