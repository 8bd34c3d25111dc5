"""`smalltalk corpus demo OUT`: a real multi-domain corpus from text already on a Debian machine.

A reduction of the corpus10 recipe (corpora/corpus10.py) to sources that need no
download: English and translated (de/fr/es) man pages rendered by groff, the Python standard library,
C headers, and licence texts. `--install` first apt-gets the packages that provide them when run as
root. Every domain that yields at least `min_docs` documents is written; fewer than 4 is an error.
Output: one OUT/{domain}.jsonl.gz per domain ({"text", "domain", "source"} per line) + stats.json.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import re
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, write_json
from smalltalk.layout import CORPUS_STATS

APT_PACKAGES = ["groff-base", "manpages", "manpages-dev", "manpages-de", "manpages-fr", "manpages-es"]
GROFF = "preconv -e UTF-8 | groff -t -mandoc -Tutf8 -P-cbou -rLL=100n -rHY=0"
_PRELUDE = b".ad l\n.nh\n"
STOP_WORDS = {
    "en": set("the and of to is that for with are this be if by it from or not".split()),
    "de": set("der die das und ist nicht mit von zu den ein eine für auf sich wird".split()),
    "fr": set("le la les et est des une un pour dans que qui pas sur avec ce".split()),
    "es": set("el la los las y es de que en un una para con por se del".split()),
}
WORD = re.compile(r"[^\W\d_]+")


def clean(text: str) -> str:
    text = re.sub(r".\x08", "", text.replace("\r\n", "\n"))
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def chunk(text: str, max_chars: int) -> list[str]:
    """Split at blank lines into pieces of at most max_chars (hard-cut giant paragraphs)."""
    pieces, current, size = [], [], 0
    for para in text.split("\n\n"):
        for part in [para[i:i + max_chars] for i in range(0, len(para), max_chars)] or [""]:
            if size + len(part) + 2 > max_chars and current:
                pieces.append("\n\n".join(current))
                current, size = [], 0
            current.append(part)
            size += len(part) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def drop_english(text: str, lang: str) -> str:
    """Translated man pages keep untranslated English paragraphs; drop those."""
    keep = []
    for para in text.split("\n\n"):
        words = [w.lower() for w in WORD.findall(para)]
        english = sum(w in STOP_WORDS["en"] for w in words)
        if not (english >= 3 and english > 2 * sum(w in STOP_WORDS[lang] for w in words)):
            keep.append(para)
    return "\n\n".join(keep)


def render_man(path: str) -> str | None:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    if raw.lstrip().startswith(b".so "):  # alias stub
        return None
    proc = subprocess.run(GROFF, shell=True, input=_PRELUDE + raw, capture_output=True, timeout=60)
    lines = proc.stdout.decode("utf-8", "replace").strip("\n").split("\n")
    return "\n".join(lines[1:-1]) if len(lines) > 2 else None  # drop running header and footer


def man_pages(root: str, lang: str, rng: random.Random, jobs: int = 2) -> Iterator[tuple[str, str]]:
    files = sorted(p for p in glob.glob(os.path.join(root, "man[1-9]*", "*"))
                   if os.path.isfile(p) and not os.path.islink(p))
    rng.shuffle(files)
    with ThreadPoolExecutor(jobs) as pool:
        for start in range(0, len(files), 32):
            part = files[start:start + 32]
            for path, text in zip(part, pool.map(render_man, part), strict=True):
                if text:
                    yield (drop_english(text, lang) if lang != "en" else text), path


def code_files(roots: list[str], suffix: str, rng: random.Random) -> Iterator[tuple[str, str]]:
    files = sorted({p for root in roots for p in glob.glob(os.path.join(root, "**", f"*{suffix}"), recursive=True)
                    if os.path.isfile(p) and "test" not in os.path.basename(p)})
    rng.shuffle(files)
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = text.split("\n")
        if lines and max(map(len, lines)) < 500:  # skip generated / minified files
            yield text, path


def licences(rng: random.Random) -> Iterator[tuple[str, str]]:
    files = sorted(glob.glob("/usr/share/common-licenses/*") + glob.glob("/usr/share/doc/*/copyright"))
    rng.shuffle(files)
    for path in files:
        if os.path.isfile(path):
            yield Path(path).read_text(encoding="utf-8", errors="replace"), path


def sources(rng: random.Random) -> dict[str, Callable[[], Iterator[tuple[str, str]]]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return {
        "manual_en": lambda: man_pages("/usr/share/man", "en", rng),
        "german_de": lambda: man_pages("/usr/share/man/de", "de", rng),
        "french_fr": lambda: man_pages("/usr/share/man/fr", "fr", rng),
        "spanish_es": lambda: man_pages("/usr/share/man/es", "es", rng),
        "code_python": lambda: code_files([stdlib], ".py", rng),
        "code_c": lambda: code_files(["/usr/include"], ".h", rng),
        "legal_en": lambda: licences(rng),
    }


def _apt_install() -> None:
    if os.geteuid() != 0:
        print("corpus: not root, skipping apt-get install")
        return
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], check=False,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def build_domain(name: str, docs: Iterator[tuple[str, str]], max_chars: float, chunk_chars: int,
                 min_chars: int) -> list[dict]:
    out, seen, total = [], set(), 0
    for text, source in docs:
        for piece in chunk(clean(text), chunk_chars):
            key = re.sub(r"\W", "", piece.casefold())[:300]
            if len(piece) < min_chars or key in seen:
                continue
            seen.add(key)
            out.append({"text": piece, "domain": name, "source": source})
            total += len(piece)
            if total >= max_chars:
                return out
    return out


def build_demo_corpus(out_dir: Path, max_chars: float = 2e6, install: bool = False, seed: int = 0,
                      chunk_chars: int = 8000, min_chars: int = 200, min_docs: int = 20) -> dict:
    if install:
        _apt_install()
    stats: dict = {"max_chars": max_chars, "seed": seed, "domains": {}, "skipped": {}}
    with atomic_dir(out_dir) as tmp:
        for name, make in sources(random.Random(seed)).items():
            start = time.perf_counter()
            docs = build_domain(name, make(), max_chars, chunk_chars, min_chars)
            if len(docs) < min_docs:
                stats["skipped"][name] = f"only {len(docs)} documents found"
                print(f"corpus: {name:12s} skipped ({len(docs)} documents)", flush=True)
                continue
            with gzip.open(tmp / f"{name}.jsonl.gz", "wt", encoding="utf-8") as handle:
                handle.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            chars = sum(len(d["text"]) for d in docs)
            stats["domains"][name] = {"documents": len(docs), "chars": chars,
                                      "seconds": round(time.perf_counter() - start, 1)}
            print(f"corpus: {name:12s} {len(docs):5d} documents {chars / 1e6:5.2f}M chars", flush=True)
        if len(stats["domains"]) < 4:
            raise SmalltalkError(f"only {len(stats['domains'])} domains available: {stats['skipped']}",
                                 fix="run with --install as root (apt-get installs man pages and groff)")
        write_json(tmp / CORPUS_STATS, stats)
    print(f"corpus: {len(stats['domains'])} domains ({', '.join(stats['domains'])}) -> {out_dir}")
    return stats
