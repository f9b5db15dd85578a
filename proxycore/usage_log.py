"""Where usage is written: the usage log, one JSON line (a `UsageRecord`) per request, each written whole
with a single O_APPEND write.

Writing never fails a request. A line that cannot be written (a full disk, an I/O error) is kept in a
bounded spool in memory, in order, and written with the next line or by `retry()` (every second, from the
app) once the file takes it again; a line only half written is cut back off the file, so that no torn
line is left. A line that does not fit in the spool is dropped and counted
(`llmgate_usage_lines_dropped_total`, and a line on stderr); `failing` says why while lines wait.
"""

from __future__ import annotations

import os
import sys
from collections import deque

from controller.model.usage_record import UsageRecord
from proxycore import metrics

SPOOL_MAX_LINES = 100_000  # about 50 MB of lines: hours of traffic on a full disk before any is dropped


class UsageLog:
    """Append-only JSONL file; `reopen()` (on SIGUSR1) follows logrotate's rename."""

    def __init__(self, path: str, spool_max_lines: int = SPOOL_MAX_LINES):
        self.path = path
        self.spool: deque[bytes] = deque()
        self.spool_max_lines = spool_max_lines
        self.failing: str | None = None  # why lines are waiting, while they are
        self.dropped = 0
        self._fd = self._open()

    def _open(self) -> int:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, record: UsageRecord) -> None:
        """Append the record's line (after any that wait); never raises."""
        line = record.to_line()
        if not self.spool:
            try:
                self._append(line)
                return
            except OSError as exc:
                self._failed(exc)
        if len(self.spool) >= self.spool_max_lines:
            self._drop(1)
            return
        self.spool.append(line)
        self.retry()

    def retry(self) -> bool:
        """Write the lines that wait, in order; True when none is left."""
        spool = self.spool
        while spool:
            try:
                self._append(spool[0])
            except OSError as exc:
                self._failed(exc)
                return False
            spool.popleft()
        if self.failing is not None:
            print(f"llmgate: the usage log {self.path} takes lines again; every waiting line is written",
                  file=sys.stderr, flush=True)
            self.failing = None
            metrics.USAGE_LOG_FAILING.set(0)
        return True

    def _append(self, line: bytes) -> None:
        """One write() of a whole line: O_APPEND places it atomically after every other writer's lines. A write
        cut short (a full disk) is finished, or cut back off the file and reported as the error it ran into."""
        fd = self._fd
        written = os.write(fd, line)
        while written < len(line):
            try:
                more = os.write(fd, line[written:])
            except OSError:
                self._cut_back(written)
                raise
            if more == 0:
                self._cut_back(written)
                raise OSError(28, "No space left on device")
            written += more

    def _cut_back(self, written: int) -> None:
        """Remove the `written` bytes of a torn line from the file's end, unless another writer appended since."""
        end = os.lseek(self._fd, 0, os.SEEK_CUR)
        if os.fstat(self._fd).st_size == end:
            os.ftruncate(self._fd, end - written)
        else:  # another worker's line followed ours: a newline ends the torn line rather than merge two
            try:
                os.write(self._fd, b"\n")
            except OSError:
                pass

    def _failed(self, exc: OSError) -> None:
        if self.failing is None:
            print(f"llmgate: cannot write the usage log {self.path}: {exc.strerror or exc}; lines wait in memory "
                  f"(up to {self.spool_max_lines:,}) and are written when it takes them again",
                  file=sys.stderr, flush=True)
            metrics.USAGE_LOG_FAILING.set(1)
        self.failing = exc.strerror or str(exc)

    def _drop(self, count: int) -> None:
        if not self.dropped:
            print(f"llmgate: the usage log's spool is full ({self.spool_max_lines:,} lines): usage lines are dropped "
                  "and counted in llmgate_usage_lines_dropped_total", file=sys.stderr, flush=True)
        self.dropped += count
        metrics.USAGE_LINES_DROPPED.inc(count)

    def status(self) -> str | None:
        """None when the log takes lines; else why it does not, and how many wait."""
        if self.failing is None:
            return None
        return f"failing: {self.failing} ({len(self.spool):,} lines waiting, {self.dropped:,} dropped)"

    def reopen(self) -> None:
        old, self._fd = self._fd, self._open()
        os.close(old)
        self.retry()

    def close(self) -> None:
        self.retry()
        if self.spool:
            print(f"llmgate: {len(self.spool):,} usage lines could not be written to {self.path} before exit; "
                  "they are lost", file=sys.stderr, flush=True)
            self._drop(len(self.spool))
            self.spool.clear()
        os.close(self._fd)

