"""N single-token decode steps and nothing else, for a profiler to watch: how
runtime/BENCHMARKS.md counts a token's instructions with callgrind and its time with perf.

    valgrind --tool=callgrind --toggle-collect=ps_model_eval \\
        python native/bench/decode_steps.py FILE [--mode exact] [--steps 16] [--threads 1]
    callgrind_annotate --inclusive=no callgrind.out.PID       # per function; divide by --steps
    perf record -e cpu-clock -g python native/bench/decode_steps.py FILE --steps 1500 --positions 64

Every step evaluates one token (an English passage's tokens, cycled) at the next position, the
positions cycling through 0 .. --positions - 1 (default: as many as steps): all of them are
decode steps, none a prompt batch, and attention's share stays that of a short context. With
callgrind, collecting inside ps_model_eval alone leaves out loading, tokenising and Python.
Prints the steps' t/s, which means something without a profiler only.
"""

import argparse
import time

from prosparse import Runtime

PASSAGE = ("The quick brown fox jumps over the lazy dog. A memory-mapped model is read once per "
           "token, so decoding speed follows the bytes of weights each token reads. ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--mode", default="dense", help="sparse mode: dense, exact, predictor")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--positions", type=int, default=0, help="positions cycled through (default: --steps)")
    args = p.parse_args()
    positions = args.positions if args.positions > 0 else args.steps
    with Runtime(args.model, n_ctx=max(positions, 16), threads=args.threads, sparse=args.mode) as rt:
        tokens = rt.tokenize(PASSAGE * 4)
        start = time.perf_counter()
        for i in range(args.steps):
            rt._model.eval([tokens[i % len(tokens)]], i % positions)
        print(f"{args.mode}: {args.steps} steps, {args.steps / (time.perf_counter() - start):.1f} t/s")


if __name__ == "__main__":
    main()
