"""`llmgate proxy`: run proxycore in one process, or in N worker processes sharing a port or a socket."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from controller.model.config import ProxyConfig, load_proxy_config
from controller.model.gateway import load_gateway_config
from controller.model.teams import Address, Listen, TeamsConfig, UnixSocket
from controller.model.usage_record import month_id
from controller.model.yamlpath import ConfigError
from controller.ops.serving import ListenError, bind_unix, start_site, wait_for_stop
from controller.reports.aggregate import month_to_date

READY_TIMEOUT_S = 30.0
RESTART_BACKOFF_MAX_S = 10.0
LISTEN_SETTING = "--host/--port or --unix (gateway.proxy_listen under llmgate up)"


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
    if config.database_url is not None and not args.teams:
        print("llmgate: note: proxycore does not open general_settings.database_url; virtual keys, the admin API "
              "and /ui are served by `llmgate up` (nginx and authsvc in front of proxycore)", file=sys.stderr)
    if args.workers < 1 or args.workers > 64:
        print("llmgate: --workers: expected a number from 1 to 64", file=sys.stderr)
        return 2
    if args.workers > 1 and args.port == 0 and not args.unix:
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
    listen: Listen = UnixSocket(os.path.abspath(args.unix)) if args.unix else Address(args.host, args.port)
    worker = ProxyWorker(config, teams, args, listen)
    try:
        if isinstance(listen, UnixSocket):
            worker.sock = bind_unix(listen.path)  # bound once here: every worker accepts on it
    except ListenError as exc:
        print(f"llmgate: proxycore {exc}; choose another with {LISTEN_SETTING}", file=sys.stderr)
        return 1
    if teams is not None:
        worker.meter_dir = tempfile.mkdtemp(prefix="llmgate-meters-")
        _rebuild_month_to_date(worker.meter_dir, teams, args.usage_log)
    try:
        if args.workers == 1:
            return worker.run(announce=True)
        return _supervise_workers(worker, args.workers)
    finally:
        if worker.meter_dir:
            shutil.rmtree(worker.meter_dir, ignore_errors=True)
        if isinstance(listen, UnixSocket) and worker.sock is not None:
            worker.sock.close()
            try:
                os.unlink(listen.path)
            except FileNotFoundError:
                pass


def _rebuild_month_to_date(meter_dir: str, teams: TeamsConfig, usage_log: str | None) -> None:
    """Budgets survive restarts: the month's use is summed from the usage logs before any worker serves."""
    from proxycore.meters import Meters

    meters = Meters(meter_dir)
    now = meters.clock.now()
    used = month_to_date(usage_log, now) if usage_log else {}
    for team in teams.teams:
        tokens, usd = used.get(team.name, (0, 0.0))
        meters.meter(team.name).set_month(month_id(now), tokens, usd)


class ProxyWorker:
    """Everything one worker process needs to serve; `run()` blocks until SIGTERM or SIGINT."""

    def __init__(self, config: ProxyConfig, teams: TeamsConfig | None, args: argparse.Namespace, listen: Listen):
        self.config, self.teams, self.listen = config, teams, listen
        self.config_path, self.teams_path, self.usage_path = args.config, args.teams, args.usage_log
        self.only_team = getattr(args, "only_team", None)
        self.reuse_port = False
        self.sock: socket.socket | None = None  # the unix socket, bound by the parent
        self.meter_dir: str | None = None  # shared counters of budgets and TPM, when teams.yaml is in use

    def run(self, announce: bool = False, ready_fd: int | None = None) -> int:
        import uvloop

        return uvloop.run(self._serve(announce, ready_fd))

    async def _serve(self, announce: bool, ready_fd: int | None) -> int:
        # Imported here, in the worker: prometheus_client must see PROMETHEUS_MULTIPROC_DIR first.
        from aiohttp import web

        from proxycore.app import make_app
        from proxycore.live import LiveConfig, ServedConfig
        from proxycore.meters import Meters
        from proxycore.usage_log import UsageLog

        usage = UsageLog(self.usage_path) if self.usage_path else None
        served = ServedConfig.build(self.config, self.teams, only_team=self.only_team)
        live = LiveConfig(served, self.config_path, self.teams_path)
        app = make_app(live, usage_log=usage, meters=Meters(self.meter_dir) if self.meter_dir else None)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5)
        await runner.setup()
        try:
            shown = await start_site(runner, self.listen, reuse_port=self.reuse_port, sock=self.sock,
                                     setting=LISTEN_SETTING)
        except ListenError as exc:
            print(f"llmgate: proxycore {exc}", file=sys.stderr, flush=True)
            await runner.cleanup()
            return 1
        if announce:
            _announce(self.config, shown, 1)
        if ready_fd is not None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)
        await wait_for_stop(on_usr1=usage.reopen if usage is not None else None)
        await runner.cleanup()
        if usage is not None:
            usage.close()
        return 0


def _announce(config: ProxyConfig, shown: str, workers: int) -> None:
    where = shown if shown.startswith("unix:") else f"http://{shown}"
    print(f"llmgate proxy listening on {where} ({workers} worker{'s' if workers > 1 else ''}; "
          f"models: {', '.join(config.model_names())})", flush=True)


def _supervise_workers(worker: ProxyWorker, count: int) -> int:
    """Fork `count` workers on one SO_REUSEPORT port; restart crashed ones; forward signals."""
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # under `llmgate up` the whole gateway shares one
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="llmgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker imports prometheus_client
    worker.reuse_port = worker.sock is None  # TCP: each worker binds the port; a socket is shared as bound
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def spawn(slot: int, report_ready: bool = True) -> int | None:
        """Fork a worker; returns the read end of its ready pipe when `report_ready`."""
        r, w = os.pipe() if report_ready else (None, None)
        pid = os.fork()
        if pid == 0:
            if r is not None:
                os.close(r)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = worker.run(ready_fd=w)
            finally:
                os._exit(code)
        if w is not None:
            os.close(w)
        children[pid] = slot
        return r

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
    pipes = [spawn(slot) for slot in range(count)]
    deadline = time.monotonic() + READY_TIMEOUT_S
    for r in pipes:
        assert r is not None
        ok = _wait_ready(r, deadline)
        os.close(r)
        if not ok:
            print("llmgate: a proxy worker did not start; see the messages above", file=sys.stderr)
            forward(signal.SIGTERM, None)
            break
    else:
        _announce(worker.config, str(worker.listen), count)

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
            spawn(slot, report_ready=False)  # nobody waits for a restarted worker's ready byte
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
