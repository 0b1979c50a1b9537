"""``prosparse-train predictors | predictor-eval | pipeline``: activation predictors, and the whole
way from a base model to a GGUF that ``prosparse-run`` decodes in predictor mode.

    prosparse-train predictors --model runs/smollm2-135m-cpu --out runs/smollm2-135m-cpu/predictors \\
        [--rank 256] [--target-recall 0.96] [--samples 100000] [--time-budget 600]
    prosparse-train predictor-thresholds runs/smollm2-135m-cpu/predictors --target-recall 0.97
    prosparse-train predictor-eval model-pred.gguf --tokenizer runs/smollm2-135m-cpu/final [--bench]
    prosparse-train pipeline --recipe smollm2-135m-cpu          # train → threshold → predictors → GGUF → eval

Wired into ``prosparse-train`` by ``add_predictor_commands(subparsers)`` and ``PREDICTOR_COMMANDS``;
``python -m prosparse.training.predictor_cli`` runs the same commands on its own.

Data: the recipe's corpus (``data.*``; ``--data`` replaces its sources). Predictors train on the
training split; held-out documents are split by sequence: even-numbered held-out sequences
choose thresholds and report recall, odd-numbered ones measure perplexity (predictor-eval),
so no reported number comes from the text it was fitted on.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from prosparse import constants as K

DEFAULT_RECIPE = "smollm2-135m-cpu"
PREDICTOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def add_predictor_commands(sub) -> None:
    """Adds ``predictors``, ``predictor-thresholds``, ``predictor-eval`` and ``pipeline`` to a
    subparsers object."""
    from .predictors import CollectSettings, DEFAULT_INPUT, TrainSettings
    t, c = TrainSettings(), CollectSettings()

    def recipe_args(p):
        p.add_argument("--recipe", default=DEFAULT_RECIPE,
                       help=f"recipe whose data (and, for pipeline, training) to use (default {DEFAULT_RECIPE})")
        p.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. data.seq_len=512 (repeatable)")
        p.add_argument("--threads", type=int, default=None, help="torch / runtime threads (default: the recipe's)")

    def predictor_args(p):
        p.add_argument("--input", choices=K.PREDICTOR_INPUTS, default=DEFAULT_INPUT,
                       help=f"what the predictors read: the normed FFN input or the residual before "
                            f"ffn_norm (default {DEFAULT_INPUT}; see PREDICTORS.md)")
        p.add_argument("--rank", type=int, default=t.rank, help=f"predictor rank (default {t.rank})")
        p.add_argument("--target-recall", type=float, default=t.target_recall,
                       help=f"each layer's threshold is set for this held-out recall (default {t.target_recall})")
        p.add_argument("--samples", type=int, default=c.samples,
                       help=f"training samples (tokens) per layer (default {c.samples})")
        p.add_argument("--heldout-samples", type=int, default=c.heldout_samples,
                       help=f"held-out samples per layer, half to choose thresholds, half to report "
                            f"(default {c.heldout_samples})")
        p.add_argument("--token-fraction", type=float, default=c.token_fraction,
                       help="keep each token with this probability: more documents for the same samples")
        p.add_argument("--pos-weight", type=float, default=t.pos_weight,
                       help=f"BCE weight of active neurons (default {t.pos_weight})")
        p.add_argument("--epochs", type=int, default=t.max_epochs, help=f"at most (default {t.max_epochs})")
        p.add_argument("--patience", type=int, default=t.patience,
                       help=f"epochs without a better held-out score before stopping (default {t.patience})")
        p.add_argument("--lr", type=float, default=t.lr, help=f"Adam learning rate (default {t.lr})")
        p.add_argument("--batch-size", type=int, default=t.batch_size, help=f"default {t.batch_size}")
        p.add_argument("--time-budget", type=float, default=0.0,
                       help="seconds of predictor training for all layers together (0: no limit)")
        p.add_argument("--predictor-type", choices=PREDICTOR_TYPES, default="q8_0",
                       help="the type the GGUF will store them in (prosparse-convert --predictor-outtype); "
                            "sets the bytes/token in the report (default q8_0: half f16's bytes, same "
                            "recall and perplexity on the ProSparse SmolLM2, training/PREDICTORS.md)")

    p = sub.add_parser("predictors", help="train activation predictors (model_{i}.pt + thresholds.json)")
    p.add_argument("--model", required=True,
                   help="ReLU/FATReLU model: HF dir, .gguf, 'default', run folder or training checkpoint .pt")
    p.add_argument("--out", required=True, type=Path, help="predictor folder to write (resumable)")
    p.add_argument("--data", nargs="+", metavar="SOURCE", help="text files / folders (default: the recipe's)")
    p.add_argument("--activation", choices=("relu", "fatrelu"),
                   help="set the gate activation first (relu on a SiLU model: ReLU substituted, no training)")
    p.add_argument("--threshold", type=float, default=None, help="FATReLU threshold (implies --activation fatrelu)")
    p.add_argument("--save-model", type=Path,
                   help="also write the model as used (activation included) as a HF checkpoint for prosparse-convert")
    p.add_argument("--keep-samples", action="store_true", help="keep the collected samples (OUT/samples)")
    recipe_args(p)
    predictor_args(p)

    p = sub.add_parser("predictor-thresholds",
                       help="rewrite a predictor folder's thresholds.json for another recall target of its "
                            "report (no retraining; convert again afterwards)")
    p.add_argument("predictors", type=Path, help="folder written by prosparse-train predictors")
    p.add_argument("--target-recall", type=float, required=True,
                   help="one of the report's curve targets (0.9, 0.95, 0.96, 0.97, 0.98, 0.99)")

    p = sub.add_parser("predictor-eval",
                       help="held-out perplexity of a GGUF in predictor vs exact mode, through the runtime")
    p.add_argument("gguf", type=Path)
    p.add_argument("--tokenizer", help="HF dir (or .gguf) whose tokenizer made the corpus tokens (default: GGUF)")
    p.add_argument("--sequences", type=int, default=16, help="held-out sequences (default 16; 0: all)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the recipe's)")
    p.add_argument("--predictors", type=Path, help="the predictor folder the GGUF was made from (its report.json)")
    p.add_argument("--target-recalls", default=None, metavar="R[,R...]",
                   help="also run predictor mode with the report's thresholds for these recall targets "
                        "(of 0.9, 0.95, 0.96, 0.97, 0.98, 0.99; needs --predictors)")
    p.add_argument("--bench", action="store_true", help="also measure decode speed per mode (prosparse-bench)")
    p.add_argument("--json", type=Path, help="write the results here")
    recipe_args(p)

    p = sub.add_parser("pipeline", help="base model → ProSparse training → threshold → predictors → GGUF → eval")
    recipe_args(p)
    p.add_argument("--model", help="skip training: start from this model (with --activation relu for a SiLU one)")
    p.add_argument("--activation", choices=("relu", "fatrelu"), help="with --model: the activation to set")
    p.add_argument("--threshold", type=float, default=None,
                   help="FATReLU threshold for predictors and GGUF (default: the trained model's, "
                        "i.e. the recipe's sparsity.threshold)")
    p.add_argument("--outtype", choices=PREDICTOR_TYPES, default="q8_0", help="GGUF weight type (default q8_0)")
    p.add_argument("--calibration", metavar="TEXT",
                   help="a text file: the GGUF gets each layer's neurons hottest first by their activation "
                        "frequency on it (prosparse-convert --calibration; faster sparse decoding)")
    p.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences for predictor-eval")
    p.add_argument("--eval-recalls", default="0.97,0.99", metavar="R[,R...]",
                   help="predictor-eval also runs these recall targets' thresholds (default 0.97,0.99; '' for none)")
    p.add_argument("--no-bench", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--dry-run", action="store_true", help="print the steps and their state; run nothing")
    predictor_args(p)


# --- predictors -------------------------------------------------------------------------------


def cmd_predictors(args) -> int:
    from .checkpoint import TrainingError
    from .cli import open_model
    from .model_io import export_hf
    from .predictors import CollectSettings, TrainSettings, train_predictors
    from .surgery import gate_activation, set_gate_activation

    recipe = _recipe(args)
    model, tokenizer = open_model(args.model)
    if args.threshold is not None:
        set_gate_activation(model, "fatrelu", args.threshold)
    elif args.activation:
        set_gate_activation(model, args.activation)
    activation, threshold = gate_activation(model)
    if activation == "silu":
        raise TrainingError(f"{args.model}: the gate is SiLU, so no neuron is ever exactly inactive; "
                            f"train it with ProSparse first, or pass --activation relu to substitute ReLU")
    if args.save_model:
        export_hf(model, tokenizer, args.save_model, activation, threshold,
                  info={"source": str(args.model), "activation": activation, "threshold": threshold})
        print(f"model ({activation}{f' t={threshold:g}' if threshold else ''}) → {args.save_model}")
    train_seqs, heldout = _sequences(recipe, tokenizer, args.data)
    settings = TrainSettings(rank=args.rank, target_recall=args.target_recall, pos_weight=args.pos_weight,
                             lr=args.lr, batch_size=args.batch_size, max_epochs=args.epochs, patience=args.patience,
                             seed=recipe.train.seed)
    collect = CollectSettings(samples=args.samples, heldout_samples=args.heldout_samples,
                              token_fraction=args.token_fraction, seed=recipe.data.seed)
    name = f"{args.model} [{activation}{f' t={threshold:g}' if threshold else ''}]"
    try:
        settings.check()
        report = train_predictors(model, train_seqs, heldout[0::2], args.out, settings, collect, args.input,
                                  model_name=name, predictor_type=args.predictor_type,
                                  time_budget_s=args.time_budget, keep_samples=args.keep_samples)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    print(report.markdown())
    print(f"predictors → {args.out} (convert: prosparse-convert MODEL_DIR --predictor {args.out} "
          f"--predictor-outtype {args.predictor_type} -o model.gguf)")
    return 0


# --- predictor-thresholds ---------------------------------------------------------------------


def cmd_predictor_thresholds(args) -> int:
    from .checkpoint import TrainingError
    from .predictors import export_thresholds, read_report
    report = read_report(args.predictors)
    if report is None or not report.complete:
        raise TrainingError(f"{args.predictors}: no complete report.json (not a finished "
                            f"'prosparse-train predictors' folder)")
    try:
        thresholds = report.thresholds_for(args.target_recall)
    except ValueError as e:
        raise TrainingError(f"{args.predictors}: {e}") from None
    export_thresholds(args.predictors, thresholds, report.predictor_input)
    point = next(c for c in report.curve_averages() if abs(c["target_recall"] - args.target_recall) < 1e-9)
    print(f"{args.predictors / 'thresholds.json'}: thresholds for {args.target_recall:.0%} recall "
          f"(held-out test half: recall {point['recall']:.2%}, predicted sparsity "
          f"{point['predicted_sparsity']:.2%}); convert again to embed them")
    return 0


# --- predictor-eval ---------------------------------------------------------------------------


def cmd_predictor_eval(args) -> int:
    from .checkpoint import TrainingError
    from .model_io import load_tokenizer
    from .predictor_eval import compare_modes, markdown, run_bench
    from .predictors import read_report
    recipe = _recipe(args)
    points = {}
    if args.target_recalls:
        report = read_report(args.predictors) if args.predictors else None
        if report is None:
            raise TrainingError("--target-recalls needs --predictors DIR holding the report.json of training")
        try:
            points = {f"recall {r}": report.thresholds_for(float(r)) for r in args.target_recalls.split(",")}
        except ValueError as e:
            raise TrainingError(str(e)) from None
    if args.seq_len:
        recipe.data.seq_len = args.seq_len
    tokenizer = load_tokenizer(args.tokenizer or args.gguf)
    _, heldout = _sequences(recipe, tokenizer, None)
    sequences = heldout[1::2]
    if args.sequences:
        sequences = sequences[: args.sequences]
    result = compare_modes(args.gguf, sequences, args.threads or recipe.train.threads or None, points)
    bench = run_bench(args.gguf, threads=args.threads or recipe.train.threads or None) if args.bench else None
    result["bench"] = bench
    print(markdown(result, bench))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


# --- pipeline ---------------------------------------------------------------------------------


def cmd_pipeline(args) -> int:
    """Each step runs as the command it logs (see IN_PROCESS); a step whose output exists is skipped."""
    from .checkpoint import latest_checkpoint
    from .predictors import is_complete
    recipe = _recipe(args)
    run_dir = recipe.out_dir
    recipe_flags = ["--recipe", args.recipe] + [f for o in args.override for f in ("-o", o)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    py = [sys.executable, "-m"]
    train_cli, own_cli = py + ["prosparse.training.cli"], py + ["prosparse.training.predictor_cli"]
    log = PipelineLog(run_dir / "pipeline.log", args.dry_run)

    # 1. the ReLU-family model: trained here, or given
    if args.model:
        model_dir = run_dir / "model"
        model_flags = ["--model", args.model, "--save-model", str(model_dir)]
        model_flags += ["--activation", args.activation] if args.activation else []
        log.skip("train", f"--model {args.model} given")
    else:
        model_dir = run_dir / "final"
        model_flags = ["--model", str(model_dir)]
        train = train_cli + ["train"] + recipe_flags
        if not args.dry_run and latest_checkpoint(run_dir) is not None:
            train.append("--resume")
        log.step("train", model_dir / "config.json", train)
        # 2. threshold: the trained export carries the recipe's FATReLU t; the sweep is the record
        log.step("threshold sweep", run_dir / "threshold_sweep.json",
                 train_cli + ["sweep-threshold", str(run_dir)] + recipe_flags + threads
                 + ["--json", str(run_dir / "threshold_sweep.json")])
    threshold_flags = ["--threshold", str(args.threshold)] if args.threshold is not None else []

    # 3. predictors
    pred_dir = run_dir / "predictors"
    predictor_flags = ["--input", args.input, "--rank", str(args.rank), "--target-recall", str(args.target_recall),
                       "--samples", str(args.samples), "--heldout-samples", str(args.heldout_samples),
                       "--token-fraction", str(args.token_fraction), "--pos-weight", str(args.pos_weight),
                       "--epochs", str(args.epochs), "--patience", str(args.patience), "--lr", str(args.lr),
                       "--batch-size", str(args.batch_size), "--time-budget", str(args.time_budget),
                       "--predictor-type", args.predictor_type]
    done = is_complete(pred_dir) and (model_dir / "config.json").is_file()
    log.step("predictors", pred_dir / "thresholds.json" if done else None,
             own_cli + ["predictors"] + model_flags + ["--out", str(pred_dir)] + threshold_flags
             + recipe_flags + threads + predictor_flags)

    # 4. the GGUF
    gguf = run_dir / f"{recipe.name}-predictor-{args.outtype.upper()}.gguf"
    log.step("convert", gguf, py + ["prosparse.convert.cli", str(model_dir), "--predictor", str(pred_dir),
                                    "--outtype", args.outtype, "--predictor-outtype", args.predictor_type,
                                    "-o", str(gguf)] + threshold_flags
             + (["--calibration", str(args.calibration)] if args.calibration else []))

    # 5. predictor vs exact mode, decode speed
    eval_json = run_dir / "predictor_eval.json"
    log.step("evaluate", eval_json, own_cli + ["predictor-eval", str(gguf), "--tokenizer", str(model_dir),
                                               "--sequences", str(args.eval_sequences), "--json", str(eval_json)]
             + (["--predictors", str(pred_dir), "--target-recalls", args.eval_recalls] if args.eval_recalls else [])
             + recipe_flags + threads + ([] if args.no_bench else ["--bench"]))
    log.note(f"ready: prosparse-run -m {gguf} --sparse predictor -p 'The capital of France is'  "
             f"(report: {pred_dir / 'REPORT.md'}, evaluation: {eval_json})")
    return 0


class PipelineLog:
    """Prints and appends to pipeline.log each step: skipped (output exists) or the command run."""

    def __init__(self, path: Path, dry_run: bool):
        self.path, self.dry_run = path, dry_run
        if not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)

    def note(self, text: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
        print(line, flush=True)
        if not self.dry_run:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def skip(self, name: str, why: str) -> None:
        self.note(f"{name}: skipped ({why})")

    def step(self, name: str, output: Path | None, command: list[str]) -> None:
        from .checkpoint import TrainingError
        if output is not None and output.exists():
            self.skip(name, f"{output} exists")
            return
        self.note(f"{name}: $ {shlex.join(command)}")
        if self.dry_run:
            return
        started = time.perf_counter()
        rc = _run(command)
        if rc != 0:
            self.note(f"{name}: failed with status {rc}")
            raise TrainingError(f"pipeline step {name!r} failed (status {rc}); fix it and run the pipeline "
                                f"again: finished steps are skipped")
        self.note(f"{name}: done in {time.perf_counter() - started:.0f} s")


# Steps that are our own short CLIs run in this process (as the command line logged, parsed by
# the same main); training and the threshold sweep run in a child process.
IN_PROCESS = ("prosparse.training.predictor_cli", "prosparse.convert.cli")


def _run(command: list[str]) -> int:
    if command[:2] == [sys.executable, "-m"] and command[2] in IN_PROCESS:
        import importlib
        try:
            return importlib.import_module(command[2]).main(command[3:])
        except SystemExit as e:              # argparse errors
            return e.code if isinstance(e.code, int) else 1
    return subprocess.run(command).returncode


# --- shared -----------------------------------------------------------------------------------


def _recipe(args):
    import torch
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe, args.override)
    threads = args.threads or recipe.train.threads
    if threads:
        torch.set_num_threads(threads)
    return recipe


def _sequences(recipe, tokenizer, sources):
    """(training sequences, held-out sequences) of the recipe's corpus (or ``sources``)."""
    from .data import build_token_cache
    d = recipe.data
    cache = build_token_cache(sources or d.sources, tokenizer, d.cache_dir, d.extensions, d.heldout_fraction,
                              d.seed, d.jsonl_field)
    return cache.sequences("train", d.seq_len), cache.sequences("heldout", d.seq_len)


PREDICTOR_COMMANDS = {"predictors": cmd_predictors, "predictor-thresholds": cmd_predictor_thresholds,
                      "predictor-eval": cmd_predictor_eval, "pipeline": cmd_pipeline}


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import TrainingError
    from .recipe import RecipeError
    parser = argparse.ArgumentParser(prog="prosparse-train", description=__doc__.split("\n\n")[0])
    add_predictor_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return PREDICTOR_COMMANDS[args.command](args)
    except (RecipeError, TrainingError, FileNotFoundError) as e:
        print(f"prosparse-train {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
