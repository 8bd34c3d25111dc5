"""Evaluation verbs: `eval` (the mixture vs the dense baselines), `eval ppl`, `eval downstream`, `report`,
`model info`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smalltalk.commands.common import add_common, add_split, chosen_split, load, path_or
from smalltalk.layout import RunLayout


def cmd_eval_mixture(args: argparse.Namespace) -> None:
    from smalltalk.evaluation.eval_stage import evaluate_run, format_results

    cfg, run = load(args)
    out = path_or(args.eval_out, run.eval_final if args.final else run.eval)
    results = evaluate_run(cfg, run, Path(args.eval_data) if args.eval_data else None, out, final=args.final)
    print(format_results(results))
    print(f"results -> {run.results_file(out)}")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from smalltalk.training.nll import perplexity

    result = perplexity(args.model, args.data, chosen_split(args), args.batch_size, args.device, args.first_target,
                        args.max_sequences)
    print(json.dumps(result, indent=2))


def cmd_eval_downstream(args: argparse.Namespace) -> None:
    from smalltalk.evaluation.lm_harness import evaluate_downstream

    results = evaluate_downstream(args.run, args.tasks, args.include_path, args.limit, args.device,
                                  args.num_fewshot)
    summary = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
               for task, metrics in results["results"].items()}
    print(json.dumps(summary, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")


def cmd_report(args: argparse.Namespace) -> None:
    from smalltalk.evaluation.report import write_report

    print(f"report -> {write_report(RunLayout(Path(args.run_dir)))}")


def cmd_model_info(args: argparse.Namespace) -> None:
    from smalltalk.config import ModelConfig
    from smalltalk.flops import forward_flops
    from smalltalk.llama import PRESETS, describe, resolve_spec

    for name in args.presets or list(PRESETS):
        spec = resolve_spec(ModelConfig(preset=name), PRESETS.get(name, PRESETS["test-tiny"]).vocab_size
                            or args.vocab_size)
        print(f"{name:18s} {describe(spec)}  fwd/seq({args.seq_len}) exact "
              f"{forward_flops(spec, args.seq_len):.3e} paper {forward_flops(spec, args.seq_len, 1, 'paper'):.3e}")


def register(sub) -> None:
    eval_parser = sub.add_parser("eval", help="evaluation: `eval --run RUN` (mixture vs dense) or `eval ppl`")
    add_common(eval_parser)  # `smalltalk eval --run RUN` (no sub-action) evaluates the mixture
    eval_parser.add_argument("--data", dest="eval_data",
                             help="prepared data to evaluate on (default RUN/data; e.g. RUN/added/NN/data after "
                                  "`experts add`); must use the run's tokenizer")
    eval_parser.add_argument("--out", dest="eval_out", help="results directory (default RUN/eval, with --final "
                             "RUN/eval-final)")
    eval_parser.add_argument("--final", action="store_true", help="evaluate the test split, once, for the final "
                             "table (everything else, and every choice, uses the validation split)")
    eval_parser.set_defaults(func=cmd_eval_mixture)
    ev = eval_parser.add_subparsers(dest="action", required=False)

    p = ev.add_parser("ppl", help="token-level perplexity on a split")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--data", required=True, help="prepared data directory")
    add_split(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--first-target", type=int, default=1, help="score tokens from this position on")
    p.add_argument("--max-sequences", type=int)
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("downstream", help="lm-evaluation-harness tasks through the routed mixture")
    p.add_argument("--run", required=True, help="run directory or exported mixture")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--include-path", help="directory of local task YAML files")
    p.add_argument("--limit", type=int)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--output", help="write the metrics as JSON here")
    p.set_defaults(func=cmd_eval_downstream)

    p = sub.add_parser("report", help="plots + report.md + index.html of a run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    mo = sub.add_parser("model", help="model presets").add_subparsers(dest="action", required=True)
    p = mo.add_parser("info", help="parameter counts and FLOPs of presets")
    p.add_argument("presets", nargs="*")
    p.add_argument("--vocab-size", type=int, default=1024, help="vocabulary for presets without one")
    p.add_argument("--seq-len", type=int, default=1024)
    p.set_defaults(func=cmd_model_info)
