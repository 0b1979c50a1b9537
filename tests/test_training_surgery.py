"""The L1 term, the sparsity metric, FATReLU and the x1 probe."""

import torch

from prosparse.training.surgery import (FATReLU, X1Probe, count_zeros, gate_activation, l1_contribution,
                                        l1_x1, set_gate_activation)
from training_tiny import tiny_config


def hand_made_x1():
    # batch 2, 2 tokens, 3 neurons
    return torch.tensor([[[1.0, -2.0, 0.0], [0.5, 0.0, 0.0]],
                         [[0.0, 0.0, 3.0], [-1.0, 1.0, -1.0]]], requires_grad=True)


def test_l1_value_is_mean_over_tokens_of_the_per_token_norm():
    x1 = hand_made_x1()
    # per-token ‖x1‖₁: 3, 0.5, 3, 3 → mean 2.375
    assert l1_x1(x1).item() == 2.375


def test_l1_gradient_is_sign_over_token_count():
    x1 = hand_made_x1()
    l1_x1(x1).backward()
    assert torch.equal(x1.grad, torch.sign(x1.detach()) / 4)


def test_l1_excludes_masked_tokens():
    x1 = hand_made_x1()
    mask = torch.tensor([[True, False], [True, True]])
    assert l1_x1(x1, mask).item() == 3.0  # tokens 3, 3, 3
    l1_x1(x1, mask).backward()
    assert torch.all(x1.grad[0, 1] == 0)


def test_l1_does_not_depend_on_batch_size_or_sequence_length():
    x1 = torch.randn(2, 5, 7)
    assert torch.allclose(l1_x1(x1), l1_x1(torch.cat([x1, x1], dim=0)))
    assert torch.allclose(l1_x1(x1), l1_x1(torch.cat([x1, x1], dim=1)))


def test_contribution_l1_value_and_rescaling_invariance():
    x1 = hand_made_x1().detach()
    down = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])  # column norms 5, 2, 1
    # per token Σ|x1_j|·‖d_j‖: 5+4+0=9, 2.5, 3, 5+2+1=8 → mean 5.625
    assert l1_contribution(x1, down).item() == 5.625
    c = torch.tensor([10.0, 0.1, 3.0])  # up_proj / c, down_proj · c, per neuron
    assert torch.allclose(l1_contribution(x1 / c, down * c), l1_contribution(x1, down))
    assert not torch.allclose(l1_x1(x1 / c), l1_x1(x1))  # the plain L1 is dodged by the same move


def test_count_zeros_with_padding_excluded():
    x1 = hand_made_x1().detach()
    assert count_zeros(x1) == (torch.tensor(5), 12)
    zeros, entries = count_zeros(x1, torch.tensor([[True, False], [True, True]]))
    assert (zeros.item(), entries) == (3, 9)


def test_fatrelu():
    x = torch.tensor([-1.0, 0.0, 0.05, 0.1, 0.2])
    assert torch.equal(FATReLU(0.1)(x), torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2]))
    assert torch.equal(FATReLU(0.0)(x), torch.relu(x))


def tiny_model():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=3)).eval()


def manual_x1(model, input_ids):
    """x1 of every layer, recomputed from the FFN inputs captured independently."""
    inputs = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
             for layer in model.model.layers]
    model(input_ids=input_ids)
    for h in hooks:
        h.remove()
    return [layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
            for layer, x in zip(model.model.layers, inputs)]


def test_gate_activation_replaced_on_the_gate_only():
    model = tiny_model()
    assert gate_activation(model) == ("silu", 0.0)
    set_gate_activation(model, "fatrelu", 0.02)
    assert gate_activation(model) == ("fatrelu", 0.02)
    assert all(isinstance(layer.mlp.act_fn, FATReLU) for layer in model.model.layers)
    set_gate_activation(model, "relu")
    assert gate_activation(model) == ("relu", 0.0)


def test_probe_matches_hand_computed_sparsity_and_l1():
    model = tiny_model()
    set_gate_activation(model, "relu")
    probe = X1Probe(model)
    input_ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # padding
    with probe.capture(token_mask=mask):
        model(input_ids=input_ids)
    x1s = manual_x1(model, input_ids)
    expected_l1 = torch.stack([l1_x1(x1, mask) for x1 in x1s]).mean()
    assert torch.allclose(probe.l1(), expected_l1)
    per_layer = [(x1[mask] == 0).sum().item() / x1[mask].numel() for x1 in x1s]
    assert probe.layer_sparsity() == [pytest_approx(p) for p in per_layer]
    assert abs(probe.sparsity() - sum(per_layer) / 3) < 1e-9
    assert 0.2 < probe.sparsity() < 0.8  # ReLU on a random model: about half


def pytest_approx(v):
    import pytest
    return pytest.approx(v, abs=1e-6)


def test_probe_is_idle_outside_capture_and_under_gradient_checkpointing():
    model = tiny_model().train()
    set_gate_activation(model, "relu")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    probe = X1Probe(model)
    input_ids = torch.randint(0, 300, (2, 8))
    with probe.capture():
        out = model(input_ids=input_ids, use_cache=False)
    zeros_before = probe.counts()[0].clone()
    (out.logits.sum() + probe.l1()).backward()  # recomputes the forward: the hooks stay idle
    assert torch.equal(probe.counts()[0], zeros_before)
    assert probe.counts()[1].sum().item() == 3 * 2 * 8 * 64
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None
