"""Prometheus metrics of proxycore, prefixed `llmgate_`.

With several workers, `llmgate proxy` sets PROMETHEUS_MULTIPROC_DIR before any worker imports
prometheus_client, so every worker writes its values there and /metrics sums the whole group.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

REQUESTS = Counter("llmgate_requests", "Requests by team, model and status", ["team", "model", "status"])
DURATION = Histogram("llmgate_request_duration_seconds", "Time from request to last byte", ["team", "model"],
                     buckets=_LATENCY_BUCKETS)
TTFT = Histogram("llmgate_ttft_seconds", "Time to first streamed byte", ["team", "model"], buckets=_TTFT_BUCKETS)
INPUT_TOKENS = Counter("llmgate_input_tokens", "Prompt tokens", ["team", "model"])
OUTPUT_TOKENS = Counter("llmgate_output_tokens", "Completion tokens", ["team", "model"])
COST = Counter("llmgate_cost_usd", "Cost in USD from model_info prices", ["team", "model"])
BACKEND_ERRORS = Counter("llmgate_backend_errors", "Failed attempts at a deployment", ["deployment", "kind"])
IN_FLIGHT = Gauge("llmgate_requests_in_flight", "Requests in flight per deployment", ["deployment"],
                  multiprocess_mode="livesum")
RATE_LIMIT_HITS = Counter("llmgate_rate_limit_hits", "Requests refused by a limit", ["team", "kind"])
BUDGET_USED = Gauge("llmgate_budget_used_ratio", "Month-to-date use over the team's budget (the larger of tokens and USD)",
                    ["team"], multiprocess_mode="mostrecent")
USAGE_LOG_FAILING = Gauge("llmgate_usage_log_failing", "1 while usage lines cannot be written and wait in memory",
                          multiprocess_mode="max")
USAGE_LINES_DROPPED = Counter("llmgate_usage_lines_dropped", "Usage lines lost: the log failed and its spool was full")
DEPLOYMENT_UP = Gauge("llmgate_deployment_up", "1 when the deployment is in rotation", ["deployment"],
                      multiprocess_mode="livemin")


def render_metrics() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's when multiprocess is on."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RequestSeries:
    """The label children of one (team, model), looked up once instead of on every request."""

    __slots__ = ("team", "model", "duration", "ttft", "input_tokens", "output_tokens", "cost", "_by_status")

    def __init__(self, team: str, model: str):
        self.team, self.model = team, model
        self.duration = DURATION.labels(team, model)
        self.ttft = TTFT.labels(team, model)
        self.input_tokens = INPUT_TOKENS.labels(team, model)
        self.output_tokens = OUTPUT_TOKENS.labels(team, model)
        self.cost = COST.labels(team, model)
        self._by_status: dict[int, object] = {}

    def requests(self, status: int):
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = REQUESTS.labels(self.team, self.model, str(status))
        return child


_series: dict[tuple[str, str], RequestSeries] = {}
_in_flight: dict[str, object] = {}


def series(team: str, model: str) -> RequestSeries:
    """Callers pass only labels of bounded cardinality: configured models, teams set by nginx."""
    s = _series.get((team, model))
    if s is None:
        s = _series[(team, model)] = RequestSeries(team, model)
    return s


def in_flight(deployment: str):
    child = _in_flight.get(deployment)
    if child is None:
        child = _in_flight[deployment] = IN_FLIGHT.labels(deployment)
    return child


def rate_limit_hit(team: str, kind: str) -> None:
    RATE_LIMIT_HITS.labels(team, kind).inc()


def budget_used(team: str, ratio: float) -> None:
    BUDGET_USED.labels(team).set(ratio)
