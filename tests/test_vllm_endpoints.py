"""vLLM's other endpoints through the whole gateway (nginx, proxycore): /v1/responses (streamed too), /tokenize,
/detokenize, /score, /rerank, /pooling, /classify and the multipart audio uploads, with the same keys, team
allow-lists, limits and usage lines as chat, and the backend's answers as it sent them."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import subprocess

import openai
import pytest

from support import LLMGATE, ROOT, http, read_then_hang_up, sha256_hex, start_fake_vllm, start_gateway, wait_until

KEY_A, KEY_B, KEY_C = "sk-endpoints-a-0123456789", "sk-endpoints-b-0123456789", "sk-endpoints-c-0123456789"
KEY_T = "sk-endpoints-t-0123456789"
TEAMS = f"""  team-a:
    keys: [sha256:{sha256_hex(KEY_A)}]
    models: [gen]
  team-b:
    keys: [sha256:{sha256_hex(KEY_B)}]
    models: [gen, other]
  team-c:
    keys: [sha256:{sha256_hex(KEY_C)}]
    models: [other]
  team-t:
    keys: [sha256:{sha256_hex(KEY_T)}]
    models: [gen]
    tpm: 20
"""
VOLATILE = {"id", "created", "created_at"}  # differ between two answers to the same request


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def comparable(value):
    """An answer without its ids and times."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


class Fake:
    def __init__(self, api_base: str):
        self.api_base, self.root = api_base, api_base.removesuffix("/v1")

    def stats(self) -> dict:
        return http("GET", self.root + "/fake/stats").json()

    def last(self) -> dict:
        """The last request other than the gateway's health probes (GET /v1/models)."""
        return [r for r in http("GET", self.root + "/fake/last").json() if r["path"] != "/v1/models"][-1]

    def configure(self, **changes) -> None:
        assert http("POST", self.root + "/fake/config", changes).status == 200


def usage_lines(gw) -> list[dict]:
    log = gw.log_dir / "usage.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines() if x] if log.exists() else []


def usage_line(gw, n: int) -> dict:
    """The n-th usage line (1-based), once written: proxycore writes it when the answer has ended."""
    assert wait_until(lambda: len(usage_lines(gw)) >= n, timeout=10), usage_lines(gw)
    return usage_lines(gw)[n - 1]


@pytest.fixture
def setup(spawn, tmp_path):
    _, gen = start_fake_vllm(spawn, "--stream-chunks", "4", model="up-gen")
    _, other = start_fake_vllm(spawn, model="up-other")
    deployments = [{"model_name": "gen", "api_base": gen, "model": "hosted_vllm/up-gen"},
                   {"model_name": "other", "api_base": other, "model": "hosted_vllm/up-other"}]
    gw = start_gateway(spawn, tmp_path, TEAMS, deployments=deployments,
                       env={"LLMGATE_FAKE_TIME": "2026-11-24T10:00:02Z"})  # early in a minute, for the TPM case
    return gw, Fake(gen), Fake(other)


CASES = [
    ("/tokenize", {"prompt": "the quick brown fox"}),
    ("/detokenize", {"tokens": [0, 1, 2, 3]}),
    ("/score", {"text_1": "silver owls", "text_2": ["owls at dusk", "a lazy dog"]}),
    ("/v1/score", {"text_1": "silver owls", "text_2": "owls at dusk"}),
    ("/rerank", {"query": "owls", "documents": ["a lazy dog", "seven silver owls"], "top_n": 1}),
    ("/v1/rerank", {"query": "owls", "documents": ["owls", "bells"]}),
    ("/v2/rerank", {"query": "river", "documents": ["the quiet river", "an old oak"]}),
    ("/pooling", {"input": ["bells ring", "softly"]}),
    ("/classify", {"input": "the quick brown fox"}),
    ("/v1/responses", {"input": "Tell me about owls", "max_output_tokens": 6}),
    ("/responses", {"input": [{"role": "user", "content": "and rivers"}]}),
]
KINDS = {"/tokenize": "tokenize", "/detokenize": "detokenize", "/score": "score", "/v1/score": "score",
         "/rerank": "rerank", "/v1/rerank": "rerank", "/v2/rerank": "rerank", "/pooling": "pooling",
         "/classify": "classify", "/v1/responses": "responses", "/responses": "responses"}


