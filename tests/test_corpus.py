"""The demo corpus builder on this machine's own text (skips where man pages or groff are absent)."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from smalltalk.data.corpora.demo import chunk, clean, drop_english

from .conftest import cli


def test_chunk_and_clean():
    text = "\n\n".join(["a" * 30] * 10)
    pieces = chunk(text, 100)
    assert all(len(p) <= 100 for p in pieces) and "".join(pieces).replace("\n", "") == "a" * 300
    assert chunk("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]
    assert clean("b\x08bold  \r\n\n\n\nnext\x01") == "bold\n\nnext"


def test_drop_english_keeps_the_translation():
    text = ("Dies ist die deutsche Beschreibung und sie wird nicht übersetzt.\n\n"
            "This is the English text and it is for the page.")
    assert drop_english(text, "de") == "Dies ist die deutsche Beschreibung und sie wird nicht übersetzt."


@pytest.mark.skipif(not Path("/usr/share/man/man1").is_dir() or shutil.which("groff") is None,
                    reason="no man pages or groff on this machine")
def test_demo_corpus_has_at_least_four_domains(tmp_path):
    out = tmp_path / "corpus"
    assert cli("corpus", "demo", out, "--max-chars", "30000", "--min-docs", "3") == 0
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["domains"]) >= 4
    for name in stats["domains"]:
        with gzip.open(out / f"{name}.jsonl.gz", "rt") as handle:
            docs = [json.loads(line) for line in handle]
        assert docs and all(d["domain"] == name and len(d["text"]) >= 200 for d in docs)
        assert stats["domains"][name]["documents"] == len(docs)
