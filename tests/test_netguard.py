"""SSRF protection for webhook URLs: the policy, the URL check, resolution, and deliveries
through the guarded backend (the webhook client, service/webclient.py, connects only that way).

No test touches real DNS or the internet: every resolver is a fake. The delivery tests talk to
a tiny HTTP server on 127.0.0.1 that counts the connections it accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpcore
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ValidationFailed
from service.netguard import (
    AddressPolicy,
    BlockedConnection,
    BlockedDestination,
    DestinationUnresolvable,
    GuardedNetworkBackend,
    check_url,
    parse_networks,
    resolve_and_check,
    system_resolver,
)
from service.webclient import DeliveryFailed, LeanClient, _parse_target
from tests.servers import serving_tls

PUBLIC = AddressPolicy()
LOOPBACK_ALLOWED = AddressPolicy(parse_networks("127.0.0.0/8,::1/128"))
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700::1111"


class FakeResolver:
    """Answers from a table; ``turns`` hands out one answer per call, repeating the last."""

    def __init__(
        self,
        answers: Mapping[str, Sequence[str] | Exception] | None = None,
        *,
        turns: Mapping[str, list[Sequence[str]]] | None = None,
    ) -> None:
        self.answers = dict(answers or {})
        self.turns = {host: list(answers) for host, answers in (turns or {}).items()}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if host in self.turns:
            turns = self.turns[host]
            return turns.pop(0) if len(turns) > 1 else turns[0]
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Subscriber:
    """A minimal HTTP/1.1 server on 127.0.0.1 that records what reaches it."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def start(self, context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            self.requests.append(head + body)
            writer.write(self.answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def subscriber() -> AsyncIterator[Subscriber]:
    server = Subscriber()
    await server.start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def client(
    policy: AddressPolicy, resolver: FakeResolver, **kwargs: Any
) -> AsyncIterator[LeanClient]:
    lean = LeanClient(policy, resolver=resolver, **kwargs)
    try:
        yield lean
    finally:
        await lean.aclose()


# --- parse_networks ----------------------------------------------------------------------------


def test_parse_networks_reads_a_comma_separated_list() -> None:
    assert parse_networks(" 127.0.0.0/8, ::1/128 ,,10.1.2.3") == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.2.3/32"),
    )
    assert parse_networks("") == ()
    assert AddressPolicy.from_setting("::1/128") == AddressPolicy(parse_networks("::1"))


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("localhost", "not a network"),
        ("127.0.0.0/33", "not a network"),
        ("127.0.0.1/8", "did you mean 127.0.0.0/8"),
        ("::1/129", "not a network"),
        ("10.0.0.0 /8", "not a network"),
    ],
)
def test_parse_networks_explains_bad_entries(text: str, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        parse_networks(text)


# --- AddressPolicy.check_ip --------------------------------------------------------------------

BLOCKED_ADDRESSES = {
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "100.64.0.1": "carrier-grade NAT",
    "169.254.169.254": "metadata",
    "169.254.1.1": "link-local",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "unspecified",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "255.255.255.255": "broadcast",
    "240.0.0.1": "reserved",
    "192.0.0.8": "IETF protocol",
    "192.0.2.1": "documentation",
    "198.51.100.7": "documentation",
    "203.0.113.9": "documentation",
    "198.18.0.1": "benchmarking",
    "100.100.100.200": "metadata",
    "168.63.129.16": "metadata",
    "::1": "loopback",
    "::": "unspecified",
    "fc00::1": "unique local",
    "fd12:3456::1": "unique local",
    "fd00:ec2::254": "metadata",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fec0::1": "site-local",
    "ff02::1": "multicast",
    "2001:db8::1": "documentation",
    "3fff::1": "documentation",
    "2001::1": "Teredo",
    "100::1": "discard",
    "64:ff9b:1::1": "NAT64",
    "5f00::1": "segment-routing",
    "::1:0:0:1": "reserved",
    # IPv6 forms judged by the IPv4 address they embed
    "::ffff:127.0.0.1": "embeds 127.0.0.1, a loopback",
    "::ffff:10.0.0.1": "embeds 10.0.0.1, a private",
    "::ffff:169.254.169.254": "embeds 169.254.169.254, the cloud metadata",
    "::127.0.0.1": "embeds 127.0.0.1",
    "::10.0.0.1": "embeds 10.0.0.1",
    "64:ff9b::7f00:1": "embeds 127.0.0.1",
    "64:ff9b::a00:1": "embeds 10.0.0.1",
    "2002:7f00:1::1": "embeds 127.0.0.1",
    "2002:a9fe:a9fe::1": "embeds 169.254.169.254",
}


@pytest.mark.parametrize(("address", "reason"), BLOCKED_ADDRESSES.items())
def test_check_ip_refuses_non_public_addresses(address: str, reason: str) -> None:
    with pytest.raises(BlockedDestination, match=re.escape(reason)) as caught:
        PUBLIC.check_ip(address)
    error = caught.value
    assert isinstance(error, ValidationFailed)
    assert error.status == 400
    assert error.code == "destination_not_allowed"
    assert error.to_dict()["code"] == "destination_not_allowed"


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_V4,
        "8.8.8.8",
        "1.1.1.1",
        PUBLIC_V6,
        "2001:4860:4860::8888",
        f"::ffff:{PUBLIC_V4}",
        "64:ff9b::5db8:d822",
        "2002:5db8:d822::1",
    ],
)
def test_check_ip_lets_public_addresses_through(address: str) -> None:
    PUBLIC.check_ip(address)
    PUBLIC.check_ip(ipaddress.ip_address(address))


