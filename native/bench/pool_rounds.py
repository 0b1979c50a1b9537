"""Pools the rounds of several interleave.py runs (sittings) of the same specs: per spec the
median tokens/s over every round, per later spec the median of the rounds' ratios to the first
spec, their interquartile range and how often the later spec won, and (with --ideal) that
median's share of a byte-ideal speedup. On a host whose other tenants take memory bandwidth in
bursts, many short sittings pooled say more than one long one.

    for i in $(seq 13); do python native/bench/interleave.py --threads 1 --rounds 7 --reps 2 \\
        dl:DENSE_LAYOUT.gguf:dense ex:SPARSE.gguf:exact hot:SPARSE.hot.gguf:exact; done > runs.log
    python native/bench/pool_rounds.py runs.log --ideal 1.505

(runtime/BENCHMARKS.md's pooled tables: one such log per file, 13 sittings at 1 thread, 9-10 at 2.)
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys


def parse(lines) -> dict[str, list[float]]:
    """label -> every round's tokens/s, in order, from interleave.py's 'LABEL median ... rounds ...' lines"""
    out: dict[str, list[float]] = {}
    for line in lines:
        m = re.match(r"(\S+)\s+median\s+[\d.]+\s+best\s+[\d.]+\s+rounds (.*)", line)
        if m:
            out.setdefault(m.group(1), []).extend(float(v) for v in m.group(2).split())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="interleave.py outputs (one or more sittings each)")
    p.add_argument("--ideal", type=float, help="the byte-ideal speedup of the later specs over the first")
    args = p.parse_args(argv)
    rounds: dict[str, list[float]] = {}
    for path in args.logs:
        with open(path, encoding="utf-8") as f:
            for label, values in parse(f).items():
                rounds.setdefault(label, []).extend(values)
    if not rounds:
        p.error("no interleave.py rounds found")
    (base_label, base), *others = rounds.items()
    for label, values in rounds.items():
        print(f"{label:12s} rounds {len(values):4d}  median {statistics.median(values):7.1f} t/s")
    for label, values in others:
        if len(values) != len(base):
            p.error(f"{label} has {len(values)} rounds, {base_label} {len(base)}: not the same runs")
        ratios = [v / b for v, b in zip(values, base)]
        med, (q1, _, q3) = statistics.median(ratios), statistics.quantiles(ratios, n=4)
        share = f"  {med / args.ideal:.1%} of {args.ideal:g}" if args.ideal else ""
        print(f"{label + ' / ' + base_label:16s} median {med:.3f} (IQR {q1:.3f}-{q3:.3f}){share}  "
              f"won {sum(r > 1 for r in ratios)}/{len(ratios)}")
    # each later spec against each other later one (e.g. hot first against file order)
    for i, (a, va) in enumerate(others):
        for b, vb in others[i + 1:]:
            ratios = [y / x for x, y in zip(va, vb)]
            med, (q1, _, q3) = statistics.median(ratios), statistics.quantiles(ratios, n=4)
            print(f"{b + ' / ' + a:16s} median {med:.3f} (IQR {q1:.3f}-{q3:.3f})  won {sum(r > 1 for r in ratios)}/{len(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
