"""The HTTP/1.1 client that sends webhook deliveries.

A delivery is one POST of a small signed body; all TaskRelay keeps of the answer is its status
and the first :data:`RESPONSE_READ_CAP` bytes of its body. httpx on httpcore's connection pool
spent about 40 % of the dispatching process's CPU on that in ``bench/e2e.py`` (300 deliveries a
second): anyio locks and cancel scopes, h11's state machine, httpx's request and response
models, all made for a general client. :class:`LeanClient` does only what a delivery needs. It
writes each request in one piece, and an asyncio protocol feeds the answer to httptools as its
bytes arrive: one future and one timer per request, no task, lock or cancel scope.

It keeps every guarantee of the SSRF guard (:mod:`service.netguard`). Each connection is opened
by :class:`~service.netguard.GuardedNetworkBackend`, which resolves the host itself, refuses it
if any address is not allowed and connects to a checked IP literal, so DNS rebinding cannot
send a delivery elsewhere; the client has no other way to connect. It reads no proxy settings,
cannot reach a Unix socket, and follows no redirect: a 3xx is just an answer that is not 2xx.

:class:`HttpxClient` offers the same interface over an ``httpx.AsyncClient``. Only tests use it,
to mount an in-process subscriber as an ASGI transport.
"""

from __future__ import annotations

import asyncio
import re
import select
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

import httpcore
import httptools
import httpx

from service.aionet import AsyncioStream
from service.netguard import (
    AddressPolicy,
    BlockedConnection,
    BlockedDestination,
    GuardedNetworkBackend,
    Resolver,
)

__all__ = [
    "DELIVERY_TIMEOUTS",
    "IDLE_EXPIRY_SECONDS",
    "MAX_CONNECTIONS",
    "MAX_IDLE_CONNECTIONS",
    "RESPONSE_READ_CAP",
    "DeliveryFailed",
    "Headers",
    "HttpxClient",
    "LeanClient",
    "Reply",
    "Timeouts",
    "WebhookClient",
]

#: How much of a subscriber's answer is kept (for the attempt log); the rest is never read.
RESPONSE_READ_CAP = 4096
#: The most an answer's head (status line, headers, and any 1xx answers before it) may take.
#: Unbounded, a subscriber sending one header without end held the event loop for seconds
#: at a time (httptools grows a header's value by copying it) and took hundreds of MB.
MAX_HEAD_BYTES = 64 * 1024
# The pool's limits, as httpx's defaults were: connections open at once (in use or idle), idle
# connections kept, and how long an idle one is kept.
MAX_CONNECTIONS = 100
MAX_IDLE_CONNECTIONS = 20
IDLE_EXPIRY_SECONDS = 5.0
# Parsed URLs remembered. Deliveries go to a bounded set of subscribers; the cap only bounds the
# memory if they do not.
_TARGET_CACHE_SIZE = 1024
# How often idle connections of every origin are checked for expiry (else only their own
# origin's requests would ever notice).
_SWEEP_SECONDS = 1.0

Headers = Sequence[tuple[str, str]]
Origin = tuple[str, str, int]  # scheme, host, port


@dataclass(frozen=True)
class Timeouts:
    """Seconds a delivery may wait: to connect (the DNS answer and TCP together, then the TLS
    handshake), for the next bytes of the answer, for the subscriber to take more of the
    request, and for a connection when the pool is at its cap."""

    connect: float = 5.0
    read: float = 10.0
    write: float = 10.0
    pool: float = 10.0

    def for_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


DELIVERY_TIMEOUTS = Timeouts()


class Reply(NamedTuple):
    """A subscriber's answer: its status and the first ``RESPONSE_READ_CAP`` bytes of body."""

    status_code: int
    body: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


