"""`llmgate up`: nginx, proxycore, authsvc and the config watcher as one supervised tree.

Demo backends (fake-vllm) start on loopback api_base ports where no vLLM answers.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import secrets
import shutil
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from controller.config import ProxyConfig
from controller.edge import EdgeReloader, ReloadResult, RunLayout, nginx_binary, wait_for_checksum
from controller.supervisor import ChildSpec, Supervisor
from controller.teams import GatewayConfig, hash_key, load_gateway_config
from controller.yamlpath import ConfigError

LLMGATE = [sys.executable, "-m", "controller.cli"]
GENERATED_SECRETS = ("LLMGATE_MASTER_KEY", "LLMGATE_INTERNAL_KEY", "LLMGATE_DEMO_KEY")
WATCH_DEBOUNCE_MS = 150


def _read_secrets(path: Path) -> dict[str, str]:
    saved: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if value:
                saved[name.strip()] = value.strip()
    return saved


def load_saved_secrets(run_dir: Path) -> None:
    """The keys `llmgate up` generated into run/secrets.env, for commands that read the same files."""
    for name, value in _read_secrets(run_dir / "secrets.env").items():
        os.environ.setdefault(name, value)


def ensure_secrets(run_dir: Path) -> None:
    """Keys the gateway needs but the operator did not set: generated once, kept in run/secrets.env (0600)."""
    path = run_dir / "secrets.env"
    saved = _read_secrets(path)
    missing = [n for n in GENERATED_SECRETS if n not in os.environ and n not in saved]
    for name in missing:
        saved[name] = "sk-" + secrets.token_urlsafe(32)
    if missing:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in saved.items())
    for name, value in saved.items():
        os.environ.setdefault(name, value)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def demo_backends(config: ProxyConfig) -> dict[int, list[str]]:
    """Loopback ports in config.yaml where nothing listens: port -> upstream model ids to serve there."""
    wanted: dict[int, list[str]] = {}
    for d in config.deployments:
        url = urlsplit(d.api_base)
        host, port = url.hostname or "", url.port or 80
        if url.scheme != "http" or not _is_loopback(host) or _answers(host, port):
            continue
        models = wanted.setdefault(port, [])
        if d.upstream_model not in models:
            models.append(d.upstream_model)
    return wanted


class Gateway:
    """The running tree: children under a supervisor, and the watcher that reloads the edge."""

    def __init__(self, args: argparse.Namespace, cfg: GatewayConfig, layout: RunLayout, internal_key: str):
        self.args, self.cfg, self.layout = args, cfg, layout
        self.sup = Supervisor()
        self.nginx = None
        self.dedicated: dict[tuple[str, str], object] = {}  # (team, address) -> its proxycore child
        self.reloader = EdgeReloader(layout, args.config, args.teams, internal_key, nginx_pid=self._nginx_pid)
        self._reload_lock = asyncio.Lock()
        self.started = asyncio.Event()  # the watcher runs from the start; changes before this wait for it

    def _nginx_pid(self) -> int | None:
        proc = self.nginx.proc if self.nginx else None
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> list[int]:
        gw = self.cfg.teams.gateway
        demo = demo_backends(self.cfg.proxy) if self.args.demo != "never" else {}
        for port, models in sorted(demo.items()):
            argv = [*LLMGATE, "fake-vllm", "--port", str(port), "--chunk-delay-ms", "20"]
            for m in models:
                argv += ["--model", m]
            await self.sup.add(ChildSpec(f"fake-vllm:{port}", argv, ready=r"listening on"))
        await self.sup.add(ChildSpec("proxycore", self._proxy_argv(gw.proxy_listen, gw.workers), ready=r"listening on"))
        await self.sync_dedicated(self.cfg)
        if gw.key_lookup == "service" or self.cfg.proxy.database_url:
            auth = [*LLMGATE, "auth", "--teams", self.args.teams, "--config", self.args.config]
            await self.sup.add(ChildSpec("authsvc", auth, ready=r"listening on"))
        first = self.reloader.initial()
        if not first.ok:
            raise RuntimeError(first.message)
        prefix = self.layout.nginx_prefix
        argv = [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        self.nginx = await self.sup.add(ChildSpec("nginx", argv))
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, wait_for_checksum, gw.listen, first.checksum, 15.0):
            raise RuntimeError(f"nginx did not start serving on {gw.listen}; see {prefix / 'error.log'}")
        record_reload(first)
        return sorted(demo)

    def _proxy_argv(self, listen, workers: int, only_team: str | None = None) -> list[str]:
        gw = self.cfg.teams.gateway
        argv = [*LLMGATE, "proxy", "--config", self.args.config, "--teams", self.args.teams, "--host", listen.host,
                "--port", str(listen.port), "--workers", str(workers),
                "--usage-log", os.path.join(gw.log_dir, "usage.jsonl")]
        return argv + (["--only-team", only_team] if only_team else [])

    async def sync_dedicated(self, cfg: GatewayConfig, stop_extra: bool = True) -> None:
        """Start a proxycore for each dedicated team that has none; stop those no longer wanted."""
        wanted = {(t.name, str(t.dedicated_listen)): t for t in cfg.teams.dedicated()}
        for key, team in wanted.items():
            if key not in self.dedicated:
                spec = ChildSpec(f"proxycore:{team.name}", self._proxy_argv(team.dedicated_listen, 1, team.name),
                                 ready=r"listening on")
                self.dedicated[key] = await self.sup.add(spec)
        if stop_extra:
            for key in [k for k in self.dedicated if k not in wanted]:
                await self.sup.remove(self.dedicated.pop(key))

    def _needs_restart(self) -> str | None:
        """A change `llmgate up` cannot apply to running processes, named; None when there is none."""
        try:
            new = load_gateway_config(self.args.config, self.args.teams)
        except ConfigError:
            return None  # the reload itself reports the file's problem
        old_gw, new_gw = self.cfg.teams.gateway, new.teams.gateway
        fields = ("proxy_listen", "auth_listen", "workers", "key_lookup", "log_dir")
        changed = [f"gateway.{f}" for f in fields if getattr(old_gw, f) != getattr(new_gw, f)]
        if (self.cfg.proxy.database_url is None) != (new.proxy.database_url is None):
            changed.append("general_settings.database_url")
        return ", ".join(changed) or None

    async def reload(self, reason: str) -> ReloadResult:
        restart = self._needs_restart()
        if restart is not None:
            result = ReloadResult("failed", f"kept the previous config: {restart} changed, which takes a restart of "
                                  "llmgate up (the running processes cannot move); restart it to apply")
            record_reload(result)
            print(f"llmgate: reload ({reason}): {result.status}: {result.message}", flush=True)
            return result
        async with self._reload_lock:
            try:  # new dedicated instances must serve before nginx sends them traffic
                await self.sync_dedicated(load_gateway_config(self.args.config, self.args.teams), stop_extra=False)
            except (ConfigError, RuntimeError):
                pass  # the reload below reports a bad file; a child that cannot start is retried by the supervisor
            result = await asyncio.get_running_loop().run_in_executor(None, self.reloader.apply)
            if result.ok and self.reloader.current is not None:
                await self.sync_dedicated(self.reloader.current)
        record_reload(result)
        if result.ok and self.reloader.current is not None:
            self.cfg = self.reloader.current
        print(f"llmgate: reload ({reason}): {result.status}: {result.message}", flush=True)
        return result

    async def watch(self) -> None:
        from watchfiles import awatch

        paths = {os.path.abspath(self.args.config), os.path.abspath(self.args.teams)}
        # renewed TLS certificates reload nginx too (their paths as of the start)
        paths |= {os.path.abspath(p) for c in self.cfg.teams.gateway.certificates for p in (c.cert, c.key)}
        dirs = {os.path.dirname(p) for p in paths}
        async for changes in awatch(*dirs, watch_filter=lambda _c, p: os.path.abspath(p) in paths,
                                    debounce=WATCH_DEBOUNCE_MS, step=50, recursive=False):
            await self.started.wait()
            names = ", ".join(sorted({os.path.basename(p) for _, p in changes}))
            await self.reload(f"{names} changed")


@functools.cache
def _reload_metrics():
    from prometheus_client import Counter, Gauge  # imported late: after PROMETHEUS_MULTIPROC_DIR is set

    return (Counter("llmgate_config_reloads", "Config reloads by result", ["result"]),
            Gauge("llmgate_config_hash", "First 48 bits of the live config checksum", multiprocess_mode="mostrecent"))


@functools.cache
def _rpm_hits():
    from prometheus_client import Counter

    return Counter("llmgate_rate_limit_hits", "Requests refused by a limit", ["team", "kind"])


async def count_nginx_rate_limits(access_log: Path, interval: float = 0.5) -> None:
    """nginx refuses rpm overflows itself, so follow its access log and count them as metrics."""
    position, inode = 0, None
    if access_log.exists():  # count from now on; earlier lines were counted by an earlier run
        st = access_log.stat()
        position, inode = st.st_size, st.st_ino
    pending = b""
    while True:
        await asyncio.sleep(interval)
        try:
            st = access_log.stat()
        except FileNotFoundError:
            continue
        if st.st_ino != inode or st.st_size < position:  # rotated or truncated: start the new file
            position, inode, pending = 0, st.st_ino, b""
        if st.st_size == position:
            continue
        with open(access_log, "rb") as f:
            f.seek(position)
            data = pending + f.read(8 << 20)
            position = f.tell()
        lines = data.split(b"\n")
        pending = lines.pop()  # an unfinished line waits for its end
        for line in lines:
            if b'"status":429' not in line:
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not entry.get("proxied"):
                _rpm_hits().labels(entry.get("team") or "", "rpm").inc()


def record_reload(result: ReloadResult) -> None:
    reloads, config_hash = _reload_metrics()
    reloads.labels(result.status).inc()
    if result.ok and result.checksum:
        config_hash.set(int(result.checksum[:12], 16))


def _banner(cfg: GatewayConfig, demo_ports: list[int], secrets_file: Path) -> None:
    gw = cfg.teams.gateway
    host = gw.listen.loopback_host
    base = f"http://{'[' + host + ']' if ':' in host else host}:{gw.listen.port}"
    lines = [f"llmgate is up on {base} (nginx {gw.listen} -> proxycore {gw.proxy_listen}; key lookup: {gw.key_lookup})",
             f"models: {', '.join(cfg.proxy.model_names())}; teams: {', '.join(t.name for t in cfg.teams.teams) or 'none'}"]
    if demo_ports:
        lines.append(f"no vLLM answered on port(s) {', '.join(map(str, demo_ports))}: the built-in demo backend serves there")
    demo_key = os.environ.get("LLMGATE_DEMO_KEY", "")
    index = cfg.teams.key_index()
    owner = index.get(hash_key(demo_key)) if demo_key else None
    if owner is not None:
        team = owner[0]
        model = (team.models or cfg.proxy.model_names())[0]
        # The key is read from its file by the shell, so it never lands in a terminal log.
        lines += [
            f"try it with the demo key of team {team.name} (kept in {secrets_file}):",
            f"  curl -s {base}/v1/chat/completions \\",
            f"       -H \"Authorization: Bearer $(sed -n 's/^LLMGATE_DEMO_KEY=//p' {secrets_file})\" \\",
            f"       -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        ]
    else:
        lines.append("create a key for a team: llmgate key new --team TEAM --teams <teams.yaml>")
    lines.append(f"logs: {gw.log_dir}; edit the two files and llmgate reloads; Ctrl-C stops everything.")
    print("\n".join(lines), flush=True)


async def _run(args: argparse.Namespace, cfg: GatewayConfig, layout: RunLayout, internal_key: str) -> int:
    gateway = Gateway(args, cfg, layout, internal_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # logrotate: proxycore and nginx reopen their logs; nothing else writes one
    loop.add_signal_handler(signal.SIGUSR1, lambda: gateway.sup.signal_all(
        signal.SIGUSR1, lambda name: name == "nginx" or name.startswith("proxycore")))
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(gateway.reload("SIGHUP")))
    watcher = asyncio.ensure_future(gateway.watch())  # before anything starts: no edit goes unseen
    try:
        demo_ports = await gateway.start()
    except RuntimeError as exc:
        print(f"llmgate: {exc}", file=sys.stderr, flush=True)
        watcher.cancel()
        await gateway.sup.stop()
        return 1
    gateway.started.set()
    _banner(gateway.cfg, demo_ports, layout.run_dir / "secrets.env")
    follower = asyncio.ensure_future(count_nginx_rate_limits(Path(gateway.cfg.teams.gateway.log_dir) / "access.jsonl"))
    await stop.wait()
    print("llmgate: stopping", flush=True)
    watcher.cancel()
    follower.cancel()
    await gateway.sup.stop()
    return 0


def run_up(args: argparse.Namespace) -> int:
    layout = RunLayout(Path(args.run_dir).resolve())
    ensure_secrets(layout.run_dir)
    # One metrics directory for every process of the gateway: proxycore's /metrics shows them all.
    shutil.rmtree(layout.metrics_dir, ignore_errors=True)
    layout.metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(layout.metrics_dir)
    (layout.run_dir / "llmgate.pid").write_text(f"{os.getpid()}\n")
    try:
        cfg = load_gateway_config(args.config, args.teams)
    except ConfigError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    internal_key = cfg.teams.gateway.internal_key or os.environ["LLMGATE_INTERNAL_KEY"]
    import uvloop

    return uvloop.run(_run(args, cfg, layout, internal_key))