def test_allowed_networks_let_local_addresses_through() -> None:
    for address in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"):
        LOOPBACK_ALLOWED.check_ip(address)
    with pytest.raises(BlockedDestination, match="private"):
        LOOPBACK_ALLOWED.check_ip("10.0.0.1")


def test_the_refusal_says_how_to_allow_the_network() -> None:
    with pytest.raises(BlockedDestination) as caught:
        PUBLIC.check_ip("10.0.0.1")
    assert (
        "address is 10.0.0.1, a private address; webhook URLs must be public"
        in caught.value.message
    )
    assert "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS=10.0.0.0/8" in caught.value.message
    assert caught.value.address == "10.0.0.1"
    assert caught.value.reason == "a private address"


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "fd00:ec2::254", "168.63.129.16", "::ffff:169.254.169.254"]
)
def test_metadata_addresses_stay_refused_whatever_is_allowed(address: str) -> None:
    everything = AddressPolicy(parse_networks("0.0.0.0/0,::/0"))
    with pytest.raises(BlockedDestination, match="metadata") as caught:
        everything.check_ip(address)
    assert "ALLOWED_NETWORKS" not in caught.value.message


# --- check_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1/hook", "points to 127.0.0.1, a loopback address"),
        ("http://10.0.0.1:8080/hook", "points to 10.0.0.1, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "the cloud metadata service"),
        ("https://[::1]/hook", "points to ::1, a loopback address"),
        ("http://[0:0:0:0:0:0:0:1]:9000/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "embeds 127.0.0.1"),
        ("http://[::ffff:a9fe:a9fe]/", "cloud metadata"),
        ("http://[fe80::1%25eth0]/", "link-local"),
        ("http://2130706433/", "host 2130706433 means 127.0.0.1, a loopback"),
        ("http://0177.0.0.1/", "host 0177.0.0.1 means 127.0.0.1"),
        ("http://0x7f.1/", "host 0x7f.1 means 127.0.0.1"),
        ("http://0x7f000001/", "means 127.0.0.1"),
        ("http://127.1/", "host 127.1 means 127.0.0.1"),
        ("http://127.0.0.1./", "means 127.0.0.1"),
        ("http://0/", "means 0.0.0.0, an unspecified"),
        ("http://012.0.0.1/", "means 10.0.0.1, a private"),
        ("http://0xA9.254.169.254/", "cloud metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata"),
        ("http://METADATA.Google.Internal./", "cloud metadata"),
    ],
)
def test_check_url_refuses_internal_literals(url: str, fragment: str) -> None:
    with pytest.raises(BlockedDestination) as caught:
        check_url(url, PUBLIC)
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/hook", "must start with https:// or http://, not ftp://"),
        ("file:///etc/passwd", "not file://"),
        ("gopher://example.com/", "not gopher://"),
        ("example.com/hook", "must start with https://"),
        ("//example.com/hook", "must start with https://"),
        ("http://", "no host"),
        ("http:///hook", "no host"),
        ("http://user:secret@example.com/", "user name or password"),
        ("http://user@example.com/", "user name or password"),
        ("http://example.com:0/", "port 0 is not between 1 and 65535"),
        ("http://example.com:65536/", "not valid"),
        ("http://example.com:http/", "not valid"),
        ("http://exa mple.com/", "spaces"),
        ("http://example.com/\r\nX-Injected: 1", "control characters"),
        ("http://example.com\\@127.0.0.1/", "backslashes"),
        ("http://1.2.3.4.5/", "looks like an IPv4 address"),
        ("http://08.0.0.1/", "looks like an IPv4 address"),
        ("http://0x/", "looks like an IPv4 address"),
        ("http://example.com.123/", "looks like an IPv4 address"),
        ("http://256.1.1.1/", "out of range"),
        ("http://1.16777216/", "out of range"),
        ("http://4294967296/", "out of range"),
        ("http://%31%32%37.0.0.1/", "IPv4"),
        ("http://exa%6dple.com/", "not a valid host name"),
        ("http://[::1/", "not valid"),
        ("http://" + "a" * 2050 + ".com/", "the limit is 2048"),
        # Within the limit as sent, over it percent-encoded, as it would be stored and sent.
        ("http://example.com/" + "\u00fc" * 1000, "once percent-encoded"),
        # Labels that are not punycode, or decode to what IDNA 2008 does not allow.
        ("https://xn--ls8h.la/hook", "xn--ls8h.la is not a valid internationalised domain"),
        ("https://xn--a.example.com/hook", "xn--a.example.com is not a valid international"),
        ("https://xn--", "xn-- is not a valid internationalised domain name"),
        ("HTTP://XN--/x", "not a valid internationalised domain name"),
        ("http://example.com/\ud800", "unpaired UTF-16 surrogate"),
    ],
)
def test_check_url_refuses_malformed_urls(url: str, fragment: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_url(url, PUBLIC)
    assert not isinstance(caught.value, BlockedDestination)
    assert fragment in caught.value.message
    assert caught.value.details == [{"field": "url", "message": caught.value.message}]


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("https://hooks.example.com/taskrelay", "https://hooks.example.com/taskrelay"),
        ("HTTPS://Hooks.Example.COM:443/x?y=1", "https://hooks.example.com/x?y=1"),
        ("http://hooks.example.com:8080/a%20b", "http://hooks.example.com:8080/a%20b"),
        ("https://bücher.example/hook", "https://xn--bcher-kva.example/hook"),
        (f"http://{PUBLIC_V4}/hook", f"http://{PUBLIC_V4}/hook"),
        ("http://0x5db8d822/hook", f"http://{PUBLIC_V4}/hook"),
        ("http://93.184.55330/", f"http://{PUBLIC_V4}/"),
        ("http://[2606:4700:0:0:0:0:0:1111]:8443/h", f"http://[{PUBLIC_V6}]:8443/h"),
        (f"https://[{PUBLIC_V6}]/", f"https://[{PUBLIC_V6}]/"),
    ],
)
def test_check_url_accepts_and_normalises_public_urls(url: str, normalised: str) -> None:
    assert check_url(url, PUBLIC) == normalised


