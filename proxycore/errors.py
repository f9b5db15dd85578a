"""OpenAI-shaped error responses: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import orjson
from aiohttp import web

# status -> OpenAI error type
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def error_body(status: int, message: str, code: str | None, param: str | None = None,
               type_: str | None = None) -> bytes:
    return orjson.dumps({"error": {
        "message": message,
        "type": type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
        "param": param,
        "code": code,
    }})


def error_response(status: int, message: str, code: str | None, param: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    return web.Response(status=status, body=error_body(status, message, code, param, type_), headers=h)


def upstream_error_message(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, param) from a backend's error body, whatever its shape (vLLM's flat or OpenAI's nested)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:200].decode("utf-8", "replace").strip()
        return (text or "the backend returned no body", None, None)
    if isinstance(data, dict):
        inner = data.get("error") if isinstance(data.get("error"), dict) else data
        message = inner.get("message") or inner.get("detail") or inner.get("error")
        if isinstance(message, str):
            t = inner.get("type")
            p = inner.get("param")
            return (message, t if isinstance(t, str) else None, p if isinstance(p, str) else None)
    return ("the backend returned an error without a message", None, None)
