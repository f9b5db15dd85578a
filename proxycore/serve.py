"""`llmgate proxy`: run proxycore in one process, or in N worker processes sharing a port."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time

from controller.config import ConfigError, ProxyConfig, load_proxy_config
from controller.teams import TeamsConfig, load_gateway_config

READY_TIMEOUT_S = 30.0
RESTART_BACKOFF_MAX_S = 10.0


def run_proxy(args: argparse.Namespace) -> int:
    try:
        config = load_proxy_config(args.config)
    except ConfigError as exc:
        print(f"llmgate: {exc}", file=sys.stderr)
        return 2
    for warning in config.warnings:
        print(f"llmgate: warning: {warning}", file=sys.stderr)
    if config.master_key is None:
        print("llmgate: warning: no general_settings.master_key: proxycore accepts requests without a key; "
              "keep it on loopback", file=sys.stderr)
    if args.workers < 1 or args.workers > 64:
        print("llmgate: --workers: expected a number from 1 to 64", file=sys.stderr)
        return 2
    if args.workers > 1 and args.port == 0:
        print("llmgate: --workers > 1 needs a fixed --port (workers share it)", file=sys.stderr)
        return 2
    teams = None
    if args.only_team and not args.teams:
        print("llmgate: --only-team needs --teams", file=sys.stderr)
        return 2
    if args.teams:
        try:
            teams = load_gateway_config(args.config, args.teams).teams
        except ConfigError as exc:
            print(f"llmgate: {exc}", file=sys.stderr)
            return 2
    worker = ProxyWorker(config, teams, args, os.environ.get("LLMGATE_INTERNAL_KEY"))
    if teams is not None:
        worker.quota_dir = tempfile.mkdtemp(prefix="llmgate-quota-")
        _rebuild_month_to_date(worker.quota_dir, teams, args.usage_log)
    try:
        if args.workers == 1:
            return worker.run(announce=True)
        return _supervise_workers(worker, args.workers)
    finally:
        if worker.quota_dir:
            shutil.rmtree(worker.quota_dir, ignore_errors=True)


def _rebuild_month_to_date(quota_dir: str, teams: TeamsConfig, usage_log: str | None) -> None:
    """Budgets survive restarts: the month's use is summed from the usage logs before any worker serves."""
    from controller.usage import month_to_date
    from proxycore.quota import Quotas, month_id

    quotas = Quotas(quota_dir)
    now = quotas.clock.now()
    used = month_to_date(usage_log, now) if usage_log else {}
    for team in teams.teams:
        tokens, usd = used.get(team.name, (0, 0.0))
        quotas.meter(team.name).set_month(month_id(now), tokens, usd)


class ProxyWorker:
    """Everything one worker process needs to serve; `run()` blocks until SIGTERM or SIGINT."""

    def __init__(self, config: ProxyConfig, teams: TeamsConfig | None, args: argparse.Namespace,
                 internal_key_env: str | None, reuse_port: bool = False):
        self.config, self.teams, self.host, self.port = config, teams, args.host, args.port
        self.config_path, self.teams_path, self.usage_path = args.config, args.teams, args.usage_log
        self.only_team = getattr(args, "only_team", None)
        self.internal_key_env, self.reuse_port = internal_key_env, reuse_port
        self.quota_dir: str | None = None  # shared counters of budgets and TPM, when teams.yaml is in use

    def run(self, announce: bool = False, ready_fd: int | None = None) -> int:
        import uvloop

        return uvloop.run(self._serve(announce, ready_fd))

    async def _serve(self, announce: bool, ready_fd: int | None) -> int:
        from aiohttp import web

        from proxycore.app import Gateway, LiveGateway, make_app
        from proxycore.usage_log import UsageLog

        usage = UsageLog(self.usage_path) if self.usage_path else None
        internal_key = (self.teams.gateway.internal_key if self.teams else None) or self.internal_key_env
        gw = Gateway.build(self.config, internal_key, self.teams, only_team=self.only_team)
        live = LiveGateway(gw, self.config_path, self.teams_path, self.internal_key_env)
        from proxycore.quota import Quotas

        app = make_app(live, usage_log=usage, quotas=Quotas(self.quota_dir) if self.quota_dir else None)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_port=self.reuse_port, backlog=2048)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        if usage is not None:
            loop.add_signal_handler(signal.SIGUSR1, usage.reopen)
        if announce:
            port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
            _announce(self.config, self.host, port, 1)
        if ready_fd is not None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)
        await stop.wait()
        await runner.cleanup()
        if usage is not None:
            usage.close()
        return 0


def _announce(config: ProxyConfig, host: str, port: int, workers: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"llmgate proxy listening on http://{shown}:{port} ({workers} worker{'s' if workers > 1 else ''}; "
          f"models: {', '.join(config.model_names())})", flush=True)


def _supervise_workers(worker: ProxyWorker, count: int) -> int:
    """Fork `count` workers on one SO_REUSEPORT port; restart crashed ones; forward signals."""
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # under `llmgate up` the whole gateway shares one
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="llmgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker imports prometheus_client
    worker.reuse_port = True
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def spawn(slot: int) -> tuple[int, int]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = worker.run(ready_fd=w)
            finally:
                os._exit(code)
        os.close(w)
        children[pid] = slot
        return pid, r

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, forward)
    pipes = [spawn(slot)[1] for slot in range(count)]
    deadline = time.monotonic() + READY_TIMEOUT_S
    for r in pipes:
        ok = _wait_ready(r, deadline)
        os.close(r)
        if not ok:
            print("llmgate: a proxy worker did not start; see the messages above", file=sys.stderr)
            forward(signal.SIGTERM, None)
            break
    else:
        _announce(worker.config, worker.host, worker.port, count)

    from prometheus_client import multiprocess

    failures: dict[int, int] = {}
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot = children.pop(pid, None)
        multiprocess.mark_process_dead(pid)
        if slot is None or stopping:
            continue
        failures[slot] = failures.get(slot, 0) + 1
        delay = min(RESTART_BACKOFF_MAX_S, 0.1 * 2 ** failures[slot])
        print(f"llmgate: proxy worker {pid} exited ({_describe_status(status)}); restarting in {delay:.1f}s",
              file=sys.stderr, flush=True)
        time.sleep(delay)
        if not stopping:
            _, r = spawn(slot)
            os.close(r)
    if own_dir:
        _remove_dir(metrics_dir)
    return 0


def _wait_ready(fd: int, deadline: float) -> bool:
    import select

    remaining = deadline - time.monotonic()
    while remaining > 0:
        try:
            readable, _, _ = select.select([fd], [], [], remaining)
        except InterruptedError:
            readable = []
        if readable:
            return os.read(fd, 1) == b"r"
        remaining = deadline - time.monotonic()
    return False


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"


def _remove_dir(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
