"""Activation predictors (PowerInfer's, REFERENCE §3–4): collect → train → thresholds → export.

One predictor per layer guesses, before the gate is computed, which FFN neurons a token will
activate, so that predictor-mode decoding reads the gate, up and down rows of those alone:

    logits = fc2 · relu(fc1 · x)          fc1 [rank, n_embd], fc2 [n_ff, rank], no biases
    neuron j predicted active  ⇔  logits_j ≥ the layer's threshold

The target is the active mask of x1 = act(gate) ⊙ up (x1 ≠ 0, the input of down_proj): the
definition of "active" that training's sparsity (surgery.py) and the runtime's statistics use.

The input x
-----------
The runtime takes either the residual stream before ``ffn_norm`` ("residual", PowerInfer's
choice and the runtime's default) or the normalised FFN input ("normed"). The gate is linear in
the normed input, g = W_gate · (x / rms(x) ⊙ w_norm), so the normed input looks like the natural
one; but a bias-free ReLU predictor is positively homogeneous, so on the residual its logits are
those of the normed direction times a per-token positive factor, and ReLU's decision (g > 0) is
scale-free. Measured on SmolLM2-135M (PREDICTORS.md: 3–8 layers, ranks 64 and 128, ReLU and
FATReLU t = 0.1, thresholds set for 95% held-out recall) the two inputs give the same predicted
sparsity within ±0.8 points, neither ahead. The default is therefore "residual": equally
accurate, the runtime's default, and the only input PowerInfer reads, so the same predictor
folder also makes working ``--format powerinfer`` files.

Memory stays bounded: samples are stored per layer as float16 inputs and bit-packed masks
(n_ff / 8 bytes), in .npy files under the output folder (memory-mapped, so a 7B model's 400k
samples per layer need disk, not RAM), and one layer's samples are loaded at a time to train.

Training: weighted BCE (positives up-weighted by ``pos_weight``), Adam, mini-batches; after each
epoch the predictor is scored on held-out samples (from held-out documents) and the epoch with
the highest predicted sparsity at the target recall is kept (early stopping with ``patience``).
Recall alone cannot select an epoch — predicting every neuron active has recall 1 — so the score
is the sparsity reached when the threshold is set for the target recall. The threshold is then
chosen on one half of the held-out samples and recall / predicted sparsity are reported on the
other half, so the reported recall is not the one the threshold was fitted to.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prosparse import constants as K

from .surgery import ffn_modules

DEFAULT_INPUT = K.PREDICTOR_INPUT_RESIDUAL
PREDICTOR_FILE = "model_{}.pt"       # the converter's (and PowerInfer's) names
THRESHOLDS_FILE = "thresholds.json"
REPORT_JSON = "report.json"
REPORT_MD = "REPORT.md"
SAMPLES_DIR = "samples"
# recall targets whose thresholds the report also lists (predictor-eval --target-recalls)
RECALL_CURVE = (0.9, 0.95, 0.96, 0.97, 0.98, 0.99)


# --- hooks: the predictor input and the active mask of every layer ------------------------


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (modules with ``mlp`` and ``post_attention_layernorm``), in order."""
    layers = [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "post_attention_layernorm")]
    if len(layers) != len(ffn_modules(model)):
        raise ValueError(f"{type(model).__name__}: found {len(layers)} decoder layers with "
                         f"post_attention_layernorm for {len(ffn_modules(model))} FFNs; "
                         f"only LLaMA-family layers are supported")
    return layers


