"""DB mode's admin page, `/ui`: log in with the master key, create, block and delete keys, create teams.

Server-rendered with jinja2 from templates/ui, no scripts; a session cookie derived from the master key,
a CSRF token in every form, and a strict Content-Security-Policy.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from authsvc.admin import ADMIN, KEY_FIELDS, TEAM_FIELDS, TOKEN_HASH, AdminError, bad, generate, new_team, parse_fields, run_db
from authsvc.keydb.records import KeyRecord, SpendLogRecord, StoreUnavailable, TeamRecord
from authsvc.keydb.store import Store
from controller.model.wire import same_key

TEMPLATES_DIR = Path(str(resources.files("llmgate_templates"))) / "ui"  # templates/ui, shipped as package data
UI_PAGE_SIZE = 50
SESSION_SECONDS = 12 * 3600
SESSION_COOKIE = "llmgate_ui"
PAGES = web.AppKey("llmgate_ui_pages", jinja2.Environment)


def register_ui_routes(app: web.Application) -> None:
    """Add /ui to an app that has the admin API (register_admin_routes) already."""
    app[PAGES] = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True,
                                    undefined=jinja2.StrictUndefined)
    r = app.router
    r.add_get("/ui", ui_home)
    r.add_post("/ui/login", ui_login)
    r.add_post("/ui/logout", ui_logout)
    r.add_post("/ui/keys", ui_create_key)
    r.add_post("/ui/keys/{action:block|unblock|delete}", ui_key_action)
    r.add_post("/ui/teams", ui_create_team)


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


def _logged_in(request: web.Request) -> tuple[str, str]:
    """The session of a POST that _ui_form accepted."""
    session = _session(request)
    assert session is not None
    return session


def _page(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    html = request.app[PAGES].get_template(template).render(**context)
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
    return request.app[ADMIN].store()


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
    page_text = request.query.get("page", "1")
    page = int(page_text) if page_text.isdigit() and 0 < int(page_text) < 10**9 else 1
    try:
        keys, total = await run_db(store.list_keys, page, UI_PAGE_SIZE)
        teams = await run_db(store.list_teams)
        recent = await run_db(store.spend_logs, limit=20)
    except StoreUnavailable:
        return _db_down(request, "nothing can be shown")
    now = datetime.now(UTC)
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
    if master is None or not same_key(str(form.get("master_key", "")), master):
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
            raise bad(name, f"'{name}' must be a {'whole number' if kind == 'int' else 'number'}, "
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
        fields = parse_fields(_form_fields(form, _KEY_FORM), KEY_FIELDS, "the key form")
        raw, record = await generate(store, fields)
    except AdminError as exc:
        return await _dashboard(request, _logged_in(request), error=exc.message, status=400)
    except StoreUnavailable:
        return _db_down(request, "the key was not created")
    return _page(request, "key_created.html", raw_key=raw, key=_key_row(record, datetime.now(UTC)))


async def ui_key_action(request: web.Request) -> web.Response:
    got = await _ui_post(request)
    if isinstance(got, web.Response):
        return got
    form, store = got
    token_hash = str(form.get("token_hash", ""))
    if not TOKEN_HASH.fullmatch(token_hash):
        return await _dashboard(request, _logged_in(request), error="No key was chosen.", status=400)
    action = request.match_info["action"]
    try:
        if action == "delete":
            await run_db(store.delete_keys, [token_hash])
        else:
            await run_db(store.set_blocked, token_hash, action == "block")
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
        await new_team(store, parse_fields(_form_fields(form, _TEAM_FORM), TEAM_FIELDS, "the team form"))
    except AdminError as exc:
        return await _dashboard(request, _logged_in(request), error=exc.message, status=400)
    except StoreUnavailable:
        return _db_down(request, "the team was not created")
    return _see_other("/ui")
