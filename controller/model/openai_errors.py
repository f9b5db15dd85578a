"""OpenAI-shaped errors, `{"error": {"message", "type", "param", "code"}}`: the one table of error types
by status, and the errors nginx answers by itself (rendered into its config from here, so that the
edge and proxycore speak alike)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

# status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    421: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}

INVALID_KEY_MESSAGE = "Invalid or missing API key. Send Authorization: Bearer <key>."


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, code: str | int | None, param: str | None = None,
               type_: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_ or error_type(status), "param": param,
                                   "code": code}})


@dataclass(frozen=True)
class EdgeError:
    """An answer nginx gives without asking anyone; `$name` in the message is an nginx variable."""

    status: int
    code: str
    message: str

    def body(self, **values: str) -> str:
        return error_body(self.status, self.message.format(**values), self.code).decode()


EDGE_ERRORS = {
    "invalid_api_key": EdgeError(401, "invalid_api_key", INVALID_KEY_MESSAGE),
    "wrong_host": EdgeError(401, "invalid_api_key", "This key is not valid on this host."),
    "request_too_large": EdgeError(413, "request_too_large",
                                   "Request body is larger than the gateway limit of {max_body}."),
    "unknown_host": EdgeError(421, "unknown_host", "Unknown host. This gateway serves only its configured domains."),
    "rate_limit_exceeded": EdgeError(429, "rate_limit_exceeded",
                                     "Rate limit reached for team $gw_team. Retry after $gw_retry_after s."),
    "metrics_not_public": EdgeError(404, "not_found", "Not found. Prometheus scrapes proxycore directly, not the "
                                                      "public endpoint."),
    "health_not_public": EdgeError(404, "not_found", "Not found. Deployment health is served on the port of "
                                                     "proxycore only."),
    "database_unavailable": EdgeError(503, "database_unavailable", "The key database is unreachable and this key "
                                                                   "is not cached; retry shortly."),
    "gateway_unavailable": EdgeError(503, "gateway_unavailable", "The gateway could not reach its model service. "
                                                                 "Retry shortly."),
    # what nginx refuses while it reads a request, before any location: JSON too, never its HTML pages
    "bad_request": EdgeError(400, "bad_request", "The request is not valid HTTP (its request line, headers or "
                                                 "chunked body)."),
    "method_not_allowed": EdgeError(405, "method_not_allowed", "This method is not allowed here."),
    "request_timeout": EdgeError(408, "request_timeout", "The request was not sent in time."),
    "uri_too_long": EdgeError(414, "uri_too_long", "The request URI is too long."),
    "headers_too_large": EdgeError(431, "headers_too_large", "The request headers are too large (8 KB a line)."),
    "not_implemented": EdgeError(501, "not_implemented", "This transfer encoding or method is not "
                                                         "supported."),
    "http_version_not_supported": EdgeError(505, "http_version_not_supported", "Use HTTP/1.0, HTTP/1.1 or HTTP/2."),
}
