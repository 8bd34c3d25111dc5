"""Routed post-training: the chat template and its loss mask, instruction files, the sft-demo builder, and
`smalltalk run` with the sft stage on a real tiny mixture."""

import gzip
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from smalltalk.data.chat import CHAT_TEMPLATE, encode
from smalltalk.errors import SmalltalkError
from smalltalk.layout import TrainFiles
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.serving.protocol import Validator, chat_prompt
from smalltalk.sft.data import IGNORE, pack_rows
from smalltalk.sft.demo import build_sft_demo
from smalltalk.sft.examples import read_examples

from .conftest import cli


def _tokenizer(run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_loss_mask_covers_assistant_tokens_only(prepared_run):
    tok = _tokenizer(prepared_run)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "etaoin shrdlu"},
                {"role": "assistant", "content": "xyz_ = 1"}, {"role": "user", "content": "äöü"},
                {"role": "assistant", "content": "kwjv"}]
    ids, mask = encode(tok, messages)
    eos = tok.eos_token_id
    head1 = tok("<|system|>\nbe brief\n<|user|>\netaoin shrdlu\n<|assistant|>\n").input_ids
    answer1 = tok("xyz_ = 1").input_ids + [eos]
    head2 = tok("<|user|>\näöü\n<|assistant|>\n").input_ids
    answer2 = tok("kwjv").input_ids + [eos]
    assert ids == head1 + answer1 + head2 + answer2
    assert mask == [0] * len(head1) + [1] * len(answer1) + [0] * len(head2) + [1] * len(answer2)
    tokens, labels = pack_rows([(ids, mask)], len(ids) + 8, eos)
    assert (labels[0, :len(ids)] == np.where(np.array(mask, bool), ids, IGNORE)).all()
    assert (labels[0, len(ids):] == IGNORE).all() and (tokens[0, len(ids):] == eos).all()
    # the template renders what was trained on, and a first turn exactly as the server's built-in format
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok(rendered).input_ids == ids
    first_turn = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert first_turn == chat_prompt(messages[:2])
    validator = Validator(tok, "smalltalk", 64, 8)
    assert validator._chat(messages[:4]) == tok.apply_chat_template(messages[:4], tokenize=False,
                                                                     add_generation_prompt=True)


def test_instruction_files_in_every_format_and_bad_lines(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}], "domain": "x"},
            {"prompt": "q2", "completion": "a2"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("a.jsonl", "b.jsonl.gz"):
        examples = read_examples(tmp_path / name)
        assert [e["messages"][-1]["content"] for e in examples] == ["a1", "a2"]
        assert [e["domain"] for e in examples] == ["x", None]
    import pyarrow
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.Table.from_pylist([{"prompt": "q3", "completion": "a3", "domain": "y"}]),
                   tmp_path / "c.parquet")
    assert read_examples(tmp_path / "c.parquet")[0]["messages"][0] == {"role": "user", "content": "q3"}
    for bad, why in (('{"prompt": "q"}', "prompt"), ("{not json", "JSON"),
                     ('{"messages": [{"role": "user", "content": "<|assistant|>"}, '
                      '{"role": "assistant", "content": "a"}]}', "role marker"),
                     ('{"messages": [{"role": "user", "content": "q"}]}', "assistant")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(rows[1]) + "\n" + bad + "\n")
        with pytest.raises(SmalltalkError, match=why) as err:
            read_examples(tmp_path / "bad.jsonl")
        assert "bad.jsonl:2" in str(err.value)


def test_sft_demo_extracts_questions_from_real_formats(tmp_path):
    man = ("NAME\n       ls - list directory contents\n\nSYNOPSIS\n       ls [OPTION]... [FILE]...\n\n"
           "DESCRIPTION\n       List information about the FILEs (the current directory by default).  Sort entries "
           "alphabetically if none of -cftuvSUX nor --sort is specified.\n")
    german = "NAME\n       nologin - lehnt höflich eine Anmeldung ab\n\nÜBERSICHT\n       nologin\n\nSIEHE AUCH\n"
    python = 'def parse_args(argv, strict=True):\n    """Parse the command line into options and return them."""\n'
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = {"manual": [man] * 12, "german": [german] * 12, "code": [python] * 12}
    for domain, texts in docs.items():
        with gzip.open(corpus / f"{domain}.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps({"text": t, "domain": domain, "source": f"{domain}-{i}"}) + "\n"
                              for i, t in enumerate(texts))
    stats = build_sft_demo(corpus, tmp_path / "sft", max_per_domain=20)
    examples = {split: read_examples(tmp_path / "sft" / f"{split}.jsonl.gz") for split in stats["splits"]}
    assert sum(map(len, examples.values())) == sum(stats["splits"].values()) and all(examples.values())
    pairs = {(e["messages"][0]["content"], e["messages"][1]["content"]) for s in examples.values() for e in s}
    assert ("What does the command `ls` do?", "List directory contents") in pairs
    assert ("How is `ls` invoked?", "ls [OPTION]... [FILE]...") in pairs
    assert ("Was macht der Befehl `nologin`?", "Lehnt höflich eine Anmeldung ab") in pairs
    assert ("What does the Python function `parse_args(argv, strict=True)` do?",
            "Parse the command line into options and return them.") in pairs
    assert stats["domains"]["manual"]["man-name"] >= 1


