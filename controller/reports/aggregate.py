"""Usage per team, model, day and key, summed from proxycore's usage log and nginx's access log.

Reads line by line (rotated and gzip-compressed files too), in memory bounded by the number of
groups, not of lines. Each request is counted once: from proxycore's usage line when proxycore
handled it, else from nginx's access line (401, 429 from limit_req, 421, 413, proxycore down).
"""

from __future__ import annotations

import gzip
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO

import orjson

from controller.model.usage_record import month_start, parse_timestamp, report_fields, usage_timestamp

GROUP_FIELDS = ("team", "model", "day", "key")
OUTCOMES = ("ok", "rate_limited", "quota_exceeded", "unauthorized", "forbidden", "client_errors", "server_errors")
PROGRESS_MIN_BYTES = 256 * 1024 * 1024
_ROTATED = re.compile(r"^(usage|access)[^/]*\.jsonl(\.\d+)?(\.gz)?$")


# ---------------------------------------------------------------- percentiles in bounded memory

_BUCKET_BASE = 1.04  # each bucket is 4 % wide: a percentile comes out within 2 % of the exact value
_INV_LOG_BASE = 1 / math.log(_BUCKET_BASE)
_LOWEST = -118  # everything under 0.01 ms shares one bucket


class Histogram:
    """A sparse log-bucketed histogram of milliseconds: at most a few hundred buckets, however many values."""

    __slots__ = ("counts", "n")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, ms: float) -> None:
        b = int(math.log(ms) * _INV_LOG_BASE) if ms > 0.01 else _LOWEST
        counts = self.counts
        counts[b] = counts.get(b, 0) + 1
        self.n += 1

    def merge(self, other: Histogram) -> None:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        self.n += other.n

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return round(_BUCKET_BASE ** (b + 0.5), 3)  # the bucket's geometric middle
        return None


# ---------------------------------------------------------------- groups

_NOT_EXACT = frozenset({"counted", "estimated"})  # usage_source of lines whose tokens are not all the backend's
OK, RATE_LIMITED, QUOTA, UNAUTHORIZED, FORBIDDEN, CLIENT, SERVER = range(len(OUTCOMES))


def outcome(status: int, error: str | None) -> int:
    """The index in OUTCOMES of a request's outcome."""
    if 200 <= status < 300:
        return OK
    if status == 429:
        return QUOTA if error == "insufficient_quota" else RATE_LIMITED
    if status == 401:
        return UNAUTHORIZED
    if status == 403:
        return FORBIDDEN
    return CLIENT if status < 500 else SERVER


class Group:
    __slots__ = ("requests", "outcomes", "prompt_tokens", "completion_tokens", "estimated_tokens", "cost_usd", "latency",
                 "ttft")

    def __init__(self) -> None:
        self.requests = 0
        self.outcomes = [0] * len(OUTCOMES)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.estimated_tokens = 0  # of the tokens above, those of lines whose usage_source is counted or estimated
        self.cost_usd = 0.0
        self.latency = Histogram()
        self.ttft = Histogram()

    def merge(self, other: Group) -> None:
        self.requests += other.requests
        self.outcomes = [a + b for a, b in zip(self.outcomes, other.outcomes)]
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.estimated_tokens += other.estimated_tokens
        self.cost_usd += other.cost_usd
        self.latency.merge(other.latency)
        self.ttft.merge(other.ttft)

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            **dict(zip(OUTCOMES, self.outcomes)),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "estimated_tokens": self.estimated_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "p50_ms": self.latency.quantile(0.50),
            "p95_ms": self.latency.quantile(0.95),
            "ttft_p50_ms": self.ttft.quantile(0.50),
        }


@dataclass
class Skipped:
    partial: int = 0  # an unfinished last line (a log being written)
    malformed: int = 0  # not JSON, or JSON of another shape (an older format)
    examples: list[str] = field(default_factory=list)  # file:line of the first few

    @property
    def total(self) -> int:
        return self.partial + self.malformed

    def note(self, where: str, partial: bool = False) -> None:
        if partial:
            self.partial += 1
        else:
            self.malformed += 1
        if len(self.examples) < 20:
            self.examples.append(where + (" (partial last line)" if partial else ""))


@dataclass
class Filters:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    team: str | None = None


def _utc_text(ts: datetime | None) -> str | None:
    return None if ts is None else usage_timestamp(ts)


