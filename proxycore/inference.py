"""The hot path: an inference request (chat, completion, embedding, or another endpoint of endpoints.py)
from its body to its last byte.

`proxy_inference` reads top to bottom: who is asking, read and check the body, admission (limits.py),
pick a deployment (retrying and falling back), relay the answer, then one usage line, the metrics and
the settlement of what the request was charged. A refusal or failure is an `ApiError`, caught once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import HttpVersion11, web

from controller.model.usage_record import Clock, UsageRecord, usage_timestamp
from controller.model.wire import KEY_POLICY_HEADER, REQUEST_ID_HEADER, KeyPolicy
from proxycore import metrics
from proxycore.body import (
    BodyError,
    EncodingError,
    decode_content,
    form_boundary,
    form_fields,
    form_with_model,
    lax_bool,
    parse_json_object,
    rewrite,
    with_model,
)
from proxycore.endpoints import ENDPOINTS, Endpoint
from proxycore.errors import ApiError, error_response, is_openai_error, upstream_error_message
from proxycore.limits import Charge, admit_key, admit_team, check_model, check_request_bounds, estimate_prompt_tokens
from proxycore.live import LiveConfig, ServedConfig, authenticate
from proxycore.meters import Meters
from proxycore.router import DeploymentState, ModelGroup, pick_deployment
from proxycore.upstream import UpstreamClient, UpstreamError, UpstreamProtocolError, UpstreamResponse, UpstreamTimeout
from proxycore.usage_log import UsageLog

log = logging.getLogger("llmgate.proxy")
LIVE = web.AppKey("live", LiveConfig)
HTTP = web.AppKey("http", UpstreamClient)
USAGE = web.AppKey("usage", UsageLog)
METERS = web.AppKey("meters", Meters)
CLOCK = web.AppKey("clock", Clock)

_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0
_ERROR_BODY_LIMIT = 64 * 1024
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_CLIENT_HIGH_WATER = 256 * 1024  # bytes waiting for a slow client before the backend's stream is paused
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNAUTHORIZED = "Invalid or missing API key. Send `Authorization: Bearer <key>`."
POLICY_UNREADABLE = "The key's policy could not be read; try again."


@dataclass(slots=True)
class Exchange:
    """One client request as it moves through proxycore; becomes the usage-log line."""

    request_id: str
    endpoint: Endpoint
    upstream_path: str  # the backend's path, as vLLM writes it
    team: str | None
    key_id: str | None
    started: float
    model: str | None = None
    stream: bool = False
    routed: bool = False  # the model is a configured one
    deployment: DeploymentState | None = None
    holding: bool = False  # an attempt is counted in its deployment's in-flight
    status: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    retries: int = 0
    fallback: str | None = None
    key_policy: KeyPolicy | None = None  # a virtual key's limits (DB mode)
    charges: list[Charge] = field(default_factory=list)  # what limits.py holds for this request
    usage_source: str | None = None  # "backend" once the backend said its usage; see _settle_usage
    prompt_estimate: int = 0  # the prompt's tokens as estimated from the body, for when the backend says nothing
    relay: _SseRelay | None = None  # a stream's relay, which counts the events with generated text
    boundary: bytes | None = None  # a multipart/form-data body's boundary
    content_type: str | None = None  # the client's Content-Type, sent on for a multipart body

    @property
    def kind(self) -> str:
        return self.endpoint.kind


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _request_id(request: web.Request) -> str:
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid and _REQUEST_ID_OK.fullmatch(rid):
        return rid
    return f"{_ID_PREFIX}{next(_id_counter):016x}"  # unique per process, 32 hex digits like a uuid


def key_policy(request: web.Request, key_id: str | None) -> KeyPolicy | None:
    """A virtual key's policy from authsvc (via nginx); ApiError when one was sent but cannot be read."""
    if key_id is None:
        return None
    header = request.headers.get(KEY_POLICY_HEADER)
    if not header:
        return None
    policy = KeyPolicy.from_header(header)
    if policy is None:
        raise ApiError(401, POLICY_UNREADABLE, "invalid_api_key")
    return policy


