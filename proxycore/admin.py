"""DB mode in proxycore: the admin API, the /ui pages, and the spend writer.

`register_admin_routes(app, store_key, master_key)` adds LiteLLM-compatible management routes
(`/key/*`, `/team/*`, `/spend/logs`) and a small HTML admin under `/ui` to an aiohttp app. Every
route needs the master key (`Authorization: Bearer <master_key>`; the pages use a session cookie
derived from it). The store is `app[store_key]`; its synchronous calls run in threads.

`SpendWriter` takes one entry per request from the request path and writes them to the store in
batches; `replay_usage_log` puts usage-log lines into the store after a crash. Both are idempotent
by request_id.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jinja2
import orjson
from aiohttp import web

from authsvc.store import (MAX_PAGE_SIZE, Conflict, KeyRecord, SpendLogRecord, Store, StoreError, StoreUnavailable,
                           TeamRecord, hash_key, parse_duration, parse_time)
from proxycore.errors import error_response

log = logging.getLogger("llmgate.admin")

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates" / "ui"
KEY_LIST_MAX_SIZE = 100  # LiteLLM's bound for /key/list
UI_PAGE_SIZE = 50
SESSION_SECONDS = 12 * 3600
SESSION_COOKIE = "llmgate_ui"
_MAX_TEXT = 256
_MAX_KEYS_PER_CALL = 1000
_TEAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # safe in X-Team, logs and metric labels
_TOKEN_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class AdminState:
    store_key: web.AppKey[Store]
    master_key: Callable[[], str | None]  # read on every request, so a reloaded config applies at once
    templates: jinja2.Environment


ADMIN = web.AppKey("llmgate_admin", AdminState)


def register_admin_routes(app: web.Application, store_key: web.AppKey[Store],
                          master_key: Callable[[], str | None]) -> None:
    """Add the admin API and /ui to `app` (before any catch-all route: aiohttp matches in order)."""
    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True,
                                   undefined=jinja2.StrictUndefined)
    app[ADMIN] = AdminState(store_key, master_key, templates)
    r = app.router
    r.add_post("/key/generate", _api(key_generate))
    r.add_get("/key/info", _api(key_info))
    r.add_post("/key/update", _api(key_update))
    r.add_post("/key/delete", _api(key_delete))
    r.add_get("/key/list", _api(key_list))
    r.add_post("/key/block", _api(key_block))
    r.add_post("/key/unblock", _api(key_unblock))
    r.add_post("/team/new", _api(team_new))
    r.add_get("/team/list", _api(team_list))
    r.add_get("/spend/logs", _api(spend_logs))
    r.add_get("/ui", ui_home)
    r.add_post("/ui/login", ui_login)
    r.add_post("/ui/logout", ui_logout)
    r.add_post("/ui/keys", ui_create_key)
    r.add_post("/ui/keys/{action:block|unblock|delete}", ui_key_action)
    r.add_post("/ui/teams", ui_create_team)


# ---------------------------------------------------------------- the API's plumbing

class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _bad(param: str | None, message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code, param)


Handler = Callable[[web.Request, Store], Awaitable[web.Response]]


def _api(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The master-key check, the store lookup and error mapping around one API handler."""

    async def endpoint(request: web.Request) -> web.Response:
        state = request.app[ADMIN]
        if not _is_master(_bearer(request), state.master_key()):
            return error_response(401, "Authentication error: the admin API needs the master key in "
                                  "'Authorization: Bearer <master_key>'.", "invalid_api_key")
        store = request.app.get(state.store_key)
        if store is None:
            return error_response(503, "DB mode is off: set general_settings.database_url.", "database_unavailable")
        try:
            return await handler(request, store)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.code, exc.param)
        except StoreUnavailable as exc:
            log.warning("admin API: database unavailable: %s", exc)
            return error_response(503, "The database is unavailable; try again shortly.", "database_unavailable")
        except StoreError:
            log.exception("admin API: database error on %s %s", request.method, request.path)
            return error_response(500, "Database error; the details are in llmgate's log.", "database_error")

    return endpoint


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def _is_master(presented: str | None, master: str | None) -> bool:
    if not presented or not master:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), master.encode("utf-8"))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def _json_object(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad(None, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(None, f"Expected a JSON object as the request body, got {type(body).__name__}.", "invalid_json")
    return body


def _key_hash_of(value: Any, param: str) -> str:
    """A key as the API accepts it: the raw key (sk-...) or its sha256 hex (LiteLLM's `token`)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 600:
        raise _bad(param, f"'{param}' must be a key (sk-...) or a key's sha256 hex.")
    value = value.strip()
    return value if _TOKEN_HASH.fullmatch(value) else hash_key(value)


async def _run(fn: Callable, *args, **kwargs):
    return await asyncio.to_thread(fn, *args, **kwargs)


# ---------------------------------------------------------------- field parsing (API bodies and UI forms)

def _models(name: str, v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(m, str) and m.strip() and len(m) <= _MAX_TEXT for m in v):
        raise _bad(name, f"'{name}' must be a list of model names (an empty list allows every model).")
    return tuple(dict.fromkeys(m.strip() for m in v))


def _count(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2**53:
        raise _bad(name, f"'{name}' must be a whole number >= 0 or null, got {v!r}.")
    return v


def _money(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _bad(name, f"'{name}' must be a number >= 0 (USD) or null, got {v!r}.")
    return float(v)


def _duration(name: str, v: Any) -> str | None:
    if v is None:
        return None
    try:
        return parse_duration(v).text
    except ValueError as exc:
        raise _bad(name, f"'{name}': {exc}.") from None


def _text(name: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip() or len(v) > _MAX_TEXT or not v.isprintable():
        raise _bad(name, f"'{name}' must be printable text of 1 to {_MAX_TEXT} characters or null.")
    return v.strip()


def _team_id(name: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not _TEAM_ID.fullmatch(v):
        raise _bad(name, f"'{name}' must be 1 to 64 letters, digits or '_.:-', starting with a letter or digit.")
    return v


def _object(name: str, v: Any) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict) or len(orjson.dumps(v)) > 16384:
        raise _bad(name, f"'{name}' must be a JSON object of at most 16 KiB or null.")
    return v


def _flag(name: str, v: Any) -> bool | None:
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be true or false.")
    return v


_KEY_FIELDS = {"models": _models, "rpm_limit": _count, "tpm_limit": _count, "max_parallel_requests": _count,
               "max_budget": _money, "budget_duration": _duration, "duration": _duration, "team_id": _team_id,
               "key_alias": _text, "metadata": _object, "blocked": _flag}
_KEY_UPDATE_FIELDS = {**_KEY_FIELDS, "spend": _money}
_TEAM_FIELDS = {"team_id": _team_id, "team_alias": _text, "models": _models, "max_budget": _money,
                "budget_duration": _duration, "rpm_limit": _count, "tpm_limit": _count, "blocked": _flag,
                "metadata": _object}


def _parse_fields(body: dict, parsers: dict[str, Callable[[str, Any], Any]], endpoint: str) -> dict[str, Any]:
    unknown = sorted(set(body) - set(parsers))
    if unknown:
        raise _bad(unknown[0], f"{endpoint} does not support {', '.join(map(repr, unknown))}; "
                   f"it takes {', '.join(sorted(parsers))}.", "unsupported_field")
    return {name: parsers[name](name, value) for name, value in body.items()}


async def _check_team(store: Store, team_id: str | None) -> None:
    if team_id is not None and await _run(store.team_by_id, team_id) is None:
        raise _bad("team_id", f"No team '{team_id}'; create it first with POST /team/new.", "team_not_found")


async def _generate(store: Store, fields: dict[str, Any]) -> tuple[str, KeyRecord]:
    await _check_team(store, fields.get("team_id"))
    try:
        return await _run(store.generate_key, **{k: v for k, v in fields.items() if v is not None})
    except Conflict:
        raise _bad("key_alias", f"The key_alias '{fields.get('key_alias')}' is already in use.",
                   "key_alias_exists") from None


async def _new_team(store: Store, fields: dict[str, Any]) -> TeamRecord:
    try:
        return await _run(store.new_team, **{k: v for k, v in fields.items() if v is not None})
    except Conflict:
        raise _bad("team_id", f"The team_id '{fields.get('team_id')}' is already in use.", "team_exists") from None


# ---------------------------------------------------------------- API handlers

async def key_generate(request: web.Request, store: Store) -> web.Response:
    fields = _parse_fields(await _json_object(request), _KEY_FIELDS, "/key/generate")
    raw, record = await _generate(store, fields)
    return _json({**record.to_info(), "key": raw, "duration": fields.get("duration")})


async def key_info(request: web.Request, store: Store) -> web.Response:
    key = request.query.get("key")
    if key is None:
        raise _bad("key", "Give the key: /key/info?key=sk-... (or its sha256 hex).")
    record = await _run(store.key_by_hash, _key_hash_of(key, "key"))
    if record is None:
        raise ApiError(404, "No such key.", "key_not_found", "key")
    return _json({"key": key, "info": record.to_info()})


async def key_update(request: web.Request, store: Store) -> web.Response:
    body = await _json_object(request)
    if "key" not in body:
        raise _bad("key", "/key/update needs 'key': the key to change (sk-... or its sha256 hex).")
    key = body.pop("key")
    token_hash = _key_hash_of(key, "key")
    fields = _parse_fields(body, _KEY_UPDATE_FIELDS, "/key/update")
    if "team_id" in fields:
        await _check_team(store, fields["team_id"])
    try:
        record = await _run(store.update_key, token_hash, **fields)
    except Conflict:
        raise _bad("key_alias", f"The key_alias '{fields.get('key_alias')}' is already in use.",
                   "key_alias_exists") from None
    if record is None:
        raise ApiError(404, "No such key.", "key_not_found", "key")
    return _json({**record.to_info(), "key": key})


async def key_delete(request: web.Request, store: Store) -> web.Response:
    body = await _json_object(request)
    keys = body.get("keys")
    extra = sorted(set(body) - {"keys"})
    if extra:
        raise _bad(extra[0], f"/key/delete takes only 'keys', not {', '.join(map(repr, extra))}.", "unsupported_field")
    if not isinstance(keys, list) or not keys or len(keys) > _MAX_KEYS_PER_CALL:
        raise _bad("keys", f"/key/delete needs 'keys': a list of 1 to {_MAX_KEYS_PER_CALL} keys.")
    hashes = [_key_hash_of(k, "keys") for k in keys]
    found = [await _run(store.key_by_hash, h) is not None for h in hashes]
    if not all(found):
        raise ApiError(404, f"{found.count(False)} of the {len(keys)} keys do not exist; nothing was deleted.",
                       "key_not_found", "keys")
    await _run(store.delete_keys, hashes)
    return _json({"deleted_keys": keys})


async def key_list(request: web.Request, store: Store) -> web.Response:
    page = _query_int(request, "page", 1, 1, 10**9)
    size = _query_int(request, "size", 10, 1, KEY_LIST_MAX_SIZE)
    team_id = _team_id("team_id", request.query.get("team_id"))
    full = request.query.get("return_full_object", "false").lower()
    if full not in ("true", "false"):
        raise _bad("return_full_object", "'return_full_object' must be true or false.")
    records, total = await _run(store.list_keys, page, size, team_id)
    return _json({
        "keys": [r.to_info() if full == "true" else r.token_hash for r in records],
        "total_count": total,
        "current_page": page,
        "total_pages": math.ceil(total / size),
    })


async def _set_blocked(request: web.Request, store: Store, blocked: bool) -> web.Response:
    body = await _json_object(request)
    extra = sorted(set(body) - {"key"})
    if extra:
        raise _bad(extra[0], f"this endpoint takes only 'key', not {', '.join(map(repr, extra))}.", "unsupported_field")
    record = await _run(store.set_blocked, _key_hash_of(body.get("key"), "key"), blocked)
    if record is None:
        raise ApiError(404, "No such key.", "key_not_found", "key")
    return _json(record.to_info())


async def key_block(request: web.Request, store: Store) -> web.Response:
    return await _set_blocked(request, store, True)


async def key_unblock(request: web.Request, store: Store) -> web.Response:
    return await _set_blocked(request, store, False)


async def team_new(request: web.Request, store: Store) -> web.Response:
    fields = _parse_fields(await _json_object(request), _TEAM_FIELDS, "/team/new")
    return _json((await _new_team(store, fields)).to_info())


async def team_list(request: web.Request, store: Store) -> web.Response:
    return _json([t.to_info() for t in await _run(store.list_teams)])


async def spend_logs(request: web.Request, store: Store) -> web.Response:
    q = request.query
    api_key = _key_hash_of(q["api_key"], "api_key") if "api_key" in q else None
    team_id = _team_id("team_id", q.get("team_id"))
    start = _query_time(q.get("start_date"), "start_date", end=False)
    end = _query_time(q.get("end_date"), "end_date", end=True)
    if start and end and start >= end:
        raise _bad("end_date", "end_date is before start_date.")
    page = _query_int(request, "page", 1, 1, 10**9)
    page_size = _query_int(request, "page_size", 100, 1, MAX_PAGE_SIZE)
    rows = await _run(store.spend_logs, api_key, team_id, start, end, page_size, (page - 1) * page_size)
    return _json([r.to_info() for r in rows])


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,10}", text) or not lo <= int(text) <= hi:
        raise _bad(name, f"'{name}' must be a whole number from {lo} to {hi}, got {text!r}.")
    return int(text)


def _query_time(text: str | None, name: str, end: bool) -> datetime | None:
    """YYYY-MM-DD (an end date includes its whole day) or an ISO-8601 time (UTC when no offset)."""
    if text is None:
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), timezone.utc)
            return day + timedelta(days=1) if end else day
        return parse_time(text)
    except ValueError:
        raise _bad(name, f"'{name}' must be a date (YYYY-MM-DD) or an ISO-8601 time, got {text!r}.") from None


# ---------------------------------------------------------------- /ui: sessions

def session_token(master: str, issued: int) -> str:
    """`<issued>.<hmac>`: an HMAC keyed by the master key, never the key; a new master key ends every session."""
    mac = hmac.new(master.encode(), f"llmgate-ui-session:{issued}".encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{mac}"


def csrf_token(master: str, session: str) -> str:
    return hmac.new(master.encode(), f"llmgate-ui-csrf:{session}".encode(), hashlib.sha256).hexdigest()


def _session(request: web.Request) -> tuple[str, str] | None:
    """(master key, session token) of a logged-in browser, else None."""
    master = request.app[ADMIN].master_key()
    token = request.cookies.get(SESSION_COOKIE, "")
    issued, _, _mac = token.partition(".")
    if not master or not issued.isdigit() or not 0 <= time.time() - int(issued) <= SESSION_SECONDS:
        return None
    if not hmac.compare_digest(token.encode(), session_token(master, int(issued)).encode()):
        return None
    return master, token


_UI_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _page(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    html = request.app[ADMIN].templates.get_template(template).render(**context)
    return web.Response(status=status, text=html, content_type="text/html", headers=_UI_HEADERS)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={**_UI_HEADERS, "Location": location})


async def _ui_form(request: web.Request) -> tuple[Any, web.Response | None]:
    """The form of a POST from a logged-in page with a valid CSRF token; or the page to answer instead."""
    session = _session(request)
    if session is None:
        return None, _see_other("/ui")
    form = await request.post()
    if not hmac.compare_digest(str(form.get("csrf", "")).encode(), csrf_token(*session).encode()):
        return None, _page(request, "message.html", 403, title="Refused",
                           message="The form's security token does not match; reload the page and try again.")
    return form, None


def _ui_store(request: web.Request) -> Store | None:
    return request.app.get(request.app[ADMIN].store_key)


def _db_off(request: web.Request) -> web.Response:
    return _page(request, "message.html", 503, title="DB mode is off",
                 message="Set general_settings.database_url to manage keys here.")


def _db_down(request: web.Request, what: str) -> web.Response:
    return _page(request, "message.html", 503, title="Database unavailable",
                 message=f"The database does not answer; {what}. Try again shortly.")


# ---------------------------------------------------------------- /ui: pages

async def ui_home(request: web.Request) -> web.Response:
    session = _session(request)
    if session is None:
        return _page(request, "login.html", error=None, configured=bool(request.app[ADMIN].master_key()))
    return await _dashboard(request, session)


async def _dashboard(request: web.Request, session: tuple[str, str], error: str | None = None,
                     status: int = 200) -> web.Response:
    store = _ui_store(request)
    if store is None:
        return _db_off(request)
    page = request.query.get("page", "1")
    page = int(page) if page.isdigit() and 0 < int(page) < 10**9 else 1
    try:
        keys, total = await _run(store.list_keys, page, UI_PAGE_SIZE)
        teams = await _run(store.list_teams)
        recent = await _run(store.spend_logs, limit=20)
    except StoreUnavailable:
        return _db_down(request, "nothing can be shown")
    now = datetime.now(timezone.utc)
    return _page(request, "dashboard.html", status,
                 csrf=csrf_token(*session), error=error, page=page,
                 pages=max(1, math.ceil(total / UI_PAGE_SIZE)), total=total,
                 keys=[_key_row(k, now) for k in keys], teams=[_team_row(t, now) for t in teams],
                 recent=[_spend_row(r) for r in recent])


def _money_text(v: float | None) -> str:
    return "—" if v is None else f"${v:,.4f}"


def _limits_text(rpm: int | None, tpm: int | None, parallel: int | None = None) -> str:
    parts = [f"{n} {label}" for n, label in ((rpm, "rpm"), (tpm, "tpm"), (parallel, "parallel")) if n is not None]
    return ", ".join(parts) or "—"


def _budget_text(max_budget: float | None, duration: str | None) -> str:
    if max_budget is None:
        return "—"
    return _money_text(max_budget) + (f" / {duration}" if duration else "")


def _key_row(k: KeyRecord, now: datetime) -> dict[str, Any]:
    return {
        "token_hash": k.token_hash, "alias": k.key_alias or "", "key_name": k.key_name, "team": k.team_id or "",
        "models": ", ".join(k.models) or "all", "spend": _money_text(k.spend_at(now)),
        "budget": _budget_text(k.max_budget, k.budget_duration),
        "limits": _limits_text(k.rpm_limit, k.tpm_limit, k.max_parallel_requests),
        "expires": k.expires.strftime("%Y-%m-%d %H:%M UTC") if k.expires else "never",
        "blocked": k.blocked, "state": k.unusable_reason(now) or "active",
    }


def _team_row(t: TeamRecord, now: datetime) -> dict[str, Any]:
    return {
        "team_id": t.team_id, "alias": t.team_alias or "", "models": ", ".join(t.models) or "all",
        "spend": _money_text(t.spend_at(now)), "budget": _budget_text(t.max_budget, t.budget_duration),
        "limits": _limits_text(t.rpm_limit, t.tpm_limit), "state": t.unusable_reason(now) or "active",
    }


def _spend_row(r: SpendLogRecord) -> dict[str, Any]:
    return {
        "time": r.start_time.strftime("%Y-%m-%d %H:%M:%S"), "request_id": r.request_id,
        "key_id": (r.token_hash or "")[:12], "team": r.team_id or "", "model": r.model or "",
        "tokens": r.total_tokens, "spend": f"${r.spend:,.6f}", "status": "" if r.status is None else r.status,
    }


async def ui_login(request: web.Request) -> web.Response:
    master = request.app[ADMIN].master_key()
    form = await request.post()
    if not _is_master(str(form.get("master_key", "")), master):
        return _page(request, "login.html", 401, error="That is not the master key.", configured=bool(master))
    response = _see_other("/ui")
    response.set_cookie(SESSION_COOKIE, session_token(master, int(time.time())), max_age=SESSION_SECONDS,
                        path="/ui", httponly=True, samesite="Strict", secure=request.secure)
    return response


async def ui_logout(request: web.Request) -> web.Response:
    _form, refused = await _ui_form(request)
    if refused is not None:
        return refused
    response = _see_other("/ui")
    response.del_cookie(SESSION_COOKIE, path="/ui")
    return response


def _form_fields(form: Any, spec: dict[str, str]) -> dict[str, Any]:
    """Form text -> the values the API takes; empty inputs are left out. spec: name -> text|int|money|list."""
    out: dict[str, Any] = {}
    for name, kind in spec.items():
        text = str(form.get(name, "")).strip()
        if not text:
            continue
        try:
            if kind == "int":
                out[name] = int(text)
            elif kind == "money":
                out[name] = float(text)
            elif kind == "list":
                out[name] = [m for m in re.split(r"[,\s]+", text) if m]
            else:
                out[name] = text
        except ValueError:
            raise _bad(name, f"'{name}' must be a {'whole number' if kind == 'int' else 'number'}, "
                       f"got {text!r}.") from None
    return out


_KEY_FORM = {"key_alias": "text", "team_id": "text", "models": "list", "rpm_limit": "int", "tpm_limit": "int",
             "max_parallel_requests": "int", "max_budget": "money", "budget_duration": "text", "duration": "text"}
_TEAM_FORM = {"team_id": "text", "team_alias": "text", "models": "list", "max_budget": "money",
              "budget_duration": "text", "rpm_limit": "int", "tpm_limit": "int"}


async def _ui_post(request: web.Request):
    """(form, store) of a page's POST with a valid session and CSRF token, or the page that refuses it."""
    form, refused = await _ui_form(request)
    if refused is not None:
        return refused
    store = _ui_store(request)
    if store is None:
        return _db_off(request)
    return form, store


async def ui_create_key(request: web.Request) -> web.Response:
    got = await _ui_post(request)
    if isinstance(got, web.Response):
        return got
    form, store = got
    try:
        fields = _parse_fields(_form_fields(form, _KEY_FORM), _KEY_FIELDS, "the key form")
        raw, record = await _generate(store, fields)
    except ApiError as exc:
        return await _dashboard(request, _session(request), error=exc.message, status=400)
    except StoreUnavailable:
        return _db_down(request, "the key was not created")
    return _page(request, "key_created.html", raw_key=raw, key=_key_row(record, datetime.now(timezone.utc)))


async def ui_key_action(request: web.Request) -> web.Response:
    got = await _ui_post(request)
    if isinstance(got, web.Response):
        return got
    form, store = got
    token_hash = str(form.get("token_hash", ""))
    if not _TOKEN_HASH.fullmatch(token_hash):
        return await _dashboard(request, _session(request), error="No key was chosen.", status=400)
    action = request.match_info["action"]
    try:
        if action == "delete":
            await _run(store.delete_keys, [token_hash])
        else:
            await _run(store.set_blocked, token_hash, action == "block")
    except StoreUnavailable:
        return _db_down(request, f"the key was not {action}ed")
    page = str(form.get("page", "1"))
    return _see_other(f"/ui?page={page}" if page.isdigit() else "/ui")


async def ui_create_team(request: web.Request) -> web.Response:
    got = await _ui_post(request)
    if isinstance(got, web.Response):
        return got
    form, store = got
    try:
        await _new_team(store, _parse_fields(_form_fields(form, _TEAM_FORM), _TEAM_FIELDS, "the team form"))
    except ApiError as exc:
        return await _dashboard(request, _session(request), error=exc.message, status=400)
    except StoreUnavailable:
        return _db_down(request, "the team was not created")
    return _see_other("/ui")


# ---------------------------------------------------------------- spend: batching and replay

class SpendWriter:
    """Spend entries from the request path, written to the store in batches about once a second.

    `add` only appends (no I/O). While the database is down the entries wait, at most
    `max_pending` of them (the oldest go first; `replay_usage_log` recovers them from the usage log).
    """

    def __init__(self, store: Store, interval: float = 1.0, max_pending: int = 100_000, batch_size: int = 5000):
        self.store = store
        self.interval = interval
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.dropped = 0
        self._pending: collections.deque[dict] = collections.deque()
        self._flushing = asyncio.Lock()
        self._down_since: float | None = None
        self._budgets_checked = 0.0

    def add(self, entry: dict) -> None:
        """One request's spend: request_id, key_hash, team_id, model, prompt_tokens, completion_tokens,
        spend, status, start_time (see Store.record_spend)."""
        self._pending.append(entry)
        if len(self._pending) > self.max_pending:
            self._pending.popleft()
            self.dropped += 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Flush every `interval` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                await self.flush()
                if time.monotonic() - self._budgets_checked >= 60:
                    self._budgets_checked = time.monotonic()
                    try:
                        await asyncio.to_thread(self.store.reset_budgets)
                    except StoreError as exc:
                        log.warning("spend writer: budget reset skipped: %s", exc)
                    except Exception:
                        log.exception("spend writer: budget reset failed")
        finally:
            await self.flush()

    async def flush(self) -> int:
        """Write what is pending; returns the number of new rows. Keeps everything when the store is down."""
        written = 0
        async with self._flushing:
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.batch_size))]
                try:
                    written += await asyncio.to_thread(self.store.record_spend, batch)
                except (StoreUnavailable, asyncio.CancelledError) as exc:
                    self._requeue(batch)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        log.warning("spend writer: database unavailable, keeping %d entries: %s", self.pending, exc)
                    return written
                except (ValueError, TypeError, StoreError):
                    # The store refused the batch as a whole: write it singly, dropping only what it refuses.
                    for i, entry in enumerate(batch):
                        try:
                            written += await asyncio.to_thread(self.store.record_spend, [entry])
                        except StoreUnavailable:
                            self._requeue(batch[i:])
                            return written
                        except (ValueError, TypeError, StoreError) as exc:
                            self.dropped += 1
                            log.error("spend writer: dropped an entry the store refuses (%s): %r", exc, entry)
                except Exception:
                    self._requeue(batch)  # a bug, not bad data: keep the entries, say so, try again later
                    log.exception("spend writer: writing %d entries failed; keeping them", len(batch))
                    return written
                if self._down_since is not None:
                    log.warning("spend writer: database back after %.0f s", time.monotonic() - self._down_since)
                    self._down_since = None
        return written

    def _requeue(self, batch: list[dict]) -> None:
        self._pending.extendleft(reversed(batch))
        while len(self._pending) > self.max_pending:
            self._pending.popleft()
            self.dropped += 1


