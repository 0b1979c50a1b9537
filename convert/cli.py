"""prosparse-convert: a Hugging Face checkpoint directory → a GGUF file prosparse (and, with
--format powerinfer, PowerInfer) runs.

    prosparse-convert MODEL_DIR [-o OUT.gguf] [--outtype f16] [--layout sparse]
                      [--predictor DIR [--predictor-outtype TYPE]] [--format prosparse|powerinfer]
                      [--threshold T] [--calibration TEXT [--calibration-tokens N]]
                      [--no-tokenizer] [--force] [--quiet]

Bad inputs print one line ("prosparse-convert: error: …") and exit with status 1; Ctrl-C exits
with 130. Either way no output file is left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import ConversionError
from .gguf_writer import LAYOUTS, OUTTYPES

PROG = "prosparse-convert"


def build_parser() -> argparse.ArgumentParser:
    from .hf_to_gguf import FORMATS
    p = argparse.ArgumentParser(
        prog=PROG, description="Convert a Hugging Face LLaMA / SparseLlama / MiniCPM checkpoint (safetensors or "
                               ".bin, sharded or not) to a GGUF file for prosparse. Nothing in the checkpoint "
                               "is executed: config.json and the tensors are read directly.")
    p.add_argument("model_dir", help="checkpoint directory (config.json, weights, tokenizer files)")
    p.add_argument("-o", "--outfile", help="output file (default: MODEL_DIR/<name>-<OUTTYPE>.gguf)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="type of the weight matrices (default f16); norms, and matrices whose rows do not "
                        "fill whole quantisation blocks, stay f32")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="sparse: the down projection stored transposed as ffn_down_t (one vector per "
                        "neuron, what sparse decoding reads); dense: ffn_down as llama.cpp. Default: "
                        "sparse for relu/fatrelu models, dense for silu")
    p.add_argument("--predictor", metavar="DIR",
                   help="activation predictors: model_{i}.pt per layer (fc1.weight [rank, n_embd], "
                        "fc2.weight [n_ff, rank]) and an optional thresholds.json")
    p.add_argument("--predictor-outtype", choices=OUTTYPES, default=None,
                   help="type of the predictor matrices (default: the type prosparse-train made them for, "
                        "its report.json's predictor_type; else f16)")
    p.add_argument("--format", choices=FORMATS, default="prosparse", dest="fmt",
                   help="powerinfer: PowerInfer's PWRI magic and powerinfer.sparse_threshold "
                        "(llama, ReLU-family, sparse layout); default prosparse")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="FATReLU threshold overriding config.json's hidden_act_param (0: plain ReLU)")
    p.add_argument("--calibration", metavar="TEXT",
                   help="a UTF-8 text file: sort each layer's FFN neurons by how often they fire on it, hottest "
                        "first (what prosparse-reorder does; faster sparse decoding, same outputs)")
    p.add_argument("--calibration-tokens", type=int, default=4096, metavar="N",
                   help="calibration tokens at most (default 4096)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write no vocabulary (the model then takes token ids only)")
    p.add_argument("--name", help="general.name (default: the directory's name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(args.quiet)
    from .hf_to_gguf import convert_checkpoint
    try:
        calibration = None
        if args.calibration is not None:
            try:
                calibration = open(args.calibration, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError) as e:
                raise ConversionError(f"{args.calibration}: cannot read the calibration text: {e}") from e
        result = convert_checkpoint(
            args.model_dir, args.outfile, outtype=args.outtype, layout=args.layout, predictor_dir=args.predictor,
            predictor_outtype=args.predictor_outtype, fmt=args.fmt, threshold=args.threshold,
            tokenizer=not args.no_tokenizer, force=args.force, progress=not args.quiet, name=args.name,
            calibration=calibration, calibration_tokens=args.calibration_tokens)
    except ConversionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    if not args.quiet:
        hp = result.hp
        act = hp.activation + (f" (threshold {hp.threshold:g})" if hp.threshold is not None else "")
        extra = f", predictors rank {max(result.predictor_ranks)}" if result.predictor_ranks else ""
        print(f"{PROG}: wrote {result.path} ({result.n_bytes / 2**20:.1f} MiB, {result.n_tensors} tensors): "
              f"{hp.arch}, {hp.n_layer} layers, gate {act}, {result.layout} layout, {args.outtype}"
              f"{extra}, tokenizer {result.tokenizer or 'none'}"
              f"{', neurons hottest first' if args.calibration else ''}", file=sys.stderr)
    return 0


def _log_to_stderr(quiet: bool) -> None:
    logger = logging.getLogger("prosparse.convert")
    for old in [h for h in logger.handlers if getattr(h, "_prosparse_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    handler._prosparse_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    logging.getLogger("gguf").setLevel(logging.ERROR)     # gguf-py's chatter about endianness, merges…


if __name__ == "__main__":
    sys.exit(main())
