"""The tokenizer a GGUF describes, in pure Python, with llama.cpp's semantics (src/llama-vocab.cpp).

Two models:
- ``gpt2``: byte-level BPE. Text is cut into words by the pre-tokenizer regexes that
  ``tokenizer.ggml.pre`` names (applied one after another, each to the pieces of the last, keeping the
  text between matches as pieces too), each word is spelled in GPT-2's byte alphabet and merged by
  rank (lowest first, leftmost on ties). Words are cached, so running text costs a dict lookup per word.
- ``llama``: SentencePiece BPE. Spaces become U+2581 (▁), a ▁ is put in front of the text (and after
  each special token), then adjacent symbols are merged best score first, leftmost on ties, and only
  when the merged text is itself a token. Symbols that are no token fall back to <0xNN> byte tokens.

Before either, control, user-defined and unknown tokens are cut out of the text as whole strings,
longest first (control and unknown ones only when ``parse_special``).

Decoding is the exact inverse of encoding, where llama.cpp's detokenizer is not: no clean-up of
spaces before punctuation, and the SentencePiece ▁ prefix is taken off wherever encoding put one
(llama.cpp only strips it at the very start).
"""

from __future__ import annotations

import codecs
import functools
import heapq
import warnings
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

import regex

from .constants import (
    KEY_ADD_BOS,
    KEY_ADD_EOS,
    KEY_ADD_SPACE_PREFIX,
    KEY_BOS_ID,
    KEY_CHAT_TEMPLATE,
    KEY_EOM_ID,
    KEY_EOS_ID,
    KEY_EOT_ID,
    KEY_MERGES,
    KEY_PAD_ID,
    KEY_SCORES,
    KEY_TOKEN_TYPE,
    KEY_TOKENIZER_MODEL,
    KEY_TOKENIZER_PRE,
    KEY_TOKENS,
    KEY_UNK_ID,
)
from .gguf_file import Metadata

MODEL_BPE = "gpt2"
MODEL_SPM = "llama"

# Distinct words kept per tokenizer; a few MB of English text has well under this many.
_WORD_CACHE_SIZE = 1 << 17

SPM_SPACE = "\u2581"  # ▁, SentencePiece's visible space


class TokenType(IntEnum):
    """``tokenizer.ggml.token_type`` values (llama.cpp's llama_token_type; gguf-py's TokenType,
    copied so that running a model does not import gguf-py)."""
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Tokens cut out of the text before the model runs. Control and unknown ones only with
# parse_special; user-defined ones always (llama.cpp and HF tokenizers agree on that).
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN})
_HIDDEN_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})  # rendered as b"" unless asked for

# Texts llama.cpp treats as end of generation in any vocabulary (it finds them by text, because
# converters rarely record them), including its FIM pad / repo / file-separator tokens.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
})


# ---------------------------------------------------------------------------------------------
# GPT-2's byte alphabet: every byte is spelled as one printable character
# ---------------------------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """Character for each byte 0..255: printable Latin-1 bytes stand for themselves, the rest are
    moved to U+0100 and up (GPT-2's bytes_to_unicode)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    for n, b in enumerate(shifted):
        chars[b] = chr(0x100 + n)
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}
# str.translate table: Latin-1-decoded bytes -> byte-alphabet characters
_LATIN1_TO_BYTE_CHARS = {b: c for b, c in enumerate(_BYTE_CHARS)}


def _spell_bytes(word: str) -> str:
    return word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHARS)


