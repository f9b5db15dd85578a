"""Benchmark proxycore and the full gateway against the backend they front, in one run: `make bench`.

Starts a fake vLLM server on loopback and, one after the other, the stacks in front of it:
proxycore alone, nginx alone, and `llmgate up` (nginx, proxycore, authsvc) in each key-lookup
mode. Drives every scenario with wrk at a fixed number of connections, and reads each
process's CPU time (utime + stime) and RSS from /proc around every load phase. Prints one row
per scenario, then the ratios the project tracks, each beside its goal. The method is written
down in docs/performance.md.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from controller.edge.nginx import RunLayout

REPO = Path(__file__).resolve().parent.parent
MODEL = "llama-3.1-8b-instruct"
MASTER_KEY = "sk-bench-master"
TEAM_KEY = "sk-bench-team"  # the gateway rows' key; teams.yaml holds only its sha256
NGINX = "/usr/sbin/nginx"
STREAM_CHUNKS = 64  # content chunks per streamed answer (one token each)
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_POLL_S = 0.005
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
UP_STOP_TIMEOUT_S = 20.0  # `llmgate up` gives its children 10 s before it kills them
ROLES = ("nginx", "authsvc", "proxycore", "backend")  # the request's path, in the order of the table's columns
EDGE_CPU_GOAL_US = 100.0
COARSE_TICKS = 50
BUSY_NEIGHBOURS_PCT = 10.0  # CPU used outside the benchmark, in % of one core, that makes a phase suspect


class BenchError(Exception):
    """The run cannot produce meaningful numbers; the message says why."""


# ---------------------------------------------------------------- what is measured

@dataclass(frozen=True)
class Scenario:
    """One load phase, one table row: POST `body` to `url` over `connections` connections."""

    name: str
    url: str
    headers: dict[str, str]
    body: dict
    measured: tuple[str, ...]  # roles of the servers on the request path; their CPU is reported
    connections: int
    chunk_delay_ms: float  # the backend's pause between streamed chunks during this phase

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float]  # role -> CPU microseconds per request
    cpu_ticks: dict[str, int]  # role -> clock ticks the figure rests on (resolution: 1 tick each end)
    other_cpu_pct: float  # CPU used by everything but the servers, wrk and this program, % of one core
    events_per_stream: int | None  # SSE events a client receives per streamed answer

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def chat_body(stream: bool) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say something about foxes."}],
            "max_tokens": STREAM_CHUNKS}
    if stream:
        body["stream"] = True
    return body


def build_scenarios(name: str, port: int, key: str | None, measured: tuple[str, ...],
                    chunk_delay_ms: float) -> list[Scenario]:
    """The four rows of one path: non-streaming and streaming, at 1 and at 32 connections."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return [
        Scenario(name, f"http://127.0.0.1:{port}/v1/chat/completions", headers, chat_body(stream), measured,
                 connections, chunk_delay_ms if stream else 0.0)
        for stream in (False, True)
        for connections in (1, 32)
    ]


# ---------------------------------------------------------------- processes and /proc

@dataclass
class Server:
    """A process on the request path, with its descendants (nginx workers); its CPU and RSS are read from /proc."""

    label: str  # its line in the process table
    pid: int
    log_path: Path
    proc: subprocess.Popen | None = None  # None: a child of `llmgate up`, which starts and stops it
    tree: bool = True  # False: this process alone (`llmgate up`, whose children are read apart)
    port: int = 0  # where it serves, where the benchmark talks to it directly
    ready_s: float | None = None
    idle_rss_mib: float = 0.0
    loaded_rss_mib: float = 0.0  # right after the last phase it served

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return proc_state(self.pid) not in (None, "Z")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [0] is field 3 of proc(5), "state"; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def proc_state(pid: int) -> str | None:
    fields = stat_fields(pid)
    return fields[0] if fields else None


