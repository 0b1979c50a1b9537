"""prosparse-convert: HF checkpoint directories (LLaMA, SparseLlama, MiniCPM; safetensors and .bin,
sharded or not, f32/bf16) → GGUF, checked through the runtime against transformers (or a torch
reference for MiniCPM); tokenizers against HF; predictors; PowerInfer files; every bad input."""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, TokenType, quants
from safetensors.torch import save_file

from prosparse import Runtime
from prosparse import constants as K
from prosparse.convert import OUTTYPES, convert_checkpoint
from prosparse.convert.cli import main
from prosparse.gguf_file import GGUFFile
from prosparse.tokenizer import Tokenizer
from test_forward import PROMPT, rel_err
from tiny_models import FATReLU, hf_logits, tiny_llama

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say it's fine",
         "def foo(x):\n    return x ** 2  # square\n", "3.14159 and 1,000,000 and 12345678901234567890",
         "Café naïve résumé — “quotes”", "你好，世界！", "Emoji: 😀👍🏽 and ❤️", "tabs\tand\tnewlines\r\n",
         "multiple     spaces\n\n\nand blank lines"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---------------------------------------------------------------------------------------------
# Building checkpoint directories
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def training_text() -> list[str]:
    sources = [inspect.getsource(importlib.import_module(m)) for m in ("textwrap", "json.decoder", "fractions")]
    return sources + TEXTS * 20


def byte_level_tokenizer(directory: Path, vocab_size: int = 300, llama3_split: bool = False,
                         add_bos: bool = False) -> None:
    """A byte-level BPE trained here, saved as tokenizer.json + tokenizer_config.json. The
    pre-tokenizer is GPT-2's ByteLevel, or (llama3_split) Llama 3's Split regex + ByteLevel."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    if llama3_split:
        from prosparse.convert.vocab import _RE_LLAMA3
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_RE_LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "add_bos_token": add_bos}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def llama_dir(directory: Path, model, tokenizer: bool = True, **config_overrides) -> Path:
    """save_pretrained of ``model`` (safetensors) plus a byte-level tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if config_overrides:
        edit_config(directory, **config_overrides)
    if tokenizer:
        byte_level_tokenizer(directory, vocab_size=min(300, model.config.vocab_size))
    return directory


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def convert(src: Path, out: Path, *args: str) -> Path:
    assert main([str(src), "-o", str(out), "-q", *args]) == 0
    return out


def runtime_logits(path: Path, tokens=PROMPT, **kwargs) -> np.ndarray:
    """Logits of a converted file, with float activations unless asked otherwise: these tests
    check conversions against float references (q8 mode reads quantised inputs, prompts too)."""
    kwargs.setdefault("activations", "f32")
    with Runtime(path, n_ctx=64, threads=2, **kwargs) as rt:
        return rt.evaluate(tokens)


def metadata(path: Path) -> dict:
    with GGUFFile(path) as gf:
        return gf.metadata


def tensor_types(path: Path) -> dict[str, tuple[tuple[int, ...], GGMLQuantizationType]]:
    with GGUFFile(path) as gf:
        return {name: (tuple(t.shape), t.type) for name, t in gf.tensors.items()}


def stored(w: np.ndarray, outtype: str, transposed: bool = False) -> np.ndarray:
    """w as the GGUF stores it in outtype: rounded along its rows (along its columns when the
    file holds it transposed); rows that do not fill whole blocks stay float32."""
    ttype = OUTTYPES[outtype]
    w = np.ascontiguousarray(w.T if transposed else w, dtype=np.float32)
    if w.shape[-1] % quants.GGML_QUANT_SIZES[ttype][0] == 0:
        w = quants.dequantize(quants.quantize(w, ttype), ttype).reshape(w.shape).astype(np.float32)
    return np.ascontiguousarray(w.T if transposed else w)


