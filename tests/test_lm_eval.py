"""lm-evaluation-harness through the `smalltalk` model, on a local task whose data the test writes."""

import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

TASK = """task: smalltalk_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


def _local_task(tmp_path):
    docs = [{"query": "xyz_ {} = 1 +", "choices": [" 2 ;", " etaoin", " äöü"], "gold": 0},
            {"query": "etaoin shrdlu tahoe", "choices": [" xyz_", " shrdlu", " ßkw"], "gold": 1},
            {"query": "äöüß kwjv bpfgm", "choices": [" 0123", " etao", " äöü"], "gold": 2}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(TASK.format(data=data))
    return tasks


def test_dense_baseline_through_lm_evals_own_hf_model(pipeline_run, tmp_path):
    """What docs/serving.md tells users to run for the dense side: `python -m lm_eval --model hf` on
    RUN/dense/matched/model with RUN/tokenizer (needs accelerate: in the lm-eval and dev extras)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, tasks, out = pipeline_run[0], _local_task(tmp_path), tmp_path / "out"
    model_dir, tokenizer_dir = run / "dense" / "matched" / "model", run / "tokenizer"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={model_dir},tokenizer={tokenizer_dir},dtype=float32", "--device", "cpu",
         "--tasks", "smalltalk_local_mc", "--include_path", str(tasks), "--output_path", str(out),
         "--log_samples"], capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (samples_file,) = out.rglob("samples_smalltalk_local_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 3
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(tokenizer_dir)
    for sample in samples:  # each choice's log-likelihood is the dense model's own, on the same tokens
        arguments = sample["arguments"]  # saved as {"gen_args_0": {"arg_0": context, "arg_1": cont}, ...}
        pairs = [(a["arg_0"], a["arg_1"]) for a in arguments.values()] if isinstance(arguments, dict) else arguments
        for (context, continuation), response in zip(pairs, sample["resps"], strict=True):
            whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):]
            direct = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert float(response[0][0]) == pytest.approx(direct, abs=1e-3)


def test_lm_eval_local_task_matches_direct_expert_scoring(pipeline_run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from smalltalk.evaluation.lm_harness import SmallTalkLM, evaluate_downstream

    tasks = _local_task(tmp_path)
    run = str(pipeline_run[0])
    results = evaluate_downstream(run, ["smalltalk_local_mc"], str(tasks))
    assert 0.0 <= results["results"]["smalltalk_local_mc"]["acc,none"] <= 1.0
    samples = results["samples"]["smalltalk_local_mc"]
    assert len(samples) == 3
    lm = SmallTalkLM(run)
    for sample in samples:
        pairs = [tuple(arg) for arg in sample["arguments"]]  # the exact (context, continuation) requests
        experts = {lm.route_request(context, cont) for context, cont in pairs}
        assert len(experts) == 1, "all choices of an item go to the same expert"
        model = lm.mixture.expert(experts.pop())
        for (context, continuation), response in zip(pairs, sample["resps"], strict=True):
            ctx, cont = lm._encode_pair(context, continuation)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):]
            direct = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert response[0][0] == pytest.approx(direct, abs=1e-4)


