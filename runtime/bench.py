"""prosparse-bench: prompt and decode speed in the manner of llama-bench, with the bytes of
weights each generated token reads and that traffic's share of the machine's memory bandwidth.

    prosparse-bench                                  # default model, pp128 + tg64, physical cores
    prosparse-bench -m a.gguf -m b.gguf -p 128 -n 64 -t 1,2 -r 5 --sparse dense,exact -o json
    prosparse-bench -m q8_0.gguf -p 0 -n 64 -t 1 --activations f32,q8   # decode's input: float or 8-bit
    prosparse-bench -p 0 -n 64 -d 0,1500 --kv-type f32,f16            # decoding after 1500 tokens

Tests (tokenisation and sampling excluded; fixed token ids are fed):
- ``ppN``: one batched evaluation of N prompt tokens from position 0 (the KV cache is
  overwritten, as llama-bench clears it).
- ``tgN``: a 1-token prompt (untimed), then N single-token decode steps, timed together.
- ``-d D`` (llama-bench's depth): D tokens are evaluated first, untimed, and the test's tokens
  follow at positions D, D+1, ... (tg at depth 0 keeps its 1-token prompt); the test is named
  ``ppN @ dD`` / ``tgN @ dD``. The KV cache's reads, which grow with D, are not part of the
  weight bytes below, and the activity the sparse modes' bytes come from is counted over the
  decode steps alone (the untimed prompt runs the dense FFN).
Each test runs once untimed (warm-up), then ``-r`` times; t/s is the mean ± sample standard
deviation of the per-repetition rates, as llama-bench reports it. The token ids are a fixed
English passage in the model's own tokenizer (the sparse modes skip what real text leaves
inactive; random ids would measure another sparsity), or fixed pseudo-random ids when the
file has no tokenizer.

Weight bytes read per generated token (``weight bytes/token``), from the file's tensor sizes:

    head + Σ_layers [ attn_norm + wq + wk + wv + wo + ffn_norm
                      + gate_L + u_L · ffn_up_L + d_L · down_L ]
    head   = output_norm + output (tok_embd when tied) + one row of tok_embd
    gate_L = ffn_gate_L                              (dense, exact: every row)
           = p_L · ffn_gate_L + fc1_L + fc2_L         (predictor)
    down_L = ffn_down_t_L, or ffn_down_L (same size; transposed at load in sparse modes)
    u_L    = 1 in dense mode, else c_L
    d_L    = c_L, except 1 in dense mode with a plain ffn_down (every row is an output)
           = a_L in dense mode with ffn_down_t (the C code skips the zero activations' vectors)

c_L is the fraction of layer L's neurons whose up row and down vector were read, a_L the
fraction whose activated gate is non-zero and p_L the fraction the predictor marked active,
all measured per layer over the same tg run in a separate pass with statistics on
(statistics slow predictor mode, so the timed runs keep them off). Norm vectors, KV cache and
activations are left out of the count: the first are a few KiB, the others are not weights.
``% of bandwidth`` is bytes/token × t/s ÷ the read bandwidth measured for that thread count
(native/membw.c) over a touched buffer of ``--bw-mib`` MiB, mapped asking for 2 MiB pages
as the model is (default 1024: 32× a
32 MiB L3, so every byte comes from DRAM; a model file of a few L3 sizes can be partly served
from cache between tokens, so shares near or above 100% on small models mean cache hits, not
a faster memory). See runtime/BENCHMARKS.md for measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from . import __version__
from . import constants as K
from .api import ACTIVATION_MODES, Runtime, physical_cores
from .loader import ModelSpec, read_spec
from .gguf_file import GGUFFile, advise_huge_pages
from .native import KV_TYPES, LayerStats

# Token ids for the tests: an English passage (tokenised once, before any timing).
PASSAGE = (
    "The river town woke slowly that spring. Fishermen mended their nets on the quay while the "
    "baker's children carried trays of warm bread to the market square, where traders were already "
    "arguing about the price of wool. At the edge of town, the old mill had been silent for years, "
    "but a young engineer from the capital had bought it in the winter and promised to turn its wheel "
    "again. Nobody believed her at first. She spent the cold months measuring the current, drawing "
    "gears on the backs of letters and writing to foundries in three countries. When the ice broke, "
    "a cart arrived with iron parts wrapped in straw, and within a week the wheel was turning. The "
    "mill did not grind flour any more; it made electricity for the school, the clinic and the street "
    "lamps along the river. In the evenings people walked out to look at the lights on the water, and "
    "the children invented stories about the machine that lived inside the mill and never slept. The "
    "engineer kept a notebook of every repair, every failure and every small improvement, because she "
    "believed that a town should understand the machines it depends on. Years later the notebook was "
    "printed as a book, and students from other valleys came to read it and to build wheels of their own."
)

MODES = ("dense", "exact", "predictor")
DEFAULT_BW_MIB = 1024
GIB, MIB = 1024 ** 3, 1024 ** 2


# ------------------------------------------------------------------------------------------
# Weight bytes per generated token
# ------------------------------------------------------------------------------------------

def needs_activity(spec: ModelSpec, mode: str) -> bool:
    """Whether the bytes a token reads in this mode depend on which neurons were active."""
    return mode != "dense" or spec.has_down_t


def weight_bytes_per_token(spec: ModelSpec, mode: str, layers: list[LayerStats] | None = None) -> int:
    """Bytes of weights one decoded token reads (formula in the module docstring). layers:
    statistics of a stats-on tg run in this mode (needed when needs_activity())."""
    if needs_activity(spec, mode) and layers is None:
        raise ValueError(f"{mode} mode: weight bytes depend on measured activity; pass the layer statistics")
    g = spec.globals
    embd = g["tok_embd"]
    total = g["output_norm"].n_bytes + (g["output"] or embd).n_bytes + embd.n_bytes // embd.n_rows
    for i, slots in enumerate(spec.layers):
        total += sum(slots[s].n_bytes for s in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm"))
        gate, up = slots["ffn_gate"].n_bytes, slots["ffn_up"].n_bytes
        down = (slots["ffn_down_t"] or slots["ffn_down"]).n_bytes
        st = layers[i] if layers is not None else None
        if mode == "dense":
            active = 1.0 - st.sparsity if slots["ffn_down_t"] is not None else 1.0
            total += gate + up + active * down
            continue
        if mode == "predictor":
            predicted = st.n_predicted / (st.n_tokens * st.n_ff)
            gate = predicted * gate + slots["fc1"].n_bytes + slots["fc2"].n_bytes
        total += gate + st.computed_fraction * (up + down)
    return int(round(total))


# ------------------------------------------------------------------------------------------
# Memory-read bandwidth
# ------------------------------------------------------------------------------------------

def read_bandwidth(threads: list[int], mib: int = DEFAULT_BW_MIB, repeats: int = 5) -> dict[int, float]:
    """Bytes/s that 1.. threads read from a touched buffer of mib MiB (best of repeats)."""
    from ._native import ffi, lib
    mm = mmap.mmap(-1, mib * MIB)
    advise_huge_pages(mm)   # as the model's mapping does
    buf = np.frombuffer(mm, dtype=np.uint8)
    buf.view(np.uint64)[:] = np.arange(buf.size // 8, dtype=np.uint64)   # real pages, not the zero page
    out = {}
    for t in threads:
        bw = lib.ps_read_bandwidth(ffi.from_buffer(buf), buf.size, t, repeats)
        if not bw > 0:
            raise RuntimeError(f"memory bandwidth measurement failed with {t} threads")
        out[t] = bw
    return out


# ------------------------------------------------------------------------------------------
# Running the tests
# ------------------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    path: Path
    spec: ModelSpec
    desc: str                    # "llama 135M Q4_1", "llama 135M Q8_0 fatrelu t=0.2 hot-first"
    size_bytes: int              # all tensors
    n_params: int

    @property
    def modes(self) -> list[str]:
        """The modes the file supports."""
        out = ["dense"]
        if self.spec.activation != K.ACT_SILU:
            out.append("exact")
            if self.spec.has_predictor:
                out.append("predictor")
        return out


def model_info(path: Path) -> ModelInfo:
    with GGUFFile(path) as gf:
        spec = read_spec(gf)
        size = sum(t.n_bytes for t in gf.tensors.values())
        desc = f"{spec.arch} {_human_count(spec.n_params)} {_file_type(gf, spec)}"
        hot = gf.metadata.get(K.KEY_NEURON_ORDER) == K.NEURON_ORDER_FREQUENCY
    if spec.activation != K.ACT_SILU:
        desc += f" {spec.activation}"
        if spec.activation == K.ACT_FATRELU:
            desc += f" t={spec.config['act_threshold']:g}"
    if hot:
        desc += " hot-first"      # prosparse-reorder's neuron order
    return ModelInfo(Path(path), spec, desc, size, spec.n_params)


def _human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{round(n / 1e6)}M" if n >= 1e6 else f"{round(n / 1e3)}K"


def _file_type(gf: GGUFFile, spec: ModelSpec) -> str:
    """llama.cpp's name of the file type (general.file_type), else the type holding most bytes
    of the layer matrices."""
    ftype = gf.metadata.get(K.KEY_FILE_TYPE)
    try:
        return LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        pass
    by_type: dict[GGMLQuantizationType, int] = {}
    for slots in spec.layers:
        for t in slots.values():
            if t is not None and len(t.shape) > 1:
                by_type[t.type] = by_type.get(t.type, 0) + t.n_bytes
    return max(by_type, key=by_type.get).name


def bench_tokens(rt: Runtime, n: int) -> list[int]:
    """n fixed token ids: the passage in the model's tokenizer (BOS as the file says),
    repeated; or seeded pseudo-random ids when the file has no tokenizer."""
    ids = rt.tokenize(PASSAGE, special=False) if rt.tokenizer is not None else []
    if ids:
        return [ids[i % len(ids)] for i in range(n)]
    return np.random.default_rng(1234).integers(0, rt.n_vocab, size=n).tolist()


@dataclass
class Result:
    model: ModelInfo
    threads: int
    mode: str
    activations: str             # "f32", "q8" (what the Runtime resolved)
    test: str                    # "pp128", "tg64", "tg64 @ d1500"
    n_prompt: int
    n_gen: int
    samples_ns: list[int]
    weight_bytes: int | None = None          # per generated token (tg only)
    bandwidth: float | None = None           # bytes/s for this thread count
    layers: list[LayerStats] | None = field(default=None, repr=False)
    n_depth: int = 0                         # tokens evaluated before the test
    kv_type: str = "f32"                     # the KV cache's type
    huge_page_share: float | None = None     # of the model file (Runtime.huge_page_share)

    @property
    def n_tokens(self) -> int:
        return self.n_prompt or self.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [1e9 * self.n_tokens / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0

    @property
    def bandwidth_share(self) -> float | None:
        if self.weight_bytes is None or not self.bandwidth:
            return None
        return self.weight_bytes * self.avg_ts / self.bandwidth

    @property
    def ffn_sparsity(self) -> float | None:
        if not self.layers:
            return None
        cells = sum(l.n_tokens * l.n_ff for l in self.layers)
        return 1.0 - sum(l.n_active for l in self.layers) / cells

    @property
    def ffn_computed_fraction(self) -> float | None:
        if not self.layers:
            return None
        cells = sum(l.n_tokens * l.n_ff for l in self.layers)
        return sum(l.n_computed for l in self.layers) / cells


def _timed(fn) -> int:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0
    finally:
        gc.enable()


def run_prompt(rt: Runtime, tokens: list[int]) -> None:
    rt._model.eval(tokens, 0)


def prompt_ns(rt: Runtime, tokens: list[int], n: int, depth: int = 0) -> int:
    """ppN @ dD: tokens[:depth] evaluated (untimed), then the next n as one batch; returns its ns."""
    if depth:
        rt._model.eval(tokens[:depth], 0)
    return _timed(lambda: rt._model.eval(tokens[depth:depth + n], depth))


def run_decode(rt: Runtime, tokens: list[int], n_gen: int, depth: int = 0,
               before_steps: Callable[[], None] | None = None) -> int:
    """tgN @ dD: tokens[:max(depth, 1)] as the prompt (untimed), then n_gen decode steps from
    the next position; returns their ns. before_steps runs between the two (untimed)."""
    model = rt._model
    start = max(depth, 1)
    model.eval(tokens[:start], 0)
    if before_steps:
        before_steps()

    def steps():
        for i in range(start, start + n_gen):
            model.eval(tokens[i:i + 1], i)
    return _timed(steps)


def bench_model(info: ModelInfo, threads: int, mode: str, prompts: list[int], gens: list[int], reps: int,
                bandwidth: float | None, predictor_threshold: float | None, activations: str = "auto",
                depths: list[int] = (0,), kv_type: str = "f32"):
    """Yields a Result per test (at each depth, every ppN, then every tgN) for one model,
    thread count, mode, activations mode and KV cache type."""
    longest = max(prompts + [n + 1 for n in gens]) + max(depths)
    with Runtime(info.path, n_ctx=longest, threads=threads, sparse=mode, activations=activations,
                 kv_type=kv_type) as rt:
        act = rt.activations
        if predictor_threshold is not None and mode == "predictor":
            rt.set_predictor_threshold(predictor_threshold)
        tokens = bench_tokens(rt, longest)
        for d in depths:
            at = f" @ d{d}" if d else ""
            for n in prompts:
                prompt_ns(rt, tokens, n, d)                                # warm-up
                samples = [prompt_ns(rt, tokens, n, d) for _ in range(reps)]
                yield Result(info, threads, mode, act, f"pp{n}{at}", n, 0, samples, n_depth=d, kv_type=kv_type,
                             huge_page_share=rt.huge_page_share)
            for n in gens:
                run_decode(rt, tokens, 1, d)                               # warm-up
                samples = [run_decode(rt, tokens, n, d) for _ in range(reps)]
                layers = None
                if needs_activity(info.spec, mode):   # activity of the steps alone, untimed
                    run_decode(rt, tokens, n, d, before_steps=lambda: rt.collect_stats(True))
                    layers = rt.sparsity().layers
                    rt.collect_stats(False)
                yield Result(info, threads, mode, act, f"tg{n}{at}", 0, n, samples,
                             weight_bytes_per_token(info.spec, mode, layers), bandwidth, layers,
                             n_depth=d, kv_type=kv_type, huge_page_share=rt.huge_page_share)


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------

COLUMNS = ("model", "size", "params", "threads", "mode", "act", "kv", "test", "t/s", "weight bytes/token",
           "% of bandwidth")
_ALIGN_RIGHT = {"size", "params", "threads", "t/s", "weight bytes/token", "% of bandwidth"}


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.2f} MiB"


def markdown_cells(r: Result) -> list[str]:
    share = r.bandwidth_share
    return [
        r.model.desc, _size(r.model.size_bytes), f"{r.model.n_params / 1e6:.2f} M", str(r.threads), r.mode,
        r.activations, r.kv_type, r.test, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
        "-" if r.weight_bytes is None else f"{r.weight_bytes / MIB:.2f} MiB",
        "-" if share is None else f"{100 * share:.1f}%",
    ]


class MarkdownTable:
    """Prints the header at once and each row as its test finishes (widths fixed up front)."""
    WIDTHS = {"model": 30, "size": 10, "params": 9, "threads": 7, "mode": 9, "act": 3, "kv": 3, "test": 13, "t/s": 16,
              "weight bytes/token": 18, "% of bandwidth": 14}

    def __init__(self, out):
        self.out = out
        self._line(COLUMNS)
        self.out.write("|" + "|".join(
            ("-" * (self.WIDTHS[c] + 1) + ":") if c in _ALIGN_RIGHT else ("-" * (self.WIDTHS[c] + 2))
            for c in COLUMNS) + "|\n")
        self.out.flush()

    def _line(self, cells) -> None:
        parts = [c.rjust(self.WIDTHS[k]) if k in _ALIGN_RIGHT else c.ljust(self.WIDTHS[k])
                 for k, c in zip(COLUMNS, cells)]
        self.out.write("| " + " | ".join(parts) + " |\n")
        self.out.flush()

    def row(self, r: Result) -> None:
        self._line(markdown_cells(r))


def json_record(r: Result) -> dict:
    share = r.bandwidth_share
    return {
        "model": r.model.desc, "model_filename": str(r.model.path), "model_size": r.model.size_bytes,
        "model_n_params": r.model.n_params, "n_threads": r.threads, "sparse": r.mode,
        "activations": r.activations, "type_kv": r.kv_type, "test": r.test,
        "n_prompt": r.n_prompt, "n_gen": r.n_gen, "n_depth": r.n_depth,
        "avg_ns": int(statistics.fmean(r.samples_ns)),
        "stddev_ns": int(statistics.stdev(r.samples_ns)) if len(r.samples_ns) > 1 else 0,
        "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts, "samples_ns": r.samples_ns, "samples_ts": r.samples_ts,
        "weight_bytes_per_token": r.weight_bytes,
        "bandwidth_bytes_per_s": r.bandwidth if r.weight_bytes is not None else None,
        "bandwidth_share": share,
        "ffn_sparsity": r.ffn_sparsity, "ffn_computed_fraction": r.ffn_computed_fraction,
        "huge_page_share": r.huge_page_share,
    }


def bandwidth_line(bw: dict[int, float]) -> str:
    parts = [f"{b / 1e9:.1f} GB/s ({t} thread{'s' if t > 1 else ''})" for t, b in sorted(bw.items())]
    return "bandwidth: " + ", ".join(parts)


def huge_pages_line(shares: dict[str, float | None]) -> str:
    """Which share of each model file 2 MiB pages mapped (decoding from 4 KiB pages is slower)."""
    parts = [f"{name} {'unknown' if v is None else f'{100 * v:.0f}%'}" for name, v in shares.items()]
    return "2 MiB pages: " + ", ".join(parts)


def build_line() -> str:
    from ._native import ffi, lib
    isa = ffi.string(lib.ps_kernels_isa_name(lib.ps_kernels_best_isa())).decode()
    return f"build: prosparse {__version__}, kernels {isa}"


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _choice_list(kind: str, choices) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list of `kind` values, each one of `choices`."""
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {kind} {bad[0] if bad else text!r}; "
                                             f"choose from {', '.join(choices)}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prosparse-bench",
        description="Prompt (ppN) and decode (tgN) speed of GGUF models in the manner of llama-bench, "
                    "with the weight bytes each generated token reads and their share of the measured "
                    "memory-read bandwidth.")
    p.add_argument("-m", "--model", action="append", default=None, metavar="FILE",
                   help="GGUF model (repeatable; default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[128], metavar="N[,N...]",
                   help="prompt sizes; 0 = no prompt test (default: 128)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[64], metavar="N[,N...]",
                   help="generated tokens; 0 = no decode test (default: 64)")
    p.add_argument("-t", "--threads", type=_int_list, default=None, metavar="N[,N...]",
                   help=f"thread counts (default: physical cores, {physical_cores()})")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions of each test (default: 5)")
    p.add_argument("--sparse", type=_choice_list("sparse mode", MODES), default=None, metavar="MODE[,MODE...]",
                   help="FFN modes: dense, exact, predictor (default: those the file supports)")
    p.add_argument("--predictor-threshold", type=float, default=None, metavar="T",
                   help="predictor decision threshold for every layer in predictor mode (default: the file's)")
    p.add_argument("--activations", type=_choice_list("activations mode", ACTIVATION_MODES), default=["auto"],
                   metavar="MODE[,MODE...]",
                   help="how decoding reads its input: f32, q8 (8-bit for Q8_0/Q4_0/Q4_1 weights; bf16 for BF16 "
                        "weights, prompts too, where the CPU has AVX512-BF16) or auto (q8 when the file has such "
                        "weights; the default)")
    p.add_argument("-d", "--n-depth", type=_int_list, default=[0], metavar="N[,N...]",
                   help="tokens evaluated (untimed) before each test, as llama-bench's depth (default: 0)")
    p.add_argument("--kv-type", type=_choice_list("KV cache type", tuple(KV_TYPES)), default=["f32"],
                   metavar="TYPE[,TYPE...]", help="what the KV cache stores keys and values in: f32, f16 (default: f32)")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md",
                   help="md: a markdown table; json: one JSON object per line (default: md)")
    p.add_argument("--bw-mib", type=int, default=DEFAULT_BW_MIB,
                   help=f"size of the buffer the bandwidth is measured over, MiB (default: {DEFAULT_BW_MIB})")
    p.add_argument("--version", action="version", version=f"prosparse {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repetitions < 1:
        print("prosparse-bench: -r must be at least 1", file=sys.stderr)
        return 2
    if any(t < 1 for t in args.threads or []):
        print("prosparse-bench: thread counts must be at least 1", file=sys.stderr)
        return 2
    if args.bw_mib < 1:
        print("prosparse-bench: --bw-mib must be at least 1", file=sys.stderr)
        return 2
    if args.model is None:
        from .model_cache import default_model_path
        args.model = [str(default_model_path())]
    threads = args.threads or [physical_cores()]
    prompts = [n for n in args.n_prompt if n > 0]
    gens = [n for n in args.n_gen if n > 0]
    if not prompts and not gens:
        print("prosparse-bench: nothing to run (-p and -n are both 0)", file=sys.stderr)
        return 2
    try:
        models = [model_info(Path(m)) for m in args.model]
    except (OSError, ValueError) as e:
        print(f"prosparse-bench: {e}", file=sys.stderr)
        return 1

    bandwidth = read_bandwidth(threads, args.bw_mib) if gens else {}
    table = MarkdownTable(sys.stdout) if args.output == "md" else None
    pages: dict[str, float | None] = {}
    for info in models:
        for t in threads:
            for mode in args.sparse or info.modes:
                if mode == "predictor" and not info.spec.has_predictor:
                    print(f"prosparse-bench: {info.path}: skipping predictor mode: the file has no predictor "
                          f"tensors (blk.N.fc1.weight, blk.N.fc2.weight)", file=sys.stderr)
                    continue
                for act in args.activations:
                    for kv in args.kv_type:
                        for r in bench_model(info, t, mode, prompts, gens, args.repetitions, bandwidth.get(t),
                                             args.predictor_threshold, act, args.n_depth, kv):
                            pages[info.path.name] = r.huge_page_share
                            if table:
                                table.row(r)
                            else:
                                print(json.dumps(json_record(r)), flush=True)
    if table:
        print()
        if bandwidth:
            print(bandwidth_line(bandwidth))
        if pages:
            print(huge_pages_line(pages))
        print(build_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
