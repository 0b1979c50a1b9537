"""prosparse-reorder: neurons sorted by activation frequency, the model's function unchanged;
the runtime's per-neuron activation counts it sorts by."""

from __future__ import annotations

import numpy as np
import pytest

from prosparse import Runtime
from prosparse import constants as K
from prosparse.convert import ConversionError, write_llama_gguf
from prosparse.convert import reorder
from prosparse.gguf_file import GGUFFile
from test_forward import PROMPT, rel_err
from test_sparse import decode_logits, exact_predictor
from tiny_models import hf_activations, hf_logits, tiny_llama, with_extra

N_FF = 192
CALIBRATION = np.random.default_rng(0).integers(0, 320, size=300).tolist()
FFN_ROWS = (K.FFN_GATE, K.FFN_UP, K.FFN_DOWN_T)


def write(model, path, outtype="f32", activation=K.ACT_RELU, threshold=None, layout="sparse", **kw):
    return write_llama_gguf(path, model.config.to_dict(), model.state_dict(), outtype=outtype,
                            activation=activation, threshold=threshold, layout=layout, **kw)


def counts_of(path, tokens=CALIBRATION, window=64) -> np.ndarray:
    """What reorder sorts by: activation counts over tokens in windows from position 0."""
    with Runtime(path, n_ctx=window, threads=2, sparse="dense") as rt:
        rt.collect_stats(True)
        for i in range(0, len(tokens), window):
            rt._model.eval(tokens[i:i + window], 0)
        return rt.activation_counts()


def rows(gf: GGUFFile, name: str) -> np.ndarray:
    t = gf.tensors[name]
    return np.array(gf.tensor_data(name)).reshape(t.n_rows, -1)


def test_activation_counts_match_transformers(tmp_path):
    model = tiny_llama(K.ACT_FATRELU, 0.05, seed=21)
    path = write(model, tmp_path / "m.gguf", activation=K.ACT_FATRELU, threshold=0.05)
    hf_counts = [(act != 0).sum(0) for act in hf_activations(model, PROMPT)]
    for mode in ("dense", "exact"):
        with Runtime(path, n_ctx=64, threads=2, sparse=mode, sparse_stats=True) as rt:
            decode_logits(rt, PROMPT)                       # one token at a time: the mode's own path
            ours = rt.activation_counts()
            assert ours.shape == (2, N_FF) and ours.dtype == np.int64
            assert ours.sum() == sum(l.n_active for l in rt.sparsity().layers)
        # a gate within rounding of the threshold may land either side
        assert np.abs(ours - np.stack(hf_counts)).sum() <= 2, mode
    with Runtime(path, n_ctx=64, threads=2, sparse_stats=True) as rt:
        rt.evaluate(PROMPT)                                 # a batch: the dense FFN path
        assert np.abs(rt.activation_counts() - np.stack(hf_counts)).sum() <= 2
        rt.collect_stats(True)                              # reset
        assert rt.activation_counts().sum() == 0


@pytest.mark.parametrize("activation,threshold,outtype", [(K.ACT_RELU, None, "f32"), (K.ACT_FATRELU, 0.05, "q8_0"),
                                                          (K.ACT_RELU, None, "q4_1")])
