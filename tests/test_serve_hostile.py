"""The server against hostile request bodies: every bad input a 4xx JSON error counted in /metrics, no 5xx
ever, and no field silently dropped (limits on clients, keys, backends and memory: test_serve_limits.py).
Tests marked "Was:" failed on the code before issue #28's fixes."""

from __future__ import annotations

import json
import re
import signal

import httpx
import pytest

from .test_serve import _start

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer sk-test"}


def keyed_server(run):
    """`smalltalk serve` of `run` behind the key sk-test, clients given 1.5 s for their headers and body;
    yields (base URL, run) and checks a clean SIGTERM exit (shared by test_serve_limits.py)."""
    proc, base = _start(run, "--api-key-file", _key_file(run), "--client-timeout", "1.5")
    yield base, run
    proc.terminate()
    assert proc.wait(timeout=20) in (0, -signal.SIGTERM), proc.returncode


@pytest.fixture(scope="module")
def server(pipeline_run):
    yield from keyed_server(pipeline_run[0])


def _key_file(run) -> str:
    path = run.parent / "key.txt"
    path.write_text("sk-test\n")
    return str(path)


def _counts(base: str, headers: dict | None = None) -> dict[tuple[str, str], int]:
    """smalltalk_requests_total by (endpoint, status) from /metrics."""
    text = httpx.get(f"{base}/metrics", headers=KEY if headers is None else headers, timeout=10).text
    pattern = r'smalltalk_requests_total\{endpoint="(\w+)",status="(\d+)"\} (\d+)'
    return {(e, s): int(n) for e, s, n in re.findall(pattern, text)}


def _post_raw(base: str, endpoint: str, raw: str | bytes) -> httpx.Response:
    return httpx.post(f"{base}{endpoint}", content=raw if isinstance(raw, bytes) else raw.encode(), timeout=60,
                      headers={**KEY, "Content-Type": "application/json"})


def _answered_4xx_and_counted(base: str, endpoint: str, raw: str | bytes) -> httpx.Response:
    name = "chat" if "chat" in endpoint else "completions"
    before = _counts(base)
    r = _post_raw(base, endpoint, raw)
    assert 400 <= r.status_code < 500, (raw[:100], r.status_code, r.text[:200])
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]["message"]
    after = _counts(base)
    assert after.get((name, str(r.status_code)), 0) == before.get((name, str(r.status_code)), 0) + 1
    return r


DEEP = {d: "[" * d + "]" * d for d in (5_000, 10_000)}
HUGE = {d: "7" * d for d in (5_000, 10_000)}


@pytest.mark.parametrize("raw", [
    '{"prompt": ' + DEEP[5_000] + "}", '{"prompt": "abc def", "x": ' + DEEP[10_000] + "}", DEEP[10_000],
    '{"prompt": "abc def", "max_tokens": ' + HUGE[5_000] + "}", '{"prompt": "abc", "seed": ' + HUGE[10_000] + "}",
    '{"prompt": "ab\\ud800cd"}', '{"prompt": "abc def", "model": "x\\udfff"}',
    '{"messages": [{"role": "user", "content": "hi \\ud83d"}]}',
    '{"prompt": "abc def", "temperature": NaN}', '{"prompt": "abc def", "top_p": Infinity}',
    '{"prompt": "abc def", "max_tokens": -Infinity}', '{"prompt": "abc def", "model": ["a", {"b": [1]}]}',
], ids=lambda raw: raw[:40])
def test_hostile_bodies_get_a_counted_4xx(server, raw):
    """Was: nesting ~5,000 deep, a 5,000-digit integer and a lone surrogate escape got a plain-text 500 that
    /metrics never counted; NaN passed as a number."""
    base, _ = server
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        _answered_4xx_and_counted(base, endpoint, raw)
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0


def test_a_vanishing_temperature_decodes_greedily(server):
    """Was: `temperature: 1e-300` passed validation and the batched engine divided float32 logits by 0."""
    base, _ = server
    body = {"model": "smalltalk", "prompt": "xyz_ {} = 1 + 2", "max_tokens": 8}
    greedy = httpx.post(f"{base}/v1/completions", json={**body, "temperature": 0}, headers=KEY, timeout=60)
    for tiny in (1e-300, 5e-324, 1e-6):
        r = httpx.post(f"{base}/v1/completions", json={**body, "temperature": tiny, "seed": 3}, headers=KEY,
                       timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


class _Raw:
    """A JSON text spliced in as it is (what json.dumps cannot write: huge integers, NaN spellings)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _to_json(value) -> str:
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ",".join(_to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _to_json(v) for k, v in value.items()) + "}"
    return json.dumps(value)


OPENAI_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                 "stop", "stream", "stream_options", "seed", "logprobs", "top_logprobs", "echo", "logit_bias", "user",
                 "presence_penalty", "frequency_penalty", "suffix", "best_of", "response_format", "tools",
                 "tool_choice", "parallel_tool_calls", "metadata", "store", "service_tier"]


def test_every_openai_field_with_every_json_type_never_gives_a_5xx(server):
    """Property: any OpenAI field holding any JSON type (deep nesting to 10,000, integers to 10,000 digits,
    lone surrogates, NaN/Infinity spellings among them), to either endpoint: a 2xx, or a 4xx JSON error that
    /metrics counts; never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base, _ = server
    hostile = st.sampled_from([_Raw(DEEP[10_000]), _Raw(HUGE[10_000]), _Raw(HUGE[5_000]), _Raw("NaN"),
                               _Raw("Infinity"), _Raw("-Infinity"), _Raw('"\\ud800"'), _Raw('"a\\udc00b"'),
                               _Raw("1e400"), _Raw("-0.0")])
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
               | st.text(max_size=20) | hostile)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                                inner, max_size=3),
                          max_leaves=6)
    fields = st.dictionaries(st.sampled_from(OPENAI_FIELDS), values, max_size=5)
    valid = st.fixed_dictionaries({"prompt": st.just("xyz_ {} = 1"), "max_tokens": st.integers(1, 3),
                                   "messages": st.just([{"role": "user", "content": "etaoin"}])})
    bodies = st.builds(lambda base_fields, extra: {**base_fields, **extra}, valid, fields) | values

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=bodies, endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def check(body, endpoint):
        name = "chat" if "chat" in endpoint else "completions"
        before = _counts(base)
        r = _post_raw(base, endpoint, _to_json(body))
        assert r.status_code < 500, (_to_json(body)[:200], r.status_code, r.text[:200])
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        after = _counts(base)
        assert after.get((name, str(r.status_code)), 0) == before.get((name, str(r.status_code)), 0) + 1

    check()
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0


