"""`llmgate usage`: known traffic through the full gateway comes back as exact counts and tokens."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import time

import openai
import pytest

from support import LLMGATE, ROOT, colour_share, http, screenshot, sha256_hex, start_fake_vllm, start_gateway, wait_until

KEY_A, KEY_B, KEY_R = "sk-usage-team-a-0123456789", "sk-usage-team-b-0123456789", "sk-usage-team-r-0123456789"
TEAMS = f"""  team-a:
    keys: [{{sha256: "{sha256_hex(KEY_A)}", name: a-main}}]
  team-b:
    keys: [sha256:{sha256_hex(KEY_B)}]
    models: [small]
  team-r:
    keys: [sha256:{sha256_hex(KEY_R)}]
    rpm: 1
    burst: 1
"""
FIELDS = ("requests", "ok", "rate_limited", "quota_exceeded", "unauthorized", "forbidden", "client_errors",
          "server_errors", "prompt_tokens", "completion_tokens", "total_tokens")


def usage_json(gw, *extra: str) -> dict:
    run = subprocess.run([*LLMGATE, "usage", "--logs", str(gw.log_dir), "--format", "json", *extra],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def group(report: dict, **key) -> dict:
    found = [g for g in report["groups"] if all(g.get(k) == v for k, v in key.items())]
    assert len(found) == 1, (key, report["groups"])
    return found[0]


class Expected:
    def __init__(self) -> None:
        self.groups: dict[tuple, dict] = {}

    def add(self, team, model, outcome: str, prompt: int = 0, completion: int = 0) -> None:
        g = self.groups.setdefault((team, model), dict.fromkeys(FIELDS, 0))
        g["requests"] += 1
        g[outcome] += 1
        g["prompt_tokens"] += prompt
        g["completion_tokens"] += completion
        g["total_tokens"] += prompt + completion


@pytest.fixture
def gw(spawn, tmp_path):
    _, small = start_fake_vllm(spawn, model="small")
    _, large = start_fake_vllm(spawn, model="large")
    _, flaky = start_fake_vllm(spawn, model="flaky")
    http("POST", flaky.removesuffix("/v1") + "/fake/config", {"mode": "error-500"})
    deployments = [{"model_name": m, "api_base": b, "model": f"hosted_vllm/{m}",
                    "model_info": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}}
                   for m, b in (("small", small), ("large", large), ("flaky", flaky))]
    return start_gateway(spawn, tmp_path, TEAMS, deployments=deployments)


def drive(gw, expected: Expected, round_: int) -> None:
    a = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_A, max_retries=0)
    for i in range(3):
        r = a.chat.completions.create(model="small", messages=[{"role": "user", "content": f"hello {i} {round_}"}],
                                      max_tokens=5 + i)
        expected.add("team-a", "small", "ok", r.usage.prompt_tokens, r.usage.completion_tokens)
    chunks = list(a.chat.completions.create(model="large", messages=[{"role": "user", "content": "a story"}],
                                            max_tokens=7, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    expected.add("team-a", "large", "ok", usage.prompt_tokens, usage.completion_tokens)
    with pytest.raises(openai.InternalServerError):
        a.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "x"}])
    expected.add("team-a", "flaky", "server_errors")
    b = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_B, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        b.chat.completions.create(model="large", messages=[{"role": "user", "content": "x"}])
    expected.add("team-b", "large", "forbidden")
    for _ in range(2):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.base + "/v1", api_key="sk-wrong", max_retries=0).models.list()
        expected.add(None, None, "unauthorized")
    r_client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_R, max_retries=0)
    statuses = []
    for _ in range(4):
        try:
            r = r_client.chat.completions.create(model="small", messages=[{"role": "user", "content": "r"}], max_tokens=2)
            expected.add("team-r", "small", "ok", r.usage.prompt_tokens, r.usage.completion_tokens)
            statuses.append(200)
        except openai.RateLimitError:
            expected.add("team-r", None, "rate_limited")
            statuses.append(429)
    assert statuses.count(429) >= 2


def assert_report_matches(report: dict, expected: Expected) -> None:
    assert report["skipped_lines"] == 0
    got = {(g["team"], g["model"]): g for g in report["groups"]}
    assert set(got) == set(expected.groups)
    for key, want in expected.groups.items():
        assert {f: got[key][f] for f in FIELDS} == want, key
        assert "day" not in got[key] and "key" not in got[key]


def test_report_counts_exactly_what_was_sent_even_across_rotation(gw):
    expected = Expected()
    drive(gw, expected, 1)
    # logrotate, as documented: rename, signal, then compress the old file
    for name in ("usage.jsonl", "access.jsonl"):
        (gw.log_dir / name).rename(gw.log_dir / f"{name}.1")
    gw.svc.signal(signal.SIGUSR1)
    assert wait_until(lambda: (gw.log_dir / "access.jsonl").exists() and (gw.log_dir / "usage.jsonl").exists(), 5)
    with open(gw.log_dir / "usage.jsonl.1", "rb") as src, gzip.open(gw.log_dir / "usage.jsonl.1.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (gw.log_dir / "usage.jsonl.1").unlink()
    time.sleep(1.1)  # team-r's rpm 1: a fresh second of allowance for the second round
    drive(gw, expected, 2)
    report = usage_json(gw, "--by", "team,model")
    assert_report_matches(report, expected)
    cost = group(report, team="team-a", model="small")["cost_usd"]
    g = expected.groups[("team-a", "small")]
    assert cost == pytest.approx(g["prompt_tokens"] * 0.001 + g["completion_tokens"] * 0.002)
    by_key = usage_json(gw, "--by", "team,key", "--team", "team-a")
    assert [(x["team"], x["key"]) for x in by_key["groups"]] == [("team-a", "a-main")]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    by_day = usage_json(gw, "--by", "day", "--since", today, "--until", today)
    assert [x["day"] for x in by_day["groups"]] == [today]
    assert by_day["groups"][0]["requests"] == sum(x["requests"] for x in expected.groups.values())
    assert usage_json(gw, "--by", "day", "--until", "2000-01-01")["groups"] == []
    latency = group(report, team="team-a", model="small")
    assert latency["p50_ms"] > 0 and latency["p95_ms"] >= latency["p50_ms"]
    assert group(report, team="team-a", model="large")["ttft_p50_ms"] > 0


def test_table_csv_and_html_formats(gw, tmp_path):
    drive(gw, Expected(), 1)
    base = [*LLMGATE, "usage", "--logs", str(gw.log_dir)]
    table = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert table.returncode == 0 and "team-a" in table.stdout and "(no key)" in table.stdout
    csv_out = subprocess.run([*base, "--format", "csv"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert csv_out.splitlines()[0].startswith("team,model,day,requests,ok,")
    html = tmp_path / "report.html"
    run = subprocess.run([*base, "--format", "html", "--out", str(html)], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert run.returncode == 0
    page = html.read_text()
    assert "<svg" in page and "team-a" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    png = screenshot(html, tmp_path / "report.png")
    from controller.reports.html import PALETTE

    bars = sum(colour_share(png, tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))) for c in PALETTE[:4])
    white = colour_share(png, (255, 255, 255), tolerance=2)
    assert bars > 0.005, "no chart bars in the screenshot"
    assert white < 0.98, "the page looks blank"
