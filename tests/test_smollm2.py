"""The real SmolLM2-135M-Instruct Q4_1 GGUF against transformers running the same file
(transformers dequantises it to float32): greedy tokens and logits with float32 activations;
with 8-bit activations (the default for this file), what quantisation noise leaves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prosparse import Runtime

pytestmark = pytest.mark.smollm2

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_TOKENS = 32


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                 dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def rt(smollm2_path):
    with Runtime(smollm2_path, n_ctx=256, threads=2, activations="f32") as runtime:
        yield runtime


@pytest.fixture(scope="module")
def rt_q8(smollm2_path):
    with Runtime(smollm2_path, n_ctx=256, threads=2, activations="q8") as runtime:
        yield runtime


@pytest.fixture(scope="module")
def hf_greedy(hf):
    """prompt -> (prompt ids, transformers' greedy continuation), generated once"""
    tok, model = hf
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        out[prompt] = ids, gen[0, len(ids):].tolist()
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(hf, hf_greedy, rt, prompt):
    tok, _ = hf
    ids, ref = hf_greedy[prompt]
    ours = list(rt.generate_tokens(ids, N_TOKENS, temperature=0, ignore_eos=True))
    assert len(ref) >= 24
    assert ours[:len(ref)] == ref, (tok.decode(ours), tok.decode(ref))


def test_logits_match_transformers(hf, rt):
    tok, model = hf
    ids = tok(PROMPTS[2])["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = rt.evaluate(ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def _mean_nll(logits: np.ndarray, targets: list[int]) -> float:
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.mean(lse - z[np.arange(len(targets)), targets]))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_q8_activations_stay_close_to_transformers(hf, hf_greedy, rt_q8, prompt):
    """8-bit activations are not float32: greedy continuations part from transformers' where
    two tokens are nearly tied (after 16-30 tokens on these prompts; an input one ulp off before
    quantisation moves the logits as much, in transformers too). Teacher-forced on transformers'
    greedy continuation, measured on this file: largest logit error 2.8-4.6% of the largest
    logit, the same top token at 97% of positions, the continuation's mean NLL within 1-3.2%.
    That NLL moves with float rounding far below quantisation's: a softmax exp and SiLU 1 ulp
    apart (logits within 6e-7 in float32 activations) moved "def fibonacci(n):" from -2.1% to
    +3.2%, so the bound is 5%."""
    _, model = hf
    ids, ref_tokens = hf_greedy[prompt]
    with torch.no_grad():
        ref = model(torch.tensor([ids + ref_tokens])).logits[0].numpy()[len(ids) - 1:-1]
    ours = rt_q8.evaluate(ids + ref_tokens, sequential=True)[len(ids) - 1:-1]
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert 1e-3 < err <= 0.1                                   # quantised, and only that
    top = np.sort(ref, -1)
    clear = top[:, -1] - top[:, -2] > 2.0                      # a lead no quantisation noise seen here undoes
    assert np.array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.9
    assert abs(_mean_nll(ours, ref_tokens) / _mean_nll(ref, ref_tokens) - 1) <= 0.05