# Pieces odd URLs are made of: IDNA and punycode, IP literals in their many forms, percent
# signs, ports, Unicode that case-folds or normalises into something else, NUL, surrogates.
_URL_PIECES = [
    *("xn--", "xn--a", "xn--ls8h", "xn--zca", "XN--80AK6AA92E", "xn--bcher-kva", "example"),
    *(".", "..", "com", "[", "]", ":", "::1", "::ffff:1.2.3.4", "fe80::1%25eth0", "v1.x"),
    *("%", "%25", "%00", "%41", "@", "#", "?", "/", "\\", "1", "0x", "0177", "255", "1e1"),
    *("ß", "例え", "é", "e\u0301", "\u200b", "\u3002", "\uff0e", "\uff45", "\u00ad", "Ⅻ", "ﬀ"),
    *("\u2488", "\u0660", "\U0001f4a9", "-", "_", "a" * 64, "\x00", "\ud800", " "),
]
_SCHEMES = ["https://", "http://", "HTTP://", "hTTps://", "https:", "https:///", "ftp://", ""]
_TAILS = ["", "/", "/a?b=c", ":80", ":0080", ":65536", ":", ":x", "/%", "#f", ":443/x", "/%zz"]


@given(
    st.builds(
        "".join,
        st.tuples(
            st.sampled_from(_SCHEMES),
            st.lists(st.sampled_from(_URL_PIECES) | st.text(max_size=3), max_size=6).map("".join),
            st.sampled_from(_TAILS) | st.text(max_size=4),
        ),
    )
)
@settings(max_examples=3000, derandomize=True, database=None, deadline=None)
def test_check_url_refuses_anything_odd_with_a_validation_error_only(url: str) -> None:
    """Whatever the string, check_url returns a URL or raises ValidationFailed (a 400 naming
    the field), never another error (a 500): IDNA's errors escaped it for invalid punycode.
    And a URL it accepts is one the webhook client can send to."""
    try:
        normalised = check_url(url, PUBLIC)
    except ValidationFailed as exc:
        assert exc.details and exc.details[0]["field"] == "url"
        return
    _parse_target(normalised)  # DeliveryFailed would mean a stored URL no delivery can use


