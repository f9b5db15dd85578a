"""A request body passed through as the client sent it.

proxycore reads the fields it routes by (`model`, `stream`, `stream_options`, the token limits) from a
parse of the body, and sends the backend the client's own bytes with only what it must change
rewritten in place: the value of the top-level `model` (the backend's id for it) and, for a stream,
`stream_options` (usage asked for). Numbers, key order, spacing and everything else reach the
backend as written: a 2^70 seed, a 1e-7 penalty or a schema nested 500 deep stays what it was.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]')  # strings (escapes included) and brackets
_WS = b" \t\r\n"


class BodyError(ValueError):
    """The body is not a JSON object; the message says why."""


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a dict: orjson for speed, the standard library for what orjson refuses but JSON allows
    (integers beyond 64 bits, nesting beyond 1024)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BodyError(f"The body is not valid UTF-8 JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise BodyError("The body must be a JSON object.")
    return body


def _skip_ws(raw: bytes, i: int) -> int:
    n = len(raw)
    while i < n and raw[i] in _WS:
        i += 1
    return i


def top_level_values(raw: bytes) -> dict[str, list[tuple[int, int]]]:
    """Where each top-level key's value lies in `raw`: key -> [(start, end)] (a key may repeat).

    Walks strings and brackets only (a regex skips everything else), so a long prompt costs one step.
    """
    spans: dict[str, list[tuple[int, int]]] = {}
    depth = 0
    key: str | None = None  # a top-level key whose value has not ended yet
    value_start = -1
    for m in _TOKEN.finditer(raw):
        start, end = m.span()
        c = raw[start]
        if c == 0x22:  # a string
            if depth != 1:
                continue
            if key is not None:
                if start == value_start:  # the key's value is this string
                    spans.setdefault(key, []).append((start, end))
                    key = None
                    continue
                _scalar(raw, key, value_start, start, spans)  # a number, true, false or null ended before
                key = None
            after = _skip_ws(raw, end)
            if raw[after:after + 1] == b":":
                key = json.loads(raw[start:end])
                value_start = _skip_ws(raw, after + 1)
        elif c in b"{[":
            depth += 1
        else:
            depth -= 1
            if key is not None and depth == 1 and raw[value_start] in b"{[":
                spans.setdefault(key, []).append((value_start, end))  # an object or array value ends here
                key = None
            elif key is not None and depth == 0:
                _scalar(raw, key, value_start, start, spans)
                key = None
            if depth == 0:
                break
    return spans


def _scalar(raw: bytes, key: str, start: int, limit: int, spans: dict[str, list[tuple[int, int]]]) -> None:
    end = start
    while end < limit and raw[end] not in b",}] \t\r\n":
        end += 1
    spans.setdefault(key, []).append((start, end))


def rewrite(raw: bytes, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> bytes:
    """`raw` with the values of top-level keys replaced (every occurrence) and keys added at the front."""
    spans = top_level_values(raw) if replace else {}
    edits = sorted((s, e, replace[k]) for k, found in spans.items() if k in replace for s, e in found)
    out = []
    at = 0
    for s, e, value in edits:
        out.append(raw[at:s])
        out.append(value)
        at = e
    out.append(raw[at:])
    text = b"".join(out)
    if add:
        opening = text.index(b"{") + 1
        rest = text[_skip_ws(text, opening):]
        sep = b"" if rest.startswith(b"}") else b","
        added = b",".join(orjson.dumps(k) + b":" + v for k, v in add.items())
        text = text[:opening] + added + sep + text[opening:]
    return text


def with_model(raw: bytes, model: str) -> bytes:
    """The body for a backend that serves the model as `model`: only the top-level "model" value changes."""
    value = orjson.dumps(model)
    first = raw.find(b'"model"')
    if first >= 0 and raw.find(b'"model"', first + 7) < 0:  # the usual case: one "model", the key itself
        colon = _skip_ws(raw, first + 7)
        if raw[colon:colon + 1] == b":":
            start = _skip_ws(raw, colon + 1)
            m = _TOKEN.match(raw, start)
            if m is not None and raw[start] == 0x22:
                return raw[:start] + value + raw[m.end():]
    return rewrite(raw, {"model": value})
