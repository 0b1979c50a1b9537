"""Sparse FFN modes: exact == dense == transformers; predictor mode with right and wrong
predictors; statistics; PowerInfer's PWRI files."""

from __future__ import annotations

import numpy as np
import pytest

from prosparse import Runtime
from prosparse import constants as K
from prosparse.convert import write_llama_gguf
from test_forward import PROMPT, rel_err
from tiny_models import hf_activations, hf_logits, tiny_llama, to_gguf, with_extra

CASES = [(K.ACT_RELU, None), (K.ACT_FATRELU, 0.05)]


def decode_logits(rt: Runtime, tokens: list[int]) -> np.ndarray:
    """Logits of every position, one token at a time: the decode path the sparse modes take."""
    return np.stack([rt._model.eval([t], i) for i, t in enumerate(tokens)])


def exact_predictor(model) -> dict:
    """fc1/fc2 whose logit for neuron i is rms(x) * gate_i(x): positive exactly when the gate is,
    whatever the RMSNorm's scale. fc1 = [G; -G], fc2 = [I, -I] gives relu(g) - relu(-g) = g."""
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        g = (layer.mlp.gate_proj.weight * layer.post_attention_layernorm.weight).detach().numpy()
        n_ff = g.shape[0]
        tensors[K.block_tensor(i, K.PREDICTOR_FC1)] = np.concatenate([g, -g])
        tensors[K.block_tensor(i, K.PREDICTOR_FC2)] = np.concatenate([np.eye(n_ff), -np.eye(n_ff)], axis=1)
    return tensors


def random_predictor(model, rank: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_ff, n_embd = model.config.intermediate_size, model.config.hidden_size
    return {name: rng.normal(size=shape)
            for i in range(model.config.num_hidden_layers)
            for name, shape in ((K.block_tensor(i, K.PREDICTOR_FC1), (rank, n_embd)),
                                (K.block_tensor(i, K.PREDICTOR_FC2), (n_ff, rank)))}


@pytest.mark.parametrize("activation,threshold", CASES)
@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_exact_equals_dense_equals_transformers(tmp_path, activation, threshold, outtype):
    model = tiny_llama(activation, threshold or 0.0, seed=5)
    path = to_gguf(model, tmp_path / "m.gguf", outtype, activation, threshold)
    # f32 activations: with bf16 ones (BF16 weights, AVX512-BF16) dense mode's down projection
    # would read h rounded to bf16, exact mode's down vectors h as it is
    with Runtime(path, n_ctx=64, threads=2, sparse="dense", activations="f32") as dense, \
            Runtime(path, n_ctx=64, threads=2, sparse="exact", activations="f32") as exact:
        assert exact.sparse == "exact" and dense.sparse == "dense"
        d, e = decode_logits(dense, PROMPT), decode_logits(exact, PROMPT)
    assert rel_err(e, d) <= 1e-5
    if outtype == "f32":
        assert rel_err(e, hf_logits(model, PROMPT)) <= 1e-4


@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_two_threads_give_the_same_bits_every_run(tmp_path, mode):
    """The down vectors' per-thread sums are formed over a fixed set of neurons in a fixed order:
    repeated runs on two threads agree bit for bit (with chunks taken first come first served,
    which thread summed which neurons varied between runs, and so did the rounding)."""
    model = tiny_llama(K.ACT_RELU, seed=14, n_ff=2048)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config.to_dict(), model.state_dict(), outtype="f32",
                            activation=K.ACT_RELU, layout="sparse")
    with Runtime(path, n_ctx=64, threads=2, sparse=mode) as rt:
        first = decode_logits(rt, PROMPT)
        for _ in range(12):
            np.testing.assert_array_equal(decode_logits(rt, PROMPT), first)
            np.testing.assert_array_equal(rt.evaluate(PROMPT)[-1], rt.evaluate(PROMPT)[-1])


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_1"])
def test_every_thread_count_gives_the_same_bits(tmp_path, outtype):
    """Each thread adds the down vectors' pieces of its own slice of the output, every neuron
    in order, so the sums do not depend on how many threads split them: 1 to 4 threads agree
    bit for bit, decoding in dense and exact mode and in a prompt (with each thread summing
    whole neurons, one and two threads differed by rounding, which FATReLU gates and 8-bit
    activations amplified). 96 columns are three blocks of 32 (four threads: one slice empty)
    or six units of 16 (four threads: slices of 1, 2, 1, 2); 1056 neurons leave a prompt's last
    block of 64 partial."""
    model = tiny_llama(K.ACT_FATRELU, 0.05, seed=15, n_embd=96, n_ff=1056, n_head=3, n_head_kv=3)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config.to_dict(), model.state_dict(), outtype=outtype,
                            activation=K.ACT_FATRELU, threshold=0.05, layout="sparse")
    results = []
    for threads in (1, 2, 3, 4):
        with Runtime(path, n_ctx=64, threads=threads, sparse="dense") as dense, \
                Runtime(path, n_ctx=64, threads=threads, sparse="exact") as exact:
            results.append((decode_logits(dense, PROMPT), decode_logits(exact, PROMPT), dense.evaluate(PROMPT)))
    assert len(PROMPT) > 1 and np.abs(results[0][0]).max() > 0
    for later in results[1:]:
        for got, want in zip(later, results[0]):
            np.testing.assert_array_equal(got, want)


