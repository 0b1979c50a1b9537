"""Activation predictors (prosparse.training.predictors): the collected pairs are the model's
real activations; a known low-rank rule is learned; thresholds meet their recall on unseen
data; exported files convert, and the runtime makes exactly the torch predictor's decisions;
end to end: tiny ReLU model → predictors → GGUF → predictor-mode decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prosparse import Runtime
from prosparse import constants as K
from prosparse.convert import convert_checkpoint
from prosparse.training.predictor_eval import PredictorMode, compare_modes
from prosparse.training.predictors import (LayerProbe, LayerSamples, Predictor, TrainSettings,
                                           collect_samples, export_predictors, load_predictors, pack_masks,
                                           predictor_bytes, score, train_predictor, unpack_masks)
from test_convert import llama_dir
from test_forward import PROMPT, rel_err
from tiny_models import tiny_llama
from training_tiny import make_corpus, tiny_recipe, write_recipe

torch.set_num_threads(1)   # small matrices; the runtime gets its own threads


# --- collection --------------------------------------------------------------------------


def layer_outputs(model, ids):
    """Each decoder layer's output, from hooks of its own (not the probe's)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return outs


def test_probe_matches_a_direct_forward():
    model = tiny_llama(K.ACT_RELU, seed=3)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with LayerProbe(model, K.PREDICTOR_INPUT_RESIDUAL) as residual, LayerProbe(model, K.PREDICTOR_INPUT_NORMED) as normed:
        outputs = layer_outputs(model, ids)
    for i, layer in enumerate(model.model.layers):
        x = residual.inputs[i]
        with torch.no_grad():
            n = layer.post_attention_layernorm(x)
            x1 = layer.mlp.act_fn(layer.mlp.gate_proj(n)) * layer.mlp.up_proj(n)
            out = x + layer.mlp.down_proj(x1)
        assert torch.equal(normed.inputs[i], n)                       # the normed input is norm(residual)
        assert torch.equal(residual.masks[i], x1 != 0)                # the mask is x1 ≠ 0 of that input
        assert torch.allclose(out, outputs[i].reshape(-1, 64), atol=1e-5)   # and the residual is the layer's
        assert 0.2 < residual.masks[i].float().mean() < 0.8


@pytest.mark.parametrize("predictor_input", K.PREDICTOR_INPUTS)
def test_collected_samples_are_the_probed_activations(tmp_path, predictor_input):
    model = tiny_llama(K.ACT_RELU, seed=4)
    sequences = np.random.default_rng(0).integers(0, 320, size=(4, 10))
    with LayerProbe(model, predictor_input) as probe, torch.no_grad():
        model(input_ids=torch.from_numpy(sequences))
    full = collect_samples(model, sequences, 1000, predictor_input, batch_size=4, store_dir=tmp_path, log=print)
    assert len(full) == sequences.size and full.tokens_seen == sequences.size
    for i, layer in enumerate(full.layers):
        x, m = layer.take(slice(None))
        assert torch.equal(x, probe.inputs[i].half().float())
        assert torch.equal(m, probe.masks[i])
    # a subsample: fewer rows, each one of the probed tokens, masks still bit-exact
    part = collect_samples(model, sequences, 15, predictor_input, token_fraction=0.5, batch_size=2, log=print)
    assert len(part) == 15
    x, m = part.layers[1].take(slice(None))
    rows = [int(torch.cdist(row[None], probe.inputs[1].half().float()).argmin()) for row in x]
    assert torch.equal(x, probe.inputs[1][rows].half().float()) and torch.equal(m, probe.masks[1][rows])


def test_mask_packing_round_trips_odd_widths():
    mask = torch.rand(7, 13) > 0.5
    assert torch.equal(unpack_masks(pack_masks(mask), 13), mask)
    assert pack_masks(mask).shape == (7, 2)


# --- training and thresholds --------------------------------------------------------------


