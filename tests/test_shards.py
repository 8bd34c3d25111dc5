"""Tokenizer and packed token shards: HF-loadable tokenizer, O(1) sequences, labels, manifest."""

import json

import numpy as np
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from smalltalk.config import DataConfig
from smalltalk.data.ingest import iter_documents, split_of
from smalltalk.data.shards import SplitData
from smalltalk.fsutil import sha256_file


def test_tokenizer_loads_with_autotokenizer(prepared_run):
    hf = AutoTokenizer.from_pretrained(str(prepared_run / "tokenizer"))
    manifest = json.loads((prepared_run / "tokenizer" / "manifest.json").read_text())
    assert len(hf) == manifest["vocab_size"] == 384
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == manifest["eot_id"]
    text = "abc xyz_(){}"
    assert hf.decode(hf(text).input_ids) == text


def test_shards_are_documents_joined_by_eot_in_order(prepared_run, corpus_file):
    data = SplitData(prepared_run / "data", "train")
    manifest = data.manifest
    tokenizer = Tokenizer.from_file(str(prepared_run / "tokenizer" / "tokenizer.json"))
    cfg = DataConfig(inputs=[str(corpus_file)], validation_fraction=0.1, test_fraction=0.1)
    train_docs = [d for d in iter_documents(cfg) if split_of(d.text, cfg) == "train"]
    stream = []
    for doc in train_docs:
        stream += tokenizer.encode(doc.text, add_special_tokens=False).ids + [manifest["eot_id"]]
    seq = data.seq_len
    n = len(stream) // seq
    assert len(data) == n == manifest["splits"]["train"]["sequences"]
    assert manifest["splits"]["train"]["tail_tokens_dropped"] == len(stream) - n * seq
    for i in (0, n // 2, n - 1):  # random access
        assert data[i].tolist() == stream[i * seq:(i + 1) * seq]
    assert data.tokens.dtype == np.uint16 and manifest["dtype"] == "uint16"
    assert sha256_file(data.dir / "train.bin") == manifest["splits"]["train"]["sha256"]
    starts = np.load(data.dir / "train.doc_starts.npy")
    assert len(starts) == len(train_docs) and starts[0] == 0
    names = manifest["domains"]
    doc_of_seq = np.searchsorted(starts, np.arange(n) * seq, side="right") - 1
    expected = [names.index(train_docs[d].domain) for d in doc_of_seq]
    assert data.seq_domains.tolist() == expected


def test_splits_are_disjoint_documents(prepared_run):
    manifest = SplitData(prepared_run / "data", "test").manifest
    docs = {s: manifest["splits"][s]["documents"] for s in ("train", "validation", "test")}
    assert sum(docs.values()) == manifest["documents"] == 120
    assert docs["test"] > 0 and docs["validation"] > 0


def test_pretrained_local_tokenizer_is_adopted(prepared_run, corpus_file, tmp_path):
    from .conftest import TINY_CONFIG, cli

    run = tmp_path / "run"
    common = ["--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus_file}]",
              "--set", "data.max_docs=null"]
    assert cli("tokenizer", "train", *common, "--pretrained", prepared_run / "tokenizer") == 0
    manifest = json.loads((run / "tokenizer" / "manifest.json").read_text())
    original = json.loads((prepared_run / "tokenizer" / "manifest.json").read_text())
    assert manifest["source"] == str(prepared_run / "tokenizer")
    assert manifest["vocab_size"] == original["vocab_size"] and manifest["eot_id"] == original["eot_id"]
    assert cli("data", "prepare", *common) == 0
    assert SplitData(run / "data", "train").vocab_size == original["vocab_size"]


def test_pretrained_directory_without_tokenizer_json_is_an_error(tmp_path, capsys):
    from .conftest import TINY_CONFIG, cli

    (tmp_path / "empty").mkdir()
    assert cli("tokenizer", "train", "--config", TINY_CONFIG, "--run", tmp_path / "run",
               "--pretrained", tmp_path / "empty") == 2
    assert "no tokenizer.json" in capsys.readouterr().err
