"""Benchmark proxycore against the backend it fronts, in one run: `make bench`.

Starts a fake vLLM server and proxycore on loopback, drives every scenario with wrk at a fixed
number of connections, and reads each server's CPU time (utime + stime) and RSS from /proc
around every load phase. Prints one row per scenario, then the ratios the project tracks, each
beside its goal. The method is written down in docs/performance.md.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "llama-3.1-8b-instruct"
MASTER_KEY = "sk-bench-master"
STREAM_CHUNKS = 64  # content chunks per streamed answer (one token each)
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_POLL_S = 0.005
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
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


def build_scenarios(backend_port: int, proxy_port: int, chunk_delay_ms: float) -> list[Scenario]:
    targets = [
        ("direct", f"http://127.0.0.1:{backend_port}/v1/chat/completions", {}, ("backend",)),
        ("proxycore", f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
         {"Authorization": f"Bearer {MASTER_KEY}"}, ("proxy", "backend")),
    ]
    return [
        Scenario(name, url, {"Content-Type": "application/json", **headers}, chat_body(stream), measured,
                 connections, chunk_delay_ms if stream else 0.0)
        for name, url, headers, measured in targets
        for stream in (False, True)
        for connections in (1, 32)
    ]


# ---------------------------------------------------------------- processes and /proc

@dataclass
class Server:
    role: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    ready_s: float = 0.0
    idle_rss_mib: float = 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants (proxy workers, nginx workers)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited while we looked
            parent_of[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parent_of.items() if ppid in frontier]
        tree += children
        frontier = children
    return tree


def cpu_ticks(root: int) -> int:
    """utime + stime of the tree, plus cutime + cstime (children that already exited)."""
    ticks = 0
    for pid in process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 of proc(5), "state"
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


def rss_mib(root: int) -> float:
    """VmRSS of the tree, in MiB."""
    kib = 0
    for pid in process_tree(root):
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


def start_server(role: str, argv: list[str], port: int, health_path: str, workdir: Path) -> Server:
    """Spawn the server and poll `health_path` every few ms; ready_s is spawn -> first 200."""
    log_path = workdir / f"{role}.log"
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = Server(role, proc, port, log_path)
    try:
        while http_get_status(port, health_path) != 200:
            if proc.poll() is not None:
                raise BenchError(f"{role} exited with status {proc.returncode} before it was ready:\n{tail(log_path)}")
            if time.perf_counter() - started > READY_TIMEOUT_S:
                raise BenchError(f"{role} was not ready after {READY_TIMEOUT_S:g} s:\n{tail(log_path)}")
            time.sleep(READY_POLL_S)
    except BaseException:
        stop_server(server)
        raise
    server.ready_s = time.perf_counter() - started
    server.idle_rss_mib = rss_mib(proc.pid)
    return server


def stop_server(server: Server) -> None:
    proc = server.proc
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


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
    before = {role: cpu_ticks(server.proc.pid) for role, server in servers.items()}
    result = run_wrk(scenario, script, duration_s)
    after = {role: cpu_ticks(server.proc.pid) for role, server in servers.items()}
    busy_s = (machine_busy_ticks() - busy_before) / CLK_TCK
    own_s = own_and_reaped_children_s() - own_before
    for server in servers.values():
        if server.proc.poll() is not None:
            raise BenchError(f"{server.role} exited during {scenario.name}:\n{tail(server.log_path)}")
    if result.requests == 0:
        raise BenchError(f"{scenario.name}: no request completed in {duration_s:g} s")
    ticks = {role: after[role] - before[role] for role in servers}
    other_s = busy_s - own_s - sum(ticks.values()) / CLK_TCK
    cpu_us = {role: ticks[role] / CLK_TCK / result.requests * 1e6 for role in scenario.measured}
    return Row(scenario, result.requests, result.seconds, result.p50_ms, result.p99_ms, cpu_us,
               {role: ticks[role] for role in scenario.measured}, max(0.0, other_s / result.seconds * 100), events)


# ---------------------------------------------------------------- goals

@dataclass(frozen=True)
class Goal:
    what: str
    value: float
    unit: str
    limit: float
    inclusive: bool  # "≤ limit" rather than "< limit"
    note: str = ""

    @property
    def met(self) -> bool:
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
    return values[conns], f"{conns} conn{'s' if conns > 1 else ''}"


def proxycore_goals(rows: list[Row], proxy: Server) -> list[Goal]:
    unary = {c: find_row(rows, "proxycore", c, False) for c in (1, 32)}
    stream = {c: find_row(rows, "proxycore", c, True) for c in (1, 32)}
    direct = find_row(rows, "direct", 1, False)
    cpu_ratio = {c: r.cpu_us["proxy"] / r.cpu_us["backend"] for c, r in unary.items()}
    per_chunk = {c: r.cpu_us["proxy"] / r.events_per_stream for c, r in stream.items()}
    marginal = {c: (stream[c].cpu_us["proxy"] - unary[c].cpu_us["proxy"]) / stream[c].events_per_stream
                for c in (1, 32)}
    ratio, ratio_at = worse(cpu_ratio)
    chunk, chunk_at = worse(per_chunk)
    return [
        Goal(f"proxy CPU / backend CPU per request (non-streaming, {ratio_at})", ratio, "x", 2.0, True,
             "; ".join(f"{c} conn{'s' if c > 1 else ''}: {v:.2f}x" for c, v in cpu_ratio.items())),
        Goal("added p50 latency (non-streaming, 1 conn)", unary[1].p50_ms - direct.p50_ms, "ms", 0.5, False,
             f"added p99: {unary[1].p99_ms - direct.p99_ms:.3f} ms"),
        Goal(f"proxy CPU per streamed chunk ({chunk_at})", chunk, "µs", 40.0, True,
             "; ".join(f"{c} conn{'s' if c > 1 else ''}: {per_chunk[c]:.1f} µs (marginal {marginal[c]:.1f})"
                       for c in (1, 32))),
        Goal("proxy RSS idle", proxy.idle_rss_mib, "MiB", 80.0, False, f"after load: {rss_mib(proxy.proc.pid):.1f} MiB"),
        Goal("proxy spawn to ready (GET /health/liveliness 200)", proxy.ready_s, "s", 1.0, False),
    ]


# ---------------------------------------------------------------- output

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
    roles = [role for role in ("proxy", "backend") if any(role in r.cpu_us for r in rows)]
    roles += sorted({role for r in rows for role in r.cpu_us} - set(roles))
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
    header = ["proxycore", "measured", "goal", "result", "also"]
    body = [[g.what, f"{g.value:.{DECIMALS[g.unit]}f} {g.unit}".replace(" x", "x"),
             f"{'≤' if g.inclusive else '<'} {g.limit:g} {g.unit}".replace(" x", "x"),
             "goal met" if g.met else "goal missed", g.note] for g in goals]
    return table(header, body, markdown)


def servers_table(servers: dict[str, Server], markdown: bool) -> str:
    body = [[s.role, f"{s.ready_s:.3f}", f"{s.idle_rss_mib:.1f}", f"{rss_mib(s.proc.pid):.1f}"]
            for s in servers.values()]
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
    python = sys.executable
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="llmgate-bench-") as tmp:
        workdir = Path(tmp)
        try:
            backend_port, proxy_port = free_port(), free_port()
            servers["backend"] = start_server(
                "backend", [python, "-m", "controller.cli", "fake-vllm", "--port", str(backend_port),
                            "--model", MODEL, "--stream-chunks", str(STREAM_CHUNKS)],
                backend_port, "/health", workdir)
            config = workdir / "config.yaml"
            config.write_text(
                "model_list:\n"
                f"  - model_name: {MODEL}\n"
                f"    litellm_params: {{model: hosted_vllm/{MODEL}, "
                f"api_base: \"http://127.0.0.1:{backend_port}/v1\", api_key: \"\"}}\n"
                f"general_settings: {{master_key: {MASTER_KEY}}}\n")
            servers["proxy"] = start_server(
                "proxy", [python, "-m", "controller.cli", "proxy", "--config", str(config),
                          "--port", str(proxy_port)],
                proxy_port, "/health/liveliness", workdir)
            rows = []
            for scenario in build_scenarios(backend_port, proxy_port, args.chunk_delay_ms):
                print(f"  {scenario.name}, {scenario.connections} conn(s), stream={scenario.stream} ...",
                      file=sys.stderr, flush=True)
                rows.append(measure(scenario, servers, args.duration, args.warmup, args.attempts, workdir))
            goals = proxycore_goals(rows, servers["proxy"])
            return report(args, rows, goals, servers)
        finally:
            for server in reversed(list(servers.values())):
                stop_server(server)


def report(args: argparse.Namespace, rows: list[Row], goals: list[Goal], servers: dict[str, Server]) -> str:
    md = args.markdown
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"llmgate bench_proxy, {when}; {machine()}; {args.duration:g} s per scenario after "
            f"{args.warmup:g} s warm-up; {STREAM_CHUNKS} content chunks per stream, "
            f"{args.chunk_delay_ms:g} ms apart; load from wrk on the same CPUs")
    parts = [head, rows_table(rows, md), servers_table(servers, md), goals_table(goals, md)]
    coarse = [f"{r.scenario.name}, {r.scenario.connections} conn(s), stream={r.scenario.stream}: "
              f"{role} {n} ticks" for r in rows for role, n in r.cpu_ticks.items() if n < COARSE_TICKS]
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
