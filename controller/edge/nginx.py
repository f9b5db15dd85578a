"""The one place with side effects on nginx: render → `nginx -t` → write → reload → verify the hash is live.

A failed step leaves the previous config serving and on disk, and says which file, where, and why.
nginx's own process calls sit behind `NginxRunner` (as ingress-nginx's `NginxExecTester`), so the
reload logic is tested without an nginx (tests/test_edge_reloader.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controller.edge.render import DEFAULT_JS_MODULE, RenderedConfig, RenderError, render_nginx_conf
from controller.model.gateway import GatewayConfig, load_gateway_config
from controller.model.teams import Address
from controller.model.yamlpath import ConfigError

VERIFY_TIMEOUT_S = 10.0
SECRET_FILES = {"internal-auth.conf"}
JS_MODULE_CANDIDATES = (DEFAULT_JS_MODULE, "/usr/lib64/nginx/modules/ngx_http_js_module.so",
                        "/etc/nginx/modules/ngx_http_js_module.so", "/usr/local/nginx/modules/ngx_http_js_module.so")
_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; leave room for the socket's own name


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def find_js_module() -> str:
    """ngx_http_js_module.so on this machine (the first candidate when none exists: nginx -t then says so)."""
    for candidate in JS_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return JS_MODULE_CANDIDATES[0]


@dataclass(frozen=True)
class RunLayout:
    """Where `llmgate up` keeps its runtime files (never in git: run/ is ignored)."""

    run_dir: Path

    @property
    def nginx_prefix(self) -> Path:
        return self.run_dir / "nginx"

    @property
    def staging_prefix(self) -> Path:
        return self.run_dir / "nginx-staging"

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"

    def work_dir(self, prefix: Path) -> Path:
        """What nginx workers write. Under root they run as `nobody`, who may not be able to enter the
        run directory (a home or a 0700 clone), so their files go to a directory of their own in /tmp."""
        if os.geteuid() == 0 or len(str(prefix / "work")) > _UNIX_PATH_MAX:
            tag = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
            return Path(tempfile.gettempdir()) / f"llmgate-nginx-{tag}"
        return prefix / "work"

    @property
    def socket_dir(self) -> Path:
        """Where proxycore's and authsvc's unix sockets live: beside what nginx's workers write, which they can
        reach whatever user they run as (and short enough for a socket's path)."""
        return self.work_dir(self.nginx_prefix)

    def load(self, config_path: str, teams_path: str) -> GatewayConfig:
        """Both files, once, with the internal addresses left unset resolved to this run's sockets."""
        return load_gateway_config(config_path, teams_path).with_sockets(str(self.socket_dir))

    def prepare(self, prefix: Path, log_dir: str) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        work = self.work_dir(prefix)
        for sub in ("tmp", "cache", "empty"):
            (work / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(work / sub, 0o755)
        os.chmod(work, 0o755)
        Path(log_dir).mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class ReloadResult:
    status: str  # applied | unchanged | failed
    message: str
    checksum: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


class CheckError(Exception):
    pass


def write_rendered(rendered: RenderedConfig, prefix: Path) -> None:
    """Each file written whole (temp + rename); the internal key's file readable by its owner only."""
    prefix.mkdir(parents=True, exist_ok=True)
    for name, data in rendered.files.items():
        target = prefix / name
        tmp = prefix / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if name in SECRET_FILES else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)


def read_rendered(prefix: Path, names: list[str]) -> dict[str, bytes] | None:
    try:
        return {name: (prefix / name).read_bytes() for name in names}
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- nginx's process calls

class NginxRunner(Protocol):
    """What the reloader asks of nginx; `SystemNginx` does it for real, tests give a fake."""

    def test(self, prefix: Path) -> str | None:
        """None when `nginx -t` accepts the config in `prefix`, else nginx's own complaint."""

    def reload(self, pid: int) -> None:
        """Ask the master `pid` to load its config again; ProcessLookupError when it is gone."""

    def served_checksum(self, listen: Address) -> str | None:
        """What `/-/config-hash` answers on `listen`, or None when nothing answers."""


class SystemNginx:
    def test(self, prefix: Path) -> str | None:
        run = subprocess.run([nginx_binary(), "-t", "-q", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                              "-e", str(prefix / "error.log")], capture_output=True, text=True, timeout=30)
        if run.returncode == 0:
            return None
        lines = [line for line in (run.stderr + run.stdout).splitlines() if "[emerg]" in line or "[alert]" in line]
        return "; ".join(lines) or (run.stderr.strip() or f"nginx -t exited with {run.returncode}")

    def reload(self, pid: int) -> None:
        os.kill(pid, signal.SIGHUP)

    def served_checksum(self, listen: Address) -> str | None:
        return live_checksum(listen)


def live_checksum(listen: Address, timeout: float = 1.0) -> str | None:
    host = listen.loopback_host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{listen.port}/-/config-hash"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode().strip()
    except OSError:
        return None


def wait_for_checksum(runner: NginxRunner, listen: Address, checksum: str, timeout: float = VERIFY_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runner.served_checksum(listen) == checksum:
            return True
        time.sleep(0.05)
    return False


def _error_log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(65536).decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.split("] ", 2)[-1] for line in text.splitlines() if "[emerg]" in line or "[alert]" in line]
    return "; ".join(lines[-3:])


# ---------------------------------------------------------------- the reloader

class EdgeReloader:
    """Applies a loaded GatewayConfig to a running nginx, verified; keeps the last good config otherwise.

    `js_module` is the njs module as the serving nginx sees it (another container's path under
    compose); the staging copy, tested by this machine's nginx, names this machine's module.
    """

    def __init__(self, layout: RunLayout, config_path: str, teams_path: str, internal_key: str,
                 nginx_pid: int | Callable[[], int | None] | None = None, runner: NginxRunner | None = None,
                 js_module: str | None = None, verify_timeout: float = VERIFY_TIMEOUT_S):
        self.layout, self.config_path, self.teams_path = layout, config_path, teams_path
        self.verify_timeout = verify_timeout
        self.internal_key, self.nginx_pid = internal_key, nginx_pid
        self.runner: NginxRunner = runner or SystemNginx()
        self.local_js_module = find_js_module()
        self.live_js_module = js_module or self.local_js_module
        self.current: GatewayConfig | None = None
        self.applied_checksum: str | None = None  # of the config nginx was last seen serving

    def load(self) -> GatewayConfig:
        """Both files, once, with the internal addresses resolved: what one reload renders and starts."""
        return self.layout.load(self.config_path, self.teams_path)

    def render(self, cfg: GatewayConfig, prefix: Path) -> RenderedConfig:
        module = self.live_js_module if prefix == self.layout.nginx_prefix else self.local_js_module
        return render_nginx_conf(cfg, str(prefix), self.internal_key, js_module=module,
                                 work_dir=str(self.layout.work_dir(prefix)))

    def check(self, cfg: GatewayConfig) -> RenderedConfig:
        """`nginx -t` on the config rendered into the staging prefix; raises RenderError or CheckError."""
        staged = self.render(cfg, self.layout.staging_prefix)
        self.layout.prepare(self.layout.staging_prefix, cfg.teams.gateway.log_dir)
        write_rendered(staged, self.layout.staging_prefix)
        problem = self.runner.test(self.layout.staging_prefix)
        if problem is not None:
            raise CheckError(f"nginx refused the rendered config: {problem}")
        return staged

    def initial(self, cfg: GatewayConfig) -> ReloadResult:
        """Render and write the first config (before nginx starts)."""
        try:
            self.check(cfg)
            live = self.render(cfg, self.layout.nginx_prefix)
        except (RenderError, CheckError) as exc:
            return ReloadResult("failed", str(exc))
        self.layout.prepare(self.layout.nginx_prefix, cfg.teams.gateway.log_dir)
        write_rendered(live, self.layout.nginx_prefix)
        self.current, self.applied_checksum = cfg, live.checksum
        return ReloadResult("applied", f"rendered {self.layout.nginx_prefix / 'nginx.conf'}", live.checksum)

    def load_and_apply(self) -> ReloadResult:
        """Load both files and apply them; a file that does not load keeps the previous config."""
        try:
            cfg = self.load()
        except ConfigError as exc:
            return ReloadResult("failed", f"kept the previous config: {exc}")
        return self.apply(cfg)

    def apply(self, cfg: GatewayConfig) -> ReloadResult:
        """One reload: render → nginx -t → skip if unchanged → write → reload → verify."""
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.layout.run_dir / "reload.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # `llmgate reload` and the watcher never interleave
            return self._apply(cfg)

    def _apply(self, cfg: GatewayConfig) -> ReloadResult:
        try:
            self.check(cfg)
            live = self.render(cfg, self.layout.nginx_prefix)
        except (RenderError, CheckError) as exc:
            return ReloadResult("failed", f"kept the previous config: {exc}")
        prefix = self.layout.nginx_prefix
        listen = cfg.teams.gateway.listen
        previous = read_rendered(prefix, list(live.files))
        # Not asked of nginx: right after a reload, a worker of the old generation may still answer.
        if previous == live.files and self.applied_checksum == live.checksum:
            self.current = cfg
            return ReloadResult("unchanged", "the rendered nginx config did not change; no reload",
                                live.checksum)
        pid = self.nginx_pid() if callable(self.nginx_pid) else self.nginx_pid
        if pid is None:
            return ReloadResult("failed", "kept the previous config: no running nginx to reload")
        error_log = prefix / "error.log"
        offset = error_log.stat().st_size if error_log.exists() else 0
        self.layout.prepare(prefix, cfg.teams.gateway.log_dir)
        write_rendered(live, prefix)
        try:
            self.runner.reload(pid)
        except ProcessLookupError:
            if previous is not None:
                write_rendered(RenderedConfig(previous, ""), prefix)
            return ReloadResult("failed", "kept the previous config: nginx is not running")
        if wait_for_checksum(self.runner, listen, live.checksum, self.verify_timeout):
            self.current, self.applied_checksum = cfg, live.checksum
            return ReloadResult("applied", f"nginx serves config {live.checksum[:12]}", live.checksum)
        # nginx -s reload "succeeds" even when the master rejects the new config (DESIGN fact 5).
        if previous is not None:
            write_rendered(RenderedConfig(previous, ""), prefix)
        reason = _error_log_since(error_log, offset) or "nginx did not start serving the new config in time"
        return ReloadResult("failed", f"kept the previous config: nginx rejected the reload: {reason}")
