"""lm-evaluation-harness through the `smalltalk` model, on a local task whose data the test writes."""

import json
import os

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
    """lm-eval may ask for max_gen_toks >= the model's length: the context is cut to leave room, no error."""
    from types import SimpleNamespace

    from smalltalk.evaluation.lm_harness import SmallTalkLM

    lm = SmallTalkLM(str(pipeline_run[0]))
    request = SimpleNamespace(args=("xyz_ {} = 1 " * 40, {"until": ["\n\n"], "max_gen_toks": 10 * lm.max_length}))
    (text,) = lm.generate_until([request])
    assert isinstance(text, str)


GENERATE_TASK = """task: smalltalk_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", ";"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_lm_evals_api_models_against_the_server(pipeline_run, tmp_path):
    """The harness as an outside client (issue #30): `local-completions` on the multiple-choice task (token-id
    prompts, echo + logprobs) scores as the in-process `smalltalk` model does, within one item (the server
    routes on context + continuation, the in-process model on the context); `local-chat-completions` on a
    generate-until task with stop strings runs to the end. Was: 400 "'prompt' must be a non-empty string"."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")  # lm-eval's `api` extra (in ours)
    import subprocess
    import sys

    from smalltalk.evaluation.lm_harness import evaluate_downstream

    from .test_serve import _start

    run, tasks = pipeline_run[0], _local_task(tmp_path)
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"query": q, "answer": a}) + "\n" for q, a in
                            (("xyz_ {} = 1 +", " 2"), ("etaoin shrdlu", " tahoe"))))
    (tasks / "gen.yaml").write_text(GENERATE_TASK.format(data=data))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    proc, base = _start(run)
    try:
        results = {}
        for model, task, extra in (("local-completions", "smalltalk_local_mc", []),
                                   ("local-chat-completions", "smalltalk_local_gen", ["--apply_chat_template"])):
            endpoint = "completions" if model == "local-completions" else "chat/completions"
            out = tmp_path / model
            done = subprocess.run(
                [sys.executable, "-m", "lm_eval", "--model", model, "--model_args",
                 f"base_url={base}/v1/{endpoint},model=smalltalk,tokenizer_backend=huggingface,"
                 f"tokenizer={run / 'tokenizer'},num_concurrent=1,max_retries=1,max_length=64",
                 "--tasks", task, "--include_path", str(tasks), "--output_path", str(out), *extra],
                capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            (path,) = out.rglob("results_*.json")
            results[task] = json.loads(path.read_text())["results"][task]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    in_process = evaluate_downstream(str(run), ["smalltalk_local_mc"], str(tasks))["results"]["smalltalk_local_mc"]
    assert abs(results["smalltalk_local_mc"]["acc,none"] - in_process["acc,none"]) <= 1 / 3 + 1e-9
    assert "exact_match,none" in results["smalltalk_local_gen"]
