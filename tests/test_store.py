"""DB mode's store: migrations, keys, teams, spend and budgets, on real SQLite files and the local PostgreSQL.

PostgreSQL runs at LLMGATE_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test);
each test gets its own schema, dropped afterwards. When the server is not reachable the tests fail
(CI provides it); they are never skipped.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from authsvc.keydb.records import Conflict, MigrationError, StoreUnavailable, parse_duration
from authsvc.keydb.store import MIGRATIONS_DIR, Store
from controller.model.config import parse_database_url
from support import PG_URL, database, postgres_schema

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def store(db_url) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def tables(url: str) -> set[str]:
    """The tables of a database, read without the store."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
    import psycopg

    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
                                           "c.relnamespace WHERE n.nspname = current_schema()")}


def all_stored_text(url: str) -> str:
    """Every value of every llmgate table, as text, to look for things that must not be stored."""
    names = ("llmgate_keys", "llmgate_teams", "llmgate_spend_logs", "llmgate_schema_migrations")
    if url.startswith("sqlite:"):
        path = url[len("sqlite:///"):]
        with sqlite3.connect(path) as conn:
            rows = [r for n in names for r in conn.execute(f"SELECT * FROM {n}")]
        raw = b"".join(Path(p).read_bytes() for p in (path, path + "-wal") if Path(p).exists())
        return repr(rows) + raw.decode("latin-1")
    import psycopg

    with psycopg.connect(url) as conn:
        return repr([r for n in names for r in conn.execute(f"SELECT * FROM {n}")])


# ---------------------------------------------------------------- URLs and durations

def test_database_urls_are_checked_before_anything_connects(tmp_path):
    assert parse_database_url("sqlite:///llmgate.db").target == "llmgate.db"
    assert parse_database_url("sqlite:////var/lib/llmgate/llmgate.db").target == "/var/lib/llmgate/llmgate.db"
    assert parse_database_url("postgres://u:pw@db:5432/llm").kind == "postgresql"
    for bad in ("", "mysql://u@h/db", "sqlite://", "sqlite:///", "sqlite://host/x.db", "sqlite:///:memory:",
                "postgresql://u@h:notaport/db", "postgresql:///db"):
        with pytest.raises(StoreUnavailable, match="database_url"):
            Store.open(bad)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        Store.open(f"sqlite:///{tmp_path}/no/such/dir/llmgate.db")


def test_an_unreachable_postgres_is_a_clear_error_without_the_password():
    with pytest.raises(StoreUnavailable) as err:
        Store.open("postgresql://llmgate:s3cret-pw@127.0.0.1:1/llmgate")
    assert "cannot connect to PostgreSQL" in str(err.value)
    assert "127.0.0.1:1/llmgate" in str(err.value)
    assert "s3cret-pw" not in str(err.value)


