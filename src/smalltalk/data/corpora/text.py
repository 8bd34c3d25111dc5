"""Text clean-up shared by the corpus builders: control characters, chunking at blank lines, the English
paragraphs of translated pages, licence headers of code files, near-duplicate keys."""

from __future__ import annotations

import gzip
import hashlib
import random
import re

_OVERSTRIKE = re.compile(r".\x08")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_MANY_NL = re.compile(r"\n{3,}")
_WORD = re.compile(r"[^\W\d_]+")
_NONWORD = re.compile(r"\W+")
_LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|warranty", re.I)
EN_STOP = set("the and of to is that for with are this be if by it from or not which when will can you was has "
              "have".split())
STOP = {
    "de": set("der die das und ist nicht ein eine zu den mit von für auf sich des im dem wird oder werden bei wenn "
              "als auch es sie kann".split()),
    "fr": set("le la les de des et est un une pour dans par que qui sur en pas sont du au avec ou ce si être il "
              "elle ne".split()),
    "es": set("el la los las de del y es un una para en por que con se no al lo como si o su sus este "
              "esta".split()),
}


def clean(text: str) -> str:
    """Unix newlines, no overstrike (man/fortune bold), no control characters, no trailing blanks, at most
    one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CTRL.sub("", _OVERSTRIKE.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _MANY_NL.sub("\n\n", text).strip("\n")


def _split_long(para: str, max_chars: int) -> list[str]:
    """A paragraph longer than max_chars: at line ends, then hard cuts."""
    pieces, buf = [], ""
    for line in para.split("\n"):
        while len(line) > max_chars:
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if len(buf) + len(line) + 1 > max_chars and buf:
            pieces.append(buf)
            buf = ""
        buf = f"{buf}\n{line}" if buf else line
    return [*pieces, buf] if buf else pieces


def chunk(text: str, max_chars: int) -> list[str]:
    """Split at blank lines (then lines, then hard) into pieces of at most max_chars."""
    if len(text) <= max_chars:
        return [text]
    out: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        for piece in _split_long(para, max_chars) if len(para) > max_chars else [para]:
            if size + len(piece) + 2 > max_chars and current:
                out.append("\n\n".join(current))
                current, size = [], 0
            current.append(piece)
            size += len(piece) + 2
    if current:
        out.append("\n\n".join(current))
    return out


def is_english_para(para: str, lang: str) -> bool:
    """Translations keep untranslated strings: a paragraph with 3+ English stop words and over twice as many
    as the language's own is English."""
    words = [w.lower() for w in _WORD.findall(para)]
    en = sum(w in EN_STOP for w in words)
    return en >= 3 and en > 2 * sum(w in STOP[lang] for w in words)


def drop_english(text: str, lang: str) -> tuple[str, int]:
    """The text without its English paragraphs, and the characters dropped."""
    keep, dropped = [], 0
    for para in text.split("\n\n"):
        if is_english_para(para, lang):
            dropped += len(para)
        else:
            keep.append(para)
    return "\n\n".join(keep), dropped


def read_text(path: str) -> str:
    """A file's text (gzip too): UTF-8, else Latin-1."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def shuffled(items: list, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def strip_license_header(text: str, style: str) -> str:
    """Drop a leading comment block that is a copyright or licence notice, so that the first tokens of a code
    document (what the routers see) are code. style: "c" (/* */ or //) or "py" (#, after a shebang)."""
    s = text.lstrip()
    if style == "c" and s.startswith("/*"):
        end = s.find("*/")
        if end != -1 and _LICENSE_WORDS.search(s[:end]):
            return s[end + 2:].lstrip("\n")
    if style == "c" and s.startswith("//"):
        lines = s.split("\n")
        i = next((k for k, line in enumerate(lines) if not line.startswith("//")), len(lines))
        if _LICENSE_WORDS.search("\n".join(lines[:i])):
            return "\n".join(lines[i:]).lstrip("\n")
    if style == "py":
        lines = s.split("\n")
        i = next((k for k, line in enumerate(lines) if not line.startswith("#!")), len(lines))
        j = next((k for k in range(i, len(lines)) if not lines[k].startswith("#")), len(lines))
        if j > i and _LICENSE_WORDS.search("\n".join(lines[i:j])):
            return "\n".join(lines[:i] + lines[j:]).lstrip("\n")
    return text


def looks_generated(text: str, max_line: int = 1000, max_avg: float = 160.0) -> bool:
    """Tables and minified data rather than written code: a very long line or a high mean line length."""
    lines = text.split("\n")
    return max(len(line) for line in lines) > max_line or len(text) / max(1, len(lines)) > max_avg


def near_duplicate_key(piece: str) -> bytes:
    """The first 300 case-folded alphanumeric characters (e.g. GPL-3.0-only vs GPL-3.0+ share it)."""
    return hashlib.sha1(_NONWORD.sub("", piece.lower())[:300].encode("utf-8")).digest()
