"""Noticing that config files changed: one way for every process (`llmgate up`, the sidecar, proxycore,
authsvc).

Editors save by writing a temp file and renaming it over the old one, and a Kubernetes ConfigMap
volume swaps a `..data` symlink rather than touching the file's own name, so the watch is on the
directories and a change counts when a watched name or `..data` moves. Bursts of events collapse
into one call (one debounce for all), a call runs only when a file's bytes really changed, calls
never overlap, and SIGHUP asks for one whatever the bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable

from watchfiles import awatch

DEBOUNCE_MS = 200  # the longest a burst of events is collected before the call
STEP_MS = 50  # quiet time that ends a burst (an editor's write + rename)
IDLE_TICK_MS = 1000  # the watcher wakes this often when nothing happens (the first wake-up: registered)
K8S_SWAP = "..data"  # a ConfigMap volume swaps this symlink, not the file's own name

OnChange = Callable[[str], Awaitable[None]]


def files_digest(paths: Iterable[str]) -> bytes:
    """One digest of the files' bytes (a missing file counts as missing)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        except OSError:
            digest.update(b"-")
    return digest.digest()


class FileWatch:
    """Calls `on_change(reason)` when the bytes of any of `paths` change, or on `trigger()` (SIGHUP).

    The digest of the files is taken when the FileWatch is made: make it right after the files were
    loaded, and a change that lands before the watch began is still seen.
    """

    def __init__(self, paths: Iterable[str], on_change: OnChange):
        self.paths = {os.path.abspath(p) for p in paths}
        self.on_change = on_change
        self._digest = files_digest(self.paths)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Watch until `stop` is set or the task is cancelled."""
        dirs = sorted({os.path.dirname(p) for p in self.paths})

        def wanted(_change: object, path: str) -> bool:
            path = os.path.abspath(path)
            return path in self.paths or (os.path.basename(path).startswith(K8S_SWAP)
                                          and os.path.dirname(path) in dirs)

        try:
            async for changes in awatch(*dirs, watch_filter=wanted, debounce=DEBOUNCE_MS, step=STEP_MS,
                                        recursive=False, stop_event=stop, rust_timeout=IDLE_TICK_MS,
                                        yield_on_timeout=True):
                names = ", ".join(sorted({os.path.basename(p) for _, p in changes})) or "a file"
                await self._call(f"{names} changed", force=False)
        except OSError as exc:
            print(f"llmgate: stopped watching {', '.join(dirs)} ({exc}); send SIGHUP to reload",
                  file=sys.stderr, flush=True)

    def trigger(self, reason: str = "SIGHUP") -> None:
        """One call soon, whether or not the bytes changed (for signal handlers)."""
        task = asyncio.get_running_loop().create_task(self._call(reason, force=True))
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    def on_sighup(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.trigger, "SIGHUP")

    async def _call(self, reason: str, force: bool) -> None:
        async with self._lock:  # one at a time, so an older file never lands after a newer one
            digest = await asyncio.to_thread(files_digest, self.paths)
            if digest == self._digest and not force:
                return
            self._digest = digest
            await self.on_change(reason)
