"""Text from Debian packages: which files a package installs, man pages rendered by groff, fortune cookies,
debian-reference HTML sections, dictd dictionaries; and `apt-get install` of what a corpus needs."""

from __future__ import annotations

import glob
import gzip
import html.parser
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from smalltalk.data.corpora.text import clean, read_text, shuffled
from smalltalk.errors import SmalltalkError

Doc = tuple[str, str]  # (text, source)
GROFF = "preconv -e UTF-8 | groff -t -mandoc -Tutf8 -P-cbou -rLL=100n -rHY=0"
# Ragged right, no hyphenation: pages (and tbl) issue their own .ad/.hy, so both are renamed and redefined as
# requests that keep left adjustment.
ROFF_PRELUDE = b".ad l\n.nh\n.rn ad ad@\n.de ad\n.ad@ l\n..\n.rn hy hy@\n.de hy\n..\n"
_MAN_HEADER = re.compile(r"^\S+\(\S+\)\s.*\S+\(\S+\)\s*$")
_MAN_FOOTER = re.compile(r"\S.*\s{3,}\S+\(\S+\)\s*$")
_MAN_DROP = {"ÜBERSETZUNG", "TRADUCTION", "TRADUCCIÓN", "TRADUZIONE", "翻訳", "翻訳者", "翻訳者謝辞",
             "COLOPHON"}  # translators' credits, colophons
_FORTUNE_SKIP = re.compile(r"(ascii-?art|banner|/off/|\.dat$|\.u8$|-pre$)")


def portable(path: str) -> str:
    """A file's name as a document's source: relative to /usr or to Python's prefix, so that a corpus built on
    another machine (or with another Python install of the same version) has the same bytes."""
    for prefix in ("/usr/", sys.base_prefix.rstrip("/") + "/"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def dpkg_files(package: str) -> list[str]:
    """The regular files a package installed (no symlinks); [] when it is not installed."""
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [p for p in out.splitlines() if os.path.isfile(p) and not os.path.islink(p)]


def installed(package: str) -> bool:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "install ok installed" in out


def apt_install(packages: list[str]) -> None:
    """apt-get install the missing ones (as root), or one error saying the command to run."""
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return
    command = "apt-get update && apt-get install -y --no-install-recommends " + " ".join(missing)
    if os.geteuid() != 0:
        raise SmalltalkError(f"packages missing: {' '.join(missing)}", fix=f"as root: {command}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        if subprocess.run(step, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise SmalltalkError(f"`{' '.join(step)}` failed", fix=f"run it by hand: {command}")


def render_man(path: str) -> str | None:
    """A man page as plain text (no running header and footer, no translators' credits); None for an alias."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if raw.lstrip().startswith(b".so "):
        return None
    text = subprocess.run(GROFF, shell=True, input=ROFF_PRELUDE + raw, capture_output=True).stdout
    lines = text.decode("utf-8", "replace").strip("\n").split("\n")
    if lines and _MAN_HEADER.match(lines[0]):
        lines = lines[1:]
    if lines and _MAN_FOOTER.match(lines[-1]):
        lines = lines[:-1]
    out, skipping = [], False
    for line in lines:
        if line and not line[0].isspace():  # a section heading
            skipping = line.strip() in _MAN_DROP
        if not skipping:
            out.append(line)
    return "\n".join(out)


def man_pages(directory: str, label: str, rng: random.Random, jobs: int,
              keep: Callable[[str], bool]) -> Iterator[Doc]:
    """Every page under directory/man[1-9]* that `keep` accepts, in a seeded order, rendered in parallel."""
    files = sorted(p for p in glob.glob(os.path.join(directory, "man[1-9]*", "*"))
                   if os.path.isfile(p) and not os.path.islink(p) and keep(p))
    files = shuffled(files, rng)
    batch = max(8, jobs * 8)
    with ThreadPoolExecutor(jobs) as pool:
        for i in range(0, len(files), batch):
            part = files[i:i + batch]
            for path, text in zip(part, pool.map(render_man, part), strict=True):
                if text:
                    yield text, f"{label}:{portable(path)}"


def fortunes(packages: list[str], rng: random.Random, group_chars: int = 1500) -> Iterator[Doc]:
    """Consecutive fortunes of one file grouped into documents of ~group_chars."""
    groups = []
    for package in packages:
        for path in sorted(dpkg_files(package)):
            if "/games/fortunes" not in path or _FORTUNE_SKIP.search(path):
                continue
            items = [x for x in (clean(x) for x in re.split(r"^%\s*$", read_text(path), flags=re.M)) if x.strip()]
            current: list[str] = []
            for item in items:
                current.append(item)
                if sum(map(len, current)) >= group_chars:
                    groups.append(("\n\n".join(current), f"{package}:{os.path.basename(path)}"))
                    current = []
            if current:
                groups.append(("\n\n".join(current), f"{package}:{os.path.basename(path)}"))
    yield from shuffled(groups, rng)


class _HTMLText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "pre", "table", "dt", "dd", "blockquote",
             "title"}
    SKIP_CLASS = {"toc", "navheader", "navfooter"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[bool] = []  # per open element: does it skip its content?
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        skipping = tag in ("script", "style", "head") or bool(classes & self.SKIP_CLASS)
        if tag not in self.VOID:
            self.stack.append(skipping)
            self.skip += skipping
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.stack:
            self.skip -= self.stack.pop()
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_to_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in "".join(parser.out).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def debian_reference(lang: str, rng: random.Random) -> Iterator[Doc]:
    """debian-reference-LANG, one document per "N.M. Title" section."""
    docs = []
    for path in sorted(glob.glob(f"/usr/share/debian-reference/*.{lang}.html")):
        parts = re.split(r"\n(?=\d+\.\d+\. \S[^\n]*\n)", html_to_text(read_text(path)))
        docs += [(part, f"debian-reference-{lang}:{os.path.basename(path)}#{k}") for k, part in enumerate(parts)]
    yield from shuffled(docs, rng)


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(text: str) -> int:
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def dictd_entries(name: str) -> list[tuple[str, str]]:
    """Every entry of a dictd database in file order: (headword, text); metadata entries dropped."""
    base = f"/usr/share/dictd/{name}"
    with gzip.open(base + ".dict.dz", "rb") as f:  # dictzip is gzip-compatible
        data = f.read()
    blocks: dict[tuple[int, int], str] = {}
    with open(base + ".index", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            key = (_b64(parts[1]), _b64(parts[2]))
            if parts[0].startswith(("00-", "00database")):
                blocks[key] = ""
            else:
                blocks.setdefault(key, parts[0])
    return [(head, data[offset:offset + length].decode("utf-8", "replace"))
            for (offset, length), head in sorted(blocks.items()) if head]