def test_check_url_honours_allowed_networks() -> None:
    assert check_url("http://127.1:8000/hook", LOOPBACK_ALLOWED) == "http://127.0.0.1:8000/hook"
    assert check_url("http://[::1]:8000/hook", LOOPBACK_ALLOWED) == "http://[::1]:8000/hook"
    with pytest.raises(BlockedDestination):
        check_url("http://10.0.0.1/hook", LOOPBACK_ALLOWED)


def test_check_url_leaves_names_to_resolution() -> None:
    # .test names resolve nowhere: passing shows check_url does no DNS.
    assert check_url("https://internal.test/hook", PUBLIC) == "https://internal.test/hook"


# --- resolve_and_check -------------------------------------------------------------------------


async def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    resolver = FakeResolver({"hooks.example.com": ["10.0.0.1"]})
    with pytest.raises(BlockedDestination) as caught:
        await resolve_and_check("hooks.example.com", 443, PUBLIC, resolver)
    message = caught.value.message
    assert "The webhook host hooks.example.com resolves to 10.0.0.1, a private address" in message
    assert "allow the network with TASKRELAY_WEBHOOK_ALLOWED_NETWORKS" in message
    assert caught.value.host == "hooks.example.com"
    assert resolver.calls == [("hooks.example.com", 443)]


@pytest.mark.parametrize(
    "answers",
    [
        [PUBLIC_V4, "127.0.0.1"],
        ["10.0.0.1", PUBLIC_V4],
        [PUBLIC_V6, "::1"],
        [PUBLIC_V4, "::ffff:169.254.169.254"],
        [PUBLIC_V4, "fd00:ec2::254"],
    ],
)
async def test_one_internal_address_among_public_ones_refuses_the_host(answers: list[str]) -> None:
    resolver = FakeResolver({"mixed.example.com": answers})
    with pytest.raises(BlockedDestination, match=r"one of 2 addresses"):
        await resolve_and_check("mixed.example.com", 443, PUBLIC, resolver)


async def test_public_answers_are_returned_in_order_without_duplicates() -> None:
    resolver = FakeResolver({"hooks.example.com": [PUBLIC_V6, PUBLIC_V4, PUBLIC_V6]})
    addresses = await resolve_and_check("hooks.example.com", 443, PUBLIC, resolver)
    assert addresses == [PUBLIC_V6, PUBLIC_V4]


async def test_allowed_networks_apply_to_resolved_addresses() -> None:
    resolver = FakeResolver({"localhost": ["127.0.0.1", "::1"]})
    assert await resolve_and_check("localhost", 80, LOOPBACK_ALLOWED, resolver) == [
        "127.0.0.1",
        "::1",
    ]
    only_v4 = AddressPolicy(parse_networks("127.0.0.0/8"))
    with pytest.raises(BlockedDestination, match="resolves to ::1"):
        await resolve_and_check("localhost", 80, only_v4, resolver)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
    ],
)
async def test_ip_literals_are_checked_without_a_lookup(host: str, address: str) -> None:
    resolver = FakeResolver()
    with pytest.raises(BlockedDestination) as caught:
        await resolve_and_check(host, 80, PUBLIC, resolver)
    assert caught.value.address == address
    assert resolver.calls == []
    assert await resolve_and_check(host, 80, LOOPBACK_ALLOWED, resolver) == [address]


