"""proxycore: the OpenAI-compatible API in front of vLLM deployments, as an aiohttp app.

The routes and their lifecycle: the inference routes (inference.py, the hot path), the model list,
health and readiness, metrics, the health probes that bring deployments back, and the reload of
config.yaml and teams.yaml when they change. proxycore never opens a database: a virtual key's
limits arrive from authsvc through nginx, and its spend goes to the usage log, which authsvc reads.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import sys
import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from controller.model.usage_record import Clock
from controller.ops.filewatch import FileWatch
from proxycore import metrics
from proxycore.endpoints import MODELS_PATH
from proxycore.errors import ApiError, error_response
from proxycore.inference import CLOCK, HTTP, LIVE, METERS, UNAUTHORIZED, USAGE, inference_routes, key_policy
from proxycore.live import LiveConfig, authenticate
from proxycore.meters import Meters
from proxycore.router import DeploymentState, ModelGroup
from proxycore.upstream import UpstreamClient, UpstreamConnectError, UpstreamError, UpstreamTimeout
from proxycore.usage_log import UsageLog

log = logging.getLogger("llmgate.proxy")
STARTED = web.AppKey("started", float)


# ---------------------------------------------------------------- models, health, metrics

def _model_card(group: ModelGroup, created: int) -> dict:
    """The backend's own card for the group's first deployment that has one (max_model_len, root, parent and
    owned_by kept), under the gateway's model name; a plain card until a probe has read one."""
    for s in group.members:
        if s.card is not None:
            return {**s.card, "id": group.name}
    return {"id": group.name, "object": "model", "created": created, "owned_by": "llmgate"}


async def list_models(request: web.Request) -> web.Response:
    served = request.app[LIVE].served
    ok, team, key_id = authenticate(request, served)
    if not ok:
        return error_response(401, UNAUTHORIZED, "invalid_api_key")
    created = int(request.app[STARTED])
    names = served.models_for(team)
    try:
        policy = key_policy(request, key_id)
    except ApiError as refusal:
        return refusal.response()
    if policy is not None and policy.models is not None:
        names = [n for n in names if n in policy.models]
    data = [_model_card(served.groups[n], created) for n in names]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    served = request.app[LIVE].served
    ok, team, _ = authenticate(request, served)
    if not ok:
        return error_response(401, UNAUTHORIZED, "invalid_api_key")
    name = request.match_info["model"]
    if name not in served.models_for(team):
        return error_response(404, f"The model `{name}` does not exist.", "model_not_found", "model")
    return web.Response(body=orjson.dumps(_model_card(served.groups[name], int(request.app[STARTED]))),
                        content_type="application/json")


async def liveliness(request: web.Request) -> web.Response:
    return web.json_response("I'm alive!")  # LiteLLM's exact answer, which probes may match on


async def readiness(request: web.Request) -> web.Response:
    served = request.app[LIVE].served
    up = sum(1 for g in served.groups.values() for s in g.members if s.up)
    usage = request.app.get(USAGE)
    log_problem = usage.status() if usage is not None else None
    body: dict = {"status": "healthy" if up and log_problem is None else "unhealthy", "deployments_up": up}
    if log_problem is not None:
        body["usage_log"] = log_problem
    return web.json_response(body, status=200 if up and log_problem is None else 503)


async def health(request: web.Request) -> web.Response:
    served = request.app[LIVE].served
    ok, _, _ = authenticate(request, served)
    if not ok:
        return error_response(401, UNAUTHORIZED, "invalid_api_key")
    healthy, unhealthy = [], []
    now = time.monotonic()
    for g in served.groups.values():
        for s in g.members:
            entry = {"model": g.name, "deployment": s.d.id, "api_base": s.d.api_base,
                     "upstream_model": s.d.upstream_model, "in_flight": s.in_flight,
                     "latency_ms": round(s.latency_s * 1000, 3) if s.latency_s is not None else None,
                     "recent_failures": len(s.fail_times)}
            if s.up:
                healthy.append(entry)
            else:
                entry["reason"] = s.down_reason
                if s.down_by == "misconfigured":
                    entry["misconfigured"] = True
                    entry["served_models"] = list(s.served_ids or ())
                elif s.down_by == "requests":
                    entry["retry_in_s"] = round(max(0.0, s.down_until - now), 3)
                unhealthy.append(entry)
    return web.json_response({"healthy_endpoints": healthy, "unhealthy_endpoints": unhealthy,
                              "healthy_count": len(healthy), "unhealthy_count": len(unhealthy)})


async def not_found(request: web.Request) -> web.Response:
    return error_response(404, f"No route for {request.method} {request.path}. The API is under /v1 (chat/completions, "
                          "completions, embeddings, responses, audio/transcriptions, audio/translations, models), "
                          "with vLLM's /tokenize, /detokenize, /score, /rerank, /pooling and /classify.", "not_found")


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


# ---------------------------------------------------------------- health probes

PROBE_TIMEOUT_S = 5.0
_PROBE_JITTER = 0.2  # each deployment's next probe lands within ±20 % of the interval


async def _health_checks(app: web.Application) -> None:
    """Probe every deployment at start and then every health_check_interval (jittered), and a deployment that
    cooled down after request failures as soon as its cooldown ends."""
    session = app[HTTP]
    probing: set[DeploymentState] = set()
    while True:
        served = app[LIVE].served
        now = time.monotonic()
        interval = served.config.health_check_interval
        for g in served.groups.values():
            for s in g.members:
                due = now >= s.next_probe_at or (not s.up and s.down_by == "requests" and now >= s.down_until)
                if due and s not in probing:
                    s.next_probe_at = now + interval * random.uniform(1 - _PROBE_JITTER, 1 + _PROBE_JITTER)
                    probing.add(s)
                    asyncio.ensure_future(_probe_once(app, session, s, probing))
        await asyncio.sleep(0.25)


