"""prosparse.tokenizer against the references: HF tokenizers for SmolLM2's byte-level BPE (its
GGUF), the sentencepiece library for a SentencePiece vocabulary trained here; the chat template
against transformers' apply_chat_template."""

from __future__ import annotations

import functools
import glob
import importlib
import inspect

import jinja2
import pytest

from prosparse import constants as C
from prosparse.chat import CHATML_TEMPLATE
from prosparse.gguf_file import GGUFFile
from prosparse.tokenizer import PRE_TOKENIZERS, StreamDecoder, Tokenizer, pre_tokenize
from prosparse.tokenizer import _compile_splitters, _merge_symbols, _spell_bytes
from smollm2 import smollm2_gguf

CORPUS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t\n ", "Hello", " Hello", "Hello ", "  Hello  world  ",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'D SAY IT'S OK",
    "Café naïve résumé façade Ångström — “quotes” and ‘single’ … ellipsis",
    "e\u0301 combining accent, A\u030a ring",
    "你好，世界！这是一个测试。日本語のテキストとカタカナ。한국어 텍스트입니다",
    "مرحبا بالعالم! هذا اختبار. שלום עולם \u200fRTL mark\u200e",
    "Россия и Україна, Ελληνικά γράμματα, हिन्दी पाठ, ภาษาไทย",
    "3.14159 and 1,000,000 and 12345678901234567890 and 0x1F 1e-10 -42 +7",
    "Phone: +1 (555) 123-4567; 2024-01-22T12:12:53Z",
    "   leading spaces", "trailing spaces   ", "tabs\tand\tnewlines\r\nmixed\r\n",
    "multiple     internal      spaces\n\n\n\nand blank lines\n \n \n",
    "def foo(x):\n    return x ** 2  # square\n\nclass Bar:\n\tpass\n",
    '#include <stdio.h>\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    "if (a != b && c <= d || e >= f) { x += 1; y -= 2; z *= 3; } // comment /* block */",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and family 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 🧑🏿‍💻",
    "zero\u200bwidth, non\u00a0breaking, thin\u2009space, ideographic\u3000space",
    "separators\x1c\x1e\x1f, \x85 NEL, \u2028 line \u2029 paragraph, \x0b\x0c feeds",
    "control \x00 \x07 \x7f chars",
    "'s 's 't 're 've 'm 'll 'd ''' \"\"\" ``` ~~~",
    "URL https://example.com/path?query=1&b=2#frag email a.b@c.de",
    "Mixed123Numbers456 and ½ ¾ ² ³ ① Ⅷ ٣ ४",
    "a" * 60,
    " " * 100 + "x" + "\n" * 50,
    "\U0001F600" * 5 + "\U00010400\U0001D11E",
]
WITH_SPECIAL = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|><|im_start|>",
    "<|im_start|><|im_start|> <|im_end|> nested <|im_<|im_end|>start|>",
]
EMOJI = "family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, coder 🧑🏿‍💻, 你好 and é"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@functools.lru_cache(maxsize=1)
def real_text() -> str:
    """A few hundred KB of prose and code that is on every machine: licences and stdlib sources."""
    texts = [open(path, encoding="utf-8", errors="replace").read()
             for path in sorted(glob.glob("/usr/share/common-licenses/*"))]
    for module in ("argparse", "textwrap", "difflib", "json.decoder", "email.message", "calendar",
                   "fractions", "tokenize", "dataclasses", "pathlib"):
        texts.append(inspect.getsource(importlib.import_module(module)))
    return "".join(texts)


def read_metadata(path) -> dict:
    """The runtime's own reader, so the tokenizer sees what it gets in use (numpy arrays included)."""
    with GGUFFile(path) as gguf:
        return gguf.metadata


# ---------------------------------------------------------------------------------------------
# SmolLM2: byte-level BPE, pre-tokenizer "smollm", against HF tokenizers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_gguf():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def smol(smol_gguf) -> Tokenizer:
    return Tokenizer.from_metadata(read_metadata(smol_gguf), source=smol_gguf.name)


@pytest.fixture(scope="module")
def smol_hf(smol_gguf):
    # transformers' GGUF loader ignores tokenizer.ggml.pre = "smollm"; load_tokenizer restores it
    from prosparse.training.model_io import load_tokenizer
    return load_tokenizer(smol_gguf)


@pytest.mark.smollm2
def test_smollm2_vocabulary(smol):
    assert smol.n_vocab == 49152
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    # <|endoftext|>, <|im_end|> and, as in llama.cpp, the FIM repo token <reponame>
    assert [i for i in range(smol.n_vocab) if smol.is_eog(i)] == [0, 2, 4]


