"""How proxycore answers with an error: one exception type, `ApiError`, whose fields are the OpenAI error
(`{"error": {"message", "type", "param", "code"}}`, typed by status from controller/model/openai_errors.py)."""

from __future__ import annotations

import orjson
from aiohttp import web

from controller.model.openai_errors import error_body


class ApiError(Exception):
    """A request refused or failed; the one way a handler ends with an error answer."""

    def __init__(self, status: int, message: str, code: str | None, param: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.headers = headers

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})} if self.headers else extra_headers
        return error_response(self.status, self.message, self.code, self.param, self.type, headers)


def error_response(status: int, message: str, code: str | None, param: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    return web.Response(status=status, body=error_body(status, message, code, param, type_), headers=h)


def is_openai_error(raw: bytes) -> bool:
    """A body of the OpenAI error shape: {"error": {"message": str, ...}}, to pass on as it came."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    inner = data.get("error") if isinstance(data, dict) else None
    return isinstance(inner, dict) and isinstance(inner.get("message"), str) and set(inner) <= _ERROR_FIELDS


_ERROR_FIELDS = {"message", "type", "param", "code"}


def upstream_error_message(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, param) from a backend's error body, whatever its shape (vLLM's flat or OpenAI's nested)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:200].decode("utf-8", "replace").strip()
        return (text or "the backend returned no body", None, None)
    if isinstance(data, dict):
        inner: dict = data["error"] if isinstance(data.get("error"), dict) else data
        message = inner.get("message") or inner.get("detail") or inner.get("error")
        if isinstance(message, str):
            t = inner.get("type")
            p = inner.get("param")
            return (message, t if isinstance(t, str) else None, p if isinstance(p, str) else None)
    return ("the backend returned an error without a message", None, None)
