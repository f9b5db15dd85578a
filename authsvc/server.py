"""authsvc: nginx's `auth_request` endpoint for team keys.

nginx sends the client's `Authorization: Bearer <key>`; authsvc answers 204 with `X-Team` and
`X-Key-Id` when the key's sha256 is in teams.yaml, else 401. The key index is replaced whole when
teams.yaml changes (watched) or on SIGHUP, so adding or revoking a key needs no nginx reload.
A teams.yaml that does not load leaves the previous index serving.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import web

from controller.teams import Address, TeamsConfig, load_teams
from controller.yamlpath import ConfigError

# Same rules as nginx/llmgate.js (`Bearer ` prefix, any case; token trimmed; header up to 600
# characters): nginx caches answers under the hash njs computes, so both must see the same key.
_SCHEME = "bearer "
_MAX_HEADER = 600
_WATCH_DEBOUNCE_MS = 500  # longest wait while a file keeps changing
_WATCH_STEP_MS = 50  # quiet time that ends a burst of changes (an editor's write + rename)
_K8S_SWAP = "..data"  # a ConfigMap volume swaps this symlink, not the file's own name


@dataclass(frozen=True, slots=True)
class KnownKey:
    sha256: str
    headers: dict[str, str]  # X-Team and X-Key-Id, built once per key


@dataclass(frozen=True, slots=True)
class KeyIndex:
    """One loaded teams.yaml, as the handler reads it: sha256 hex -> KnownKey."""

    keys: dict[str, KnownKey]
    teams: int
    auth_listen: Address

    @classmethod
    def from_teams(cls, config: TeamsConfig) -> "KeyIndex":
        keys = {sha: KnownKey(sha, {"X-Team": team.name, "X-Key-Id": key.key_id})
                for sha, (team, key) in config.key_index().items()}
        return cls(keys, len(config.teams), config.gateway.auth_listen)


class KeyStore:
    """The live KeyIndex of one teams.yaml, replaced whole and only by a file that loads."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._last_bytes = _file_digest(self.path)
        self.index = KeyIndex.from_teams(load_teams(self.path))  # a ConfigError here stops the start
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task] = set()

    async def reload(self, force: bool = False) -> None:
        """Load teams.yaml off the event loop; unless forced, only when its bytes changed."""
        async with self._lock:  # one at a time, so an older file never lands after a newer one
            digest = await asyncio.to_thread(_file_digest, self.path)
            if not force and digest == self._last_bytes:
                return
            self._last_bytes = digest
            try:
                index = KeyIndex.from_teams(await asyncio.to_thread(load_teams, self.path))
            except ConfigError as exc:
                print(f"llmgate: authsvc kept the previous teams.yaml: {exc}", file=sys.stderr, flush=True)
                return
            self.index = index
            print(f"authsvc reloaded {self.path}: {index.teams} teams, {len(index.keys)} keys", flush=True)

    def reload_soon(self, force: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(force))
        self._pending.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._pending.discard)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload when the file changes; watches its directory, since editors replace files by rename."""
        from watchfiles import awatch

        directory, name = os.path.split(self.path)
        try:
            async for _ in awatch(directory, watch_filter=lambda _c, p: os.path.basename(p) in (name, _K8S_SWAP),
                                  stop_event=stop, recursive=False, debounce=_WATCH_DEBOUNCE_MS, step=_WATCH_STEP_MS):
                await self.reload()
        except OSError as exc:
            print(f"llmgate: authsvc stopped watching {directory} ({exc}); send SIGHUP to reload teams.yaml",
                  file=sys.stderr, flush=True)


def _file_digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except OSError:
        return None


KEYS = web.AppKey("keys", KeyStore)
VIRTUAL = web.AppKey("virtual", "VirtualKeys")
FRESH_S = 1.0  # a DB answer is reused this long (nginx caches valid keys for 3 s more in DB mode)
STALE_OK_S = 600.0  # while the DB is unreachable, a key seen within this long keeps its last answer
_TEAM_ID_OK = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a DB team id goes into X-Team only if nginx can print it


class VirtualKeys:
    """DB mode: keys issued through the admin API, looked up by hash, answers kept briefly."""

    def __init__(self, store):
        self.store = store
        self._seen: dict[str, tuple[float, object]] = {}  # hash -> (when fetched, KeyRecord or None)

    def _fetch(self, digest: str):
        """(key record, its team's record) — None for a key that does not exist."""
        record = self.store.key_by_hash(digest)
        if record is None:
            return None
        team = self.store.team_by_id(record.team_id) if record.team_id else None
        return record, team

    async def lookup(self, digest: str):
        """(key, team) records or None; raises StoreUnavailable when the DB is down and the key was not seen lately."""
        from authsvc.store import StoreError

        now = time.monotonic()
        seen = self._seen.get(digest)
        if seen is not None and now - seen[0] < FRESH_S:
            return seen[1]
        try:
            try:
                record = await asyncio.to_thread(self._fetch, digest)
            except StoreError:
                # a connection the server closed (say, it restarted) fails once; the store reconnects on the next call
                record = await asyncio.to_thread(self._fetch, digest)
        except StoreError:
            if seen is not None and now - seen[0] < STALE_OK_S:
                return seen[1]
            raise
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[digest] = (now, record)
        return record


def _virtual_key_answer(record, team) -> web.Response:
    from authsvc.store import utcnow
    from proxycore.quota import KeyPolicy

    now = utcnow()
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
    headers = {"X-Key-Id": record.key_id, "X-Key-Policy": policy.to_header()}
    if record.team_id and _TEAM_ID_OK.fullmatch(record.team_id):
        headers["X-Team"] = record.team_id
    return web.Response(status=204, headers=headers)


async def auth(request: web.Request) -> web.Response:
    header = request.headers.get("Authorization")
    if header is None or len(header) > _MAX_HEADER or header[:7].lower() != _SCHEME:
        return web.Response(status=401)
    token = header[7:].strip()
    if not token:
        return web.Response(status=401)
    # aiohttp decodes header bytes with surrogateescape; this gives back the bytes the client sent
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    known = request.app[KEYS].index.keys.get(digest)
    if known is not None and hmac.compare_digest(known.sha256, digest):
        return web.Response(status=204, headers=known.headers)
    virtual = request.app.get(VIRTUAL)
    if virtual is None:
        return web.Response(status=401)
    from authsvc.store import StoreError

    try:
        found = await virtual.lookup(digest)
    except StoreError:
        # nginx turns this into a JSON 503 that says the key database is unreachable
        return web.Response(status=503, headers={"X-Gw-Error": "db_unavailable"})
    if found is None or not hmac.compare_digest(found[0].token_hash, digest):
        return web.Response(status=401)
    return _virtual_key_answer(*found)


async def health(request: web.Request) -> web.Response:
    store = request.app[KEYS]
    index = store.index
    body = {"status": "ok", "teams": index.teams, "keys": len(index.keys), "teams_file": store.path}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def make_auth_app(teams_path: str, database_url: str | None = None) -> web.Application:
    """The authsvc app over one teams.yaml (and the key DB in DB mode); raises ConfigError when the file does not load."""
    store = KeyStore(teams_path)
    app = web.Application()
    app[KEYS] = store
    if database_url:
        app.cleanup_ctx.append(_open_key_database(database_url))
    app.router.add_route("*", "/auth", auth)
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(_watch_teams_file)
    return app


def _open_key_database(url: str):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from authsvc.store import Store, StoreUnavailable

        store = None
        while store is None:  # a database that is not up yet: keep trying, static keys already work
            try:
                store = await asyncio.to_thread(Store.open, url)
            except StoreUnavailable as exc:
                print(f"llmgate: authsvc: key database unavailable ({exc}); retrying in 2 s", file=sys.stderr, flush=True)
                await asyncio.sleep(2)
        app[VIRTUAL] = VirtualKeys(store)
        yield
        await asyncio.to_thread(store.close)

    return ctx


async def _watch_teams_file(app: web.Application) -> AsyncIterator[None]:
    store = app[KEYS]
    stop = asyncio.Event()
    task = asyncio.create_task(store.watch(stop))
    await asyncio.sleep(0)  # the watcher registers with the OS on its first step
    await store.reload()  # a change made before the watcher started
    yield
    stop.set()
    try:
        await asyncio.wait_for(task, 2.0)
    except asyncio.TimeoutError:
        pass  # wait_for cancelled it


def run_authsvc(args: argparse.Namespace) -> int:
    try:
        database_url = None
        if getattr(args, "config", None):
            from controller.config import load_proxy_config

            database_url = load_proxy_config(args.config).database_url
        app = make_auth_app(args.teams, database_url)
    except ConfigError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    listen = app[KEYS].index.auth_listen
    host = args.host if args.host is not None else listen.host
    port = args.port if args.port is not None else listen.port

    import uvloop

    return uvloop.run(_serve(app, host, port))


async def _serve(app: web.Application, host: str, port: int) -> int:
    store = app[KEYS]
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        print(f"llmgate: authsvc cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        await runner.cleanup()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, store.reload_soon, True)
    port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
    shown = f"[{host}]" if ":" in host else host
    index = store.index
    print(f"llmgate authsvc listening on http://{shown}:{port} ({store.path}: {index.teams} teams, "
          f"{len(index.keys)} keys)", flush=True)
    await stop.wait()
    await runner.cleanup()
    return 0
