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
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controller.edge.nginx import EdgeReloader, ReloadResult, RunLayout, live_checksum, wait_for_checksum
from controller.model.gateway import INTERNAL_KEY_ENV, GatewayConfig, internal_key
from controller.model.teams import load_teams
from controller.model.yamlpath import ConfigError
from controller.ops.filewatch import FileWatch
from controller.ops.serving import wait_for_stop

START_TIMEOUT_S = 60.0  # nginx's container polls for its first nginx.conf, then starts


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


class Sidecar:
    def __init__(self, args: argparse.Namespace, reloader: EdgeReloader):
        self.args, self.reloader = args, reloader
        self.pid_file = Path(args.nginx_pid_file)
        self._lock = asyncio.Lock()

    def apply(self) -> ReloadResult:
        """One pass, blocking: the first config when nginx waits for one, else a verified reload."""
        waiting = self.reloader.nginx_pid() is None if callable(self.reloader.nginx_pid) else False
        try:
            cfg = self.reloader.load()
        except ConfigError as exc:
            return ReloadResult("failed", str(exc) if waiting else f"kept the previous config: {exc}")
        listen = cfg.teams.gateway.listen
        served = live_checksum(listen)
        if waiting:
            if served is not None:
                return ReloadResult("failed", f"kept the previous config: nginx answers on {listen} but "
                                              f"{self.pid_file} names no process this sidecar can signal "
                                              "(compose: pid: \"service:nginx\" and the same user as nginx)")
            return self._first(cfg)
        if self.reloader.applied_checksum is None:  # this sidecar (re)started beside a serving nginx
            self.reloader.applied_checksum = served
        return self.reloader.apply(cfg)

    def _first(self, cfg: GatewayConfig) -> ReloadResult:
        result = self.reloader.initial(cfg)
        if not result.ok or result.checksum is None:
            return result
        listen = cfg.teams.gateway.listen
        if wait_for_checksum(self.reloader.runner, listen, result.checksum, START_TIMEOUT_S):
            return ReloadResult("applied", f"nginx serves config {result.checksum[:12]}", result.checksum)
        self.reloader.applied_checksum = None
        error_log = self.reloader.layout.nginx_prefix / "error.log"
        return ReloadResult("failed", f"wrote {self.reloader.layout.nginx_prefix / 'nginx.conf'}, but nginx did not "
                                      f"serve it on {listen} within {START_TIMEOUT_S:.0f} s; see {error_log}")

    async def reload(self, reason: str) -> None:
        async with self._lock:
            result = await asyncio.get_running_loop().run_in_executor(None, self.apply)
        stream = sys.stdout if result.ok else sys.stderr
        print(f"llmgate: reload ({reason}): {result.status}: {result.message}", file=stream, flush=True)


async def _run(sidecar: Sidecar) -> int:
    started = asyncio.Event()

    async def on_change(reason: str) -> None:
        await started.wait()
        await sidecar.reload(reason)

    watch = FileWatch([sidecar.args.config, sidecar.args.teams], on_change)
    watcher = asyncio.ensure_future(watch.run())  # before the first render: no edit goes unseen
    await sidecar.reload("start")  # a failure is logged; the next edit of either file tries again
    started.set()
    print(f"llmgate: sidecar watching {sidecar.args.config} and {sidecar.args.teams} for "
          f"nginx in {sidecar.reloader.layout.nginx_prefix}", flush=True)
    await wait_for_stop(on_hup=lambda: watch.trigger("SIGHUP"))
    watcher.cancel()
    return 0


def run_sidecar(args: argparse.Namespace) -> int:
    try:
        key = internal_key(load_teams(args.teams))
    except ConfigError:
        key = internal_key(None)  # the first reload reports the file's problem
    if key is None:
        # Never generated here: proxycore, in another container, must hold the same key.
        print(f"llmgate: sidecar: set {INTERNAL_KEY_ENV} (compose/.env) or gateway.internal_key in "
              f"{args.teams}; proxycore needs the same key", file=sys.stderr)
        return 2
    layout = SidecarLayout(Path(args.run_dir).resolve(), Path(args.nginx_prefix).resolve())
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    reloader = EdgeReloader(layout, args.config, args.teams, key, nginx_pid=pid_reader(Path(args.nginx_pid_file)),
                            js_module=args.js_module)
    import uvloop

    return uvloop.run(_run(Sidecar(args, reloader)))
