"""The mixture's one chat template, and a conversation's tokens with a loss mask on assistant tokens only.

Each system or user message is "<|role|>\\ncontent\\n"; an assistant message is "<|assistant|>\\ncontent"
followed by the end-of-text token (where generation stops); a prompt for generation ends with
"<|assistant|>\\n". Without earlier assistant turns this is exactly the text the server's built-in chat
format renders (`serving.protocol.chat_prompt`), and a tokenizer that carries the template makes the
server render with it. Training tokenises the text between answers and each answer separately, as
inference does (the prompt is tokenised alone, the answer generated token by token).
"""

from __future__ import annotations

from smalltalk.data.tokenizer import encode_text
from smalltalk.errors import SmalltalkError

CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
                 "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


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

