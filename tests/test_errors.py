"""Bad input and backend trouble: each gets a clear OpenAI-shaped error, and the service keeps serving."""

from __future__ import annotations

import json

import openai
import pytest

from support import MASTER_KEY, free_port, http, start_fake_vllm, start_proxy, wait_until, write_config

MODEL = "llama-3.1-8b-instruct"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def gw(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base, "timeout": 1}],
                       router={"num_retries": 1}, general={"max_request_size_mb": 1})
    _, base = start_proxy(spawn, cfg)
    return {"base": base, "backend": api_base}


def post(gw, body, headers=None, path="/v1/chat/completions"):
    return http("POST", gw["base"] + path, body, {**AUTH, **(headers or {})})


def assert_openai_error(r, status: int, code: str | None = None):
    assert r.status == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def still_serving(gw):
    assert post(gw, GOOD).status == 200


@pytest.mark.parametrize("raw, param", [
    (b"{not json", None),
    (b"\xff\xfe{\"model\": 1}", None),  # not UTF-8
    (b"[1, 2]", None),
    (b'{"model": 7, "messages": []}', "model"),
])
def test_requests_that_cannot_be_routed_get_400_from_llmgate(gw, raw, param):
    err = assert_openai_error(post(gw, raw), 400)
    assert err["param"] == param
    still_serving(gw)


@pytest.mark.parametrize("raw", [
    b'{"model": "llama-3.1-8b-instruct"}',
    b'{"model": "llama-3.1-8b-instruct", "messages": "hi"}',
    b'{"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}',
    b'{"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "stream": "maybe"}',
    b'{"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "stream": true,'
    b' "stream_options": "all"}',
])
def test_parameter_errors_are_the_backends_and_reach_the_client_as_it_sent_them(gw, raw):
    """Only the backend knows its parameters: llmgate passes the request on and its 400 back, body unchanged."""
    r = post(gw, raw)
    assert_openai_error(r, 400)
    direct = http("POST", gw["backend"] + "/chat/completions", raw, {"Content-Type": "application/json"})
    assert direct.status == 400 and r.json() == direct.json()
    still_serving(gw)


@pytest.mark.parametrize("body, path", [
    ({**GOOD, "max_tokens": "5"}, "/v1/chat/completions"),
    ({**GOOD, "stream": "false"}, "/v1/chat/completions"),
    ({"model": MODEL, "prompt": "once", "max_tokens": 3.0, "stream": 0}, "/v1/completions"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "embed this chat"}]}, "/v1/embeddings"),
])
def test_requests_vllm_accepts_get_vllms_answer(gw, body, path):
    """Lax types (pydantic's: "5", "false", 3.0, 0) and vLLM's own request shapes are the backend's to judge."""
    r = post(gw, body, path=path)
    direct = http("POST", gw["backend"] + path.removeprefix("/v1"), body)
    assert r.status == direct.status == 200, r.text
    assert {k: v for k, v in r.json().items() if k not in ("id", "created")} == {
        k: v for k, v in direct.json().items() if k not in ("id", "created")}


@pytest.mark.parametrize("flag", ["true", "yes", 1])
def test_a_stream_flag_vllm_reads_as_true_streams_with_its_usage_counted(spawn, tmp_path, flag):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    log = tmp_path / "usage.jsonl"
    _, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    r = http("POST", base + "/v1/chat/completions", {**GOOD, "max_tokens": 6, "stream": flag, "stream_options": None},
             AUTH)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n") and '"usage"' not in r.text  # the client asked for none
    assert wait_until(lambda: log.exists() and log.read_text().count("\n") == 1)
    line = json.loads(log.read_text())
    assert (line["stream"], line["completion_tokens"], line["usage_source"]) == (True, 6, "backend")


