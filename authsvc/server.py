"""authsvc: where a key is checked. nginx's `auth_request` endpoint, and in DB mode the key database
behind it: virtual keys, the admin API, /ui, and the spend that proxycore's usage log reports.

nginx sends the client's `Authorization: Bearer <key>`; authsvc answers 204 with `X-Team` and
`X-Key-Id` when the key's sha256 is in teams.yaml (or, in DB mode, is a usable virtual key, with its
limits in `X-Key-Policy`), else 401. The keys of teams.yaml are replaced whole when the file changes
(watched) or on SIGHUP, so adding or revoking a key needs no nginx reload; a file that does not load
leaves the previous keys serving.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import orjson
from aiohttp import web

from authsvc.admin import register_admin_routes
from authsvc.keydb.records import KeyRecord, StoreError, StoreUnavailable, TeamRecord, utcnow
from authsvc.keydb.store import Store
from authsvc.spend import SpendWriter, follow_usage_log
from authsvc.ui import register_ui_routes
from controller.model.config import ProxyConfig, load_proxy_config
from controller.model.teams import Address, Listen, TeamsConfig, UnixSocket, load_teams
from controller.model.wire import KEY_ID_HEADER, KEY_POLICY_HEADER, TEAM_HEADER, KeyPolicy, bearer_token, key_hash
from controller.model.yamlpath import ConfigError
from controller.ops.filewatch import FileWatch
from controller.ops.serving import BEHIND_NGINX, ListenError, start_site, wait_for_stop

DEFAULT_LISTEN = Address("127.0.0.1", 4002)  # `llmgate auth` alone, when teams.yaml sets no auth_listen
FRESH_S = 1.0  # a DB answer is reused this long (nginx caches valid keys for 3 s more in DB mode)
STALE_OK_S = 600.0  # while the DB is unreachable, a key seen within this long keeps its last answer
_TEAM_ID_OK = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a DB team id goes into X-Team only if nginx can print it


# ---------------------------------------------------------------- teams.yaml's keys

@dataclass(frozen=True, slots=True)
class KnownKey:
    sha256: str
    headers: dict[str, str]  # X-Team and X-Key-Id, built once per key


@dataclass(frozen=True, slots=True)
class KeyIndex:
    """One loaded teams.yaml, as the handler reads it: sha256 hex -> KnownKey."""

    keys: dict[str, KnownKey]
    teams: int
    auth_listen: Listen | None
    usage_log: str

    @classmethod
    def from_teams(cls, config: TeamsConfig) -> KeyIndex:
        keys = {sha: KnownKey(sha, {TEAM_HEADER: team.name, KEY_ID_HEADER: key.key_id})
                for sha, (team, key) in config.key_index().items()}
        return cls(keys, len(config.teams), config.gateway.auth_listen,
                   os.path.join(config.gateway.log_dir, "usage.jsonl"))


class KeyFiles:
    """The keys of teams.yaml and the master key of config.yaml, each replaced only by a file that loads."""

    def __init__(self, teams_path: str, config_path: str | None = None):
        self.path = os.path.abspath(teams_path)
        self.config_path = os.path.abspath(config_path) if config_path else None
        self.index = KeyIndex.from_teams(load_teams(self.path))  # a ConfigError here stops the start
        self.config: ProxyConfig | None = load_proxy_config(self.config_path) if self.config_path else None

    @property
    def master_key(self) -> str | None:
        return self.config.master_key if self.config is not None else None

    async def reload(self, reason: str) -> None:
        """Load both files off the event loop; keep what was serving for a file that does not load."""
        try:
            index = KeyIndex.from_teams(await asyncio.to_thread(load_teams, self.path))
        except ConfigError as exc:
            print(f"llmgate: authsvc kept the previous teams.yaml: {exc}", file=sys.stderr, flush=True)
        else:
            self.index = index
            print(f"authsvc reloaded {self.path}: {index.teams} teams, {len(index.keys)} keys", flush=True)
        if self.config_path is not None:
            try:
                self.config = await asyncio.to_thread(load_proxy_config, self.config_path)
            except ConfigError as exc:
                print(f"llmgate: authsvc kept the previous config.yaml: {exc}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- DB mode: the key database

class KeyDatabase:
    """The key database of DB mode, opened in the background: until it answers, static keys serve and
    virtual keys get 503. Once open, the usage log's spend flows into it."""

    def __init__(self, url: str, usage_log: str):
        self.url, self.usage_log = url, usage_log
        self.store: Store | None = None
        self._seen: dict[str, tuple[float, tuple[KeyRecord, TeamRecord | None] | None]] = {}

    async def open(self) -> bool:
        """One attempt to connect (and migrate); False, said on stderr, when the database does not answer."""
        try:
            self.store = await asyncio.to_thread(Store.open, self.url)
        except StoreUnavailable as exc:
            print(f"llmgate: authsvc: key database unavailable ({exc}); retrying in 2 s", file=sys.stderr, flush=True)
            return False
        return True

    async def run(self) -> None:
        """Connect (retrying every 2 s), then feed spend from the usage log until cancelled."""
        while self.store is None and not await self.open():
            await asyncio.sleep(2)
        assert self.store is not None
        writer = SpendWriter(self.store, interval=0.5)
        flushing = asyncio.ensure_future(writer.run())
        try:
            await follow_usage_log(self.store, self.usage_log, writer)
        finally:
            flushing.cancel()
            try:
                await flushing  # flushes what is pending
            except asyncio.CancelledError:
                pass

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _fetch(self, store: Store, digest: str) -> tuple[KeyRecord, TeamRecord | None] | None:
        record = store.key_by_hash(digest)
        if record is None:
            return None
        team = store.team_by_id(record.team_id) if record.team_id else None
        return record, team

    async def lookup(self, digest: str) -> tuple[KeyRecord, TeamRecord | None] | None:
        """(key, team) records or None; raises StoreError when the DB is down and the key was not seen lately."""
        now = time.monotonic()
        seen = self._seen.get(digest)
        if seen is not None and now - seen[0] < FRESH_S:
            return seen[1]
        try:
            if self.store is None:
                raise StoreUnavailable("the key database has not answered yet")
            try:
                record = await asyncio.to_thread(self._fetch, self.store, digest)
            except StoreError:
                # a connection the server closed (say, it restarted) fails once; the store reconnects on the next call
                record = await asyncio.to_thread(self._fetch, self.store, digest)
        except StoreError:
            if seen is not None and now - seen[0] < STALE_OK_S:
                return seen[1]
            raise
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[digest] = (now, record)
        return record