class UsageReport:
    """Accumulates requests into groups keyed by the chosen fields."""

    def __init__(self, by: tuple[str, ...], filters: Filters):
        self.by, self.filters = by, filters
        self.groups: dict[tuple, Group] = {}
        self.skipped = Skipped()
        self.lines = 0
        index = [GROUP_FIELDS.index(f) for f in by]
        pick = itemgetter(*index)
        self._project = pick if len(index) > 1 else (lambda v: (pick(v),))
        self._since, self._until = _utc_text(filters.since), _utc_text(filters.until)

    def _group(self, team, model, day, key) -> Group:
        k = self._project((team, model, day, key))
        g = self.groups.get(k)
        if g is None:
            g = self.groups[k] = Group()
        return g

    def _keep(self, ts: str, team: str | None) -> bool:
        if self.filters.team is not None and team != self.filters.team:
            return False
        if self._since is not None and ts < self._since:
            return False
        return self._until is None or ts < self._until

    def add_usage(self, d: dict) -> bool:
        """A proxycore usage line; False when it does not have the current shape."""
        r = report_fields(d)
        if r is None:
            return False
        ts, status, team, prompt, completion, model, key, error, cost, latency, stream, ttft = r
        if latency is None:
            return False
        if (self._since is not None or self._until is not None or self.filters.team is not None) and not self._keep(ts, team):
            return True
        g = self._group(team, model, ts[:10], key)
        g.requests += 1
        g.outcomes[0 if 200 <= status < 300 else outcome(status, error)] += 1
        g.prompt_tokens += prompt
        g.completion_tokens += completion
        if (prompt or completion) and d.get("usage_source") in _NOT_EXACT:
            g.estimated_tokens += prompt + completion
        if cost:
            g.cost_usd += cost
        g.latency.add(latency)
        if stream and ttft is not None:
            g.ttft.add(ttft)
        return True

    def add_access(self, d: dict) -> bool:
        """An nginx access line; counted only when proxycore did not answer (its own line counts those)."""
        try:
            status = int(d["status"])
            ts = usage_timestamp(parse_timestamp(d["time"]))
            answered_by_proxycore = d["proxied"]
            team, key = d["team"] or None, d["key_id"] or None
            request_time = float(d["request_time"])
        except (KeyError, TypeError, ValueError):
            return False
        if answered_by_proxycore or str(d.get("uri", "")).startswith("/-/"):  # /-/: the gateway's own checks
            return True
        if not self._keep(ts, team):
            return True
        g = self._group(team, None, ts[:10], key)
        g.requests += 1
        g.outcomes[outcome(status, None)] += 1
        g.latency.add(request_time * 1000)
        return True

    def rows(self) -> list[dict]:
        out = []
        for k in sorted(self.groups, key=lambda t: tuple("" if v is None else str(v) for v in t)):
            row = dict(zip(self.by, k))
            row.update(self.groups[k].as_dict())
            out.append(row)
        return out

    def as_json(self) -> dict:
        return {"groups": self.rows(), "skipped_lines": self.skipped.total}


# ---------------------------------------------------------------- reading

def log_files(paths: Iterable[str]) -> list[tuple[Path, str]]:
    """(file, kind) for every usage/access log in the given files or directories, rotated ones included."""
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        candidates = sorted(p.iterdir()) if p.is_dir() else [p]
        for f in candidates:
            if not f.is_file():
                continue
            m = _ROTATED.match(f.name)
            if m:
                found.append((f, m.group(1)))
            elif not p.is_dir():
                raise FileNotFoundError(f"{f}: not a usage.jsonl or access.jsonl log (rotated names like usage.jsonl.1.gz count)")
    return found


def _open(path: Path) -> BinaryIO | gzip.GzipFile:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb", buffering=1 << 20)


def read_logs(report: UsageReport, files: list[tuple[Path, str]], progress: Progress | None = None) -> None:
    loads = orjson.loads
    for path, kind in files:
        add = report.add_usage if kind == "usage" else report.add_access
        with _open(path) as f:
            lineno = 0
            for raw in f:
                lineno += 1
                report.lines += 1
                if progress is not None and lineno & 0xFFFF == 0:
                    progress.update(path, f)
                if not raw.endswith(b"\n"):
                    report.skipped.note(f"{path}:{lineno}", partial=True)
                    continue
                try:
                    d = loads(raw)
                except orjson.JSONDecodeError:
                    report.skipped.note(f"{path}:{lineno}")
                    continue
                if not isinstance(d, dict) or not add(d):
                    report.skipped.note(f"{path}:{lineno}")
        if progress is not None:
            progress.file_done(path)


class Progress:
    """A one-line progress bar on stderr, for big inputs on a terminal."""

    def __init__(self, files: list[tuple[Path, str]]):
        self.sizes = {p: p.stat().st_size for p, _ in files}
        self.total = sum(self.sizes.values()) or 1
        self.done = 0

    def update(self, path: Path, f) -> None:
        try:
            pos = f.fileobj.tell() if hasattr(f, "fileobj") and f.fileobj else f.tell()
        except (OSError, ValueError):
            return
        self._draw(self.done + pos)

    def file_done(self, path: Path) -> None:
        self.done += self.sizes[path]
        self._draw(self.done)

    def _draw(self, at: int) -> None:
        share = min(1.0, at / self.total)
        bar = "#" * int(share * 40)
        sys.stderr.write(f"\rreading logs [{bar:<40}] {share * 100:5.1f}% of {self.total / 1e6:,.0f} MB")
        if share >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


def parse_day(value: str, end: bool = False) -> datetime:
    """A date (YYYY-MM-DD) or an ISO timestamp; `--until` of a date includes that whole day."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            d = date.fromordinal(date.fromisoformat(value).toordinal() + (1 if end else 0))
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        return parse_timestamp(value)
    except ValueError:
        raise ValueError(f"expected a date like 2026-11-01 or an ISO timestamp, got {value!r}") from None


def month_to_date(usage_log: str, now: datetime) -> dict[str, tuple[int, float]]:
    """Each team's tokens and USD this month, from a usage log and its rotated siblings."""
    path = Path(usage_log)
    if not path.parent.is_dir():
        return {}
    start = month_start(now)
    files = [(p, kind) for p, kind in log_files([str(path.parent)]) if kind == "usage" and p.name.startswith(path.name)]
    report = UsageReport(("team",), Filters(since=start))
    read_logs(report, files)
    return {k[0]: (g.prompt_tokens + g.completion_tokens, g.cost_usd) for k, g in report.groups.items() if k[0]}
