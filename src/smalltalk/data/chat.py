"""The mixture's one chat format: what the server renders, what SFT trains on, the tokenizer's chat template.

Each system or user message is "<|role|>\\ncontent\\n"; an assistant message is "<|assistant|>\\ncontent" followed
by the end-of-text token (where generation stops); a prompt for generation ends with "<|assistant|>\\n". Without
earlier assistant turns `prompt_text` renders exactly what CHAT_TEMPLATE renders. A message's content is a
string, or a list of text parts ({"type": "text", "text": ...}, as current OpenAI clients send), joined with
newlines as vLLM's OpenAI server joins them; any other part type is refused by name. Training tokenises the
text between answers and each answer separately, as inference does (the prompt alone, the answer token by token).
"""

from __future__ import annotations

from smalltalk.data.tokenizer import encode_text
from smalltalk.errors import SmalltalkError

ROLES = ("system", "user", "assistant")
MARKERS = tuple(f"<|{role}|>" for role in ROLES)
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
                 "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


class ChatFormatError(ValueError):
    """Messages this format cannot render (the server answers 400 with the message)."""


def content_text(content: object) -> str:
    """A message's content as text: a string, or the texts of a list of text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError("each message needs string 'role' and 'content' (a string or a list of text parts)")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ChatFormatError(f"content part of type {str(kind)[:40]!r} is not supported: only text parts "
                                  "({\"type\": \"text\", \"text\": ...})")
        if not isinstance(part.get("text"), str):
            raise ChatFormatError("a text part needs a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize(messages: object) -> list[dict]:
    """Checked messages with string contents: roles known, no forged role markers."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatFormatError("each message needs string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"role {m['role'][:40]!r} is not one of {', '.join(ROLES)}")
        text = content_text(m["content"])
        if any(marker in text for marker in MARKERS):
            raise ChatFormatError("message content may not contain a role marker such as <|user|>")
        out.append({"role": m["role"], "content": text})
    return out


def prompt_text(messages: list[dict]) -> str:
    """The generation prompt of normalized messages."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, mask) of a conversation ending with an assistant turn: mask 1 on each assistant turn's
    content and its end-of-text token, 0 elsewhere."""
    if not messages or messages[-1]["role"] != "assistant":
        raise SmalltalkError("an instruction example must end with an assistant message")
    ids, mask, pending = [], [], ""
    for message in messages:
        if message["role"] != "assistant":
            pending += f"<|{message['role']}|>\n{message['content']}\n"
            continue
        head = encode_text(tokenizer, pending + "<|assistant|>\n")
        answer = encode_text(tokenizer, message["content"]) + [tokenizer.eos_token_id]
        ids += head + answer
        mask += [0] * len(head) + [1] * len(answer)
        pending = ""
    return ids, mask
