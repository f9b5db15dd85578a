"""config.yaml (LiteLLM's proxy format) parsed once into frozen, typed objects.

Every error names the file, the path inside it, what was expected and how to fix it.
Keys llmgate does not support are collected and reported in one warning.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from controller.model import scalars
from controller.model.yamlpath import Node, load_yaml_file

ROUTING_STRATEGIES = (
    "simple-shuffle",
    "least-busy",
    "latency-based-routing",
    "usage-based-routing",
    "usage-based-routing-v2",
)
PROVIDER_PREFIXES = ("hosted_vllm/", "openai/")


@dataclass(frozen=True)
class Deployment:
    """One backend serving one model name: a `model_list` entry."""

    id: str  # stable name for logs and metrics: "<model_name>/<index>" unless model_info.id is set
    model_name: str  # what clients ask for; entries sharing it form a group
    upstream_model: str  # what the backend is asked for (provider prefix removed)
    api_base: str  # ends with /v1
    api_key: str | None
    weight: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    order: int | None = None
    timeout: float | None = None  # a non-streamed answer (its first byte is all of it); proxycore's default: 30 s
    stream_timeout: float | None = None  # a stream's first byte, and the longest silence inside it
    max_retries: int | None = None
    input_cost_per_token: float = 0.0
    output_cost_per_token: float = 0.0
    mode: str | None = None


@dataclass(frozen=True)
class RouterSettings:
    routing_strategy: str = "simple-shuffle"
    num_retries: int = 2
    retry_after: float = 0.0
    allowed_fails: int = 3
    cooldown_time: float = 5.0
    timeout: float | None = None
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyConfig:
    path: str
    deployments: tuple[Deployment, ...]
    router: RouterSettings
    master_key: str | None
    ssl_verify: bool | str = True
    max_request_bytes: int = 32 * 1024 * 1024
    health_check_interval: float = 5.0  # seconds between probes of a deployment (jittered)
    database_url: str | None = None  # DB mode: virtual keys (sqlite:///path or postgresql://...)
    warnings: tuple[str, ...] = ()

    def model_names(self) -> list[str]:
        return sorted({d.model_name for d in self.deployments})


# ---------------------------------------------------------------- top level

_TOP_KEYS = {"model_list", "router_settings", "general_settings", "litellm_settings", "environment_variables"}
_PARAM_KEYS = {"model", "api_base", "api_key", "weight", "rpm", "tpm", "order", "timeout",
               "stream_timeout", "max_retries", "input_cost_per_token", "output_cost_per_token"}
_MODEL_INFO_KEYS = {"id", "mode", "input_cost_per_token", "output_cost_per_token", "base_model"}
_ROUTER_KEYS = {"routing_strategy", "num_retries", "retry_after", "allowed_fails", "cooldown_time",
                "fallbacks", "timeout"}
_GENERAL_KEYS = {"master_key", "max_request_size_mb", "background_health_checks", "health_check_interval",
                 "database_url"}
_LITELLM_KEYS = {"ssl_verify"}


def load_proxy_config(path: str | os.PathLike[str]) -> ProxyConfig:
    """Read and validate a LiteLLM-compatible config.yaml; raise ConfigError on any problem."""
    root = load_yaml_file(path)
    return parse_proxy_config(root)


def parse_proxy_config(root: Node) -> ProxyConfig:
    unsupported: list[str] = []
    root.expect_mapping()
    unsupported += root.unknown_keys(_TOP_KEYS)
    # LiteLLM sets these before anything else is read; we do the same so os.environ/ sees them.
    env_node = root.get("environment_variables")
    if env_node is not None:
        for name, value in env_node.mapping_items():
            os.environ.setdefault(name, str(value.scalar()))

    general = root.get("general_settings")
    master_key = None
    database_url = None
    max_request_bytes = 32 * 1024 * 1024
    health_check_interval = 5.0
    if general is not None:
        general.expect_mapping()
        unsupported += general.unknown_keys(_GENERAL_KEYS)
        master_key = general.opt("master_key", scalars.string)
        if master_key == "":
            raise general.child("master_key").error("a non-empty key", "set it or remove the line")
        mb = general.opt("max_request_size_mb", scalars.positive_number)
        if mb is not None:
            max_request_bytes = int(mb * 1024 * 1024)
        health_check_interval = general.opt("health_check_interval", scalars.positive_number) or 5.0
        database_url = general.opt("database_url", scalars.string)
        if database_url is not None:
            try:
                parse_database_url(database_url)
            except ValueError as exc:
                raise general.child("database_url").error(
                    "sqlite:///path/to/llmgate.db or postgresql://user@host/db", str(exc), show_value=False) from None

    litellm = root.get("litellm_settings")
    ssl_verify: bool | str = True
    if litellm is not None:
        litellm.expect_mapping()
        unsupported += litellm.unknown_keys(_LITELLM_KEYS)
        ssl_verify = litellm.opt("ssl_verify", _bool_or_path, True)

    router = _parse_router(root.get("router_settings"), unsupported)
    models_node = root.get("model_list")
    if models_node is None:
        raise root.error("a `model_list` with at least one entry", "add model_list: [{model_name: ..., litellm_params: "
                         "{model: hosted_vllm/<model>, api_base: http://host:8000/v1}}]", key="model_list")
    deployments = tuple(
        _parse_deployment(item, index, router, unsupported) for index, item in enumerate(models_node.sequence_items())
    )
    if not deployments:
        raise models_node.error("at least one entry", "add a model_name with its litellm_params")
    seen: set[str] = set()
    for d in deployments:
        if d.id in seen:
            raise models_node.error(f"unique model_info.id values, but {d.id!r} repeats", "give each entry its own id")
        seen.add(d.id)
    names = {d.model_name for d in deployments}
    for group, targets in router.fallbacks.items():
        for t in (group, *targets):
            if t not in names:
                raise root.child("router_settings").child("fallbacks").error(
                    f"model names from model_list, but {t!r} is not one", f"use one of: {', '.join(sorted(names))}")

    warnings: tuple[str, ...] = ()
    if unsupported:
        warnings = (f"{root.file}: ignoring unsupported keys: {', '.join(unsupported)}",)
    return ProxyConfig(
        path=root.file,
        deployments=deployments,
        router=router,
        master_key=master_key,
        ssl_verify=ssl_verify,
        max_request_bytes=max_request_bytes,
        health_check_interval=health_check_interval,
        database_url=database_url,
        warnings=warnings,
    )


def _parse_router(node: Node | None, unsupported: list[str]) -> RouterSettings:
    if node is None:
        return RouterSettings()
    node.expect_mapping()
    unsupported += node.unknown_keys(_ROUTER_KEYS)
    strategy = node.opt("routing_strategy", scalars.string, "simple-shuffle")
    if strategy not in ROUTING_STRATEGIES:
        raise node.child("routing_strategy").error(
            f"one of {', '.join(ROUTING_STRATEGIES)}", "pick a supported strategy")
    fallbacks: dict[str, tuple[str, ...]] = {}
    fb = node.get("fallbacks")
    if fb is not None:
        # LiteLLM's shape: [{"model-a": ["model-b", "model-c"]}, ...]
        for item in fb.sequence_items():
            for name, targets in item.mapping_items():
                fallbacks[name] = tuple(t.scalar_of(scalars.string) for t in targets.sequence_items())
    return RouterSettings(
        routing_strategy=strategy,
        num_retries=node.opt("num_retries", scalars.non_negative_whole, 2),
        retry_after=node.opt("retry_after", scalars.non_negative_number, 0.0),
        allowed_fails=node.opt("allowed_fails", scalars.positive_whole, 3),
        cooldown_time=node.opt("cooldown_time", scalars.non_negative_number, 5.0),
        timeout=node.opt("timeout", scalars.positive_number),
        fallbacks=fallbacks,
    )


def _parse_deployment(node: Node, index: int, router: RouterSettings, unsupported: list[str]) -> Deployment:
    node.expect_mapping()
    unsupported += node.unknown_keys({"model_name", "litellm_params", "model_info"})
    model_name = node.req("model_name", scalars.string)
    params = node.child("litellm_params")
    if params.value is None:
        raise params.error("a mapping with at least `model` and `api_base`",
                           "add litellm_params: {model: hosted_vllm/<model>, api_base: http://host:8000/v1}")
    params.expect_mapping()
    unsupported += params.unknown_keys(_PARAM_KEYS)
    model = params.req("model", scalars.string)
    for prefix in PROVIDER_PREFIXES:
        if model.startswith(prefix):
            upstream = model[len(prefix):]
            break
    else:
        raise params.child("model").error(
            "a model with a `hosted_vllm/` or `openai/` prefix", f"write hosted_vllm/{model.split('/', 1)[-1]}")
    if not upstream:
        raise params.child("model").error("a model id after the provider prefix",
                                          "e.g. hosted_vllm/meta-llama/Llama-3.1-8B-Instruct")
    api_base = params.req("api_base", scalars.string).rstrip("/")
    if not api_base.startswith(("http://", "https://")):
        raise params.child("api_base").error("a URL starting with http:// or https://", "e.g. http://127.0.0.1:8000/v1")
    if not api_base.endswith("/v1"):
        # LiteLLM appends nothing for hosted_vllm; a base without /v1 gives 404s from vLLM.
        api_base += "/v1"
    api_key = params.opt("api_key", scalars.optional_string)
    info = node.get("model_info")
    info_cost_in = info_cost_out = None
    mode = None
    dep_id = f"{model_name}/{index}"
    if info is not None:
        info.expect_mapping()
        unsupported += info.unknown_keys(_MODEL_INFO_KEYS)
        dep_id = info.opt("id", scalars.string, dep_id)
        mode = info.opt("mode", scalars.string)
        info_cost_in = info.opt("input_cost_per_token", scalars.non_negative_number)
        info_cost_out = info.opt("output_cost_per_token", scalars.non_negative_number)
    timeout = params.opt("timeout", scalars.positive_number) or router.timeout
    return Deployment(
        id=dep_id,
        model_name=model_name,
        upstream_model=upstream,
        api_base=api_base,
        api_key=api_key or None,
        weight=params.opt("weight", scalars.positive_number),
        rpm=params.opt("rpm", scalars.positive_whole),
        tpm=params.opt("tpm", scalars.positive_whole),
        order=params.opt("order", scalars.positive_whole),
        timeout=timeout,
        stream_timeout=params.opt("stream_timeout", scalars.positive_number),
        max_retries=params.opt("max_retries", scalars.non_negative_whole),
        input_cost_per_token=_price(info_cost_in, params, "input_cost_per_token"),
        output_cost_per_token=_price(info_cost_out, params, "output_cost_per_token"),
        mode=mode,
    )


def _price(from_model_info: float | None, params: Node, key: str) -> float:
    """A price per token: model_info's, else litellm_params', else 0."""
    if from_model_info is not None:
        return from_model_info
    return params.opt(key, scalars.non_negative_number) or 0.0


# ---------------------------------------------------------------- checks of config.yaml's own


def _bool_or_path(v: Any) -> bool | str:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if not Path(v).is_file():
            raise ValueError(f"true, false or the path of a CA bundle that exists (no file at {v})")
        return v
    raise ValueError("true, false or the path of a CA bundle")


# ---------------------------------------------------------------- database URLs (DB mode)

@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    kind: str  # "sqlite" or "postgresql"
    target: str  # the SQLite file path, or the libpq URL
    shown: str  # for messages: no password

    def __str__(self) -> str:
        return self.shown


def parse_database_url(url: str) -> DatabaseUrl:
    """`sqlite:///relative.db`, `sqlite:////absolute/path.db` or `postgresql://user:pw@host:port/db`.

    ValueError, saying what is expected, for anything else.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("expected a database URL: sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
    url = url.strip()
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ValueError(f"expected sqlite:///relative/path.db or sqlite:////absolute/path.db, got {url!r}")
        path = url[len("sqlite:///"):]
        if path == ":memory:":
            raise ValueError("an in-memory SQLite database is not shared between connections; give a file")
        return DatabaseUrl("sqlite", path, url)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"the port in the database URL is not a number: {redact_url(url)}") from None
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"the database URL names no host: {redact_url(url)}")
        shown = f"postgresql://{parts.hostname or ''}{f':{port}' if port else ''}{parts.path}"
        return DatabaseUrl("postgresql", url, shown)
    raise ValueError(f"unsupported database URL scheme {scheme!r}: expected sqlite:///PATH or postgresql://...")


def redact_url(url: str) -> str:
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)
