"""DB mode's key database: virtual keys, teams and spend, in SQLite or PostgreSQL.

`Store.open(url)` checks the URL, connects and applies the migrations in `authsvc/keydb/migrations/`.
The API is synchronous; code on an event loop calls it through `asyncio.to_thread`. Every thread
gets its own connection, opened on first use and replaced after the database went away.

Keys are stored as the sha256 hex of the raw key (`token_hash`, LiteLLM's `token`); the raw key
exists only in the answer to `generate_key`. Timestamps are stored as ISO-8601 UTC text with
microseconds, so comparing them as text compares the times.
"""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from authsvc.keydb.backends import PostgresBackend, SqliteBackend, first_line
from authsvc.keydb.records import (
    KEY_COLUMNS,
    KEY_SELECT,
    KEY_UPDATABLE,
    SPEND_COLUMNS,
    TEAM_COLUMNS,
    TEAM_SELECT,
    KeyRecord,
    MigrationError,
    SpendLogRecord,
    StoreError,
    StoreUnavailable,
    TeamRecord,
    as_utc,
    db_time,
    from_db_time,
    key_from_row,
    parse_duration,
    parse_time,
    required_time,
    spend_from_row,
    team_from_row,
    utcnow,
)
from controller.model.config import parse_database_url
from controller.model.wire import key_hash

log = logging.getLogger("llmgate.store")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
MAX_PAGE_SIZE = 1000

