"""Routing here, generation elsewhere: `serve --backend openai --expert-url K=http://host:port/v1 ...`.

At paper scale an expert is a 335M-1.3B Llama on its own GPU, best held by an engine built for that
(vLLM, TGI, or `smalltalk serve --expert K`); each expert directory is a plain HF Llama, so any of them can
load it. This engine keeps the tiny routers and the tokenizer in process, routes each prompt, and forwards
the request to expert K's OpenAI-compatible server as a streamed `/v1/completions` call (a chat request
is formatted with the mixture's chat template first, so the routers and the expert see the same text).
A backend that cannot be reached answers 503 for its expert's requests; the other experts keep working.
"""

from __future__ import annotations

import json
import time

import httpx

from smalltalk.data.tokenizer import encode_text
from smalltalk.errors import SmalltalkError
from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.serving.engine import OnText, RoutesEachPrompt
from smalltalk.serving.logprobs import backend_entries
from smalltalk.serving.protocol import Cancelled, RequestError, Validator, route_on


def parse_expert_urls(pairs: list[str], experts: int) -> dict[int, str]:
    """["0=http://h:p/v1", ...] -> {0: "http://h:p/v1"}; every expert needs exactly one URL."""
    urls: dict[int, str] = {}
    for pair in pairs:
        key, sep, url = pair.partition("=")
        if not sep or not key.strip().isdigit() or not url.startswith(("http://", "https://")):
            raise SmalltalkError(f"--expert-url {pair!r} is not K=http://host:port/v1",
                                 fix="give one --expert-url K=URL per expert, e.g. 0=http://10.0.0.5:8000/v1")
        if int(key) >= experts or int(key) in urls:
            raise SmalltalkError(f"--expert-url {pair!r}: expert {key} is out of range or given twice "
                                 f"(the mixture has experts 0..{experts - 1})")
        urls[int(key)] = url.rstrip("/")
    missing = sorted(set(range(experts)) - set(urls))
    if missing:
        raise SmalltalkError(f"no --expert-url for expert(s) {missing}", fix="give one --expert-url K=URL per expert")
    return urls


class RemoteEngine(RoutesEachPrompt):
    def __init__(self, mixture: SmallTalkMixture, urls: dict[int, str], model_name: str, max_tokens_limit: int,
                 max_queue: int = 256, api_key: str | None = None, context: int | None = None) -> None:
        from transformers import AutoConfig

        if context is None:  # the expert's config alone (no weights are loaded here)
            context = AutoConfig.from_pretrained(str(mixture.root / mixture.manifest["expert_dirs"][0])) \
                .max_position_embeddings
        super().__init__(Validator(mixture.tokenizer, model_name, context, max_tokens_limit,
                                   route_on(mixture)), mixture, max_queue)
        self.urls = urls
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(600.0, connect=5.0))
        self._names: dict[int, str] = {}

    def _model_name(self, expert: int) -> str:
        """The id the backend serves (vLLM names a model after its path unless told otherwise)."""
        if expert not in self._names:
            r = self.client.get(f"{self.urls[expert]}/models")
            r.raise_for_status()
            self._names[expert] = r.json()["data"][0]["id"]
        return self._names[expert]

    def _prompt_entries(self, expert: int, req: dict) -> list:
        """`echo`: the prompt's log-probs from the backend itself (one scoring request, max_tokens 0)."""
        body = {"model": self._model_name(expert), "prompt": req["prompt"], "max_tokens": 0, "echo": True,
                "logprobs": req["logprobs"] or 0}
        response = self.client.post(f"{self.urls[expert]}/completions", json=body)
        if response.status_code != 200:
            raise _backend_error(expert, response)
        return backend_entries(response.json()["choices"][0]["logprobs"])

    def generate(self, req: dict, routing: dict, on_text: OnText = None) -> tuple[str, str, int]:
        expert = routing["expert"]
        pieces, finish, usage = [], "length", None
        try:
            if req.get("echo"):
                req["prompt_logprobs"] = self._prompt_entries(expert, req)
            if req["max_tokens"] == 0:
                return "", "length", 0
            body = {"model": self._model_name(expert), "prompt": req["prompt"], "max_tokens": req["max_tokens"],
                    "temperature": req["temperature"], "top_p": req["top_p"], "stream": True,
                    "stream_options": {"include_usage": True}}
            if req["seed"] is not None:
                body["seed"] = req["seed"]
            if req.get("stop"):
                body["stop"] = req["stop"]
            if req.get("logprobs") is not None:
                body["logprobs"] = req["logprobs"]
            left = req["deadline"] - time.monotonic() if "deadline" in req else 600.0  # the request's deadline
            with self.client.stream("POST", f"{self.urls[expert]}/completions", json=body,
                                    timeout=httpx.Timeout(max(left, 0.1), connect=5.0)) as response:
                if response.status_code != 200:
                    raise _backend_error(expert, response)
                for chunk in _events(response):
                    if req["cancel"].is_set():
                        raise Cancelled()
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = choice.get("text")
                        if not isinstance(text, (str, type(None))):
                            raise TypeError(f"choice text is {type(text).__name__}")
                        if text:
                            pieces.append(text)
                            if on_text is not None:
                                on_text(text)
                        finish = choice.get("finish_reason") or finish
                        if req.get("logprobs") is not None and choice.get("logprobs"):
                            req.setdefault("token_logprobs", []).extend(backend_entries(choice["logprobs"]))
                n_new = usage["completion_tokens"] if usage else None
                if not isinstance(n_new, (int, type(None))) or isinstance(n_new, bool):
                    raise TypeError("usage.completion_tokens is not an integer")
        except httpx.HTTPError as exc:
            if req["cancel"].is_set() or time.monotonic() >= req.get("deadline", float("inf")):  # client left, or late
                raise Cancelled() from None
            raise RequestError(503, f"expert {expert}'s backend ({self.urls[expert]}) is unavailable: "
                               f"{type(exc).__name__}", None, "expert_unavailable") from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:  # not an OpenAI reply
            raise RequestError(502, f"expert {expert}'s backend sent a malformed reply ({type(exc).__name__}: "
                               f"{str(exc)[:120]})", None, "backend_error") from None
        text = "".join(pieces)
        if n_new is None:
            n_new = len(encode_text(self.mixture.tokenizer, text))
        return text, finish, n_new

    def health(self) -> dict:
        """A count only: a backend's URL may carry credentials, and /health answers without a key."""
        return {"experts": self.mixture.num_experts, "backends": len(self.urls)}

    def close(self) -> None:
        self.client.close()


def _events(response: httpx.Response):
    """The JSON payloads of a server-sent event stream, up to [DONE]."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if not isinstance(payload, dict):
            raise TypeError(f"an event is {type(payload).__name__}, not an object")
        if "error" in payload:
            raise RequestError(502, f"backend error: {payload['error'].get('message', payload['error'])}", None,
                               "backend_error")
        yield payload


def _backend_error(expert: int, response: httpx.Response) -> RequestError:
    """A backend's 4xx is the client's problem (passed on), its 5xx ours (502)."""
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    status = response.status_code if 400 <= response.status_code < 500 else 502
    return RequestError(status, f"expert {expert}'s backend answered {response.status_code}: {message}", None,
                        "backend_error")