@pytest.mark.slow
def test_run_with_sft_stage_tunes_each_expert_on_its_examples(pipeline_run, instructions, tmp_path):
    run, args = pipeline_run
    settings = ["--set", "sft.enabled=true", "--set", f"sft.data={instructions}", "--set", "sft.lr=3e-3",
                "--set", "sft.micro_batch_size=8", "--set", "sft.replay=0.5"]
    assert cli(*args, *settings) == 0
    sft = run / "sft"
    routed = json.loads((sft / "examples.json").read_text())
    experts = [e["expert"] for e in routed["splits"]["train"]]
    results = json.loads((sft / "results.json").read_text())
    mixture = SmallTalkMixture.from_pretrained(sft)
    for k in range(mixture.num_experts):
        before = load_file(str(run / "experts" / f"{k:02d}" / "model" / "model.safetensors"))
        after = load_file(str(sft / "experts" / f"{k:02d}" / "model" / "model.safetensors"))
        changed = any(not (before[n] == after[n]).all() for n in before)
        assert changed == (k in experts), f"expert {k}: tuned iff examples were routed to it"
    steps = [TrainFiles(sft / "experts" / f"{k:02d}").summary()["steps"] for k in sorted(set(experts))]
    assert TrainFiles(sft / "dense").summary()["steps"] == sum(steps)
    ppl = results["perplexity"]["all"]
    assert ppl["mixture_sft"] < ppl["mixture"] and ppl["dense_sft"] < ppl["dense"]
    assert set(results["perplexity"]) >= {"code", "prose", "german", "all"}
    assert 0 <= results["routing_stability"] <= 1
    assert sum(sum(c.values()) for c in results["confusion"].values()) == ppl_examples(results)
    # the SFT mixture is a mixture directory: generate and export take it, its tokenizer has the template
    assert mixture.tokenizer.chat_template == CHAT_TEMPLATE
    assert cli("generate", "--run", sft, "etaoin shrdlu", "--max-new-tokens", "4") == 0
    from types import SimpleNamespace

    from smalltalk.evaluation.lm_harness import SmallTalkLM  # `smalltalk eval downstream --run RUN/sft`'s model

    (logprob, _), = SmallTalkLM(str(sft)).loglikelihood([SimpleNamespace(args=("etaoin shrdlu", " xyz"))])
    assert logprob < 0
    assert cli("export", "--run", sft, "--out", tmp_path / "export", "--format", "smalltalk") == 0
    assert SmallTalkMixture.from_pretrained(tmp_path / "export").tokenizer.chat_template == CHAT_TEMPLATE
    # `smalltalk eval` takes the SFT mixture on prepared pre-training text (it has no data/ of its own)
    assert cli("eval", "--run", sft, "--out", tmp_path / "no-data") == 2
    assert cli("eval", "--run", sft, "--data", run / "data", "--out", tmp_path / "sft-eval") == 0
    evaluated = json.loads((tmp_path / "sft-eval" / "results.json").read_text())
    pre = json.loads((run / "eval" / "results.json").read_text())
    assert evaluated["sequences"] == pre["sequences"] and evaluated["tokens_per_param"] is None
    assert set(evaluated["flops"]["exact"]) == {"inference"}
    inference = evaluated["flops"]["exact"]["inference"]
    assert inference == {k: pre["flops"]["exact"]["inference"][k] for k in inference}
    assert evaluated["sweep"][0]["mixture_all"]["ppl"] != pre["sweep"][0]["mixture_all"]["ppl"]  # other experts
    # the server routes a chat request as the SFT routed its examples: on the first user message alone
    from smalltalk.serving.batching import BatchedEngine

    engine = BatchedEngine(mixture, "smalltalk", 8)
    messages = [{"role": "system", "content": "xyz_ ;"}, {"role": "user", "content": "äöü kwjv"}]
    req = engine.validate({"messages": messages, "max_tokens": 4}, chat=True)
    assert req["route_ids"].tolist() == [mixture.tokenizer("äöü kwjv").input_ids]
    assert engine.route(req)["expert"] == int(mixture.route(req["route_ids"])[0][0])
    engine.close()
    # a rerun finds everything done; route_on=prompt into another directory routes on the chat prompt
    assert cli(*args, *settings) == 0
    assert json.loads((sft / "results.json").read_text()) == results
    by_prompt = ["sft", "--run", run, "--data", instructions, "--out", tmp_path / "by-prompt",
                 "--set", "sft.route_on=prompt", "--set", "sft.micro_batch_size=8", "--no-measure"]
    assert cli(*by_prompt, "--only", "dense", "0") == 0  # jobs split over machines: the mixture waits for all
    assert not (tmp_path / "by-prompt" / "mixture.json").exists()
    assert TrainFiles(tmp_path / "by-prompt" / "dense").done()
    assert cli(*by_prompt) == 0
    assert json.loads((tmp_path / "by-prompt" / "examples.json").read_text())["route_on"] == "prompt"
    assert json.loads((tmp_path / "by-prompt" / "mixture.json").read_text())["sft"]["route_on"] == "prompt"
    # other settings into the same directory would mix two SFTs: refused; an empty train file too
    assert cli(*by_prompt[:-5], "--set", "sft.route_on=user_text", "--no-measure") == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli("sft", "--run", run, "--data", empty, "--out", tmp_path / "none", "--no-measure") == 2


def ppl_examples(results: dict) -> int:
    return results["perplexity"]["all"]["examples"]