def test_every_endpoint_answers_through_the_gateway_as_vllm_does(setup):
    gw, gen, _ = setup
    for n, (path, body) in enumerate(CASES, start=1):
        before = gen.stats()
        through = http("POST", gw.base + path, {"model": "gen", **body}, bearer(KEY_A))
        assert through.status == 200, (path, through.text)
        sent = gen.last()
        spent = gen.stats()
        backend_path = "/v1/responses" if path == "/responses" else path
        assert sent["path"] == backend_path
        # the client's bytes reached vLLM with only the model changed to the backend's id
        assert json.loads(base64.b64decode(sent["raw_b64"])) == {"model": "up-gen", **body}
        direct = http("POST", gen.root + backend_path, {"model": "up-gen", **body})
        assert comparable(through.json()) == comparable(direct.json()), path
        line = usage_line(gw, n)
        tokens = (spent["prompt_tokens"] - before["prompt_tokens"], spent["completion_tokens"] - before["completion_tokens"])
        assert (line["endpoint"], line["team"], line["model"], line["status"]) == (KINDS[path], "team-a", "gen", 200)
        assert (line["prompt_tokens"], line["completion_tokens"]) == tokens, path
        if path.endswith("tokenize"):
            assert tokens == (0, 0) and line["usage_source"] is None  # tokenizing generates nothing
        else:
            assert line["usage_source"] == "backend" and line["prompt_tokens"] > 0, path


def test_model_may_be_left_out_where_vllm_allows_it_when_the_key_has_one_model(setup):
    gw, gen, _ = setup
    r = http("POST", gw.base + "/tokenize", {"prompt": "an old oak"}, bearer(KEY_A))
    assert r.status == 200 and r.json()["count"] == 3
    assert json.loads(base64.b64decode(gen.last()["raw_b64"])) == {"model": "up-gen", "prompt": "an old oak"}
    assert usage_line(gw, 1)["model"] == "gen"
    r = http("POST", gw.base + "/rerank", {"query": "q", "documents": ["d"]}, bearer(KEY_B))  # two models
    assert r.status == 400
    error = r.json()["error"]
    assert error["param"] == "model" and "gen, other" in error["message"]
    r = http("POST", gw.base + "/v1/responses", {"input": "hi"}, bearer(KEY_A))  # vLLM requires it here
    assert r.status == 400 and r.json()["error"]["param"] == "model"


def test_keys_allow_lists_and_limits_hold_on_every_endpoint(setup):
    gw, gen, other = setup
    assert http("POST", gw.base + "/tokenize", {"model": "gen", "prompt": "x"}).status == 401
    assert http("POST", gw.base + "/pooling", {"model": "gen", "input": "x"}, bearer("sk-nobody")).status == 401
    refused = http("POST", gw.base + "/score", {"model": "gen", "text_1": "a", "text_2": "b"}, bearer(KEY_C))
    assert refused.status == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert gen.stats()["by_path"].get("/score") is None  # refused before any backend
    # tpm: 20. The first rerank is alone in its minute and passes; its real use then fills the minute.
    body = {"model": "gen", "query": "seven silver owls", "documents": ["owls watch from an old oak tree"] * 3}
    first = http("POST", gw.base + "/v2/rerank", body, bearer(KEY_T))
    assert first.status == 200 and first.json()["usage"]["total_tokens"] > 20
    second = http("POST", gw.base + "/v2/rerank", body, bearer(KEY_T))
    assert second.status == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    assert "20 tokens per minute" in second.json()["error"]["message"]


