"""The recipe: every knob of a ProSparse run in one object, loaded from YAML/TOML/JSON.

A recipe file has the sections below (all optional; defaults are the dataclass fields).
Any key can be overridden from the command line as ``section.key=value``. A recipe is
validated as it is read: an unknown key, a value of the wrong type, stage end steps that do
not increase or λ peaks that decrease are errors that name the key and the file.

Recipes ship in ``training/recipes/``; ``--recipe NAME`` finds ``NAME.yaml`` there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """A recipe (file or override) is wrong; the message names the key and what to do."""


# --- the sections ------------------------------------------------------------------------


@dataclass
class ModelSection:
    # HF checkpoint dir, a .gguf file (loaded through transformers), or "default":
    # SmolLM2-135M-Instruct's GGUF from prosparse.model_cache.
    path: str = "default"
    # gate activation while training: "relu" (ProSparse) or "silu" (a dense control run)
    activation: str = "relu"
    # which parameters train: "all", or "mlp" (only gate/up/down of every layer)
    trainable: str = "all"
    freeze_embeddings: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    # text files, folders of them (searched recursively), or .jsonl files (one document a line)
    sources: list[str] = field(default_factory=lambda: ["~/.cache/prosparse/corpus/debian-docs"])
    # Debian packages whose documentation `prepare-data` turns into the corpus above
    debian_packages: list[str] = field(default_factory=list)
    corpus_dir: str = "~/.cache/prosparse/corpus/debian-docs"
    cache_dir: str = "~/.cache/prosparse/tokens"
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".rst", ".html", ".htm", ".jsonl"])
    jsonl_field: str = "text"
    seq_len: int = 256
    # share of documents (by a hash of their id, so stable) kept out of training
    heldout_fraction: float = 0.02
    seed: int = 0


@dataclass
class TrainSection:
    steps: int = 100
    # 0: run to `steps`; else save and stop after this step (the schedule still spans `steps`)
    stop_at_step: int = 0
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    # "cosine" (to min_lr_ratio·lr at `steps`) or "constant" after warm-up
    lr_decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    # "bf16" (autocast), "fp32", or "auto" (bf16 where the hardware has it)
    precision: str = "auto"
    # 0: torch's default thread count
    threads: int = 0
    # under torchrun: "ddp" or "fsdp"
    distributed: str = "ddp"
    seed: int = 0


@dataclass
class SparsitySection:
    # stage 0: steps 1..relu_steps train the ReLU model with λ = 0
    relu_steps: int = 0
    # Algorithm 1: [peak λ_i, cumulative end step T_i]; the first is the constant warm-up stage,
    # each later one rises along a sine from the previous peak; equal neighbours = constant.
    stages: list[list[float]] = field(default_factory=list)
    # what the L1 term measures: "x1" (the paper's ‖x1‖₁) or "contribution" (|x1_j|·‖W_down[:, j]‖,
    # which rescaling up_proj/down_proj cannot dodge). See prosparse.training.surgery.
    l1: str = "x1"
    # FATReLU threshold t applied to the exported model (0: plain ReLU)
    threshold: float = 0.0
    # thresholds that `sweep-threshold` and the end-of-run report try
    sweep_thresholds: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.05, 0.1, 0.2])


@dataclass
class DistillSection:
    # weight α of KL(teacher‖student) on the logits; the LM loss is (1−α)·CE + α·KL.
    # The teacher is the original (SiLU) model. 0: no teacher is loaded.
    weight: float = 0.0
    temperature: float = 1.0


@dataclass
class RunSection:
    out_dir: str = "runs/{name}"
    eval_every: int = 50
    # held-out sequences used by the periodic evaluation (0: all)
    eval_sequences: int = 64
    eval_batch: int = 8
    save_every: int = 50
    keep_checkpoints: int = 2
    # export an HF checkpoint at these steps too (e.g. the end of stage 0)
    export_at: list[int] = field(default_factory=list)
    progress_bar: bool = True


@dataclass
class Recipe:
    name: str = "recipe"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    distill: DistillSection = field(default_factory=DistillSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir.format(name=self.name)).expanduser()


CHOICES = {
    "model.activation": ("relu", "silu"),
    "model.trainable": ("all", "mlp"),
    "train.lr_decay": ("cosine", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.distributed": ("ddp", "fsdp"),
    "sparsity.l1": ("x1", "contribution"),
}


# --- reading -------------------------------------------------------------------------------


def resolve_recipe_path(name_or_file: str) -> Path:
    """A path as given, or the name of a bundled recipe (``smollm2-135m-cpu``)."""
    path = Path(name_or_file).expanduser()
    if path.is_file():
        return path
    for suffix in (".yaml", ".yml", ".toml", ".json"):
        bundled = RECIPES_DIR / f"{name_or_file}{suffix}"
        if bundled.is_file():
            return bundled
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.*"))
    raise RecipeError(f"recipe {name_or_file!r}: no such file, and no bundled recipe of that name "
                      f"(bundled: {', '.join(known)})")


def read_recipe_file(path: Path) -> dict:
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise RecipeError(f"recipe {path}: TOML recipes need Python 3.11+; use YAML or JSON") from None
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except RecipeError:
        raise
    except (json.JSONDecodeError, yaml.YAMLError, ValueError) as e:  # TOMLDecodeError is a ValueError
        raise RecipeError(f"recipe {path}: not valid {path.suffix.lstrip('.').upper()}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections")
    return data


def load_recipe(name_or_file: str | None = None, overrides: list[str] = ()) -> Recipe:
    """The recipe from a file (or the defaults), with ``section.key=value`` overrides applied."""
    data: dict = {}
    where = "defaults"
    if name_or_file:
        path = resolve_recipe_path(name_or_file)
        data = read_recipe_file(path)
        where = str(path)
        data.setdefault("name", path.stem)
    recipe = recipe_from_dict(data, where)
    for item in overrides:
        apply_override(recipe, item)
    validate(recipe, where if not overrides else f"{where} with overrides")
    return recipe


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    recipe = Recipe()
    for key, value in data.items():
        set_key(recipe, key, value, where, from_text=False)
    validate(recipe, where)
    return recipe


def set_key(recipe: Recipe, key: str, value, where: str, from_text: bool) -> None:
    """Set ``key`` (``section`` or ``section.field``) after checking its name and type."""
    parts = key.split(".")
    target = recipe
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(target)}
        if part not in names:
            scope = ".".join(parts[:depth]) or "the top level"
            raise RecipeError(f"{where}: unknown key {'.'.join(parts[:depth + 1])!r} "
                              f"(keys of {scope}: {', '.join(names)})")
        f = names[part]
        hint = typing.get_type_hints(type(target))[part]
        if dataclasses.is_dataclass(hint):
            if depth == len(parts) - 1:
                if not isinstance(value, dict):
                    raise RecipeError(f"{where}: {key!r} must be a mapping of its keys, got {value!r}")
                for sub, sub_value in value.items():
                    set_key(recipe, f"{key}.{sub}", sub_value, where, from_text)
                return
            target = getattr(target, part)
            continue
        if depth != len(parts) - 1:
            raise RecipeError(f"{where}: {'.'.join(parts[:depth + 1])!r} is a value, not a section")
        setattr(target, f.name, coerce(hint, value, key, where, from_text))
        return


def coerce(hint, value, key: str, where: str, from_text: bool):
    """``value`` as type ``hint``, or a RecipeError naming the key."""
    if from_text and isinstance(value, str) and hint is not str:
        value = yaml.safe_load(value)
    origin = typing.get_origin(hint)
    expected = getattr(hint, "__name__", str(hint))

    def bad(what=None):
        return RecipeError(f"{where}: {key!r} must be {what or expected}, got {value!r} "
                           f"({type(value).__name__})")

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad("a finite number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not from_text:
            raise bad("a list")
        if not isinstance(value, list):
            value = [value]
        return [coerce(item_hint, v, f"{key}[{i}]", where, False) for i, v in enumerate(value)]
    raise RecipeError(f"{where}: {key!r}: unsupported type {hint}")  # a bug in the sections


def apply_override(recipe: Recipe, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected section.key=value, e.g. train.lr=3e-5")
    key, value = item.split("=", 1)
    set_key(recipe, key.strip(), value, f"override {item!r}", from_text=True)


# --- validation ----------------------------------------------------------------------------


def validate(recipe: Recipe, where: str = "recipe") -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value not in allowed:
            raise RecipeError(f"{where}: {key!r} must be one of {', '.join(allowed)}, got {value!r}")
    t, s = recipe.train, recipe.sparsity
    positive = {"train.steps": t.steps, "train.micro_batch": t.micro_batch,
                "train.grad_accum": t.grad_accum, "data.seq_len": recipe.data.seq_len,
                "run.eval_every": recipe.run.eval_every, "run.save_every": recipe.run.save_every,
                "run.eval_batch": recipe.run.eval_batch, "run.keep_checkpoints": recipe.run.keep_checkpoints}
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"{where}: {key!r} must be at least 1, got {value}")
    nonnegative = {"train.lr": t.lr, "train.warmup_steps": t.warmup_steps, "train.stop_at_step": t.stop_at_step,
                   "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
                   "train.threads": t.threads, "sparsity.relu_steps": s.relu_steps,
                   "sparsity.threshold": s.threshold, "run.eval_sequences": recipe.run.eval_sequences}
    for key, value in nonnegative.items():
        if value < 0:
            raise RecipeError(f"{where}: {key!r} must not be negative, got {value}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise RecipeError(f"{where}: 'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
    if not 0.0 <= recipe.data.heldout_fraction < 1.0:
        raise RecipeError(f"{where}: 'data.heldout_fraction' must be in [0, 1), got {recipe.data.heldout_fraction}")
    if not 0.0 <= recipe.distill.weight <= 1.0:
        raise RecipeError(f"{where}: 'distill.weight' must be in [0, 1], got {recipe.distill.weight}")
    if recipe.distill.temperature <= 0:
        raise RecipeError(f"{where}: 'distill.temperature' must be positive, got {recipe.distill.temperature}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise RecipeError(f"{where}: 'train.betas' must be two numbers in [0, 1), got {t.betas}")
    validate_stages(s.stages, s.relu_steps, t.steps, where)


def validate_stages(stages: list[list[float]], relu_steps: int, total_steps: int, where: str) -> None:
    previous_peak, previous_end = 0.0, relu_steps
    for i, stage in enumerate(stages):
        key = f"sparsity.stages[{i}]"
        if len(stage) != 2:
            raise RecipeError(f"{where}: {key!r} must be [peak λ, end step], got {stage}")
        peak, end = stage
        if peak < 0:
            raise RecipeError(f"{where}: {key!r}: peak λ must not be negative, got {peak}")
        if peak < previous_peak:
            raise RecipeError(f"{where}: {key!r}: peaks must not decrease (λ {peak:g} after {previous_peak:g}); "
                              f"Algorithm 1 needs λ1 ≤ … ≤ λS")
        if end != int(end):
            raise RecipeError(f"{where}: {key!r}: end step must be an integer, got {end}")
        if end <= previous_end:
            after = "sparsity.relu_steps" if i == 0 else f"sparsity.stages[{i - 1}]"
            raise RecipeError(f"{where}: {key!r}: end steps must increase: {int(end)} is not after "
                              f"{int(previous_end)} ({after})")
        if end > total_steps:
            raise RecipeError(f"{where}: {key!r} ends at step {int(end)}, after the run's last step "
                              f"(train.steps = {total_steps}); shorten the stages or lengthen the run")
        previous_peak, previous_end = peak, end
    if relu_steps > total_steps:
        raise RecipeError(f"{where}: 'sparsity.relu_steps' = {relu_steps} is beyond train.steps = {total_steps}")
