"""The webhook client (service/webclient.py) against real sockets.

Each subscriber is an asyncio server on 127.0.0.1 written here, answering with bytes the test
chooses, and counting the connections it accepts: keep-alive, framing, the read cap, timeouts,
the pool's limits and the SSRF guard are all checked on the wire. TLS uses a certificate made
for the test by the openssl command.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from service.dispatcher import Dispatcher
from service.netguard import AddressPolicy, parse_networks
from service.outbox import DeliveryJob, Outbox
from service.webclient import (
    MAX_HEAD_BYTES,
    RESPONSE_READ_CAP,
    DeliveryFailed,
    HttpxClient,
    LeanClient,
    Timeouts,
)
from tests.conftest import until
from tests.servers import serving_tls

LOOPBACK = AddressPolicy(parse_networks("127.0.0.0/8,::1/128"))
HEADERS = [("Content-Type", "application/json"), ("webhook-id", "evt_1")]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FAST = Timeouts(connect=2.0, read=2.0, write=2.0, pool=2.0)


@dataclass
class Received:
    connection: int  # which accepted connection (0, 1, ...)
    head: bytes
    body: bytes


# Answers one request: write to ``writer``; return False to stop serving the connection (it is
# closed then), True to read the next request on it.
Respond = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]


def answering(*answers: bytes, close: bool = False) -> Respond:
    """Answers the n-th request with ``answers[n]`` (the last one repeats)."""
    served = 0

    async def respond(request: Received, writer: asyncio.StreamWriter) -> bool:
        nonlocal served
        writer.write(answers[min(served, len(answers) - 1)])
        served += 1
        await writer.drain()
        return not close

    return respond


def answering_after(release: asyncio.Event) -> Respond:
    """Answers 200 to every request once ``release`` is set."""

    async def held(request: Received, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(OK)
        return True

    return held


@dataclass
class Subscriber:
    respond: Respond
    port: int = 0
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)  # connections the client closed (EOF)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.ended.append(number)
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = Received(number, head, await reader.readexactly(length))
                self.requests.append(request)
                if not await self.respond(request, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.ended.append(number)
        finally:
            writer.close()


async def start_subscriber(respond: Respond, context: ssl.SSLContext | None = None) -> Subscriber:
    subscriber = Subscriber(respond)
    server = await asyncio.start_server(subscriber._serve, "127.0.0.1", 0, ssl=context)
    subscriber.server = server
    subscriber.port = server.sockets[0].getsockname()[1]
    return subscriber


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Subscriber]]]:
    subscribers: list[Subscriber] = []

    async def start(respond: Respond, context: ssl.SSLContext | None = None) -> Subscriber:
        subscribers.append(await start_subscriber(respond, context))
        return subscribers[-1]

    yield start
    for subscriber in subscribers:
        assert subscriber.server is not None
        subscriber.server.close()


@pytest.fixture
async def client() -> AsyncIterator[LeanClient]:
    lean = LeanClient(LOOPBACK, timeouts=FAST)
    yield lean
    await lean.aclose()


async def eventually(condition: Callable[[], bool]) -> None:
    await until(condition, seconds=10.0, step=0.005)


# --- requests and keep-alive -------------------------------------------------------------------


async def test_the_request_goes_in_one_piece_and_the_connection_is_kept(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    subscriber = await serve(answering(OK))
    first = await client.post(subscriber.url + "?a=1", b'{"n": 1}', HEADERS)
    second = await client.post(subscriber.url, b'{"n": 2}', HEADERS)
    assert first == (200, b"ok") and second == (200, b"ok")
    assert first.is_success
    assert subscriber.connections == 1
    assert [r.connection for r in subscriber.requests] == [0, 0]
    assert subscriber.requests[0].head == (
        b"POST /hook?a=1 HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{subscriber.port}\r\n".encode()
        + b"Content-Length: 8\r\n"
        b"Content-Type: application/json\r\n"
        b"webhook-id: evt_1\r\n\r\n"
    )
    assert subscriber.requests[1].body == b'{"n": 2}'
    assert client.open_connections == 1 and client.idle_connections == 1


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/ok/sp%7Cpipe?a=b|c", b"/ok/sp%7Cpipe?a=b|c"),  # as stored: as registered
        ("/a b/\u00e9?q=x y", b"/a%20b/%C3%A9?q=x%20y"),  # what cannot go on the wire
    ],
)
async def test_the_request_target_is_the_url_as_httpx_would_send_it(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient, path: str, target: bytes
) -> None:
    """A `|` in a subscription's query (stored as written, httpx's normal form) was sent
    encoded: the subscriber got another URL than the one it registered (found by the webhook
    hunt)."""
    subscriber = await serve(answering(OK))
    url = f"http://127.0.0.1:{subscriber.port}{path}"
    assert httpx.URL(url).raw_path == target
    assert await client.post(url, b"1", HEADERS) == (200, b"ok")
    assert subscriber.requests[0].head.startswith(b"POST " + target + b" HTTP/1.1\r\n")


async def test_an_idle_connection_the_server_closed_is_not_reused(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    # The server keeps the connection "alive" by the headers, then closes it once idle.
    subscriber = await serve(answering(OK, close=True))
    assert await client.post(subscriber.url, b"1", HEADERS) == (200, b"ok")
    await eventually(lambda: client.idle_connections == 0)  # noticed while idle
    assert await client.post(subscriber.url, b"2", HEADERS) == (200, b"ok")
    assert [r.connection for r in subscriber.requests] == [0, 1]


async def test_a_connection_closed_at_once_is_checked_before_reuse(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    # No pause between the two requests: the socket check finds the close (or, if the close
    # lands during the send, the request goes again on a new connection).
    subscriber = await serve(answering(OK, close=True))
    for n in range(5):
        assert await client.post(subscriber.url, b"%d" % n, HEADERS) == (200, b"ok")
    assert [r.connection for r in subscriber.requests] == [0, 1, 2, 3, 4]


async def test_a_request_the_server_drops_on_a_reused_connection_goes_once_more(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    async def drop_second(request: Received, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 0 and len(subscriber.requests) == 2:
            return False  # closed with no answer, as if the idle close raced the request
        writer.write(OK)
        return True

    subscriber = await serve(drop_second)
    assert await client.post(subscriber.url, b"1", HEADERS) == (200, b"ok")
    assert await client.post(subscriber.url, b"2", HEADERS) == (200, b"ok")
    sent = [(r.connection, r.body) for r in subscriber.requests]
    assert sent == [(0, b"1"), (0, b"2"), (1, b"2")]


async def test_a_new_connection_closed_without_an_answer_fails_once(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    async def hang_up(request: Received, writer: asyncio.StreamWriter) -> bool:
        return False

    subscriber = await serve(hang_up)
    with pytest.raises(DeliveryFailed) as caught:
        await client.post(subscriber.url, b"1", HEADERS)
    assert str(caught.value) == (
        "RemoteProtocolError: the server closed the connection without answering"
    )
    assert len(subscriber.requests) == 1
    assert client.open_connections == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_a_connection_the_server_will_close_is_not_reused(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient, answer: bytes
) -> None:
    subscriber = await serve(answering(answer))
    assert await client.post(subscriber.url, b"1", HEADERS) == (200, b"ok")
    assert await client.post(subscriber.url, b"2", HEADERS) == (200, b"ok")
    assert [r.connection for r in subscriber.requests] == [0, 1]
    assert 0 in subscriber.ended  # closed by the client, not left open


async def test_idle_connections_expire(serve: Callable[..., Awaitable[Subscriber]]) -> None:
    subscriber = await serve(answering(OK))
    lean = LeanClient(LOOPBACK, timeouts=FAST, idle_expiry=0.05)
    try:
        await lean.post(subscriber.url, b"1", HEADERS)
        await asyncio.sleep(0.1)
        await lean.post(subscriber.url, b"2", HEADERS)
    finally:
        await lean.aclose()
    assert [r.connection for r in subscriber.requests] == [0, 1]
    await eventually(lambda: 0 in subscriber.ended)


# --- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
            b"hello",
            True,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        # Neither Content-Length nor chunked: the body ends when the server closes.
        (b"HTTP/1.1 200 OK\r\n\r\nhello", b"hello", False),
    ],
    ids=["content-length", "chunked", "no-body", "until-close"],
)
async def test_bodies_of_every_framing(
    serve: Callable[..., Awaitable[Subscriber]],
    client: LeanClient,
    answer: bytes,
    body: bytes,
    reused: bool,
) -> None:
    subscriber = await serve(answering(answer, close=not reused))
    assert await client.post(subscriber.url, b"1", HEADERS) == (int(answer[9:12]), body)
    assert await client.post(subscriber.url, b"2", HEADERS) == (int(answer[9:12]), body)
    assert [r.connection for r in subscriber.requests] == ([0, 0] if reused else [0, 1])


async def test_a_body_past_the_cap_is_cut_and_its_connection_closed(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    big = bytes(range(256)) * 40  # 10240 bytes
    subscriber = await serve(
        answering(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big))
    )
    reply = await client.post(subscriber.url, b"1", HEADERS)
    assert reply.status_code == 500 and not reply.is_success
    assert reply.body == big[:RESPONSE_READ_CAP]
    await client.post(subscriber.url, b"2", HEADERS)
    assert [r.connection for r in subscriber.requests] == [0, 1]


async def test_interim_answers_are_skipped(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    subscriber = await serve(
        answering(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated"
        )
    )
    assert await client.post(subscriber.url, b"1", HEADERS) == (201, b"created")
    assert await client.post(subscriber.url, b"2", HEADERS) == (201, b"created")
    assert subscriber.connections == 1


async def test_redirects_are_answers_not_followed(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    redirect = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /other\r\nContent-Length: 0\r\n\r\n"
    subscriber = await serve(answering(redirect))
    reply = await client.post(subscriber.url, b"1", HEADERS)
    assert reply == (307, b"") and not reply.is_success
    assert len(subscriber.requests) == 1


async def test_bytes_after_the_answer_keep_the_answer_but_not_the_connection(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    subscriber = await serve(answering(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"))
    assert await client.post(subscriber.url, b"1", HEADERS) == (200, b"ok")
    assert await client.post(subscriber.url, b"2", HEADERS) == (200, b"ok")
    assert [r.connection for r in subscriber.requests] == [0, 1]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTQ/1.1 200 OK\r\n\r\n", "RemoteProtocolError: the answer is not valid HTTP/1.1"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "RemoteProtocolError: the answer is not valid HTTP/1.1"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "RemoteProtocolError: the server closed the connection before its answer was complete",
        ),
    ],
    ids=["status-line", "status-code", "truncated"],
)
async def test_broken_answers_fail_clearly(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient, answer: bytes, message: str
) -> None:
    subscriber = await serve(answering(answer, close=True))
    with pytest.raises(DeliveryFailed) as caught:
        await client.post(subscriber.url, b"1", HEADERS)
    assert str(caught.value).startswith(message)
    assert not caught.value.timed_out
    assert client.open_connections == 0


def endless(first: bytes, then: bytes) -> Respond:
    """Sends ``first``, then ``then`` over and over until the client goes (or 8 MB)."""

    async def respond(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(first)
        for _ in range(8 * 1024 * 1024 // len(then)):
            writer.write(then)
            await writer.drain()
        return False

    return respond


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: ", b"a" * 65536),  # one header without end
        (b"HTTP/1.1 200 OK\r\n", b"X-Many: header\r\n" * 1024),  # headers without end
        (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 1024),  # interim answers without end
    ],
    ids=["one-header", "many-headers", "interim-answers"],
)
async def test_a_head_without_end_fails_at_its_cap(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient, first: bytes, then: bytes
) -> None:
    """The head of an answer had no cap: a subscriber sending one header without end held
    the event loop for seconds at a time (httptools copies a growing header value) and grew
    the process by hundreds of MB per attempt, for the attempt's whole 30 s (found by the
    webhook hunt)."""
    subscriber = await serve(endless(first, then))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeliveryFailed) as caught:
        await client.post(subscriber.url, b"1", HEADERS)
    assert str(caught.value) == (
        f"RemoteProtocolError: the answer's head (status line and headers) is over "
        f"{MAX_HEAD_BYTES} bytes"
    )
    assert loop.time() - started < FAST.read  # failed at the cap, not by a timeout
    assert client.open_connections == 0


async def test_a_large_head_within_the_cap_is_read(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    headers = b"".join(b"X-Header-%d: %s\r\n" % (i, b"v" * 100) for i in range(500))
    assert len(headers) < MAX_HEAD_BYTES - 1024
    subscriber = await serve(
        answering(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
            + headers
            + b"Content-Length: 2\r\n\r\nok"
        )
    )
    assert await client.post(subscriber.url, b"1", HEADERS) == (200, b"ok")


# --- failures and timeouts ----------------------------------------------------------------------


async def test_a_refused_connection_is_a_connect_error(client: LeanClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = sock.getsockname()[1]
        with pytest.raises(DeliveryFailed) as caught:
            await client.post(f"http://127.0.0.1:{port}/hook", b"1", HEADERS)
    assert caught.value.kind == "ConnectError"
    assert str(caught.value).startswith("ConnectError: ")
    assert client.open_connections == 0


async def test_a_silent_server_times_out_and_its_connection_is_closed(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    async def silent(request: Received, writer: asyncio.StreamWriter) -> bool:
        return True  # reads on, never answers

    subscriber = await serve(silent)
    lean = LeanClient(LOOPBACK, timeouts=Timeouts(connect=30.0, read=0.2, write=30.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeliveryFailed) as caught:
        await lean.post(subscriber.url, b"1", HEADERS)
    # The read timeout ended it (the others are far longer); only a hang reaches the bound.
    assert 0.15 < loop.time() - started < 10
    assert str(caught.value) == "ReadTimeout: no answer within 0.2 s"
    assert caught.value.timed_out
    assert lean.open_connections == 0
    await eventually(lambda: subscriber.ended == [0])
    await lean.aclose()


async def test_a_server_that_reads_nothing_is_a_write_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never reads

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited when accepted
    listening.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(deaf, sock=listening)
    port = listening.getsockname()[1]
    lean = LeanClient(LOOPBACK, timeouts=Timeouts(connect=2.0, read=2.0, write=0.2))
    try:
        with pytest.raises(DeliveryFailed) as caught:
            await lean.post(f"http://127.0.0.1:{port}/", b"x" * 16_000_000, HEADERS)
        message = "WriteTimeout: the subscriber took none of the request for 0.2 s"
        assert str(caught.value) == message
        assert lean.open_connections == 0
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await lean.aclose()


async def test_a_line_break_in_a_header_is_refused_before_sending(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    subscriber = await serve(answering(OK))
    with pytest.raises(DeliveryFailed, match="line break"):
        await client.post(subscriber.url, b"1", [("X-Note", "a\r\nHost: elsewhere")])
    assert subscriber.connections == 0


@pytest.mark.parametrize(
    ("url", "kind"),
    [("ftp://example.com/", "UnsupportedProtocol"), ("http://exa mple.com/", "InvalidURL")],
)
async def test_unusable_urls_fail_without_connecting(
    client: LeanClient, url: str, kind: str
) -> None:
    with pytest.raises(DeliveryFailed) as caught:
        await client.post(url, b"1", HEADERS)
    assert caught.value.kind == kind


# --- the SSRF guard -----------------------------------------------------------------------------


async def test_a_blocked_destination_fails_with_the_reason_and_is_never_connected(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    subscriber = await serve(answering(OK))
    lean = LeanClient(AddressPolicy(), timeouts=FAST)
    with pytest.raises(DeliveryFailed) as caught:
        await lean.post(subscriber.url, b"1", HEADERS)
    await lean.aclose()
    error = caught.value
    assert error.kind == "BlockedConnection"
    assert error.blocked is not None and error.blocked.reason == "a loopback address"
    assert str(error).startswith(
        "BlockedConnection: The webhook URL points to 127.0.0.1, a loopback address; "
    )
    assert "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8" in str(error)
    assert subscriber.connections == 0


# --- the pool -----------------------------------------------------------------------------------


async def test_the_pool_caps_open_connections(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    release = asyncio.Event()
    subscriber = await serve(answering_after(release))
    lean = LeanClient(LOOPBACK, timeouts=FAST, max_connections=2)
    posts = [asyncio.create_task(lean.post(subscriber.url, b"%d" % n, HEADERS)) for n in range(5)]
    await eventually(lambda: len(subscriber.requests) == 2)
    await asyncio.sleep(0.05)
    assert subscriber.connections == 2 and len(subscriber.requests) == 2  # the rest wait
    assert lean.open_connections == 2
    release.set()
    assert await asyncio.gather(*posts) == [(200, b"ok")] * 5
    assert subscriber.connections == 2  # the waiting requests took the freed connections
    await lean.aclose()


async def test_waiting_for_a_connection_times_out(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    release = asyncio.Event()
    subscriber = await serve(answering_after(release))
    lean = LeanClient(LOOPBACK, timeouts=Timeouts(pool=0.1), max_connections=1)
    first = asyncio.create_task(lean.post(subscriber.url, b"1", HEADERS))
    await eventually(lambda: len(subscriber.requests) == 1)
    with pytest.raises(DeliveryFailed) as caught:
        await lean.post(subscriber.url, b"2", HEADERS)
    assert caught.value.kind == "PoolTimeout" and caught.value.timed_out
    assert caught.value.unsent  # not the subscriber's failure: nothing went to it
    release.set()
    assert await first == (200, b"ok")
    await lean.aclose()


async def test_a_delivery_that_found_no_free_connection_was_not_an_attempt(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    """The dispatcher's result says so, and the record puts the delivery back rather than
    count an attempt against a subscriber that was never asked."""
    release = asyncio.Event()
    subscriber = await serve(answering_after(release))
    lean = LeanClient(LOOPBACK, timeouts=Timeouts(pool=0.1), max_connections=1)
    dispatcher = Dispatcher(cast(Outbox, None), lean, metrics=cast(Any, None))
    first = asyncio.create_task(dispatcher.send(job(subscriber.url)))
    await eventually(lambda: len(subscriber.requests) == 1)
    waited = await dispatcher.send(job(subscriber.url))
    assert not waited.sent and waited.status_code is None
    assert waited.error is not None and waited.error.startswith("PoolTimeout: ")
    release.set()
    assert (await first).sent
    refused = await dispatcher.send(job("http://127.0.0.1:9/hook"))  # the discard port: closed
    assert refused.sent and refused.error is not None and refused.error.startswith("Connect")
    assert len(subscriber.requests) == 1
    await lean.aclose()


async def test_at_the_cap_an_idle_connection_to_another_origin_makes_room(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    one, two = await serve(answering(OK)), await serve(answering(OK))
    lean = LeanClient(LOOPBACK, timeouts=FAST, max_connections=1)
    await lean.post(one.url, b"1", HEADERS)
    await lean.post(two.url, b"2", HEADERS)
    assert lean.open_connections == 1
    await eventually(lambda: one.ended == [0])
    await lean.aclose()


async def test_the_idle_pool_is_capped(serve: Callable[..., Awaitable[Subscriber]]) -> None:
    release = asyncio.Event()
    subscriber = await serve(answering_after(release))
    lean = LeanClient(LOOPBACK, timeouts=FAST, max_idle_connections=2)
    posts = [asyncio.create_task(lean.post(subscriber.url, b"%d" % n, HEADERS)) for n in range(4)]
    await eventually(lambda: len(subscriber.requests) == 4)
    release.set()
    await asyncio.gather(*posts)
    assert lean.idle_connections == 2 and lean.open_connections == 2
    await eventually(lambda: len(subscriber.ended) == 2)
    await lean.aclose()


async def test_aclose_closes_every_connection_and_fails_what_waits(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    async def slow_second(request: Received, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1:
            await asyncio.sleep(10)
        writer.write(OK)
        return True

    subscriber = await serve(slow_second)
    lean = LeanClient(LOOPBACK, timeouts=FAST)
    await lean.post(subscriber.url, b"1", HEADERS)  # idle afterwards
    first = asyncio.create_task(lean.post(subscriber.url, b"2", HEADERS))  # reuses it
    second = asyncio.create_task(lean.post(subscriber.url, b"3", HEADERS))  # a new one, held
    await eventually(lambda: len(subscriber.requests) == 3)
    assert await first == (200, b"ok")
    await lean.aclose()
    with pytest.raises(DeliveryFailed) as caught:
        await second
    assert caught.value.kind == "ClientClosed"
    await eventually(lambda: 0 in subscriber.ended)
    assert lean.open_connections == 0
    with pytest.raises(DeliveryFailed, match="closed"):
        await lean.post(subscriber.url, b"4", HEADERS)


async def test_a_cancelled_request_closes_its_connection(
    serve: Callable[..., Awaitable[Subscriber]], client: LeanClient
) -> None:
    release = asyncio.Event()
    subscriber = await serve(answering_after(release))
    posting = asyncio.create_task(client.post(subscriber.url, b"1", HEADERS))
    await eventually(lambda: len(subscriber.requests) == 1)  # sent; the answer is held
    posting.cancel()  # as the dispatcher's attempt deadline does
    with pytest.raises(asyncio.CancelledError):
        await posting
    assert client.open_connections == 0
    release.set()
    assert await client.post(subscriber.url, b"2", HEADERS) == (200, b"ok")
    assert [r.connection for r in subscriber.requests] == [0, 1]


# --- TLS ----------------------------------------------------------------------------------------


class Resolver:
    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        return self.answers[host]


async def test_https_checks_the_certificate_against_the_url_host(
    serve: Callable[..., Awaitable[Subscriber]], certificate: tuple[Path, Path]
) -> None:
    _, cert = certificate
    served = serving_tls(certificate)
    subscriber = await serve(answering(OK), served)
    trusting = ssl.create_default_context(cafile=str(cert))
    resolver = Resolver({"hooks.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    lean = LeanClient(LOOPBACK, resolver=resolver, timeouts=FAST, ssl_context=trusting)
    try:
        url = f"https://hooks.test:{subscriber.port}/hook"
        assert await lean.post(url, b"1", HEADERS) == (200, b"ok")
        assert await lean.post(url, b"2", HEADERS) == (200, b"ok")
        assert subscriber.connections == 1  # kept alive over TLS
        assert f"Host: hooks.test:{subscriber.port}\r\n".encode() in subscriber.requests[0].head

        # The same server under another name: its certificate does not match.
        with pytest.raises(DeliveryFailed) as caught:
            await lean.post(f"https://other.test:{subscriber.port}/hook", b"3", HEADERS)
        assert caught.value.kind == "ConnectError"
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert resolver.calls == ["hooks.test", "other.test"]
    finally:
        await lean.aclose()


async def test_https_trusts_certifi_roots_by_default(
    serve: Callable[..., Awaitable[Subscriber]], certificate: tuple[Path, Path]
) -> None:
    subscriber = await serve(answering(OK), serving_tls(certificate))
    lean = LeanClient(LOOPBACK, resolver=Resolver({"hooks.test": ["127.0.0.1"]}), timeouts=FAST)
    with pytest.raises(DeliveryFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await lean.post(f"https://hooks.test:{subscriber.port}/hook", b"1", HEADERS)
    await lean.aclose()


# --- the dispatcher's record of an attempt -----------------------------------------------------


def job(url: str) -> DeliveryJob:
    return DeliveryJob(
        delivery_pk=1,
        delivery_id="dlv_1",
        subscription_pk=1,
        url=url,
        signing_secrets=("whsec_" + "A" * 32,),
        event_id="evt_1",
        body=b'{"id": "evt_1"}',
    )


async def test_the_dispatcher_records_status_body_and_failures(
    serve: Callable[..., Awaitable[Subscriber]],
) -> None:
    subscriber = await serve(answering(b"HTTP/1.1 410 Gone\r\nContent-Length: 4\r\n\r\ngone"))
    outbox = cast(Outbox, None)  # send() records nothing
    lean = LeanClient(LOOPBACK, timeouts=FAST)
    answered = await Dispatcher(outbox, lean, metrics=cast(Any, None)).send(job(subscriber.url))
    blocked = await Dispatcher(outbox, LeanClient(AddressPolicy()), metrics=cast(Any, None)).send(
        job(subscriber.url)
    )
    await lean.aclose()
    assert answered.status_code == 410
    assert (answered.response_body, answered.error) == ("gone", "HTTP 410")
    head = subscriber.requests[0].head
    for name in (b"webhook-id: evt_1", b"webhook-signature: v1,", b"User-Agent: TaskRelay"):
        assert name in head
    assert blocked.status_code is None
    assert blocked.error is not None
    assert blocked.error.startswith("BlockedConnection: The webhook URL points to 127.0.0.1,")
    assert len(subscriber.requests) == 1


async def test_an_attempt_past_its_deadline_is_recorded_as_a_read_timeout(
    serve: Callable[..., Awaitable[Subscriber]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt's whole deadline (a subscriber trickling its answer a byte at a time)
    was recorded without the kind of failure every other error names."""

    async def trickle(request: Received, writer: asyncio.StreamWriter) -> bool:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)
        return False

    monkeypatch.setattr("service.dispatcher.ATTEMPT_DEADLINE_SECONDS", 0.5)
    subscriber = await serve(trickle)
    lean = LeanClient(LOOPBACK, timeouts=FAST)
    try:
        result = await Dispatcher(cast(Outbox, None), lean, metrics=cast(Any, None)).send(
            job(subscriber.url)
        )
    finally:
        await lean.aclose()
    assert result.status_code is None
    assert result.error == "ReadTimeout: no complete answer within 0.5 s"


