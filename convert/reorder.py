"""prosparse-reorder: sort each layer's FFN neurons by how often they fire, hottest first.

    prosparse-reorder MODEL.gguf --calibration TEXT [-o OUT.gguf] [--tokens N] [--force] [--quiet]

A ReLU-family FFN is the same function under any order of its neurons, but the order decides
where a token's active rows lie in memory. In ProSparse-type models a minority of neurons fires
for most tokens (PowerInfer's "hot" neurons); placed side by side, the rows a token reads come in
runs that the CPU's prefetchers stream, instead of scattered 0.5-4 KiB reads, which a core
serves at about half the rate (runtime/BENCHMARKS.md, "Neuron order"). The bytes read per
token do not change; the time to read them does.

How: the model itself (prosparse's runtime, no torch) evaluates the calibration text in
windows of --window tokens and counts, per layer and neuron, the tokens in which the neuron's
activated gate was non-zero. Each layer's neurons are then sorted by that count, descending
(ties keep their order), and the file is copied with the rows of ffn_gate, ffn_up, ffn_down_t
and the predictor's fc2 permuted, and the columns of a float ffn_down. A quantised ffn_down (the
dense layout, llama.cpp's) cannot have its columns permuted exactly, since each quantisation
block spans 32 neurons: it is written as ffn_down_t instead, transposed and re-quantised along
the neurons, as the runtime would transpose it at every load for a sparse mode (one more
rounding of the down projection; the output needs no copy at load). Everything else is copied
byte for byte; the metadata gains prosparse.neuron_order ("activation_frequency") and
prosparse.neuron_order_tokens (the calibration tokens). Logits change only by float rounding
(sums over neurons run in another order), and by that re-quantisation where it applies.

Calibrate on text like what the model will see; the order generalises (measured on text
other than the benchmark's). Bad inputs print one line and exit 1; no output is left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prosparse import constants as K
from prosparse.gguf_file import (GGML_QUANT_SIZES, GGMLQuantizationType, GGUFError, GGUFFile, GGUFValueType,
                                 drop_cached_pages)

from prosparse.loader import read_spec, transposable_down, transpose_down

from .errors import ConversionError
from .gguf_writer import _umask, check_output

PROG = "prosparse-reorder"

KEY_NEURON_ORDER, KEY_NEURON_ORDER_TOKENS = K.KEY_NEURON_ORDER, K.KEY_NEURON_ORDER_TOKENS
NEURON_ORDER_FREQUENCY = K.NEURON_ORDER_FREQUENCY

# per-layer tensors with one row per neuron, and those with one column per neuron
ROW_PERMUTED = (K.FFN_GATE, K.FFN_UP, K.FFN_DOWN_T, K.PREDICTOR_FC2)
COLUMN_PERMUTED = (K.FFN_DOWN,)
# per-layer tensors that hold nothing per neuron (whatever their sizes)
NOT_NEURONS = (K.ATTN_NORM, K.ATTN_Q, K.ATTN_K, K.ATTN_V, K.ATTN_OUT, K.FFN_NORM, K.PREDICTOR_FC1)
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
MIN_TOKENS = 16
COPY_CHUNK = 64 << 20
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")


@dataclasses.dataclass
class ReorderResult:
    path: Path
    n_tokens: int                     # calibration tokens evaluated
    n_bytes: int
    sparsity: float                   # over the calibration text
    moved: list[float]                # per layer: share of neurons that changed place
    top_share: list[float]            # per layer: share of activations in the hottest 10% of neurons
    transposed: int = 0               # quantised ffn_down tensors written as ffn_down_t


def neuron_order(counts: np.ndarray) -> np.ndarray:
    """Per layer, the neuron indices by descending count, ties in index order: (n_layer, n_ff)."""
    return np.argsort(-counts, axis=1, kind="stable")


def count_activations(path: str | os.PathLike, calibration: str | Sequence[int], max_tokens: int, window: int,
                      threads: int | None, progress: bool = False) -> tuple[np.ndarray, int, float]:
    """Evaluates the calibration (text, or token ids) with the model, its first max_tokens
    tokens, in windows of `window` tokens each from position 0 (a BOS first where the file adds
    one to text); returns the (n_layer, n_ff) activation counts, the number of tokens evaluated
    and the sparsity over them."""
    from prosparse.api import Runtime
    with Runtime(path, n_ctx=window, threads=threads, sparse="dense") as rt:
        if isinstance(calibration, str):
            if rt.tokenizer is None:
                raise ConversionError(f"{path}: the file has no tokenizer, so the calibration text cannot be "
                                      f"tokenised")
            tokens = rt.tokenize(calibration, add_bos=False, special=False)[:max_tokens]
            bos = rt.tokenize("", add_bos=True, special=False)   # [] or [BOS], as the file says
        else:
            tokens, bos = [int(t) for t in calibration][:max_tokens], []
            bad = [t for t in tokens if not 0 <= t < rt.n_vocab]
            if bad:
                raise ConversionError(f"calibration token id {bad[0]} is outside the vocabulary [0, {rt.n_vocab})")
        if len(tokens) < MIN_TOKENS:
            raise ConversionError(f"the calibration is {len(tokens)} tokens long; give at least "
                                  f"{MIN_TOKENS} (a few thousand tokens are better)")
        step = window - len(bos)
        rt.collect_stats(True)
        for i in range(0, len(tokens), step):
            rt._model.eval(bos + tokens[i:i + step], 0)        # last logits only, from position 0
            if progress:
                print(f"\r{PROG}: calibration {min(i + step, len(tokens))}/{len(tokens)} tokens",
                      end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        counts, report = rt.activation_counts(), rt.sparsity()
        rt.collect_stats(False)
    return counts, report.n_tokens, report.sparsity


def plan_permutations(gf: GGUFFile, order: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    """name -> ("rows" | "columns" | "transpose", permutation) for every tensor that holds
    neurons ("transpose": a quantised ffn_down, written as ffn_down_t with its rows permuted);
    raises for a tensor that holds them in a way this cannot permute."""
    n_layer, n_ff = order.shape
    plan = {}
    for name, t in gf.tensors.items():
        m = _LAYER_TENSOR.match(name)
        if not m or int(m.group(1)) >= n_layer:
            continue
        layer, kind = int(m.group(1)), m.group(2)
        if kind in ROW_PERMUTED and m.group(3) == "weight":
            if t.n_rows != n_ff:
                raise ConversionError(f"{gf.path}: tensor {name!r} has {t.n_rows} rows, expected one per neuron "
                                      f"({n_ff})")
            plan[name] = ("rows", order[layer])
        elif kind in COLUMN_PERMUTED and m.group(3) == "weight":
            if t.ne0 != n_ff:
                raise ConversionError(f"{gf.path}: tensor {name!r} has rows of {t.ne0}, expected one "
                                      f"column per neuron ({n_ff})")
            if t.type in FLOAT_TYPES:
                plan[name] = ("columns", order[layer])
                continue
            if K.block_tensor(layer, K.FFN_DOWN_T) in gf.tensors:
                raise ConversionError(f"{gf.path}: layer {layer} has both {name!r} and "
                                      f"{K.block_tensor(layer, K.FFN_DOWN_T)!r}; refusing")
            if not transposable_down(t):
                raise ConversionError(f"{gf.path}: tensor {name!r} is {t.type.name} of shape {list(t.shape)}: its "
                                      f"outputs do not fill whole blocks of {GGML_QUANT_SIZES[t.type][0]} once "
                                      f"transposed to one row per neuron, so it can be neither reordered nor "
                                      f"transposed")
            plan[name] = ("transpose", order[layer])
        elif n_ff in t.shape and kind not in NOT_NEURONS:
            raise ConversionError(f"{gf.path}: tensor {name!r} (shape {list(t.shape)}) is not one prosparse "
                                  f"knows how to reorder, and it may hold one entry per neuron; refusing")
    return plan


def permuted(gf: GGUFFile, name: str, how: str, perm: np.ndarray) -> np.ndarray:
    t = gf.tensors[name]
    if how == "transpose":
        return transpose_down(gf, t).reshape(t.ne0, -1)[perm]
    data = gf.tensor_data(name)
    if how == "rows":
        return data.reshape(t.n_rows, -1)[perm]
    itemsize = 4 if t.type == GGMLQuantizationType.F32 else 2
    return data.view(f"<u{itemsize}").reshape(t.n_rows, t.ne0)[:, perm]


def _kv_bytes(key: str, value) -> bytes:
    k = key.encode()
    out = struct.pack("<Q", len(k)) + k
    if isinstance(value, str):
        v = value.encode()
        return out + struct.pack("<IQ", GGUFValueType.STRING, len(v)) + v
    return out + struct.pack("<IQ", GGUFValueType.UINT64, int(value))


def _tensor_info_bytes(name: str, shape: Sequence[int], type_: int, rel_offset: int) -> bytes:
    n = name.encode()
    return (struct.pack("<Q", len(n)) + n + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
            + struct.pack("<IQ", int(type_), rel_offset))


def header_with(gf: GGUFFile, new_kv: dict, transposed: Sequence[str] = ()) -> bytes:
    """gf's header (magic, version, counts, metadata, tensor descriptions) with new_kv's keys
    set (replaced where present, else appended), padded to the file's alignment; the tensors
    named in `transposed` (ffn_down) described as ffn_down_t, their shape swapped (the same
    bytes: a transposed quantised matrix has as many blocks). Tensor data offsets are relative
    to the data section, so they stay valid."""
    buf = gf.buffer
    kept = [buf[a:b] for key, (a, b) in gf.kv_spans.items() if key not in new_kv]
    kvs = b"".join(kept) + b"".join(_kv_bytes(k, v) for k, v in new_kv.items())
    n_kv = len(kept) + len(new_kv)
    infos = buf[gf.tensor_infos_span[0]:gf.tensor_infos_span[1]]
    if transposed:
        down, down_t = f".{K.FFN_DOWN}.", f".{K.FFN_DOWN_T}."
        infos = b"".join(
            _tensor_info_bytes(t.name.replace(down, down_t) if t.name in transposed else t.name,
                               t.shape[::-1] if t.name in transposed else t.shape, t.type, t.offset - gf.data_start)
            for t in gf.tensors.values())
    head = bytes(buf[0:8]) + struct.pack("<QQ", len(gf.tensors), n_kv) + kvs + infos
    return head + b"\0" * (-len(head) % gf.alignment)


def write_reordered(gf: GGUFFile, out: Path, order: np.ndarray, n_tokens: int, force: bool) -> int:
    plan = plan_permutations(gf, order)
    check_output(out, force)
    header = header_with(gf, {KEY_NEURON_ORDER: NEURON_ORDER_FREQUENCY, KEY_NEURON_ORDER_TOKENS: n_tokens},
                         [name for name, (how, _) in plan.items() if how == "transpose"])
    tensors = sorted(gf.tensors.values(), key=lambda t: t.offset)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            buf, pos = gf.buffer, gf.data_start
            for t in tensors:
                if t.offset < pos:
                    raise ConversionError(f"{gf.path}: tensor {t.name!r} overlaps the tensor before it")
                f.write(buf[pos:t.offset])                       # alignment padding
                if t.name in plan:
                    data = np.ascontiguousarray(permuted(gf, t.name, *plan[t.name]))
                    if data.nbytes != t.n_bytes:   # the offsets after it would be wrong
                        raise ConversionError(f"{gf.path}: tensor {t.name!r} came out {data.nbytes} bytes long "
                                              f"instead of {t.n_bytes}")
                    f.write(data.data)
                else:
                    for a in range(t.offset, t.offset + t.n_bytes, COPY_CHUNK):
                        f.write(buf[a:min(a + COPY_CHUNK, t.offset + t.n_bytes)])
                pos = t.offset + t.n_bytes
            f.write(buf[pos:gf.size])
            f.flush()
            os.fsync(f.fileno())
            drop_cached_pages(f.fileno())
            n_bytes = f.tell()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n_bytes


def reorder_model(src: str | os.PathLike, out: str | os.PathLike, calibration: str | Sequence[int], *,
                  max_tokens: int = 4096,
                  window: int = 512, threads: int | None = None, force: bool = False,
                  progress: bool = False) -> ReorderResult:
    """Writes `out`: `src` with each layer's FFN neurons sorted by activation frequency over
    the calibration, a text or token ids (module docstring). Raises ConversionError (or
    GGUFError for a bad file)."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConversionError(f"{out}: the output must not be the input file (it is read while written)")
    if window < 2 * MIN_TOKENS:
        raise ConversionError(f"--window {window} is too small (at least {2 * MIN_TOKENS})")
    check_output(out, force)
    with GGUFFile(src) as gf:
        spec = read_spec(gf)
        if spec.activation == K.ACT_SILU:
            raise ConversionError(f"{src}: the FFN gate is SiLU, which leaves (almost) every neuron active, so "
                                  f"there is no activation frequency to sort by; reorder ReLU / FATReLU "
                                  f"(ProSparse) models")
        # fail early (which tensors are transposed does not depend on the order)
        plan = plan_permutations(gf, np.zeros((len(spec.layers), spec.config["n_ff"]), dtype=np.int64))
        transposed = sum(how == "transpose" for how, _ in plan.values())
        counts, n_tokens, sparsity = count_activations(src, calibration, max_tokens, window, threads,
                                                       progress and sys.stderr.isatty())
        order = neuron_order(counts)
        n_bytes = write_reordered(gf, out, order, n_tokens, force)
    n_ff = counts.shape[1]
    moved = [float(np.mean(o != np.arange(n_ff))) for o in order]
    top = [float(np.sort(c)[::-1][:max(1, n_ff // 10)].sum() / max(1, c.sum())) for c in counts]
    return ReorderResult(out, n_tokens, n_bytes, sparsity, moved, top, transposed)


def default_output(src: Path) -> Path:
    return src.with_name(f"{src.stem}.hot{src.suffix or '.gguf'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("model", help="a prosparse or PowerInfer GGUF file with a ReLU / FATReLU FFN")
    p.add_argument("--calibration", required=True, metavar="TEXT",
                   help="a UTF-8 text file the model evaluates to count activations (a few thousand tokens)")
    p.add_argument("-o", "--outfile", help="output file (default: MODEL with .hot before .gguf)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens at most (default 4096)")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("-t", "--threads", type=int, help="threads (default: physical cores)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src = Path(args.model)
    out = Path(args.outfile) if args.outfile else default_output(src)
    try:
        if args.tokens < MIN_TOKENS:
            raise ConversionError(f"--tokens {args.tokens}: at least {MIN_TOKENS}")
        try:
            text = Path(args.calibration).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConversionError(f"{args.calibration}: cannot read the calibration text: {e}") from e
        r = reorder_model(src, out, text, max_tokens=args.tokens, window=args.window, threads=args.threads,
                          force=args.force, progress=not args.quiet)
    except (ConversionError, GGUFError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"{PROG}: wrote {r.path} ({r.n_bytes / 2**20:.1f} MiB): {r.n_tokens} calibration tokens, "
              f"{100 * r.sparsity:.1f}% sparse; the hottest 10% of neurons carry "
              f"{100 * min(r.top_share):.0f}-{100 * max(r.top_share):.0f}% of the activations (per layer)",
              file=sys.stderr)
        if r.transposed:
            print(f"{PROG}: the {r.transposed} quantised ffn_down tensors were written as ffn_down_t (one row "
                  f"per neuron), re-quantised along the neurons as sparse modes would do at every load",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
