"""Read documents from jsonl(.gz), txt, parquet and HF `save_to_disk` directories, and split them.

Every bad input raises SmalltalkError naming the file (and line) and what to do; empty documents are
counted, never silently dropped.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from smalltalk.config import DataConfig
from smalltalk.errors import SmalltalkError
from smalltalk.untrusted import BadInput, parse_json

SPLITS = ("train", "validation", "test")
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".txt", ".parquet")
_HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass
class Document:
    text: str
    domain: str | None
    where: str  # "file:line" or "file#row", for error messages and provenance


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand files, directories (recursively, known suffixes) and globs into a sorted list of sources."""
    if not patterns:
        raise SmalltalkError("no input documents given", fix="set data.inputs (files, directories or globs)")
    sources: list[Path] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise SmalltalkError(f"glob matched no files: {pattern}", fix="check data.inputs")
            sources.extend(Path(m) for m in matches)
        else:
            path = Path(pattern)
            if not path.exists():
                raise SmalltalkError(f"input path does not exist: {path}", fix="check data.inputs")
            sources.append(path)
    expanded: list[Path] = []
    for path in sources:
        if path.is_dir() and not _is_hf_dataset(path):
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
            if not found:
                raise SmalltalkError(f"directory holds no readable documents: {path}",
                                     fix=f"put files ending in {', '.join(_SUFFIXES)} there")
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded


def iter_documents(cfg: DataConfig, stats: dict[str, int] | None = None,
                   sources: list[Path] | None = None) -> Iterator[Document]:
    """Yield every non-empty document of the configured inputs (or of `sources`, a slice of
    `resolve_inputs(cfg.inputs)`), in a deterministic order."""
    stats = stats if stats is not None else {}
    stats.setdefault("documents", 0)
    stats.setdefault("empty_documents_skipped", 0)
    for path in resolve_inputs(cfg.inputs) if sources is None else sources:
        count = 0
        for doc in _read_source(path, cfg):
            count += 1
            if not doc.text.strip():
                stats["empty_documents_skipped"] += 1
                continue
            stats["documents"] += 1
            yield doc
            if cfg.max_docs is not None and stats["documents"] >= cfg.max_docs:
                return
        if count == 0:
            raise SmalltalkError(f"input file holds no documents: {path}", fix="remove it from data.inputs")


def _read_source(path: Path, cfg: DataConfig) -> Iterator[Document]:
    name = path.name
    if path.is_dir():
        return _read_hf_dataset(path, cfg)
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return _read_jsonl(path, cfg)
    if name.endswith(".txt"):
        return _read_txt(path, cfg)
    if name.endswith(".parquet"):
        return _read_parquet(path, cfg)
    raise SmalltalkError(f"unsupported input file type: {path}",
                         fix=f"use one of {', '.join(_SUFFIXES)} or a datasets.save_to_disk directory")


def _read_jsonl(path: Path, cfg: DataConfig) -> Iterator[Document]:
    opener = gzip.open if name_is_gz(path) else open
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise SmalltalkError(f"invalid UTF-8 at byte {exc.start} of the line", where=where,
                                         fix="re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = parse_json(line, max_depth=None)
                except BadInput as exc:
                    raise SmalltalkError(str(exc), where=where,
                                         fix="fix or remove that line; each line must be one JSON object") from None
                yield _record_to_doc(record, cfg, where)
    except (OSError, EOFError) as exc:  # gzip damage
        raise SmalltalkError(f"cannot read {path}: {exc}", fix="check the file is complete") from None


def name_is_gz(path: Path) -> bool:
    return path.name.endswith(".gz")


def _record_to_doc(record: object, cfg: DataConfig, where: str) -> Document:
    if not isinstance(record, dict):
        raise SmalltalkError("a JSONL line must be an object", where=where)
    if cfg.text_field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise SmalltalkError(f"record has no text field '{cfg.text_field}' (fields: {fields})", where=where,
                             fix="set data.text_field to the field that holds the text")
    text = record[cfg.text_field]
    if not isinstance(text, str):
        raise SmalltalkError(f"field '{cfg.text_field}' is {type(text).__name__}, not a string", where=where)
    domain = record.get(cfg.domain_field) if cfg.domain_field else None
    return Document(text, None if domain is None else str(domain), where)


def _read_txt(path: Path, cfg: DataConfig) -> Iterator[Document]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise SmalltalkError("invalid UTF-8", where=f"{path}:{lineno}", fix="re-encode the file as UTF-8") from None
    if cfg.txt_mode == "file":
        yield Document(text, None, f"{path}:1")
        return
    if cfg.txt_mode != "blocks":
        raise SmalltalkError(f"data.txt_mode must be 'file' or 'blocks', got {cfg.txt_mode!r}")
    position, lineno = 0, 1
    for match in re.finditer(r"\n(?:[ \t]*\n)+|$", text):
        block = text[position:match.start()]
        if block.strip():
            lead = len(block) - len(block.lstrip("\n"))
            yield Document(block.strip("\n"), None, f"{path}:{lineno + lead}")
        lineno += text.count("\n", position, match.end())
        position = match.end()
        if match.start() == len(text):
            break


def _read_parquet(path: Path, cfg: DataConfig) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise SmalltalkError(f"cannot read parquet file: {exc}", where=str(path)) from None
    columns = parquet.schema_arrow.names
    if cfg.text_field not in columns:
        raise SmalltalkError(f"parquet file has no column '{cfg.text_field}' (columns: {', '.join(columns)})",
                             where=str(path), fix="set data.text_field to the text column")
    wanted = [cfg.text_field] + ([cfg.domain_field] if cfg.domain_field in columns else [])
    row = 0
    for batch in parquet.iter_batches(columns=wanted, batch_size=4096):
        texts = batch.column(cfg.text_field).to_pylist()
        domains = batch.column(cfg.domain_field).to_pylist() if len(wanted) > 1 else [None] * len(texts)
        for text, domain in zip(texts, domains, strict=True):
            yield Document(text or "", None if domain is None else str(domain), f"{path}#row{row}")
            row += 1


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _HF_MARKERS)


def _read_hf_dataset(path: Path, cfg: DataConfig) -> Iterator[Document]:
    """A `datasets.save_to_disk` directory; a DatasetDict contributes all its splits (we re-split)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split_name, dataset in parts:
        if cfg.text_field not in dataset.column_names:
            raise SmalltalkError(
                f"dataset has no column '{cfg.text_field}' (columns: {', '.join(dataset.column_names)})",
                where=f"{path}/{split_name}", fix="set data.text_field to the text column")
        has_domain = cfg.domain_field in dataset.column_names
        for row, record in enumerate(dataset):
            domain = record[cfg.domain_field] if has_domain else None
            yield Document(record[cfg.text_field] or "", None if domain is None else str(domain),
                           f"{path}/{split_name}#row{row}")


def split_of(text: str, cfg: DataConfig) -> str:
    """Assign a document to a split by a seeded hash of its text.

    Content hashing makes the split independent of file order and paths, streamable, and puts exact
    duplicates in the same split (no train/test leakage through copies).
    """
    key = cfg.split_seed.to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
    u = int.from_bytes(digest, "little") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.validation_fraction:
        return "validation"
    return "train"
