"""Model surgery: the gate activation (SiLU → ReLU → FATReLU), and a probe on x1.

LLaMA's FFN is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; x1 = act(gate(x)) ⊙ up(x) is the
input of down_proj. ProSparse swaps ``act_fn`` (the gate branch only) and penalises x1; the
activation sparsity of a model is the fraction of exact zeros of x1. The probe is a forward
pre-hook on every down_proj, so it sees x1 exactly as the model computes it.

The L1 term and its normalisation
---------------------------------
``l1_x1`` — the default, the paper's ‖x1‖₁: for each token the L1 norm of x1 over the n_ff neurons
(a sum, as in the paper's formula), averaged over the tokens of the batch and then over the
layers. Averaging over tokens makes λ independent of batch size, sequence length and
gradient accumulation; averaging over layers makes it independent of depth. It is not divided
by n_ff: it is the norm the paper writes, and λ then has the paper's order of magnitude.

Its weakness (REFERENCE §6): x1 can shrink without any new zero. Scaling up_proj by 1/c and
down_proj by c (or, since ReLU is positively homogeneous, gate_proj by 1/c) leaves the output
unchanged and divides the L1 by c. AdamW moves small weights readily, so the optimiser can lower
the penalty by this rescaling instead of by sparsifying.

``l1_contribution`` — a variant that rescaling cannot dodge: Σ_j |x1_j|·‖W_down[:, j]‖₂, the L1 of
the magnitudes of each neuron's contribution to the FFN's output, normalised the same way.
Both rescalings above multiply x1_j by 1/c and column j of W_down by c, so the term is unchanged;
it falls only when neurons actually stop contributing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

ACTIVATIONS = ("silu", "relu", "fatrelu")


class FATReLU(nn.Module):
    """FATReLU(t): x where x ≥ t, else 0 (REFERENCE §1). t = 0 is ReLU."""

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold == 0.0:
            return torch.relu(x)
        return torch.where(x >= self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """Every gated FFN (a module with gate_proj, up_proj, down_proj and act_fn), in layer order."""
    found = [m for m in model.modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    if not found:
        raise ValueError(f"{type(model).__name__}: no gated FFN (gate_proj/up_proj/down_proj/act_fn) found; "
                         f"only LLaMA-family models are supported")
    return found


def set_gate_activation(model: nn.Module, activation: str, threshold: float = 0.0) -> None:
    """Replace the gate activation of every FFN: "silu", "relu", or "fatrelu" with ``threshold``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for mlp in ffn_modules(model):
        mlp.act_fn = nn.SiLU() if activation == "silu" else FATReLU(threshold if activation == "fatrelu" else 0.0)


def gate_activation(model: nn.Module) -> tuple[str, float]:
    """(activation, threshold) of the model's FFNs, as set_gate_activation takes them."""
    act = ffn_modules(model)[0].act_fn
    if isinstance(act, FATReLU):
        return ("fatrelu", act.threshold) if act.threshold > 0 else ("relu", 0.0)
    if isinstance(act, nn.ReLU):
        return "relu", 0.0
    return "silu", 0.0


# --- the L1 term and the sparsity metric: functions of one layer's x1 ------------------------


