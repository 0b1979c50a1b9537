"""prosparse-perplexity against a perplexity computed from transformers' logits."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from prosparse import Runtime
from prosparse import constants as K
from prosparse.perplexity import perplexity
from tiny_models import tiny_llama, to_gguf


def reference_ppl(model, tokens: list[int], n_ctx: int, n_chunks: int) -> float:
    nll = []
    for c in range(n_chunks):
        chunk = torch.tensor([tokens[c * n_ctx:(c + 1) * n_ctx]])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
        for i in range(n_ctx // 2, n_ctx):
            nll.append(-logp[i - 1, chunk[0, i]].item())
    return math.exp(sum(nll) / len(nll))


def test_perplexity_matches_transformers_and_sequential_equals_batched(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=21)
    path = to_gguf(model, tmp_path / "m.gguf", "f32", K.ACT_RELU)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 320, size=3 * 32 + 5).tolist()
    with Runtime(path, n_ctx=32, threads=2, sparse="exact") as rt:
        batched = perplexity(rt, tokens, 32)
        sequential = perplexity(rt, tokens, 32, sequential=True)
    expected = reference_ppl(model, tokens, 32, 3)
    assert batched.n_scored == 3 * 16 and len(batched.chunk_ppl) == 3
    assert batched.ppl == pytest.approx(expected, rel=1e-4)
    assert sequential.ppl == pytest.approx(expected, rel=1e-4)
    assert 0 < batched.ppl_error < batched.ppl


def test_too_short_text_is_a_clear_error(tmp_path):
    path = to_gguf(tiny_llama(), tmp_path / "m.gguf")
    with Runtime(path, n_ctx=32, threads=1) as rt:
        with pytest.raises(ValueError, match="less than one chunk"):
            perplexity(rt, [1, 2, 3], 32)


@pytest.mark.smollm2
def test_cli_prints_llama_cpp_final_estimate(tmp_path, smollm2_path):
    text = tmp_path / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 3 +
                     "Paris is the capital and most populous city of France. ") * 20)
    r = subprocess.run([sys.executable, "-m", "prosparse.perplexity", "-m", str(smollm2_path), "-f", str(text),
                        "-c", "128", "--chunks", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})", r.stdout)
    assert m, r.stdout
    assert 1.0 < float(m.group(1)) < 20.0      # repetitive English: a small perplexity
    assert re.search(r"\[1\]\d+\.\d{4}, \[2\]\d+\.\d{4},", r.stdout)


def test_dense_mode_evaluates_in_batches_and_sparse_modes_token_by_token(tmp_path):
    """Batches read what single tokens read (8 bits for integer weights, bf16 for BF16 ones where
    the CPU has AVX512-BF16), so only a sparse mode, which prompt batches do not run, goes token
    by token."""
    from prosparse.perplexity import evaluation_mode
    model = tiny_llama(seed=22)
    for outtype in ("q8_0", "q4_1", "bf16", "f32"):
        with Runtime(to_gguf(model, tmp_path / f"{outtype}.gguf", outtype), n_ctx=32, threads=1,
                     activations="q8") as rt:
            assert evaluation_mode(rt) == (False, "q8 (batches: 8-bit for integer weights, bf16 for BF16 ones, "
                                                  "f32 for others)")
            rt.activations = "f32"
            assert evaluation_mode(rt) == (False, "f32 (batches)")
            rt.sparse = "exact"
            assert evaluation_mode(rt) == (True, "f32")
