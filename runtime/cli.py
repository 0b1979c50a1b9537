"""prosparse-run: generate text from a GGUF model, with llama.cpp's flags and defaults.

    prosparse-run -p "The capital of France is" -n 32
    prosparse-run -m model.gguf -f prompt.txt -n 128 -t 2 --temp 0 
    prosparse-run --chat                       # interactive chat with the default model
"""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .api import ACTIVATION_MODES, USER_ERRORS, Runtime, Timings
from .native import KV_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prosparse-run",
        description="Generate text with a GGUF model on the CPU (sparse FFN models run fastest). "
                    "Without -m, the default model (SmolLM2-135M-Instruct, Q4_1) is downloaded once.")
    p.add_argument("-m", "--model", help="path to a GGUF model (default: SmolLM2-135M-Instruct)")
    p.add_argument("-p", "--prompt", help="prompt text")
    p.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("-n", "--n-predict", type=int, default=-1,
                   help="tokens to generate (default: -1 = until end of text or a full context)")
    p.add_argument("-c", "--ctx-size", type=int, default=0,
                   help="context size in tokens (default: 0 = the model's, at most 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("-s", "--seed", type=int, default=-1, help="random seed (default: -1 = random)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling; 0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling; 1.0 = off (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling; 0.0 = off (default: 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="penalty for repeated tokens; 1.0 = off (default: 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64,
                   help="tokens the penalty looks back over; 0 = off, -1 = all (default: 64)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after end-of-text")
    p.add_argument("-r", "--reverse-prompt", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="apply the model's chat template; interactive when stdin is a terminal")
    p.add_argument("-sys", "--system-prompt", help="system message for --chat")
    p.add_argument("--no-display-prompt", action="store_true", help="don't echo the prompt")
    p.add_argument("--sparse", choices=["dense", "exact", "predictor"], default=None,
                   help="FFN mode for decoding: dense, exact (skip neurons ReLU/FATReLU zeroes) or "
                        "predictor (skip those the file's predictors rule out) (default: the best the file supports)")
    p.add_argument("--sparse-stats", action="store_true",
                   help="measure per-layer sparsity and predictor recall; print them at the end")
    p.add_argument("--predictor-threshold", type=float, default=None, metavar="T",
                   help="predictor decision threshold for every layer (default: the file's)")
    p.add_argument("--activations", choices=ACTIVATION_MODES, default="auto",
                   help="how decoding reads its input: f32, or q8 (8-bit for Q8_0/Q4_0/Q4_1 weights: integer "
                        "dot products, faster; bf16 for BF16 weights, prompts too, where the CPU has AVX512-BF16) "
                        "(default: auto, q8 when the file has such weights)")
    p.add_argument("--kv-type", choices=list(KV_TYPES), default="f32",
                   help="what the KV cache stores keys and values in: f16 halves its memory and what each "
                        "token reads from it (faster at long contexts) (default: f32)")
    p.add_argument("--version", action="version", version=f"prosparse {__version__}")
    return p


class _Totals:
    """Timings summed over the generations of one run (chat turns)."""

    def __init__(self, load_ms: float):
        self.t = Timings(load_ms=load_ms)
        self.start = time.perf_counter()

    def add(self, t: Timings) -> None:
        self.t.prompt_ms += t.prompt_ms
        self.t.prompt_tokens += t.prompt_tokens
        self.t.eval_ms += t.eval_ms
        self.t.eval_tokens += t.eval_tokens

    def print(self) -> None:
        self.t.total_ms = (time.perf_counter() - self.start) * 1000.0 + self.t.load_ms
        print(file=sys.stderr)
        for line in self.t.lines():
            print(line, file=sys.stderr)


def _stream(rt: Runtime, prompt: str, args, totals: _Totals) -> str:
    out = []
    for piece in rt.generate(prompt, max_tokens=args.n_predict, stream=True, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    totals.add(rt.timings)
    return "".join(out)


def _sampling(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                ignore_eos=args.ignore_eos, stop=args.reverse_prompt or None,
                seed=None if args.seed < 0 else args.seed)


def _read_prompt(args) -> str | None:
    if args.prompt is not None and args.file is not None:
        raise ValueError("give the prompt with -p or -f, not both")
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    return args.prompt


def _chat(rt: Runtime, args, prompt: str | None, totals: _Totals) -> None:
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    interactive = sys.stdin.isatty()
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
    while True:
        if prompt is None:
            try:
                prompt = input("\n> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if not prompt.strip():
                prompt = None
                continue
        messages.append({"role": "user", "content": prompt})
        reply = _stream(rt, rt.apply_chat_template(messages), args, totals)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            print()
            return
        prompt = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompt = _read_prompt(args)
        if prompt is None and not args.chat:
            raise ValueError("no prompt: give one with -p TEXT or -f FILE (or use --chat)")
        with Runtime(args.model, n_ctx=args.ctx_size or None, threads=args.threads,
                     seed=None if args.seed < 0 else args.seed, sparse=args.sparse,
                     sparse_stats=args.sparse_stats, activations=args.activations,
                     kv_type=args.kv_type) as rt:
            if args.predictor_threshold is not None:
                rt.set_predictor_threshold(args.predictor_threshold)
            totals = _Totals(rt.timings.load_ms)
            try:
                if args.chat:
                    _chat(rt, args, prompt, totals)
                else:
                    if not args.no_display_prompt:
                        sys.stdout.write(prompt)
                    _stream(rt, prompt, args, totals)
                    print()
            except KeyboardInterrupt:
                print(file=sys.stderr)
            totals.print()
            if args.sparse_stats:
                for line in rt.sparsity().lines():
                    print(line, file=sys.stderr)
            else:
                print(f"prosparse_sparse: FFN mode {rt.sparse}", file=sys.stderr)
    except USER_ERRORS as e:
        print(f"prosparse-run: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
