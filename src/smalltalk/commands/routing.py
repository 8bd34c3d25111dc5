"""Routing verbs: `routers train`, `routers refine`, `routers compare`, `partition`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smalltalk.commands.common import add_common, add_split, chosen_split, load, parse_part, path_or
from smalltalk.config import Config
from smalltalk.errors import SmalltalkError
from smalltalk.routing.methods import METHODS

# Flags that are shorthands for --set routing.<name>: the command line wins over the config.
_ROUTING_FLAGS = ("experts", "prefix", "rounds", "chunk", "method", "parallel")


def _apply_flags(cfg: Config, args: argparse.Namespace) -> None:
    for flag in _ROUTING_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg.routing, flag, value)
    if getattr(args, "router", None):
        cfg.routing.router.preset = args.router


def cmd_routers_train(args: argparse.Namespace) -> None:
    from smalltalk.routing.methods import train_routers

    cfg, run = load(args)
    _apply_flags(cfg, args)
    out = path_or(args.out, run.routers)
    manifest = train_routers(cfg, path_or(args.data, run.data), out)
    print(f"routers: {manifest['method']}, {manifest['experts']} experts, prefix {manifest['prefix']} -> {out}")


def cmd_routers_refine(args: argparse.Namespace) -> None:
    from smalltalk.experts.refine import refine_routers

    cfg, run = load(args)
    if args.sequences is not None:
        cfg.refine.sequences = args.sequences
    if not cfg.refine.sequences:
        raise SmalltalkError("refine.sequences is 0 (refinement off)", fix="pass --sequences N or --set "
                             "refine.sequences=N: training sequences to relabel by the experts' own choice")
    refine_routers(cfg, run)


def cmd_partition(args: argparse.Namespace) -> None:
    from smalltalk.routing.partition import chunk_range, job_for, merge_partition, partition

    cfg, run = load(args)
    out = path_or(args.out, run.partition)
    job = job_for(cfg, path_or(args.routers, run.routers), path_or(args.data, run.data), out, prefix=args.prefix,
                  chunk_size=args.chunk_size, device=args.device)
    chunks = _parse_range(args.chunks) if args.chunks else None
    if args.part:
        chunks = chunk_range(job, *parse_part(args.part))
    manifest = merge_partition(job) if args.merge else partition(job, chunks)
    if manifest.get("kind") == "partition":
        quality = manifest.get("quality", {})
        print(f"partition: {manifest['sequences']} sequences -> loads {manifest['counts']}"
              + (f", NMI {quality['nmi']:.3f}, purity {quality['purity']:.3f}" if quality else "") + f" -> {out}")
    elif manifest:
        print(f"partition part: chunks {manifest['chunks'][0]}:{manifest['chunks'][1]} done; merge with "
              f"`smalltalk partition --merge` once every part is done")


def _parse_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit():
        raise SmalltalkError(f"--chunks {text!r} is not I:J", fix="e.g. --chunks 0:64 (chunk I up to, not incl., J)")
    return int(start), int(stop)


def cmd_routers_compare(args: argparse.Namespace) -> None:
    from smalltalk.routing.compare import compare_routers, format_table

    rows = compare_routers([Path(p) for p in args.routers], Path(args.data), chosen_split(args), args.prefix,
                           args.max_sequences)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def register(sub) -> None:
    routers = sub.add_parser("routers", help="router stage").add_subparsers(dest="action", required=True)
    p = routers.add_parser("train", help="train routers: EM router LMs, or the tf-idf / random baselines")
    add_common(p)
    p.add_argument("--data", help="prepared data (default RUN/data)")
    p.add_argument("--out", help="output directory (default RUN/routers)")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--experts", type=int, help="E")
    p.add_argument("--router", help="router model preset")
    p.add_argument("--prefix", type=int, help="M: prefix tokens routers see")
    p.add_argument("--rounds", type=int, help="T: EM rounds")
    p.add_argument("--chunk", type=int, help="N: sequences per EM round")
    p.add_argument("--parallel", type=int, help="router jobs at once within a round")
    p.set_defaults(func=cmd_routers_train)

    p = routers.add_parser("refine", help="fine-tune the trained routers on the experts' own choices (after the "
                           "experts; a departure from the paper): RUN/routers-refined, then mixture.json uses them")
    add_common(p)
    p.add_argument("--sequences", type=int, help="training sequences to relabel (default refine.sequences)")
    p.set_defaults(func=cmd_routers_refine)

    p = routers.add_parser("compare", help="NMI / purity of routers against domain labels")
    p.add_argument("routers", nargs="+", help="router directories")
    p.add_argument("--data", required=True)
    add_split(p)
    p.add_argument("--prefix", type=int, nargs="+", default=[32, 256])
    p.add_argument("--max-sequences", type=int)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_routers_compare)

    p = sub.add_parser("partition", help="assign every training sequence to an expert")
    add_common(p)
    p.add_argument("--routers", help="routers directory (default RUN/routers)")
    p.add_argument("--data", help="prepared data (default RUN/data)")
    p.add_argument("--prefix", type=int, help="M (default: the routers' training prefix)")
    p.add_argument("--chunk-size", type=int, help="balanced assignment per chunk of this many sequences "
                   "(default routing.partition_chunk)")
    p.add_argument("--device", help="where the routers score (default routing.train.device)")
    p.add_argument("--out", help="output directory (default RUN/partition)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--chunks", metavar="I:J", help="only chunks I..J-1, as one resumable part (no merge)")
    which.add_argument("--part", metavar="K/P", help="only part K of P equal parts of the chunks (no merge)")
    which.add_argument("--merge", action="store_true", help="only merge the finished parts into the final shares")
    p.set_defaults(func=cmd_partition)