def _tokens(x1: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x1 [..., n_ff] as [tokens, n_ff], without the masked-out (padding) tokens."""
    flat = x1.reshape(-1, x1.shape[-1])
    if token_mask is None:
        return flat
    return flat[token_mask.reshape(-1).to(torch.bool)]


def l1_x1(x1: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of ‖x1‖₁ (summed over neurons), in float32. x1: [..., n_ff]."""
    tokens = _tokens(x1, token_mask)
    return tokens.abs().sum(dim=-1, dtype=torch.float32).mean()


def l1_contribution(x1: torch.Tensor, down_weight: torch.Tensor,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of Σ_j |x1_j|·‖W_down[:, j]‖₂. down_weight: [n_embd, n_ff]."""
    tokens = _tokens(x1, token_mask)
    column_norms = down_weight.float().norm(dim=0)
    return (tokens.abs().float() @ column_norms).mean()


def count_zeros(x1: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(number of exact zeros of x1, number of entries), padding tokens excluded."""
    tokens = _tokens(x1, token_mask)
    return (tokens == 0).sum(), tokens.numel()


class X1Probe:
    """Forward pre-hooks on every down_proj that collect, while ``capture()`` is open:
    the L1 term (mean over layers, differentiable) and per-layer counts of zeros of x1.

    Nothing is collected outside ``capture()``, so recomputation by gradient checkpointing
    during backward is not counted twice.
    """

    def __init__(self, model: nn.Module, l1: str = "x1"):
        if l1 not in ("x1", "contribution"):
            raise ValueError(f"l1 must be 'x1' or 'contribution', got {l1!r}")
        self.l1_kind = l1
        self.n_layers = len(ffn_modules(model))
        self._active = False
        self._want_l1 = False
        self._token_mask = None
        self._l1_terms: list[torch.Tensor] = []
        # zeros / entries per layer, kept on the activations' device (no sync per layer)
        self.zeros: torch.Tensor | None = None
        self.entries: torch.Tensor | None = None
        self._handles = [mlp.down_proj.register_forward_pre_hook(self._hook(i))
                         for i, mlp in enumerate(ffn_modules(model))]

    def _hook(self, layer: int):
        def hook(module: nn.Module, args):
            x1 = args[0]
            # Gradient checkpointing recomputes this forward during backward, with the probe
            # closed, and needs the same tensors saved as the first time: so the term is
            # recomputed too whenever the last capture wanted it, and only kept while open.
            if self._want_l1 and torch.is_grad_enabled():
                if self.l1_kind == "x1":
                    term = l1_x1(x1, self._token_mask)
                else:
                    term = l1_contribution(x1, module.weight, self._token_mask)
                if self._active:
                    self._l1_terms.append(term)
            if not self._active:
                return
            with torch.no_grad():
                zeros, entries = count_zeros(x1, self._token_mask)
                if self.zeros is None:
                    self.zeros = torch.zeros(self.n_layers, dtype=torch.float64, device=x1.device)
                    self.entries = torch.zeros(self.n_layers, dtype=torch.float64, device=x1.device)
                self.zeros[layer] += zeros
                self.entries[layer] += entries
        return hook

    @contextlib.contextmanager
    def capture(self, want_l1: bool = True, token_mask: torch.Tensor | None = None):
        """Collect during one forward pass; afterwards ``l1()`` gives the L1 term of that pass."""
        self._active, self._want_l1, self._token_mask = True, want_l1, token_mask
        self._l1_terms = []
        try:
            yield self
        finally:
            self._active = False  # want_l1 and the mask stay: a recompute must repeat the pass

    def l1(self) -> torch.Tensor:
        """The L1 term of the last captured pass: the mean over layers of each layer's term."""
        if len(self._l1_terms) != self.n_layers:
            raise RuntimeError(f"X1Probe saw {len(self._l1_terms)} of {self.n_layers} layers; "
                               f"run the forward pass inside capture(want_l1=True)")
        return torch.stack(self._l1_terms).mean()

    def reset_counts(self) -> None:
        self.zeros = self.entries = None

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(zeros, entries) per layer since reset_counts(), float64 on the activations' device."""
        if self.zeros is None:
            empty = torch.zeros(self.n_layers, dtype=torch.float64)
            return empty, empty.clone()
        return self.zeros, self.entries

    def layer_sparsity(self) -> list[float]:
        """Fraction of exact zeros of x1 per layer, over everything captured since reset_counts()."""
        zeros, entries = self.counts()
        return (zeros / entries.clamp(min=1)).tolist()

    def sparsity(self) -> float:
        """The paper's activation sparsity: zeros of x1 averaged over layers and tokens."""
        per_layer = self.layer_sparsity()
        return sum(per_layer) / len(per_layer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
