"""A small pooled HTTP/1.1 client for proxycore's calls to vLLM deployments.

aiohttp's ClientSession spends most of proxycore's CPU per request on machinery proxycore does
not use (bench/bench_upstream.py compares the two). Here a request is one `transport.write`, the
response is parsed by llhttp (httptools) inside an asyncio Protocol, and a streamed body wakes its
reader through one future per batch of bytes. Timeouts are loop timers, not `wait_for`.

    resp = await client.request("POST", url, headers=h, body=b, connect_timeout=5,
                                first_byte_timeout=60, read_timeout=60)
    body = await resp.read()          # or: async for piece in resp: ...
    resp.close()                      # only needed when the body was not read to its end

A response whose body was read to its end gives its connection back to the pool by itself;
`release()` and `close()` are then no-ops. Otherwise the caller must call one of them.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools
from yarl import URL

_HIGH_WATER = 256 * 1024  # buffered body bytes nobody has read yet before we stop reading the socket
_MAX_TARGETS = 1024  # cached request-line prefixes; URLs come from config, so this is never reached in practice
_NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamError(Exception):
    """Any failure of an upstream request."""


class UpstreamConnectError(UpstreamError):
    """Could not connect, or the connection was refused or closed before any response byte."""


class UpstreamTimeout(UpstreamError):
    """Connect timeout, no complete response head in time, or the body went silent too long."""


class UpstreamProtocolError(UpstreamError):
    """A malformed response, or one whose body was cut short."""


class _ClosedBeforeResponse(UpstreamConnectError):
    """The server closed the connection before sending a byte; on a pooled connection, retried once."""


class _Pool:
    """Idle keep-alive connections to one origin, most recently used last."""

    __slots__ = ("host", "port", "ssl", "server_hostname", "idle", "sweeper")

    def __init__(self, host: str, port: int, ssl: ssl_module.SSLContext | None) -> None:
        self.host, self.port, self.ssl = host, port, ssl
        self.server_hostname = host if ssl is not None else None
        self.idle: list[_Connection] = []
        self.sweeper: asyncio.TimerHandle | None = None


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the state of the exchange running on it."""

    __slots__ = ("loop", "pool", "transport", "parser", "closed", "idle_since", "timer", "timer_at", "waiter",
                 "status", "headers", "head_done", "until_close", "keep_alive", "complete", "error", "got_bytes",
                 "body", "buffered", "paused", "first_byte_timeout", "head_due", "read_timeout", "last_read", "sink")

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: _Pool) -> None:
        self.loop, self.pool = loop, pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made, before any use
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.body: list[bytes] = []
        self.paused = False
        self.sink: Callable[[bytes], bool] | None = None  # push mode: body pieces go straight here
        self._reset()

    def _reset(self) -> None:
        self.body.clear()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = self.until_close = self.keep_alive = self.complete = self.got_bytes = False
        self.error: UpstreamError | None = None
        self.buffered = 0
        self.first_byte_timeout: float | None = None
        self.head_due = 0.0
        self.read_timeout: float | None = None
        self.last_read = 0.0

    # ------------------------------------------------------------ driving an exchange

    def send(self, payload: bytes, first_byte_timeout: float | None, read_timeout: float | None) -> None:
        self.first_byte_timeout, self.read_timeout = first_byte_timeout, read_timeout
        if first_byte_timeout is not None:
            self.head_due = self.loop.time() + first_byte_timeout
            self._arm(self.head_due)
        self.transport.write(payload)

    def wait(self) -> asyncio.Future[None]:
        """Done once the protocol has something new: head, body bytes, the end, or an error."""
        waiter = self.waiter = self.loop.create_future()
        return waiter

    def take(self) -> bytes:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.last_read = self.loop.time()  # the silence while paused was ours, not the server's
            self.transport.resume_reading()
        return data

    def shut(self) -> None:
        """Close an idle connection politely (FIN, not RST)."""
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            self.transport.close()

    def abort(self) -> None:
        self._cancel_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # the backend sees the disconnect at once and stops generating

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # One timer per connection, armed lazily: deadlines move with every request and every read, but
    # the timer only moves when it fires early or a deadline comes before it. That saves creating and
    # cancelling timers on each request.

    def _arm(self, at: float) -> None:
        if self.timer is None or at < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.timer_at = self.loop.call_at(at, self._on_timer), at

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.idle_since or self.complete or self.error is not None:
            return
        now = self.loop.time()
        if not self.head_done:
            if self.first_byte_timeout is None:
                return
            due, error = self.head_due, f"no response head within {self.first_byte_timeout:g} s"
        else:
            if self.read_timeout is None:
                return
            # While reading is paused the silence is ours, not the server's.
            due = (now if self.paused else self.last_read) + self.read_timeout
            error = f"no response bytes for {self.read_timeout:g} s"
        if due - now > 0.001:  # loop timers may fire a little early
            self._arm(due)
        else:
            self._fail(UpstreamTimeout(error))

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle_since:  # idle in the pool: nothing may arrive
            self.abort()
            return
        self.got_bytes = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamProtocolError(f"malformed response from {self.pool.host}:{self.pool.port}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.idle_since or self.complete or self.error is not None:
            return
        where = f"{self.pool.host}:{self.pool.port}"
        if not self.got_bytes:
            self.error = _ClosedBeforeResponse(f"{where} closed the connection before answering"
                                               + (f" ({exc})" if exc else ""))
        elif self.head_done and self.until_close and exc is None:
            self.complete = True  # a body delimited by the end of the connection
        else:
            self.error = UpstreamProtocolError(f"{where} closed the connection before the end of the response")
        self._wake()

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the end of the answer: this connection cannot be trusted again
            raise UpstreamProtocolError("data after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and friends: the real head follows
            self.headers = {}
            return
        self.status = status
        headers = self.headers
        self.until_close = ("content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")
                            and status not in _NO_BODY_STATUSES)
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        if self.read_timeout is not None:
            self._arm(self.last_read + self.read_timeout)
        self._wake()

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:  # push mode: no buffering, no task switch per piece
            if sink(body) and not self.paused:  # the receiver is full: stop reading until it drains
                self.paused = True
                self.transport.pause_reading()
                self._wake()
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of a 1xx response
            return
        self.complete = True
        self._wake()


class UpstreamResponse:
    """Status and headers of an upstream answer; the body is read with `read()` or `async for`."""

    __slots__ = ("status", "headers", "_conn", "_client", "_ended")

    def __init__(self, conn: _Connection, client: UpstreamClient) -> None:
        self.status: int = conn.status
        self.headers: dict[str, str] = conn.headers  # lower-case names
        self._conn: _Connection | None = conn
        self._client = client
        self._ended = False

    async def read(self) -> bytes:
        """The whole body; the connection then goes back to the pool."""
        conn = self._conn
        if conn is None:
            raise UpstreamError("the response body was already consumed or closed")
        parts: list[bytes] = []
        try:
            while not conn.complete:
                if conn.error is not None:
                    raise conn.error
                if conn.body:
                    parts.append(conn.take())
                await conn.wait()
        except BaseException:
            self.close()
            raise
        if conn.body:
            parts.append(conn.take())
        self._ended = True
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def pipe(self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]) -> None:
        """Push the rest of the body into `sink` as it arrives, from the protocol itself (no task switch per
        piece). `sink` returns True when its receiver is full; then reading pauses until `drain()` returns.
        Ends at the end of the body; raises like iteration does (UpstreamProtocolError when cut short)."""
        conn = self._conn
        if conn is None:
            raise UpstreamError("the response was closed")
        if conn.body:
            sink(conn.take())
        conn.sink = sink
        try:
            while not conn.complete:
                if conn.error is not None:
                    self.close()
                    raise conn.error
                if conn.paused:
                    await drain()
                    conn.paused = False
                    conn.last_read = conn.loop.time()
                    conn.transport.resume_reading()
                    continue
                await conn.wait()
        except BaseException:
            conn.sink = None
            self.close()
            raise
        conn.sink = None
        self._ended = True
        self.release()

    async def __anext__(self) -> bytes:
        """Everything that arrived since the last call, de-chunked."""
        conn = self._conn
        if conn is None:
            if self._ended:
                raise StopAsyncIteration
            raise UpstreamError("the response was closed")
        while not conn.body:
            if conn.complete:
                self._ended = True
                self.release()
                raise StopAsyncIteration
            if conn.error is not None:
                self.close()
                raise conn.error
            try:
                await conn.wait()
            except BaseException:
                self.close()
                raise
        return conn.take()

    def release(self) -> None:
        """Back to the pool if the body was read to its end and keep-alive allows; else close."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn.complete and conn.keep_alive and not conn.closed:
            self._client._put_idle(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Drop the connection now; the backend sees the disconnect (vLLM then aborts the request)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort()


class UpstreamClient:
    """Pooled HTTP/1.1 connections to a few origins; one per proxycore process."""

    def __init__(self, *, ssl: ssl_module.SSLContext | bool = True, max_idle_per_origin: int = 64,
                 idle_timeout: float = 4.0) -> None:
        if ssl is True:
            ssl = ssl_module.create_default_context()
        elif ssl is False:
            ssl = ssl_module.create_default_context()
            ssl.check_hostname = False
            ssl.verify_mode = ssl_module.CERT_NONE
        self._ssl: ssl_module.SSLContext = ssl
        self._max_idle = max_idle_per_origin
        self._idle_timeout = idle_timeout
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._targets: dict[URL, tuple[_Pool, str]] = {}  # URL -> (pool, " <path> HTTP/1.1\r\nHost: ...\r\n")
        self._closed = False

    async def request(self, method: str, url: URL, *, headers: dict[str, str], body: bytes = b"",
                      connect_timeout: float, first_byte_timeout: float | None,
                      read_timeout: float | None) -> UpstreamResponse:
        """Send one request; return once the response head arrived.

        `headers` must not hold Host, Content-Length, Transfer-Encoding or Connection; they are
        written here. HEAD is not supported (its answer would be read as having a body).
        """
        if self._closed:
            raise UpstreamError("the client is closed")
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        pool, line = target
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
            raise ValueError("header names and values must not contain CR or LF")  # e.g. a key read with its newline
        head = f"{method}{line}{fields}Content-Length: {len(body)}\r\n\r\n".encode()
        payload = head + body if body else head
        loop = asyncio.get_running_loop()
        conn = self._take_idle(pool, loop.time())
        if conn is not None:
            try:
                return await self._exchange(conn, payload, first_byte_timeout, read_timeout)
            except _ClosedBeforeResponse:
                pass  # the server closed this idle connection as we sent on it: once more on a fresh one
        conn = await self._connect(loop, pool, connect_timeout)
        return await self._exchange(conn, payload, first_byte_timeout, read_timeout)

    async def close(self) -> None:
        """Close idle connections; responses still held close theirs on release."""
        self._closed = True
        for pool in self._pools.values():
            if pool.sweeper is not None:
                pool.sweeper.cancel()
                pool.sweeper = None
            for conn in pool.idle:
                conn.shut()
            pool.idle.clear()
        self._pools.clear()
        self._targets.clear()
        await asyncio.sleep(0)  # let the transports finish closing

    # ------------------------------------------------------------ internals

    def _target(self, url: URL) -> tuple[_Pool, str]:
        scheme = url.scheme
        if scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"not an absolute http(s) URL: {url}")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.raw_host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(url.raw_host, port, self._ssl if scheme == "https" else None)
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        target = self._targets[url] = (pool, f" {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n")
        return target

    async def _connect(self, loop: asyncio.AbstractEventLoop, pool: _Pool, timeout: float) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop, pool), pool.host, pool.port,
                                                       ssl=pool.ssl, server_hostname=pool.server_hostname)
        except TimeoutError:
            raise UpstreamTimeout(f"could not connect to {pool.host}:{pool.port} within {timeout:g} s") from None
        except OSError as exc:
            raise UpstreamConnectError(f"could not connect to {pool.host}:{pool.port}: {exc}") from exc
        return conn

    async def _exchange(self, conn: _Connection, payload: bytes, first_byte_timeout: float | None,
                        read_timeout: float | None) -> UpstreamResponse:
        conn.send(payload, first_byte_timeout, read_timeout)
        try:
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            conn.abort()
            raise
        return UpstreamResponse(conn, self)

    def _take_idle(self, pool: _Pool, now: float) -> _Connection | None:
        idle = pool.idle
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since >= self._idle_timeout:
                conn.shut()
                continue
            conn.idle_since = 0.0
            return conn
        return None

    def _put_idle(self, conn: _Connection) -> None:
        pool = conn.pool
        if self._closed or len(pool.idle) >= self._max_idle:
            conn.abort()
            return
        conn._reset()
        conn.idle_since = conn.loop.time()
        pool.idle.append(conn)
        if pool.sweeper is None:
            pool.sweeper = conn.loop.call_at(conn.idle_since + self._idle_timeout, self._sweep, pool)

    def _sweep(self, pool: _Pool) -> None:
        """Close connections idle for idle_timeout (the oldest sit first), before the server does."""
        pool.sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        keep = []
        for conn in pool.idle:
            if conn.closed:
                continue
            if now - conn.idle_since >= self._idle_timeout - 0.001:  # loop timers may fire a little early
                conn.shut()
            else:
                keep.append(conn)
        pool.idle[:] = keep
        if keep:
            pool.sweeper = loop.call_at(keep[0].idle_since + self._idle_timeout, self._sweep, pool)
