"""CLI commands of the routing stages: `routers train`, `routers compare` and `partition`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smalltalk.config import Config


def _apply(cfg: Config, args: argparse.Namespace) -> None:
    """Command-line flags win over the config (they are shorthands for --set routing.*)."""
    rc = cfg.routing
    for flag, attr in (("experts", "experts"), ("prefix", "prefix"), ("rounds", "rounds"), ("chunk", "chunk"),
                       ("method", "method"), ("parallel", "parallel")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(rc, attr, value)
    if getattr(args, "router", None):
        rc.router.preset = args.router


def cmd_routers_train(args: argparse.Namespace) -> None:
    from smalltalk.cli import _load
    from smalltalk.routing.baselines import train_random_router, train_tfidf_router
    from smalltalk.routing.em import train_em_routers

    cfg, run = _load(args)
    _apply(cfg, args)
    data = Path(args.data) if args.data else run.data
    out = Path(args.out) if args.out else run.routers
    trainers = {"em": train_em_routers, "tfidf": train_tfidf_router, "random": train_random_router}
    if cfg.routing.method not in trainers:
        from smalltalk.errors import SmalltalkError

        raise SmalltalkError(f"unknown routing method {cfg.routing.method!r}", fix="use em, tfidf or random")
    manifest = trainers[cfg.routing.method](cfg, data, out)
    print(f"routers: {manifest['method']}, {manifest['experts']} experts, prefix {manifest['prefix']} -> {out}")


def cmd_partition(args: argparse.Namespace) -> None:
    from smalltalk.cli import _load
    from smalltalk.routing.partition import partition

    cfg, run = _load(args)
    routers = Path(args.routers) if args.routers else run.routers
    out = Path(args.out) if args.out else run.partition
    manifest = partition(routers, Path(args.data) if args.data else run.data, out, args.prefix,
                         args.chunk_size or cfg.routing.partition_chunk, cfg.routing.score_batch_size,
                         args.device, cfg.routing.compile, cfg.routing.score_workers)
    if manifest:
        quality = manifest.get("quality", {})
        print(f"partition: {manifest['sequences']} sequences -> loads {manifest['counts']}"
              + (f", NMI {quality['nmi']:.3f}, purity {quality['purity']:.3f}" if quality else "") + f" -> {out}")


def cmd_routers_compare(args: argparse.Namespace) -> None:
    from smalltalk.routing.compare import compare_routers, format_table

    rows = compare_routers([Path(p) for p in args.routers], Path(args.data), args.split, args.prefix,
                           args.max_sequences)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def add_commands(sub, common) -> None:
    routers = sub.add_parser("routers", help="router stage").add_subparsers(dest="action", required=True)
    p = routers.add_parser("train", help="train routers: EM router LMs, or the tf-idf / random baselines")
    common(p)
    p.add_argument("--data", help="prepared data (default RUN/data)")
    p.add_argument("--out", help="output directory (default RUN/routers)")
    p.add_argument("--method", choices=["em", "tfidf", "random"])
    p.add_argument("--experts", type=int, help="E")
    p.add_argument("--router", help="router model preset")
    p.add_argument("--prefix", type=int, help="M: prefix tokens routers see")
    p.add_argument("--rounds", type=int, help="T: EM rounds")
    p.add_argument("--chunk", type=int, help="N: sequences per EM round")
    p.add_argument("--parallel", type=int, help="router jobs at once within a round")
    p.set_defaults(func=cmd_routers_train)

    p = routers.add_parser("compare", help="NMI / purity of routers against domain labels")
    p.add_argument("routers", nargs="+", help="router directories")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--prefix", type=int, nargs="+", default=[32, 256])
    p.add_argument("--max-sequences", type=int)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_routers_compare)

    p = sub.add_parser("partition", help="assign every training sequence to an expert")
    common(p)
    p.add_argument("--routers", help="routers directory (default RUN/routers)")
    p.add_argument("--data", help="prepared data (default RUN/data)")
    p.add_argument("--prefix", type=int, help="M (default: the routers' training prefix)")
    p.add_argument("--chunk-size", type=int, help="balanced assignment per chunk of this many sequences")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output directory (default RUN/partition)")
    p.set_defaults(func=cmd_partition)

