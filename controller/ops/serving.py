"""How every llmgate process serves and ends: an aiohttp app on a TCP address or a unix socket, until
SIGTERM or SIGINT.

proxycore, authsvc, fake-vllm, `llmgate up` and the sidecar all end through `wait_for_stop`, so each
stops the same way on Ctrl-C, on `docker stop` and under the supervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from controller.model.teams import Address, Listen, UnixSocket


async def wait_for_stop(*, on_hup: Callable[[], Any] | None = None, on_usr1: Callable[[], Any] | None = None) -> None:
    """Return at SIGTERM or SIGINT; meanwhile SIGHUP and SIGUSR1 call their handlers (when given)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    if on_usr1 is not None:
        loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


async def answers_ok(listen: Listen, path: str) -> bool:
    """GET `path` on `listen` (a TCP address or a unix socket) answers 200: the process's event loop serves."""
    if isinstance(listen, UnixSocket):
        reader, writer = await asyncio.open_unix_connection(listen.path)
    else:
        assert isinstance(listen, Address)
        reader, writer = await asyncio.open_connection(listen.host, listen.port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: llmgate\r\n\r\n".encode())
        status = await reader.readline()
        return status.split(b" ", 2)[1:2] == [b"200"]
    finally:
        writer.close()


# aiohttp servers behind nginx: never refuse, at the HTTP level, a request nginx passed (nginx's own limits are
# 8 KB a header line, 32 KB of headers), and never decode a body's Content-Encoding in the parser, whose errors
# are plain-text 400s that end the connection: the app decides about encodings (proxycore/body.py).
BEHIND_NGINX: dict[str, Any] = {"auto_decompress": False, "max_line_size": 16384, "max_field_size": 16384,
                                "max_headers": 1024}


class ListenError(Exception):
    """The address cannot be listened on; the message is one line that says which and why."""


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at `path` (a stale one from a crashed run is replaced), readable by nginx's workers."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # nginx's workers may run as another user (nobody, under root)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


async def start_site(runner: web.AppRunner, listen: Listen, *, reuse_port: bool = False,
                     sock: socket.socket | None = None, setting: str | None = None) -> str:
    """Serve `runner` on `listen` (or on an already bound `sock`); returns the address as shown to people.

    ListenError, naming `setting` (the option or teams.yaml key to change), when the address is taken.
    """
    if sock is not None or isinstance(listen, UnixSocket):
        if sock is None:
            assert isinstance(listen, UnixSocket)
            sock = bind_unix(listen.path)
        await web.SockSite(runner, sock).start()
        return str(listen)
    assert isinstance(listen, Address)
    site = web.TCPSite(runner, listen.host, listen.port, reuse_port=reuse_port, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        hint = f"; choose another in {setting}" if setting else ""
        raise ListenError(f"cannot listen on {listen}: {exc.strerror}{hint}") from None
    port = runner.addresses[-1][1] if listen.port == 0 else listen.port  # the real port when 0 was asked for
    return str(Address(listen.host, port))
