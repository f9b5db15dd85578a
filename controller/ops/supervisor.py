"""A small process supervisor: start children, restart crashed ones with backoff, stop all cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a child that ran this long starts over at the shortest backoff
STOP_GRACE_S = 10.0
LIVENESS_INTERVAL_S = 1.0  # how often a running child with a liveness check is asked
LIVENESS_TIMEOUT_S = 3.0  # how long each answer may take
LIVENESS_MISSES = 3  # unanswered checks in a row after which the child is hung: killed, then restarted


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready: str | None = None  # a regex its output prints once it serves
    restart: bool = True
    alive: Callable[[], Awaitable[bool]] | None = None  # True while it serves (a health request); None: not checked


class Child:
    def __init__(self, spec: ChildSpec):
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.failures = 0

    async def start(self) -> None:
        self.ready.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **self.spec.env}, start_new_session=True)
        asyncio.ensure_future(self._pump(self.proc))
        if self.spec.ready is None:
            self.ready.set()

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        pattern = re.compile(self.spec.ready) if self.spec.ready else None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sys.stdout.write(f"[{self.spec.name}] {line}\n")
            sys.stdout.flush()
            if pattern is not None and pattern.search(line):
                self.ready.set()

    def kill_group(self) -> None:
        """SIGKILL to the child's process group (it leads one: start_new_session), once the child is gone."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class Supervisor:
    """Runs children until `stop()`; each crashed child comes back after an exponential backoff."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._stopping = asyncio.Event()
        self._watchers: list[asyncio.Task] = []

    async def add(self, spec: ChildSpec, ready_timeout: float = 30.0) -> Child:
        child = Child(spec)
        self.children.append(child)
        await child.start()
        try:
            await asyncio.wait_for(self._ready_or_exit(child), ready_timeout)
        except TimeoutError:
            raise RuntimeError(f"{spec.name} did not report ready within {ready_timeout:.0f}s") from None
        if child.proc is not None and child.proc.returncode is not None:
            raise RuntimeError(f"{spec.name} exited at start with status {child.proc.returncode}")
        self._watchers.append(asyncio.ensure_future(self._watch(child)))
        if spec.alive is not None:
            self._watchers.append(asyncio.ensure_future(self._check_liveness(child, spec.alive)))
        return child

    async def _check_liveness(self, child: Child, alive: Callable[[], Awaitable[bool]]) -> None:
        """Kill a child that stops answering (a frozen event loop, SIGSTOP); `_watch` then restarts it."""
        misses = 0
        while not self._stopping.is_set() and child.spec.restart:
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            proc = child.proc
            if proc is None or proc.returncode is not None or not child.ready.is_set():
                misses = 0
                continue
            try:
                ok = await asyncio.wait_for(alive(), LIVENESS_TIMEOUT_S)
            except (TimeoutError, OSError):
                ok = False
            misses = 0 if ok else misses + 1
            if misses >= LIVENESS_MISSES and proc is child.proc and proc.returncode is None:
                print(f"llmgate: {child.spec.name} did not answer its liveness check {misses} times in a row "
                      f"({LIVENESS_TIMEOUT_S:g}s each); killing it", flush=True)
                child.kill_group()
                misses = 0

    async def _ready_or_exit(self, child: Child) -> None:
        assert child.proc is not None
        ready = asyncio.ensure_future(child.ready.wait())
        exited = asyncio.ensure_future(child.proc.wait())
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        for t in (ready, exited):
            t.cancel()

    async def _watch(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        while True:
            assert child.proc is not None
            started = loop.time()
            code = await child.proc.wait()
            child.kill_group()  # what it left behind (a crashed nginx master leaves its workers serving)
            if self._stopping.is_set() or not child.spec.restart:
                return
            if loop.time() - started > STABLE_AFTER_S:
                child.failures = 0
            child.failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (child.failures - 1))
            print(f"llmgate: {child.spec.name} exited with status {code}; restarting in {delay:.1f}s", flush=True)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            await child.start()

    async def remove(self, child: Child) -> None:
        """Stop one child for good (it is not restarted)."""
        child.spec.restart = False
        child.send(signal.SIGTERM)
        if child.proc is not None:
            try:
                await asyncio.wait_for(child.proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                child.send(signal.SIGKILL)
                await child.proc.wait()
        if child in self.children:
            self.children.remove(child)

    def signal_all(self, sig: int, which=None) -> None:
        """Send `sig` to every child, or to those whose name `which` accepts."""
        for child in self.children:
            if which is None or which(child.spec.name):
                child.send(sig)

    async def stop(self) -> None:
        self._stopping.set()
        for child in reversed(self.children):
            child.send(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_S
        for child in self.children:
            if child.proc is None:
                continue
            try:
                await asyncio.wait_for(child.proc.wait(), max(0.1, deadline - loop.time()))
            except TimeoutError:
                child.send(signal.SIGKILL)
                await child.proc.wait()
            child.kill_group()
        for w in self._watchers:
            w.cancel()
