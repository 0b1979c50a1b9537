"""Activation predictors: PowerInfer's directory layout, which prosparse's training writes too.

    model_0.pt … model_{L-1}.pt   one per layer, a torch state dict of exactly
                                  fc1.weight [rank, n_embd] and fc2.weight [n_ff, rank]
                                  (Linear → ReLU → Linear, no biases, raw logits; a neuron is
                                  predicted active where its logit >= the layer's threshold)
    thresholds.json   (optional)  {"threshold": t}                   one threshold for all layers
                                  {"layer_thresholds": [t0, …]}      one per layer (wins over "threshold")
                                  {"input": "residual" | "normed"}   what the predictors read (default
                                                                     "residual": the residual stream
                                                                     before ffn_norm, as PowerInfer)
                                  (keys may be combined in one object)
    config.json       (optional)  PowerInfer's {"sparse_threshold": t}; used when thresholds.json
                                  gives no threshold
    report.json       (optional)  prosparse-train's report; its "predictor_type" (the GGUF type the
                                  predictors' thresholds and byte counts were worked out for) is
                                  prosparse-convert's default --predictor-outtype
Without any threshold the decision threshold is 0 (logit >= 0, i.e. probability >= 1/2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from prosparse import constants as K

from .checkpoint import Hyperparams, load_torch_state_dict, to_float32
from .errors import PredictorError, read_json_object

PREDICTOR_FILE = "model_{}.pt"
THRESHOLDS_FILE = "thresholds.json"
POWERINFER_CONFIG = "config.json"
REPORT_FILE = "report.json"
FC1, FC2 = "fc1.weight", "fc2.weight"
_FILE_RE = re.compile(r"model_(\d+)\.pt")


@dataclasses.dataclass
class Predictors:
    """A validated predictor directory; tensors are read on demand."""
    dir: Path
    state_dicts: list[dict]          # per layer: {FC1: tensor, FC2: tensor} (memory-mapped)
    thresholds: list[float]          # per layer
    input: str | None                # K.PREDICTOR_INPUT_*; None: not stated (runtime default)

    @property
    def ranks(self) -> list[int]:
        return [int(sd[FC1].shape[0]) for sd in self.state_dicts]

    def fc1(self, layer: int) -> np.ndarray:
        return to_float32(self.state_dicts[layer][FC1])

    def fc2(self, layer: int) -> np.ndarray:
        return to_float32(self.state_dicts[layer][FC2])


def trained_type(directory: Path, choices: tuple[str, ...]) -> str | None:
    """The type a prosparse-train folder's predictors were made for (report.json's
    "predictor_type"), or None: no report (PowerInfer's folders), or none of ``choices`` in it.
    The report is a record of the training, not an input the predictors need, so a missing or
    unreadable one only leaves the default."""
    try:
        report = json.loads((directory / REPORT_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    kind = report.get("predictor_type") if isinstance(report, dict) else None
    return kind if kind in choices else None


def read_predictors(directory: Path, hp: Hyperparams) -> Predictors:
    """Opens and checks every predictor file against the model: count, names, keys, shapes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PredictorError(f"{directory}: predictor directory not found")
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := _FILE_RE.fullmatch(p.name))}
    if len(found) != hp.n_layer or set(found) != set(range(hp.n_layer)):
        missing = sorted(set(range(hp.n_layer)) - set(found))
        extra = sorted(set(found) - set(range(hp.n_layer)))
        detail = (f"missing {', '.join(PREDICTOR_FILE.format(i) for i in missing[:4])}"
                  f"{' …' if len(missing) > 4 else ''}" if missing else
                  f"unexpected {', '.join(PREDICTOR_FILE.format(i) for i in extra[:4])}")
        raise PredictorError(f"{directory}: {len(found)} predictor files for a model of {hp.n_layer} layers "
                             f"({detail}); expected model_0.pt … model_{hp.n_layer - 1}.pt")
    state_dicts = [_check_layer(found[i], hp) for i in range(hp.n_layer)]
    thresholds, predictor_input = _thresholds(directory, hp.n_layer)
    return Predictors(directory, state_dicts, thresholds, predictor_input)


def _check_layer(path: Path, hp: Hyperparams) -> dict:
    state = load_torch_state_dict(path, PredictorError)
    if set(state) != {FC1, FC2}:
        extra = sorted(set(state) - {FC1, FC2})
        what = f"unexpected {extra}" if extra else f"missing {sorted({FC1, FC2} - set(state))}"
        raise PredictorError(f"{path}: a predictor holds exactly {FC1} and {FC2} (no biases); {what}")
    fc1, fc2 = tuple(state[FC1].shape), tuple(state[FC2].shape)
    rank = fc1[0] if len(fc1) == 2 else None
    if len(fc1) != 2 or fc1[1] != hp.n_embd or rank <= 0:
        raise PredictorError(f"{path}: {FC1} has shape {list(fc1)}, expected [rank, {hp.n_embd}] "
                             f"(rank × n_embd of this model)")
    if fc2 != (hp.n_ff, rank):
        raise PredictorError(f"{path}: {FC2} has shape {list(fc2)}, expected [{hp.n_ff}, {rank}] "
                             f"(n_ff × the rank of {FC1})")
    return state


def _thresholds(directory: Path, n_layer: int) -> tuple[list[float], str | None]:
    spec: dict[str, Any] = {}
    path = directory / THRESHOLDS_FILE
    if path.is_file():
        spec = read_json_object(path, PredictorError)
        unknown = set(spec) - {"threshold", "layer_thresholds", "input"}
        if unknown:
            raise PredictorError(f"{path}: unknown keys {sorted(unknown)}; expected threshold, "
                                 f"layer_thresholds, input")
    elif (directory / POWERINFER_CONFIG).is_file():
        powerinfer = read_json_object(directory / POWERINFER_CONFIG, PredictorError)
        if powerinfer.get("sparse_threshold") is not None:
            spec = {"threshold": powerinfer["sparse_threshold"]}
        path = directory / POWERINFER_CONFIG

    per_layer = spec.get("layer_thresholds")
    if per_layer is not None:
        if not isinstance(per_layer, list) or len(per_layer) != n_layer:
            raise PredictorError(f"{path}: layer_thresholds must list {n_layer} numbers (one per layer)")
        thresholds = [_number(path, "layer_thresholds", t) for t in per_layer]
    else:
        thresholds = [_number(path, "threshold", spec.get("threshold", 0.0))] * n_layer
    predictor_input = spec.get("input")
    if predictor_input is not None and predictor_input not in K.PREDICTOR_INPUTS:
        raise PredictorError(f"{path}: input {predictor_input!r} is not one of {', '.join(K.PREDICTOR_INPUTS)}")
    return thresholds, predictor_input


def _number(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PredictorError(f"{path}: {key} value {value!r} is not a finite number")
    return float(value)
