"""The OpenAI-compatible API of `llmgate proxy`, driven by the official openai SDK."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from support import MASTER_KEY, http, start_fake_vllm, start_proxy, write_config

MODEL = "llama-3.1-8b-instruct"
INTERNAL_KEY = "sk-internal-test-key-42"


@pytest.fixture
def gateway(spawn, tmp_path):
    backend, api_base = start_fake_vllm(spawn)
    _, emb_base = start_fake_vllm(spawn, model="bge-small")
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": api_base, "model_info": {"id": "llama-a"}},
        {"model_name": "embedder", "api_base": emb_base, "model": "hosted_vllm/bge-small"},
    ])
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log), env={"LLMGATE_INTERNAL_KEY": INTERNAL_KEY})
    return {"base": base, "backend": api_base, "embedder": emb_base, "log": log}


def sdk(gateway, key: str = MASTER_KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=key, max_retries=0, **kw)


def last_usage(gateway) -> dict:
    return json.loads(gateway["log"].read_text().splitlines()[-1])


def test_chat_completion(gateway):
    r = sdk(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 5
    line = last_usage(gateway)
    assert line["status"] == 200 and line["model"] == MODEL and line["deployment"] == "llama-a"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (r.usage.prompt_tokens, 5)


def test_text_completion_and_paths_without_v1(gateway):
    r = sdk(gateway).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    assert r.choices[0].text and r.usage.completion_tokens == 3
    plain = http("POST", gateway["base"] + "/chat/completions",
                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                 {"Authorization": f"Bearer {MASTER_KEY}"})
    assert plain.status == 200 and plain.json()["object"] == "chat.completion"


def test_embeddings_base64_default_and_float(gateway):
    c = sdk(gateway)
    r = c.embeddings.create(model="embedder", input=["one", "two"])  # the SDK asks for base64 and decodes it
    assert len(r.data) == 2 and len(r.data[0].embedding) > 0
    f = c.embeddings.create(model="embedder", input="one", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(r.data[0].embedding, rel=1e-6)
    assert last_usage(gateway)["endpoint"] == "embeddings"


def test_models_list_and_get(gateway):
    c = sdk(gateway)
    assert sorted(m.id for m in c.models.list()) == ["embedder", MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    for path in ("/models", "/v1/models"):
        r = http("GET", gateway["base"] + path, headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status == 200 and r.json()["object"] == "list"


@pytest.mark.parametrize("key", ["wrong-key", MASTER_KEY.upper(), MASTER_KEY + "x"])
def test_bad_key_is_401_authentication_error(gateway, key):
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(gateway, key=key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, key=key).models.list()


def test_missing_key_is_401(gateway):
    r = http("POST", gateway["base"] + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404_listing_available(gateway):
    with pytest.raises(openai.NotFoundError) as info:
        sdk(gateway).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "gpt-4o" in info.value.message and MODEL in info.value.message and "embedder" in info.value.message
    assert info.value.body["code"] == "model_not_found"


def test_x_team_is_ignored_without_the_internal_key(gateway):
    c = sdk(gateway, default_headers={"X-Team": "spoofed", "X-Key-Id": "k1"})
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    line = last_usage(gateway)
    assert line["team"] is None and line["key_id"] is None


def test_x_team_is_honoured_with_the_internal_key(gateway):
    c = sdk(gateway, key=INTERNAL_KEY, default_headers={"X-Team": "team-a", "X-Key-Id": "ab12cd"})
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    line = last_usage(gateway)
    assert (line["team"], line["key_id"]) == ("team-a", "ab12cd")


def test_request_id_is_taken_sent_upstream_and_returned(gateway):
    headers = {"Authorization": f"Bearer {MASTER_KEY}", "X-Request-ID": "req-abc.123"}
    r = http("POST", gateway["base"] + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, headers)
    assert r.headers["x-request-id"] == "req-abc.123"
    seen = http("GET", gateway["backend"].removesuffix("/v1") + "/fake/last").json()[-1]
    assert {k.lower(): v for k, v in seen["headers"].items()}["x-request-id"] == "req-abc.123"
    assert last_usage(gateway)["request_id"] == "req-abc.123"
    # generated when absent or unsafe
    r2 = http("POST", gateway["base"] + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
              {"Authorization": f"Bearer {MASTER_KEY}", "X-Request-ID": "bad id\twith spaces"})
    assert len(r2.headers["x-request-id"]) == 32 and r2.headers["x-request-id"] != "bad id\twith spaces"


def test_health_endpoints(gateway):
    base = gateway["base"]
    assert http("GET", base + "/health/liveliness").status == 200
    ready = http("GET", base + "/health/readiness")
    assert ready.status == 200 and ready.json()["status"] == "healthy"
    assert http("GET", base + "/health").status == 401
    h = http("GET", base + "/health", headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()
    assert h["healthy_count"] == 2 and {e["deployment"] for e in h["healthy_endpoints"]} == {"llama-a", "embedder/1"}


def test_the_body_reaches_the_backend_as_the_client_wrote_it(gateway):
    """Only `model` changes (to the backend's id): numbers beyond 64 bits, exponents, spacing, key order and
    fields llmgate does not know pass byte for byte."""
    raw = (b'{"input": "x",  "encoding_format":"float",\n "model" : "embedder", "vllm_xargs": {"big": '
           b'1180591620717411303424, "f": 0.10000000000000000001, "e": 1E-7}, "nested": ' + b"[" * 300 + b"]" * 300
           + b"}")
    r = http("POST", gateway["base"] + "/v1/embeddings", raw,
             {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"})
    assert r.status == 200, r.text
    seen = http("GET", gateway["embedder"].removesuffix("/v1") + "/fake/last").json()[-1]
    assert base64.b64decode(seen["raw_b64"]) == raw.replace(b'"embedder"', b'"bge-small"')
