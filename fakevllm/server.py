"""A fake vLLM OpenAI-compatible server (`llmgate fake-vllm`, `python -m fakevllm`) for tests, demos and benchmarks.

It answers like `vllm serve` (checked against vLLM's `vllm/entrypoints/openai/` sources, v0.10.1+),
quirks included: errors nested under "error"; pydantic-style validation errors typed "Bad Request";
an unknown model is a 404 "NotFoundError"; the response "model" is always the first served name
(vLLM serves one model under aliases); `X-Request-Id` becomes the response id; `--api-key` guards
only /v1 paths and answers `{"error": "Unauthorized"}`; chat chunks omit "usage" while completion
chunks carry `"usage": null`; the usage-only chunk (`"choices": []`) comes only with
`stream_options.include_usage: true` (vLLM 0.32 defaults it to false, `"stream_options": {}`
included), and `system_fingerprint` rides on it then, else on the terminal chunk; idle keep-alive
connections close after 5 s like uvicorn's.

It serves vLLM's other endpoints too, shaped from vLLM's own protocol modules: /v1/responses (streamed
as `event:` + `data:` pairs ending with response.completed or response.incomplete, no [DONE]),
/tokenize, /detokenize, /score and /v1/score, /rerank, /v1/rerank and /v2/rerank (usage has
total_tokens only), /pooling, /classify, and the multipart /v1/audio/transcriptions and
/translations (usage is a duration). /fake/config `missing_routes` takes some away, as vLLM does for
a model without the task.

Fault modes (/fake/config `mode`) imitate other backends too: `invalid-500` answers what it cannot
validate with a 500 and `no-stream-usage` streams one token a chunk and never sends stream usage
(both as llama-cpp-python's server does). /fake/stats counts the prompt tokens of every request
the model computed (all but tokenize and detokenize) and the completion tokens written out, a
stream cut short counting what went out.

Generated text is deterministic: words from a fixed list, starting at a point chosen by the prompt.
One word is one token. A streamed answer's concatenated text equals the non-streamed answer's.
A response takes latency_ms + (chunks - 1) * chunk_delay_ms whether streamed or not, as generation
would. Test control endpoints live under /fake/ (stats, last requests, config with fault modes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.parser
import email.policy
import hashlib
import hmac
import os
import random
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson
import uvloop
from aiohttp import web

from controller.ops.serving import wait_for_stop

DEFAULT_MODEL = "llama-3.1-8b-instruct"
VLLM_VERSION = "0.11.0+fake"
MAX_MODEL_LEN = 8192
DEFAULT_COMPLETION_TOKENS = 16  # what the fake "model" says when max_tokens does not cap it
CHAT_TOKENS_PER_MESSAGE = 4  # chat template overhead per message in the prompt estimate
EMBEDDING_DIMS = 16
LAST_REQUESTS_KEPT = 50
DIE_AFTER_CHUNKS = 2
KEEPALIVE_TIMEOUT_S = 5.0  # uvicorn's default, which vLLM keeps (VLLM_HTTP_TIMEOUT_KEEP_ALIVE)
MODES = ("normal", "error-500", "error-429", "garbage", "die-mid-stream", "hang", "invalid-500", "no-stream-usage",
         "broken-body", "bad-usage")
FINGERPRINT = "fp_fakevllm"  # what vLLM puts in system_fingerprint (vllm/entrypoints/openai/fingerprint.py)

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven silver owls watch from an old oak "
    "tree near the quiet river and somewhere far away bells ring softly at dusk"
).split()

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}
SSE_DONE = b"data: [DONE]\n\n"
GARBAGE_BODY = b'{"id": "chatcmpl-garbage", "choices": [{"index": 0, <html>upstream exploded'


@dataclass
class FakeConfig:
    """What /fake/config can change at run time."""

    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    stream_chunks: int = 8
    fail_rate: float = 0.0
    mode: str = "normal"
    # comma-separated paths this server lacks: vLLM registers the pooling, score and speech-to-text routes only
    # for a model that supports the task (supported_tasks in vllm/entrypoints/openai/api_server.py), and
    # FastAPI answers a route it does not have with 404 {"detail": "Not Found"}
    missing_routes: str = ""

    def validated(self) -> FakeConfig:
        if not self.latency_ms >= 0 or not self.chunk_delay_ms >= 0:
            raise ValueError("latency_ms and chunk_delay_ms must be >= 0")
        if self.stream_chunks < 1:
            raise ValueError("stream_chunks must be >= 1")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        return self


@dataclass
class FakeStats:
    requests: int = 0
    in_flight: int = 0
    completed: int = 0  # the server finished its side (any status, faults included)
    cancelled: int = 0  # the client went away before the response was finished
    by_path: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # of the requests the model computed (every endpoint but tokenize and detokenize)
    completion_tokens: int = 0  # generated and written to the client (a stream cut short counts what went out)


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: Mapping[str, str]  # the request's own read-only headers; copied only when /fake/last is read
    raw_body: bytes  # parsed only when /fake/last is read, to keep the hot path lean
    ts: float


@dataclass
class FakeVLLM:
    models: tuple[str, ...]
    api_key: str | None
    seed: int | None
    start_config: FakeConfig
    config: FakeConfig
    rng: random.Random
    stats: FakeStats = field(default_factory=FakeStats)
    last: deque[RecordedRequest] = field(default_factory=lambda: deque(maxlen=LAST_REQUESTS_KEPT))
    # (the request's `user` field, time.monotonic()) of each request whose client went away, for bench_cancel.py
    cancels: deque[tuple[str | None, float]] = field(default_factory=lambda: deque(maxlen=LAST_REQUESTS_KEPT * 20))


FAKE = web.AppKey("fake_vllm", FakeVLLM)


class VllmError(Exception):
    """An error answered as vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        return _json(
            {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}},
            status=self.status,
        )


