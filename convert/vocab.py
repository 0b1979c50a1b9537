"""The checkpoint's tokenizer as GGUF metadata, the way llama.cpp's convert_hf_to_gguf writes it.

- ``tokenizer.model`` (SentencePiece; tried first, as llama.cpp's llama and minicpm converters
  do) → model ``llama``: pieces, scores and token types from the model file, then
  ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder`` on top.
- ``tokenizer.json`` with a byte-level BPE → model ``gpt2``: vocabulary and added tokens (control
  when special or special-looking, else user-defined), merges, and the pre-tokenizer name, found
  as llama.cpp finds it (the sha256 of the ids of a check text) or, failing that, from the
  pre-tokenizer that tokenizer.json declares.
- ``tokenizer.json`` with a SentencePiece-style BPE (byte fallback, ▁ for spaces) and no
  tokenizer.model → model ``llama``.
A model vocabulary larger than the tokenizer's is padded with ``[PAD{id}]`` tokens of type unused
(as llama.cpp does); a tokenizer larger than the model is an error. Special token ids, add_bos /
add_eos and the chat template come from gguf-py's ``SpecialVocab`` (llama.cpp's own reader of
tokenizer_config.json, tokenizer.json and config.json).

Where we differ from llama.cpp, on purpose: SentencePiece user-defined pieces keep their type
(llama.cpp marks them normal, so they would not be matched whole), ``add_space_prefix`` is written
from the SentencePiece model, and a SentencePiece-style tokenizer.json gets scores from its merge
ranks (llama.cpp gives every token -1000, which changes the merge order).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from gguf import SpecialVocab, TokenType

from prosparse import constants as K
from .errors import MissingFileError, VocabError

log = logging.getLogger("prosparse.convert")

SPM_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS_JSON = "added_tokens.json"

MODEL_SPM = "llama"
MODEL_BPE = "gpt2"
PRE_DEFAULT = "default"
SPM_SPACE = "\u2581"
PAD_SCORE = -10000.0          # llama.cpp's score for [PAD{i}] fillers of a SentencePiece vocabulary
ADDED_SCORE = -1000.0         # and for added tokens

# llama.cpp's check text: the sha256 of str(ids) identifies a BPE pre-tokenizer together with its
# vocabulary (convert_hf_to_gguf.py, get_vocab_base_pre).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作"
    "1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's "
    "there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 → tokenizer.ggml.pre, from llama.cpp's table (the names prosparse's tokenizer implements)
PRE_BY_CHECK_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
}

# Split regexes of tokenizer.json pre-tokenizers (for a vocabulary the hash table does not know)
_RE_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = _RE_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_BYTE_LEVEL_REGEX = ("ByteLevel", True)     # ByteLevel with GPT-2's own split
_BYTE_LEVEL_PLAIN = ("ByteLevel", False)
PRE_BY_STRUCTURE = {
    (_BYTE_LEVEL_REGEX,): "gpt2",
    (("Digits", True), _BYTE_LEVEL_REGEX): "smollm",
    (("Split", _RE_LLAMA3), _BYTE_LEVEL_PLAIN): "llama-bpe",
    (("Split", _RE_QWEN2), _BYTE_LEVEL_PLAIN): "qwen2",
}

# Special token kinds with a GGUF key (SpecialVocab also knows sep/cls/mask, unused by LLaMAs)
SPECIAL_ID_KEYS = {"bos": K.KEY_BOS_ID, "eos": K.KEY_EOS_ID, "unk": K.KEY_UNK_ID, "pad": K.KEY_PAD_ID,
                   "eot": K.KEY_EOT_ID, "eom": K.KEY_EOM_ID}
ADD_SPECIAL_KEYS = {"bos": K.KEY_ADD_BOS, "eos": K.KEY_ADD_EOS}


def tokenizer_metadata(model_dir: Path, n_vocab: int) -> dict[str, Any]:
    """tokenizer.* keys (K constants) for the tokenizer in ``model_dir``, padded to ``n_vocab``."""
    model_dir = Path(model_dir)
    if (model_dir / SPM_FILE).is_file():
        meta = _sentencepiece(model_dir, n_vocab)
    elif (model_dir / TOKENIZER_JSON).is_file():
        tokenizer_json = _read_json(model_dir / TOKENIZER_JSON)
        if _is_sentencepiece_bpe(tokenizer_json):
            meta = _sentencepiece_bpe_json(model_dir, tokenizer_json, n_vocab)
        else:
            meta = _byte_level_bpe(model_dir, tokenizer_json, n_vocab)
    else:
        raise MissingFileError(f"{model_dir}: no tokenizer ({SPM_FILE} or {TOKENIZER_JSON}); copy the "
                               f"tokenizer files into the checkpoint, or pass --no-tokenizer to write a "
                               f"model that takes token ids only")
    meta.update(_special_vocab(model_dir, len(meta[K.KEY_TOKENS]), meta))
    return meta


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise VocabError(f"{path}: not valid JSON ({e})") from None


def _too_large(source: Path, size: int, n_vocab: int) -> VocabError:
    return VocabError(f"{source}: the tokenizer has {size} tokens but the model's vocabulary (config.json "
                      f"vocab_size, the embedding rows) has {n_vocab}; the tokenizer does not belong to "
                      f"this model")


def looks_special(text: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens some models forget to mark special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


# ---------------------------------------------------------------------------------------------
# SentencePiece (tokenizer.model)
# ---------------------------------------------------------------------------------------------

def _sentencepiece(model_dir: Path, n_vocab: int) -> dict[str, Any]:
    from sentencepiece import sentencepiece_model_pb2

    path = model_dir / SPM_FILE
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:                                    # protobuf's DecodeError
        raise VocabError(f"{path}: not a SentencePiece model ({e})") from None
    if len(proto.pieces) > n_vocab:
        raise _too_large(path, len(proto.pieces), n_vocab)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [PAD_SCORE] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for i, piece in enumerate(proto.pieces):       # SentencePiece's piece types are GGUF's token types
        tokens[i], scores[i], types[i] = piece.piece, piece.score, int(piece.type)

    added_json = model_dir / ADDED_TOKENS_JSON
    if added_json.is_file():
        for text, token_id in _read_json(added_json).items():
            if token_id >= n_vocab:
                raise _too_large(added_json, token_id + 1, n_vocab)
            tokens[token_id], scores[token_id], types[token_id] = text, ADDED_SCORE, int(TokenType.USER_DEFINED)
    config = model_dir / TOKENIZER_CONFIG
    decoder = (_read_json(config).get("added_tokens_decoder") or {}) if config.is_file() else {}
    for key, entry in decoder.items():
        token_id, text = int(key), entry["content"]
        if token_id >= n_vocab:
            raise _too_large(config, token_id + 1, n_vocab)
        if entry.get("special") or looks_special(text):
            types[token_id] = int(TokenType.CONTROL)
        else:
            text = text.replace(SPM_SPACE, " ")      # llama.cpp: user-defined tokens are pre-normalised
            types[token_id] = int(TokenType.USER_DEFINED)
        tokens[token_id], scores[token_id] = text, ADDED_SCORE

    meta = {K.KEY_TOKENIZER_MODEL: MODEL_SPM, K.KEY_TOKENIZER_PRE: PRE_DEFAULT, K.KEY_TOKENS: tokens,
            K.KEY_SCORES: scores, K.KEY_TOKEN_TYPE: types,
            K.KEY_ADD_SPACE_PREFIX: bool(proto.normalizer_spec.add_dummy_prefix)}
    # fallbacks for a model directory that names no special tokens (llama.cpp's runtime defaults)
    trainer = proto.trainer_spec
    for key, token_id in ((K.KEY_BOS_ID, trainer.bos_id), (K.KEY_EOS_ID, trainer.eos_id),
                          (K.KEY_UNK_ID, trainer.unk_id)):
        if 0 <= token_id < len(proto.pieces):
            meta[key] = token_id
    return meta


# ---------------------------------------------------------------------------------------------
# tokenizer.json
# ---------------------------------------------------------------------------------------------

def _is_sentencepiece_bpe(tokenizer_json: dict) -> bool:
    """gguf-py's LlamaHfVocab test: a BPE with byte fallback and a sequence decoder (▁ → space),
    as transformers writes for LLaMA-2-style SentencePiece vocabularies."""
    model = tokenizer_json.get("model") or {}
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and (tokenizer_json.get("decoder") or {}).get("type") == "Sequence")


def _vocab_and_added(path: Path, tokenizer_json: dict, n_vocab: int) -> tuple[dict[int, str], dict[int, dict]]:
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise VocabError(f"{path}: model type {model.get('type')!r} is not supported; prosparse reads BPE "
                         f"tokenizers (byte-level or SentencePiece-style) and tokenizer.model files")
    by_id = {int(i): text for text, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer_json.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise _too_large(path, max(by_id) + 1, n_vocab)
    return by_id, added


def _byte_level_bpe(model_dir: Path, tokenizer_json: dict, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's get_vocab_base + _set_vocab_gpt2."""
    path = model_dir / TOKENIZER_JSON
    by_id, added = _vocab_and_added(path, tokenizer_json, n_vocab)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            text = by_id[i]
            if added[i].get("special") or looks_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace(SPM_SPACE, " ")
                types.append(int(TokenType.USER_DEFINED))
            tokens.append(text)
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
    return {K.KEY_TOKENIZER_MODEL: MODEL_BPE, K.KEY_TOKENIZER_PRE: _pre_tokenizer_name(path, tokenizer_json),
            K.KEY_TOKENS: tokens, K.KEY_TOKEN_TYPE: types}