async def test_metadata_names_are_refused_before_any_lookup() -> None:
    resolver = FakeResolver()
    with pytest.raises(BlockedDestination, match="cloud metadata"):
        await resolve_and_check("Metadata.Google.Internal.", 80, LOOPBACK_ALLOWED, resolver)
    assert resolver.calls == []


@pytest.mark.parametrize(
    "answer", [socket.gaierror(socket.EAI_NONAME, "Name or service not known"), [], ["nonsense"]]
)
async def test_names_without_usable_answers_are_unresolvable(answer: Any) -> None:
    resolver = FakeResolver({"nowhere.example.com": answer})
    with pytest.raises(DestinationUnresolvable) as caught:
        await resolve_and_check("nowhere.example.com", 443, PUBLIC, resolver)
    assert caught.value.code == "destination_unresolvable"
    assert not isinstance(caught.value, BlockedDestination)


async def test_each_check_resolves_again() -> None:
    resolver = FakeResolver(turns={"rebind.example.com": [[PUBLIC_V4], ["127.0.0.1"]]})
    assert await resolve_and_check("rebind.example.com", 80, PUBLIC, resolver) == [PUBLIC_V4]
    with pytest.raises(BlockedDestination, match=re.escape("resolves to 127.0.0.1")):
        await resolve_and_check("rebind.example.com", 80, PUBLIC, resolver)


async def test_the_system_resolver_reads_numeric_hosts_without_dns() -> None:
    assert await system_resolver("127.0.0.1", 80) == ["127.0.0.1"]


# --- deliveries through the guard (the webhook client) ----------------------------------------


async def test_dns_rebinding_after_registration_is_refused_at_connect_time(
    subscriber: Subscriber,
) -> None:
    url = f"http://rebind.test:{subscriber.port}/hook"
    resolver = FakeResolver(turns={"rebind.test": [[PUBLIC_V4], ["127.0.0.1"]]})

    # Registration: the name is public right now.
    normalised = check_url(url, PUBLIC)
    assert await resolve_and_check("rebind.test", subscriber.port, PUBLIC, resolver)

    # Delivery: the attacker's DNS now answers with loopback.
    async with client(PUBLIC, resolver) as http:
        with pytest.raises(DeliveryFailed) as caught:
            await http.post(normalised, b'{"event": 1}', [])
    error = caught.value
    assert error.kind == "BlockedConnection"
    assert error.blocked is not None
    assert error.blocked.host == "rebind.test"
    assert error.blocked.address == "127.0.0.1"
    assert "resolves to 127.0.0.1, a loopback address" in str(error)
    assert len(resolver.calls) == 2
    assert subscriber.connections == 0


async def test_the_client_connects_to_the_address_it_checked(subscriber: Subscriber) -> None:
    # rebind.test exists only in the fake resolver: reaching the server proves the client
    # connected to the checked answer, not to a lookup of its own.
    resolver = FakeResolver({"rebind.test": ["127.0.0.1"]})
    async with client(LOOPBACK_ALLOWED, resolver) as http:
        reply = await http.post(f"http://rebind.test:{subscriber.port}/hook", b"hi", [])
    assert reply == (200, b"ok")
    assert resolver.calls == [("rebind.test", subscriber.port)]
    assert subscriber.connections == 1
    request = subscriber.requests[0]
    assert request.startswith(b"POST /hook HTTP/1.1\r\n")
    assert f"Host: rebind.test:{subscriber.port}\r\n".encode() in request
    assert request.endswith(b"\r\n\r\nhi")


async def test_each_new_connection_resolves_and_checks_again(subscriber: Subscriber) -> None:
    # The subscriber closes every connection, so each delivery opens a new one: the second is
    # refused when the name has moved to a blocked address.
    resolver = FakeResolver(turns={"moving.test": [["127.0.0.1"], ["10.0.0.1"]]})
    async with client(LOOPBACK_ALLOWED, resolver) as http:
        url = f"http://moving.test:{subscriber.port}/hook"
        assert (await http.post(url, b"1", [])).status_code == 200
        with pytest.raises(DeliveryFailed, match=re.escape("resolves to 10.0.0.1, a private")):
            await http.post(url, b"2", [])
    assert len(resolver.calls) == 2
    assert subscriber.connections == 1


