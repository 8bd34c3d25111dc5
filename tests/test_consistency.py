"""Issue #27's consistency rules: the mixture serves on the split its experts trained on, text becomes ids
one way everywhere, the dense baseline is matched to the mixture's whole budget, and the test split is
evaluated only by `--final`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from smalltalk.config import load_config
from smalltalk.data.chat import CHAT_TEMPLATE, encode
from smalltalk.data.tokenizer import encode_text
from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout
from smalltalk.mixture.model import SmallTalkMixture, write_mixture_manifest
from smalltalk.serving.protocol import Validator
from smalltalk.sft.job import routing_ids

from .conftest import TINY_CONFIG, cli


def _bos_tokenizer(source, out):
    """The run's BPE with a post-processor that puts <s> in front of every text, as Llama's tokenizers do."""
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")
    hf.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out)), bos


def test_special_tokens_are_handled_one_way_in_data_routing_sft_and_serving(prepared_run, corpus_file, tmp_path):
    """A local tokenizer that adds BOS: `data prepare` never writes it (nor mid-document), and the server's
    prompt and routing ids, SFT examples and their routing ids never carry it either. Was: serving and SFT
    tokenised with special tokens (BOS on every routing prefix, and mid-example in SFT)."""
    import numpy as np

    from smalltalk.data.shards import SplitData

    tok, bos = _bos_tokenizer(prepared_run / "tokenizer", tmp_path / "bos-tokenizer")
    assert tok("abc def").input_ids[0] == bos  # the tokenizer itself adds it
    run = tmp_path / "run"
    common = ["--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus_file}]",
              "--set", "data.max_docs=null"]
    assert cli("tokenizer", "train", *common, "--pretrained", tmp_path / "bos-tokenizer") == 0
    assert cli("data", "prepare", *common) == 0
    assert not np.any(SplitData(run / "data", "train").tokens == bos)
    validator = Validator(tok, "smalltalk", 64, 8)
    req = validator({"prompt": "abc def ghi", "max_tokens": 2}, chat=False)
    assert req["ids"][0].tolist() == req["route_ids"][0].tolist() == encode_text(tok, "abc def ghi")
    assert bos not in req["ids"][0].tolist()
    tok.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "etaoin"}, {"role": "assistant", "content": "shrdlu"},
                {"role": "user", "content": "xyz"}, {"role": "assistant", "content": "abc"}]
    ids, _ = encode(tok, messages)
    assert bos not in ids
    assert bos not in routing_ids(tok, {"messages": messages}, (ids, [0] * len(ids)), "user_text")


def test_mixture_json_names_the_partitions_prefix_and_routers_and_refuses_others(pipeline_run, tmp_path):
    """mixture.json records the prefix and routers checksum the partition was made with; a mixture whose
    routers are not those is refused naming both checksums. Was: mixture.json took prefix and routers from
    RUN/routers even when the partition was made with --prefix/--routers (served on another split)."""
    run = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run, ignore=shutil.ignore_patterns("checkpoints", "dense", "eval", "report"))
    manifest = json.loads((run / "mixture.json").read_text())
    partition = json.loads((run / "partition" / "manifest.json").read_text())
    assert manifest["prefix"] == partition["prefix"] and manifest["routers_sha256"] == partition["routers_sha256"]
    assert manifest["routing_dtype"] == partition["dtype"] == "float32"
    weights = run / "routers" / "00" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # other routers, same shape
    with pytest.raises(SmalltalkError, match="not the ones the experts' partition was made with"):
        SmallTalkMixture.from_pretrained(run)
    (run / "mixture.json").unlink()
    with pytest.raises(SmalltalkError, match="partition was made with other routers"):
        write_mixture_manifest(RunLayout(run))


def test_dense_is_matched_to_the_whole_budget_and_results_say_so(pipeline_run):
    """The default dense baseline trains for experts + every routing FLOP (to a step's rounding, in both
    accountings); `matched-experts` for the experts' FLOPs only; results.json reports both, the epochs of
    every model and which sweep rows extrapolate beyond the routers' prefix."""
    results = json.loads((pipeline_run[0] / "eval" / "results.json").read_text())
    assert results["split"] == "validation" and results["final"] is False
    for accounting in ("exact", "paper"):
        flops = results["flops"][accounting]
        per_step = flops["dense_training"]["matched"] / json.loads(
            (pipeline_run[0] / "dense" / "matched" / "train_manifest.json").read_text())["steps"]
        slack = per_step / flops["mixture_training"]  # one step of rounding
        assert flops["routing_overhead"]["total"] > 0
        assert flops["dense_training"]["matched"] == pytest.approx(flops["mixture_training"], rel=slack + 1e-9)
        assert flops["dense_training"]["matched-experts"] == pytest.approx(flops["experts_training"], rel=slack)
        assert abs(flops["dense_budget_ratio"]["matched"] - 1) <= slack
    assert set(results["epochs"]) == {"experts", "matched", "matched-experts", "inference", "bigger"}
    assert all(e > 0 for e in results["epochs"]["experts"])
    routing_prefix = results["routing_prefix"]
    assert [r["extrapolated"] for r in results["sweep"]] == [r["prefix"] > routing_prefix for r in results["sweep"]]
    assert any(r["extrapolated"] for r in results["sweep"]) and "dense_matched-experts_after" in results["sweep"][0]


