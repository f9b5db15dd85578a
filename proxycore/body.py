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
import zlib
from typing import Any

import orjson

_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]')  # strings (escapes included) and brackets
_WS = b" \t\r\n"


class BodyError(ValueError):
    """The body is not a JSON object; the message says why."""


class EncodingError(ValueError):
    """A Content-Encoding proxycore cannot undo; `status` is 415 (unknown), 413 (too large decoded) or 400."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_content(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """A body as its sender meant it: gzip and deflate undone (in the reverse of their listed order), at most
    `limit` bytes decoded. The backend is sent the decoded bytes (vLLM takes no compressed bodies)."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() not in ("", "identity")]
    for coding in reversed(codings):
        wbits = _DECODERS.get(coding)
        if wbits is None:
            raise EncodingError(415, f"Content-Encoding `{coding}` is not supported: send the body as it is, or "
                                "gzip or deflate it.")
        raw = _inflate(raw, coding, wbits, limit)
    return raw


def _inflate(raw: bytes, coding: str, wbits: int, limit: int) -> bytes:
    for bits in (wbits, -zlib.MAX_WBITS) if coding == "deflate" else (wbits,):  # deflate: zlib-wrapped or raw
        d = zlib.decompressobj(bits)
        try:
            out = d.decompress(raw, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise EncodingError(413, f"The body is larger than the limit of {limit / (1024 * 1024):g} MB once "
                                f"decoded ({coding}).")
        if d.eof and not d.unused_data:
            return out
    raise EncodingError(400, f"The body is not valid {coding} data, as its Content-Encoding says.")


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


_TRUE = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "off", "0"})


def lax_bool(value: Any) -> bool | None:
    """A flag as vLLM reads it (pydantic's lax mode: true, 1, "true", "yes", "on", ... and their opposites);
    None when vLLM would refuse it, which proxycore leaves to the backend to say."""
    if type(value) is bool:
        return value
    if type(value) in (int, float) and value in (0, 1):
        return bool(value)
    if type(value) is str:
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    return None


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
    """The body for a backend that serves the model as `model`: only the top-level "model" value changes
    (or, where the client left the model to the gateway, a "model" is added)."""
    value = orjson.dumps(model)
    first = raw.find(b'"model"')
    if first >= 0 and raw.find(b'"model"', first + 7) < 0:  # the usual case: one "model", the key itself
        colon = _skip_ws(raw, first + 7)
        if raw[colon:colon + 1] == b":":
            start = _skip_ws(raw, colon + 1)
            m = _TOKEN.match(raw, start)
            if m is not None and raw[start] == 0x22:
                return raw[:start] + value + raw[m.end():]
    if "model" in top_level_values(raw):
        return rewrite(raw, {"model": value})
    return rewrite(raw, {}, {"model": value})


# ---------------------------------------------------------------- multipart/form-data (audio uploads)

FORM_FIELD_LIMIT = 4096  # the longest form value read as a field (model, stream, ...); a file part is never read


def form_boundary(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type, or None when it is not one (RFC 7578)."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if 0 < len(value) <= 70:
                return value.encode("latin-1", "replace")
    return None


def _form_parts(raw: bytes, boundary: bytes) -> tuple[list[bytes], bytes]:
    """The parts between the delimiters (each `headers CRLF CRLF content`) and what follows the last one."""
    delimiter = b"\r\n--" + boundary
    pieces = (b"\r\n" + raw).split(delimiter)
    if len(pieces) < 2 or not pieces[-1].startswith(b"--"):
        raise BodyError("The multipart/form-data body is not complete: its closing boundary is missing.")
    parts = []
    for piece in pieces[1:-1]:
        start = piece.find(b"\r\n")  # after the delimiter: optional padding, then CRLF
        if start < 0 or piece[:start].strip(b" \t"):
            raise BodyError("The multipart/form-data body is malformed: a boundary line has trailing text.")
        parts.append(piece[start + 2:])
    return parts, pieces[-1]


def _part_name(part: bytes) -> tuple[str | None, bool]:
    """The form name of a part and whether it is a file (has a filename)."""
    head, _, _ = part.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            m = _DISPOSITION_NAME.search(value)
            return (m.group(1).decode("utf-8", "replace") if m else None), _DISPOSITION_FILE.search(value) is not None
    return None, False


_DISPOSITION_NAME = re.compile(rb';\s*name="([^"]*)"', re.IGNORECASE)
_DISPOSITION_FILE = re.compile(rb';\s*filename\*?=', re.IGNORECASE)


def form_fields(raw: bytes, boundary: bytes) -> dict[str, str]:
    """The form's plain fields (not files), first value of each name; BodyError when the body is malformed."""
    fields: dict[str, str] = {}
    parts, _ = _form_parts(raw, boundary)
    for part in parts:
        name, is_file = _part_name(part)
        if name is None or is_file or name in fields:
            continue
        _, sep, content = part.partition(b"\r\n\r\n")
        if sep and len(content) <= FORM_FIELD_LIMIT:
            fields[name] = content.decode("utf-8", "replace")
    return fields


def form_with_model(raw: bytes, boundary: bytes, model: str) -> bytes:
    """The form for a backend that serves the model as `model`: only the `model` field's value changes (or is
    added as the first part); file parts travel byte for byte."""
    parts, closing = _form_parts(raw, boundary)
    value = model.encode()
    new_part = b'Content-Disposition: form-data; name="model"\r\n\r\n' + value
    out, replaced = [], False
    for part in parts:
        name, is_file = _part_name(part)
        if name == "model" and not is_file:
            head, _, _ = part.partition(b"\r\n\r\n")
            part = head + b"\r\n\r\n" + value
            replaced = True
        out.append(part)
    if not replaced:
        out.insert(0, new_part)
    delimiter = b"--" + boundary
    return b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in out) + delimiter + closing
