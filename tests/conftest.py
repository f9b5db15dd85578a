"""The fixtures every test file can ask for; the helpers they share are in support.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from support import Service


@pytest.fixture
def spawn() -> Callable[..., Service]:
    """Start services for one test; every one is stopped by PID at the end."""
    started: list[Service] = []

    def start(args: list[str], ready: str, **kw) -> Service:
        svc = Service(args, ready, **kw)
        started.append(svc)
        return svc

    yield start
    for svc in reversed(started):
        svc.stop()
