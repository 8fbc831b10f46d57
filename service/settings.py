"""All configuration, read once at start-up from ``TASKRELAY_*`` environment variables.

An optional ``.env`` file (``TASKRELAY_ENV_FILE``, default ``./.env``) supplies values the
environment does not. Every value is validated here; a bad one raises :class:`SettingsError`
naming the variable and what it expects, so start-up stops with a message a person can act on.
Secrets are wrapped in :class:`Secret` so they never print.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from service.errors import SettingsError

log = logging.getLogger(__name__)

PROVIDERS: tuple[str, ...] = ("openai", "grsai", "gptimage15", "evolink", "apiinone")

DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com",
    "grsai": "https://api.grsai.com",
    "gptimage15": "https://gptimage15.ai",
    "evolink": "https://api.evolink.ai",
    "apiinone": "https://apiin.one",
}

# The seeds disagree on model ids (API in One shows both `gpt-image-1-5` and
# `gpt-image-1.5-official`; GrsAI's example shows `sora-image`), so every one is configuration.
DEFAULT_MODELS: dict[str, str] = {
    "openai": "gpt-image-1.5",
    "grsai": "gpt-image-1.5",
    "gptimage15": "gpt-image-1.5",
    "evolink": "gpt-image-1.5",
    "apiinone": "gpt-image-1-5",
}

GRSAI_MODES = ("callback", "poll", "stream")

# How long a task usually takes, when the provider gives no estimate (seconds): API in One
# documents 3-10 s, EvoLink's example estimate is 100 s.
DEFAULT_TYPICAL_DURATIONS: dict[str, float] = {
    "openai": 60.0,
    "grsai": 60.0,
    "gptimage15": 30.0,
    "evolink": 100.0,
    "apiinone": 10.0,
}

SANDBOX_API_KEY = "sandbox-key"

# Upper bounds that catch a unit mistake (``30m`` for ``30s``, ``3600`` for ``3.6``): a status
# query may hold its task's poll lease that long, and an orchestrator kills a process that takes
# longer to stop than it allows anyway.
MAX_PROVIDER_TIMEOUT = 3600.0
MAX_SHUTDOWN_TIMEOUT = 3600.0
# TASKRELAY_RETENTION: at least a day, whatever the delivery schedule.
MIN_RETENTION = 86400.0
# Any duration: longer than any real wait, and far from overflowing a date it is added to.
MAX_DURATION = 10 * 365 * 86400.0
# Updates the group-commit writer (service/groupcommit.py) holds waiting, at most; past that,
# callbacks are refused with 503. A batch (TASKRELAY_WRITE_BATCH) is taken from them.
MAX_WRITE_QUEUE = 10_000
# Signing keys, the current one and the fallbacks alike.
MIN_SECRET_KEY = 16

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Secret:
    """A string that never shows itself in ``repr``/``str`` (logs, tracebacks, error pages)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ProviderSettings:
    name: str
    api_key: Secret | None
    base_url: str
    model: str
    # GrsAI only: how results come back (webHook callback, "-1" id-then-poll, or stream).
    mode: str = "callback"
    typical_duration: float = 60.0  # seconds, when the provider gives no estimate
    deadline: float = 3600.0  # seconds after creation before a task is expired
    poll_concurrency: int = 8  # status queries in flight at once, per process
    poll_rate: float = 5.0  # status queries per second, per process

    @property
    def configured(self) -> bool:
        return self.api_key is not None and bool(self.api_key)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    public_url: str
    secret_key: Secret
    secret_key_fallbacks: tuple[Secret, ...]
    api_tokens: Mapping[str, Secret]
    providers: Mapping[str, ProviderSettings]
    host: str = "127.0.0.1"
    port: int = 8000
    callback_token_ttl: float = 7 * 86400.0
    max_body_bytes: int = 1024 * 1024
    callback_audit_bytes: int = 64 * 1024
    max_metadata_bytes: int = 16 * 1024
    db_pool_size: int = 10
    log_level: str = "INFO"
    # GET /metrics wants "Authorization: Bearer <it>" when set; open when None.
    metrics_token: Secret | None = None
    sandbox: bool = False
    files_dir: Path = field(default=Path("data/files"))
    submit_attempts: int = 4
    submit_backoff: float = 1.0
    poll_grace: float = 1.0
    poll_max_interval: float = 300.0
    poll_error_backoff: float = 5.0
    poll_lease: float = 60.0
    submit_sweep: float = 30.0  # how often each process looks for orphaned unsent submissions
    scheduler_tick: float = 1.0
    scheduler: bool = True
    delivery_schedule: tuple[float, ...] = (
        0.0,
        5.0,
        300.0,
        1800.0,
        7200.0,
        18000.0,
        36000.0,
        36000.0,
    )
    delivery_concurrency: int = 64
    delivery_per_subscription: int = 16
    # Group commit (service/groupcommit.py): most callbacks written in one transaction.
    write_batch: int = 256
    webhook_allowed_networks: str = ""
    dispatcher: bool = True
    max_streams_per_client: int = 100  # open event streams one API client may hold, per process
    max_streams: int = 1000  # open event streams one process serves at once
    # Management API requests per second per client, per process (0: no limit), and the burst.
    rate_limit: float = 100.0
    rate_limit_burst: int = 200
    # Upstream provider requests: the longest wait for a read or a write (connecting stays 5 s).
    provider_timeout: float = 30.0
    # The whole graceful shutdown, from SIGTERM/SIGINT to exit (`serve --graceful-timeout`).
    shutdown_timeout: float = 30.0
    # How long a final task is kept, with its events, callbacks and deliveries (None: forever).
    retention: float | None = None
    # PostgreSQL: the longest one statement of the serving process may take, lock waits
    # included (None: no limit).
    db_statement_timeout: float | None = 30.0
    # TASKRELAY_* variables set (environment or .env file) that no setting reads: a typo
    # (TASKRELAY_RETENTON) silently left the setting at its default. Each with the setting
    # it most likely meant, if one is close.
    unknown_variables: tuple[tuple[str, str | None], ...] = ()

    def unknown_variables_text(self) -> str | None:
        """The unknown variables in words, for a warning; None if there are none."""
        if not self.unknown_variables:
            return None
        named = [
            f"{name} (did you mean {meant}?)" if meant else name
            for name, meant in self.unknown_variables
        ]
        return (
            f"{', '.join(named)}: no setting of that name, so "
            f"{'it is' if len(named) == 1 else 'they are'} ignored (the settings are listed "
            "in the README's Configuration table)."
        )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