def test_generate_until_with_more_new_tokens_than_the_context(pipeline_run):
    """lm-eval may ask for max_gen_toks >= the model's length: the request is routed on its context's first M
    tokens, the context is cut to its last token to leave room for max_length - 1 new ones, no error. Reference:
    HF routers pick the expert, HF `generate` of that plain Llama directory continues the last token."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from smalltalk.evaluation.lm_harness import SmallTalkLM

    from .conftest import hf_prefix_loglik, router_model_dirs

    run = pipeline_run[0]
    lm = SmallTalkLM(str(run))
    context = "xyz_ {} = 1 " * 40
    request = SimpleNamespace(args=(context, {"until": ["\n\n"], "max_gen_toks": 10 * lm.max_length}))
    (text,) = lm.generate_until([request])
    ids = lm.tok(context, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] > lm.max_length  # the context alone overflows the model
    expert = int(hf_prefix_loglik(router_model_dirs(run / "routers"), ids[:, :lm.mixture.prefix]).argmax())
    model = AutoModelForCausalLM.from_pretrained(str(run / lm.mixture.manifest["expert_dirs"][expert])).eval()
    own = model.generate(ids[:, -1:], max_new_tokens=lm.max_length - 1, do_sample=False,
                         pad_token_id=lm.tok.eos_token_id, eos_token_id=lm.tok.eos_token_id)
    assert text == lm.tok.decode(own[0, 1:], skip_special_tokens=True).split("\n\n")[0]


def test_lm_evals_api_models_against_the_server(pipeline_run, tmp_path):
    """The harness as an outside client (issues #30, #44): `local-completions` against `smalltalk serve`, item by
    item. On a 24-item multiple-choice task (token-id prompts, echo + logprobs) every choice's log-likelihood
    is the in-process `smalltalk` model's within 1e-4 (contexts of at least M tokens, so both route on the same
    tokens, and whole items within the 63 tokens lm-eval's API models send at max_length=64: the in-process model,
    as lm-eval's hf model, reads max_length + 1, so a longer item would be read with one token more context); on
    a 24-item generate-until task every text equals the mixture's own greedy text, cut at the stop string; the
    docs' command as printed runs on contexts past the model's positions.
    Was: 400 "'prompt' must be a non-empty string"; then a 3-item task within one item; then 24-word contexts,
    cut differently by the two sides (9.7e-5 relative apart)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")  # lm-eval's `api` extra (in ours)
    import subprocess
    import sys

    import httpx
    from transformers import AutoTokenizer

    from smalltalk.evaluation.lm_harness import evaluate_downstream
    from smalltalk.mixture.model import SmallTalkMixture

    from .conftest import make_documents
    from .test_export_hf import _tasks
    from .test_serve import _start

    run, tasks, out = pipeline_run[0], _tasks(tmp_path, query_words=7), tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    for row in map(json.loads, (tmp_path / "mc.jsonl").read_text().splitlines()):  # the precondition above
        lengths = [len(tokenizer(row["query"] + c)["input_ids"]) for c in row["choices"]]
        assert len(tokenizer(row["query"])["input_ids"]) >= 16 and max(lengths) <= 63, lengths
    long = [{"query": " ".join(d["text"].split()[:90]), "choices": [" xyz_", " etaoin", " äöü"], "gold": 0}
            for d in make_documents(6, seed=4)]  # contexts past the model's 64 positions: cut, never an error
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in long))
    (tasks / "long.yaml").write_text(TASK.replace("smalltalk_local_mc", "smalltalk_long_mc").format(
        data=tmp_path / "long.jsonl"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    proc, base = _start(run)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"base_url={base}/v1/completions,model=smalltalk,tokenizer_backend=huggingface,"
             f"tokenizer={run / 'tokenizer'},num_concurrent=1,max_retries=1,max_length=64",
             "--tasks", "smalltalk_hf_mc,smalltalk_hf_gen,smalltalk_long_mc", "--include_path", str(tasks),
             "--output_path", str(out),
             "--log_samples"], capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        (tmp_path / "chat").mkdir()
        chat_tasks = _tasks(tmp_path / "chat", query_words=4)  # chat template (23 tokens) + 4 words + 8 fit in 64
        chat = subprocess.run(  # the docs' chat command: its texts are the chat endpoint's own greedy answers
            [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--apply_chat_template",
             "--model_args", f"base_url={base}/v1/chat/completions,model=smalltalk,num_concurrent=1,max_retries=1",
             "--tasks", "smalltalk_hf_gen", "--include_path", str(chat_tasks), "--output_path", str(tmp_path / "chat"),
             "--log_samples"], capture_output=True, text=True, env=env, timeout=900)
        assert chat.returncode == 0, chat.stderr[-3000:]
        (path,) = (tmp_path / "chat").rglob("samples_smalltalk_hf_gen_*.jsonl")
        chatted = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(chatted) == 24
        for sample in chatted:
            arguments = sample["arguments"]
            messages = arguments["gen_args_0"]["arg_0"] if isinstance(arguments, dict) else arguments[0][0]
            messages = messages[0] if isinstance(messages, list) and isinstance(messages[0], str) else messages
            messages = json.loads(messages) if isinstance(messages, str) else messages  # logged as JSON text
            answer = httpx.post(f"{base}/v1/chat/completions", json={
                "model": "smalltalk", "messages": messages, "max_tokens": 8, "temperature": 0, "stop": ["\n"]},
                timeout=60)
            assert answer.status_code == 200, (messages, answer.text)
            own = answer.json()["choices"][0]["message"]["content"]
            assert sample["resps"][0][0] == own, (messages, sample["resps"][0][0], own)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    served = {}
    for task in ("smalltalk_hf_mc", "smalltalk_hf_gen"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        served[task] = {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}
    assert len(served["smalltalk_hf_mc"]) == len(served["smalltalk_hf_gen"]) == 24
    (path,) = out.rglob("samples_smalltalk_long_mc_*.jsonl")
    assert len(path.read_text().splitlines()) == 6  # the docs' command, as printed, on contexts past 64 tokens
    ours = evaluate_downstream(str(run), ["smalltalk_hf_mc"], str(tasks))["samples"]["smalltalk_hf_mc"]
    for sample in ours:
        theirs = [float(r[0][0]) for r in served["smalltalk_hf_mc"][sample["doc_id"]]["resps"]]
        mine = [float(r[0][0]) for r in sample["resps"]]
        assert mine == pytest.approx(theirs, rel=0, abs=1e-4)
        assert int(np.argmax(mine)) == int(np.argmax(theirs))
    mixture = SmallTalkMixture.from_pretrained(run)
    for sample in served["smalltalk_hf_gen"].values():
        context = sample["arguments"]["gen_args_0"]["arg_0"] if isinstance(sample["arguments"], dict) else \
            sample["arguments"][0][0]
        own = mixture.generate(context, max_new_tokens=8, do_sample=False)["text"].split("\n")[0]
        assert sample["resps"][0][0] == own, (context, sample["resps"][0][0], own)
