"""The usage log: one whole JSON line per request, reopened on SIGUSR1, shared by workers."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import openai

from support import MASTER_KEY, free_port, http, start_fake_vllm, start_proxy, wait_until, write_config

MODEL = "llama-3.1-8b-instruct"
FIELDS = {"ts", "request_id", "team", "key_id", "key_hash", "model", "endpoint", "deployment", "status", "stream",
          "prompt_tokens", "completion_tokens", "total_tokens", "cost", "latency_ms", "ttft_ms", "retries",
          "fallback", "error", "usage_source"}


def lines(path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_line_per_request_with_every_field_and_cost(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{
        "model_name": MODEL, "api_base": api_base,
        "model_info": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}}])
    log = tmp_path / "logs" / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    c = openai.OpenAI(base_url=base + "/v1", api_key=MASTER_KEY, max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a b c"}], max_tokens=4)
    list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=3, stream=True))
    http("POST", base + "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
         {"Authorization": f"Bearer {MASTER_KEY}"})
    http("POST", base + "/v1/chat/completions", {"model": MODEL}, {"Authorization": "Bearer wrong"})
    got = lines(log)
    assert [line["status"] for line in got] == [200, 200, 404, 401]
    assert all(set(line) == FIELDS for line in got)
    first = got[0]
    assert first["prompt_tokens"] == r.usage.prompt_tokens and first["completion_tokens"] == 4
    assert first["total_tokens"] == r.usage.total_tokens
    assert abs(first["cost"] - (r.usage.prompt_tokens * 0.001 + 4 * 0.002)) < 1e-9
    assert got[1]["stream"] is True and got[1]["completion_tokens"] == 3 and got[1]["ttft_ms"] > 0
    assert got[2]["error"] == "model_not_found" and got[3]["error"] == "invalid_api_key"
    assert got[0]["ts"].endswith("Z")


def test_sigusr1_reopens_the_file_for_logrotate(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    log = tmp_path / "usage.jsonl"
    proxy, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    c = openai.OpenAI(base_url=base + "/v1", api_key=MASTER_KEY, max_retries=0)
    for _ in range(3):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    rotated = tmp_path / "usage.jsonl.1"
    log.rename(rotated)
    proxy.signal(signal.SIGUSR1)
    assert wait_until(log.exists, timeout=5)
    for _ in range(2):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert len(lines(rotated)) == 3 and len(lines(log)) == 2


def test_two_workers_share_one_port_one_log_and_one_metrics_view(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    log = tmp_path / "usage.jsonl"
    port = free_port()
    proxy, base = start_proxy(spawn, cfg, "--usage-log", str(log), "--workers", "2", port=port)
    assert "2 workers" in proxy.output
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}

    def one(_):
        return http("POST", base + "/v1/chat/completions", body, {"Authorization": f"Bearer {MASTER_KEY}"}).status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200
    got = lines(log)  # every line parses: none torn or interleaved
    assert len(got) == 200 and len({line["request_id"] for line in got}) == 200
    # Whichever worker answers the scrape, it reports the whole group.
    for _ in range(4):
        text = http("GET", base + "/metrics").text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("llmgate_requests_total{") and f'model="{MODEL}"' in line)
        assert total == 200
    # a worker that crashes is replaced
    pids = set()
    import subprocess
    out = subprocess.run(["pgrep", "-P", str(proxy.pid)], capture_output=True, text=True).stdout.split()
    pids = {int(p) for p in out}
    assert len(pids) == 2
    import os
    os.kill(pids.pop(), signal.SIGKILL)
    assert wait_until(lambda: "exited (signal 9); starting another" in proxy.output, timeout=5)
    assert wait_until(lambda: len(subprocess.run(["pgrep", "-P", str(proxy.pid)], capture_output=True,
                                                 text=True).stdout.split()) == 2, timeout=5)
    assert one(0) == 200
