"""Tiny offline fixtures for the training tests: a random LlamaForCausalLM with a byte-level
tokenizer, saved as a HF checkpoint dir, a small English-like corpus, and a recipe for them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the of and to a in is that for it as with be on are this by not or an can from model "
         "sparse neuron layer gate value token weight train step loss small large fast slow data "
         "kernel memory thread cache file read write open close run test").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(**overrides):
    from transformers import LlamaConfig
    settings = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    settings.update(overrides)
    return LlamaConfig(**settings)


def make_tiny_model_dir(path: Path, seed: int = 0, **config) -> Path:
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_corpus(path: Path, documents: int = 40, words: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (path / f"doc{i:03d}.txt").write_text(text.capitalize() + ".\n")
    return path


def tiny_recipe(tmp: Path, model_dir: Path, corpus: Path, **sections) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"path": str(model_dir)},
        "data": {"sources": [str(corpus)], "cache_dir": str(tmp / "tokens"), "seq_len": 32,
                 "heldout_fraction": 0.1},
        "train": {"steps": 8, "micro_batch": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                  "precision": "fp32", "threads": 1},
        "sparsity": {"relu_steps": 2, "stages": [[0.001, 4], [0.01, 6], [0.01, 8]],
                     "sweep_thresholds": [0.0, 0.01]},
        "run": {"out_dir": str(tmp / "run"), "eval_every": 4, "eval_sequences": 8, "eval_batch": 4,
                "save_every": 2, "progress_bar": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(json.dumps(recipe, indent=1))
    return path