@pytest.mark.parametrize("field,value,code", [
    ("logprobs", 9, "invalid_request"), ("echo", "yes", "invalid_request"),
    ("logit_bias", {"5": 10}, "unsupported_field"), ("presence_penalty", 0.5, "unsupported_field"),
    ("best_of", 2, "unsupported_field"), ("response_format", {"type": "json_object"}, "unsupported_field"),
    ("tools", [{"type": "function"}], "unsupported_field"),
    ("top_k", 5, "unknown_field"), ("n", True, "invalid_request"), ("n", 0, "invalid_request"),
    ("n", 65, "invalid_request"), ("stop", "", "invalid_request"),
    ("stop", ["a", "b", "c", "d", "e"], "invalid_request"), ("stop", [1], "invalid_request"),
])
def test_fields_we_do_not_implement_are_refused_never_dropped(server, field, value, code):
    """Was: `stop`, `n`, `logprobs`, `echo`, penalties... were silently dropped (200 with text past the stop
    string, one choice, no logprobs). Now a 400 naming the field (`stop`, `n`, `logprobs` and `echo` are
    implemented: a 400 for a value outside their range); at their "off" value the others are accepted."""
    base, _ = server
    body = {"model": "smalltalk", "prompt": "xyz_ {} = 1", "max_tokens": 2, field: value}
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        if "chat" in endpoint:
            body = {**{k: v for k, v in body.items() if k != "prompt"},
                    "messages": [{"role": "user", "content": "x y"}]}
        r = _answered_4xx_and_counted(base, endpoint, json.dumps(body))
        assert r.status_code == 400 and r.json()["error"]["param"] == field and r.json()["error"]["code"] == code


def test_fields_at_their_off_value_are_accepted(server):
    base, _ = server
    body = {"model": "smalltalk", "prompt": "xyz_ {} = 1", "max_tokens": 2, "n": 1, "stop": None, "logprobs": None,
            "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1,
            "user": "someone", "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, headers=KEY, timeout=60)
    assert r.status_code == 200, r.text


JSON_TYPES = {"null": None, "true": True, "zero": 0, "negative": -1, "huge int": _Raw(HUGE[5_000]), "float": 1.5,
              "NaN": _Raw("NaN"), "empty string": "", "string": "etaoin", "empty list": [], "list of strings": ["a"],
              "list of ints": [1, 2], "empty object": {}, "object": {"a": 1}, "deep": _Raw(DEEP[10_000])}


def _server_errors(base: str) -> int:
    return sum(n for (_, status), n in _counts(base).items() if status.startswith("5"))


def test_the_field_by_json_type_matrix_never_gives_a_5xx_streamed_or_not(server):
    """Every OpenAI field x every JSON type (15 of them, huge and deep ones included), to both endpoints, streamed
    and not: exhaustive, no sampling. Each answer is a 2xx or a 4xx JSON error; a streamed 200 carries no
    `server_error` event; /metrics counts no 5xx (errors sent inside a stream after its 200 are counted too)."""
    base, _ = server
    valid = {"prompt": "xyz_ {} = 1", "messages": [{"role": "user", "content": "etaoin"}], "max_tokens": 2}
    before = _server_errors(base)
    answered = 0
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        for field in OPENAI_FIELDS:
            for kind, value in JSON_TYPES.items():
                for stream in ((None,) if field in ("stream", "stream_options") else (False, True)):
                    body = {**valid, field: value} if stream is None else {**valid, "stream": stream, field: value}
                    r = _post_raw(base, endpoint, _to_json(body))
                    where = (endpoint, field, kind, stream, r.status_code, r.text[:200])
                    assert r.status_code < 500, where
                    if r.status_code >= 400:
                        assert r.json()["error"]["message"], where
                    elif r.headers["content-type"].startswith("text/event-stream"):
                        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
                        assert not any('"server_error"' in e for e in events), where
                    answered += 1
    assert answered == 2 * (len(OPENAI_FIELDS) - 2) * len(JSON_TYPES) * 2 + 2 * 2 * len(JSON_TYPES)
    assert _server_errors(base) == before, "a 5xx was counted (inside a stream?)"
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0
