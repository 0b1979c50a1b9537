"""Text → documents → tokens (cached as flat uint16/uint32 files) → fixed-length sequences.

- Sources: text files (.txt .md .rst), HTML (tags stripped), folders of them (recursively, in
  sorted order), JSONL (one document a line, text under ``jsonl_field``).
- Held-out split by document: a document is held out when a hash of its id (path, and line for
  JSONL) falls under ``heldout_fraction`` — stable whatever else is added to the corpus.
- Each document's tokens are followed by the EOS token and concatenated; the stream is cut into
  sequences of ``seq_len`` (a remainder shorter than that is dropped).
- Cache: ``cache_dir/<key>/{train,heldout}.bin`` + ``meta.json``, the key a hash of the files
  (paths, sizes, mtimes), the tokenizer and the split; written atomically, read as numpy memmaps.
- Order: the stream of training sequences is a fresh permutation per epoch (seeded), and the
  sequences of step t are a pure function of t — resuming needs only the step number.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import html.parser
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
HTML_SUFFIXES = (".html", ".htm")


# --- documents ---------------------------------------------------------------------------


class _TextExtractor(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "pre", "section", "article", "dd", "dt", "dl", "blockquote", "title", "hr"}
    SKIP = {"script", "style", "head", "nav", "footer", "noscript", "svg"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The readable text of an HTML page: tags, scripts, styles and navigation dropped."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    return tidy_text(html.unescape("".join(parser.parts)))


def tidy_text(text: str) -> str:
    """Trailing spaces off, runs of blank lines folded to one."""
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
        path = path.with_suffix("")
    text = raw.decode("utf-8", errors="replace")
    return html_to_text(text) if path.suffix in HTML_SUFFIXES else text


def list_files(sources: list[str], extensions: list[str]) -> list[tuple[Path, str]]:
    """(path, document id) of the files of ``sources``: files as given, folders searched
    recursively in sorted order. The id is the path from the source's own name down
    (``debian-docs/linux-doc-6.1/…``), so the held-out split does not depend on where the
    corpus lies."""
    files = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            files.append((path, path.name))
        elif path.is_dir():
            files.extend((p, f"{path.name}/{p.relative_to(path)}") for p in sorted(path.rglob("*"))
                         if p.is_file() and any(p.name.endswith(ext) or p.name.endswith(ext + ".gz")
                                                for ext in extensions))
        else:
            raise FileNotFoundError(f"data source {path}: no such file or folder "
                                    f"(for the bundled corpus run `prosparse-train prepare-data`)")
    return files


def iter_documents(sources: list[str], extensions: list[str], jsonl_field: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) for every document of the sources."""
    for path, doc_id in list_files(sources, extensions):
        if path.name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if jsonl_field not in record:
                        raise KeyError(f"{path}:{line_no}: no field {jsonl_field!r} (data.jsonl_field)")
                    yield f"{doc_id}:{line_no}", record[jsonl_field]
        else:
            yield doc_id, read_text_file(path)


def is_heldout(doc_id: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


# --- token cache -------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    probe = "ProSparse: the quick brown fox — 1234 ünïcödé\n\tend."
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer.eos_token_id}:{ids}"


def cache_key(files: list[Path], tokenizer, heldout_fraction: float, seed: int, jsonl_field: str) -> str:
    h = hashlib.sha1()
    for f, _ in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"{tokenizer_fingerprint(tokenizer)}:{heldout_fraction}:{seed}:{jsonl_field}".encode())
    return h.hexdigest()[:16]


@dataclass
class TokenCache:
    dir: Path
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        dtype = np.dtype(self.meta["dtype"])
        path = self.dir / f"{split}.bin"
        if self.meta[f"{split}_tokens"] == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def sequences(self, split: str, seq_len: int) -> np.ndarray:
        """[n, seq_len] view of the split's token stream (the remainder dropped)."""
        tokens = self.tokens(split)
        n = len(tokens) // seq_len
        return tokens[: n * seq_len].reshape(n, seq_len)