def test_reorder_sorts_neurons_and_keeps_the_function(tmp_path, activation, threshold, outtype):
    model = tiny_llama(activation, threshold or 0.0, seed=22)
    src = write(model, tmp_path / "m.gguf", outtype, activation, threshold)
    before = counts_of(src)
    result = reorder.reorder_model(src, tmp_path / "hot.gguf", CALIBRATION, window=64)
    assert result.n_tokens == len(CALIBRATION) and 0.2 < result.sparsity < 0.9
    assert all(m > 0.5 for m in result.moved)

    after = counts_of(result.path)
    assert np.all(np.diff(after, axis=1) <= 0), "each layer's neurons by descending activation count"
    assert np.array_equal(after, -np.sort(-before, axis=1))

    with Runtime(src, n_ctx=64, threads=2, sparse="exact", activations="f32") as a, \
            Runtime(result.path, n_ctx=64, threads=2, sparse="exact", activations="f32") as b:
        assert rel_err(decode_logits(b, PROMPT), decode_logits(a, PROMPT)) <= 1e-5
        assert rel_err(b.evaluate(PROMPT), a.evaluate(PROMPT)) <= 1e-5
    if outtype == "f32":
        with Runtime(result.path, n_ctx=64, threads=2, sparse="exact") as b:
            assert rel_err(decode_logits(b, PROMPT), hf_logits(model, PROMPT)) <= 1e-4

    order = reorder.neuron_order(before)
    with GGUFFile(src) as g0, GGUFFile(result.path) as g1:
        for layer in range(2):
            for part in FFN_ROWS:
                name = K.block_tensor(layer, part)
                assert np.array_equal(rows(g1, name), rows(g0, name)[order[layer]]), name
        for name, t in g0.tensors.items():
            assert g1.tensors[name].type == t.type and g1.tensors[name].shape == t.shape
            if not any(f".{part}." in name for part in FFN_ROWS):
                assert np.array_equal(g1.tensor_data(name), g0.tensor_data(name)), name
        assert {k: g1.metadata[k] for k in g1.metadata if k not in g0.metadata} == {
            reorder.KEY_NEURON_ORDER: reorder.NEURON_ORDER_FREQUENCY, reorder.KEY_NEURON_ORDER_TOKENS: len(CALIBRATION)}
        for key in g0.metadata:
            assert np.array_equal(np.asarray(g1.metadata[key]), np.asarray(g0.metadata[key])), key

    # sorted already: a second pass keeps every neuron in place, the tensors byte for byte
    again = reorder.reorder_model(result.path, tmp_path / "again.gguf", CALIBRATION, window=64)
    assert again.moved == [0.0, 0.0]
    with GGUFFile(result.path) as g1, GGUFFile(again.path) as g2:
        assert len(g2.metadata) == len(g1.metadata)          # the order keys replaced, not repeated
        for name in g1.tensors:
            assert np.array_equal(g2.tensor_data(name), g1.tensor_data(name)), name


def test_float_ffn_down_columns_are_permuted(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=23)
    src = write(model, tmp_path / "m.gguf", "f16", layout="dense")       # plain ffn_down, f16
    out = reorder.reorder_model(src, tmp_path / "hot.gguf", CALIBRATION, window=64).path
    with Runtime(src, n_ctx=64, threads=2, sparse="dense", activations="f32") as a, \
            Runtime(out, n_ctx=64, threads=2, sparse="dense", activations="f32") as b:
        assert rel_err(decode_logits(b, PROMPT), decode_logits(a, PROMPT)) <= 1e-4
    with GGUFFile(out) as g:
        assert K.block_tensor(0, K.FFN_DOWN) in g.tensors and K.block_tensor(0, K.FFN_DOWN_T) not in g.tensors


@pytest.mark.parametrize("outtype", ["q8_0", "q4_1"])
def test_quantised_ffn_down_is_written_transposed(tmp_path, outtype):
    """A quantised plain ffn_down (the dense layout) cannot have its columns permuted, so it is
    written as ffn_down_t, transposed and re-quantised along the neurons, as exact mode does at
    load: the output in exact mode gives the input's exact-mode logits (float rounding apart,
    the sums over neurons now run hottest first), and needs no transposition at load."""
    model = tiny_llama(K.ACT_RELU, seed=27)
    src = write(model, tmp_path / "m.gguf", outtype, layout="dense")
    result = reorder.reorder_model(src, tmp_path / "hot.gguf", CALIBRATION, window=64)
    assert result.transposed == model.config.num_hidden_layers
    counts = counts_of(src)
    with GGUFFile(src) as a, GGUFFile(result.path) as b:
        for i in range(model.config.num_hidden_layers):
            down, down_t = K.block_tensor(i, K.FFN_DOWN), K.block_tensor(i, K.FFN_DOWN_T)
            assert down not in b.tensors and b.tensors[down_t].shape == a.tensors[down].shape[::-1]
            assert b.tensors[down_t].type == a.tensors[down].type
            order = np.argsort(-counts[i], kind="stable")
            np.testing.assert_array_equal(rows(b, K.block_tensor(i, K.FFN_GATE)),
                                          rows(a, K.block_tensor(i, K.FFN_GATE))[order])
    with Runtime(src, n_ctx=64, threads=2, sparse="exact", activations="f32") as a, \
            Runtime(result.path, n_ctx=64, threads=2, sparse="exact", activations="f32") as b:
        assert b.spec.has_down_t
        assert rel_err(decode_logits(b, PROMPT), decode_logits(a, PROMPT)) <= 1e-5
        assert rel_err(b.evaluate(PROMPT), a.evaluate(PROMPT)) <= 1e-5


