"""What can be wrong with a conversion's inputs. ``prosparse-convert`` prints the message of any
of these as one line and exits with status 1; each message names the file, key or tensor and
says what to do."""

from __future__ import annotations

import json
from pathlib import Path


class ConversionError(Exception):
    """Base class: the inputs cannot be converted as given."""


class UnsupportedModelError(ConversionError):
    """config.json describes an architecture, activation or option prosparse does not run."""


class MissingFileError(ConversionError):
    """config.json, the weights, a weight shard, the tokenizer or a predictor file is absent."""


class TensorError(ConversionError):
    """A tensor is missing, unexpected, or its shape does not fit config.json."""


class VocabError(ConversionError):
    """The tokenizer does not fit the model (larger vocabulary, unknown pre-tokenizer, ...)."""


class PredictorError(ConversionError):
    """The predictor directory does not fit the model (count, names, shapes, thresholds)."""


class OutputExistsError(ConversionError):
    """The output file exists and overwriting it was not asked for."""


def read_json_object(path: Path, error: type[ConversionError]) -> dict:
    """The JSON object in path, or ``error`` naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object")
    return value
