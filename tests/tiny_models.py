"""Tiny random LLaMA models (transformers) and their GGUF twins, for correctness tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prosparse import constants as K
from prosparse.convert import write_llama_gguf


class FATReLU(torch.nn.Module):
    """x where x >= threshold, else 0 (ProSparse's shifted ReLU)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        return torch.where(x >= self.threshold, x, torch.zeros_like(x))


def tiny_llama(activation: str = K.ACT_SILU, threshold: float = 0.0, tie: bool = False, seed: int = 0,
               vocab: int = 320, n_layer: int = 2, n_embd: int = 64, n_ff: int = 192, n_head: int = 4,
               n_head_kv: int = 2, max_pos: int = 512) -> LlamaForCausalLM:
    """A random LlamaForCausalLM; ReLU/FATReLU on the gate branch when asked."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=n_embd, intermediate_size=n_ff, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_head_kv, max_position_embeddings=max_pos,
        rms_norm_eps=1e-5, tie_word_embeddings=tie,
        hidden_act="silu" if activation == K.ACT_SILU else "relu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():     # larger than the default init: activations that matter
            p.normal_(0.0, 0.08)
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            if activation == K.ACT_FATRELU:
                layer.mlp.act_fn = FATReLU(threshold)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def to_gguf(model: LlamaForCausalLM, path: Path, outtype: str = "f32", activation: str = K.ACT_SILU,
            threshold: float | None = None, tokenizer_metadata: dict | None = None) -> Path:
    return write_llama_gguf(path, model.config.to_dict(), model.state_dict(), outtype=outtype,
                            activation=activation, threshold=threshold, tokenizer_metadata=tokenizer_metadata)


def hf_logits(model: LlamaForCausalLM, tokens: list[int]):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def hf_greedy(model: LlamaForCausalLM, tokens: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(tokens), dtype=torch.long), pad_token_id=0)
    return out[0, len(tokens):].tolist()
