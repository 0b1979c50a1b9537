"""Held-out evaluation: perplexity and the paper's activation sparsity (with a per-layer table),
and the threshold sweep of activation threshold shifting."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from .surgery import X1Probe, gate_activation, set_gate_activation


@dataclass
class EvalResult:
    nll: float                  # mean next-token negative log-likelihood (nats)
    perplexity: float
    sparsity: float             # zeros of x1, averaged over layers and tokens
    layer_sparsity: list[float] = field(default_factory=list)
    tokens: int = 0             # predicted tokens
    threshold: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for "bf16" (and "auto" where supported), else nothing."""
    if use_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_bf16(device: torch.device, precision: str) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # oneDNN's check for native bf16 instructions (AVX512-BF16 / AMX); elsewhere bf16 is emulated
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits[:, :-1] against input_ids[:, 1:], in float32."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           input_ids[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(model, sequences: np.ndarray, batch_size: int = 8, precision: str = "auto",
             probe: X1Probe | None = None, device: torch.device | None = None) -> EvalResult:
    """Perplexity and sparsity of ``model`` on ``sequences`` [n, seq_len].

    Under torch.distributed every rank evaluates its share of the sequences and the sums are
    reduced, so all ranks take part in each forward (as FSDP needs) and get the same result.
    """
    device = device or next(model.parameters()).device
    own_probe = probe is None
    probe = probe or X1Probe(model)
    probe.reset_counts()
    was_training = model.training
    model.eval()
    rank, world = dist.rank(), dist.world_size()
    # every rank runs the same number of forwards (padding with its own last batch, not counted)
    n_batches = math.ceil(len(sequences) / (batch_size * world))
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    token_count = torch.zeros((), dtype=torch.float64, device=device)
    zeros_sum = torch.zeros(probe.n_layers, dtype=torch.float64, device=device)
    entries_sum = torch.zeros(probe.n_layers, dtype=torch.float64, device=device)
    for b in range(n_batches):
        start = (b * world + rank) * batch_size
        rows = sequences[start: start + batch_size]
        counted = len(rows) > 0
        if not counted:
            rows = sequences[:batch_size]
        input_ids = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        probe.reset_counts()
        with autocast_context(device, precision), probe.capture(want_l1=False):
            logits = model(input_ids=input_ids).logits
        if counted:
            nll_sum += next_token_nll(logits, input_ids, reduction="sum").double()
            token_count += input_ids[:, 1:].numel()
            zeros, entries = probe.counts()
            zeros_sum += zeros.to(device)
            entries_sum += entries.to(device)
    for t in (nll_sum, token_count, zeros_sum, entries_sum):
        dist.all_reduce_sum(t)
    if own_probe:
        probe.remove()
    model.train(was_training)
    nll = (nll_sum / token_count.clamp(min=1)).item()
    layer = (zeros_sum / entries_sum.clamp(min=1)).tolist()
    _, threshold = gate_activation(model)
    return EvalResult(nll=nll, perplexity=math.exp(min(nll, 50.0)), sparsity=sum(layer) / len(layer),
                      layer_sparsity=layer, tokens=int(token_count.item()), threshold=threshold)


def sweep_threshold(model, sequences: np.ndarray, thresholds: list[float], batch_size: int = 8,
                    precision: str = "auto") -> list[EvalResult]:
    """Activation threshold shifting: evaluate FATReLU(t) for every t; the model's own
    activation is restored afterwards. (Meaningful for ReLU-trained models.)"""
    activation, threshold = gate_activation(model)
    results = []
    try:
        for t in thresholds:
            set_gate_activation(model, "fatrelu", t)
            results.append(evaluate(model, sequences, batch_size, precision))
            results[-1].threshold = t
    finally:
        set_gate_activation(model, activation, threshold)
    return results


def layer_table(result: EvalResult, columns: int = 6) -> str:
    """Per-layer sparsity as a compact table: ``L00 0.371  L01 0.802 …``."""
    cells = [f"L{i:02d} {s:6.1%}" for i, s in enumerate(result.layer_sparsity)]
    return "\n".join("  ".join(cells[i:i + columns]) for i in range(0, len(cells), columns))


def summary_line(result: EvalResult, label: str = "") -> str:
    t = "" if result.threshold in (None, 0.0) else f" t={result.threshold:g}"
    return (f"{label}{t}: perplexity {result.perplexity:.3f}  sparsity {result.sparsity:.2%}  "
            f"({result.tokens:,} tokens)")
