"""Decode (or prompt) speed of several runtimes measured in turns, in one process: the way
runtime/BENCHMARKS.md compares a dense file with a sparse one, or two builds of the extension,
on a machine whose speed drifts by 10-15% from minute to minute.

    python native/bench/interleave.py [--threads T] [--tokens N] [--depth D] [--kv-type TYPE]
        [--rounds R] [--reps K] [--native DIR] LABEL:FILE:MODE [LABEL:FILE:MODE ...]

MODE is a sparse mode (dense, exact, predictor). Each round runs every spec in turn (reversed
every other round), each K + 1 times (the first untimed), and keeps its best tg<N> (or pp<N>
with --prompt) in tokens/s, timed as prosparse-bench times them: the N decode steps alone (not
the one-token prompt before them, nor the garbage collection before the timer; with --depth D,
after an untimed D-token prompt, from position D, as prosparse-bench's tgN @ dD; until 2026-11-29
06:20 UTC this driver timed the whole call, ~13 ms more per tg64 on SmolLM2, which pulled every
sparse/dense ratio quoted before then towards 1 by 2-4%); prints each spec's median over the
rounds, its best round and every round's value, then each later spec's per-round ratio to the
first spec, their median and the ratio of the two best rounds (on a host whose other tenants
take memory bandwidth in bursts, the best of many runs is the least disturbed one).
--native DIR loads the extension built by `python native/build_native.py DIR` instead of the
installed one (an A/B of two builds: one process per build, alternated by the caller).

Example (BENCHMARKS.md, "Sparse decode, interleaved"):
    python native/bench/interleave.py --threads 1 --rounds 5 \\
        dl:smollm2-fatrelu-t0.6775.dense-layout.q8_0.gguf:dense ex:smollm2-fatrelu-t0.6775.q8_0.gguf:exact
"""
from __future__ import annotations

import argparse
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="+", metavar="LABEL:FILE:MODE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64, help="generated (or prompt, with --prompt) tokens")
    p.add_argument("--prompt", action="store_true", help="time a prompt of --tokens tokens instead of decode")
    p.add_argument("--depth", type=int, default=0, help="decode after this many untimed prompt tokens")
    p.add_argument("--kv-type", default="f32", help="the KV cache's type (f32, f16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="timed runs per spec and round (best kept)")
    p.add_argument("--native", metavar="DIR", help="an extension built by native/build_native.py DIR")
    args = p.parse_args(argv)
    if args.native:
        import prosparse
        prosparse.__path__.insert(0, f"{args.native}/prosparse")
    from prosparse import bench
    from prosparse.api import Runtime

    n = args.tokens
    runs = []
    for spec in args.specs:
        try:
            label, path, mode = spec.rsplit(":", 2)
        except ValueError:
            p.error(f"{spec!r} is not LABEL:FILE:MODE")
        rt = Runtime(path, n_ctx=max(args.depth + n + 1, 129), threads=args.threads, sparse=mode,
                     kv_type=args.kv_type)
        runs.append((label, rt, bench.bench_tokens(rt, max(args.depth + n + 1, 128))))
    best: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for r in range(args.rounds):
        for label, rt, tokens in runs if r % 2 == 0 else runs[::-1]:
            top = 0.0
            for k in range(args.reps + 1):
                if args.prompt:
                    ns = bench._timed(lambda: bench.run_prompt(rt, tokens[:n]))
                else:
                    ns = bench.run_decode(rt, tokens, n, depth=args.depth)
                if k:
                    top = max(top, n / (ns * 1e-9))
            best[label].append(top)
    for label, values in best.items():
        print(f"{label:24s} median {statistics.median(values):7.1f}  best {max(values):7.1f}  rounds "
              + " ".join(f"{v:.1f}" for v in values))
    # the same round's runs are minutes closer than the medians': their ratios drift less
    base_label, base = next(iter(best.items()))
    for label, values in list(best.items())[1:]:
        ratios = [v / b for v, b in zip(values, base)]
        print(f"{label + ' / ' + base_label:24s} median {statistics.median(ratios):7.3f}  "
              f"best/best {max(values) / max(base):.3f}  rounds " + " ".join(f"{r:.3f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
