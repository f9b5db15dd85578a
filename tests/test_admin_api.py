"""DB mode's admin API: LiteLLM-shaped /key, /team and /spend routes over real HTTP on loopback.

The routes are mounted on a bare aiohttp app with a master key, over a real SQLite file and the
local PostgreSQL (see test_store.py); also the spend writer and the usage-log replay.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from authsvc.keydb.records import StoreUnavailable
from authsvc.keydb.store import Store
from authsvc.spend import SpendWriter, replay_usage_log, spend_writer_ctx
from support import MASTER, admin_app, database, http, serve


class Admin:
    def __init__(self, base: str, store: Store):
        self.base, self.store = base, store

    def call(self, method: str, path: str, body=None, key: str | None = MASTER, raw: bytes | None = None):
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        if raw is not None:
            headers["Content-Type"] = "application/json"
        return http(method, self.base + path, raw if raw is not None else body, headers)

    def ok(self, method: str, path: str, body=None):
        r = self.call(method, path, body)
        assert r.status == 200, (path, r.status, r.text)
        return r.json()


@pytest.fixture(params=["sqlite", "postgresql"])
def admin(request, tmp_path) -> Iterator[Admin]:
    with database(request.param, tmp_path) as url:
        store = Store.open(url)
        with serve(admin_app(store)) as base:
            yield Admin(base, store)
        store.close()


def assert_error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


ENDPOINTS = [("POST", "/key/generate", {}), ("GET", "/key/info?key=sk-x", None), ("POST", "/key/update", {"key": "x"}),
             ("POST", "/key/delete", {"keys": ["x"]}), ("GET", "/key/list", None), ("POST", "/key/block", {"key": "x"}),
             ("POST", "/key/unblock", {"key": "x"}), ("POST", "/team/new", {}), ("GET", "/team/list", None),
             ("GET", "/spend/logs", None)]


def test_every_endpoint_needs_the_master_key(admin):
    for method, path, body in ENDPOINTS:
        for key in (None, "sk-wrong", MASTER + "x", MASTER[:-1], ""):
            assert_error(admin.call(method, path, body, key=key), 401, "invalid_api_key")
        r = http(method, admin.base + path, body, {"Authorization": f"Basic {MASTER}"})
        assert_error(r, 401, "invalid_api_key")
    assert admin.store.list_keys(1, 10) == ([], 0)  # nothing was created on the way


def test_without_a_master_key_the_api_is_closed(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'llmgate.db'}")
    with serve(admin_app(store, master=None)) as base:
        assert_error(http("POST", base + "/key/generate", {}, {"Authorization": "Bearer "}), 401)
        assert_error(http("POST", base + "/key/generate", {}, {"Authorization": "Bearer None"}), 401)
    with serve(admin_app(None)) as base:
        r = http("GET", base + "/key/list", None, {"Authorization": f"Bearer {MASTER}"})
        assert_error(r, 503, "database_unavailable")
    store.close()


def test_key_lifecycle(admin):
    team = admin.ok("POST", "/team/new", {"team_id": "team-a", "team_alias": "Team A", "max_budget": 50})
    assert team["team_id"] == "team-a" and team["spend"] == 0.0
    created = admin.ok("POST", "/key/generate", {
        "models": ["llama-3.1-8b-instruct"], "rpm_limit": 60, "tpm_limit": 10000, "max_parallel_requests": 2,
        "max_budget": 5.5, "budget_duration": "30d", "duration": "7d", "team_id": "team-a", "key_alias": "ci-bot",
        "metadata": {"owner": "alice"}})
    raw = created["key"]
    token = hashlib.sha256(raw.encode()).hexdigest()
    assert raw.startswith("sk-")
    assert created["token"] == token and created["key_name"] == f"sk-...{raw[-4:]}"
    assert created["duration"] == "7d" and created["budget_duration"] == "30d"
    expires = datetime.fromisoformat(created["expires"])
    assert timedelta(days=6, hours=23) < expires - datetime.now(UTC) <= timedelta(days=7)
    assert (created["models"], created["rpm_limit"], created["tpm_limit"], created["max_parallel_requests"],
            created["max_budget"], created["team_id"], created["key_alias"], created["metadata"]) == \
        (["llama-3.1-8b-instruct"], 60, 10000, 2, 5.5, "team-a", "ci-bot", {"owner": "alice"})

    for ref in (raw, token):  # the raw key or LiteLLM's hashed `token`
        info = admin.ok("GET", f"/key/info?key={ref}")
        assert info["key"] == ref and info["info"]["token"] == token and info["info"]["spend"] == 0.0
        assert raw not in repr(info["info"])

    updated = admin.ok("POST", "/key/update", {"key": raw, "models": [], "rpm_limit": None, "key_alias": "ci-bot-2",
                                               "metadata": {"owner": "bob"}, "spend": 1.25})
    assert updated["key"] == raw and updated["models"] == [] and updated["rpm_limit"] is None
    assert updated["key_alias"] == "ci-bot-2" and updated["metadata"] == {"owner": "bob"} and updated["spend"] == 1.25
    assert updated["tpm_limit"] == 10000  # fields not given stay

    assert admin.ok("POST", "/key/block", {"key": raw})["blocked"] is True
    assert admin.store.key_by_hash(token).unusable_reason(datetime.now(UTC)) == "blocked"
    assert admin.ok("POST", "/key/unblock", {"key": token})["blocked"] is False

    assert admin.ok("GET", "/key/list?return_full_object=true")["keys"][0]["key_alias"] == "ci-bot-2"
    assert admin.ok("POST", "/key/delete", {"keys": [raw]}) == {"deleted_keys": [raw]}
    assert_error(admin.call("GET", f"/key/info?key={raw}"), 404, "key_not_found")


def test_malformed_bodies_are_400(admin):
    cases = [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b'{"models": "llama"}', "models", None),
        (b'{"models": [""]}', "models", None),
        (b'{"models": [1]}', "models", None),
        (b'{"rpm_limit": -1}', "rpm_limit", None),
        (b'{"rpm_limit": 1.5}', "rpm_limit", None),
        (b'{"tpm_limit": true}', "tpm_limit", None),
        (b'{"max_parallel_requests": "2"}', "max_parallel_requests", None),
        (b'{"max_budget": "ten"}', "max_budget", None),
        (b'{"max_budget": -0.01}', "max_budget", None),
        (b'{"duration": "7 days"}', "duration", None),
        (b'{"budget_duration": "1y"}', "budget_duration", None),
        (b'{"key_alias": ""}', "key_alias", None),
        (b'{"key_alias": 7}', "key_alias", None),
        (b'{"metadata": []}', "metadata", None),
        (b'{"team_id": "a b"}', "team_id", None),
        (b'{"team_id": "no-such-team"}', "team_id", "team_not_found"),
        (b'{"user_id": "bob"}', "user_id", "unsupported_field"),
        (b'{"blocked": "yes"}', "blocked", None),
    ]
    for raw, param, code in cases:
        error = assert_error(admin.call("POST", "/key/generate", raw=raw), 400, code, param)
        assert error["type"] == "invalid_request_error"
    assert admin.store.list_keys(1, 10) == ([], 0)

    _, key = admin.store.generate_key(key_alias="taken")
    assert_error(admin.call("POST", "/key/generate", {"key_alias": "taken"}), 400, "key_alias_exists", "key_alias")
    assert_error(admin.call("POST", "/key/update", {"models": []}), 400, None, "key")
    assert_error(admin.call("POST", "/key/update", {"key": 5}), 400, None, "key")
    assert_error(admin.call("POST", "/key/update", {"key": key.token_hash, "rpm_limit": "x"}), 400, None, "rpm_limit")
    assert_error(admin.call("POST", "/key/update", {"key": key.token_hash, "team_id": "ghost"}), 400, "team_not_found")
    assert_error(admin.call("POST", "/key/delete", {"keys": []}), 400, None, "keys")
    assert_error(admin.call("POST", "/key/delete", {"keys": "sk-x"}), 400, None, "keys")
    assert_error(admin.call("POST", "/key/delete", {"keys": [key.token_hash], "all": True}), 400, "unsupported_field")
    assert_error(admin.call("POST", "/key/block", {}), 400, None, "key")
    assert_error(admin.call("POST", "/key/block", raw=b"null"), 400, "invalid_json")
    assert_error(admin.call("GET", "/key/info"), 400, None, "key")
    assert_error(admin.call("POST", "/team/new", {"team_id": "bad id!"}), 400, None, "team_id")
    assert_error(admin.call("POST", "/team/new", {"members": []}), 400, "unsupported_field", "members")
    admin.ok("POST", "/team/new", {"team_id": "dup"})
    assert_error(admin.call("POST", "/team/new", {"team_id": "dup"}), 400, "team_exists")
    assert admin.store.key_by_hash(key.token_hash).key_alias == "taken"


def test_unknown_keys_are_404(admin):
    _, kept = admin.store.generate_key()
    ghost = "sk-never-issued-0000"
    assert_error(admin.call("GET", f"/key/info?key={ghost}"), 404, "key_not_found")
    assert_error(admin.call("GET", f"/key/info?key={'0' * 64}"), 404, "key_not_found")
    assert_error(admin.call("POST", "/key/update", {"key": ghost, "rpm_limit": 5}), 404, "key_not_found")
    assert_error(admin.call("POST", "/key/block", {"key": ghost}), 404, "key_not_found")
    assert_error(admin.call("POST", "/key/unblock", {"key": ghost}), 404, "key_not_found")
    error = assert_error(admin.call("POST", "/key/delete", {"keys": [kept.token_hash, ghost]}), 404, "key_not_found")
    assert ghost not in error["message"]
    assert admin.store.key_by_hash(kept.token_hash) is not None  # all or nothing


def test_key_list_pages_are_bounded(admin):
    admin.store.new_team(team_id="team-a")
    for i in range(12):
        admin.store.generate_key(key_alias=f"k{i:02}", team_id="team-a" if i < 4 else None,
                                 now=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i))
    first = admin.ok("GET", "/key/list?size=5")
    assert (first["total_count"], first["current_page"], first["total_pages"]) == (12, 1, 3)
    assert len(first["keys"]) == 5 and all(len(k) == 64 for k in first["keys"])  # hashes, as LiteLLM lists them
    last = admin.ok("GET", "/key/list?size=5&page=3&return_full_object=true")
    assert [k["key_alias"] for k in last["keys"]] == ["k01", "k00"]
    assert admin.ok("GET", "/key/list?size=5&page=4")["keys"] == []
    assert admin.ok("GET", "/key/list")["keys"].__len__() == 10  # LiteLLM's default size
    assert admin.ok("GET", "/key/list?size=100")["total_count"] == 12
    assert admin.ok("GET", "/key/list?team_id=team-a")["total_count"] == 4
    for query, param in (("size=0", "size"), ("size=101", "size"), ("size=-1", "size"), ("size=ten", "size"),
                         ("page=0", "page"), ("page=1.5", "page"), ("return_full_object=maybe", "return_full_object"),
                         ("team_id=%20", "team_id")):
        assert_error(admin.call("GET", f"/key/list?{query}"), 400, None, param)


def test_teams(admin):
    made = admin.ok("POST", "/team/new", {"team_id": "research", "team_alias": "Research", "models": ["m1"],
                                          "max_budget": 20, "budget_duration": "30d", "rpm_limit": 100,
                                          "tpm_limit": 50000, "metadata": {"cc": 1}})
    assert made["budget_reset_at"] is not None and made["models"] == ["m1"]
    generated = admin.ok("POST", "/team/new", {})
    listed = admin.ok("GET", "/team/list")
    assert {t["team_id"] for t in listed} == {"research", generated["team_id"]}
    assert next(t for t in listed if t["team_id"] == "research")["max_budget"] == 20.0


def test_spend_logs(admin):
    admin.store.new_team(team_id="team-a")
    raw, key = admin.store.generate_key(team_id="team-a")
    _, other = admin.store.generate_key()
    day = datetime(2026, 11, 24, tzinfo=UTC)
    admin.store.record_spend(
        [{"request_id": f"a-{i}", "key_hash": key.token_hash, "team_id": "team-a", "model": "m",
          "prompt_tokens": 3, "completion_tokens": 4, "spend": 0.5, "status": 200,
          "start_time": day + timedelta(hours=i * 12)} for i in range(4)]
        + [{"request_id": "b-0", "key_hash": other.token_hash, "spend": 9.0, "start_time": day}])
    everything = admin.ok("GET", "/spend/logs")
    assert len(everything) == 5
    row = next(r for r in everything if r["request_id"] == "a-0")
    assert row == {"request_id": "a-0", "api_key": key.token_hash, "team_id": "team-a", "model": "m",
                   "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "spend": 0.5, "status": 200,
                   "startTime": day.isoformat()}
    assert {r["request_id"] for r in admin.ok("GET", f"/spend/logs?api_key={raw}")} == {"a-0", "a-1", "a-2", "a-3"}
    assert len(admin.ok("GET", f"/spend/logs?api_key={other.token_hash}")) == 1
    assert len(admin.ok("GET", "/spend/logs?team_id=team-a")) == 4
    # an end date includes its whole day
    assert {r["request_id"] for r in admin.ok("GET", "/spend/logs?start_date=2026-11-24&end_date=2026-11-24")} \
        == {"a-0", "a-1", "b-0"}
    assert {r["request_id"] for r in admin.ok("GET", "/spend/logs?start_date=2026-11-25T00:00:00Z")} == {"a-2", "a-3"}
    assert len(admin.ok("GET", "/spend/logs?page_size=2")) == 2
    assert len(admin.ok("GET", "/spend/logs?page_size=2&page=3")) == 1
    for query, param in (("page_size=0", "page_size"), ("page_size=1001", "page_size"), ("page=0", "page"),
                         ("start_date=yesterday", "start_date"), ("end_date=2026-13-01", "end_date"),
                         ("start_date=2026-11-25&end_date=2026-11-24", "end_date")):
        assert_error(admin.call("GET", f"/spend/logs?{query}"), 400, None, param)


def test_a_database_outage_is_503(admin, monkeypatch):
    def down(*_args, **_kwargs):
        raise StoreUnavailable("postgresql://db:5432/llmgate: connection refused")

    monkeypatch.setattr(admin.store, "list_keys", down)
    monkeypatch.setattr(admin.store, "generate_key", down)
    assert_error(admin.call("GET", "/key/list"), 503, "database_unavailable")
    error = assert_error(admin.call("POST", "/key/generate", {}), 503, "database_unavailable")
    assert "db:5432" not in error["message"]


# ---------------------------------------------------------------- spend writer and usage-log replay

class FlakyStore:
    """A real store whose record_spend fails while `down` is set, as when the database is unreachable."""

    def __init__(self, store: Store):
        self.store, self.down, self.calls = store, False, 0

    def record_spend(self, entries, now=None):
        self.calls += 1
        if self.down:
            raise StoreUnavailable("database unreachable")
        return self.store.record_spend(entries, now)

    def reset_budgets(self, now=None):
        return self.store.reset_budgets(now)


async def test_spend_writer_batches_and_keeps_entries_while_the_database_is_down(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'llmgate.db'}")
    _, key = store.generate_key()
    flaky = FlakyStore(store)
    writer = SpendWriter(flaky, interval=0.05, max_pending=50)
    task = asyncio.create_task(writer.run())
    for i in range(10):
        writer.add({"request_id": f"r-{i}", "key_hash": key.token_hash, "spend": 0.1})
    await _until(lambda: writer.pending == 0)
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(1.0)
    assert flaky.calls <= 3  # batched, not one write per entry

    flaky.down = True
    for i in range(10, 70):
        writer.add({"request_id": f"r-{i}", "key_hash": key.token_hash, "spend": 0.1})
    await asyncio.sleep(0.3)
    assert writer.pending == 50 and writer.dropped == 10  # bounded: the oldest went first
    flaky.down = False
    await _until(lambda: writer.pending == 0)
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(6.0)
    assert len(store.spend_logs(limit=1000)) == 60

    writer.add({"request_id": "r-first", "key_hash": key.token_hash, "spend": 0.25})
    writer.add({"request_id": "bad", "spend": "lots"})  # the store refuses it: only it is dropped
    writer.add({"request_id": "r-last", "key_hash": key.token_hash, "spend": 0.25})
    await _until(lambda: writer.pending == 0)
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(6.5)
    assert writer.dropped == 11 and "bad" not in {r.request_id for r in store.spend_logs(limit=1000)}

    writer.add({"request_id": "at-shutdown", "key_hash": key.token_hash, "spend": 1.0})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(7.5)  # flushed on the way out
    store.close()


async def test_spend_writer_runs_with_the_app(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'llmgate.db'}")
    writer = SpendWriter(store, interval=60)
    app = web.Application()
    app.cleanup_ctx.append(spend_writer_ctx(writer))
    runner = web.AppRunner(app)
    await runner.setup()
    writer.add({"request_id": "only", "spend": 0.25})
    await runner.cleanup()  # long before the first interval: the shutdown flush writes it
    assert [r.request_id for r in store.spend_logs()] == ["only"]
    store.close()


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_replay_usage_log_is_idempotent(kind, tmp_path):
    with database(kind, tmp_path) as url:
        _replay_case(Store.open(url), tmp_path / "usage.jsonl")


def _replay_case(store: Store, path: Path) -> None:
    store.new_team(team_id="team-a")
    _, key = store.generate_key(team_id="team-a")
    _, by_prefix = store.generate_key(team_id="team-a")
    base = {"team": "team-a", "model": "m", "endpoint": "chat", "status": 200, "stream": False,
            "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    lines = [
        {**base, "ts": "2026-11-24T10:00:00.000Z", "request_id": "old", "key_id": "x", "key_hash": key.token_hash,
         "cost": 1.0},
        {**base, "ts": "2026-11-24T12:00:00.000Z", "request_id": "new-1", "key_id": "x", "key_hash": key.token_hash,
         "cost": 0.25},
        {**base, "ts": "2026-11-24T12:00:01.000Z", "request_id": "new-2", "key_id": by_prefix.key_id, "cost": 0.5},
        {**base, "ts": "2026-11-24T12:00:02.000Z", "request_id": "static-team", "team": "team-b", "key_id": "ci-bot",
         "cost": 0.125},
        {**base, "ts": "2026-11-24T12:00:03.000Z", "key_id": "x", "cost": 9.0},  # no request_id
    ]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines) + b"not json\n" + b'{"request_id": "torn')
    assert replay_usage_log(store, path, since="2026-11-24T11:00:00Z") == 3
    assert replay_usage_log(store, path, since="2026-11-24T11:00:00Z") == 0
    assert replay_usage_log(store, path) == 1  # only "old" is new
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(1.25)
    assert store.key_by_hash(by_prefix.token_hash).spend == pytest.approx(0.5)
    assert store.team_by_id("team-a").spend == pytest.approx(1.75)
    rows = {r.request_id: r for r in store.spend_logs()}
    assert set(rows) == {"old", "new-1", "new-2", "static-team"}
    assert rows["static-team"].token_hash is None and rows["new-2"].total_tokens == 30
    store.close()
