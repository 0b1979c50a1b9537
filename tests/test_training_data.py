"""Data: HTML to text, the token cache, held-out split by document, the sequence stream."""

import json

import numpy as np

from prosparse.training.corpus import is_prose, is_translation
from prosparse.training.data import (SequenceStream, build_token_cache, html_to_text, iter_documents,
                                     micro_batch_start)
from training_tiny import make_corpus, tiny_tokenizer


def test_html_to_text_keeps_prose_and_drops_markup():
    page = ("<html><head><title>T</title><style>p {color: red}</style></head><body><nav>Home | Next</nav>"
            "<h1>Sparse &amp; fast</h1><p>The <b>gate</b> is\n   ReLU.</p><script>var x = 1;</script>"
            "<p>Second paragraph.</p></body></html>")
    assert html_to_text(page) == "Sparse & fast\n\nThe gate is\nReLU.\n\nSecond paragraph."


def test_documents_from_folders_and_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document")
    (tmp_path / "a" / "two.html").write_text("<p>second</p>")
    (tmp_path / "a" / "skip.bin").write_text("not text")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    docs = list(iter_documents([str(tmp_path / "a"), str(tmp_path / "c.jsonl")], [".txt", ".html", ".jsonl"]))
    assert [t for _, t in docs] == ["first document", "second", "third", "fourth"]
    assert [i for i, _ in docs] == ["a/one.txt", "a/two.html", "c.jsonl:1", "c.jsonl:3"]


def test_token_cache_split_by_document_and_reused(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", documents=30, words=20)
    tok = tiny_tokenizer()
    cache = build_token_cache([str(corpus)], tok, tmp_path / "cache", [".txt"], heldout_fraction=0.3, log=lambda *a: None)
    m = cache.meta
    assert m["train_documents"] + m["heldout_documents"] == 30 and m["heldout_documents"] > 0
    # every document's tokens end with EOS, and the splits are disjoint by document
    heldout_files = {i.rsplit("/", 1)[1] for i in m["heldout_ids"]}
    heldout_text = "".join((corpus / f).read_text() for f in sorted(heldout_files))
    assert len(cache.tokens("heldout")) == len(tok(heldout_text)["input_ids"]) + len(heldout_files)
    assert (np.asarray(cache.tokens("train")) == tok.eos_token_id).sum() == m["train_documents"]
    seqs = cache.sequences("train", 16)
    assert seqs.shape == (m["train_tokens"] // 16, 16)
    again = build_token_cache([str(corpus)], tok, tmp_path / "cache", [".txt"], heldout_fraction=0.3)
    assert again.dir == cache.dir  # found, not rebuilt


def test_stream_is_a_fresh_permutation_per_epoch_and_deterministic():
    seqs = np.arange(10 * 4).reshape(10, 4)
    stream = SequenceStream(seqs, seed=3)
    first = stream.take(0, 10)[:, 0] // 4
    second = stream.take(10, 10)[:, 0] // 4
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert list(first) != list(second)
    assert np.array_equal(SequenceStream(seqs, seed=3).take(7, 6), stream.take(7, 6))


def test_ranks_and_micro_steps_tile_the_global_batch():
    # 2 ranks × 2 micro-steps × 3 sequences == 1 rank × 4 micro-steps × 3 sequences
    two = sorted(micro_batch_start(5, m, r, 3, 2, 2) for m in range(2) for r in range(2))
    one = sorted(micro_batch_start(5, m, 0, 3, 4, 1) for m in range(4))
    assert two == one == [48, 51, 54, 57]


def test_prose_filter_and_translations():
    assert is_prose("The kernel is a program that runs the machine, and this is how it works. " * 10)
    assert not is_prose("0x10 0x20 foo_bar(baz) qux = 1; " * 40)
    assert not is_prose("Der Kernel ist ein Programm, das die Maschine steuert und verwaltet. " * 10)
    from pathlib import Path
    assert is_translation(Path("usr/share/doc/handbook/html/de-DE/a.html"))
    assert is_translation(Path("Documentation/translations/it_IT/a.rst"))
    assert not is_translation(Path("usr/share/doc/handbook/html/en-US/a.html"))
    assert not is_translation(Path("Documentation/fs/ext4.rst"))
    assert not is_translation(Path("usr/share/doc/git-doc/git-log.html"))
    assert is_translation(Path("doc/zh_Hans/index.html")) and is_translation(Path("doc/pt-br/index.html"))


def test_prepare_corpus_from_a_local_deb(tmp_path):
    """dpkg-deb -x, prose extraction, the English filter and the manifest, offline: a .deb
    already in the download folder is used as is (apt-get download is not run)."""
    import shutil
    import subprocess

    import pytest
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb is not installed")
    from prosparse.training.corpus import prepare_corpus
    root = tmp_path / "pkg"
    doc = root / "usr" / "share" / "doc" / "demo-doc"
    (doc / "html" / "_sources").mkdir(parents=True)
    (doc / "de-DE").mkdir()
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text("Package: demo-doc\nVersion: 1:1.0-1\nArchitecture: all\n"
                                             "Maintainer: t <t@example.org>\nDescription: demo\n")
    prose = "The kernel is a program that runs the machine, and this is how it works for you. " * 10
    (doc / "guide.txt").write_text(prose)
    (doc / "html" / "_sources" / "intro.rst.txt").write_text(prose.replace("kernel", "scheduler"))
    (doc / "html" / "intro.html").write_text(f"<p>{prose}</p>")  # skipped: its Sphinx source is taken
    (doc / "de-DE" / "guide.txt").write_text(prose.replace("machine", "Maschine"))  # a translation
    (doc / "table.txt").write_text("0x10 0x20 foo_bar(baz) qux = 1; " * 40)  # not prose
    work = tmp_path / "work"
    (work / "debs").mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root),
                    str(work / "debs" / "demo-doc_1%3a1.0-1_all.deb")], check=True, capture_output=True)
    manifest = prepare_corpus(["demo-doc"], tmp_path / "corpus", work, log=lambda *a: None)
    entry = manifest["packages"]["demo-doc"]
    assert (entry["version"], entry["documents"], entry["dropped_not_prose"]) == ("1:1.0-1", 2, 1)
    kept = sorted(p.name for p in (tmp_path / "corpus" / "demo-doc").rglob("*.txt"))
    assert kept == ["guide.txt", "intro.rst.txt"]
