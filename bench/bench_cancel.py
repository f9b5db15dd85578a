"""Benchmark: how long a client's disconnect takes to reach the backend, through the gateway, idle and under load.

Starts a fake vLLM server and `llmgate up` (key_lookup map: nginx -> proxycore -> backend). For each path
(direct to the backend, through the gateway) and each load (none, then wrk streaming chat over
--connections connections), sends --probes requests one after the other, half streamed and half not,
that hang up part-way: a stream after its first events, a non-streamed request while the backend is still
generating. Each probe carries a unique `user`, and the fake records when it saw each cancel
(time.monotonic(): one clock for every process of the machine). Prints, per path, load and kind, the
delay from the probe's close() to the backend's cancel: p50, p95, max, and how many took over 50 ms.
Run by `make bench`; the method and the latest figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import bench_proxy as bp

GOAL_MS = 50.0
CHUNKS = 200  # chunks of a probe's answer: it is still being generated when the probe hangs up
LOAD_TOKENS = 64  # tokens (chunks) of each load request
CANCEL_WAIT_S = 30.0  # a cancel not seen by then is reported as lost
POLL_S = 0.005


@dataclass(frozen=True)
class Trial:
    path: str
    load: str
    stream: bool
    delay_ms: float | None  # None: the backend never saw the cancel within CANCEL_WAIT_S


def cancels(backend_port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", backend_port, timeout=10)
    try:
        conn.request("GET", "/fake/cancels")
        return {c["user"]: c["monotonic"] for c in json.loads(conn.getresponse().read()) if c["user"]}
    finally:
        conn.close()


def configure_backend(backend_port: int, chunk_delay_ms: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", backend_port, timeout=10)
    try:
        conn.request("POST", "/fake/config", body=json.dumps({"chunk_delay_ms": chunk_delay_ms}),
                     headers={"Content-Type": "application/json"})
        if conn.getresponse().status != 200:
            raise bp.BenchError("the fake backend refused its configuration")
    finally:
        conn.close()


def probe(port: int, path: str, key: str | None, stream: bool, tag: str, hold_s: float) -> float:
    """One request that hangs up; returns time.monotonic() just before its close()."""
    body = json.dumps({"model": bp.MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 1000, "stream": stream, "user": tag}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{auth}"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        if stream:
            seen = b""
            while seen.count(b"data: ") < 3:
                piece = s.recv(65536)
                if not piece:
                    raise bp.BenchError(f"probe stream {tag} ended early: {seen[-300:]!r}")
                seen += piece
        else:
            time.sleep(hold_s)  # the answer takes (CHUNKS - 1) chunk delays; it is not ready yet
        closed_at = time.monotonic()
    return closed_at


def wait_cancel(backend_port: int, tag: str, closed_at: float) -> float | None:
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        seen = cancels(backend_port).get(tag)
        if seen is not None:
            return (seen - closed_at) * 1000
        time.sleep(POLL_S)
    return None


def start_load(url: str, key: str | None, connections: int, workdir: Path, seconds: int) -> subprocess.Popen:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    body = {"model": bp.MODEL, "messages": [{"role": "user", "content": "Say something about foxes."}],
            "max_tokens": LOAD_TOKENS, "stream": True}
    scenario = bp.Scenario("load", url, headers, body, (), connections, 0.0)
    script = workdir / "load.lua"
    bp.write_wrk_script(scenario, script)
    argv = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s", "-s", str(script), url]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_phase(name: str, port: int, key: str | None, backend_port: int, load: int, args: argparse.Namespace,
              workdir: Path) -> list[Trial]:
    label = f"{load} conns" if load else "idle"
    print(f"  {name}, {label} ...", file=sys.stderr, flush=True)
    path = "/v1/chat/completions"
    hold_s = max(0.05, (CHUNKS - 1) * args.chunk_delay_ms / 1000 / 4)
    wrk = None
    if load:
        budget = int(args.probes * (hold_s + 1.0)) + 10  # ends by itself even if this program dies
        wrk = start_load(f"http://127.0.0.1:{port}{path}", key, load, workdir, budget)
        time.sleep(1.0)  # let the load reach its steady state
    trials = []
    try:
        for i in range(args.probes):
            stream = i % 2 == 0
            tag = f"cancel-{name}-{label}-{i}-{time.monotonic_ns()}"
            closed_at = probe(port, path, key, stream, tag, hold_s)
            trials.append(Trial(name, label, stream, wait_cancel(backend_port, tag, closed_at)))
    finally:
        if wrk is not None:
            wrk.terminate()
            wrk.wait(timeout=10)
    return trials


def summary(trials: list[Trial], markdown: bool) -> str:
    header = ["path", "load", "request", "probes", "p50 ms", "p95 ms", "max ms", f"over {GOAL_MS:g} ms", "lost"]
    rows = []
    keys = sorted({(t.path, t.load, t.stream) for t in trials}, key=lambda k: (k[0] != "direct", k[1] != "idle", k[2]))
    for path, load, stream in keys:
        group = [t for t in trials if (t.path, t.load, t.stream) == (path, load, stream)]
        seen = sorted(t.delay_ms for t in group if t.delay_ms is not None)
        lost = len(group) - len(seen)

        def pct(q: float, values: list[float] = seen) -> str:
            return f"{values[min(len(values) - 1, int(q * len(values)))]:.1f}" if values else "-"

        rows.append([path, load, "stream" if stream else "non-stream", str(len(group)),
                     f"{statistics.median(seen):.1f}" if seen else "-", pct(0.95), f"{seen[-1]:.1f}" if seen else "-",
                     str(sum(1 for d in seen if d > GOAL_MS)), str(lost)])
    return bp.table(header, rows, markdown)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probes", type=int, default=40, help="probes per path and load, half streamed (default 40)")
    p.add_argument("--connections", type=int, default=32, help="connections of the load (default 32)")
    p.add_argument("--chunk-delay-ms", type=float, default=2.0, help="backend pause between chunks (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 probes per phase")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.probes = 4
    if not 2 <= args.probes <= 1000 or not 1 <= args.connections <= 256 or not 0 < args.chunk_delay_ms <= 100:
        p.error("--probes must be 2 to 1000, --connections 1 to 256, --chunk-delay-ms above 0 and at most 100")
    return args


def run(args: argparse.Namespace) -> str:
    python = sys.executable
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="llmgate-bench-cancel-") as tmp:
        workdir = Path(tmp)
        backend_port = bp.free_port()
        argv = [python, "-m", "controller.cli", "fake-vllm", "--port", str(backend_port), "--model", bp.MODEL,
                "--stream-chunks", str(CHUNKS)]
        with bp.running(bp.start_server("backend", argv, backend_port, "/health", workdir)):
            configure_backend(backend_port, args.chunk_delay_ms)
            for load in (0, args.connections):
                trials += run_phase("direct", backend_port, None, backend_port, load, args, workdir)
            with bp.running_gateway("map", backend_port, workdir) as gateway:
                for load in (0, args.connections):
                    trials += run_phase("gateway", gateway.port, bp.TEAM_KEY, backend_port, load, args, workdir)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"llmgate bench_cancel, {when}; {bp.machine()}; a client's close() to the backend's cancel; "
            f"{args.probes} probes per row pair, load: wrk streaming {LOAD_TOKENS}-token chats, "
            f"{args.chunk_delay_ms:g} ms between chunks")
    return head + "\n\n" + summary(trials, args.markdown) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(run(args), end="")
    except bp.BenchError as exc:
        print(f"bench_cancel: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