T = TypeVar("T")


class _Reader:
    """Reads variables from the environment first, then the .env file, naming them on error."""

    def __init__(self, environ: Mapping[str, str], file_values: Mapping[str, str]) -> None:
        self.environ = environ
        self.file_values = file_values
        self.asked: set[str] = set()  # every variable read

    def raw(self, name: str) -> str | None:
        self.asked.add(name)
        # An empty variable counts as unset, here as in get(): it does not hide the file's
        # value (compose passes an unset ${VAR} as an empty one).
        value = self.environ.get(name)
        if value is not None and value.strip():
            return value
        return self.file_values.get(name, value)

    def get(self, name: str, cast: Callable[[str], T], default: T, expects: str) -> T:
        value = self.raw(name)
        if value is None or value.strip() == "":
            return default
        try:
            return cast(value.strip())
        except (ValueError, TypeError) as exc:
            # Python's own parsers quote what they refuse (int(), ip_network(), ...): keep
            # their reason but not the value. Ours never quote it, and are shown whole: masked,
            # "http://" made "an absolute http:// or https:// URL" unreadable.
            said = str(exc) if isinstance(exc, Invalid) else _without(value, str(exc))
            reason = f" ({said})" if said else ""
            raise SettingsError(
                # The value is not repeated: it may be a token, a key or a password.
                f"{name} is not valid: expected {expects}{reason}.",
                details={"variable": name, "expected": expects},
            ) from exc


class Invalid(ValueError):
    """A value refused, in TaskRelay's own words, which never quote it: the reason is shown
    as it is. (Python's parsers quote what they refuse: their reasons are masked.)"""


def _without(value: str, text: str) -> str:
    """``text`` with ``value`` and each of its parts (split on separators) blanked out."""
    parts = {value, value.strip(), *re.split(r"[\s,;=]+", value)}
    for part in sorted(parts, key=len, reverse=True):
        if len(part) >= 3:
            text = masked(text, part, "...")
    return text


def masked(text: str, value: str, replacement: str) -> str:
    """``text`` with ``value`` replaced wherever it stands on its own, not inside a longer
    word: a secret that is also a word ("short") must not turn the message around it
    ("shorter than 16 characters") into nonsense."""
    before = r"(?<!\w)" if value[:1].isalnum() or value[:1] == "_" else ""
    after = r"(?!\w)" if value[-1:].isalnum() or value[-1:] == "_" else ""
    return re.sub(before + re.escape(value) + after, lambda _: replacement, text)


