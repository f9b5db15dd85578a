"""Every stream's tokens are counted, whatever the client sent in `stream_options`, and the client sees what
vLLM would have sent it: usage only when asked for, `system_fingerprint` where vLLM puts it."""

from __future__ import annotations

import json

import pytest

from support import MASTER_KEY, http, read_then_hang_up, sha256_hex, start_fake_vllm, start_proxy, wait_until, write_config

MODEL = "llama-3.1-8b-instruct"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "Tell me a story about owls"}]
INTERNAL_KEY = "sk-internal-stream-usage-0123456789"


def fake_stats(base_v1: str) -> dict:
    return http("GET", base_v1.removesuffix("/v1") + "/fake/stats").json()


def fake_config(base_v1: str, **changes) -> None:
    assert http("POST", base_v1.removesuffix("/v1") + "/fake/config", changes).status == 200


def chunks(raw: bytes) -> list[dict]:
    events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def comparable(c: dict) -> dict:
    """A chunk without what differs between two answers to the same request (its id and time)."""
    return {k: v for k, v in c.items() if k not in ("id", "created")}


def lines(log) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x] if log.exists() else []


def line_number(log, n: int) -> dict:
    """The n-th usage line (1-based), once proxycore wrote it: it does so when the answer has ended."""
    assert wait_until(lambda: len(lines(log)) >= n, timeout=10), lines(log)
    return lines(log)[n - 1]


@pytest.fixture
def setup(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn, "--stream-chunks", "5")
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    return base, api_base, log


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}, {"continuous_usage_stats": True}])
def test_usage_is_counted_and_hidden_when_the_client_did_not_ask(setup, options):
    base, backend, log = setup
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 7, "stream": True}
    if options is not None:
        body["stream_options"] = options
    through = chunks(http("POST", base + "/v1/chat/completions", body, AUTH).body)
    before = fake_stats(backend)
    direct = chunks(http("POST", backend + "/chat/completions", body).body)  # what vLLM gives the client itself
    spent = fake_stats(backend)
    assert [comparable(c) for c in through] == [comparable(c) for c in direct]
    assert all("usage" not in c for c in through) and through[-1]["system_fingerprint"] == "fp_fakevllm"
    line = line_number(log, 1)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        spent["prompt_tokens"] - before["prompt_tokens"], spent["completion_tokens"] - before["completion_tokens"])
    assert line["completion_tokens"] == 7 and line["usage_source"] == "backend"


def test_a_client_that_asks_for_usage_gets_the_stream_unchanged(setup):
    base, backend, log = setup
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    through = chunks(http("POST", base + "/v1/chat/completions", body, AUTH).body)
    direct = chunks(http("POST", backend + "/chat/completions", body).body)
    assert [comparable(c) for c in through] == [comparable(c) for c in direct]
    assert through[-1]["choices"] == [] and through[-1]["usage"]["completion_tokens"] == 4
    assert line_number(log, 1)["completion_tokens"] == 4


def test_a_backend_without_stream_usage_is_counted_event_by_event(setup):
    base, backend, log = setup
    fake_config(backend, mode="no-stream-usage")  # llama-cpp-python: a token a chunk, no usage ever
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 9, "stream": True}
    before = fake_stats(backend)
    http("POST", base + "/v1/chat/completions", body, AUTH)
    line = line_number(log, 1)
    assert line["usage_source"] == "counted"
    assert line["completion_tokens"] == fake_stats(backend)["completion_tokens"] - before["completion_tokens"] == 9
    assert line["prompt_tokens"] == len(json.dumps(body).encode()) // 4  # the documented estimate


def test_an_aborted_stream_is_logged_with_what_was_delivered_and_charged(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn, "--stream-chunks", "200", "--chunk-delay-ms", "50")
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    budget = 60  # tokens; the aborted stream alone spends more (its prompt estimate and what it received)
    (tmp_path / "teams.yaml").write_text(f"teams:\n  team-a:\n    keys: [sha256:{sha256_hex('k')}]\n"
                                         f"    budget: {{tokens_per_month: {budget}}}\n")
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log), "--teams", str(tmp_path / "teams.yaml"),
                          env={"LLMGATE_INTERNAL_KEY": INTERNAL_KEY})
    team = {"Authorization": f"Bearer {INTERNAL_KEY}", "X-Team": "team-a", "X-Key-Id": "k"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 150, "stream": True}
    read_then_hang_up(base, "/v1/chat/completions", body, team, events=40)
    line = line_number(log, 1)
    sent = fake_stats(api_base)["completion_tokens"]
    assert line["status"] == 499 and line["usage_source"] == "counted"
    assert 39 <= line["completion_tokens"] <= sent < 150  # what reached proxycore before the hang-up, at most what the fake sent
    assert sent - line["completion_tokens"] <= 1  # the fake stopped at the disconnect: at most one event in flight
    assert line["prompt_tokens"] == len(json.dumps(body).encode()) // 4
    r = http("POST", base + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}, team)
    assert r.status == 429 and r.json()["error"]["code"] == "insufficient_quota"  # the abort was charged