def test_sparse_layout_prompt_in_column_strips(tmp_path):
    """A prompt on a sparse-layout file adds each token's non-zero down vectors a strip of up to
    144 columns at a time (320 columns: strips of 112, 112 and 96 on one thread; two threads'
    slices of 160: two strips of 80 each; three threads' 96 / 112 / 112: one each). The logits
    match transformers, the same bits for every thread count, and the dense-layout file's
    prompt (ffn_down through the GEMM) within float rounding."""
    model = tiny_llama(K.ACT_RELU, seed=21, n_embd=320, n_ff=448, n_head=5, n_head_kv=5)
    sparse = write_llama_gguf(tmp_path / "sparse.gguf", model.config.to_dict(), model.state_dict(), outtype="f32",
                              activation=K.ACT_RELU, layout="sparse")
    dense = to_gguf(model, tmp_path / "dense.gguf", "f32", K.ACT_RELU)
    ref = hf_logits(model, PROMPT)
    results = []
    for threads in (1, 2, 3):
        with Runtime(sparse, n_ctx=64, threads=threads, activations="f32") as rt:
            results.append(rt.evaluate(PROMPT))
    assert rel_err(results[0], ref) < 1e-4
    for later in results[1:]:
        np.testing.assert_array_equal(later, results[0])
    with Runtime(dense, n_ctx=64, threads=2, sparse="dense", activations="f32") as rt:
        assert rel_err(results[0], rt.evaluate(PROMPT)) < 1e-5


def test_a_down_projection_that_cannot_be_transposed(tmp_path):
    """A quantised plain ffn_down whose outputs (48) do not fill whole 32-blocks cannot become one
    row per neuron: the file's best mode is dense, and asking for a sparse mode is a clear error
    naming the file and the tensor (it was gguf-py's "Can't quantize tensor with shape")."""
    model = tiny_llama(K.ACT_RELU, seed=22, n_embd=48, n_head=2, n_head_kv=2)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config.to_dict(), model.state_dict(), outtype="q8_0",
                            activation=K.ACT_RELU, layout="dense")
    with Runtime(path, n_ctx=64, threads=1) as rt:
        assert rt.sparse == "dense"
        assert rel_err(rt.evaluate(PROMPT), hf_logits(model, PROMPT)) < 0.05   # Q8_0 weights, q8 activations
    for mode in ("exact", "predictor"):
        with pytest.raises(ValueError, match=rf"m\.gguf: {mode} mode .*'blk\.0\.ffn_down\.weight' \(Q8_0, 48 outputs\)"):
            Runtime(path, n_ctx=16, threads=1, sparse=mode)


def test_best_mode_follows_the_file(tmp_path):
    relu = to_gguf(tiny_llama(K.ACT_RELU), tmp_path / "relu.gguf", "f32", K.ACT_RELU)
    silu = to_gguf(tiny_llama(K.ACT_SILU), tmp_path / "silu.gguf")
    with Runtime(relu, n_ctx=16, threads=1) as a, Runtime(silu, n_ctx=16, threads=1) as b:
        assert (a.sparse, b.sparse) == ("exact", "dense")
    with pytest.raises(ValueError, match="predictor mode needs predictor tensors"):
        Runtime(relu, n_ctx=16, threads=1, sparse="predictor")
    with pytest.raises(ValueError, match="unknown sparse mode 'fast'"):
        Runtime(relu, n_ctx=16, threads=1, sparse="fast")


@pytest.mark.parametrize("activation,threshold", CASES)
def test_always_right_predictor_equals_exact(tmp_path, activation, threshold):
    model = tiny_llama(activation, threshold or 0.0, seed=6)
    base = to_gguf(model, tmp_path / "m.gguf", "f32", activation, threshold)
    path = with_extra(base, tmp_path / "p.gguf", exact_predictor(model))
    with Runtime(path, n_ctx=64, threads=2, sparse_stats=True) as pred, \
            Runtime(path, n_ctx=64, threads=2, sparse="exact") as exact:
        assert pred.sparse == "predictor"
        p, e = decode_logits(pred, PROMPT), decode_logits(exact, PROMPT)
        report = pred.sparsity()
    assert rel_err(p, e) <= 1e-5
    assert report.recall == 1.0
    assert report.n_tokens == len(PROMPT)
    assert 0.2 < report.sparsity < 0.9
    # it predicts gate >= 0: a superset of the active set, never smaller
    assert report.predicted_sparsity <= report.sparsity