async def test_one_blocked_answer_refuses_the_connection(subscriber: Subscriber) -> None:
    resolver = FakeResolver({"mixed.test": ["127.0.0.1", "10.0.0.1"]})
    async with client(LOOPBACK_ALLOWED, resolver) as http:
        with pytest.raises(DeliveryFailed, match=re.escape("10.0.0.1")) as caught:
            await http.post(f"http://mixed.test:{subscriber.port}/", b"", [])
    assert caught.value.kind == "BlockedConnection"
    assert resolver.calls == [("mixed.test", subscriber.port)]  # refusals are not retried
    assert subscriber.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "[::ffff:127.0.0.1]"])
async def test_ip_literal_urls_are_refused_at_connect_time(
    subscriber: Subscriber, host: str
) -> None:
    resolver = FakeResolver()
    async with client(PUBLIC, resolver) as http:
        with pytest.raises(DeliveryFailed) as caught:
            await http.post(f"http://{host}:{subscriber.port}/", b"", [])
    assert caught.value.kind == "BlockedConnection"
    assert "a loopback address" in str(caught.value)
    assert resolver.calls == []
    assert subscriber.connections == 0


@pytest.mark.parametrize(
    "network", ["10.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10", "fc00::/7", "198.18.0.0/15"]
)
async def test_names_resolving_into_blocked_ranges_are_refused(network: str) -> None:
    address = str(next(ipaddress.ip_network(network).hosts()))
    resolver = FakeResolver({"inside.test": [address]})
    async with client(PUBLIC, resolver) as http:
        with pytest.raises(DeliveryFailed) as caught:
            await http.post("http://inside.test/hook", b"", [])
    assert caught.value.kind == "BlockedConnection"
    assert caught.value.blocked is not None and caught.value.blocked.address == address


async def test_metadata_stays_refused_inside_allowed_networks() -> None:
    everything = AddressPolicy(parse_networks("0.0.0.0/0,::/0"))
    async with client(everything, FakeResolver({"meta.test": ["169.254.169.254"]})) as http:
        with pytest.raises(DeliveryFailed, match="cloud metadata service"):
            await http.post("http://meta.test/latest/meta-data/", b"", [])


async def test_ip_literal_urls_connect_when_allowed(subscriber: Subscriber) -> None:
    async with client(LOOPBACK_ALLOWED, FakeResolver()) as http:
        reply = await http.post(f"http://127.1:{subscriber.port}/", b"", [])
    assert reply.status_code == 200


async def test_later_addresses_are_tried_when_one_refuses(subscriber: Subscriber) -> None:
    # The server listens on 127.0.0.1 only, so ::1 refuses the connection.
    resolver = FakeResolver({"two.test": ["::1", "127.0.0.1"]})
    async with client(LOOPBACK_ALLOWED, resolver) as http:
        reply = await http.post(f"http://two.test:{subscriber.port}/", b"", [])
    assert reply.status_code == 200
    assert subscriber.connections == 1


async def test_dns_failures_are_ordinary_connect_errors() -> None:
    resolver = FakeResolver({"gone.test": socket.gaierror(socket.EAI_NONAME, "unknown")})
    async with client(PUBLIC, resolver) as http:
        with pytest.raises(DeliveryFailed) as caught:
            await http.post("http://gone.test/", b"", [])
    assert caught.value.kind == "ConnectError"
    assert caught.value.blocked is None
    assert "could not be resolved" in str(caught.value)


async def test_unix_sockets_are_refused() -> None:
    backend = GuardedNetworkBackend(LOOPBACK_ALLOWED, FakeResolver())
    with pytest.raises(BlockedConnection, match="Unix socket"):
        await backend.connect_unix_socket("/run/docker.sock")
    async with client(LOOPBACK_ALLOWED, FakeResolver()) as http:
        with pytest.raises(DeliveryFailed) as caught:
            await http.post("http+unix://%2Frun%2Fdocker.sock/containers/json", b"", [])
    assert caught.value.kind == "UnsupportedProtocol"


