"""An httpcore network backend on asyncio's own streams, for the webhook deliveries.

httpcore's default backend goes through anyio, whose stream wrappers cost more CPU per read and
write than the request itself on loopback: in ``bench/e2e.py`` anyio was about 12 % of the
delivery process's CPU. TaskRelay only runs on asyncio, so this backend talks to asyncio's
``StreamReader``/``StreamWriter`` directly, with the same error mapping as httpcore's
``AnyIOBackend`` (timeouts -> ``*Timeout``, socket errors -> ``ReadError``/``WriteError``/
``ConnectError``). TLS is upgraded in place with ``StreamWriter.start_tls`` (Python 3.11+).

It connects to what it is given: the SSRF checks stay in :mod:`service.netguard`, which resolves
and checks a host and hands this backend IP literals only. The webhook client
(:mod:`service.webclient`) connects through those checks, then takes the connection over with
:meth:`AsyncioStream.take_over` and parses answers as they arrive, in a protocol of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
from httpcore._utils import is_socket_readable

# Errors of a connection that broke, and what httpcore calls them while reading or writing.
_BROKEN = (OSError, asyncio.IncompleteReadError, ConnectionError)


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "timed out reading") from exc
        except _BROKEN as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "timed out writing") from exc
        except _BROKEN as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        # Closing the transport is enough: waiting for the peer to acknowledge (wait_closed)
        # would let a subscriber that never does hold the dispatcher.
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._writer.close()
            raise httpcore.ConnectTimeout(str(exc) or "timed out in the TLS handshake") from exc
        except (*_BROKEN, ssl.SSLError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return self

    def take_over(self, protocol: asyncio.BaseProtocol) -> asyncio.WriteTransport:
        """Hand the connection to ``protocol`` and return its transport; the stream is done.

        From now on the transport calls ``protocol`` (``data_received``, ``eof_received``,
        ``connection_lost``, flow control) instead of this stream's reader: a caller that
        parses bytes as they arrive saves the reader's buffer copies and a future per read.
        Nothing was asked of the peer yet, so bytes it may already have sent are meaningless
        and dropped; a peer that already closed (or broke) the connection is refused
        (``ReadError``), since nothing would tell ``protocol`` about it. Keep this stream
        referenced while the transport is in use: its writer owns the transport (newer Pythons
        close a writer's transport when the writer is garbage-collected).
        """
        transport = self._writer.transport
        problem = self._reader.exception()
        if problem is not None or self._reader.at_eof() or transport.is_closing():
            transport.abort()
            raise httpcore.ReadError(
                f"the connection was closed before anything was sent ({problem or 'EOF'})"
            )
        transport.set_protocol(protocol)
        return transport

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":
            # An idle keep-alive connection with something to read was closed by the server.
            return self._reader.at_eof() or is_socket_readable(
                self._writer.get_extra_info("socket")
            )
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = None if local_address is None else (local_address, 0)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting to {path} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
