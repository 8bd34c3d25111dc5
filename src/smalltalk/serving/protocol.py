"""What a request may be: the OpenAI fields we accept, the chat template, and the errors we answer.

Chat template (documented, deliberately simple): each message becomes "<|role|>\\ncontent\\n" and the
prompt ends with "<|assistant|>\\n"; generation stops at the end-of-text token. Roles are system, user
or assistant, and a content holding a role marker is refused (it would forge a turn).
"""

from __future__ import annotations

import threading

import torch

from smalltalk.data.chat import ChatFormatError, normalize, prompt_text
from smalltalk.data.tokenizer import encode_text


class RequestError(Exception):
    """A 4xx/5xx answer in the OpenAI shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Cancelled(Exception):
    """The client went away: its generation stops (or never starts)."""


# What a request may carry. USED change the answer; IGNORED are bookkeeping OpenAI defines that cannot
# (a caller id, storage hints); NEUTRAL are fields we do not implement, accepted only at the value that
# means "off" (what every client sends by default). Anything else, or another value, is a 400 naming the
# field: never a silent drop (docs/serving.md has the list).
USED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
        "stream", "stream_options", "stop", "n", "logprobs", "top_logprobs", "echo"}
IGNORED = {"user", "metadata", "store", "service_tier"}
NEUTRAL = {"logit_bias": (None, {}), "presence_penalty": (None, 0),
           "frequency_penalty": (None, 0), "suffix": (None, ""), "best_of": (None, 1),
           "response_format": (None, {"type": "text"}), "tools": (None, []),
           "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False), "functions": (None, []),
           "function_call": (None, "none")}


def check_fields(body: dict) -> None:
    """A 400 for a field this server does not know, or does not implement at the value asked for."""
    for key, value in body.items():
        if key in USED or key in IGNORED:
            continue
        if key not in NEUTRAL:
            raise RequestError(400, f"unknown field {str(key)[:40]!r}", str(key)[:40], "unknown_field")
        if not any(_same(value, off) for off in NEUTRAL[key]):
            raise RequestError(400, f"'{key}' is not supported by this server (only its default is accepted); "
                               "see docs/serving.md for the fields it implements", key, "unsupported_field")


def _same(value: object, off: object) -> bool:
    """value == off, without True counting as 1 (JSON's true is no number); 1.0 counts as 1."""
    if off is None or isinstance(off, bool) or isinstance(value, bool):
        return value is off
    if _is_number(off):
        return _is_number(value) and value == off
    return type(value) is type(off) and value == off


MAX_STOPS = 4  # as OpenAI
MAX_CHOICES = 64  # prompts x n in one request: each is a row of a batch
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # alternatives per token, as OpenAI
MIN_TEMPERATURE = 1e-5  # below it a request decodes greedily (docs/serving.md): the limit, computable in float32
def chat_prompt(messages: object) -> str:
    """The prompt text of a chat request (data/chat.py, the one chat format); a 400 naming what is wrong."""
    return prompt_text(chat_messages(messages))


def chat_messages(messages: object) -> list[dict]:
    """The request's messages checked, each content as text (text parts joined)."""
    try:
        return normalize(messages)
    except ChatFormatError as exc:
        raise RequestError(400, str(exc), "messages") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Validator:
    """Turns a JSON body into a request dict, or raises RequestError (never anything else)."""

    def __init__(self, tokenizer, model_name: str, context: int, max_tokens_limit: int,
                 route_on: str = "prompt") -> None:
        """route_on: "user_text" routes a chat request on its first user message alone, as an SFT mixture
        tuned with sft.route_on=user_text was routed in training (mixture.json records it)."""
        self.tokenizer, self.model_name, self.context, self.route_on = tokenizer, model_name, context, route_on
        self.max_tokens_limit = max_tokens_limit
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = context * max(1, longest)  # longer prompts cannot fit: refused untokenised

    def __call__(self, body: object, chat: bool) -> dict:
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        check_fields(body)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "'model' must be a string", "model")
        if model not in (self.model_name, None):
            raise RequestError(404, f"model {model[:80]!r} does not exist; this server has "
                               f"{self.model_name!r}", "model", "model_not_found")
        prompts = [self._chat(body.get("messages"))] if chat else _completion_prompts(body.get("prompt"))
        req = {**self._sampling(body), **_logprobs(body, chat)}
        if req["max_tokens"] == 0 and not req["echo"]:
            raise RequestError(400, "'max_tokens' may be 0 only with 'echo' (scoring the prompt)", "max_tokens")
        if len(prompts) * req["n"] > MAX_CHOICES:
            raise RequestError(400, f"{len(prompts)} prompts x n = {req['n']} is over {MAX_CHOICES} completions in "
                               "one request", "n")
        req["prompts"] = [self._prompt(p, body, chat, req["max_tokens"]) for p in prompts]
        return {**req, **req["prompts"][0], "cancel": threading.Event()}

    def _prompt(self, prompt: str | list[int], body: dict, chat: bool, max_tokens: int) -> dict:
        """One prompt (text, or token ids) as the ids the expert reads and the ids the routers score."""
        if isinstance(prompt, str):
            if len(prompt) > self.max_prompt_chars:
                raise RequestError(400, f"the prompt ({len(prompt)} characters) cannot fit the context of "
                                   f"{self.context} tokens", "prompt", "context_length_exceeded")
            ids = torch.tensor([encode_text(self.tokenizer, prompt)], dtype=torch.long)
        else:
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise RequestError(400, f"a prompt token id is outside the vocabulary [0, {vocab})", "prompt")
            ids = torch.tensor([prompt], dtype=torch.long)
        if ids.shape[1] < 2:
            raise RequestError(400, "the prompt must be at least 2 tokens long to be routed", "prompt")
        if ids.shape[1] + max_tokens > self.context:
            raise RequestError(400, f"prompt ({ids.shape[1]} tokens) + max_tokens ({max_tokens}) exceeds the "
                               f"context of {self.context} tokens", "max_tokens", "context_length_exceeded")
        route_ids = ids
        if chat and self.route_on == "user_text":
            user = next((m["content"] for m in chat_messages(body["messages"]) if m["role"] == "user"), "")
            user_ids = torch.tensor([encode_text(self.tokenizer, user)], dtype=torch.long)
            route_ids = user_ids if user_ids.shape[1] >= 2 else ids  # a 1-token message: the whole prompt
        return {"prompt": prompt, "ids": ids, "route_ids": route_ids}

    def _chat(self, messages: object) -> str:
        """The checks of chat_prompt; the text of the tokenizer's own chat template when it has one (an SFT
        mixture's: data/chat.py's), so the server formats a conversation as the experts were tuned on."""
        checked = chat_messages(messages)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(checked, tokenize=False, add_generation_prompt=True)
        return prompt_text(checked)

    def _sampling(self, body: dict) -> dict:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        max_tokens = 16 if max_tokens is None else max_tokens
        limit = self.max_tokens_limit
        if not _is_int(max_tokens) or not 0 <= max_tokens <= limit:
            raise RequestError(400, f"'max_tokens' must be an integer in [1, {limit}] (0 with 'echo')", "max_tokens")
        temperature = 1.0 if body.get("temperature") is None else body["temperature"]
        top_p = 1.0 if body.get("top_p") is None else body["top_p"]
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise RequestError(400, "'temperature' must be a number in [0, 2]", "temperature")
        if temperature < MIN_TEMPERATURE:  # its limit: float32 logits / 1e-300 are inf, and softmax NaN
            temperature = 0.0
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise RequestError(400, "'top_p' must be a number in (0, 1]", "top_p")
        seed, stream = body.get("seed"), body.get("stream", False)
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
            raise RequestError(400, "'seed' must be a non-negative integer", "seed")
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise RequestError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                               "stream_options")
        n = 1 if body.get("n") is None else body["n"]
        if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
            raise RequestError(400, f"'n' must be an integer in [1, {MAX_CHOICES}]", "n")
        return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p), "seed": seed,
                "stream": stream, "include_usage": options.get("include_usage", False), "n": n,
                "stop": _stops(body.get("stop"))}


