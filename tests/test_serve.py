"""The real server on a free loopback port, called with the official `openai` client and raw HTTP."""

import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from smalltalk.data.shards import SplitData
from smalltalk.mixture import SmallTalkMixture

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pipeline_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smalltalk.cli", "serve", "--run", str(pipeline_run[0]),
                             "--port", str(port), "--max-resident-experts", "1", "--api-key", "sk-test"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "server did not start"
        time.sleep(0.2)
    yield base, pipeline_run[0]
    proc.terminate()
    assert proc.wait(timeout=20) is not None


def _client(base):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)


def test_openai_client_completions_chat_and_streaming(server):
    base, run = server
    client = _client(base)
    assert [m.id for m in client.models.list().data] == ["smalltalk"]
    mixture = SmallTalkMixture.from_pretrained(run)
    prompt = "xyz_ {} = 1 + 2"
    done = client.completions.create(model="smalltalk", prompt=prompt, max_tokens=8, temperature=0)
    routing = done.model_extra["smalltalk"]
    chosen, scores = mixture.route(mixture.tokenizer(prompt).input_ids)
    assert routing["expert"] == int(chosen[0])
    assert np.allclose(routing["scores"], scores[0], rtol=1e-5)
    assert isinstance(done.choices[0].text, str) and done.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="smalltalk", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "etaoin shrdlu"}])
    assert chat.choices[0].message.role == "assistant" and "smalltalk" in chat.model_extra
    pieces = list(client.completions.create(model="smalltalk", prompt=prompt, max_tokens=8, temperature=0,
                                            stream=True))
    streamed = "".join(p.choices[0].text for p in pieces)
    assert streamed == done.choices[0].text  # greedy: same text streamed or not
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    chat_pieces = list(client.chat.completions.create(
        model="smalltalk", max_tokens=5, temperature=0, stream=True, messages=[{"role": "user", "content": "äöü"}]))
    assert chat_pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_lru_serves_every_expert_with_one_resident(server):
    base, run = server
    client = _client(base)
    mixture = SmallTalkMixture.from_pretrained(run)
    tokenizer = mixture.tokenizer
    data = SplitData(run / "data", "test")
    prompt_for = {}  # one test prompt routed to each expert, found locally
    for i in range(len(data)):
        text = tokenizer.decode(data[i][:24].tolist(), skip_special_tokens=True)
        ids = tokenizer(text).input_ids
        if len(ids) >= 2:
            prompt_for.setdefault(int(mixture.route(ids)[0][0]), text)
        if len(prompt_for) == mixture.num_experts:
            break
    assert len(prompt_for) == mixture.num_experts, "every expert should get some test prompt"
    for _ in range(2):  # twice round the experts: each request evicts the previous expert
        for expert, prompt in sorted(prompt_for.items()):
            out = client.completions.create(model="smalltalk", prompt=prompt, max_tokens=3, temperature=0)
            assert out.model_extra["smalltalk"]["expert"] == expert
            assert httpx.get(f"{base}/health").json()["resident"] == [expert]
    metrics = httpx.get(f"{base}/metrics").text
    assert "smalltalk_resident_experts 1" in metrics
    for expert in prompt_for:
        assert f'smalltalk_expert_requests_total{{expert="{expert}"}}' in metrics


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "gpt-4", "prompt": "abc def"}).encode(), 404, "model"),
    (json.dumps({"model": "smalltalk", "prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"model": "smalltalk", "prompt": "abc def", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "smalltalk", "prompt": "abc def", "max_tokens": -3}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "smalltalk", "prompt": "abc def", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "smalltalk", "prompt": "xyz " * 200, "max_tokens": 10}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "smalltalk", "prompt": "abc def", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps(["a list"]).encode(), 400, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", content=body,
                          headers={"Authorization": "Bearer sk-test", "Content-Type": "application/json"})
    assert response.status_code == status
    err = response.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param
    assert httpx.get(f"{base}/health").status_code == 200  # still alive


def test_bad_chat_and_missing_key(server):
    base, _ = server
    headers = {"Authorization": "Bearer sk-test"}
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "smalltalk", "messages": []}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{base}/v1/completions", json={"model": "smalltalk", "prompt": "abc def"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
