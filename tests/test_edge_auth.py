"""The nginx edge, in both key-lookup modes: keys, X-Team, and what reaches the backend."""

from __future__ import annotations

import json

import openai
import pytest

from support import http, sha256_hex, start_gateway

KEY_A = "sk-edge-team-a-0123456789abcdef"
KEY_B = "sk-edge-team-b-fedcba9876543210"
MODEL = "llama-3.1-8b-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEAMS = f"""  team-a:
    keys:
      - sha256:{sha256_hex(KEY_A)}
  team-b:
    keys:
      - {{sha256: "{sha256_hex(KEY_B)}", name: ci-bot}}
"""


@pytest.fixture(params=["map", "service"])
def gw(request, spawn, tmp_path):
    return start_gateway(spawn, tmp_path, TEAMS, lookup=request.param)


def backend_last(gw) -> dict:
    cfg = gw.config.read_text()
    api_base = cfg.split("api_base: ")[1].split()[0]
    return http("GET", api_base.removesuffix("/v1") + "/fake/last").json()[-1]


def usage(gw) -> list[dict]:
    return [json.loads(line) for line in (gw.log_dir / "usage.jsonl").read_text().splitlines()]


def access(gw) -> list[dict]:
    return [json.loads(line) for line in (gw.log_dir / "access.jsonl").read_text().splitlines()]


def test_valid_key_reaches_backend_as_its_team_without_the_client_key(gw):
    c = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_A, max_retries=0)
    r = c.chat.completions.create(**CHAT)
    assert r.choices[0].message.content
    seen = backend_last(gw)
    assert KEY_A not in json.dumps(seen)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "x-team" not in headers  # policy headers stop at proxycore
    line = usage(gw)[-1]
    assert (line["team"], line["key_id"], line["status"]) == ("team-a", sha256_hex(KEY_A)[:12], 200)
    entry = access(gw)[-1]
    assert (entry["team"], entry["status"], entry["request_id"]) == ("team-a", 200, line["request_id"])
    b = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_B, max_retries=0)
    b.chat.completions.create(**CHAT)
    assert (usage(gw)[-1]["team"], usage(gw)[-1]["key_id"]) == ("team-b", "ci-bot")


def test_spoofed_x_team_and_key_id_change_nothing(gw):
    forged_policy = json.dumps({"h": "0" * 64, "m": ["no-such-model"]})  # would forbid every model if honoured
    c = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_A, max_retries=0,
                      default_headers={"X-Team": "team-b", "X-Key-Id": "forged", "X-Key-Policy": forged_policy})
    c.chat.completions.create(**CHAT)
    line = usage(gw)[-1]
    assert (line["team"], line["key_id"]) == ("team-a", sha256_hex(KEY_A)[:12])
    # and a spoofed team with no key at all is just unauthorised
    r = http("POST", gw.base + "/v1/chat/completions", CHAT, {"X-Team": "team-a"})
    assert r.status == 401


@pytest.mark.parametrize("auth", [
    None,
    "Bearer sk-unknown-key-000000000000",
    f"Bearer {KEY_A.upper()}",
    f"bearer {KEY_A}x",
    f"Basic {KEY_A}",
    "Bearer ",
    "Bearer sk-ключ-ünïcödé",
])
def test_bad_keys_get_401_json(gw, auth):
    headers = {} if auth is None else {"Authorization": auth.encode("utf-8").decode("latin-1")}
    r = http("POST", gw.base + "/v1/chat/completions", CHAT, headers)
    assert r.status == 401
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_sdk_gets_authentication_error(gw):
    c = openai.OpenAI(base_url=gw.base + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_key_scheme_is_case_insensitive_but_key_is_not(gw):
    r = http("POST", gw.base + "/v1/chat/completions", CHAT, {"Authorization": f"bearer {KEY_A}"})
    assert r.status == 200


def test_deployment_health_is_not_public(gw):
    r = http("GET", gw.base + "/health", headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status == 404 and "api_base" not in r.text
    assert http("GET", gw.base + "/health/liveliness", headers={"Authorization": f"Bearer {KEY_A}"}).status == 200