# --- the httpx adapter --------------------------------------------------------------------------


async def test_the_httpx_adapter_caps_the_body_and_maps_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/down":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/slow":
            raise httpx.ReadTimeout("", request=request)
        if request.url.path == "/crowded":
            raise httpx.PoolTimeout("", request=request)
        return httpx.Response(302, content=b"x" * 10_000, headers={"Location": "/elsewhere"})

    adapter = HttpxClient(httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    reply = await adapter.post("http://hooks.test/hook", b"1", HEADERS)
    assert reply == (302, b"x" * RESPONSE_READ_CAP)
    with pytest.raises(DeliveryFailed) as down:
        await adapter.post("http://hooks.test/down", b"1", HEADERS)
    assert str(down.value) == "ConnectError: connection refused"
    with pytest.raises(DeliveryFailed) as slow:
        await adapter.post("http://hooks.test/slow", b"1", HEADERS)
    assert str(slow.value) == "ReadTimeout: timed out" and slow.value.timed_out
    assert not slow.value.unsent
    with pytest.raises(DeliveryFailed) as crowded:
        await adapter.post("http://hooks.test/crowded", b"1", HEADERS)
    assert crowded.value.kind == "PoolTimeout" and crowded.value.unsent
    await adapter.aclose()


# --- on uvloop ----------------------------------------------------------------------------------


def test_the_client_works_on_uvloop(certificate: tuple[Path, Path]) -> None:
    """``taskrelay serve`` runs on uvloop when it is installed (uvicorn's default): its
    transports take a new protocol, start TLS and report their socket as asyncio's do."""
    uvloop = pytest.importorskip("uvloop")
    _, cert = certificate
    served = serving_tls(certificate)

    async def scenario() -> None:
        async def silent(request: Received, writer: asyncio.StreamWriter) -> bool:
            return True

        plain = await start_subscriber(answering(OK))
        until_close = await start_subscriber(
            answering(b"HTTP/1.1 200 OK\r\n\r\nuntil-close", close=True)
        )
        closing = await start_subscriber(answering(OK, close=True))
        secure = await start_subscriber(answering(OK), served)
        quiet = await start_subscriber(silent)
        resolver = Resolver({"hooks.test": ["127.0.0.1"]})
        trusting = ssl.create_default_context(cafile=str(cert))
        timeouts = Timeouts(connect=2.0, read=0.2, write=2.0)
        lean = LeanClient(LOOPBACK, resolver=resolver, timeouts=timeouts, ssl_context=trusting)
        for n in range(3):
            assert await lean.post(plain.url, b"%d" % n, HEADERS) == (200, b"ok")
            assert await lean.post(until_close.url, b"%d" % n, HEADERS) == (200, b"until-close")
        for n in range(3):
            assert await lean.post(closing.url, b"%d" % n, HEADERS) == (200, b"ok")
        for n in range(2):
            url = f"https://hooks.test:{secure.port}/hook"
            assert await lean.post(url, b"%d" % n, HEADERS) == (200, b"ok")
        with pytest.raises(DeliveryFailed, match="ReadTimeout"):
            await lean.post(quiet.url, b"1", HEADERS)
        await lean.aclose()
        assert [r.connection for r in plain.requests] == [0, 0, 0]
        assert [r.connection for r in until_close.requests] == [0, 1, 2]
        assert [r.connection for r in closing.requests] == [0, 1, 2]
        assert [r.connection for r in secure.requests] == [0, 0]
        for subscriber in (plain, until_close, closing, secure, quiet):
            assert subscriber.server is not None
            subscriber.server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
