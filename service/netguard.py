"""Keeps webhook deliveries away from internal addresses (SSRF protection).

Subscriber URLs are checked twice. When a subscription is registered, :func:`check_url` checks
the URL's syntax and any IP literal in it, and :func:`resolve_and_check` resolves the host and
checks every address. Neither check can protect a later delivery: DNS may answer differently by
then (DNS rebinding). So deliveries connect through :class:`GuardedNetworkBackend` (the webhook
client, :class:`service.webclient.LeanClient`, has no other way to open a connection), which
resolves the host itself at connect time, checks every address and then connects to one of those
checked IP literals, so the address connected to is the address that was checked.

Only globally routable unicast addresses pass, unless ``TASKRELAY_WEBHOOK_ALLOWED_NETWORKS``
allows a network (for local development and tests). Cloud metadata services are refused even
inside allowed networks: no development set-up needs webhooks sent to them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from service.aionet import AsyncioBackend
from service.errors import ValidationFailed

__all__ = [
    "ALLOWED_NETWORKS_VARIABLE",
    "MAX_URL_LENGTH",
    "AddressPolicy",
    "BlockedConnection",
    "BlockedDestination",
    "DestinationUnresolvable",
    "GuardedNetworkBackend",
    "Resolver",
    "check_url",
    "parse_networks",
    "resolve_and_check",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``resolver(host, port)`` returns the host's addresses as strings, in the order to try them.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

ALLOWED_NETWORKS_VARIABLE = "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS"
MAX_URL_LENGTH = 2048

_net = ipaddress.ip_network

# Reachable from inside cloud instances and full of credentials; never allowed, whatever the
# configuration says. 168.63.129.16 (Azure's WireServer) is a public address, so only this list
# catches it.
_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle ...
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer
    )
)
_METADATA_HOSTNAMES = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

# Special-purpose ranges (IANA registries), most specific first. Python's ``is_global`` is
# consulted too, but it differs between patch releases (3.11.7 calls 224.0.0.1, ff02::1,
# ::7f00:1, 64:ff9b::7f00:1 and 2002:7f00:1:: global), so the list below does not rely on it.
_NON_PUBLIC: tuple[tuple[IPNetwork, str], ...] = (
    (_net("0.0.0.0/8"), "an unspecified ('this network') address"),
    (_net("10.0.0.0/8"), "a private address"),
    (_net("100.64.0.0/10"), "a shared (carrier-grade NAT) address"),
    (_net("127.0.0.0/8"), "a loopback address"),
    (_net("169.254.0.0/16"), "a link-local address"),
    (_net("172.16.0.0/12"), "a private address"),
    (_net("192.0.0.0/24"), "an IETF protocol address"),
    (_net("192.0.2.0/24"), "a documentation address"),
    (_net("192.88.99.0/24"), "a reserved (6to4 relay) address"),
    (_net("192.168.0.0/16"), "a private address"),
    (_net("198.18.0.0/15"), "a benchmarking address"),
    (_net("198.51.100.0/24"), "a documentation address"),
    (_net("203.0.113.0/24"), "a documentation address"),
    (_net("224.0.0.0/4"), "a multicast address"),
    (_net("255.255.255.255/32"), "the broadcast address"),
    (_net("240.0.0.0/4"), "a reserved address"),
    (_net("::/128"), "the unspecified address"),
    (_net("::1/128"), "a loopback address"),
    (_net("64:ff9b:1::/48"), "a local-use NAT64 address"),
    (_net("100::/64"), "a discard-only address"),
    (_net("2001::/23"), "an IETF protocol address (Teredo and others)"),
    (_net("2001:db8::/32"), "a documentation address"),
    (_net("3fff::/20"), "a documentation address"),
    (_net("5f00::/16"), "a segment-routing address"),
    (_net("fc00::/7"), "a private (unique local) address"),
    (_net("fe80::/10"), "a link-local address"),
    (_net("fec0::/10"), "a site-local address"),
    (_net("ff00::/8"), "a multicast address"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
_NUMERIC_LABEL_RE = re.compile(r"^(?:[0-9]+|0[xX][0-9a-fA-F]*)$")


# --- errors ------------------------------------------------------------------------------------


class BlockedDestination(ValidationFailed):
    """A webhook URL or one of its host's addresses is not public; ``reason`` says which kind."""

    code = "destination_not_allowed"

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        address: str | None = None,
        reason: str = "",
    ) -> None:
        detail = {"field": "url", "message": message, "host": host, "address": address}
        super().__init__(message, details=[detail])
        self.host = host
        self.address = address
        self.reason = reason