def proc_ppid(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def start_time(pid: int) -> int | None:
    """Field 22 of proc(5): tells a process from a later one that reuses its PID."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants (proxy workers, nginx workers)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:  # else it exited while we looked
                parent_of[int(entry)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parent_of.items() if ppid in frontier]
        tree += children
        frontier = children
    return tree


def pids_of(server: Server) -> list[int]:
    return process_tree(server.pid) if server.tree else [server.pid]


def cpu_ticks(server: Server) -> int:
    """utime + stime of the process (tree), plus cutime + cstime (children that already exited)."""
    ticks = 0
    for pid in pids_of(server):
        fields = stat_fields(pid)
        if fields is not None:
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks


def machine_busy_ticks() -> int:
    """All CPUs' non-idle time from /proc/stat, steal included (time the hypervisor gave away)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def own_and_reaped_children_s() -> float:
    """CPU of this program and of the children it has waited for (wrk)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def rss_mib(server: Server) -> float:
    """VmRSS of the process (tree), in MiB."""
    kib = 0
    for pid in pids_of(server):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        kib += int(m.group(1)) if m else 0
    return kib / 1024


def http_get_status(port: int, path: str, timeout: float = 0.5) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def spawn(label: str, argv: list[str], workdir: Path, tree: bool = True) -> Server:
    log_path = workdir / f"{label.replace(' ', '-')}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return Server(label, proc.pid, log_path, proc, tree)


def wait_ready(server: Server, started: float, is_ready) -> None:
    """Polls `is_ready()` every few ms; ready_s is spawn -> first success."""
    assert server.proc is not None
    while not is_ready():
        if server.proc.poll() is not None:
            raise BenchError(f"{server.label} exited with status {server.proc.returncode} before it was ready:\n"
                             f"{tail(server.log_path)}")
        if time.perf_counter() - started > READY_TIMEOUT_S:
            raise BenchError(f"{server.label} was not ready after {READY_TIMEOUT_S:g} s:\n{tail(server.log_path)}")
        time.sleep(READY_POLL_S)
    server.ready_s = time.perf_counter() - started
    server.idle_rss_mib = rss_mib(server)


def start_server(label: str, argv: list[str], port: int, health_path: str, workdir: Path) -> Server:
    """Spawn the server and poll `health_path` until it answers 200."""
    started = time.perf_counter()
    server = spawn(label, argv, workdir)
    server.port = port
    try:
        wait_ready(server, started, lambda: http_get_status(port, health_path) == 200)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server, timeout: float = STOP_TIMEOUT_S) -> None:
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        stop_server(server)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_proxy_config(path: Path, backend_port: int, database_url: str | None = None) -> None:
    """config.yaml in LiteLLM's format: one deployment, the fake backend (and a key database in DB mode)."""
    db = f", database_url: \"{database_url}\"" if database_url else ""
    path.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        f"    litellm_params: {{model: hosted_vllm/{MODEL}, "
        f"api_base: \"http://127.0.0.1:{backend_port}/v1\", api_key: \"\"}}\n"
        f"general_settings: {{master_key: {MASTER_KEY}{db}}}\n")


