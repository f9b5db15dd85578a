"""vLLM's inference endpoints that proxycore routes: where a client calls them, where the backend serves them,
and what each means for accounting.

Every endpoint goes through the same path (inference.py): the same keys, team allow-lists, limits and one
usage line, whose `endpoint` field is the endpoint's `kind`. A backend path is written as vLLM serves it:
one under `/v1/` is the deployment's `api_base` plus the rest (api_base names the `/v1` of a vLLM server);
any other sits at the server's root, which is api_base without a trailing `/v1`.

A request without `model` is refused (400), except on the endpoints where vLLM itself makes the model
optional (tokenize, detokenize, score, rerank, pooling, classify, audio): there it goes to the one model
the key may use, and is refused when the key may use several (docs/proxycore.md, "Endpoints").
"""

from __future__ import annotations

from dataclasses import dataclass

MODELS_PATH = "/v1/models"


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: str  # the usage line's `endpoint`
    routes: tuple[tuple[str, str], ...]  # (the client's path, the backend's path)
    generates: bool = False  # writes new tokens: max_tokens is charged up front, an answer without usage is estimated
    counts_tokens: bool = True  # False: the backend computes nothing worth a token (tokenizing)
    streams: bool = False  # `stream: true` is relayed as server-sent events
    stream_options: bool = False  # streams take OpenAI's stream_options (chat and completions)
    multipart: bool = False  # a multipart/form-data body (an upload), not JSON
    model_optional: bool = False  # vLLM serves it without `model`
    # events that end a stream well; chat and completions end with `data: [DONE]`, the Responses API with its
    # final response event (vllm/entrypoints/openai/responses/serving.py)
    done_markers: tuple[bytes, ...] = (b"data: [DONE]",)


_RESPONSES_DONE = (b'"type":"response.completed"', b'"type":"response.incomplete"', b'"type":"response.failed"')


def _v1(path: str) -> tuple[tuple[str, str], ...]:
    """An OpenAI path: served as /v1/<path> and as /<path> (as LiteLLM does), both sent to the backend's /v1."""
    return (("/v1" + path, "/v1" + path), (path, "/v1" + path))


def _same(*paths: str) -> tuple[tuple[str, str], ...]:
    """vLLM's own paths: each sent to the backend as the client wrote it."""
    return tuple((p, p) for p in paths)


ENDPOINTS = (
    Endpoint("chat", _v1("/chat/completions"), generates=True, streams=True, stream_options=True),
    Endpoint("completions", _v1("/completions"), generates=True, streams=True, stream_options=True),
    Endpoint("embeddings", _v1("/embeddings")),
    Endpoint("responses", _v1("/responses"), generates=True, streams=True, done_markers=_RESPONSES_DONE),
    Endpoint("transcriptions", _v1("/audio/transcriptions"), generates=True, streams=True, multipart=True,
             model_optional=True),
    Endpoint("translations", _v1("/audio/translations"), generates=True, streams=True, multipart=True,
             model_optional=True),
    Endpoint("tokenize", _same("/tokenize"), counts_tokens=False, model_optional=True),
    Endpoint("detokenize", _same("/detokenize"), counts_tokens=False, model_optional=True),
    Endpoint("score", _same("/score", "/v1/score"), model_optional=True),
    Endpoint("rerank", _same("/rerank", "/v1/rerank", "/v2/rerank"), model_optional=True),
    Endpoint("pooling", _same("/pooling"), model_optional=True),
    Endpoint("classify", _same("/classify"), model_optional=True),
)

BACKEND_PATHS = tuple(sorted({backend for e in ENDPOINTS for _, backend in e.routes} | {MODELS_PATH}))


def backend_url(api_base: str, path: str) -> str:
    """The URL of a backend path (as vLLM writes it) at a deployment."""
    base = api_base.rstrip("/")
    if path.startswith("/v1/"):
        return base + path[3:]
    root = base[:-3] if base.endswith("/v1") else base
    return root + path