def _unspell_bytes(text: str) -> bytes:
    """Bytes of a byte-level token. A character outside the alphabet (a mislabelled added token)
    contributes its own UTF-8."""
    try:
        return bytes(map(_CHAR_TO_BYTE.__getitem__, text))
    except KeyError:
        return b"".join(bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode() for c in text)


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers (llama.cpp's table; a name in tokenizer.ggml.pre selects a row)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]      # applied in turn, each to the pieces the previous one left
    ignore_merges: bool = False   # a word that is itself a token is taken whole (llama3, tekken)
    add_bos: bool = False         # BOS default when the file does not say (KEY_ADD_BOS)


# GPT-2's split. llama.cpp drops its final "|\s+" and keeps unmatched text as pieces instead; we
# keep it: the only text it matches is one whitespace character before a non-space, which is a
# piece of its own either way.
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_RE_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_LLAMA3 = (_RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = _RE_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_RE_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# deepseek-llm's letters: ASCII and the cased letters of the other scripts (llama.cpp spells the
# ranges out; escaped here so no editor can normalise a look-alike such as U+212A KELVIN SIGN).
_RE_DEEPSEEK_LETTERS = (
    r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    r"\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    r"\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    r"\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    r"\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    r"\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    r"\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    r"\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    r"\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    r"\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    r"\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    r"\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    r"\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)


def _cased_words(suffix: str = "") -> str:
    """tekken / gpt-4o words: capitals then lower case, or capitals only. llama.cpp spells \\p{Lu}
    and \\p{Ll} with lookaheads, which std::regex lacks; its groups are non-capturing here, which
    changes no match but lets split() return only whole matches."""
    lead, upper, lower = r"[^\r\n\p{L}\p{N}]?", r"(?:(?=[\p{L}])[^a-z])", r"(?:(?=[\p{L}])[^A-Z])"
    return f"{lead}{upper}*{lower}+{suffix}|{lead}{upper}+{lower}*{suffix}"


_PRE_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_PRE_GPT2 = PreTokenizer((_RE_GPT2,))
_PRE_LLAMA3 = PreTokenizer((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_DIGITS_GPT2 = PreTokenizer((r"\p{N}", _RE_GPT2))  # SmolLM, StarCoder: one token per digit
_PRE_QWEN2 = PreTokenizer((_RE_QWEN2,))

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _PRE_DEFAULT,
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _PRE_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _PRE_LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), PreTokenizer((_RE_LLAMA3,))),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _PRE_DIGITS_GPT2),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _PRE_QWEN2),
    "deepseek-llm": PreTokenizer((
        r"[\r\n]", _RE_DEEPSEEK_LETTERS,
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+\Z",  # llama.cpp's "$" (end of the piece; Python's "$" would also match before a final \n)
        _RE_CJK, r"\p{N}+")),
    "deepseek-coder": PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _RE_CJK, r"\p{N}")),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]")),
    "tekken": PreTokenizer((_cased_words() + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                            r"|\s+(?!\S)|\s+",), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4"), PreTokenizer((
        _cased_words(_RE_CONTRACTIONS + "?") + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",))),
    **dict.fromkeys(("bloom", "poro-chat", "gpt3-finnish"),
                    PreTokenizer((" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",))),
}


@functools.lru_cache(maxsize=None)
def _compile_splitters(regexes: tuple[str, ...]) -> tuple[regex.Pattern, ...]:
    # One capturing group around the whole pattern: split() then returns the text between
    # matches and the matches, in order, which is exactly llama.cpp's piece list.
    return tuple(regex.compile(f"({r})") for r in regexes)


def pre_tokenize(text: str, splitters: Iterable[regex.Pattern]) -> list[str]:
    """Words of ``text``: each splitter cuts every piece the previous one produced."""
    pieces = [text]
    for splitter in splitters:
        pieces = [p for piece in pieces for p in splitter.split(piece) if p]
    return pieces


# ---------------------------------------------------------------------------------------------
# The two merge loops (llama.cpp's llm_tokenizer_bpe_session / llm_tokenizer_spm_session)
# ---------------------------------------------------------------------------------------------

def _merge_symbols(symbols: list[str], priority) -> list[str]:
    """Merge adjacent symbols while ``priority(left, right)`` gives a key; lowest key first, the
    leftmost pair on ties. Heap plus linked list: O(n log n) even for a 10,000-space word."""
    n = len(symbols)
    if n < 2:
        return symbols
    nxt = [*range(1, n), -1]
    prv = [*range(-1, n - 1)]
    heap: list[tuple] = []

    def push(left: int, right: int) -> None:
        key = priority(symbols[left], symbols[right])
        if key is not None:
            heapq.heappush(heap, (key, left, right, len(symbols[left]) + len(symbols[right])))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        a, b = symbols[left], symbols[right]
        # Stale entry: symbols only grow or empty, so an unchanged total length means unchanged.
        if not a or not b or len(a) + len(b) != size:
            continue
        symbols[left], symbols[right] = a + b, ""
        after = nxt[left] = nxt[right]
        if after != -1:
            prv[after] = left
            push(left, after)
        if prv[left] != -1:
            push(prv[left], left)
    return [s for s in symbols if s]


