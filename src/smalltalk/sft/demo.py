"""`smalltalk corpus sft-demo OUT --from CORPUS`: an instruction set made from a local corpus, no network.

CORPUS is a directory of {domain}.jsonl.gz files of {"text", "domain", "source"} (what `smalltalk corpus
demo` writes, or corpus10). Question/answer pairs are extracted from the structure of the text, each with
its document's domain label:
- man pages (any language): NAME line -> "What does the command `x` do?" (asked in the page's language)
  answered by its one-line description; SYNOPSIS -> "How is `x` invoked?" answered by the synopsis;
- Python: a function's signature -> "What does the Python function `f(...)` do?" answered by the first
  paragraph of its docstring;
- C: a documented prototype -> "What does the C function `f` do?" answered by its comment;
- every domain (licences among them): a paragraph's first sentence -> "Continue this text" answered by
  the rest of the paragraph.
Examples are split train / validation / test (80 / 10 / 10) per domain by a seeded permutation, at most
--max-per-domain per domain (structured questions first, "continue" ones filling up to the cap).
Limits: the questions are templates and the answers extracted text, not written by people; the
answers were in the pre-training corpus when the mixture was trained on the same text (the set measures
following the chat format and routing under it, not new knowledge).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from pathlib import Path

from smalltalk.data.chat import MARKERS
from smalltalk.data.corpora.demo import STOP_WORDS, WORD
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, write_json
from smalltalk.layout import CORPUS_STATS
from smalltalk.untrusted import BadInput, parse_json

ASK_COMMAND = {"en": "What does the command `{}` do?", "de": "Was macht der Befehl `{}`?",
               "fr": "Que fait la commande `{}` ?", "es": "¿Qué hace la orden `{}`?"}
ASK_SYNOPSIS = {"en": "How is `{}` invoked?", "de": "Wie wird `{}` aufgerufen?", "fr": "Comment appelle-t-on `{}` ?",
                "es": "¿Cómo se invoca `{}`?"}
ASK_CONTINUE = "Continue this text:\n{}"
_NAME = re.compile(r"^(?:NAME|NOM|NOMBRE|BEZEICHNUNG)\n\s+(\S[^\n]*?)\s+[-\u2013\u2014]\s+(.+?)\n\n", re.S)
_SYNOPSIS = re.compile(r"\n(?:SYNOPSIS|ÜBERSICHT|SINOPSIS|RÉSUMÉ)\n(.+?)\n\n(?=\S)", re.S)
_PYDEF = re.compile(r'def (\w+)\(([^)]{0,120})\)[^:\n]*:\n\s+[rRuU]?"""(.+?)(?:\n\s*\n|""")', re.S)
_CDOC = re.compile(r"/\*\*?\s*([^*][^/]{20,300}?)\s*\*+/\s*\n\s*((?:[\w\*]+\s+){1,4}\**(\w+)\s*\([^;{)]*\)\s*;)")
_SENTENCE = re.compile(r"^(.{30,200}?[.!?])\s+(.{40,})$", re.S)


def _language(text: str) -> str:
    words = [w.lower() for w in WORD.findall(text)]
    hits = {lang: sum(w in stop for w in words) for lang, stop in STOP_WORDS.items()}
    return max(hits, key=lambda lang: (hits[lang], lang == "en"))


def _flat(text: str, limit: int = 400) -> str:
    return re.sub(r"\s+", " ", text).strip()[:limit]


def extract(text: str) -> list[tuple[str, str, str]]:
    """(kind, question, answer) pairs found in one document."""
    found = []
    if (name := _NAME.match(text)) is not None:
        command, description = name.group(1).split(",")[0].strip(), _flat(name.group(2))
        lang = _language(description)
        found.append(("man-name", ASK_COMMAND[lang].format(command), description[0].upper() + description[1:]))
        if (synopsis := _SYNOPSIS.search(text)) is not None:
            found.append(("man-synopsis", ASK_SYNOPSIS[lang].format(command), synopsis.group(1).strip()[:400]))
    for m in _PYDEF.finditer(text):
        doc = _flat(m.group(3))
        if len(doc) >= 20:
            found.append(("python-docstring", f"What does the Python function `{m.group(1)}({_flat(m.group(2))})` "
                          "do?", doc))
    for m in _CDOC.finditer(text):
        found.append(("c-comment", f"What does the C function `{m.group(3)}` do?", _flat(m.group(1).replace("*", ""))))
    for paragraph in text.split("\n\n")[:40]:
        if (m := _SENTENCE.match(_flat(paragraph, 700))) is not None:
            found.append(("continue", ASK_CONTINUE.format(m.group(1)), m.group(2)[:300]))
    return [(k, q, a) for k, q, a in found if not any(marker in q + a for marker in MARKERS)]


def _documents(corpus: Path):
    files = sorted(corpus.glob("*.jsonl.gz"))
    if not files:
        raise SmalltalkError(f"no *.jsonl.gz in {corpus}", fix="build one with `smalltalk corpus demo DIR` or pass "
                             "corpus10 (smalltalk corpus corpus10 DIR)")
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    doc = parse_json(line, max_depth=None)
                    yield doc["text"], doc.get("domain") or path.name.split(".")[0], doc.get("source", "")
                except (BadInput, KeyError, TypeError, AttributeError):
                    raise SmalltalkError("not a {\"text\", \"domain\"} JSON line", where=f"{path}:{number}") from None


def build_sft_demo(corpus: Path, out: Path, max_per_domain: int = 600, seed: int = 0) -> dict:
    by_domain: dict[str, list[dict]] = {}
    for text, domain, source in _documents(Path(corpus)):
        for kind, question, answer in extract(text):
            by_domain.setdefault(domain, []).append({"messages": [{"role": "user", "content": question},
                                                                  {"role": "assistant", "content": answer}],
                                                     "domain": domain, "source": source, "kind": kind})
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    rng = random.Random(seed)
    for domain in sorted(by_domain):
        examples = by_domain[domain]
        rng.shuffle(examples)  # a seeded permutation; structured questions first, "continue" fills up
        examples.sort(key=lambda e: e["kind"] == "continue")
        examples = examples[:max_per_domain]
        rng.shuffle(examples)
        n_val = n_test = max(1, len(examples) // 10)
        splits["test"] += examples[:n_test]
        splits["validation"] += examples[n_test:n_test + n_val]
        splits["train"] += examples[n_test + n_val:]
    stats = {"corpus": str(corpus), "seed": seed, "max_per_domain": max_per_domain,
             "splits": {s: len(e) for s, e in splits.items()},
             "domains": {d: dict(Counter(e["kind"] for s in splits.values() for e in s if e["domain"] == d))
                         for d in by_domain}}
    with atomic_dir(out) as tmp:
        for split, examples in splits.items():
            with gzip.open(tmp / f"{split}.jsonl.gz", "wt", encoding="utf-8") as handle:
                handle.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
        write_json(tmp / CORPUS_STATS, stats)
    return stats