def inference_routes() -> list[tuple[str, Handler]]:
    """(client path, handler) for every endpoint of endpoints.py."""
    return [(client, _handler(e, backend)) for e in ENDPOINTS for client, backend in e.routes]


def _handler(endpoint: Endpoint, upstream_path: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await proxy_inference(request, endpoint, upstream_path)
    return handle


async def proxy_inference(request: web.Request, endpoint: Endpoint, upstream_path: str) -> web.StreamResponse:
    app = request.app
    served = app[LIVE].served
    ok, team, key_id = authenticate(request, served)
    ex = Exchange(_request_id(request), endpoint, upstream_path, team, key_id, time.monotonic())
    try:
        if not ok:
            raise ApiError(401, UNAUTHORIZED, "invalid_api_key")
        if served.only_team is not None and team != served.only_team:
            raise ApiError(403, f"This proxycore serves team `{served.only_team}` only.", "wrong_instance")
        ex.key_policy = key_policy(request, key_id)
        raw, body = await _read_body(request, served, ex)
        ex.model = _model_of(body, served, ex)
        ex.stream = endpoint.streams and lax_bool(body.get("stream")) is True
        if ex.stream and request.version < HttpVersion11:
            raise ApiError(505, "Streamed answers need HTTP/1.1 (chunked transfer); send the request over HTTP/1.1 "
                           "or without `stream`.", "http_version_not_supported")
        group = served.groups.get(ex.model)
        if group is None:
            raise ApiError(404, f"The model `{ex.model}` does not exist. Available models: "
                           f"{', '.join(served.models_for(team)) or 'none'}.", "model_not_found", "model")
        ex.routed = True
        # an upload's bytes say nothing of its tokens; a JSON body's do (limits.estimate_prompt_tokens)
        prompt_bytes = 0 if ex.boundary is not None or not endpoint.counts_tokens else len(raw)
        ex.prompt_estimate = estimate_prompt_tokens(prompt_bytes)
        check_model(served, team, ex.model)
        meters = app.get(METERS)
        policy = served.teams.get(team) if team else None
        cap = check_request_bounds(policy, body, endpoint.generates)
        if cap is not None and ex.boundary is None:  # the team's cap, where the request set no limit of its own
            field = "max_output_tokens" if endpoint.kind == "responses" else "max_tokens"
            raw = rewrite(raw, {}, {field: b"%d" % cap})
            body[field] = cap
        if policy is not None and meters is not None:
            ex.charges.append(admit_team(meters, policy, body, prompt_bytes, endpoint.generates))
        if ex.key_policy is not None:
            if meters is None:
                raise ApiError(401, POLICY_UNREADABLE, "invalid_api_key")
            admit_key(meters, ex.key_policy, team, ex.model, body, prompt_bytes, endpoint.generates, ex.charges)
        if ex.stream:
            return await _relay_stream(request, served, raw, body, group, ex)
        return await _relay_unary(request, served, raw, group, ex)
    except ApiError as refusal:
        ex.status, ex.error = refusal.status, refusal.code
        return refusal.response({REQUEST_ID_HEADER: ex.request_id})
    except (asyncio.CancelledError, ConnectionResetError):
        ex.status, ex.error = 499, "client_closed_request"  # nginx's name for it
        raise
    except Exception:
        ex.status, ex.error = 500, "internal_error"  # a bug: the middleware answers, the line says what it was
        raise
    finally:
        try:
            _release(ex, answered=ex.status == 200)
            _record(app, ex)
        except Exception:  # accounting must never turn an answer into a 500; the bug is in the log
            log.exception("accounting of request %s failed", ex.request_id)


async def _read_body(request: web.Request, served: ServedConfig, ex: Exchange) -> tuple[bytes, dict]:
    """The body as sent, and its parse (a form's plain fields for an upload). Refused here only what cannot be
    routed: a body over the limit, or one that is not a JSON object (or a form, for an upload); every
    parameter is the backend's to check (a `stream` vLLM would refuse is sent on as a request without one)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit_mb = served.config.max_request_bytes / (1024 * 1024)
        raise ApiError(413, f"Request body is larger than the limit of {limit_mb:g} MB "
                       "(general_settings.max_request_size_mb).", "request_too_large") from None
    encoding = request.headers.get("Content-Encoding")
    if encoding:
        try:
            raw = decode_content(raw, encoding, served.config.max_request_bytes)
        except EncodingError as exc:
            code = {413: "request_too_large", 415: "unsupported_content_encoding"}.get(exc.status, "invalid_encoding")
            raise ApiError(exc.status, str(exc), code) from None
    if ex.endpoint.multipart:
        content_type = request.headers.get("Content-Type", "")
        ex.boundary = form_boundary(content_type)
        if ex.boundary is None:
            raise ApiError(400, f"`{request.path}` takes a multipart/form-data body (the audio file and its fields); "
                           f"this one is `{content_type or 'without a Content-Type'}`.", "invalid_request")
        ex.content_type = content_type
        try:
            return raw, form_fields(raw, ex.boundary)
        except BodyError as exc:
            raise ApiError(400, str(exc), "invalid_request") from None
    try:
        return raw, parse_json_object(raw)
    except BodyError as exc:
        raise ApiError(400, str(exc), "invalid_json") from None


def _model_of(body: dict, served: ServedConfig, ex: Exchange) -> str:
    """The model the request names; where vLLM makes it optional and it is absent, the one model the key may use."""
    model = body.get("model")
    if isinstance(model, str) and model:
        return model
    if model not in (None, "") or not ex.endpoint.model_optional:
        raise ApiError(400, "`model` is required and must be a string.", "invalid_type", "model")
    names = served.models_for(ex.team)
    if ex.key_policy is not None and ex.key_policy.models is not None:
        names = [n for n in names if n in ex.key_policy.models]
    if len(names) != 1:
        raise ApiError(400, f"`model` is required here: this key may use {len(names)} models "
                       f"({', '.join(names) or 'none'}), so the gateway cannot choose one.", "invalid_type", "model")
    return names[0]


# ---------------------------------------------------------------- deployments: pick, retry, fall back

def _attempt_plan(served: ServedConfig, group: ModelGroup) -> list[ModelGroup]:
    """The model group, then its fallbacks in order."""
    plan = [group]
    for name in served.config.router.fallbacks.get(group.name, ()):
        fb = served.groups.get(name)
        if fb is not None and fb is not group:
            plan.append(fb)
    return plan


def _hold(ex: Exchange, dep: DeploymentState, now: float) -> None:
    dep.started(now)
    metrics.in_flight(dep.d.id).inc()
    ex.deployment, ex.holding = dep, True


def _release(ex: Exchange, answered: bool) -> None:
    """End the current attempt's accounting at its deployment (exactly once per attempt)."""
    if not ex.holding:
        return
    ex.holding = False
    dep = ex.deployment
    assert dep is not None
    dep.finished(time.monotonic(), ex.ttft_s if answered else None, ex.prompt_tokens + ex.completion_tokens)
    metrics.in_flight(dep.d.id).dec()


def _attempt_failed(served: ServedConfig, ex: Exchange, kind: str, reason: str | None) -> None:
    """End a failed attempt; `reason` (the deployment's fault, in words) counts toward allowed_fails, None not."""
    _release(ex, answered=False)
    dep = ex.deployment
    assert dep is not None
    metrics.BACKEND_ERRORS.labels(dep.d.id, kind).inc()
    r = served.config.router
    if reason is not None and dep.failed(time.monotonic(), r.allowed_fails, r.cooldown_time, reason):
        metrics.DEPLOYMENT_UP.labels(dep.d.id).set(0)
        print(f"llmgate: deployment {dep.d.id} left rotation for {r.cooldown_time:g} s: {reason}", file=sys.stderr,
              flush=True)


# A backend's status that says the deployment is in trouble (a 500 may as well be the request's own fault).
DEPLOYMENT_FAULTS = frozenset({429, 502, 503, 504})


async def _call_upstream(request: web.Request, served: ServedConfig, raw: bytes, group: ModelGroup,
                         ex: Exchange) -> tuple[UpstreamResponse, bytes | None]:
    """POST to deployments until one answers with a status we pass on.

    Connection errors, timeouts, 429 and 502-504 move on to another deployment and count toward its
    allowed_fails. A 500 (or another 5xx but 502-504) moves on without counting; a 5xx from a second
    deployment for the same request makes it the request's own fault: no more attempts, and the client
    gets that answer as it came.
    Non-streaming bodies are read here too, so a response that breaks off is retried as well:
    nothing has reached the client yet. Streams return with the body unread.
    """
    session = request.app[HTTP]
    router = served.config.router
    strategy = router.routing_strategy
    last: ApiError | None = None
    answered_5xx: set[DeploymentState] = set()
    payloads: dict[str, bytes] = {}
    for plan_index, g in enumerate(_attempt_plan(served, group)):
        tried: set[DeploymentState] = set()
        allowed: int | None = None
        for attempt in itertools.count():
            now = time.monotonic()
            dep = pick_deployment(g, strategy, tried, now) or pick_deployment(g, strategy, frozenset(), now)
            if dep is None:
                last = last or ApiError(
                    503, f"No deployment of `{g.name}` is available (all out of rotation); retry shortly.",
                    "no_deployment_available", headers={"Retry-After": str(max(1, round(router.cooldown_time)))})
                break
            if allowed is None:
                allowed = 1 + (dep.d.max_retries if dep.d.max_retries is not None else router.num_retries)
            if attempt >= allowed:
                break
            if last is not None:
                ex.retries += 1
                delay = max(router.retry_after, _BACKOFF_BASE_S * 2 ** (ex.retries - 1))
                await asyncio.sleep(min(_BACKOFF_CAP_S, delay) * random.uniform(0.5, 1.0))
                now = time.monotonic()
            tried.add(dep)
            ex.fallback = g.name if plan_index else None
            payload = payloads.get(dep.d.upstream_model)
            if payload is None:  # the client's bytes, with only the backend's id for the model in them
                payload = payloads[dep.d.upstream_model] = (
                    with_model(raw, dep.d.upstream_model) if ex.boundary is None
                    else form_with_model(raw, ex.boundary, dep.d.upstream_model))
            headers = dict(dep.headers)
            headers[REQUEST_ID_HEADER] = ex.request_id
            if ex.content_type is not None:
                headers["Content-Type"] = ex.content_type
            _hold(ex, dep, now)
            first_byte = dep.stream_first_byte_timeout if ex.stream else dep.first_byte_timeout
            resp = None
            try:
                resp = await session.request("POST", dep.urls[ex.upstream_path], headers=headers, body=payload,
                                             connect_timeout=dep.connect_timeout, first_byte_timeout=first_byte,
                                             read_timeout=dep.stream_idle_timeout if ex.stream else first_byte)
                if resp.status >= 500 or resp.status == 429:
                    if resp.status >= 500:
                        answered_5xx.add(dep)
                        if len(answered_5xx) >= 2:  # a second deployment says so too: the request's own fault
                            return resp, None if ex.stream else await resp.read()
                    counted = resp.status in DEPLOYMENT_FAULTS
                    last = await _failure_from_status(resp, dep, g)
                    _attempt_failed(served, ex, "status_429" if resp.status == 429 else "status_5xx",
                                    f"{dep.d.api_base} answered {resp.status}" if counted else None)
                    continue
                if ex.stream:
                    return resp, None
                return resp, await resp.read()
            except UpstreamTimeout:
                last = ApiError(504, f"Deployment `{dep.d.id}` of `{g.name}` timed out before answering.",
                                "backend_timeout")
                _attempt_failed(served, ex, "timeout", f"{dep.d.api_base} sent nothing within {first_byte:g} s")
            except UpstreamError as exc:
                if resp is not None:  # the head came, the body broke off
                    last = ApiError(502, f"Deployment `{dep.d.id}` of `{g.name}` broke off its answer: "
                                    f"{type(exc).__name__}.", "backend_invalid_response")
                    _attempt_failed(served, ex, "broken_response", f"{dep.d.api_base} broke off its answer")
                    continue
                last = ApiError(503, f"Could not reach deployment `{dep.d.id}` of `{g.name}`: "
                                f"{type(exc).__name__}.", "backend_unreachable")
                _attempt_failed(served, ex, "connect", f"cannot connect to {dep.d.api_base}: {type(exc).__name__}")
    assert last is not None
    raise last


async def _failure_from_status(resp: UpstreamResponse, dep: DeploymentState, g: ModelGroup) -> ApiError:
    raw = b""
    try:
        async for piece in resp:
            raw += piece
            if len(raw) >= _ERROR_BODY_LIMIT:
                break
    except UpstreamError:
        pass
    finally:
        resp.release()
    message, _, _ = upstream_error_message(raw)
    if resp.status == 429:
        return ApiError(429, f"Every deployment of `{g.name}` is busy: {message}", "rate_limit_exceeded",
                        headers={"Retry-After": resp.headers.get("retry-after", "1")})
    return ApiError(502, f"Deployment `{dep.d.id}` of `{g.name}` failed with {resp.status}: {message}",
                    "backend_error")


def _passthrough_error(resp: UpstreamResponse, raw: bytes, ex: Exchange) -> web.Response:
    """A backend's own 4xx (bad parameters and the like), or the 5xx a request got twice: its body as it came
    when it is an OpenAI error, else reshaped into one with the backend's status."""
    ex.status, ex.error = resp.status, "backend_rejected" if resp.status < 500 else "backend_error"
    headers = {REQUEST_ID_HEADER: ex.request_id}
    if is_openai_error(raw):
        headers["Content-Type"] = "application/json"
        return web.Response(status=resp.status, body=raw, headers=headers)
    message, type_, param = upstream_error_message(raw)
    return error_response(resp.status, message, None, param, type_, headers=headers)


# ---------------------------------------------------------------- relaying the answer

async def _relay_unary(request: web.Request, served: ServedConfig, body_raw: bytes, group: ModelGroup,
                       ex: Exchange) -> web.Response:
    resp, raw = await _call_upstream(request, served, body_raw, group, ex)
    assert raw is not None and ex.deployment is not None
    ex.ttft_s = time.monotonic() - ex.started
    if resp.status != 200:
        return _passthrough_error(resp, raw, ex)
    content_type = resp.headers.get("content-type", "application/json")
    usage = None
    if content_type.startswith("application/json"):
        try:
            usage = orjson.loads(raw).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            _attempt_failed(served, ex, "invalid_response", f"{ex.deployment.d.api_base} answered 200 with broken JSON")
            raise ApiError(502, f"Deployment `{ex.deployment.d.id}` returned a body that is not a JSON object.",
                           "backend_invalid_response") from None
    # (a transcript asked for as text, srt or vtt comes as it is, and is estimated below)
    if ex.endpoint.counts_tokens and not (isinstance(usage, dict) and _take_usage(ex, usage)) and ex.endpoint.generates:
        ex.completion_tokens = estimate_prompt_tokens(len(raw))  # no usage said: the answer's bytes, as a prompt's
    ex.status = 200
    return web.Response(body=raw, headers={"Content-Type": content_type, REQUEST_ID_HEADER: ex.request_id})


async def _relay_stream(request: web.Request, served: ServedConfig, raw: bytes, body: dict, group: ModelGroup,
                        ex: Exchange) -> web.StreamResponse:
    options = body.get("stream_options")
    # vLLM 0.32 sends usage only when include_usage is true ("stream_options": {} asks for none). proxycore
    # asks for it on every stream, so that every stream's tokens are counted, and hides what it added.
    # (The Responses API always ends with its usage; an audio stream's usage is a form field, left as sent.)
    # A stream_options vLLM would refuse (not an object) is left for it to refuse.
    hide_usage = (ex.endpoint.stream_options and (options is None or isinstance(options, dict))
                  and lax_bool((options or {}).get("include_usage")) is not True)
    if hide_usage:
        # continuous_usage_stats without include_usage gives the client no usage: asked for, it would put
        # usage on every chunk, which the client must not see either
        asked = {k: v for k, v in (options or {}).items() if k not in ("continuous_usage_stats", "include_usage")}
        value = orjson.dumps({**asked, "include_usage": True})
        present = "stream_options" in body  # `"stream_options": null` too: replaced, never doubled
        raw = rewrite(raw, {"stream_options": value}) if present else rewrite(raw, {}, {"stream_options": value})
    resp, _ = await _call_upstream(request, served, raw, group, ex)
    assert ex.deployment is not None
    dep_id = ex.deployment.d.id
    try:
        if resp.status != 200 or not resp.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                raw = await resp.read()
            except UpstreamError as exc:
                _attempt_failed(served, ex, "broken_response", f"{ex.deployment.d.api_base} broke off its answer")
                raise ApiError(502, f"Deployment `{dep_id}` broke off its answer: {type(exc).__name__}.",
                               "backend_invalid_response") from None
            if resp.status == 200:
                _attempt_failed(served, ex, "invalid_response", f"{ex.deployment.d.api_base} answered a stream without SSE")
                raise ApiError(502, f"Deployment `{dep_id}` answered a stream request without an event stream.",
                               "backend_invalid_response")
            return _passthrough_error(resp, raw, ex)
        out = web.StreamResponse(headers={**_SSE_HEADERS, REQUEST_ID_HEADER: ex.request_id})
        await out.prepare(request)
        request.writer.send_headers()  # the events below go straight to the transport
        ex.status = 200
        relay = ex.relay = _SseRelay(request.transport, ex, hide_usage)
        try:
            await resp.pipe(relay.feed, request.writer.drain)
            relay.finish()
            if not relay.saw_done:
                raise UpstreamProtocolError("the stream ended without its final event")
        except UpstreamError as exc:
            # Bytes already reached the client: no retry, and never a fake [DONE].
            relay.finish()
            ex.status, ex.error = 502, "backend_stream_broken"
            metrics.BACKEND_ERRORS.labels(dep_id, "stream_broken").inc()
            message = f"The backend stream from deployment `{dep_id}` broke off: {type(exc).__name__}."
            await out.write(b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error",
                                                                 "param": None, "code": 502}}) + b"\n\n")
        await out.write_eof()
        return out
    finally:
        resp.close()  # on a client disconnect this drops the upstream connection, so vLLM aborts the request


