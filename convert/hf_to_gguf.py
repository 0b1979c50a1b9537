"""Hugging Face checkpoint directory (+ predictors) → one GGUF file: what ``prosparse-convert``
does, as a function.

Everything is read and checked before the output is created (config, tensor names and shapes,
tokenizer, predictors); then the file is written tensor by tensor to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any


from prosparse import constants as K

from .checkpoint import CONFIG_FILE, CheckpointTensors, Hyperparams, hyperparams, read_config
from .errors import ConversionError, PredictorError, UnsupportedModelError
from .gguf_writer import (LAYOUT_DENSE, LAYOUT_SPARSE, LAYOUTS, OUTTYPES, PlannedTensor, check_output, fell_back_to_f32,
                          model_metadata, model_tensors, plan, write_gguf)
from .predictor import FC1, FC2, Predictors, read_predictors, trained_type
from .vocab import tokenizer_metadata

log = logging.getLogger("prosparse.convert")

FORMAT_PROSPARSE = "prosparse"     # GGUF magic, prosparse's keys
FORMAT_POWERINFER = "powerinfer"   # PWRI magic and powerinfer.sparse_threshold, for PowerInfer itself
FORMATS = (FORMAT_PROSPARSE, FORMAT_POWERINFER)
# tensor types PowerInfer's (late-2023) ggml reads
POWERINFER_OUTTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")


@dataclasses.dataclass
class ConversionResult:
    path: Path
    hp: Hyperparams
    layout: str
    n_tensors: int
    n_bytes: int
    tokenizer: str | None              # tokenizer.ggml.model written, None without one
    predictor_ranks: list[int] | None
    kept_f32: list[str]                # matrices left in F32 (rows do not fill quantisation blocks)


def default_layout(hp: Hyperparams) -> str:
    """ffn_down_t for ReLU-family models (skipping neurons pays), ffn_down for SiLU."""
    return LAYOUT_SPARSE if hp.is_sparse_capable else LAYOUT_DENSE


def default_output(model_dir: Path, outtype: str, fmt: str) -> Path:
    suffix = ".powerinfer.gguf" if fmt == FORMAT_POWERINFER else ".gguf"
    return Path(model_dir) / f"{Path(model_dir).resolve().name}-{outtype.upper()}{suffix}"


def convert_checkpoint(model_dir: str | Path, output: str | Path | None = None, *, outtype: str = "f16",
                       layout: str | None = None, predictor_dir: str | Path | None = None,
                       predictor_outtype: str | None = None, fmt: str = FORMAT_PROSPARSE,
                       threshold: float | None = None, tokenizer: bool = True, force: bool = False,
                       progress: bool = False, name: str | None = None, calibration: str | None = None,
                       calibration_tokens: int = 4096) -> ConversionResult:
    """Converts ``model_dir``; see ``prosparse-convert --help`` for the options. Raises a
    ConversionError subclass (message names the file, key or tensor) on any bad input.
    ``calibration`` (a text): the file's FFN neurons are then sorted hottest first over its
    first ``calibration_tokens`` tokens, as ``prosparse-reorder`` does (convert/reorder.py).
    ``predictor_outtype`` None: the type the predictors were trained for (their folder's
    report.json, as prosparse-train writes it), else f16."""
    model_dir = Path(model_dir)
    _choice("--outtype", outtype, OUTTYPES)
    if predictor_outtype is None:
        predictor_outtype = (predictor_dir is not None and trained_type(Path(predictor_dir), OUTTYPES)) or "f16"
    _choice("--predictor-outtype", predictor_outtype, OUTTYPES)
    _choice("--format", fmt, FORMATS)
    if layout is not None:
        _choice("--layout", layout, LAYOUTS)
    config = read_config(model_dir)
    hp = hyperparams(config, str(model_dir / CONFIG_FILE))
    if threshold is not None:
        hp = hp.with_threshold(threshold)
    layout = layout or default_layout(hp)
    output = Path(output) if output is not None else default_output(model_dir, outtype, fmt)
    check_output(output, force)
    if fmt == FORMAT_POWERINFER:
        _check_powerinfer(hp, layout, outtype, predictor_outtype)
    if calibration is not None:
        _check_reorderable(hp, layout, outtype, tokenizer)

    predictors = None
    if predictor_dir is not None:
        if not hp.is_sparse_capable:
            raise PredictorError(f"--predictor: the model's gate is {hp.activation}; predictors forecast which "
                                 f"ReLU/FATReLU neurons are active, so they need a relu or fatrelu model")
        predictors = read_predictors(Path(predictor_dir), hp)

    meta = model_metadata(hp, outtype, name or model_dir.resolve().name)
    vocab: dict[str, Any] = tokenizer_metadata(model_dir, hp.n_vocab) if tokenizer else {}
    meta.update(vocab)
    with CheckpointTensors(model_dir) as source:
        tensors = model_tensors(hp, source, outtype, layout, where=str(model_dir))
        if predictors is not None:
            meta.update(_predictor_metadata(predictors, fmt))
            tensors = _with_predictors(tensors, predictors, predictor_outtype)
        kept = _report(tensors, hp, fmt, outtype, predictor_outtype, predictors is not None)
        magic = K.POWERINFER_MAGIC if fmt == FORMAT_POWERINFER else K.GGUF_MAGIC
        if calibration is None:
            path = write_gguf(output, hp.arch, meta, tensors, magic=magic, force=force, progress=progress)
        else:   # written in the checkpoint's order first, beside the output, then reordered into it
            fd, scratch = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".unordered.gguf", dir=output.parent)
            os.close(fd)
            try:
                write_gguf(scratch, hp.arch, meta, tensors, magic=magic, force=True, progress=progress)
                from .reorder import reorder_model
                path = reorder_model(scratch, output, calibration, max_tokens=calibration_tokens, force=force,
                                     progress=progress).path
            finally:
                Path(scratch).unlink(missing_ok=True)
    return ConversionResult(path=path, hp=hp, layout=layout, n_tensors=len(tensors),
                            n_bytes=sum(t.nbytes for t in tensors),
                            tokenizer=vocab.get(K.KEY_TOKENIZER_MODEL),
                            predictor_ranks=predictors.ranks if predictors else None, kept_f32=kept)


def _check_reorderable(hp: Hyperparams, layout: str, outtype: str, tokenizer: bool) -> None:
    if not hp.is_sparse_capable:
        raise ConversionError(f"--calibration: the model's gate is {hp.activation}, which leaves (almost) every "
                              f"neuron active; sorting neurons by activation frequency needs a relu or fatrelu model")
    if layout == LAYOUT_DENSE and outtype not in ("f32", "f16", "bf16"):
        raise ConversionError(f"--calibration with --layout dense needs a float --outtype: {outtype} blocks span "
                              f"several neurons of ffn_down, whose columns would have to move (use --layout sparse)")
    if not tokenizer:
        raise ConversionError("--calibration needs the tokenizer (drop --no-tokenizer) to tokenise the text")


def _choice(option: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConversionError(f"{option} {value!r}: choose one of {', '.join(allowed)}")


def _report(tensors: list[PlannedTensor], hp: Hyperparams, fmt: str, outtype: str, predictor_outtype: str,
            has_predictors: bool) -> list[str]:
    """Notes on what the file will not do as asked; returns the matrices kept in F32."""
    if fmt == FORMAT_POWERINFER and not has_predictors:
        log.warning("note: PowerInfer itself needs predictors (--predictor) to run this file; "
                    "prosparse runs it without")
    if fmt == FORMAT_POWERINFER and hp.activation == K.ACT_FATRELU:
        log.warning("note: PowerInfer ignores the FATReLU threshold (%g) and computes plain ReLU; "
                    "prosparse reads it from %s", hp.threshold, K.KEY_ACTIVATION_THRESHOLD)
    kept = [t.name for t in fell_back_to_f32(tensors, outtype) if not _is_predictor(t)]
    kept += [t.name for t in fell_back_to_f32(tensors, predictor_outtype) if _is_predictor(t)]
    if kept:
        log.warning("note: %d matri%s kept in F32, their rows do not fill whole quantisation blocks: %s%s",
                    len(kept), "x" if len(kept) == 1 else "ces", ", ".join(kept[:3]), ", …" if len(kept) > 3 else "")
    return kept


def _check_powerinfer(hp: Hyperparams, layout: str, outtype: str, predictor_outtype: str) -> None:
    if hp.arch != K.ARCH_LLAMA:
        raise UnsupportedModelError(f"--format powerinfer: PowerInfer runs architecture llama only, not {hp.arch}; "
                                    f"use --format prosparse")
    if not hp.is_sparse_capable:
        raise UnsupportedModelError("--format powerinfer: PowerInfer runs ReLU models only; this model's gate "
                                    "is silu (use --format prosparse)")
    if layout != LAYOUT_SPARSE:
        raise UnsupportedModelError("--format powerinfer needs --layout sparse (PowerInfer reads ffn_down_t)")
    for option, value in (("--outtype", outtype), ("--predictor-outtype", predictor_outtype)):
        if value not in POWERINFER_OUTTYPES:
            raise UnsupportedModelError(f"--format powerinfer: {option} {value} is a type PowerInfer cannot read; "
                                        f"choose one of {', '.join(POWERINFER_OUTTYPES)}")


def _is_predictor(t: PlannedTensor) -> bool:
    return t.name.endswith((f".{K.PREDICTOR_FC1}.weight", f".{K.PREDICTOR_FC2}.weight"))


def _with_predictors(tensors: list[PlannedTensor], predictors: Predictors, outtype: str) -> list[PlannedTensor]:
    """fc1/fc2 placed after each layer's other tensors."""
    last_of_layer = {int(t.name.split(".")[1]): i for i, t in enumerate(tensors) if t.name.startswith("blk.")}
    out = list(tensors)
    for layer in sorted(last_of_layer, reverse=True):
        state = predictors.state_dicts[layer]
        out[last_of_layer[layer] + 1:last_of_layer[layer] + 1] = [
            plan(K.block_tensor(layer, K.PREDICTOR_FC1), tuple(state[FC1].shape), outtype,
                 lambda i=layer: predictors.fc1(i)),
            plan(K.block_tensor(layer, K.PREDICTOR_FC2), tuple(state[FC2].shape), outtype,
                 lambda i=layer: predictors.fc2(i)),
        ]
    return out


