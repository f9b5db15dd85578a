"""Health: probes take a dead, frozen or misconfigured deployment out of rotation and say why; a frozen backend
fails a request over within the first-byte timeout; /v1/models shows the backends' own cards."""

from __future__ import annotations

import os
import signal
import time

import pytest

from support import MASTER_KEY, free_port, http, start_fake_vllm, start_proxy, wait_until, write_config

MODEL = "llama-3.1-8b-instruct"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def health(base: str) -> dict:
    return http("GET", base + "/health", headers=AUTH).json()


def test_a_deployment_on_a_dead_port_leaves_rotation_within_15s(spawn, tmp_path):
    _, alive = start_fake_vllm(spawn)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": alive, "model_info": {"id": "alive"}},
        {"model_name": MODEL, "api_base": dead, "model_info": {"id": "dead"}},
    ])
    started = time.monotonic()
    svc, base = start_proxy(spawn, cfg)
    assert wait_until(lambda: health(base)["unhealthy_count"] == 1, timeout=15), health(base)
    assert time.monotonic() - started < 15
    entry = health(base)["unhealthy_endpoints"][0]
    assert entry["deployment"] == "dead" and "cannot connect" in entry["reason"] and dead in entry["reason"]
    assert wait_until(lambda: any("deployment dead left rotation" in line for line in svc.lines), timeout=5)
    assert 'llmgate_deployment_up{deployment="dead"} 0.0' in http("GET", base + "/metrics").text
    for _ in range(10):  # every request goes to the one that answers
        assert http("POST", base + "/v1/chat/completions", BODY, AUTH).status == 200


def test_a_frozen_backend_fails_over_within_the_first_byte_timeout(spawn, tmp_path):
    frozen, a = start_fake_vllm(spawn)
    _, b = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": a, "model_info": {"id": "a"}, "timeout": 2, "order": 1},
        {"model_name": MODEL, "api_base": b, "model_info": {"id": "b"}, "timeout": 2, "order": 2},
    ], router={"num_retries": 1})
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    assert http("POST", base + "/v1/chat/completions", BODY, AUTH).status == 200  # `a` serves while it can
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = http("POST", base + "/v1/chat/completions", BODY, AUTH, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert r.status == 200, r.text
    assert 2 <= elapsed < 6, elapsed  # one first-byte timeout (2 s), then the other deployment
    last = [line for line in log.read_text().splitlines() if line][-1]
    assert '"deployment":"b"' in last and '"retries":1' in last


def test_a_wrong_upstream_id_is_reported_at_start_and_on_health(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)  # serves llama-3.1-8b-instruct
    _, other = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": api_base, "model": "hosted_vllm/meta-llama/Llama-3.1-8B", "model_info": {"id": "typo"}},
        {"model_name": MODEL, "api_base": other, "model_info": {"id": "right"}},
    ])
    svc, base = start_proxy(spawn, cfg)
    assert wait_until(lambda: any("typo" in x and "does not serve `meta-llama/Llama-3.1-8B`" in x for x in svc.lines), 10), \
        svc.output
    line = next(x for x in svc.lines if "does not serve" in x)
    assert "it serves: llama-3.1-8b-instruct" in line
    entry = next(e for e in health(base)["unhealthy_endpoints"] if e["deployment"] == "typo")
    assert entry["misconfigured"] is True and entry["served_models"] == ["llama-3.1-8b-instruct"]
    for _ in range(10):  # never a backend 404 naming an id the client did not send
        assert http("POST", base + "/v1/chat/completions", BODY, AUTH).status == 200


def test_models_show_the_backend_s_card_under_the_gateway_s_name(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": "chat-model", "api_base": api_base}])
    _, base = start_proxy(spawn, cfg)

    def card() -> dict:
        return http("GET", base + "/v1/models", headers=AUTH).json()["data"][0]

    assert wait_until(lambda: "max_model_len" in card(), timeout=10), card()
    direct = http("GET", api_base + "/models").json()["data"][0]
    mine = card()
    assert mine["id"] == "chat-model" and mine["owned_by"] == direct["owned_by"] == "vllm"
    fresh = ("id", "permission")  # the fake mints a new permission id on every call, as vLLM does
    assert {k: v for k, v in mine.items() if k not in fresh} == {k: v for k, v in direct.items() if k not in fresh}
    assert mine["max_model_len"] == 8192 and mine["root"] == "llama-3.1-8b-instruct" and mine["permission"]
    assert http("GET", base + "/v1/models/chat-model", headers=AUTH).json() == mine


@pytest.mark.parametrize("interval", ["0.5"])
def test_a_deployment_that_comes_back_rejoins_after_two_good_probes(spawn, tmp_path, interval):
    port = free_port()
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": f"http://127.0.0.1:{port}/v1"}],
                       general={"health_check_interval": float(interval)})
    svc, base = start_proxy(spawn, cfg)
    assert wait_until(lambda: health(base)["unhealthy_count"] == 1, timeout=10)
    start_fake_vllm(spawn, port=port)
    assert wait_until(lambda: health(base)["healthy_count"] == 1, timeout=10), health(base)
    assert any("is back in rotation" in line for line in svc.lines)
    assert http("POST", base + "/v1/chat/completions", BODY, AUTH).status == 200
