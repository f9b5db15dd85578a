"""config.yaml: LiteLLM's own configs load unchanged; errors name file, path and what was expected."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from controller.model.config import load_proxy_config
from controller.model.yamlpath import ConfigError
from support import LLMGATE, ROOT

# As LiteLLM's docs write it for vLLM (providers/vllm and proxy/configs pages).
LITELLM_VLLM_DOCS = """
model_list:
  - model_name: my-model
    litellm_params:
      model: hosted_vllm/facebook/opt-125m # add hosted_vllm/ prefix to route as OpenAI provider
      api_base: https://hosted-vllm-api.co # add api base for OpenAI compatible provider
  - model_name: llama3
    litellm_params:
      model: hosted_vllm/meta-llama/Meta-Llama-3-8B-Instruct
      api_base: http://0.0.0.0:8000/v1
      api_key: ""
      rpm: 100
  - model_name: llama3
    litellm_params:
      model: openai/meta-llama/Meta-Llama-3-8B-Instruct
      api_base: http://0.0.0.0:8001/v1
      api_key: "none"
      rpm: 300
      timeout: 30
      stream_timeout: 60
      max_retries: 1
    model_info:
      input_cost_per_token: 0.0000001
      output_cost_per_token: 0.0000002

router_settings:
  routing_strategy: usage-based-routing-v2
  num_retries: 3
  allowed_fails: 2
  cooldown_time: 30
  fallbacks: [{"llama3": ["my-model"]}]

general_settings:
  master_key: sk-1234
"""


def write(tmp_path, text: str):
    p = tmp_path / "config.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_litellm_docs_config_loads_unchanged(tmp_path):
    cfg = load_proxy_config(write(tmp_path, LITELLM_VLLM_DOCS))
    assert cfg.warnings == ()
    assert cfg.master_key == "sk-1234"
    assert cfg.model_names() == ["llama3", "my-model"]
    first, second, third = cfg.deployments
    assert first.upstream_model == "facebook/opt-125m"
    assert first.api_base == "https://hosted-vllm-api.co/v1"  # vLLM serves under /v1
    assert second.api_key is None and second.rpm == 100
    assert third.upstream_model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (third.timeout, third.stream_timeout, third.max_retries) == (30, 60, 1)
    assert third.input_cost_per_token == 1e-7 and third.output_cost_per_token == 2e-7
    r = cfg.router
    assert (r.routing_strategy, r.num_retries, r.allowed_fails, r.cooldown_time) == ("usage-based-routing-v2", 3, 2, 30)
    assert r.fallbacks == {"llama3": ("my-model",)}


def test_os_environ_works_for_every_value(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_BASE", "http://10.0.0.5:8000/v1")
    monkeypatch.setenv("VLLM_KEY", "backend-key")
    monkeypatch.setenv("MASTER", "sk-from-env")
    monkeypatch.setenv("RPM", "42")
    monkeypatch.setenv("STRATEGY", "least-busy")
    cfg = load_proxy_config(write(tmp_path, """
        model_list:
          - model_name: m
            litellm_params:
              model: hosted_vllm/m
              api_base: os.environ/VLLM_BASE
              api_key: os.environ/VLLM_KEY
              rpm: os.environ/RPM
        router_settings: {routing_strategy: os.environ/STRATEGY}
        general_settings: {master_key: os.environ/MASTER}
    """))
    d = cfg.deployments[0]
    assert (d.api_base, d.api_key, d.rpm) == ("http://10.0.0.5:8000/v1", "backend-key", 42)
    assert cfg.master_key == "sk-from-env" and cfg.router.routing_strategy == "least-busy"


def test_missing_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError) as info:
        load_proxy_config(write(tmp_path, """
            model_list:
              - model_name: m
                litellm_params: {model: hosted_vllm/m, api_base: http://h:8000/v1, api_key: os.environ/NOT_SET_ANYWHERE}
        """))
    assert "model_list[0].litellm_params.api_key" in str(info.value)
    assert "NOT_SET_ANYWHERE" in str(info.value)


def test_unsupported_keys_are_named_in_one_warning(tmp_path):
    cfg = load_proxy_config(write(tmp_path, """
        model_list:
          - model_name: m
            litellm_params: {model: hosted_vllm/m, api_base: http://h:8000/v1, drop_params: true}
        litellm_settings: {drop_params: true, success_callback: ["langfuse"]}
        general_settings: {master_key: sk-1, alerting: ["slack"]}
    """))
    assert len(cfg.warnings) == 1
    w = cfg.warnings[0]
    for key in ("model_list[0].litellm_params.drop_params", "litellm_settings.drop_params",
                "litellm_settings.success_callback", "general_settings.alerting"):
        assert key in w


@pytest.mark.parametrize("text, path, expected", [
    ("model_list: [{model_name: m, litellm_params: {model: hosted_vllm/m, api_base: http://h/v1, rpm: many}}]",
     "model_list[0].litellm_params.rpm", "a whole number"),
    ("model_list: [{model_name: m, litellm_params: {model: bedrock/m, api_base: http://h/v1}}]",
     "model_list[0].litellm_params.model", "hosted_vllm/"),
    ("model_list: [{model_name: m, litellm_params: {model: hosted_vllm/m, api_base: ftp://h}}]",
     "model_list[0].litellm_params.api_base", "http://"),
    ("model_list: [{model_name: m, litellm_params: {model: hosted_vllm/m}}]",
     "model_list[0].litellm_params.api_base", "a value"),
    ("model_list: [{model_name: m, litellm_params: {model: hosted_vllm/m, api_base: http://h/v1}}]\n"
     "router_settings: {routing_strategy: fastest}", "router_settings.routing_strategy", "simple-shuffle"),
    ("model_list: [{model_name: m, litellm_params: {model: hosted_vllm/m, api_base: http://h/v1}}]\n"
     "router_settings: {fallbacks: [{m: [nope]}]}", "router_settings.fallbacks", "'nope'"),
    ("general_settings: {master_key: sk-1}", "model_list", "model_list"),
    ("model_list:\n  - model_name: m\n   litellm_params: {}", "line", "valid YAML"),
])
def test_invalid_config_errors_name_file_path_and_expectation(tmp_path, text, path, expected):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_proxy_config(p)
    message = str(info.value)
    assert message.startswith(str(p))
    assert path in message and expected in message


def test_cli_exits_2_with_one_clear_message_for_an_invalid_file(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("model_list:\n  - model_name: m\n    litellm_params: {model: hosted_vllm/m, api_base: http://h/v1, weight: -1}\n")
    run = subprocess.run([*LLMGATE, "proxy", "--config", str(p)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"llmgate: {p}: model_list[0].litellm_params.weight: expected a number greater than 0, got -1"]
    assert "Traceback" not in run.stderr + run.stdout


def test_cli_prints_the_unsupported_key_warning_once_and_serves(spawn, tmp_path):
    from support import free_port

    p = tmp_path / "config.yaml"
    p.write_text("model_list: [{model_name: m, litellm_params: {model: hosted_vllm/m, api_base: http://127.0.0.1:9/v1}}]\n"
                 "litellm_settings: {drop_params: true}\ngeneral_settings: {master_key: sk-1}\n")
    svc = spawn([*LLMGATE, "proxy", "--config", str(p), "--port", str(free_port())], r"listening on")
    warnings = [line for line in svc.lines if "unsupported" in line]
    assert warnings == [f"llmgate: warning: {p}: ignoring unsupported keys: litellm_settings.drop_params"]