def route_on(mixture) -> str:
    """How the mixture's SFT routed its examples ("prompt" for a pre-trained mixture)."""
    return mixture.manifest.get("sft", {}).get("route_on", "prompt")


def _completion_prompts(prompt: object) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of lists of
    token ids (a batch: one completion each, each routed on its own)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                           "lists of token ids", "prompt")
    for p in prompt:
        if isinstance(p, str) and p.strip():
            continue
        if not (isinstance(p, list) and p and all(_is_int(t) for t in p)):
            raise RequestError(400, "each prompt must be a non-empty string or a non-empty list of token ids",
                               "prompt")
    return prompt


def _logprobs(body: dict, chat: bool) -> dict:
    """{"logprobs": alternatives per token or None (off), "echo": bool}. Completions: `logprobs` 0-5 and
    `echo`; chat: `logprobs` true/false and `top_logprobs` 0-20 (no echo)."""
    top, echo = body.get("top_logprobs"), body.get("echo")
    limit = MAX_LOGPROBS["chat" if chat else "completions"]
    if chat:
        on = body.get("logprobs")
        if on is not None and not isinstance(on, bool):
            raise RequestError(400, "'logprobs' must be true or false", "logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= limit or not on):
            raise RequestError(400, f"'top_logprobs' must be an integer in [0, {limit}], with 'logprobs': true",
                               "top_logprobs")
        if echo not in (None, False):
            raise RequestError(400, "'echo' is a field of /v1/completions, not of chat", "echo")
        count = (top or 0) if on else None
    else:
        count = body.get("logprobs")
        if count is False:
            count = None
        if count is not None and (not _is_int(count) or not 0 <= count <= limit):
            raise RequestError(400, f"'logprobs' must be an integer in [0, {limit}]", "logprobs")
        if top not in (None, 0):
            raise RequestError(400, "'top_logprobs' is a field of chat; completions take 'logprobs': N", "top_logprobs")
        if echo is not None and not isinstance(echo, bool):
            raise RequestError(400, "'echo' must be true or false", "echo")
    return {"logprobs": count, "echo": bool(echo)}


def _stops(stop: object) -> list[str]:
    """`stop`: null, a string, or a list of up to MAX_STOPS non-empty strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(x, str) and x for x in stops):
        raise RequestError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return stops


class StopText:
    """A completion's text as its tokens arrive, cut before the first stop string. Pieces to stream hold
    back any tail that could still begin a stop string, so no chunk ever shows text past one."""

    def __init__(self, decoder: TextDecoder, stops: list[str]) -> None:
        self.decoder, self.stops = decoder, stops
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)

    @property
    def result(self) -> str:
        """The text up to the first stop string (all of it when none occurs)."""
        cut = self._cut()
        return self.text if cut is None else self.text[:cut]

    def _cut(self) -> int | None:
        found = [i for s in self.stops if (i := self.text.find(s)) >= 0]
        return min(found) if found else None

    def _release(self, final: bool) -> str:
        cut = self._cut()
        if cut is not None:
            self.stopped, end = True, cut
        elif final:
            end = len(self.text)
        else:  # keep back the longest tail that is the start of a stop string
            held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - held
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


class TextDecoder:
    """Token ids in, text pieces out: decodes the whole completion so far and emits what is new, holding
    back a piece that ends inside a multi-byte character (U+FFFD) until the next token completes it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def flush(self) -> str:
        """What was held back when the completion ends (a character the last tokens never completed stays
        U+FFFD, as in the text decoded at once): streamed pieces then add up to the non-streamed text."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.sent = text[self.sent:], len(text)
        return piece
