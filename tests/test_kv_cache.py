"""The KV cache's type: f32 (the default) or f16 (half the memory and half the bytes a token reads
from it). Tiny random models against transformers, and the real SmolLM2 through prosparse-run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from prosparse import Runtime
from prosparse import constants as K
from test_forward import PROMPT, rel_err
from tiny_models import hf_greedy, hf_logits, tiny_llama, to_gguf


def test_f16_cache_stays_close_to_transformers(tmp_path):
    """Keys and values rounded to f16: logits move by rounding only, greedy text stays the same.
    The prompt fills the cache to the last position (the bounds of the f16 rows)."""
    model = tiny_llama(K.ACT_SILU, seed=21)
    path = to_gguf(model, tmp_path / "m.gguf", "f32")
    tokens = (PROMPT * 4)[:64]
    with Runtime(path, n_ctx=64, threads=2, activations="f32", kv_type="f16") as half, \
            Runtime(path, n_ctx=64, threads=2, activations="f32") as full:
        assert (half.kv_type, full.kv_type) == ("f16", "f32")
        h, f, ref = half.evaluate(tokens), full.evaluate(tokens), hf_logits(model, tokens)
        assert rel_err(f, ref) <= 1e-4
        assert rel_err(h, f) > 2e-5              # rounded (measured 2.5e-4): f16 is really used
        assert rel_err(h, ref) <= 5e-3
        greedy = list(half.generate_tokens(PROMPT, 24, temperature=0, ignore_eos=True))
    assert greedy == hf_greedy(model, PROMPT, 24)


@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_f16_cache_decodes_like_its_prompt_and_the_same_on_any_thread_count(tmp_path, mode):
    """One token at a time reads the same f16 rows a prompt wrote; attention splits work by head
    (a prompt) or by KV head and span of positions (one token), never by thread count, so 1 to 3
    threads give the same bits."""
    model = tiny_llama(K.ACT_RELU, seed=22)
    path = to_gguf(model, tmp_path / "m.gguf", "q8_0", K.ACT_RELU)
    results = []
    for threads in (1, 2, 3):
        with Runtime(path, n_ctx=64, threads=threads, sparse=mode, kv_type="f16", activations="f32") as rt:
            batch = rt.evaluate(PROMPT)
            results.append(rt.evaluate(PROMPT, sequential=True))
            assert rel_err(results[-1], batch) <= 1e-3
    for later in results[1:]:
        np.testing.assert_array_equal(later, results[0])


def test_an_infinite_value_in_the_f16_cache_reaches_no_earlier_token_of_a_prompt(tmp_path):
    """A prompt's attention works in tiles of 16 tokens, each token's later positions masked by a
    weight of 0 while their values are still multiplied: a value stored as inf (F16 past 65504)
    would give 0 x inf = NaN in the earlier tokens of its tile. Such a tile goes token by token,
    so the tokens before it stay finite and equal what decoding gives."""
    import torch
    model = tiny_llama(K.ACT_SILU, seed=23)
    T, at = 7, 10                         # token 7 at position 10 overflows layer 0's values
    with torch.no_grad():
        emb, layer = model.model.embed_tokens.weight, model.model.layers[0]
        emb[:, 0] = 0.0
        emb[T] = 0.0
        emb[T, 0] = 1.0                   # one-hot: its normed input is sqrt(64) x the norm weight
        layer.input_layernorm.weight[0] = 30000.0
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight[:, 0] = 0.0
        layer.self_attn.v_proj.weight[0, 0] = 1.0    # value 240000 in the f16 cache: inf
    path = to_gguf(model, tmp_path / "m.gguf", "f32")
    tokens = [t if t != T else 8 for t in PROMPT]
    tokens[at] = T
    with Runtime(path, n_ctx=64, threads=2, activations="f32", kv_type="f16") as rt:
        batched = rt.evaluate(tokens)
        one_by_one = rt.evaluate(tokens, sequential=True)
    assert not np.all(np.isfinite(one_by_one[at]))   # the overflow is real
    assert np.all(np.isfinite(batched[:at]))
    assert rel_err(batched[:at], one_by_one[:at]) <= 1e-4


def test_unknown_kv_type_is_refused_before_loading(tmp_path):
    path = to_gguf(tiny_llama(), tmp_path / "m.gguf", "f32")
    with pytest.raises(ValueError, match="unknown KV cache type 'q8'; choose one of f32, f16"):
        Runtime(path, n_ctx=16, threads=1, kv_type="q8")


def test_cli_kv_type_f16(smollm2_path):
    """prosparse-run --kv-type f16 on the real model: the same greedy text as f32 for a short
    answer (f16 keys and values move logits by ~1e-3). With f32 activations: 8-bit ones round
    such differences into logits ~1 apart (SmolLM2), and the text then parts at a near-tie
    (after "Paris." on an AVX2 machine)."""
    args = ["-m", str(smollm2_path), "-p", "The capital of France is", "-n", "8", "--temp", "0", "-t", "2",
            "-c", "128", "--activations", "f32"]
    runs = [subprocess.run([sys.executable, "-m", "prosparse.cli", *args, "--kv-type", kv], capture_output=True,
                           text=True, timeout=300) for kv in ("f32", "f16")]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert "Paris" in runs[1].stdout and runs[1].stdout == runs[0].stdout
