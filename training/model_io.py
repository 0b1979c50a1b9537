"""Loading a LLaMA-family model (HF checkpoint dir or GGUF) and exporting the trained one.

The exported config and what reads it
-------------------------------------
transformers has no "fatrelu" in ACT2FN, and LlamaMLP builds its activation from the name alone
(``ACT2FN[config.hidden_act]``, no parameter), so a config with ``hidden_act: fatrelu`` — the
released ProSparse models' form — fails to load in plain ``LlamaForCausalLM``. We therefore
write, by default:

    hidden_act: relu          # plain transformers loads it (as ReLU)
    hidden_act_param: t       # the FATReLU threshold, only when t > 0 (the released models' key)

- ``prosparse.training.load_model`` (and ``prosparse-train eval``) apply FATReLU(t) from
  ``hidden_act_param``: the exact trained model.
- ``prosparse-convert`` reads config.json directly: activation = fatrelu with threshold
  ``hidden_act_param`` when ``hidden_act`` is "fatrelu" or ``hidden_act_param`` > 0, else
  ``hidden_act``. That rule covers these files and the released models alike.
- plain transformers computes ReLU, i.e. ignores the threshold: it differs from the model only
  where 0 < gate < t (small for the t that ProSparse uses).

``export_name="fatrelu"`` writes the released models' exact form instead (``hidden_act: fatrelu``);
loading that in transformers needs ``load_model`` here (or ``register_fatrelu()`` first).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .surgery import FATReLU, set_gate_activation

HIDDEN_ACT_PARAM = "hidden_act_param"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF, from prosparse.model_cache (downloaded once)."""
    try:
        from prosparse.model_cache import default_model_path as cached
    except ImportError as e:
        raise RuntimeError("model.path is 'default' but prosparse.model_cache is not available "
                           f"({e}); give a HF checkpoint dir or a .gguf file as model.path") from None
    return Path(cached())


def register_fatrelu() -> None:
    """Let transformers build ``hidden_act: fatrelu`` (threshold 0 until load_model sets it)."""
    from transformers.activations import ACT2CLS, ACT2FN
    ACT2CLS.setdefault("fatrelu", FATReLU)
    ACT2FN.setdefault("fatrelu", FATReLU)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    path = Path(default_model_path() if str(path) == "default" else path).expanduser()
    if path.suffix == ".gguf":
        return _with_gguf_pre_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), path)
    return AutoTokenizer.from_pretrained(path)


def _with_gguf_pre_tokenizer(tokenizer, path: Path):
    """transformers' GGUF loader ignores ``tokenizer.ggml.pre`` and splits like GPT-2. For
    ``smollm`` (SmolLM2, the default model) restore the model's own split, digits apart first,
    so that training tokenises as the model was trained and exports the right tokenizer.json."""
    from tokenizers import pre_tokenizers

    from prosparse.constants import KEY_TOKENIZER_PRE
    from prosparse.gguf_file import GGUFFile
    with GGUFFile(path) as gf:
        pre = gf.metadata.get(KEY_TOKENIZER_PRE)
    if pre == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tokenizer


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a HF checkpoint dir or a .gguf file ("default": SmolLM2-135M).

    A GGUF is dequantised to float by transformers. The gate activation follows the config:
    ``hidden_act_param`` > 0 (or ``hidden_act: fatrelu``) gives FATReLU with that threshold.
    """
    from transformers import AutoModelForCausalLM

    path = Path(default_model_path() if str(path) == "default" else path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {path}: no such file or directory")
    register_fatrelu()
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    threshold = float(getattr(model.config, HIDDEN_ACT_PARAM, 0.0) or 0.0)
    if model.config.hidden_act == "fatrelu" or threshold > 0:
        set_gate_activation(model, "fatrelu", threshold)
    return model, load_tokenizer(path)


def fresh_copy(model: nn.Module, state_dict: dict | None = None) -> nn.Module:
    """An ordinary model of ``model``'s class and config holding ``state_dict`` (default: its own
    weights) — a GGUF-loaded model refuses save_pretrained, an FSDP one holds only shards."""
    from transformers import AutoModelForCausalLM
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop(HIDDEN_ACT_PARAM, None)
    config_dict["hidden_act"] = "silu"
    config = type(model.config).from_dict(config_dict)
    copy = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    copy.load_state_dict(model.state_dict() if state_dict is None else state_dict, strict=True)
    return copy


def export_hf(model: nn.Module, tokenizer, out_dir: str | Path, activation: str, threshold: float = 0.0,
              export_name: str = "relu", info: dict | None = None) -> Path:
    """Write a HF checkpoint (safetensors, config.json, tokenizer files) atomically.

    activation: "silu", "relu" or "fatrelu" (with ``threshold``); see the module docstring for
    how the threshold is written. ``info`` goes to ``prosparse_training.json`` beside it.
    """
    out_dir = Path(out_dir)
    copy = fresh_copy(model)
    if activation == "silu":
        copy.config.hidden_act = "silu"
    else:
        copy.config.hidden_act = "fatrelu" if (export_name == "fatrelu" and activation == "fatrelu") else "relu"
        if activation == "fatrelu" and threshold > 0:
            setattr(copy.config, HIDDEN_ACT_PARAM, float(threshold))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if info is not None:
        (tmp / "prosparse_training.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir

