"""proxycore: the OpenAI-compatible API in front of vLLM deployments.

A chat completion reads top to bottom in `proxy_inference`: authenticate, read and check the
body, pick a deployment (retrying and falling back), relay the answer, then log and count it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import random
import re
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import orjson
from aiohttp import web

from controller.config import ConfigError, ProxyConfig, load_proxy_config
from controller.teams import Team, TeamsConfig, dedicated_internal_key, load_teams
from proxycore import metrics
from proxycore.errors import error_response, upstream_error_message
from proxycore.router import DeploymentState, ModelGroup, build_groups, pick_deployment
from proxycore.quota import (DEFAULT_COMPLETION_ESTIMATE, PROMPT_BYTES_PER_TOKEN, Clock, KeyPolicy, Quotas, TeamMeter,
                             month_id, next_month, parse_key_policy)
from proxycore.upstream import UpstreamClient, UpstreamError, UpstreamProtocolError, UpstreamResponse, UpstreamTimeout
from proxycore.usage_log import UsageLog

log = logging.getLogger("llmgate.proxy")
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0
_ERROR_BODY_LIMIT = 64 * 1024
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_CLIENT_HIGH_WATER = 256 * 1024  # bytes waiting for a slow client before the backend's stream is paused
_REQUIRED_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


@dataclass
class Gateway:
    """What the handlers read: the config, its routing groups, keys and team policy. Replaced whole on reload."""

    config: ProxyConfig
    groups: dict[str, ModelGroup]
    master_key: bytes | None
    internal_key: bytes | None
    team_models: dict[str, frozenset[str] | None] | None = None  # team -> allow-list (None: all); None: no teams file
    teams: dict[str, Team] = field(default_factory=dict)
    only_team: str | None = None  # a dedicated instance serves this team alone

    @classmethod
    def build(cls, config: ProxyConfig, internal_key: str | None = None, teams: TeamsConfig | None = None,
              previous: "Gateway | None" = None, only_team: str | None = None) -> "Gateway":
        if only_team and internal_key:
            internal_key = dedicated_internal_key(internal_key, only_team)
        return cls(
            config=config,
            groups=build_groups(config, previous.groups if previous else None),
            master_key=config.master_key.encode() if config.master_key else None,
            internal_key=internal_key.encode() if internal_key else None,
            only_team=only_team,
            team_models=None if teams is None else {
                t.name: frozenset(t.models) if t.models is not None else None for t in teams.teams},
            teams={t.name: t for t in teams.teams} if teams else {},
        )

    def allowed_models(self, team: str | None) -> frozenset[str] | None:
        """None: every model. A team that teams.yaml does not (yet) know gets nothing: fail closed."""
        if team is None or self.team_models is None:
            return None
        return self.team_models.get(team, frozenset())

    def models_for(self, team: str | None) -> list[str]:
        names = sorted(self.groups)
        allowed = self.allowed_models(team)
        return names if allowed is None else [n for n in names if n in allowed]


class LiveGateway:
    """The current Gateway; reloads swap `gw` in one assignment, requests in flight keep theirs."""

    __slots__ = ("gw", "config_path", "teams_path", "internal_key_env")

    def __init__(self, gw: Gateway, config_path: str | None = None, teams_path: str | None = None,
                 internal_key_env: str | None = None):
        self.gw, self.config_path, self.teams_path, self.internal_key_env = gw, config_path, teams_path, internal_key_env

    def reload(self) -> str | None:
        """Load both files again; on any problem keep the current Gateway and return the reason."""
        if self.config_path is None:
            return None
        try:
            config = load_proxy_config(self.config_path)
            teams = load_teams(self.teams_path) if self.teams_path else None
        except ConfigError as exc:
            return str(exc)
        internal = (teams.gateway.internal_key if teams else None) or self.internal_key_env
        self.gw = Gateway.build(config, internal, teams, previous=self.gw, only_team=self.gw.only_team)
        return None


LIVE = web.AppKey("live", LiveGateway)
HTTP = web.AppKey("http", UpstreamClient)
USAGE = web.AppKey("usage", UsageLog)
QUOTAS = web.AppKey("quotas", Quotas)
STORE = web.AppKey("store", object)  # authsvc.store.Store, in DB mode
SPEND = web.AppKey("spend", object)  # proxycore.admin.SpendWriter, in DB mode
CLOCK = web.AppKey("clock", Clock)


@dataclass(slots=True)
class Exchange:
    """One client request as it moves through proxycore; becomes the usage-log line."""

    request_id: str
    kind: str
    team: str | None
    key_id: str | None
    started: float
    model: str | None = None
    stream: bool = False
    deployment: DeploymentState | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    retries: int = 0
    fallback: str | None = None
    error: str | None = None
    holding: bool = False  # an attempt is counted in its deployment's in-flight
    routed: bool = False  # the model is a configured one
    meter: TeamMeter | None = None  # the team's shared counters, when teams.yaml is in use
    tpm_minute: int = 0
    tpm_charge: int = 0  # tokens charged up front to this minute
    key_policy: KeyPolicy | None = None  # a virtual key's limits (DB mode)
    key_meter: TeamMeter | None = None
    key_minute: int = 0
    key_tpm_charge: int = 0
    key_in_flight: bool = False


class UpstreamFailure(Exception):
    """Every deployment we could try failed; carries the answer for the client."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