class DestinationUnresolvable(ValidationFailed):
    """The webhook host has no address (DNS failed), so it cannot be checked or reached."""

    code = "destination_unresolvable"


class BlockedConnection(httpx.ConnectError):
    """A delivery's connection was refused before it was made: the host is not public (now).

    Raised by :class:`GuardedNetworkBackend`. It is an :class:`httpx.ConnectError`, so generic
    handlers still see a failed connection; the webhook client reports it as a failed delivery
    of kind ``BlockedConnection`` with this message. ``destination`` is the
    :class:`BlockedDestination` with the reason, kept as an attribute so the reason travels
    with the exception itself (a ``from None`` re-raise would drop ``__cause__``).
    """

    def __init__(self, destination: BlockedDestination, *, host: str, port: int | None) -> None:
        super().__init__(destination.message)
        self.destination = destination
        self.host = host
        self.port = port


def _invalid(message: str) -> ValidationFailed:
    return ValidationFailed(message, details=[{"field": "url", "message": message}])


# --- the policy --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Refusal:
    reason: str  # "a private address", written to follow a comma
    allow_with: str | None  # the network to suggest allowing; None when no setting can allow it


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"127.0.0.0/8,::1/128"`` -> networks; a bare address means just that address."""
    networks: list[IPNetwork] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not a network; use CIDR notation such as 127.0.0.0/8 or ::1/128"
                ) from exc
            raise ValueError(f"{item!r} has host bits set; did you mean {loose}?") from exc
    return tuple(networks)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses webhooks may be sent to: public unicast, plus ``allowed_networks``.

    IPv4-mapped, IPv4-compatible, 6to4 and NAT64 (64:ff9b::/96) IPv6 addresses are judged by the
    IPv4 address they embed. Cloud metadata addresses are refused even inside allowed networks.
    """

    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_setting(cls, text: str) -> AddressPolicy:
        """The policy for a ``TASKRELAY_WEBHOOK_ALLOWED_NETWORKS`` value (ValueError if bad)."""
        return cls(parse_networks(text))

    def check_ip(self, ip: IPAddress | str) -> None:
        """Raise :class:`BlockedDestination` unless webhooks may be sent to ``ip``."""
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        self._check(address, subject=f"The webhook address is {address},")

    def _check(self, ip: IPAddress, *, subject: str, host: str | None = None) -> None:
        refusal = self._refusal(ip)
        if refusal is not None:
            raise _blocked(f"{subject} {refusal.reason}", refusal, host=host, address=str(ip))

    def _allows(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.allowed_networks)

    def _refusal(self, ip: IPAddress) -> _Refusal | None:
        ip = _without_zone(ip)
        embedded = _embedded_ipv4(ip)
        if ip in _METADATA_ADDRESSES:
            return _Refusal("the cloud metadata service", None)
        if embedded in _METADATA_ADDRESSES:  # before the allowed networks, which cannot allow it
            return _Refusal(f"which embeds {embedded}, the cloud metadata service", None)
        if self._allows(ip):
            return None
        if embedded is not None:
            inner = self._refusal(embedded)
            if inner is None:
                return None
            return _Refusal(f"which embeds {embedded}, {inner.reason}", inner.allow_with)
        for network, reason in _NON_PUBLIC:
            if ip in network:
                return _Refusal(reason, str(network))
        if _not_public_says_stdlib(ip):
            return _Refusal("a reserved (not publicly routable) address", str(_net(ip)))
        return None