def _virtual_key_answer(record: KeyRecord, team: TeamRecord | None, now: datetime) -> web.Response:
    reason = record.unusable_reason(now)
    if reason in ("blocked", "expired") or (team is not None and team.unusable_reason(now) == "blocked"):
        return web.Response(status=401)
    spend, max_budget = record.spend_at(now), record.max_budget
    if team is not None and team.max_budget is not None and team.spend_at(now) >= team.max_budget:
        spend, max_budget = team.spend_at(now), team.max_budget  # the team's budget is spent: so is the key's
    models = set(record.models) if record.models else None
    if team is not None and team.models:
        models = set(team.models) if models is None else models & set(team.models)
    policy = KeyPolicy(record.token_hash, frozenset(models) if models is not None else None, record.rpm_limit,
                       record.tpm_limit, record.max_parallel_requests, max_budget, spend)
    headers = {KEY_ID_HEADER: record.key_id, KEY_POLICY_HEADER: policy.to_header()}
    if record.team_id and _TEAM_ID_OK.fullmatch(record.team_id):
        headers[TEAM_HEADER] = record.team_id
    return web.Response(status=204, headers=headers)


# ---------------------------------------------------------------- the endpoints

KEYS = web.AppKey("keys", KeyFiles)
DATABASE = web.AppKey("database", KeyDatabase)