def test_poor_predictor_changes_outputs_and_reports_low_recall(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=7)
    base = to_gguf(model, tmp_path / "m.gguf", "f32", K.ACT_RELU)
    path = with_extra(base, tmp_path / "p.gguf", random_predictor(model))
    with Runtime(path, n_ctx=64, threads=2, sparse_stats=True) as pred, \
            Runtime(path, n_ctx=64, threads=2, sparse="exact") as exact:
        p, e = decode_logits(pred, PROMPT), decode_logits(exact, PROMPT)
        report = pred.sparsity()
    assert rel_err(p, e) > 1e-2
    assert report.recall < 0.8
    assert all(0.0 <= l.recall < 1.0 for l in report.layers)


def test_predictor_threshold_is_adjustable(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=8)
    base = to_gguf(model, tmp_path / "m.gguf", "f32", K.ACT_RELU)
    path = with_extra(base, tmp_path / "p.gguf", exact_predictor(model),
                      metadata={K.KEY_PREDICTOR_THRESHOLD: 0.0})
    with Runtime(path, n_ctx=64, threads=1, sparse_stats=True) as rt:
        assert rt.predictor_thresholds == [0.0, 0.0]
        rt.set_predictor_threshold(1e9)            # nothing predicted: the FFN adds nothing
        decode_logits(rt, PROMPT[:4])
        r = rt.sparsity()
        assert r.predicted_sparsity == 1.0 and r.recall == 0.0
        rt.set_predictor_threshold(0.0, layer=1)
        assert rt.predictor_thresholds == [1e9, 0.0]


def test_stats_match_transformers_activations(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=9)
    path = to_gguf(model, tmp_path / "m.gguf", "f32", K.ACT_RELU)
    zeros = [float((act == 0).mean()) for act in hf_activations(model, PROMPT)]
    for mode in ("dense", "exact"):
        with Runtime(path, n_ctx=64, threads=2, sparse=mode, sparse_stats=True) as rt:
            decode_logits(rt, PROMPT)
            ours = [l.sparsity for l in rt.sparsity().layers]
        assert np.allclose(ours, zeros, atol=2 / (len(PROMPT) * 192)), (mode, ours, zeros)


def test_plain_ffn_down_is_transposed_at_load_for_sparse_modes(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=10)
    path = to_gguf(model, tmp_path / "m.gguf", "f16", K.ACT_RELU)   # ffn_down, not ffn_down_t
    with Runtime(path, n_ctx=64, threads=2, sparse="exact") as rt:
        assert len(rt._model._owned) == model.config.num_hidden_layers
        e = decode_logits(rt, PROMPT)
    assert rel_err(e, hf_logits(model, PROMPT)) <= 1e-2


def test_powerinfer_file_is_read(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=11)
    base = to_gguf(model, tmp_path / "m.gguf", "f32", K.ACT_RELU)
    # PowerInfer's files: PWRI magic, no prosparse keys (the activation is ReLU), its threshold key
    path = with_extra(base, tmp_path / "pi.gguf", exact_predictor(model),
                      metadata={K.KEY_POWERINFER_SPARSE_THRESHOLD: 0.0}, magic=K.POWERINFER_MAGIC)
    with Runtime(path, n_ctx=64, threads=2) as rt:
        assert rt.spec.powerinfer and rt.sparse == "predictor"
        assert rel_err(decode_logits(rt, PROMPT), hf_logits(model, PROMPT)) <= 1e-4


@pytest.mark.smollm2
def test_cli_sparse_flags_and_stats(tmp_path, smollm2_path):
    import subprocess
    import sys

    from prosparse.gguf_file import GGUFFile
    with GGUFFile(smollm2_path) as gf:
        tokenizer = {k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")}
    model = tiny_llama(K.ACT_RELU, vocab=len(tokenizer[K.KEY_TOKENS]), seed=12)
    path = to_gguf(model, tmp_path / "m.gguf", "q8_0", K.ACT_RELU, tokenizer_metadata=tokenizer)
    r = subprocess.run([sys.executable, "-m", "prosparse.cli", "-m", str(path), "-p", "Hello there", "-n", "8",
                        "--temp", "0", "--ignore-eos", "--sparse", "exact", "--sparse-stats"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = [l for l in r.stderr.splitlines() if "mode exact" in l]
    assert summary and "FFN sparsity" in summary[0]
    rows = [l for l in r.stderr.splitlines() if l.startswith("prosparse_sparse:") and l.split(":")[1].strip()[:1].isdigit()]
    assert len(rows) == model.config.num_hidden_layers
    r = subprocess.run([sys.executable, "-m", "prosparse.cli", "-m", str(path), "-p", "Hi", "--sparse", "predictor"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "predictor mode needs predictor tensors" in r.stderr