class LayerProbe:
    """Forward hooks that keep, for each forward pass, every layer's predictor input (the input of
    ``post_attention_layernorm`` = the residual, or its output = the normed FFN input) and the
    active mask of x1 (the input of down_proj ≠ 0), flattened to [tokens, ·].

    ``rows`` (flat token indices of the batch) keeps only those tokens; None keeps all.
    """

    def __init__(self, model: nn.Module, predictor_input: str = DEFAULT_INPUT):
        if predictor_input not in K.PREDICTOR_INPUTS:
            raise ValueError(f"predictor input must be one of {', '.join(K.PREDICTOR_INPUTS)}, "
                             f"got {predictor_input!r}")
        self.predictor_input = predictor_input
        layers = decoder_layers(model)
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.masks: list[torch.Tensor | None] = [None] * len(layers)
        self.rows: torch.Tensor | None = None
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.post_attention_layernorm.register_forward_hook(self._input_hook(i)))
            self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._mask_hook(i)))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1, t.shape[-1])
        return flat if self.rows is None else flat[self.rows]

    def _input_hook(self, layer: int):
        def hook(module, args, output):
            x = args[0] if self.predictor_input == K.PREDICTOR_INPUT_RESIDUAL else output
            self.inputs[layer] = self._keep(x).float()
        return hook

    def _mask_hook(self, layer: int):
        def hook(module, args):
            self.masks[layer] = self._keep(args[0]) != 0
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LayerProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def backbone(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (its logits would be the largest tensor of the pass)."""
    return getattr(model, "model", model)


# --- samples: float16 inputs and bit-packed masks, per layer -------------------------------


def pack_masks(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """bool [n, n_ff] → uint8 [n, ⌈n_ff/8⌉] (bit j%8 of byte j//8 is neuron j)."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=1, bitorder="little")


def unpack_masks(packed: np.ndarray, n_ff: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, axis=1, count=n_ff, bitorder="little").astype(bool))


@dataclass
class LayerSamples:
    inputs: np.ndarray          # float16 [n, n_embd]
    masks: np.ndarray           # uint8 [n, ⌈n_ff/8⌉], pack_masks
    n_ff: int

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def take(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs float32, masks bool) of ``rows`` (a slice or an index array)."""
        x = torch.from_numpy(np.ascontiguousarray(self.inputs[rows])).float()
        return x, unpack_masks(np.ascontiguousarray(self.masks[rows]), self.n_ff)

    def split(self, at: int) -> tuple["LayerSamples", "LayerSamples"]:
        return (LayerSamples(self.inputs[:at], self.masks[:at], self.n_ff),
                LayerSamples(self.inputs[at:], self.masks[at:], self.n_ff))

    def loaded(self) -> "LayerSamples":
        """A copy in RAM (the training loop reads random rows)."""
        return LayerSamples(np.array(self.inputs), np.array(self.masks), self.n_ff)


@dataclass
class SampleSet:
    """Per-layer samples of one split; ``layers[i]`` for layer i."""
    layers: list[LayerSamples]
    predictor_input: str
    tokens_seen: int = 0       # tokens forwarded (samples are a subset when token_fraction < 1)

    def __len__(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def save_meta(self, directory: Path, extra: dict) -> None:
        meta = {"samples": len(self), "predictor_input": self.predictor_input,
                "tokens_seen": self.tokens_seen, **extra}
        _write_json(directory / "meta.json", meta)

    @classmethod
    def open(cls, directory: Path, expect: dict) -> "SampleSet | None":
        """The samples stored in ``directory`` if complete and collected with ``expect``'s settings."""
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if any(meta.get(k) != v for k, v in expect.items()):
            return None
        layers = []
        for i in range(meta["n_layer"]):
            inputs = np.load(directory / f"inputs_{i}.npy", mmap_mode="r")[: meta["samples"]]
            masks = np.load(directory / f"masks_{i}.npy", mmap_mode="r")[: meta["samples"]]
            layers.append(LayerSamples(inputs, masks, meta["n_ff"]))
        return cls(layers, meta["predictor_input"], meta["tokens_seen"])


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """(n_layer, n_embd, n_ff)."""
    c = model.config
    return len(ffn_modules(model)), c.hidden_size, c.intermediate_size


@torch.no_grad()
def collect_samples(model: nn.Module, sequences: np.ndarray, n_samples: int,
                    predictor_input: str = DEFAULT_INPUT, token_fraction: float = 1.0,
                    batch_size: int = 8, seed: int = 0, store_dir: Path | None = None,
                    log=print) -> SampleSet:
    """Run ``model`` over ``sequences`` [n, seq_len] (in a seeded random order) and keep up to
    ``n_samples`` (input, active mask) pairs per layer, each token kept with probability
    ``token_fraction``. With ``store_dir`` the samples go to .npy files there (memory-mapped)."""
    if not 0.0 < token_fraction <= 1.0:
        raise ValueError(f"token_fraction must be in (0, 1], got {token_fraction}")
    n_layer, n_embd, n_ff = model_dims(model)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sequences))
    n_samples = min(n_samples, int(len(sequences) * sequences.shape[1]))
    inputs, masks = [], []
    for i in range(n_layer):
        if store_dir is not None:
            store_dir.mkdir(parents=True, exist_ok=True)
            inputs.append(np.lib.format.open_memmap(store_dir / f"inputs_{i}.npy", "w+", np.float16, (n_samples, n_embd)))
            masks.append(np.lib.format.open_memmap(store_dir / f"masks_{i}.npy", "w+", np.uint8,
                                                   (n_samples, (n_ff + 7) // 8)))
        else:
            inputs.append(np.empty((n_samples, n_embd), np.float16))
            masks.append(np.empty((n_samples, (n_ff + 7) // 8), np.uint8))
    was_training = model.training
    model.eval()
    filled = tokens_seen = 0
    started = time.perf_counter()
    with LayerProbe(model, predictor_input) as probe:
        for start in range(0, len(order), batch_size):
            if filled >= n_samples:
                break
            batch = np.asarray(sequences[np.sort(order[start:start + batch_size])], dtype=np.int64)
            keep = np.flatnonzero(rng.random(batch.size) < token_fraction)[: n_samples - filled]
            if len(keep) == 0:
                continue
            probe.rows = torch.from_numpy(keep)
            backbone(model)(input_ids=torch.from_numpy(batch), use_cache=False)
            end = filled + len(keep)
            for i in range(n_layer):
                inputs[i][filled:end] = probe.inputs[i].numpy().astype(np.float16)
                masks[i][filled:end] = pack_masks(probe.masks[i].numpy())
            filled, tokens_seen = end, tokens_seen + batch.size
    model.train(was_training)
    log(f"collected {filled:,} samples per layer from {tokens_seen:,} tokens "
        f"({time.perf_counter() - started:.0f} s)")
    for arr in inputs + masks:
        if isinstance(arr, np.memmap):
            arr.flush()
    layers = [LayerSamples(inputs[i][:filled], masks[i][:filled], n_ff) for i in range(n_layer)]
    return SampleSet(layers, predictor_input, tokens_seen)


# --- the predictor ---------------------------------------------------------------------


class Predictor(nn.Module):
    """Linear(n_embd → rank, no bias) → ReLU → Linear(rank → n_ff, no bias): raw logits.

    ``input_scale`` (a per-feature 1/RMS of the training inputs) only conditions the
    optimisation — residual streams carry a few features hundreds of times larger than the
    rest; ``export()`` folds it into fc1, so the files hold the plain two matrices."""

    def __init__(self, n_embd: int, n_ff: int, rank: int):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, rank, bias=False)
        self.fc2 = nn.Linear(rank, n_ff, bias=False)
        self.register_buffer("input_scale", torch.ones(n_embd), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x * self.input_scale)))

    def export(self) -> dict[str, torch.Tensor]:
        """The converter's state dict: {fc1.weight [rank, n_embd], fc2.weight [n_ff, rank]}, float32."""
        with torch.no_grad():
            return {"fc1.weight": (self.fc1.weight * self.input_scale).float().contiguous().clone(),
                    "fc2.weight": self.fc2.weight.float().contiguous().clone()}

    @classmethod
    def from_export(cls, state: dict[str, torch.Tensor]) -> "Predictor":
        rank, n_embd = state["fc1.weight"].shape
        p = cls(n_embd, state["fc2.weight"].shape[0], rank)
        p.load_state_dict({k: v.float() for k, v in state.items()})
        return p


def load_predictors(directory: str | Path) -> tuple[list[Predictor], list[float], str]:
    """(predictors, per-layer thresholds, input) of a predictor folder written by ``export_predictors``
    (or PowerInfer's: no thresholds.json → threshold 0, input "residual")."""
    directory = Path(directory)
    files = sorted(directory.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    predictors = [Predictor.from_export(torch.load(f, map_location="cpu", weights_only=True)) for f in files]
    spec = json.loads((directory / THRESHOLDS_FILE).read_text()) if (directory / THRESHOLDS_FILE).is_file() else {}
    thresholds = spec.get("layer_thresholds") or [float(spec.get("threshold", 0.0))] * len(predictors)
    return predictors, [float(t) for t in thresholds], spec.get("input", K.PREDICTOR_INPUT_RESIDUAL)


# --- scoring and thresholds ------------------------------------------------------------


@dataclass
class Score:
    """A predictor's decisions against the true active masks of some samples."""
    threshold: float
    recall: float                  # truly active predicted active ÷ truly active
    predicted_sparsity: float      # fraction predicted inactive
    sparsity: float                # fraction truly inactive (the best a perfect predictor reaches)


@torch.no_grad()
def predictor_logits(predictor: Predictor, samples: LayerSamples, chunk: int = 4096):
    """(logits, masks) chunk by chunk over the samples."""
    for start in range(0, len(samples), chunk):
        x, m = samples.take(slice(start, start + chunk))
        yield predictor(x), m


def threshold_for_recall(positive_logits: torch.Tensor, target_recall: float) -> float:
    """The highest threshold t with (#positive logits ≥ t) ≥ target_recall · #positives."""
    n = positive_logits.numel()
    if n == 0:
        return math.inf
    ordered = positive_logits.flatten().sort().values
    return float(ordered[min(int(math.floor(n * (1.0 - target_recall))), n - 1)])


@torch.no_grad()
def score(predictor: Predictor, samples: LayerSamples, threshold: float | None = None,
          target_recall: float | None = None) -> Score:
    """Recall and predicted sparsity at ``threshold``, or at the threshold that reaches
    ``target_recall`` on these samples (chosen here)."""
    if threshold is None:
        positives = torch.cat([logits[m] for logits, m in predictor_logits(predictor, samples)])
        threshold = threshold_for_recall(positives, target_recall)
        if not math.isfinite(threshold):        # no active neuron at all: predict none
            threshold = 1e30
    active = predicted = hits = cells = 0
    for logits, m in predictor_logits(predictor, samples):
        chosen = logits >= threshold
        active += int(m.sum())
        predicted += int(chosen.sum())
        hits += int((chosen & m).sum())
        cells += m.numel()
    return Score(threshold=float(threshold), recall=hits / active if active else float("nan"),
                 predicted_sparsity=1.0 - predicted / cells, sparsity=1.0 - active / cells)


def operating_curve(predictor: Predictor, select: LayerSamples, test: LayerSamples,
                    targets=RECALL_CURVE) -> list[list[float]]:
    """[target, threshold chosen on ``select``, recall and predicted sparsity on ``test``] per target."""
    curve = []
    for target in targets:
        threshold = score(predictor, select, target_recall=target).threshold
        point = score(predictor, test, threshold=threshold)
        curve.append([target, threshold, point.recall, point.predicted_sparsity])
    return curve


# --- training ----------------------------------------------------------------------------


@dataclass
class TrainSettings:
    rank: int = 256                  # 128 → 256: +4–7 points of predicted sparsity (PREDICTORS.md)
    # thresholds are chosen on the select half; the test half lands ≈ 0.2 point under, so 0.96
    # keeps the measured recall at ≥ 95%
    target_recall: float = 0.96
    pos_weight: float = 4.0          # BCE weight of active neurons (favours recall)
    lr: float = 1e-3
    batch_size: int = 256            # more, smaller steps beat larger ones here (PREDICTORS.md)
    max_epochs: int = 20
    patience: int = 3                # epochs without a better held-out score before stopping
    time_budget_s: float = 0.0       # per layer; 0: none (checked between mini-batches)
    seed: int = 0

    def check(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")
        for name in ("rank", "batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pos_weight <= 0 or self.lr <= 0:
            raise ValueError(f"pos_weight and lr must be positive, got {self.pos_weight}, {self.lr}")


@dataclass
class LayerResult:
    layer: int
    threshold: float
    recall: float                   # on the test half of the held-out samples
    predicted_sparsity: float
    sparsity: float                 # true sparsity of those samples
    select_recall: float            # on the half the threshold was chosen on (≥ target by construction)
    recall_at_zero: float           # PowerInfer's default decision, logit ≥ 0, on the test half
    predicted_sparsity_at_zero: float
    epochs: int
    best_epoch: int
    train_s: float
    # other operating points: [target recall, threshold (chosen on the select half),
    # recall, predicted sparsity (on the test half)] for each of RECALL_CURVE
    curve: list[list[float]] = field(default_factory=list)


def input_scale(samples: LayerSamples, rows: int = 16384) -> torch.Tensor:
    x, _ = samples.take(slice(0, rows))
    return 1.0 / x.pow(2).mean(dim=0).sqrt().clamp(min=1e-6)


def train_predictor(train: LayerSamples, select: LayerSamples, settings: TrainSettings,
                    log=print) -> tuple[Predictor, Score, int, int]:
    """Train one layer's predictor; (predictor of the best epoch, its held-out score at the
    target recall, epochs run, best epoch)."""
    settings.check()
    torch.manual_seed(settings.seed)
    n_embd = train.inputs.shape[1]
    predictor = Predictor(n_embd, train.n_ff, settings.rank)
    predictor.input_scale.copy_(input_scale(train))
    optimizer = torch.optim.Adam(predictor.parameters(), lr=settings.lr)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.full((train.n_ff,), float(settings.pos_weight)))
    generator = torch.Generator().manual_seed(settings.seed)
    started = time.perf_counter()
    best, best_state, best_epoch, stale, epoch = None, None, 0, 0, 0
    out_of_time = False
    for epoch in range(1, settings.max_epochs + 1):
        order = torch.randperm(len(train), generator=generator).numpy()
        for start in range(0, len(order), settings.batch_size):
            x, m = train.take(np.sort(order[start:start + settings.batch_size]))
            loss = loss_fn(predictor(x), m.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if settings.time_budget_s and time.perf_counter() - started > settings.time_budget_s:
                out_of_time = True
                break
        current = score(predictor, select, target_recall=settings.target_recall)
        if best is None or current.predicted_sparsity > best.predicted_sparsity:
            best, best_epoch, stale = current, epoch, 0
            best_state = {k: v.clone() for k, v in predictor.state_dict().items()}
        else:
            stale += 1
        log(f"  epoch {epoch}: loss {loss.item():.4f}, held-out predicted sparsity "
            f"{current.predicted_sparsity:.2%} at recall {current.recall:.2%} (true {current.sparsity:.2%})")
        if stale >= settings.patience or out_of_time:
            break
    predictor.load_state_dict(best_state)
    return predictor, best, epoch, best_epoch


# --- the whole job: samples → one predictor per layer → files + report --------------------


@dataclass
class CollectSettings:
    samples: int = 100_000           # training samples per layer
    heldout_samples: int = 8_000     # held-out samples per layer (half select, half test)
    token_fraction: float = 1.0
    batch_size: int = 8
    seed: int = 0


@dataclass
class PredictorReport:
    model: str
    predictor_input: str
    n_layer: int
    n_embd: int
    n_ff: int
    train: dict
    collect: dict
    predictor_type: str = "f16"      # the type the bytes below are counted in
    layers: list[LayerResult] = field(default_factory=list)
    train_samples: int = 0
    heldout_samples: int = 0
    collect_s: float = 0.0
    complete: bool = False

    @property
    def rank(self) -> int:
        return self.train["rank"]

    def bytes_per_token_per_layer(self) -> int:
        """Weight bytes one layer's predictor reads per token: rank·(n_embd + n_ff)·type size."""
        return predictor_bytes(self.rank, self.n_embd, self.n_ff, self.predictor_type)

    def averages(self) -> dict:
        def mean(key):
            values = [getattr(r, key) for r in self.layers]
            return sum(values) / len(values) if values else float("nan")
        keys = ("recall", "predicted_sparsity", "sparsity", "recall_at_zero", "predicted_sparsity_at_zero")
        return {k: mean(k) for k in keys}

    def thresholds_for(self, target_recall: float) -> list[float]:
        """Per-layer thresholds for another recall target of RECALL_CURVE (no retraining)."""
        found = [[t for target, t, _, _ in r.curve if abs(target - target_recall) < 1e-9] for r in self.layers]
        if not all(found):
            raise ValueError(f"recall target {target_recall} is not in the report's curve "
                             f"({', '.join(str(t) for t in RECALL_CURVE)})")
        return [f[0] for f in found]

    def curve_averages(self) -> list[dict]:
        """Mean recall and predicted sparsity over layers for each target of the curve."""
        if not self.layers or not self.layers[0].curve:
            return []
        out = []
        for k, point in enumerate(self.layers[0].curve):
            out.append({"target_recall": point[0],
                        "recall": sum(r.curve[k][2] for r in self.layers) / len(self.layers),
                        "predicted_sparsity": sum(r.curve[k][3] for r in self.layers) / len(self.layers)})
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        out["curve_averages"] = self.curve_averages()
        out["averages"] = self.averages()
        out["predictor_bytes_per_token"] = {
            "per_layer": self.bytes_per_token_per_layer(),
            "total": self.bytes_per_token_per_layer() * self.n_layer,
            "fraction_of_dense_ffn": self.rank * (self.n_embd + self.n_ff) / (3 * self.n_embd * self.n_ff),
        }
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorReport":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["layers"] = [LayerResult(**r) for r in d.get("layers", [])]
        return cls(**d)

    def markdown(self) -> str:
        avg = self.averages()
        per_layer = self.bytes_per_token_per_layer()
        lines = [f"# Predictors for {self.model}", "",
                 f"input `{self.predictor_input}`, rank {self.rank}, target recall {self.train['target_recall']:.2%}, "
                 f"{self.train_samples:,} training + {self.heldout_samples:,} held-out samples per layer "
                 f"(held-out documents; threshold chosen on one half, reported on the other).", "",
                 f"Predictor weights read per token ({self.predictor_type}): {_size(per_layer)} per layer, "
                 f"{_size(per_layer * self.n_layer)} for {self.n_layer} layers "
                 f"({self.to_dict()['predictor_bytes_per_token']['fraction_of_dense_ffn']:.1%} of the dense FFN's "
                 f"weight count).", "",
                 "| layer | sparsity | predicted sparsity | recall | threshold | recall @0 | pred. sparsity @0 | epochs (best) | s |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            lines.append(f"| {r.layer} | {r.sparsity:.2%} | {r.predicted_sparsity:.2%} | {r.recall:.2%} | "
                         f"{r.threshold:.3g} | {r.recall_at_zero:.2%} | {r.predicted_sparsity_at_zero:.2%} | "
                         f"{r.epochs} ({r.best_epoch}) | {r.train_s:.0f} |")
        lines.append(f"| **mean** | {avg['sparsity']:.2%} | {avg['predicted_sparsity']:.2%} | {avg['recall']:.2%} | | "
                     f"{avg['recall_at_zero']:.2%} | {avg['predicted_sparsity_at_zero']:.2%} | | "
                     f"{sum(r.train_s for r in self.layers):.0f} |")
        curve = self.curve_averages()
        if curve:
            lines += ["", "Other operating points (thresholds chosen per layer on the select half, measured on the "
                      "test half; `predictor-eval --predictors DIR --target-recalls …` runs them):", "",
                      "| target recall | mean recall | mean predicted sparsity |", "|---|---|---|"]
            lines += [f"| {c['target_recall']:.0%} | {c['recall']:.2%} | {c['predicted_sparsity']:.2%} |" for c in curve]
        return "\n".join(lines) + "\n"


def predictor_bytes(rank: int, n_embd: int, n_ff: int, type_name: str = "f16") -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    except KeyError:
        raise ValueError(f"unknown predictor type {type_name!r} (f32, f16, bf16, q8_0, q4_0, q4_1)") from None
    # fc1 rows have n_embd weights, fc2 rows rank: a row that does not fill blocks stays f32 in the file
    def matrix(rows, cols):
        return rows * (cols // block * size if cols % block == 0 else cols * 4)
    return matrix(rank, n_embd) + matrix(n_ff, rank)


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def train_predictors(model: nn.Module, train_sequences: np.ndarray, heldout_sequences: np.ndarray,
                     out_dir: str | Path, settings: TrainSettings = TrainSettings(),
                     collect: CollectSettings = CollectSettings(), predictor_input: str = DEFAULT_INPUT,
                     model_name: str = "model", predictor_type: str = "f16", time_budget_s: float = 0.0,
                     keep_samples: bool = False, log=print) -> PredictorReport:
    """Collect samples, train a predictor per layer, choose thresholds, write ``out_dir``:
    model_{i}.pt, thresholds.json, report.json, REPORT.md. Resumable: samples collected with the
    same settings are reused and layers already in report.json are not trained again.
    ``time_budget_s`` (total training time, 0: none) is shared equally among the layers left."""
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layer, n_embd, n_ff = model_dims(model)
    report = PredictorReport(model=model_name, predictor_input=predictor_input, n_layer=n_layer, n_embd=n_embd,
                             n_ff=n_ff, train=asdict(settings), collect=asdict(collect),
                             predictor_type=predictor_type)
    previous = read_report(out_dir)
    if previous and _same_job(previous, report):
        report.layers = [r for r in previous.layers if (out_dir / PREDICTOR_FILE.format(r.layer)).is_file()]
        report.train_samples, report.heldout_samples = previous.train_samples, previous.heldout_samples
        report.collect_s = previous.collect_s
        if report.layers:
            log(f"{out_dir}: resuming after {len(report.layers)} of {n_layer} layers")

    splits = {}
    if len(report.layers) < n_layer:
        started = time.perf_counter()
        for split, sequences, count, seed in (("train", train_sequences, collect.samples, collect.seed),
                                              ("heldout", heldout_sequences, collect.heldout_samples, collect.seed + 1)):
            store = out_dir / SAMPLES_DIR / split
            expect = {"n_layer": n_layer, "n_ff": n_ff, "predictor_input": predictor_input, "requested": count,
                      "token_fraction": collect.token_fraction, "seed": seed, "sequences": list(sequences.shape),
                      "model": model_name}
            found = SampleSet.open(store, expect)
            if found is None:
                log(f"collecting {split} samples ({predictor_input} input) …")
                shutil.rmtree(store, ignore_errors=True)
                found = collect_samples(model, sequences, count, predictor_input, collect.token_fraction,
                                        collect.batch_size, seed, store, log)
                found.save_meta(store, expect)
            else:
                log(f"{store}: reusing {len(found):,} {split} samples")
            splits[split] = found
        if len(splits["heldout"]) < 2:
            raise ValueError("fewer than 2 held-out samples: give more held-out text")
        report.train_samples, report.heldout_samples = len(splits["train"]), len(splits["heldout"])
        report.collect_s += time.perf_counter() - started

    done = {r.layer for r in report.layers}
    todo = [i for i in range(n_layer) if i not in done]
    budget_started = time.perf_counter()
    for n_left, layer in zip(range(len(todo), 0, -1), todo):
        layer_settings = TrainSettings(**{**asdict(settings), "seed": settings.seed + layer})
        if time_budget_s:
            remaining = time_budget_s - (time.perf_counter() - budget_started)
            layer_settings.time_budget_s = max(remaining / n_left, 1.0)
        log(f"layer {layer}/{n_layer - 1}: training (rank {settings.rank}"
            + (f", ≤ {layer_settings.time_budget_s:.0f} s" if layer_settings.time_budget_s else "") + ")")
        started = time.perf_counter()
        train = splits["train"].layers[layer].loaded()
        heldout = splits["heldout"].layers[layer].loaded()
        select, test = heldout.split(len(heldout) // 2)
        predictor, chosen, epochs, best_epoch = train_predictor(train, select, layer_settings, log)
        tested = score(predictor, test, threshold=chosen.threshold)
        at_zero = score(predictor, test, threshold=0.0)
        curve = operating_curve(predictor, select, test)
        result = LayerResult(layer=layer, threshold=chosen.threshold, recall=tested.recall,
                             predicted_sparsity=tested.predicted_sparsity, sparsity=tested.sparsity,
                             select_recall=chosen.recall, recall_at_zero=at_zero.recall,
                             predicted_sparsity_at_zero=at_zero.predicted_sparsity, epochs=epochs,
                             best_epoch=best_epoch, train_s=time.perf_counter() - started, curve=curve)
        torch.save(predictor.export(), out_dir / PREDICTOR_FILE.format(layer))
        report.layers = sorted(report.layers + [result], key=lambda r: r.layer)
        _write_json(out_dir / REPORT_JSON, report.to_dict())
        log(f"layer {layer}: recall {result.recall:.2%}, predicted sparsity {result.predicted_sparsity:.2%} "
            f"(true {result.sparsity:.2%}), threshold {result.threshold:.3g}, {result.train_s:.0f} s")

    report.complete = True
    export_thresholds(out_dir, [r.threshold for r in report.layers], predictor_input)
    _write_json(out_dir / REPORT_JSON, report.to_dict())
    (out_dir / REPORT_MD).write_text(report.markdown())
    if not keep_samples:
        shutil.rmtree(out_dir / SAMPLES_DIR, ignore_errors=True)
    return report


def export_thresholds(out_dir: Path, thresholds: list[float], predictor_input: str) -> None:
    """thresholds.json as the converter reads it (convert/predictor.py)."""
    _write_json(Path(out_dir) / THRESHOLDS_FILE, {"layer_thresholds": [float(t) for t in thresholds],
                                                  "input": predictor_input})


def export_predictors(out_dir: str | Path, predictors: list[Predictor], thresholds: list[float],
                      predictor_input: str) -> Path:
    """model_{i}.pt + thresholds.json for predictors trained elsewhere (e.g. in a test)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(predictors):
        torch.save(p.export(), out_dir / PREDICTOR_FILE.format(i))
    export_thresholds(out_dir, thresholds, predictor_input)
    return out_dir


def read_report(out_dir: str | Path) -> PredictorReport | None:
    """The report.json of a predictor folder (None when absent or unreadable)."""
    path = Path(out_dir) / REPORT_JSON
    if not path.is_file():
        return None
    try:
        return PredictorReport.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        return None


def _same_job(a: PredictorReport, b: PredictorReport) -> bool:
    """Layers of ``a`` can be kept for ``b``: same model, input and settings (the time budget aside)."""
    strip = lambda d: {k: v for k, v in d.items() if k != "time_budget_s"}
    return (a.model, a.predictor_input, a.n_layer, a.n_ff, strip(a.train), a.collect) == \
           (b.model, b.predictor_input, b.n_layer, b.n_ff, strip(b.train), b.collect)


def is_complete(out_dir: str | Path) -> bool:
    """A finished predictor folder (what the pipeline skips)."""
    report = read_report(Path(out_dir))
    return bool(report and report.complete and (Path(out_dir) / THRESHOLDS_FILE).is_file())