# ---------------------------------------------------------------- auth

def authenticate(request: web.Request, gw: Gateway) -> tuple[bool, str | None, str | None]:
    """(ok, team, key_id). X-Team / X-Key-Id count only beside the internal key, i.e. from nginx."""
    header = request.headers.get("Authorization", "")
    if not header[:7].lower() == "bearer ":
        return (gw.master_key is None, None, None)
    token = header[7:].strip().encode("utf-8", "surrogateescape")
    if gw.internal_key is not None and hmac.compare_digest(token, gw.internal_key):
        h = request.headers
        return (True, h.get("X-Team") or None, h.get("X-Key-Id") or None)
    if gw.master_key is None or hmac.compare_digest(token, gw.master_key):
        return (True, None, None)
    return (False, None, None)


def key_policy(request: web.Request, team: str | None, key_id: str | None) -> KeyPolicy | None | bool:
    """A virtual key's policy from authsvc (via nginx); False when one was sent but cannot be read."""
    header = request.headers.get("X-Key-Policy")
    if not header or key_id is None:
        return None
    return parse_key_policy(header) or False


def _unauthorized() -> web.Response:
    return error_response(401, "Invalid or missing API key. Send `Authorization: Bearer <key>`.", "invalid_api_key")


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _request_id(request: web.Request) -> str:
    rid = request.headers.get("X-Request-ID")
    if rid and _REQUEST_ID_OK.fullmatch(rid):
        return rid
    return f"{_ID_PREFIX}{next(_id_counter):016x}"  # unique per process, 32 hex digits like a uuid


# ---------------------------------------------------------------- the inference path

