"""`llmgate up`: nginx, proxycore, authsvc and the config watcher as one supervised tree.

With `--demo`, the built-in demo backend (fake-vllm) starts on loopback api_base ports where
nothing listens; without it, unreachable deployments are named at start and answer 503.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from controller.edge.nginx import EdgeReloader, ReloadResult, RunLayout, nginx_binary, wait_for_checksum
from controller.model.config import ProxyConfig
from controller.model.gateway import GatewayConfig, internal_key
from controller.model.teams import Address, Listen, Team, UnixSocket
from controller.model.wire import key_hash
from controller.model.yamlpath import ConfigError
from controller.ops.filewatch import FileWatch
from controller.ops.secrets import DEMO_KEY_ENV, ensure_secrets, secrets_file
from controller.ops.serving import answers_ok, wait_for_stop
from controller.ops.supervisor import Child, ChildSpec, Supervisor

PYTHON = sys.executable  # each child is a program of its own: python -m proxycore | authsvc | fakevllm
RESTART_FIELDS = ("proxy_listen", "auth_listen", "workers", "key_lookup", "log_dir")


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unreachable_backends(config: ProxyConfig) -> dict[tuple[str, int], list[str]]:
    """(host, port) of api_bases where nothing accepts a connection -> the deployments there."""
    down: dict[tuple[str, int], list[str]] = {}
    for d in config.deployments:
        url = urlsplit(d.api_base)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        if (host, port) in down or not _answers(host, port):
            down.setdefault((host, port), []).append(d.id)
    return down


def demo_backends(config: ProxyConfig, down: dict[tuple[str, int], list[str]]) -> dict[int, list[str]]:
    """Loopback http ports in config.yaml where nothing listens: port -> upstream model ids to serve there."""
    wanted: dict[int, list[str]] = {}
    for d in config.deployments:
        url = urlsplit(d.api_base)
        host, port = url.hostname or "", url.port or 80
        if url.scheme != "http" or not _is_loopback(host) or (host, port) not in down:
            continue
        models = wanted.setdefault(port, [])
        if d.upstream_model not in models:
            models.append(d.upstream_model)
    return wanted


def _liveness(listen: Listen, path: str):
    """The supervisor's liveness check of a child that serves HTTP on `listen`."""
    return functools.partial(answers_ok, listen, path)


def listen_args(listen: Listen) -> list[str]:
    if isinstance(listen, Address):
        return ["--host", listen.host, "--port", str(listen.port)]
    return ["--unix", listen.path]


def link_sockets(cfg: GatewayConfig, run_dir: Path) -> None:
    """<run-dir>/proxycore.sock (and authsvc.sock) point at the sockets, wherever nginx's workers needed them:
    `curl --unix-socket run/proxycore.sock http://proxycore/health` works as the operator expects."""
    gw = cfg.teams.gateway
    for listen, used in ((gw.proxy_listen, True), (gw.auth_listen, cfg.runs_authsvc)):
        if not isinstance(listen, UnixSocket) or os.path.dirname(listen.path) == str(run_dir):
            continue
        link = run_dir / os.path.basename(listen.path)
        if link.is_symlink() or link.exists():
            link.unlink()
        if used:
            link.symlink_to(listen.path)


