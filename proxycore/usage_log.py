"""Where usage is written: the usage log, one JSON line (a `UsageRecord`) per request, each written whole
with a single O_APPEND write."""

from __future__ import annotations

import os

from controller.model.usage_record import UsageRecord


class UsageLog:
    """Append-only JSONL file; `reopen()` (on SIGUSR1) follows logrotate's rename."""

    def __init__(self, path: str):
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, record: UsageRecord) -> None:
        line = record.to_line()
        # One write() of a whole line: O_APPEND places it atomically after every other writer's lines.
        written = os.write(self._fd, line)
        while written < len(line):  # only on a full disk or a signal; finish the line rather than tear it
            written += os.write(self._fd, line[written:])

    def reopen(self) -> None:
        old, self._fd = self._fd, self._open()
        os.close(old)

    def close(self) -> None:
        os.close(self._fd)