class Store:
    """Keys, teams and spend in one database. Thread-safe: one connection per thread."""

    def __init__(self, backend: SqliteBackend | PostgresBackend):
        self._backend = backend
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self.url = backend.url

    @classmethod
    def open(cls, url: str, migrations_dir: str | Path | None = None) -> Store:
        """Connect and migrate. StoreUnavailable: bad URL or unreachable; MigrationError: a file failed."""
        try:
            parsed = parse_database_url(url)
        except ValueError as exc:
            raise StoreUnavailable(f"general_settings.database_url: {exc}") from None
        store = cls(SqliteBackend(parsed) if parsed.kind == "sqlite" else PostgresBackend(parsed))
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
    def _write(self) -> Iterator[_Tx]:
        with self._errors():
            conn = self._conn()
            with self._backend.transaction(conn):
                yield _Tx(conn, self._sql)

    # -- migrations

    def migrate(self, directory: Path = MIGRATIONS_DIR) -> list[str]:
        """Apply the migration files not applied yet, each in one transaction; returns their names."""
        files = sorted((p for p in directory.iterdir() if MIGRATION_FILE.fullmatch(p.name)), key=lambda p: p.name)
        versions = [p.name[:4] for p in files]  # MIGRATION_FILE: four digits first
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
                        self._backend.apply_migration(conn, version, path.name, path.read_text(), _now_text())
                    except Exception as exc:
                        if self._is_applied(conn, version):  # another process applied it first (SQLite)
                            continue
                        translated = self._backend.translate(exc)
                        if isinstance(translated, StoreUnavailable) and not _is_sql_error(exc):
                            raise translated from exc
                        raise MigrationError(f"migration {path.name} failed and was rolled back, nothing of it "
                                             f"applied ({self.url}): {first_line(exc)}") from exc
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
        now = as_utc(now) if now else utcnow()
        raw = "sk-" + secrets.token_urlsafe(32)
        token_hash = key_hash(raw)
        expires = parse_duration(duration).after(now) if duration is not None else None
        reset_at = parse_duration(budget_duration).after(now) if budget_duration is not None else None
        row = (token_hash, f"sk-...{raw[-4:]}", key_alias, team_id, orjson.dumps(list(models)).decode(), rpm_limit,
               tpm_limit, max_parallel_requests, max_budget, budget_duration, db_time(reset_at), 0.0, db_time(expires),
               int(blocked), orjson.dumps(metadata or {}).decode(), db_time(now), db_time(now))
        with self._write() as tx:
            tx.run(f"INSERT INTO llmgate_keys ({', '.join(KEY_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(KEY_COLUMNS))})", row)
        return raw, key_from_row(row)

    def key_by_hash(self, token_hash: str) -> KeyRecord | None:
        rows = self._read(f"{KEY_SELECT} WHERE token_hash = ?", (token_hash,))
        return key_from_row(rows[0]) if rows else None

    def key_hash_by_prefix(self, prefix: str) -> str | None:
        """The one key whose hash starts with `prefix` (a usage log's 12-hex key_id); None if none or several."""
        if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
            return None
        rows = self._read("SELECT token_hash FROM llmgate_keys WHERE substr(token_hash, 1, ?) = ?",
                          (len(prefix), prefix))
        return rows[0][0] if len(rows) == 1 else None

    def update_key(self, token_hash: str, now: datetime | None = None, **fields: Any) -> KeyRecord | None:
        """Change the given fields (None clears one); None when no such key. Conflict when key_alias is taken."""
        unknown = set(fields) - KEY_UPDATABLE
        if unknown:
            raise TypeError(f"update_key got fields it does not know: {sorted(unknown)}")
        now = as_utc(now) if now else utcnow()
        columns: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "duration":
                columns["expires"] = db_time(parse_duration(value).after(now)) if value is not None else None
            elif name == "budget_duration":
                columns["budget_duration"] = value
                columns["budget_reset_at"] = db_time(parse_duration(value).after(now)) if value is not None else None
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
        columns["updated_at"] = db_time(now)
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
        rows = self._read(f"{KEY_SELECT} {where} ORDER BY created_at DESC, token_hash LIMIT ? OFFSET ?",
                          (*params, size, (page - 1) * size))
        return [key_from_row(r) for r in rows], int(total)

    # -- teams

    def new_team(self, *, team_id: str | None = None, team_alias: str | None = None, models: Iterable[str] = (),
                 max_budget: float | None = None, budget_duration: str | None = None, rpm_limit: int | None = None,
                 tpm_limit: int | None = None, blocked: bool = False, metadata: dict | None = None,
                 now: datetime | None = None) -> TeamRecord:
        """A new team (team_id generated when not given). Conflict when the team_id is taken."""
        now = as_utc(now) if now else utcnow()
        reset_at = parse_duration(budget_duration).after(now) if budget_duration is not None else None
        row = (team_id or str(uuid.uuid4()), team_alias, orjson.dumps(list(models)).decode(), max_budget, budget_duration,
               db_time(reset_at), rpm_limit, tpm_limit, 0.0, int(blocked), orjson.dumps(metadata or {}).decode(),
               db_time(now), db_time(now))
        with self._write() as tx:
            tx.run(f"INSERT INTO llmgate_teams ({', '.join(TEAM_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(TEAM_COLUMNS))})", row)
        return team_from_row(row)

    def team_by_id(self, team_id: str) -> TeamRecord | None:
        rows = self._read(f"{TEAM_SELECT} WHERE team_id = ?", (team_id,))
        return team_from_row(rows[0]) if rows else None

    def list_teams(self) -> list[TeamRecord]:
        return [team_from_row(r) for r in self._read(f"{TEAM_SELECT} ORDER BY team_id")]

    # -- spend

    def record_spend(self, entries: list[dict], now: datetime | None = None) -> int:
        """Insert spend rows and add their spend to their key and team, in one transaction.

        An entry: request_id (required), key_hash, team_id, model, prompt_tokens, completion_tokens,
        total_tokens, spend, status, start_time (datetime or ISO text; default now). Idempotent by
        request_id: a row already stored changes nothing. A key or team whose budget period ended is
        reset first; spend from before the current period is logged but not added. Returns the number
        of new rows. ValueError (before anything is written) for an entry that is not well formed.
        """
        now = as_utc(now) if now else utcnow()
        rows = [_spend_row(e, now) for e in entries]
        if not rows:
            return 0
        inserted: list[tuple] = []
        with self._write() as tx:
            insert = (f"INSERT INTO llmgate_spend_logs ({', '.join(SPEND_COLUMNS)}) "
                      f"VALUES ({', '.join('?' * len(SPEND_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING")
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
        now = as_utc(now) if now else utcnow()
        count = 0
        with self._write() as tx:
            for table, id_column in (("llmgate_keys", "token_hash"), ("llmgate_teams", "team_id")):
                due = tx.run(f"SELECT {id_column} FROM {table} WHERE budget_reset_at <= ?", (db_time(now),)).fetchall()
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
                              ("start_time >= ?", db_time(start) if start else None),
                              ("start_time < ?", db_time(end) if end else None)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(f"SELECT {', '.join(SPEND_COLUMNS)} FROM llmgate_spend_logs {where} "
                          f"ORDER BY start_time DESC, request_id LIMIT ? OFFSET ?", (*params, limit, offset))
        return [spend_from_row(r) for r in rows]

    def latest_spend_time(self) -> datetime | None:
        """The start time of the newest spend row: where a usage-log replay can start (less a margin)."""
        return from_db_time(self._read("SELECT MAX(start_time) FROM llmgate_spend_logs")[0][0])


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
    duration, reset_at = parse_duration(rows[0][0]), required_time(rows[0][1])
    if now >= reset_at:
        next_reset = duration.next_boundary(reset_at, now)
        # Compare-and-set on the old reset time: two writers never both reset the same period.
        tx.run(f"UPDATE {table} SET spend = 0, budget_reset_at = ? WHERE {id_column} = ? AND budget_reset_at = ?",
               (db_time(next_reset), owner, rows[0][1]))
        reset_at = next_reset
    return db_time(duration.before(reset_at))


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
            db_time(parse_time(start) if start is not None else now))


def _check_page(page: int, size: int) -> None:
    if page < 1 or not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"page must be >= 1 and size 1..{MAX_PAGE_SIZE}, got page {page}, size {size}")


def _is_sql_error(exc: BaseException) -> bool:
    """SQLite reports syntax errors as OperationalError; those are the migration's fault, not the database's."""
    return isinstance(exc, sqlite3.OperationalError) and not any(
        word in str(exc) for word in ("locked", "unable to open", "disk I/O", "readonly"))


def _now_text() -> str:
    text = db_time(utcnow())
    assert text is not None
    return text
