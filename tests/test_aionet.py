"""The asyncio network backend (service/aionet.py) against real sockets: plain HTTP through
httpx, TLS with a certificate made for the test, httpcore's error types for every failure, and
handing a connection over to a protocol (as the webhook client does)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpcore
import httpx
import pytest

from service.aionet import AsyncioBackend, AsyncioStream
from tests.servers import serving_tls

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler, context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    listening = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        listening.close()


async def http_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection (keep-alive) with the body it was sent."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:  # the client closed the connection
            return
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


def client() -> httpx.AsyncClient:
    pool = httpcore.AsyncConnectionPool(network_backend=AsyncioBackend())

    class Transport(httpx.AsyncHTTPTransport):
        def __init__(self) -> None:
            self._pool = pool

    return httpx.AsyncClient(transport=Transport(), timeout=5.0)


async def test_requests_and_keep_alive_over_plain_tcp() -> None:
    async with server(http_ok) as port, client() as http:
        for n in range(3):
            answer = await http.post(f"http://127.0.0.1:{port}/hook", content=b"x" * (n * 70_000))
            assert answer.status_code == 200
            assert answer.content == b"x" * (n * 70_000)


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(httpcore.ConnectError):
            await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2.0)


async def test_reads_time_out_and_a_closed_peer_is_readable_then_eof() -> None:
    closing = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await closing.wait()
        writer.close()

    async with server(silent) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2.0)
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(100, timeout=0.05)
        assert not stream.get_extra_info("is_readable")
        assert stream.get_extra_info("server_addr")[1] == port
        assert stream.get_extra_info("ssl_object") is None
        closing.set()
        for _ in range(100):  # the close reaches us
            if stream.get_extra_info("is_readable"):
                break
            await asyncio.sleep(0.01)
        assert stream.get_extra_info("is_readable")
        assert await stream.read(100, timeout=1.0) == b""
        await stream.aclose()


async def test_writing_to_a_reset_connection_is_a_write_or_read_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    async with server(reset) as port, client() as http:
        with pytest.raises((httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
            await http.post(f"http://127.0.0.1:{port}/", content=b"y" * 1_000_000)


async def test_tls_is_upgraded_in_place_and_checks_the_server_name(
    certificate: tuple[Path, Path],
) -> None:
    _, cert = certificate
    served = serving_tls(certificate)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with server(http_ok, served) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2.0)
        secure = await stream.start_tls(trusting, server_hostname="hooks.test", timeout=5.0)
        assert secure.get_extra_info("ssl_object") is not None
        await secure.write(b"POST / HTTP/1.1\r\nHost: hooks.test\r\nContent-Length: 2\r\n\r\nok")
        answer = b""
        while not answer.endswith(b"ok"):
            answer += await secure.read(1000, timeout=5.0)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        await secure.aclose()

        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2.0)
        with pytest.raises(httpcore.ConnectError):  # the certificate is not for this name
            await stream.start_tls(trusting, server_hostname="other.test", timeout=5.0)


class Collecting(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.ended = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.ended.set()
        return False


async def test_a_protocol_can_take_the_connection_over() -> None:
    async with server(http_ok) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2.0)
        assert isinstance(stream, AsyncioStream)
        protocol = Collecting()
        transport = stream.take_over(protocol)
        transport.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        for _ in range(200):
            if protocol.data.endswith(b"hi"):
                break
            await asyncio.sleep(0.005)
        assert protocol.data.startswith(b"HTTP/1.1 200 OK\r\n")
        transport.close()


async def test_a_connection_closed_before_the_take_over_is_refused() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with server(hang_up) as port:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2.0)
        assert isinstance(stream, AsyncioStream)
        await stream.read(100, timeout=1.0)  # the EOF has arrived
        with pytest.raises(httpcore.ReadError):
            stream.take_over(Collecting())