def parse_duration(text: str) -> float:
    """``"90"`` (seconds), ``"500ms"``, ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"`` -> seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise Invalid("use a number of seconds or a number with ms, s, m, h or d")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if value <= 0:
        raise Invalid("must be greater than zero")
    if not value <= MAX_DURATION:  # also infinity: a run of digits too long for a float
        raise Invalid(f"at most {MAX_DURATION / 86400:g}d, ten years")
    return value


def duration_or_zero(text: str) -> float:
    """A duration (:func:`parse_duration`), or nothing in any unit ("0", "0s", "0.0m")."""
    zero = _DURATION_RE.match(text)
    return 0.0 if zero and float(zero.group(1)) == 0 else parse_duration(text)


def _retention(text: str) -> float | None:
    """A duration, or ``off`` (also ``never``, ``forever``): keep every task."""
    if text.lower() in {"off", "never", "forever"}:
        return None
    return parse_duration(text)


# The most status queries to one provider in flight at once, per process: its connection pool
# (200 connections, service/app.py's UPSTREAM_LIMITS) keeps the rest for its submissions.
MAX_POLL_CONCURRENCY = 150


def _poll_concurrency(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_POLL_CONCURRENCY:
        raise Invalid(
            f"must be at most {MAX_POLL_CONCURRENCY}: the provider's 200 connections are "
            "shared with its submissions"
        )
    return value


# The shortest period a background loop may be given: less only spins, a query each time.
MIN_LOOP_PERIOD = 0.01


def _loop_period(text: str) -> float:
    value = parse_duration(text)
    if value < MIN_LOOP_PERIOD:
        raise Invalid(f"must be at least {MIN_LOOP_PERIOD * 1000:g}ms: a shorter one only spins")
    return value


MIN_STATEMENT_TIMEOUT = 1.0
MAX_STATEMENT_TIMEOUT = 3600.0
DEFAULT_STATEMENT_TIMEOUT: float | None = 30.0


def _statement_timeout(text: str) -> float | None:
    """A duration from 1 s to 1 h, or 0 (None: no limit). Under a second, the ordinary
    statements of a loaded server would be cancelled."""
    value = duration_or_zero(text)
    if value == 0:
        return None
    if not MIN_STATEMENT_TIMEOUT <= value <= MAX_STATEMENT_TIMEOUT:
        raise Invalid(
            f"must be from {MIN_STATEMENT_TIMEOUT:g} s to {MAX_STATEMENT_TIMEOUT:g} s, or 0 "
            "for no limit"
        )
    return value


def _bounded_duration(most: float) -> Callable[[str], float]:
    def cast(text: str) -> float:
        value = parse_duration(text)
        if value > most:
            raise Invalid(f"must be at most {most:g} s")
        return value

    return cast


def parse_schedule(text: str) -> tuple[float, ...]:
    """``"0s,5s,5m,30m"`` -> waits (seconds) before attempt 1, 2, 3, ...; the first may be 0."""
    waits = []
    for item in text.split(","):
        item = item.strip()
        waits.append(duration_or_zero(item))  # a wait of nothing: the attempt goes at once
    if not waits:
        raise Invalid("at least one attempt")
    return tuple(waits)


def _networks(text: str) -> str:
    """Checked with the parser the webhook address policy uses (service/netguard.py), so a value
    accepted here is one it accepts: a network with host bits set (``10.1.2.3/8``) is refused
    rather than silently widened or narrowed."""
    import ipaddress

    from service.netguard import parse_networks

    for item in text.split(","):
        try:
            parse_networks(item)
        except ValueError as exc:
            try:  # a network, only written with host bits: not a secret, so it may be named
                meant = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError("an entry is not a network") from exc
            raise SettingsError(
                f"TASKRELAY_WEBHOOK_ALLOWED_NETWORKS: {item.strip()} has host bits set; write "
                f"the network itself ({meant}), or {item.strip().partition('/')[0]} alone for "
                "just that address.",
                details={"variable": "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS"},
            ) from exc
    return text


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise Invalid("use true or false")


def _whole_number(text: str) -> int:
    """int(), with a reason of its own: Python's ("invalid literal for int() with base 10")
    speaks of its internals."""
    try:
        return int(text)
    except ValueError:
        raise Invalid("not a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Invalid("not a number") from None


# The largest count or rate a setting takes: far beyond any real use, and inside what the
# database's integers and a float's arithmetic hold (a delivery concurrency of 10**20 failed
# every dispatcher pass, "Python int too large to convert to SQLite INTEGER"; a rate limit of
# 1e308 made the default burst infinite, a traceback).
MAX_SETTING_NUMBER = 1_000_000_000


def _refuse_absurd(value: float) -> None:
    """Refuse a count or a rate over :data:`MAX_SETTING_NUMBER`."""
    if value > MAX_SETTING_NUMBER:
        raise Invalid(f"at most {MAX_SETTING_NUMBER}")


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value <= 0:
        raise Invalid("must be greater than zero")
    _refuse_absurd(value)
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _positive_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise Invalid("must be a number greater than zero")
    _refuse_absurd(value)
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise Invalid("must be zero or more")
    _refuse_absurd(value)
    return value


def port_number(text: str) -> int:
    value = _whole_number(text)
    if not 0 < value < 65536:
        raise Invalid("must be between 1 and 65535")
    return value


def _write_batch(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_WRITE_QUEUE:
        raise Invalid(
            f"at most {MAX_WRITE_QUEUE}, the most updates the group-commit writer holds waiting"
        )
    return value


def public_url_problem(url: str) -> str | None:
    """Why providers could not be handed callback URLs built on ``url``, or None. The URL is
    never repeated (it may carry a password)."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return (
            "carries a user name or password, which every provider would be handed inside "
            "each callback URL (and the logs would show): remove them; callback URLs carry "
            "their own signed token"
        )
    host = parts.hostname or ""
    if _is_unspecified(host):
        return (
            f"points at {host}, which means 'every interface' to a server but is no address "
            "a provider can connect to"
        )
    return None


# A host name to listen on: letters, digits, '-', '_' (container names) and dots, a trailing
# one (a fully qualified name) included.
_HOST_NAME = re.compile(r"(?=.{1,254}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?", re.ASCII)