def low_rank_task(n: int, seed: int, noise: float = 0.0, n_embd: int = 32, n_ff: int = 96, k: int = 4):
    """active = (U·V·x̂ + noise > 0) with a fixed rank-k U·V; x = x̂ · per-feature scales spanning
    ~100× (as a residual stream's do)."""
    g = np.random.default_rng(1234)
    u, v = g.normal(size=(n_ff, k)), g.normal(size=(k, n_embd))
    scales = np.exp(g.normal(size=n_embd) * 1.5)
    r = np.random.default_rng(seed)
    xhat = r.normal(size=(n, n_embd))
    mask = xhat @ v.T @ u.T + noise * r.normal(size=(n, n_ff)) > 0
    return LayerSamples((xhat * scales).astype(np.float16), pack_masks(mask), n_ff)


FAST = dict(rank=16, lr=1e-2, batch_size=256, max_epochs=30, patience=5)


def test_known_low_rank_rule_is_learned():
    predictor, chosen, _, _ = train_predictor(low_rank_task(8000, 1), low_rank_task(4000, 2),
                                              TrainSettings(target_recall=0.99, **FAST), log=lambda *a: None)
    unseen = low_rank_task(4000, 3)
    at_zero = score(predictor, unseen, threshold=0.0)
    assert at_zero.recall > 0.99 and at_zero.predicted_sparsity > at_zero.sparsity - 0.02
    tuned = score(predictor, unseen, threshold=chosen.threshold)
    assert tuned.recall > 0.985 and tuned.predicted_sparsity > tuned.sparsity - 0.02


def test_thresholds_meet_the_target_recall_on_unseen_data():
    """A noisy rule no predictor gets exactly: the threshold does the work."""
    train, select, unseen = low_rank_task(8000, 1, 1.0), low_rank_task(4000, 2, 1.0), low_rank_task(20000, 3, 1.0)
    predictor, _, _, _ = train_predictor(train, select, TrainSettings(target_recall=0.9, **FAST), log=lambda *a: None)
    results = []
    for target in (0.8, 0.9, 0.97):
        chosen = score(predictor, select, target_recall=target)
        assert chosen.recall >= target                             # exactly, where it was chosen
        tested = score(predictor, unseen, threshold=chosen.threshold)
        assert tested.recall >= target - 0.01, (target, tested)    # and within sampling error elsewhere
        results.append(tested)
    thresholds = [score(predictor, select, target_recall=t).threshold for t in (0.8, 0.9, 0.97)]
    assert thresholds[0] > thresholds[1] > thresholds[2]
    assert results[0].predicted_sparsity > results[1].predicted_sparsity > results[2].predicted_sparsity


def test_bytes_per_token():
    assert predictor_bytes(128, 576, 1536, "f16") == 128 * (576 + 1536) * 2
    assert predictor_bytes(1024, 4096, 11008, "q8_0") == 1024 * 4096 // 32 * 34 + 11008 * 1024 // 32 * 34
    assert predictor_bytes(16, 64, 192, "q8_0") == 16 * 64 // 32 * 34 + 192 * 16 * 4   # rank 16 rows stay f32


# --- export → converter → runtime: the same decisions ---------------------------------------