@pytest.mark.smollm2
@pytest.mark.parametrize("text", CORPUS + WITH_SPECIAL)
def test_smollm2_ids_match_hf(smol, smol_hf, text):
    assert smol.encode(text) == smol_hf.encode(text, add_special_tokens=False)


@pytest.mark.smollm2
def test_smollm2_ids_match_hf_on_real_text(smol, smol_hf):
    text = real_text()
    assert smol.encode(text) == smol_hf.encode(text, add_special_tokens=False)


@pytest.mark.smollm2
@pytest.mark.parametrize("text", WITH_SPECIAL)
def test_smollm2_special_tokens_as_text(smol, smol_hf, text):
    ids = smol.encode(text, parse_special=False)
    assert ids == smol_hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert not any(smol.is_special(i) for i in ids)


@pytest.mark.smollm2
def test_smollm2_round_trip(smol):
    for text in CORPUS + WITH_SPECIAL + [real_text()]:
        assert smol.decode(smol.encode(text)) == text


@pytest.mark.smollm2
def test_smollm2_drops_bytes_the_vocabulary_lacks(smol, smol_hf):
    # 0x1D is not in SmolLM2's byte alphabet: llama.cpp and HF both drop it
    ids = smol.encode("a\x1db")
    assert ids == smol_hf.encode("a\x1db", add_special_tokens=False)
    assert smol.decode(ids) == "ab"


@pytest.mark.smollm2
def test_smollm2_token_bytes(smol):
    assert smol.token_bytes(2) == b""
    assert smol.token_bytes(2, special=True) == b"<|im_end|>"
    assert b"".join(smol.token_bytes(i) for i in smol.encode(" caf\u00e9")) == " café".encode()
    assert smol.decode(smol.encode("<|im_start|>hi"), skip_special=True) == "hi"


@pytest.mark.smollm2
def test_smollm2_stream_decoder_never_splits_a_character(smol):
    ids = smol.encode(EMOJI)
    # the test means something only if some token ends inside a character
    assert any(_is_partial_utf8(b"".join(smol.token_bytes(i) for i in ids[:n])) for n in range(len(ids)))
    stream = StreamDecoder(smol)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == smol.decode(ids) == EMOJI
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.smollm2
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["system", "default-system"])
def test_smollm2_chat_template_matches_hf(smol, smol_hf, messages):
    ours = smol.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == smol_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# SentencePiece BPE: a small vocabulary trained here, against the sentencepiece library
# ---------------------------------------------------------------------------------------------

USER_DEFINED = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A llama-2-style model: BPE, byte fallback, digits split, no normalisation, dummy prefix."""
    import sentencepiece

    work = tmp_path_factory.mktemp("spm")
    (work / "train.txt").write_text(real_text(), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(work / "train.txt"), model_prefix=str(work / "tokenizer"), model_type="bpe",
        vocab_size=600, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=1.0, user_defined_symbols=USER_DEFINED, max_sentence_length=1 << 20,
        minloglevel=2, num_threads=1)
    return work / "tokenizer.model"


@pytest.fixture(scope="module")
def sp(spm_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_model))


def spm_metadata(model_path) -> dict:
    """What llama.cpp's convert_hf_to_gguf writes for a SentencePiece vocabulary. The model file's
    piece types are GGUF's token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    pieces = proto.pieces
    return {
        C.KEY_TOKENIZER_MODEL: "llama",
        C.KEY_TOKENS: [p.piece for p in pieces],
        C.KEY_SCORES: [p.score for p in pieces],
        C.KEY_TOKEN_TYPE: [int(p.type) for p in pieces],
        C.KEY_BOS_ID: proto.trainer_spec.bos_id,
        C.KEY_EOS_ID: proto.trainer_spec.eos_id,
        C.KEY_UNK_ID: proto.trainer_spec.unk_id,
        C.KEY_ADD_BOS: True,
        C.KEY_ADD_EOS: False,
        C.KEY_ADD_SPACE_PREFIX: proto.normalizer_spec.add_dummy_prefix,
    }


@pytest.fixture(scope="module")
def spm(spm_model) -> Tokenizer:
    return Tokenizer.from_metadata(spm_metadata(spm_model), source=spm_model.name)