class ClientDisconnected(Exception):
    """The client went away while we were writing; carries the response already started."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _request_error(field_name: str, kind: str, msg: str, param: str | None = None) -> VllmError:
    # FastAPI's RequestValidationError as vLLM renders it: 400, type "Bad Request", pydantic's words.
    message = f"[{{'type': '{kind}', 'loc': ('body', '{field_name}'), 'msg': '{msg}'}}]"
    return VllmError(400, message, "Bad Request", param)


def _bad_request(message: str, param: str | None = None) -> VllmError:
    # vLLM's create_error_response default: what the serving layer rejects after parsing.
    return VllmError(400, message, "BadRequestError", param)


# --- request fields, coerced the way pydantic's lax mode does --------------------------------


def _int_field(body: dict, name: str, default: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None or type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is str:
        try:
            return int(value.strip())
        except ValueError:
            raise _request_error(
                name, "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
            ) from None
    raise _request_error(name, "int_type", "Input should be a valid integer")


def _float_field(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) in (int, float):
        return float(value)
    if type(value) is str:
        try:
            return float(value.strip())
        except ValueError:
            raise _request_error(
                name, "float_parsing", "Input should be a valid number, unable to parse string as a number"
            ) from None
    raise _request_error(name, "float_type", "Input should be a valid number")


_TRUE_STRINGS = frozenset({"true", "t", "yes", "y", "on", "1"})
_BOOL_STRINGS = _TRUE_STRINGS | {"false", "f", "no", "n", "off", "0"}


def _bool_field(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None or type(value) is bool:
        return bool(value)
    if type(value) is int and value in (0, 1):
        return bool(value)
    if type(value) is str and value.lower() in _BOOL_STRINGS:
        return value.lower() in _TRUE_STRINGS
    raise _request_error(name, "bool_type", "Input should be a valid boolean")


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) as vLLM's should_include_usage decides them."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise _request_error("stream_options", "model_type", "Input should be a valid dictionary")
    if options and not stream:
        raise _request_error(
            "stream_options", "value_error",
            "Value error, Stream options can only be defined when `stream=True`.", param="stream_options",
        )
    # vLLM 0.32's StreamOptions.include_usage defaults to False (vllm/entrypoints/openai/protocol.py, measured
    # against a real server): `"stream_options": {}` asks for no usage. should_include_usage
    # (vllm/entrypoints/utils.py) gives continuous stats only together with include_usage.
    include_usage = _bool_field(options, "include_usage")
    continuous = include_usage and _bool_field(options, "continuous_usage_stats")
    return include_usage, continuous


def _sampling_checks(body: dict) -> int:
    """Checks vLLM's SamplingParams makes on the values; returns n."""
    temperature = _float_field(body, "temperature")
    if temperature is not None and temperature < 0:
        raise _bad_request(f"temperature must be non-negative, got {temperature}.", "temperature")
    top_p = _float_field(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad_request(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    n = _int_field(body, "n")
    if n is None:
        return 1
    if n < 1:
        raise _bad_request(f"n must be at least 1, got {n}.", "n")
    return n


def _served_model(fake: FakeVLLM, body: dict) -> str:
    """The name vLLM puts in responses: the first served name, whatever alias was asked for."""
    model = body.get("model")
    if model is not None and type(model) is not str:
        raise _request_error("model", "string_type", "Input should be a valid string")
    if model and model not in fake.models:
        raise VllmError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return fake.models[0]


def _completion_length(prompt_tokens: int, max_tokens: int | None) -> tuple[int, str]:
    """(tokens to generate, finish_reason); an explicit max_tokens is generated in full."""
    if prompt_tokens >= MAX_MODEL_LEN:
        raise _bad_request(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            "input_tokens",
        )
    if max_tokens is None:
        return min(DEFAULT_COMPLETION_TOKENS, MAX_MODEL_LEN - prompt_tokens), "stop"
    if max_tokens < 1:
        raise _bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if prompt_tokens + max_tokens > MAX_MODEL_LEN:
        raise _bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {MAX_MODEL_LEN} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {MAX_MODEL_LEN} - {prompt_tokens}).",
            "max_tokens",
        )
    return max_tokens, "length"


