"""Per-team rate limits in nginx: exact counts in a burst, 429 JSON with Retry-After, teams independent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from support import http, sha256_hex, start_gateway

SLOW = "sk-rate-slow-team-0123456789"
FAST = "sk-rate-fast-team-0123456789"
CHAT = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
TEAMS = f"""  slow:
    keys: [sha256:{sha256_hex(SLOW)}]
    rpm: 6
    burst: 2
  fast:
    keys: [sha256:{sha256_hex(FAST)}]
    rpm: 6000
"""


def burst(gw, key: str, n: int) -> list:
    def one(_):
        return http("POST", gw.base + "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {key}"})

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.parametrize("lookup, extra", [
    ("map", ""),
    ("service", ""),
    ("map", "  ip_rpm: 100000\n"),  # a per-IP flood limit beside the team limits must not disable them
    ("service", "  ip_rpm: 100000\n"),
])
def test_team_limit_is_exact_and_other_team_unaffected(spawn, tmp_path, lookup, extra):
    gw = start_gateway(spawn, tmp_path, TEAMS, lookup=lookup, extra=extra)
    with ThreadPoolExecutor(2) as pool:
        slow_f = pool.submit(burst, gw, SLOW, 12)
        fast_f = pool.submit(burst, gw, FAST, 40)
        slow, fast = slow_f.result(), fast_f.result()
    statuses = sorted(r.status for r in slow)
    assert statuses == [200] * 3 + [429] * 9  # rpm 6 with burst 2: burst + 1 pass at once
    assert [r.status for r in fast] == [200] * 40
    limited = next(r for r in slow if r.status == 429)
    assert limited.headers["retry-after"] == "10"  # 60 s / 6 rpm
    err = limited.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error" and "slow" in err["message"]


@pytest.mark.parametrize("lookup", ["map", "service"])
def test_rpm_with_burst_0_lets_exactly_one_through(spawn, tmp_path, lookup):
    teams = TEAMS.replace("burst: 2", "burst: 0")
    gw = start_gateway(spawn, tmp_path, teams, lookup=lookup)
    assert sorted(r.status for r in burst(gw, SLOW, 6)) == [200] + [429] * 5


def test_per_ip_limit_applies_too(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS, extra="  ip_rpm: 60\n  ip_burst: 4\n")
    statuses = sorted(r.status for r in burst(gw, FAST, 10))
    assert statuses == [200] * 5 + [429] * 5
