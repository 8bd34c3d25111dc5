"""The `smalltalk` command: one subcommand per pipeline stage (litgpt style).

  smalltalk tokenizer train   fit byte-level BPE on the train split (or adopt --pretrained DIR)
  smalltalk data prepare      ingest, split by document, encode, pack into token shards
  smalltalk train lm          plain LM training on prepared data (the shared trainer)
  smalltalk eval ppl          token-level perplexity of a saved model on a split
  smalltalk model info        presets with exact parameter counts and FLOPs
  smalltalk routers train     EM training of the router LMs
  smalltalk partition         route every training sequence to an expert
  smalltalk experts train     train expert K (or --all) on its share, as independent jobs
  smalltalk dense train       compute-matched and bigger dense baselines
  smalltalk eval              the mixture vs the dense baselines, with FLOPs (eval ppl: one model)
  smalltalk report RUN        plots, report.md and index.html
  smalltalk run               every stage of a config in order, skipping finished ones
  smalltalk corpus demo OUT   build the multi-domain demo corpus from local sources
  smalltalk generate          route a prompt and continue it with the chosen expert
  smalltalk export            a self-contained mixture directory (HF experts + routers + tokenizer)
  smalltalk serve             OpenAI-compatible server (completions, chat, SSE streaming, metrics)
  smalltalk plan              job list, token budgets, FLOPs and GPU-hours of a config
  smalltalk launch            a stage as independent jobs: local processes or a SLURM array
  smalltalk status RUN        every stage and expert: state, step, loss, throughput, ETA
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from smalltalk.config import Config, load_config
from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    # --run-dir is the same option; use it under torchrun, whose own parser mistakes --run for --run-path.
    parser.add_argument("--run", "--run-dir", dest="run", help="run directory (overrides run_dir)")


def _load(args: argparse.Namespace) -> tuple[Config, RunLayout]:
    cfg = load_config(args.config, args.set)
    if getattr(args, "run", None):
        cfg.run_dir = args.run
    return cfg, RunLayout(Path(cfg.run_dir))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from smalltalk.data.tokenizer import adopt_pretrained, train_tokenizer

    cfg, run = _load(args)
    if args.input:
        cfg.data.inputs = args.input
    out = Path(args.out) if args.out else run.tokenizer
    pretrained = args.pretrained or cfg.tokenizer.pretrained
    manifest = adopt_pretrained(cfg, pretrained, out) if pretrained else train_tokenizer(cfg, out)
    print(f"tokenizer: vocab {manifest['vocab_size']}, eot id {manifest['eot_id']} -> {out}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from smalltalk.data.shards import prepare_data

    cfg, run = _load(args)
    if args.input:
        cfg.data.inputs = args.input
    out = Path(args.out) if args.out else run.data
    manifest = prepare_data(cfg, Path(args.tokenizer) if args.tokenizer else run.tokenizer, out)
    splits = ", ".join(f"{k} {v['sequences']} seqs" for k, v in manifest["splits"].items())
    print(f"data: {manifest['documents']} docs, {manifest['chars'] / 1e6:.1f}M chars at "
          f"{manifest['mb_per_s']:.2f} MB/s; {splits} of {manifest['seq_len']} tokens -> {out}")


def cmd_train_lm(args: argparse.Namespace) -> None:
    from smalltalk.data.shards import SplitData
    from smalltalk.model import resolve_spec
    from smalltalk.train import TrainJob, train

    cfg, run = _load(args)
    data = SplitData(Path(args.data) if args.data else run.data, "train")
    spec = resolve_spec(cfg.model, data.vocab_size)
    val = SplitData(data.dir, "validation")
    out = Path(args.out) if args.out else run.lm
    summary = train(TrainJob(spec, cfg.train, data, out, val=val if len(val) else None, name="lm"),
                    resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps, {summary['tokens'] / 1e6:.2f}M tokens "
              f"({summary['tokens_per_param']:.2f}/param), final loss {summary['final_loss']:.4f} -> {out}")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from smalltalk.evaluate import perplexity

    result = perplexity(args.model, args.data, args.split, args.batch_size, args.device, args.first_target,
                        args.max_sequences)
    print(json.dumps(result, indent=2))


def cmd_model_info(args: argparse.Namespace) -> None:
    from smalltalk.config import ModelConfig
    from smalltalk.flops import forward_flops
    from smalltalk.model import PRESETS, describe, resolve_spec

    for name in args.presets or list(PRESETS):
        spec = resolve_spec(ModelConfig(preset=name), PRESETS.get(name, PRESETS["test-tiny"]).vocab_size
                            or args.vocab_size)
        print(f"{name:18s} {describe(spec)}  fwd/seq({args.seq_len}) exact "
              f"{forward_flops(spec, args.seq_len):.3e} paper {forward_flops(spec, args.seq_len, 1, 'paper'):.3e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smalltalk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="tokenizer stage").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="fit byte-level BPE on the train split")
    _common(p)
    p.add_argument("--input", nargs="+", help="documents (overrides data.inputs)")
    p.add_argument("--pretrained", help="use this local HF tokenizer directory instead")
    p.add_argument("--out", help="output directory (default RUN/tokenizer)")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data stage").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="encode and pack documents into token shards")
    _common(p)
    p.add_argument("--input", nargs="+", help="documents (overrides data.inputs)")
    p.add_argument("--tokenizer", help="tokenizer directory (default RUN/tokenizer)")
    p.add_argument("--out", help="output directory (default RUN/data)")
    p.set_defaults(func=cmd_data_prepare)

    tr = sub.add_parser("train", help="training").add_subparsers(dest="action", required=True)
    p = tr.add_parser("lm", help="train one LM on prepared data")
    _common(p)
    p.add_argument("--data", help="prepared data directory (default RUN/data)")
    p.add_argument("--out", help="output directory (default RUN/lm)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=cmd_train_lm)

    eval_parser = sub.add_parser("eval", help="evaluation: `eval --run RUN` (mixture vs dense) or `eval ppl`")
    ev = eval_parser.add_subparsers(dest="action", required=False)
    p = ev.add_parser("ppl", help="token-level perplexity on a split")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--first-target", type=int, default=1, help="score tokens from this position on")
    p.add_argument("--max-sequences", type=int)
    p.set_defaults(func=cmd_eval_ppl)

    from smalltalk.cli_use import add_downstream

    add_downstream(ev)

    mo = sub.add_parser("model", help="model presets").add_subparsers(dest="action", required=True)
    p = mo.add_parser("info", help="parameter counts and FLOPs of presets")
    p.add_argument("presets", nargs="*")
    p.add_argument("--vocab-size", type=int, default=1024, help="vocabulary for presets without one")
    p.add_argument("--seq-len", type=int, default=1024)
    p.set_defaults(func=cmd_model_info)

    from smalltalk import cli_pipeline, cli_routing, cli_scale, cli_use

    cli_routing.add_commands(sub, _common)
    cli_pipeline.add_commands(sub, _common)
    cli_pipeline.add_eval_mixture(eval_parser, _common)
    cli_use.add_use_commands(sub)
    cli_use.add_serve_command(sub)
    cli_scale.add_plan_command(sub, _common)
    cli_scale.add_launch_commands(sub, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from smalltalk.model import quiet_transformers
    from smalltalk.runtime import keep_freed_memory

    quiet_transformers()  # our own bars say more
    keep_freed_memory()  # glibc: reuse freed activations instead of page-faulting fresh ones (runtime.py)
    try:
        args.func(args)
    except SmalltalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
