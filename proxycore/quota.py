"""Per-team monthly budgets and tokens-per-minute, shared by every proxycore worker on the machine.

Each team has a 64-byte memory-mapped file in the state directory; workers read it without a lock
and update it under an fcntl lock, so N workers enforce one limit, not N. Month-to-date use is
rebuilt from the usage logs at start, so a restart loses nothing.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import orjson

_SLOTS = 8  # int64 each
_MONTH, _TOKENS, _USD, _MINUTE, _MINUTE_TOKENS, _RPM_MINUTE, _RPM_COUNT, _IN_FLIGHT = range(_SLOTS)
PROMPT_BYTES_PER_TOKEN = 4  # the up-front estimate of a prompt: its request body's bytes / 4
DEFAULT_COMPLETION_ESTIMATE = 256  # charged up front when a request sets no max_tokens


class Clock:
    """Wall-clock time; LLMGATE_FAKE_TIME (an ISO timestamp) starts it elsewhere, for tests of month ends."""

    def __init__(self) -> None:
        fake = os.environ.get("LLMGATE_FAKE_TIME")
        self.offset = 0.0
        if fake:
            start = datetime.fromisoformat(fake.replace("Z", "+00:00"))
            self.offset = start.timestamp() - time.time()

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.offset, timezone.utc)

    def timestamp(self) -> float:
        return time.time() + self.offset


def month_id(ts: datetime) -> int:
    return ts.year * 100 + ts.month


def next_month(ts: datetime) -> datetime:
    first = ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


class TeamMeter:
    """One team's counters in a shared, memory-mapped file."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self.fd).st_size < _SLOTS * 8:
            os.ftruncate(self.fd, _SLOTS * 8)
        self._map = mmap.mmap(self.fd, _SLOTS * 8)
        self.v = memoryview(self._map).cast("q")

    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def month_used(self, month: int) -> tuple[int, float]:
        v = self.v
        if v[_MONTH] != month:
            return 0, 0.0
        return v[_TOKENS], v[_USD] / 1e6

    def add(self, month: int, tokens: int, usd: float) -> tuple[int, float]:
        self._lock()
        try:
            v = self.v
            if v[_MONTH] != month:
                v[_MONTH], v[_TOKENS], v[_USD] = month, 0, 0
            v[_TOKENS] += tokens
            v[_USD] += round(usd * 1e6)
            return v[_TOKENS], v[_USD] / 1e6
        finally:
            self._unlock()

    def set_month(self, month: int, tokens: int, usd: float) -> None:
        self._lock()
        try:
            self.v[_MONTH], self.v[_TOKENS], self.v[_USD] = month, tokens, round(usd * 1e6)
        finally:
            self._unlock()

    def reserve(self, minute: int, tokens: int, limit: int) -> bool:
        """Charge `tokens` to this minute unless that passes `limit` (a request alone in its minute always passes)."""
        self._lock()
        try:
            v = self.v
            if v[_MINUTE] != minute:
                v[_MINUTE], v[_MINUTE_TOKENS] = minute, 0
            if v[_MINUTE_TOKENS] and v[_MINUTE_TOKENS] + tokens > limit:
                return False
            v[_MINUTE_TOKENS] += tokens
            return True
        finally:
            self._unlock()

    def reconcile(self, minute: int, delta: int) -> None:
        """Replace the up-front charge by the real use; a charge from a minute that has passed stays there."""
        self._lock()
        try:
            v = self.v
            if v[_MINUTE] == minute:
                v[_MINUTE_TOKENS] = max(0, v[_MINUTE_TOKENS] + delta)
        finally:
            self._unlock()


    def count_request(self, minute: int, limit: int) -> bool:
        """One more request this minute, unless `limit` were passed (requests per minute of a key)."""
        self._lock()
        try:
            v = self.v
            if v[_RPM_MINUTE] != minute:
                v[_RPM_MINUTE], v[_RPM_COUNT] = minute, 0
            if v[_RPM_COUNT] >= limit:
                return False
            v[_RPM_COUNT] += 1
            return True
        finally:
            self._unlock()

    def enter(self, limit: int) -> bool:
        """One more request in flight, unless `limit` are already (max_parallel_requests of a key)."""
        self._lock()
        try:
            if self.v[_IN_FLIGHT] >= limit:
                return False
            self.v[_IN_FLIGHT] += 1
            return True
        finally:
            self._unlock()

    def leave(self) -> None:
        self._lock()
        try:
            self.v[_IN_FLIGHT] = max(0, self.v[_IN_FLIGHT] - 1)
        finally:
            self._unlock()


class Quotas:
    """The meters of every team, opened on first use."""

    def __init__(self, state_dir: str, clock: Clock | None = None):
        self.state_dir = state_dir
        self.clock = clock or Clock()
        self._meters: dict[str, TeamMeter] = {}
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def meter(self, team: str) -> TeamMeter:
        m = self._meters.get(team)
        if m is None:
            m = self._meters[team] = TeamMeter(os.path.join(self.state_dir, f"{team}.meter"))
        return m

    def seconds_to_next_minute(self) -> int:
        return max(1, math.ceil(60 - self.clock.timestamp() % 60))

    def minute(self) -> int:
        return int(self.clock.timestamp() // 60)


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A virtual key's limits, as authsvc passes them on through nginx (X-Key-Policy, JSON)."""

    key_hash: str
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    parallel: int | None = None
    max_budget: float | None = None
    spend: float = 0.0

    @property
    def meter_name(self) -> str:
        return "key-" + self.key_hash[:32]

    def to_header(self) -> str:
        return orjson.dumps({"h": self.key_hash, "m": sorted(self.models) if self.models is not None else None,
                             "rpm": self.rpm, "tpm": self.tpm, "par": self.parallel, "max": self.max_budget,
                             "spent": self.spend}).decode()


def parse_key_policy(header: str) -> KeyPolicy | None:
    """None for a header that is not a policy (then the request is refused: policies come only from authsvc)."""
    try:
        d = orjson.loads(header)
        h = d["h"]
        if not isinstance(h, str) or len(h) != 64:
            return None
        m = d.get("m")
        return KeyPolicy(h, frozenset(m) if isinstance(m, list) else None, _pos_int(d.get("rpm")),
                         _pos_int(d.get("tpm")), _pos_int(d.get("par")),
                         float(d["max"]) if isinstance(d.get("max"), (int, float)) else None,
                         float(d.get("spent") or 0.0))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _pos_int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
