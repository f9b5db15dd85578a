"""`llmgate usage` on damaged logs: garbage, truncated and older-format lines are skipped, counted, located."""

from __future__ import annotations

import gzip
import json
import subprocess

from support import LLMGATE, ROOT


def usage_line(rid: str, team: str, status: int = 200, prompt: int = 10, completion: int = 5, **extra) -> str:
    d = {"ts": "2026-11-03T10:00:00.000Z", "request_id": rid, "team": team, "key_id": "k1", "model": "m",
         "endpoint": "chat", "deployment": "m/0", "status": status, "stream": False, "prompt_tokens": prompt,
         "completion_tokens": completion, "total_tokens": prompt + completion, "cost": 0.5, "latency_ms": 12.5,
         "ttft_ms": 3.0, "retries": 0, "fallback": None, "error": None}
    d.update(extra)
    return json.dumps(d)


def access_line(rid: str, status: int, team: str = "", proxied: str = "") -> str:
    return json.dumps({"request_id": rid, "time": "2026-11-03T10:00:01+00:00", "team": team, "key_id": "",
                       "host": "h", "method": "POST", "uri": "/v1/chat/completions", "status": status,
                       "request_time": 0.001, "upstream_response_time": "", "upstream_addr": "", "bytes": 100,
                       "proxied": proxied})


def run(*args: str):
    return subprocess.run([*LLMGATE, "usage", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_damaged_lines_are_skipped_counted_and_located(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    good = [usage_line(f"r{i}", "team-a") for i in range(4)]
    older = json.dumps({"time": "2026-11-03", "team": "team-a", "tokens": 15})  # a shape from before
    (logs / "usage.jsonl").write_text("\n".join([good[0], "not json at all", good[1], older, "", good[2]]) + "\n"
                                      + good[3][:40])  # the last line is still being written
    with gzip.open(logs / "usage.jsonl.1.gz", "wt") as f:
        f.write(usage_line("old1", "team-b", prompt=1, completion=1) + "\n{\"half\": \n")
    (logs / "access.jsonl").write_text("\n".join([
        access_line("n1", 401), access_line("n2", 429, team="team-a"), access_line("r0", 200, "team-a", proxied="r0"),
        '{"status": "garbage"}']) + "\n")
    result = run("--logs", str(logs), "--format", "json", "--by", "team")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    groups = {g["team"]: g for g in report["groups"]}
    assert groups["team-a"]["requests"] == 4 and groups["team-a"]["ok"] == 3 and groups["team-a"]["rate_limited"] == 1
    assert groups["team-a"]["total_tokens"] == 45
    assert groups["team-b"]["total_tokens"] == 2
    assert groups[None]["unauthorized"] == 1
    # not json, the older shape, the empty line, the partial last line, the broken gz line, the bad access line
    assert report["skipped_lines"] == 6
    table = run("--logs", str(logs))
    assert table.returncode == 0
    assert "6 skipped (1 partial, 5 malformed)" in table.stdout
    assert f"{logs / 'usage.jsonl'}:2" in table.stderr and f"{logs / 'usage.jsonl'}:4" in table.stderr


def test_bad_arguments_are_clear(tmp_path):
    assert run("--logs", str(tmp_path), "--by", "colour").returncode == 2
    r = run("--logs", str(tmp_path))
    assert r.returncode == 2 and "no usage.jsonl or access.jsonl logs" in r.stderr
    r = run("--logs", str(tmp_path), "--since", "yesterday")
    assert r.returncode == 2 and "2026-11-01" in r.stderr
