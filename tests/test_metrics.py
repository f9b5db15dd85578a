"""Prometheus metrics of proxycore."""

from __future__ import annotations

import re

import openai

from support import MASTER_KEY, http, start_fake_vllm, start_proxy, write_config

MODEL = "llama-3.1-8b-instruct"
INTERNAL = "sk-internal-metrics-test"


def value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_request_token_cost_and_deployment_metrics(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{
        "model_name": MODEL, "api_base": api_base, "model_info": {"id": "dep-a", "input_cost_per_token": 0.5,
                                                                  "output_cost_per_token": 1.0}}])
    _, base = start_proxy(spawn, cfg, env={"LLMGATE_INTERNAL_KEY": INTERNAL})
    c = openai.OpenAI(base_url=base + "/v1", api_key=INTERNAL, max_retries=0, default_headers={"X-Team": "blue"})
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x y"}], max_tokens=3)
    list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True))
    http("POST", base + "/v1/chat/completions", {"model": MODEL}, {"Authorization": "Bearer wrong"})
    text = http("GET", base + "/metrics").text
    assert value(text, "llmgate_requests_total", team="blue", model=MODEL, status="200") == 2
    assert value(text, "llmgate_requests_total", status="401") == 1
    assert value(text, "llmgate_output_tokens_total", team="blue", model=MODEL) == 5
    assert value(text, "llmgate_input_tokens_total", team="blue") > r.usage.prompt_tokens
    assert value(text, "llmgate_cost_usd_total", team="blue") > 0
    assert value(text, "llmgate_request_duration_seconds_count", team="blue") == 2
    assert value(text, "llmgate_ttft_seconds_count", team="blue") == 1
    assert value(text, "llmgate_deployment_up", deployment="dep-a") == 1
    assert value(text, "llmgate_requests_in_flight", deployment="dep-a") == 0
    http("POST", api_base.removesuffix("/v1") + "/fake/config", {"mode": "error-500"})
    http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
         {"Authorization": f"Bearer {MASTER_KEY}"})
    text = http("GET", base + "/metrics").text
    assert value(text, "llmgate_backend_errors_total", deployment="dep-a", kind="status_5xx") == 3
