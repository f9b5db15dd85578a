"""Client CPU per upstream request: aiohttp.ClientSession (as proxycore used it) against UpstreamClient.

Starts a fake vLLM on loopback, then in this one process drives it with each client in turn and
reads this process's CPU time (time.process_time) around every phase; the backend's CPU is its
own process's and is not counted. Phases: unary chat POSTs one after another and 32 at a time,
and streamed answers (64 chunks, 1 ms apart) one at a time and 32 at a time. Each phase runs
--rounds times per client, the clients alternating, after a warm-up; the lowest figure counts
(noise only ever adds CPU). Bodies are encoded once, outside the measured loops.

    .venv/bin/python bench/bench_upstream.py [--requests 2000] [--streams 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import uvloop
from yarl import URL

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxycore.upstream import UpstreamClient  # noqa: E402

MODEL = "llama-3.1-8b-instruct"
CONCURRENCY = 32
READY_TIMEOUT_S = 15.0
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", "X-Request-ID": "0" * 32}
CONNECT_S, TIMEOUT_S = 5.0, 60.0

# A phase: send `count` requests with `concurrency` in flight; returns the body pieces the client saw.
Phase = Callable[[int, int], Awaitable[int]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_backend(port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "controller.cli", "fake-vllm", "--port", str(port), "--model", MODEL]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    assert proc.stdout is not None
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline()
        if "listening on" in line:
            return proc
        if not line:  # it exited
            break
    stop_backend(proc)
    raise SystemExit(f"bench_upstream: fake-vllm did not start on port {port}")


def stop_backend(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def configure(port: int, **config) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/fake/config", data=json.dumps(config).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def chat_body(stream: bool, chunks: int) -> bytes:
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": "Say something about foxes."}],
                  "max_tokens": chunks}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


async def fan_out(count: int, concurrency: int, one: Callable[[], Awaitable[int]]) -> int:
    """Run `one` count times, `concurrency` at a time; the sum of what each returned."""
    remaining = count
    total = 0

    async def worker() -> None:
        nonlocal remaining, total
        while remaining > 0:
            remaining -= 1
            total += await one()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return total


def aiohttp_phases(session: aiohttp.ClientSession, url: URL, unary: bytes, stream: bytes) -> tuple[Phase, Phase]:
    """What proxycore's _call_upstream / _relay_stream do with aiohttp, minus the relaying."""
    unary_timeout = aiohttp.ClientTimeout(total=TIMEOUT_S, sock_connect=CONNECT_S)
    stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S, sock_read=TIMEOUT_S)

    async def one_unary() -> int:
        resp = await session.post(url, data=unary, headers=dict(HEADERS), timeout=unary_timeout)
        try:
            body = await resp.read()
        finally:
            resp.release()
        assert resp.status == 200 and body.startswith(b"{"), body[:200]
        return 1

    async def one_stream() -> int:
        resp = await session.post(url, data=stream, headers=dict(HEADERS), timeout=stream_timeout)
        pieces, last = 0, b""
        try:
            async for chunk in resp.content.iter_any():
                pieces += 1
                last = chunk
        finally:
            resp.close()
        assert resp.status == 200 and last.endswith(b"data: [DONE]\n\n"), last[-200:]
        return pieces

    return (lambda n, c: fan_out(n, c, one_unary)), (lambda n, c: fan_out(n, c, one_stream))


def upstream_phases(client: UpstreamClient, url: URL, unary: bytes, stream: bytes) -> tuple[Phase, Phase]:
    async def one_unary() -> int:
        resp = await client.request("POST", url, headers=dict(HEADERS), body=unary, connect_timeout=CONNECT_S,
                                    first_byte_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S)
        body = await resp.read()
        assert resp.status == 200 and body.startswith(b"{"), body[:200]
        return 1

    async def one_stream() -> int:
        resp = await client.request("POST", url, headers=dict(HEADERS), body=stream, connect_timeout=CONNECT_S,
                                    first_byte_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S)
        pieces, last = 0, b""
        try:
            async for chunk in resp:
                pieces += 1
                last = chunk
        finally:
            resp.close()
        assert resp.status == 200 and last.endswith(b"data: [DONE]\n\n"), last[-200:]
        return pieces

    return (lambda n, c: fan_out(n, c, one_unary)), (lambda n, c: fan_out(n, c, one_stream))


