"""`smalltalk data prepare`: documents -> packed token shards, in one process or in parts by input file.

A part encodes input files [I, J) into OUT.parts/IIIIIIII-JJJJJJJJ/: per split the raw token stream
(documents joined by the end-of-text id, not yet cut into sequences), each document's length and domain.
The merge concatenates the parts in file order, numbers the domains by first appearance and cuts each
stream into sequences. One process is one part followed by the same merge, so the bytes are identical
however the files were divided (`--part K/P` jobs, `smalltalk launch --stage data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from smalltalk.config import Config
from smalltalk.data.ingest import SPLITS, iter_documents, resolve_inputs, split_of
from smalltalk.data.shards import FORMAT_VERSION, release_pages
from smalltalk.data.tokenizer import load_tokenizer
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, remove_tree, sha256_file, write_json
from smalltalk.layout import DataFiles, Parts, manifest_of

_INDEX_BLOCK = 1 << 16  # document / sequence index entries handled at once (~3 MB of temporaries)

_COPY = 1 << 24  # bytes copied at once by the merge


def prepare_data(cfg: Config, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Read, split by document, encode in parallel batches, pack and write `out_dir` atomically."""
    sources = resolve_inputs(cfg.data.inputs)
    encode_part(cfg, tokenizer_dir, out_dir, 0, len(sources), capped=True)
    return merge_data(cfg, tokenizer_dir, out_dir)


def part_files(cfg: Config, part: int, parts: int) -> tuple[int, int]:
    """Input files [I, J) of part `part` of `parts` (files sorted as `resolve_inputs` lists them)."""
    count = len(resolve_inputs(cfg.data.inputs))
    if not 0 <= part < parts:
        raise SmalltalkError(f"--part {part}/{parts}: K must be in 0..{parts - 1}")
    return part * count // parts, (part + 1) * count // parts


