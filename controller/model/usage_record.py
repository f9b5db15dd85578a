"""The usage log's record: one JSON line per request that proxycore handled.

proxycore writes it (proxycore/usage_log.py); `llmgate usage`, the budget rebuild at start and
authsvc's spend ingestion read it, all through `UsageRecord`. Also the clock and the calendar-month
helpers that budgets share.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

FAKE_TIME_ENV = "LLMGATE_FAKE_TIME"


@dataclass
class UsageRecord:
    """What a usage line holds, in the order it is written.

    A plain dataclass, not frozen and without slots, on purpose: it is built on every request, and
    orjson serializes a plain one about three times faster (measured: 2.8 µs against 10 µs for
    building and writing one). Treat it as read-only.
    """

    ts: str  # UTC, milliseconds: 2026-11-03T10:00:00.000Z (text order is time order)
    request_id: str
    team: str | None
    key_id: str | None
    key_hash: str | None  # a virtual key's, to put its spend into the key database
    model: str | None
    endpoint: str  # chat | completions | embeddings
    deployment: str | None
    status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float
    latency_ms: float | None  # always written; None only when read from a line without it
    ttft_ms: float | None
    retries: int
    fallback: str | None
    error: str | None

    def to_line(self) -> bytes:
        """The record as one JSON line, newline included."""
        return orjson.dumps(self, option=orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_json(cls, d: Any) -> UsageRecord | None:
        """A parsed line back into a record; None when it does not have this shape (an older format, garbage).

        Only what every reader relies on is required: ts, status, team and the token counts.
        """
        if not isinstance(d, dict):
            return None
        get = d.get
        ts, status, prompt, completion = get("ts"), get("status"), get("prompt_tokens"), get("completion_tokens")
        team = get("team", 0)
        if (type(ts) is not str or type(status) is not int or type(prompt) is not int
                or type(completion) is not int or (team is not None and type(team) is not str)):
            return None
        if len(ts) != 24 or ts[23] != "Z":  # not the format proxycore writes: normalise it
            try:
                ts = usage_timestamp(parse_timestamp(ts))
            except ValueError:
                return None
        cost, latency, ttft = get("cost"), get("latency_ms"), get("ttft_ms")
        rid, key_hash = get("request_id"), get("key_hash")
        return cls(ts, rid if type(rid) is str else "", team, _text(get("key_id")),
                   key_hash if type(key_hash) is str else None, _text(get("model")), _text(get("endpoint")) or "",
                   _text(get("deployment")), status, get("stream") is True, prompt, completion,
                   prompt + completion, _number(cost) or 0.0,
                   _number(latency),
                   _number(ttft), _whole(get("retries")), _text(get("fallback")),
                   _text(get("error")))


FIELDS = tuple(f.name for f in fields(UsageRecord))


def _text(v: Any) -> str | None:
    return v if type(v) is str else None


def _number(v: Any) -> float | None:
    return float(v) if type(v) in (int, float) else None


def _whole(v: Any) -> int:
    return v if type(v) is int else 0


# ---------------------------------------------------------------- time

def usage_timestamp(ts: datetime) -> str:
    """The usage log's timestamp: UTC with milliseconds and a Z, so that text order is time order."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(value: str) -> datetime:
    """ISO-8601 text (a Z or an offset; naive means UTC) as an aware datetime; ValueError otherwise."""
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


class Clock:
    """Wall-clock time; LLMGATE_FAKE_TIME (an ISO timestamp) starts it elsewhere, for tests of month ends."""

    def __init__(self) -> None:
        fake = os.environ.get(FAKE_TIME_ENV)
        self.offset = 0.0
        if fake:
            self.offset = parse_timestamp(fake).timestamp() - time.time()

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.offset, UTC)

    def timestamp(self) -> float:
        return time.time() + self.offset


def month_id(ts: datetime) -> int:
    return ts.year * 100 + ts.month


def month_start(ts: datetime) -> datetime:
    return ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(ts: datetime) -> datetime:
    return (month_start(ts) + timedelta(days=32)).replace(day=1)
