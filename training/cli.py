"""``prosparse-train``: train, prepare-data, eval, sweep-threshold, plot.

    prosparse-train train --recipe smollm2-135m-cpu [--override train.steps=20 ...] [--resume]
    prosparse-train prepare-data --recipe smollm2-135m-cpu
    prosparse-train eval MODEL [--activation relu] [--threshold 0.05]
    prosparse-train sweep-threshold MODEL --thresholds 0,0.05,0.1
    prosparse-train plot runs/smollm2-135m-cpu

MODEL: a HF checkpoint dir, a .gguf file, "default" (SmolLM2-135M), a training checkpoint
(.pt) or a run folder (its final export if there is one, else its latest checkpoint).
Under ``torchrun --nproc_per_node N`` the train command runs data-parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_RECIPE = "smollm2-135m-cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prosparse-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p, required=False):
        p.add_argument("--recipe", required=required, default=None if required else DEFAULT_RECIPE,
                       help=f"bundled recipe name or a YAML/TOML/JSON file (default {DEFAULT_RECIPE})")
        p.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. train.lr=3e-5 (repeatable)")

    p = sub.add_parser("train", help="run (or resume) a recipe")
    recipe_args(p, required=True)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")

    p = sub.add_parser("prepare-data", help="build the recipe's corpus from Debian doc packages and tokenise it")
    recipe_args(p)
    p.add_argument("--no-tokenize", action="store_true", help="only download and extract the text")

    for name, help_text in (("eval", "held-out perplexity and sparsity of a model"),
                            ("sweep-threshold", "sparsity and perplexity for a list of FATReLU thresholds")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="HF dir, .gguf, 'default', training checkpoint .pt or run folder")
        recipe_args(p)
        p.add_argument("--sequences", type=int, default=None,
                       help="held-out sequences to use (default: the recipe's run.eval_sequences; 0 = all)")
        p.add_argument("--json", type=Path, help="also write the results to this JSON file")
        if name == "eval":
            p.add_argument("--activation", choices=("silu", "relu", "fatrelu"),
                           help="replace the gate activation first (e.g. relu: ReLU without training)")
            p.add_argument("--threshold", type=float, default=0.0, help="FATReLU threshold with --activation fatrelu")
        else:
            p.add_argument("--thresholds", default=None,
                           help="comma-separated thresholds (default: the recipe's sparsity.sweep_thresholds)")

    p = sub.add_parser("plot", help="draw λ(t), losses and sparsity against steps to a PNG")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/training.png)")

    from .predictor_cli import add_predictor_commands   # predictors, predictor-eval, pipeline
    add_predictor_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .recipe import RecipeError
    from .checkpoint import TrainingError
    try:
        return COMMANDS[args.command](args)
    except (RecipeError, TrainingError, FileNotFoundError) as e:
        print(f"prosparse-train {args.command}: error: {e}", file=sys.stderr)
        return 2


def cmd_train(args) -> int:
    from .recipe import load_recipe
    from .trainer import train
    recipe = load_recipe(args.recipe, args.override)
    run_dir = train(recipe, resume=args.resume)
    print(f"run folder: {run_dir}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker of a distributed run, done and saved: skip the interpreter's teardown, in
        # which torch's gloo threads now and then abort the process ("terminate called without
        # an active exception", once in CI's two-process FSDP test) after a complete run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_prepare_data(args) -> int:
    from .corpus import prepare_corpus
    from .data import build_token_cache
    from .model_io import load_tokenizer
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe, args.override)
    d = recipe.data
    if not d.debian_packages:
        print(f"recipe {recipe.name}: data.debian_packages is empty; nothing to download")
    else:
        prepare_corpus(d.debian_packages, d.corpus_dir)
    if args.no_tokenize:
        return 0
    cache = build_token_cache(d.sources, load_tokenizer(recipe.model.path), d.cache_dir, d.extensions,
                              d.heldout_fraction, d.seed, d.jsonl_field)
    m = cache.meta
    t = recipe.train
    per_step = t.micro_batch * t.grad_accum * d.seq_len
    n_train = m["train_tokens"] // d.seq_len
    print(f"tokens: {m['train_tokens']:,} train ({m['train_documents']} documents), {m['heldout_tokens']:,} "
          f"held-out ({m['heldout_documents']} documents), {m['chars']:,} characters → {cache.dir}")
    print(f"recipe {recipe.name}: {t.steps} steps × {per_step:,} tokens (one process) = "
          f"{t.steps * per_step:,} tokens = {t.steps * t.micro_batch * t.grad_accum / max(n_train, 1):.2f} epochs")
    return 0


def open_model(spec: str):
    """(model, tokenizer) for a model argument; a training checkpoint is laid over its base model."""
    import torch
    from .checkpoint import latest_checkpoint
    from .model_io import load_model
    from .recipe import recipe_from_dict
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "final" / "config.json").is_file():
            return load_model(path / "final")
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: neither a HF checkpoint (config.json) nor a run folder with "
                                    f"final/ or checkpoints/")
        path = found
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=False)
        recipe = recipe_from_dict(state["recipe"], str(path))
        model, tokenizer = load_model(recipe.model.path)
        from .surgery import set_gate_activation
        set_gate_activation(model, recipe.model.activation)
        model.load_state_dict(state["model"])
        print(f"{path}: step {state['step']} of run {recipe.name}")
        return model, tokenizer
    return load_model(spec)


def heldout_sequences(recipe, tokenizer, count: int | None):
    from .data import build_token_cache
    d = recipe.data
    cache = build_token_cache(d.sources, tokenizer, d.cache_dir, d.extensions, d.heldout_fraction, d.seed,
                              d.jsonl_field)
    sequences = cache.sequences("heldout", d.seq_len)
    count = recipe.run.eval_sequences if count is None else count
    return sequences[:count] if count else sequences


def cmd_eval(args) -> int:
    from .evaluate import evaluate, layer_table, summary_line
    from .recipe import load_recipe
    from .surgery import gate_activation, set_gate_activation
    recipe = load_recipe(args.recipe, args.override)
    _threads(recipe)
    model, tokenizer = open_model(args.model)
    if args.activation:
        set_gate_activation(model, args.activation, args.threshold)
    result = evaluate(model, heldout_sequences(recipe, tokenizer, args.sequences), recipe.run.eval_batch,
                      recipe.train.precision)
    activation, threshold = gate_activation(model)
    print(summary_line(result, f"{args.model} [{activation}]"))
    print(layer_table(result))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "activation": activation, **result.to_dict()},
                                        indent=1) + "\n")
    return 0


def cmd_sweep_threshold(args) -> int:
    from .evaluate import sweep_threshold
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe, args.override)
    _threads(recipe)
    thresholds = ([float(x) for x in args.thresholds.split(",")] if args.thresholds
                  else recipe.sparsity.sweep_thresholds)
    model, tokenizer = open_model(args.model)
    results = sweep_threshold(model, heldout_sequences(recipe, tokenizer, args.sequences), thresholds,
                              recipe.run.eval_batch, recipe.train.precision)
    print(f"{'threshold':>9}  {'sparsity':>8}  {'perplexity':>10}")
    for r in results:
        print(f"{r.threshold:9g}  {r.sparsity:8.2%}  {r.perplexity:10.3f}")
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run
    print(plot_run(args.run_dir, args.out))
    return 0


def _threads(recipe) -> None:
    if recipe.train.threads:
        import torch
        torch.set_num_threads(recipe.train.threads)


COMMANDS = {"train": cmd_train, "prepare-data": cmd_prepare_data, "eval": cmd_eval,
            "sweep-threshold": cmd_sweep_threshold, "plot": cmd_plot}
from .predictor_cli import PREDICTOR_COMMANDS  # noqa: E402
COMMANDS.update(PREDICTOR_COMMANDS)

if __name__ == "__main__":
    sys.exit(main())
