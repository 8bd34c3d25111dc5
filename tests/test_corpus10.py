"""The corpus10 builder (`smalltalk corpus corpus10`): reproducible bytes, its stats, its clean-up and errors."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from smalltalk.data.corpora import text
from smalltalk.data.corpora.debian import portable

from .conftest import cli


def test_the_same_build_gives_the_same_bytes_and_stats_say_which(tmp_path):
    """code_python (this Python's standard library: on every machine) built twice: the same gzip bytes (no
    timestamp), the sha256 in stats.json is the file's, every document is a cleaned chunk of its domain."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert cli("corpus", "corpus10", out, "--domains", "code_python", "--max-chars", "200000") == 0
    blobs = [(out / "code_python.jsonl.gz").read_bytes() for out in outs]
    assert blobs[0] == blobs[1]
    stats = json.loads((outs[0] / "stats.json").read_text())
    row = stats["domains"][0]
    assert row["sha256"] == hashlib.sha256(blobs[0]).hexdigest()
    docs = [json.loads(line) for line in gzip.decompress(blobs[0]).decode().splitlines()]
    assert len(docs) == row["docs"] and sum(len(d["text"]) for d in docs) == row["chars"] >= 200_000
    assert all(d["domain"] == "code_python" and 200 <= len(d["text"]) <= 8000 for d in docs)
    assert all(d["source"].startswith("python-stdlib:lib/python3") for d in docs)  # no machine-specific prefix
    keys = [text.near_duplicate_key(d["text"]) for d in docs]
    assert len(set(keys)) == len(keys)


def test_a_different_seed_draws_other_documents(tmp_path):
    for seed in (0, 1):
        assert cli("corpus", "corpus10", tmp_path / str(seed), "--domains", "code_python", "--max-chars", "50000",
                   "--seed", str(seed)) == 0
    first = [gzip.decompress((tmp_path / s / "code_python.jsonl.gz").read_bytes()).splitlines()[0] for s in "01"]
    assert first[0] != first[1]


def test_unknown_domains_and_missing_packages_are_one_clear_error(tmp_path, capsys, monkeypatch):
    assert cli("corpus", "corpus10", tmp_path / "x", "--domains", "klingon") == 2
    assert "unknown corpus10 domains ['klingon']" in capsys.readouterr().err
    import smalltalk.data.corpora.corpus10 as corpus10

    monkeypatch.setattr(corpus10, "installed", lambda package: package != "dict-gcide")
    assert cli("corpus", "corpus10", tmp_path / "y", "--domains", "dictionary_en") == 2
    err = capsys.readouterr().err
    assert "Debian packages missing: dict-gcide" in err and "--install" in err
    assert not (tmp_path / "y").exists()


def test_chunks_split_giant_paragraphs_at_lines_and_clean_strips_control_characters():
    lines = "\n".join(["x" * 60] * 10)  # one paragraph of 609 characters
    pieces = text.chunk(lines + "\n\n" + "y" * 50, 200)
    assert all(len(p) <= 200 for p in pieces) and pieces[0] == "\n".join(["x" * 60] * 3)
    assert text.clean("b\x08bold \r\nnext\rline\x01\n\n\n\nend") == "bold\nnext\nline\n\nend"


def test_english_paragraphs_leave_translations_and_licence_headers_leave_code():
    kept, dropped = text.drop_english("Das ist nicht die Übersetzung und es wird.\n\nThis is the text of it and "
                                      "for the page.", "de")
    assert kept == "Das ist nicht die Übersetzung und es wird." and dropped > 0
    assert text.strip_license_header("#!/usr/bin/env python\n# Copyright 2001 PSF\nimport os\n", "py") == \
        "#!/usr/bin/env python\nimport os\n"
    assert text.strip_license_header("/* GNU licence */\nint x;", "c") == "int x;"
    assert text.strip_license_header("/* a comment */\nint x;", "c") == "/* a comment */\nint x;"


@pytest.mark.parametrize("path,expected", [("/usr/share/man/de/man1/ls.1.gz", "share/man/de/man1/ls.1.gz"),
                                           ("/opt/other/file", "/opt/other/file")])
def test_sources_are_named_without_the_machine_prefix(path, expected):
    assert portable(path) == expected
