"""The `smalltalk` command: one subcommand per pipeline stage (litgpt style).

  smalltalk tokenizer train   fit byte-level BPE on the train split (or adopt --pretrained DIR)
  smalltalk data prepare      ingest, split by document, encode, pack into token shards (--part K/P, --merge)
  smalltalk train lm          plain LM training on prepared data (the shared trainer)
  smalltalk eval ppl          token-level perplexity of a saved model on a split
  smalltalk model info        presets with exact parameter counts and FLOPs
  smalltalk routers train     EM training of the router LMs
  smalltalk partition         route every training sequence to an expert, chunk by chunk (--chunks, --merge)
  smalltalk experts train     train expert K (or --all) on its share, as independent jobs (add|remove: elastic)
  smalltalk experts data      each expert's share as prepared data of its own, for jobs without the corpus
  smalltalk dense train       compute-matched and bigger dense baselines
  smalltalk eval              the mixture vs the dense baselines, with FLOPs (eval ppl: one model)
  smalltalk report RUN        plots, report.md and index.html
  smalltalk run               every stage of a config in order, skipping finished ones
  smalltalk corpus demo OUT   build the multi-domain demo corpus from local sources (sft-demo: instructions)
  smalltalk sft               instruction-tune each expert on what routes to it, + a dense baseline
  smalltalk generate          route a prompt and continue it with the chosen expert
  smalltalk export            a self-contained mixture directory (HF experts + routers + tokenizer)
  smalltalk serve             OpenAI-compatible server (completions, chat, SSE streaming, metrics)
  smalltalk plan              job list, token budgets, FLOPs and GPU-hours of a config
  smalltalk launch            a stage as independent jobs: local processes or a SLURM array
  smalltalk status RUN        every stage and expert: state, step, loss, throughput, ETA
"""

from __future__ import annotations

import argparse
import sys

from smalltalk.commands import data, evaluate, experts, jobs, routing, sft, use
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import disk_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smalltalk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (data, routing, experts, evaluate, sft, use, jobs):  # the order --help lists them
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from smalltalk.llama import quiet_transformers

    quiet_transformers()  # our own bars say more
    try:
        args.func(args)
    except SmalltalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not disk_error(exc):
            raise
        print(f"error: {exc.strerror} (errno {exc.errno}) while writing {exc.filename or 'a file'}\n"
              "  where: " + str(exc.filename or "-") + "\n"
              "  fix:   free space (or fix the storage) and rerun the same command: what was being written was "
              "discarded, every finished artifact and checkpoint before it is intact", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
