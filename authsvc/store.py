"""DB mode's database: virtual keys, teams and spend, in SQLite or PostgreSQL.

`Store.open(url)` checks the URL, connects and applies the migrations in `authsvc/migrations/`.
The API is synchronous; code on an event loop calls it through `asyncio.to_thread`. Every thread
gets its own connection, opened on first use and replaced after the database went away.

Keys are stored as the sha256 hex of the raw key (`token_hash`, LiteLLM's `token`); the raw key
exists only in the answer to `generate_key`. Timestamps are stored as ISO-8601 UTC text with
microseconds, so comparing them as text compares the times.
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import re
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

log = logging.getLogger("llmgate.store")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
MAX_PAGE_SIZE = 1000
_PG_MIGRATION_LOCK = 0x6C6C6D67617465  # "llmgate": one migrating process at a time per server
_SQLITE_BUSY_MS = 5000


class StoreError(Exception):
    """Anything the store refuses or cannot do."""


class StoreUnavailable(StoreError):
    """The database cannot be used now: malformed URL, unreachable server, locked file."""


class MigrationError(StoreError):
    """A migration file failed; nothing of it was applied."""


class Conflict(StoreError):
    """A unique value is taken (key_alias, team_id)."""


# ---------------------------------------------------------------- durations ("30s", "1h", "30d")

_DURATION = re.compile(r"([1-9][0-9]{0,5})(s|m|h|d|w|mo)")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True, slots=True)
class Duration:
    """A LiteLLM duration: a count and a unit (s, m, h, d, w, or mo for calendar months)."""

    text: str
    count: int
    unit: str

    def after(self, t: datetime, times: int = 1) -> datetime:
        if self.unit == "mo":
            return _add_months(t, self.count * times)
        return t + timedelta(seconds=self.count * _SECONDS[self.unit] * times)

    def before(self, t: datetime) -> datetime:
        return self.after(t, -1)

    def next_boundary(self, boundary: datetime, now: datetime) -> datetime:
        """The first of boundary, boundary + self, boundary + 2 * self, ... that is after now."""
        if boundary > now:
            return boundary
        if self.unit == "mo":
            while boundary <= now:
                boundary = self.after(boundary)
            return boundary
        step = self.count * _SECONDS[self.unit]
        return self.after(boundary, int((now - boundary).total_seconds() // step) + 1)


def parse_duration(text: str) -> Duration:
    """"30s", "10m", "1h", "7d", "2w", "1mo" -> Duration; ValueError for anything else."""
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"expected a duration like 30s, 10m, 1h, 7d, 2w or 1mo, got {text!r}")
    return Duration(m.group(0), int(m.group(1)), m.group(2))


def _add_months(t: datetime, months: int) -> datetime:
    index = t.month - 1 + months
    year, month = t.year + index // 12, index % 12 + 1
    return t.replace(year=year, month=month, day=min(t.day, calendar.monthrange(year, month)[1]))


# ---------------------------------------------------------------- time and hashing

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _ts(t: datetime | None) -> str | None:
    return None if t is None else _utc(t).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dt(text: str | None) -> datetime | None:
    return None if text is None else _utc(datetime.fromisoformat(text))


def parse_time(value: datetime | str) -> datetime:
    """A datetime, or ISO-8601 text ("2026-11-24T20:49:40.123Z"); naive times are UTC."""
    return _utc(value if isinstance(value, datetime) else datetime.fromisoformat(value))


def hash_key(raw_key: str) -> str:
    """The sha256 hex of a raw key, the same digest authsvc and nginx compute."""
    return hashlib.sha256(raw_key.encode("utf-8", "surrogateescape")).hexdigest()


def _iso_out(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


# ---------------------------------------------------------------- records

class _Budgeted:
    """What keys and teams share: spend in the budget period, and a model list (empty: every model)."""

    __slots__ = ()

    def spend_at(self, now: datetime) -> float:
        """Spend in the current budget period (0 once its reset time passed, before the store resets it)."""
        return 0.0 if self.budget_reset_at is not None and now >= self.budget_reset_at else self.spend

    def is_usable(self, now: datetime) -> bool:
        return self.unusable_reason(now) is None

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models


@dataclass(frozen=True, slots=True)
class KeyRecord(_Budgeted):
    """One virtual key as stored; never holds the raw key."""

    token_hash: str
    key_name: str
    key_alias: str | None
    team_id: str | None
    models: tuple[str, ...]  # empty: every model (LiteLLM's meaning)
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    max_budget: float | None
    budget_duration: str | None
    budget_reset_at: datetime | None
    spend: float
    expires: datetime | None
    blocked: bool
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def key_id(self) -> str:
        """The short id in X-Key-Id, logs and metrics: the first 12 hex digits of the hash."""
        return self.token_hash[:12]

    def unusable_reason(self, now: datetime) -> str | None:
        """None when the key may be used now, else "blocked", "expired" or "budget_exceeded"."""
        if self.blocked:
            return "blocked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if self.max_budget is not None and self.spend_at(now) >= self.max_budget:
            return "budget_exceeded"
        return None

    def to_info(self) -> dict[str, Any]:
        """LiteLLM's /key/info `info` object; `token` is the hash, as in LiteLLM."""
        return {
            "token": self.token_hash,
            "key_name": self.key_name,
            "key_alias": self.key_alias,
            "team_id": self.team_id,
            "models": list(self.models),
            "spend": self.spend,
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "budget_reset_at": _iso_out(self.budget_reset_at),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "max_parallel_requests": self.max_parallel_requests,
            "expires": _iso_out(self.expires),
            "blocked": self.blocked,
            "metadata": dict(self.metadata),
            "created_at": _iso_out(self.created_at),
            "updated_at": _iso_out(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class TeamRecord(_Budgeted):
    team_id: str
    team_alias: str | None
    models: tuple[str, ...]
    max_budget: float | None
    budget_duration: str | None
    budget_reset_at: datetime | None
    rpm_limit: int | None
    tpm_limit: int | None
    spend: float
    blocked: bool
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    def unusable_reason(self, now: datetime) -> str | None:
        if self.blocked:
            return "blocked"
        if self.max_budget is not None and self.spend_at(now) >= self.max_budget:
            return "budget_exceeded"
        return None

    def to_info(self) -> dict[str, Any]:
        """LiteLLM's team object (/team/new, /team/list)."""
        return {
            "team_id": self.team_id,
            "team_alias": self.team_alias,
            "models": list(self.models),
            "spend": self.spend,
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "budget_reset_at": _iso_out(self.budget_reset_at),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "blocked": self.blocked,
            "metadata": dict(self.metadata),
            "created_at": _iso_out(self.created_at),
            "updated_at": _iso_out(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class SpendLogRecord:
    request_id: str
    token_hash: str | None
    team_id: str | None
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    spend: float
    status: int | None
    start_time: datetime

    def to_info(self) -> dict[str, Any]:
        """A row of LiteLLM's /spend/logs (`api_key` is the key's hash there too)."""
        return {
            "request_id": self.request_id,
            "api_key": self.token_hash,
            "team_id": self.team_id,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "spend": self.spend,
            "status": self.status,
            "startTime": _iso_out(self.start_time),
        }


_KEY_COLUMNS = ("token_hash", "key_name", "key_alias", "team_id", "models", "rpm_limit", "tpm_limit",
                "max_parallel_requests", "max_budget", "budget_duration", "budget_reset_at", "spend", "expires",
                "blocked", "metadata", "created_at", "updated_at")
_TEAM_COLUMNS = ("team_id", "team_alias", "models", "max_budget", "budget_duration", "budget_reset_at", "rpm_limit",
                 "tpm_limit", "spend", "blocked", "metadata", "created_at", "updated_at")
_SPEND_COLUMNS = ("request_id", "token_hash", "team_id", "model", "prompt_tokens", "completion_tokens",
                  "total_tokens", "spend", "status", "start_time")
_KEY_SELECT = f"SELECT {', '.join(_KEY_COLUMNS)} FROM llmgate_keys"
_TEAM_SELECT = f"SELECT {', '.join(_TEAM_COLUMNS)} FROM llmgate_teams"


def _key_from_row(r: tuple) -> KeyRecord:
    return KeyRecord(r[0], r[1], r[2], r[3], tuple(orjson.loads(r[4])), r[5], r[6], r[7], r[8], r[9], _dt(r[10]),
                     float(r[11]), _dt(r[12]), bool(r[13]), orjson.loads(r[14]), _dt(r[15]), _dt(r[16]))


def _team_from_row(r: tuple) -> TeamRecord:
    return TeamRecord(r[0], r[1], tuple(orjson.loads(r[2])), r[3], r[4], _dt(r[5]), r[6], r[7], float(r[8]),
                      bool(r[9]), orjson.loads(r[10]), _dt(r[11]), _dt(r[12]))


def _spend_from_row(r: tuple) -> SpendLogRecord:
    return SpendLogRecord(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), float(r[7]),
                          None if r[8] is None else int(r[8]), _dt(r[9]))


# Fields update_key accepts; `duration` sets `expires` from now, as in LiteLLM.
_KEY_UPDATABLE = frozenset({"key_alias", "team_id", "models", "rpm_limit", "tpm_limit", "max_parallel_requests",
                            "max_budget", "budget_duration", "duration", "spend", "blocked", "metadata"})


# ---------------------------------------------------------------- database URLs and backends

@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    kind: str  # "sqlite" or "postgresql"
    target: str  # the SQLite file path, or the libpq URL
    shown: str  # for messages: no password

    def __str__(self) -> str:
        return self.shown


def parse_database_url(url: str) -> DatabaseUrl:
    """`sqlite:///relative.db`, `sqlite:////absolute/path.db` or `postgresql://user:pw@host:port/db`.

    ValueError, saying what is expected, for anything else (config validation can call this).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("expected a database URL: sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
    url = url.strip()
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ValueError(f"expected sqlite:///relative/path.db or sqlite:////absolute/path.db, got {url!r}")
        path = url[len("sqlite:///"):]
        if path == ":memory:":
            raise ValueError("an in-memory SQLite database is not shared between connections; give a file")
        return DatabaseUrl("sqlite", path, url)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"the port in the database URL is not a number: {_redact(url)}") from None
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"the database URL names no host: {_redact(url)}")
        shown = f"postgresql://{parts.hostname or ''}{f':{port}' if port else ''}{parts.path}"
        return DatabaseUrl("postgresql", url, shown)
    raise ValueError(f"unsupported database URL scheme {scheme!r}: expected sqlite:///PATH or postgresql://...")


def _redact(url: str) -> str:
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)


class _Sqlite:
    placeholder = "?"

    def __init__(self, url: DatabaseUrl):
        self.url = url
        self.path = url.target

    def connect(self) -> sqlite3.Connection:
        parent = Path(self.path).resolve().parent
        if not parent.is_dir():
            raise StoreUnavailable(f"{self.url}: the directory {parent} does not exist")
        try:
            # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=_SQLITE_BUSY_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_MS}")
            conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for the spend writer
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.url}: cannot open the SQLite database: {exc}") from exc
        return conn

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[Any]:
        conn.execute("BEGIN IMMEDIATE")  # takes the write lock now, so read-then-write is safe
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def apply_migration(self, conn: sqlite3.Connection, version: str, name: str, sql: str, now: str) -> None:
        # executescript commits whatever is open before it runs, so the transaction is part of the script.
        script = (f"BEGIN IMMEDIATE;\n{sql}\n;\nINSERT INTO llmgate_schema_migrations (version, name, applied_at) "
                  f"VALUES ('{version}', '{name}', '{now}');\nCOMMIT;")
        try:
            conn.executescript(script)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def migration_lock(self, conn: sqlite3.Connection) -> Iterator[None]:
        yield  # each migration's BEGIN IMMEDIATE serialises writers; applied versions are re-checked inside

    def translate(self, exc: BaseException) -> StoreError | None:
        if isinstance(exc, sqlite3.IntegrityError):
            return Conflict(str(exc))
        if isinstance(exc, sqlite3.OperationalError):
            return StoreUnavailable(f"{self.url}: {exc}")
        if isinstance(exc, sqlite3.Error):
            return StoreError(f"{self.url}: {exc}")
        return None

    def is_broken(self, conn: sqlite3.Connection) -> bool:
        return False


# A server that stops answering (not just refusing) must fail calls in seconds, not hang them for
# minutes: callers fall back to what they cached only once a call fails.
_PG_DEFAULTS = {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                "keepalives_count": "3", "tcp_user_timeout": "10000"}


class _Postgres:
    placeholder = "%s"

    def __init__(self, url: DatabaseUrl):
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - a packaging problem, said plainly
            raise StoreUnavailable("PostgreSQL needs the psycopg package: pip install 'psycopg[binary]'") from exc
        self.psycopg = psycopg
        self.url = url
        try:
            params = psycopg.conninfo.conninfo_to_dict(url.target)
        except psycopg.ProgrammingError as exc:
            raise StoreUnavailable(f"malformed database URL {url}: {exc}") from None
        for name, value in _PG_DEFAULTS.items():  # the URL's own settings win
            params.setdefault(name, value)
        self.conninfo = psycopg.conninfo.make_conninfo("", **params)

    def connect(self):
        try:
            return self.psycopg.connect(self.conninfo, autocommit=True)
        except self.psycopg.Error as exc:
            raise StoreUnavailable(f"{self.url}: cannot connect to PostgreSQL: {_first_line(exc)}") from None

    @contextmanager
    def transaction(self, conn) -> Iterator[Any]:
        with conn.transaction():
            yield conn

    def apply_migration(self, conn, version: str, name: str, sql: str, now: str) -> None:
        with conn.transaction():  # PostgreSQL's DDL is transactional: all of the file or nothing
            conn.execute(sql)
            conn.execute("INSERT INTO llmgate_schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                         (version, name, now))

    @contextmanager
    def migration_lock(self, conn) -> Iterator[None]:
        conn.execute("SELECT pg_advisory_lock(%s)", (_PG_MIGRATION_LOCK,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_PG_MIGRATION_LOCK,))

    def translate(self, exc: BaseException) -> StoreError | None:
        pg = self.psycopg
        if isinstance(exc, pg.errors.UniqueViolation):
            return Conflict(_first_line(exc))
        if isinstance(exc, (pg.OperationalError, pg.InterfaceError)):
            return StoreUnavailable(f"{self.url}: {_first_line(exc)}")
        if isinstance(exc, pg.Error):
            return StoreError(f"{self.url}: {_first_line(exc)}")
        return None

    def is_broken(self, conn) -> bool:
        return conn.closed or conn.broken


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- the store

class Store:
    """Keys, teams and spend in one database. Thread-safe: one connection per thread."""

    def __init__(self, backend: _Sqlite | _Postgres):
        self._backend = backend
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self.url = backend.url

    @classmethod
    def open(cls, url: str, migrations_dir: str | Path | None = None) -> "Store":
        """Connect and migrate. StoreUnavailable: bad URL or unreachable; MigrationError: a file failed."""
        try:
            parsed = parse_database_url(url)
        except ValueError as exc:
            raise StoreUnavailable(f"general_settings.database_url: {exc}") from None
        store = cls(_Sqlite(parsed) if parsed.kind == "sqlite" else _Postgres(parsed))
        try:
            store.migrate(Path(migrations_dir) if migrations_dir is not None else MIGRATIONS_DIR)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:  # closing a connection to a server that went away
                pass

    # -- connections and errors

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._backend.is_broken(conn):
            self._drop(conn)
            conn = None
        if conn is None:
            conn = self._backend.connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop(self, conn) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver errors become StoreError subclasses; a connection that failed is not reused."""
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            translated = self._backend.translate(exc)
            if translated is None:
                raise
            if isinstance(translated, StoreUnavailable):
                conn = getattr(self._local, "conn", None)
                if conn is not None and self._backend.is_broken(conn):
                    self._drop(conn)
            raise translated from exc

    def _sql(self, sql: str) -> str:
        return sql if self._backend.placeholder == "?" else sql.replace("?", "%s")

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._errors():
            return self._conn().execute(self._sql(sql), params).fetchall()

    @contextmanager
    def _write(self) -> Iterator["_Tx"]:
        with self._errors():
            conn = self._conn()
            with self._backend.transaction(conn):
                yield _Tx(conn, self._sql)

    # -- migrations

    def migrate(self, directory: Path = MIGRATIONS_DIR) -> list[str]:
        """Apply the migration files not applied yet, each in one transaction; returns their names."""
        files = sorted((p for p in directory.iterdir() if MIGRATION_FILE.fullmatch(p.name)), key=lambda p: p.name)
        versions = [MIGRATION_FILE.fullmatch(p.name).group(1) for p in files]
        if len(set(versions)) != len(versions):
            raise MigrationError(f"{directory}: two migration files share a version number: {[p.name for p in files]}")
        applied: list[str] = []
        with self._errors():
            conn = self._conn()
            with self._backend.migration_lock(conn):
                conn.execute("CREATE TABLE IF NOT EXISTS llmgate_schema_migrations (version TEXT PRIMARY KEY, "
                             "name TEXT NOT NULL, applied_at TEXT NOT NULL)")
                for path, version in zip(files, versions):
                    if self._is_applied(conn, version):
                        continue
                    try:
                        self._backend.apply_migration(conn, version, path.name, path.read_text(), _ts(utcnow()))
                    except Exception as exc:
                        if self._is_applied(conn, version):  # another process applied it first (SQLite)
                            continue
                        translated = self._backend.translate(exc)
                        if isinstance(translated, StoreUnavailable) and not _is_sql_error(exc):
                            raise translated from exc
                        raise MigrationError(f"migration {path.name} failed and was rolled back, nothing of it "
                                             f"applied ({self.url}): {_first_line(exc)}") from exc
                    log.info("applied migration %s to %s", path.name, self.url)
                    applied.append(path.name)
        return applied

    def _is_applied(self, conn, version: str) -> bool:
        return bool(conn.execute(self._sql("SELECT 1 FROM llmgate_schema_migrations WHERE version = ?"),
                                 (version,)).fetchall())

    def applied_migrations(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM llmgate_schema_migrations ORDER BY version")]

    # -- keys

    def generate_key(self, *, models: Iterable[str] = (), rpm_limit: int | None = None, tpm_limit: int | None = None,
                     max_parallel_requests: int | None = None, max_budget: float | None = None,
                     budget_duration: str | None = None, duration: str | None = None, team_id: str | None = None,
                     key_alias: str | None = None, metadata: dict | None = None, blocked: bool = False,
                     now: datetime | None = None) -> tuple[str, KeyRecord]:
        """A new key: (the raw key, to hand out once, and its record). Conflict when key_alias is taken."""
        now = _utc(now) if now else utcnow()
        raw = "sk-" + secrets.token_urlsafe(32)
        token_hash = hash_key(raw)
        expires = parse_duration(duration).after(now) if duration is not None else None
        reset_at = parse_duration(budget_duration).after(now) if budget_duration is not None else None
        row = (token_hash, f"sk-...{raw[-4:]}", key_alias, team_id, orjson.dumps(list(models)).decode(), rpm_limit,
               tpm_limit, max_parallel_requests, max_budget, budget_duration, _ts(reset_at), 0.0, _ts(expires),
               int(blocked), orjson.dumps(metadata or {}).decode(), _ts(now), _ts(now))
        with self._write() as tx:
            tx.run(f"INSERT INTO llmgate_keys ({', '.join(_KEY_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(_KEY_COLUMNS))})", row)
        return raw, _key_from_row(row)

    def key_by_hash(self, token_hash: str) -> KeyRecord | None:
        rows = self._read(f"{_KEY_SELECT} WHERE token_hash = ?", (token_hash,))
        return _key_from_row(rows[0]) if rows else None

    def key_hash_by_prefix(self, prefix: str) -> str | None:
        """The one key whose hash starts with `prefix` (a usage log's 12-hex key_id); None if none or several."""
        if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
            return None
        rows = self._read("SELECT token_hash FROM llmgate_keys WHERE substr(token_hash, 1, ?) = ?",
                          (len(prefix), prefix))
        return rows[0][0] if len(rows) == 1 else None

    def update_key(self, token_hash: str, now: datetime | None = None, **fields: Any) -> KeyRecord | None:
        """Change the given fields (None clears one); None when no such key. Conflict when key_alias is taken."""
        unknown = set(fields) - _KEY_UPDATABLE
        if unknown:
            raise TypeError(f"update_key got fields it does not know: {sorted(unknown)}")
        now = _utc(now) if now else utcnow()
        columns: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "duration":
                columns["expires"] = _ts(parse_duration(value).after(now)) if value is not None else None
            elif name == "budget_duration":
                columns["budget_duration"] = value
                columns["budget_reset_at"] = _ts(parse_duration(value).after(now)) if value is not None else None
            elif name == "models":
                columns["models"] = orjson.dumps(list(value or ())).decode()
            elif name == "metadata":
                columns["metadata"] = orjson.dumps(value or {}).decode()
            elif name == "blocked":
                columns["blocked"] = int(bool(value))
            elif name == "spend":
                columns["spend"] = float(value or 0.0)
            else:
                columns[name] = value
        columns["updated_at"] = _ts(now)
        with self._write() as tx:
            assignments = ", ".join(f"{c} = ?" for c in columns)
            changed = tx.run(f"UPDATE llmgate_keys SET {assignments} WHERE token_hash = ?",
                             (*columns.values(), token_hash)).rowcount
        return self.key_by_hash(token_hash) if changed else None

    def set_blocked(self, token_hash: str, blocked: bool) -> KeyRecord | None:
        return self.update_key(token_hash, blocked=blocked)

    def delete_keys(self, hashes: Iterable[str]) -> int:
        hashes = list(dict.fromkeys(hashes))
        deleted = 0
        with self._write() as tx:
            for h in hashes:
                deleted += tx.run("DELETE FROM llmgate_keys WHERE token_hash = ?", (h,)).rowcount
        return deleted

    def list_keys(self, page: int = 1, size: int = 10, team_id: str | None = None) -> tuple[list[KeyRecord], int]:
        """One page (1-based, newest first) and the number of keys in all pages."""
        _check_page(page, size)
        where, params = ("WHERE team_id = ?", (team_id,)) if team_id is not None else ("", ())
        total = self._read(f"SELECT COUNT(*) FROM llmgate_keys {where}", params)[0][0]
        rows = self._read(f"{_KEY_SELECT} {where} ORDER BY created_at DESC, token_hash LIMIT ? OFFSET ?",
                          (*params, size, (page - 1) * size))
        return [_key_from_row(r) for r in rows], int(total)

    # -- teams

    def new_team(self, *, team_id: str | None = None, team_alias: str | None = None, models: Iterable[str] = (),
                 max_budget: float | None = None, budget_duration: str | None = None, rpm_limit: int | None = None,
                 tpm_limit: int | None = None, blocked: bool = False, metadata: dict | None = None,
                 now: datetime | None = None) -> TeamRecord:
        """A new team (team_id generated when not given). Conflict when the team_id is taken."""
        now = _utc(now) if now else utcnow()
        reset_at = parse_duration(budget_duration).after(now) if budget_duration is not None else None
        row = (team_id or str(uuid.uuid4()), team_alias, orjson.dumps(list(models)).decode(), max_budget, budget_duration,
               _ts(reset_at), rpm_limit, tpm_limit, 0.0, int(blocked), orjson.dumps(metadata or {}).decode(),
               _ts(now), _ts(now))
        with self._write() as tx:
            tx.run(f"INSERT INTO llmgate_teams ({', '.join(_TEAM_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(_TEAM_COLUMNS))})", row)
        return _team_from_row(row)

    def team_by_id(self, team_id: str) -> TeamRecord | None:
        rows = self._read(f"{_TEAM_SELECT} WHERE team_id = ?", (team_id,))
        return _team_from_row(rows[0]) if rows else None

    def list_teams(self) -> list[TeamRecord]:
        return [_team_from_row(r) for r in self._read(f"{_TEAM_SELECT} ORDER BY team_id")]

    # -- spend

    def record_spend(self, entries: list[dict], now: datetime | None = None) -> int:
        """Insert spend rows and add their spend to their key and team, in one transaction.

        An entry: request_id (required), key_hash, team_id, model, prompt_tokens, completion_tokens,
        total_tokens, spend, status, start_time (datetime or ISO text; default now). Idempotent by
        request_id: a row already stored changes nothing. A key or team whose budget period ended is
        reset first; spend from before the current period is logged but not added. Returns the number
        of new rows. ValueError (before anything is written) for an entry that is not well formed.
        """
        now = _utc(now) if now else utcnow()
        rows = [_spend_row(e, now) for e in entries]
        if not rows:
            return 0
        inserted: list[tuple] = []
        with self._write() as tx:
            insert = (f"INSERT INTO llmgate_spend_logs ({', '.join(_SPEND_COLUMNS)}) "
                      f"VALUES ({', '.join('?' * len(_SPEND_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING")
            for row in rows:
                if tx.run(insert, row).rowcount:
                    inserted.append(row)
            for table, id_column, index in (("llmgate_keys", "token_hash", 1), ("llmgate_teams", "team_id", 2)):
                owners = {row[index] for row in inserted if row[index] is not None}
                for owner in sorted(owners):
                    period_start = _roll_budget(tx, table, id_column, owner, now)
                    spend = sum(row[7] for row in inserted if row[index] == owner
                                and (period_start is None or row[9] >= period_start))
                    if spend:
                        tx.run(f"UPDATE {table} SET spend = spend + ? WHERE {id_column} = ?", (spend, owner))
        return len(inserted)

    def reset_budgets(self, now: datetime | None = None) -> int:
        """Reset the spend of every key and team whose budget period ended; returns how many."""
        now = _utc(now) if now else utcnow()
        count = 0
        with self._write() as tx:
            for table, id_column in (("llmgate_keys", "token_hash"), ("llmgate_teams", "team_id")):
                due = tx.run(f"SELECT {id_column} FROM {table} WHERE budget_reset_at <= ?", (_ts(now),)).fetchall()
                for (owner,) in due:
                    _roll_budget(tx, table, id_column, owner, now)
                count += len(due)
        return count

    def spend_logs(self, api_key_hash: str | None = None, team_id: str | None = None, start: datetime | None = None,
                   end: datetime | None = None, limit: int = 100, offset: int = 0) -> list[SpendLogRecord]:
        """Spend rows, newest first; start inclusive, end exclusive."""
        if not 1 <= limit <= MAX_PAGE_SIZE or offset < 0:
            raise ValueError(f"limit must be 1..{MAX_PAGE_SIZE} and offset >= 0, got {limit}, {offset}")
        clauses, params = [], []
        for clause, value in (("token_hash = ?", api_key_hash), ("team_id = ?", team_id),
                              ("start_time >= ?", _ts(start) if start else None),
                              ("start_time < ?", _ts(end) if end else None)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(f"SELECT {', '.join(_SPEND_COLUMNS)} FROM llmgate_spend_logs {where} "
                          f"ORDER BY start_time DESC, request_id LIMIT ? OFFSET ?", (*params, limit, offset))
        return [_spend_from_row(r) for r in rows]

    def latest_spend_time(self) -> datetime | None:
        """The start time of the newest spend row: where a usage-log replay can start (less a margin)."""
        return _dt(self._read("SELECT MAX(start_time) FROM llmgate_spend_logs")[0][0])


class _Tx:
    """The connection inside one transaction, with placeholders adapted to the backend."""

    def __init__(self, conn, sql):
        self._conn, self._sql = conn, sql

    def run(self, sql: str, params: tuple = ()):
        return self._conn.execute(self._sql(sql), params)


def _roll_budget(tx: _Tx, table: str, id_column: str, owner: str, now: datetime) -> str | None:
    """Reset spend if the budget period ended; returns the current period's start (ISO text), None without one."""
    rows = tx.run(f"SELECT budget_duration, budget_reset_at FROM {table} WHERE {id_column} = ?", (owner,)).fetchall()
    if not rows or rows[0][0] is None or rows[0][1] is None:
        return None
    duration, reset_at = parse_duration(rows[0][0]), _dt(rows[0][1])
    if now >= reset_at:
        next_reset = duration.next_boundary(reset_at, now)
        # Compare-and-set on the old reset time: two writers never both reset the same period.
        tx.run(f"UPDATE {table} SET spend = 0, budget_reset_at = ? WHERE {id_column} = ? AND budget_reset_at = ?",
               (_ts(next_reset), owner, rows[0][1]))
        reset_at = next_reset
    return _ts(duration.before(reset_at))


def _spend_row(entry: dict, now: datetime) -> tuple:
    request_id = entry.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"a spend entry needs a request_id, got {entry!r}")
    prompt = int(entry.get("prompt_tokens") or 0)
    completion = int(entry.get("completion_tokens") or 0)
    total = int(entry.get("total_tokens") or prompt + completion)
    start = entry.get("start_time")
    status = entry.get("status")
    return (request_id, entry.get("key_hash"), entry.get("team_id"), entry.get("model"), prompt, completion, total,
            float(entry.get("spend") or 0.0), None if status is None else int(status),
            _ts(parse_time(start) if start is not None else now))


def _check_page(page: int, size: int) -> None:
    if page < 1 or not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"page must be >= 1 and size 1..{MAX_PAGE_SIZE}, got page {page}, size {size}")


def _is_sql_error(exc: BaseException) -> bool:
    """SQLite reports syntax errors as OperationalError; those are the migration's fault, not the database's."""
    return isinstance(exc, sqlite3.OperationalError) and not any(
        word in str(exc) for word in ("locked", "unable to open", "disk I/O", "readonly"))

