"""Malformed and unsupported files raise GGUFError naming the file and the problem."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from gguf import GGUFWriter

from prosparse import Runtime
from prosparse import constants as K
from prosparse.gguf_file import GGUFError, GGUFFile
from tiny_models import tiny_llama, to_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    return to_gguf(tiny_llama(K.ACT_RELU), path, "q8_0", K.ACT_RELU)


def _variant(tmp_path, good, edit) -> str:
    data = bytearray(good.read_bytes())
    data = edit(data) or data
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data))
    return str(out)


def _tensor_info_offset(data: bytearray, name: str) -> int:
    """Offset just past a tensor's name in the tensor-info table."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    return data.index(needle) + len(needle)


def _load(path):
    with Runtime(path, n_ctx=16, threads=1):
        pass


def test_the_good_file_loads(good):
    _load(good)


def test_wrong_magic(tmp_path, good):
    bad = _variant(tmp_path, good, lambda d: d.__setitem__(slice(0, 4), b"GGML"))
    with pytest.raises(GGUFError, match=r"bad\.gguf: not a GGUF file"):
        _load(bad)


def test_empty_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        _load(tmp_path / "empty.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        _load(tmp_path / "nope.gguf")


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.2, 0.6, 0.999])
def test_truncated_file(tmp_path, good, fraction):
    size = good.stat().st_size
    bad = _variant(tmp_path, good, lambda d: d[: max(5, int(size * fraction))])
    with pytest.raises(GGUFError, match=r"bad\.gguf: .*(truncated|past the end)"):
        _load(bad)


def test_unknown_tensor_type(tmp_path, good):
    def edit(d):
        at = _tensor_info_offset(d, "blk.0.attn_q.weight") + 4 + 2 * 8   # n_dims, two dims
        d[at:at + 4] = struct.pack("<I", 99)
    with pytest.raises(GGUFError, match="'blk.0.attn_q.weight' has unknown type id 99"):
        _load(_variant(tmp_path, good, edit))


def test_unsupported_tensor_type(tmp_path, good):
    def edit(d):
        at = _tensor_info_offset(d, "blk.1.ffn_up.weight") + 4 + 2 * 8
        d[at:at + 4] = struct.pack("<I", 6)       # Q5_0: a real type, but not ours
    with pytest.raises(GGUFError, match="'blk.1.ffn_up.weight' has type Q5_0, which prosparse does not support"):
        _load(_variant(tmp_path, good, edit))


def test_offset_past_the_end(tmp_path, good):
    def edit(d):
        at = _tensor_info_offset(d, "blk.1.ffn_gate.weight") + 4 + 2 * 8 + 4
        d[at:at + 8] = struct.pack("<Q", 1 << 40)
    with pytest.raises(GGUFError, match="'blk.1.ffn_gate.weight' .* extends past the end of the file"):
        _load(_variant(tmp_path, good, edit))


def test_wrong_shape(tmp_path, good):
    def edit(d):
        at = _tensor_info_offset(d, "blk.0.attn_k.weight") + 4 + 8     # second dimension
        d[at:at + 8] = struct.pack("<Q", 16)                         # 32 rows → 16
    with pytest.raises(GGUFError, match=r"'blk.0.attn_k.weight' has shape \[64, 16\], expected \[64, 32\]"):
        _load(_variant(tmp_path, good, edit))


def _write(path, arch, kv: dict, tensors: dict):
    w = GGUFWriter(path, arch)
    for k, v in kv.items():
        w.add_uint32(k, v)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def test_unknown_architecture(tmp_path):
    _write(tmp_path / "gpt.gguf", "gptx", {}, {"token_embd.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(GGUFError, match="architecture 'gptx' .* is not supported; supported: llama, minicpm"):
        _load(tmp_path / "gpt.gguf")


def test_missing_key_and_missing_tensor(tmp_path):
    _write(tmp_path / "a.gguf", "llama", {}, {"token_embd.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(GGUFError, match="'llama.embedding_length' is missing"):
        _load(tmp_path / "a.gguf")
    kv = {"llama.embedding_length": 32, "llama.block_count": 1, "llama.feed_forward_length": 64,
          "llama.attention.head_count": 4}
    _write(tmp_path / "b.gguf", "llama", kv, {"token_embd.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(GGUFError, match="tensor 'output_norm.weight' is missing"):
        _load(tmp_path / "b.gguf")


def test_unknown_activation(tmp_path, good):
    def edit(d):
        at = d.index(struct.pack("<Q", 4) + b"relu")
        d[at + 8:at + 12] = b"gelu"
    with pytest.raises(GGUFError, match="prosparse.activation = 'gelu' is not one of silu, relu, fatrelu"):
        _load(_variant(tmp_path, good, edit))


def test_random_header_corruption_never_crashes(tmp_path, good):
    """Flip bytes in the metadata/tensor-info region: loading either fails with GGUFError (or
    a clear ValueError from the tokenizer/C checks) or yields a model that runs."""
    data = bytes(good.read_bytes())
    with GGUFFile(good) as gf:
        header_end = gf.data_start
    rng = random.Random(1234)
    for i in range(150):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(8, header_end)] = rng.randrange(256)
        path = tmp_path / f"c{i}.gguf"
        path.write_bytes(bytes(bad))
        try:
            with Runtime(path, n_ctx=8, threads=1) as rt:
                rt.evaluate([1, 2, 3])
        except (GGUFError, ValueError, RuntimeError) as e:
            assert str(path) in str(e) or "token id" in str(e), e
        path.unlink()


def test_nan_weights_fail_generation_naming_the_file(tmp_path):
    """Weights holding NaN (a corrupt or badly converted file) give NaN logits: generating from
    them fails with an error naming the file, not a bare sampling error."""
    import torch

    model = tiny_llama(K.ACT_RELU, seed=3)
    with torch.no_grad():
        model.lm_head.weight[:, 5] = float("nan")
    path = to_gguf(model, tmp_path / "nan.gguf", "f32", K.ACT_RELU)
    with Runtime(path, n_ctx=16, threads=1) as rt:
        with pytest.raises(ValueError, match=r"nan\.gguf: logits contain nan .* at position 2 "):
            list(rt.generate_tokens([1, 2, 3], max_tokens=2, temperature=0.0))


def test_corrupt_block_count_fails_at_once(tmp_path, good):
    """A layer count far beyond the file's tensors (found by tests/fuzz_gguf.py: a flipped byte
    made it 352321538, and loading looped over that many layers for minutes)."""
    def edit(d):
        key = b"llama.block_count"
        at = d.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4   # past the value type
        d[at:at + 4] = struct.pack("<I", 352321538)
    with pytest.raises(GGUFError, match=r"tensor 'blk.352321537.attn_norm.weight' is missing "
                                        r"\(llama.block_count = 352321538; the file has \d+ tensors\)"):
        _load(_variant(tmp_path, good, edit))
