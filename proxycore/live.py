"""What proxycore's handlers read: the loaded config with its routing groups, swapped whole on a reload,
and who is asking (nginx with the internal key and a team, or a client with the master key)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from aiohttp import web

from controller.model.config import ProxyConfig, load_proxy_config
from controller.model.gateway import check_team_models, internal_key
from controller.model.teams import Team, TeamsConfig, load_teams
from controller.model.wire import KEY_ID_HEADER, TEAM_HEADER, bearer_token, dedicated_internal_key, same_key
from controller.model.yamlpath import ConfigError
from proxycore.router import ModelGroup, build_groups


@dataclass
class ServedConfig:
    """The config, its routing groups, keys and team policy. Replaced whole on reload."""

    config: ProxyConfig
    groups: dict[str, ModelGroup]
    master_key: str | None
    internal_key: str | None
    team_models: dict[str, frozenset[str] | None] | None = None  # team -> allow-list (None: all); None: no teams file
    teams: dict[str, Team] = field(default_factory=dict)
    only_team: str | None = None  # a dedicated instance serves this team alone

    @classmethod
    def build(cls, config: ProxyConfig, teams: TeamsConfig | None = None, previous: ServedConfig | None = None,
              only_team: str | None = None) -> ServedConfig:
        key = internal_key(teams)
        if only_team and key:
            key = dedicated_internal_key(key, only_team)
        return cls(
            config=config,
            groups=build_groups(config, previous.groups if previous else None),
            master_key=config.master_key,
            internal_key=key,
            only_team=only_team,
            team_models=None if teams is None else {
                t.name: frozenset(t.models) if t.models is not None else None for t in teams.teams},
            teams={t.name: t for t in teams.teams} if teams else {},
        )

    def allowed_models(self, team: str | None) -> frozenset[str] | None:
        """None: every model. A team that teams.yaml does not (yet) know gets nothing: fail closed."""
        if team is None or self.team_models is None:
            return None
        return self.team_models.get(team, frozenset())

    def models_for(self, team: str | None) -> list[str]:
        names = sorted(self.groups)
        allowed = self.allowed_models(team)
        return names if allowed is None else [n for n in names if n in allowed]


class LiveConfig:
    """The current ServedConfig; a reload swaps `served` in one assignment, requests in flight keep theirs."""

    __slots__ = ("served", "config_path", "teams_path")

    def __init__(self, served: ServedConfig, config_path: str | None = None, teams_path: str | None = None):
        self.served, self.config_path, self.teams_path = served, config_path, teams_path

    def reload(self) -> str | None:
        """Load both files again; on any problem keep the current config and return the reason."""
        loaded = self.load_files()
        if isinstance(loaded, str):
            return loaded
        if loaded is not None:
            self.apply(*loaded)
        return None

    def load_files(self) -> tuple[ProxyConfig, TeamsConfig | None] | str | None:
        """Read and check both files (safe in a thread: nothing serving is touched); the reason when they do not
        load, None without a config path."""
        if self.config_path is None:
            return None
        try:
            config = load_proxy_config(self.config_path)
            teams = load_teams(self.teams_path) if self.teams_path else None
            if teams is not None:
                check_team_models(config, teams)
        except ConfigError as exc:
            return str(exc)
        return config, teams

    def apply(self, config: ProxyConfig, teams: TeamsConfig | None) -> None:
        """Serve loaded files (on the event loop: the deployments' live state moves over)."""
        previous = self.served
        self.served = ServedConfig.build(config, teams, previous=previous, only_team=previous.only_team)
        if config.ssl_verify != previous.config.ssl_verify:
            print("llmgate: proxycore: litellm_settings.ssl_verify changed; it applies after proxycore restarts",
                  file=sys.stderr, flush=True)


def authenticate(request: web.Request, served: ServedConfig) -> tuple[bool, str | None, str | None]:
    """(ok, team, key_id). X-Team / X-Key-Id count only beside the internal key, i.e. from nginx."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        return (served.master_key is None, None, None)
    if same_key(token, served.internal_key):
        h = request.headers
        return (True, h.get(TEAM_HEADER) or None, h.get(KEY_ID_HEADER) or None)
    if served.master_key is None or same_key(token, served.master_key):
        return (True, None, None)
    return (False, None, None)