def listen_host(text: str) -> str:
    """TASKRELAY_HOST: an IP address (an IPv6 one with or without its brackets) or a host
    name; no port (TASKRELAY_PORT is that), no scheme."""
    import ipaddress

    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host or "/" in host:
        raise Invalid("no port or scheme: the port is TASKRELAY_PORT")
    if not _HOST_NAME.fullmatch(host):
        raise Invalid("not an IP address or a host name")
    return host


def default_public_url(host: str, port: int) -> str:
    listening = f"[{host}]" if ":" in host else host  # an IPv6 address, in a URL
    return f"http://{listening}:{port}"


# Tokens from the README and `make run`: fine for trying TaskRelay out on this machine only.
DEMO_TOKENS = frozenset({"demo-token", "sandbox-key", "changeme", "change-me", "password"})


def check_public_url(settings: Settings) -> None:
    """Refuse a public URL providers cannot be handed in callback URLs (``serve``: commands
    that hand out no callback URL, such as ``migrate`` and ``doctor``, take any), and the
    local-only conveniences (the sandbox, a demo token) on a service reached from elsewhere."""
    check_local_only(settings)
    problem = public_url_problem(settings.public_url)
    if problem is None:
        return
    what = (
        "TASKRELAY_PUBLIC_URL is not set, and the default built from TASKRELAY_HOST"
        if settings.public_url == default_public_url(settings.host, settings.port)
        else "TASKRELAY_PUBLIC_URL"
    )
    raise SettingsError(
        f"{what} {problem}. Set TASKRELAY_PUBLIC_URL to the address providers reach "
        "TaskRelay at (e.g. https://relay.example.com): callback URLs are built from it.",
        details={"variable": "TASKRELAY_PUBLIC_URL"},
    )


# A status query (with its wait for a free slot) ends this long before its task's poll lease
# runs out, at most, to leave time to record the answer: a query still running then is cut off
# and counted as failed, so no other process ever queries the task while this one still does.
LEASE_MARGIN_SECONDS = 5.0
LEASE_MARGIN_FRACTION = 0.2


def lease_margin(lease_seconds: float) -> float:
    return min(LEASE_MARGIN_SECONDS, lease_seconds * LEASE_MARGIN_FRACTION)


def lease_warning(settings: Settings) -> str | None:
    """A valid but risky pair of settings, for serve's log and the doctor: a status query
    allowed to run longer than its task's lease leaves it (the lease less the margin kept to
    record the answer)."""
    lease = settings.poll_lease
    room = lease - lease_margin(lease)
    if not settings.scheduler or settings.provider_timeout <= room:
        return None
    return (
        f"TASKRELAY_PROVIDER_TIMEOUT ({settings.provider_timeout:g} s) is longer than a status "
        f"query may run within TASKRELAY_POLL_LEASE ({lease:g} s, less {lease - room:g} s kept "
        "to record the answer): a query still running then is cut off and counted as failed"
    )


def check_local_only(settings: Settings) -> None:
    """A reverse proxy on the same machine forwards to a loopback TASKRELAY_HOST: the public
    URL tells whether the service is reached from elsewhere. The sandbox's control API and
    its callbacks take a well-known key, and a demo token is in the README for anyone."""
    public_host = urlsplit(settings.public_url).hostname or ""
    local = _is_loopback(settings.host) and _is_loopback(public_host)
    if local:
        return
    where = f"TASKRELAY_HOST {settings.host}, TASKRELAY_PUBLIC_URL {settings.public_url}"
    if settings.sandbox:
        raise SettingsError(
            f"TASKRELAY_SANDBOX=true is for this machine only ({where}): its control API "
            "takes a well-known key, lists every task's callback URL and calls any URL back. "
            "Turn it off, or keep both the host and the public URL on a loopback address.",
            details={"variable": "TASKRELAY_SANDBOX"},
        )
    demo = sorted(
        name for name, token in settings.api_tokens.items() if token.reveal() in DEMO_TOKENS
    )
    if demo:
        raise SettingsError(
            f"TASKRELAY_API_TOKENS gives client(s) {', '.join(demo)} a well-known demo token, "
            f"and this service is reached from elsewhere ({where}): anyone could use it as "
            "them. Give each client a random token (`taskrelay new-token`).",
            details={"variable": "TASKRELAY_API_TOKENS"},
        )