async def _json_body(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise VllmError(400, "[\"Unsupported Media Type: Only 'application/json' is allowed\"]", "Bad Request")
    raw = await request.read()
    if not raw:
        return _not_an_object()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise VllmError(
            400, f"[{{'type': 'json_invalid', 'loc': ('body', {exc.pos}), 'msg': 'JSON decode error'}}]", "Bad Request"
        ) from None
    if not isinstance(body, dict):
        return _not_an_object()
    return body


def _not_an_object() -> dict:
    raise VllmError(
        400,
        "[{'type': 'model_attributes_type', 'loc': ('body',), 'msg': 'Input should be a valid dictionary or "
        "object to extract fields from'}]",
        "Bad Request",
    )


# --- the fake model --------------------------------------------------------------------------


def _words(text: str) -> int:
    return len(text.split())


def _message_text(content: Any) -> str:
    """The text of a message's content: a string, null, or a list of typed parts."""
    if content is None or type(content) is str:
        return content or ""
    if type(content) is not list:
        raise _request_error("messages", "string_type", "Input should be a valid string")
    texts = []
    for part in content:
        if not isinstance(part, dict) or type(part.get("type")) is not str:
            raise _request_error("messages", "union_tag_invalid", "Input should be a content part with a string `type`")
        if part["type"] == "text":
            if type(part.get("text")) is not str:
                raise _request_error("messages", "string_type", "Input should be a valid string")
            texts.append(part["text"])
    return " ".join(texts)


def _generate(seed_text: str, count: int) -> list[str]:
    """`count` tokens (words, each after the first with its leading space) chosen by the prompt."""
    start = zlib.crc32(seed_text.encode()) % len(WORDS)
    tokens = [WORDS[(start + i) % len(WORDS)] for i in range(count)]
    return tokens[:1] + [" " + word for word in tokens[1:]]


def _split(tokens: list[str], chunks: int) -> list[tuple[str, int]]:
    """Groups tokens into at most `chunks` (text, running token count) pieces of near-equal size."""
    chunks = min(chunks, len(tokens))
    size, extra = divmod(len(tokens), chunks)
    pieces, end = [], 0
    for i in range(chunks):
        start, end = end, end + size + (1 if i < extra else 0)
        pieces.append(("".join(tokens[start:end]), end))
    return pieces


def _step_tokens(pieces: list[tuple[str, int]], n: int) -> list[int]:
    """Tokens in each streamed step (every one of the n choices gets its piece)."""
    counts, before = [], 0
    for _, generated in pieces:
        counts.append((generated - before) * n)
        before = generated
    return counts


def _embedding(text: str) -> tuple[float, ...]:
    """A unit vector of float32 values derived from the text (float and base64 agree bit for bit)."""
    digest = hashlib.blake2b(text.encode(), digest_size=2 * EMBEDDING_DIMS).digest()
    raw = [value / 32768.0 for value in struct.unpack(f"<{EMBEDDING_DIMS}h", digest)]
    norm = sum(value * value for value in raw) ** 0.5 or 1.0
    return struct.unpack(f"<{EMBEDDING_DIMS}f", struct.pack(f"<{EMBEDDING_DIMS}f", *(v / norm for v in raw)))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    # vLLM's UsageInfo field order
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "total_tokens": total, "completion_tokens": completion_tokens}


def _response_id(request: web.Request, prefix: str) -> str:
    return prefix + (request.headers.get("X-Request-Id") or os.urandom(16).hex())


def _sse(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


# --- faults and pacing -----------------------------------------------------------------------


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


async def _fault_response(fake: FakeVLLM, request: web.Request, streaming: bool) -> web.StreamResponse | None:
    """The response a fault mode gives instead of an answer, or None to answer normally."""
    mode = fake.config.mode
    if mode == "normal":
        if fake.config.fail_rate > 0 and fake.rng.random() < fake.config.fail_rate:
            return VllmError(500, "Internal server error", "InternalServerError").response()
        return None
    if mode == "error-500":
        return VllmError(500, "Internal server error", "InternalServerError").response()
    if mode == "error-429":
        return VllmError(429, "Too many requests, please retry later.", "Too Many Requests").response()
    if mode == "garbage":
        return web.Response(body=GARBAGE_BODY, content_type="application/json")
    if mode == "broken-body":  # a JSON 200 whose body breaks off: Content-Length promises more than comes
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "4096"})
        await response.prepare(request)
        await response.write(GARBAGE_BODY[:40])
        _drop_connection(request)
        return response
    if mode == "hang":
        await asyncio.Event().wait()  # until the client goes away or the server stops
    if mode == "die-mid-stream" and not streaming:
        _drop_connection(request)
        return web.Response()  # never sent: the connection is gone
    return None


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


