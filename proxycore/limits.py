"""Every admission decision proxycore makes, and its settlement when the answer ends.

Before a request goes to a backend: the team's model allow-list, the team's monthly budget and
tokens per minute, and a virtual key's models, budget, requests per minute, tokens per minute and
parallel requests. (Requests per minute of a team are nginx's `limit_req`, decided at the edge.)
Each limit that holds the request takes a `Charge`; when the answer ends, `settle` replaces the
up-front token estimate by the real use and adds the month's use for budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from controller.model.teams import DEFAULT_MAX_N, Budget, Team
from controller.model.usage_record import month_id, next_month
from controller.model.wire import KeyPolicy
from proxycore import metrics
from proxycore.errors import ApiError
from proxycore.live import ServedConfig
from proxycore.meters import Meter, Meters

PROMPT_BYTES_PER_TOKEN = 4  # the up-front estimate of a prompt: its request body's bytes / 4
DEFAULT_COMPLETION_ESTIMATE = 256  # charged up front when a request sets no max_tokens


@dataclass(slots=True)
class Charge:
    """What one request holds against one meter (a team's or a virtual key's) until its answer ends."""

    meter: Meter
    minute: int = 0
    tokens: int = 0  # charged to `minute` up front
    in_flight: bool = False  # counted against the key's parallel requests
    budget_of: Team | None = None  # a team: the month's use is added to its meter, for its budget

    def settle(self, tokens: int, cost: float, now: datetime) -> None:
        meter = self.meter
        if self.tokens:
            meter.reconcile(self.minute, tokens - self.tokens)
        if self.in_flight:
            meter.leave()
        team = self.budget_of
        if team is not None and (tokens or cost):
            used_tokens, used_usd = meter.add(month_id(now), tokens, cost)
            if team.budget is not None:
                metrics.budget_used(team.name, _budget_ratio(team.budget, used_tokens, used_usd))


def _budget_ratio(b: Budget, tokens: int, usd: float) -> float:
    return max(tokens / b.tokens_per_month if b.tokens_per_month else 0.0,
               usd / b.usd_per_month if b.usd_per_month else 0.0)


def estimate_prompt_tokens(body_bytes: int) -> int:
    """A prompt's tokens before the backend says (or when it never does): its request body's bytes / 4."""
    return body_bytes // PROMPT_BYTES_PER_TOKEN


def tokens_up_front(body: dict, prompt_bytes: int, generates: bool) -> int:
    """What a request is charged against a TPM limit before it runs: its prompt estimate and, for an endpoint
    that generates, its max_tokens (max_output_tokens for the Responses API)."""
    if not generates:
        return estimate_prompt_tokens(prompt_bytes)
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
    return estimate_prompt_tokens(prompt_bytes) + (limit if isinstance(limit, int) else DEFAULT_COMPLETION_ESTIMATE)


TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _lax_int(value: object) -> int | None:
    """A whole number as vLLM reads one (5, 5.0, "5"); None for anything else, which is the backend's to refuse."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is str and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def check_request_bounds(team: Team | None, body: dict, generates: bool) -> int | None:
    """One request's own bounds (400): at most `max_n` choices, and at most the team's `max_tokens`. Returns the
    team's cap when the request sets no token limit at all, for the caller to add; else None."""
    max_n = team.max_n if team is not None else DEFAULT_MAX_N
    who = f"team `{team.name}`" if team is not None else "this gateway"
    for field in ("n", "best_of"):
        n = _lax_int(body.get(field))
        if n is not None and n > max_n:
            raise ApiError(400, f"`{field}` is {n}; {who} allows at most {max_n} choices per request "
                           "(max_n in teams.yaml).", "max_n_exceeded", field)
    if team is None or team.max_tokens is None or not generates:
        return None
    cap = team.max_tokens
    asked = [(f, _lax_int(body.get(f))) for f in TOKEN_LIMIT_FIELDS if body.get(f) is not None]
    for field, value in asked:
        if value is not None and value > cap:
            raise ApiError(400, f"`{field}` is {value}; team `{team.name}` allows at most {cap} tokens per request "
                           "(max_tokens in teams.yaml).", "max_tokens_exceeded", field)
    return None if asked else cap


def check_model(served: ServedConfig, team: str | None, model: str) -> None:
    """The team's allow-list of teams.yaml (403)."""
    allowed = served.allowed_models(team)
    if allowed is not None and model not in allowed:
        raise ApiError(403, f"Team `{team}` may not use model `{model}`. Allowed: "
                       f"{', '.join(sorted(allowed)) or 'none'}.", "model_not_allowed", "model")


