"""The reload logic without an nginx: EdgeReloader against a fake NginxRunner (as ingress-nginx tests its
controller against NginxExecTester). The real nginx does the same in test_edge_reload.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.edge.nginx import EdgeReloader, RunLayout
from controller.model.teams import Address
from support import sha256_hex, teams_yaml, write_config

KEY = "internal-key-0123456789abcdef"


class FakeNginx:
    """Accepts or refuses configs as told; after a reload it serves the config on disk, unless it rejects it."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.refuse: str | None = None  # what `nginx -t` says
        self.reject_reload = False  # the master keeps the old config (nginx -s reload still "succeeds")
        self.serving: str | None = None
        self.reloads: list[int] = []
        self.tests = 0

    def test(self, prefix: Path) -> str | None:
        self.tests += 1
        return self.refuse

    def reload(self, pid: int) -> None:
        if pid != 4242:
            raise ProcessLookupError(pid)
        self.reloads.append(pid)
        if not self.reject_reload:
            self.serving = _checksum_in(self.prefix / "nginx.conf")

    def served_checksum(self, listen: Address) -> str | None:
        return self.serving


def _checksum_in(conf: Path) -> str:
    return next(line.split()[-1] for line in conf.read_text().splitlines() if line.startswith("# config-checksum"))


@pytest.fixture
def setup(tmp_path):
    config, teams = tmp_path / "config.yaml", tmp_path / "teams.yaml"
    write_config(config, [{"model_name": "m", "api_base": "http://127.0.0.1:9/v1"}])
    team = "  team-a:\n    keys: [sha256:" + sha256_hex("k") + "]\n"
    teams.write_text(teams_yaml(8080, 4001, 4002, "map", team))
    layout = RunLayout(tmp_path / "run")
    nginx = FakeNginx(layout.nginx_prefix)
    reloader = EdgeReloader(layout, str(config), str(teams), KEY, nginx_pid=4242, runner=nginx, verify_timeout=0.2)
    first = reloader.initial(reloader.load())
    assert first.status == "applied" and nginx.tests == 1
    nginx.serving = first.checksum
    return reloader, nginx, teams, team


def test_an_unchanged_config_is_not_reloaded(setup):
    reloader, nginx, _, _ = setup
    result = reloader.load_and_apply()
    assert result.status == "unchanged" and nginx.reloads == []


def test_a_change_is_written_signalled_and_verified(setup):
    reloader, nginx, teams, team = setup
    teams.write_text(teams_yaml(8080, 4001, 4002, "map", team + "  team-b: {rpm: 5}\n"))
    result = reloader.load_and_apply()
    assert result.status == "applied" and nginx.reloads == [4242]
    assert nginx.serving == result.checksum == _checksum_in(reloader.layout.nginx_prefix / "nginx.conf")
    assert reloader.current is not None and reloader.current.teams.team("team-b") is not None


def test_a_config_nginx_refuses_is_never_written(setup):
    reloader, nginx, teams, team = setup
    before = (reloader.layout.nginx_prefix / "nginx.conf").read_bytes()
    nginx.refuse = "[emerg] unknown directive"
    teams.write_text(teams_yaml(8080, 4001, 4002, "map", team + "  team-b: {rpm: 5}\n"))
    result = reloader.load_and_apply()
    assert result.status == "failed" and "unknown directive" in result.message and nginx.reloads == []
    assert (reloader.layout.nginx_prefix / "nginx.conf").read_bytes() == before


def test_a_reload_nginx_rejects_puts_the_previous_files_back(setup):
    reloader, nginx, teams, team = setup
    before = (reloader.layout.nginx_prefix / "nginx.conf").read_bytes()
    nginx.reject_reload = True
    teams.write_text(teams_yaml(8080, 4001, 4002, "map", team + "  team-b: {rpm: 5}\n"))
    result = reloader.load_and_apply()
    assert result.status == "failed" and "rejected the reload" in result.message and nginx.reloads == [4242]
    assert (reloader.layout.nginx_prefix / "nginx.conf").read_bytes() == before


def test_a_file_that_does_not_load_keeps_the_previous_config(setup):
    reloader, nginx, teams, _ = setup
    teams.write_text("teams:\n  Team_A: {}\n")
    result = reloader.load_and_apply()
    assert result.status == "failed" and "Team_A" in result.message and nginx.tests == 1 and nginx.reloads == []


def test_nginx_gone_is_a_failure_not_a_crash(setup):
    reloader, nginx, teams, team = setup
    reloader.nginx_pid = 1
    teams.write_text(teams_yaml(8080, 4001, 4002, "map", team + "  team-b: {rpm: 5}\n"))
    result = reloader.load_and_apply()
    assert result.status == "failed" and "not running" in result.message