def test_durations_follow_litellm():
    assert parse_duration("30s").after(T0) == T0 + timedelta(seconds=30)
    assert parse_duration("10m").after(T0) == T0 + timedelta(minutes=10)
    assert parse_duration("1h").after(T0) == T0 + timedelta(hours=1)
    assert parse_duration("7d").after(T0) == T0 + timedelta(days=7)
    assert parse_duration("2w").after(T0) == T0 + timedelta(days=14)
    jan31 = datetime(2027, 1, 31, tzinfo=UTC)
    assert parse_duration("1mo").after(jan31) == datetime(2027, 2, 28, tzinfo=UTC)
    for bad in ("", "0d", "7", "d", "7 days", "1y", "-1h", "1.5h", "30min"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


# ---------------------------------------------------------------- migrations

def test_migrations_apply_once(db_url):
    first = Store.open(db_url)
    raw, key = first.generate_key(key_alias="survives")
    assert first.applied_migrations() == ["0001_init.sql"]
    second = Store.open(db_url)  # a second process starting: nothing is applied twice
    assert second.migrate() == []
    assert second.applied_migrations() == ["0001_init.sql"]
    assert second.key_by_hash(key.token_hash).key_alias == "survives"
    first.close()
    second.close()


def test_concurrent_opens_apply_each_migration_once(db_url):
    errors: list[BaseException] = []
    stores: list[Store] = []

    def open_store() -> None:
        try:
            stores.append(Store.open(db_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert stores[0].applied_migrations() == ["0001_init.sql"]
    for s in stores:
        s.close()


def test_a_failing_migration_leaves_no_partial_schema(db_url, tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    shutil.copy(MIGRATIONS_DIR / "0001_init.sql", migrations)
    broken = migrations / "0002_add_things.sql"
    broken.write_text("CREATE TABLE llmgate_half (a TEXT);\n"
                      "CREATE INDEX llmgate_half_by_a ON llmgate_half (a);\n"
                      "ALTER TABLE llmgate_keys ADD COLUMN note TEXT;\n"
                      "CREATE TABLE llmgate_broken (a TEXT,);\n")
    with pytest.raises(MigrationError, match=r"0002_add_things\.sql") as err:
        Store.open(db_url, migrations_dir=migrations)
    assert "rolled back" in str(err.value)
    present = tables(db_url)
    assert "llmgate_keys" in present  # 0001 is whole
    assert "llmgate_half" not in present and "llmgate_half_by_a" not in present
    store = Store.open(db_url)  # the shipped migrations: the database is usable, 0002 was never recorded
    assert store.applied_migrations() == ["0001_init.sql"]
    _, key = store.generate_key()
    assert store.key_by_hash(key.token_hash) is not None  # llmgate_keys has no half-added column
    store.close()

    broken.write_text("CREATE TABLE llmgate_half (a TEXT);\nALTER TABLE llmgate_keys ADD COLUMN note TEXT;\n")
    fixed = Store.open(db_url, migrations_dir=migrations)
    assert fixed.applied_migrations() == ["0001_init.sql", "0002_add_things.sql"]
    assert "llmgate_half" in tables(db_url)
    assert Store.open(db_url, migrations_dir=migrations).migrate(migrations) == []
    fixed.close()


def test_two_migrations_with_one_version_are_refused(db_url, tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    shutil.copy(MIGRATIONS_DIR / "0001_init.sql", migrations)
    (migrations / "0001_other.sql").write_text("CREATE TABLE llmgate_other (a TEXT);")
    with pytest.raises(MigrationError, match="share a version"):
        Store.open(db_url, migrations_dir=migrations)


# ---------------------------------------------------------------- keys and teams

def test_keys_are_stored_as_hashes_only(store, db_url):
    raw, key = store.generate_key(models=["llama-3.1-8b-instruct"], rpm_limit=60, tpm_limit=100_000,
                                  max_parallel_requests=4, max_budget=10.0, key_alias="ci-bot",
                                  metadata={"owner": "alice"})
    assert raw.startswith("sk-") and len(raw) > 40
    assert key.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert key.key_name == f"sk-...{raw[-4:]}"
    assert key.key_id == key.token_hash[:12]
    assert raw not in all_stored_text(db_url)
    info = store.key_by_hash(key.token_hash).to_info()
    assert raw not in repr(info)
    assert info["token"] == key.token_hash
    assert info["models"] == ["llama-3.1-8b-instruct"]
    assert (info["rpm_limit"], info["tpm_limit"], info["max_parallel_requests"]) == (60, 100_000, 4)
    assert info["metadata"] == {"owner": "alice"} and info["blocked"] is False and info["expires"] is None
    raw2, key2 = store.generate_key()
    assert raw2 != raw and key2.token_hash != key.token_hash


def test_key_crud(store):
    store.new_team(team_id="team-a", team_alias="Team A", models=["m1"], max_budget=100.0, rpm_limit=600)
    _, key = store.generate_key(team_id="team-a", key_alias="one", now=T0)
    assert key.models == () and key.allows_model("anything")

    updated = store.update_key(key.token_hash, models=["m1", "m2"], key_alias="renamed", duration="7d", now=T0)
    assert updated.models == ("m1", "m2") and not updated.allows_model("m3")
    assert updated.key_alias == "renamed"
    assert updated.expires == T0 + timedelta(days=7)
    assert store.update_key(key.token_hash, duration=None).expires is None
    assert store.update_key("0" * 64, key_alias="x") is None
    with pytest.raises(TypeError, match="user_id"):
        store.update_key(key.token_hash, user_id="bob")

    _, other = store.generate_key(key_alias="taken")
    with pytest.raises(Conflict):
        store.generate_key(key_alias="taken")
    with pytest.raises(Conflict):
        store.update_key(key.token_hash, key_alias="taken")

    assert store.set_blocked(key.token_hash, True).blocked
    assert store.key_by_hash(key.token_hash).unusable_reason(T0) == "blocked"
    assert store.set_blocked(key.token_hash, False).is_usable(T0)

    assert store.delete_keys([key.token_hash, key.token_hash, "f" * 64]) == 1
    assert store.key_by_hash(key.token_hash) is None
    assert store.key_by_hash(other.token_hash) is not None


def test_key_list_pages(store):
    store.new_team(team_id="team-a")
    made = [store.generate_key(team_id="team-a" if i % 2 else None, key_alias=f"k{i}",
                               now=T0 + timedelta(seconds=i))[1] for i in range(7)]
    page1, total = store.list_keys(1, 3)
    assert total == 7 and [k.key_alias for k in page1] == ["k6", "k5", "k4"]  # newest first
    assert [k.key_alias for k in store.list_keys(3, 3)[0]] == ["k0"]
    assert store.list_keys(4, 3) == ([], 7)
    team_keys, team_total = store.list_keys(1, 10, team_id="team-a")
    assert team_total == 3 and {k.key_alias for k in team_keys} == {"k1", "k3", "k5"}
    for page, size in ((0, 10), (1, 0), (1, 1001)):
        with pytest.raises(ValueError):
            store.list_keys(page, size)
    assert len(made) == 7


def test_teams(store):
    team = store.new_team(team_id="research", team_alias="Research", models=["m"], max_budget=5.0,
                           budget_duration="30d", rpm_limit=10, tpm_limit=1000, metadata={"cost_center": 7}, now=T0)
    assert team.budget_reset_at == T0 + timedelta(days=30)
    generated = store.new_team(team_alias="no id given")
    assert uuid.UUID(generated.team_id)
    with pytest.raises(Conflict):
        store.new_team(team_id="research")
    assert [t.team_id for t in store.list_teams()] == sorted(["research", generated.team_id])
    info = store.team_by_id("research").to_info()
    assert info["models"] == ["m"] and info["metadata"] == {"cost_center": 7} and info["spend"] == 0.0
    assert store.team_by_id("nobody") is None


def test_key_usability(store):
    _, expiring = store.generate_key(duration="30s", now=T0)
    assert expiring.is_usable(T0 + timedelta(seconds=29))
    assert expiring.unusable_reason(T0 + timedelta(seconds=30)) == "expired"
    _, budgeted = store.generate_key(max_budget=0.5)
    store.record_spend([{"request_id": "r-1", "key_hash": budgeted.token_hash, "spend": 0.5}])
    assert store.key_by_hash(budgeted.token_hash).unusable_reason(datetime.now(UTC)) == "budget_exceeded"
    _, blocked = store.generate_key(blocked=True)
    assert blocked.unusable_reason(T0) == "blocked"


# ---------------------------------------------------------------- spend

def test_spend_is_recorded_once_per_request(store):
    store.new_team(team_id="team-a")
    _, key = store.generate_key(team_id="team-a")
    entries = [{"request_id": f"req-{i}", "key_hash": key.token_hash, "team_id": "team-a", "model": "m",
                "prompt_tokens": 10, "completion_tokens": 5, "spend": 0.25, "status": 200,
                "start_time": (T0 + timedelta(minutes=i)).isoformat()} for i in range(4)]
    assert store.record_spend(entries) == 4
    assert store.record_spend(entries) == 0  # replayed: nothing changes
    assert store.record_spend(entries[:1] + [{**entries[1], "request_id": "req-new"}]) == 1
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(1.25)
    assert store.team_by_id("team-a").spend == pytest.approx(1.25)

    logs = store.spend_logs(api_key_hash=key.token_hash)
    assert len(logs) == 5 and logs[0].total_tokens == 15
    assert logs[0].to_info()["api_key"] == key.token_hash
    window = store.spend_logs(start=T0 + timedelta(minutes=1), end=T0 + timedelta(minutes=3))
    assert sorted(r.request_id for r in window) == ["req-1", "req-2", "req-new"]
    assert len(store.spend_logs(team_id="team-a", limit=2)) == 2
    assert len(store.spend_logs(team_id="team-a", limit=2, offset=4)) == 1
    assert store.spend_logs(team_id="nobody") == []
    assert store.latest_spend_time() == T0 + timedelta(minutes=3)
    with pytest.raises(ValueError, match="request_id"):
        store.record_spend([{"spend": 1.0}])
    with pytest.raises(ValueError):
        store.spend_logs(limit=0)


def test_concurrent_writers_count_each_request_once(store):
    _, key = store.generate_key()
    entries = [{"request_id": f"c-{i}", "key_hash": key.token_hash, "spend": 0.01} for i in range(50)]
    errors: list[BaseException] = []

    def write() -> None:
        try:
            store.record_spend(entries)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(0.5)


def test_budget_resets_when_its_period_ends(store):
    store.new_team(team_id="team-a", max_budget=3.0, budget_duration="1d", now=T0)
    _, key = store.generate_key(team_id="team-a", max_budget=1.0, budget_duration="1d", now=T0)
    assert key.budget_reset_at == T0 + timedelta(days=1)
    hour = timedelta(hours=1)
    store.record_spend([{"request_id": "day1", "key_hash": key.token_hash, "team_id": "team-a", "spend": 1.0,
                         "start_time": T0 + hour}], now=T0 + hour)
    spent = store.key_by_hash(key.token_hash)
    assert spent.unusable_reason(T0 + 2 * hour) == "budget_exceeded"
    assert spent.is_usable(T0 + 25 * hour)  # the period ended, even before the store reset it

    store.record_spend([{"request_id": "day2", "key_hash": key.token_hash, "team_id": "team-a", "spend": 0.25,
                         "start_time": T0 + 25 * hour},
                        # a late entry from the previous period: logged, but not charged to the new period
                        {"request_id": "late", "key_hash": key.token_hash, "team_id": "team-a", "spend": 0.5,
                         "start_time": T0 + 23 * hour}], now=T0 + 25 * hour)
    reset = store.key_by_hash(key.token_hash)
    assert reset.spend == pytest.approx(0.25)
    assert reset.budget_reset_at == T0 + timedelta(days=2)
    assert store.team_by_id("team-a").spend == pytest.approx(0.25)
    assert {r.request_id for r in store.spend_logs()} == {"day1", "day2", "late"}

    # Several periods later, with no traffic: reset_budgets catches up to the current period.
    assert store.reset_budgets(now=T0 + timedelta(days=5, hours=3)) == 2
    idle = store.key_by_hash(key.token_hash)
    assert idle.spend == 0 and idle.budget_reset_at == T0 + timedelta(days=6)
    assert store.reset_budgets(now=T0 + timedelta(days=5, hours=4)) == 0

    monthly = store.update_key(key.token_hash, budget_duration="1mo", now=datetime(2027, 1, 31, tzinfo=UTC))
    assert monthly.budget_reset_at == datetime(2027, 2, 28, tzinfo=UTC)


def test_spend_without_a_budget_period_accumulates(store):
    _, key = store.generate_key(max_budget=100.0)
    store.record_spend([{"request_id": "a", "key_hash": key.token_hash, "spend": 1.5, "start_time": T0}])
    store.record_spend([{"request_id": "b", "key_hash": key.token_hash, "spend": 2.5,
                         "start_time": T0 + timedelta(days=400)}])
    assert store.key_by_hash(key.token_hash).spend == pytest.approx(4.0)
    # Entries for keys or teams the database does not know are still logged.
    assert store.record_spend([{"request_id": "c", "key_hash": "e" * 64, "team_id": "ghost", "spend": 1.0}]) == 1


# ---------------------------------------------------------------- the database going away

def test_a_lost_postgres_connection_is_reported_then_replaced(tmp_path):
    import psycopg

    with postgres_schema() as (url, schema):
        store = Store.open(url)
        _, key = store.generate_key()
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE application_name = %s", (schema,)).fetchall()
        assert killed
        with pytest.raises(StoreUnavailable):
            store.key_by_hash(key.token_hash)
        assert store.key_by_hash(key.token_hash) is not None  # a new connection
        store.close()


def test_a_locked_sqlite_file_is_unavailable_not_a_crash(tmp_path):
    url = f"sqlite:///{tmp_path / 'llmgate.db'}"
    store = Store.open(url)
    _, key = store.generate_key()
    holder = sqlite3.connect(tmp_path / "llmgate.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    import authsvc.keydb.backends as store_module

    original = store_module._SQLITE_BUSY_MS
    try:
        store_module._SQLITE_BUSY_MS = 200
        fresh = Store(store_module.SqliteBackend(parse_database_url(url)))
        with pytest.raises(StoreUnavailable, match="locked"):
            fresh.record_spend([{"request_id": "x", "key_hash": key.token_hash, "spend": 1.0}])
    finally:
        store_module._SQLITE_BUSY_MS = original
        holder.execute("ROLLBACK")
        holder.close()
    assert store.record_spend([{"request_id": "x", "key_hash": key.token_hash, "spend": 1.0}]) == 1
    store.close()