def test_wrong_types_on_embeddings_and_completions(gw):
    assert_openai_error(post(gw, {"model": MODEL, "input": 5}, path="/v1/embeddings"), 400)
    assert_openai_error(post(gw, {"model": MODEL}, path="/v1/completions"), 400)
    still_serving(gw)


def test_body_over_the_limit_is_413(gw):
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    err = assert_openai_error(post(gw, huge), 413, "request_too_large")
    assert "1 MB" in err["message"]
    still_serving(gw)


def test_unknown_model_404_and_bad_key_401(gw):
    assert_openai_error(post(gw, {**GOOD, "model": "nope"}), 404, "model_not_found")
    assert_openai_error(post(gw, GOOD, {"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    assert_openai_error(post(gw, GOOD, {"Authorization": "Basic Zm9vOmJhcg=="}), 401, "invalid_api_key")
    assert_openai_error(post(gw, GOOD, {"Authorization": "Bearer sk-tëst"}), 401, "invalid_api_key")
    still_serving(gw)


def test_unknown_routes_and_methods_are_json_not_html(gw):
    for method, path in (("GET", "/nope"), ("GET", "/v1/chat/completions"), ("DELETE", "/v1/models")):
        r = http(method, gw["base"] + path, headers=AUTH)
        assert r.status in (404, 405)
        assert r.headers["content-type"].startswith("application/json") and "<html" not in r.text.lower()


def test_garbage_from_the_backend_is_502(gw):
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "garbage"})
    assert_openai_error(post(gw, GOOD), 502, "backend_invalid_response")
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "normal"})
    still_serving(gw)


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_that_breaks_off_is_502_never_500(gw, stream):
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "broken-body"})
    assert_openai_error(post(gw, {**GOOD, "stream": stream}), 502, "backend_invalid_response")
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "normal"})
    still_serving(gw)


def test_impossible_usage_from_a_backend_is_its_error_and_the_answer_still_arrives(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": MODEL, "api_base": api_base}])
    log = tmp_path / "usage.jsonl"
    proxy, base = start_proxy(spawn, cfg, "--usage-log", str(log))
    http("POST", api_base.removesuffix("/v1") + "/fake/config", {"mode": "bad-usage"})
    r = http("POST", base + "/v1/chat/completions", GOOD, AUTH)
    assert r.status == 200 and r.json()["usage"]["prompt_tokens"] == -5  # passed on as the backend sent it
    assert wait_until(lambda: log.exists() and log.read_text().count("\n") == 1)
    line = json.loads(log.read_text())
    assert line["status"] == 200 and line["usage_source"] == "estimated" and line["prompt_tokens"] > 0
    metrics = http("GET", base + "/metrics").text
    assert 'llmgate_backend_errors_total{deployment="llama-3.1-8b-instruct/0",kind="bad_usage"} 1.0' in metrics
    assert "reported impossible usage" in proxy.output


def test_backend_429_surfaces_as_rate_limit_error_in_the_sdk(gw):
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "error-429"})
    c = openai.OpenAI(base_url=gw["base"] + "/v1", api_key=MASTER_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(**GOOD)
    assert info.value.response.headers.get("retry-after")
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "normal"})


def test_backend_hanging_is_504(gw):
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "hang"})
    c = openai.OpenAI(base_url=gw["base"] + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(**GOOD)
    assert info.value.status_code == 504 and info.value.body["code"] == "backend_timeout"
    http("POST", gw["backend"].removesuffix("/v1") + "/fake/config", {"mode": "normal"})
    still_serving(gw)


def test_unreachable_backend_is_503(spawn, tmp_path):
    cfg = write_config(tmp_path / "config.yaml", [
        {"model_name": MODEL, "api_base": f"http://127.0.0.1:{free_port()}/v1"}], router={"num_retries": 1})
    _, base = start_proxy(spawn, cfg)
    c = openai.OpenAI(base_url=base + "/v1", api_key=MASTER_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(**GOOD)
    assert info.value.status_code == 503 and info.value.body["code"] == "backend_unreachable"
