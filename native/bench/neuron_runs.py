"""How contiguous a token's active FFN neurons are in the file's order and in prosparse-reorder's
(descending activation frequency), and how many bytes of cache lines their rows drag in: the
offline table of runtime/BENCHMARKS.md, "Neuron order". Needs the test extra (torch,
transformers). The default model's gate is SiLU, so --thresholds applies FATReLU(t) to its gate
values, as the FATReLU SmolLM2 files of the benchmarks do.

    python native/bench/neuron_runs.py --calibration /usr/share/common-licenses/Apache-2.0 \\
        --evaluate /usr/share/common-licenses/GPL-3 --thresholds 0.1294,0.6775,0.9561

Frequencies are counted on --calibration, runs measured on --evaluate (held-out text), --tokens
tokens of each. Rows of ROW_BYTES (612: SmolLM2's Q8_0 rows; 360: Q4_1) laid end to end.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROW_BYTES = {"q8_0": 612, "q4_1": 360}


def gates(model, tok, path: str, n_tokens: int) -> list[np.ndarray]:
    """Per layer, the gate projection's output on the text's first n_tokens tokens."""
    import torch
    ids = tok(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :n_tokens]
    out = {}
    hooks = [layer.mlp.gate_proj.register_forward_hook(lambda m, i, o, k=k: out.__setitem__(k, o[0].numpy()))
             for k, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [out[k] for k in range(len(out))]


def lines_touched(active: np.ndarray, row_bytes: int) -> np.ndarray:
    """Per token, the 64-byte lines the active rows (row j at bytes [j R, (j+1) R)) cover."""
    j = np.arange(active.shape[1])
    first, last = j * row_bytes // 64, ((j + 1) * row_bytes - 1) // 64
    edges = np.zeros((active.shape[0], last[-1] + 2), np.int32)
    a = active.astype(np.int32)
    np.add.at(edges.T, first, a.T)
    np.add.at(edges.T, last + 1, -a.T)
    return (np.cumsum(edges, axis=1)[:, :-1] > 0).sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF transformers can load (default: the default model, cached)")
    p.add_argument("--calibration", required=True, help="text the frequencies are counted on")
    p.add_argument("--evaluate", required=True, help="held-out text the runs are measured on")
    p.add_argument("--thresholds", default="0.1294,0.6775,0.9561", help="FATReLU thresholds (comma-separated)")
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(args.model) if args.model else None
    if path is None:
        from prosparse.model_cache import default_model_path
        path = Path(default_model_path())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    cal, ev = gates(model, tok, args.calibration, args.tokens), gates(model, tok, args.evaluate, args.tokens)
    print("| threshold | order | active rows per token and layer | runs | rows per run | "
          + " | ".join(f"lines / row bytes, {t}" for t in ROW_BYTES) + " |")
    for t in (float(x) for x in args.thresholds.split(",")):
        totals: dict[str, np.ndarray] = {}
        for gc, ge in zip(cal, ev):
            on_cal, on_ev = (gc >= t) & (gc > 0), (ge >= t) & (ge > 0)
            for name, order in (("file", np.arange(gc.shape[1])),
                                ("frequency", np.argsort(-on_cal.sum(0), kind="stable"))):
                a = on_ev[:, order]
                runs = (a & ~np.pad(a, ((0, 0), (1, 0)))[:, :-1]).sum()
                tot = totals.setdefault(name, np.zeros(2 + len(ROW_BYTES)))
                tot += [a.sum(), runs] + [lines_touched(a, r).sum() * 64 / r for r in ROW_BYTES.values()]
        n = len(cal) * cal[0].shape[0]
        for name, (act, runs, *lines) in totals.items():
            print(f"| {t:g} | {name} | {act / n:.1f} | {runs / n:.1f} | {act / runs:.2f} | "
                  + " | ".join(f"{l / act:.3f}" for l in lines) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