def _pre_tokenizer_name(path: Path, tokenizer_json: dict) -> str:
    """By llama.cpp's check-text hash when the tokenizers library can run tokenizer.json; else
    (or for a vocabulary the table does not know) from the declared pre-tokenizer."""
    try:
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(str(path)).encode(CHECK_TEXT).ids
        digest = hashlib.sha256(str(ids).encode()).hexdigest()
    except Exception:                   # no tokenizers library, or it cannot load this file
        digest = None
    if digest in PRE_BY_CHECK_HASH:
        return PRE_BY_CHECK_HASH[digest]
    name = PRE_BY_STRUCTURE.get(_pre_tokenizer_structure(tokenizer_json.get("pre_tokenizer")))
    if name is None:
        raise VocabError(f"{path}: the BPE pre-tokenizer is not one prosparse recognises (check hash {digest}, "
                         f"pre_tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}); known by "
                         f"structure: GPT-2 ByteLevel, SmolLM (Digits + ByteLevel), Llama 3 and Qwen2 splits")
    log.info("pre-tokenizer %r recognised from tokenizer.json's pre_tokenizer (check hash %s unknown)", name, digest)
    return name


def _pre_tokenizer_structure(pre: dict | None) -> tuple:
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel":
            out.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Digits":
            out.append((kind, bool(step.get("individual_digits"))))
        elif kind == "Split":
            out.append((kind, (step.get("pattern") or {}).get("Regex")))
        else:
            out.append((kind, None))
    return tuple(out)


