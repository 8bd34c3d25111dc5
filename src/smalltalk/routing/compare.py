"""Compare routers by how their splits match domain labels (argmax and balanced), per prefix length."""

from __future__ import annotations

from pathlib import Path

from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json
from smalltalk.layout import manifest_of
from smalltalk.routing.assignment import argmax_assignment, balanced_assignment
from smalltalk.routing.metrics import split_quality
from smalltalk.routing.routers import load_routers, score_split


def compare_routers(routers_dirs: list[Path], data_dir: Path, split: str, prefixes: list[int],
                    max_sequences: int | None = None) -> list[dict]:
    data = SplitData(data_dir, split)
    if not data.has_domains:
        raise SmalltalkError(f"split {split!r} of {data_dir} has no domain labels", fix="set data.domain_field")
    ids = data.sample(max_sequences)
    n = len(ids)
    labels = data.seq_domains[ids]
    rows = []
    for routers_dir in routers_dirs:
        manifest = read_json(manifest_of(routers_dir))
        router = load_routers(routers_dir)
        for prefix in prefixes:
            scores = score_split(router, data, ids, min(prefix, data.seq_len))
            argmax, balanced = argmax_assignment(scores), balanced_assignment(scores)
            rows.append({"routers": str(routers_dir), "method": manifest["method"], "experts": router.num_experts,
                         "trained_prefix": manifest["prefix"], "prefix": prefix, "sequences": n,
                         "argmax": split_quality(argmax, labels), "balanced": split_quality(balanced, labels)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| routers | method | E | prefix | NMI (argmax) | purity (argmax) | NMI (balanced) | purity (balanced) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['routers']).name} | {r['method']} | {r['experts']} | {r['prefix']} | "
                     f"{r['argmax']['nmi']:.3f} | {r['argmax']['purity']:.3f} | "
                     f"{r['balanced']['nmi']:.3f} | {r['balanced']['purity']:.3f} |")
    return "\n".join(lines)