async def cpu_of(phase: Phase, count: int, concurrency: int) -> tuple[float, int]:
    """(CPU seconds of this process, body pieces seen) for one run of the phase."""
    before = time.process_time()
    pieces = await phase(count, concurrency)
    return time.process_time() - before, pieces


async def measure(port: int, args: argparse.Namespace) -> list[list[str]]:
    url = URL(f"http://127.0.0.1:{port}/v1/chat/completions")
    unary, stream = chat_body(False, 16), chat_body(True, args.stream_chunks)
    # proxycore's connector, but with keepalive_timeout 4 s instead of 30: the backend closes idle connections
    # after 5 s (as vLLM's uvicorn does) and aiohttp then fails the next request on one with a reset.
    connector = aiohttp.TCPConnector(limit=0, ssl=True, ttl_dns_cache=300, keepalive_timeout=4)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))
    client = UpstreamClient()
    clients = {"aiohttp": aiohttp_phases(session, url, unary, stream),
               "upstream": upstream_phases(client, url, unary, stream)}
    rows = []
    try:
        for label, kind, count, concurrency in (
            ("unary, sequential", 0, args.requests, 1),
            (f"unary, {CONCURRENCY} at a time", 0, args.requests, CONCURRENCY),
            ("stream, one at a time", 1, args.streams, 1),
            (f"stream, {CONCURRENCY} at a time", 1, args.streams * 4, CONCURRENCY),
        ):
            configure(port, chunk_delay_ms=args.chunk_delay_ms if kind else 0.0, stream_chunks=args.stream_chunks)
            best: dict[str, float] = {}
            pieces: dict[str, float] = {}
            for _name, phases in clients.items():  # warm-up: connections open, code paths hot
                await phases[kind](max(CONCURRENCY, count // 10), concurrency)
            for _ in range(args.rounds):
                for name, phases in clients.items():
                    cpu, seen = await cpu_of(phases[kind], count, concurrency)
                    best[name] = min(best.get(name, cpu), cpu)
                    pieces[name] = seen / count
            per = {name: best[name] / count * 1e6 for name in clients}
            unit = "req"
            if kind:  # per content chunk of the answer, the figure bench_proxy reports for streams
                per = {name: v / args.stream_chunks for name, v in per.items()}
                unit = "chunk"
            rows.append([label, f"{per['aiohttp']:.1f} µs/{unit}", f"{per['upstream']:.1f} µs/{unit}",
                         f"{per['aiohttp'] / per['upstream']:.2f}x",
                         f"{pieces['aiohttp']:.1f} / {pieces['upstream']:.1f}" if kind else ""])
    finally:
        await session.close()
        await client.close()
    return rows


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="unary requests per phase (default 2000)")
    p.add_argument("--streams", type=int, default=50,
                   help="streams in the one-at-a-time phase; 4x that in the 32-at-a-time one (default 50)")
    p.add_argument("--stream-chunks", type=int, default=64, help="content chunks per streamed answer (default 64)")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0, help="backend pause between chunks (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="measured runs per phase and client (default 3)")
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 100_000 and 1 <= args.streams <= 10_000 and 1 <= args.rounds <= 10
            and 1 <= args.stream_chunks <= 1000 and 0 <= args.chunk_delay_ms <= 100):
        p.error("out of range: --requests 1..100000, --streams 1..10000, --rounds 1..10, --stream-chunks 1..1000, "
                "--chunk-delay-ms 0..100")
    port = free_port()
    backend = start_backend(port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the backend below
    try:
        rows = uvloop.run(measure(port, args))
    finally:
        stop_backend(backend)
    print(f"bench_upstream: client CPU (this process, time.process_time) per request, lowest of {args.rounds} "
          f"rounds; {args.stream_chunks} chunks per stream, {args.chunk_delay_ms:g} ms apart; "
          f"Python {sys.version.split()[0]}, uvloop, loopback")
    print(table(["phase", "aiohttp", "UpstreamClient", "aiohttp / Upstream", "pieces per stream (aio / up)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