def test_predictor_rows_follow_their_neurons(tmp_path):
    model = tiny_llama(K.ACT_RELU, seed=24)
    base = write(model, tmp_path / "m.gguf")
    # PowerInfer's magic too: the header is copied as it was
    src = with_extra(base, tmp_path / "p.gguf", exact_predictor(model), metadata={K.KEY_PREDICTOR_THRESHOLD: 0.0},
                     magic=K.POWERINFER_MAGIC)
    out = reorder.reorder_model(src, tmp_path / "hot.gguf", CALIBRATION, window=64).path
    with Runtime(src, n_ctx=64, threads=2, sparse="predictor") as a, \
            Runtime(out, n_ctx=64, threads=2, sparse="predictor", sparse_stats=True) as b:
        assert b.spec.powerinfer
        assert rel_err(decode_logits(b, PROMPT), decode_logits(a, PROMPT)) <= 1e-5
        assert b.sparsity().recall == 1.0                  # fc2's rows moved with their neurons


def test_refusals_leave_no_file(tmp_path):
    relu = tiny_llama(K.ACT_RELU, seed=25)
    narrow = write(tiny_llama(K.ACT_RELU, seed=25, n_embd=48, n_head=2, n_head_kv=2), tmp_path / "qd.gguf", "q8_0",
                   layout="dense")   # ffn_down's rows (192 neurons) are Q8_0, its 48 outputs are not 32s
    with pytest.raises(ConversionError, match=r"blk\.\d+\.ffn_down\.weight.*neither reordered nor transposed"):
        reorder.reorder_model(narrow, tmp_path / "out.gguf", CALIBRATION)
    silu = write(tiny_llama(K.ACT_SILU, seed=25), tmp_path / "silu.gguf", activation=K.ACT_SILU, layout="dense")
    with pytest.raises(ConversionError, match="SiLU"):
        reorder.reorder_model(silu, tmp_path / "out.gguf", CALIBRATION)
    src = write(relu, tmp_path / "m.gguf")
    odd = with_extra(src, tmp_path / "odd.gguf", {"blk.0.ffn_gate.bias": np.zeros(N_FF)})
    with pytest.raises(ConversionError, match=r"'blk\.0\.ffn_gate\.bias'.*refusing"):
        reorder.reorder_model(odd, tmp_path / "out.gguf", CALIBRATION)
    with pytest.raises(ConversionError, match="at least 16"):
        reorder.reorder_model(src, tmp_path / "out.gguf", CALIBRATION[:10])
    with pytest.raises(ConversionError, match="outside the vocabulary"):
        reorder.reorder_model(src, tmp_path / "out.gguf", CALIBRATION + [320])
    with pytest.raises(ConversionError, match="must not be the input"):
        reorder.reorder_model(src, src, CALIBRATION, force=True)
    assert not (tmp_path / "out.gguf").exists()

    (tmp_path / "taken.gguf").write_bytes(b"keep")
    with pytest.raises(ConversionError, match="already exists"):
        reorder.reorder_model(src, tmp_path / "taken.gguf", CALIBRATION)
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    src = write(tiny_llama(K.ACT_RELU, seed=26), tmp_path / "m.gguf")
    before = set(tmp_path.iterdir())

    def broken(*args):
        raise OSError("disk full")
    monkeypatch.setattr(reorder, "permuted", broken)
    with pytest.raises(OSError, match="disk full"):
        reorder.reorder_model(src, tmp_path / "out.gguf", CALIBRATION, window=64)
    assert set(tmp_path.iterdir()) == before


@pytest.mark.smollm2
def test_cli(tmp_path, smollm2_path, capsys):
    with GGUFFile(smollm2_path) as g:
        tok = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
        n_vocab = g.tensors[K.TOKEN_EMBD].n_rows
    model = tiny_llama(K.ACT_RELU, seed=27, vocab=n_vocab)
    src = write(model, tmp_path / "tiny.gguf", tokenizer_metadata=tok)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)

    assert reorder.main([str(src), "--calibration", str(text), "--window", "128"]) == 0
    err = capsys.readouterr().err
    assert "tiny.hot.gguf" in err and "calibration tokens" in err
    with GGUFFile(tmp_path / "tiny.hot.gguf") as g:
        # BOS per window, as the file's tokenizer says, counted with the text
        assert g.metadata[reorder.KEY_NEURON_ORDER_TOKENS] > 400

    assert reorder.main([str(src), "--calibration", str(text), "-q"]) == 1      # exists, no --force
    assert "already exists; pass --force" in capsys.readouterr().err
    assert reorder.main([str(src), "--calibration", str(tmp_path / "none.txt"), "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.txt: cannot read the calibration text" in err
    assert reorder.main([str(smollm2_path), "--calibration", str(text), "-o", str(tmp_path / "s.gguf")]) == 1
    assert "SiLU" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "s.gguf").exists()
