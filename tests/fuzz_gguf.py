"""A fuzz campaign for loading GGUF files: mutated copies of a few small models must either
load and run or fail with a clear error naming the file; never crash, hang or raise anything
else. Not a pytest module (tests/test_gguf_errors.py holds the quick, fixed-seed version); run
it for as long as there is time, ideally against the AddressSanitizer build:

    PROSPARSE_SANITIZE=address python native/build_native.py /tmp/asan
    PROSPARSE_NATIVE_DIR=/tmp/asan/prosparse LD_PRELOAD=$(gcc -print-file-name=libasan.so) \\
        ASAN_OPTIONS=detect_leaks=0 python tests/fuzz_gguf.py --minutes 30 --out /tmp/fuzz

Cases run in a worker process, so that a crash kills only the worker: the parent records the
case, starts a new worker at the next case and goes on. A case stuck in Python past 20 s is a
hang; one stuck in native code is ended by faulthandler's watchdog at 40 s (a crash whose report
starts "Timeout"). Every finding is written to
OUT/findings.txt with its seed: `--replay SEED` (with the same --out) runs that one case again.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if os.environ.get("PROSPARSE_NATIVE_DIR"):   # another build of the extension, as tests/conftest.py
    import prosparse
    prosparse.__path__.insert(0, os.environ["PROSPARSE_NATIVE_DIR"])
CASE_TIMEOUT_S = 20     # a case that takes longer counts as a hang
INTERESTING_U64 = [0, 1, 2, 7, 8, 31, 32, 33, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31,
                   2**32 - 1, 2**32, 2**32 + 1, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
INTERESTING_U32 = [0, 1, 2, 3, 8, 9, 12, 13, 14, 15, 16, 30, 31, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]


# ------------------------------------------------------------------------------------------
# Seed files
# ------------------------------------------------------------------------------------------

def bpe_metadata() -> dict:
    """A byte-level BPE vocabulary (every byte, a few merges, ChatML specials and template)."""
    from prosparse import constants as K
    from prosparse.tokenizer import _byte_alphabet
    merges = ["H e", "l l", "He ll", "Hell o", "\u0120 w", "o r", "\u0120w or", "l d", "\u0120wor ld"]
    tokens = ["<|im_start|>", "<|im_end|>"] + _byte_alphabet() + [m.replace(" ", "") for m in merges]
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return {K.KEY_TOKENIZER_MODEL: "gpt2", K.KEY_TOKENIZER_PRE: "smollm", K.KEY_TOKENS: tokens,
            K.KEY_TOKEN_TYPE: [3, 3] + [1] * (len(tokens) - 2), K.KEY_MERGES: merges,
            K.KEY_BOS_ID: 0, K.KEY_EOS_ID: 1, K.KEY_CHAT_TEMPLATE: template}


def spm_metadata() -> dict:
    """A SentencePiece-style vocabulary: unk/bos/eos, byte fallback tokens, scored pieces."""
    from prosparse import constants as K
    pieces = ["\u2581", "\u2581H", "e", "l", "o", "ll", "\u2581Hell", "\u2581Hello", "w", "r", "d", "\u2581w",
              "or", "\u2581wor", "\u2581world", ",", "!"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return {K.KEY_TOKENIZER_MODEL: "llama", K.KEY_TOKENS: tokens, K.KEY_SCORES: scores,
            K.KEY_TOKEN_TYPE: types, K.KEY_BOS_ID: 1, K.KEY_EOS_ID: 2, K.KEY_UNK_ID: 0,
            K.KEY_ADD_BOS: True, K.KEY_ADD_EOS: False, K.KEY_ADD_SPACE_PREFIX: True}


def make_seeds(out: Path) -> list[Path]:
    """Small models covering the loader's paths: dense and sparse layouts, quantised types,
    FATReLU, predictor tensors, BPE and SentencePiece vocabularies."""
    sys.path.insert(0, str(HERE))
    import numpy as np
    from tiny_models import tiny_llama, to_gguf, with_extra

    from prosparse import constants as K

    out.mkdir(parents=True, exist_ok=True)
    bpe, spm = bpe_metadata(), spm_metadata()
    seeds = []
    for name, act, outtype, threshold, tok in [("relu-q8_0-bpe", K.ACT_RELU, "q8_0", None, bpe),
                                               ("fatrelu-q4_1-spm", K.ACT_FATRELU, "q4_1", 0.05, spm),
                                               ("silu-f16-bpe", K.ACT_SILU, "f16", None, bpe),
                                               ("relu-q4_0", K.ACT_RELU, "q4_0", None, None)]:
        path = out / f"seed-{name}.gguf"
        if not path.exists():
            vocab = len(tok[K.KEY_TOKENS]) if tok else 320
            model = tiny_llama(act, threshold or 0.0, vocab=vocab)
            to_gguf(model, path, outtype, act, threshold, tokenizer_metadata=tok)
        seeds.append(path)
    # predictor tensors (fc1/fc2 per layer) on the ReLU model
    pred = out / "seed-relu-predictor.gguf"
    if not pred.exists():
        from prosparse.gguf_file import GGUFFile
        with GGUFFile(seeds[0]) as gf:
            n_embd = int(gf.metadata["llama.embedding_length"])
            n_ff = int(gf.metadata["llama.feed_forward_length"])
            n_layer = int(gf.metadata["llama.block_count"])
        rng = np.random.default_rng(0)
        tensors = {}
        for i in range(n_layer):
            tensors[f"blk.{i}.fc1.weight"] = rng.standard_normal((8, n_embd)).astype(np.float32)
            tensors[f"blk.{i}.fc2.weight"] = rng.standard_normal((n_ff, 8)).astype(np.float32)
        with_extra(seeds[0], pred, tensors=tensors)
    seeds.append(pred)
    return seeds


# ------------------------------------------------------------------------------------------
# Mutations
# ------------------------------------------------------------------------------------------

def header_end(path: Path) -> int:
    from prosparse.gguf_file import GGUFFile
    with GGUFFile(path) as gf:
        return gf.data_start


def mutate(data: bytes, hdr: int, rng: random.Random) -> tuple[bytes, str]:
    """One to three mutations, mostly in the header (magic, counts, metadata, tensor infos)."""
    buf = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["bytes", "bytes", "u64", "u64", "u32", "truncate", "cut", "dup", "data"])
        at = rng.randrange(4, max(5, hdr))
        if op == "bytes":
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(4, max(5, hdr))] = rng.randrange(256)
        elif op == "u64" and at + 8 <= len(buf):
            buf[at:at + 8] = struct.pack("<Q", rng.choice(INTERESTING_U64))
        elif op == "u32" and at + 4 <= len(buf):
            buf[at:at + 4] = struct.pack("<I", rng.choice(INTERESTING_U32))
        elif op == "truncate":
            del buf[rng.randrange(0, len(buf)):]
        elif op == "cut":
            del buf[at:at + rng.randint(1, 64)]
        elif op == "dup":
            n = rng.randint(1, 64)
            buf[at:at] = buf[at:at + n]
        elif op == "data" and len(buf) > hdr + 2:
            # an f16 scale or weight turned into inf / NaN / a huge value
            pos = rng.randrange(hdr, len(buf) - 1)
            buf[pos:pos + 2] = struct.pack("<H", rng.choice([0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0x0001]))
        else:
            continue
        done.append(f"{op}@{at}")
    return bytes(buf), ",".join(done)


# ------------------------------------------------------------------------------------------
# Worker: runs cases, reports each one on stdout before and after
# ------------------------------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_case(path: Path) -> str | None:
    """None when the file loaded and ran or failed cleanly; otherwise what went wrong."""
    from prosparse import Runtime
    from prosparse.gguf_file import GGUFError

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        with Runtime(path, n_ctx=16, threads=1) as rt:
            rt.evaluate([1, 2, 3])
            if rt.tokenizer is not None:
                ids = rt.tokenize("Hello world, fuzz! \u00e9\u4e2d")
                rt.detokenize(ids)
                rt.generate("Hello", max_tokens=2, temperature=0.0)
                rt.apply_chat_template([{"role": "user", "content": "Hi"}])
            if rt.metadata.get("prosparse.predictor_rank") or rt.predictor_thresholds:
                rt.sparse = "predictor"
                rt.evaluate([4, 5])
        return None
    except Hang:
        return f"hang: more than {CASE_TIMEOUT_S} s"
    except (GGUFError, ValueError, RuntimeError) as e:
        msg = str(e)
        if str(path) in msg or "token id" in msg:
            return None
        return f"unclear error ({type(e).__name__}): {msg[:300]}"
    except Exception as e:   # noqa: BLE001 - anything else is a finding
        return f"unexpected {type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.alarm(0)


def worker(out: Path, seeds: list[Path], first: int, last: int) -> None:
    originals = [(p.read_bytes(), header_end(p)) for p in seeds]
    case_path = out / f"case-{os.getpid()}.gguf"
    for seed in range(first, last):
        rng = random.Random(seed)
        data, hdr = originals[seed % len(originals)]
        bad, how = mutate(data, hdr, rng)
        case_path.write_bytes(bad)
        print(f"start {seed} {how}", flush=True)
        faulthandler.dump_traceback_later(2 * CASE_TIMEOUT_S, exit=True)   # a hang SIGALRM cannot end
        problem = run_case(case_path)
        faulthandler.cancel_dump_traceback_later()
        print(f"done {seed} {'ok' if problem is None else 'FINDING ' + problem}", flush=True)
    case_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# Parent: keeps a worker running until the time is up
# ------------------------------------------------------------------------------------------

def campaign(out: Path, minutes: float, start: int) -> int:
    seeds = make_seeds(out)
    findings = out / "findings.txt"
    deadline = time.time() + minutes * 60
    seed, cases, found, last = start, 0, 0, start - 1
    batch = 200
    while time.time() < deadline:
        cmd = [sys.executable, __file__, "--worker", str(seed), str(seed + batch), "--out", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        current, how = None, ""
        for line in proc.stdout:
            kind, rest = line.rstrip("\n").split(" ", 1)
            if kind == "start":
                current, how = rest.split(" ", 1) if " " in rest else (rest, "")
            elif kind == "done":
                cases += 1
                s, verdict = rest.split(" ", 1)
                last = int(s)
                if verdict != "ok":
                    found += 1
                    with findings.open("a") as f:
                        f.write(f"seed {s} ({how}): {verdict}\n")
                current = None
            if time.time() >= deadline:
                proc.kill()
                break
        err = proc.stderr.read()
        code = proc.wait()
        if current is not None and code != 0 and time.time() < deadline:
            # the worker died inside a case: a crash (ASan report or signal)
            found += 1
            cases += 1
            tail = " | ".join(err.strip().splitlines()[-6:])
            with findings.open("a") as f:
                f.write(f"seed {current} ({how}): CRASH exit {code}: {tail[:600]}\n")
            last = int(current)
            seed = last + 1
        else:
            seed += batch
    for leftover in out.glob("case-*.gguf"):   # a killed worker's last case
        leftover.unlink()
    print(f"{cases} cases (seeds {start}..{last}), {found} findings"
          + (f": see {findings}" if found else ""))
    return 1 if found else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path("/tmp/prosparse-fuzz"))
    p.add_argument("--start", type=int, default=0, help="first case seed")
    p.add_argument("--replay", type=int, metavar="SEED", help="run one case and print its verdict")
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.out, make_seeds(args.out), *args.worker)
        return 0
    if args.replay is not None:
        seeds = make_seeds(args.out)
        src = seeds[args.replay % len(seeds)]   # as worker() picks it
        bad, how = mutate(src.read_bytes(), header_end(src), random.Random(args.replay))
        path = args.out / f"replay-{args.replay}.gguf"
        path.write_bytes(bad)
        print(f"{path} ({how}): {run_case(path) or 'ok'}")
        return 0
    return campaign(args.out, args.minutes, args.start)


if __name__ == "__main__":
    sys.exit(main())
