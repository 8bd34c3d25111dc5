"""Every input format, globs and directories, the document split, and one clear error per bad input."""

import gzip
import json
from pathlib import Path

import pytest

from smalltalk.config import DataConfig
from smalltalk.data.ingest import iter_documents, split_of

from .conftest import TINY_CONFIG, cli, make_documents, write_jsonl


def _texts(cfg: DataConfig) -> list[str]:
    return [d.text for d in iter_documents(cfg)]


def test_all_formats_read_the_same_documents(tmp_path: Path):
    docs = make_documents(12)
    texts = [d["text"] for d in docs]
    write_jsonl(tmp_path / "a.jsonl", docs)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in docs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts, "domain": [d["domain"] for d in docs]}), tmp_path / "c.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    assert _texts(DataConfig(inputs=[str(tmp_path / "a.jsonl")])) == texts
    assert _texts(DataConfig(inputs=[str(tmp_path / "b.jsonl.gz")])) == texts
    parquet_docs = list(iter_documents(DataConfig(inputs=[str(tmp_path / "c.parquet")], text_field="body")))
    assert [d.text for d in parquet_docs] == texts and parquet_docs[0].domain == docs[0]["domain"]
    assert _texts(DataConfig(inputs=[str(tmp_path / "hf")])) == texts
    assert _texts(DataConfig(inputs=[str(tmp_path / "*.jsonl*")])) == texts + texts  # glob, sorted


def test_txt_file_and_blocks(tmp_path: Path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "one.txt").write_text("first block\nline two\n\n  \nsecond block\n\n\nthird")
    (folder / "two.txt").write_text("another file")
    assert _texts(DataConfig(inputs=[str(folder)])) == ["first block\nline two\n\n  \nsecond block\n\n\nthird",
                                                         "another file"]
    docs = list(iter_documents(DataConfig(inputs=[str(folder)], txt_mode="blocks")))
    assert [d.text for d in docs] == ["first block\nline two", "second block", "third", "another file"]
    assert docs[1].where.endswith("one.txt:5")


def test_split_is_by_document_deterministic_and_seeded():
    cfg = DataConfig(validation_fraction=0.1, test_fraction=0.2)
    texts = [d["text"] for d in make_documents(400)]
    splits = [split_of(t, cfg) for t in texts]
    assert splits == [split_of(t, cfg) for t in texts]
    assert 0.12 < splits.count("test") / 400 < 0.28 and 0.04 < splits.count("validation") / 400 < 0.16
    other = [split_of(t, DataConfig(validation_fraction=0.1, test_fraction=0.2, split_seed=1)) for t in texts]
    assert other != splits


def _bad(tmp_path: Path, capsys, input_path: Path | str, *extra: str) -> str:
    run = tmp_path / "run"
    code = cli("tokenizer", "train", "--config", TINY_CONFIG, "--run", run, "--input", input_path, *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (run / "tokenizer").exists(), "no half-written output"
    assert not any(p.name.startswith(".tokenizer") for p in run.glob(".*")) if run.exists() else True
    return err


def test_malformed_jsonl_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken}\n')
    err = _bad(tmp_path, capsys, path)
    assert "malformed JSON" in err and f"{path}:2" in err and "fix" in err


def test_invalid_utf8(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    err = _bad(tmp_path, capsys, path)
    assert "invalid UTF-8" in err and f"{path}:2" in err


def test_invalid_utf8_txt(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"line one\nline two \xff\n")
    assert f"{path}:2" in _bad(tmp_path, capsys, path)


def test_missing_text_field(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello"}])
    err = _bad(tmp_path, capsys, path)
    assert "no text field 'text'" in err and "body" in err and f"{path}:1" in err and "data.text_field" in err


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert "holds no documents" in _bad(tmp_path, capsys, path)


def test_missing_path(tmp_path, capsys):
    err = _bad(tmp_path, capsys, tmp_path / "nope.jsonl")
    assert "does not exist" in err and "nope.jsonl" in err
    assert "matched no files" in _bad(tmp_path, capsys, str(tmp_path / "nothing*.jsonl"))


def test_parquet_without_text_column(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    err = _bad(tmp_path, capsys, path)
    assert "no column 'text'" in err and "content" in err and str(path) in err


@pytest.mark.parametrize("value", ["data.txt_mode=lines"])
def test_bad_txt_mode(tmp_path, capsys, value):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    assert "txt_mode" in _bad(tmp_path, capsys, path, "--set", value)
