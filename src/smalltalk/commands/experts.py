"""Training verbs: `trunk train`, `experts train|add|remove`, `dense train`, `train lm`."""

from __future__ import annotations

import argparse

from smalltalk.commands.common import add_common, is_main_rank, load, path_or
from smalltalk.errors import SmalltalkError
from smalltalk.layout import DENSE_KINDS


def cmd_trunk_train(args: argparse.Namespace) -> None:
    from smalltalk.experts.start import train_trunk

    cfg, run = load(args)
    summary = train_trunk(cfg, run)
    if is_main_rank():
        print(f"trunk: {summary['steps']} steps on the whole train split, final loss {summary['final_loss']:.4f} "
              f"-> {run.trunk}; every expert branches from it")


def cmd_experts_train(args: argparse.Namespace) -> None:
    from smalltalk.experts.expert import train_expert
    from smalltalk.mixture.model import write_mixture_manifest
    from smalltalk.run.launch import train_all_experts

    cfg, run = load(args)
    if args.all:
        train_all_experts(cfg, run, args.parallel or cfg.experts.parallel)
        print(f"all {run.num_experts()} experts trained -> {run.experts_dir}; mixture -> {run.mixture_file}")
        return
    if args.expert is None:
        raise SmalltalkError("say which expert to train", fix="pass --expert K or --all")
    summary = train_expert(cfg, run, args.expert)
    if write_mixture_manifest(run):  # the last expert to finish ties the mixture together
        print(f"every expert is trained: mixture -> {run.mixture_file}")
    if is_main_rank():
        print(f"expert {args.expert:02d}: {summary['steps']} steps, {summary['tokens_per_param']:.0f} "
              f"tokens/param, final loss {summary['final_loss']:.4f}")


def cmd_experts_add(args: argparse.Namespace) -> None:

    from smalltalk.data.shards import SplitData
    from smalltalk.experts.elastic import add_expert, routing_shift

    cfg, run = load(args)  # the run's own config.json: same tokenizer, presets
    before = run.mixture()  # routed as it is: the comparison after the add
    added = add_expert(cfg, run, args.data, args.steps, args.router_steps)
    router = added["router"]
    router_did = (f"{router['steps']} steps" if "steps" in router else f"counted {router['counted_sequences']} "
                  f"prefixes, scaled by {router['scaled_by']:.3g} to the others' weight")
    print(f"added pair {added['pair']:02d} as mixture expert {added['index']}: router {router_did}, expert "
          f"{added['expert']['steps']} steps ({added['expert']['tokens_per_param']:.0f} tokens/param) "
          f"on {added['train_sequences']} sequences")
    for name, data_dir in (("new", run.added(added["pair"])), ("old", run.data)):
        val = SplitData(data_dir, "validation")
        if len(val):
            ids = val.sample(512)
            shift = routing_shift(run.root, before, added["manifest"], val, ids, run.prefix())
            new_dir = added["manifest"]["expert_dirs"][-1]
            print(f"{name} validation sequences routed to the new expert: "
                  f"{(shift['chosen_after'] == new_dir).mean():.1%} (of {len(ids)})")


def cmd_experts_remove(args: argparse.Namespace) -> None:
    from smalltalk.experts.elastic import remove_expert

    _, run = load(args)
    removed = remove_expert(run, args.expert, args.delete)
    print(f"removed expert {args.expert} ({removed['expert_dir']}, router {removed['router_dir']}); "
          f"the mixture now has {removed['manifest']['experts']} experts"
          + ("" if args.delete else " (files kept on disk)"))


def cmd_experts_data(args: argparse.Namespace) -> None:
    from smalltalk.experts.expert import write_expert_data

    cfg, run = load(args)
    for path in write_expert_data(cfg, run, args.expert):
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{path}: {size / 2**20:.1f} MiB")