# the Responses API streams its text as "delta":"..." (chat's delta is an object)
_CONTENT_KEYS = (b'"content":"', b'"text":"', b'"arguments":"', b'"reasoning_content":"', b'"reasoning":"', b'"delta":"')
_EMPTY_CONTENT = (b'"content":""', b'"text":""', b'"arguments":""', b'"reasoning_content":""', b'"reasoning":""',
                  b'"delta":""')


class _SseRelay:
    """Server-sent events from the backend to the client, event by event, as the backend's bytes arrive.

    Runs inside the upstream connection's protocol (no task switch per chunk) and writes HTTP/1.1 chunks
    straight to the client's transport (HTTP/1.0 clients of streams were refused with 505). Holds an
    incomplete event back so that a usage chunk can be read whole; everything else passes byte for byte.

    When proxycore asked for usage the client did not (`hide_usage`), the usage-only chunk is dropped, and
    the terminal chunk (a finish_reason set) waits for it: vLLM then puts `system_fingerprint` on the usage
    chunk instead of the terminal one, and the client gets it where it would have been. Events that carry
    generated text are counted, for a backend that sends no usage and for a stream cut short.
    """

    __slots__ = ("transport", "ex", "hide_usage", "done_markers", "pending", "held", "saw_done", "counted")

    def __init__(self, transport, ex: Exchange, hide_usage: bool):
        self.transport, self.ex, self.hide_usage = transport, ex, hide_usage
        self.done_markers = ex.endpoint.done_markers
        self.pending = b""
        self.held = b""  # the terminal chunk, until the next event shows whether a usage chunk follows
        self.saw_done = False
        self.counted = 0  # events with generated text (about one token each from vLLM and llama.cpp)

    def feed(self, chunk: bytes) -> bool:
        """One piece from the backend; True when the client's side is full (the backend waits then)."""
        ex = self.ex
        if ex.ttft_s is None:
            ex.ttft_s = time.monotonic() - ex.started
        data = self.pending + chunk if self.pending else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self.pending = data
            return False
        end += 2
        if end == len(data):  # the usual case: whole events only, nothing to copy
            events, self.pending = data, b""
        else:
            events, self.pending = data[:end], data[end:]
        self.counted += _text_events(events)
        if (b'"usage":{' in events or self.held
                or (self.hide_usage and b'"finish_reason":"' in events)):
            events = self._events(events)
        if not self.saw_done:
            self.saw_done = any(m in events for m in self.done_markers)
        return self._send(events)

    def _events(self, events: bytes) -> bytes:
        """The slow path, event by event: usage taken, hidden usage dropped, the terminal chunk held."""
        out = []
        for event in events.split(b"\n\n")[:-1]:
            event += b"\n\n"
            if b'"usage":{' in event:
                payload = _json_event(event)
                usage = payload.get("usage") if payload is not None else None
                if usage is None and payload is not None and isinstance(payload.get("response"), dict):
                    usage = payload["response"].get("usage")  # the Responses API's final event
                if isinstance(usage, dict):
                    _take_usage(self.ex, usage)
                if self.hide_usage and payload is not None and payload.get("choices") == []:
                    fingerprint = payload.get("system_fingerprint")
                    if self.held and isinstance(fingerprint, str) and b'"system_fingerprint"' not in self.held:
                        self.held = _with_fingerprint(self.held, fingerprint)
                    continue  # the usage chunk the client did not ask for
            if self.held:
                out.append(self.held)
                self.held = b""
            if self.hide_usage and b'"finish_reason":"' in event and event.startswith(b"data: {"):
                self.held = event
                continue
            out.append(event)
        return b"".join(out)

    def finish(self) -> None:
        tail = self.held + self.pending
        self.held = self.pending = b""
        if tail:
            self.saw_done = self.saw_done or any(m in tail for m in self.done_markers)
            self._send(tail)

    def _send(self, events: bytes) -> bool:
        transport = self.transport
        if not events or transport is None or transport.is_closing():
            return False  # a client that left: the handler is being cancelled, which closes the upstream
        transport.write(b"%x\r\n%b\r\n" % (len(events), events))
        return transport.get_write_buffer_size() > _CLIENT_HIGH_WATER


