"""Dedicated instances: a team with `dedicated: true` is served by a proxycore of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error

import pytest

from support import http, sha256_hex, start_gateway, wait_until

KEY_A, KEY_B = "sk-dedicated-team-a-0123456789", "sk-dedicated-team-b-0123456789"
TEAMS = f"""  team-a:
    keys: [sha256:{sha256_hex(KEY_A)}]
    dedicated: true
  team-b:
    keys: [sha256:{sha256_hex(KEY_B)}]
"""
BODY = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


def children(pid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in out.strip().splitlines()}


def status(gw, key: str, timeout: float = 10.0) -> int | None:
    try:
        return http("POST", gw.base + "/v1/chat/completions", BODY, {"Authorization": f"Bearer {key}"},
                    timeout=timeout).status
    except (TimeoutError, urllib.error.URLError):
        return None  # no answer in time


@pytest.mark.parametrize("lookup", ["map", "service"])
def test_team_a_is_served_only_by_its_own_instance(spawn, tmp_path, lookup):
    gw = start_gateway(spawn, tmp_path, TEAMS, lookup=lookup)
    kids = children(gw.svc.pid)
    own = next(pid for pid, args in kids.items() if "--only-team team-a" in args)
    shared = next(pid for pid, args in kids.items() if "-m proxycore " in args and "--only-team" not in args)
    assert status(gw, KEY_A) == 200 and status(gw, KEY_B) == 200
    lines = [json.loads(x) for x in (gw.log_dir / "usage.jsonl").read_text().splitlines()]
    assert [x["team"] for x in lines] == ["team-a", "team-b"]  # usage stays attributed to the team

    os.kill(own, signal.SIGSTOP)  # team A's instance stops answering
    try:
        assert status(gw, KEY_B) == 200
        assert status(gw, KEY_A, timeout=2) is None
    finally:
        os.kill(own, signal.SIGCONT)
    assert wait_until(lambda: status(gw, KEY_A) == 200, timeout=10)

    os.kill(shared, signal.SIGSTOP)  # the shared instance stops: team A does not notice
    try:
        assert status(gw, KEY_A) == 200
        assert status(gw, KEY_B, timeout=2) is None
    finally:
        os.kill(shared, signal.SIGCONT)


def test_dedicated_instance_refuses_other_teams_and_the_shared_key(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS)
    port = next(int(args.split("--port ")[1].split()[0]) for args in children(gw.svc.pid).values()
                if "--only-team team-a" in args)
    internal = (gw.run_dir / "secrets.env").read_text().split("LLMGATE_INTERNAL_KEY=")[1].split()[0]
    r = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", BODY,
             {"Authorization": f"Bearer {internal}", "X-Team": "team-a"})
    assert r.status == 401  # the shared internal key does not open a dedicated instance


def test_adding_and_removing_a_dedicated_team_starts_and_stops_its_instance(spawn, tmp_path):
    gw = start_gateway(spawn, tmp_path, TEAMS.replace("    dedicated: true\n", ""))
    assert not any("--only-team" in a for a in children(gw.svc.pid).values())
    gw.write_teams(gw.teams.read_text().replace(f"sha256:{sha256_hex(KEY_A)}]\n", f"sha256:{sha256_hex(KEY_A)}]\n    dedicated: true\n", 1))
    assert wait_until(lambda: any("--only-team team-a" in a for a in children(gw.svc.pid).values()), timeout=15)
    assert wait_until(lambda: any(": applied:" in line for line in gw.reloads()), timeout=15)
    assert status(gw, KEY_A) == 200
    gw.write_teams(gw.teams.read_text().replace("    dedicated: true\n", ""))
    assert wait_until(lambda: not any("--only-team" in a for a in children(gw.svc.pid).values()), timeout=15)
    assert status(gw, KEY_A) == 200