class DeliveryFailed(Exception):
    """No answer came back: the connection was refused, blocked, broken or timed out, or what
    came back was not HTTP.

    ``kind`` names the failure as httpx's exception classes do (``ConnectError``,
    ``ConnectTimeout``, ``ReadTimeout``, ``RemoteProtocolError``, ...), plus
    ``BlockedConnection`` for an address the policy refuses, so recorded errors read as they
    did with httpx; ``str()`` is ``"<kind>: <message>"``. ``blocked`` is the refusal, with its
    reason, when the address was not allowed. ``unsent``: the request never left this process,
    for a reason of the client's own (no connection came free within the pool timeout, or the
    client was closed): no fault of the subscriber's.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        timed_out: bool = False,
        blocked: BlockedDestination | None = None,
        unsent: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.timed_out = timed_out
        self.blocked = blocked
        self.unsent = unsent

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class _Unanswered(DeliveryFailed):
    """The connection ended before any byte of the answer. On a connection that had served
    requests before, that is the server closing it as idle just as the request went out: the
    request can go once more on a new connection."""


class WebhookClient(Protocol):
    """What the dispatcher needs: POST a body, get the status and the capped body back.

    ``post`` raises :class:`DeliveryFailed` when no answer came; any answer, 3xx included, is
    a :class:`Reply`. ``headers`` must not include Host, Content-Length or Transfer-Encoding:
    the client writes those itself.
    """

    async def post(self, url: str, body: bytes, headers: Headers) -> Reply: ...

    async def aclose(self) -> None: ...


# --- the lean client ---------------------------------------------------------------------------


class _Target(NamedTuple):
    origin: Origin
    head: bytes  # b"POST <target> HTTP/1.1\r\nHost: <authority>\r\n"


# A host as urlsplit returns it (lower case, IPv6 without brackets): a name, IPv4 or IPv6.
_HOST_RE = re.compile(r"[a-z0-9._~%:-]+")


def _parse_target(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DeliveryFailed(f"the webhook URL is not valid ({exc})", kind="InvalidURL") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DeliveryFailed(
            f"webhook URLs are http or https, not {scheme or 'schemeless'}",
            kind="UnsupportedProtocol",
        )
    host = parts.hostname or ""
    if not _HOST_RE.fullmatch(host) or "@" in parts.netloc:
        raise DeliveryFailed(f"the webhook URL {url[:200]!r} has no usable host", kind="InvalidURL")
    default_port = 443 if scheme == "https" else 80
    if port is None:
        port = default_port
    elif not 0 < port < 65536:
        raise DeliveryFailed(f"the webhook URL's port {port} is out of range", kind="InvalidURL")
    authority = f"[{host}]" if ":" in host else host
    if port != default_port:
        authority += f":{port}"
    # The request target exactly as httpx would send it (stored URLs are its normal form):
    # quoting of our own re-encoded what it keeps as written (`|` in a query), so the
    # subscriber got another URL than the one it registered. (Parsed once per URL: cached.)
    try:
        target = httpx.URL(url).raw_path
    except httpx.InvalidURL as exc:
        raise DeliveryFailed(f"the webhook URL is not valid ({exc})", kind="InvalidURL") from exc
    head = b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (target, authority.encode("ascii"))
    return _Target((scheme, host, port), head)


def _header_block(headers: Headers) -> bytes:
    """The header lines and the blank line that ends them; refuses a line break in a name or a
    value (it would let a value write headers of its own)."""
    text = "".join([f"{name}: {value}\r\n" for name, value in headers])
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise DeliveryFailed("a header contains a line break", kind="LocalProtocolError")
    try:
        return text.encode("latin-1") + b"\r\n"
    except UnicodeEncodeError as exc:
        raise DeliveryFailed(f"a header is not Latin-1 ({exc})", kind="LocalProtocolError") from exc


def _readable_probe(transport: asyncio.BaseTransport) -> Callable[[], bool]:
    """Whether the connection's socket holds bytes or an EOF the event loop has not handed on
    yet: an idle connection the server is closing right now. A poll object is made once per
    connection, so each check is a single system call (select() cannot take descriptors past
    1023)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return lambda: False
    fd = sock.fileno()
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # hang-ups and errors are reported as well
        return lambda: bool(poller.poll(0))
    return lambda: bool(select.select([fd], [], [], 0)[0])