def spend_writer_ctx(writer: SpendWriter) -> Callable[[web.Application], AsyncIterator[None]]:
    """For `app.cleanup_ctx`: runs the writer while the app runs, and flushes it at shutdown."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(writer.run())
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    return ctx


def replay_usage_log(store: Store, path: str | Path, since: datetime | str | None = None,
                     batch_size: int = 5000) -> int:
    """Put the usage log's lines (from `since` on) into the store; lines already there change nothing.

    Synchronous (run it in a thread). A line's key is its `key_hash`, else the one DB key whose hash
    starts with its `key_id` (12 hex digits). Lines that are not JSON objects with a request_id are
    skipped. Returns the number of new spend rows.
    """
    since_t = parse_time(since) if since is not None else None
    prefixes: dict[str, str | None] = {}
    batch: list[dict] = []
    written = 0
    with open(path, "rb") as f:
        for line in f:
            entry = _usage_entry(line, since_t, store, prefixes)
            if entry is None:
                continue
            batch.append(entry)
            if len(batch) >= batch_size:
                written += store.record_spend(batch)
                batch = []
    if batch:
        written += store.record_spend(batch)
    return written


def _usage_entry(line: bytes, since: datetime | None, store: Store, prefixes: dict[str, str | None]) -> dict | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None  # a torn last line of a crashed writer, or not a usage log
    if not isinstance(record, dict) or not isinstance(record.get("request_id"), str) or not record["request_id"]:
        return None
    try:
        ts = parse_time(record["ts"]) if isinstance(record.get("ts"), str) else None
    except ValueError:
        ts = None
    if since is not None and (ts is None or ts < since):
        return None
    key_hash = record.get("key_hash")
    key_id = record.get("key_id")
    if not isinstance(key_hash, str) and isinstance(key_id, str) and re.fullmatch(r"[0-9a-f]{12}", key_id):
        if key_id not in prefixes:
            prefixes[key_id] = store.key_hash_by_prefix(key_id)
        key_hash = prefixes[key_id]
    return {
        "request_id": record["request_id"],
        "key_hash": key_hash if isinstance(key_hash, str) else None,
        "team_id": record.get("team") if isinstance(record.get("team"), str) else None,
        "model": record.get("model") if isinstance(record.get("model"), str) else None,
        "prompt_tokens": _int_or_zero(record.get("prompt_tokens")),
        "completion_tokens": _int_or_zero(record.get("completion_tokens")),
        "total_tokens": _int_or_zero(record.get("total_tokens")),
        "spend": record.get("cost") if isinstance(record.get("cost"), (int, float)) else 0.0,
        "status": record.get("status") if isinstance(record.get("status"), int) else None,
        "start_time": ts,
    }


def _int_or_zero(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0
