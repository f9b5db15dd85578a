"""Both files together: config.yaml and teams.yaml, cross-checked, with the internal key resolved once.

What the controller renders, and what `llmgate up` starts, come from one `GatewayConfig` loaded once
per reload.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from controller.model.config import ProxyConfig, load_proxy_config
from controller.model.teams import TeamsConfig, load_teams
from controller.model.yamlpath import ConfigError

INTERNAL_KEY_ENV = "LLMGATE_INTERNAL_KEY"  # nginx -> proxycore, when teams.yaml does not set gateway.internal_key


@dataclass(frozen=True)
class GatewayConfig:
    """Both files, cross-checked: what the controller renders and the processes serve."""

    proxy: ProxyConfig
    teams: TeamsConfig

    @property
    def db_mode(self) -> bool:
        return self.proxy.database_url is not None

    @property
    def key_lookup(self) -> str:
        """map or service; DB mode asks authsvc for every key (it knows static and virtual ones)."""
        return "service" if self.db_mode else self.teams.gateway.key_lookup

    @property
    def runs_authsvc(self) -> bool:
        return self.key_lookup == "service"

    def with_sockets(self, socket_dir: str) -> GatewayConfig:
        """Internal addresses left unset become unix sockets in `socket_dir` (see TeamsConfig.with_sockets)."""
        return GatewayConfig(self.proxy, self.teams.with_sockets(socket_dir))


def load_gateway_config(config_path: str | os.PathLike[str], teams_path: str | os.PathLike[str]) -> GatewayConfig:
    proxy = load_proxy_config(config_path)
    teams = load_teams(teams_path)
    check_team_models(proxy, teams)
    return GatewayConfig(proxy, teams)


def check_team_models(proxy: ProxyConfig, teams: TeamsConfig) -> None:
    """Every model a team's allow-list names is one that config.yaml serves."""
    known = set(proxy.model_names())
    for team in teams.teams:
        for i, model in enumerate(team.models or ()):
            if model not in known:
                raise ConfigError(teams.path, f"teams.{team.name}.models[{i}]",
                                  f"a model_name from {proxy.path}", f"use one of: {', '.join(sorted(known))}",
                                  repr(model))


def internal_key(teams: TeamsConfig | None) -> str | None:
    """The key nginx proves itself with to proxycore: gateway.internal_key, else the environment's."""
    configured = teams.gateway.internal_key if teams is not None else None
    return configured or os.environ.get(INTERNAL_KEY_ENV) or None