class _Connection(asyncio.Protocol):
    """One keep-alive connection to one origin, parsing each answer as its bytes arrive.

    It takes the transport over from the stream the guarded backend opened, so asyncio calls it
    directly: ``data_received`` feeds httptools, whose callbacks (the ``on_*`` methods) note the
    status and keep the body up to the cap, and completing the answer completes the request's
    future. One timer per request enforces the read and write timeouts. Anything that arrives
    while no request is waiting (the server closing an idle connection, or bytes nobody asked
    for) makes the connection unusable, so it can never answer the next request with stale
    bytes.
    """

    def __init__(self, stream: AsyncioStream, origin: Origin, client: LeanClient) -> None:
        self._loop = asyncio.get_running_loop()
        self.origin = origin
        self._client = client
        self._read_timeout = client.timeouts.read
        self._write_timeout = client.timeouts.write
        self._cap = client.read_cap
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False  # connection_lost was called
        self.idle = False  # in the client's idle pool
        self.idle_since = 0.0
        self.requests = 0  # sent on this connection, the one in flight included
        self._broken = False  # must not carry another request
        self._write_paused = False
        # The request in flight.
        self._waiter: asyncio.Future[Reply] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._receiving = False
        self._last_activity = 0.0
        self._received = 0  # bytes of the answer so far
        self._status = 0
        self._interim = False  # inside a 1xx answer (100 Continue, 103 Early Hints)
        self._final = False  # the final answer's head has been parsed
        self._framed = False  # its body has a Content-Length or chunked framing
        self._complete = False
        self._keep_alive = False
        self._body = bytearray()
        self._body_seen = 0
        self._stream = stream  # its writer owns the transport (see AsyncioStream.take_over)
        self.transport = stream.take_over(self)
        self._probe = _readable_probe(self.transport)

    # --- one request ----------------------------------------------------------------------

    async def exchange(self, request: bytes) -> Reply:
        loop = self._loop
        waiter: asyncio.Future[Reply] = loop.create_future()
        self._waiter = waiter
        self._receiving = True
        self._received = self._body_seen = self._status = 0
        self._interim = self._final = self._framed = self._complete = self._keep_alive = False
        self._body = bytearray()
        self.requests += 1
        self._last_activity = now = loop.time()
        # All of it goes to the transport at once: it sends what the socket takes and keeps the
        # rest, pausing us (pause_writing) while the subscriber is slow to read.
        self.transport.write(request)
        limit = self._write_timeout if self._write_paused else self._read_timeout
        self._timer = loop.call_at(now + limit, self._on_timer)
        try:
            return await waiter
        finally:
            if waiter.cancelled():  # the attempt's deadline: the answer may still come
                self._broken = True
            self._receiving = False
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    @property
    def reusable(self) -> bool:
        """The last answer ended cleanly, the server keeps the connection open, and the whole
        request was sent."""
        return (
            self._complete
            and self._keep_alive
            and not self._broken
            and not self.closed
            and not self.transport.is_closing()
            and not self.transport.get_write_buffer_size()
        )

    def fresh(self, now: float, expiry: float) -> bool:
        """An idle connection may carry the next request: not expired, not closed, and nothing
        waiting on its socket (checked last: it is a system call)."""
        if self.closed or self._broken or self.transport.is_closing():
            return False
        if now - self.idle_since >= expiry:
            return False
        return not self._probe()

    def close(self) -> None:
        if self._receiving:
            self._fail("ClientClosed", "the webhook client was closed before the answer came")
        elif not self.closed and not self.transport.is_closing():
            if self._broken or self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()

    def _finish(self) -> None:
        self._receiving = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self._status, bytes(self._body)))

    def _fail(
        self, kind: str, message: str, *, timed_out: bool = False, unanswered: bool = False
    ) -> None:
        self._receiving = False
        self._broken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            error = _Unanswered if unanswered else DeliveryFailed
            waiter.set_exception(error(message, kind=kind, timed_out=timed_out))
        if not self.closed:
            self.transport.abort()

    def _on_timer(self) -> None:
        self._timer = None
        if not self._receiving:
            return
        limit = self._write_timeout if self._write_paused else self._read_timeout
        due = self._last_activity + limit
        if self._loop.time() < due:  # there was progress since the timer was set
            self._timer = self._loop.call_at(due, self._on_timer)
        elif self._write_paused:
            message = f"the subscriber took none of the request for {limit:g} s"
            self._fail("WriteTimeout", message, timed_out=True)
        elif self._received:
            message = f"the answer stalled: nothing more for {limit:g} s"
            self._fail("ReadTimeout", message, timed_out=True)
        else:
            self._fail("ReadTimeout", f"no answer within {limit:g} s", timed_out=True)

    def _end_of_answer(self, exc: Exception | None) -> None:
        """The connection ended while an answer was awaited."""
        if exc is None and self._final and not self._framed:
            # A body with neither Content-Length nor chunked framing ends with the connection.
            self._complete = True
            self._keep_alive = False
            self._finish()
            return
        what = "without answering" if not self._received else "before its answer was complete"
        if exc is None:
            kind, message = "RemoteProtocolError", f"the server closed the connection {what}"
        else:
            kind = "WriteError" if self._write_paused else "ReadError"
            message = f"the connection broke {what} ({str(exc) or type(exc).__name__})"
        self._fail(kind, message, unanswered=not self._received)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._receiving:
            # Bytes nobody asked for: they would be read as the answer to the next request.
            self._broken = True
            self.transport.abort()
            return
        self._last_activity = self._loop.time()
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A 101: what follows is not HTTP any more. Its head is the answer.
            self._broken = True
            self._complete = self._complete or self._final
        except httptools.HttpParserError as exc:
            if not self._complete:
                self._fail("RemoteProtocolError", f"the answer is not valid HTTP/1.1 ({exc})")
                return
            self._broken = True  # bytes after the answer
        if not self._final and self._received > MAX_HEAD_BYTES:
            # Everything so far is head (the final one's is not complete): one read more than
            # the cap at most was parsed, so the parser's copying stays bounded.
            message = f"the answer's head (status line and headers) is over {MAX_HEAD_BYTES} bytes"
            self._fail("RemoteProtocolError", message)
            return
        if self._body_seen > self._cap:
            # Enough is kept. Whatever of the rest came along is dropped, and the rest of it may
            # still be coming: the connection is closed rather than drained.
            self._broken = True
        if self._complete or self._body_seen >= self._cap:
            self._finish()

    def eof_received(self) -> bool:
        if self._receiving:
            self._end_of_answer(None)
        self._broken = True
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._receiving:
            self._end_of_answer(exc)
        if self.idle:
            self._client._lost_while_idle(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._last_activity = self._loop.time()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_activity = self._loop.time()

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._broken = True  # a second answer to one request

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 14 and name.lower() == b"content-length":
            self._framed = True
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            self._framed = self._framed or value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # the real answer follows
        else:
            self._status = status
            self._final = True

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        room = self._cap - len(self._body)
        if room > 0:
            self._body += body if len(body) <= room else body[:room]
        self._body_seen += len(body)

    def on_message_complete(self) -> None:
        if self._complete:
            self._broken = True
        elif self._interim:
            self._interim = False
            self._framed = False
        else:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()


class LeanClient:
    """Webhook deliveries over HTTP/1.1 with keep-alive, through the SSRF guard.

    Idle connections are kept per origin (scheme, host, port), the most recently used taken
    first, at most ``max_idle_connections`` of them and each for ``idle_expiry`` seconds; at
    most ``max_connections`` are open at once, and a request finding none free waits up to the
    pool timeout. Before an idle connection is reused its socket is checked for an EOF or bytes
    (the server closed it); if the server closes it anyway as the request goes out, so that no
    byte of an answer arrives, the request is sent once more on a new connection. A connection
    that failed, timed out, was told ``Connection: close``, or whose answer went past the read
    cap is closed, never reused.

    Every connection is opened by :class:`GuardedNetworkBackend` with ``policy`` (and
    ``resolver``, for tests): the address connected to is one the policy allowed, resolved
    at that moment. HTTPS uses ``ssl_context`` (default: httpx's, with certifi's roots), and
    checks the certificate against the URL's host name.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        resolver: Resolver | None = None,
        timeouts: Timeouts = DELIVERY_TIMEOUTS,
        max_connections: int = MAX_CONNECTIONS,
        max_idle_connections: int = MAX_IDLE_CONNECTIONS,
        idle_expiry: float = IDLE_EXPIRY_SECONDS,
        read_cap: int = RESPONSE_READ_CAP,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._network = GuardedNetworkBackend(policy, resolver)
        self.timeouts = timeouts
        self.read_cap = read_cap
        self._max_connections = max_connections
        self._max_idle = max_idle_connections
        self._idle_expiry = idle_expiry
        self._ssl_context = ssl_context
        self._targets: dict[str, _Target] = {}
        self._connections: set[_Connection] = set()  # open, in use or idle
        self._opening = 0  # being connected: they count against the cap already
        self._idle: dict[Origin, list[_Connection]] = {}  # oldest first
        self._idle_count = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._next_sweep = 0.0
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open or being opened, in use or idle."""
        return len(self._connections) + self._opening

    @property
    def idle_connections(self) -> int:
        return self._idle_count

    async def post(self, url: str, body: bytes, headers: Headers) -> Reply:
        target = self._targets.get(url)
        if target is None:
            target = _parse_target(url)
            if len(self._targets) >= _TARGET_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = target
        request = b"".join(
            (target.head, b"Content-Length: %d\r\n" % len(body), _header_block(headers), body)
        )
        connection = await self._acquire(target.origin)
        try:
            return await self._exchange(connection, request)
        except _Unanswered:
            if connection.requests == 1:  # a new connection: the server is at fault
                raise
        # The server closed an idle connection as the request went out. Deliveries are at least
        # once anyway; the subscriber deduplicates on webhook-id.
        connection = await self._acquire(target.origin, fresh=True)
        return await self._exchange(connection, request)

    async def aclose(self) -> None:
        """Close every connection; requests still waiting for an answer fail."""
        self._closed = True
        connections, self._connections = self._connections, set()
        self._idle.clear()
        self._idle_count = 0
        for connection in connections:
            connection.idle = False
            connection.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it finds the client closed

    # --- the pool -------------------------------------------------------------------------

    async def _exchange(self, connection: _Connection, request: bytes) -> Reply:
        reusable = False
        try:
            reply = await connection.exchange(request)
            reusable = connection.reusable
        finally:
            self._release(connection, reusable)
        return reply

    async def _acquire(self, origin: Origin, *, fresh: bool = False) -> _Connection:
        """A connection to ``origin``; ``fresh``: a new one, for a request sent once already
        (a failure to get one is then not ``unsent``)."""
        deadline: float | None = None
        while True:
            if self._closed:
                raise DeliveryFailed(
                    "the webhook client is closed", kind="ClientClosed", unsent=not fresh
                )
            now = asyncio.get_running_loop().time()
            if now >= self._next_sweep:
                self._sweep(now)
            if not fresh:
                connection = self._take_idle(origin, now)
                if connection is not None:
                    return connection
            if self.open_connections < self._max_connections or self._evict_oldest_idle():
                return await self._open(origin)
            if deadline is None:
                deadline = now + self.timeouts.pool
            await self._wait_for_slot(deadline, unsent=not fresh)

    def _take_idle(self, origin: Origin, now: float) -> _Connection | None:
        stack = self._idle.get(origin)
        while stack:
            connection = stack.pop()
            self._idle_count -= 1
            connection.idle = False
            if connection.fresh(now, self._idle_expiry):
                return connection
            self._drop(connection)
        return None

    def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not self._closed and self._idle_count < self._max_idle:
            connection.idle = True
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(connection.origin, []).append(connection)
            self._idle_count += 1
            if self._waiters:
                self._wake()
        else:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        connection.close()
        if self._waiters:
            self._wake()

    def _lost_while_idle(self, connection: _Connection) -> None:
        """The server closed an idle connection: it leaves the pool at once."""
        stack = self._idle.get(connection.origin)
        if stack is not None and connection in stack:
            stack.remove(connection)
            self._idle_count -= 1
        connection.idle = False
        self._drop(connection)

    def _sweep(self, now: float) -> None:
        """Close idle connections that expired, whatever their origin."""
        self._next_sweep = now + _SWEEP_SECONDS
        for origin, stack in list(self._idle.items()):
            for connection in [c for c in stack if now - c.idle_since >= self._idle_expiry]:
                stack.remove(connection)
                self._idle_count -= 1
                connection.idle = False
                self._drop(connection)
            if not stack:
                del self._idle[origin]

    def _evict_oldest_idle(self) -> bool:
        """At the cap, close the idle connection unused the longest, to open another."""
        stacks = [stack for stack in self._idle.values() if stack]
        if not stacks:
            return False
        oldest = min(stacks, key=lambda stack: stack[0].idle_since).pop(0)
        self._idle_count -= 1
        oldest.idle = False
        self._drop(oldest)
        return True

    async def _wait_for_slot(self, deadline: float, *, unsent: bool) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            raise DeliveryFailed(
                f"no connection came free within {self.timeouts.pool:g} s "
                f"({self._max_connections} open)",
                kind="PoolTimeout",
                timed_out=True,
                unsent=unsent,
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, then cancelled: the slot goes to the next one
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # --- connecting -----------------------------------------------------------------------

    async def _open(self, origin: Origin) -> _Connection:
        self._opening += 1
        opened = False
        try:
            connection = await self._connect(origin)
            if self._closed:
                connection.close()
                raise DeliveryFailed("the webhook client is closed", kind="ClientClosed")
            self._connections.add(connection)
            opened = True
            return connection
        finally:
            self._opening -= 1
            if not opened and self._waiters:
                self._wake()

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        timeout = self.timeouts.connect
        try:
            stream = await self._network.connect_tcp(host, port, timeout=timeout)
        except BlockedConnection as exc:
            raise DeliveryFailed(
                exc.destination.message, kind="BlockedConnection", blocked=exc.destination
            ) from exc
        except httpcore.TimeoutException as exc:
            raise DeliveryFailed(
                str(exc) or f"connecting to {host} timed out", kind="ConnectTimeout", timed_out=True
            ) from exc
        except httpcore.NetworkError as exc:
            raise DeliveryFailed(str(exc) or type(exc).__name__, kind="ConnectError") from exc
        if not isinstance(stream, AsyncioStream):  # GuardedNetworkBackend's own backend makes one
            await stream.aclose()
            raise TypeError(f"the guarded backend returned {type(stream).__name__}")
        try:
            if scheme == "https":
                # Upgraded in place (AsyncioStream.start_tls returns the same stream); the
                # certificate is checked against the URL's host, not the address connected to.
                await stream.start_tls(self._tls_context(), server_hostname=host, timeout=timeout)
            return _Connection(stream, origin, self)
        except httpcore.TimeoutException as exc:
            await stream.aclose()
            message = str(exc) or "the TLS handshake timed out"
            raise DeliveryFailed(message, kind="ConnectTimeout", timed_out=True) from exc
        except httpcore.ConnectError as exc:
            await stream.aclose()
            raise DeliveryFailed(str(exc) or type(exc).__name__, kind="ConnectError") from exc
        except httpcore.ReadError as exc:  # take_over: the server closed at once
            await stream.aclose()
            raise DeliveryFailed(str(exc), kind="RemoteProtocolError") from exc
        except BaseException:
            await stream.aclose()
            raise

    def _tls_context(self) -> ssl.SSLContext:
        # Made on first use: loading the CA bundle takes tens of milliseconds.
        if self._ssl_context is None:
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context


# --- the httpx adapter -------------------------------------------------------------------------


class HttpxClient:
    """The webhook interface over an ``httpx.AsyncClient``.

    For tests that mount an in-process subscriber as an ASGI transport
    (``create_app(webhook_transport=...)``). It adds no address checks of its own: production
    deliveries go through :class:`LeanClient`. httpx's errors become :class:`DeliveryFailed`
    with the exception's class name as ``kind``.
    """

    def __init__(self, http: httpx.AsyncClient, *, read_cap: int = RESPONSE_READ_CAP) -> None:
        self.http = http
        self.read_cap = read_cap

    async def post(self, url: str, body: bytes, headers: Headers) -> Reply:
        kept = bytearray()
        try:
            async with self.http.stream("POST", url, content=body, headers=list(headers)) as answer:
                async for chunk in answer.aiter_bytes():
                    kept += chunk[: self.read_cap - len(kept)]
                    if len(kept) >= self.read_cap:
                        break
        except BlockedConnection as exc:
            message = exc.destination.message
            raise DeliveryFailed(message, kind=type(exc).__name__, blocked=exc.destination) from exc
        except httpx.TimeoutException as exc:
            message = str(exc) or "timed out"
            unsent = isinstance(exc, httpx.PoolTimeout)
            raise DeliveryFailed(
                message, kind=type(exc).__name__, timed_out=True, unsent=unsent
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise DeliveryFailed(str(exc) or "no details", kind=type(exc).__name__) from exc
        return Reply(answer.status_code, bytes(kept))

    async def aclose(self) -> None:
        await self.http.aclose()