def _text_events(events: bytes) -> int:
    """Events that carry generated text: a content, text, tool-argument or reasoning delta that is not empty."""
    return sum(events.count(k) for k in _CONTENT_KEYS) - sum(events.count(k) for k in _EMPTY_CONTENT)


def _json_event(event: bytes) -> dict | None:
    """The JSON object of an event's `data:` line (which may follow an `event:` line)."""
    if event.startswith(b"data: "):
        start = 6
    else:
        start = event.find(b"\ndata: ") + 7
        if start < 7:
            return None
    try:
        payload = orjson.loads(event[start:])
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _with_fingerprint(event: bytes, fingerprint: str) -> bytes:
    """`data: {...}` with `"system_fingerprint"` added as its last key."""
    close = event.rstrip().rfind(b"}")
    return event[:close] + b',"system_fingerprint":' + orjson.dumps(fingerprint) + event[close:]


def _take_usage(ex: Exchange, usage: dict) -> bool:
    """A backend's usage object into the exchange; False when it holds no token counts (an audio duration).

    Chat, completions and pooling say prompt_tokens and completion_tokens; the Responses API input_tokens and
    output_tokens; rerank only total_tokens, which are all the prompt's."""
    p = usage.get("prompt_tokens", usage.get("input_tokens"))
    c = usage.get("completion_tokens", usage.get("output_tokens"))
    if type(p) is not int and type(c) is not int:
        p = usage.get("total_tokens")
        if type(p) is not int:
            return False
    p = p if type(p) is int else 0
    c = c if type(c) is int else 0
    if not (0 <= p <= MAX_USAGE_TOKENS and 0 <= c <= MAX_USAGE_TOKENS):
        _impossible_usage(ex, p, c)
        return False
    ex.prompt_tokens, ex.completion_tokens, ex.usage_source = p, c, "backend"
    return True


