"""The C forward pass against transformers on the same weights: logits and greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from prosparse import Runtime
from prosparse import constants as K
from prosparse.convert import OUTTYPES
from tiny_models import hf_greedy, hf_logits, tiny_llama, to_gguf

PROMPT = [5, 17, 250, 3, 99, 42, 7, 300, 12, 64, 128, 200, 1, 2, 77, 31, 8, 190, 45, 260]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def dequantised_reference(model, outtype: str):
    """The HF model with every matrix rounded through outtype, as the GGUF stores it."""
    ttype = OUTTYPES[outtype]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                q = quants.quantize(p.numpy().astype(np.float32), ttype)
                p.copy_(torch.from_numpy(quants.dequantize(q, ttype).astype(np.float32)))
    return model


ACTIVATIONS = [(K.ACT_SILU, None), (K.ACT_RELU, None), (K.ACT_FATRELU, 0.05)]


@pytest.mark.parametrize("activation,threshold", ACTIVATIONS)
@pytest.mark.parametrize("tie", [False, True])
def test_f32_logits_and_greedy_match_transformers(tmp_path, activation, threshold, tie):
    model = tiny_llama(activation, threshold or 0.0, tie=tie)
    path = to_gguf(model, tmp_path / "m.gguf", "f32", activation, threshold)
    with Runtime(path, n_ctx=128, threads=2) as rt:
        assert rel_err(rt.evaluate(PROMPT), hf_logits(model, PROMPT)) <= 1e-4
        ours = list(rt.generate_tokens(PROMPT, 32, temperature=0, ignore_eos=True))
    assert ours == hf_greedy(model, PROMPT, 32)


@pytest.mark.parametrize("outtype,tol", [("f16", 1e-2), ("bf16", 3e-2)])
def test_half_types_close_to_float32_transformers(tmp_path, outtype, tol):
    model = tiny_llama(K.ACT_RELU)
    path = to_gguf(model, tmp_path / "m.gguf", outtype, K.ACT_RELU)
    with Runtime(path, n_ctx=64, threads=2) as rt:
        assert rel_err(rt.evaluate(PROMPT), hf_logits(model, PROMPT)) <= tol


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_stored_types_match_transformers_on_the_stored_weights(tmp_path, outtype):
    model = tiny_llama(K.ACT_SILU, seed=3)
    path = to_gguf(model, tmp_path / "m.gguf", outtype)
    reference = dequantised_reference(model, outtype)
    with Runtime(path, n_ctx=64, threads=2) as rt:
        err = rel_err(rt.evaluate(PROMPT), hf_logits(reference, PROMPT))
    assert err <= 1e-4, f"{outtype}: relative error {err}"


def test_batched_prompt_equals_token_by_token_and_threads_agree(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=1)
    path = to_gguf(model, tmp_path / "m.gguf", "q8_0", K.ACT_RELU)
    prompt = [(7 * i + 3) % 320 for i in range(150)]          # > one 64-token chunk
    with Runtime(path, n_ctx=256, threads=1) as rt1, Runtime(path, n_ctx=256, threads=2) as rt2:
        batched = rt2.evaluate(prompt)
        one_by_one = np.stack([rt1._model.eval([t], i) for i, t in enumerate(prompt)])
    assert rel_err(batched, one_by_one) <= 1e-5


def test_long_prompt_matches_transformers(tmp_path):
    model = tiny_llama(K.ACT_SILU, seed=2)
    path = to_gguf(model, tmp_path / "m.gguf")
    prompt = [(13 * i + 5) % 320 for i in range(200)]
    with Runtime(path, n_ctx=256, threads=2) as rt:
        assert rel_err(rt.evaluate(prompt), hf_logits(model, prompt)) <= 1e-4


def test_cached_prefix_is_reused_and_gives_the_same_logits(tmp_path):
    model = tiny_llama(K.ACT_SILU, seed=4)
    path = to_gguf(model, tmp_path / "m.gguf")
    with Runtime(path, n_ctx=64, threads=2) as rt:
        rt.evaluate(PROMPT[:10])
        logits = rt._prefill(PROMPT)     # reuses the first 10 positions
        assert rel_err(logits, hf_logits(model, PROMPT)[-1]) <= 1e-4


def test_prompt_longer_than_context_is_a_clear_error(tmp_path):
    path = to_gguf(tiny_llama(), tmp_path / "m.gguf")
    with Runtime(path, n_ctx=16, threads=1) as rt:
        with pytest.raises(ValueError, match="longer than the context"):
            rt.evaluate(PROMPT)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            rt.evaluate([1, 2, 100000])


def test_generation_stops_when_the_context_is_full(tmp_path):
    path = to_gguf(tiny_llama(), tmp_path / "m.gguf")
    with Runtime(path, n_ctx=24, threads=1) as rt:
        out = list(rt.generate_tokens(PROMPT, 100, temperature=0, ignore_eos=True))
        assert len(PROMPT) + len(out) == 24 + 1   # the last sampled token needs no cache slot
        assert rt.timings.stop_reason == "context"
