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
    usage_source: str | None = None  # backend (its usage) | counted (a stream's text events) | estimated | None

    def to_line(self) -> bytes:
        """The record as one JSON line, newline included."""
        return orjson.dumps(self, option=orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_json(cls, d: Any) -> UsageRecord | None:
        """A parsed line back into a record; None when it does not have this shape (an older format, garbage).

        Only what every reader relies on is required: ts, status, team and the token counts.
        """
        fields = report_fields(d)
        if fields is None:
            return None
        ts, status, team, prompt, completion, model, key_id, error, cost, latency, stream, ttft = fields
        get = d.get
        rid, key_hash, endpoint = get("request_id"), get("key_hash"), get("endpoint")
        deployment, retries, fallback, source = get("deployment"), get("retries"), get("fallback"), get("usage_source")
        return cls(ts, rid if type(rid) is str else "", team, key_id, key_hash if type(key_hash) is str else None,
                   model, endpoint if type(endpoint) is str else "", deployment if type(deployment) is str else None,
                   status, stream, prompt, completion, prompt + completion, cost, latency, ttft,
                   retries if type(retries) is int else 0, fallback if type(fallback) is str else None, error,
                   source if type(source) is str else None)


ReportFields = tuple[str, int, "str | None", int, int, "str | None", "str | None", "str | None", float, "float | None",
                     bool, "float | None"]


def report_fields(d: Any) -> ReportFields | None:
    """The checked fields of a parsed line that `llmgate usage` sums, without building a record (reports read
    months of lines): (ts, status, team, prompt_tokens, completion_tokens, model, key_id, error, cost,
    latency_ms, stream, ttft_ms). None when the line does not have this shape; written flat for speed."""
    if type(d) is not dict:
        return None
    try:
        ts, status, team = d["ts"], d["status"], d["team"]
        prompt, completion = d["prompt_tokens"], d["completion_tokens"]
    except KeyError:
        return None
    if (type(ts) is not str or type(status) is not int or type(prompt) is not int
            or type(completion) is not int or (team is not None and type(team) is not str)):
        return None
    if len(ts) != 24 or ts[23] != "Z":  # not the format proxycore writes: normalise it
        try:
            ts = usage_timestamp(parse_timestamp(ts))
        except ValueError:
            return None
    get = d.get
    model, key_id, error, cost, latency, ttft = (get("model"), get("key_id"), get("error"), get("cost"),
                                                 get("latency_ms"), get("ttft_ms"))
    return (ts, status, team, prompt, completion, model if type(model) is str else None,
            key_id if type(key_id) is str else None, error if type(error) is str else None,
            cost if type(cost) is float else float(cost) if type(cost) is int else 0.0,
            latency if type(latency) is float else float(latency) if type(latency) is int else None,
            get("stream") is True, ttft if type(ttft) is float else float(ttft) if type(ttft) is int else None)


FIELDS = tuple(f.name for f in fields(UsageRecord))


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