def generate_virtual_key(port: int) -> str:
    """LiteLLM's /key/generate through the gateway, with the master key; no limits on the key."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/key/generate", body=b"{}", headers={"Authorization": f"Bearer {MASTER_KEY}",
                                                                   "Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"/key/generate answered {resp.status}: {body[:200]!r}")
    return json.loads(body)["key"]


# ---------------------------------------------------------------- nginx alone

def start_nginx_alone(backend_port: int, workdir: Path) -> tuple[Server, int]:
    """The system nginx in a private prefix, proxying straight to the backend as the gateway proxies to
    proxycore (HTTP/1.1, keep-alive upstream, unbuffered, the gateway's JSON access log), without auth."""
    prefix = workdir / "nginx-alone"
    prefix.mkdir()
    port = free_port()
    (prefix / "nginx.conf").write_text(f"""\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/json;
    keepalive_timeout 65s;
    client_max_body_size 32m;
    log_format bench_json escape=json '{{"request_id":"$request_id","time":"$time_iso8601","team":"",'
        '"key_id":"","host":"$host","method":"$request_method","uri":"$request_uri",'
        '"status":$status,"request_time":$request_time,"upstream_response_time":"$upstream_response_time",'
        '"upstream_addr":"$upstream_addr","bytes":$bytes_sent}}';
    access_log {prefix}/access.jsonl bench_json;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 128;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /-/ready {{ return 200 "ok\\n"; }}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Request-ID $request_id;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
""")
    argv = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    return start_server("nginx alone", argv, port, "/-/ready", workdir), port


# ---------------------------------------------------------------- the full gateway

@dataclass(frozen=True)
class Gateway:
    port: int  # where nginx listens
    up: Server  # `llmgate up` itself; its CPU counts as the benchmark's own, not as "other"
    parts: dict[str, Server]  # role (nginx, authsvc, proxycore) -> its child of `llmgate up`
    run_dir: Path


def start_gateway(key_lookup: str, backend_port: int, workdir: Path, db: bool = False) -> Gateway:
    """`llmgate up` with one team whose key is TEAM_KEY; ready when it prints `llmgate is up`.

    `db`: DB mode, with a SQLite key database (virtual keys beside the static team key)."""
    base = workdir / f"gateway-{key_lookup}{'-db' if db else ''}"
    base.mkdir()
    port, proxy_port, auth_port = free_port(), free_port(), free_port()
    config, teams, run_dir = base / "config.yaml", base / "teams.yaml", base / "run"
    write_proxy_config(config, backend_port, f"sqlite:///{base / 'keys.db'}" if db else None)
    teams.write_text(f"""\
gateway:
  listen: 127.0.0.1:{port}
  proxy_listen: 127.0.0.1:{proxy_port}
  auth_listen: 127.0.0.1:{auth_port}
  key_lookup: {key_lookup}
  log_dir: {base / "logs"}
  nginx_workers: 1
teams:
  bench:
    keys: [sha256:{hashlib.sha256(TEAM_KEY.encode()).hexdigest()}]
    rpm: 10000000
""")
    argv = [sys.executable, "-m", "controller.cli", "up", "--config", str(config), "--teams", str(teams),
            "--run-dir", str(run_dir)]
    started = time.perf_counter()
    up = spawn(f"gateway {key_lookup}{' db' if db else ''}: llmgate up", argv, workdir, tree=False)
    gateway = Gateway(port, up, {}, run_dir)
    try:
        wait_ready(up, started, lambda: "\nllmgate is up" in "\n" + up.log_path.read_text(errors="replace"))
        gateway.parts.update(gateway_children(up, key_lookup))
    except BaseException:
        stop_gateway(gateway)
        raise
    return gateway


CHILD_ROLES = {"proxycore": "proxycore", "authsvc": "authsvc"}  # `python -m <program>` -> role


def gateway_children(up: Server, key_lookup: str) -> dict[str, Server]:
    """The children of `llmgate up` by role, told apart by their command lines."""
    parts: dict[str, Server] = {}
    for pid in process_tree(up.pid)[1:]:
        if proc_ppid(pid) != up.pid:
            continue  # a grandchild: an nginx worker
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        command = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
        role = "nginx" if argv[0].startswith("nginx: master") else CHILD_ROLES.get(command)
        if role is not None:
            parts[role] = Server(up.label.replace("llmgate up", role), pid, up.log_path)
            parts[role].idle_rss_mib = rss_mib(parts[role])
    wanted = {"nginx", "proxycore"} | ({"authsvc"} if key_lookup == "service" else set())
    if set(parts) != wanted:
        raise BenchError(f"llmgate up runs {sorted(parts)}, expected {sorted(wanted)}:\n{tail(up.log_path)}")
    return parts


def stop_gateway(gateway: Gateway) -> list[int]:
    """SIGTERM to `llmgate up`, which stops its children. Kills, and returns, whatever of its tree is left."""
    tree = [(pid, start_time(pid)) for pid in process_tree(gateway.up.pid)[1:]]
    stop_server(gateway.up, UP_STOP_TIMEOUT_S)
    left = [pid for pid, started in tree if started is not None and start_time(pid) == started
            and proc_state(pid) != "Z"]
    for pid in left:
        print(f"bench_proxy: pid {pid} of llmgate up outlived it; killing it", file=sys.stderr, flush=True)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    layout = RunLayout(gateway.run_dir.resolve())
    work = layout.work_dir(layout.nginx_prefix)
    if not work.is_relative_to(layout.run_dir):  # under root, nginx's workers write to /tmp
        shutil.rmtree(work, ignore_errors=True)
    return left


@contextmanager
def running_gateway(key_lookup: str, backend_port: int, workdir: Path, db: bool = False) -> Iterator[Gateway]:
    gateway = start_gateway(key_lookup, backend_port, workdir, db)
    try:
        yield gateway
    finally:
        left = stop_gateway(gateway)
    if left:
        raise BenchError(f"llmgate up left processes {left} running after SIGTERM (killed now)")


# ---------------------------------------------------------------- one load phase

def set_chunk_delay(backend: Server, chunk_delay_ms: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=5)
    try:
        conn.request("POST", "/fake/config", body=json.dumps({"chunk_delay_ms": chunk_delay_ms}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BenchError(f"POST /fake/config answered {resp.status}: {resp.read()[:200]!r}")
    finally:
        conn.close()


def probe(scenario: Scenario) -> int | None:
    """Send the scenario's request once and check the answer; returns SSE events per stream."""
    host, port, path = split_url(scenario.url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(scenario.body), headers=scenario.headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"{scenario.name}: probe answered {resp.status}: {raw[:300]!r}")
    if not scenario.stream:
        answer = json.loads(raw)
        if not answer.get("choices"):
            raise BenchError(f"{scenario.name}: probe answer has no choices: {raw[:300]!r}")
        return None
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    if events[-1:] != [b"data: [DONE]"] or any(b'"error"' in e for e in events):
        raise BenchError(f"{scenario.name}: probe stream is broken or ends without [DONE]: {raw[-300:]!r}")
    return len(events)


def split_url(url: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
    if m is None:
        raise BenchError(f"cannot use URL {url}")
    return m.group(1), int(m.group(2)), m.group(3)


def write_wrk_script(scenario: Scenario, path: Path) -> None:
    def lua_string(text: str) -> str:
        level = "=" * next(n for n in range(1, 10) if "]" + "=" * n + "]" not in text)
        return f"[{level}[{text}]{level}]"

    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(json.dumps(scenario.body))}"]
    lines += [f"wrk.headers[ {lua_string(k)} ] = {lua_string(v)}" for k, v in scenario.headers.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise BenchError(f"cannot read wrk duration {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Reads wrk 4 `--latency` output; refuses any run with errors or non-2xx answers."""
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    if non_2xx and int(non_2xx.group(1)):
        raise BenchError(f"wrk saw {non_2xx.group(1)} error responses; numbers of errors are meaningless:\n{output}")
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sockets and any(int(n) for n in sockets.groups()):
        raise BenchError(f"wrk saw socket errors:\n{output}")
    total = re.search(r"(\d+) requests in ([\d.]+\w+),", output)
    p50 = re.search(r"^\s*50(?:\.0+)?%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s*99(?:\.0+)?%\s+(\S+)", output, re.M)
    if not (total and p50 and p99):
        raise BenchError(f"cannot read wrk's output:\n{output}")
    return WrkResult(int(total.group(1)), to_ms(total.group(2)) / 1000, to_ms(p50.group(1)), to_ms(p99.group(1)))


def run_wrk(scenario: Scenario, script: Path, duration_s: int) -> WrkResult:
    threads = min(scenario.connections, os.cpu_count() or 1)
    argv = ["wrk", "-t", str(threads), "-c", str(scenario.connections), "-d", f"{duration_s}s",
            "--timeout", "10s", "--latency", "-s", str(script), scenario.url]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration_s + 30:g} s: {' '.join(argv)}") from None
    if done.returncode != 0 or done.stderr.strip():  # a broken Lua script only shows on stderr
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def measure(scenario: Scenario, servers: dict[str, Server], duration_s: int, warmup_s: int,
            attempts: int, workdir: Path) -> Row:
    """The phase, repeated while other processes disturb it (up to `attempts`); the quietest counts."""
    set_chunk_delay(servers["backend"], scenario.chunk_delay_ms)
    events = probe(scenario)
    script = workdir / "request.lua"
    write_wrk_script(scenario, script)
    tries = [measure_once(scenario, servers, duration_s, warmup_s, script, events)]
    while tries[-1].other_cpu_pct > BUSY_NEIGHBOURS_PCT and len(tries) < attempts:
        print(f"    {tries[-1].other_cpu_pct:.0f} % of a core used by other processes; measuring again",
              file=sys.stderr, flush=True)
        tries.append(measure_once(scenario, servers, duration_s, warmup_s, script, events))
    return min(tries, key=lambda row: row.other_cpu_pct)


def measure_once(scenario: Scenario, servers: dict[str, Server], duration_s: int, warmup_s: int,
                 script: Path, events: int | None) -> Row:
    run_wrk(scenario, script, warmup_s)  # opens the connections, fills the proxy's upstream pool
    busy_before, own_before = machine_busy_ticks(), own_and_reaped_children_s()
    before = {role: cpu_ticks(server) for role, server in servers.items()}
    result = run_wrk(scenario, script, duration_s)
    after = {role: cpu_ticks(server) for role, server in servers.items()}
    busy_s = (machine_busy_ticks() - busy_before) / CLK_TCK
    own_s = own_and_reaped_children_s() - own_before
    for server in servers.values():
        if not server.alive():
            raise BenchError(f"{server.label} exited during {scenario.name}:\n{tail(server.log_path)}")
    if result.requests == 0:
        raise BenchError(f"{scenario.name}: no request completed in {duration_s:g} s")
    ticks = {role: after[role] - before[role] for role in servers}
    other_s = busy_s - own_s - sum(ticks.values()) / CLK_TCK
    cpu_us = {role: ticks[role] / CLK_TCK / result.requests * 1e6 for role in scenario.measured}
    return Row(scenario, result.requests, result.seconds, result.p50_ms, result.p99_ms, cpu_us,
               {role: ticks[role] for role in scenario.measured}, max(0.0, other_s / result.seconds * 100), events)


def measure_stage(scenarios: list[Scenario], servers: dict[str, Server], args: argparse.Namespace,
                  workdir: Path) -> list[Row]:
    """The scenarios of one stack, in order; `servers` is every process the benchmark runs meanwhile."""
    rows = []
    for scenario in scenarios:
        print(f"  {scenario.name}, {scenario.connections} conn(s), stream={scenario.stream} ...",
              file=sys.stderr, flush=True)
        rows.append(measure(scenario, servers, args.duration, args.warmup, args.attempts, workdir))
    for server in servers.values():
        server.loaded_rss_mib = rss_mib(server)
    return rows


# ---------------------------------------------------------------- goals

@dataclass(frozen=True)
class Goal:
    what: str
    value: float
    unit: str
    limit: float | None  # None: reported beside the goals, without one
    inclusive: bool = False  # "≤ limit" rather than "< limit"
    note: str = ""

    @property
    def met(self) -> bool:
        assert self.limit is not None
        return self.value <= self.limit if self.inclusive else self.value < self.limit


def find_row(rows: list[Row], name: str, connections: int, stream: bool) -> Row:
    for row in rows:
        s = row.scenario
        if (s.name, s.connections, s.stream) == (name, connections, stream):
            return row
    raise KeyError((name, connections, stream))


def worse(values: dict[int, float]) -> tuple[float, str]:
    """The larger value and where it came from; goals are judged on the less favourable load."""
    conns = max(values, key=values.__getitem__)
    return values[conns], conns_label(conns)


def conns_label(connections: int) -> str:
    return f"{connections} conn{'s' if connections > 1 else ''}"


def proxycore_goals(rows: list[Row], proxy: Server) -> list[Goal]:
    unary = {c: find_row(rows, "proxycore", c, False) for c in (1, 32)}
    stream = {c: find_row(rows, "proxycore", c, True) for c in (1, 32)}
    direct = find_row(rows, "direct", 1, False)
    cpu_ratio = {c: r.cpu_us["proxycore"] / r.cpu_us["backend"] for c, r in unary.items()}
    per_chunk = {c: r.cpu_us["proxycore"] / r.events_per_stream for c, r in stream.items()}
    marginal = {c: (stream[c].cpu_us["proxycore"] - unary[c].cpu_us["proxycore"]) / stream[c].events_per_stream
                for c in (1, 32)}
    ratio, ratio_at = worse(cpu_ratio)
    chunk, chunk_at = worse(per_chunk)
    return [
        Goal(f"proxycore CPU / backend CPU per request (non-streaming, {ratio_at})", ratio, "x", 2.0, True,
             "; ".join(f"{conns_label(c)}: {v:.2f}x" for c, v in cpu_ratio.items())),
        Goal("added p50 latency, proxycore over direct (non-streaming, 1 conn)", unary[1].p50_ms - direct.p50_ms,
             "ms", 0.5, False, f"added p99: {unary[1].p99_ms - direct.p99_ms:.3f} ms"),
        Goal(f"proxycore CPU per streamed chunk ({chunk_at})", chunk, "µs", 40.0, True,
             "; ".join(f"{conns_label(c)}: {per_chunk[c]:.1f} µs (marginal {marginal[c]:.1f})" for c in (1, 32))),
        Goal("proxycore RSS idle", proxy.idle_rss_mib, "MiB", 80.0, False,
             f"after load: {proxy.loaded_rss_mib:.1f} MiB"),
        Goal("proxycore spawn to ready (GET /health/liveliness 200)", proxy.ready_s or 0.0, "s", 1.0, False),
    ]


def gateway_goals(rows: list[Row], key_lookup: str) -> list[Goal]:
    """What the edge (nginx, and authsvc when it looks keys up) adds to proxycore, in CPU and in latency."""
    name = f"gateway-{key_lookup}"
    edge_roles = ("nginx", "authsvc") if key_lookup == "service" else ("nginx",)
    unary = {c: find_row(rows, name, c, False) for c in (1, 32)}
    edge = {c: sum(r.cpu_us[role] for role in edge_roles) for c, r in unary.items()}
    alone = {c: find_row(rows, "nginx", c, False).cpu_us["nginx"] for c in (1, 32)}
    whole = {c: sum(r.cpu_us.values()) - sum(find_row(rows, "proxycore", c, False).cpu_us.values())
             for c, r in unary.items()}
    value, at = worse(edge)
    parts = " + ".join(edge_roles)
    direct, proxycore = find_row(rows, "direct", 1, False), find_row(rows, "proxycore", 1, False)
    # the whole gateway (edge and proxycore, usage log on) against the backend it fronts, in the same phase
    full = {c: sum(v for role, v in r.cpu_us.items() if role != "backend") / r.cpu_us["backend"]
            for c, r in unary.items()}
    full_value, full_at = worse(full)
    return [
        Goal(f"full gateway CPU / backend CPU per request, {key_lookup} ({parts} + proxycore, non-streaming, "
             f"{full_at})", full_value, "x", 2.0, True,
             "; ".join(f"{conns_label(c)}: {full[c]:.2f}x" for c in (1, 32))),
        Goal(f"edge CPU per request over proxycore alone, {key_lookup} ({parts}, non-streaming, {at})", value,
             "µs", EDGE_CPU_GOAL_US, True,
             "; ".join(f"{conns_label(c)}: {edge[c]:.0f} µs (nginx alone {alone[c]:.0f})" for c in (1, 32))
             + "; whole path over the proxycore row: "
             + ", ".join(f"{whole[c]:+.0f} µs" for c in (1, 32))),
        Goal(f"added p50 latency, gateway {key_lookup} over direct (non-streaming, 1 conn)",
             unary[1].p50_ms - direct.p50_ms, "ms", None,
             note=f"over proxycore: {unary[1].p50_ms - proxycore.p50_ms:+.3f} ms; "
                  f"added p99 over direct: {unary[1].p99_ms - direct.p99_ms:.3f} ms"),
    ]


# ---------------------------------------------------------------- output

def db_goals(rows: list[Row]) -> list[Goal]:
    """DB mode: CPU per request of the whole gateway with a virtual key against a static key (no goal: reported)."""
    out = []
    for conns in (1, 32):
        static, virtual = find_row(rows, "db-static-key", conns, False), find_row(rows, "db-virtual-key", conns, False)
        s_cpu, v_cpu = sum(static.cpu_us.values()), sum(virtual.cpu_us.values())
        out.append(Goal(f"DB mode: gateway CPU per request, virtual key (cached) vs static key, {conns_label(conns)}",
                        v_cpu / s_cpu, "x", None, note=f"{v_cpu:.0f} vs {s_cpu:.0f} µs (nginx + authsvc + proxycore + backend)"))
    return out


def table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    numeric = [all(re.fullmatch(r"[-+]?[\d.,]+[a-zµ]*|-", row[i]) for row in body) for i in range(len(header))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def rows_table(rows: list[Row], markdown: bool) -> str:
    roles = [role for role in ROLES if any(role in r.cpu_us for r in rows)]
    header = ["scenario", "conns", "stream", "req/s", "p50 ms", "p99 ms"]
    header += [f"{role} CPU µs/req" for role in roles] + ["events/stream", "other CPU %"]
    body = []
    for r in rows:
        s = r.scenario
        cells = [s.name, str(s.connections), "yes" if s.stream else "no", f"{r.rps:,.0f}",
                 f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}"]
        cells += [f"{r.cpu_us[role]:,.0f}" if role in r.cpu_us else "-" for role in roles]
        cells.append(str(r.events_per_stream) if r.events_per_stream else "-")
        cells.append(f"{r.other_cpu_pct:.0f}")
        body.append(cells)
    return table(header, body, markdown)


DECIMALS = {"x": 2, "ms": 3, "µs": 1, "MiB": 1, "s": 3}


def goals_table(goals: list[Goal], markdown: bool) -> str:
    header = ["measure", "measured", "goal", "result", "also"]
    body = [[g.what, f"{g.value:.{DECIMALS[g.unit]}f} {g.unit}".replace(" x", "x"),
             "-" if g.limit is None else f"{'≤' if g.inclusive else '<'} {g.limit:g} {g.unit}".replace(" x", "x"),
             "-" if g.limit is None else "goal met" if g.met else "goal missed", g.note] for g in goals]
    return table(header, body, markdown)


def servers_table(servers: list[Server], markdown: bool) -> str:
    body = [[s.label, "-" if s.ready_s is None else f"{s.ready_s:.3f}", f"{s.idle_rss_mib:.1f}",
             f"{s.loaded_rss_mib:.1f}"] for s in servers]
    return table(["process", "spawn to ready s", "RSS idle MiB", "RSS after load MiB"], body, markdown)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}"


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # wrk takes whole seconds only.
    p.add_argument("--duration", type=int, default=5, help="seconds of measured load per scenario (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s phases, 1 s warm-up")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0,
                   help="backend pause between streamed chunks (default 1), so that chunks travel apart")
    p.add_argument("--attempts", type=int, default=3,
                   help=f"measure a phase up to this many times while other processes use more than "
                        f"{BUSY_NEIGHBOURS_PCT:g} %% of a core (default 3); the quietest attempt counts")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1, 1
    if not 1 <= args.duration <= 120 or not 1 <= args.warmup <= 30 or not 1 <= args.attempts <= 10:
        p.error("--duration must be 1 to 120 s, --warmup 1 to 30 s, --attempts 1 to 10")
    return args


def run(args: argparse.Namespace) -> str:
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: apt-get install -y wrk")
    if not os.access(NGINX, os.X_OK):
        raise BenchError(f"{NGINX} is missing: make system-deps (apt-get install -y nginx libnginx-mod-http-js)")
    python = sys.executable
    started: list[Server] = []  # in start order, for the process table
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="llmgate-bench-") as tmp:
        workdir = Path(tmp)
        backend_port = free_port()
        # One stack after the other, each stopped before the next starts; the backend serves them all.
        with running(start_server("backend", [python, "-m", "controller.cli", "fake-vllm", "--port", str(backend_port),
                                              "--model", MODEL, "--stream-chunks", str(STREAM_CHUNKS)],
                                  backend_port, "/health", workdir)) as backend:
            started.append(backend)
            config, proxy_port = workdir / "config.yaml", free_port()
            write_proxy_config(config, backend_port)
            with running(start_server("proxycore", [python, "-m", "controller.cli", "proxy", "--config", str(config),
                                                    "--port", str(proxy_port)],
                                      proxy_port, "/health/liveliness", workdir)) as proxy:
                started.append(proxy)
                scenarios = (build_scenarios("direct", backend_port, None, ("backend",), args.chunk_delay_ms)
                             + build_scenarios("proxycore", proxy_port, MASTER_KEY, ("proxycore", "backend"),
                                               args.chunk_delay_ms))
                rows += measure_stage(scenarios, {"backend": backend, "proxycore": proxy}, args, workdir)
            nginx, nginx_port = start_nginx_alone(backend_port, workdir)
            with running(nginx):
                started.append(nginx)
                scenarios = build_scenarios("nginx", nginx_port, None, ("nginx", "backend"), args.chunk_delay_ms)
                rows += measure_stage(scenarios, {"backend": backend, "nginx": nginx}, args, workdir)
            for key_lookup in ("map", "service"):
                with running_gateway(key_lookup, backend_port, workdir) as gateway:
                    started += [gateway.up, *gateway.parts.values()]
                    scenarios = build_scenarios(f"gateway-{key_lookup}", gateway.port, TEAM_KEY,
                                                (*gateway.parts, "backend"), args.chunk_delay_ms)
                    servers = {"backend": backend, "llmgate up": gateway.up, **gateway.parts}
                    rows += measure_stage(scenarios, servers, args, workdir)
            # DB mode: a virtual key (its policy cached by nginx) beside a static team key, same gateway
            with running_gateway("service", backend_port, workdir, db=True) as gateway:
                started += [gateway.up, *gateway.parts.values()]
                virtual = generate_virtual_key(gateway.port)
                measured = (*gateway.parts, "backend")
                scenarios = [s for s in build_scenarios("db-static-key", gateway.port, TEAM_KEY, measured,
                                                        args.chunk_delay_ms)
                             + build_scenarios("db-virtual-key", gateway.port, virtual, measured, args.chunk_delay_ms)
                             if not s.stream]
                servers = {"backend": backend, "llmgate up": gateway.up, **gateway.parts}
                rows += measure_stage(scenarios, servers, args, workdir)
    goals = (proxycore_goals(rows, proxy) + gateway_goals(rows, "map") + gateway_goals(rows, "service")
             + db_goals(rows))
    return report(args, rows, goals, started)


def report(args: argparse.Namespace, rows: list[Row], goals: list[Goal], servers: list[Server]) -> str:
    md = args.markdown
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"llmgate bench_proxy, {when}; {machine()}; {args.duration:g} s per scenario after "
            f"{args.warmup:g} s warm-up; {STREAM_CHUNKS} content chunks per stream, "
            f"{args.chunk_delay_ms:g} ms apart; load from wrk on the same CPUs")
    parts = [head, rows_table(rows, md), servers_table(servers, md), goals_table(goals, md)]
    coarse = [f"{r.scenario.name}, {r.scenario.connections} conn(s), stream={r.scenario.stream}: "
              f"{role} {n} ticks (1 tick = {1e6 / CLK_TCK / r.requests:.1f} µs/req)"
              for r in rows for role, n in r.cpu_ticks.items() if n < COARSE_TICKS]
    if coarse:
        parts.append(f"Coarse CPU figures (fewer than {COARSE_TICKS} ticks of {1000 // CLK_TCK} ms, +/- 1 tick "
                     "at either end; a longer --duration sharpens them):\n" + "\n".join("  " + c for c in coarse))
    busy = [f"{r.scenario.name}, {r.scenario.connections} conn(s), stream={r.scenario.stream}: "
            f"{r.other_cpu_pct:.0f} %" for r in rows if r.other_cpu_pct > BUSY_NEIGHBOURS_PCT]
    if busy:
        parts.append(f"WARNING: other processes used more than {BUSY_NEIGHBOURS_PCT:g} % of a core during these "
                     f"phases in each of {args.attempts} attempts; they inflate CPU figures too (shared caches, "
                     "hypervisor steal). Rerun on a quiet machine:\n" + "\n".join("  " + b for b in busy))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the servers in `run`'s finally
    try:
        print(run(args), end="")
    except BenchError as exc:
        print(f"bench_proxy: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