class _MergeRanks:
    """The rank of each merge ``"left right"``, stored by the token the pair makes: ``rank[t]``
    and ``left_len[t]`` (-1: no merge makes t). The rare further merges that make an already
    made token from another split go to ``extra`` ((t, len(left)) -> rank). For a 49k
    vocabulary: two int32 arrays, 0.4 MB, where a dict keyed by the merge strings took ~8 MB.
    A pair listed twice keeps its last rank."""

    def __init__(self, merges: Iterable[str], vocab: dict[str, int], source: str):
        self._vocab = vocab
        self.rank = array("i", [-1]) * len(vocab)
        self.left_len = array("i", [-1]) * len(vocab)
        self.extra: dict[tuple[int, int], int] = {}
        for rank, merge in enumerate(merges):
            cut = merge.find(" ", 1)  # from 1: llama.cpp allows a left half that is a space
            left, right = merge[:cut], merge[cut + 1:]
            token = vocab.get(left + right) if cut > 0 else None
            if token is None or left not in vocab or right not in vocab:
                raise ValueError(
                    f"{source}: {KEY_MERGES}[{rank}] = {merge!r} is not two tokens of "
                    f"{KEY_TOKENS} whose join is a token too; the vocabulary and merges do not belong "
                    "together: re-convert the model")
            if self.left_len[token] in (-1, cut):
                self.rank[token], self.left_len[token] = rank, cut
            else:
                self.extra[token, cut] = rank

    def get(self, left: str, right: str) -> int | None:
        """Rank of merging ``left`` and ``right``, None when no merge joins them."""
        token = self._vocab.get(left + right)
        if token is None:
            return None
        if self.left_len[token] == len(left):
            return self.rank[token]
        return self.extra.get((token, len(left))) if self.extra else None


class _ByteLevelBPE:
    """``gpt2``: pre-tokenize, spell in the byte alphabet, merge by rank."""

    def __init__(self, vocab: dict[str, int], merges: Iterable[str], pre: PreTokenizer, source: str):
        self._vocab = vocab
        self._ranks = _MergeRanks(merges, vocab, source)
        self._splitters = _compile_splitters(pre.regexes)
        self._ignore_merges = pre.ignore_merges
        self._encode_word = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._encode_word_uncached)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        extend, encode_word = ids.extend, self._encode_word
        for word in pre_tokenize(text, self._splitters):
            extend(encode_word(word))
        return ids

    def _encode_word_uncached(self, word: str) -> tuple[int, ...]:
        vocab = self._vocab
        spelled = _spell_bytes(word)
        if self._ignore_merges and spelled in vocab:
            return (vocab[spelled],)
        symbols = _merge_symbols(list(spelled), self._ranks.get)
        # Merged symbols are tokens (checked with the merges); a byte the vocabulary lacks is
        # dropped, as llama.cpp and HF do (only bytes UTF-8 never produces are ever missing).
        return tuple(vocab[s] for s in symbols if s in vocab)

    def piece(self, text: str) -> bytes:
        return _unspell_bytes(text)


_SPM_WORDS = regex.compile(f"{SPM_SPACE}*[^{SPM_SPACE}]+|{SPM_SPACE}+")  # ▁s, then the word they lead


class _SentencePieceBPE:
    """``llama``: merge best score first, only into existing tokens; byte fallback for the rest."""

    def __init__(self, vocab: dict[str, int], scores: array, byte_ids: dict[int, int],
                 unk_id: int | None):
        self._vocab = vocab
        self._scores = scores
        self._byte_ids = byte_ids
        self._unk_id = unk_id
        # Characters that some token holds right before a ▁: text may be cut in front of any
        # other ▁ without changing the result, since no merge can ever cross that point.
        self._joins_space = {t[i - 1] for t in vocab for i in range(1, len(t)) if t[i] == SPM_SPACE}
        self._encode_segment = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._encode_segment_uncached)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment in self._segments(text.replace(" ", SPM_SPACE)):
            ids.extend(self._encode_segment(segment))
        return ids

    def _segments(self, text: str) -> list[str]:
        segments: list[str] = []
        for part in _SPM_WORDS.findall(text):
            if segments and segments[-1][-1] in self._joins_space:
                segments[-1] += part
            else:
                segments.append(part)
        return segments

    def _score(self, left: str, right: str) -> float | None:
        token = self._vocab.get(left + right)
        return None if token is None else -self._scores[token]

    def _encode_segment_uncached(self, segment: str) -> tuple[int, ...]:
        ids = []
        for symbol in _merge_symbols(list(segment), self._score):
            token = self._vocab.get(symbol)
            if token is not None:
                ids.append(token)
            elif self._byte_ids:  # byte fallback; <unk> for a byte token the vocabulary lacks
                fallback = (self._byte_ids.get(b, self._unk_id) for b in symbol.encode("utf-8"))
                ids.extend(t for t in fallback if t is not None)
            elif self._unk_id is not None:
                ids.append(self._unk_id)
        return tuple(ids)

    def piece(self, text: str) -> bytes:
        return text.replace(SPM_SPACE, " ").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