def _blocked(
    statement: str, refusal: _Refusal, *, host: str | None, address: str | None
) -> BlockedDestination:
    if refusal.allow_with is None:
        advice = "webhooks are never sent there."
    else:
        advice = (
            "webhook URLs must be public. For local development, allow the network with "
            f"{ALLOWED_NETWORKS_VARIABLE} (for example {ALLOWED_NETWORKS_VARIABLE}="
            f"{refusal.allow_with})."
        )
    return BlockedDestination(
        f"{statement}; {advice}", host=host, address=address, reason=refusal.reason
    )


def _without_zone(ip: IPAddress) -> IPAddress:
    # A zone id (fe80::1%eth0) changes equality but not which address it is.
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves, not IPv4
        return ipaddress.IPv4Address(int(ip))
    return None


def _not_public_says_stdlib(ip: IPAddress) -> bool:
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or site_local
    )


# --- host literals -----------------------------------------------------------------------------


def _parse_host_literal(host: str) -> IPAddress | None:
    """The address an IP-literal host means, in any form resolvers accept; None for a name.

    IPv4 follows ``inet_aton`` and the WHATWG URL standard, as getaddrinfo, libcurl and browsers
    do: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x), the last filling the remaining
    bytes ("2130706433", "0177.0.0.1", "0x7f.1", "127.1" are all 127.0.0.1); one trailing dot is
    ignored. A host whose last label is a number but is not a valid address is refused rather
    than looked up as a name. A zone id (``%eth0``) is dropped.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text:
        base = text.split("%", 1)[0]
        try:
            return ipaddress.IPv6Address(base)
        except ValueError:
            raise _invalid(f"The webhook URL's host {host} is not a valid IPv6 address.") from None
    labels = text.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    if not _NUMERIC_LABEL_RE.match(labels[-1]):
        return None
    numbers = [_ipv4_number(label) for label in labels]
    valid = [number for number in numbers if number is not None]
    if len(labels) > 4 or len(valid) != len(numbers):
        raise _invalid(
            f"The webhook URL's host {host} looks like an IPv4 address but is not one; "
            "use a dotted address such as 93.184.216.34 or a host name."
        )
    *head, last = valid
    if any(number > 255 for number in head) or last >= 256 ** (4 - len(head)):
        raise _invalid(
            f"The webhook URL's host {host} is out of range for an IPv4 address; "
            "use a dotted address such as 93.184.216.34 or a host name."
        )
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _ipv4_number(label: str) -> int | None:
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", label):
        return int(label[2:], 16)
    if re.fullmatch(r"0[0-7]+", label):
        return int(label, 8)
    if re.fullmatch(r"0|[1-9][0-9]*", label):
        return int(label)
    return None


def _host_text(ip: IPAddress) -> str:
    return f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _literal_subject(written: str, ip: IPAddress) -> str:
    written = written.removeprefix("[").removesuffix("]")
    if written == str(ip) or (isinstance(ip, ipaddress.IPv6Address) and "%" not in written):
        return f"The webhook URL points to {written},"
    return f"The webhook URL's host {written} means {ip},"


def _check_hostname(name: str) -> None:
    if name.rstrip(".") in _METADATA_HOSTNAMES:
        raise _blocked(
            f"The webhook URL's host {name} is the cloud metadata service",
            _Refusal("the cloud metadata service", None),
            host=name,
            address=None,
        )


# --- registration-time checks ------------------------------------------------------------------


def check_url(url: str, policy: AddressPolicy) -> str:
    """Check a subscriber URL without DNS; return it normalised (httpx's normal form).

    Raises :class:`ValidationFailed` for a malformed URL and :class:`BlockedDestination` for an
    IP literal (in any form) or a metadata host name that webhooks may not reach. Host names
    still need :func:`resolve_and_check`.
    """
    if len(url) > MAX_URL_LENGTH:
        raise _invalid(
            f"The webhook URL is {len(url)} characters long; the limit is {MAX_URL_LENGTH}."
        )
    if any(char <= " " or char in "\x7f\\" for char in url):
        raise _invalid(
            "The webhook URL contains spaces, control characters or backslashes; "
            "percent-encode them."
        )
    if not _is_unicode_text(url):
        raise _invalid(
            "The webhook URL holds an unpaired UTF-16 surrogate, which is not Unicode text; "
            "percent-encode the characters it stands for."
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _invalid(f"The webhook URL is not valid ({exc}); check the host and port.") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        found = f", not {scheme}://" if scheme else ""
        raise _invalid(f"The webhook URL must start with https:// or http://{found}.")
    if "@" in parts.netloc:
        raise _invalid(
            "The webhook URL must not contain a user name or password (user:pass@host); "
            "deliveries are signed, so verify the signature instead."
        )
    if not parts.hostname:
        raise _invalid("The webhook URL has no host; use e.g. https://hooks.example.com/taskrelay.")
    if port is not None and not 0 < port < 65536:
        raise _invalid(f"The webhook URL's port {port} is not between 1 and 65535.")

    # httpx drops a default port only after a lower-case scheme.
    url = scheme + url[len(scheme) :]
    # Written forms of an address that httpx would pass on (or refuse) are rewritten to the one
    # canonical form, so the stored URL says plainly where deliveries go.
    literal = _parse_host_literal(parts.hostname)
    if literal is not None:
        netloc = _host_text(literal) + (f":{port}" if port is not None else "")
        url = urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))

    # From here on, httpx's reading of the URL decides. Its normal form (percent-encoded path,
    # IDNA host) is what is stored, and the webhook client reads that form the same way.
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _invalid(f"The webhook URL is not valid: {exc}.") from exc
    try:
        host = parsed.host  # an xn-- label is decoded here, and checked
    except UnicodeError as exc:  # idna's errors (IDNAError and its kinds) are UnicodeErrors
        raise _invalid(
            f"The webhook URL's host {parsed.raw_host.decode('ascii', 'replace')} is not a "
            f"valid internationalised domain name ({exc}); check its xn-- labels, or write "
            "the name in Unicode (e.g. https://bücher.example/hook)."
        ) from exc
    if parsed.scheme not in ("http", "https") or parsed.userinfo or not host:
        raise _invalid("The webhook URL is ambiguous; write it as https://host[:port]/path.")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise _invalid(f"The webhook URL's port {parsed.port} is not between 1 and 65535.")
    ip = _parse_host_literal(host)
    if ip != literal:
        raise _invalid("The webhook URL's host is ambiguous; write it as a name or dotted address.")
    if ip is not None:
        policy._check(ip, subject=_literal_subject(parts.hostname, ip), host=parts.hostname)
    else:
        name = parsed.raw_host.decode("ascii")
        if not _HOSTNAME_RE.match(name):
            raise _invalid(
                f"The webhook URL's host {host!r} is not a valid host name; "
                "use letters, digits, hyphens and dots."
            )
        _check_hostname(name)
    normal = str(parsed)
    if len(normal) > MAX_URL_LENGTH:
        # Checked again in the normal form that is stored and sent: percent-encoding makes
        # each non-ASCII character of a path 6 to 12 characters long.
        raise _invalid(
            f"The webhook URL is {len(normal)} characters long once percent-encoded (as it is "
            f"stored and sent); the limit is {MAX_URL_LENGTH}. Shorten it: each non-ASCII "
            "character takes 6 to 12."
        )
    return normal


def _is_unicode_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's addresses for ``host`` (getaddrinfo in a thread), in preference order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def resolve_and_check(
    host: str, port: int, policy: AddressPolicy, resolver: Resolver | None = None
) -> list[str]:
    """Resolve ``host`` and return its addresses, if every one of them is allowed.

    One refused address refuses the host: an attacker's DNS server can mix a public address with
    an internal one. IP literals (any form) are checked without a lookup. Raises
    :class:`BlockedDestination`, or :class:`DestinationUnresolvable` when there is no answer.
    """
    literal = _parse_host_literal(host)
    if literal is not None:
        policy._check(literal, subject=_literal_subject(host, literal), host=host)
        return [str(literal)]
    _check_hostname(host.lower())
    try:
        answers = await (resolver or system_resolver)(host, port)
    except OSError as exc:
        raise DestinationUnresolvable(
            f"The webhook host {host} could not be resolved ({exc}); check the spelling, "
            "or try again once its DNS records exist."
        ) from exc
    addresses = list(dict.fromkeys(answers))
    if not addresses:
        raise DestinationUnresolvable(f"The webhook host {host} has no addresses.")
    for answer in addresses:
        try:
            ip = ipaddress.ip_address(answer)
        except ValueError:
            raise DestinationUnresolvable(
                f"Resolving the webhook host {host} gave {answer!r}, which is not an address."
            ) from None
        among = f" (one of {len(addresses)} addresses)" if len(addresses) > 1 else ""
        policy._check(ip, subject=f"The webhook host {host} resolves to {ip}{among},", host=host)
    return addresses


# --- delivery-time checks: the transport -------------------------------------------------------


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that only ever connects to addresses it has just checked.

    ``connect_tcp(host, ...)`` resolves ``host`` itself, refuses the connection if any address
    is not allowed (:class:`BlockedConnection`), and otherwise connects to the checked IP
    literals in turn through ``backend`` (default :class:`service.aionet.AsyncioBackend`, which
    connects to an IP literal without any lookup of its own). TLS is the caller's: it calls
    ``stream.start_tls(server_hostname=<the URL's host>)`` on the stream returned here, so SNI
    and certificate checks use the URL's host name, not the IP literal connected to.

    Addresses are tried one after another (no Happy Eyeballs), within the connect timeout. It
    runs on asyncio only (TaskRelay's loop), so its timeouts are asyncio's, not anyio's cancel
    scopes.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        resolver: Resolver | None = None,
        *,
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.policy = policy
        self.resolver: Resolver = resolver or system_resolver
        self.backend: httpcore.AsyncNetworkBackend = backend or AsyncioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await resolve_and_check(host, port, self.policy, self.resolver)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except BlockedDestination as exc:
            raise BlockedConnection(exc, host=host, port=port) from exc
        except ValidationFailed as exc:  # no answer: retryable like any DNS failure
            raise httpcore.ConnectError(exc.message) from exc

        addresses = _same_family(addresses, local_address)
        options = None if socket_options is None else list(socket_options)
        failure: Exception = httpcore.ConnectError(
            f"{host} has no address in the family of local_address {local_address}"
        )
        for address in addresses:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise httpcore.ConnectTimeout(f"connecting to {host} timed out")
            try:
                return await self.backend.connect_tcp(
                    address,
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        refusal = _Refusal("a Unix socket", None)
        raise BlockedConnection(
            _blocked(
                f"The webhook destination {path} is a Unix socket", refusal, host=path, address=None
            ),
            host=path,
            port=None,
        )

    async def sleep(self, seconds: float) -> None:
        await self.backend.sleep(seconds)


def _same_family(addresses: list[str], local_address: str | None) -> list[str]:
    if not local_address:
        return addresses
    try:
        version = ipaddress.ip_address(local_address).version
    except ValueError:
        return addresses
    return [address for address in addresses if ipaddress.ip_address(address).version == version]