def encode_part(cfg: Config, tokenizer_dir: str | Path, out_dir: str | Path, first: int, last: int,
                capped: bool = False) -> dict:
    """Encode input files [first, last) into a part of `out_dir` (skipped if that part is already done)."""
    if cfg.data.max_docs is not None and not capped:
        raise SmalltalkError("data.max_docs caps the documents of all files together; parts cannot honour it",
                             fix="prepare in one process, or set data.max_docs=null")
    if cfg.data.seq_len < 2:
        raise SmalltalkError(f"data.seq_len must be at least 2, got {cfg.data.seq_len}")
    target = Parts(Path(out_dir)).part(first, last)
    if manifest_of(target).is_file():
        return read_json(manifest_of(target))
    sources = resolve_inputs(cfg.data.inputs)[first:last]
    tokenizer, tok_manifest = load_tokenizer(tokenizer_dir)
    dtype = np.dtype(np.uint16 if tok_manifest["vocab_size"] < 65536 else np.uint32)
    stats: dict = {}
    domains: dict[str, int] = {}
    chars, start = 0, time.perf_counter()
    with atomic_dir(target) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        writers = {s: _StreamWriter(tmp, s, dtype, tok_manifest["eot_id"]) for s in SPLITS}
        buffers: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLITS}
        pending = None  # encoding runs in a thread (Rust releases the GIL) while we read the next batch
        bar = tqdm(unit="B", unit_scale=True, desc="prepare", disable=None, mininterval=1.0)

        def flush(split: str) -> None:
            nonlocal pending
            texts, doms = buffers[split]
            buffers[split] = ([], [])
            if pending is not None:
                pending.result()
            future = pool.submit(tokenizer.encode_batch, texts, add_special_tokens=False)
            pending = pool.submit(lambda f=future, s=split, d=doms: writers[s].add(f.result(), d))

        for doc in iter_documents(cfg.data, stats, sources):
            split = split_of(doc.text, cfg.data)
            buffers[split][0].append(doc.text)
            buffers[split][1].append(-1 if doc.domain is None else domains.setdefault(doc.domain, len(domains)))
            chars += len(doc.text)
            bar.update(len(doc.text))
            if len(buffers[split][0]) >= cfg.data.encode_batch_docs:
                flush(split)
        for split in SPLITS:
            if buffers[split][0]:
                flush(split)
        if pending is not None:
            pending.result()
        bar.close()
        for writer in writers.values():
            writer.close()
        manifest = {"kind": "data-part", "files": [first, last], "dtype": dtype.name,
                    "tokenizer_sha256": tok_manifest["sha256"], "domains": sorted(domains, key=domains.get),
                    "documents": stats["documents"], "empty_documents_skipped": stats["empty_documents_skipped"],
                    "chars": chars, "seconds": round(time.perf_counter() - start, 3),
                    "tokens": {s: DataFiles(tmp).tokens(s).stat().st_size // dtype.itemsize for s in SPLITS}}
        write_json(manifest_of(tmp), manifest)
    return manifest


class _StreamWriter:
    """One split of a part: its token stream, document lengths and (part-local) domain ids, all appended
    to files as documents arrive (memory O(batch), not O(documents))."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, eot_id: int) -> None:
        self.files, self.split, self.dtype = DataFiles(directory), split, dtype
        # closed in close()
        self.handle = open(self.files.tokens(split), "wb")  # noqa: SIM115
        self.lengths = open(self.files.raw_index(split, "doc_lengths"), "wb")  # noqa: SIM115
        self.domains = open(self.files.raw_index(split, "doc_domains"), "wb")  # noqa: SIM115
        self.eot = np.array([eot_id], dtype=dtype)

    def add(self, encodings: list, domains: list[int]) -> None:
        pieces = []
        for enc in encodings:
            pieces.append(np.asarray(enc.ids, dtype=self.dtype))
            pieces.append(self.eot)
        self.handle.write(np.concatenate(pieces).tobytes())
        self.lengths.write(np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings)).tobytes())
        self.domains.write(np.asarray(domains, dtype=np.int16).tobytes())

    def close(self) -> None:
        for handle in (self.handle, self.lengths, self.domains):
            handle.close()
        for name, dtype in (("doc_lengths", np.int64), ("doc_domains", np.int16)):
            raw = self.files.raw_index(self.split, name)
            _to_npy(np.memmap(raw, dtype=dtype, mode="r") if raw.stat().st_size else np.zeros(0, dtype),
                    self.files.index(self.split, name))
            raw.unlink()


def _to_npy(array: np.ndarray, path: Path) -> None:
    """Write `array` (e.g. a memmap) as .npy block by block."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    for start in range(0, len(array), _INDEX_BLOCK):
        block = np.array(array[start:start + _INDEX_BLOCK])
        out[start:start + len(block)] = block
        release_pages(array, out)  # memory O(block), not O(documents)
    out.flush()
    del out


def merge_data(cfg: Config, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """The prepared dataset from the finished parts (which must cover every input file), then drop them."""
    out_dir = Path(out_dir)
    files, count = Parts(out_dir), len(resolve_inputs(cfg.data.inputs))
    ranges = files.part_ranges()
    if not files.covered(count):
        raise SmalltalkError(f"cannot merge: the finished parts {ranges} do not cover input files 0:{count}",
                             where=str(files.parts), fix="run the missing `data prepare --part K/P` jobs first")
    parts = [files.part(a, b) for a, b in ranges]
    found = [read_json(manifest_of(p)) for p in parts]
    _, tok_manifest = load_tokenizer(tokenizer_dir)
    if {m["tokenizer_sha256"] for m in found} != {tok_manifest["sha256"]}:
        raise SmalltalkError("the parts were encoded with another tokenizer", where=str(files.parts),
                             fix=f"delete {files.parts} and prepare again")
    domains: dict[str, int] = {}
    remaps = [np.array([domains.setdefault(d, len(domains)) for d in m["domains"]] + [-1], np.int16) for m in found]
    seq_len, dtype = cfg.data.seq_len, np.dtype(found[0]["dtype"])
    with atomic_dir(out_dir) as tmp:
        info = {s: _merge_split(tmp, parts, found, remaps, s, seq_len, dtype) for s in SPLITS}
        if info["train"]["sequences"] == 0:
            raise SmalltalkError(f"the train split holds fewer than seq_len={seq_len} tokens",
                                 fix="add documents or lower data.seq_len")
        chars, seconds = sum(m["chars"] for m in found), sum(m["seconds"] for m in found)
        manifest = {
            "kind": "data", "format_version": FORMAT_VERSION, "seq_len": seq_len, "dtype": dtype.name,
            "vocab_size": tok_manifest["vocab_size"], "eot_id": tok_manifest["eot_id"],
            "tokenizer_sha256": tok_manifest["sha256"], "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "domains": sorted(domains, key=domains.get), "splits": info,
            "order": {"kind": "feistel", "seed": cfg.data.order_seed},
            "documents": sum(m["documents"] for m in found),
            "empty_documents_skipped": sum(m["empty_documents_skipped"] for m in found), "chars": chars,
            "seconds": round(seconds, 3), "mb_per_s": round(chars / 1e6 / max(seconds, 1e-9), 3),
            "data_config": dataclasses.asdict(cfg.data),
        }
        write_json(manifest_of(tmp), manifest)
    remove_tree(files.parts)
    return manifest


def _merge_split(out: Path, parts: list[Path], found: list[dict], remaps: list[np.ndarray], split: str,
                 seq_len: int, dtype: np.dtype) -> dict:
    """Concatenate one split's streams, cut them into whole sequences (the tail is recorded), index them.
    Each part's token count is its manifest's (parts written before it was recorded: the file's size)."""
    streams = [DataFiles(p).tokens(split) for p in parts]
    total = sum(m["tokens"][split] if "tokens" in m else s.stat().st_size // dtype.itemsize
                for m, s in zip(found, streams, strict=True))
    n_seq = total // seq_len
    keep, digest = n_seq * seq_len * dtype.itemsize, hashlib.sha256()
    if len(streams) == 1:
        # One process: link the stream into place instead of copying it. A link, not a move: killed before the
        # merged directory is renamed into place, the part keeps its stream (cut to whole sequences, which its
        # manifest's count makes harmless) and the merge can run again; a move left the part without it.
        os.link(streams[0], DataFiles(out).tokens(split))
        with open(DataFiles(out).tokens(split), "r+b") as handle:
            handle.truncate(keep)
        streams = []
        digest = None
    with open(DataFiles(out).tokens(split), "ab" if digest is None else "wb") as target:
        for stream in streams:
            with open(stream, "rb") as source:
                while keep > 0 and (block := source.read(min(_COPY, keep))):
                    target.write(block)
                    digest.update(block)
                    keep -= len(block)
    documents = _merge_indexes(out, parts, remaps, split)
    _seq_domains(DataFiles(out), split, n_seq, seq_len)
    sha = sha256_file(DataFiles(out).tokens(split)) if digest is None else digest.hexdigest()
    return {"documents": documents, "tokens": int(n_seq * seq_len), "sequences": int(n_seq),
            "tail_tokens_dropped": int(total - n_seq * seq_len), "sha256": sha}


def _merge_indexes(out: Path, parts: list[Path], remaps: list[np.ndarray], split: str) -> int:
    """doc_starts (running sum of the parts' lengths) and doc_domains (remapped to the merged domain ids),
    streamed block by block from the parts' files."""
    files = DataFiles(out)
    lengths = [np.load(DataFiles(p).index(split, "doc_lengths"), mmap_mode="r") for p in parts]
    total = sum(len(x) for x in lengths)
    starts = np.lib.format.open_memmap(files.index(split, "doc_starts"), mode="w+", dtype=np.int64, shape=(total,))
    domains = np.lib.format.open_memmap(files.index(split, "doc_domains"), mode="w+", dtype=np.int16,
                                        shape=(total,))
    position, offset = 0, 0
    for part, part_lengths, remap in zip(parts, lengths, remaps, strict=True):
        part_domains = np.load(DataFiles(part).index(split, "doc_domains"), mmap_mode="r")
        for start in range(0, len(part_lengths), _INDEX_BLOCK):
            block = np.array(part_lengths[start:start + _INDEX_BLOCK])
            sums = np.cumsum(block)
            starts[position:position + len(block)] = offset + sums - block
            domains[position:position + len(block)] = remap[np.asarray(
                part_domains[start:start + len(block)]).astype(np.int64)]
            position, offset = position + len(block), offset + int(sums[-1])
            release_pages(part_lengths, part_domains, starts, domains)
    starts.flush()
    domains.flush()
    del starts, domains
    return total


def _seq_domains(files: DataFiles, split: str, n_seq: int, seq_len: int) -> None:
    """The domain of the document each sequence starts in, looked up block by block."""
    starts = np.load(files.index(split, "doc_starts"), mmap_mode="r")
    domains = np.load(files.index(split, "doc_domains"), mmap_mode="r")
    out = np.lib.format.open_memmap(files.index(split, "seq_domains"), mode="w+", dtype=np.int16, shape=(n_seq,))
    for first in range(0, n_seq, _INDEX_BLOCK):
        positions = np.arange(first, min(n_seq, first + _INDEX_BLOCK), dtype=np.int64) * seq_len
        out[first:first + len(positions)] = domains[np.searchsorted(starts, positions, side="right") - 1]
        release_pages(starts, domains, out)
    out.flush()
    del out