MAX_USAGE_TOKENS = 1 << 31  # more than any context: a figure beyond it (or below 0) is the backend's error


def _impossible_usage(ex: Exchange, prompt: int, completion: int) -> None:
    """A backend that reports negative or absurd usage: counted as its error; the request's tokens are then
    estimated as for a backend that says nothing."""
    dep = ex.deployment.d.id if ex.deployment is not None else "?"
    metrics.BACKEND_ERRORS.labels(dep, "bad_usage").inc()
    print(f"llmgate: deployment {dep} reported impossible usage (prompt {prompt}, completion {completion}) for "
          f"request {ex.request_id}; its tokens are estimated instead", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- accounting

def _settle_usage(ex: Exchange) -> None:
    """The tokens of a request that reached a backend but got no usage from it: a stream's counted events
    ("counted"), or estimates from the body's and the answer's bytes ("estimated")."""
    if ex.usage_source is not None or ex.deployment is None or (400 <= ex.status < 499) or not ex.endpoint.counts_tokens:
        return
    if ex.relay is not None or (ex.stream and ex.status == 499):
        ex.prompt_tokens = ex.prompt_estimate
        ex.completion_tokens = ex.relay.counted if ex.relay is not None else 0
        ex.usage_source = "counted"
    elif ex.status in (200, 499):
        ex.prompt_tokens = ex.prompt_estimate
        ex.usage_source = "estimated"


def _record(app: web.Application, ex: Exchange) -> None:
    """The request's metrics, the settlement of its charges, and its usage line (the answer is built by now)."""
    latency = time.monotonic() - ex.started
    model = ex.model or ""
    dep = ex.deployment.d if ex.deployment is not None else None
    _settle_usage(ex)
    prompt, completion = ex.prompt_tokens, ex.completion_tokens
    cost = prompt * dep.input_cost_per_token + completion * dep.output_cost_per_token if dep is not None else 0.0
    # Label only configured models: a client must not be able to mint new series.
    m = metrics.series(ex.team or "", model if ex.routed else "")
    m.requests(ex.status).inc()
    m.duration.observe(latency)
    if ex.ttft_s is not None and ex.stream:
        m.ttft.observe(ex.ttft_s)
    if prompt or completion:
        m.input_tokens.inc(prompt)
        m.output_tokens.inc(completion)
        if cost:
            m.cost.inc(cost)
    now = app[CLOCK].now()
    for charge in ex.charges:
        charge.settle(prompt + completion, cost, now)
    usage = app.get(USAGE)
    if usage is None:
        return
    usage.write(UsageRecord(
        ts=usage_timestamp(now),
        request_id=ex.request_id,
        team=ex.team,
        key_id=ex.key_id,
        key_hash=ex.key_policy.key_hash if ex.key_policy else None,
        model=ex.model,
        endpoint=ex.kind,
        deployment=dep.id if dep else None,
        status=ex.status,
        stream=ex.stream,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost=round(cost, 10),
        latency_ms=round(latency * 1000, 3),
        ttft_ms=round(ex.ttft_s * 1000, 3) if ex.ttft_s is not None else None,
        retries=ex.retries,
        fallback=ex.fallback,
        error=ex.error,
        usage_source=ex.usage_source,
    ))
