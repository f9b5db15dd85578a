"""No plaintext key in any rendered file, cache file or log, in either key-lookup mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.edge.nginx import RunLayout
from support import http, sha256_hex, start_gateway

KEY = "sk-secret-team-key-0123456789abcdef"
ENV_KEY = "sk-secret-env-key-abcdef0123456789"
WRONG = "sk-secret-wrong-key-000000000000"
TEAMS = f"""  team-a:
    keys: [sha256:{sha256_hex(KEY)}, os.environ/TEAM_A_ENV_KEY]
    rpm: 1000
"""


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("lookup", ["map", "service"])
def test_no_plaintext_key_on_disk_or_in_output(spawn, tmp_path, lookup):
    gw = start_gateway(spawn, tmp_path, TEAMS, lookup=lookup, env={"TEAM_A_ENV_KEY": ENV_KEY})
    body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for key in (KEY, ENV_KEY, WRONG, KEY.upper()):
        for _ in range(2):  # the second request of each is answered from nginx's auth cache in service mode
            http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})
    assert http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"}).status == 200
    layout = RunLayout(gw.run_dir.resolve())
    files = files_under(gw.run_dir, gw.log_dir, layout.work_dir(layout.nginx_prefix))
    names = {p.name for p in files}
    assert {"nginx.conf", "access.jsonl", "usage.jsonl"} <= names
    if lookup == "service":
        assert any("cache" in str(p) for p in files), "the auth cache wrote no file; nothing was checked"
    for path in files:
        data = path.read_bytes()
        for key in (KEY, ENV_KEY, WRONG, KEY.upper()):
            assert key.encode() not in data, f"{key} in {path}"
    conf = (gw.run_dir / "nginx" / "nginx.conf").read_text()
    if lookup == "map":
        assert sha256_hex(KEY) in conf and sha256_hex(ENV_KEY) in conf
    for key in (KEY, ENV_KEY, WRONG):
        assert key not in gw.svc.output
