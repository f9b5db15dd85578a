"""Render the nginx edge from the gateway model: a pure function, from a typed template model to text.

No processes, no filesystem probing (the caller says where the njs module is), no I/O but reading the
template and the njs file. Every operator string that reaches nginx syntax passes `nginx_quote`,
which refuses anything outside a conservative character set (teams.py validated it already; this is
the second, independent check). The template only loops and prints.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from controller.model.gateway import GatewayConfig
from controller.model.openai_errors import EDGE_ERRORS
from controller.model.teams import Address, Listen, Team
from controller.model.wire import dedicated_internal_key

TEMPLATES = Path(str(resources.files("llmgate_templates")))  # templates/ of the checkout, or its installed copy
STATIC = Path(str(resources.files("llmgate_nginx")))  # nginx/
DEFAULT_JS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"  # Debian's and nginx.org's packages
CHECKSUM_PLACEHOLDER = "@@LLMGATE_CONFIG_CHECKSUM@@"
_QUOTABLE = re.compile(r"[A-Za-z0-9_.:/@+=~\[\]-]*")
_SINGLE_QUOTABLE = re.compile(r"[^'\\\n]*")  # an error body inside '...' in nginx.conf
AUTH_CACHE_OK = "5s"
AUTH_CACHE_OK_DB = "3s"  # + authsvc's own 1 s: a blocked or deleted virtual key is refused within 5 s
AUTH_CACHE_DENIED = "1s"


class RenderError(ValueError):
    pass


def nginx_quote(value: str) -> str:
    """A double-quoted nginx string; raises on any character that could end or extend the token."""
    if not isinstance(value, str) or not _QUOTABLE.fullmatch(value):
        raise RenderError(f"refusing to write {value!r} into nginx.conf: only letters, digits and _ . : / @ + = ~ - [ ]")
    return f'"{value}"'


@dataclass(frozen=True)
class RenderedConfig:
    files: dict[str, bytes]  # name inside the prefix -> content
    checksum: str  # what /-/config-hash serves once this config is live


# ---------------------------------------------------------------- the template's model

@dataclass(frozen=True)
class TeamKeyRow:
    sha256: str
    team: str
    key_id: str


@dataclass(frozen=True)
class HostRow:
    domain: str
    team: str


@dataclass(frozen=True)
class LimitedTeam:
    name: str  # kebab-case: safe as a zone name and map value
    var: str  # the same with _ for -: an nginx variable name
    rpm: int
    burst: int | None
    retry_after: int


@dataclass(frozen=True)
class DedicatedRow:
    name: str
    var: str
    addr: str


@dataclass(frozen=True)
class CertificateRow:
    domains: str
    cert: str
    key: str
    files_sha256: str


@dataclass(frozen=True)
class Paths:
    """Quoted paths nginx reads and writes."""

    pid: str
    error_log: str
    js_path: str
    internal_auth: str
    access_log: str
    body_temp: str
    proxy_temp: str
    fastcgi_temp: str
    uwsgi_temp: str
    scgi_temp: str
    auth_cache: str
    empty_root: str


@dataclass(frozen=True)
class EdgeTemplate:
    """Everything nginx.conf.j2 prints, validated and quoted."""

    sources: str
    checksum_placeholder: str
    js_module: str
    worker_processes: str
    paths: Paths
    map_hash_max_size: int
    key_lookup: str
    db_mode: bool
    team_keys: list[TeamKeyRow]
    has_domains: bool
    unknown_host_value: str
    hosts: list[HostRow]
    host_pairs: list[str]
    limited_teams: list[LimitedTeam]
    ip_rpm: int | None
    ip_burst: int | None
    proxy_addr: str
    auth_addr: str
    auth_cache_ok: str
    auth_cache_denied: str
    max_body: str
    listen: str
    tls_listen: str | None
    dedicated: list[DedicatedRow]
    certificates: list[CertificateRow]
    errors: dict[str, str]  # name -> JSON body, for '...' in nginx.conf


def _address(listen: Listen | None, setting: str) -> str:
    if listen is None:
        raise RenderError(f"{setting} is not resolved; call GatewayConfig.with_sockets first")
    return str(listen) if isinstance(listen, Address) else nginx_quote(str(listen))


def _error_bodies(max_body: str) -> dict[str, str]:
    bodies = {name: e.body(max_body=max_body) for name, e in EDGE_ERRORS.items()}
    for name, body in bodies.items():
        if not _SINGLE_QUOTABLE.fullmatch(body):
            raise RenderError(f"the {name} error body cannot go between single quotes in nginx.conf")
    return bodies


def template_model(cfg: GatewayConfig, prefix: str, js_module: str, work_dir: str) -> EdgeTemplate:
    teams, gw = cfg.teams.teams, cfg.teams.gateway
    q = nginx_quote
    base, work = prefix.rstrip("/"), work_dir.rstrip("/")
    keys = [TeamKeyRow(q(k.sha256), q(t.name), q(k.key_id)) for t in teams for k in t.keys]
    hosts = [HostRow(q(d), q(t.name)) for t in teams for d in t.domains]
    hosts += [HostRow(q(d), '""') for d in gw.server_names]
    limited = [_limited(t) for t in teams if t.rpm]
    return EdgeTemplate(
        sources=" and ".join(re.sub(r"[^A-Za-z0-9_.-]", "_", Path(f).name) for f in (cfg.teams.path, cfg.proxy.path)),
        checksum_placeholder=CHECKSUM_PLACEHOLDER,
        js_module=q(js_module),
        worker_processes=gw.nginx_workers,
        paths=Paths(pid=q(f"{base}/nginx.pid"), error_log=q(f"{base}/error.log"), js_path=q(base),
                    internal_auth=q(f"{base}/internal-auth.conf"), access_log=q(f"{gw.log_dir}/access.jsonl"),
                    body_temp=q(f"{work}/tmp/body"), proxy_temp=q(f"{work}/tmp/proxy"),
                    fastcgi_temp=q(f"{work}/tmp/fastcgi"), uwsgi_temp=q(f"{work}/tmp/uwsgi"),
                    scgi_temp=q(f"{work}/tmp/scgi"), auth_cache=q(f"{work}/cache/auth"), empty_root=q(f"{work}/empty")),
        map_hash_max_size=max(2048, 1 << math.ceil(math.log2(max(1, len(keys)) * 2))),
        key_lookup=cfg.key_lookup,
        db_mode=cfg.db_mode,
        team_keys=keys,
        has_domains=cfg.teams.has_domains,
        unknown_host_value='"-"' if cfg.teams.has_domains else '""',
        hosts=hosts,
        host_pairs=[q(f"{t.name}:{t.name}" if t.domains else f"{t.name}:") for t in teams],
        limited_teams=limited,
        ip_rpm=gw.ip_rpm,
        ip_burst=gw.ip_burst,
        proxy_addr=_address(gw.proxy_listen, "gateway.proxy_listen"),
        auth_addr=_address(gw.auth_listen, "gateway.auth_listen"),
        auth_cache_ok=AUTH_CACHE_OK_DB if cfg.db_mode else AUTH_CACHE_OK,
        auth_cache_denied=AUTH_CACHE_DENIED,
        max_body=gw.max_body,
        listen=str(gw.listen),
        tls_listen=str(gw.tls_listen) if gw.tls_listen else None,
        dedicated=[DedicatedRow(q(t.name), t.var_name, _address(t.dedicated_listen, f"teams.{t.name}.dedicated"))
                   for t in cfg.teams.dedicated()],
        certificates=[CertificateRow(" ".join(q(d) for d in c.domains), q(c.cert), q(c.key), c.files_sha256)
                      for c in gw.certificates],
        errors=_error_bodies(gw.max_body),
    )


def _limited(t: Team) -> LimitedTeam:
    assert t.rpm is not None
    q = nginx_quote
    q(t.name), q(t.var_name)  # names print unquoted as zone names: the check alone
    return LimitedTeam(t.name, t.var_name, t.rpm, t.burst, max(1, math.ceil(60 / t.rpm)))


_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=False,
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_nginx_conf(cfg: GatewayConfig, prefix: str, internal_key: str, js_module: str = DEFAULT_JS_MODULE,
                      work_dir: str | None = None) -> RenderedConfig:
    """nginx.conf, llmgate.js and internal-auth.conf for the nginx prefix `prefix`.

    `cfg` has its internal addresses resolved (`GatewayConfig.with_sockets`). `js_module` is
    ngx_http_js_module.so as the serving nginx sees it; `work_dir` holds what nginx workers write
    (temp files, the auth cache) and defaults to `prefix/work`.
    """
    model = template_model(cfg, prefix, js_module, work_dir or prefix.rstrip("/") + "/work")
    conf = _ENV.get_template("nginx.conf.j2").render(m=model)
    js = (STATIC / "llmgate.js").read_bytes()
    if not re.fullmatch(r"[A-Za-z0-9_.~+/=-]+", internal_key):
        raise RenderError("the internal key must be URL-safe characters only")
    auth_lines = ["map $gw_team $gw_internal_auth {", f'    default "Bearer {internal_key}";']
    auth_lines += [f'    {nginx_quote(t.name)} "Bearer {dedicated_internal_key(internal_key, t.name)}";'
                   for t in cfg.teams.dedicated()]
    auth = ("\n".join(auth_lines) + "\n}\n").encode()
    digest = hashlib.sha256()
    for part in (conf.encode(), js, auth):
        digest.update(hashlib.sha256(part).digest())
    checksum = digest.hexdigest()
    files = {
        "nginx.conf": conf.replace(CHECKSUM_PLACEHOLDER, checksum).encode(),
        "llmgate.js": js,
        "internal-auth.conf": auth,
    }
    return RenderedConfig(files, checksum)
