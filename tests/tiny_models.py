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


def hf_activations(model: LlamaForCausalLM, tokens: list[int]) -> list:
    """Per layer, act(gate) of every position (transformers' act_fn output): (len(tokens), n_ff)."""
    out = []
    hooks = [layer.mlp.act_fn.register_forward_hook(lambda mod, inp, o: out.append(o[0].detach().numpy()))
             for layer in model.model.layers]
    try:
        hf_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    return out


def hf_greedy(model: LlamaForCausalLM, tokens: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(tokens), dtype=torch.long), pad_token_id=0)
    return out[0, len(tokens):].tolist()


def with_extra(src: Path, dst: Path, tensors: dict | None = None, metadata: dict | None = None,
               magic: bytes | None = None) -> Path:
    """A copy of the GGUF src with extra float32 tensors and metadata (and another magic)."""
    import numpy as np
    from gguf import GGUFWriter, quants

    from prosparse.convert.gguf_writer import _add_value
    from prosparse.gguf_file import GGUFFile

    with GGUFFile(src) as gf:
        writer = GGUFWriter(dst, gf.metadata[K.KEY_ARCHITECTURE])
        for key, value in gf.metadata.items():
            if key not in (K.KEY_ARCHITECTURE, K.KEY_ALIGNMENT):
                _add_value(writer, key, value)
        for key, value in (metadata or {}).items():
            _add_value(writer, key, value)
        for name, t in gf.tensors.items():
            raw = np.array(gf.tensor_data(name))
            shape = list(reversed(t.shape))
            if t.type in (quants.GGMLQuantizationType.F32, quants.GGMLQuantizationType.F16):
                dtype = np.float32 if t.type == quants.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor(name, raw.view(dtype).reshape(shape))
            else:
                writer.add_tensor(name, raw.reshape(shape[:-1] + [-1]), raw_dtype=t.type)
        for name, arr in (tensors or {}).items():
            writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
        writer.close()
    if magic is not None:
        with open(dst, "r+b") as f:
            f.write(magic)
    return dst
