"""The counters behind proxycore's limits, shared by every worker on the machine: a team's or a virtual
key's month-to-date use, tokens and requests in the current minute, and requests in flight.

Each meter is a 64-byte memory-mapped file in the state directory; workers read it without a lock
and update it under an fcntl lock, so N workers enforce one limit, not N. Month-to-date use is
rebuilt from the usage logs at start, so a restart loses nothing. What the counters are held
against is decided in limits.py.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os

from controller.model.usage_record import Clock

_SLOTS = 8  # int64 each
_MONTH, _TOKENS, _USD, _MINUTE, _MINUTE_TOKENS, _RPM_MINUTE, _RPM_COUNT, _IN_FLIGHT = range(_SLOTS)


class Meter:
    """One team's or key's counters in a shared, memory-mapped file."""

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


class Meters:
    """The meters of every team and key, opened on first use."""

    def __init__(self, state_dir: str, clock: Clock | None = None):
        self.state_dir = state_dir
        self.clock = clock or Clock()
        self._meters: dict[str, Meter] = {}
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def meter(self, name: str) -> Meter:
        m = self._meters.get(name)
        if m is None:
            m = self._meters[name] = Meter(os.path.join(self.state_dir, f"{name}.meter"))
        return m

    def seconds_to_next_minute(self) -> int:
        return max(1, math.ceil(60 - self.clock.timestamp() % 60))

    def minute(self) -> int:
        return int(self.clock.timestamp() // 60)
