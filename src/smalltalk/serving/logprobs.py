"""Per-token log-probabilities as the engines record them and as OpenAI's two schemas return them.

An entry is (token id, log p(token), [(id, log p) of the `top` likeliest tokens]), from the expert's raw
logits (before temperature or top-p), or (id, None, None) for a prompt's first token, which nothing
predicts. Completions return the legacy schema (tokens, token_logprobs, top_logprobs, text_offset), chat
the `content` list; with `echo`, the prompt's entries come first.
"""

from __future__ import annotations

import torch

Entry = tuple[int | str, float | None, list[tuple[int | str, float]] | None]  # str: a backend's token text


def _text(tokenizer, token: int | str) -> str:
    return token if isinstance(token, str) else tokenizer.decode([token])


def backend_entries(legacy: dict) -> list[Entry]:
    """Entries from a backend's completions `logprobs` (the legacy schema; tokens as the backend's text)."""
    tokens, values, tops = legacy["tokens"], legacy["token_logprobs"], legacy["top_logprobs"]
    if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)
            and len(tokens) == len(values) == len(tops)):
        raise TypeError("the backend's logprobs are not three lists of one length")
    out = []
    for token, value, top in zip(tokens, values, tops, strict=True):
        if not isinstance(token, str) or not (value is None or isinstance(value, (int, float))) or \
                not (top is None or isinstance(top, dict)):
            raise TypeError("a backend logprobs entry has the wrong types")
        out.append((token, value, None if top is None else [(str(k), float(v)) for k, v in top.items()]))
    return out


def token_entries(logits: torch.Tensor, targets: list[int], top: int) -> list[Entry]:
    """Entries of `targets` [T] under `logits` [T, V] (row t predicts targets[t])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)].tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        alternatives = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        alternatives = [[] for _ in targets]
    return [(int(t), c, a) for t, c, a in zip(targets, chosen, alternatives, strict=True)]


def prompt_entries(logits: torch.Tensor, prompt: list[int], top: int) -> list[Entry]:
    """`echo`'s entries of a prompt from the logits of its positions [len(prompt) - 1, V] (position t predicts
    token t + 1): nothing predicts the first token."""
    return [(prompt[0], None, None)] + token_entries(logits, prompt[1:], top)


def completion_logprobs(tokenizer, entries: list[Entry], text_length: int | None = None) -> dict:
    """The legacy schema: token strings, their log-probs, {token: log p} of the alternatives, character
    offsets; with `text_length` (a stop string cut the text), only the entries that start inside it."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, logprob, alternatives in entries:
        if text_length is not None and offset >= text_length and out["tokens"]:
            break
        piece = _text(tokenizer, token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if alternatives is None else
                                   {_text(tokenizer, i): v for i, v in alternatives})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tokenizer, entries: list[Entry], text_length: int | None = None) -> dict:
    """The chat schema: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    legacy = completion_logprobs(tokenizer, entries, text_length)
    content = []
    for (_, logprob, alternatives), piece in zip(entries, legacy["tokens"], strict=False):
        tops = [{"token": _text(tokenizer, i), "logprob": v, "bytes": list(_text(tokenizer, i).encode())}
                for i, v in alternatives or []]
        content.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()), "top_logprobs": tops})
    return {"content": content}


def prompt_text(tokenizer, choice: dict) -> str:
    """The prompt as `echo` returns it: the string sent, or the text of the token ids sent."""
    return choice["prompt"] if isinstance(choice["prompt"], str) else tokenizer.decode(choice["prompt"])


def choice_logprobs(tokenizer, choice: dict, chat: bool, text_length: int | None) -> dict | None:
    """A choice's log-probs in its endpoint's schema (None when not asked): the echoed prompt's entries
    first, then the generated ones recorded so far."""
    if choice["logprobs"] is None:
        return None
    entries = (choice.get("prompt_logprobs", []) if choice.get("echo") else []) + list(choice.get("token_logprobs", []))
    return (chat_logprobs if chat else completion_logprobs)(tokenizer, entries, text_length)


class StreamedChoice:
    """What one choice of a stream has sent so far, so that its chunks' texts and log-probs add up to the
    non-streamed answer: the echoed prompt rides on its first chunk, and each chunk carries the entries
    whose text starts inside what has been sent (the rest, on the final chunk)."""

    def __init__(self, tokenizer, choice: dict, chat: bool) -> None:
        self.tokenizer, self.choice, self.chat = tokenizer, choice, chat
        self.text, self.sent_entries, self.echoed = "", 0, not choice.get("echo")

    def piece(self, piece: str) -> tuple[str, dict | None]:
        text = self._echo() + piece
        self.text += text
        return text, self._new(len(self.text))

    def final(self) -> tuple[str, dict | None]:
        text = self._echo()
        self.text += text
        return text, self._new(len(self.text) if self.choice["stop"] else None)

    def _echo(self) -> str:
        if self.echoed:
            return ""
        self.echoed = True
        return prompt_text(self.tokenizer, self.choice)

    def _new(self, text_length: int | None) -> dict | None:
        full = choice_logprobs(self.tokenizer, self.choice, self.chat, text_length)
        if full is None:
            return None
        start = self.sent_entries
        if self.chat:
            self.sent_entries = len(full["content"])
            return {"content": full["content"][start:]}
        self.sent_entries = len(full["tokens"])
        return {key: values[start:] for key, values in full.items()}
