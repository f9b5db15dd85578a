"""Hostile input through the whole gateway (nginx, proxycore): one tenant cannot break another's requests,
and whatever a client sends gets an answer below 500, as OpenAI-shaped JSON when it is an error, with no
traceback in any log."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import sha256_hex, start_gateway

MODEL = "llama-3.1-8b-instruct"
ATTACKER, VICTIM = "sk-hostile-attacker-0123456789", "sk-hostile-victim-0123456789"
TEAMS = f"""  attacker:
    keys: [sha256:{sha256_hex(ATTACKER)}]
  victim:
    keys: [sha256:{sha256_hex(VICTIM)}]
"""
GOOD = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def request(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def is_openai_error(raw: bytes) -> bool:
    try:
        error = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "Traceback" not in error["message"]


def hostile_bodies() -> list[tuple[bytes, dict[str, str]]]:
    deep = b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    return [
        (b"this is not gzip at all", {"Content-Encoding": "gzip"}),
        (b"nor deflate", {"Content-Encoding": "deflate"}),
        (GOOD, {"Content-Encoding": "br"}),
        (gzip.compress(GOOD)[:-8], {"Content-Encoding": "gzip"}),  # truncated
        (gzip.compress(b"{" * 100_000), {"Content-Encoding": "gzip"}),
        (zlib.compress(b'{"model": 5}'), {"Content-Encoding": "deflate"}),
        (deep, {}),
        (b'{"model": "' + MODEL.encode() + b'", "messages": [], "n": 1e999}', {}),
        (b"\xff\xfe\x00{", {}),
    ]


def test_one_tenants_hostile_requests_never_break_anothers(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS)
    stop = threading.Event()
    attacks: list[int] = []
    wrong: list[tuple] = []

    def attack() -> None:
        bodies = hostile_bodies()
        i = 0
        while not stop.is_set() and i < 20_000:  # bounded
            body, extra = bodies[i % len(bodies)]
            status, _, raw = request(gw.port, "POST", "/v1/chat/completions", body,
                                     {"Authorization": f"Bearer {ATTACKER}", "Content-Type": "application/json",
                                      **extra})
            if not (400 <= status < 500 and is_openai_error(raw)):
                wrong.append((body[:60], extra, status, raw[:300]))
            attacks.append(status)
            i += 1

    attacker = threading.Thread(target=attack)
    attacker.start()
    victim: list[int] = []
    deadline = time.monotonic() + 10.0  # the figure: 10 s of both at once
    try:
        while time.monotonic() < deadline:
            status, _, raw = request(gw.port, "POST", "/v1/chat/completions", GOOD,
                                     {"Authorization": f"Bearer {VICTIM}", "Content-Type": "application/json"})
            victim.append(status)
    finally:
        stop.set()
        attacker.join(timeout=30)
    assert not wrong, wrong[:5]
    assert len(attacks) > 50 and len(victim) > 50
    assert victim == [200] * len(victim), {s: victim.count(s) for s in set(victim)}
    assert "Traceback" not in gw.svc.output


PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/tokenize", "/rerank",
         "/v1/audio/transcriptions", "/v1/models", "/v1/models/x", "/health/readiness", "/nope", "/v1/chat/completions?x=1"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens",
                                     "n", "tools", "user", "file"]), json_values, max_size=6)
    .map(lambda d: json.dumps({"model": MODEL, **d} if "model" not in d else d).encode()),
)
encodings = st.sampled_from([None, "gzip", "deflate", "identity", "br", "gzip, gzip", "x-custom"])
content_types = st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=b", "",
                                 "application/x-www-form-urlencoded"])


def test_fuzzed_requests_never_get_a_5xx_or_a_non_json_error(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS)
    seen: dict[int, int] = {}

    @settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None)
    @given(method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
           path=st.sampled_from(PATHS), body=bodies, encoding=encodings, content_type=content_types,
           key=st.sampled_from([VICTIM, "sk-wrong", ""]), compress=st.booleans())
    def one(method, path, body, encoding, content_type, key, compress):
        headers = {}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if content_type:
            headers["Content-Type"] = content_type
        if encoding is not None:
            headers["Content-Encoding"] = encoding
            if compress and encoding == "gzip":
                body = gzip.compress(body)
        status, got, raw = request(gw.port, method, path, body if method != "GET" else None, headers)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (method, path, body[:200], headers, status, raw[:300])
        if status >= 400:
            assert got.get("content-type", "").startswith("application/json") and is_openai_error(raw), (
                method, path, headers, status, raw[:300])

    one()
    print("statuses seen:", dict(sorted(seen.items())))
    assert sum(seen.values()) >= 2000 and seen.get(200, 0) > 0, seen
    logs = gw.svc.output + "".join(p.read_text(errors="replace") for p in gw.log_dir.glob("*.log"))
    assert "Traceback" not in logs


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no HTTP library would write them) and read the whole answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_what_nginx_refuses_by_itself_is_openai_json_too(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS)
    auth = f"Authorization: Bearer {VICTIM}\r\n"
    cases = {
        400: b"GARBAGE\r\n\r\n",
        414: b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        431: b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
        501: (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: gzip\r\n"
              "Connection: close\r\n\r\n").encode(),
        505: b"GET /v1/models HTTP/2.5\r\nHost: x\r\n\r\n",
    }
    for status, data in cases.items():
        got, headers, body = raw_exchange(gw.port, data)
        assert got == status, (status, got, body[:200])
        assert headers.get("content-type", "").startswith("application/json") and is_openai_error(body), (status, body)
    assert "Traceback" not in gw.svc.output