def stored_reference(model, outtype: str, layout: str = "sparse"):
    """The HF model with every matrix as the GGUF stores it (ffn_down_t: down_proj transposed)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                transposed = layout == "sparse" and name.endswith("down_proj.weight")
                p.copy_(torch.from_numpy(stored(p.numpy(), outtype, transposed)))
    return model


# ---------------------------------------------------------------------------------------------
# Round trips through the runtime
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_round_trip_every_outtype(tmp_path, outtype):
    model = tiny_llama(K.ACT_RELU, seed=3)
    out = convert(llama_dir(tmp_path / "ckpt", model), tmp_path / "m.gguf", "--outtype", outtype)
    types = tensor_types(out)
    assert types[K.block_tensor(0, K.FFN_DOWN_T)] == ((64, 192), OUTTYPES[outtype])   # sparse layout by default
    assert K.block_tensor(0, K.FFN_DOWN) not in types
    assert types[K.block_tensor(0, K.ATTN_NORM)][1] == GGMLQuantizationType.F32
    meta = metadata(out)
    assert meta[K.KEY_ACTIVATION] == K.ACT_RELU and K.KEY_ACTIVATION_THRESHOLD not in meta
    # f32 activations: BF16 weights otherwise read bf16 ones where the CPU has AVX512-BF16
    err = rel_err(runtime_logits(out, activations="f32"), hf_logits(stored_reference(model, outtype), PROMPT))
    assert err <= 1e-4, f"{outtype}: relative error {err}"


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_sparse_layout_gives_the_dense_layout_logits(tmp_path, outtype):
    src = llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_RELU, seed=4))
    dense = convert(src, tmp_path / "dense.gguf", "--layout", "dense", "--outtype", outtype)
    sparse = convert(src, tmp_path / "sparse.gguf", "--layout", "sparse", "--outtype", outtype)
    assert K.block_tensor(1, K.FFN_DOWN) in tensor_types(dense)
    assert K.block_tensor(1, K.FFN_DOWN_T) in tensor_types(sparse)
    # float activations: the dense layout's down projection takes its input in 8 bits (q8
    # mode, prompts included), the sparse layout's per-neuron one in f32, which is not what
    # this test is about
    reference = runtime_logits(dense, sparse="dense", activations="f32")
    tol = 1e-5 if outtype == "f32" else 2e-2          # q8_0 blocks run along different axes
    assert rel_err(runtime_logits(sparse, sparse="dense", activations="f32"), reference) <= tol
    assert rel_err(runtime_logits(sparse, sparse="exact", activations="f32"), reference) <= tol


@pytest.mark.parametrize("layout,outtype", [("sparse", "q8_0"), ("dense", "f16")])
def test_calibration_sorts_neurons_hottest_first(tmp_path, layout, outtype, capsys):
    from prosparse.convert import reorder
    model = tiny_llama(K.ACT_RELU, seed=12)
    src = llama_dir(tmp_path / "ckpt", model)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(training_text()) * 3)
    plain = convert(src, tmp_path / "plain.gguf", "--layout", layout, "--outtype", outtype)
    assert main([str(src), "-o", str(tmp_path / "hot.gguf"), "--layout", layout, "--outtype", outtype,
                 "--calibration", str(text), "--calibration-tokens", "300"]) == 0
    assert "neurons hottest first" in capsys.readouterr().err
    hot = tmp_path / "hot.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "ckpt", "hot.gguf", "plain.gguf"]
    meta = metadata(hot)
    assert meta[reorder.KEY_NEURON_ORDER] == reorder.NEURON_ORDER_FREQUENCY
    assert 300 <= meta[reorder.KEY_NEURON_ORDER_TOKENS] <= 302            # the text's tokens and a BOS per window
    with Runtime(hot, n_ctx=512, threads=2, sparse_stats=True) as rt:
        tokens = rt.tokenize(text.read_text(), add_bos=False, special=False)[:300]
        rt.evaluate(rt.tokenize("", add_bos=True) + tokens)
        counts = rt.activation_counts()
    assert np.all(np.diff(counts, axis=1) <= 0), "neurons by descending activation count"
    assert rel_err(runtime_logits(hot, sparse="exact"), runtime_logits(plain, sparse="exact")) <= 1e-4
    assert rel_err(runtime_logits(hot, sparse="dense"), runtime_logits(plain, sparse="dense")) <= 1e-4


def test_calibration_refusals(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("some text " * 50)
    silu = llama_dir(tmp_path / "silu", tiny_llama(K.ACT_SILU, seed=13))
    relu = llama_dir(tmp_path / "relu", tiny_llama(K.ACT_RELU, seed=13))
    for src, args, message in [
            (silu, [], "needs a relu or fatrelu model"),
            (relu, ["--layout", "dense", "--outtype", "q8_0"], "needs a float --outtype"),
            (relu, ["--no-tokenizer"], "needs the tokenizer"),
            (relu, ["--calibration", str(tmp_path / "missing.txt")], "missing.txt: cannot read the calibration"),
    ]:
        args = ["--calibration", str(text)] + args if "--calibration" not in args else args
        assert main([str(src), "-o", str(tmp_path / "out.gguf"), "-q", *args]) == 1
        assert message in capsys.readouterr().err
    assert not any(p.suffix == ".gguf" or p.name.startswith(".out") for p in tmp_path.iterdir())


def test_silu_model_defaults_to_the_dense_layout(tmp_path):
    model = tiny_llama(K.ACT_SILU, seed=6, tie=True)
    out = convert(llama_dir(tmp_path / "ckpt", model), tmp_path / "m.gguf", "--outtype", "f32")
    types = tensor_types(out)
    assert K.block_tensor(0, K.FFN_DOWN) in types and K.OUTPUT not in types        # tied head
    assert metadata(out)[K.KEY_ACTIVATION] == K.ACT_SILU
    assert rel_err(runtime_logits(out), hf_logits(model, PROMPT)) <= 1e-4


def sparsellama_dir(directory: Path, model, threshold: float) -> Path:
    """ProSparse's released form: SparseLlamaForCausalLM, hidden_act fatrelu + hidden_act_param,
    weights written with safetensors' save_file."""
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    config.update(architectures=["SparseLlamaForCausalLM"], model_type="sparsellama", hidden_act="fatrelu",
                  hidden_act_param=threshold)
    (directory / "config.json").write_text(json.dumps(config))
    byte_level_tokenizer(directory)
    return directory


