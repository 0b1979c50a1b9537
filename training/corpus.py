"""``prosparse-train prepare-data``: an English corpus from Debian documentation packages.

No model hub and no root install: ``apt-get download PACKAGE`` (into a cache folder) and
``dpkg-deb -x`` (into another), then the prose is taken out:

- files ending .txt .rst .md .pod .html .htm, gzipped or not, anywhere in the package;
- HTML is reduced to its text (tags, scripts, styles dropped); where a Sphinx tree ships its
  sources (``_sources/*.rst.txt``) the sources are taken and that tree's HTML skipped;
- a document is kept when it has ≥ ``MIN_CHARS`` characters and reads as English: at least
  ``MIN_STOPWORD_SHARE`` of its words are common English function words (this drops the
  translations the packages carry, and tables, logs and API dumps that are not prose);
- translations are skipped by path: a folder named like a locale (de-DE, zh_CN) other than
  English, or a folder called ``translations`` (partly translated pages repeat English text);
- exact duplicates (the same text in two places, e.g. linux-doc's rst.gz and _sources) are
  dropped.

Each kept document becomes ``corpus_dir/PACKAGE/<path>.txt``; ``corpus_dir/MANIFEST.json``
records every package's exact version, file count and characters. The .deb files stay in
``~/.cache/prosparse/debian/debs``; the unpacked trees are removed once read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

from .data import HTML_SUFFIXES, read_text_file, tidy_text

PROSE_SUFFIXES = (".txt", ".rst", ".md", ".pod", ".text") + HTML_SUFFIXES
DEFAULT_WORK_DIR = "~/.cache/prosparse/debian"  # .deb files and their unpacked trees
MIN_CHARS = 400
MIN_STOPWORD_SHARE = 0.18
STOPWORDS = frozenset("""the of and to a in is that for it as with be on are this by not or an can from
you which if will when at was have has all there their they one more other these use used may
also but been should its into than then only such so would each must any we how what some no
your most do does were them our about after before where while between through both same""".split())


# de-DE, zh_CN, zh_Hans, pt-br — not git-doc or gtk-3
LOCALE_DIR = re.compile(r"^[a-z]{2}[-_]([A-Z]{2}|[A-Z][a-z]{3}|[a-z]{2})$")


def is_translation(rel: Path) -> bool:
    return any(part == "translations" or (LOCALE_DIR.match(part) and not part.startswith("en"))
               for part in rel.parts[:-1])


def english_share(text: str) -> float:
    """Share of the words of ``text`` that are common English function words."""
    words = re.findall(r"[A-Za-z]+", text)
    if not words:
        return 0.0
    return sum(w.lower() in STOPWORDS for w in words) / len(words)


def is_prose(text: str) -> bool:
    return len(text) >= MIN_CHARS and english_share(text) >= MIN_STOPWORD_SHARE


def download(package: str, deb_dir: Path) -> Path:
    """The package's .deb in ``deb_dir`` (fetched with apt-get download if not there yet)."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if not found:
        result = subprocess.run(["apt-get", "download", package], cwd=deb_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}\n"
                               f"(run `apt-get update` once; check the name with `apt-cache search {package}`)")
        found = sorted(deb_dir.glob(f"{package}_*.deb"))
    return found[-1]


def unpack(deb: Path, dest: Path) -> Path:
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        os.replace(tmp, dest)
    return dest


def package_documents(root: Path):
    """(relative path, text) of the candidate documents of an unpacked package."""
    sphinx_roots = {p.parent for p in root.rglob("_sources") if p.is_dir()}
    for path in sorted(root.rglob("*")):
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        if not path.is_file() or not name.endswith(PROSE_SUFFIXES) or is_translation(path.relative_to(root)):
            continue
        if name.endswith(HTML_SUFFIXES) and any(r in path.parents for r in sphinx_roots):
            continue
        try:
            text = read_text_file(path)
        except (OSError, EOFError, ValueError):
            continue
        yield path.relative_to(root), tidy_text(text)


def prepare_corpus(packages: list[str], corpus_dir: str | Path, work_dir: str | Path | None = None,
                   log=print) -> dict:
    """Build (or complete) the corpus of ``packages``; return the manifest."""
    corpus_dir = Path(corpus_dir).expanduser()
    work_dir = Path(work_dir or DEFAULT_WORK_DIR).expanduser()
    manifest_path = corpus_dir / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"packages": {}}
    seen: set[str] = set()
    for package in packages:
        if package in manifest["packages"]:
            log(f"{package}: already in {corpus_dir}")
            continue
        deb = download(package, work_dir / "debs")
        root = unpack(deb, work_dir / "unpacked" / deb.stem)
        out = corpus_dir / package
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        kept = dropped = duplicates = chars = 0
        for rel, text in package_documents(root):
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            if not is_prose(text):
                dropped += 1
                continue
            name = str(rel).removesuffix(".gz")
            target = tmp / (name if name.endswith(".txt") else name + ".txt")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text + "\n")
            kept += 1
            chars += len(text)
        shutil.rmtree(out, ignore_errors=True)
        if kept:
            os.replace(tmp, out)
        shutil.rmtree(root)  # the unpacked tree (GBs for some packages); the .deb stays
        version = urllib.parse.unquote(deb.stem.split("_")[1])  # "3%3a3.2" is epoch 3: 3:3.2
        manifest["packages"][package] = {"deb": deb.name, "version": version, "documents": kept,
                                         "dropped_not_prose": dropped, "duplicates": duplicates, "chars": chars}
        corpus_dir.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        if not kept:
            log(f"WARNING: {package} {version}: no English prose found (its files: {root}); "
                f"drop it from data.debian_packages")
        log(f"{package} {version}: {kept} documents, {chars / 1e6:.1f} M characters "
            f"({dropped} not English prose, {duplicates} duplicates dropped)")
    total = sum(p["chars"] for p in manifest["packages"].values())
    log(f"corpus {corpus_dir}: {len(manifest['packages'])} packages, {total / 1e6:.1f} M characters")
    return manifest