def build_token_cache(sources: list[str], tokenizer, cache_dir: str | Path, extensions: list[str],
                      heldout_fraction: float = 0.02, seed: int = 0, jsonl_field: str = "text",
                      log=print) -> TokenCache:
    """Tokenise the sources once (or find the cache) and return the cache."""
    files = list_files(sources, extensions)
    if not files:
        raise FileNotFoundError(f"data sources {sources}: no files with extensions {extensions}")
    key = cache_key(files, tokenizer, heldout_fraction, seed, jsonl_field)
    out = Path(cache_dir).expanduser() / key
    if (out / "meta.json").is_file():
        return TokenCache(out, json.loads((out / "meta.json").read_text()))
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    counts = {"train": [0, 0], "heldout": [0, 0]}  # documents, tokens
    heldout_ids = []
    writers = {split: open(out / f"{split}.bin.tmp", "wb") for split in counts}
    docs = iter_documents(sources, extensions, jsonl_field)
    chars = 0
    try:
        while True:
            chunk = [d for _, d in zip(range(256), docs)]
            if not chunk:
                break
            texts = [text for _, text in chunk]
            chars += sum(len(t) for t in texts)
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for (doc_id, _), ids in zip(chunk, encoded):
                split = "heldout" if is_heldout(doc_id, heldout_fraction, seed) else "train"
                if split == "heldout":
                    heldout_ids.append(doc_id)
                ids.append(tokenizer.eos_token_id)
                writers[split].write(np.asarray(ids, dtype=dtype).tobytes())
                counts[split][0] += 1
                counts[split][1] += len(ids)
    finally:
        for w in writers.values():
            w.close()
    for split in counts:
        os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
    meta = {"sources": [str(s) for s in sources], "files": len(files), "chars": chars,
            "tokenizer": tokenizer_fingerprint(tokenizer).split(":[")[0], "dtype": np.dtype(dtype).name,
            "heldout_fraction": heldout_fraction, "seed": seed,
            "train_documents": counts["train"][0], "train_tokens": counts["train"][1],
            "heldout_documents": counts["heldout"][0], "heldout_tokens": counts["heldout"][1],
            "heldout_ids": heldout_ids}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    log(f"data: {files.__len__()} files, {counts['train'][0]} + {counts['heldout'][0]} documents, "
        f"{counts['train'][1]:,} train + {counts['heldout'][1]:,} held-out tokens → {out}")
    return TokenCache(out, meta)


# --- batches -----------------------------------------------------------------------------


class SequenceStream:
    """The training sequences in a seeded order: position k of the stream is sequence
    perm_e[k mod n] with e = k // n (one fresh permutation per epoch)."""

    def __init__(self, sequences: np.ndarray, seed: int = 0):
        if len(sequences) == 0:
            raise ValueError("no training sequences: the corpus is shorter than one sequence (data.seq_len)")
        self.sequences = sequences
        self.seed = seed
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.sequences)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
            self._perm_epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Sequences at stream positions start … start+count−1, as int64 [count, seq_len]."""
        n = len(self.sequences)
        rows = [self.sequences[self._permutation(k // n)[k % n]] for k in range(start, start + count)]
        return np.stack(rows).astype(np.int64)


def micro_batch_start(step: int, micro: int, rank: int, micro_batch: int, grad_accum: int, world: int) -> int:
    """Stream position of the first sequence of (step, micro-step, rank). Step t (1-based) takes
    the global batch micro_batch·grad_accum·world at positions (t−1)·that onwards; within it,
    micro-step m of rank r takes block m·world + r — so one process with grad_accum·world
    micro-steps sees the same sequences as ``world`` processes with grad_accum each."""
    global_batch = micro_batch * grad_accum * world
    return (step - 1) * global_batch + (micro * world + rank) * micro_batch