def test_a_model_whose_backends_lack_an_endpoint_answers_their_own_404(setup):
    gw, _, other = setup
    other.configure(missing_routes="/pooling,/classify")  # a generative model: vLLM registers no pooling routes
    for _ in range(4):  # more than allowed_fails: a 404 is the client's and never takes the model offline
        r = http("POST", gw.base + "/pooling", {"model": "other", "input": "x"}, bearer(KEY_B))
        assert r.status == 404, r.text
        assert r.json()["error"]["message"] == "Not Found"
    ok = http("POST", gw.base + "/v1/chat/completions",
              {"model": "other", "messages": [{"role": "user", "content": "hi"}]}, bearer(KEY_B))
    assert ok.status == 200


def _form_parts(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks audio.translations deprecated
@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
def test_audio_uploads_reach_vllm_byte_for_byte_with_the_backends_model_id(setup, kind):
    gw, gen, _ = setup
    audio = bytes(range(256)) * 500 + b"\r\n--not-a-boundary\r\n" * 3  # 128 kB of "audio", CRLFs and dashes inside
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_A, max_retries=0)
    create = client.audio.transcriptions.create if kind == "transcriptions" else client.audio.translations.create
    answer = create(model="gen", file=("speech.wav", audio, "audio/wav"), temperature=0.2)
    sent = gen.last()
    assert sent["path"] == f"/v1/audio/{kind}"
    parts = _form_parts(base64.b64decode(sent["raw_b64"]), sent["headers"]["Content-Type"])
    assert parts["file"] == ("speech.wav", audio)
    assert parts["model"] == (None, b"up-gen") and parts["temperature"] == (None, b"0.2")
    assert answer.text  # vLLM's {"text": ...}, as the backend sent it
    line = usage_line(gw, 1)
    assert (line["endpoint"], line["model"], line["status"]) == (kind, "gen", 200)
    # vLLM's audio usage is a duration, not tokens: the transcript is estimated, the upload is not a prompt
    assert line["usage_source"] == "estimated" and line["prompt_tokens"] == 0 and line["completion_tokens"] > 0


def test_an_upload_that_is_not_a_form_is_refused_clearly(setup):
    gw, gen, _ = setup
    r = http("POST", gw.base + "/v1/audio/transcriptions", {"model": "gen", "file": "x"}, bearer(KEY_A))
    assert r.status == 400 and "multipart/form-data" in r.json()["error"]["message"]
    assert gen.stats()["by_path"].get("/v1/audio/transcriptions") is None


def test_a_streamed_response_reaches_the_client_event_for_event_and_is_counted(setup):
    gw, gen, _ = setup
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_A, max_retries=0)
    before = gen.stats()
    events = list(client.responses.create(model="gen", input="Tell me about owls", max_output_tokens=7, stream=True))
    spent = gen.stats()
    direct = http("POST", gen.api_base + "/responses",
                  {"model": "up-gen", "input": "Tell me about owls", "max_output_tokens": 7, "stream": True})
    direct_types = [json.loads(e.split("\ndata: ", 1)[1])["type"] for e in direct.text.split("\n\n") if e]
    assert [e.type for e in events] == direct_types
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 7
    line = usage_line(gw, 1)
    assert (line["endpoint"], line["stream"], line["usage_source"]) == ("responses", True, "backend")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        spent["prompt_tokens"] - before["prompt_tokens"], spent["completion_tokens"] - before["completion_tokens"])


def test_an_aborted_responses_stream_is_charged_what_it_delivered(setup):
    gw, gen, _ = setup
    gen.configure(stream_chunks=100, chunk_delay_ms=20)
    body = {"model": "gen", "input": "Tell me about owls", "max_output_tokens": 100, "stream": True}
    read_then_hang_up(gw.base, "/v1/responses", body, bearer(KEY_A), events=20)
    line = usage_line(gw, 1)
    assert wait_until(lambda: gen.stats()["in_flight"] == 0, timeout=10)
    sent = gen.stats()["completion_tokens"]
    assert line["status"] == 499 and line["usage_source"] == "counted"
    assert 15 <= line["completion_tokens"] <= sent < 100
    assert sent - line["completion_tokens"] <= 1  # at most the event in flight when the client left


