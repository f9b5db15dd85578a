"""The fake vLLM server answers like `vllm serve`: driven in-process with the OpenAI SDK and aiohttp."""

from __future__ import annotations

import asyncio
import base64
import math
import signal
import struct
import time
import urllib.request

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from fakevllm.server import EMBEDDING_DIMS, make_fake_vllm_app, serve_fake_vllm
from support import LLMGATE, free_port

MODEL = "llama-3.1-8b-instruct"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something nice"}]


@pytest.fixture
async def start():
    """start(**app_kwargs) -> base URL of a fake vLLM on a free loopback port; all stopped at the end."""
    runners = []

    async def start_one(**kwargs) -> str:
        runner, port = await serve_fake_vllm(make_fake_vllm_app(**{"models": [MODEL], **kwargs}))
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start_one
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def base(start) -> str:
    return await start()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def sdk(base: str, api_key: str = "x") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)


async def sse_events(response: aiohttp.ClientResponse) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order ([DONE] included)."""
    body = await response.read()
    assert body.endswith(b"\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in events), events
    return [event[len(b"data: "):] for event in events]


async def stats(http: aiohttp.ClientSession, base: str) -> dict:
    async with http.get(f"{base}/fake/stats") as r:
        return await r.json()


async def set_config(http: aiohttp.ClientSession, base: str, **config) -> dict:
    async with http.post(f"{base}/fake/config", json=config) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- chat completions ------------------------------------------------------------------------


async def test_chat_completion_answers_like_vllm(base):
    async with sdk(base) as client:
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.message.content.split()) == 5
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    # word count + 4 per message: (3 + 4) + (3 + 4)
    assert completion.usage.prompt_tokens == 14
    assert completion.usage.total_tokens == 19


async def test_chat_without_max_tokens_stops_on_its_own(base):
    async with sdk(base) as client:
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 16


async def test_chat_answer_is_deterministic_per_prompt(base):
    async with sdk(base) as client:
        first = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
        again = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
        other = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a different prompt"}], max_tokens=6
        )
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


async def test_chat_stream_text_equals_non_stream_text(start):
    base = await start(stream_chunks=4)
    async with sdk(base) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content_chunks = chunks[1:]
    assert len(content_chunks) == 4  # --stream-chunks, 10 tokens spread over them
    assert "".join(c.choices[0].delta.content for c in content_chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content_chunks] == [None, None, None, "length"]
    assert all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)


async def test_chat_stream_chunks_are_capped_by_max_tokens(start):
    base = await start(stream_chunks=8)
    async with sdk(base) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True)
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == 1 + 3


async def test_chat_stream_raw_shape_without_usage(base, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = await sse_events(r)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # vLLM omits unset fields in chat chunks
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["stop_reason"] is None
    assert all(c["choices"] for c in chunks)


async def test_chat_stream_usage_chunk_only_with_include_usage(base, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        events = await sse_events(r)
    assert events[-1] == b"[DONE]"
    usage_chunk = orjson.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 14, "total_tokens": 18, "completion_tokens": 4}
    assert all("usage" not in orjson.loads(e) for e in events[:-2])

    async with sdk(base) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


async def test_empty_stream_options_mean_no_usage_and_the_fingerprint_on_the_terminal_chunk(base, http):
    # vLLM 0.32: StreamOptions.include_usage defaults to false, measured against a real server.
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True, "stream_options": {}}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        chunks = [orjson.loads(e) for e in (await sse_events(r))[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["system_fingerprint"] == "fp_fakevllm"
    assert all("system_fingerprint" not in c for c in chunks[:-1])


async def test_with_include_usage_the_fingerprint_moves_to_the_usage_chunk(base, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        chunks = [orjson.loads(e) for e in (await sse_events(r))[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["system_fingerprint"] == "fp_fakevllm"
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert all("system_fingerprint" not in c for c in chunks[:-1])


async def test_no_stream_usage_mode_streams_a_token_a_chunk_and_no_usage(start, http):
    base = await start(stream_chunks=2)
    await set_config(http, base, mode="no-stream-usage")
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        chunks = [orjson.loads(e) for e in (await sse_events(r))[:-1]]
    assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:]].count("") == 0 and len(chunks) == 6
    assert (await stats(http, base))["completion_tokens"] == 5


async def test_continuous_usage_stats_put_running_usage_on_every_chunk(start, http):
    base = await start(stream_chunks=2)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        chunks = [orjson.loads(e) for e in (await sse_events(r))[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 2, 4, 4]
    assert chunks[-1]["choices"] == []


async def test_stream_options_without_stream_is_rejected(base, http):
    body = {"model": MODEL, "messages": MESSAGES, "stream_options": {"include_usage": True}}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert "Stream options can only be defined when `stream=True`" in error["message"]
    assert error["param"] == "stream_options"


async def test_x_request_id_becomes_the_response_id(base, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    async with http.post(f"{base}/v1/chat/completions", json=body, headers={"X-Request-Id": "abc123"}) as r:
        assert (await r.json())["id"] == "chatcmpl-abc123"


async def test_response_model_is_the_first_served_name(start):
    base = await start(models=["primary", "alias"])
    async with sdk(base) as client:
        completion = await client.chat.completions.create(model="alias", messages=MESSAGES, max_tokens=1)
        without_model = await client.chat.completions.create(model="", messages=MESSAGES, max_tokens=1)
    assert completion.model == "primary"
    assert without_model.model == "primary"


async def test_context_length_is_enforced(base):
    async with sdk(base) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9000)
    assert "maximum context length is 8192 tokens" in caught.value.body["message"]


# --- completions ----------------------------------------------------------------------------


async def test_completion_defaults_to_16_tokens_like_vllm(base):
    async with sdk(base) as client:
        completion = await client.completions.create(model=MODEL, prompt="Once upon a time")
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 16
    assert len(completion.choices[0].text.split()) == 16
    assert completion.usage.prompt_tokens == 5  # 4 words + 1


async def test_completion_stream_text_equals_non_stream_text(base, http):
    async with sdk(base) as client:
        whole = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7)
        stream = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(f"{base}/v1/completions", json=body) as r:
        events = await sse_events(r)
    assert events[-1] == b"[DONE]"
    raw_chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["usage"] is None for c in raw_chunks[:-1])  # completion chunks carry "usage": null
    assert raw_chunks[-1]["choices"] == []
    assert raw_chunks[-1]["usage"] == {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3}


async def test_completion_batch_of_prompts(base):
    async with sdk(base) as client:
        completion = await client.completions.create(model=MODEL, prompt=["one two", "three"], max_tokens=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.prompt_tokens == 3 + 2
    assert completion.usage.completion_tokens == 4


async def test_completion_without_prompt_is_rejected(base, http):
    async with http.post(f"{base}/v1/completions", json={"model": MODEL}) as r:
        assert r.status == 400
        assert "Either prompt or prompt_embeds must be provided" in (await r.json())["error"]["message"]


# --- embeddings -----------------------------------------------------------------------------


async def test_embeddings_through_the_sdk_base64_default_and_float(base, http):
    async with sdk(base) as client:
        inputs = ["hello world", "goodbye"]
        default = await client.embeddings.create(model=MODEL, input=inputs)
        as_float = await client.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
    last = await (await http.get(f"{base}/fake/last")).json()
    assert last[0]["body"]["encoding_format"] == "base64"  # what the SDK asks for by default
    assert [d.embedding for d in default.data] == [d.embedding for d in as_float.data]
    first = default.data[0].embedding
    assert len(first) == EMBEDDING_DIMS
    assert math.isclose(math.fsum(v * v for v in first), 1.0, rel_tol=1e-5)
    assert default.data[0].embedding != default.data[1].embedding
    assert default.usage.prompt_tokens == 3 + 2
    assert default.model == MODEL


async def test_embedding_base64_is_little_endian_float32(base, http):
    body = {"model": MODEL, "input": "hello world", "encoding_format": "base64"}
    async with http.post(f"{base}/v1/embeddings", json=body) as r:
        encoded = (await r.json())["data"][0]["embedding"]
    body["encoding_format"] = "float"
    async with http.post(f"{base}/v1/embeddings", json=body) as r:
        floats = (await r.json())["data"][0]["embedding"]
    assert list(struct.unpack(f"<{EMBEDDING_DIMS}f", base64.b64decode(encoded))) == floats


async def test_embedding_input_is_validated(base, http):
    bodies = [
        {}, {"input": 42}, {"input": [[]]}, {"input": "x", "encoding_format": "hex"}, {"input": "x", "dimensions": 8},
    ]
    for body in ({"model": MODEL, **b} for b in bodies):
        async with http.post(f"{base}/v1/embeddings", json=body) as r:
            assert r.status == 400, body
            assert (await r.json())["error"]["code"] == 400


# --- models, health, version, routing -------------------------------------------------------


async def test_models_list_has_vllm_shape(start, http):
    base = await start(models=["a", "b"])
    async with sdk(base) as client:
        page = await client.models.list()
    assert [m.id for m in page.data] == ["a", "b"]
    async with http.get(f"{base}/v1/models") as r:
        body = await r.json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["parent"] is None and card["max_model_len"] == 8192 and card["root"] == "a"
    assert card["permission"][0]["object"] == "model_permission"


async def test_health_version_and_unknown_routes(base, http):
    async with http.get(f"{base}/health") as r:
        assert r.status == 200
        assert await r.read() == b""
    async with http.get(f"{base}/version") as r:
        assert "version" in await r.json()
    async with http.get(f"{base}/v1/nothing-here") as r:
        assert r.status == 404
        assert await r.json() == {"detail": "Not Found"}
    async with http.get(f"{base}/v1/chat/completions") as r:
        assert r.status == 405


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'"a string"',
        b'{"model": "llama-3.1-8b-instruct"}',
        b'{"messages": "hello"}',
        b'{"messages": [42]}',
        b'{"messages": [{"content": "no role"}]}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}',
        b'{"messages": [{"role": "user", "content": "x"}], "stream": "maybe"}',
        b'{"messages": [{"role": "user", "content": "x"}], "stream": [true]}',
        b'{"messages": [{"role": "user", "content": "x"}], "model": 7}',
    ],
)
async def test_bad_chat_requests_get_a_vllm_400(base, http, raw):
    async with http.post(f"{base}/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert r.headers["Content-Type"].startswith("application/json")
        error = (await r.json())["error"]
    assert error["code"] == 400
    assert error["type"] in ("Bad Request", "BadRequestError")
    assert error["message"] and "Traceback" not in error["message"]


async def test_lax_values_are_coerced_like_pydantic(base, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": "3", "temperature": "0.5", "stream": "false"}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert (await r.json())["usage"]["completion_tokens"] == 3


async def test_non_json_content_type_is_rejected(base, http):
    headers = {"Content-Type": "text/plain"}
    async with http.post(f"{base}/v1/chat/completions", data=b'{"messages": []}', headers=headers) as r:
        assert r.status == 400
        assert "Only 'application/json' is allowed" in (await r.json())["error"]["message"]


async def test_unknown_model_is_a_404(base):
    async with sdk(base) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "message": "The model `gpt-nope` does not exist.", "type": "NotFoundError", "param": "model", "code": 404,
    }


# --- api key --------------------------------------------------------------------------------


async def test_api_key_guards_v1_paths_only(start, http):
    base = await start(api_key="sk-fake")
    async with sdk(base, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    async with http.get(f"{base}/v1/models") as r:
        assert r.status == 401
        assert await r.json() == {"error": "Unauthorized"}
    async with http.get(f"{base}/health") as r:
        assert r.status == 200
    async with sdk(base, api_key="sk-fake") as client:
        completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert completion.usage.completion_tokens == 1


# --- faults ---------------------------------------------------------------------------------


async def test_fail_rate_one_fails_every_request_with_a_vllm_500(start):
    base = await start(fail_rate=1.0)
    async with sdk(base) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.body == {
        "message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500,
    }


async def test_fail_rate_is_seeded_and_reset_replays_it(start, http):
    base = await start(fail_rate=0.5, seed=7)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}

    async def statuses() -> list[int]:
        result = []
        for _ in range(20):
            async with http.post(f"{base}/v1/chat/completions", json=body) as r:
                result.append(r.status)
        return result

    first = await statuses()
    assert set(first) == {200, 500}
    async with http.post(f"{base}/fake/reset") as r:
        assert r.status == 200
    assert await statuses() == first


async def test_mode_error_500_and_429(base, http):
    await set_config(http, base, mode="error-500")
    async with sdk(base) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        await set_config(http, base, mode="error-429")
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model=MODEL, prompt="hi")
    assert caught.value.body["code"] == 429


async def test_mode_garbage_is_200_json_that_does_not_parse(base, http):
    await set_config(http, base, mode="garbage")
    async with http.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/json")
        raw = await r.read()
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


@pytest.mark.parametrize(("max_tokens", "content_chunks"), [(8, 2), (1, 1)])
async def test_mode_die_mid_stream_cuts_the_stream_after_two_chunks(base, http, max_tokens, content_chunks):
    await set_config(http, base, mode="die-mid-stream")
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    received = b""
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in r.content.iter_any():
                received += data
    events = [e for e in received.split(b"\n\n") if e]
    assert len(events) == 1 + content_chunks  # the role chunk, then content until the cut
    assert b"[DONE]" not in received

    async with sdk(base) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)


async def test_mode_hang_never_answers_and_counts_the_cancel(base, http):
    await set_config(http, base, mode="hang")
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": "x"},
                             timeout=aiohttp.ClientTimeout(total=0.3)):
            pass

    async def cancelled() -> bool:
        return (await stats(http, base))["cancelled"] == 1

    await eventually(cancelled)


async def test_unknown_config_is_rejected(base, http):
    async with http.post(f"{base}/fake/config", json={"mode": "explode"}) as r:
        assert r.status == 400
    async with http.post(f"{base}/fake/config", json={"latency": 1}) as r:
        assert r.status == 400


async def test_latency_delays_the_answer(start, http):
    base = await start(latency_ms=200)
    began = time.monotonic()
    async with http.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}) as r:
        assert r.status == 200
    assert time.monotonic() - began >= 0.19


# --- accounting ----------------------------------------------------------------------------


async def test_streaming_client_that_disconnects_is_counted_cancelled(start, http):
    base = await start(chunk_delay_ms=100, stream_chunks=8)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        assert (await stats(http, base))["in_flight"] == 1
        r.close()  # drop the connection mid-stream

    async def cancelled() -> bool:
        current = await stats(http, base)
        return current["cancelled"] == 1 and current["in_flight"] == 0

    await eventually(cancelled)
    assert (await stats(http, base))["completed"] == 0


async def test_stats_last_and_reset(base, http):
    async with sdk(base) as client:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    async with http.get(f"{base}/health"):
        pass
    current = await stats(http, base)
    assert current["requests"] == 2 and current["completed"] == 2 and current["in_flight"] == 0
    assert current["by_path"] == {"/v1/chat/completions": 1, "/health": 1}

    last = await (await http.get(f"{base}/fake/last")).json()
    assert [entry["path"] for entry in last] == ["/v1/chat/completions", "/health"]
    assert last[0]["body"]["messages"] == MESSAGES
    assert last[0]["headers"]["Authorization"] == "Bearer x"
    assert last[1]["body"] is None and isinstance(last[1]["ts"], float)

    await set_config(http, base, mode="error-500", latency_ms=5)
    async with http.post(f"{base}/fake/reset") as r:
        assert (await r.json())["mode"] == "normal"
    assert await stats(http, base) == {"requests": 0, "in_flight": 0, "completed": 0, "cancelled": 0, "by_path": {},
                                       "prompt_tokens": 0, "completion_tokens": 0}
    assert await (await http.get(f"{base}/fake/last")).json() == []


async def test_last_keeps_fifty_requests(base, http):
    for _ in range(55):
        async with http.get(f"{base}/health"):
            pass
    assert len(await (await http.get(f"{base}/fake/last")).json()) == 50


# --- the CLI -------------------------------------------------------------------------------


def test_cli_serves_until_sigterm(spawn):
    port = free_port()
    service = spawn([*LLMGATE, "fake-vllm", "--port", str(port), "--model", "m1", "--model", "m2"], r"listening on")
    assert f"fake-vllm listening on http://127.0.0.1:{port} models=m1,m2" in service.output
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        assert r.status == 200
    service.signal(signal.SIGTERM)
    assert service.proc.wait(10) == 0