def _required(meta: dict, key: str, source: str, what: str, one_at_a_time: bool = False):
    """``meta[key]``; ``one_at_a_time``: an iterable that reads a GGUF file's string array as it
    goes, for tables built from it and then dropped (the BPE merges)."""
    if key not in meta:
        raise ValueError(f"{source}: metadata key {key!r} is missing: {what}")
    if one_at_a_time and isinstance(meta, Metadata):
        return meta.iter_strings(key)
    return meta[key]


_BYTE_TOKEN = regex.compile(r"<0x[0-9A-Fa-f]{2}>")


def _vocabulary(meta: dict, source: str) -> tuple[list[str], dict[str, int], list[int]]:
    """Token texts, text -> id, and token types (all normal when the file gives none)."""
    tokens = list(_required(meta, KEY_TOKENS, source, "the file has no vocabulary; re-convert it"))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise ValueError(f"{source}: {KEY_TOKENS} has {dup!r} twice (ids {tokens.index(dup)} and "
                         f"{vocab[dup]}); re-convert the model")
    types = [int(t) for t in meta.get(KEY_TOKEN_TYPE, [TokenType.NORMAL] * len(tokens))]
    if len(types) < len(tokens):
        raise ValueError(f"{source}: {KEY_TOKEN_TYPE} has {len(types)} entries for {len(tokens)} "
                         "tokens; re-convert the model")
    for i, t in enumerate(types[:len(tokens)]):
        if t == TokenType.BYTE and not _BYTE_TOKEN.fullmatch(tokens[i]):
            raise ValueError(f"{source}: {KEY_TOKENS}[{i}] = {tokens[i]!r} has {KEY_TOKEN_TYPE} "
                             f"{TokenType.BYTE} (a byte), but a byte token's text is <0xXX>")
    return tokens, vocab, types


def _byte_level_model(meta: dict, vocab: dict[str, int], source: str) -> tuple[_ByteLevelBPE, PreTokenizer]:
    pre_name = meta.get(KEY_TOKENIZER_PRE, "default")
    if pre_name not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: {KEY_TOKENIZER_PRE} = {pre_name!r} is not a pre-tokenizer we know; "
                         f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    merges = _required(meta, KEY_MERGES, source, "a gpt2 (BPE) tokenizer needs its merges", one_at_a_time=True)
    pre = PRE_TOKENIZERS[pre_name]
    return _ByteLevelBPE(vocab, merges, pre, source), pre


def _sentencepiece_model(meta: dict, tokens: list[str], vocab: dict[str, int], types: list[int],
                         unk_id: int | None, source: str) -> _SentencePieceBPE:
    what = "a llama (SentencePiece) tokenizer needs token scores"
    scores = array("d", map(float, _required(meta, KEY_SCORES, source, what)))
    if len(scores) < len(tokens):
        raise ValueError(f"{source}: {KEY_SCORES} has {len(scores)} entries for {len(tokens)} tokens")
    byte_ids = {int(tokens[i][3:5], 16): i for i, t in enumerate(types) if t == TokenType.BYTE}
    return _SentencePieceBPE(vocab, scores, byte_ids, unk_id)


def _token_id(meta: dict, key: str, default: int | None, n_vocab: int, source: str) -> int | None:
    """The id under ``key``. Like llama.cpp, an id outside the vocabulary (converters do write
    padding ids past the end) is ignored with a warning and the default kept."""
    token = meta.get(key)
    if token is not None and not 0 <= token < n_vocab:
        warnings.warn(f"{source}: {key} = {token} is outside the vocabulary (0..{n_vocab - 1}); "
                      f"using {default}", stacklevel=4)
        token = None
    return default if token is None else int(token)


