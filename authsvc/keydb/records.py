"""DB mode's records: virtual keys, teams and spend rows as the key database holds them, the durations
of LiteLLM's API ("30s", "1h", "30d", "1mo"), the errors of the key database, and the time helpers of
its columns (ISO-8601 UTC text with microseconds, so comparing the text compares the times)."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson


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


# ---------------------------------------------------------------- time

def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def db_time(t: datetime | None) -> str | None:
    return None if t is None else as_utc(t).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_db_time(text: str | None) -> datetime | None:
    return None if text is None else as_utc(datetime.fromisoformat(text))


def required_time(text: str) -> datetime:
    """A NOT NULL time column."""
    return as_utc(datetime.fromisoformat(text))


def parse_time(value: datetime | str) -> datetime:
    """A datetime, or ISO-8601 text ("2026-11-24T20:49:40.123Z"); naive times are UTC."""
    return as_utc(value if isinstance(value, datetime) else datetime.fromisoformat(value))


def iso_out(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


# ---------------------------------------------------------------- records

class _Budgeted:
    """What keys and teams share: spend in the budget period, and a model list (empty: every model)."""

    __slots__ = ()
    if TYPE_CHECKING:  # the fields of the dataclasses below
        spend: float
        budget_reset_at: datetime | None
        models: tuple[str, ...]

        def unusable_reason(self, now: datetime) -> str | None: ...

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
            "budget_reset_at": iso_out(self.budget_reset_at),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "max_parallel_requests": self.max_parallel_requests,
            "expires": iso_out(self.expires),
            "blocked": self.blocked,
            "metadata": dict(self.metadata),
            "created_at": iso_out(self.created_at),
            "updated_at": iso_out(self.updated_at),
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
            "budget_reset_at": iso_out(self.budget_reset_at),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "blocked": self.blocked,
            "metadata": dict(self.metadata),
            "created_at": iso_out(self.created_at),
            "updated_at": iso_out(self.updated_at),
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
            "startTime": iso_out(self.start_time),
        }


KEY_COLUMNS = ("token_hash", "key_name", "key_alias", "team_id", "models", "rpm_limit", "tpm_limit",
                "max_parallel_requests", "max_budget", "budget_duration", "budget_reset_at", "spend", "expires",
                "blocked", "metadata", "created_at", "updated_at")
TEAM_COLUMNS = ("team_id", "team_alias", "models", "max_budget", "budget_duration", "budget_reset_at", "rpm_limit",
                 "tpm_limit", "spend", "blocked", "metadata", "created_at", "updated_at")
SPEND_COLUMNS = ("request_id", "token_hash", "team_id", "model", "prompt_tokens", "completion_tokens",
                  "total_tokens", "spend", "status", "start_time")
KEY_SELECT = f"SELECT {', '.join(KEY_COLUMNS)} FROM llmgate_keys"
TEAM_SELECT = f"SELECT {', '.join(TEAM_COLUMNS)} FROM llmgate_teams"


def key_from_row(r: tuple) -> KeyRecord:
    return KeyRecord(r[0], r[1], r[2], r[3], tuple(orjson.loads(r[4])), r[5], r[6], r[7], r[8], r[9], from_db_time(r[10]),
                     float(r[11]), from_db_time(r[12]), bool(r[13]), orjson.loads(r[14]), required_time(r[15]),
                     required_time(r[16]))


def team_from_row(r: tuple) -> TeamRecord:
    return TeamRecord(r[0], r[1], tuple(orjson.loads(r[2])), r[3], r[4], from_db_time(r[5]), r[6], r[7], float(r[8]),
                      bool(r[9]), orjson.loads(r[10]), required_time(r[11]), required_time(r[12]))


def spend_from_row(r: tuple) -> SpendLogRecord:
    return SpendLogRecord(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), float(r[7]),
                          None if r[8] is None else int(r[8]), required_time(r[9]))


# Fields update_key accepts; `duration` sets `expires` from now, as in LiteLLM.
KEY_UPDATABLE = frozenset({"key_alias", "team_id", "models", "rpm_limit", "tpm_limit", "max_parallel_requests",
                            "max_budget", "budget_duration", "duration", "spend", "blocked", "metadata"})


