"""Issue #30's fields through the `openai` client against the real server: `stop`, `n` and every prompt form
(a string, a list of strings, token ids, lists of token ids), streamed and not; and `stop` in the serial
engine too."""

import contextlib

import pytest

from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.serving.serial import SerialEngine

from .test_serve import _client, _start
from .test_serve_engines import _complete

pytestmark = pytest.mark.slow
PROMPT = "xyz_ {} = 1 + 2"
SAMPLED = {"temperature": 1.0, "seed": 5}  # seeded: the same draws with and without a stop string
BODY = {"model": "smalltalk", "prompt": PROMPT, "max_tokens": 3}


@pytest.fixture(scope="module")
def server(pipeline_run):
    proc, base = _start(pipeline_run[0], "--api-key", "sk-test")
    yield base, pipeline_run[0]
    proc.terminate()
    proc.wait(timeout=20)


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], list[str]]:
    """Per choice index: the text its chunks add up to and its finish_reason; every text chunk, in order."""
    texts, finishes, seen = {}, {}, []
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            if piece:
                texts[choice.index] = texts.get(choice.index, "") + piece
                seen.append(texts[choice.index])
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, seen


def _a_stop_inside(text: str) -> str:
    """A stop string that first occurs mid-text (two characters at a quarter of it, not at its start)."""
    for start in range(max(1, len(text) // 4), len(text) - 2):
        stop = text[start:start + 2]
        if stop.strip() and text.find(stop) == start:
            return stop
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_cuts_the_text_before_the_match_streamed_and_not(server):
    """Was: `stop` was dropped (text ran past it). Now the text ends before the first match, finish_reason
    is "stop", and no streamed chunk ever shows text past it; completions and chat alike (seeded sampling:
    the same draws with and without the stop string)."""
    client = _client(server[0])
    full = client.completions.create(model="smalltalk", prompt=PROMPT, max_tokens=24, **SAMPLED).choices[0].text
    stop = _a_stop_inside(full)
    expected = full[:full.find(stop)]
    cut = client.completions.create(model="smalltalk", prompt=PROMPT, max_tokens=24, **SAMPLED,
                                    stop=[stop, "never-there"]).choices[0]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    texts, finishes, seen = _stream_text(client.completions.create(
        model="smalltalk", prompt=PROMPT, max_tokens=24, **SAMPLED, stop=stop, stream=True))
    assert texts[0] == expected and finishes[0] == "stop" and not any(stop in t for t in seen)
    messages = [{"role": "user", "content": PROMPT}]
    chat_full = client.chat.completions.create(model="smalltalk", messages=messages, max_tokens=24,
                                               **SAMPLED).choices[0].message.content
    chat_stop = _a_stop_inside(chat_full)
    chat = client.chat.completions.create(model="smalltalk", messages=messages, max_tokens=24, **SAMPLED,
                                          stop=chat_stop).choices[0]
    assert (chat.message.content, chat.finish_reason) == (chat_full[:chat_full.find(chat_stop)], "stop")
    texts, finishes, _ = _stream_text(client.chat.completions.create(
        model="smalltalk", messages=messages, max_tokens=24, **SAMPLED, stop=chat_stop, stream=True))
    assert texts[0] == chat.message.content and finishes[0] == "stop"


def test_n_samples_equal_the_same_seeded_requests_one_by_one(server):
    """n = 3 with seed s: choice i is the completion of the same request sent alone with seed s + i (the rows
    decode in one batch), streamed or not; usage counts every choice's tokens and the prompt once."""
    client = _client(server[0])
    fields = {"model": "smalltalk", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0}
    together = client.completions.create(n=3, seed=40, **fields)
    alone = [client.completions.create(seed=40 + i, **fields).choices[0] for i in range(3)]
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == [c.text for c in alone]
    assert together.usage.completion_tokens == sum(
        client.completions.create(seed=40 + i, **fields).usage.completion_tokens for i in range(3))
    assert together.usage.prompt_tokens == client.completions.create(seed=1, **fields).usage.prompt_tokens
    texts, finishes, _ = _stream_text(client.completions.create(n=3, seed=40, stream=True, **fields))
    assert texts == {i: c.text for i, c in enumerate(alone)} and set(finishes) == {0, 1, 2}
    chat = client.chat.completions.create(model="smalltalk", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=6, n=2, seed=7)
    assert [c.index for c in chat.choices] == [0, 1]


def test_every_prompt_form_gives_the_text_of_its_string(server):
    """A list of token ids is the prompt those ids encode; a list of prompts (strings or id lists) is a
    batch, one choice per prompt in order, each routed on its own (each choice names its expert). Was: a
    400 "'prompt' must be a non-empty string" (lm-eval's API models send token ids)."""
    base, run = server
    client = _client(base)
    mixture = SmallTalkMixture.from_pretrained(run)
    other = "int main(void) { return 0; }"
    ids = [mixture.tokenizer(p, add_special_tokens=False).input_ids for p in (PROMPT, other)]
    fields = {"model": "smalltalk", "max_tokens": 6, "temperature": 0}
    by_string = [client.completions.create(prompt=p, **fields) for p in (PROMPT, other)]
    assert client.completions.create(prompt=ids[0], **fields).choices[0].text == by_string[0].choices[0].text
    for batch in ([PROMPT, other], ids):
        answer = client.completions.create(prompt=batch, **fields)
        assert [c.index for c in answer.choices] == [0, 1]
        assert [c.text for c in answer.choices] == [r.choices[0].text for r in by_string]
        assert [c.model_extra["smalltalk"]["expert"] for c in answer.choices] == \
               [r.model_extra["smalltalk"]["expert"] for r in by_string]
    both = client.completions.create(prompt=[PROMPT, other], n=2, seed=3, **{**fields, "temperature": 1.0})
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    import httpx

    bad = httpx.post(f"{base}/v1/completions", json={"prompt": [5, 10**9], "max_tokens": 2},
                     headers={"Authorization": "Bearer sk-test"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_the_serial_engine_stops_at_stop_strings_too(pipeline_run):
    mixture = SmallTalkMixture.from_pretrained(pipeline_run[0])
    serial = SerialEngine(mixture, "smalltalk", 64)
    _, (full, _, _) = _complete(serial, PROMPT, max_tokens=24, **SAMPLED)
    stop = _a_stop_inside(full)
    _, (text, finish, tokens) = _complete(serial, PROMPT, max_tokens=24, **SAMPLED, stop=stop)
    assert (text, finish) == (full[:full.find(stop)], "stop") and tokens < 24


def test_echo_logprobs_are_the_routed_experts_own(server):
    """`echo` + `logprobs` + `max_tokens: 0` scores a prompt: the first token has no log-prob, every other is
    the routed expert's own (SmallTalkMixture.score, to 1e-5), with the 2 likeliest alternatives; what
    lm-eval's API models send for loglikelihood tasks (token-id prompts, echo, logprobs, max_tokens 1)."""
    base, run = server
    client = _client(base)
    mixture = SmallTalkMixture.from_pretrained(run)
    ids = mixture.tokenizer(PROMPT, add_special_tokens=False).input_ids
    nll, chosen = mixture.score([ids])
    scored = client.completions.create(model="smalltalk", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == PROMPT and scored.model_extra["smalltalk"]["expert"] == int(chosen[0])
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx((-nll[0]).tolist(), abs=1e-5)
    assert all(len(top) <= 2 and max(top.values()) >= value - 1e-6
               for top, value in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    harness = client.completions.create(model="smalltalk", prompt=[ids], max_tokens=1, echo=True, logprobs=1,
                                        temperature=0)
    assert harness.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert len(harness.choices[0].logprobs.token_logprobs) == len(ids) + 1


def test_logprobs_of_generated_tokens_completions_and_chat(server):
    """Greedy: each generated token is its position's likeliest (its log-prob tops its alternatives);
    chat returns the `content` schema; streamed, the chunks' texts and log-probs add up to the answer
    (echo and a stop string included)."""
    import httpx

    base, _ = server
    client = _client(base)
    greedy = client.completions.create(model="smalltalk", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = greedy.choices[0].logprobs
    assert len(lp.tokens) == greedy.usage.completion_tokens and "".join(lp.tokens).startswith(greedy.choices[0].text)
    assert all(value == pytest.approx(max(top.values()), abs=1e-6)
               for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True))
    chat = client.chat.completions.create(model="smalltalk", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert client.chat.completions.create(model="smalltalk", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=2).choices[0].logprobs is None
    for stop in (None, _a_stop_inside(client.completions.create(model="smalltalk", prompt=PROMPT, max_tokens=12,
                                                                **SAMPLED).choices[0].text)):
        fields = {"model": "smalltalk", "prompt": PROMPT, "max_tokens": 12, "logprobs": 2, "echo": True,
                  "stop": stop, **SAMPLED}
        whole = client.completions.create(**fields).choices[0]
        parts = list(client.completions.create(stream=True, **fields))
        streamed = {key: [x for p in parts for c in p.choices if c.logprobs for x in getattr(c.logprobs, key)]
                    for key in ("tokens", "token_logprobs", "text_offset")}
        assert "".join(c.text for p in parts for c in p.choices) == whole.text
        assert streamed == {key: getattr(whole.logprobs, key) for key in streamed}
    chat_fields = {"model": "smalltalk", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
                   "temperature": 0, "logprobs": True, "top_logprobs": 1}
    whole_chat = client.chat.completions.create(**chat_fields).choices[0].logprobs.content
    streamed_chat = [t for p in client.chat.completions.create(stream=True, **chat_fields) for c in p.choices
                     if c.logprobs for t in c.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed_chat] == [(t.token, t.logprob) for t in whole_chat]
    no_echo = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT, "max_tokens": 0},
                         headers={"Authorization": "Bearer sk-test"})
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"


def test_the_serial_engine_scores_prompts_as_the_batched_one(pipeline_run):
    from smalltalk.serving.batching import BatchedEngine

    mixture = SmallTalkMixture.from_pretrained(pipeline_run[0])
    entries = []
    for engine in (SerialEngine(mixture, "smalltalk", 64), BatchedEngine(mixture, "smalltalk", 64)):
        req = engine.validate({"prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0},
                              chat=False)
        engine.generate(req, engine.route(req))
        entries.append((req["prompt_logprobs"], req["token_logprobs"]))
        engine.close()
    (serial_prompt, serial_new), (batched_prompt, batched_new) = entries
    assert [e[0] for e in serial_prompt] == [e[0] for e in batched_prompt]
    assert [e[0] for e in serial_new] == [e[0] for e in batched_new]
    for a, b in zip(serial_prompt[1:] + serial_new, batched_prompt[1:] + batched_new, strict=True):
        assert a[1] == pytest.approx(b[1], abs=1e-5)


def test_chat_content_as_text_parts_answers_as_the_string_and_other_parts_are_a_400(server):
    """Was: content given as a list of parts (what current OpenAI clients and vLLM accept) got a 400. Now text
    parts are joined with newlines (as vLLM joins them): the answer equals the one to the joined string; a part
    of another type is a 400 that names it."""
    import openai

    client = _client(server[0])
    parts = [{"type": "text", "text": "xyz_ {} ="}, {"type": "text", "text": "1 + 2"}]
    as_parts = client.chat.completions.create(model="smalltalk", messages=[{"role": "user", "content": parts}],
                                              max_tokens=8, temperature=0)
    as_text = client.chat.completions.create(model="smalltalk", messages=[{"role": "user", "content":
                                             "xyz_ {} =\n1 + 2"}], max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="smalltalk", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "image_url" in str(error.value) and error.value.status_code == 400


def test_include_usage_adds_one_usage_chunk_equal_to_the_unstreamed_usage(server):
    """docs/serving.md: `stream_options: {"include_usage": true}` adds a usage chunk before [DONE]."""
    base, _ = server
    client = _client(base)
    fields = {"model": "smalltalk", "prompt": PROMPT, "max_tokens": 6, "n": 2, **SAMPLED}
    whole = client.completions.create(**fields)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **fields))
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    plain = list(client.completions.create(stream=True, **fields))
    assert all(c.usage is None for c in plain)


def test_token_ids_outside_the_vocabulary_are_a_400(server):
    import httpx

    base, run = server
    vocab = len(SmallTalkMixture.from_pretrained(run).tokenizer)
    for prompt in ([5, 6, vocab], [[5, 6, 7], [5, -1, 7]]):
        r = httpx.post(f"{base}/v1/completions", headers={"Authorization": "Bearer sk-test"},
                       json={"model": "smalltalk", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "outside the vocabulary" in r.json()["error"]["message"]


@contextlib.contextmanager
def _app_whose_generate_is(run, fault, **app_settings):
    """The real app in process over a serial engine whose generate is `fault`; on leaving, generate is restored
    and the next request must answer 200 (the server goes on)."""
    from fastapi.testclient import TestClient

    from smalltalk.serving.app import create_app

    engine = SerialEngine(SmallTalkMixture.from_pretrained(run), "smalltalk", 64)
    generate, engine.generate = engine.generate, fault
    with TestClient(create_app(engine, **app_settings), raise_server_exceptions=False) as http:
        yield http
        engine.generate = generate
        assert http.post("/v1/completions", json=BODY).status_code == 200


def test_a_bug_of_ours_is_a_counted_json_500_and_the_server_goes_on(pipeline_run):
    """A fault injected where a bug would raise (the engine's generate): a JSON 500 `internal_error`, an error
    event inside a stream that already began, both counted in /metrics; the next request answers 200."""
    with _app_whose_generate_is(pipeline_run[0], lambda *a, **k: 1 / 0) as http:
        r = http.post("/v1/completions", json=BODY)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        assert "ZeroDivisionError" in r.json()["error"]["message"]
        streamed = http.post("/v1/completions", json={**BODY, "stream": True})
        assert streamed.status_code == 200 and '"internal_error"' in streamed.text
        metrics = http.get("/metrics").text
        assert 'smalltalk_requests_total{endpoint="completions",status="500"} 2' in metrics, metrics


def _metric(text: str, name: str) -> float:
    """The value of the Prometheus line `name VALUE` (labels included in `name`); 0 when the line is absent."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == name]
    return values[0] if values else 0.0


def test_metrics_count_each_request_its_tokens_and_expert_behind_the_key_and_health_says_counts_only(server):
    """docs/serving.md's /metrics and /health: one answered completion moves the request, token, latency, routing
    and per-expert counters by exactly its own usage; /metrics needs the key, /health does not and holds counts
    only; `smalltalk serve` without --host listens on loopback alone."""
    import httpx
    import psutil

    base, _ = server
    key = {"Authorization": "Bearer sk-test"}
    assert httpx.get(f"{base}/metrics").status_code == 401
    before = httpx.get(f"{base}/metrics", headers=key).text
    answer = _client(base).completions.create(model="smalltalk", prompt=PROMPT, max_tokens=5, temperature=0)
    after = httpx.get(f"{base}/metrics", headers=key).text
    expert = answer.model_extra["smalltalk"]["expert"]
    moved = {name: _metric(after, name) - _metric(before, name) for name in (
        'smalltalk_requests_total{endpoint="completions",status="200"}', "smalltalk_prompt_tokens_total",
        "smalltalk_completion_tokens_total", "smalltalk_request_latency_seconds_count",
        f'smalltalk_expert_requests_total{{expert="{expert}"}}', "smalltalk_routing_seconds_sum",
        "smalltalk_request_latency_seconds_sum")}
    assert moved.pop('smalltalk_requests_total{endpoint="completions",status="200"}') == 1
    assert moved.pop("smalltalk_prompt_tokens_total") == answer.usage.prompt_tokens
    assert moved.pop("smalltalk_completion_tokens_total") == answer.usage.completion_tokens
    assert moved.pop("smalltalk_request_latency_seconds_count") == 1
    assert moved.pop(f'smalltalk_expert_requests_total{{expert="{expert}"}}') == 1
    assert 0 < moved["smalltalk_routing_seconds_sum"] <= moved["smalltalk_request_latency_seconds_sum"]
    health = httpx.get(f"{base}/health").json()  # no key
    assert health["status"] == "ok" and all(isinstance(v, int | list) for k, v in health.items() if k != "status")
    port = int(base.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening


def test_a_request_past_the_request_timeout_is_cancelled_with_504_streamed_too(pipeline_run):
    """docs/serving.md: past `--request-timeout` a request's generation is cancelled and answered 504
    `request_timeout` (streamed: an error event); the engine sees the cancel, and the next request answers 200.
    The engine's generate is made to wait for its cancel event (at most 30 s), as a long generation would."""
    import time

    from smalltalk.serving.protocol import Cancelled

    cancelled = []

    def never_done(req, routing, on_text=None):
        cancelled.append(req["cancel"].wait(30))
        raise Cancelled

    with _app_whose_generate_is(pipeline_run[0], never_done, request_timeout=1.0) as http:
        started = time.monotonic()
        r = http.post("/v1/completions", json=BODY)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert time.monotonic() - started < 10
        streamed = http.post("/v1/chat/completions", json={"model": "smalltalk", "stream": True, "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "hi"}]})
        assert streamed.status_code == 200 and '"request_timeout"' in streamed.text, streamed.text
        assert cancelled == [True, True]  # the engine was told, both times
