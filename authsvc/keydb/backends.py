"""The two databases DB mode runs on, behind one small interface: SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from authsvc.keydb.records import Conflict, StoreError, StoreUnavailable
from controller.model.config import DatabaseUrl

_PG_MIGRATION_LOCK = 0x6C6C6D67617465  # "llmgate": one migrating process at a time per server
_SQLITE_BUSY_MS = 5000

class SqliteBackend:
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


class PostgresBackend:
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
            raise StoreUnavailable(f"{self.url}: cannot connect to PostgreSQL: {first_line(exc)}") from None

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
            return Conflict(first_line(exc))
        if isinstance(exc, (pg.OperationalError, pg.InterfaceError)):
            return StoreUnavailable(f"{self.url}: {first_line(exc)}")
        if isinstance(exc, pg.Error):
            return StoreError(f"{self.url}: {first_line(exc)}")
        return None

    def is_broken(self, conn) -> bool:
        return conn.closed or conn.broken


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