def test_the_client_takes_no_proxy() -> None:
    with pytest.raises(TypeError):
        LeanClient(PUBLIC, proxy="http://proxy.internal:3128")  # type: ignore[call-arg]


async def test_proxy_variables_are_ignored(
    subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would connect somewhere other than the checked address (and see the delivery).
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://10.9.9.9:3128")
    resolver = FakeResolver({"direct.test": ["127.0.0.1"]})
    async with client(LOOPBACK_ALLOWED, resolver) as http:
        reply = await http.post(f"http://direct.test:{subscriber.port}/hook", b"x", [])
    assert reply.status_code == 200
    assert subscriber.requests[0].startswith(b"POST /hook HTTP/1.1\r\n")  # not a proxy's form


async def test_redirects_are_not_followed(subscriber: Subscriber) -> None:
    subscriber.answer = (
        b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    resolver = FakeResolver({"hop.test": ["127.0.0.1"]})
    async with client(LOOPBACK_ALLOWED, resolver) as http:
        reply = await http.post(f"http://hop.test:{subscriber.port}/hook", b"x", [])
    assert reply.status_code == 302
    assert resolver.calls == [("hop.test", subscriber.port)]
    assert subscriber.connections == 1


async def test_tls_uses_the_url_host_name_while_tcp_uses_the_checked_address(
    certificate: tuple[Path, Path],
) -> None:
    # The certificate is valid for hooks.test only, and the server is at 127.0.0.1: the
    # handshake succeeds only if TCP went to the checked address and TLS named the URL's host.
    _, cert = certificate
    served = serving_tls(certificate)
    tls_subscriber = Subscriber()
    await tls_subscriber.start(served)
    resolver = FakeResolver({"hooks.test": ["127.0.0.1"]})
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        async with client(LOOPBACK_ALLOWED, resolver, ssl_context=trusting) as http:
            url = f"https://hooks.test:{tls_subscriber.port}/hook"
            assert (await http.post(url, b"{}", [])).status_code == 200
        assert resolver.calls == [("hooks.test", tls_subscriber.port)]
        assert f"Host: hooks.test:{tls_subscriber.port}\r\n".encode() in tls_subscriber.requests[0]
    finally:
        await tls_subscriber.stop()


class RecordingStream(httpcore.AsyncNetworkStream):
    """Stands in for a TCP connection."""

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        pass

    async def aclose(self) -> None:
        pass


class RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.log.append(("connect_tcp", (host, port, timeout)))
        return RecordingStream()


async def test_the_backend_resolves_once_and_connects_to_that_answer() -> None:
    # A check-then-connect backend would look the name up again and follow the rebinding.
    recording = RecordingBackend()
    resolver = FakeResolver(turns={"rebind.test": [[PUBLIC_V4], ["127.0.0.1"]]})
    backend = GuardedNetworkBackend(PUBLIC, resolver, backend=recording)
    await backend.connect_tcp("rebind.test", 80, timeout=5.0)
    assert resolver.calls == [("rebind.test", 80)]
    ((call, (host, port, remaining)),) = recording.log
    assert (call, host, port) == ("connect_tcp", PUBLIC_V4, 80)
    assert remaining is not None and 0 < remaining <= 5.0  # what the lookup left of the 5 s


async def test_only_addresses_of_the_local_address_family_are_tried() -> None:
    recording = RecordingBackend()
    resolver = FakeResolver({"dual.test": [PUBLIC_V6, PUBLIC_V4]})
    backend = GuardedNetworkBackend(PUBLIC, resolver, backend=recording)
    await backend.connect_tcp("dual.test", 443, local_address="0.0.0.0")
    assert recording.log == [("connect_tcp", (PUBLIC_V4, 443, None))]


async def test_a_slow_resolver_is_a_connect_timeout() -> None:
    async def slow(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(10)
        return [PUBLIC_V4]

    backend = GuardedNetworkBackend(PUBLIC, slow, backend=RecordingBackend())
    with pytest.raises(httpcore.ConnectTimeout, match=re.escape("resolving slow.test timed out")):
        await backend.connect_tcp("slow.test", 80, timeout=0.05)
