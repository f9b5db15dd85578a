"""proxycore's upstream HTTP client against the real fake vLLM and tiny raw servers for the edge cases."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from yarl import URL

from fakevllm.server import make_fake_vllm_app, serve_fake_vllm
from proxycore.upstream import UpstreamClient, UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout

JSON = {"Content-Type": "application/json"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TIMEOUTS = {"connect_timeout": 2.0, "first_byte_timeout": 5.0, "read_timeout": 5.0}
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"


# ---------------------------------------------------------------- servers

@pytest.fixture
async def fake():
    """The fake vLLM in this process; yields its base URL."""
    runner, port = await serve_fake_vllm(make_fake_vllm_app(models=["m"]), port=0)
    yield URL(f"http://127.0.0.1:{port}")
    await runner.cleanup()


@pytest.fixture
async def client():
    c = UpstreamClient()
    yield c
    await c.close()


async def configure(client: UpstreamClient, base: URL, **config) -> None:
    resp = await client.request("POST", base / "fake/config", headers=JSON, body=orjson.dumps(config), **TIMEOUTS)
    assert resp.status == 200, await resp.read()
    await resp.read()


async def stats(client: UpstreamClient, base: URL) -> dict:
    resp = await client.request("GET", base / "fake/stats", headers={}, **TIMEOUTS)
    return orjson.loads(await resp.read())


async def chat(client: UpstreamClient, base: URL, **extra):
    # a fixed X-Request-Id makes the fake's response ids equal between two answers
    return await client.request("POST", base / "v1/chat/completions", headers={**JSON, "X-Request-Id": "r1"},
                                body=orjson.dumps({**CHAT, **extra}), **TIMEOUTS)


class RawServer:
    """A loopback TCP (or TLS) server running `handle(reader, writer)` per connection; counts connections."""

    def __init__(self, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
        self.handle = handle
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()  # a handler saw the client close its connection

    async def start(self, tls: ssl.SSLContext | None = None) -> URL:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"{'https' if tls else 'http'}://127.0.0.1:{port}/p")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handle(reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One whole request (head and Content-Length body), or None at the end of the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        request = head + await reader.readexactly(int(length.group(1)))
        self.requests.append(request)
        return request

    async def wait_for_close(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.closed_by_peer.set()

    async def stop(self) -> None:
        self.server.close()


@pytest.fixture
async def raw():
    servers: list[RawServer] = []

    async def start(handle, tls: ssl.SSLContext | None = None) -> tuple[RawServer, URL]:
        server = RawServer(handle)
        servers.append(server)
        return server, await server.start(tls)

    yield start
    for server in servers:
        await server.stop()


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return OK_HEAD + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a server that drops a connection does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ---------------------------------------------------------------- against the fake vLLM

async def test_unary_chat_returns_status_lower_case_headers_and_the_json_body(fake, client):
    resp = await chat(client, fake)
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    body = orjson.loads(await resp.read())
    assert body["usage"]["completion_tokens"] == 4
    assert int(resp.headers["content-length"]) == len(orjson.dumps(body))


async def test_error_status_and_its_body_come_back_unchanged(fake, client):
    await configure(client, fake, mode="error-500")
    resp = await chat(client, fake)
    assert resp.status == 500
    assert orjson.loads(await resp.read())["error"]["type"] == "InternalServerError"


async def test_streamed_pieces_concatenate_to_exactly_the_bytes_of_a_direct_read(fake, client):
    await configure(client, fake, chunk_delay_ms=5, stream_chunks=8)
    body = {"stream": True, "max_tokens": 16}
    resp = await chat(client, fake, **body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    pieces = [piece async for piece in resp]
    direct = await (await chat(client, fake, **body)).read()
    created = re.compile(rb'"created":\d+')  # the only field that may differ between two answers
    assert len(pieces) > 1  # delivered as they came, not at the end
    assert created.sub(b"", b"".join(pieces)) == created.sub(b"", direct)
    assert direct.endswith(b"data: [DONE]\n\n")
    assert (await stats(client, fake))["completed"] == 2


async def test_backend_dying_mid_stream_raises_a_protocol_error_after_the_bytes_it_sent(fake, client):
    await configure(client, fake, mode="die-mid-stream", chunk_delay_ms=5)
    resp = await chat(client, fake, stream=True)
    received = b""
    with pytest.raises(UpstreamProtocolError, match="before the end"):
        async for piece in resp:
            received += piece
    assert received.startswith(b"data: ") and b"[DONE]" not in received


async def test_close_mid_stream_makes_the_backend_count_a_cancellation(fake, client):
    await configure(client, fake, chunk_delay_ms=50, stream_chunks=20)
    resp = await chat(client, fake, stream=True, max_tokens=20)
    assert (await resp.__anext__()).startswith(b"data: ")
    resp.close()
    deadline = time.monotonic() + 1.0
    while (await stats(client, fake))["cancelled"] != 1:
        assert time.monotonic() < deadline, "the backend did not notice the closed connection within 1 s"
        await asyncio.sleep(0.02)


async def test_a_hanging_backend_times_out_within_first_byte_timeout(fake, client):
    await configure(client, fake, mode="hang")
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="no response head within 0.3 s"):
        await client.request("POST", fake / "v1/chat/completions", headers=JSON, body=orjson.dumps(CHAT),
                             connect_timeout=2, first_byte_timeout=0.3, read_timeout=None)
    assert 0.3 <= time.monotonic() - started < 1.0


async def test_cancelling_the_waiting_task_closes_the_connection(fake, client):
    await configure(client, fake, mode="hang")
    task = asyncio.ensure_future(chat(client, fake))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 1.0
    while (await stats(client, fake))["cancelled"] != 1:
        assert time.monotonic() < deadline, "the backend did not notice the cancelled request within 1 s"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- connections and the pool

async def test_sequential_requests_reuse_one_keep_alive_connection(raw, client):
    async def handle(reader, writer):
        while (request := await server.read_request(reader)) is not None:
            writer.write(answer(request.split(b"\r\n", 1)[0]))

    server, url = await raw(handle)
    for i in range(5):
        resp = await client.request("POST", url.with_query(n=i), headers={"X-Request-ID": f"r{i}"}, body=b"hello",
                                    **TIMEOUTS)
        assert await resp.read() == f"POST /p?n={i} HTTP/1.1".encode()
    assert server.connections == 1
    port = url.port
    assert server.requests[0] == (f"POST /p?n=0 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Request-ID: r0\r\n"
                                  "Content-Length: 5\r\n\r\nhello").encode()


async def test_concurrent_requests_open_one_connection_each_and_all_return_to_the_pool(raw, client):
    async def handle(reader, writer):
        while await server.read_request(reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(answer(b"ok"))

    server, url = await raw(handle)
    for _ in range(2):
        responses = await asyncio.gather(*(client.request("GET", url, headers={}, **TIMEOUTS) for _ in range(8)))
        assert [await r.read() for r in responses] == [b"ok"] * 8
    assert server.connections == 8


@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_a_pooled_connection_the_server_just_closed_is_retried_once_on_a_fresh_one(raw, how, client):
    async def handle(reader, writer):
        first_connection = server.connections == 1
        while (request := await server.read_request(reader)) is not None:
            if first_connection and len(server.requests) == 2:  # the idle-timeout race: closed as the request came
                if how == "reset":
                    reset(writer)
                return
            writer.write(answer(b"got " + request[-1:]))

    server, url = await raw(handle)
    assert await (await client.request("POST", url, headers={}, body=b"1", **TIMEOUTS)).read() == b"got 1"
    assert await (await client.request("POST", url, headers={}, body=b"2", **TIMEOUTS)).read() == b"got 2"
    assert server.connections == 2
    assert [r[-1:] for r in server.requests] == [b"1", b"2", b"2"]


async def test_no_retry_once_a_response_byte_arrived(raw, client):
    async def handle(reader, writer):
        await server.read_request(reader)
        writer.write(answer(b"first"))
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200")  # then the connection breaks

    server, url = await raw(handle)
    await (await client.request("POST", url, headers={}, body=b"1", **TIMEOUTS)).read()
    with pytest.raises(UpstreamProtocolError):
        await client.request("POST", url, headers={}, body=b"2", **TIMEOUTS)
    assert server.connections == 1 and len(server.requests) == 2


async def test_a_fresh_connection_closed_before_any_byte_is_a_connect_error_without_retry(raw, client):
    async def handle(reader, writer):
        await server.read_request(reader)

    server, url = await raw(handle)
    with pytest.raises(UpstreamConnectError, match="closed the connection before answering"):
        await client.request("POST", url, headers={}, body=b"x", **TIMEOUTS)
    assert server.connections == 1


async def test_connect_timeout_is_a_timeout(client):
    with socket.socket() as full:  # a listener whose backlog is full: the kernel drops further SYNs
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            waiting.append(s)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="within 0.2 s"):
            await client.request("GET", URL(f"http://127.0.0.1:{port}/"), headers={}, connect_timeout=0.2,
                                 first_byte_timeout=5, read_timeout=5)
        assert time.monotonic() - started < 1.0
        for s in waiting:
            s.close()


async def test_connection_refused_is_a_connect_error(client):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamConnectError, match=f"could not connect to 127.0.0.1:{port}"):
        await client.request("GET", URL(f"http://127.0.0.1:{port}/"), headers={}, **TIMEOUTS)


async def test_idle_connections_are_closed_after_idle_timeout(raw):
    async def handle(reader, writer):
        while await server.read_request(reader) is not None:
            writer.write(answer(b"ok"))
        server.closed_by_peer.set()

    server, url = await raw(handle)
    client = UpstreamClient(idle_timeout=0.2)
    await (await client.request("GET", url, headers={}, **TIMEOUTS)).read()
    await asyncio.wait_for(server.closed_by_peer.wait(), 1.0)
    await (await client.request("GET", url, headers={}, **TIMEOUTS)).read()
    await client.close()
    assert server.connections == 2


async def test_release_without_reading_reuses_a_complete_answer_and_closes_an_unfinished_one(raw, client):
    async def handle(reader, writer):
        while (request := await server.read_request(reader)) is not None:
            if b"unfinished" in request:
                writer.write(OK_HEAD + b"Content-Length: 100\r\n\r\npart")
                await server.wait_for_close(reader)
                return
            writer.write(answer(b"small"))

    server, url = await raw(handle)
    for _ in range(2):
        resp = await client.request("GET", url, headers={}, **TIMEOUTS)
        await asyncio.sleep(0.05)  # the whole body has arrived, unread
        resp.release()
    assert server.connections == 1
    resp = await client.request("GET", url, headers={"X": "unfinished"}, **TIMEOUTS)
    resp.release()
    await asyncio.wait_for(server.closed_by_peer.wait(), 1.0)


@pytest.mark.parametrize("status_line, extra", [(b"HTTP/1.1 200 OK", b"Connection: close\r\n"),
                                                (b"HTTP/1.0 200 OK", b"")])
async def test_an_answer_that_ends_keep_alive_is_not_reused(raw, status_line, extra, client):
    async def handle(reader, writer):
        while await server.read_request(reader) is not None:  # keeps the connection open all the same
            writer.write(status_line + b"\r\n" + extra + b"Content-Length: 2\r\n\r\nok")

    server, url = await raw(handle)
    for _ in range(2):
        assert await (await client.request("GET", url, headers={}, **TIMEOUTS)).read() == b"ok"
    assert server.connections == 2


async def test_header_values_with_a_newline_are_refused(client):
    with pytest.raises(ValueError, match="CR or LF"):
        await client.request("GET", URL("http://127.0.0.1:9/"), headers={"Authorization": "Bearer k\n"}, **TIMEOUTS)


# ---------------------------------------------------------------- bodies

BODIES = {
    "content-length": answer(b"hello world"),
    "chunked": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "until-close": OK_HEAD + b"\r\nhello world",
}


@pytest.mark.parametrize("framing", BODIES)
@pytest.mark.parametrize("reading", ["read", "iterate"])
async def test_bodies_framed_every_way_read_whole(raw, framing, reading, client):
    async def handle(reader, writer):
        while await server.read_request(reader) is not None:
            data = BODIES[framing]
            writer.write(data[:-7])
            await writer.drain()
            await asyncio.sleep(0.01)  # the end of the body in a second packet
            writer.write(data[-7:])
            if framing == "until-close":
                return

    server, url = await raw(handle)
    for _ in range(2):
        resp = await client.request("GET", url, headers={}, **TIMEOUTS)
        body = await resp.read() if reading == "read" else b"".join([p async for p in resp])
        assert body == b"hello world"
    assert server.connections == (2 if framing == "until-close" else 1)


CUT_SHORT = {
    "content-length": OK_HEAD + b"Content-Length: 100\r\n\r\nhello",
    "chunked": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n64\r\nwor",
}


@pytest.mark.parametrize("framing", CUT_SHORT)
async def test_a_body_cut_short_is_a_protocol_error(raw, framing, client):
    async def handle(reader, writer):
        await server.read_request(reader)
        writer.write(CUT_SHORT[framing])

    server, url = await raw(handle)
    with pytest.raises(UpstreamProtocolError, match="before the end of the response"):
        await (await client.request("GET", url, headers={}, **TIMEOUTS)).read()
    resp = await client.request("GET", url, headers={}, **TIMEOUTS)
    pieces = []
    with pytest.raises(UpstreamProtocolError):
        async for piece in resp:
            pieces.append(piece)
    assert b"".join(pieces).startswith(b"hello")


async def test_a_malformed_response_is_a_protocol_error(raw, client):
    async def handle(reader, writer):
        await server.read_request(reader)
        writer.write(b"<html>not http</html>\r\n\r\n")
        await server.wait_for_close(reader)

    server, url = await raw(handle)
    with pytest.raises(UpstreamProtocolError, match="malformed response"):
        await client.request("GET", url, headers={}, **TIMEOUTS)


async def test_bytes_after_the_end_of_a_response_keep_its_connection_out_of_the_pool(raw, client):
    async def handle(reader, writer):
        while await server.read_request(reader) is not None:
            writer.write(answer(b"ok") + answer(b"unasked"))

    server, url = await raw(handle)
    for _ in range(2):
        assert await (await client.request("GET", url, headers={}, **TIMEOUTS)).read() == b"ok"
    assert server.connections == 2


async def test_a_body_that_goes_silent_times_out_after_read_timeout(raw, client):
    async def handle(reader, writer):
        await server.read_request(reader)
        writer.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        for _ in range(3):  # bytes keep coming for longer than read_timeout in all
            await asyncio.sleep(0.1)
            writer.write(b"1\r\n.\r\n")
        await server.wait_for_close(reader)

    server, url = await raw(handle)
    resp = await client.request("GET", url, headers={}, connect_timeout=1, first_byte_timeout=1, read_timeout=0.25)
    received = b""
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="no response bytes for 0.25 s"):
        async for piece in resp:
            received += piece
    assert received == b"hello..."
    assert 0.5 <= time.monotonic() - started < 1.0
    await asyncio.wait_for(server.closed_by_peer.wait(), 1.0)


async def test_cancelling_a_task_reading_the_body_closes_the_connection(raw, client):
    async def handle(reader, writer):
        await server.read_request(reader)
        writer.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await server.wait_for_close(reader)

    server, url = await raw(handle)
    resp = await client.request("GET", url, headers={}, **TIMEOUTS)
    task = asyncio.ensure_future(resp.read())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.closed_by_peer.wait(), 1.0)
    with pytest.raises(UpstreamError):
        await resp.read()


async def test_a_large_body_read_slowly_arrives_whole(raw, client):
    blob = bytes(range(256)) * (16 * 1024)  # 4 MiB: far above what is buffered before reading pauses

    async def handle(reader, writer):
        while await server.read_request(reader) is not None:
            writer.write(answer(blob))
            await writer.drain()

    server, url = await raw(handle)
    resp = await client.request("GET", url, headers={}, **TIMEOUTS)
    pieces = []
    async for piece in resp:
        pieces.append(piece)
        await asyncio.sleep(0.001)
    assert b"".join(pieces) == blob
    assert await (await client.request("GET", url, headers={}, **TIMEOUTS)).read() == blob
    assert server.connections == 1


# ---------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


async def test_tls_to_a_self_signed_server(raw, self_signed):
    cert, key = self_signed
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def handle(reader, writer):
        while await server.read_request(reader) is not None:
            writer.write(answer(b"secret"))

    server, url = await raw(handle, tls)
    unverified = UpstreamClient(ssl=False)
    for _ in range(2):
        assert await (await unverified.request("GET", url, headers={}, **TIMEOUTS)).read() == b"secret"
    await unverified.close()
    assert server.connections == 1

    verifying = UpstreamClient()
    with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await verifying.request("GET", url, headers={}, **TIMEOUTS)
    await verifying.close()

    trusting = UpstreamClient(ssl=ssl.create_default_context(cafile=str(cert)))
    assert await (await trusting.request("GET", url, headers={}, **TIMEOUTS)).read() == b"secret"
    await trusting.close()
