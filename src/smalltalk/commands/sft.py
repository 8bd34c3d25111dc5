"""Post-training: `sft` (routed instruction tuning; its data builder, `corpus sft-demo`, is in data.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalltalk.commands.common import add_common, load
from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout, SFTFiles


def cmd_sft(args: argparse.Namespace) -> None:
    from smalltalk.sft.job import run_sft
    from smalltalk.sft.measure import format_results, measure_sft

    cfg, run = load(args)
    data = args.data or cfg.sft.data
    if not data:
        raise SmalltalkError("no instruction data", fix="pass --data FILE|DIR (or set sft.data)")
    out = Path(args.out) if args.out else run.sft.root
    run_sft(cfg, run, Path(data), out, args.only)
    if not args.no_measure and RunLayout(out).has_mixture():
        print(format_results(measure_sft(run, SFTFiles(out), Path(data), cfg.sft.route_on, args.final)))


def register(sub) -> None:
    p = sub.add_parser("sft", help="instruction-tune each expert on the examples routed to it (+ a dense baseline)")
    add_common(p)
    p.add_argument("--data", help="instruction file (.jsonl, .jsonl.gz, .parquet) or a directory of "
                   "train/validation/test files (default: sft.data)")
    p.add_argument("--out", help="output mixture directory (default RUN/sft)")
    p.add_argument("--no-measure", action="store_true", help="skip the held-out perplexity table")
    p.add_argument("--final", action="store_true", help="measure on the test instructions (once, for the final "
                   "table) instead of validation; writes results-final.json")
    p.add_argument("--only", nargs="+", metavar="JOB", help="run only these jobs: expert numbers and/or 'dense' "
                   "(one machine each); the call that finds all done writes the mixture and measures")
    p.set_defaults(func=cmd_sft)