def _is_unspecified(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Invalid("an absolute http:// or https:// URL")
    if parts.query or parts.fragment:
        raise Invalid("no query string or fragment")
    try:
        parts.port  # noqa: B018  (raises for a port that is not a number from 0 to 65535)
    except ValueError:
        raise Invalid("its port is not a number from 1 to 65535") from None
    if parts.port == 0:
        raise Invalid("its port is not a number from 1 to 65535")
    host = parts.hostname or ""
    if not host:
        raise Invalid("no host name in it")
    if "[" in parts.netloc:  # only an IPv6 address goes in brackets (not "[v1.api]")
        if ":" not in host or not _is_ip_address(host.partition("%")[0]):
            raise Invalid("its host in brackets is not an IPv6 address")
        return text.rstrip("/")
    try:  # a name in another script is taken as its IDNA form ("bücher" -> "xn--bcher-kva")
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise Invalid("its host is not a host name or an IP address") from None
    if not (_HOST_NAME.fullmatch(ascii_host) or _is_ip_address(host)):
        raise Invalid("its host is not a host name or an IP address")
    return text.rstrip("/")


def _is_ip_address(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _metrics_token(text: str) -> Secret:
    if len(text) < 16:
        raise Invalid("fewer characters than a secret needs")
    return Secret(text)


def _log_level(text: str) -> str:
    upper = text.upper()
    if upper not in _LOG_LEVELS:
        raise Invalid("one of " + ", ".join(_LOG_LEVELS))
    return upper


def _parsed_url(text: str) -> str:
    """``text`` once SQLAlchemy can read it (a port that is not a number, an unclosed IPv6
    bracket: refused here, named, rather than a traceback when the engine is made)."""
    try:
        make_url(text)
    except (ValueError, ArgumentError) as exc:
        raise ValueError(f"not a URL SQLAlchemy can read ({exc})") from None
    return text


def _database_url(text: str) -> str:
    if text.startswith("postgresql://") or text.startswith("postgres://"):
        # psycopg 3 is the PostgreSQL driver; accept the plain URL form users copy from elsewhere.
        return _parsed_url("postgresql+psycopg://" + text.split("://", 1)[1])
    if text.startswith("postgresql+psycopg://"):
        return _parsed_url(text)
    if text.startswith(("sqlite:///", "sqlite+pysqlite:///")):
        if text.startswith("sqlite"):
            path, _, query = text.split(":///", 1)[1].partition("?")
            if path in ("", ":memory:") or "mode=memory" in query:
                raise Invalid(
                    "an in-memory SQLite database loses every task when TaskRelay stops: give "
                    "a file path, such as sqlite:///data/taskrelay.db"
                )
        return text
    raise Invalid("a sqlite:///path or postgresql://user@host/db URL")


def parse_api_tokens(text: str) -> dict[str, Secret]:
    """``"alice:tok1,bob:tok2"`` -> ``{"alice": Secret("tok1"), ...}``; names and tokens unique."""
    tokens: dict[str, Secret] = {}
    seen: set[str] = set()
    # Entries are named by position, never by their name: a pair written backwards
    # (token:name) has the token where the name goes, and it must not be printed.
    entries = [item.strip() for item in text.split(",") if item.strip()]
    for number, item in enumerate(entries, start=1):
        name, sep, token = item.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not name or not token:
            raise Invalid("each entry must be name:token")
        if not _TOKEN_NAME_RE.match(name):
            raise Invalid(
                f"the client name of entry {number} may use only letters, digits, '.', '_', '-'"
            )
        if len(token) < 8:
            raise Invalid(
                f"the token of entry {number} is shorter than 8 characters (an entry is "
                "name:token; one written token:name has them swapped)"
            )
        if name in tokens:
            raise Invalid(f"entry {number} repeats the client name of an earlier entry")
        if token in seen:
            raise Invalid("two clients share one token")
        seen.add(token)
        tokens[name] = Secret(token)
    return tokens


def env_file_path(environ: Mapping[str, str]) -> Path:
    """The ``.env`` file to read: the one ``TASKRELAY_ENV_FILE`` names, which must then exist
    (a mistyped path would otherwise leave every value in it unset, silently), or ``./.env``
    if there is one."""
    named = environ.get("TASKRELAY_ENV_FILE", "").strip()
    if not named:
        return Path(".env")
    path = Path(named)
    if not path.is_file():
        found = "is not a file" if path.exists() else "does not exist"
        raise SettingsError(
            f"TASKRELAY_ENV_FILE names {path}, which {found}: correct the path, or unset "
            "TASKRELAY_ENV_FILE to read ./.env (if there is one).",
            details={"variable": "TASKRELAY_ENV_FILE"},
        )
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """A minimal ``KEY=value`` reader: comments, blank lines and surrounding quotes handled."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM would join the first name
    except OSError as exc:
        raise SettingsError(
            f"cannot read {path}: {exc.strerror or type(exc).__name__}.",
            details={"variable": "TASKRELAY_ENV_FILE"},
        ) from exc
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"{path} is not UTF-8 text (byte {exc.start} cannot be read): save it as UTF-8.",
            details={"variable": "TASKRELAY_ENV_FILE"},
        ) from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep:
            raise SettingsError(
                f"{path}:{number}: expected KEY=value (the line is not repeated here: it may "
                "hold a secret)."
            )
        values[key.strip()] = _env_value(value.strip())
    return values


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), for the processes of this machine; on a
    file system that takes no locks, none (the rename still keeps the file whole)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, stat.S_IRUSR | stat.S_IWUSR)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _kept_key(path: Path, value: str) -> Secret:
    """The key read from the data folder's file, held to the length TASKRELAY_SECRET_KEY must
    have: a short one would make callback tokens guessable."""
    if len(value) < MIN_SECRET_KEY:
        raise SettingsError(
            f"The signing key in {path} is too short: it needs at least {MIN_SECRET_KEY} "
            "characters. Put a longer random key there (e.g. the output of `taskrelay "
            "new-token`), or delete the file and a new key is made (callback URLs signed "
            "with the old one stop working either way).",
            details={"variable": "TASKRELAY_DATA_DIR"},
        )
    return Secret(value)


def _env_value(text: str) -> str:
    """A ``.env`` value: inside its quotes, whatever follows them (a comment) left out; else
    up to a `` #`` comment (a ``#`` with no space before it is part of the value)."""
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        if end > 0:
            return text[1:end]
    return re.split(r"\s+#", text, maxsplit=1)[0]


def _folder(text: str) -> Path:
    """A folder path; ``~`` is the home folder, as a shell would make it."""
    return Path(text).expanduser()


def _load_or_create_secret_key(data_dir: Path) -> Secret:
    """The signing key kept in the data folder, generated on first use (with a warning).

    Written whole or not at all (a file of its own, renamed into place), so a crash cannot
    leave an empty key file behind; an empty one (from a release before this, or a
    ``touch``) signed nothing, and is replaced. Processes starting at once (``migrate`` and
    ``serve`` on one volume) take turns on a lock file, and each reads the key again under
    it: one key is made, and every one of them keeps it."""
    path = data_dir / "secret_key"
    try:
        if path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if value:
                return _kept_key(path, value)
        data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(data_dir / ".secret_key.lock"):
            value = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
            if value:  # made by another process meanwhile
                return _kept_key(path, value)
            value = secrets.token_urlsafe(48)
            fresh = data_dir / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
            mode = stat.S_IRUSR | stat.S_IWUSR
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(value + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(fresh, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    fresh.unlink()
    except OSError as exc:
        raise SettingsError(
            f"TASKRELAY_SECRET_KEY is not set, and the signing key file {path} cannot be read "
            f"or created ({exc.strerror or type(exc).__name__}): make TASKRELAY_DATA_DIR a "
            "folder TaskRelay can write, or set TASKRELAY_SECRET_KEY (e.g. to the output of "
            "`taskrelay new-token`).",
            details={"variable": "TASKRELAY_DATA_DIR"},
        ) from exc
    log.warning(
        "TASKRELAY_SECRET_KEY is not set: generated a signing key and saved it to %s. "
        "Set TASKRELAY_SECRET_KEY in production (every replica needs the same key).",
        path,
    )
    return Secret(value)


def load_settings(
    environ: Mapping[str, str] | None = None, *, env_file: Path | None = None
) -> Settings:
    """Read and validate every setting. Raises :class:`SettingsError` on the first bad value."""
    environ = os.environ if environ is None else environ
    if env_file is None:
        env_file = env_file_path(environ)
    file_values = read_env_file(env_file)
    env = _Reader(environ, file_values)

    data_dir = env.get("TASKRELAY_DATA_DIR", _folder, Path("data"), "a folder path")
    default_db = f"sqlite:///{data_dir / 'taskrelay.db'}"
    database_url = env.get(
        "TASKRELAY_DATABASE_URL", _database_url, default_db, "a sqlite:/// or postgresql:// URL"
    )
    host = env.get(
        "TASKRELAY_HOST",
        listen_host,
        "127.0.0.1",
        "an address or host name to listen on, e.g. 127.0.0.1, 0.0.0.0 or ::1",
    )
    port = env.get("TASKRELAY_PORT", port_number, 8000, "a TCP port number")
    sandbox = env.get("TASKRELAY_SANDBOX", parse_bool, False, "true or false")
    if sandbox and not _is_loopback(host):
        raise SettingsError(
            f"TASKRELAY_SANDBOX=true needs TASKRELAY_HOST on a loopback address (it is {host}): "
            "the sandbox's control API is open to anyone with its well-known key and lists "
            "every task's callback URL. Use it for local development only.",
            details={"variable": "TASKRELAY_SANDBOX"},
        )
    public_url = env.get(
        "TASKRELAY_PUBLIC_URL", _http_url, default_public_url(host, port), "an http(s) base URL"
    )

    secret_raw = env.raw("TASKRELAY_SECRET_KEY")
    if secret_raw is not None and secret_raw.strip():
        if len(secret_raw.strip()) < MIN_SECRET_KEY:
            raise SettingsError(
                f"TASKRELAY_SECRET_KEY is too short: use at least {MIN_SECRET_KEY} random "
                "characters (e.g. the output of `taskrelay new-token`).",
                details={"variable": "TASKRELAY_SECRET_KEY"},
            )
        secret_key = Secret(secret_raw.strip())
    else:
        secret_key = _load_or_create_secret_key(data_dir)
    fallbacks = tuple(
        Secret(item.strip())
        for item in (env.raw("TASKRELAY_SECRET_KEY_FALLBACKS") or "").split(",")
        if item.strip()
    )
    short = sum(len(key.reveal()) < MIN_SECRET_KEY for key in fallbacks)
    if short:
        raise SettingsError(
            f"TASKRELAY_SECRET_KEY_FALLBACKS holds {short} key(s) shorter than "
            f"{MIN_SECRET_KEY} characters, the least TASKRELAY_SECRET_KEY takes too: tokens "
            f"signed with fewer characters are easy to forge. Remove the keys under "
            f"{MIN_SECRET_KEY} characters (callback URLs signed with them stop working).",
            details={"variable": "TASKRELAY_SECRET_KEY_FALLBACKS"},
        )

    no_tokens: dict[str, Secret] = {}
    api_tokens = env.get(
        "TASKRELAY_API_TOKENS", parse_api_tokens, no_tokens, "comma-separated name:token pairs"
    )

    providers: dict[str, ProviderSettings] = {}
    for name in PROVIDERS:
        prefix = f"TASKRELAY_{name.upper()}_"
        key_raw = (env.raw(prefix + "API_KEY") or "").strip()
        # The sandbox stands in only for providers without a key of their own.
        emulated = sandbox and not key_raw
        default_base = f"{public_url}/sandbox/{name}" if emulated else DEFAULT_BASE_URLS[name]
        if emulated:
            key_raw = SANDBOX_API_KEY
        mode = "callback"
        if name == "grsai":
            mode = env.get(
                prefix + "MODE", _choice(GRSAI_MODES), "callback", "callback, poll or stream"
            )
        providers[name] = ProviderSettings(
            name=name,
            api_key=Secret(key_raw) if key_raw else None,
            base_url=env.get(prefix + "BASE_URL", _http_url, default_base, "an http(s) base URL"),
            model=env.get(prefix + "MODEL", str, DEFAULT_MODELS[name], "a model name"),
            mode=mode,
            typical_duration=env.get(
                prefix + "TYPICAL_DURATION",
                parse_duration,
                DEFAULT_TYPICAL_DURATIONS[name],
                "a duration such as 30s",
            ),
            deadline=env.get(prefix + "DEADLINE", parse_duration, 3600.0, "a duration such as 1h"),
            poll_concurrency=env.get(
                prefix + "POLL_CONCURRENCY",
                _poll_concurrency,
                8,
                f"a whole number from 1 to {MAX_POLL_CONCURRENCY}",
            ),
            poll_rate=env.get(
                prefix + "POLL_RATE", _positive_float, 5.0, "a number of queries per second"
            ),
        )

    callback_token_ttl = env.get(
        "TASKRELAY_CALLBACK_TOKEN_TTL", parse_duration, 7 * 86400.0, "a duration such as 7d"
    )
    if callback_token_ttl < 3600:
        raise SettingsError(
            "TASKRELAY_CALLBACK_TOKEN_TTL is shorter than one hour: providers retry callbacks "
            "for a while and slow tasks take long, so use days (e.g. 7d).",
            details={"variable": "TASKRELAY_CALLBACK_TOKEN_TTL"},
        )

    delivery_schedule: tuple[float, ...] = env.get(
        "TASKRELAY_DELIVERY_SCHEDULE",
        parse_schedule,
        Settings.delivery_schedule,
        "comma-separated waits before each attempt, such as 0s,5s,5m,30m,2h",
    )
    retention = env.get("TASKRELAY_RETENTION", _retention, None, "a duration such as 30d, or off")
    if retention is not None and retention < MIN_RETENTION:
        raise SettingsError(
            f"TASKRELAY_RETENTION is shorter than {MIN_RETENTION / 86400:g} day: final tasks "
            "would be deleted while providers may still send their callbacks and clients still "
            "look them up. Use days (e.g. 30d), or off to keep every task.",
            details={"variable": "TASKRELAY_RETENTION"},
        )
    if retention is not None and retention <= sum(delivery_schedule):
        raise SettingsError(
            f"TASKRELAY_RETENTION ({retention / 86400:g} d) is not longer than the delivery "
            f"schedule ({sum(delivery_schedule) / 86400:.2f} d in all, "
            "TASKRELAY_DELIVERY_SCHEDULE): a task's events could be deleted while a delivery "
            "of one is still being retried. Keep tasks longer, or shorten the schedule.",
            details={"variable": "TASKRELAY_RETENTION"},
        )

    rate_limit = env.get(
        "TASKRELAY_RATE_LIMIT", _non_negative_float, 100.0, "requests per second (0: no limit)"
    )
    rate_limit_burst = env.get(
        "TASKRELAY_RATE_LIMIT_BURST",
        _positive_int,
        max(1, math.ceil(2 * rate_limit)),
        "a positive whole number of requests",
    )

    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        public_url=public_url,
        secret_key=secret_key,
        secret_key_fallbacks=fallbacks,
        api_tokens=api_tokens,
        providers=providers,
        host=host,
        port=port,
        callback_token_ttl=callback_token_ttl,
        max_body_bytes=env.get(
            "TASKRELAY_MAX_BODY_BYTES", _positive_int, 1024 * 1024, "a number of bytes"
        ),
        callback_audit_bytes=env.get(
            "TASKRELAY_CALLBACK_AUDIT_BYTES", _positive_int, 64 * 1024, "a number of bytes"
        ),
        max_metadata_bytes=env.get(
            "TASKRELAY_MAX_METADATA_BYTES", _positive_int, 16 * 1024, "a number of bytes"
        ),
        db_pool_size=env.get("TASKRELAY_DB_POOL_SIZE", _positive_int, 10, "a positive integer"),
        log_level=env.get(
            "TASKRELAY_LOG_LEVEL", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"
        ),
        metrics_token=env.get(
            "TASKRELAY_METRICS_TOKEN", _metrics_token, None, "a token of 16 or more characters"
        ),
        sandbox=sandbox,
        files_dir=env.get("TASKRELAY_FILES_DIR", _folder, data_dir / "files", "a folder path"),
        submit_attempts=env.get(
            "TASKRELAY_SUBMIT_ATTEMPTS", _positive_int, 4, "a positive whole number"
        ),
        submit_backoff=env.get(
            "TASKRELAY_SUBMIT_BACKOFF", parse_duration, 1.0, "a duration such as 1s"
        ),
        poll_grace=env.get(
            "TASKRELAY_POLL_GRACE", duration_or_zero, 1.0, "a duration such as 1s, or 0"
        ),
        poll_max_interval=env.get(
            "TASKRELAY_POLL_MAX_INTERVAL", parse_duration, 300.0, "a duration such as 5m"
        ),
        poll_error_backoff=env.get(
            "TASKRELAY_POLL_ERROR_BACKOFF", parse_duration, 5.0, "a duration such as 5s"
        ),
        poll_lease=env.get("TASKRELAY_POLL_LEASE", parse_duration, 60.0, "a duration such as 60s"),
        submit_sweep=env.get(
            "TASKRELAY_SUBMIT_SWEEP", _loop_period, 30.0, "a duration such as 30s, 10ms or more"
        ),
        scheduler_tick=env.get(
            "TASKRELAY_SCHEDULER_TICK", _loop_period, 1.0, "a duration such as 1s, 10ms or more"
        ),
        scheduler=env.get("TASKRELAY_SCHEDULER", parse_bool, True, "true or false"),
        delivery_schedule=delivery_schedule,
        delivery_concurrency=env.get(
            "TASKRELAY_DELIVERY_CONCURRENCY", _positive_int, 64, "a positive whole number"
        ),
        delivery_per_subscription=env.get(
            "TASKRELAY_DELIVERY_PER_SUBSCRIPTION", _positive_int, 16, "a positive whole number"
        ),
        write_batch=env.get(
            "TASKRELAY_WRITE_BATCH",
            _write_batch,
            256,
            f"a positive whole number, at most {MAX_WRITE_QUEUE}",
        ),
        webhook_allowed_networks=env.get(
            "TASKRELAY_WEBHOOK_ALLOWED_NETWORKS",
            _networks,
            "",
            "comma-separated networks such as 127.0.0.0/8,::1/128",
        ),
        dispatcher=env.get("TASKRELAY_DISPATCHER", parse_bool, True, "true or false"),
        max_streams_per_client=env.get(
            "TASKRELAY_MAX_STREAMS_PER_CLIENT", _positive_int, 100, "a positive whole number"
        ),
        max_streams=env.get(
            "TASKRELAY_MAX_STREAMS", _positive_int, 1000, "a positive whole number"
        ),
        rate_limit=rate_limit,
        rate_limit_burst=rate_limit_burst,
        provider_timeout=env.get(
            "TASKRELAY_PROVIDER_TIMEOUT",
            _bounded_duration(MAX_PROVIDER_TIMEOUT),
            30.0,
            "a duration such as 30s, at most 1h",
        ),
        shutdown_timeout=env.get(
            "TASKRELAY_SHUTDOWN_TIMEOUT",
            _bounded_duration(MAX_SHUTDOWN_TIMEOUT),
            30.0,
            "a duration such as 30s, at most 1h",
        ),
        retention=retention,
        db_statement_timeout=env.get(
            "TASKRELAY_DB_STATEMENT_TIMEOUT",
            _statement_timeout,
            DEFAULT_STATEMENT_TIMEOUT,
            "a duration such as 30s (1s to 1h), or 0 for no limit",
        ),
    )
    return replace(settings, unknown_variables=_unknown_variables(env))


# TASKRELAY_* variables that are not settings: the .env file's name, the folder `serve
# --workers N` gives its workers for /metrics, the test suite's PostgreSQL.
NOT_SETTINGS = frozenset(
    {"TASKRELAY_ENV_FILE", "TASKRELAY_WORKER_METRICS_DIR", "TASKRELAY_TEST_DATABASE_URL"}
)


def _unknown_variables(env: _Reader) -> tuple[tuple[str, str | None], ...]:
    import difflib

    known = sorted(env.asked | NOT_SETTINGS)
    unknown = []
    for name in sorted({*env.environ, *env.file_values}):
        if not name.startswith("TASKRELAY_") or name in env.asked or name in NOT_SETTINGS:
            continue
        if not (env.environ.get(name, "").strip() or env.file_values.get(name, "").strip()):
            continue  # set to nothing: unset, as every setting reads it
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        unknown.append((name, close[0] if close else None))
    return tuple(unknown)


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def cast(text: str) -> str:
        if text not in options:
            raise Invalid("one of " + ", ".join(options))
        return text

    return cast
