"""authsvc: the `auth_request` endpoint nginx asks about every team key (key_lookup: service).

The real `llmgate auth` process over a teams.yaml written here; keys change in the file, never
through a restart.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess

import pytest

from support import LLMGATE, free_port, http, wait_until

KEY_A = "sk-team-a-4f1c9e0b7d2a61385e"
KEY_CI = "sk-team-a-ci-8d03b5a9c4e7f1"
KEY_B = "sk-team-b-env-2b7e4a90c1d6f3"  # given to the process as TEAM_B_KEY
KEY_NEW = "sk-team-b-new-6a1f0c3e9b5d27"
PLAINTEXT_IN_FILE = "sk-written-in-plaintext-93c1"
ALL_KEYS = (KEY_A, KEY_CI, KEY_B, KEY_NEW, PLAINTEXT_IN_FILE)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def teams_yaml(*team_b_extra: str, team_a_keys: tuple[str, ...] | None = None) -> str:
    a_keys = team_a_keys if team_a_keys is not None else (f"sha256:{sha(KEY_A)}",
                                                          f"{{sha256: {sha(KEY_CI)}, name: ci-bot}}")
    lines = ["gateway:", "  key_lookup: service", "teams:", "  team-a:", "    keys:"]
    lines += [f"      - {k}" for k in a_keys]
    lines += ["    rpm: 60", "  team-b:", "    keys:", "      - os.environ/TEAM_B_KEY"]
    lines += [f"      - {k}" for k in team_b_extra]
    return "\n".join(lines) + "\n"


def replace_file(path, text: str) -> None:
    """As editors and `llmgate key` do: write a temporary file, then rename it over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start_authsvc(spawn, teams_path, port: int | None = None):
    port = port or free_port()
    svc = spawn([*LLMGATE, "auth", "--teams", str(teams_path), "--port", str(port)], r"listening on",
                env={"TEAM_B_KEY": KEY_B})
    assert svc.proc.poll() is None, svc.output
    return svc, f"http://127.0.0.1:{port}"


def auth_status(url: str, key: str) -> int:
    return http("GET", f"{url}/auth", headers={"Authorization": f"Bearer {key}"}).status


