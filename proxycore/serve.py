"""`llmgate proxy`: run proxycore in one process, or in N worker processes sharing a port or a socket."""

from __future__ import annotations

import argparse
import asyncio
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
from controller.ops.serving import BEHIND_NGINX, ListenError, bind_unix, start_site, wait_for_stop
from controller.reports.aggregate import month_to_date

READY_TIMEOUT_S = 30.0  # a worker not serving by then is killed (and counts as a failed start)
RESTART_DELAY_S = 0.1  # a worker that died is started again after this (doubled per failed start in a row)
START_ATTEMPTS = 5  # failed starts in a row after which `llmgate proxy` gives up and exits 1
HEARTBEAT_S = 1.0  # each worker's event loop writes a byte to its supervisor this often
HUNG_AFTER_S = 10.0  # a worker silent this long is hung: killed and started again
SUPERVISE_TICK_S = 0.25
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
    if args.usage_spool_lines < 0:
        print("llmgate: --usage-spool-lines: expected 0 or more", file=sys.stderr)
        return 2
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
        self.usage_spool_lines = getattr(args, "usage_spool_lines", 100_000)
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

        usage = UsageLog(self.usage_path, self.usage_spool_lines) if self.usage_path else None
        served = ServedConfig.build(self.config, self.teams, only_team=self.only_team)
        live = LiveConfig(served, self.config_path, self.teams_path)
        app = make_app(live, usage_log=usage, meters=Meters(self.meter_dir) if self.meter_dir else None)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5, **BEHIND_NGINX)
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
        beats = asyncio.ensure_future(_heartbeat(ready_fd)) if ready_fd is not None else None
        await wait_for_stop(on_usr1=usage.reopen if usage is not None else None)
        if beats is not None:
            beats.cancel()
        await runner.cleanup()
        if usage is not None:
            usage.close()
        return 0


