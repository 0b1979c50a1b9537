"""The real SmolLM2-135M-Instruct Q4_1 GGUF against transformers running the same file
(transformers dequantises it to float32): greedy tokens and logits."""

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
    with Runtime(smollm2_path, n_ctx=256, threads=2) as runtime:
        yield runtime


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(hf, rt, prompt):
    tok, model = hf
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ref = out[0, len(ids):].tolist()
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