def with_fatrelu(model, threshold: float):
    for layer in model.model.layers:
        layer.mlp.act_fn = FATReLU(threshold)
    return model


def test_sparsellama_fatrelu_threshold_and_override(tmp_path):
    model = tiny_llama(K.ACT_FATRELU, 0.01, seed=7)
    src = sparsellama_dir(tmp_path / "ckpt", model, 0.01)
    out = convert(src, tmp_path / "m.gguf", "--outtype", "f32")
    meta = metadata(out)
    assert meta[K.KEY_ARCHITECTURE] == K.ARCH_LLAMA and meta[K.KEY_ACTIVATION] == K.ACT_FATRELU
    assert meta[K.KEY_ACTIVATION_THRESHOLD] == pytest.approx(0.01)
    assert rel_err(runtime_logits(out), hf_logits(model, PROMPT)) <= 1e-4

    shifted = convert(src, tmp_path / "shifted.gguf", "--outtype", "f32", "--threshold", "0.2")
    assert metadata(shifted)[K.KEY_ACTIVATION_THRESHOLD] == pytest.approx(0.2)
    assert rel_err(runtime_logits(shifted), hf_logits(with_fatrelu(model, 0.2), PROMPT)) <= 1e-4
    relu = convert(src, tmp_path / "relu.gguf", "--outtype", "f32", "--threshold", "0")
    assert metadata(relu)[K.KEY_ACTIVATION] == K.ACT_RELU