def raw_auth(url: str, header_value: bytes) -> int:
    """One request with header bytes urllib will not send (non-ASCII); returns the status."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /auth HTTP/1.1\r\nHost: x\r\nAuthorization: " + header_value + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return int(data.split(b" ", 2)[1])


def assert_no_secrets(output: str) -> None:
    for key in ALL_KEYS:
        assert key not in output
        assert sha(key) not in output  # a full hash is as good as the key against the map


@pytest.fixture
def teams_file(tmp_path):
    path = tmp_path / "teams.yaml"
    path.write_text(teams_yaml())
    return path


def test_valid_keys_answer_204_with_team_and_key_id(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    cases = [(KEY_A, "team-a", sha(KEY_A)[:12]), (KEY_CI, "team-a", "ci-bot"), (KEY_B, "team-b", sha(KEY_B)[:12])]
    for key, team, key_id in cases:
        r = http("GET", f"{url}/auth", headers={"Authorization": f"Bearer {key}", "X-Original-Host": "x.example.com",
                                                  "X-Original-URI": "/v1/chat/completions"})
        assert r.status == 204, key_id
        assert (r.headers.get("x-team"), r.headers.get("x-key-id")) == (team, key_id)
        assert r.body == b""
    # the scheme is case-insensitive and surrounding spaces are trimmed, as nginx's njs hash does
    assert http("GET", f"{url}/auth", headers={"Authorization": f"bearer {KEY_A}"}).status == 204
    assert http("GET", f"{url}/auth", headers={"Authorization": f"BEARER   {KEY_A}  "}).status == 204
    for method in ("POST", "HEAD", "PUT"):
        assert http(method, f"{url}/auth", headers={"Authorization": f"Bearer {KEY_A}"}).status == 204, method
    assert_no_secrets(svc.output)


@pytest.mark.parametrize("header", [
    None,
    "Bearer sk-team-a-unknown-000000000",
    "Bearer ",
    "Bearer",
    f"Basic {KEY_A}",
    f"Token {KEY_A}",
    f"Bearer {KEY_A.upper()}",
    f"Bearer {KEY_A}x",
    f"Bearer {KEY_A[:-1]}",
    f"Bearer{KEY_A}",
    f"Bearer {sha(KEY_A)}",  # the hash is not a key
    f"Bearer {KEY_A} {KEY_A}",
    "Bearer " + "k" * 5000,
], ids=["missing", "unknown", "empty", "no-token", "basic", "token-scheme", "upper-cased", "suffixed", "truncated",
        "no-space", "hash-as-key", "two-keys", "overlong"])
def test_refused_keys_answer_401(spawn, teams_file, header):
    svc, url = start_authsvc(spawn, teams_file)
    r = http("GET", f"{url}/auth", headers={"Authorization": header} if header is not None else {})
    assert r.status == 401
    assert "x-team" not in r.headers and "x-key-id" not in r.headers
    assert auth_status(url, KEY_A) == 204  # still serving


def test_non_ascii_keys_answer_401_without_crashing(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    assert raw_auth(url, f"Bearer {KEY_A}\u00e9".encode()) == 401
    assert raw_auth(url, "Bearer ключ-команды-а".encode()) == 401
    assert raw_auth(url, b"Bearer \xff\xfe" + KEY_A.encode()) == 401  # not even UTF-8
    assert raw_auth(url, f"Bearer {KEY_A}".encode()) == 204
    assert svc.proc.poll() is None
    assert "Traceback" not in svc.output


def test_health_reports_counts_and_file(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    r = http("GET", f"{url}/health")
    assert r.status == 200
    assert r.json() == {"status": "ok", "teams": 2, "keys": 3, "teams_file": str(teams_file.resolve())}


def test_listens_on_auth_listen_of_teams_yaml_by_default(spawn, tmp_path):
    port = free_port()
    path = tmp_path / "teams.yaml"
    path.write_text(teams_yaml().replace("  key_lookup: service", f"  key_lookup: service\n  auth_listen: 127.0.0.1:{port}"))
    svc = spawn([*LLMGATE, "auth", "--teams", str(path)], r"listening on", env={"TEAM_B_KEY": KEY_B})
    assert f"authsvc listening on http://127.0.0.1:{port}" in svc.output
    assert auth_status(f"http://127.0.0.1:{port}", KEY_A) == 204


def test_added_key_is_accepted_without_restart(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    assert auth_status(url, KEY_NEW) == 401
    replace_file(teams_file, teams_yaml(f"{{sha256: {sha(KEY_NEW)}, name: new-key}}"))
    assert wait_until(lambda: auth_status(url, KEY_NEW) == 204, timeout=2.0), svc.output
    r = http("GET", f"{url}/auth", headers={"Authorization": f"Bearer {KEY_NEW}"})
    assert (r.headers["x-team"], r.headers["x-key-id"]) == ("team-b", "new-key")
    assert auth_status(url, KEY_A) == 204
    assert svc.proc.poll() is None
    assert wait_until(lambda: f"authsvc reloaded {teams_file.resolve()}: 2 teams, 4 keys" in svc.output, 2.0), svc.output
    assert http("GET", f"{url}/health").json()["keys"] == 4


def test_key_written_in_place_is_accepted(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    teams_file.write_text(teams_yaml(f"sha256:{sha(KEY_NEW)}"))  # no rename: truncate and write
    assert wait_until(lambda: auth_status(url, KEY_NEW) == 204, timeout=2.0), svc.output


def test_revoked_key_is_refused_without_restart(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    assert auth_status(url, KEY_CI) == 204
    replace_file(teams_file, teams_yaml(team_a_keys=(f"sha256:{sha(KEY_A)}",)))
    assert wait_until(lambda: auth_status(url, KEY_CI) == 401, timeout=2.0), svc.output
    assert auth_status(url, KEY_A) == 204
    assert auth_status(url, KEY_B) == 204
    assert svc.proc.poll() is None


def test_invalid_teams_yaml_keeps_the_previous_keys(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    # a plaintext key is refused, and the previous index (with KEY_CI) keeps serving
    replace_file(teams_file, teams_yaml(team_a_keys=(PLAINTEXT_IN_FILE,)))
    kept = "llmgate: authsvc kept the previous teams.yaml:"
    assert wait_until(lambda: kept in svc.output, timeout=2.0), svc.output
    line = next(x for x in svc.lines if kept in x)
    assert str(teams_file.resolve()) in line and "teams.team-a.keys[0]" in line and "plaintext" in line
    assert auth_status(url, KEY_CI) == 204
    assert auth_status(url, PLAINTEXT_IN_FILE) == 401
    # broken YAML too
    replace_file(teams_file, "teams:\n  team-a: [unclosed\n")
    assert wait_until(lambda: sum(kept in x for x in svc.lines) == 2, timeout=2.0), svc.output
    assert "valid YAML" in svc.lines[-1]
    assert auth_status(url, KEY_A) == 204
    # a fixed file loads again
    replace_file(teams_file, teams_yaml(f"sha256:{sha(KEY_NEW)}"))
    assert wait_until(lambda: auth_status(url, KEY_NEW) == 204, timeout=2.0), svc.output
    assert svc.proc.poll() is None
    assert_no_secrets(svc.output)


def test_sighup_reloads(spawn, tmp_path):
    # teams.yaml is a link into another directory: a change to its target is not seen by the
    # directory watcher, so only SIGHUP can bring it in
    real = tmp_path / "real"
    real.mkdir()
    target = real / "teams.yaml"
    target.write_text(teams_yaml())
    (tmp_path / "conf").mkdir()
    link = tmp_path / "conf" / "teams.yaml"
    link.symlink_to(target)
    svc, url = start_authsvc(spawn, link)
    target.write_text(teams_yaml(f"sha256:{sha(KEY_NEW)}"))
    svc.signal(signal.SIGHUP)
    assert wait_until(lambda: auth_status(url, KEY_NEW) == 204, timeout=2.0), svc.output
    assert wait_until(lambda: "authsvc reloaded" in svc.output, timeout=2.0)
    # SIGHUP with an invalid file says why and keeps serving
    target.write_text("teams: [\n")
    svc.signal(signal.SIGHUP)
    assert wait_until(lambda: "authsvc kept the previous teams.yaml" in svc.output, timeout=2.0), svc.output
    assert auth_status(url, KEY_NEW) == 204
    assert svc.proc.poll() is None


def test_output_never_holds_a_key_and_sigterm_exits_0(spawn, teams_file):
    svc, url = start_authsvc(spawn, teams_file)
    for key in ALL_KEYS:
        auth_status(url, key)
        http("GET", f"{url}/auth", headers={"Authorization": f"Basic {key}"})
    replace_file(teams_file, teams_yaml(f"sha256:{sha(KEY_NEW)}"))
    assert wait_until(lambda: auth_status(url, KEY_NEW) == 204, timeout=2.0)
    replace_file(teams_file, teams_yaml(PLAINTEXT_IN_FILE))
    assert wait_until(lambda: "kept the previous" in svc.output, timeout=2.0)
    svc.signal(signal.SIGHUP)
    assert wait_until(lambda: svc.output.count("kept the previous") == 2, timeout=2.0)
    assert svc.stop() == 0
    assert_no_secrets(svc.output)


@pytest.mark.parametrize("text, expected", [
    (teams_yaml(team_a_keys=(PLAINTEXT_IN_FILE,)), "teams.team-a.keys[0]"),
    ("teams:\n  Team_A: {}\n", "teams.'Team_A'"),
    ("teams: [\n", "valid YAML"),
    (None, "a readable file"),
])
def test_invalid_teams_yaml_at_start_exits_2(tmp_path, text, expected):
    path = tmp_path / "teams.yaml"
    if text is not None:
        path.write_text(text)
    r = subprocess.run([*LLMGATE, "auth", "--teams", str(path), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=30, env={**os.environ, "TEAM_B_KEY": KEY_B})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"llmgate: {path}")
    assert expected in r.stderr
    assert "listening" not in r.stdout
    assert "Traceback" not in r.stderr
    assert_no_secrets(r.stdout + r.stderr)


def test_missing_environment_key_at_start_exits_2(tmp_path):
    path = tmp_path / "teams.yaml"
    path.write_text(teams_yaml())
    env = {k: v for k, v in os.environ.items() if k != "TEAM_B_KEY"}
    r = subprocess.run([*LLMGATE, "auth", "--teams", str(path), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2
    assert "teams.team-b.keys[0]" in r.stderr and "TEAM_B_KEY" in r.stderr


def test_empty_bearer_never_matches_the_hash_of_an_empty_key(spawn, tmp_path):
    path = tmp_path / "teams.yaml"
    path.write_text(teams_yaml(f"sha256:{sha('')}"))
    svc, url = start_authsvc(spawn, path)
    assert http("GET", f"{url}/auth", headers={"Authorization": "Bearer "}).status == 401
    assert http("GET", f"{url}/auth", headers={"Authorization": "Bearer    "}).status == 401
    assert raw_auth(url, "Bearer \u00a0".encode()) == 401  # HTTP keeps a no-break space; trimming removes it
    assert auth_status(url, KEY_A) == 204