def _predictor_metadata(predictors: Predictors, fmt: str) -> dict[str, Any]:
    thresholds = predictors.thresholds
    meta: dict[str, Any] = {K.KEY_PREDICTOR_RANK: max(predictors.ranks)}
    uniform = len(set(thresholds)) == 1
    if uniform:
        meta[K.KEY_PREDICTOR_THRESHOLD] = thresholds[0]
    else:
        meta[K.KEY_PREDICTOR_LAYER_THRESHOLDS] = [float(t) for t in thresholds]
    if predictors.input is not None:
        meta[K.KEY_PREDICTOR_INPUT] = predictors.input
    if fmt == FORMAT_POWERINFER:
        if predictors.input not in (None, K.PREDICTOR_INPUT_RESIDUAL):
            raise PredictorError(f"{predictors.dir}: PowerInfer's predictors read the residual stream; these "
                                 f"read {predictors.input!r} (use --format prosparse)")
        meta[K.KEY_POWERINFER_SPARSE_THRESHOLD] = min(thresholds)
        if not uniform:
            log.warning("note: PowerInfer takes one predictor threshold; %s = %g (the lowest of the "
                        "per-layer thresholds, so no layer loses recall)", K.KEY_POWERINFER_SPARSE_THRESHOLD,
                        min(thresholds))
    return meta
