"""Budgets and TPM per team without a database: enforced, kept across restarts, shared by workers."""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from support import LLMGATE, ROOT, http, launch_gateway, sha256_hex, start_gateway, wait_until

KEY = "sk-budget-team-0123456789abcdef"
OTHER = "sk-budget-other-0123456789abcde"
MODEL = "llama-3.1-8b-instruct"


def chat(gw, key: str = KEY, max_tokens: int = 16):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": max_tokens}
    return http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})


def test_budget_refuses_once_over_survives_restart_and_resets_next_month(spawn, tmp_path):
    teams = f"""  small:
    keys: [sha256:{sha256_hex(KEY)}]
    budget: {{tokens_per_month: 50}}
  other:
    keys: [sha256:{sha256_hex(OTHER)}]
"""
    november = {"LLMGATE_FAKE_TIME": "2026-11-30T22:00:00Z"}
    gw = start_gateway(spawn, tmp_path, teams, env=november)
    used = 0
    while used < 50:  # each answer is 16 completion tokens plus a few prompt tokens
        r = chat(gw)
        assert r.status == 200
        used += r.json()["usage"]["total_tokens"]
    refused = chat(gw)
    assert refused.status == 429
    err = refused.json()["error"]
    assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
    assert f"{used:,} of its 50 tokens" in err["message"] and "2026-12-01" in err["message"]
    assert refused.headers.get("x-should-retry") == "false"
    assert chat(gw, OTHER).status == 200  # other teams are unaffected
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}])
    metrics = http("GET", f"http://127.0.0.1:{gw.proxy_port}/metrics").text
    assert re.search(r'llmgate_budget_used_ratio\{team="small"\} 1\.\d+', metrics)
    assert re.search(r'llmgate_rate_limit_hits_total\{kind="budget",team="small"\} 2\.0', metrics)

    gw.svc.stop()
    gw.svc = launch_gateway(spawn, tmp_path, env=november)
    assert chat(gw).status == 429  # rebuilt from the usage log: the restart lost nothing

    gw.svc.stop()
    gw.svc = launch_gateway(spawn, tmp_path, env={"LLMGATE_FAKE_TIME": "2026-12-01T00:05:00Z"})
    assert chat(gw).status == 200

    budget = subprocess.run([*LLMGATE, "usage", "--budget", "--teams", str(gw.teams), "--logs", str(gw.log_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={"LLMGATE_FAKE_TIME": "2026-11-30T23:00:00Z", "PATH": "/usr/bin:/bin"})
    assert budget.returncode == 0, budget.stderr
    line = next(x for x in budget.stdout.splitlines() if x.startswith("small"))
    assert f"{used:,}" in line and "50" in line


def test_tpm_holds_across_two_proxycore_workers(spawn, tmp_path):
    teams = f"""  metered:
    keys: [sha256:{sha256_hex(KEY)}]
    tpm: 200
"""
    # early in a minute, so the test's burst cannot straddle two windows
    gw = start_gateway(spawn, tmp_path, teams, extra="  workers: 2\n", env={"LLMGATE_FAKE_TIME": "2026-11-24T10:00:02Z"})
    assert "2 workers" in gw.svc.output
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: chat(gw), range(30)))
    ok = [r for r in results if r.status == 200]
    limited = [r for r in results if r.status == 429]
    assert len(ok) + len(limited) == 30
    # Each request is charged max_tokens plus its body's bytes / 4 up front, then its real use when it ends.
    # One counter for the team: the real tokens served stay within 200, and the limit is reached, not halved.
    # (Two counters, one per worker, would let through up to twice as much.)
    charge = 16 + len(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "count"}],
                                  "max_tokens": 16}).encode()) // 4
    served = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert 200 - charge < served <= 200, (served, len(ok))
    err = limited[0].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "200 tokens per minute" in err["message"]
    assert 1 <= int(limited[0].headers["retry-after"]) <= 60


def test_rpm_hits_from_nginx_are_counted(spawn, tmp_path):
    teams = f"""  limited:
    keys: [sha256:{sha256_hex(KEY)}]
    rpm: 1
    burst: 0
"""
    gw = start_gateway(spawn, tmp_path, teams)
    statuses = [chat(gw).status for _ in range(4)]
    assert statuses == [200, 429, 429, 429]

    def hits() -> float:
        text = http("GET", f"http://127.0.0.1:{gw.proxy_port}/metrics").text
        m = re.search(r'llmgate_rate_limit_hits_total\{kind="rpm",team="limited"\} (\S+)', text)
        return float(m.group(1)) if m else 0.0

    assert wait_until(lambda: hits() == 3.0, timeout=5)
