"""Streaming through proxycore: byte-for-byte relay, usage chunk handling, disconnects, broken upstreams."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest

from support import MASTER_KEY, http, start_fake_vllm, start_proxy, wait_until, write_config

MODEL = "llama-3.1-8b-instruct"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def setup(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn, "--stream-chunks", "12")
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    return {"base": base, "backend": api_base, "log": log}


def sdk(setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=setup["base"] + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=20)


def raw_stream(url: str, body: dict, headers: dict[str, str]) -> bytes:
    return http("POST", url, body, headers).body


def test_streamed_text_equals_what_the_backend_sent(setup):
    c = sdk(setup)
    full = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12).choices[0].message.content
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    assert all(ch.usage is None for ch in chunks)  # the usage chunk we asked for is not shown
    line = json.loads(setup["log"].read_text().splitlines()[-1])
    assert line["stream"] is True and line["completion_tokens"] == 12 and line["prompt_tokens"] > 0
    assert line["ttft_ms"] is not None


def test_bytes_pass_through_unchanged_when_client_asks_for_usage(setup):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, "seed": 1}
    direct = raw_stream(setup["backend"] + "/chat/completions", body, {})
    proxied = raw_stream(setup["base"] + "/v1/chat/completions", body, {"Authorization": f"Bearer {MASTER_KEY}"})

    def normalise(raw: bytes) -> list[str]:  # ids and timestamps differ per response; everything else must match
        out = []
        for event in raw.decode().split("\n\n"):
            if event.startswith("data: {"):
                d = json.loads(event[6:])
                d.pop("id", None), d.pop("created", None)
                out.append(json.dumps(d, sort_keys=True))
            else:
                out.append(event)
        return out

    assert normalise(proxied) == normalise(direct)
    assert proxied.endswith(b"data: [DONE]\n\n")
    usage_events = [e for e in proxied.split(b"\n\n") if b'"choices":[]' in e]
    assert len(usage_events) == 1 and b'"usage":{' in usage_events[0]


def test_usage_only_chunk_is_removed_when_not_asked_for(setup):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "stream": True}
    proxied = raw_stream(setup["base"] + "/v1/chat/completions", body, {"Authorization": f"Bearer {MASTER_KEY}"})
    assert b'"choices":[]' not in proxied
    assert proxied.endswith(b"data: [DONE]\n\n")
    seen = http("GET", setup["backend"].removesuffix("/v1") + "/fake/last").json()[-1]
    assert seen["body"]["stream_options"] == {"include_usage": True}  # asked upstream on the client's behalf
    assert json.loads(setup["log"].read_text().splitlines()[-1])["completion_tokens"] == 6


def test_text_completion_stream(setup):
    chunks = list(sdk(setup).completions.create(model=MODEL, prompt="abc", max_tokens=5, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices)


def test_client_disconnect_cancels_upstream_within_1s(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn, "--stream-chunks", "200", "--chunk-delay-ms", "100")
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    _, base = start_proxy(spawn, cfg)
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    sock.settimeout(5)
    received = b""
    for _ in range(50):  # headers and the first event may arrive in separate reads
        received += sock.recv(65536)
        if b"data: " in received:
            break
    assert b"data: " in received
    stats_url = api_base.removesuffix("/v1") + "/fake/stats"
    assert http("GET", stats_url).json()["in_flight"] == 1
    sock.close()
    closed_at = time.monotonic()
    assert wait_until(lambda: http("GET", stats_url).json()["cancelled"] == 1, timeout=1.0)
    assert time.monotonic() - closed_at < 1.0
    assert http("GET", stats_url).json()["in_flight"] == 0


def test_upstream_dying_mid_stream_is_an_error_event_not_done(setup):
    http("POST", setup["backend"].removesuffix("/v1") + "/fake/config", {"mode": "die-mid-stream"})
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "stream": True}
    raw = raw_stream(setup["base"] + "/v1/chat/completions", body, {"Authorization": f"Bearer {MASTER_KEY}"})
    assert b"[DONE]" not in raw
    last = raw.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ") and json.loads(last[6:])["error"]["code"] == 502
    with pytest.raises(openai.APIError):
        list(sdk(setup).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True))
    line = json.loads(setup["log"].read_text().splitlines()[-1])
    assert line["status"] == 502 and line["error"] == "backend_stream_broken"
    # and the gateway keeps serving
    http("POST", setup["backend"].removesuffix("/v1") + "/fake/config", {"mode": "normal"})
    assert list(sdk(setup).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True))


def test_stream_request_rejected_by_backend_is_an_openai_error(setup):
    with pytest.raises(openai.BadRequestError) as info:
        list(sdk(setup).chat.completions.create(model=MODEL, messages=MESSAGES, temperature="hot", stream=True))
    assert info.value.status_code == 400


def _http10(base: str, body: dict) -> bytes:
    """One request over HTTP/1.0, read to the end (the server closes)."""
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(payload)
                  + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_http10_clients_get_no_chunk_framing(setup):
    """Streams are chunked, which HTTP/1.0 does not know: a clear 505; a whole answer goes through as usual."""
    streamed = _http10(setup["base"], {"model": MODEL, "messages": MESSAGES, "stream": True})
    head, _, body = streamed.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 505") or head.startswith(b"HTTP/1.1 505"), head
    assert json.loads(body)["error"]["code"] == "http_version_not_supported"
    whole = _http10(setup["base"], {"model": MODEL, "messages": MESSAGES})
    head, _, body = whole.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and json.loads(body)["object"] == "chat.completion"
