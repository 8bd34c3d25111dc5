"""JSON and text that come from outside (corpus lines, instruction files, HTTP bodies), parsed so that any
input gives one clear error instead of a crash deep in a tokenizer.

What Python's `json` accepts but nothing downstream can use: nesting deep enough to exhaust the recursion
limit (RecursionError), integers past 4,300 digits (ValueError, not JSONDecodeError), the non-standard
constants NaN/Infinity, and escaped lone surrogates ("\\ud800"), which decode to a `str` that cannot be
encoded as UTF-8 and so crash a Rust tokenizer.
"""

from __future__ import annotations

import json
import re

MAX_DEPTH = 64  # deeper JSON is refused before it is parsed; no field we read nests beyond a few levels
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadInput(ValueError):
    """What is wrong with a JSON text or a string, said in one line."""


def _constant(name: str) -> None:
    raise BadInput(f"{name} is not valid JSON (only finite numbers are)")


def _nesting(text: str) -> int:
    """The deepest nesting of brackets outside strings (a cheap scan, so the parser never recurses far)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str | bytes, max_depth: int | None = MAX_DEPTH) -> object:
    """json.loads, but every bad input is a BadInput: malformed, nested over `max_depth` (None: only as
    deep as the parser's recursion limit; a corpus reader's choice, where scanning every line costs time),
    an integer too long to convert, NaN/Infinity, or a string holding a lone surrogate."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"invalid UTF-8 at byte {exc.start}") from None
    if max_depth is not None and text.count("[") + text.count("{") > max_depth and _nesting(text) > max_depth:
        raise BadInput(f"JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise BadInput(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except BadInput:
        raise
    except (ValueError, RecursionError) as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string"
        raise BadInput(f"JSON value refused: {str(exc)[:120]}") from None
    _check_strings(value)
    return value


def _check_strings(value: object) -> None:
    """Every string (and key) encodable as UTF-8; iterative, so depth costs no recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_text(text: str, what: str = "a string") -> str:
    """`text`, or BadInput if it holds a lone surrogate (an escape like \\ud800 that is half a character)."""
    found = _SURROGATE.search(text)
    if found:
        raise BadInput(f"{what} holds a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}: "
                       "half of a UTF-16 pair, not a character")
    return text
