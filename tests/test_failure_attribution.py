"""Failures are put on the right party: a request that backends refuse with a 500 is the request's fault, and
no client can take a model out of rotation for everyone else by sending one."""

from __future__ import annotations

import threading
import time

import pytest

from support import MASTER_KEY, http, start_fake_vllm, start_proxy, write_config

MODEL = "llama-3.1-8b-instruct"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
VALID = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
POISON = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}  # invalid


def fake_config(base_v1: str, **changes) -> None:
    assert http("POST", base_v1.removesuffix("/v1") + "/fake/config", changes).status == 200


@pytest.fixture
def group(spawn, tmp_path):
    """Two deployments of one model on backends that answer an invalid request with a 500 (llama-cpp-python)."""
    _, a = start_fake_vllm(spawn)
    _, b = start_fake_vllm(spawn)
    for base in (a, b):
        fake_config(base, mode="invalid-500")
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": a, "model_info": {"id": "a"}},
        {"model_name": MODEL, "api_base": b, "model_info": {"id": "b"}},
    ], router={"num_retries": 3, "allowed_fails": 3, "cooldown_time": 5})
    _, base = start_proxy(spawn, cfg)
    return base, a, b


def test_the_second_deployment_s_500_is_the_answer_and_counts_against_nobody(group):
    base, a, b = group
    r = http("POST", base + "/v1/chat/completions", POISON, AUTH)
    assert r.status == 500 and "max_tokens" in r.json()["error"]["message"], r.text  # the backend's own words
    seen = [http("GET", x.removesuffix("/v1") + "/fake/stats").json()["by_path"].get("/v1/chat/completions", 0)
            for x in (a, b)]
    assert sorted(seen) == [1, 1]  # one try each, then it stopped: no retry can change the answer
    health = http("GET", base + "/health", headers=AUTH).json()
    assert health["unhealthy_count"] == 0 and all(e["recent_failures"] == 0 for e in health["healthy_endpoints"])


def test_a_poison_request_every_2s_for_30s_costs_another_team_nothing(group):
    base, _, _ = group
    victim_errors: list[int] = []
    victim_ok = 0
    stop = threading.Event()

    def victim() -> None:
        nonlocal victim_ok
        deadline = time.monotonic() + 40  # bounded even if the poisoner stalls
        while not stop.is_set() and time.monotonic() < deadline:
            status = http("POST", base + "/v1/chat/completions", VALID, AUTH).status
            if status == 200:
                victim_ok += 1
            else:
                victim_errors.append(status)

    worker = threading.Thread(target=victim)
    worker.start()
    try:
        poison_statuses = []
        for _ in range(15):  # every 2 s for 30 s
            started = time.monotonic()
            poison_statuses.append(http("POST", base + "/v1/chat/completions", POISON, AUTH).status)
            time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))
    finally:
        stop.set()
        worker.join(60)
    assert victim_errors == [] and victim_ok > 15
    assert set(poison_statuses) == {500}
    metrics = http("GET", base + "/metrics").text
    assert 'llmgate_deployment_up{deployment="a"} 1.0' in metrics and 'llmgate_deployment_up{deployment="b"} 1.0' in metrics