def _sentencepiece_bpe_json(model_dir: Path, tokenizer_json: dict, n_vocab: int) -> dict[str, Any]:
    """A SentencePiece-style BPE from tokenizer.json → the ``llama`` model. Scores follow the
    merge ranks (a token made by an earlier merge scores higher), so the runtime's best-score-first
    merging replays the BPE merge order."""
    path = model_dir / TOKENIZER_JSON
    by_id, added = _vocab_and_added(path, tokenizer_json, n_vocab)
    merges = tokenizer_json["model"].get("merges") or []
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank_of.setdefault(left + right, rank)
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]"), scores.append(PAD_SCORE), types.append(int(TokenType.UNUSED))
            continue
        if i in added:
            special = added[i].get("special") or looks_special(text)
            kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
            score = ADDED_SCORE
        else:
            is_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
            kind = TokenType.BYTE if is_byte else TokenType.NORMAL
            score = -float(rank_of[text]) if text in rank_of else 0.0
        tokens.append(text), scores.append(score), types.append(int(kind))
    unk = tokenizer_json["model"].get("unk_token")
    if unk in tokens:
        types[tokens.index(unk)] = int(TokenType.UNKNOWN)
    return {K.KEY_TOKENIZER_MODEL: MODEL_SPM, K.KEY_TOKENIZER_PRE: PRE_DEFAULT, K.KEY_TOKENS: tokens,
            K.KEY_SCORES: scores, K.KEY_TOKEN_TYPE: types,
            K.KEY_ADD_SPACE_PREFIX: _prepends_space(tokenizer_json)}


def _prepends_space(tokenizer_json: dict) -> bool:
    """Does tokenizer.json put ▁ in front of the text (a Prepend normalizer, or a Metaspace
    pre-tokenizer that prepends)?"""
    def steps(node: dict | None, key: str) -> list[dict]:
        node = node or {}
        return node.get(key, [node]) if node.get("type") == "Sequence" else [node]

    for n in steps(tokenizer_json.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == SPM_SPACE:
            return True
    for p in steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


# ---------------------------------------------------------------------------------------------
# Special tokens, add_bos/add_eos, merges, chat template
# ---------------------------------------------------------------------------------------------

def _special_vocab(model_dir: Path, n_tokens: int, meta: dict[str, Any]) -> dict[str, Any]:
    byte_level = meta[K.KEY_TOKENIZER_MODEL] == MODEL_BPE
    special = SpecialVocab(model_dir, load_merges=byte_level, n_vocab=n_tokens)
    out: dict[str, Any] = {}
    if byte_level:
        if not special.merges:
            raise VocabError(f"{model_dir / TOKENIZER_JSON}: a byte-level BPE without merges cannot be run")
        out[K.KEY_MERGES] = special.merges
    for kind, token_id in special.special_token_ids.items():
        if kind in SPECIAL_ID_KEYS:
            out[SPECIAL_ID_KEYS[kind]] = int(token_id)
    for kind, flag in special.add_special_token.items():
        if kind in ADD_SPECIAL_KEYS:
            out[ADD_SPECIAL_KEYS[kind]] = bool(flag)
    template = special.chat_template
    if isinstance(template, list):           # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        out[K.KEY_CHAT_TEMPLATE] = template
    return out
