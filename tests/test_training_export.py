"""Export: FATReLU model → HF checkpoint → reload (ours and plain transformers) → same logits."""

import json

import torch

from prosparse.training.model_io import export_hf, load_model
from prosparse.training.surgery import FATReLU, gate_activation, set_gate_activation
from training_tiny import make_tiny_model_dir


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fatrelu_export_reload_same_logits(tmp_path):
    model, tokenizer = load_model(make_tiny_model_dir(tmp_path / "base"))
    assert gate_activation(model) == ("silu", 0.0)
    set_gate_activation(model, "fatrelu", 0.02)
    ids = torch.randint(0, 259, (2, 12))
    expected = logits(model.eval(), ids)

    out = export_hf(model, tokenizer, tmp_path / "export", "fatrelu", 0.02, info={"step": 3})
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu" and config["hidden_act_param"] == 0.02
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    reloaded, tok = load_model(out)
    assert gate_activation(reloaded) == ("fatrelu", 0.02)
    assert torch.equal(logits(reloaded.eval(), ids), expected)
    assert tok("sparse").input_ids == tokenizer("sparse").input_ids

    # plain transformers loads it too, as ReLU (the threshold is ours to apply)
    from transformers import LlamaForCausalLM
    plain = LlamaForCausalLM.from_pretrained(out).eval()
    set_gate_activation(model, "relu")
    assert torch.allclose(logits(plain, ids), logits(model, ids), atol=1e-6)


def test_released_form_fatrelu_name(tmp_path):
    model, tokenizer = load_model(make_tiny_model_dir(tmp_path / "base"))
    set_gate_activation(model, "fatrelu", 0.01)
    out = export_hf(model, tokenizer, tmp_path / "export", "fatrelu", 0.01, export_name="fatrelu")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_act"], config["hidden_act_param"]) == ("fatrelu", 0.01)
    reloaded, _ = load_model(out)
    assert isinstance(reloaded.model.layers[0].mlp.act_fn, FATReLU)
    assert reloaded.model.layers[0].mlp.act_fn.threshold == 0.01


def test_relu_export_has_no_threshold(tmp_path):
    model, tokenizer = load_model(make_tiny_model_dir(tmp_path / "base"))
    set_gate_activation(model, "relu")
    out = export_hf(model, tokenizer, tmp_path / "export", "relu")
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu" and "hidden_act_param" not in config
    assert gate_activation(load_model(out)[0]) == ("relu", 0.0)


def test_export_converts_to_gguf_with_the_threshold(tmp_path):
    """training → HF checkpoint → prosparse-convert: the GGUF says fatrelu with the threshold."""
    from gguf import GGUFReader

    from prosparse import constants as K
    from prosparse.convert import convert_checkpoint
    model, tokenizer = load_model(make_tiny_model_dir(tmp_path / "base"))
    set_gate_activation(model, "fatrelu", 0.03)
    out = export_hf(model, tokenizer, tmp_path / "export", "fatrelu", 0.03)
    result = convert_checkpoint(out, tmp_path / "tiny.gguf", outtype="f32", tokenizer=False)
    fields = GGUFReader(result.path).fields

    def value(key):
        field = fields[key]
        return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]

    assert str(value(K.KEY_ACTIVATION)) == K.ACT_FATRELU
    assert abs(float(value(K.KEY_ACTIVATION_THRESHOLD)) - 0.03) < 1e-7
