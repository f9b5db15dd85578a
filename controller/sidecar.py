"""`llmgate sidecar`: render, watch and reload an nginx that runs in another container (docker compose).

nginx reads the config this process writes into a shared volume. The sidecar shares nginx's PID
namespace, to signal it (`pid: "service:nginx"`), and its network namespace, to ask the loopback-only
`/-/config-hash` whether a reload took (`network_mode: "service:nginx"`). Each change goes through
`EdgeReloader`: render → `nginx -t` (this container's nginx) → write → SIGHUP → verify.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from controller.edge import EdgeReloader, ReloadResult, RunLayout, live_checksum, wait_for_checksum
from controller.render import RenderedConfig, render_nginx_conf
from controller.teams import Address, GatewayConfig, load_gateway_config, load_teams
from controller.yamlpath import ConfigError

START_TIMEOUT_S = 60.0  # nginx's container polls for its first nginx.conf, then starts
WATCH_DEBOUNCE_MS = 150


@dataclass(frozen=True)
class SidecarLayout(RunLayout):
    """The run dir stays local (staging, lock); the live config goes to the volume nginx reads."""

    prefix: Path

    @property
    def nginx_prefix(self) -> Path:
        return self.prefix

    def work_dir(self, prefix: Path) -> Path:
        # The serving nginx sees only the shared volume, never this container's /tmp.
        return prefix / "work"


class SidecarReloader(EdgeReloader):
    """EdgeReloader whose live config names the njs module as the serving nginx sees it.

    The staging copy keeps this container's own module, because this container's nginx tests it.
    """

    def __init__(self, layout: SidecarLayout, config_path: str, teams_path: str, internal_key: str,
                 nginx_pid: Callable[[], int | None], js_module: str | None):
        super().__init__(layout, config_path, teams_path, internal_key, nginx_pid=nginx_pid)
        self.js_module = js_module

    def load_and_render(self, prefix: Path) -> tuple[GatewayConfig, RenderedConfig]:
        cfg = load_gateway_config(self.config_path, self.teams_path)
        module = self.js_module if prefix == self.layout.nginx_prefix else None
        return cfg, render_nginx_conf(cfg, str(prefix), self.internal_key, js_module=module,
                                      work_dir=str(self.layout.work_dir(prefix)))


def pid_reader(pid_file: Path) -> Callable[[], int | None]:
    """nginx's master PID from its pid file, or None when it names no process this one may signal."""

    def read() -> int | None:
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):  # missing file, stale pid, or a process of another user
            return None
        return pid

    return read


def _listen(teams_path: str) -> Address | None:
    try:
        return load_teams(teams_path).gateway.listen
    except ConfigError:
        return None


class Sidecar:
    def __init__(self, args: argparse.Namespace, reloader: SidecarReloader):
        self.args, self.reloader = args, reloader
        self.pid_file = Path(args.nginx_pid_file)
        self._lock = asyncio.Lock()

    def apply(self) -> ReloadResult:
        """One pass, blocking: the first config when nginx waits for one, else a verified reload."""
        listen = _listen(self.args.teams)
        served = live_checksum(listen) if listen is not None else None
        if self.reloader.nginx_pid() is None:
            if served is not None:
                return ReloadResult("failed", f"kept the previous config: nginx answers on {listen} but "
                                              f"{self.pid_file} names no process this sidecar can signal "
                                              "(compose: pid: \"service:nginx\" and the same user as nginx)")
            return self._first()
        if self.reloader.applied_checksum is None:  # this sidecar (re)started beside a serving nginx
            self.reloader.applied_checksum = served
        return self.reloader.apply()

    def _first(self) -> ReloadResult:
        result = self.reloader.initial()
        if not result.ok or self.reloader.current is None or result.checksum is None:
            return result
        listen = self.reloader.current.teams.gateway.listen
        if wait_for_checksum(listen, result.checksum, START_TIMEOUT_S):
            return ReloadResult("applied", f"nginx serves config {result.checksum[:12]}", result.checksum)
        self.reloader.applied_checksum = None
        error_log = self.reloader.layout.nginx_prefix / "error.log"
        return ReloadResult("failed", f"wrote {self.reloader.layout.nginx_prefix / 'nginx.conf'}, but nginx did not "
                                      f"serve it on {listen} within {START_TIMEOUT_S:.0f} s; see {error_log}")

    async def reload(self, reason: str) -> ReloadResult:
        async with self._lock:
            result = await asyncio.get_running_loop().run_in_executor(None, self.apply)
        stream = sys.stdout if result.ok else sys.stderr
        print(f"llmgate: reload ({reason}): {result.status}: {result.message}", file=stream, flush=True)
        return result

    async def watch(self, started: asyncio.Event) -> None:
        from watchfiles import awatch

        paths = {os.path.abspath(self.args.config), os.path.abspath(self.args.teams)}
        dirs = {os.path.dirname(p) for p in paths}
        async for changes in awatch(*dirs, watch_filter=lambda _c, p: os.path.abspath(p) in paths,
                                    debounce=WATCH_DEBOUNCE_MS, step=50, recursive=False):
            await started.wait()
            names = ", ".join(sorted({os.path.basename(p) for _, p in changes}))
            await self.reload(f"{names} changed")


async def _run(sidecar: Sidecar) -> int:
    stop = asyncio.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(sidecar.reload("SIGHUP")))
    watcher = asyncio.ensure_future(sidecar.watch(started))  # before the first render: no edit goes unseen
    await sidecar.reload("start")  # a failure is logged; the next edit of either file tries again
    started.set()
    print(f"llmgate: sidecar watching {sidecar.args.config} and {sidecar.args.teams} for "
          f"nginx in {sidecar.reloader.layout.nginx_prefix}", flush=True)
    await stop.wait()
    watcher.cancel()
    return 0


def _internal_key(teams_path: str) -> str | None:
    try:
        configured = load_teams(teams_path).gateway.internal_key
    except ConfigError:
        configured = None  # the first reload reports the problem
    return configured or os.environ.get("LLMGATE_INTERNAL_KEY") or None


def run_sidecar(args: argparse.Namespace) -> int:
    internal_key = _internal_key(args.teams)
    if internal_key is None:
        # Never generated here: proxycore, in another container, must hold the same key.
        print("llmgate: sidecar: set LLMGATE_INTERNAL_KEY (compose/.env) or gateway.internal_key in "
              f"{args.teams}; proxycore needs the same key", file=sys.stderr)
        return 2
    layout = SidecarLayout(Path(args.run_dir).resolve(), Path(args.nginx_prefix).resolve())
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    reloader = SidecarReloader(layout, args.config, args.teams, internal_key,
                               nginx_pid=pid_reader(Path(args.nginx_pid_file)), js_module=args.js_module)
    return asyncio.run(_run(Sidecar(args, reloader)))
