"""Per-team model allow-lists (proxycore) and per-team domains (nginx), in both key-lookup modes."""

from __future__ import annotations

import openai
import pytest

from support import http, sha256_hex, start_fake_vllm, start_gateway

KEY_A = "sk-policy-team-a-0123456789"
KEY_B = "sk-policy-team-b-0123456789"
KEY_C = "sk-policy-team-c-0123456789"
TEAMS = f"""  team-a:
    keys: [sha256:{sha256_hex(KEY_A)}]
    models: [small]
    domains: [a.llm.example.com]
  team-b:
    keys: [sha256:{sha256_hex(KEY_B)}]
    domains: [b.llm.example.com]
  team-c:
    keys: [sha256:{sha256_hex(KEY_C)}]
    models: []
"""
SHARED = "llm.example.com"


@pytest.fixture(params=["map", "service"])
def gw(request, spawn, tmp_path):
    _, small = start_fake_vllm(spawn, model="small")
    _, large = start_fake_vllm(spawn, model="large")
    deployments = [{"model_name": "small", "api_base": small, "model": "hosted_vllm/small"},
                   {"model_name": "large", "api_base": large, "model": "hosted_vllm/large"}]
    return start_gateway(spawn, tmp_path, TEAMS, lookup=request.param, deployments=deployments,
                         extra=f"  server_names: [{SHARED}]\n")


def chat(gw, key: str, host: str, model: str):
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    return http("POST", gw.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}", "Host": host})


def test_model_outside_allow_list_is_403(gw):
    assert chat(gw, KEY_A, "a.llm.example.com", "small").status == 200
    r = chat(gw, KEY_A, "a.llm.example.com", "large")
    assert r.status == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert chat(gw, KEY_B, "b.llm.example.com", "large").status == 200  # no list: every model
    assert chat(gw, KEY_C, SHARED, "small").status == 403  # empty list: none


def test_models_list_shows_only_allowed(gw):
    def listed(key, host):
        return sorted(m["id"] for m in http("GET", gw.base + "/v1/models",
                                            headers={"Authorization": f"Bearer {key}", "Host": host}).json()["data"])

    assert listed(KEY_A, "a.llm.example.com") == ["small"]
    assert listed(KEY_B, "b.llm.example.com") == ["large", "small"]
    assert listed(KEY_C, SHARED) == []


def test_sdk_sees_permission_denied(gw):
    c = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_A, max_retries=0,
                      default_headers={"Host": "a.llm.example.com"})
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="large", messages=[{"role": "user", "content": "x"}])


def test_keys_only_on_their_own_domain(gw):
    assert chat(gw, KEY_A, "a.llm.example.com", "small").status == 200
    wrong = chat(gw, KEY_A, "b.llm.example.com", "small")
    assert wrong.status == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert chat(gw, KEY_A, SHARED, "small").status == 401  # a team with domains is served only there
    assert chat(gw, KEY_C, SHARED, "small").status == 403  # a team without domains uses the shared host
    assert chat(gw, KEY_C, "a.llm.example.com", "large").status == 401


def test_unknown_host_is_refused(gw):
    r = chat(gw, KEY_A, "evil.example.org", "small")
    assert r.status == 421 and r.json()["error"]["code"] == "unknown_host"
    assert chat(gw, KEY_C, "127.0.0.1", "small").status == 421