async def _heartbeat(fd: int) -> None:
    """`r` (ready), then a byte every HEARTBEAT_S from this worker's event loop to its supervisor; a supervisor
    that is gone (EPIPE) stops the worker, so that no orphan keeps serving."""
    os.set_blocking(fd, False)
    beat = b"r"
    try:
        while True:
            try:
                os.write(fd, beat)
            except BlockingIOError:
                pass  # the supervisor is not reading (stopped): it will see this worker's next byte
            except BrokenPipeError:
                print("llmgate: the proxy workers' supervisor is gone; this worker stops", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            beat = b"h"
            await asyncio.sleep(HEARTBEAT_S)
    finally:
        os.close(fd)


def _announce(config: ProxyConfig, shown: str, workers: int) -> None:
    where = shown if shown.startswith("unix:") else f"http://{shown}"
    print(f"llmgate proxy listening on {where} ({workers} worker{'s' if workers > 1 else ''}; "
          f"models: {', '.join(config.model_names())})", flush=True)


class _Slot:
    """One worker's place: restarted in it when it dies; its pipe carries `r` once ready, then heartbeats."""

    __slots__ = ("pid", "fd", "started", "ready", "last_beat", "failed_starts", "due")

    def __init__(self) -> None:
        self.pid: int | None = None
        self.fd: int | None = None  # the read end of the worker's pipe
        self.started = self.last_beat = 0.0
        self.ready = False
        self.failed_starts = 0  # in a row: exits before ready
        self.due: float | None = None  # when to start it again


def _supervise_workers(worker: ProxyWorker, count: int) -> int:
    """Fork `count` workers on one SO_REUSEPORT port (or one shared unix socket) and keep them serving.

    A worker that exits is started again after RESTART_DELAY_S; one whose event loop sends no heartbeat for
    HUNG_AFTER_S (frozen, SIGSTOP) is killed and started again. A worker that exits before it is ready
    START_ATTEMPTS times in a row cannot start: every worker is stopped and `llmgate proxy` exits 1, so that
    whoever runs it (`llmgate up`, systemd, Kubernetes) sees it. Signals are forwarded to every worker.
    """
    import select

    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # under `llmgate up` the whole gateway shares one
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="llmgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker imports prometheus_client
    from prometheus_client import multiprocess

    worker.reuse_port = worker.sock is None  # TCP: each worker binds the port; a socket is shared as bound
    slots = [_Slot() for _ in range(count)]
    state = {"stopping": False, "announced": False, "code": 0}

    def spawn(slot: _Slot) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(r)
                for other in slots:
                    if other.fd is not None:
                        os.close(other.fd)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                status = worker.run(ready_fd=w)
            finally:
                os._exit(status)
        os.close(w)
        slot.pid, slot.fd, slot.ready, slot.due = pid, r, False, None
        slot.started = slot.last_beat = time.monotonic()

    def signal_workers(signum: int) -> None:
        for slot in slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signum)
                except ProcessLookupError:
                    pass

    def forward(signum: int, _frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            state["stopping"] = True
        signal_workers(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, forward)
    for slot in slots:
        spawn(slot)
    while any(s.pid is not None or (s.due is not None and not state["stopping"]) for s in slots):
        now = time.monotonic()
        wait = max(0.0, min([SUPERVISE_TICK_S] + [s.due - now for s in slots if s.due is not None]))
        fds = [s.fd for s in slots if s.fd is not None]
        readable = set(select.select(fds, [], [], wait)[0]) if fds else set()
        if not fds:
            time.sleep(wait)
        now = time.monotonic()
        for slot in slots:
            if slot.fd is not None and slot.fd in readable:
                _read_beats(slot, now)
        if not state["announced"] and not state["stopping"] and all(s.ready for s in slots):
            _announce(worker.config, str(worker.listen), count)
            state["announced"] = True
        _reap(slots, state, now, multiprocess.mark_process_dead, signal_workers)
        for slot in slots:
            if slot.pid is not None and not state["stopping"]:
                _kill_if_stuck(slot, now)
            elif slot.due is not None and slot.due <= now and not state["stopping"]:
                spawn(slot)
    if own_dir:
        _remove_dir(metrics_dir)
    return int(state["code"])


def _read_beats(slot: _Slot, now: float) -> None:
    assert slot.fd is not None
    data = os.read(slot.fd, 4096)
    if not data:  # the worker closed its end: it is exiting
        os.close(slot.fd)
        slot.fd = None
        return
    slot.last_beat = now
    if not slot.ready and b"r" in data:
        slot.ready, slot.failed_starts = True, 0


def _reap(slots: list[_Slot], state: dict, now: float, mark_dead, signal_workers) -> None:
    """Collect every worker that ended, and schedule its replacement (or give up on one that cannot start)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        mark_dead(pid)
        slot = next((s for s in slots if s.pid == pid), None)
        if slot is None:
            continue
        if slot.fd is not None:
            os.close(slot.fd)
        slot.pid = slot.fd = None
        if state["stopping"]:
            continue
        if not slot.ready:
            slot.failed_starts += 1
            if not state["announced"] or slot.failed_starts >= START_ATTEMPTS:
                tries = f" {slot.failed_starts} times in a row" if state["announced"] else ""
                print(f"llmgate: a proxy worker could not start{tries} (last: {_describe_status(status)}); "
                      "stopping; see the messages above", file=sys.stderr, flush=True)
                state["stopping"], state["code"] = True, 1
                signal_workers(signal.SIGTERM)
                continue
        delay = RESTART_DELAY_S * 2 ** slot.failed_starts
        print(f"llmgate: proxy worker {pid} exited ({_describe_status(status)}); starting another in {delay:.1f}s",
              file=sys.stderr, flush=True)
        slot.due = now + delay


def _kill_if_stuck(slot: _Slot, now: float) -> None:
    """A ready worker silent for HUNG_AFTER_S, or one not ready after READY_TIMEOUT_S, is killed (then reaped)."""
    assert slot.pid is not None
    if slot.ready and now - slot.last_beat > HUNG_AFTER_S:
        why = f"sent no heartbeat for {HUNG_AFTER_S:g}s (hung)"
    elif not slot.ready and now - slot.started > READY_TIMEOUT_S:
        why = f"was not ready after {READY_TIMEOUT_S:g}s"
    else:
        return
    print(f"llmgate: proxy worker {slot.pid} {why}; killing it", file=sys.stderr, flush=True)
    try:
        os.kill(slot.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    slot.last_beat = slot.started = now  # once: the kill is reaped on a later pass


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"


def _remove_dir(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
