"""What predictors do to a model: perplexity in predictor mode vs exact mode, through the runtime
(the product) and through a torch model with the predictors' decisions applied (a reference).

The runtime applies a sparse FFN mode only to single-token decode steps; a batch (a prompt,
``Runtime.evaluate``) runs dense. Perplexity in predictor mode must therefore feed the held-out
text one token at a time: ``Runtime.decode_steps``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prosparse import constants as K

from .predictors import Predictor, decoder_layers


# --- the runtime ---------------------------------------------------------------------------


@dataclass
class DecodeEval:
    """Held-out perplexity of a GGUF through the runtime, one token at a time, in one mode."""
    mode: str
    perplexity: float
    nll: float
    tokens: int                       # predicted tokens
    seconds: float
    sparsity: float = float("nan")    # from the runtime's statistics (stats=True)
    predicted_sparsity: float = float("nan")
    recall: float = float("nan")
    layers: list[dict] = field(default_factory=list)


def decode_perplexity(gguf_path: str | Path, sequences: np.ndarray, mode: str, threads: int | None = None,
                      stats: bool = False, predictor_thresholds: list[float] | None = None) -> DecodeEval:
    """Perplexity of ``sequences`` [n, seq_len] (each scored from its first token) in ``mode``,
    with the runtime's per-layer statistics when ``stats`` (they cost the exact gate in predictor
    mode, not the outputs). ``predictor_thresholds``: per-layer thresholds instead of the file's."""
    from prosparse import Runtime
    sequences = np.asarray(sequences)
    nll_sum, count = 0.0, 0
    started = time.perf_counter()
    with Runtime(gguf_path, n_ctx=sequences.shape[1], threads=threads, sparse=mode, sparse_stats=stats) as rt:
        for layer, threshold in enumerate(predictor_thresholds or []):
            rt.set_predictor_threshold(threshold, layer)
        for seq in sequences:
            seq = [int(t) for t in seq]
            for logits, target in zip(rt.decode_steps(seq[:-1]), seq[1:]):
                logits = logits.astype(np.float64)
                peak = logits.max()
                nll_sum += peak + math.log(np.exp(logits - peak).sum()) - logits[target]
                count += 1
        report = rt.sparsity() if stats else None
    nll = nll_sum / max(count, 1)
    result = DecodeEval(mode, math.exp(min(nll, 50.0)), nll, count, time.perf_counter() - started)
    if report is not None:
        result.sparsity, result.predicted_sparsity, result.recall = (report.sparsity, report.predicted_sparsity,
                                                                     report.recall)
        result.layers = [{"sparsity": l.sparsity, "predicted_sparsity": l.predicted_sparsity, "recall": l.recall,
                          "computed_fraction": l.computed_fraction} for l in report.layers]
    return result


def compare_modes(gguf_path: str | Path, sequences: np.ndarray, threads: int | None = None,
                  operating_points: dict[str, list[float]] | None = None, log=print) -> dict:
    """Exact vs predictor mode on the same held-out sequences: perplexities, their ratio, and the
    runtime's recall / predicted sparsity (statistics on: they change no output). The file's
    thresholds are point "file"; ``operating_points`` adds others (label → per-layer thresholds)."""
    exact = decode_perplexity(gguf_path, sequences, "exact", threads)
    log(f"exact mode:     perplexity {exact.perplexity:.4f} ({exact.tokens:,} tokens, {exact.seconds:.0f} s)")
    points = {"file": None, **(operating_points or {})}
    results = {}
    for label, thresholds in points.items():
        p = decode_perplexity(gguf_path, sequences, "predictor", threads, stats=True, predictor_thresholds=thresholds)
        results[label] = {**asdict(p), "perplexity_ratio": p.perplexity / exact.perplexity}
        log(f"predictor mode ({label} thresholds): perplexity {p.perplexity:.4f} "
            f"({p.perplexity / exact.perplexity - 1:+.2%}), recall {p.recall:.2%}, predicted sparsity "
            f"{p.predicted_sparsity:.2%} (true {p.sparsity:.2%}), {p.seconds:.0f} s")
    return {"model": str(gguf_path), "sequences": list(sequences.shape), "exact": asdict(exact),
            "predictor": results["file"], "perplexity_ratio": results["file"]["perplexity_ratio"],
            "operating_points": {k: v for k, v in results.items() if k != "file"}}


# --- decode speed (prosparse-bench, where installed) ---------------------------------------


def bench_command(gguf_path: str | Path, n_gen: int = 64, repetitions: int = 3, threads: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "prosparse.bench", "-m", str(gguf_path), "-p", "0", "-n", str(n_gen),
           "-r", str(repetitions), "--sparse", "dense,exact,predictor", "-o", "json"]
    return cmd + (["-t", str(threads)] if threads else [])


def bench_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("prosparse.bench") is not None


def summarise_bench(records: list[dict]) -> dict:
    """Decode t/s per mode, the speedups over dense and their byte-ideal values (dense weight
    bytes per token ÷ the mode's), from prosparse-bench's JSON records."""
    by_mode = {r["sparse"]: r for r in records if r["test"].startswith("tg")}
    dense = by_mode.get("dense")
    out = {}
    for mode, r in by_mode.items():
        out[mode] = {"tokens_per_s": r["avg_ts"], "stddev": r["stddev_ts"],
                     "weight_bytes_per_token": r["weight_bytes_per_token"]}
        if dense:
            out[mode]["speedup"] = r["avg_ts"] / dense["avg_ts"]
            out[mode]["byte_ideal_speedup"] = dense["weight_bytes_per_token"] / r["weight_bytes_per_token"]
    return out


