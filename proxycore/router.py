"""Routing: model groups of weighted deployments, the strategies that pick one, and cooldown."""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass

import yarl

from controller.model.config import Deployment, ProxyConfig
from proxycore.endpoints import BACKEND_PATHS, backend_url

FAIL_WINDOW_S = 60.0
PROBE_FAILURES_TO_LEAVE = 3  # probes in a row that fail before a deployment leaves rotation
PROBE_SUCCESSES_TO_RETURN = 2  # probes in a row that pass before it comes back
FIRST_BYTE_TIMEOUT_S = 30.0  # when litellm_params sets no timeout: a frozen backend fails over after this
STREAM_IDLE_TIMEOUT_S = 600.0  # the longest silence inside a stream, when nothing is set
_RNG = random.Random()
LATENCY_EXPLORE = 0.1  # share of latency-based picks that go to a random deployment, to keep measurements fresh


class DeploymentState:
    """A deployment plus what the router learns about it while serving: load, latency, and health.

    A deployment leaves rotation when requests fail (`allowed_fails` countable failures within
    FAIL_WINDOW_S: it cools down for `cooldown_time`, then one good probe brings it back), when
    PROBE_FAILURES_TO_LEAVE probes in a row fail (PROBE_SUCCESSES_TO_RETURN good ones in a row bring
    it back), or when its backend does not serve its upstream model id (misconfigured, until it does).
    """

    __slots__ = ("d", "urls", "headers", "connect_timeout", "first_byte_timeout", "stream_first_byte_timeout",
                 "stream_idle_timeout", "in_flight", "latency_s", "minute", "minute_requests", "minute_tokens",
                 "fail_times", "down_until", "up", "down_reason", "down_by", "probe_failures", "probe_successes",
                 "next_probe_at", "card", "served_ids")

    def __init__(self, d: Deployment):
        self.d = d
        self.urls = {path: yarl.URL(backend_url(d.api_base, path)) for path in BACKEND_PATHS}  # by vLLM's path
        self.headers = {"Content-Type": "application/json"}
        if d.api_key:
            self.headers["Authorization"] = f"Bearer {d.api_key}"
        self.connect_timeout = min(d.timeout or FIRST_BYTE_TIMEOUT_S, 10.0)
        # A non-streamed answer's first byte is the whole answer: `timeout` bounds it (a frozen backend fails over).
        self.first_byte_timeout = d.timeout or FIRST_BYTE_TIMEOUT_S
        self.stream_first_byte_timeout = d.stream_timeout or d.timeout or FIRST_BYTE_TIMEOUT_S
        self.stream_idle_timeout = d.stream_timeout or d.timeout or STREAM_IDLE_TIMEOUT_S  # silence inside a stream
        self.in_flight = 0
        self.latency_s: float | None = None  # moving average of time to first byte
        self.minute = 0
        self.minute_requests = 0
        self.minute_tokens = 0
        self.fail_times: deque[float] = deque()
        self.down_until = 0.0
        self.up = True
        self.down_reason: str | None = None  # why it left rotation, in words
        self.down_by: str | None = None  # requests | probes | misconfigured
        self.probe_failures = 0  # in a row
        self.probe_successes = 0  # in a row
        self.next_probe_at = 0.0  # the first probe goes at once
        self.card: dict | None = None  # the backend's /models entry for the upstream id
        self.served_ids: tuple[str, ...] | None = None  # every id the backend serves, as its last probe said

    # -- accounting
    def _roll_minute(self, now: float) -> None:
        m = int(now // 60)
        if m != self.minute:
            self.minute, self.minute_requests, self.minute_tokens = m, 0, 0

    def started(self, now: float) -> None:
        self._roll_minute(now)
        self.in_flight += 1
        self.minute_requests += 1

    def finished(self, now: float, first_byte_s: float | None, tokens: int) -> None:
        self.in_flight -= 1
        self._roll_minute(now)
        self.minute_tokens += tokens
        if first_byte_s is not None:
            self.latency_s = first_byte_s if self.latency_s is None else 0.8 * self.latency_s + 0.2 * first_byte_s

    def under_limits(self, now: float) -> bool:
        self._roll_minute(now)
        d = self.d
        return (d.rpm is None or self.minute_requests < d.rpm) and (d.tpm is None or self.minute_tokens < d.tpm)

    # -- health
    def failed(self, now: float, allowed_fails: int, cooldown_s: float, reason: str) -> bool:
        """Count a request's failure that is the deployment's (connect, timeout, 502-504, 429); True when this one
        took the deployment out of rotation."""
        times = self.fail_times
        times.append(now)
        while times and now - times[0] > FAIL_WINDOW_S:
            times.popleft()
        if self.up and len(times) >= allowed_fails:
            self._leave("requests", reason)
            self.down_until = now + cooldown_s
            return True
        return False

    def probed(self, now: float, problem: str | None, misconfigured: bool = False) -> str | None:
        """Take in one probe's result (None: it answered and serves the upstream id). Returns "left" or
        "rejoined" when this result moved the deployment out of or into rotation, else None."""
        if problem is None:
            self.probe_failures, self.probe_successes = 0, self.probe_successes + 1
            if not self.up and (self.down_by != "probes" or self.probe_successes >= PROBE_SUCCESSES_TO_RETURN):
                if self.down_by == "requests" and now < self.down_until:
                    return None  # still cooling down after request failures
                self.up, self.down_reason, self.down_by = True, None, None
                self.fail_times.clear()
                return "rejoined"
            return None
        self.probe_successes, self.probe_failures = 0, self.probe_failures + 1
        if misconfigured:
            was_up = self.up
            self._leave("misconfigured", problem)
            return "left" if was_up else None
        if self.up and self.probe_failures >= PROBE_FAILURES_TO_LEAVE:
            self._leave("probes", problem)
            return "left"
        if not self.up and self.down_by == "requests":
            self.down_until = max(self.down_until, now)  # still failing: the next probe decides again
        return None

    def _leave(self, by: str, reason: str) -> None:
        self.up, self.down_by, self.down_reason = False, by, reason


@dataclass
class ModelGroup:
    name: str
    tiers: list[list[DeploymentState]]  # by `order`, most preferred first

    @property
    def members(self) -> list[DeploymentState]:
        return [s for tier in self.tiers for s in tier]


def build_groups(config: ProxyConfig, previous: dict[str, ModelGroup] | None = None) -> dict[str, ModelGroup]:
    """Groups by model name; a deployment unchanged since `previous` keeps what the router learned about it."""
    known = {s.d: s for g in (previous or {}).values() for s in g.members}
    by_name: dict[str, list[DeploymentState]] = {}
    for d in config.deployments:
        by_name.setdefault(d.model_name, []).append(known.get(d) or DeploymentState(d))
    groups = {}
    for name, states in by_name.items():
        orders = sorted({s.d.order if s.d.order is not None else math.inf for s in states})
        tiers = [[s for s in states if (s.d.order if s.d.order is not None else math.inf) == o] for o in orders]
        groups[name] = ModelGroup(name, tiers)
    return groups


def _weights(candidates: list[DeploymentState]) -> list[float] | None:
    """simple-shuffle weights: `weight`, else `rpm`, else `tpm`, else uniform (None)."""
    for attr in ("weight", "rpm", "tpm"):
        if any(getattr(s.d, attr) is not None for s in candidates):
            values = [getattr(s.d, attr) for s in candidates]
            known = [v for v in values if v is not None]
            fill = sum(known) / len(known)  # an entry without the field counts as an average one
            return [v if v is not None else fill for v in values]
    return None


def pick_deployment(group: ModelGroup, strategy: str, exclude: set[DeploymentState] | frozenset = frozenset(),
                    now: float | None = None, rng: random.Random | None = None) -> DeploymentState | None:
    """The deployment for the next attempt, or None when every one is excluded, cooling down or at its limit."""
    if now is None:
        now = time.monotonic()
    rng = rng or _RNG
    usage_based = strategy.startswith("usage-based")
    for tier in group.tiers:
        candidates = [s for s in tier if s.up and s not in exclude and (not usage_based or s.under_limits(now))]
        if not candidates:
            continue
        if len(candidates) == 1:
            return candidates[0]
        if strategy == "simple-shuffle":
            weights = _weights(candidates)
            return rng.choices(candidates, weights)[0] if weights else rng.choice(candidates)
        if strategy == "least-busy":
            low = min(s.in_flight for s in candidates)
            return rng.choice([s for s in candidates if s.in_flight == low])
        if strategy == "latency-based-routing":
            if rng.random() < LATENCY_EXPLORE:
                return rng.choice(candidates)
            return min(candidates, key=lambda s: s.latency_s or 0.0)
        # usage-based-routing(-v2): least tokens this minute
        low = min(s.minute_tokens for s in candidates)
        return rng.choice([s for s in candidates if s.minute_tokens == low])
    return None
