"""Hot reload of the edge: verified, never losing a request, and refusing bad files while the old config serves."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import openai
import pytest

from support import LLMGATE, ROOT, http, sha256_hex, start_gateway, teams_yaml, wait_until

KEY = "sk-reload-main-team-0123456789"
NEW_KEY = "sk-reload-new-team-0123456789"
MODEL = "llama-3.1-8b-instruct"
BASE_TEAMS = f"""  main:
    keys: [sha256:{sha256_hex(KEY)}]
    rpm: 100000
"""
NEW_TEAM = f"""  newcomer:
    keys: [sha256:{sha256_hex(NEW_KEY)}]
    rpm: 1000
"""


def rewrite(gw, teams: str, extra: str = "") -> None:
    gw.write_teams(teams_yaml(gw.port, gw.proxy_port, gw.auth_port, gw.lookup, teams, extra))


def chat_status(gw, key: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    return http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}).status


@pytest.fixture(params=["map", "service"])
def gw(request, spawn, tmp_path):
    g = start_gateway(spawn, tmp_path, BASE_TEAMS, lookup=request.param)
    g.lookup = request.param
    return g


def test_new_team_is_served_within_2s_of_saving(gw):
    assert chat_status(gw, NEW_KEY) == 401
    rewrite(gw, BASE_TEAMS + NEW_TEAM)
    saved = time.monotonic()
    assert wait_until(lambda: chat_status(gw, NEW_KEY) == 200, timeout=2.0), gw.svc.output
    assert time.monotonic() - saved < 2.0
    assert chat_status(gw, KEY) == 200


def test_50_reloads_under_load_lose_no_call_and_a_stream_finishes_intact(gw):
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY)  # the SDK's default retries stay on
    errors: list[Exception] = []
    calls = [0]
    stop = threading.Event()

    def load() -> None:
        for _ in range(100_000):  # bounded; `stop` ends it first
            if stop.is_set():
                return
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
                calls[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                errors.append(exc)

    stream_text: list[str] = []

    def stream() -> None:
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "story"}],
                                                max_tokens=60, stream=True)
        stream_text.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    http("POST", backend(gw) + "/fake/config", {"chunk_delay_ms": 100})  # a 6 s stream across many reloads
    streamer = threading.Thread(target=stream)
    streamer.start()
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(50):
            done = len(gw.reloads())
            newcomer = NEW_TEAM.replace("rpm: 1000", f"rpm: {1000 + i}")  # every added team renders differently
            rewrite(gw, BASE_TEAMS + (newcomer if i % 2 == 0 else ""))
            assert wait_until(lambda done=done: len(gw.reloads()) > done, timeout=5), f"reload {i} not seen:\n{gw.svc.output}"
    finally:
        stop.set()
        for t in threads:
            t.join()
        streamer.join()
    assert errors == []
    assert calls[0] > 50
    http("POST", backend(gw) + "/fake/config", {"chunk_delay_ms": 0})
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "story"}], max_tokens=60)
    assert stream_text == [whole.choices[0].message.content]
    assert [line for line in gw.reloads() if ": applied:" not in line] == []
    assert len(gw.reloads()) == 50


def backend(gw) -> str:
    return gw.config.read_text().split("api_base: ")[1].split()[0].removesuffix("/v1")


@pytest.mark.parametrize("bad, reason", [
    ("teams:\n  main:\n    keys: [unclosed\n", "valid YAML"),
    ("teams:\n  'a;}':\n    rpm: 1\n", "team name"),
    ("teams:\n  ok:\n    domains: ['x.example.com;\\n}']\n", "domain name"),
    ("teams:\n  ok:\n    domains: ['a\"b.example.com']\n", "domain name"),
    ("teams:\n  ok:\n    domains: ['$host.example.com']\n", "domain name"),
    ("teams:\n  \"team\\nx\":\n    rpm: 1\n", "team name"),
    ("teams:\n  ok:\n    keys: [sk-plaintext-key-should-be-refused]\n", "never a plaintext key"),
])
def test_bad_teams_file_keeps_old_config_and_says_why(spawn, tmp_path, bad, reason):
    gw = start_gateway(spawn, tmp_path, BASE_TEAMS)
    before = gw.checksum()
    gw.teams.write_text(bad)
    assert wait_until(lambda: any("failed" in line for line in gw.reloads()), timeout=5)
    line = next(line for line in gw.reloads() if "failed" in line)
    assert "kept the previous config" in line and str(gw.teams) in line and reason in line
    assert gw.checksum() == before
    assert chat_status(gw, KEY) == 200
    rendered = (gw.run_dir / "nginx" / "nginx.conf").read_text()
    assert "a;}" not in rendered and "$host.example" not in rendered


def test_reload_that_nginx_rejects_keeps_old_config_serving(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, BASE_TEAMS)
    gw.lookup = "map"
    before = gw.checksum()
    blocker = socket.socket()  # a port in use: `nginx -t` passes, the master rejects the reload (exit 0 all the same)
    blocker.bind(("127.0.0.1", 0))
    busy = blocker.getsockname()[1]
    try:
        text = gw.teams.read_text().replace(f"listen: 127.0.0.1:{gw.port}", f"listen: 127.0.0.1:{busy}")
        gw.write_teams(text + NEW_TEAM)
        assert wait_until(lambda: any("failed" in line for line in gw.reloads()), timeout=20)
    finally:
        blocker.close()
    line = next(line for line in gw.reloads() if "failed" in line)
    assert "nginx rejected the reload" in line and "Address already in use" in line
    assert gw.checksum() == before
    assert chat_status(gw, KEY) == 200
    assert chat_status(gw, NEW_KEY) == 401
    assert f"127.0.0.1:{gw.port}" in (gw.run_dir / "nginx" / "nginx.conf").read_text()  # last good config on disk
    metrics = http("GET", f"http://127.0.0.1:{gw.proxy_port}/metrics").text
    assert re.search(r'llmgate_config_reloads_total\{result="failed"\} [1-9]', metrics)
    assert re.search(r"llmgate_config_hash [1-9]", metrics)


def test_llmgate_reload_and_check_commands(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, BASE_TEAMS)
    args = ["--config", str(gw.config), "--teams", str(gw.teams), "--run-dir", str(gw.run_dir)]
    run = subprocess.run([*LLMGATE, "reload", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0 and "unchanged" in run.stdout
    check = subprocess.run([*LLMGATE, "check", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert check.returncode == 0 and "nginx -t passed" in check.stdout
    bad = tmp_path / "bad-teams.yaml"
    bad.write_text("teams:\n  x:\n    rpm: lots\n")
    check = subprocess.run([*LLMGATE, "check", "--config", str(gw.config), "--teams", str(bad),
                            "--run-dir", str(gw.run_dir)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert check.returncode == 2 and f"{bad}: teams.x.rpm: expected a whole number" in check.stderr


def test_a_change_that_needs_a_restart_is_refused_and_says_so(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, BASE_TEAMS)
    before = gw.checksum()
    text = gw.teams.read_text().replace(f"proxy_listen: 127.0.0.1:{gw.proxy_port}", "proxy_listen: 127.0.0.1:1")
    gw.write_teams(text)
    assert wait_until(lambda: any("failed" in line for line in gw.reloads()), timeout=5)
    line = next(line for line in gw.reloads() if "failed" in line)
    assert "gateway.proxy_listen changed" in line and "restart" in line
    assert gw.checksum() == before and chat_status(gw, KEY) == 200
