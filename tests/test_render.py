"""Rendering the nginx edge: golden files, and every operator string validated before it reaches nginx."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from controller.edge.render import RenderError, nginx_quote, render_nginx_conf
from controller.model.config import load_proxy_config
from controller.model.gateway import GatewayConfig
from controller.model.teams import load_teams
from controller.model.yamlpath import ConfigError

GOLDEN = Path(__file__).parent / "golden"
CONFIG = """
model_list:
  - model_name: llama-3.1-8b-instruct
    litellm_params: {model: hosted_vllm/llama, api_base: "http://127.0.0.1:8001/v1"}
"""
TEAMS = """
gateway:
  listen: 0.0.0.0:8080
  key_lookup: {lookup}
  log_dir: /srv/llmgate/logs
  max_body: 16m
  ip_rpm: 600
  server_names: [llm.example.com]
teams:
  team-a:
    keys:
      - sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
      - {{sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", name: ci-bot}}
    rpm: 60
    burst: 30
    domains: [team-a.llm.example.com]
  team-b:
    keys: [sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9]
    rpm: 6
    burst: 0
"""


def gateway(tmp_path: Path, teams: str) -> GatewayConfig:
    (tmp_path / "config.yaml").write_text(CONFIG)
    (tmp_path / "teams.yaml").write_text(textwrap.dedent(teams))
    cfg = GatewayConfig(load_proxy_config(tmp_path / "config.yaml"), load_teams(tmp_path / "teams.yaml"))
    return cfg.with_sockets("/srv/llmgate/run/sockets")


def render(cfg: GatewayConfig) -> str:
    out = render_nginx_conf(cfg, "/srv/llmgate/run/nginx", "internal-key-0123456789abcdef",
                            js_module="/usr/lib/nginx/modules/ngx_http_js_module.so", work_dir="/srv/llmgate/work")
    return out.files["nginx.conf"].decode()


@pytest.mark.parametrize("lookup", ["map", "service"])
def test_rendered_config_matches_golden_file(tmp_path, lookup):
    text = render(gateway(tmp_path, TEAMS.format(lookup=lookup)))
    text = re.sub(r"teams\.yaml and config\.yaml", "teams.yaml and config.yaml", text)
    golden = GOLDEN / f"nginx-{lookup}.conf"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendering changed; review it, then: UPDATE_GOLDEN=1 pytest {__file__}"


def test_rendered_files_hold_hashes_and_no_internal_key_in_main_conf(tmp_path):
    cfg = gateway(tmp_path, TEAMS.format(lookup="map"))
    out = render_nginx_conf(cfg, "/p", "internal-key-0123456789abcdef", work_dir="/w")
    assert "internal-key" not in out.files["nginx.conf"].decode()
    assert b"internal-key-0123456789abcdef" in out.files["internal-auth.conf"]
    assert out.checksum in out.files["nginx.conf"].decode()


def test_zone_keys_depend_only_on_the_team_name(tmp_path):
    """A changed zone key expression makes nginx reject a reload (DESIGN fact 5): ours never change."""
    first = render(gateway(tmp_path, TEAMS.format(lookup="map")))
    reordered = TEAMS.format(lookup="map").replace("  team-a:", "  team-0:\n    rpm: 5\n  team-a:")
    second = render(gateway(tmp_path, reordered))

    def zones(text: str) -> set[str]:
        return set(re.findall(r"limit_req_zone (\S+) zone=(\S+?):", text))

    assert zones(first) <= zones(second)
    assert ("$gw_rl_team_a", "gw_team_team-a") in zones(first)


@pytest.mark.parametrize("teams, path", [
    ("teams:\n  'a;}':\n    rpm: 1\n", "teams.'a;}'"),
    ("teams:\n  \"a\\nb\":\n    rpm: 1\n", "teams."),
    ("teams:\n  'a\"b':\n    rpm: 1\n", "teams."),
    ("teams:\n  $team:\n    rpm: 1\n", "teams.'$team'"),
    ("teams:\n  Team_A:\n    rpm: 1\n", "teams.'Team_A'"),
    ("teams:\n  default:\n    rpm: 1\n", "teams.default"),
    ("teams:\n  a:\n    domains: ['x.com;}']\n", "teams.a.domains[0]"),
    ("teams:\n  a:\n    domains: [\"x.com\\nserver {\"]\n", "teams.a.domains[0]"),
    ("teams:\n  a:\n    domains: ['$host']\n", "teams.a.domains[0]"),
    ("teams:\n  a:\n    keys: [{sha256: 'zz', name: ok}]\n", "teams.a.keys[0].sha256"),
    ("teams:\n  a:\n    keys: [{sha256: '2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae', name: 'x;y'}]\n",
     "teams.a.keys[0].name"),
    ("gateway:\n  log_dir: '/tmp/a b;'\n", "gateway.log_dir"),
    ("gateway:\n  listen: '0.0.0.0:80; include /etc/passwd'\n", "gateway.listen"),
    ("gateway:\n  max_body: '1m; return 200'\n", "gateway.max_body"),
    ("gateway:\n  key_lookup: both\n", "gateway.key_lookup"),
    ("teams:\n  a:\n    rpm: 0\n", "teams.a.rpm"),
    ("teams:\n  a:\n    burst: 3\n", "teams.a.burst"),
])
def test_injection_and_invalid_values_are_refused_with_path(tmp_path, teams, path):
    (tmp_path / "teams.yaml").write_text(teams)
    with pytest.raises(ConfigError) as info:
        load_teams(tmp_path / "teams.yaml")
    assert str(info.value).startswith(str(tmp_path / "teams.yaml") + ": " + path)


@pytest.mark.parametrize("value", ['a"b', "a;b", "a b", "a\nb", "$x", "a{b", "a}b", "a'b", "a\\b", "#x"])
def test_nginx_quote_refuses_anything_that_could_escape(value):
    with pytest.raises(RenderError):
        nginx_quote(value)


def test_duplicate_key_across_teams_is_refused(tmp_path):
    h = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    (tmp_path / "teams.yaml").write_text(f"teams:\n  a:\n    keys: [sha256:{h}]\n  b:\n    keys: [sha256:{h}]\n")
    with pytest.raises(ConfigError, match="teams.b.keys"):
        load_teams(tmp_path / "teams.yaml")


def test_team_model_must_exist_in_config(tmp_path):
    (tmp_path / "config.yaml").write_text(CONFIG)
    (tmp_path / "teams.yaml").write_text("teams:\n  a:\n    models: [gpt-4]\n")
    from controller.model.gateway import load_gateway_config

    with pytest.raises(ConfigError, match=r"teams\.a\.models\[0\].*llama-3.1-8b-instruct"):
        load_gateway_config(tmp_path / "config.yaml", tmp_path / "teams.yaml")


@pytest.mark.parametrize("listen, host, port", [("8080", "0.0.0.0", 8080), ("127.0.0.1:9000", "127.0.0.1", 9000),
                                               ("[::1]:9001", "::1", 9001), (8081, "0.0.0.0", 8081)])
def test_listen_addresses(tmp_path, listen, host, port):
    (tmp_path / "teams.yaml").write_text(f"gateway:\n  listen: {listen!r}\n" if isinstance(listen, str)
                                         else f"gateway:\n  listen: {listen}\n")
    gw = load_teams(tmp_path / "teams.yaml").gateway
    assert (gw.listen.host, gw.listen.port) == (host, port)
