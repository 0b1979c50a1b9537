"""prosparse-perplexity: perplexity of a model over a text file, as llama.cpp's llama-perplexity.

The text is tokenised once and cut into chunks of n_ctx tokens; each chunk is evaluated from
position 0 (its first token replaced by BOS when the model adds one) and only the second half
of its positions is scored, so every scored token sees at least n_ctx/2 tokens of context.

    prosparse-perplexity -m model.gguf -f wiki.test.raw -c 512
    prosparse-perplexity -m relu.gguf -f text.txt -c 256 --chunks 20 --sparse predictor
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from .api import ACTIVATION_MODES, USER_ERRORS, Runtime
from .native import KV_TYPES


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float        # standard error, propagated from the mean negative log-likelihood
    n_scored: int           # tokens scored
    chunk_ppl: list[float]  # running estimate after each chunk (llama.cpp's [1]..., [2]...)


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x[np.arange(len(targets)), targets] - np.log(np.exp(x).sum(axis=1))


def evaluation_mode(rt: Runtime) -> tuple[bool, str]:
    """Whether to evaluate token by token, and what the activations are, for the log. Sparse
    modes run on the decode path. Batches read what their tokens read: in q8 mode 8 bits for
    integer weights, bf16 for BF16 ones where the CPU has AVX512-BF16."""
    if rt.sparse != "dense":
        return True, rt.activations
    if rt.activations == "f32":
        return False, "f32 (batches)"
    return False, "q8 (batches: 8-bit for integer weights, bf16 for BF16 ones, f32 for others)"


def perplexity(rt: Runtime, tokens: list[int], n_ctx: int, max_chunks: int | None = None,
               sequential: bool = False, on_chunk=None) -> PerplexityResult:
    """Perplexity of tokens in chunks of n_ctx (see the module docstring). sequential=True
    evaluates token by token, so the runtime's sparse mode applies (prompt batches run dense)."""
    if n_ctx < 4 or n_ctx > rt.n_ctx:
        raise ValueError(f"chunk size {n_ctx} must be in [4, the runtime's n_ctx = {rt.n_ctx}]")
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise ValueError(f"the text is {len(tokens)} tokens, less than one chunk of {n_ctx}; "
                         f"use a longer text or a smaller -c")
    bos = rt.tokenizer.bos_id if rt.tokenizer is not None and rt.tokenizer.add_bos else None
    first_scored = n_ctx // 2
    nll: list[np.ndarray] = []
    running: list[float] = []
    for c in range(n_chunks):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        logits = rt.evaluate(chunk, sequential=sequential)
        # logits at position i predict token i + 1
        targets = np.asarray(chunk[first_scored:], dtype=np.int64)
        nll.append(-_log_softmax_at(logits[first_scored - 1:-1], targets))
        running.append(math.exp(np.concatenate(nll).mean()))
        if on_chunk:
            on_chunk(c, running[-1])
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    stderr = float(all_nll.std(ddof=1) / math.sqrt(len(all_nll))) if len(all_nll) > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * stderr, len(all_nll), running)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prosparse-perplexity",
                                description="Perplexity of a GGUF model over a text file (llama.cpp's method).")
    p.add_argument("-m", "--model", help="GGUF model (default: the default model)")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="chunk size in tokens (default: 512)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--sparse", choices=["dense", "exact", "predictor"], default=None,
                   help="FFN mode; anything but dense evaluates token by token (decode path)")
    p.add_argument("--predictor-threshold", type=float, default=None, metavar="T")
    p.add_argument("--activations", choices=ACTIVATION_MODES, default="auto",
                   help="how mat-muls read their input (default: auto, q8: 8 bits for Q8_0/Q4_0/Q4_1 "
                        "weights, and bf16 for BF16 ones where the CPU has AVX512-BF16; batches and single "
                        "tokens alike)")
    p.add_argument("--kv-type", choices=list(KV_TYPES), default="f32",
                   help="what the KV cache stores keys and values in (default: f32)")
    args = p.parse_args(argv)
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
        with Runtime(args.model, n_ctx=args.ctx_size, threads=args.threads, sparse=args.sparse,
                     activations=args.activations, kv_type=args.kv_type) as rt:
            if args.predictor_threshold is not None:
                rt.set_predictor_threshold(args.predictor_threshold)
            tokens = rt.tokenize(text, add_bos=False)
            start = time.perf_counter()
            sequential, how = evaluation_mode(rt)
            print(f"prosparse-perplexity: {len(tokens)} tokens, chunks of {args.ctx_size}, FFN mode {rt.sparse}, "
                  f"activations {how}", file=sys.stderr)
            result = perplexity(rt, tokens, args.ctx_size, args.chunks, sequential=sequential,
                                on_chunk=lambda c, ppl: print(f"[{c + 1}]{ppl:.4f},", end=" ", flush=True))
            print()
            print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
            print(f"prosparse-perplexity: {result.n_scored} tokens scored in "
                  f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
    except USER_ERRORS as e:
        print(f"prosparse-perplexity: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
