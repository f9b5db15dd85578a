"""Config files that would hurt a running gateway are refused with file, line and fix: a key given twice, a
YAML alias bomb, a file over the size limit, NaN and infinity; and a live proxycore keeps answering while it
refuses one."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from controller.model.config import load_proxy_config
from controller.model.teams import load_teams
from controller.model.yamlpath import MAX_FILE_BYTES_ENV, ConfigError
from support import MASTER_KEY, http, start_fake_vllm, start_proxy, wait_until, write_config

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", *"abcdefgh"], "abcdefghi"))


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    teams = tmp_path / "teams.yaml"
    teams.write_text(textwrap.dedent("""\
        teams:
          search:
            keys: [sha256:0000000000000000000000000000000000000000000000000000000000000000]
            budget: {usd_per_month: 100}
          search:
            keys: [sha256:1111111111111111111111111111111111111111111111111111111111111111]
        """))
    with pytest.raises(ConfigError) as info:
        load_teams(str(teams))
    assert "line 5" in str(info.value) and "`search` is also on line 2" in str(info.value)


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(BOMB)  # 9^9 values once expanded, 700 bytes written
    with pytest.raises(ConfigError) as info:
        load_proxy_config(str(config))
    assert "aliases" in str(info.value)


def test_a_file_over_the_size_limit_is_refused_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    config = write_config(tmp_path / "config.yaml", [{"model_name": "m", "api_base": "http://127.0.0.1:9/v1"}])
    config.write_text(config.read_text() + "#" * 2_000_000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_proxy_config(str(config))
    assert MAX_FILE_BYTES_ENV in str(info.value)
    monkeypatch.setenv(MAX_FILE_BYTES_ENV, str(4_000_000))
    assert load_proxy_config(str(config)).model_names() == ["m"]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_refused(tmp_path, value):
    teams = tmp_path / "teams.yaml"
    teams.write_text("teams:\n  a:\n    keys: [sha256:" + "0" * 64 + f"]\n    budget: {{usd_per_month: {value}}}\n")
    with pytest.raises(ConfigError) as info:
        load_teams(str(teams))
    assert "teams.a.budget.usd_per_month" in str(info.value) and "finite" in str(info.value)


def test_a_live_proxycore_refuses_a_bomb_and_keeps_answering(spawn, tmp_path):
    _, api_base = start_fake_vllm(spawn)
    cfg = write_config(tmp_path / "config.yaml", [{"model_name": "llama-3.1-8b-instruct", "api_base": api_base}])
    proxy, base = start_proxy(spawn, cfg)
    body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    auth = {"Authorization": f"Bearer {MASTER_KEY}"}
    tmp = tmp_path / ".config.yaml.swp"
    tmp.write_text(BOMB)
    tmp.replace(cfg)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: http("POST", base + "/v1/chat/completions", body, auth).status, range(40)))
    assert statuses == [200] * 40
    assert wait_until(lambda: "kept the previous config" in proxy.output and "aliases" in proxy.output, timeout=10)
    assert http("POST", base + "/v1/chat/completions", body, auth).status == 200


def test_merge_keys_may_still_override_what_they_merge(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent("""\
        model_list:
          - model_name: m
            litellm_params: &vllm {model: hosted_vllm/first, api_base: "http://127.0.0.1:9/v1"}
          - model_name: n
            litellm_params:
              <<: *vllm
              model: hosted_vllm/second
        """))
    loaded = load_proxy_config(str(config))
    assert [d.upstream_model for d in loaded.deployments] == ["first", "second"]