class SupervisedGateway:
    """The running tree: children under a supervisor, and the watcher that reloads the edge."""

    def __init__(self, args: argparse.Namespace, cfg: GatewayConfig, layout: RunLayout, internal_key: str):
        self.args, self.cfg, self.layout = args, cfg, layout
        self.sup = Supervisor()
        self.nginx: Child | None = None
        self.dedicated: dict[tuple[str, str], Child] = {}  # (team, address) -> its proxycore child
        self.reloader = EdgeReloader(layout, args.config, args.teams, internal_key, nginx_pid=self._nginx_pid)
        self._reload_lock = asyncio.Lock()
        self.started = asyncio.Event()  # the watcher runs from the start; changes before this wait for it

    def _nginx_pid(self) -> int | None:
        proc = self.nginx.proc if self.nginx else None
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> list[int]:
        gw = self.cfg.teams.gateway
        link_sockets(self.cfg, self.layout.run_dir)
        down = unreachable_backends(self.cfg.proxy)
        demo = demo_backends(self.cfg.proxy, down) if self.args.demo else {}
        for port, models in sorted(demo.items()):
            argv = [PYTHON, "-m", "fakevllm", "--port", str(port), "--chunk-delay-ms", "20"]
            for m in models:
                argv += ["--model", m]
            await self.sup.add(ChildSpec(f"fake-vllm:{port}", argv, ready=r"listening on"))
        for (host, port), ids in sorted(down.items()):
            if not (self.args.demo and port in demo and _is_loopback(host)):
                print(f"llmgate: nothing answers at {host}:{port} yet: deployment(s) {', '.join(ids)} answer 503 "
                      "until it does" + ("" if self.args.demo else " (llmgate up --demo serves a demo model there)"),
                      flush=True)
        assert gw.proxy_listen is not None
        await self.sup.add(ChildSpec("proxycore", self._proxy_argv(gw.proxy_listen, gw.workers), ready=r"listening on",
                                     alive=_liveness(gw.proxy_listen, "/health/liveliness")))
        await self.sync_dedicated(self.cfg)
        if self.cfg.runs_authsvc:
            assert gw.auth_listen is not None
            auth = [PYTHON, "-m", "authsvc", "--teams", self.args.teams, "--config", self.args.config,
                    *listen_args(gw.auth_listen)]
            await self.sup.add(ChildSpec("authsvc", auth, ready=r"listening on",
                                         alive=_liveness(gw.auth_listen, "/health")))
        first = self.reloader.initial(self.cfg)
        if not first.ok or first.checksum is None:
            raise RuntimeError(first.message)
        prefix = self.layout.nginx_prefix
        argv = [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        self.nginx = await self.sup.add(ChildSpec("nginx", argv))
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, wait_for_checksum, self.reloader.runner, gw.listen, first.checksum, 15.0):
            raise RuntimeError(f"nginx did not start serving on {gw.listen}; see {prefix / 'error.log'}")
        record_reload(first)
        return sorted(demo)

    def _proxy_argv(self, listen: Listen, workers: int, only_team: str | None = None) -> list[str]:
        gw = self.cfg.teams.gateway
        argv = [PYTHON, "-m", "proxycore", "--config", self.args.config, "--teams", self.args.teams, *listen_args(listen),
                "--workers", str(workers), "--usage-log", os.path.join(gw.log_dir, "usage.jsonl")]
        return argv + (["--only-team", only_team] if only_team else [])

    async def sync_dedicated(self, cfg: GatewayConfig, stop_extra: bool = True) -> None:
        """Start a proxycore for each dedicated team that has none; stop those no longer wanted."""
        wanted: dict[tuple[str, str], Team] = {(t.name, str(t.dedicated_listen)): t for t in cfg.teams.dedicated()}
        for key, team in wanted.items():
            if key not in self.dedicated:
                assert team.dedicated_listen is not None
                spec = ChildSpec(f"proxycore:{team.name}", self._proxy_argv(team.dedicated_listen, 1, team.name),
                                 ready=r"listening on", alive=_liveness(team.dedicated_listen, "/health/liveliness"))
                self.dedicated[key] = await self.sup.add(spec)
        if stop_extra:
            for key in [k for k in self.dedicated if k not in wanted]:
                await self.sup.remove(self.dedicated.pop(key))

    def _needs_restart(self, new: GatewayConfig) -> str | None:
        """A change `llmgate up` cannot apply to running processes, named; None when there is none."""
        old_gw, new_gw = self.cfg.teams.gateway, new.teams.gateway
        changed = [f"gateway.{f}" for f in RESTART_FIELDS if getattr(old_gw, f) != getattr(new_gw, f)]
        if self.cfg.db_mode != new.db_mode:
            changed.append("general_settings.database_url")
        return ", ".join(changed) or None

    async def reload(self, reason: str) -> None:
        """Load both files once; the same model goes to the dedicated instances and to the renderer."""
        await self.started.wait()
        async with self._reload_lock:
            result = await self._reload()
        record_reload(result)
        print(f"llmgate: reload ({reason}): {result.status}: {result.message}", flush=True)

    async def _reload(self) -> ReloadResult:
        loop = asyncio.get_running_loop()
        try:
            cfg = await loop.run_in_executor(None, self.reloader.load)
        except ConfigError as exc:
            return ReloadResult("failed", f"kept the previous config: {exc}")
        restart = self._needs_restart(cfg)
        if restart is not None:
            return ReloadResult("failed", f"kept the previous config: {restart} changed, which takes a restart of "
                                "llmgate up (the running processes cannot move); restart it to apply")
        try:  # new dedicated instances must serve before nginx sends them traffic
            await self.sync_dedicated(cfg, stop_extra=False)
        except RuntimeError:
            pass  # a child that cannot start is retried by the supervisor
        result = await loop.run_in_executor(None, self.reloader.apply, cfg)
        if result.ok:
            await self.sync_dedicated(cfg)
            self.cfg = cfg
        return result

    def watched_files(self) -> list[str]:
        # renewed TLS certificates reload nginx too (their paths as of the start)
        certs = [p for c in self.cfg.teams.gateway.certificates for p in (c.cert, c.key)]
        return [self.args.config, self.args.teams, *certs]


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


