"""Routing through proxycore: weights, strategies, tiers, retries, fallbacks, cooldown and recovery."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from support import MASTER_KEY, free_port, http, start_fake_vllm, start_proxy, wait_until, write_config

MODEL = "llama-3.1-8b-instruct"


def client(base: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=MASTER_KEY, max_retries=retries, timeout=20)


def chat(c: openai.OpenAI, model: str = MODEL) -> str:
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    return r.choices[0].message.content


def usage_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_config(base_v1: str, **settings) -> None:
    r = http("POST", base_v1.removesuffix("/v1") + "/fake/config", settings)
    assert r.status == 200, r.text


def stats(base_v1: str) -> dict:
    """The fake's counters, with "requests" and "completed" counting model requests only: health probes
    (GET /v1/models, from the start on) are not requests the router sent."""
    current = http("GET", base_v1.removesuffix("/v1") + "/fake/stats").json()
    probes = current["by_path"].get("/v1/models", 0)
    current["requests"] -= probes
    current["completed"] -= probes
    return current


AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


def health(base: str) -> dict:
    return http("GET", base + "/health", headers=AUTH).json()


def test_weights_3_to_1_split_400_requests(spawn, tmp_path):
    _, a = start_fake_vllm(spawn)
    _, b = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": a, "weight": 3, "model_info": {"id": "a"}},
        {"model_name": MODEL, "api_base": b, "weight": 1, "model_info": {"id": "b"}},
    ])
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    c = client(base)
    for _ in range(400):
        chat(c)
    counts = Counter(line["deployment"] for line in usage_lines(log))
    # Binomial(400, 0.75): mean 300, sd 8.7; 4.5 sd either side fails by chance about once in 150,000 runs.
    assert 261 <= counts["a"] <= 339, counts
    assert counts["a"] + counts["b"] == 400
    assert stats(a)["completed"] == counts["a"] and stats(b)["completed"] == counts["b"]


def test_client_model_is_rewritten_to_upstream_id_and_backend_key_used(spawn, tmp_path):
    _, a = start_fake_vllm(spawn, "--api-key", "backend-secret", model="meta-llama/Llama-3.1-8B-Instruct")
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": "llama", "api_base": a, "model": "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct",
         "api_key": "backend-secret"},
    ])
    _, base = start_proxy(spawn, cfg)
    assert chat(client(base), "llama")
    last = http("GET", a.removesuffix("/v1") + "/fake/last").json()[-1]
    assert last["body"]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    headers = {k.lower(): v for k, v in last["headers"].items()}
    assert headers["authorization"] == "Bearer backend-secret"  # never the client's key
    assert MASTER_KEY not in json.dumps(last)


def test_least_busy_spreads_concurrent_requests_evenly(spawn, tmp_path):
    _, a = start_fake_vllm(spawn, "--latency-ms", "600")
    _, b = start_fake_vllm(spawn, "--latency-ms", "600")
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": a}, {"model_name": MODEL, "api_base": b},
    ], router={"routing_strategy": "least-busy"})
    _, base = start_proxy(spawn, cfg)
    c = client(base)
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda _: chat(c), range(10)))
    assert (stats(a)["completed"], stats(b)["completed"]) == (5, 5)


def test_latency_based_prefers_the_fast_deployment(spawn, tmp_path):
    _, fast = start_fake_vllm(spawn)
    _, slow = start_fake_vllm(spawn, "--latency-ms", "80")
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": slow}, {"model_name": MODEL, "api_base": fast},
    ], router={"routing_strategy": "latency-based-routing"})
    _, base = start_proxy(spawn, cfg)
    c = client(base)
    for _ in range(60):
        chat(c)
    assert stats(fast)["completed"] >= 45, (stats(fast), stats(slow))
    assert stats(slow)["completed"] >= 1  # exploration keeps measuring it


def test_usage_based_respects_each_deployment_rpm(spawn, tmp_path):
    _, small = start_fake_vllm(spawn)
    _, big = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": small, "rpm": 3}, {"model_name": MODEL, "api_base": big, "rpm": 1000},
    ], router={"routing_strategy": "usage-based-routing-v2"})
    _, base = start_proxy(spawn, cfg)
    c = client(base)
    for _ in range(20):
        chat(c)
    assert stats(small)["completed"] <= 3
    assert stats(small)["completed"] + stats(big)["completed"] == 20


def test_order_tiers_prefer_order_1_and_fall_to_order_2(spawn, tmp_path):
    primary, a = start_fake_vllm(spawn)
    _, b = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": b, "order": 2}, {"model_name": MODEL, "api_base": a, "order": 1},
    ])
    _, base = start_proxy(spawn, cfg)
    c = client(base)
    for _ in range(10):
        chat(c)
    assert (stats(a)["completed"], stats(b)["completed"]) == (10, 0)
    primary.stop()
    for _ in range(5):
        chat(c)
    assert stats(b)["completed"] == 5


def test_5xx_and_429_are_retried_on_the_next_deployment(spawn, tmp_path):
    _, bad = start_fake_vllm(spawn)
    _, good = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": bad, "model_info": {"id": "bad"}},
        {"model_name": MODEL, "api_base": good, "model_info": {"id": "good"}},
    ], router={"allowed_fails": 1000})
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    c = client(base)
    for mode in ("error-500", "error-429"):
        fake_config(bad, mode=mode)
        for _ in range(10):
            assert chat(c)
    lines = usage_lines(log)
    assert all(line["status"] == 200 and line["deployment"] == "good" for line in lines)
    assert any(line["retries"] == 1 for line in lines)  # some first picks went to `bad`
    assert stats(bad)["requests"] >= 1


def test_fallback_group_serves_when_every_deployment_fails(spawn, tmp_path):
    _, broken = start_fake_vllm(spawn)
    _, other = start_fake_vllm(spawn, model="qwen")
    fake_config(broken, mode="error-500")
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": broken},
        {"model_name": "qwen", "api_base": other, "model": "hosted_vllm/qwen"},
    ], router={"num_retries": 1, "fallbacks": [{MODEL: ["qwen"]}]})
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    assert chat(client(base))
    line = usage_lines(log)[-1]
    assert line["status"] == 200 and line["fallback"] == "qwen" and line["retries"] == 2
    assert stats(broken)["requests"] == 2  # the first try and one retry, then the fallback


def test_retries_exhausted_give_502_with_openai_error(spawn, tmp_path):
    _, broken = start_fake_vllm(spawn)
    fake_config(broken, mode="error-500")
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": broken}],
                       router={"num_retries": 2})
    _, base = start_proxy(spawn, cfg)
    with pytest.raises(openai.InternalServerError) as info:
        chat(client(base))
    assert info.value.status_code == 502
    assert "failed with 500" in info.value.message
    assert stats(broken)["requests"] == 3


def test_killing_one_deployment_under_load_gives_zero_client_errors(spawn, tmp_path):
    victim, a = start_fake_vllm(spawn)
    _, b = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": a}, {"model_name": MODEL, "api_base": b},
    ])
    _, base = start_proxy(spawn, cfg)
    c = client(base)  # max_retries=0: every recovery must happen inside the gateway
    errors: list[Exception] = []
    done = Counter()
    stop_at = time.monotonic() + 4.0

    def load() -> None:
        for _ in range(2000):  # bounded; the deadline ends it first
            if time.monotonic() > stop_at:
                return
            try:
                chat(c)
                done["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - any failure counts
                errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim.signal(signal.SIGKILL)
    for t in threads:
        t.join()
    assert errors == []
    assert done["ok"] > 50
    h = health(base)
    assert h["unhealthy_count"] == 1 and h["healthy_count"] == 1


def test_cooled_down_deployment_returns_after_health_check(spawn, tmp_path):
    port = free_port()
    victim, a = start_fake_vllm(spawn, port=port)
    _, b = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": a, "model_info": {"id": "a"}},
        {"model_name": MODEL, "api_base": b, "model_info": {"id": "b"}},
    ], router={"allowed_fails": 1, "cooldown_time": 1})
    _, base = start_proxy(spawn, cfg)
    c = client(base)
    victim.stop()
    for _ in range(20):
        chat(c)
    assert [e["deployment"] for e in health(base)["unhealthy_endpoints"]] == ["a"]
    metrics = http("GET", base + "/metrics").text
    assert 'llmgate_deployment_up{deployment="a"} 0.0' in metrics
    _, a_again = start_fake_vllm(spawn, port=port)
    assert wait_until(lambda: health(base)["healthy_count"] == 2, timeout=5)
    for _ in range(30):
        chat(c)
    assert stats(a_again)["completed"] > 0