async def _stream(
    fake: FakeVLLM, request: web.Request, head: Iterable[bytes], steps: list[bytes], tail: Iterable[bytes],
    step_tokens: list[int],
) -> web.StreamResponse:
    """Writes an SSE answer: head events, content steps paced by chunk_delay_ms, tail events.

    `step_tokens[i]` tokens go out with step i: the stats count what was written before any disconnect."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    delay_ms = fake.config.chunk_delay_ms
    die = fake.config.mode == "die-mid-stream"
    stats = fake.stats
    try:
        await response.prepare(request)
        for event in head:
            await response.write(event)
        for i, step in enumerate(steps[:DIE_AFTER_CHUNKS] if die else steps):
            if i:
                await _sleep_ms(delay_ms)
            await response.write(step)
            stats.completion_tokens += step_tokens[i]
        if die:
            _drop_connection(request)  # no [DONE], no terminating chunk
            return response
        for event in tail:
            await response.write(event)
    except ConnectionResetError:
        raise ClientDisconnected(response) from None
    return response


async def _pace_whole_answer(fake: FakeVLLM, chunks: int) -> None:
    """A non-streamed answer takes as long as the streamed one would."""
    await _sleep_ms(fake.config.chunk_delay_ms * (max(chunks, 1) - 1))


# --- endpoints -------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE]
    body = await _json_body(request)

    messages = body.get("messages")
    if messages is None:
        raise _request_error("messages", "missing", "Field required")
    if not isinstance(messages, list):
        raise _request_error("messages", "list_type", "Input should be a valid list")
    prompt_tokens, seed_parts = 0, []
    for message in messages:
        if not isinstance(message, dict) or type(message.get("role")) is not str:
            raise _request_error("messages", "union_tag_invalid", "Input should be a message with a string `role`")
        text = _message_text(message.get("content"))
        seed_parts.append(text)
        prompt_tokens += _words(text) + CHAT_TOKENS_PER_MESSAGE
    stream = _bool_field(body, "stream")
    include_usage, continuous = _stream_options(body, stream)
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    n = _sampling_checks(body)
    model = _served_model(fake, body)
    count, finish_reason = _completion_length(prompt_tokens, max_tokens)

    await _sleep_ms(fake.config.latency_ms)
    fault = await _fault_response(fake, request, stream)
    if fault is not None:
        return fault

    no_usage = fake.config.mode == "no-stream-usage"  # llama-cpp-python: one token a chunk, never stream usage
    pieces = _split(_generate("\n".join(seed_parts), count), count if no_usage else fake.config.stream_chunks)
    rid, created = _response_id(request, "chatcmpl-"), int(time.time())
    fake.stats.prompt_tokens += prompt_tokens
    if not stream:
        await _pace_whole_answer(fake, len(pieces))
        text = "".join(piece for piece, _ in pieces)
        fake.stats.completion_tokens += count * n
        return _json({
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant", "content": text, "refusal": None, "annotations": None,
                        "audio": None, "function_call": None, "tool_calls": [], "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                }
                for i in range(n)
            ],
            "service_tier": None,
            "system_fingerprint": FINGERPRINT,
            "usage": {**_usage(prompt_tokens, count * n), "prompt_tokens_details": None},
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "kv_transfer_params": None,
        })

    # Chunks are serialised with exclude_unset: no "usage" key unless usage is being reported,
    # and "prompt_token_ids" only on the first chunk.
    def chunk(choice: dict, generated: int | None, first: bool = False) -> bytes:
        data: dict[str, Any] = {
            "id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice],
        }
        if not include_usage and choice.get("finish_reason") is not None:
            # vllm/entrypoints/openai/chat_completion/serving.py stamps the fingerprint on the terminal chunk,
            # or, when usage is asked for, on the usage chunk that follows it
            data["system_fingerprint"] = FINGERPRINT
        if generated is not None:
            data["usage"] = _usage(prompt_tokens, generated)
        if first:
            data["prompt_token_ids"] = None
        return _sse(data)

    head = [
        chunk(
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
            0 if continuous else None,
            first=True,
        )
        for i in range(n)
    ]
    steps = []
    for j, (piece, generated) in enumerate(pieces):
        if j < len(pieces) - 1:
            choice = {"delta": {"content": piece}, "logprobs": None, "finish_reason": None, "token_ids": None}
        else:  # the last token's chunk carries the finish
            choice = {
                "delta": {"content": piece}, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
                "token_ids": None,
            }
        steps.append(b"".join(chunk({"index": i, **choice}, generated if continuous else None) for i in range(n)))
    tail = [SSE_DONE]
    if include_usage and not no_usage:
        usage_chunk = {
            "id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": _usage(prompt_tokens, count * n), "system_fingerprint": FINGERPRINT,
        }
        tail.insert(0, _sse(usage_chunk))
    return await _stream(fake, request, head, steps, tail, _step_tokens(pieces, n))


async def completions(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE]
    body = await _json_body(request)

    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise _request_error(
            "prompt", "value_error", "Value error, Either prompt or prompt_embeds must be provided and non-empty."
        )
    prompts = _text_inputs(prompt, "prompt")
    stream = _bool_field(body, "stream")
    include_usage, continuous = _stream_options(body, stream)
    echo = _bool_field(body, "echo")
    max_tokens = _int_field(body, "max_tokens", DEFAULT_COMPLETION_TOKENS)
    n = _sampling_checks(body)
    model = _served_model(fake, body)
    no_usage = fake.config.mode == "no-stream-usage"  # llama-cpp-python: one token a chunk, never stream usage
    plans = []  # per prompt: (prompt text, prompt tokens, pieces, completion tokens, finish_reason)
    for text, prompt_tokens in prompts:
        count, finish_reason = _completion_length(prompt_tokens, max_tokens)
        pieces = _split(_generate(text, count), count if no_usage else fake.config.stream_chunks)
        plans.append((text if echo else "", prompt_tokens, pieces, count, finish_reason))
    total_prompt = sum(plan[1] for plan in plans)
    total_completion = sum(plan[3] for plan in plans) * n

    await _sleep_ms(fake.config.latency_ms)
    fault = await _fault_response(fake, request, stream)
    if fault is not None:
        return fault

    rid, created = _response_id(request, "cmpl-"), int(time.time())
    fake.stats.prompt_tokens += total_prompt
    if not stream:
        await _pace_whole_answer(fake, sum(len(plan[2]) for plan in plans))
        fake.stats.completion_tokens += total_completion
        choices = [
            {
                "index": p * n + i,
                "text": echoed + "".join(piece for piece, _ in pieces),
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
            }
            for p, (echoed, _, pieces, _, finish_reason) in enumerate(plans)
            for i in range(n)
        ]
        return _json({
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": FINGERPRINT,
            "usage": {**_usage(total_prompt, total_completion), "prompt_tokens_details": None},
            "kv_transfer_params": None,
        })

    # Completion chunks are serialised in full: every field, "usage": null included.
    steps, step_tokens = [], []
    for p, (echoed, prompt_tokens, pieces, _, finish_reason) in enumerate(plans):
        step_tokens += _step_tokens(pieces, n)
        for j, (piece, generated) in enumerate(pieces):
            last = j == len(pieces) - 1
            events = []
            for i in range(n):
                choice = {
                    "index": p * n + i,
                    "text": (echoed if j == 0 else "") + piece,
                    "logprobs": None,
                    "finish_reason": finish_reason if last else None,
                    "stop_reason": None,
                    "prompt_token_ids": None,
                    "token_ids": None,
                }
                usage = _usage(prompt_tokens, generated) if continuous else None
                data = {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [choice], "usage": usage}
                if last and not include_usage:
                    data["system_fingerprint"] = FINGERPRINT
                events.append(_sse(data))
            steps.append(b"".join(events))
    tail = [SSE_DONE]
    if include_usage and not no_usage:
        usage_chunk = {
            "id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": _usage(total_prompt, total_completion), "system_fingerprint": FINGERPRINT,
        }
        tail.insert(0, _sse(usage_chunk))
    return await _stream(fake, request, (), steps, tail, step_tokens)


def _text_inputs(value: Any, field_name: str) -> list[tuple[str, int]]:
    """(text that seeds the output, tokens) per input of a prompt or embedding input:
    str, [str], [int] (one tokenised input) or [[int]]. Text counts a word a token, plus one (BOS)."""
    if type(value) is str:
        return [(value, _words(value) + 1)]
    if type(value) is list and value:
        if all(type(item) is str for item in value):
            return [(item, _words(item) + 1) for item in value]
        if all(type(item) is int for item in value):
            return [(",".join(map(str, value)), len(value))]
        if all(type(item) is list and item and all(type(t) is int for t in item) for item in value):
            return [(",".join(map(str, item)), len(item)) for item in value]
    raise _request_error(field_name, "union_type", "Input should be a string, a list of strings, or token ids")


async def embeddings(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE]
    body = await _json_body(request)

    if body.get("input") is None and isinstance(body.get("messages"), list):
        # vLLM's EmbeddingChatRequest (vllm/entrypoints/pooling/embed/protocol.py): the chat template's text,
        # embedded as one input
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        text = " ".join(_message_text(m.get("content")) for m in messages)
        texts = [(text, _words(text) + CHAT_TOKENS_PER_MESSAGE * len(messages))]
    elif body.get("input") is None:
        raise _request_error("input", "missing", "Field required")
    else:
        texts = _text_inputs(body["input"], "input")
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise _request_error("encoding_format", "literal_error", "Input should be 'float' or 'base64'")
    if _int_field(body, "dimensions") is not None:
        raise _bad_request(
            "Model does not support matryoshka representation, changing output dimensions will lead to poor results.",
            "dimensions",
        )
    model = _served_model(fake, body)
    for _, tokens in texts:
        if tokens > MAX_MODEL_LEN:
            raise _bad_request(
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {tokens} "
                "tokens in the input for embedding generation. Please reduce the length of the input.",
                "input_tokens",
            )

    await _sleep_ms(fake.config.latency_ms)
    fault = await _fault_response(fake, request, streaming=False)
    if fault is not None:
        return fault

    data = []
    for index, (text, _) in enumerate(texts):
        vector = _embedding(text)
        if encoding_format == "base64":  # little-endian float32, what the OpenAI SDK decodes
            encoded: Any = base64.b64encode(struct.pack(f"<{EMBEDDING_DIMS}f", *vector)).decode()
        else:
            encoded = list(vector)
        data.append({"index": index, "object": "embedding", "embedding": encoded})
    prompt_tokens = sum(tokens for _, tokens in texts)
    fake.stats.prompt_tokens += prompt_tokens
    return _json({
        "id": _response_id(request, "embd-"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {**_usage(prompt_tokens, 0), "prompt_tokens_details": None},
    })


# --- vLLM's other endpoints -----------------------------------------------------------------
# Shapes from vLLM's own protocol modules: vllm/entrypoints/openai/responses/protocol.py and api_router.py
# (Responses, streamed as `event: <type>` + `data:` with no [DONE]), vllm/entrypoints/serve/tokenize/,
# vllm/entrypoints/pooling/score/protocol.py (score, rerank: model optional, RerankUsage has total_tokens
# only), vllm/entrypoints/pooling/pooling/ and classify/, and vllm/entrypoints/openai/speech_to_text/
# (multipart transcriptions and translations). One word is one token, as everywhere in this fake.


def _token_ids(text: str) -> list[int]:
    return [WORDS.index(w) if w in WORDS else 1000 + zlib.crc32(w.encode()) % 30000 for w in text.split()]


async def tokenize(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await _json_body(request)
    _served_model(fake, body)
    if body.get("messages") is not None:
        text = " ".join(_message_text(m.get("content")) for m in body["messages"] if isinstance(m, dict))
    elif type(body.get("prompt")) is str:
        text = body["prompt"]
    else:
        raise _request_error("prompt", "missing", "Field required")
    ids = _token_ids(text)  # tokenizing generates nothing: not in the stats' prompt_tokens
    return _json({"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": None})


async def detokenize(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await _json_body(request)
    _served_model(fake, body)
    tokens = body.get("tokens")
    if type(tokens) is not list or not all(type(t) is int for t in tokens):
        raise _request_error("tokens", "list_type", "Input should be a valid list")
    return _json({"prompt": " ".join(WORDS[t % len(WORDS)] for t in tokens)})


def _score(a: str, b: str) -> float:
    shared = set(a.lower().split()) & set(b.lower().split())
    return round(len(shared) / (1 + len(set(b.lower().split()))), 6)


async def score(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await _json_body(request)
    model = _served_model(fake, body)
    first, second = body.get("text_1"), body.get("text_2")
    if first is None or second is None:
        raise _request_error("text_1" if first is None else "text_2", "missing", "Field required")
    lefts = [first] if type(first) is str else first
    rights = [second] if type(second) is str else second
    if len(lefts) == 1:
        lefts = lefts * len(rights)
    pairs = list(zip(lefts, rights))
    tokens = sum(_words(a) + _words(b) + 2 for a, b in pairs)
    fake.stats.prompt_tokens += tokens
    return _json({"id": _response_id(request, "score-"), "object": "list", "created": int(time.time()), "model": model,
                  "data": [{"index": i, "object": "score", "score": _score(a, b)} for i, (a, b) in enumerate(pairs)],
                  "usage": _usage(tokens, 0)})


async def rerank(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await _json_body(request)
    model = _served_model(fake, body)
    query, documents = body.get("query"), body.get("documents")
    if type(query) is not str or type(documents) is not list:
        raise _request_error("query" if type(query) is not str else "documents", "missing", "Field required")
    results = sorted(({"index": i, "document": {"text": d}, "relevance_score": _score(query, d)}
                      for i, d in enumerate(documents)), key=lambda r: -r["relevance_score"])
    top_n = _int_field(body, "top_n") or len(results)
    tokens = sum(_words(query) + _words(d) + 2 for d in documents)
    fake.stats.prompt_tokens += tokens
    return _json({"id": _response_id(request, "rerank-"), "model": model, "usage": {"total_tokens": tokens},
                  "results": results[:top_n]})


async def pooling(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await _json_body(request)
    model = _served_model(fake, body)
    if body.get("input") is None:
        raise _request_error("input", "missing", "Field required")
    texts = _text_inputs(body["input"], "input")
    tokens = sum(t for _, t in texts)
    fake.stats.prompt_tokens += tokens
    return _json({"id": _response_id(request, "pool-"), "object": "list", "created": int(time.time()), "model": model,
                  "data": [{"index": i, "object": "pooling", "data": list(_embedding(text))}
                           for i, (text, _) in enumerate(texts)],
                  "usage": _usage(tokens, 0)})


async def classify(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await _json_body(request)
    model = _served_model(fake, body)
    if body.get("input") is None:
        raise _request_error("input", "missing", "Field required")
    texts = _text_inputs(body["input"], "input")
    tokens = sum(t for _, t in texts)
    fake.stats.prompt_tokens += tokens
    data = []
    for i, (text, _) in enumerate(texts):
        positive = round(0.5 + _embedding(text)[0] / 2, 6)
        data.append({"index": i, "label": "positive" if positive >= 0.5 else "negative",
                     "probs": [round(1 - positive, 6), positive], "num_classes": 2})
    return _json({"id": _response_id(request, "classify-"), "object": "list", "created": int(time.time()),
                  "model": model, "data": data, "usage": _usage(tokens, 0)})


def _multipart_fields(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename or None, bytes) for each part; the middleware has already read the body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


async def audio(request: web.Request) -> web.Response:
    """Transcriptions and translations: a multipart form with `file` and `model` (vLLM's speech_to_text)."""
    fake = request.app[FAKE]
    if not request.content_type.startswith("multipart/form-data"):
        raise VllmError(400, "Content-Type must be multipart/form-data", "BadRequestError")
    fields = _multipart_fields(request.headers["Content-Type"], await request.read())
    upload = fields.get("file")
    if upload is None or upload[0] is None:
        raise _request_error("file", "missing", "Field required")
    model = fields.get("model")
    _served_model(fake, {"model": model[1].decode(errors="replace")} if model is not None else {})
    filename, audio_bytes = upload
    seconds = max(1, len(audio_bytes) // 32000)  # 16 kHz, 16-bit mono
    text = " ".join(_generate(filename or "audio", min(64, 3 * seconds)))
    return _json({"text": text, "usage": {"type": "duration", "seconds": seconds}})


async def responses(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE]
    body = await _json_body(request)
    given = body.get("input")
    if type(given) is str:
        text = given
    elif type(given) is list:
        text = " ".join(_message_text(item.get("content")) for item in given if isinstance(item, dict))
    else:
        raise _request_error("input", "missing", "Field required")
    model = _served_model(fake, body)
    stream = _bool_field(body, "stream")
    max_tokens = _int_field(body, "max_output_tokens")
    input_tokens = _words(text) + CHAT_TOKENS_PER_MESSAGE
    count, finish_reason = _completion_length(input_tokens, max_tokens)
    await _sleep_ms(fake.config.latency_ms)
    fault = await _fault_response(fake, request, stream)
    if fault is not None:
        return fault
    fake.stats.prompt_tokens += input_tokens
    pieces = _split(_generate(text, count), fake.config.stream_chunks)
    rid, msg_id, created = _response_id(request, "resp_"), "msg_" + os.urandom(8).hex(), int(time.time())
    full_text = "".join(piece for piece, _ in pieces)
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": count,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input_tokens + count}
    status = "completed" if finish_reason == "stop" else "incomplete"

    def response(state: str, text_out: str | None, with_usage: bool) -> dict:
        output = [] if text_out is None else [{
            "id": msg_id, "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text_out, "annotations": [], "logprobs": None}]}]
        return {"id": rid, "object": "response", "created_at": created, "model": model, "status": state,
                "output": output, "usage": usage if with_usage else None,
                "incomplete_details": None if state != "incomplete" else {"reason": "max_output_tokens"}}

    if not stream:
        await _pace_whole_answer(fake, len(pieces))
        fake.stats.completion_tokens += count
        return _json(response(status, full_text, True))

    seq = iter(range(1_000_000))

    def event(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\n".encode() + _sse({"type": kind, "sequence_number": next(seq), **data})

    head = [event("response.created", response=response("in_progress", None, False)),
            event("response.in_progress", response=response("in_progress", None, False)),
            event("response.output_item.added", output_index=0,
                  item={"id": msg_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}),
            event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                  part={"type": "output_text", "text": "", "annotations": []})]
    steps = [event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0, delta=piece,
                   logprobs=[]) for piece, _ in pieces]
    final = "response.completed" if status == "completed" else "response.incomplete"
    tail = [event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=full_text,
                  logprobs=[]),
            event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0,
                  part={"type": "output_text", "text": full_text, "annotations": []}),
            event("response.output_item.done", output_index=0, item=response(status, full_text, False)["output"][0]),
            event(final, response=response(status, full_text, True))]
    return await _stream(fake, request, head, steps, tail, _step_tokens(pieces, 1))


async def list_models(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    now = int(time.time())
    cards = [
        {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": fake.models[0],  # one model served under several names
            "parent": None,
            "max_model_len": MAX_MODEL_LEN,
            "permission": [
                {
                    "id": f"modelperm-{os.urandom(16).hex()}",
                    "object": "model_permission",
                    "created": now,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for name in fake.models
    ]
    return _json({"object": "list", "data": cards})


async def health(request: web.Request) -> web.Response:
    return web.Response()


async def version(request: web.Request) -> web.Response:
    return _json({"version": VLLM_VERSION})


# --- /fake/ test control (not part of vLLM) --------------------------------------------------


async def fake_stats(request: web.Request) -> web.Response:
    return _json(asdict(request.app[FAKE].stats))


async def fake_last(request: web.Request) -> web.Response:
    return _json([
        {
            "path": entry.path,
            "headers": {str(name): value for name, value in entry.headers.items()},
            "body": _parse_or_none(entry.raw_body),
            "raw_b64": base64.b64encode(entry.raw_body).decode(),  # the bytes as they arrived
            "ts": entry.ts,
        }
        for entry in request.app[FAKE].last
    ])


def _parse_or_none(raw: bytes) -> Any:
    """The body parsed, or None when it is not JSON or too deep for orjson to write back out (254 levels)."""
    try:
        parsed = orjson.loads(raw) if raw else None
        orjson.dumps(parsed)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return None
    return parsed


def _user_of(raw: bytes) -> str | None:
    body = _parse_or_none(raw)
    user = body.get("user") if isinstance(body, dict) else None
    return user if isinstance(user, str) else None


async def fake_cancels(request: web.Request) -> web.Response:
    """When each request whose client went away was cancelled here: its `user` and time.monotonic() (one clock
    for every process of the machine, so a client can tell how long the cancel took to arrive)."""
    return _json([{"user": user, "monotonic": at} for user, at in request.app[FAKE].cancels])


async def fake_config(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    try:
        changes = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _bad_request("the body must be a JSON object") from None
    if not isinstance(changes, dict):
        raise _bad_request("the body must be a JSON object")
    unknown = sorted(set(changes) - set(asdict(fake.config)))
    if unknown:
        raise _bad_request(f"unknown config keys: {', '.join(unknown)}")
    try:
        # each value converted to the type of the setting it replaces (float, int or str)
        converted = {key: type(getattr(fake.config, key))(value) for key, value in changes.items()}
        fake.config = replace(fake.config, **converted).validated()
    except (TypeError, ValueError) as exc:
        raise _bad_request(str(exc)) from None
    return _json(asdict(fake.config))


async def fake_reset(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    fake.stats = FakeStats()  # requests still running finish against the old counters
    fake.last.clear()
    fake.cancels.clear()
    fake.config = replace(fake.start_config)
    fake.rng.seed(fake.seed)
    return _json(asdict(fake.config))


# --- app -------------------------------------------------------------------------------------


def _with_bad_usage(response: web.Response) -> web.Response:
    """A non-streamed answer whose usage is impossible (negative), as a broken backend might report it."""
    body = _parse_or_none(response.body if isinstance(response.body, bytes) else b"")
    if not isinstance(body, dict) or not isinstance(body.get("usage"), dict):
        return response
    body["usage"] = {**body["usage"], "prompt_tokens": -5, "completion_tokens": -1}
    return _json(body)


def _authorized(api_key: str, request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())


@web.middleware
async def _serve(request: web.Request, handler: Any) -> web.StreamResponse:
    """Accounting, /fake/last, vLLM's --api-key check and FastAPI-shaped errors around every route."""
    path = request.path
    if path.startswith("/fake/"):
        try:
            return await handler(request)
        except VllmError as error:
            return error.response()
    fake = request.app[FAKE]
    stats = fake.stats  # a /fake/reset while this request runs leaves the new counters alone
    stats.requests += 1
    stats.in_flight += 1
    stats.by_path[path] = stats.by_path.get(path, 0) + 1
    raw_body = b""
    try:
        raw_body = await request.read() if request.body_exists else b""
        fake.last.append(RecordedRequest(path, request.headers, raw_body, time.time()))
        if fake.api_key is not None and path.startswith("/v1") and not _authorized(fake.api_key, request):
            response: web.StreamResponse = _json({"error": "Unauthorized"}, status=401)
        elif fake.config.missing_routes and path in fake.config.missing_routes.split(","):
            response = _json({"detail": "Not Found"}, status=404)
        else:
            response = await handler(request)
            if fake.config.mode == "bad-usage" and isinstance(response, web.Response) and response.status == 200:
                response = _with_bad_usage(response)
    except VllmError as error:
        if error.status == 400 and fake.config.mode == "invalid-500":
            # llama-cpp-python answers a request it cannot validate (a bad schema, a wrong type) with a 500
            error = VllmError(500, f"Internal Server Error: {error.message}", "internal_server_error")
        response = error.response()
    except web.HTTPException as exc:  # unknown route, wrong method, body too large
        response = _json({"detail": exc.reason}, status=exc.status)
    except asyncio.CancelledError:
        stats.cancelled += 1
        fake.cancels.append((_user_of(raw_body), time.monotonic()))
        raise
    except ClientDisconnected as gone:
        stats.cancelled += 1
        fake.cancels.append((_user_of(raw_body), time.monotonic()))
        return gone.response
    except Exception as exc:  # a bug here must still look like a server error, not a traceback
        response = VllmError(500, f"{type(exc).__name__}: {exc}", "InternalServerError").response()
    finally:
        stats.in_flight -= 1
    stats.completed += 1
    return response


def make_fake_vllm_app(
    *,
    models: Iterable[str] | None = None,
    latency_ms: float = 0.0,
    stream_chunks: int = 8,
    chunk_delay_ms: float = 0.0,
    fail_rate: float = 0.0,
    seed: int | None = None,
    api_key: str | None = None,
) -> web.Application:
    """The fake server as an aiohttp app; serve it with serve_fake_vllm (handler cancellation on)."""
    names = tuple(models or (DEFAULT_MODEL,))
    config = FakeConfig(
        latency_ms=float(latency_ms), chunk_delay_ms=float(chunk_delay_ms), stream_chunks=int(stream_chunks),
        fail_rate=float(fail_rate),
    ).validated()
    app = web.Application(middlewares=[_serve], client_max_size=256 * 1024 * 1024)
    app[FAKE] = FakeVLLM(
        models=names, api_key=api_key or None, seed=seed, start_config=config, config=replace(config),
        rng=random.Random(seed),
    )
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, rerank)
    app.router.add_post("/pooling", pooling)
    app.router.add_post("/classify", classify)
    app.router.add_post("/v1/audio/transcriptions", audio)
    app.router.add_post("/v1/audio/translations", audio)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/fake/stats", fake_stats)
    app.router.add_get("/fake/last", fake_last)
    app.router.add_get("/fake/cancels", fake_cancels)
    app.router.add_post("/fake/config", fake_config)
    app.router.add_post("/fake/reset", fake_reset)
    return app


async def serve_fake_vllm(app: web.Application, *, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serves `app` on host:port (0 picks a free port); returns the runner and the bound port."""
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,  # a client that goes away cancels its handler, as in vLLM
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def _serve_until_signalled(app: web.Application, host: str, port: int) -> int:
    try:
        runner, bound_port = await serve_fake_vllm(app, host=host, port=port)
    except OSError as exc:
        print(f"fake-vllm: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    shown_host = f"[{host}]" if ":" in host else host
    print(f"fake-vllm listening on http://{shown_host}:{bound_port} models={','.join(app[FAKE].models)}", flush=True)
    try:
        await wait_for_stop()
    finally:
        await runner.cleanup()
    return 0


def run_fake_vllm(args: argparse.Namespace) -> int:
    """`llmgate fake-vllm`: serve until SIGTERM or SIGINT, then return 0."""
    try:
        app = make_fake_vllm_app(
            models=args.models,
            latency_ms=args.latency_ms,
            stream_chunks=args.stream_chunks,
            chunk_delay_ms=args.chunk_delay_ms,
            fail_rate=args.fail_rate,
            seed=args.seed,
            api_key=getattr(args, "api_key", None),
        )
    except ValueError as exc:
        print(f"fake-vllm: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(_serve_until_signalled(app, args.host, args.port))