def _banner(cfg: GatewayConfig, demo_ports: list[int], secrets_path: Path) -> None:
    gw = cfg.teams.gateway
    host = gw.listen.loopback_host
    base = f"http://{'[' + host + ']' if ':' in host else host}:{gw.listen.port}"
    lines = [f"llmgate is up on {base} (nginx {gw.listen} -> proxycore {gw.proxy_listen}; key lookup: {gw.key_lookup})",
             f"models: {', '.join(cfg.proxy.model_names())}; teams: {', '.join(t.name for t in cfg.teams.teams) or 'none'}"]
    if demo_ports:
        lines.append(f"no vLLM answered on port(s) {', '.join(map(str, demo_ports))}: the built-in demo backend serves there")
    demo_key = os.environ.get(DEMO_KEY_ENV, "")
    owner = cfg.teams.key_index().get(key_hash(demo_key)) if demo_key else None
    if owner is not None:
        team = owner[0]
        model = (team.models or cfg.proxy.model_names())[0]
        # The key is read from its file by the shell, so it never lands in a terminal log.
        lines += [
            f"try it with the demo key of team {team.name} (kept in {secrets_path}):",
            f"  curl -s {base}/v1/chat/completions \\",
            f"       -H \"Authorization: Bearer $(sed -n 's/^{DEMO_KEY_ENV}=//p' {secrets_path})\" \\",
            "       -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        ]
    else:
        lines.append("create a key for a team: llmgate key new --team TEAM --teams <teams.yaml>")
    lines.append(f"logs: {gw.log_dir}; edit the two files and llmgate reloads; Ctrl-C stops everything.")
    print("\n".join(lines), flush=True)


async def _run(args: argparse.Namespace, cfg: GatewayConfig, layout: RunLayout, key: str) -> int:
    gateway = SupervisedGateway(args, cfg, layout, key)
    watch = FileWatch(gateway.watched_files(), gateway.reload)
    watcher = asyncio.ensure_future(watch.run())  # before anything starts: no edit goes unseen
    try:
        demo_ports = await gateway.start()
    except RuntimeError as exc:
        print(f"llmgate: {exc}", file=sys.stderr, flush=True)
        watcher.cancel()
        await gateway.sup.stop()
        return 1
    gateway.started.set()
    _banner(gateway.cfg, demo_ports, secrets_file(layout.run_dir))
    follower = asyncio.ensure_future(count_nginx_rate_limits(Path(gateway.cfg.teams.gateway.log_dir) / "access.jsonl"))
    # logrotate: the processes that write a log reopen it; nothing else gets the signal
    await wait_for_stop(on_hup=lambda: watch.trigger("SIGHUP"), on_usr1=lambda: gateway.sup.signal_all(
        signal.SIGUSR1, lambda name: name == "nginx" or name.startswith("proxycore")))
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
        cfg = layout.load(args.config, args.teams)
    except ConfigError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    key = internal_key(cfg.teams)
    assert key is not None  # ensure_secrets put one in the environment
    import uvloop

    return uvloop.run(_run(args, cfg, layout, key))
