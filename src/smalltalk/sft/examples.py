"""Instruction data in the formats users already have.

A line (JSONL, .jsonl.gz) or a row (parquet) is either {"messages": [{"role", "content"}, ...]} ending with
an assistant message, or {"prompt": str, "completion": str} (read as one user and one assistant turn);
an optional "domain" labels it for the per-domain tables. `--data DIR` reads DIR/train.*, and
DIR/validation.* and DIR/test.* when present; `--data FILE` is the train split alone. A bad line is one
error naming file:line and what is wrong; nothing is skipped silently.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from smalltalk.data.chat import ROLES, ChatFormatError, normalize
from smalltalk.errors import SmalltalkError
from smalltalk.untrusted import BadInput, parse_json

SPLITS = ("train", "validation", "test")
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def split_files(data: Path) -> dict[str, Path]:
    """{split: file} of an instruction dataset path."""
    if data.is_file():
        return {"train": data}
    if not data.is_dir():
        raise SmalltalkError(f"no instruction data at {data}", fix="pass a .jsonl/.jsonl.gz/.parquet file or a "
                             "directory holding train.jsonl (and validation/test)")
    found = {split: data / f"{split}{suffix}" for split in SPLITS for suffix in SUFFIXES
             if (data / f"{split}{suffix}").is_file()}
    if "train" not in found:
        raise SmalltalkError(f"{data} holds no train{'/'.join(SUFFIXES)}", where=str(data),
                             fix="name the training file train.jsonl (or .jsonl.gz, .parquet)")
    return found


def read_examples(path: Path) -> list[dict]:
    """[{"messages", "domain"}] of one file, in file order."""
    rows = _parquet_rows(path) if path.name.endswith(".parquet") else _jsonl_rows(path)
    return [_example(row, f"{path}:{number}") for number, row in rows]


def _jsonl_rows(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, parse_json(line, max_depth=None)
            except BadInput as exc:
                raise SmalltalkError(f"not valid JSON: {exc}", where=f"{path}:{number}",
                                     fix="each line must be one JSON object") from None


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SmalltalkError("reading parquet needs pyarrow", where=str(path), fix="pip install pyarrow") from None
    yield from enumerate(pq.read_table(path).to_pylist(), 1)


def _example(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise SmalltalkError("an example must be a JSON object", where=where)
    domain = row.get("domain")
    if "messages" in row:
        messages = row["messages"]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        raise SmalltalkError("an example needs \"messages\" or string \"prompt\" and \"completion\"", where=where)
    try:
        messages = normalize(messages)  # the server's checks: roles, text contents, no forged role markers
    except ChatFormatError as exc:
        raise SmalltalkError(f"bad messages: {exc}", where=where,
                             fix=f"roles are {', '.join(ROLES)}; contents are strings or lists of text parts") from None
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise SmalltalkError("the last message must be a non-empty assistant answer", where=where)
    if not any(m["role"] == "user" for m in messages):
        raise SmalltalkError("an example needs a user message", where=where)
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "domain": domain if isinstance(domain, str) else None}