async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy_inference(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await proxy_inference(request, "completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy_inference(request, "embeddings")


async def proxy_inference(request: web.Request, kind: str) -> web.StreamResponse:
    app = request.app
    gw = app[LIVE].gw
    ok, team, key_id = authenticate(request, gw)
    ex = Exchange(_request_id(request), kind, team, key_id, time.monotonic())
    rid_header = {"X-Request-ID": ex.request_id}
    try:
        if not ok:
            ex.status, ex.error = 401, "invalid_api_key"
            return _unauthorized()
        if gw.only_team is not None and team != gw.only_team:
            ex.status, ex.error = 403, "wrong_instance"
            return error_response(403, f"This proxycore serves team `{gw.only_team}` only.", "wrong_instance")
        body, problem = await _read_body(request, kind, gw)
        if problem is not None:
            ex.status, ex.error = problem.status, "invalid_request"
            problem.headers.update(rid_header)
            return problem
        ex.model = body["model"]
        ex.stream = body.get("stream") is True
        group = gw.groups.get(ex.model)
        if group is None:
            ex.status, ex.error = 404, "model_not_found"
            return error_response(404, f"The model `{ex.model}` does not exist. Available models: "
                                  f"{', '.join(gw.models_for(team)) or 'none'}.", "model_not_found", "model",
                                  headers=rid_header)
        ex.routed = True
        allowed = gw.allowed_models(team)
        if allowed is not None and ex.model not in allowed:
            ex.status, ex.error = 403, "model_not_allowed"
            return error_response(403, f"Team `{team}` may not use model `{ex.model}`. Allowed: "
                                  f"{', '.join(sorted(allowed)) or 'none'}.", "model_not_allowed", "model",
                                  headers=rid_header)
        quotas = app.get(QUOTAS)
        policy = gw.teams.get(team) if team else None
        if policy is not None and quotas is not None:
            refusal = _charge_quota(quotas, policy, body, request.content_length or 0, ex)
            if refusal is not None:
                refusal.headers.update(rid_header)
                return refusal
        if key_id is not None and "X-Key-Policy" in request.headers:
            refusal = _charge_key(request, quotas, body, ex)
            if refusal is not None:
                refusal.headers.update(rid_header)
                return refusal
        if ex.stream:
            return await _relay_stream(request, gw, body, group, ex)
        return await _relay_unary(request, gw, body, group, ex)
    except UpstreamFailure as failure:
        ex.status, ex.error = failure.status, failure.code
        headers = dict(rid_header)
        if failure.headers:
            headers.update(failure.headers)
        return error_response(failure.status, failure.message, failure.code, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        ex.status, ex.error = 499, "client_closed_request"  # nginx's name for it
        raise
    finally:
        _release(ex, answered=ex.status == 200)
        _record(app, gw, ex)


async def _read_body(request: web.Request, kind: str, gw: Gateway) -> tuple[dict, web.Response | None]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit_mb = gw.config.max_request_bytes / (1024 * 1024)
        return {}, error_response(413, f"Request body is larger than the limit of {limit_mb:g} MB "
                                  "(general_settings.max_request_size_mb).", "request_too_large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return {}, error_response(400, f"The body is not valid UTF-8 JSON: {exc}.", "invalid_json")
    if not isinstance(body, dict):
        return {}, error_response(400, "The body must be a JSON object.", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return {}, error_response(400, "`model` is required and must be a string.", "invalid_type", "model")
    required = _REQUIRED_FIELD[kind]
    value = body.get(required)
    if kind == "chat":
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            return {}, error_response(400, "`messages` must be a non-empty list of message objects.",
                                      "invalid_type", "messages")
    elif not isinstance(value, (str, list)) or isinstance(value, list) and not value:
        return {}, error_response(400, f"`{required}` is required and must be a string or a non-empty list.",
                                  "invalid_type", required)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return {}, error_response(400, "`stream` must be true or false.", "invalid_type", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return {}, error_response(400, "`stream_options` must be an object.", "invalid_type", "stream_options")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            return {}, error_response(400, f"`{name}` must be a non-negative integer.", "invalid_type", name)
    return body, None


def _tokens_up_front(body: dict, body_bytes: int, kind: str) -> int:
    """What a request is charged against a TPM limit before it runs: its prompt estimate and its max_tokens."""
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    completion = 0 if kind == "embeddings" else (limit if isinstance(limit, int) else DEFAULT_COMPLETION_ESTIMATE)
    return body_bytes // PROMPT_BYTES_PER_TOKEN + completion


def _charge_quota(quotas: Quotas, team: Team, body: dict, body_bytes: int, ex: Exchange) -> web.Response | None:
    """Refuse a team over its monthly budget or its tokens per minute; else charge the minute up front."""
    meter = ex.meter = quotas.meter(team.name)
    now = quotas.clock.now()
    budget = team.budget
    if budget is not None:
        tokens, usd = meter.month_used(month_id(now))
        over = (budget.tokens_per_month is not None and tokens >= budget.tokens_per_month,
                budget.usd_per_month is not None and usd >= budget.usd_per_month)
        if any(over):
            ex.status, ex.error = 429, "insufficient_quota"
            metrics.rate_limit_hit(team.name, "budget")
            used = (f"{tokens:,} of its {budget.tokens_per_month:,} tokens" if over[0]
                    else f"${usd:,.2f} of its ${budget.usd_per_month:,.2f}")
            return error_response(429, f"Team `{team.name}` has used {used} for {now:%B %Y}; the budget resets on "
                                  f"{next_month(now):%Y-%m-%d} 00:00 UTC.", "insufficient_quota",
                                  type_="insufficient_quota", headers={"x-should-retry": "false"})
    if team.tpm is not None:
        charge = _tokens_up_front(body, body_bytes, ex.kind)
        minute = quotas.minute()
        if not meter.reserve(minute, charge, team.tpm):
            ex.status, ex.error = 429, "rate_limit_exceeded"
            metrics.rate_limit_hit(team.name, "tpm")
            wait = quotas.seconds_to_next_minute()
            return error_response(429, f"Team `{team.name}` reached its limit of {team.tpm:,} tokens per minute; "
                                  f"retry in {wait} s.", "rate_limit_exceeded", type_="tokens",
                                  headers={"Retry-After": str(wait)})
        ex.tpm_minute, ex.tpm_charge = minute, charge
    return None


def _charge_key(request: web.Request, quotas: Quotas | None, body: dict, ex: Exchange) -> web.Response | None:
    """A virtual key's own limits (DB mode): models, budget, requests per minute, parallel requests, TPM."""
    policy = key_policy(request, ex.team, ex.key_id)
    if policy is False or quotas is None:
        ex.status, ex.error = 401, "invalid_api_key"
        return error_response(401, "The key's policy could not be read; try again.", "invalid_api_key")
    assert isinstance(policy, KeyPolicy)
    ex.key_policy = policy
    if policy.models is not None and ex.model not in policy.models:
        ex.status, ex.error = 403, "model_not_allowed"
        return error_response(403, f"This key may not use model `{ex.model}`. Allowed: "
                              f"{', '.join(sorted(policy.models)) or 'none'}.", "model_not_allowed", "model")
    if policy.max_budget is not None and policy.spend >= policy.max_budget:
        ex.status, ex.error = 429, "insufficient_quota"
        metrics.rate_limit_hit(ex.team or "", "key_budget")
        return error_response(429, f"This key has spent ${policy.spend:,.4f} of its ${policy.max_budget:,.2f} budget.",
                              "insufficient_quota", type_="insufficient_quota", headers={"x-should-retry": "false"})
    meter = ex.key_meter = quotas.meter(policy.meter_name)
    minute = quotas.minute()
    if policy.rpm is not None and not meter.count_request(minute, policy.rpm):
        ex.status, ex.error = 429, "rate_limit_exceeded"
        metrics.rate_limit_hit(ex.team or "", "key_rpm")
        wait = quotas.seconds_to_next_minute()
        return error_response(429, f"This key reached its limit of {policy.rpm} requests per minute; retry in {wait} s.",
                              "rate_limit_exceeded", type_="requests", headers={"Retry-After": str(wait)})
    if policy.tpm is not None:
        charge = _tokens_up_front(body, request.content_length or 0, ex.kind)
        if not meter.reserve(minute, charge, policy.tpm):
            ex.status, ex.error = 429, "rate_limit_exceeded"
            metrics.rate_limit_hit(ex.team or "", "key_tpm")
            wait = quotas.seconds_to_next_minute()
            return error_response(429, f"This key reached its limit of {policy.tpm:,} tokens per minute; retry in {wait} s.",
                                  "rate_limit_exceeded", type_="tokens", headers={"Retry-After": str(wait)})
        ex.key_minute, ex.key_tpm_charge = minute, charge
    if policy.parallel is not None:
        if not meter.enter(policy.parallel):
            ex.status, ex.error = 429, "rate_limit_exceeded"
            metrics.rate_limit_hit(ex.team or "", "key_parallel")
            return error_response(429, f"This key already has {policy.parallel} requests in flight; retry when one "
                                  "ends.", "rate_limit_exceeded", type_="requests", headers={"Retry-After": "1"})
        ex.key_in_flight = True
    return None


def _settle_key(ex: Exchange) -> None:
    meter = ex.key_meter
    assert meter is not None
    if ex.key_tpm_charge:
        meter.reconcile(ex.key_minute, ex.prompt_tokens + ex.completion_tokens - ex.key_tpm_charge)
    if ex.key_in_flight:
        meter.leave()


def _settle_quota(app: web.Application, gw: Gateway, ex: Exchange, cost: float) -> None:
    """Count the real use: month-to-date for budgets, and the minute's up-front charge corrected."""
    meter = ex.meter
    assert meter is not None
    tokens = ex.prompt_tokens + ex.completion_tokens
    if ex.tpm_charge:
        meter.reconcile(ex.tpm_minute, tokens - ex.tpm_charge)
    if tokens or cost:
        quotas = app[QUOTAS]
        used_tokens, used_usd = meter.add(month_id(quotas.clock.now()), tokens, cost)
        team = gw.teams.get(ex.team or "")
        if team is not None and team.budget is not None:
            b = team.budget
            ratios = [used_tokens / b.tokens_per_month if b.tokens_per_month else 0.0,
                      used_usd / b.usd_per_month if b.usd_per_month else 0.0]
            metrics.budget_used(team.name, max(ratios))


def _attempt_plan(gw: Gateway, group: ModelGroup) -> list[ModelGroup]:
    """The model group, then its fallbacks in order."""
    plan = [group]
    for name in gw.config.router.fallbacks.get(group.name, ()):
        fb = gw.groups.get(name)
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


def _attempt_failed(gw: Gateway, ex: Exchange, kind: str) -> None:
    _release(ex, answered=False)
    dep = ex.deployment
    assert dep is not None
    metrics.BACKEND_ERRORS.labels(dep.d.id, kind).inc()
    r = gw.config.router
    if dep.failed(time.monotonic(), r.allowed_fails, r.cooldown_time):
        metrics.DEPLOYMENT_UP.labels(dep.d.id).set(0)


async def _call_upstream(request: web.Request, gw: Gateway, body: dict, group: ModelGroup,
                         ex: Exchange) -> tuple[UpstreamResponse, bytes | None]:
    """POST to deployments until one answers with a status we pass on (not 5xx, not 429).

    Non-streaming bodies are read here too, so a response that breaks off is retried as well:
    nothing has reached the client yet. Streams return with the body unread.
    """
    session = request.app[HTTP]
    router = gw.config.router
    strategy = router.routing_strategy
    last: UpstreamFailure | None = None
    for plan_index, g in enumerate(_attempt_plan(gw, group)):
        tried: set[DeploymentState] = set()
        allowed: int | None = None
        for attempt in itertools.count():
            now = time.monotonic()
            dep = pick_deployment(g, strategy, tried, now) or pick_deployment(g, strategy, frozenset(), now)
            if dep is None:
                last = last or UpstreamFailure(
                    503, f"No deployment of `{g.name}` is available (all cooling down after failures); retry shortly.",
                    "no_deployment_available", {"Retry-After": str(max(1, round(router.cooldown_time)))})
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
            body["model"] = dep.d.upstream_model
            headers = dict(dep.headers)
            headers["X-Request-ID"] = ex.request_id
            _hold(ex, dep, now)
            try:
                wait = dep.stream_idle_timeout if ex.stream else dep.unary_timeout
                resp = await session.request("POST", dep.urls[ex.kind], headers=headers, body=orjson.dumps(body),
                                             connect_timeout=dep.connect_timeout, first_byte_timeout=wait,
                                             read_timeout=wait)
                if resp.status >= 500 or resp.status == 429:
                    last = await _failure_from_status(resp, dep, g)
                    _attempt_failed(gw, ex, "status_429" if resp.status == 429 else "status_5xx")
                    continue
                if ex.stream:
                    return resp, None
                return resp, await resp.read()
            except UpstreamTimeout:
                last = UpstreamFailure(504, f"Deployment `{dep.d.id}` of `{g.name}` timed out before answering.",
                                       "backend_timeout")
                _attempt_failed(gw, ex, "timeout")
            except UpstreamError as exc:
                last = UpstreamFailure(503, f"Could not reach deployment `{dep.d.id}` of `{g.name}`: "
                                       f"{type(exc).__name__}.", "backend_unreachable")
                _attempt_failed(gw, ex, "connect")
    assert last is not None
    raise last


async def _failure_from_status(resp: UpstreamResponse, dep: DeploymentState, g: ModelGroup) -> UpstreamFailure:
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
        return UpstreamFailure(429, f"Every deployment of `{g.name}` is busy: {message}", "rate_limit_exceeded",
                               {"Retry-After": resp.headers.get("retry-after", "1")})
    return UpstreamFailure(502, f"Deployment `{dep.d.id}` of `{g.name}` failed with {resp.status}: {message}",
                           "backend_error")


def _passthrough_error(resp_status: int, raw: bytes, ex: Exchange) -> web.Response:
    """A backend's own 4xx (bad parameters and the like), reshaped as an OpenAI error."""
    message, type_, param = upstream_error_message(raw)
    ex.status, ex.error = resp_status, "backend_rejected"
    return error_response(resp_status, message, None, param, type_, headers={"X-Request-ID": ex.request_id})


async def _relay_unary(request: web.Request, gw: Gateway, body: dict, group: ModelGroup, ex: Exchange) -> web.Response:
    resp, raw = await _call_upstream(request, gw, body, group, ex)
    assert raw is not None
    ex.ttft_s = time.monotonic() - ex.started
    if resp.status != 200:
        return _passthrough_error(resp.status, raw, ex)
    try:
        usage = orjson.loads(raw).get("usage") or {}
    except (orjson.JSONDecodeError, AttributeError):
        _attempt_failed(gw, ex, "invalid_response")
        raise UpstreamFailure(502, f"Deployment `{ex.deployment.d.id}` returned a body that is not a JSON object.",
                              "backend_invalid_response") from None
    _take_usage(ex, usage)
    ex.status = 200
    return web.Response(body=raw, headers={"Content-Type": resp.headers.get("content-type", "application/json"),
                                           "X-Request-ID": ex.request_id})


async def _relay_stream(request: web.Request, gw: Gateway, body: dict, group: ModelGroup,
                        ex: Exchange) -> web.StreamResponse:
    options = body.get("stream_options")
    # vLLM's include_usage defaults to true once stream_options is present at all.
    strip_usage = options is None or options.get("include_usage", True) is not True
    if strip_usage:
        options = options or {}
        # Ask for usage so that we can log it; the client never sees the extra chunk.
        body["stream_options"] = {**options, "include_usage": True}
    resp, _ = await _call_upstream(request, gw, body, group, ex)
    try:
        if resp.status != 200 or not resp.headers.get("content-type", "").startswith("text/event-stream"):
            raw = await resp.read()
            if resp.status == 200:
                _attempt_failed(gw, ex, "invalid_response")
                raise UpstreamFailure(502, f"Deployment `{ex.deployment.d.id}` answered a stream request "
                                      "without an event stream.", "backend_invalid_response")
            return _passthrough_error(resp.status, raw, ex)
        out = web.StreamResponse(headers={**_SSE_HEADERS, "X-Request-ID": ex.request_id})
        await out.prepare(request)
        request.writer.send_headers()  # the events below go straight to the transport
        ex.status = 200
        relay = _SseRelay(request.transport, ex, strip_usage)
        try:
            await resp.pipe(relay.feed, request.writer.drain)
            relay.finish()
            if not relay.saw_done:
                raise UpstreamProtocolError("the stream ended without data: [DONE]")
        except UpstreamError as exc:
            # Bytes already reached the client: no retry, and never a fake [DONE].
            ex.status, ex.error = 502, "backend_stream_broken"
            metrics.BACKEND_ERRORS.labels(ex.deployment.d.id, "stream_broken").inc()
            message = f"The backend stream from deployment `{ex.deployment.d.id}` broke off: {type(exc).__name__}."
            await out.write(b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error",
                                                                 "param": None, "code": 502}}) + b"\n\n")
        await out.write_eof()
        return out
    finally:
        resp.close()  # on a client disconnect this drops the upstream connection, so vLLM aborts the request


class _SseRelay:
    """Server-sent events from the backend to the client, event by event, as the backend's bytes arrive.

    Runs inside the upstream connection's protocol (no task switch per chunk) and writes HTTP/1.1 chunks
    straight to the client's transport. Holds an incomplete event back so that the usage-only chunk can be
    recognised whole; everything else passes byte for byte.
    """

    __slots__ = ("transport", "ex", "strip_usage", "pending", "saw_done")

    def __init__(self, transport, ex: Exchange, strip_usage: bool):
        self.transport, self.ex, self.strip_usage = transport, ex, strip_usage
        self.pending = b""
        self.saw_done = False

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
        if b'"usage":{' in events:
            events = _take_stream_usage(events, ex, self.strip_usage)
        if b"data: [DONE]" in events:
            self.saw_done = True
        return self._send(events)

    def finish(self) -> None:
        if self.pending:
            self.saw_done = self.saw_done or b"data: [DONE]" in self.pending
            self._send(self.pending)
            self.pending = b""

    def _send(self, events: bytes) -> bool:
        transport = self.transport
        if not events or transport is None or transport.is_closing():
            return False  # a client that left: the handler is being cancelled, which closes the upstream
        transport.write(b"%x\r\n%b\r\n" % (len(events), events))
        return transport.get_write_buffer_size() > _CLIENT_HIGH_WATER


def _take_stream_usage(events: bytes, ex: Exchange, strip_usage: bool) -> bytes:
    """Capture usage from the usage-only chunk (`"choices":[]`); drop that chunk if we added it."""
    kept = []
    for event in events.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage":{' in event:
            try:
                payload = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                kept.append(event)
                continue
            usage = payload.get("usage") if isinstance(payload, dict) else None
            if isinstance(usage, dict):
                _take_usage(ex, usage)
            if strip_usage and payload.get("choices") == []:
                continue
        kept.append(event)
    return b"\n\n".join(kept)


def _take_usage(ex: Exchange, usage: dict) -> None:
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    ex.prompt_tokens = p if isinstance(p, int) else 0
    ex.completion_tokens = c if isinstance(c, int) else 0


def _record(app: web.Application, gw: Gateway, ex: Exchange) -> None:
    """One usage-log line and the request metrics; off the client's path (after the answer is built)."""
    now = time.monotonic()
    latency = now - ex.started
    team = ex.team or ""
    model = ex.model or ""
    dep = ex.deployment.d if ex.deployment is not None else None
    cost = 0.0
    if dep is not None:
        cost = ex.prompt_tokens * dep.input_cost_per_token + ex.completion_tokens * dep.output_cost_per_token
    # Label only configured models: a client must not be able to mint new series.
    m = metrics.series(team, model if ex.routed else "")
    m.requests(ex.status).inc()
    m.duration.observe(latency)
    if ex.ttft_s is not None and ex.stream:
        m.ttft.observe(ex.ttft_s)
    if ex.prompt_tokens or ex.completion_tokens:
        m.input_tokens.inc(ex.prompt_tokens)
        m.output_tokens.inc(ex.completion_tokens)
        if cost:
            m.cost.inc(cost)
    if ex.meter is not None:
        _settle_quota(app, gw, ex, cost)
    if ex.key_meter is not None:
        _settle_key(ex)
    ts = app[CLOCK].now().isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if ex.key_policy is not None:
        writer = app.get(SPEND)
        if writer is not None:
            writer.add({"request_id": ex.request_id, "key_hash": ex.key_policy.key_hash, "team_id": ex.team,
                        "model": model, "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
                        "total_tokens": ex.prompt_tokens + ex.completion_tokens, "spend": cost,
                        "status": ex.status, "start_time": ts})
    usage = app.get(USAGE)
    if usage is None:
        return
    usage.write({
        "ts": ts,
        "request_id": ex.request_id,
        "team": ex.team,
        "key_id": ex.key_id,
        "key_hash": ex.key_policy.key_hash if ex.key_policy else None,  # a virtual key's, to replay spend into the DB
        "model": ex.model,
        "endpoint": ex.kind,
        "deployment": dep.id if dep else None,
        "status": ex.status,
        "stream": ex.stream,
        "prompt_tokens": ex.prompt_tokens,
        "completion_tokens": ex.completion_tokens,
        "total_tokens": ex.prompt_tokens + ex.completion_tokens,
        "cost": round(cost, 10),
        "latency_ms": round(latency * 1000, 3),
        "ttft_ms": round(ex.ttft_s * 1000, 3) if ex.ttft_s is not None else None,
        "retries": ex.retries,
        "fallback": ex.fallback,
        "error": ex.error,
    })


# ---------------------------------------------------------------- models, health, metrics

def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llmgate"}


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[LIVE].gw
    ok, team, key_id = authenticate(request, gw)
    if not ok:
        return _unauthorized()
    created = int(request.app[STARTED])
    names = gw.models_for(team)
    policy = key_policy(request, team, key_id)
    if isinstance(policy, KeyPolicy) and policy.models is not None:
        names = [n for n in names if n in policy.models]
    data = [_model_card(n, created) for n in names]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    gw = request.app[LIVE].gw
    ok, team, _ = authenticate(request, gw)
    if not ok:
        return _unauthorized()
    name = request.match_info["model"]
    if name not in gw.models_for(team):
        return error_response(404, f"The model `{name}` does not exist.", "model_not_found", "model")
    return web.Response(body=orjson.dumps(_model_card(name, int(request.app[STARTED]))),
                        content_type="application/json")


async def liveliness(request: web.Request) -> web.Response:
    return web.json_response("I'm alive!")  # LiteLLM's exact answer, which probes may match on


async def readiness(request: web.Request) -> web.Response:
    gw = request.app[LIVE].gw
    up = sum(1 for g in gw.groups.values() for s in g.members if s.up)
    status = 200 if up else 503
    return web.json_response({"status": "healthy" if up else "unhealthy", "deployments_up": up}, status=status)


async def health(request: web.Request) -> web.Response:
    gw = request.app[LIVE].gw
    ok, _, _ = authenticate(request, gw)
    if not ok:
        return _unauthorized()
    healthy, unhealthy = [], []
    now = time.monotonic()
    for g in gw.groups.values():
        for s in g.members:
            entry = {"model": g.name, "deployment": s.d.id, "api_base": s.d.api_base,
                     "upstream_model": s.d.upstream_model, "in_flight": s.in_flight,
                     "latency_ms": round(s.latency_s * 1000, 3) if s.latency_s is not None else None,
                     "recent_failures": len(s.fail_times)}
            if s.up:
                healthy.append(entry)
            else:
                entry["retry_in_s"] = round(max(0.0, s.down_until - now), 3)
                unhealthy.append(entry)
    return web.json_response({"healthy_endpoints": healthy, "unhealthy_endpoints": unhealthy,
                              "healthy_count": len(healthy), "unhealthy_count": len(unhealthy)})


async def not_found(request: web.Request) -> web.Response:
    return error_response(404, f"No route for {request.method} {request.path}. The API is under /v1 "
                          "(chat/completions, completions, embeddings, models).", "not_found")


@web.middleware
async def json_errors(request: web.Request, handler):
    """Last line of defence: a bug answers a JSON 500, never a traceback or an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason, None)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "Internal error in llmgate; the details are in its log.", "internal_error")


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = metrics.render_metrics()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _health_checks(app: web.Application) -> None:
    """Probe deployments out of rotation once their cooldown is over; bring back those that answer."""
    session = app[HTTP]
    last_full = time.monotonic()
    while True:
        await asyncio.sleep(0.5)
        gw = app[LIVE].gw
        now = time.monotonic()
        full = now - last_full >= gw.config.health_check_interval
        if full:
            last_full = now
        for g in gw.groups.values():
            for s in g.members:
                if (not s.up and now >= s.down_until) or full:
                    asyncio.ensure_future(_probe(app, session, s))


async def _probe(app: web.Application, session: UpstreamClient, s: DeploymentState) -> None:
    try:
        r = await session.request("GET", s.urls["models"], headers=s.headers, connect_timeout=5,
                                  first_byte_timeout=5, read_timeout=5)
        await r.read()
        healthy = r.status == 200
    except UpstreamError:
        healthy = False
    r = app[LIVE].gw.config.router
    if healthy:
        if not s.up:
            s.recovered()
    elif s.up:
        s.failed(time.monotonic(), r.allowed_fails, r.cooldown_time)
    else:
        s.down_until = time.monotonic() + r.cooldown_time
    metrics.DEPLOYMENT_UP.labels(s.d.id).set(1 if s.up else 0)


# ---------------------------------------------------------------- the app

STARTED = web.AppKey("started", float)


async def _client_session(app: web.Application):
    ssl_verify = app[LIVE].gw.config.ssl_verify
    tls: bool | ssl.SSLContext = ssl_verify if isinstance(ssl_verify, bool) else ssl.create_default_context(cafile=ssl_verify)
    app[HTTP] = UpstreamClient(ssl=tls)
    for g in app[LIVE].gw.groups.values():
        for s in g.members:
            metrics.DEPLOYMENT_UP.labels(s.d.id).set(1)
    checker = asyncio.ensure_future(_health_checks(app))
    yield
    checker.cancel()
    await app[HTTP].close()


async def _watch_config_files(app: web.Application):
    """Reload config.yaml and teams.yaml in-process when they change (editors replace files by rename)."""
    live = app[LIVE]
    paths = {os.path.abspath(p) for p in (live.config_path, live.teams_path) if p}
    if not paths:
        yield
        return
    from watchfiles import awatch

    def reload(reason: str) -> None:
        ssl_verify = live.gw.config.ssl_verify
        problem = live.reload()
        if not problem and live.gw.config.ssl_verify != ssl_verify:
            print("llmgate: proxycore: litellm_settings.ssl_verify changed; it applies after proxycore restarts",
                  file=sys.stderr, flush=True)
        if problem:
            print(f"llmgate: proxycore kept the previous config: {problem}", file=sys.stderr, flush=True)
        else:
            log.info("proxycore reloaded its config (%s)", reason)

    async def watch() -> None:
        dirs = {os.path.dirname(p) for p in paths}
        async for _ in awatch(*dirs, watch_filter=lambda _c, path: os.path.abspath(path) in paths,
                              debounce=200, step=50, recursive=False):
            reload("file changed")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload, "SIGHUP")
    task = asyncio.ensure_future(watch())
    yield
    task.cancel()
    loop.remove_signal_handler(signal.SIGHUP)


def make_app(live: LiveGateway, *, usage_log: UsageLog | None = None, quotas: Quotas | None = None) -> web.Application:
    app = web.Application(client_max_size=live.gw.config.max_request_bytes, middlewares=[json_errors])
    app[LIVE] = live
    app[CLOCK] = quotas.clock if quotas else Clock()
    if quotas is not None:
        app[QUOTAS] = quotas
    app[STARTED] = time.time()
    if usage_log is not None:
        app[USAGE] = usage_log
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_watch_config_files)
    r = app.router
    for prefix in ("/v1", ""):
        r.add_post(prefix + "/chat/completions", chat_completions)
        r.add_post(prefix + "/completions", completions)
        r.add_post(prefix + "/embeddings", embeddings)
        r.add_get(prefix + "/models", list_models)
        r.add_get(prefix + "/models/{model:.+}", get_model)
    r.add_get("/health/liveliness", liveliness)
    r.add_get("/health/liveness", liveliness)
    r.add_get("/health/readiness", readiness)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics_endpoint)
    if live.gw.config.database_url:
        from proxycore.admin import register_admin_routes

        app.cleanup_ctx.append(_key_database)
        register_admin_routes(app, STORE, lambda: app[LIVE].gw.config.master_key)
    r.add_route("*", "/{tail:.*}", not_found)
    return app


async def _key_database(app: web.Application):
    """DB mode: the key store, the spend writer, and the usage log replayed so a crash loses no spend."""
    from authsvc.store import Store, StoreUnavailable
    from proxycore.admin import SpendWriter, replay_usage_log, spend_writer_ctx

    url = app[LIVE].gw.config.database_url
    deadline = time.monotonic() + 60
    while True:
        try:
            store = await asyncio.to_thread(Store.open, url)
            break
        except StoreUnavailable as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"llmgate: proxycore: key database unavailable for 60 s: {exc}") from None
            print(f"llmgate: proxycore: key database unavailable ({exc}); retrying in 2 s", file=sys.stderr, flush=True)
            await asyncio.sleep(2)
    app[STORE] = store
    usage = app.get(USAGE)
    if usage is not None and os.path.exists(usage.path):
        latest = await asyncio.to_thread(store.latest_spend_time)
        since = latest - timedelta(hours=1) if latest else None
        try:
            await asyncio.to_thread(replay_usage_log, store, usage.path, since)
        except StoreUnavailable as exc:
            print(f"llmgate: proxycore: spend replay postponed: {exc}", file=sys.stderr, flush=True)
    writer = app[SPEND] = SpendWriter(store)
    async for _ in spend_writer_ctx(writer)(app):
        yield
    await asyncio.to_thread(store.close)
