"""The Python API: ``Runtime`` loads a GGUF model and generates text.

    from prosparse import Runtime
    with Runtime("model.gguf", n_ctx=2048, threads=2, seed=42) as rt:
        for piece in rt.generate("Once upon a time", max_tokens=64, stream=True):
            print(piece, end="", flush=True)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import constants as K
from .gguf_file import GGML_QUANT_SIZES, GGUFError, GGUFFile
from .loader import SPARSE_MODES, ModelSpec, read_spec
from .model_cache import ModelDownloadError
from .native import ACTIVATIONS, KV_TYPES, LayerStats, NativeError, NativeModel, check_name
from .sampling import NonFiniteLogits, Sampler, SamplingParams

DEFAULT_N_CTX = 4096
ACTIVATION_MODES = ("auto", *ACTIVATIONS)

# What the command-line tools report as one line (exit status 1) rather than a traceback:
# a bad file, a refused operation, an unreachable registry, a bad argument, an I/O error.
USER_ERRORS = (GGUFError, NativeError, ModelDownloadError, ValueError, OSError)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's FPUs and
    memory bandwidth, so llama.cpp defaults to one thread per physical core too)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        n = len(cores) or allowed
    except OSError:
        n = allowed
    return max(1, min(n, allowed))


@dataclass
class Timings:
    """Where the time of the last generation went (llama.cpp's perf counters)."""
    load_ms: float = 0.0
    prompt_ms: float = 0.0
    prompt_tokens: int = 0
    eval_ms: float = 0.0
    eval_tokens: int = 0
    sample_ms: float = 0.0
    total_ms: float = 0.0
    stop_reason: str = ""            # "eos", "stop", "length", "context"

    def lines(self) -> list[str]:
        """llama.cpp's closing timing lines."""
        def rate(ms: float, n: int) -> str:
            per = ms / n if n else 0.0
            tps = 1000.0 * n / ms if ms > 0 else 0.0
            return f"({per:8.2f} ms per token, {tps:8.2f} tokens per second)"
        return [
            f"prosparse_perf:        load time = {self.load_ms:10.2f} ms",
            f"prosparse_perf: prompt eval time = {self.prompt_ms:10.2f} ms / {self.prompt_tokens:5d} tokens "
            + rate(self.prompt_ms, self.prompt_tokens),
            f"prosparse_perf:        eval time = {self.eval_ms:10.2f} ms / {self.eval_tokens:5d} runs   "
            + rate(self.eval_ms, self.eval_tokens),
            f"prosparse_perf:       total time = {self.total_ms:10.2f} ms / "
            f"{self.prompt_tokens + self.eval_tokens:5d} tokens",
        ]


@dataclass
class SparsityReport:
    """FFN activation statistics over the tokens evaluated while statistics were on."""
    mode: str
    layers: list[LayerStats]

    def _total(self, attr: str) -> int:
        return sum(getattr(l, attr) for l in self.layers)

    @property
    def n_tokens(self) -> int:
        return self.layers[0].n_tokens if self.layers else 0

    @property
    def sparsity(self) -> float:
        """Fraction of zero activations, averaged over layers and tokens (the paper's measure)."""
        cells = sum(l.n_tokens * l.n_ff for l in self.layers)
        return 1.0 - self._total("n_active") / cells if cells else float("nan")

    @property
    def predicted_sparsity(self) -> float:
        cells = sum(l.n_tokens * l.n_ff for l in self.layers)
        return 1.0 - self._total("n_predicted") / cells if cells and self.mode == "predictor" else float("nan")

    @property
    def recall(self) -> float:
        active = self._total("n_active")
        return self._total("n_predicted_active") / active if active and self.mode == "predictor" else float("nan")

    def lines(self) -> list[str]:
        """A summary and a per-layer table, for the CLI."""
        out = [f"prosparse_sparse: mode {self.mode}, {self.n_tokens} tokens measured: FFN sparsity "
               f"{100 * self.sparsity:.2f}%" + (f", predicted sparsity {100 * self.predicted_sparsity:.2f}%, "
                                                 f"recall {100 * self.recall:.2f}%" if self.mode == "predictor" else "")]
        out.append("prosparse_sparse: layer | sparsity % | predicted sparsity % | recall % | neurons computed %")
        for i, l in enumerate(self.layers):
            def pct(x: float) -> str:
                return "-" if x != x else f"{100 * x:.2f}"
            out.append(f"prosparse_sparse: {i:5d} | {pct(l.sparsity):>10} | {pct(l.predicted_sparsity):>20} | "
                       f"{pct(l.recall):>8} | {pct(l.computed_fraction):>18}")
        return out


class Runtime:
    """A loaded model. ``path=None`` uses the default model (downloaded once into the cache).

    n_ctx: context length in tokens (default: the model's, at most 4096). threads: default
    one per physical core. seed: makes sampling reproducible (None: a random seed, recorded
    in ``.seed`` after each generation). sparse: how decoding computes the FFN, "dense",
    "exact" (skip neurons the ReLU/FATReLU zeroes) or "predictor" (skip those the file's
    predictors rule out); None picks the best the file supports. sparse_stats: count
    per-layer sparsity and predictor recall (see ``sparsity()``; costs the exact gate in
    predictor mode). activations: how mat-muls read their input, "f32" or "q8" (decoding's
    quantised to 8 bits per block of 32 for the Q8_0/Q4_0/Q4_1 weights, which then run
    integer dot products, as llama.cpp does; faster, with logits within about 1% of f32; BF16
    weights, where the CPU has AVX512-BF16, read it rounded to bf16, in prompts too, as
    llama.cpp does); "auto" is q8 when the file has such weights. kv_type: what the KV cache
    stores keys and values in, "f32" or "f16" (half the memory, and half the bytes each token
    reads from the cache, which at long contexts rival the weights'; rounded to f16 as
    llama.cpp stores them).
    """

    def __init__(self, path: str | os.PathLike | None = None, n_ctx: int | None = None,
                 threads: int | None = None, seed: int | None = None, sparse: str | None = None,
                 sparse_stats: bool = False, activations: str = "auto", kv_type: str = "f32"):
        start = time.perf_counter()
        if path is None:
            from .model_cache import default_model_path
            path = default_model_path()
        self.path = Path(path)
        self._gguf = GGUFFile(self.path, huge_pages=True)
        try:
            self.spec: ModelSpec = read_spec(self._gguf)
            self.tokenizer = self._load_tokenizer()
            if n_ctx is None:
                n_ctx = min(DEFAULT_N_CTX, self.spec.context_length)
            if n_ctx <= 0:
                raise ValueError(f"n_ctx must be positive, got {n_ctx}")
            self.threads = threads if threads is not None else physical_cores()
            if self.threads <= 0:
                raise ValueError(f"threads must be positive, got {self.threads}")
            check_name("KV cache type", kv_type, KV_TYPES)   # before the model is built
            mode = sparse or self.spec.best_sparse_mode
            if mode not in SPARSE_MODES:
                raise ValueError(f"unknown sparse mode {mode!r}; choose one of {', '.join(SPARSE_MODES)}")
            bad_down = self.spec.untransposable_down() if mode != "dense" else None
            if bad_down is not None:
                raise ValueError(f"{self.path}: {mode} mode reads the down projection one row per neuron, but "
                                 f"tensor {bad_down.name!r} ({bad_down.type.name}, {bad_down.shape[1]} outputs) "
                                 f"cannot be transposed into such rows: its outputs do not fill whole blocks of "
                                 f"{GGML_QUANT_SIZES[bad_down.type][0]}; use dense mode")
            self._model = NativeModel(self._gguf, self.spec, n_ctx, self.threads,
                                      transpose_down_for_sparse=mode != "dense" and not self.spec.has_down_t)
            self._model.sparse_mode = mode
            self.activations = activations
            if kv_type != self._model.kv_type:    # f32 is what the model was created with
                self._model.kv_type = kv_type
            self._model.set_stats(sparse_stats)
        except BaseException:
            self._gguf.close()
            raise
        self.n_ctx = n_ctx
        self.seed = seed
        self._cached: list[int] = []      # tokens whose keys/values the C cache holds
        self.timings = Timings(load_ms=(time.perf_counter() - start) * 1000.0)

    # --- model facts ---------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.spec.config["n_vocab"]

    @property
    def metadata(self) -> dict:
        return self._gguf.metadata

    @property
    def huge_page_share(self) -> float | None:
        """Share of the model file that 2 MiB pages map (fewer TLB misses: decoding from 4 KiB
        pages was 5-23% slower), or None where that is not known (not Linux, huge pages off,
        a file under 16 MiB or over half the available memory)."""
        return self._gguf.huge_page_share

    def _load_tokenizer(self):
        if K.KEY_TOKENS not in self._gguf.metadata:
            return None
        from .tokenizer import Tokenizer
        return Tokenizer.from_metadata(self._gguf.metadata, source=str(self.path))

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: the file has no tokenizer ({K.KEY_TOKENS} is missing); "
                             f"pass token ids instead of text")
        return self.tokenizer

    # --- sparsity ------------------------------------------------------------------------
    @property
    def sparse(self) -> str:
        """The FFN mode of decoding: "dense", "exact" or "predictor" (settable)."""
        return self._model.sparse_mode

    @sparse.setter
    def sparse(self, mode: str) -> None:
        self._model.sparse_mode = mode

    @property
    def activations(self) -> str:
        """How mat-muls read their input: "f32" or "q8" (settable; "auto" is q8
        when some matrix is Q8_0/Q4_0/Q4_1, or BF16 on a CPU with AVX512-BF16, else f32)."""
        return self._model.activations

    @activations.setter
    def activations(self, mode: str) -> None:
        check_name("activations mode", mode, ACTIVATION_MODES)
        if mode == "auto":
            mode = "q8" if self._model.q8_mode_applies else "f32"
        self._model.activations = mode

    @property
    def kv_type(self) -> str:
        """What the KV cache stores keys and values in: "f32" or "f16" (set at creation)."""
        return self._model.kv_type

    @property
    def predictor_thresholds(self) -> list[float]:
        """Per-layer predictor decision thresholds (logit >= threshold → computed)."""
        return self._model.predictor_thresholds()

    def set_predictor_threshold(self, threshold: float, layer: int | None = None) -> None:
        """Lower: more neurons computed, higher recall; higher: sparser, faster, riskier."""
        self._model.set_predictor_threshold(threshold, -1 if layer is None else layer)

    def collect_stats(self, enabled: bool = True, reset: bool = True) -> None:
        if reset:
            self._model.reset_stats()
        self._model.set_stats(enabled)

    def sparsity(self) -> SparsityReport:
        """Per-layer sparsity, predicted sparsity and recall since statistics were switched on."""
        return SparsityReport(self.sparse, self._model.stats())

    def activation_counts(self) -> np.ndarray:
        """Since statistics were switched on: for each layer and FFN neuron, the number of tokens
        in which its activated gate was non-zero, shape (n_layer, n_ff), int64. Counted in every
        mode (predictor mode computes the true gate while statistics are on). With
        ``sparsity().n_tokens`` this is each neuron's activation frequency, what
        ``prosparse-reorder`` sorts the neurons by."""
        return self._model.neuron_counts()

    # --- text <-> tokens -----------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of text; add_bos None follows the file; special: parse <|...|> tokens."""
        return self._require_tokenizer().encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._require_tokenizer().decode(list(tokens))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt)

    # --- evaluation ----------------------------------------------------------------------
    def evaluate(self, tokens: Sequence[int], sequential: bool = False) -> np.ndarray:
        """Logits (len(tokens), n_vocab) for every position of tokens, evaluated from position 0.
        Batched by default (prompt batches always run the dense FFN); ``sequential=True`` feeds
        one token at a time through the decode path, so the sparse mode applies (slower)."""
        if sequential:
            return np.stack(list(self.decode_steps(tokens)))
        tokens = self._check_prompt(tokens)
        self._cached = []
        logits = self._model.eval(tokens, 0, all_logits=True)
        self._cached = list(tokens)
        return logits

    def decode_steps(self, tokens: Sequence[int]) -> Iterator[np.ndarray]:
        """Yields the logits after each token, each token evaluated as its own decode step from
        position 0 (so the sparse mode and statistics apply per token, as in generation)."""
        tokens = self._check_prompt(tokens)
        self._cached = []
        for token in tokens:
            yield self._step(token)

    def _check_prompt(self, tokens: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("the prompt is empty: give at least one token")
        if len(tokens) > self.n_ctx:
            raise ValueError(f"the prompt is {len(tokens)} tokens, longer than the context "
                             f"(n_ctx = {self.n_ctx}); shorten it or raise n_ctx (-c)")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")
        return tokens

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        """Logits after tokens, reusing the cached prefix (chat turns re-send the history).

        The last token is always evaluated alone, as a decode step, after the rest went through
        the prompt batch: so a prompt sent again gets the same logits, to the bit, whether its
        prefix comes from the cache or not, and a seeded sample repeats. (Were the last token in
        the batch, a fresh run would round it otherwise than a cached one: the batch's integer
        GEMM sums in another order than the decode path's dots, and 8-bit activations turn such
        last-bit differences into SmolLM2 logits up to ~1 apart.) It also puts the first sampled
        token through the sparse mode, as every later one; prompt batches run the dense FFN."""
        common = 0
        limit = min(len(self._cached), len(tokens) - 1)   # re-evaluate at least the last token
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        self._cached = self._cached[:common]
        if common < len(tokens) - 1:
            self._model.eval(tokens[common:-1], common, logits=False)
            self._cached = tokens[:-1]
        return self._step(tokens[-1])

    def _step(self, token: int) -> np.ndarray:
        logits = self._model.eval([token], len(self._cached))
        self._cached.append(token)
        return logits

    # --- generation ----------------------------------------------------------------------
    def generate_tokens(self, prompt: Sequence[int], max_tokens: int = 256, *, ignore_eos: bool = False,
                        seed: int | None = None, **sampling) -> Iterator[int]:
        """Yields generated token ids. Sampling keywords as SamplingParams (temperature=0: greedy).
        Stops at an end-of-generation token (unless ignore_eos), max_tokens (< 0: no limit) or a
        full context. ``self.timings`` describes the run when the iterator is exhausted."""
        tokens = self._check_prompt(prompt)
        params = SamplingParams(**sampling)
        seed = seed if seed is not None else self.seed
        sampler = Sampler(params, seed=seed)
        self.seed = sampler.seed
        t = self.timings = Timings(load_ms=self.timings.load_ms, prompt_tokens=len(tokens))
        start = time.perf_counter()
        logits = self._prefill(tokens)
        t.prompt_ms = (time.perf_counter() - start) * 1000.0
        history = list(tokens)
        n_generated = 0
        try:
            while max_tokens != 0:
                s0 = time.perf_counter()
                try:
                    token = sampler.sample(logits, history)
                except NonFiniteLogits as e:
                    raise ValueError(f"{self.path}: {e} at position {len(history) - 1} (are there inf or "
                                     f"NaN values among the file's weights?)") from e
                t.sample_ms += (time.perf_counter() - s0) * 1000.0
                if not ignore_eos and self.tokenizer is not None and self.tokenizer.is_eog(token):
                    t.stop_reason = "eos"
                    return
                n_generated += 1
                history.append(token)
                yield token
                if 0 <= max_tokens <= n_generated:
                    break
                if len(self._cached) >= self.n_ctx:
                    t.stop_reason = "context"
                    return
                e0 = time.perf_counter()
                logits = self._step(token)
                t.eval_ms += (time.perf_counter() - e0) * 1000.0
                t.eval_tokens += 1
            t.stop_reason = "length"
        finally:
            t.total_ms = (time.perf_counter() - start) * 1000.0

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, stop: str | Sequence[str] | None = None, stream: bool = False,
                 seed: int | None = None, ignore_eos: bool = False, add_bos: bool | None = None):
        """Continues prompt (text, or token ids). Returns the generated text, or with
        stream=True an iterator of text pieces that never split a UTF-8 character. Generation
        ends at EOS, at max_tokens, when the context is full, or before the first stop string."""
        tokenizer = self._require_tokenizer()
        tokens = self.tokenize(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        ids = self.generate_tokens(tokens, max_tokens, ignore_eos=ignore_eos, seed=seed,
                                   temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n)
        pieces = _text_pieces(ids, tokenizer, stops, self._mark_stop)
        return pieces if stream else "".join(pieces)

    def _mark_stop(self, reason: str) -> None:
        self.timings.stop_reason = reason

    def chat(self, messages: list[dict], **kwargs):
        """generate() on the chat template applied to messages ([{"role": ..., "content": ...}])."""
        return self.generate(self.apply_chat_template(messages), **kwargs)

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        model = getattr(self, "_model", None)
        if model is not None:
            model.close()
            self._model = None
        self._gguf.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text_pieces(ids: Iterator[int], tokenizer, stops: list[str], on_stop) -> Iterator[str]:
    """Detokenises ids incrementally; holds back text that could begin a stop string."""
    from .tokenizer import StreamDecoder
    decoder = StreamDecoder(tokenizer)
    pending = ""
    try:
        for token in ids:
            pending += decoder.feed(token)
            if not stops:
                if pending:
                    yield pending
                    pending = ""
                continue
            cut = _first_stop(pending, stops)
            if cut >= 0:
                if cut > 0:
                    yield pending[:cut]
                on_stop("stop")
                return
            keep = _longest_stop_prefix_suffix(pending, stops)
            if len(pending) > keep:
                yield pending[:len(pending) - keep]
                pending = pending[len(pending) - keep:]
        pending += decoder.flush()
        if stops:
            cut = _first_stop(pending, stops)
            if cut >= 0:
                pending = pending[:cut]
                on_stop("stop")
        if pending:
            yield pending
    finally:
        ids.close()


def _first_stop(text: str, stops: list[str]) -> int:
    """Where the earliest stop string begins in text, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