def test_the_usage_report_of_a_mixed_run_matches_what_the_backends_generated(spawn, tmp_path):
    _, gen_base = start_fake_vllm(spawn, "--stream-chunks", "6", model="up-gen")
    _, lcpp_base = start_fake_vllm(spawn, model="up-lcpp")
    gen, lcpp = Fake(gen_base), Fake(lcpp_base)
    lcpp.configure(mode="no-stream-usage")  # llama-cpp-python: a token a chunk, no usage in streams
    deployments = [{"model_name": "gen", "api_base": gen_base, "model": "hosted_vllm/up-gen"},
                   {"model_name": "lcpp", "api_base": lcpp_base, "model": "hosted_vllm/up-lcpp"}]
    gw = start_gateway(spawn, tmp_path, f"  team-m:\n    keys: [sha256:{sha256_hex(KEY_A)}]\n", deployments=deployments)
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY_A, max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story about owls"}]
    for options in (None, {}, {"include_usage": True}, {"continuous_usage_stats": True}):
        extra = {} if options is None else {"stream_options": options}
        list(client.chat.completions.create(model="gen", messages=messages, max_tokens=9, stream=True, **extra))
    list(client.completions.create(model="gen", prompt="once upon a time", max_tokens=5, stream=True))
    client.embeddings.create(model="gen", input=["owls", "silver owls at dusk"])
    client.responses.create(model="gen", input="and rivers", max_output_tokens=4)
    list(client.responses.create(model="gen", input="and bells", stream=True))
    http("POST", gw.base + "/rerank", {"model": "gen", "query": "owls", "documents": ["owls", "oaks"]}, bearer(KEY_A))
    gen.configure(stream_chunks=100, chunk_delay_ms=20)
    read_then_hang_up(gw.base, "/v1/chat/completions", {"model": "gen", "messages": messages, "max_tokens": 100,
                                                        "stream": True}, bearer(KEY_A), events=10)
    for max_tokens in (3, 8):
        list(client.chat.completions.create(model="lcpp", messages=messages, max_tokens=max_tokens, stream=True))
    assert wait_until(lambda: len(usage_lines(gw)) == 12 and gen.stats()["in_flight"] == 0, timeout=10), usage_lines(gw)
    lines = usage_lines(gw)
    aborted = [x for x in lines if x["status"] == 499]
    assert len(aborted) == 1 and all(x["status"] == 200 for x in lines if x is not aborted[0])
    assert {x["usage_source"] for x in lines if x["model"] == "lcpp"} == {"counted"}

    run = subprocess.run([*LLMGATE, "usage", "--logs", str(gw.log_dir), "--by", "model", "--format", "json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    report = {g["model"]: g for g in json.loads(run.stdout)["groups"]}
    g_stats, l_stats = gen.stats(), lcpp.stats()
    # completions: every token the backends generated, the aborted stream's up to the event in flight
    assert g_stats["completion_tokens"] - 1 <= report["gen"]["completion_tokens"] <= g_stats["completion_tokens"]
    assert report["lcpp"]["completion_tokens"] == l_stats["completion_tokens"] == 3 + 8
    # prompts: the backend's figures, but for the lines that hold the documented estimate instead
    estimated = aborted[0]
    assert report["gen"]["estimated_tokens"] == estimated["prompt_tokens"] + estimated["completion_tokens"] > 0
    exact_gen_prompts = sum(x["prompt_tokens"] for x in lines if x["model"] == "gen" and x is not estimated)
    assert exact_gen_prompts == g_stats["prompt_tokens"] - _prompt_of_aborted(gen)
    assert report["lcpp"]["estimated_tokens"] == report["lcpp"]["total_tokens"]
    assert report["gen"]["requests"] == 10 and report["lcpp"]["requests"] == 2


def _prompt_of_aborted(gen: Fake) -> int:
    """The fake's prompt tokens for the aborted chat request (its last one): one word one token, plus the
    template's 4 per message (fakevllm.server.CHAT_TOKENS_PER_MESSAGE)."""
    body = json.loads(base64.b64decode(gen.last()["raw_b64"]))
    return sum(len(m["content"].split()) + 4 for m in body["messages"])