@pytest.fixture(scope="module")
def spm_hf(spm_model):
    from transformers import LlamaTokenizer

    (spm_model.parent / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    return LlamaTokenizer.from_pretrained(spm_model.parent)


@pytest.mark.parametrize("text", CORPUS)
def test_spm_ids_match_sentencepiece(spm, sp, text):
    assert spm.encode(text, add_bos=False) == sp.encode(text)
    assert spm.encode(text) == [sp.bos_id()] + sp.encode(text)


def test_spm_ids_match_sentencepiece_and_hf_on_real_text(spm, sp, spm_hf):
    text = real_text()
    assert spm.encode(text, add_bos=False) == sp.encode(text) == spm_hf.encode(text, add_special_tokens=False)


# HF's Metaspace pre-tokenizer merges a leading run of spaces differently from sentencepiece
# (" " -> "▁" instead of "▁▁"), so HF is compared only where it agrees with its own reference.
@pytest.mark.parametrize("text", [t for t in CORPUS if t and not t[0].isspace()])
def test_spm_ids_match_hf(spm, spm_hf, text):
    assert spm.encode(text, add_bos=False) == spm_hf.encode(text, add_special_tokens=False)


def test_spm_byte_fallback(spm, sp):
    text = "日本 ✓ \U0001F600"  # none of these characters is in the 600-token vocabulary
    ids = spm.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert sum(spm.tokens[i].startswith("<0x") for i in ids) == len("日本✓\U0001F600".encode())


def test_spm_special_tokens_like_llama_cpp(spm):
    # llama.cpp cuts user-defined tokens out first and puts the ▁ prefix before every text
    # fragment after one (sentencepiece itself only prefixes the start of the text)
    start, end = (spm.tokens.index(t) for t in USER_DEFINED)
    user = spm.encode("user", add_bos=False)
    assert spm.encode("<|im_start|>user<|im_end|>", add_bos=False) == [start, *user, end]
    assert spm.encode("<|im_start|>user", parse_special=False, add_bos=False) == [start, *user]


@pytest.mark.parametrize("text", CORPUS + WITH_SPECIAL)
def test_spm_round_trip(spm, text):
    assert spm.decode(spm.encode(text, add_bos=False)) == text
    if text not in WITH_SPECIAL:  # skip_special would drop <|im_end|>, an end-of-generation token
        assert spm.decode(spm.encode(text), skip_special=True) == text


def test_spm_stream_decoder_with_byte_tokens(spm):
    ids = spm.encode(EMOJI)
    stream = StreamDecoder(spm)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == spm.decode(ids, skip_special=True) == EMOJI
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") > 10  # byte tokens held back until their character is whole


def test_spm_merge_across_a_space():
    """Text is cut before each ▁ for caching, except where a token holds a ▁ after another character."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "h", "e", "l", "o", "w", "r", "d", "o\u2581", "o\u2581w"]
    meta = {C.KEY_TOKENIZER_MODEL: "llama", C.KEY_TOKENS: tokens, C.KEY_SCORES: [0.0] * 11 + [-1.0, -2.0],
            C.KEY_TOKEN_TYPE: [2, 3, 3] + [1] * 10}
    tok = Tokenizer.from_metadata(meta)
    names = [tok.tokens[i] for i in tok.encode("hello world", add_bos=False)]
    assert names == ["\u2581", "h", "e", "l", "l", "o\u2581w", "o", "r", "l", "d"]


def test_spm_defaults_follow_llama_cpp(spm):
    assert (spm.bos_id, spm.eos_id, spm.add_bos) == (1, 2, True)
    assert spm.is_eog(2) and not spm.is_eog(1)


def _merge_by_rescanning(symbols: list[str], rank) -> list[str]:
    """llama.cpp's merge order spelled out: the lowest-ranked adjacent pair, leftmost on ties."""
    while True:
        pairs = [(rank(a, b), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            return symbols
        _, i = min(pairs)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


def test_merge_order_matches_rescanning():
    import random

    rng = random.Random(0)
    ranks = {}
    for _ in range(60):  # random merges over a tiny alphabet, ties and overlaps included
        a, b = rng.choice("abc") * rng.randint(1, 3), rng.choice("abc") * rng.randint(1, 2)
        ranks.setdefault((a, b), rng.randint(0, 20))
    rank = lambda a, b: ranks.get((a, b))  # noqa: E731
    for _ in range(300):
        word = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        assert _merge_symbols(list(word), rank) == _merge_by_rescanning(list(word), rank), word


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers against HF's splits with the original (tokenizer.json) regexes
# ---------------------------------------------------------------------------------------------

LLAMA3_ORIGINAL = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _hf_splitters():
    from tokenizers import Regex, pre_tokenizers as P

    byte_level = P.ByteLevel(add_prefix_space=False, use_regex=True)
    return {
        "gpt2": byte_level,
        "smollm": P.Sequence([P.Digits(individual_digits=True), byte_level]),
        "llama-bpe": P.Split(Regex(LLAMA3_ORIGINAL), behavior="isolated"),
        "qwen2": P.Split(Regex(LLAMA3_ORIGINAL.replace(r"\p{N}{1,3}", r"\p{N}")), behavior="isolated"),
    }


@pytest.mark.parametrize("name", ["gpt2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_matches_hf(name):
    hf = _hf_splitters()[name]
    byte_level = name in ("gpt2", "smollm")  # HF returns those pieces spelled in the byte alphabet
    splitters = _compile_splitters(PRE_TOKENIZERS[name].regexes)
    for text in CORPUS:
        ours = pre_tokenize(text, splitters)
        expected = [piece for piece, _ in hf.pre_tokenize_str(text)]
        assert ([_spell_bytes(p) for p in ours] if byte_level else ours) == expected, text


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_pre_tokenizer_keeps_every_character(name):
    splitters = _compile_splitters(PRE_TOKENIZERS[name].regexes)
    for text in CORPUS:
        assert "".join(pre_tokenize(text, splitters)) == text


# ---------------------------------------------------------------------------------------------
# Chat template without a model file
# ---------------------------------------------------------------------------------------------

def tiny_bpe_metadata(**overrides) -> dict:
    """A byte-level BPE vocabulary of a few tokens: enough to load and to break."""
    tokens = ["<|im_start|>", "<|im_end|>", "a", "b", "ab", "\u0120", "\u0120ab"]
    meta = {C.KEY_TOKENIZER_MODEL: "gpt2", C.KEY_TOKENIZER_PRE: "gpt2", C.KEY_TOKENS: tokens,
            C.KEY_TOKEN_TYPE: [3, 3, 1, 1, 1, 1, 1], C.KEY_MERGES: ["a b", "\u0120 ab"],
            C.KEY_BOS_ID: 0, C.KEY_EOS_ID: 1}
    meta.update(overrides)
    return meta


def test_tiny_bpe_merges():
    tok = Tokenizer.from_metadata(tiny_bpe_metadata())
    assert tok.encode("ab ab<|im_end|>") == [4, 6, 1]
    assert tok.decode([0, 4, 6, 1]) == "<|im_start|>ab ab<|im_end|>"


def test_llama3_takes_a_word_that_is_a_token_whole():
    meta = tiny_bpe_metadata(**{C.KEY_TOKENS: ["<|im_start|>", "<|im_end|>", "a", "b", "c", "ab", "abc"],
                                C.KEY_TOKEN_TYPE: [3, 3, 1, 1, 1, 1, 1], C.KEY_MERGES: ["a b"]})
    assert Tokenizer.from_metadata(meta).encode("abc") == [5, 4]  # gpt2: merges only
    llama3 = Tokenizer.from_metadata({**meta, C.KEY_TOKENIZER_PRE: "llama-bpe"})
    assert llama3.add_bos and llama3.encode("abc") == [0, 6]  # ignore_merges; BOS by default


def _abc_tokenizer(merges: list[str]) -> Tokenizer:
    tokens = ["<|im_start|>", "<|im_end|>", "a", "b", "c", "ab", "bc", "abc"]
    return Tokenizer.from_metadata(tiny_bpe_metadata(**{C.KEY_TOKENS: tokens, C.KEY_TOKEN_TYPE: [3, 3] + [1] * 6,
                                                        C.KEY_MERGES: merges}))


def test_a_token_made_by_two_merges_keeps_both():
    # "bc" merges first; "abc" is then made from a + bc, which only the rank-3 merge allows
    assert _abc_tokenizer(["b c", "ab c", "a b", "a bc"]).encode("abc") == [7]
    assert _abc_tokenizer(["b c", "ab c", "a b"]).encode("abc") == [2, 6]    # no "a bc": stop at a, bc
    assert _abc_tokenizer(["a b", "ab c", "b c"]).encode("abc") == [7]


def test_a_merge_listed_twice_keeps_its_last_rank():
    # as HF tokenizers do (llama.cpp keeps the first): "a b" ranks 2, after "b c"
    assert _abc_tokenizer(["a b", "b c", "a b"]).encode("abc") == [2, 6]
    assert _abc_tokenizer(["a b", "b c"]).encode("abc") == [5, 4]


def test_token_types_match_gguf_py():
    from gguf import TokenType as GGUFTokenType

    from prosparse.tokenizer import TokenType
    assert [(t.name, int(t)) for t in TokenType] == [(t.name, int(t)) for t in GGUFTokenType]


def test_chatml_fallback_without_template():
    tok = Tokenizer.from_metadata(tiny_bpe_metadata())
    assert tok.chat_template is None
    prompt = tok.apply_chat_template(CONVERSATION[1:2])
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=False).count("assistant") == 0
    assert CHATML_TEMPLATE.startswith("{%")


def test_template_generation_tag_renders_its_body():
    template = "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    tok = Tokenizer.from_metadata(tiny_bpe_metadata(**{C.KEY_CHAT_TEMPLATE: template}))
    assert tok.apply_chat_template(CONVERSATION[1:3]) == "[What is 2+2?][4]"


def test_template_sees_special_tokens_and_can_raise():
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                "{{ raise_exception('no tools') }}{% endif %}{{ m['content'] | tojson }}{% endfor %}")
    tok = Tokenizer.from_metadata(tiny_bpe_metadata(**{C.KEY_CHAT_TEMPLATE: template}), source="chat.gguf")
    assert tok.apply_chat_template([{"role": "user", "content": "<é>"}]) == '<|im_start|>"<é>"'
    with pytest.raises(ValueError, match="chat.gguf: the chat template .* failed: no tools") as error:
        tok.apply_chat_template([{"role": "tool", "content": ""}])
    assert isinstance(error.value.__cause__, jinja2.TemplateError)


@pytest.mark.parametrize("template, found", [
    ("{% for m in messages %}{{ m['content'] }}", "not a valid Jinja template"),   # no endfor
    ("{{ m['content'] !}}", "not a valid Jinja template"),
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "failed: TypeError"),
])
def test_broken_chat_template_names_file_and_key(template, found):
    tok = Tokenizer.from_metadata(tiny_bpe_metadata(**{C.KEY_CHAT_TEMPLATE: template}), source="chat.gguf")
    with pytest.raises(ValueError, match=f"chat.gguf: .*{found}") as error:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert C.KEY_CHAT_TEMPLATE in str(error.value)


# ---------------------------------------------------------------------------------------------
# Metadata that cannot work: ValueError naming the file and the key
# ---------------------------------------------------------------------------------------------

def _without(key: str) -> dict:
    meta = tiny_bpe_metadata()
    del meta[key]
    return meta


@pytest.mark.parametrize("meta, key", [
    (_without(C.KEY_TOKENS), C.KEY_TOKENS),
    (_without(C.KEY_TOKENIZER_MODEL), C.KEY_TOKENIZER_MODEL),
    (_without(C.KEY_MERGES), C.KEY_MERGES),
    (tiny_bpe_metadata(**{C.KEY_TOKENIZER_MODEL: "bert"}), C.KEY_TOKENIZER_MODEL),
    (tiny_bpe_metadata(**{C.KEY_TOKENIZER_PRE: "no-such-pre"}), C.KEY_TOKENIZER_PRE),
    (tiny_bpe_metadata(**{C.KEY_MERGES: ["a b", "x y"]}), C.KEY_MERGES),
    (tiny_bpe_metadata(**{C.KEY_MERGES: ["ab"]}), C.KEY_MERGES),
    (tiny_bpe_metadata(**{C.KEY_TOKENS: ["a", "a"], C.KEY_TOKEN_TYPE: [1, 1], C.KEY_MERGES: []}),
     C.KEY_TOKENS),
    (tiny_bpe_metadata(**{C.KEY_ADD_EOS: True, C.KEY_EOS_ID: None}), C.KEY_EOS_ID),
    (tiny_bpe_metadata(**{C.KEY_TOKENS: ["<|im_start|>", "<|im_end|>", "a", "b", "ab", "\u0120", "\u0120ab",
                                         "<0x\x00\x00>"],
                          C.KEY_TOKEN_TYPE: [3, 3, 1, 1, 1, 1, 1, 6]}), C.KEY_TOKENS),
], ids=["no-tokens", "no-model", "no-merges", "unknown-model", "unknown-pre", "merge-unknown-token",
        "merge-malformed", "duplicate-token", "add-eos-without-eos", "byte-token-not-hex"])
def test_bad_metadata_names_file_and_key(meta, key):
    with pytest.raises(ValueError, match="broken.gguf") as error:
        Tokenizer.from_metadata(meta, source="broken.gguf")
    assert key in str(error.value)


def test_out_of_range_special_id_is_ignored_with_a_warning():
    # llama.cpp keeps loading such files (converters write padding ids past the end)
    with pytest.warns(UserWarning, match=f"odd.gguf: {C.KEY_PAD_ID} = 99"):
        tok = Tokenizer.from_metadata(tiny_bpe_metadata(**{C.KEY_PAD_ID: 99}), source="odd.gguf")
    assert tok.pad_id is None
    with pytest.raises(ValueError, match="odd.gguf: token id 7 is outside"):
        tok.decode([7])