async def _probe_once(app: web.Application, session: UpstreamClient, s: DeploymentState,
                      probing: set[DeploymentState]) -> None:
    try:
        await _probe(app, session, s)
    finally:
        probing.discard(s)


async def _probe(app: web.Application, session: UpstreamClient, s: DeploymentState) -> None:
    """GET <api_base>/models: the backend answers, and serves the deployment's upstream model id."""
    problem, misconfigured = None, False
    try:
        resp = await session.request("GET", s.urls[MODELS_PATH], headers=s.headers, connect_timeout=PROBE_TIMEOUT_S,
                                     first_byte_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S)
        raw = await resp.read()
        if resp.status != 200:
            problem = f"GET {s.urls[MODELS_PATH]} answered {resp.status}"
        else:
            cards = _model_cards(raw)
            if cards is None:
                problem = f"GET {s.urls[MODELS_PATH]} answered 200 without a model list"
            else:
                s.served_ids = tuple(cards)
                s.card = cards.get(s.d.upstream_model)
                if s.card is None:
                    problem = (f"the backend at {s.d.api_base} does not serve `{s.d.upstream_model}`; it serves: "
                               f"{', '.join(cards) or 'nothing'}")
                    misconfigured = True
    except UpstreamTimeout:
        problem = f"no answer from {s.urls[MODELS_PATH]} within {PROBE_TIMEOUT_S:g} s"
    except UpstreamConnectError as exc:
        problem = f"cannot connect to {s.d.api_base}: {exc}"
    except UpstreamError as exc:
        problem = f"GET {s.urls[MODELS_PATH]} failed: {type(exc).__name__}"
    change = s.probed(time.monotonic(), problem, misconfigured)
    if change == "left":
        print(f"llmgate: deployment {s.d.id} left rotation: {problem}", file=sys.stderr, flush=True)
    elif change == "rejoined":
        print(f"llmgate: deployment {s.d.id} is back in rotation", file=sys.stderr, flush=True)
    metrics.DEPLOYMENT_UP.labels(s.d.id).set(1 if s.up else 0)


def _model_cards(raw: bytes) -> dict[str, dict] | None:
    """id -> card of an OpenAI /models answer; None when it is not one."""
    try:
        data = orjson.loads(raw).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    return {c["id"]: c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)}


# ---------------------------------------------------------------- the app and its lifecycle

async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    ssl_verify = app[LIVE].served.config.ssl_verify
    tls: bool | ssl.SSLContext = ssl_verify if isinstance(ssl_verify, bool) else ssl.create_default_context(cafile=ssl_verify)
    app[HTTP] = UpstreamClient(ssl=tls)
    for g in app[LIVE].served.groups.values():
        for s in g.members:
            metrics.DEPLOYMENT_UP.labels(s.d.id).set(1)
    checker = asyncio.ensure_future(_health_checks(app))
    yield
    checker.cancel()
    await app[HTTP].close()


async def _retry_usage_lines(app: web.Application) -> AsyncIterator[None]:
    """Usage lines that wait for the log (a full disk) are written as soon as it takes them again."""
    usage = app.get(USAGE)

    async def every_second() -> None:
        while True:
            await asyncio.sleep(1.0)
            if usage is not None and usage.spool:
                usage.retry()

    task = asyncio.ensure_future(every_second())
    yield
    task.cancel()


async def _follow_config_files(app: web.Application) -> AsyncIterator[None]:
    """Reload config.yaml and teams.yaml in-process when they change, or on SIGHUP."""
    live = app[LIVE]
    paths = [p for p in (live.config_path, live.teams_path) if p]
    if not paths:
        yield
        return

    async def reload(reason: str) -> None:
        loaded = await asyncio.to_thread(live.load_files)  # parsed off the event loop: requests go on meanwhile
        problem = loaded if isinstance(loaded, str) else None
        if loaded is not None and not isinstance(loaded, str):
            live.apply(*loaded)
        if problem:
            print(f"llmgate: proxycore kept the previous config: {problem}", file=sys.stderr, flush=True)
        else:
            log.info("proxycore reloaded its config (%s)", reason)

    watch = FileWatch(paths, reload)
    watch.on_sighup()
    task = asyncio.ensure_future(watch.run())
    yield
    task.cancel()


def make_app(live: LiveConfig, *, usage_log: UsageLog | None = None, meters: Meters | None = None) -> web.Application:
    app = web.Application(client_max_size=live.served.config.max_request_bytes, middlewares=[json_errors])
    app[LIVE] = live
    app[CLOCK] = meters.clock if meters else Clock()
    if meters is not None:
        app[METERS] = meters
    app[STARTED] = time.time()
    if usage_log is not None:
        app[USAGE] = usage_log
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_follow_config_files)
    app.cleanup_ctx.append(_retry_usage_lines)
    r = app.router
    for path, handler in inference_routes():
        r.add_post(path, handler)
    for prefix in ("/v1", ""):
        r.add_get(prefix + "/models", list_models)
        r.add_get(prefix + "/models/{model:.+}", get_model)
    r.add_get("/health/liveliness", liveliness)
    r.add_get("/health/liveness", liveliness)
    r.add_get("/health/readiness", readiness)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics_endpoint)
    r.add_route("*", "/{tail:.*}", not_found)
    return app