def run_bench(gguf_path: str | Path, n_gen: int = 64, repetitions: int = 3, threads: int | None = None,
              log=print) -> dict | None:
    if not bench_available():
        log("decode speed: prosparse.bench is not installed; skipped")
        return None
    cmd = bench_command(gguf_path, n_gen, repetitions, threads)
    log("$ " + " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = summarise_bench([json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")])
    for mode, s in summary.items():
        log(f"decode {mode:9s}: {s['tokens_per_s']:.1f} ± {s['stddev']:.1f} tok/s"
            + (f", {s['speedup']:.2f}× dense (byte-ideal {s['byte_ideal_speedup']:.2f}×)" if "speedup" in s else ""))
    return summary


# --- the torch reference: a model with the predictors' decisions applied --------------------


class PredictorMode:
    """Hooks that make a transformers model compute its FFNs as the runtime's predictor mode does:
    each layer keeps only the neurons its predictor marks active (logit ≥ the layer's threshold),
    i.e. x1 ⊙ predicted. Counts per layer (summed over tokens) accumulate in ``counts``:
    [active, predicted, predicted ∧ active, tokens]; with ``record`` each token's predicted
    count is kept in ``per_token_predicted[layer]`` (for comparison with the runtime)."""

    def __init__(self, model: nn.Module, predictors: list[Predictor], thresholds: list[float],
                 predictor_input: str, record: bool = False):
        layers = decoder_layers(model)
        if len(predictors) != len(layers) or len(thresholds) != len(layers):
            raise ValueError(f"{len(predictors)} predictors / {len(thresholds)} thresholds for {len(layers)} layers")
        self.predictors, self.thresholds, self.input = predictors, thresholds, predictor_input
        self.counts = torch.zeros(len(layers), 4, dtype=torch.float64)
        self.record = record
        self.per_token_predicted: list[list[torch.Tensor]] = [[] for _ in layers]
        self.margins: list[list[torch.Tensor]] = [[] for _ in layers]   # |logit − threshold|, min per token
        self._decisions: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.post_attention_layernorm.register_forward_hook(self._predict(i)))
            self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._apply(i)))

    def _predict(self, i: int):
        def hook(module, args, output):
            x = args[0] if self.input == K.PREDICTOR_INPUT_RESIDUAL else output
            with torch.no_grad():
                logits = self.predictors[i](x.float())
            self._decisions[i] = logits >= self.thresholds[i]
            if self.record:
                self.margins[i].append((logits - self.thresholds[i]).abs().amin(dim=-1).reshape(-1))
        return hook

    def _apply(self, i: int):
        def hook(module, args):
            x1, chosen = args[0], self._decisions[i]
            active = x1 != 0
            self.counts[i] += torch.tensor([active.sum().item(), chosen.sum().item(), (active & chosen).sum().item(),
                                            chosen[..., 0].numel()], dtype=torch.float64)
            if self.record:
                self.per_token_predicted[i].append(chosen.sum(dim=-1).reshape(-1))
            return (x1 * chosen.to(x1.dtype),)
        return hook

    def summary(self) -> dict:
        active, predicted, hits, tokens = self.counts.T
        n_ff = self.predictors[0].fc2.out_features
        return {"recall": (hits.sum() / active.sum()).item(),
                "predicted_sparsity": 1.0 - (predicted.sum() / (tokens.sum() * n_ff)).item(),
                "sparsity": 1.0 - (active.sum() / (tokens.sum() * n_ff)).item(),
                "layer_recall": (hits / active.clamp(min=1)).tolist(),
                "layer_predicted_sparsity": (1.0 - predicted / (tokens * n_ff).clamp(min=1)).tolist()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "PredictorMode":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def torch_perplexity(model: nn.Module, sequences: np.ndarray, batch_size: int = 8) -> float:
    """Mean next-token perplexity of ``sequences`` under ``model`` as it is (hooks included)."""
    import torch.nn.functional as F
    nll, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = torch.as_tensor(np.asarray(sequences[start:start + batch_size], dtype=np.int64))
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(min(nll / max(count, 1), 50.0))


def markdown(result: dict, bench: dict | None = None) -> str:
    """The comparison (and decode speeds) as markdown."""
    e = result["exact"]
    lines = ["| mode | perplexity | vs exact | recall | predicted sparsity | true sparsity |",
             "|---|---|---|---|---|---|", f"| exact | {e['perplexity']:.4f} | | | | |"]
    for label, p in {"file": result["predictor"], **result.get("operating_points", {})}.items():
        name = "predictor" if label == "file" else f"predictor, {label}"
        lines.append(f"| {name} | {p['perplexity']:.4f} | {p['perplexity_ratio'] - 1:+.2%} | {p['recall']:.2%} | "
                     f"{p['predicted_sparsity']:.2%} | {p['sparsity']:.2%} |")
    lines += ["", f"{result['sequences'][0]} held-out sequences × {result['sequences'][1]} tokens, "
                  f"decoded one token at a time"]
    if bench:
        lines += ["", "| mode | decode tok/s | weight bytes/token | speedup over dense | byte-ideal |",
                  "|---|---|---|---|---|"]
        for mode, s in bench.items():
            lines.append(f"| {mode} | {s['tokens_per_s']:.1f} ± {s['stddev']:.1f} | "
                         f"{s['weight_bytes_per_token'] / 2**20:.1f} MiB | {s.get('speedup', float('nan')):.2f}× | "
                         f"{s.get('byte_ideal_speedup', float('nan')):.2f}× |")
    return "\n".join(lines) + "\n"