def runtime_counts(rt: Runtime, tokens: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token and layer: n_predicted, n_predicted_active (deltas of the runtime's statistics),
    and the logits — one token at a time, the decode path."""
    rt.collect_stats(True)
    predicted, hits, logits, before = [], [], [], rt.sparsity().layers
    for out in rt.decode_steps(tokens):
        now = rt.sparsity().layers
        predicted.append([a.n_predicted - b.n_predicted for a, b in zip(now, before)])
        hits.append([a.n_predicted_active - b.n_predicted_active for a, b in zip(now, before)])
        logits.append(out)
        before = now
    return np.array(predicted), np.array(hits), np.stack(logits)


def median_thresholds(model, predictors, predictor_input) -> list[float]:
    """Thresholds that make each random predictor choose about half the neurons."""
    with LayerProbe(model, predictor_input) as probe, torch.no_grad():
        model(input_ids=torch.tensor([PROMPT]))
    thresholds = []
    with torch.no_grad():
        for i, p in enumerate(predictors):
            ordered = p(probe.inputs[i]).flatten().sort().values
            middle = len(ordered) // 2                 # between two logits, not on one
            thresholds.append(float(ordered[middle - 1:middle + 1].mean()))
    return thresholds


@pytest.mark.parametrize("predictor_input", K.PREDICTOR_INPUTS)
def test_runtime_makes_the_torch_predictors_decisions(tmp_path, predictor_input):
    model = tiny_llama(K.ACT_RELU, seed=11)
    torch.manual_seed(0)
    trained = [Predictor(64, 192, 24) for _ in model.model.layers]
    with torch.no_grad():
        for p in trained:
            p.input_scale.uniform_(0.5, 2.0)      # export folds it into fc1
            p.fc2.weight.mul_(100.0)              # logits of order 1–10, as trained ones are
    thresholds = median_thresholds(model, trained, predictor_input)
    pred_dir = export_predictors(tmp_path / "pred", trained, thresholds, predictor_input)
    assert sorted(f.name for f in pred_dir.iterdir()) == ["model_0.pt", "model_1.pt", "thresholds.json"]
    assert set(torch.load(pred_dir / "model_0.pt", weights_only=True)) == {"fc1.weight", "fc2.weight"}

    gguf = convert_checkpoint(llama_dir(tmp_path / "ckpt", model), tmp_path / "m.gguf", outtype="f32",
                              predictor_dir=pred_dir, predictor_outtype="f32").path
    predictors, loaded_thresholds, loaded_input = load_predictors(pred_dir)
    assert loaded_input == predictor_input and loaded_thresholds == thresholds

    with PredictorMode(model, predictors, loaded_thresholds, predictor_input, record=True) as mode, torch.no_grad():
        torch_logits = model(input_ids=torch.tensor([PROMPT])).logits[0].numpy()
    torch_predicted = np.stack([torch.cat(c).numpy() for c in mode.per_token_predicted], axis=1)
    margins = np.stack([torch.cat(c).numpy() for c in mode.margins], axis=1)

    with Runtime(gguf, n_ctx=64, threads=2, sparse="predictor") as rt:
        assert rt.spec.predictor_thresholds == pytest.approx(thresholds, rel=1e-6)
        predicted, hits, logits = runtime_counts(rt, PROMPT)
    clear = margins > 1e-4                       # no logit within float error of its threshold
    assert clear.mean() > 0.9
    assert np.array_equal(predicted[clear], torch_predicted[clear])
    assert 0.2 < predicted.mean() / 192 < 0.8
    # the FFN output sums exactly the predicted ∧ active neurons: equal logits = equal sets
    assert rel_err(logits, torch_logits) < 1e-4
    assert 0 < hits.sum() < predicted.sum()


# --- end to end ------------------------------------------------------------------------------


def test_tiny_relu_model_to_predictor_mode_gguf(tmp_path):
    from prosparse.training.predictor_cli import main
    model_dir = llama_dir(tmp_path / "relu", tiny_llama(K.ACT_RELU, seed=12), hidden_act="relu")
    corpus = make_corpus(tmp_path / "corpus", documents=60, words=200)
    recipe = write_recipe(tmp_path / "recipe.json", tiny_recipe(tmp_path, model_dir, corpus,
                                                                data={"seq_len": 48, "heldout_fraction": 0.25}))
    out = tmp_path / "pred"
    assert main(["predictors", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                 "--rank", "32", "--target-recall", "0.97", "--samples", "6000", "--heldout-samples", "2000",
                 "--epochs", "8", "--batch-size", "256", "--lr", "5e-3", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and len(report["layers"]) == 2
    # the default type is q8_0: 34-byte blocks of 32; fc1 has 32 rows of 64, fc2 192 rows of 32
    assert report["predictor_bytes_per_token"]["per_layer"] == 32 * 2 * 34 + 192 * 1 * 34
    assert (out / "REPORT.md").read_text().startswith("# Predictors for")
    mean = report["averages"]
    assert mean["recall"] > 0.93 and mean["predicted_sparsity"] > 0.2

    gguf = convert_checkpoint(model_dir, tmp_path / "m.gguf", outtype="f32", predictor_dir=out).path
    with Runtime(gguf, n_ctx=64, threads=2) as rt:
        assert rt.sparse == "predictor"
    from prosparse.training.model_io import load_tokenizer
    from prosparse.training.predictor_cli import _recipe, _sequences
    import argparse
    args = argparse.Namespace(recipe=str(recipe), override=[], threads=2)
    _, heldout = _sequences(_recipe(args), load_tokenizer(model_dir), None)
    result = compare_modes(gguf, heldout[1::2][:4], threads=2, log=lambda *a: None)
    runtime = result["predictor"]
    assert abs(runtime["recall"] - mean["recall"]) < 0.05, (runtime["recall"], mean["recall"])
    assert abs(runtime["predicted_sparsity"] - mean["predicted_sparsity"]) < 0.08
    assert result["exact"]["perplexity"] > 1 and 0.9 < result["perplexity_ratio"] < 1.5

    # resumable: a second run with the same settings trains nothing
    assert main(["predictors", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                 "--rank", "32", "--target-recall", "0.97", "--samples", "6000", "--heldout-samples", "2000",
                 "--epochs", "8", "--batch-size", "256", "--lr", "5e-3", "--threads", "1"]) == 0
    assert json.loads((out / "report.json").read_text())["layers"] == report["layers"]

    # another operating point of the report's curve, without retraining
    before = json.loads((out / "thresholds.json").read_text())["layer_thresholds"]
    assert main(["predictor-thresholds", str(out), "--target-recall", "0.99"]) == 0
    after = json.loads((out / "thresholds.json").read_text())["layer_thresholds"]
    assert after == [next(t for target, t, _, _ in layer["curve"] if target == 0.99) for layer in report["layers"]]
    assert all(a <= b for a, b in zip(after, before)) and after != before    # more recall: lower thresholds
    assert main(["predictor-thresholds", str(out), "--target-recall", "0.965"]) == 2  # not in the curve
    assert main(["predictor-thresholds", str(tmp_path), "--target-recall", "0.99"]) == 2  # no report


def test_pipeline_from_a_given_model_runs_each_step_once(tmp_path):
    """--model skips training; predictors → GGUF → evaluation run as logged commands; a second
    run finds every output and runs nothing."""
    from prosparse.training.predictor_cli import main
    model = tiny_llama(K.ACT_SILU, seed=13)
    model_dir = llama_dir(tmp_path / "silu", model)
    corpus = make_corpus(tmp_path / "corpus", documents=40, words=150)
    recipe = write_recipe(tmp_path / "recipe.json", tiny_recipe(tmp_path, model_dir, corpus,
                                                                data={"seq_len": 32, "heldout_fraction": 0.25}))
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(" ".join(p.read_text() for p in sorted(corpus.rglob("*.txt"))[:5]))
    args = ["pipeline", "--recipe", str(recipe), "--model", str(model_dir), "--activation", "relu",
            "--rank", "16", "--samples", "2000", "--heldout-samples", "600", "--epochs", "3", "--outtype", "f16",
            "--eval-sequences", "2", "--no-bench", "--threads", "1", "--calibration", str(calibration)]
    assert main(args) == 0
    run = tmp_path / "run"
    log = (run / "pipeline.log").read_text()
    assert "train: skipped (--model" in log and "predictor_cli predictors" in log and "prosparse.convert.cli" in log
    gguf = run / "tiny-predictor-F16.gguf"
    with Runtime(gguf, n_ctx=32, threads=1) as rt:
        assert rt.sparse == "predictor" and rt.spec.activation == K.ACT_RELU
        assert rt.metadata["prosparse.neuron_order"] == "activation_frequency"     # --calibration passed on
    result = json.loads((run / "predictor_eval.json").read_text())
    assert result["exact"]["tokens"] == 2 * 31 and 0 < result["predictor"]["recall"] <= 1
    assert main(args) == 0
    second = (run / "pipeline.log").read_text()[len(log):]
    assert second.count("skipped") == 4 and "$ " not in second