def admit_team(meters: Meters, team: Team, body: dict, prompt_bytes: int, generates: bool) -> Charge:
    """Refuse a team over its monthly budget or its tokens per minute; else charge the minute up front."""
    meter = meters.meter(team.name)
    charge = Charge(meter, budget_of=team)
    now = meters.clock.now()
    budget = team.budget
    if budget is not None:
        tokens, usd = meter.month_used(month_id(now))
        over_tokens = budget.tokens_per_month is not None and tokens >= budget.tokens_per_month
        over_usd = budget.usd_per_month is not None and usd >= budget.usd_per_month
        if over_tokens or over_usd:
            metrics.rate_limit_hit(team.name, "budget")
            used = (f"{tokens:,} of its {budget.tokens_per_month:,} tokens" if over_tokens
                    else f"${usd:,.2f} of its ${budget.usd_per_month:,.2f}")
            raise ApiError(429, f"Team `{team.name}` has used {used} for {now:%B %Y}; the budget resets on "
                           f"{next_month(now):%Y-%m-%d} 00:00 UTC.", "insufficient_quota",
                           type_="insufficient_quota", headers={"x-should-retry": "false"})
    if team.tpm is not None:
        tokens_now = tokens_up_front(body, prompt_bytes, generates)
        minute = meters.minute()
        if not meter.reserve(minute, tokens_now, team.tpm):
            metrics.rate_limit_hit(team.name, "tpm")
            wait = meters.seconds_to_next_minute()
            raise ApiError(429, f"Team `{team.name}` reached its limit of {team.tpm:,} tokens per minute; "
                           f"retry in {wait} s.", "rate_limit_exceeded", type_="tokens",
                           headers={"Retry-After": str(wait)})
        charge.minute, charge.tokens = minute, tokens_now
    return charge


def admit_key(meters: Meters, policy: KeyPolicy, team: str | None, model: str, body: dict, prompt_bytes: int,
              generates: bool, charges: list[Charge]) -> None:
    """A virtual key's own limits (DB mode): models, budget, requests per minute, tokens per minute, parallel.

    The key's charge joins `charges` as soon as it holds something, so that a later refusal releases it.
    """
    if policy.models is not None and model not in policy.models:
        raise ApiError(403, f"This key may not use model `{model}`. Allowed: "
                       f"{', '.join(sorted(policy.models)) or 'none'}.", "model_not_allowed", "model")
    if policy.max_budget is not None and policy.spend >= policy.max_budget:
        metrics.rate_limit_hit(team or "", "key_budget")
        raise ApiError(429, f"This key has spent ${policy.spend:,.4f} of its ${policy.max_budget:,.2f} budget.",
                       "insufficient_quota", type_="insufficient_quota", headers={"x-should-retry": "false"})
    charge = Charge(meters.meter(policy.meter_name))
    charges.append(charge)
    minute = meters.minute()
    if policy.rpm is not None and not charge.meter.count_request(minute, policy.rpm):
        metrics.rate_limit_hit(team or "", "key_rpm")
        wait = meters.seconds_to_next_minute()
        raise ApiError(429, f"This key reached its limit of {policy.rpm} requests per minute; retry in {wait} s.",
                       "rate_limit_exceeded", type_="requests", headers={"Retry-After": str(wait)})
    if policy.tpm is not None:
        tokens_now = tokens_up_front(body, prompt_bytes, generates)
        if not charge.meter.reserve(minute, tokens_now, policy.tpm):
            metrics.rate_limit_hit(team or "", "key_tpm")
            wait = meters.seconds_to_next_minute()
            raise ApiError(429, f"This key reached its limit of {policy.tpm:,} tokens per minute; retry in {wait} s.",
                           "rate_limit_exceeded", type_="tokens", headers={"Retry-After": str(wait)})
        charge.minute, charge.tokens = minute, tokens_now
    if policy.parallel is not None:
        if not charge.meter.enter(policy.parallel):
            metrics.rate_limit_hit(team or "", "key_parallel")
            raise ApiError(429, f"This key already has {policy.parallel} requests in flight; retry when one ends.",
                           "rate_limit_exceeded", type_="requests", headers={"Retry-After": "1"})
        charge.in_flight = True
