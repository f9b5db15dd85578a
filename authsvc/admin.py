"""DB mode's admin API, compatible with LiteLLM's: `/key/*`, `/team/*` and `/spend/logs`.

`register_admin_routes(app, store, master_key)` adds the routes to an aiohttp app (authsvc's; nginx
routes `/key`, `/team`, `/spend` and `/ui` there). Every route needs the master key
(`Authorization: Bearer <master_key>`). `store()` gives the key database, or None while it is not
reachable; its synchronous calls run in threads. The /ui pages (ui.py) share the field parsing here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from authsvc.keydb.records import Conflict, KeyRecord, StoreError, StoreUnavailable, TeamRecord, parse_duration, parse_time
from authsvc.keydb.store import MAX_PAGE_SIZE, Store
from controller.model import scalars
from controller.model.openai_errors import error_body
from controller.model.wire import bearer_token, key_hash, same_key

log = logging.getLogger("llmgate.admin")

KEY_LIST_MAX_SIZE = 100  # LiteLLM's bound for /key/list
MAX_TEXT = 256
_MAX_KEYS_PER_CALL = 1000
_TEAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # safe in X-Team, logs and metric labels
TOKEN_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class AdminState:
    store: Callable[[], Store | None]  # None: DB mode is off, or the database was not reachable yet
    master_key: Callable[[], str | None]  # read on every request, so a reloaded config applies at once


ADMIN = web.AppKey("llmgate_admin", AdminState)


def register_admin_routes(app: web.Application, store: Callable[[], Store | None],
                          master_key: Callable[[], str | None]) -> None:
    """Add the admin API to `app` (before any catch-all route: aiohttp matches in order)."""
    app[ADMIN] = AdminState(store, master_key)
    r = app.router
    r.add_post("/key/generate", _api(key_generate))
    r.add_get("/key/info", _api(key_info))
    r.add_post("/v2/key/info", _api(key_info_v2))
    r.add_post("/key/update", _api(key_update))
    r.add_post("/key/delete", _api(key_delete))
    r.add_get("/key/list", _api(key_list))
    r.add_post("/key/block", _api(key_block))
    r.add_post("/key/unblock", _api(key_unblock))
    r.add_post("/team/new", _api(team_new))
    r.add_get("/team/list", _api(team_list))
    r.add_get("/spend/logs", _api(spend_logs))


# ---------------------------------------------------------------- the API's plumbing

class AdminError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def bad(param: str | None, message: str, code: str = "invalid_request") -> AdminError:
    return AdminError(400, message, code, param)


def json_error(status: int, message: str, code: str | None, param: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, code, param), content_type="application/json")


Handler = Callable[[web.Request, Store], Awaitable[web.Response]]


def _api(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The master-key check, the store lookup and error mapping around one API handler."""

    async def endpoint(request: web.Request) -> web.Response:
        state = request.app[ADMIN]
        if not same_key(bearer_token(request.headers.get("Authorization")), state.master_key()):
            return json_error(401, "Authentication error: the admin API needs the master key in "
                              "'Authorization: Bearer <master_key>'.", "invalid_api_key")
        store = state.store()
        if store is None:
            return json_error(503, "The key database is not available (DB mode is off, or the database has not "
                              "answered yet); try again shortly.", "database_unavailable")
        try:
            return await handler(request, store)
        except AdminError as exc:
            return json_error(exc.status, exc.message, exc.code, exc.param)
        except StoreUnavailable as exc:
            log.warning("admin API: database unavailable: %s", exc)
            return json_error(503, "The database is unavailable; try again shortly.", "database_unavailable")
        except StoreError:
            log.exception("admin API: database error on %s %s", request.method, request.path)
            return json_error(500, "Database error; the details are in llmgate's log.", "database_error")

    return endpoint


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def _json_object(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad(None, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(None, f"Expected a JSON object as the request body, got {type(body).__name__}.", "invalid_json")
    return body


def _key_hash_of(value: Any, param: str) -> str:
    """A key as the API accepts it: the raw key (sk-...) or its sha256 hex (LiteLLM's `token`)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 600:
        raise bad(param, f"'{param}' must be a key (sk-...) or a key's sha256 hex.")
    value = value.strip()
    return value if TOKEN_HASH.fullmatch(value) else key_hash(value)


async def run_db(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


# ---------------------------------------------------------------- field parsing (API bodies and UI forms)

FieldParser = Callable[[str, Any], Any]


def _optional(check: scalars.Check) -> FieldParser:
    """A field that may be null, else must pass `check` (from the shared scalar checks)."""

    def parse(name: str, v: Any) -> Any:
        if v is None:
            return None
        try:
            return check(v)
        except ValueError as exc:
            raise bad(name, f"'{name}' must be {exc} or null, got {v!r}."[:300]) from None

    return parse


def _model_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(m, str) and m.strip() and len(m) <= MAX_TEXT for m in v):
        raise ValueError("a list of model names (an empty list allows every model)")
    return tuple(dict.fromkeys(m.strip() for m in v))


def _duration_text(v: Any) -> str:
    return parse_duration(v).text


def _team_id_text(v: Any) -> str:
    if not isinstance(v, str) or not _TEAM_ID.fullmatch(v):
        raise ValueError("1 to 64 letters, digits or '_.:-', starting with a letter or digit")
    return v


def _small_object(v: Any) -> dict:
    if not isinstance(v, dict) or len(orjson.dumps(v)) > 16384:
        raise ValueError("a JSON object of at most 16 KiB")
    return v


_models = _optional(_model_list)
_count = _optional(scalars.whole_in(0, scalars.MAX_EXACT_INT))
_money = _optional(scalars.non_negative_number)
_duration = _optional(_duration_text)
_text = _optional(scalars.printable_text(MAX_TEXT))
team_id_field = _optional(_team_id_text)
_object = _optional(_small_object)
_flag = _optional(scalars.flag)

KEY_FIELDS = {"models": _models, "rpm_limit": _count, "tpm_limit": _count, "max_parallel_requests": _count,
              "max_budget": _money, "budget_duration": _duration, "duration": _duration, "team_id": team_id_field,
              "key_alias": _text, "metadata": _object, "blocked": _flag}
_KEY_UPDATE_FIELDS = {**KEY_FIELDS, "spend": _money}
TEAM_FIELDS = {"team_id": team_id_field, "team_alias": _text, "models": _models, "max_budget": _money,
               "budget_duration": _duration, "rpm_limit": _count, "tpm_limit": _count, "blocked": _flag,
               "metadata": _object}


def parse_fields(body: dict, parsers: dict[str, FieldParser], endpoint: str) -> dict[str, Any]:
    unknown = sorted(set(body) - set(parsers))
    if unknown:
        raise bad(unknown[0], f"{endpoint} does not support {', '.join(map(repr, unknown))}; "
                  f"it takes {', '.join(sorted(parsers))}.", "unsupported_field")
    return {name: parsers[name](name, value) for name, value in body.items()}


async def _check_team(store: Store, team_id: str | None) -> None:
    if team_id is not None and await run_db(store.team_by_id, team_id) is None:
        raise bad("team_id", f"No team '{team_id}'; create it first with POST /team/new.", "team_not_found")


async def generate(store: Store, fields: dict[str, Any]) -> tuple[str, KeyRecord]:
    await _check_team(store, fields.get("team_id"))
    try:
        return await run_db(store.generate_key, **{k: v for k, v in fields.items() if v is not None})
    except Conflict:
        raise bad("key_alias", f"The key_alias '{fields.get('key_alias')}' is already in use.",
                  "key_alias_exists") from None


async def new_team(store: Store, fields: dict[str, Any]) -> TeamRecord:
    try:
        return await run_db(store.new_team, **{k: v for k, v in fields.items() if v is not None})
    except Conflict:
        raise bad("team_id", f"The team_id '{fields.get('team_id')}' is already in use.", "team_exists") from None


# ---------------------------------------------------------------- API handlers

async def key_generate(request: web.Request, store: Store) -> web.Response:
    fields = parse_fields(await _json_object(request), KEY_FIELDS, "/key/generate")
    raw, record = await generate(store, fields)
    return _json({**record.to_info(), "key": raw, "duration": fields.get("duration")})


async def key_info(request: web.Request, store: Store) -> web.Response:
    key = request.query.get("key")
    if key is None:
        raise bad("key", "Give the key: /key/info?key=<its sha256 hex> (or sk-...), or POST /v2/key/info with "
                  '{"keys": ["sk-..."]}, which keeps the key out of URLs and logs.')
    record = await run_db(store.key_by_hash, _key_hash_of(key, "key"))
    if record is None:
        raise AdminError(404, "No such key.", "key_not_found", "key")
    return _json({"key": key, "info": record.to_info()})


async def key_info_v2(request: web.Request, store: Store) -> web.Response:
    """LiteLLM's POST /v2/key/info: the keys in the body, not in the URL (where proxies and logs would keep them)."""
    keys = (await _json_object(request)).get("keys")
    if not isinstance(keys, list) or not keys or len(keys) > KEY_LIST_MAX_SIZE:
        raise bad("keys", f"/v2/key/info needs 'keys': a list of 1 to {KEY_LIST_MAX_SIZE} keys (sk-... or sha256 hex).")
    infos = []
    for i, key in enumerate(keys):
        record = await run_db(store.key_by_hash, _key_hash_of(key, f"keys[{i}]"))
        if record is None:
            raise AdminError(404, f"No such key: keys[{i}].", "key_not_found", "keys")
        infos.append(record.to_info())
    return _json({"key": keys, "info": infos})


async def key_update(request: web.Request, store: Store) -> web.Response:
    body = await _json_object(request)
    if "key" not in body:
        raise bad("key", "/key/update needs 'key': the key to change (sk-... or its sha256 hex).")
    key = body.pop("key")
    token_hash = _key_hash_of(key, "key")
    fields = parse_fields(body, _KEY_UPDATE_FIELDS, "/key/update")
    if "team_id" in fields:
        await _check_team(store, fields["team_id"])
    try:
        record = await run_db(store.update_key, token_hash, **fields)
    except Conflict:
        raise bad("key_alias", f"The key_alias '{fields.get('key_alias')}' is already in use.",
                   "key_alias_exists") from None
    if record is None:
        raise AdminError(404, "No such key.", "key_not_found", "key")
    return _json({**record.to_info(), "key": key})


async def key_delete(request: web.Request, store: Store) -> web.Response:
    body = await _json_object(request)
    keys = body.get("keys")
    extra = sorted(set(body) - {"keys"})
    if extra:
        raise bad(extra[0], f"/key/delete takes only 'keys', not {', '.join(map(repr, extra))}.", "unsupported_field")
    if not isinstance(keys, list) or not keys or len(keys) > _MAX_KEYS_PER_CALL:
        raise bad("keys", f"/key/delete needs 'keys': a list of 1 to {_MAX_KEYS_PER_CALL} keys.")
    hashes = [_key_hash_of(k, "keys") for k in keys]
    found = [await run_db(store.key_by_hash, h) is not None for h in hashes]
    if not all(found):
        raise AdminError(404, f"{found.count(False)} of the {len(keys)} keys do not exist; nothing was deleted.",
                       "key_not_found", "keys")
    await run_db(store.delete_keys, hashes)
    return _json({"deleted_keys": keys})


async def key_list(request: web.Request, store: Store) -> web.Response:
    page = _query_int(request, "page", 1, 1, 10**9)
    size = _query_int(request, "size", 10, 1, KEY_LIST_MAX_SIZE)
    team_id = team_id_field("team_id", request.query.get("team_id"))
    full = request.query.get("return_full_object", "false").lower()
    if full not in ("true", "false"):
        raise bad("return_full_object", "'return_full_object' must be true or false.")
    records, total = await run_db(store.list_keys, page, size, team_id)
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
        raise bad(extra[0], f"this endpoint takes only 'key', not {', '.join(map(repr, extra))}.", "unsupported_field")
    record = await run_db(store.set_blocked, _key_hash_of(body.get("key"), "key"), blocked)
    if record is None:
        raise AdminError(404, "No such key.", "key_not_found", "key")
    return _json(record.to_info())


async def key_block(request: web.Request, store: Store) -> web.Response:
    return await _set_blocked(request, store, True)


async def key_unblock(request: web.Request, store: Store) -> web.Response:
    return await _set_blocked(request, store, False)


async def team_new(request: web.Request, store: Store) -> web.Response:
    fields = parse_fields(await _json_object(request), TEAM_FIELDS, "/team/new")
    return _json((await new_team(store, fields)).to_info())


async def team_list(request: web.Request, store: Store) -> web.Response:
    return _json([t.to_info() for t in await run_db(store.list_teams)])


async def spend_logs(request: web.Request, store: Store) -> web.Response:
    q = request.query
    api_key = _key_hash_of(q["api_key"], "api_key") if "api_key" in q else None
    team_id = team_id_field("team_id", q.get("team_id"))
    start = _query_time(q.get("start_date"), "start_date", end=False)
    end = _query_time(q.get("end_date"), "end_date", end=True)
    if start and end and start >= end:
        raise bad("end_date", "end_date is before start_date.")
    page = _query_int(request, "page", 1, 1, 10**9)
    page_size = _query_int(request, "page_size", 100, 1, MAX_PAGE_SIZE)
    rows = await run_db(store.spend_logs, api_key, team_id, start, end, page_size, (page - 1) * page_size)
    return _json([r.to_info() for r in rows])


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,10}", text) or not lo <= int(text) <= hi:
        raise bad(name, f"'{name}' must be a whole number from {lo} to {hi}, got {text!r}.")
    return int(text)


def _query_time(text: str | None, name: str, end: bool) -> datetime | None:
    """YYYY-MM-DD (an end date includes its whole day) or an ISO-8601 time (UTC when no offset)."""
    if text is None:
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
            return day + timedelta(days=1) if end else day
        return parse_time(text)
    except ValueError:
        raise bad(name, f"'{name}' must be a date (YYYY-MM-DD) or an ISO-8601 time, got {text!r}.") from None
