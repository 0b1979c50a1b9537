"""prosparse-bench on a tiny ReLU model: a well-formed markdown table and JSON lines, the weight
bytes per token against a hand count, and the bandwidth kernel. No timing is asserted."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from prosparse import bench
from prosparse import constants as K
from prosparse._native import ffi, lib
from prosparse.gguf_file import GGUFFile
from prosparse.loader import read_spec
from prosparse.native import LayerStats
from test_sparse import random_predictor
from tiny_models import tiny_llama, to_gguf

# tiny_llama()'s shape (untied head), written as f32
VOCAB, N_EMBD, N_FF, N_LAYER, N_HEAD, N_HEAD_KV = 320, 64, 192, 2, 4, 2
F32 = 4
KV_DIM = N_HEAD_KV * (N_EMBD // N_HEAD)
NORM = N_EMBD * F32
ATTENTION = NORM + (N_EMBD * N_EMBD + 2 * N_EMBD * KV_DIM + N_EMBD * N_EMBD) * F32 + NORM
FFN_MATRIX = N_EMBD * N_FF * F32
HEAD = NORM + VOCAB * N_EMBD * F32 + N_EMBD * F32      # output_norm, output, one embedding row
DENSE_BYTES = HEAD + N_LAYER * (ATTENTION + 3 * FFN_MATRIX)

ARGS = ["-p", "8", "-n", "4", "-r", "1", "-t", "1", "--bw-mib", "8"]


@pytest.fixture(scope="module")
def relu_path(tmp_path_factory):
    return to_gguf(tiny_llama(K.ACT_RELU), tmp_path_factory.mktemp("bench") / "relu.gguf", activation=K.ACT_RELU)


def run_bench(capsys, *argv) -> str:
    assert bench.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def markdown_rows(out: str) -> list[dict[str, str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bench.COLUMNS)
    assert re.fullmatch(r"\|(-+:?\|)+", lines[1]), lines[1]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return [dict(zip(header, r)) for r in rows]


def test_markdown_table(relu_path, capsys):
    out = run_bench(capsys, "-m", relu_path, *ARGS)
    rows = markdown_rows(out)
    assert [(r["mode"], r["test"]) for r in rows] == [("dense", "pp8"), ("dense", "tg4"),
                                                      ("exact", "pp8"), ("exact", "tg4")]
    for r in rows:
        assert re.fullmatch(r"llama \d+K F32 relu", r["model"]) and r["threads"] == "1"
        assert r["params"].endswith(" M") and r["size"].endswith(" MiB")
        mean, sd = (float(x) for x in re.fullmatch(r"([\d.]+) ± ([\d.]+)", r["t/s"]).groups())
        assert mean > 0 and sd == 0.0                      # one repetition: no spread
        if r["test"].startswith("pp"):
            assert r["weight bytes/token"] == "-" and r["% of bandwidth"] == "-"
        else:
            assert re.fullmatch(r"[\d.]+ MiB", r["weight bytes/token"])
            assert re.fullmatch(r"[\d.]+%", r["% of bandwidth"])
    assert re.search(r"^bandwidth: [\d.]+ GB/s \(1 thread\)$", out, re.M)
    # a file under 16 MiB is not checked for 2 MiB pages (tests/test_huge_pages.py: one that is)
    assert re.search(rf"^2 MiB pages: {re.escape(Path(relu_path).name)} unknown$", out, re.M)


def test_hot_first_files_are_named(relu_path, tmp_path):
    from prosparse.convert.reorder import reorder_model
    hot = reorder_model(relu_path, tmp_path / "hot.gguf", list(range(1, 200)), window=64).path
    assert bench.model_info(hot).desc == bench.model_info(relu_path).desc + " hot-first"
    assert not bench.model_info(relu_path).desc.endswith("hot-first")


def test_json_lines_and_bytes_per_token(relu_path, capsys):
    out = run_bench(capsys, "-m", relu_path, *ARGS, "-t", "1,2", "-o", "json")
    records = [json.loads(ln) for ln in out.splitlines()]
    assert [(r["n_threads"], r["sparse"], r["test"]) for r in records] == [
        (t, mode, test) for t in (1, 2) for mode in ("dense", "exact") for test in ("pp8", "tg4")]
    for r in records:
        assert r["model_n_params"] > 0 and r["model_size"] > 0
        assert len(r["samples_ts"]) == 1 and r["avg_ts"] > 0
        assert (r["weight_bytes_per_token"] is None) == r["test"].startswith("pp")
        assert r["huge_page_share"] is None                   # a file under 16 MiB
    tg = {(r["n_threads"], r["sparse"]): r for r in records if r["test"] == "tg4"}
    for t in (1, 2):
        dense, exact = tg[t, "dense"], tg[t, "exact"]
        assert dense["weight_bytes_per_token"] == DENSE_BYTES
        assert exact["weight_bytes_per_token"] <= DENSE_BYTES
        assert 0 < exact["ffn_computed_fraction"] < 1          # a random ReLU FFN: about half active
        assert math.isclose(exact["bandwidth_share"],
                            exact["weight_bytes_per_token"] * exact["avg_ts"] / exact["bandwidth_bytes_per_s"])


def test_dense_mode_on_the_sparse_layout_skips_zero_down_vectors(tmp_path, capsys):
    """With ffn_down_t, dense decoding reads the down vectors of active neurons only."""
    from prosparse.convert import write_llama_gguf
    model = tiny_llama(K.ACT_RELU)
    path = write_llama_gguf(tmp_path / "sparse.gguf", model.config.to_dict(), model.state_dict(),
                            activation=K.ACT_RELU, layout="sparse")
    out = run_bench(capsys, "-m", path, *ARGS, "-p", "0", "-o", "json")
    dense, exact = (json.loads(ln) for ln in out.splitlines())
    assert (dense["sparse"], exact["sparse"]) == ("dense", "exact")
    assert 0 < dense["ffn_sparsity"] < 1 and dense["ffn_sparsity"] == exact["ffn_sparsity"]
    assert abs(dense["weight_bytes_per_token"] - (DENSE_BYTES - N_LAYER * FFN_MATRIX * dense["ffn_sparsity"])) <= 1
    assert exact["weight_bytes_per_token"] < dense["weight_bytes_per_token"]


def test_default_modes_follow_the_file(tmp_path, capsys):
    silu = to_gguf(tiny_llama(), tmp_path / "silu.gguf")
    rows = markdown_rows(run_bench(capsys, "-m", silu, *ARGS, "-p", "0"))
    assert [(r["mode"], r["test"]) for r in rows] == [("dense", "tg4")]
    assert re.fullmatch(r"llama \d+K F32", rows[0]["model"])


def test_predictor_mode_bytes_formula(tmp_path):
    """Exact and predictor bytes from given activity: gate rows scale with the predicted
    fraction (plus fc1/fc2), up and down with the computed fraction."""
    from tiny_models import with_extra
    model = tiny_llama(K.ACT_RELU)
    rank = 16
    path = with_extra(to_gguf(model, tmp_path / "base.gguf", activation=K.ACT_RELU), tmp_path / "p.gguf",
                      random_predictor(model, rank=rank))
    with GGUFFile(path) as gf:
        spec = read_spec(gf)
    tokens = 10
    layers = [LayerStats(n_tokens=tokens, n_active=0, n_predicted=tokens * N_FF // 2, n_predicted_active=0,
                         n_computed=tokens * N_FF // 4, n_ff=N_FF, predictor=True)] * N_LAYER
    predictor_tensors = (rank * N_EMBD + N_FF * rank) * F32
    assert bench.weight_bytes_per_token(spec, "dense") == DENSE_BYTES
    assert bench.weight_bytes_per_token(spec, "exact", layers) == DENSE_BYTES - N_LAYER * 3 * FFN_MATRIX // 2
    assert bench.weight_bytes_per_token(spec, "predictor", layers) == (
        DENSE_BYTES - N_LAYER * (FFN_MATRIX // 2 + 3 * FFN_MATRIX // 2 - predictor_tensors))
    with pytest.raises(ValueError, match="layer statistics"):
        bench.weight_bytes_per_token(spec, "exact")


def test_read_bandwidth_is_positive_and_finite():
    bw = bench.read_bandwidth([1, 2], mib=8, repeats=2)
    assert set(bw) == {1, 2} and all(math.isfinite(b) and b > 0 for b in bw.values())
    buf = np.ones(1 << 20, dtype=np.uint8)
    assert lib.ps_read_bandwidth(ffi.from_buffer(buf), buf.size, 0, 1) == -1.0     # bad thread count


@pytest.mark.parametrize("n_bytes", [0, 1, 7, 8, 255, 256, 1000, 4096 + 13, 100_003])
@pytest.mark.parametrize("offset", [0, 3])
def test_read_sum_reads_every_byte_in_every_isa(n_bytes, offset):
    """The timed loops' sum equals numpy's wrapping sum of the 64-bit words (tail zero-padded)."""
    raw = np.random.default_rng(n_bytes).integers(0, 256, size=n_bytes + offset + 8, dtype=np.uint8)
    data = raw[offset:offset + n_bytes]
    padded = np.zeros(-(-n_bytes // 8) * 8, dtype=np.uint8)
    padded[:n_bytes] = data
    expected = int(padded.view("<u8").sum(dtype=np.uint64)) if n_bytes else 0
    for isa in range(4):
        if lib.ps_kernels_isa_available(isa):
            assert lib.ps_read_sum(ffi.from_buffer(data), n_bytes, isa) == expected, isa


def test_depth_and_kv_type(relu_path, capsys):
    """-d D evaluates D tokens first (llama-bench's depth; the tests are named "... @ dD"),
    --kv-type runs each test with each KV cache type."""
    out = run_bench(capsys, "-m", relu_path, *ARGS, "--sparse", "exact", "-d", "0,40", "--kv-type", "f32,f16",
                    "-o", "json")
    records = [json.loads(ln) for ln in out.splitlines()]
    assert [(r["type_kv"], r["n_depth"], r["test"]) for r in records] == [
        (kv, d, test + (f" @ d{d}" if d else "")) for kv in ("f32", "f16") for d in (0, 40) for test in ("pp8", "tg4")]
    rows = markdown_rows(run_bench(capsys, "-m", relu_path, *ARGS, "--sparse", "exact", "-d", "40", "--kv-type", "f16"))
    assert [(r["kv"], r["test"]) for r in rows] == [("f16", "pp8 @ d40"), ("f16", "tg4 @ d40")]


def test_depth_positions(relu_path):
    """What the timed part evaluates at depth D: a prompt of D tokens first, then the test's
    tokens at positions D, D+1, ... (as llama-bench; tg at depth 0 keeps a 1-token prompt)."""
    with bench.Runtime(relu_path, n_ctx=64, threads=1) as rt:
        tokens = bench.bench_tokens(rt, 64)
        calls = []
        real = rt._model.eval
        rt._model.eval = lambda toks, pos, **kw: (calls.append((len(toks), pos)), real(toks, pos, **kw))[1]
        bench.run_decode(rt, tokens, 3, depth=20)
        assert calls == [(20, 0), (1, 20), (1, 21), (1, 22)]
        calls.clear()
        bench.run_decode(rt, tokens, 2)
        assert calls == [(1, 0), (1, 1), (1, 2)]
        calls.clear()
        bench.prompt_ns(rt, tokens, 8, depth=20)
        assert calls == [(20, 0), (8, 20)]


def test_negative_depth_is_refused(relu_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["-m", str(relu_path), *ARGS, "--n-depth=-1"])
    assert e.value.code == 2
    assert "argument -d/--n-depth: expected non-negative integers, got '-1'" in capsys.readouterr().err


def test_activity_at_depth_counts_the_decode_steps_alone(relu_path, capsys):
    """The sparse modes' bytes per token come from the decode steps' activity: the untimed prompt
    before them runs the dense FFN (every neuron computed) and must not count."""
    out = run_bench(capsys, "-m", relu_path, *ARGS, "-p", "0", "-n", "8", "--sparse", "exact", "-d", "0,40",
                    "-o", "json")
    at = {r["n_depth"]: r for r in map(json.loads, out.splitlines())}
    assert 0 < at[0]["ffn_computed_fraction"] < 0.75 and 0 < at[40]["ffn_computed_fraction"] < 0.75
    assert at[40]["weight_bytes_per_token"] < DENSE_BYTES