def test_relu_config_with_hidden_act_param_is_fatrelu(tmp_path):
    """prosparse.training's export: hidden_act relu + hidden_act_param t."""
    model = tiny_llama(K.ACT_FATRELU, 0.05, seed=8)
    src = llama_dir(tmp_path / "ckpt", model, hidden_act="relu", hidden_act_param=0.05)
    out = convert(src, tmp_path / "m.gguf", "--outtype", "f32")
    meta = metadata(out)
    assert (meta[K.KEY_ACTIVATION], meta[K.KEY_ACTIVATION_THRESHOLD]) == (K.ACT_FATRELU, pytest.approx(0.05))
    assert rel_err(runtime_logits(out), hf_logits(model, PROMPT)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Weight files: sharded safetensors, .bin (single and sharded), bf16
# ---------------------------------------------------------------------------------------------

def test_sharded_safetensors(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=9)
    src = tmp_path / "ckpt"
    model.save_pretrained(src, max_shard_size="100KB")
    byte_level_tokenizer(src)
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    out = convert(src, tmp_path / "m.gguf", "--outtype", "f32")
    assert rel_err(runtime_logits(out), hf_logits(model, PROMPT)) <= 1e-4


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin(tmp_path, shards):
    model = tiny_llama(K.ACT_RELU, seed=10)
    src = llama_dir(tmp_path / "ckpt", model)
    (src / "model.safetensors").unlink()
    state = model.state_dict()
    names = list(state)
    if shards == 1:
        torch.save(state, src / "pytorch_model.bin")
    else:
        parts = [names[:len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(parts, 1):
            file = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({n: state[n] for n in part}, src / file)
            weight_map.update(dict.fromkeys(part, file))
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = convert(src, tmp_path / "m.gguf", "--outtype", "f32")
    assert rel_err(runtime_logits(out), hf_logits(model, PROMPT)) <= 1e-4


def test_bf16_checkpoint(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=11)
    src = llama_dir(tmp_path / "ckpt", copy.deepcopy(model).to(torch.bfloat16))
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():                 # the reference: the same bf16 values, in a float32 model
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    out = convert(src, tmp_path / "m.gguf", "--outtype", "f32")
    assert rel_err(runtime_logits(out), hf_logits(model, PROMPT)) <= 1e-4
    bf16 = convert(src, tmp_path / "bf16.gguf", "--outtype", "bf16")           # exact: no second rounding
    assert rel_err(runtime_logits(bf16, activations="f32"), runtime_logits(out)) <= 1e-5


def test_rows_that_do_not_fill_a_block_stay_f32_and_are_reported(tmp_path, capsys):
    model = tiny_llama(K.ACT_RELU, seed=12, n_ff=200)
    src = llama_dir(tmp_path / "ckpt", model)
    assert main([str(src), "-o", str(tmp_path / "m.gguf"), "--outtype", "q8_0", "--layout", "dense"]) == 0
    types = tensor_types(tmp_path / "m.gguf")
    assert types[K.block_tensor(0, K.FFN_DOWN)][1] == GGMLQuantizationType.F32      # rows of 200
    assert types[K.block_tensor(0, K.FFN_GATE)][1] == GGMLQuantizationType.Q8_0     # rows of 64
    err = capsys.readouterr().err
    assert "2 matrices kept in F32" in err and "blk.0.ffn_down.weight" in err
    assert "wrote" in err and "q8_0" in err
    err_q = rel_err(runtime_logits(tmp_path / "m.gguf"), hf_logits(stored_reference(model, "q8_0", "dense"), PROMPT))
    assert err_q <= 1e-4


# ---------------------------------------------------------------------------------------------
# MiniCPM
# ---------------------------------------------------------------------------------------------

MINICPM = dict(scale_emb=12.0, scale_depth=1.4, dim_model_base=16)


def reference_forward(sd: dict, cfg: dict, tokens: list[int], act) -> np.ndarray:
    """MiniCPM's forward in plain torch (HF weight layout, rotate_half RoPE): embeddings × scale_emb,
    each residual branch × scale_depth/√n_layer, head on h / (hidden/dim_model_base), tied head."""
    n, dim, n_layer = len(tokens), cfg["hidden_size"], cfg["num_hidden_layers"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = dim // n_head, cfg["rms_norm_eps"]
    residual = cfg["scale_depth"] / math.sqrt(n_layer)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = (torch.cat([f(angles)] * 2, -1).float() for f in (torch.cos, torch.sin))

    def rope(t):                                    # (heads, n, hd)
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def w(i, name):
        return sd[f"model.layers.{i}.{name}.weight"]

    x = sd["model.embed_tokens.weight"][tokens] * cfg["scale_emb"]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(n_layer):
        h = rms(x, w(i, "input_layernorm"))
        q = rope((h @ w(i, "self_attn.q_proj").T).view(n, n_head, hd).transpose(0, 1))
        k = rope((h @ w(i, "self_attn.k_proj").T).view(n, n_kv, hd).transpose(0, 1))
        v = (h @ w(i, "self_attn.v_proj").T).view(n, n_kv, hd).transpose(0, 1)
        k, v = (t.repeat_interleave(n_head // n_kv, 0) for t in (k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1)
        x = x + ((att @ v).transpose(0, 1).reshape(n, dim) @ w(i, "self_attn.o_proj").T) * residual
        h = rms(x, w(i, "post_attention_layernorm"))
        ffn = (act(h @ w(i, "mlp.gate_proj").T) * (h @ w(i, "mlp.up_proj").T)) @ w(i, "mlp.down_proj").T
        x = x + ffn * residual
    x = rms(x, sd["model.norm.weight"])
    return ((x / (dim / cfg["dim_model_base"])) @ sd["model.embed_tokens.weight"].T).numpy()


def minicpm_dir(directory: Path, threshold: float = 0.03, seed: int = 13,
                dtype=torch.float32) -> tuple[Path, dict, dict]:
    """A tiny MiniCPM-S checkpoint: config.json by hand, safetensors via save_file, tied head."""
    model = tiny_llama(K.ACT_FATRELU, threshold, tie=True, seed=seed)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    cfg = dict(architectures=["MiniCPMForCausalLM"], model_type="minicpm", vocab_size=320, hidden_size=64,
               intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="fatrelu",
               hidden_act_param=threshold, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
               auto_map={"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}, **MINICPM)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "modeling_minicpm.py").write_text("raise RuntimeError('custom code must never run')\n")
    save_file(sd, str(directory / "model.safetensors"))
    byte_level_tokenizer(directory)
    return directory, {k: v.float() for k, v in sd.items()}, cfg


def test_minicpm_matches_a_torch_reference(tmp_path):
    src, sd, cfg = minicpm_dir(tmp_path / "ckpt")
    out = convert(src, tmp_path / "m.gguf", "--outtype", "f32")
    meta = metadata(out)
    assert meta[K.KEY_ARCHITECTURE] == K.ARCH_MINICPM
    assert meta[K.arch_key(K.ARCH_MINICPM, K.EMBEDDING_SCALE)] == pytest.approx(12.0)
    assert meta[K.arch_key(K.ARCH_MINICPM, K.RESIDUAL_SCALE)] == pytest.approx(1.4 / math.sqrt(2))
    assert meta[K.arch_key(K.ARCH_MINICPM, K.LOGIT_SCALE)] == pytest.approx(64 / 16)     # llama.cpp divides by it
    assert (meta[K.KEY_ACTIVATION], meta[K.KEY_ACTIVATION_THRESHOLD]) == (K.ACT_FATRELU, pytest.approx(0.03))
    assert K.OUTPUT not in tensor_types(out)
    with torch.no_grad():
        reference = reference_forward(sd, cfg, PROMPT, lambda g: torch.where(g >= 0.03, g, torch.zeros_like(g)))
    assert rel_err(runtime_logits(out, sparse="dense"), reference) <= 1e-4
    assert rel_err(runtime_logits(out, sparse="exact"), reference) <= 1e-4


def test_minicpm_bf16_quantised(tmp_path):
    src, sd, cfg = minicpm_dir(tmp_path / "ckpt", seed=14, dtype=torch.bfloat16)
    out = convert(src, tmp_path / "m.gguf", "--outtype", "q8_0")
    rounded = {k: torch.from_numpy(stored(v.numpy(), "q8_0", k.endswith("down_proj.weight"))) if v.ndim == 2 else v
               for k, v in sd.items()}
    with torch.no_grad():
        reference = reference_forward(rounded, cfg, PROMPT, lambda g: torch.where(g >= 0.03, g, torch.zeros_like(g)))
    assert rel_err(runtime_logits(out), reference) <= 1e-4


def test_the_torch_reference_is_llama_when_the_scales_are_one():
    model = tiny_llama(K.ACT_RELU, tie=True, seed=15)
    cfg = dict(model.config.to_dict(), rope_theta=10000.0, scale_emb=1.0, scale_depth=math.sqrt(2),
               dim_model_base=64)
    with torch.no_grad():
        ours = reference_forward({k: v.float() for k, v in model.state_dict().items()}, cfg, PROMPT, torch.relu)
    assert rel_err(ours, hf_logits(model, PROMPT)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def gguf_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_metadata(metadata(path), source=path.name)


@pytest.mark.parametrize("llama3_split,add_bos,pre", [(False, False, "gpt2"), (True, True, "llama-bpe")])
def test_byte_level_bpe_gives_hf_ids(tmp_path, llama3_split, add_bos, pre):
    from transformers import AutoTokenizer

    src = tmp_path / "ckpt"
    tiny_llama(K.ACT_RELU).save_pretrained(src)
    byte_level_tokenizer(src, llama3_split=llama3_split, add_bos=add_bos)
    out = convert(src, tmp_path / "m.gguf", "--outtype", "q8_0")
    meta = metadata(out)
    assert (meta[K.KEY_TOKENIZER_MODEL], meta[K.KEY_TOKENIZER_PRE]) == ("gpt2", pre)
    assert meta[K.KEY_CHAT_TEMPLATE] == CHAT_TEMPLATE
    assert (meta[K.KEY_BOS_ID], meta[K.KEY_EOS_ID], bool(meta[K.KEY_ADD_BOS])) == (1, 2, add_bos)
    types = list(meta[K.KEY_TOKEN_TYPE])
    assert types[:3] == [TokenType.CONTROL] * 3 and types[3] == TokenType.NORMAL
    assert meta[K.KEY_TOKENS][300:] == [f"[PAD{i}]" for i in range(300, 320)]        # model vocab 320
    assert set(types[300:]) == {TokenType.UNUSED}
    ours, hf = gguf_tokenizer(out), AutoTokenizer.from_pretrained(src)
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n"]:
        assert ours.encode(text) == hf.encode(text), text


def test_sentencepiece_model_gives_hf_ids(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    src = tmp_path / "ckpt"
    tiny_llama(K.ACT_RELU, vocab=512).save_pretrained(src)
    (tmp_path / "train.txt").write_text("\n".join(training_text()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(src / "tokenizer"), model_type="bpe", vocab_size=500,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, user_defined_symbols=["<|im_start|>"], minloglevel=2, num_threads=1)
    (src / "tokenizer.vocab").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    out = convert(src, tmp_path / "m.gguf", "--outtype", "f16")
    meta = metadata(out)
    assert (meta[K.KEY_TOKENIZER_MODEL], meta[K.KEY_BOS_ID], meta[K.KEY_EOS_ID]) == ("llama", 1, 2)
    types, tokens = list(meta[K.KEY_TOKEN_TYPE]), meta[K.KEY_TOKENS]
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert types[tokens.index("<|im_start|>")] == TokenType.USER_DEFINED
    assert types[tokens.index("<0x41>")] == TokenType.BYTE
    assert tokens[500:] == [f"[PAD{i}]" for i in range(500, 512)]
    ours, hf = gguf_tokenizer(out), AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text

    # the same vocabulary as transformers' tokenizer.json alone (SentencePiece-style BPE)
    only_json = tmp_path / "json"
    hf.save_pretrained(only_json)
    for f in src.iterdir():
        if f.name.startswith(("config", "model")):
            (only_json / f.name).write_bytes(f.read_bytes())
    (only_json / "tokenizer.model").unlink(missing_ok=True)
    out_json = convert(only_json, tmp_path / "json.gguf", "--outtype", "f16")
    assert metadata(out_json)[K.KEY_TOKENIZER_MODEL] == "llama"
    from_json = gguf_tokenizer(out_json)
    for text in TEXTS:
        assert from_json.encode(text) == hf.encode(text), text


@pytest.mark.smollm2
def test_smollm2_tokenizer_json_reproduces_its_gguf_vocabulary(tmp_path, smollm2_path):
    """SmolLM2's HF tokenizer (rebuilt by transformers from the llama.cpp-made GGUF, with the
    original Digits pre-tokenizer) converts back to exactly the GGUF's tokenizer metadata."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    src = tmp_path / "ckpt"
    tiny_llama(K.ACT_RELU, vocab=49152, n_embd=32, n_ff=64, tie=True).save_pretrained(src)
    hf.save_pretrained(src)
    out = convert(src, tmp_path / "m.gguf", "--outtype", "q8_0")
    ours, original = metadata(out), metadata(smollm2_path)
    for key in (K.KEY_TOKENIZER_MODEL, K.KEY_TOKENIZER_PRE, K.KEY_BOS_ID, K.KEY_EOS_ID, K.KEY_UNK_ID,
                K.KEY_PAD_ID, K.KEY_CHAT_TEMPLATE):
        assert ours[key] == original[key], key
    for key in (K.KEY_TOKENS, K.KEY_TOKEN_TYPE, K.KEY_MERGES):
        assert list(ours[key]) == list(original[key]), key
    tokenizer, hf_again = gguf_tokenizer(out), AutoTokenizer.from_pretrained(src)
    for text in TEXTS + ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n"]:
        assert tokenizer.encode(text) == hf_again.encode(text), text


def test_every_detected_pre_tokenizer_is_one_the_runtime_runs():
    from prosparse.convert.vocab import PRE_BY_CHECK_HASH, PRE_BY_STRUCTURE
    from prosparse.tokenizer import PRE_TOKENIZERS

    assert set(PRE_BY_CHECK_HASH.values()) | set(PRE_BY_STRUCTURE.values()) <= PRE_TOKENIZERS.keys()


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    src = llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_RELU, vocab=280), tokenizer=False)
    byte_level_tokenizer(src, vocab_size=300)
    assert main([str(src), "-o", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert "the tokenizer has 300 tokens but the model's vocabulary" in err and "has 280" in err
    assert not (tmp_path / "m.gguf").exists()


def test_no_tokenizer(tmp_path, capsys):
    src = llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_RELU), tokenizer=False)
    assert main([str(src), "-o", str(tmp_path / "m.gguf"), "-q"]) == 1
    assert "--no-tokenizer" in capsys.readouterr().err
    out = convert(src, tmp_path / "m.gguf", "--no-tokenizer")
    assert K.KEY_TOKENS not in metadata(out)


# ---------------------------------------------------------------------------------------------
# Predictors and PowerInfer files
# ---------------------------------------------------------------------------------------------

def predictor_dir(directory: Path, n_layer: int = 2, rank: int = 32, n_embd: int = 64, n_ff: int = 192,
                  thresholds: dict | None = None, shapes: dict | None = None) -> Path:
    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(n_layer):
        fc1, fc2 = (shapes or {}).get(i, ((rank, n_embd), (n_ff, rank)))
        torch.save({"fc1.weight": torch.randn(fc1, generator=gen), "fc2.weight": torch.randn(fc2, generator=gen)},
                   directory / f"model_{i}.pt")
    if thresholds is not None:
        (directory / "thresholds.json").write_text(json.dumps(thresholds))
    return directory


def test_predictors_are_written_and_loaded(tmp_path):
    src = llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_RELU, seed=16))
    pred = predictor_dir(tmp_path / "pred", thresholds={"layer_thresholds": [0.5, -1.0], "input": "residual"})
    out = convert(src, tmp_path / "m.gguf", "--predictor", str(pred), "--outtype", "q8_0")
    types, meta = tensor_types(out), metadata(out)
    assert types[K.block_tensor(1, K.PREDICTOR_FC1)] == ((64, 32), GGMLQuantizationType.F16)   # ne = {n_embd, rank}
    assert types[K.block_tensor(1, K.PREDICTOR_FC2)] == ((32, 192), GGMLQuantizationType.F16)  # ne = {rank, n_ff}
    assert meta[K.KEY_PREDICTOR_RANK] == 32 and list(meta[K.KEY_PREDICTOR_LAYER_THRESHOLDS]) == [0.5, -1.0]
    assert meta[K.KEY_PREDICTOR_INPUT] == K.PREDICTOR_INPUT_RESIDUAL
    with Runtime(out, n_ctx=64, threads=2) as rt:
        assert rt.sparse == "predictor" and rt.spec.predictor_thresholds == [0.5, -1.0]
        assert np.isfinite(rt.evaluate(PROMPT)).all()
    uniform = predictor_dir(tmp_path / "uniform", thresholds={"threshold": 0.25})
    out2 = convert(src, tmp_path / "u.gguf", "--predictor", str(uniform), "--predictor-outtype", "f32")
    assert metadata(out2)[K.KEY_PREDICTOR_THRESHOLD] == 0.25
    assert tensor_types(out2)[K.block_tensor(0, K.PREDICTOR_FC1)][1] == GGMLQuantizationType.F32


def test_predictor_type_defaults_to_what_they_were_trained_for(tmp_path):
    """prosparse-train's report.json names the type the predictors' thresholds were chosen for:
    convert writes that unless told otherwise; without a usable report, f16 (PowerInfer's)."""
    src = llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_RELU, seed=18))
    pred = predictor_dir(tmp_path / "pred")
    fc1 = K.block_tensor(0, K.PREDICTOR_FC1)
    assert tensor_types(convert(src, tmp_path / "a.gguf", "--predictor", str(pred)))[fc1][1] == GGMLQuantizationType.F16
    (pred / "report.json").write_text(json.dumps({"predictor_type": "q8_0", "n_layer": 2}))
    assert tensor_types(convert(src, tmp_path / "b.gguf", "--predictor", str(pred)))[fc1][1] == GGMLQuantizationType.Q8_0
    out = convert(src, tmp_path / "c.gguf", "--predictor", str(pred), "--predictor-outtype", "f32")
    assert tensor_types(out)[fc1][1] == GGMLQuantizationType.F32
    for report in ('{"predictor_type": "q9_9"}', "not json", "[1, 2]"):
        (pred / "report.json").write_text(report)
        out = convert(src, tmp_path / "d.gguf", "--predictor", str(pred), "--force")
        assert tensor_types(out)[fc1][1] == GGMLQuantizationType.F16, report


def test_powerinfer_format_reads_back_with_the_same_logits(tmp_path):
    src = llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_FATRELU, 0.05, seed=17), hidden_act_param=0.05)
    pred = predictor_dir(tmp_path / "pred")
    (pred / "config.json").write_text(json.dumps({"sparse_threshold": 0.5}))     # PowerInfer's own file
    ours = convert(src, tmp_path / "m.gguf", "--predictor", str(pred))
    pwri = convert(src, tmp_path / "m.powerinfer.gguf", "--predictor", str(pred), "--format", "powerinfer")
    assert pwri.read_bytes()[:4] == K.POWERINFER_MAGIC and ours.read_bytes()[:4] == K.GGUF_MAGIC
    meta = metadata(pwri)
    assert meta[K.KEY_POWERINFER_SPARSE_THRESHOLD] == 0.5
    assert meta[K.KEY_ARCHITECTURE] == K.ARCH_LLAMA
    assert tensor_types(pwri) == tensor_types(ours)
    for mode in ("dense", "exact", "predictor"):
        assert rel_err(runtime_logits(pwri, sparse=mode), runtime_logits(ours, sparse=mode)) <= 1e-6, mode


@pytest.mark.parametrize("problem,args,message", [
    ("silu", ["--format", "powerinfer"], "PowerInfer runs ReLU models only"),
    ("relu", ["--format", "powerinfer", "--outtype", "bf16"], "--outtype bf16 is a type PowerInfer cannot read"),
    ("relu", ["--format", "powerinfer", "--layout", "dense"], "needs --layout sparse"),
    ("silu", ["--threshold", "0.1"], "has no threshold"),
])
def test_format_and_option_conflicts(tmp_path, capsys, problem, args, message):
    activation = K.ACT_SILU if problem == "silu" else K.ACT_RELU
    src = llama_dir(tmp_path / "ckpt", tiny_llama(activation), tokenizer=False)
    assert main([str(src), "-o", str(tmp_path / "m.gguf"), "--no-tokenizer", *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_minicpm_has_no_powerinfer_format(tmp_path, capsys):
    src, _, _ = minicpm_dir(tmp_path / "ckpt")
    assert main([str(src), "-o", str(tmp_path / "m.gguf"), "--format", "powerinfer"]) == 1
    assert "PowerInfer runs architecture llama only" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 1, nothing written
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path) -> Path:
    return llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_RELU, seed=18))


def fails(capsys, tmp_path, src: Path, *args: str) -> str:
    out = tmp_path / "bad.gguf"
    capsys.readouterr()                          # drop what building the checkpoint printed
    assert main([str(src), "-o", str(out), "-q", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("prosparse-convert: error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(".bad.gguf.*"))
    return err


def safetensors_edit(directory: Path, edit) -> None:
    from safetensors.torch import load_file
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("change,message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "architecture 'GPT2LMHeadModel' is not supported"),
    (dict(architectures=None, model_type="mistral"), "model_type 'mistral' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}), "'llama3' is not supported"),
    (dict(hidden_size=None), "'hidden_size' is missing"),
])
def test_bad_config(tmp_path, capsys, ckpt, change, message):
    edit_config(ckpt, **change)
    assert message in fails(capsys, tmp_path, ckpt)


def test_missing_files(tmp_path, capsys, ckpt):
    assert "not a directory" in fails(capsys, tmp_path, tmp_path / "nowhere")
    (ckpt / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    assert "no weights found" in fails(capsys, tmp_path, ckpt)
    (ckpt / "config.json").unlink()
    assert "config.json: missing" in fails(capsys, tmp_path, ckpt)


def test_missing_shard(tmp_path, capsys):
    src = tmp_path / "ckpt"
    tiny_llama(K.ACT_RELU).save_pretrained(src, max_shard_size="100KB")
    byte_level_tokenizer(src)
    next(src.glob("model-00002-*.safetensors")).unlink()
    err = fails(capsys, tmp_path, src)
    assert "model-00002-of-" in err and "is missing" in err


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(100, 64)}),
     "'model.layers.0.mlp.gate_proj.weight' has shape [100, 64], expected [192, 64]"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
    (lambda t: t.pop("lm_head.weight"), "tie_word_embeddings is false"),
])
def test_bad_tensors(tmp_path, capsys, ckpt, edit, message):
    safetensors_edit(ckpt, edit)
    assert message in fails(capsys, tmp_path, ckpt)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_layer=1), "1 predictor files for a model of 2 layers (missing model_1.pt)"),
    (dict(n_layer=3), "(unexpected model_2.pt)"),
    (dict(shapes={1: ((32, 60), (192, 32))}), "model_1.pt: fc1.weight has shape [32, 60], expected [rank, 64]"),
    (dict(shapes={0: ((32, 64), (190, 32))}), "model_0.pt: fc2.weight has shape [190, 32], expected [192, 32]"),
    (dict(thresholds={"layer_thresholds": [0.1]}), "layer_thresholds must list 2 numbers"),
])
def test_bad_predictors(tmp_path, capsys, ckpt, kwargs, message):
    pred = predictor_dir(tmp_path / "pred", **kwargs)
    assert message in fails(capsys, tmp_path, ckpt, "--predictor", str(pred))


def test_predictors_need_a_relu_family_model(tmp_path, capsys):
    src = llama_dir(tmp_path / "ckpt", tiny_llama(K.ACT_SILU))
    assert "need a relu or fatrelu model" in fails(capsys, tmp_path, src, "--predictor", str(predictor_dir(tmp_path / "p")))


def test_existing_output_needs_force(tmp_path, capsys, ckpt):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert main([str(ckpt), "-o", str(out), "-q"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([str(ckpt), "-o", str(out), "-q", "--force"]) == 0
    assert out.read_bytes()[:4] == K.GGUF_MAGIC


@pytest.mark.parametrize("exception,status", [(OSError("disk full"), None), (KeyboardInterrupt(), 130)])
def test_interrupted_conversion_leaves_no_file(tmp_path, monkeypatch, ckpt, exception, status):
    import gguf

    calls = []
    real = gguf.GGUFWriter.write_tensor_data

    def write_then_fail(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise exception
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_then_fail)
    out = tmp_path / "m.gguf"
    if status is None:
        with pytest.raises(OSError, match="disk full"):
            convert_checkpoint(ckpt, out)
    else:
        assert main([str(ckpt), "-o", str(out), "-q"]) == status
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