async def auth(request: web.Request) -> web.Response:
    token = bearer_token(request.headers.get("Authorization"))  # the same rules as nginx/llmgate.js
    if token is None:
        return web.Response(status=401)
    digest = key_hash(token)
    known = request.app[KEYS].index.keys.get(digest)
    if known is not None and hmac.compare_digest(known.sha256, digest):
        return web.Response(status=204, headers=known.headers)
    database = request.app.get(DATABASE)
    if database is None:
        return web.Response(status=401)
    try:
        found = await database.lookup(digest)
    except StoreError:
        # nginx turns this into a JSON 503 that says the key database is unreachable
        return web.Response(status=503, headers={"X-Gw-Error": "db_unavailable"})
    if found is None or not hmac.compare_digest(found[0].token_hash, digest):
        return web.Response(status=401)
    return _virtual_key_answer(*found, utcnow())


async def health(request: web.Request) -> web.Response:
    files = request.app[KEYS]
    index = files.index
    body = {"status": "ok", "teams": index.teams, "keys": len(index.keys), "teams_file": files.path}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def make_auth_app(teams_path: str, config_path: str | None = None) -> web.Application:
    """The authsvc app over one teams.yaml (and config.yaml: the master key, and the key database in DB mode);
    raises ConfigError when a file does not load."""
    files = KeyFiles(teams_path, config_path)
    app = web.Application()
    app[KEYS] = files
    app.router.add_route("*", "/auth", auth)
    app.router.add_get("/health", health)
    url = files.config.database_url if files.config is not None else None
    if url:
        database = app[DATABASE] = KeyDatabase(url, files.index.usage_log)
        register_admin_routes(app, lambda: database.store, lambda: files.master_key)
        register_ui_routes(app)
        app.cleanup_ctx.append(_run_key_database)
    app.cleanup_ctx.append(_follow_files)
    return app


async def _run_key_database(app: web.Application) -> AsyncIterator[None]:
    database = app[DATABASE]
    await database.open()  # usually ready before authsvc listens; if not, static keys serve meanwhile
    task = asyncio.ensure_future(database.run())
    yield
    task.cancel()
    try:
        await asyncio.wait_for(task, 5.0)
    except (TimeoutError, asyncio.CancelledError):
        pass
    await asyncio.to_thread(database.close)


async def _follow_files(app: web.Application) -> AsyncIterator[None]:
    files = app[KEYS]
    watch = FileWatch([p for p in (files.path, files.config_path) if p], files.reload)
    watch.on_sighup()
    task = asyncio.ensure_future(watch.run())
    yield
    task.cancel()


def run_authsvc(args: argparse.Namespace) -> int:
    try:
        app = make_auth_app(args.teams, getattr(args, "config", None))
    except ConfigError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    listen: Listen
    if args.unix:
        listen = UnixSocket(os.path.abspath(args.unix))
    elif args.host is not None or args.port is not None:
        default = app[KEYS].index.auth_listen
        default = default if isinstance(default, Address) else DEFAULT_LISTEN
        listen = Address(args.host if args.host is not None else default.host,
                         args.port if args.port is not None else default.port)
    else:
        listen = app[KEYS].index.auth_listen or DEFAULT_LISTEN

    import uvloop

    return uvloop.run(_serve(app, listen))


async def _serve(app: web.Application, listen: Listen) -> int:
    files = app[KEYS]
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2, **BEHIND_NGINX)
    await runner.setup()
    try:
        shown = await start_site(runner, listen, setting="--host/--port or --unix (gateway.auth_listen)")
    except ListenError as exc:
        print(f"llmgate: authsvc {exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    index = files.index
    where = shown if shown.startswith("unix:") else f"http://{shown}"
    print(f"llmgate authsvc listening on {where} ({files.path}: {index.teams} teams, {len(index.keys)} keys)",
          flush=True)
    await wait_for_stop()
    await runner.cleanup()
    return 0
