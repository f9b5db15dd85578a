"""Render the nginx edge from the gateway model: pure functions, no processes, no I/O but reading templates.

Every operator string that reaches nginx syntax passes `nginx_quote`, which refuses anything outside
a conservative character set (teams.py validated it already; this is the second, independent check).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from controller.teams import GatewayConfig, dedicated_internal_key

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
STATIC = ROOT / "nginx"
JS_MODULE_CANDIDATES = ("/usr/lib/nginx/modules/ngx_http_js_module.so", "/usr/lib64/nginx/modules/ngx_http_js_module.so",
                        "/etc/nginx/modules/ngx_http_js_module.so", "/usr/local/nginx/modules/ngx_http_js_module.so")
CHECKSUM_PLACEHOLDER = "@@LLMGATE_CONFIG_CHECKSUM@@"
_QUOTABLE = re.compile(r"[A-Za-z0-9_.:/@+=~\[\]-]*")
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


def find_js_module() -> str:
    for candidate in JS_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return JS_MODULE_CANDIDATES[0]


def render_nginx_conf(cfg: GatewayConfig, prefix: str, internal_key: str, js_module: str | None = None,
                      work_dir: str | None = None) -> RenderedConfig:
    """nginx.conf, llmgate.js and internal-auth.conf for the nginx prefix `prefix`.

    `work_dir` holds what nginx workers write (temp files, the auth cache); it defaults to `prefix/work`.
    """
    work = work_dir or prefix.rstrip("/") + "/work"
    teams, gw = cfg.teams.teams, cfg.teams.gateway
    q = nginx_quote
    has_domains = cfg.teams.has_domains
    hosts = [{"domain": q(d), "team": q(t.name)} for t in teams for d in t.domains]
    hosts += [{"domain": q(d), "team": '""'} for d in gw.server_names]
    keys = [{"sha256": q(k.sha256), "team": q(t.name), "key_id": q(k.key_id)} for t in teams for k in t.keys]
    model = {
        "sources": " and ".join(re.sub(r"[^A-Za-z0-9_.-]", "_", Path(f).name) for f in (cfg.teams.path, cfg.proxy.path)),
        "checksum_placeholder": CHECKSUM_PLACEHOLDER,
        "js_module": q(js_module or find_js_module()),
        "worker_processes": gw.nginx_workers,
        "at": lambda rel: _path(prefix.rstrip("/") + ("/" + rel if rel else "")),
        "work": lambda rel: _path(work.rstrip("/") + "/" + rel),
        "map_hash_max_size": max(2048, 1 << math.ceil(math.log2(max(1, len(keys)) * 2))),
        # DB mode asks authsvc for every key: it knows the static keys and the virtual ones.
        "key_lookup": "service" if cfg.proxy.database_url else gw.key_lookup,
        "db_mode": cfg.proxy.database_url is not None,
        "team_keys": keys,
        "has_domains": has_domains,
        "unknown_host_value": '"-"' if has_domains else '""',
        "hosts": hosts,
        "teams": [{"host_pair": q(f"{t.name}:{t.name}" if t.domains else f"{t.name}:")} for t in teams],
        "limited_teams": [{"name": t.name, "var": t.var_name, "rpm": t.rpm, "burst": t.burst,
                           "retry_after": max(1, math.ceil(60 / t.rpm))} for t in teams if t.rpm],
        "ip_rpm": gw.ip_rpm,
        "ip_burst": gw.ip_burst,
        "access_log": _path(gw.log_dir + "/access.jsonl"),
        "proxy_addr": str(gw.proxy_listen),
        "auth_addr": str(gw.auth_listen),
        "auth_cache_ok": AUTH_CACHE_OK_DB if cfg.proxy.database_url else AUTH_CACHE_OK,
        "auth_cache_denied": AUTH_CACHE_DENIED,
        "max_body": gw.max_body,
        "listen": str(gw.listen),
        "tls_listen": str(gw.tls_listen) if gw.tls_listen else None,
        "dedicated": [{"name": q(t.name), "var": t.var_name, "addr": str(t.dedicated_listen)}
                      for t in cfg.teams.dedicated()],
        "certificates": [{"domains": " ".join(q(d) for d in c.domains), "cert": _path(c.cert), "key": _path(c.key),
                          "files_sha256": c.files_sha256} for c in gw.certificates],
    }
    for t in model["limited_teams"]:
        q(t["name"]), q(t["var"])
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    conf = env.get_template("nginx.conf.j2").render(m=model)
    js = (STATIC / "llmgate.js").read_bytes()
    if not re.fullmatch(r"[A-Za-z0-9_.~+/=-]+", internal_key):
        raise RenderError("the internal key must be URL-safe characters only")
    auth_lines = ["map $gw_team $gw_internal_auth {", f'    default "Bearer {internal_key}";']
    auth_lines += [f'    {q(t.name)} "Bearer {dedicated_internal_key(internal_key, t.name)}";' for t in cfg.teams.dedicated()]
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


def _path(path: str) -> str:
    return nginx_quote(path)
