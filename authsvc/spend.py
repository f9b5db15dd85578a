"""DB mode's spend: every usage-log line becomes a spend row in the key database, counted once per
request id, so that a virtual key's and a team's budget see what proxycore served.

authsvc follows the usage log as proxycore writes it (`UsageLogFollower`, within a second) and puts
its lines into the database in batches (`SpendWriter`); at start it replays the log from a little
before the newest row it has (`replay_usage_log`). The log is the source of truth: a database that
was down catches up from it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from authsvc.keydb.records import StoreError, StoreUnavailable, parse_time
from controller.model.usage_record import UsageRecord, usage_timestamp

log = logging.getLogger("llmgate.spend")
REPLAY_MARGIN = timedelta(hours=1)  # replay from this long before the newest spend row


class SpendStore(Protocol):
    """What spend needs of the key database (authsvc.keydb.store.Store has it)."""

    def record_spend(self, entries: list[dict], now: datetime | None = None) -> int: ...

    def reset_budgets(self, now: datetime | None = None) -> int: ...

    def key_hash_by_prefix(self, prefix: str) -> str | None: ...

    def latest_spend_time(self) -> datetime | None: ...


class SpendWriter:
    """Spend entries written to the store in batches, about once per `interval`.

    `add` only appends (no I/O). While the database is down the entries wait, at most
    `max_pending` of them (the oldest go first; the usage log still holds them, and a restart replays it).
    `pending` counts what is waiting and what is being written.
    """

    def __init__(self, store: SpendStore, interval: float = 1.0, max_pending: int = 100_000, batch_size: int = 5000):
        self.store = store
        self.interval = interval
        self.max_pending = max_pending
        self.batch_size = batch_size
        self.dropped = 0
        self._pending: collections.deque[dict] = collections.deque()
        self._writing = 0  # entries of the batch being written now
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
        return len(self._pending) + self._writing

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
                self._writing = len(batch)
                try:
                    done = await self._write(batch)
                finally:
                    self._writing = 0
                if done is None:
                    return written
                written += done
        return written

    async def _write(self, batch: list[dict]) -> int | None:
        """The new rows of one batch; None when (some of) it went back to wait for the database."""
        try:
            written = await asyncio.to_thread(self.store.record_spend, batch)
        except (StoreUnavailable, asyncio.CancelledError) as exc:
            self._requeue(batch)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("spend writer: database unavailable, keeping %d entries: %s", len(self._pending), exc)
            return None
        except (ValueError, TypeError, StoreError):
            # The store refused the batch as a whole: write it singly, dropping only what it refuses.
            written = 0
            for i, entry in enumerate(batch):
                try:
                    written += await asyncio.to_thread(self.store.record_spend, [entry])
                except StoreUnavailable:
                    self._requeue(batch[i:])
                    return None
                except (ValueError, TypeError, StoreError) as exc:
                    self.dropped += 1
                    log.error("spend writer: dropped an entry the store refuses (%s): %r", exc, entry)
        except Exception:
            self._requeue(batch)  # a bug, not bad data: keep the entries, say so, try again later
            log.exception("spend writer: writing %d entries failed; keeping them", len(batch))
            return None
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


def spend_entry(r: UsageRecord, store: SpendStore, prefixes: dict[str, str | None]) -> dict | None:
    """A usage record as a spend row; None for a line without a request id.

    A line's key is its `key_hash` (a virtual key), else the one DB key whose hash starts with its
    `key_id` (12 hex digits), else none (a teams.yaml key).
    """
    if not r.request_id:
        return None
    key = r.key_hash
    if key is None and r.key_id is not None and re.fullmatch(r"[0-9a-f]{12}", r.key_id):
        if r.key_id not in prefixes:
            if len(prefixes) > 10_000:
                prefixes.clear()
            prefixes[r.key_id] = store.key_hash_by_prefix(r.key_id)
        key = prefixes[r.key_id]
    return {"request_id": r.request_id, "key_hash": key, "team_id": r.team, "model": r.model,
            "prompt_tokens": max(0, r.prompt_tokens), "completion_tokens": max(0, r.completion_tokens),
            "total_tokens": max(0, r.total_tokens), "spend": r.cost, "status": r.status,
            "start_time": parse_time(r.ts)}


def _entries(lines: list[bytes], since: str | None, store: SpendStore, prefixes: dict[str, str | None]) -> list[dict]:
    out = []
    for line in lines:
        try:
            r = UsageRecord.from_json(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # a torn last line of a crashed writer, or not a usage log
        if r is None or (since is not None and r.ts < since):
            continue
        entry = spend_entry(r, store, prefixes)
        if entry is not None:
            out.append(entry)
    return out


def replay_usage_log(store: SpendStore, path: str | Path, since: datetime | str | None = None,
                     batch_size: int = 5000) -> int:
    """Put the usage log's lines (from `since` on) into the store; lines already there change nothing.

    Synchronous (run it in a thread). Returns the number of new spend rows.
    """
    since_text = usage_timestamp(parse_time(since)) if since is not None else None
    prefixes: dict[str, str | None] = {}
    written = 0
    with open(path, "rb") as f:
        while True:
            lines = f.readlines(1 << 20)
            if not lines:
                break
            entries = _entries([x for x in lines if x.endswith(b"\n")], since_text, store, prefixes)
            for start in range(0, len(entries), batch_size):
                written += store.record_spend(entries[start:start + batch_size])
    return written


class UsageLogFollower:
    """Follows the usage log as `tail -F` does, and hands each new line's spend to a SpendWriter.

    Starts at the first line not older than `since`; follows logrotate's rename (the old file is read
    to its end first, and for a while after, since a writer that has not reopened yet still appends
    there) and copytruncate (the file shrank: read it from the start). Lines are idempotent by request id.
    """

    def __init__(self, path: str, writer: SpendWriter, store: SpendStore, interval: float = 0.2):
        self.path, self.writer, self.store, self.interval = path, writer, store, interval
        self._prefixes: dict[str, str | None] = {}

    async def run(self, since: datetime | None = None) -> None:
        since_text = usage_timestamp(since) if since is not None else None
        current: _Followed | None = None
        retired: list[tuple[_Followed, float]] = []  # rotated files, read a little longer
        try:
            while True:
                current = self._reopen_if_rotated(current, retired)
                for followed in [current, *(f for f, _ in retired)]:
                    if followed is not None:
                        await self._read(followed, since_text)
                now = time.monotonic()
                for item in [r for r in retired if now - r[1] > ROTATED_GRACE_S]:
                    retired.remove(item)
                    item[0].file.close()
                since_text = None  # only the first pass skips old lines; later ones are new
                await asyncio.sleep(self.interval)
        finally:
            for followed in [current, *(f for f, _ in retired)]:
                if followed is not None:
                    followed.file.close()

    def _reopen_if_rotated(self, current: _Followed | None, retired: list) -> _Followed | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return current
        if current is not None and current.inode == st.st_ino:
            if st.st_size < current.file.tell():  # copytruncate: the same file, from its start
                current.file.seek(0)
                current.pending = b""
            return current
        if current is not None:
            retired.append((current, time.monotonic()))
        try:
            return _Followed(open(self.path, "rb"), st.st_ino)
        except OSError as exc:
            log.warning("spend: cannot open %s: %s", self.path, exc)
            return None

    async def _read(self, followed: _Followed, since: str | None) -> None:
        while True:
            data = followed.file.read(1 << 20)
            if not data:
                return
            lines = (followed.pending + data).split(b"\n")
            followed.pending = lines.pop()  # an unfinished line waits for its end
            entries = await asyncio.to_thread(_entries, lines, since, self.store, self._prefixes)
            for entry in entries:
                self.writer.add(entry)
            if self.writer.pending >= self.writer.batch_size:
                await self.writer.flush()  # a long backlog goes in batches, never past the writer's bound


ROTATED_GRACE_S = 30.0


class _Followed:
    __slots__ = ("file", "inode", "pending")

    def __init__(self, file: Any, inode: int):
        self.file, self.inode, self.pending = file, inode, b""


async def follow_usage_log(store: SpendStore, path: str, writer: SpendWriter) -> None:
    """Replay what the store may have missed, then follow the log until cancelled."""
    latest = await asyncio.to_thread(store.latest_spend_time)
    since = latest - REPLAY_MARGIN if latest else None
    await UsageLogFollower(path, writer, store).run(since)