def test_the_test_split_is_evaluated_only_by_final(pipeline_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run, ignore=shutil.ignore_patterns("checkpoints", "report"))
    assert cli("eval", "--config", run / "config.json", "--run", run, "--set", "eval.split=test") == 2
    assert "--final" in capsys.readouterr().err
    assert cli("eval", "--config", run / "config.json", "--run", run, "--final") == 0
    final = json.loads((run / "eval-final" / "results.json").read_text())
    validation = json.loads((run / "eval" / "results.json").read_text())
    assert final["split"] == "test" and final["final"] is True and validation["split"] == "validation"
    assert "the final evaluation" in capsys.readouterr().out


def test_the_paper_em_sees_each_sequence_of_its_share_once_per_round():
    """`em` without options is the paper's: one pass over the share per round, random round 0, shared init."""
    cfg = load_config(None, ["routing.chunk=4096", "routing.experts=4", "routing.train.micro_batch_size=32"])
    rc = cfg.routing
    assert rc.share_passes == 1 and rc.init_split == "random" and rc.router_init == "shared"
    assert rc.steps_per_round() == math.ceil(4096 / 4 / 32) == 32
    cfg8 = load_config(None, ["routing.chunk=4096", "routing.experts=8", "routing.train.micro_batch_size=32"])
    assert cfg8.routing.steps_per_round() == 16
    pinned = load_config(TINY_CONFIG)  # the tests' fixed M-step is a named departure
    assert pinned.routing.share_passes is None and pinned.routing.steps_per_round() == pinned.routing.train.steps


def test_the_chat_prompt_is_role_marker_lines_for_serving_and_sft_alike(prepared_run):
    """docs/serving.md's chat template, literally: each message "<|role|>\\ncontent\\n", then "<|assistant|>\\n".
    The server's prompt ids are those of that text, and SFT's example of the same turns plus an answer begins
    with them (one format below both)."""
    tok = AutoTokenizer.from_pretrained(prepared_run / "tokenizer")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "etaoin shrdlu"}]
    text = "<|system|>\nbe brief\n<|user|>\netaoin shrdlu\n<|assistant|>\n"
    served = Validator(tok, "smalltalk", 64, 8)({"messages": messages, "max_tokens": 2}, chat=True)["ids"][0]
    assert served.tolist() == encode_text(tok, text)
    tok.chat_template = CHAT_TEMPLATE  # what a run's tokenizer directory carries
    ids, _ = encode(tok, [*messages, {"role": "assistant", "content": "abc"}])
    assert ids[:len(served)] == served.tolist()