def _eog_ids(tokens: list[str], types: list[int], special_ids: Iterable[int | None]) -> set[int]:
    """End-of-generation ids: the given ones and the tokens llama.cpp knows by text, which it
    makes control tokens whatever the file says (``types`` is updated)."""
    eog = {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    for i in eog:
        types[i] = TokenType.CONTROL
    return eog | {i for i in special_ids if i is not None}


class Tokenizer:
    """Encode and decode text the way llama.cpp does for the same GGUF metadata."""

    def __init__(self, tokens: list[str], token_types: list[int], model, *, bos_id, eos_id,
                 unk_id, pad_id, eog_ids, add_bos: bool, add_eos: bool, add_space_prefix: bool,
                 chat_template: str | None, source: str):
        self.tokens = tokens
        self.n_vocab = len(tokens)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.source = source
        self._types = token_types
        self._model = model
        self._eog = frozenset(eog_ids)
        self._add_space_prefix = add_space_prefix
        # longest first, so "<|im_start|>" wins over any special token inside it
        self._special = sorted((i for i, t in enumerate(token_types) if t in _SPECIAL_TYPES),
                               key=lambda i: (-len(tokens[i]), i))
        self._pieces: dict[int, bytes] = {}   # token -> its bytes, for the tokens decoded so far

    # --- loading --------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: dict, source: str = "<gguf>") -> "Tokenizer":
        """Build from GGUF metadata (key -> plain value). Raises ValueError naming ``source`` and
        the key when the metadata does not describe a tokenizer we can run."""
        model_name = _required(meta, KEY_TOKENIZER_MODEL, source, "the file has no tokenizer")
        tokens, vocab, types = _vocabulary(meta, source)
        n_vocab = len(tokens)
        if model_name == MODEL_BPE:
            model, pre = _byte_level_model(meta, vocab, source)
            default_ids, default_add_bos = {}, pre.add_bos
            add_space_prefix = False  # llama.cpp's BPE encoding never adds it, whatever the key says
        elif model_name == MODEL_SPM:
            # llama's ids: llama.cpp's defaults for a file that does not say
            default_ids, default_add_bos = {KEY_BOS_ID: 1, KEY_EOS_ID: 2, KEY_UNK_ID: 0}, True
            unk_id = _token_id(meta, KEY_UNK_ID, 0, n_vocab, source)
            model = _sentencepiece_model(meta, tokens, vocab, types, unk_id, source)
            add_space_prefix = bool(meta.get(KEY_ADD_SPACE_PREFIX, True))
        else:
            raise ValueError(f"{source}: {KEY_TOKENIZER_MODEL} = {model_name!r} is not supported; "
                             f"supported: {MODEL_BPE!r} (byte-level BPE), {MODEL_SPM!r} (SentencePiece)")

        ids = {key: _token_id(meta, key, default_ids.get(key), n_vocab, source)
               for key in (KEY_BOS_ID, KEY_EOS_ID, KEY_UNK_ID, KEY_PAD_ID, KEY_EOT_ID, KEY_EOM_ID)}
        add_bos = bool(meta.get(KEY_ADD_BOS, default_add_bos))
        add_eos = bool(meta.get(KEY_ADD_EOS, False))
        for flag, flag_key, id_key in ((add_bos, KEY_ADD_BOS, KEY_BOS_ID),
                                       (add_eos, KEY_ADD_EOS, KEY_EOS_ID)):
            if flag and ids[id_key] is None:
                raise ValueError(f"{source}: {flag_key} is true but {id_key} is not set; fix the metadata")
        eog = _eog_ids(tokens, types, (ids[KEY_EOS_ID], ids[KEY_EOT_ID], ids[KEY_EOM_ID]))
        return cls(tokens, types, model, bos_id=ids[KEY_BOS_ID], eos_id=ids[KEY_EOS_ID],
                   unk_id=ids[KEY_UNK_ID], pad_id=ids[KEY_PAD_ID], eog_ids=eog, add_bos=add_bos,
                   add_eos=add_eos, add_space_prefix=add_space_prefix,
                   chat_template=meta.get(KEY_CHAT_TEMPLATE), source=source)

    # --- encoding -------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of ``text``. ``add_bos`` / ``add_eos``: None = the file's default.
        ``parse_special``: control tokens written in the text (``<|im_start|>``) become their id."""
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            ids.append(self._require(self.bos_id, KEY_BOS_ID))
        after_special = True
        for fragment in self._split_special(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
            else:
                if self._add_space_prefix and after_special:
                    fragment = " " + fragment
                ids.extend(self._model.encode(fragment))
                after_special = False
        if self.add_eos if add_eos is None else add_eos:
            ids.append(self._require(self.eos_id, KEY_EOS_ID))
        return ids

    def _require(self, token: int | None, key: str) -> int:
        if token is None:
            raise ValueError(f"{self.source}: {key} is not set, so that token cannot be added")
        return token

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """``text`` as plain-text pieces and special-token ids, in order. Like llama.cpp, each special
        token (longest first) cuts the text pieces left by the ones before it."""
        fragments: list[str | int] = [text] if text else []
        for token in self._special:
            if not parse_special and self._types[token] in _HIDDEN_TYPES:
                continue
            needle = self.tokens[token]
            if not any(isinstance(f, str) and needle in f for f in fragments):
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or needle not in fragment:
                    cut.append(fragment)
                    continue
                for n, part in enumerate(fragment.split(needle)):
                    if n:
                        cut.append(token)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments

    # --- decoding -------------------------------------------------------------------------

    def _render(self, token: int) -> bytes:
        """Bytes of ``token`` with special tokens shown as their text (llama.cpp's piece cache)."""
        kind, text = self._types[token], self.tokens[token]
        if kind in _SPECIAL_TYPES:
            return text.encode("utf-8")
        if kind == TokenType.NORMAL:
            return self._model.piece(text)
        if kind == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined

    def token_bytes(self, id: int, special: bool = False) -> bytes:
        """Raw bytes ``id`` contributes to the output. Control and unknown tokens give b"" unless
        ``special`` (then their text, like llama.cpp's ``token_to_piece(..., special=true)``)."""
        if not 0 <= id < self.n_vocab:
            raise ValueError(f"{self.source}: token id {id} is outside the vocabulary "
                             f"(0..{self.n_vocab - 1})")
        if not special and self._types[id] in _HIDDEN_TYPES:
            return b""
        piece = self._pieces.get(id)
        if piece is None:
            piece = self._pieces[id] = self._render(id)
        return piece

    def is_special(self, id: int) -> bool:
        """Control, user-defined or unknown: a token cut out of the text whole, never by merging."""
        return self._types[id] in _SPECIAL_TYPES

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``decode(encode(text)) == text``. Invalid UTF-8 becomes U+FFFD."""
        stream = StreamDecoder(self, skip_special=skip_special)
        return "".join(stream.feed(i) for i in ids) + stream.flush()

    def is_eog(self, id: int) -> bool:
        """End of generation: EOS, EOT, EOM, and the tokens llama.cpp knows by text
        (<|im_end|>, <|endoftext|>, <|eot_id|>, ...)."""
        return id in self._eog

    # --- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` from the file's template (ChatML if it has none)."""
        named = (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                 ("unk_token", self.unk_id), ("pad_token", self.pad_id))
        special = {name: self.tokens[i] for name, i in named if i is not None}
        import jinja2   # (~2 MB) only when a template is rendered

        from .chat import render_chat
        try:
            return render_chat(self.chat_template, messages, add_generation_prompt, **special)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{self.source}: {KEY_CHAT_TEMPLATE} is not a valid Jinja template "
                             f"(line {e.lineno}: {e.message})") from e
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
            # the template's own raise_exception(...), or a template that fails on these messages
            what = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"{self.source}: the chat template ({KEY_CHAT_TEMPLATE}) failed: {what}") from e


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the text that is complete so far, never half a
    UTF-8 character; ``flush()`` returns the rest. Concatenated it equals ``Tokenizer.decode``."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # SentencePiece: encode put a space in front of the text and after each special token;
        # take it off again
        self._strip_space = tokenizer._add_space_prefix

    def feed(self, id: int) -> str:
        tokenizer = self._tokenizer
        piece = tokenizer.token_bytes(id, special=self._special)
        if tokenizer._add_space_prefix:
            if tokenizer.is_special(id):
                self._strip_space = True
            else:
                if self._strip_space and piece.startswith(b" "):
                    piece = piece[1:]
                self._strip_space = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