def cmd_dense_train(args: argparse.Namespace) -> None:
    from smalltalk.experts.dense import dense_kinds, train_dense

    cfg, run = load(args)
    if args.match:
        cfg.dense.match = args.match
    for kind in [args.kind] if args.kind else dense_kinds(cfg):
        summary = train_dense(cfg, run, kind)
        print(f"dense {kind}: {summary['params'] / 1e6:.3f}M params, {summary['steps']} steps, "
              f"{summary['tokens_per_param']:.0f} tokens/param, final loss {summary['final_loss']:.4f}")


def cmd_train_lm(args: argparse.Namespace) -> None:
    from smalltalk.data.shards import SplitData
    from smalltalk.llama import resolve_spec
    from smalltalk.training.trainer import TrainJob, train

    cfg, run = load(args)
    data = SplitData(path_or(args.data, run.data), "train")
    spec = resolve_spec(cfg.model, data.vocab_size)
    val = SplitData(data.dir, "validation")
    out = path_or(args.out, run.lm)
    summary = train(TrainJob(spec, cfg.train, data, out, val=val if len(val) else None, name="lm"),
                    resume=args.resume)
    if is_main_rank():
        print(f"trained {summary['steps']} steps, {summary['tokens'] / 1e6:.2f}M tokens "
              f"({summary['tokens_per_param']:.2f}/param), final loss {summary['final_loss']:.4f} -> {out}")


def register(sub) -> None:
    trunk = sub.add_parser("trunk", help="the shared trunk (experts.init=trunk)").add_subparsers(dest="action",
                                                                                               required=True)
    p = trunk.add_parser("train", help="train the dense trunk every expert branches from (resumes)")
    add_common(p)
    p.set_defaults(func=cmd_trunk_train)

    experts = sub.add_parser("experts", help="expert stage").add_subparsers(dest="action", required=True)
    p = experts.add_parser("train", help="train expert K on its partition share (or --all)")
    add_common(p)
    p.add_argument("--expert", type=int)
    p.add_argument("--all", action="store_true", help="every expert, each as its own process")
    p.add_argument("--parallel", type=int, help="expert processes at once (with --all)")
    p.set_defaults(func=cmd_experts_train)
    p = experts.add_parser("data", help="write each expert's share as its own prepared data (RUN/experts-data/KK)")
    add_common(p)
    p.add_argument("--expert", type=int, nargs="+", help="only these experts (default: all)")
    p.set_defaults(func=cmd_experts_data)
    p = experts.add_parser("add", help="train a new router + expert on new documents and append the pair")
    add_common(p)
    p.add_argument("--data", nargs="+", required=True, help="new documents (jsonl/txt/parquet files or dirs)")
    p.add_argument("--steps", type=int, help="expert steps (default: the run's experts' steps)")
    p.add_argument("--router-steps", type=int, help="router steps (default: as many as each EM router trained)")
    p.set_defaults(func=cmd_experts_add)
    p = experts.add_parser("remove", help="drop expert K and its router from the mixture")
    p.add_argument("--run", "--run-dir", dest="run", required=True)
    p.add_argument("--expert", type=int, required=True, help="index in mixture.json (0-based)")
    p.add_argument("--delete", action="store_true", help="also delete the pair's files")
    p.set_defaults(func=cmd_experts_remove, config=None, set=[])

    dense = sub.add_parser("dense", help="dense baselines").add_subparsers(dest="action", required=True)
    p = dense.add_parser("train", help="compute-matched (and bigger) dense baselines")
    add_common(p)
    p.add_argument("--match", choices=["steps", "batch"], help="spend the budget in more steps (default) or a larger "
                   "batch (the paper)")
    p.add_argument("--kind", choices=DENSE_KINDS)
    p.set_defaults(func=cmd_dense_train)

    tr = sub.add_parser("train", help="training").add_subparsers(dest="action", required=True)
    p = tr.add_parser("lm", help="train one LM on prepared data")
    add_common(p)
    p.add_argument("--data", help="prepared data directory (default RUN/data)")
    p.add_argument("--out", help="output directory (default RUN/lm)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=cmd_train_lm)
