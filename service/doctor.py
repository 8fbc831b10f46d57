"""``taskrelay doctor``: checks a deployment's configuration, database, schema, providers and
public URL, and says in plain words what is wrong and how to fix it.

Every check is read-only. Settings are loaded without generating a signing key; the database
is opened read-only (SQLite ``mode=ro``, PostgreSQL ``default_transaction_read_only``); each
provider gets one request that costs nothing and creates nothing: a status query for a task id
that does not exist (OpenAI, which has no status endpoint: its model list). The I/O
(``probe_*``) is kept apart from the judging (``*_check``, pure), so tests can feed the judges
any outcome. No secret value is ever part of a result: messages name variables, never values,
and :func:`redact` scrubs every configured secret from the text as a last line of defence.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sqlite3
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from service.db import (
    MIN_FREE_BYTES,
    current_revision,
    newer_schema,
    out_of_room,
    schema_drift,
    schema_revisions,
    set_on_connect,
    sqlite_path,
    tables_in_the_way,
)
from service.errors import SettingsError
from service.providers import build_adapters
from service.providers.base import ProviderAdapter, TaskEndpointAdapter
from service.settings import (
    DEMO_TOKENS,
    Settings,
    check_local_only,
    env_file_path,
    lease_warning,
    load_settings,
    masked,
    public_url_problem,
    read_env_file,
)
from service.signing import CallbackSigner

OK, WARN, FAIL = "ok", "warn", "fail"

# Each provider gets this long to answer; the database this long to accept a connection.
PROBE_TIMEOUT_SECONDS = 5.0
DATABASE_TIMEOUT_SECONDS = 5.0
# Replicas' clocks further apart than this from the database server's: a warning.
CLOCK_WARN_SECONDS = 2.0
# A task id no provider has issued: its status query answers "not found" and changes nothing.
PROBE_TASK_ID = "taskrelay-doctor-probe-0000"
# Stands in for an unset signing key, so that loading the settings writes no key file.
PLACEHOLDER_SECRET = "taskrelay-doctor-placeholder-key"  # noqa: S105  (signs nothing real)
SHORT_TOKEN = 16
EVOLINK_MAX_CALLBACK_URL = 2048
SAMPLE_TASK_ID = "tsk_" + "X" * 22
_SECRET_VARIABLES = (
    "TASKRELAY_SECRET_KEY",
    "TASKRELAY_SECRET_KEY_FALLBACKS",
    "TASKRELAY_API_TOKENS",
    "TASKRELAY_DATABASE_URL",
)


@dataclass(frozen=True)
class CheckResult:
    check: str  # what was checked, e.g. "database" or "provider evolink"
    status: str  # ok | warn | fail
    message: str  # what was found, in plain words
    fix: str | None = None  # what to do about it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- configuration -------------------------------------------------------------------------


def load_configuration(
    environ: Mapping[str, str], env_file: Path | None = None, *, workers: int = 1
) -> tuple[list[CheckResult], Settings | None]:
    """Load the settings as ``taskrelay serve`` would, without writing anything: an unset
    signing key (which serve would generate into the data folder) is replaced by a
    placeholder, and reported."""
    try:
        if env_file is None:
            env_file = env_file_path(environ)
        file_values = read_env_file(env_file)
    except SettingsError as exc:
        # Names the file, or where in it a line is wrong: never the line (it may be a secret).
        where = env_file or "TASKRELAY_ENV_FILE"
        return [CheckResult("configuration", FAIL, exc.message, fix=f"correct {where}.")], None
    where = f"the environment and {env_file}" if env_file.is_file() else "the environment"
    correct = f"correct that variable (in the environment or in {env_file})."

    def raw(name: str) -> str:
        value = environ.get(name, "").strip()  # empty: unset, as the settings read it
        return value or file_values.get(name, "").strip()

    overlay = dict(environ)
    key_source = "variable"
    key_file = Path(raw("TASKRELAY_DATA_DIR") or "data").expanduser() / "secret_key"
    if not raw("TASKRELAY_SECRET_KEY"):
        try:
            key_source = "file" if key_file.read_text(encoding="utf-8").strip() else "missing"
        except FileNotFoundError:
            key_source = "missing"
        except OSError as exc:
            message = f"cannot read the signing key file {key_file}: {exc.strerror}."
            fix = "let the user that runs TaskRelay read it, or set TASKRELAY_SECRET_KEY."
            return [CheckResult("configuration", FAIL, message, fix=fix)], None
        if key_source == "missing":
            overlay["TASKRELAY_SECRET_KEY"] = PLACEHOLDER_SECRET
    try:
        settings = load_settings(overlay, env_file=env_file)
    except SettingsError as exc:
        # A conversion error may quote the bad value (``int()`` does): never show it, nor a
        # secret that ended up in the message some other way.
        quoted = [raw(name) for name in _SECRET_VARIABLES]
        quoted += [raw(name) for name in {*overlay, *file_values} if name.endswith("_API_KEY")]
        quoted += raw("TASKRELAY_SECRET_KEY_FALLBACKS").split(",")
        quoted += [item.partition(":")[2] for item in raw("TASKRELAY_API_TOKENS").split(",")]
        details = exc.details if isinstance(exc.details, dict) else {}
        variable = str(details.get("variable", ""))
        if len(raw(variable)) >= 3:
            quoted.append(raw(variable))
        failed = CheckResult("configuration", FAIL, exc.message, fix=correct)
        return redact([failed], [value.strip() for value in quoted if value.strip()]), None

    results = [CheckResult("configuration", OK, f"the settings in {where} are valid.")]
    unknown = settings.unknown_variables_text()
    if unknown:
        results.append(
            CheckResult(
                "configuration",
                WARN,
                unknown,
                fix="correct the name, or remove the variable "
                f"(in the environment or in {env_file}).",
            )
        )
    try:  # what only serve refuses; its public URL checks are the public URL check's
        check_local_only(settings)
    except SettingsError as exc:
        results.append(
            CheckResult(
                "serve",
                FAIL,
                f"`taskrelay serve` refuses to start with these settings: {exc.message}",
                fix=correct,
            )
        )
    results.append(api_tokens_check(settings))
    results.append(secret_key_check(settings, key_source, key_file))
    results.extend(mode_checks(settings, workers))
    results.append(providers_summary(settings))
    return results, settings


def api_tokens_check(settings: Settings) -> CheckResult:
    tokens = settings.api_tokens
    if not tokens:
        return CheckResult(
            "api tokens",
            FAIL,
            "TASKRELAY_API_TOKENS is empty: no API client could authenticate, so "
            "`taskrelay serve` refuses to start.",
            fix="set TASKRELAY_API_TOKENS to name:token pairs, one per API client (make each "
            "token with `taskrelay new-token`).",
        )
    demo = sorted(name for name, token in tokens.items() if token.reveal() in DEMO_TOKENS)
    if demo:
        return CheckResult(
            "api tokens",
            WARN,
            f"client(s) {', '.join(demo)} use a well-known demo token (from the README or "
            "`make run`): anyone could use this service as them.",
            fix="give each client a random token made with `taskrelay new-token`.",
        )
    short = sorted(name for name, token in tokens.items() if len(token.reveal()) < SHORT_TOKEN)
    if short:
        return CheckResult(
            "api tokens",
            WARN,
            f"the token of client(s) {', '.join(short)} is shorter than {SHORT_TOKEN} "
            "characters: easy to guess.",
            fix="use tokens made with `taskrelay new-token` (43 random characters).",
        )
    return CheckResult("api tokens", OK, f"{len(tokens)} API client(s): {', '.join(tokens)}.")


def secret_key_check(settings: Settings, source: str, key_file: Path) -> CheckResult:
    """``source``: ``variable`` (TASKRELAY_SECRET_KEY), ``file`` (DATA_DIR/secret_key) or
    ``missing`` (serve would generate one). Keys too short, fallbacks included, are refused
    with the settings."""
    if source == "missing":
        return CheckResult(
            "secret key",
            WARN,
            f"TASKRELAY_SECRET_KEY is not set and {key_file} does not exist: `taskrelay "
            "serve` will generate a signing key there, and callback URLs signed with it stop "
            "working if that file is lost.",
            fix="set TASKRELAY_SECRET_KEY (the same on every replica; `taskrelay new-token` "
            "makes one).",
        )
    if source == "file" and not settings.is_sqlite:
        return CheckResult(
            "secret key",
            WARN,
            f"the signing key comes from {key_file}, a file of this machine: every replica "
            "needs the same key, or callbacks handed out by one fail at the others.",
            fix="set TASKRELAY_SECRET_KEY to the same value on every replica.",
        )
    where = "TASKRELAY_SECRET_KEY" if source == "variable" else str(key_file)
    return CheckResult("secret key", OK, f"callback URLs are signed with the key in {where}.")


def mode_checks(settings: Settings, workers: int = 1) -> list[CheckResult]:
    """Valid but risky modes: the sandbox, a lease shorter than a query may run, SQLite with
    several workers."""
    results = []
    if settings.sandbox:
        results.append(
            CheckResult(
                "sandbox",
                WARN,
                "TASKRELAY_SANDBOX is on: providers without an API key are emulated at "
                "/sandbox (placeholder images, nothing real is generated), and its control API "
                "answers to a well-known key.",
                fix="set TASKRELAY_SANDBOX=false in production.",
            )
        )
    risky = lease_warning(settings)
    if risky is not None:
        results.append(
            CheckResult(
                "poll lease",
                WARN,
                f"{risky}.",
                fix="make TASKRELAY_POLL_LEASE at least 5 s longer than "
                "TASKRELAY_PROVIDER_TIMEOUT (and at least 1.25 times as long), or the timeout "
                "shorter.",
            )
        )
    if settings.sandbox and workers > 1:
        results.append(
            CheckResult(
                "sandbox workers",
                FAIL,
                f"{workers} workers with the built-in sandbox: its tasks live in the process "
                "that made them, so `taskrelay serve --workers` refuses it.",
                fix="run `taskrelay sandbox` on its own and point TASKRELAY_<PROVIDER>_BASE_URL "
                "at it, or serve with one worker.",
            )
        )
    if settings.is_sqlite and workers > 1:
        results.append(
            CheckResult(
                "workers",
                FAIL,
                f"{workers} workers on SQLite: SQLite supports one TaskRelay process, so "
                "`taskrelay serve --workers` refuses it.",
                fix="serve with one worker, or use PostgreSQL (TASKRELAY_DATABASE_URL).",
            )
        )
    return results


def providers_summary(settings: Settings) -> CheckResult:
    configured = [name for name, p in settings.providers.items() if p.configured]
    missing = [name for name, p in settings.providers.items() if not p.configured]
    if not configured:
        return CheckResult(
            "providers",
            WARN,
            "no provider has an API key: every submission is refused (tracking tasks you "
            "submit yourself still works).",
            fix="set TASKRELAY_<PROVIDER>_API_KEY for the providers you use.",
        )
    text = f"configured: {', '.join(configured)}"
    if missing:
        text += f"; not configured (submissions to them are refused): {', '.join(missing)}"
    return CheckResult("providers", OK, text + ".")


# --- the public URL ------------------------------------------------------------------------


def uses_sandbox(settings: Settings, provider: str) -> bool:
    """Whether ``provider`` points at the sandbox mounted in TaskRelay itself."""
    base = settings.providers[provider].base_url
    return settings.sandbox and base.startswith(f"{settings.public_url}/sandbox/")


def real_providers(settings: Settings) -> list[str]:
    return [
        name
        for name, provider in settings.providers.items()
        if provider.configured and not uses_sandbox(settings, name)
    ]


def _calls_back(settings: Settings, name: str) -> bool:
    """Whether the provider's results arrive by callback, as its adapter says (GrsAI only in
    its callback mode, OpenAI never). The adapter sends nothing here: no client is needed."""
    from service.providers import ADAPTER_CLASSES

    adapter = ADAPTER_CLASSES[name](settings.providers[name], cast(httpx.AsyncClient, None))
    return adapter.delivers_callbacks()


def files_dir_check(settings: Settings) -> CheckResult | None:
    """Whether the folder OpenAI's images are kept in can be written (None: OpenAI is not
    configured, nothing is kept). Nothing is created: the folder, or the nearest folder above
    it that exists, must be a writable folder (``serve`` makes it, and writes a probe file)."""
    if not settings.providers["openai"].configured:
        return None
    folder = settings.files_dir
    fix = "make TASKRELAY_FILES_DIR a folder TaskRelay can write, or point it at one."
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        found = f"{existing} is not a folder"
    elif not _writable(existing):
        found = f"{existing} cannot be written"
    else:
        made = "" if existing == folder else " (serve creates it)"
        return CheckResult("files folder", OK, f"OpenAI's images go to {folder}{made}.")
    return CheckResult(
        "files folder",
        FAIL,
        f"TASKRELAY_FILES_DIR {folder}: {found}; OpenAI's images are kept there, and serve "
        "refuses to start.",
        fix=fix,
    )


def public_url_check(settings: Settings) -> CheckResult:
    """Whether providers can call back to the callback URLs built from the public URL."""
    public = settings.public_url
    parts = urlsplit(public)
    host = parts.hostname or ""
    shown = display_url(public)
    real = real_providers(settings)
    fix_url = "set TASKRELAY_PUBLIC_URL to the https:// address providers reach TaskRelay at."
    # The settings refuse these already (a Settings made otherwise is judged alike).
    problem = public_url_problem(public)
    if problem is not None:
        return CheckResult("public URL", FAIL, f"TASKRELAY_PUBLIC_URL {problem}.", fix=fix_url)
    address = _ip(host)
    signer = CallbackSigner(settings.secret_key.reveal(), max_age=settings.callback_token_ttl)
    sample = signer.callback_url(public, SAMPLE_TASK_ID, "evolink")
    if "evolink" in real and len(sample) > EVOLINK_MAX_CALLBACK_URL:
        return CheckResult(
            "public URL",
            FAIL,
            f"callback URLs are {len(sample)} characters long; EvoLink takes at most "
            f"{EVOLINK_MAX_CALLBACK_URL}.",
            fix="use a shorter TASKRELAY_PUBLIC_URL.",
        )
    if "evolink" in real and parts.scheme != "https":
        return CheckResult(
            "public URL",
            WARN,
            f"{shown} is not HTTPS, and EvoLink accepts only HTTPS callback URLs: it may "
            "refuse the submissions, and its callbacks cannot arrive (results would come "
            "only from polling, later).",
            fix=fix_url,
        )
    local = host == "localhost" or (
        address is not None and (address.is_loopback or address.is_private)
    )
    calling_back = [name for name in real if _calls_back(settings, name)]
    if calling_back and local:
        return CheckResult(
            "public URL",
            WARN,
            f"{shown} is a local or private address that providers on the internet cannot "
            f"reach ({', '.join(calling_back)} are configured): callbacks will not arrive, "
            "and results come only from polling, later.",
            fix=fix_url,
        )
    if real and local:  # OpenAI alone: no callbacks, but its images are served from here
        return CheckResult(
            "public URL",
            WARN,
            f"{shown} is a local or private address: the image URLs of OpenAI's results "
            "(stored and served by TaskRelay under /files/) open only where that address "
            "reaches this service.",
            fix="set TASKRELAY_PUBLIC_URL to the address your applications reach TaskRelay at.",
        )
    return CheckResult(
        "public URL",
        OK,
        f"callback URLs look like {shown}/callbacks/<provider>/<token> ({len(sample)} characters).",
    )


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def display_url(url: str) -> str:
    """``url`` without any user name or password (it is shown to people)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --- the database --------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseProbe:
    """What opening the database (read-only) found."""

    where: str  # "SQLite file ..." or "PostgreSQL database x on host:port as user y"
    sqlite: bool
    name: str | None = None  # PostgreSQL: the database's name
    missing: bool = False  # SQLite: the file does not exist yet
    unwritable: str | None = None  # SQLite: a path TaskRelay could not write
    not_a_folder: str | None = None  # SQLite: a file where the database's folder must be
    error: str | None = None  # the driver's message when it could not be read
    revision: str | None = None  # the schema's Alembic revision (None: empty)
    # With no revision: tables of this release's schema there already (another application's,
    # or a schema made by hand), which migrating would fail to create.
    in_the_way: tuple[str, ...] = ()
    full: bool = False  # SQLite: less than db.MIN_FREE_BYTES free on the file's disk
    # At this release's revision: how the schema still differs from its models (db.schema_drift).
    drift: tuple[str, ...] = ()
    # PostgreSQL: this host's clock minus the server's, and the round trip it was read in.
    clock_offset: float | None = None
    clock_round_trip: float = 0.0


def describe_database(url: str) -> str:
    """Where the database is, never with its password."""
    path = sqlite_path(url)
    if path is not None:
        return f"SQLite file {path}"
    parsed = sa.engine.make_url(url)
    place = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    user = f" as user {parsed.username}" if parsed.username else ""
    return f"PostgreSQL database {parsed.database} on {place}{user}"


def probe_database(
    url: str, *, timeout: float = DATABASE_TIMEOUT_SECONDS, head: str | None = None
) -> DatabaseProbe:
    where = describe_database(url)
    path = sqlite_path(url)
    full = False
    if path is not None:
        if not path.exists():
            folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
            if folder is not None and not folder.is_dir():
                return DatabaseProbe(where, sqlite=True, missing=True, not_a_folder=str(folder))
            blocked = None if folder is None or _writable(folder) else str(folder)
            return DatabaseProbe(where, sqlite=True, missing=True, unwritable=blocked)
        blocked = next((str(p) for p in (path, path.parent) if not _writable(p)), None)
        full = out_of_room(path)
        engine = _sqlite_read_only(path, timeout)
    elif url.startswith("postgresql"):
        blocked = None
        engine = sa.create_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": max(2, round(timeout))}
        )
        # Read-only, and no statement longer than the check's timeout: SETs on connecting,
        # not the `options` startup parameter, which PgBouncer refuses and which replaced
        # the URL's own `options`.
        set_on_connect(
            engine,
            "SET default_transaction_read_only = on",
            f"SET statement_timeout = {round(timeout * 1000)}",
        )
    else:
        return DatabaseProbe(where, sqlite=False, error="unsupported database URL")
    found = DatabaseProbe(
        where,
        sqlite=path is not None,
        name=None if path is not None else sa.engine.make_url(url).database,
        unwritable=blocked,
        full=full,
    )
    try:
        found = replace(found, revision=current_revision(engine))
        if found.revision is None:
            with engine.connect() as connection:
                found = replace(found, in_the_way=tuple(tables_in_the_way(connection)))
        if head is not None and found.revision == head:
            found = replace(found, drift=tuple(schema_drift(engine)))
        if path is None:
            offset, round_trip = clock_offset(engine)
            found = replace(found, clock_offset=offset, clock_round_trip=round_trip)
        return found
    except sa.exc.DBAPIError as exc:
        return replace(found, error=str(exc.orig) if exc.orig is not None else str(exc))
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        return replace(found, error=f"{type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def clock_offset(engine: sa.Engine) -> tuple[float, float]:
    """This host's clock minus the database server's, in seconds, and the round trip (the
    offset is right to within half of it)."""
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")  # the connection's own set-up out of the way
        before = time.time()
        server = connection.exec_driver_sql(
            "SELECT extract(epoch FROM clock_timestamp())"
        ).scalar_one()
        after = time.time()
    return (before + after) / 2 - float(server), after - before


def clock_check(probe: DatabaseProbe, poll_lease: float) -> CheckResult | None:
    """PostgreSQL: replicas compare times each of them wrote (poll and delivery leases,
    planned retries, the put-aside's window), so their clocks must agree; each host is
    checked against the database server's clock, so two replicas off in opposite directions
    are twice as far apart. None on SQLite (one process, one clock)."""
    if probe.clock_offset is None:
        return None
    offset = probe.clock_offset
    apart = abs(offset)
    side = "ahead of" if offset > 0 else "behind"
    fix = "keep every replica's clock in step with NTP (chrony, systemd-timesyncd)."
    if apart >= poll_lease / 4:
        return CheckResult(
            "clock",
            FAIL,
            f"this host's clock is {apart:.1f} s {side} the database server's, a quarter of "
            f"TASKRELAY_POLL_LEASE ({poll_lease:g} s) or more: another replica as far off the "
            "other way is half a lease apart from this one, and the one ahead takes over the "
            "other's tasks and deliveries while it still works on them (status queries and "
            "webhooks sent twice).",
            fix=fix,
        )
    if apart >= CLOCK_WARN_SECONDS:
        return CheckResult(
            "clock",
            WARN,
            f"this host's clock is {apart:.1f} s {side} the database server's. Replicas "
            "compare times each of them wrote: clocks seconds apart take leases over early and "
            "make the dispatcher's sweep find deliveries late.",
            fix=fix,
        )
    return CheckResult(
        "clock",
        OK,
        f"this host's clock is within {max(apart, probe.clock_round_trip / 2):.2f} s of the "
        "database server's.",
    )


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _sqlite_read_only(path: Path, timeout: float) -> sa.Engine:
    """A read-only connection that creates nothing: with no write-ahead log beside the file
    (no TaskRelay running), ``immutable`` also keeps SQLite from creating its -wal and -shm."""
    location = quote(str(path.resolve()))
    wal = path.with_name(path.name + "-wal")
    options = "mode=ro" if wal.exists() else "mode=ro&immutable=1"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(f"file:{location}?{options}", uri=True, timeout=timeout)

    return sa.create_engine("sqlite://", creator=connect, poolclass=NullPool)


def explain_database_error(message: str, where: str, name: str = "NAME") -> tuple[str, str]:
    """A driver's connection error in plain words, and what to do about it (``name``: the
    database's)."""
    text = message.lower()
    url_fix = "check TASKRELAY_DATABASE_URL."
    if "password authentication failed" in text or "authentication failed" in text:
        return (
            f"{where}: the server refused the user name or password.",
            "check the user and password in TASKRELAY_DATABASE_URL.",
        )
    if "role" in text and "does not exist" in text:
        return (f"{where}: the server has no such user.", "create the user, or " + url_fix)
    if "database" in text and "does not exist" in text:
        return (
            f"{where}: the server has no database of that name.",
            f"create it (e.g. `createdb {name}`), then run `taskrelay migrate`; or " + url_fix,
        )
    if "connection refused" in text:
        return (
            f"{where}: nothing accepts connections there (connection refused).",
            "start PostgreSQL, or correct the host and port in TASKRELAY_DATABASE_URL.",
        )
    dns = ("could not translate host name", "name or service not known", "nodename nor")
    if any(words in text for words in (*dns, "name resolution")):
        return (f"{where}: the host name does not resolve (DNS).", url_fix)
    if "timeout" in text or "timed out" in text:
        return (
            f"{where}: no answer in time (a firewall may be dropping the traffic).",
            "check that this machine may reach the database host and port.",
        )
    if "pg_hba.conf" in text:
        return (
            f"{where}: the server does not accept this client (pg_hba.conf).",
            "allow this host and user in the server's pg_hba.conf.",
        )
    if "ssl" in text:
        return (
            f"{where}: the TLS (SSL) connection failed.",
            "check the sslmode in TASKRELAY_DATABASE_URL.",
        )
    if "not a database" in text or "malformed" in text:
        return (
            f"{where} is not a TaskRelay database (not SQLite, or damaged).",
            "point TASKRELAY_DATABASE_URL at the right file, or restore it from a backup.",
        )
    if "unable to open" in text:
        return (f"{where} cannot be opened.", "check the path and its permissions.")
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return (f"{where}: could not be read ({first_line}).", url_fix)


def database_check(probe: DatabaseProbe) -> CheckResult:
    if probe.full:
        # SQLite in WAL mode cannot even read a file whose -shm must grow on a full disk: its
        # error then is "disk I/O error", which said the disk had failed.
        cannot = "cannot be read or written" if probe.error is not None else "refuses writes"
        return CheckResult(
            "database",
            FAIL,
            f"{probe.where}: the disk holding it is full (under {MIN_FREE_BYTES >> 20} MiB "
            f"free), and it {cannot}: `taskrelay serve` refuses to start, or answers every "
            "write 507 store_full.",
            fix="free space on that disk (or raise its quota).",
        )
    if probe.error is not None:
        message, fix = explain_database_error(probe.error, probe.where, probe.name or "NAME")
        return CheckResult("database", FAIL, message, fix=fix)
    if probe.not_a_folder is not None:
        return CheckResult(
            "database",
            FAIL,
            f"{probe.where}: {probe.not_a_folder} is a file, where a folder must be.",
            fix="point TASKRELAY_DATA_DIR (or TASKRELAY_DATABASE_URL) at a folder, or move "
            "the file away.",
        )
    if probe.unwritable is not None:
        return CheckResult(
            "database",
            FAIL,
            f"{probe.where}: TaskRelay could not write to {probe.unwritable}.",
            fix="give the user that runs TaskRelay write access to it.",
        )
    if probe.missing:
        return CheckResult(
            "database",
            WARN,
            f"{probe.where} does not exist yet: `taskrelay serve` creates it (if that is not "
            "the file you expected, check TASKRELAY_DATA_DIR or TASKRELAY_DATABASE_URL).",
        )
    return CheckResult("database", OK, f"{probe.where} answers.")


def database_error_line(url: str, exc: sa.exc.DBAPIError) -> str:
    """A driver error met outside doctor (``taskrelay migrate``, ``serve``) in one line, in
    the same plain words: what it means and what to do. Never the password."""
    driver = str(exc.orig) if exc.orig is not None else str(exc)
    name = sa.engine.make_url(url).database or "NAME"
    message, fix = explain_database_error(driver, describe_database(url), name)
    password = sa.engine.make_url(url).password
    line = f"{message} Fix: {fix}"
    return line.replace(str(password), "***") if password else line


# The differences a warning names at most.
DRIFT_SHOWN = 5


def migrations_check(probe: DatabaseProbe, head: str | None, known: Iterable[str]) -> CheckResult:
    if probe.error is not None:
        return CheckResult("migrations", WARN, "not checked: the database cannot be read.")
    if probe.missing:
        return CheckResult(
            "migrations", OK, f"nothing to check: `taskrelay serve` creates it at {head}."
        )
    if probe.revision == head and probe.drift:
        shown = "; ".join(probe.drift[:DRIFT_SHOWN])
        hidden = len(probe.drift) - DRIFT_SHOWN
        more = f" (and {hidden} more)" if hidden > 0 else ""
        return CheckResult(
            "migrations",
            WARN,
            f"the schema is at {head}, but differs from what this version expects: {shown}"
            f"{more}. A migration stopped midway (an index built or dropped CONCURRENTLY) or "
            "a change made by hand leaves this.",
            fix="migrate down past the revision that made it and up again (`taskrelay migrate "
            "--revision <earlier>`, then `taskrelay migrate`), or restore the object by hand.",
        )
    if probe.revision == head:
        return CheckResult("migrations", OK, f"the schema is current ({head}).")
    if probe.revision is not None and probe.revision not in set(known):
        message, fix = newer_schema(probe.revision, head)
        return CheckResult("migrations", FAIL, message, fix=fix)
    if probe.revision is None and probe.in_the_way:
        names = ", ".join(probe.in_the_way)
        if probe.sqlite:
            return CheckResult(
                "migrations",
                FAIL,
                f"{probe.where} holds another program's tables ({names}) and no TaskRelay "
                "schema: `taskrelay serve` and `taskrelay migrate` refuse it, changing "
                "nothing in it.",
                fix="check TASKRELAY_DATABASE_URL (or TASKRELAY_DATA_DIR), or point it at a "
                "new file.",
            )
        return CheckResult(
            "migrations",
            FAIL,
            f"{probe.where} has no TaskRelay schema, but holds tables of the names it needs "
            f"({names}): another application's, or made by hand. `taskrelay migrate` and "
            "`taskrelay serve` refuse it, changing nothing.",
            fix="give TaskRelay a database (or SQLite file) of its own.",
        )
    found = probe.revision or "nothing (an empty database)"
    if probe.sqlite:
        return CheckResult(
            "migrations",
            WARN,
            f"the schema is at {found}; this version needs {head}. `taskrelay serve` migrates "
            "a SQLite file when it starts.",
            fix="nothing to do, or run `taskrelay migrate` now.",
        )
    return CheckResult(
        "migrations",
        FAIL,
        f"the schema is at {found}; this version needs {head}, and `taskrelay serve` refuses "
        "to start until it is migrated.",
        fix="run `taskrelay migrate` (once per release, before starting the new version).",
    )


# --- the providers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderProbe:
    """What one harmless request to a provider found."""

    url: str  # what was asked
    status_code: int | None = None
    json_body: bool = False
    location: str | None = None  # where a redirect pointed
    failure: str | None = None  # dns | refused | tls | timeout | unreachable
    detail: str = ""


def probe_request(adapter: ProviderAdapter) -> tuple[str, str, Mapping[str, str] | None, Any]:
    """The request that costs nothing and creates nothing: a status query for a task id
    that does not exist, or (providers without a status endpoint: OpenAI) the model list.
    Returns method, URL, query parameters and JSON body."""
    if isinstance(adapter, TaskEndpointAdapter):
        query = adapter.status_query(PROBE_TASK_ID)
        return query.method, adapter.url(query.path), query.params, query.json_body
    return "GET", adapter.url("/v1/models"), None, None


async def probe_provider(adapter: ProviderAdapter, http: httpx.AsyncClient) -> ProviderProbe:
    method, url, params, body = probe_request(adapter)
    try:
        response = await http.request(
            method, url, params=params, json=body, headers=adapter.headers()
        )
    except httpx.HTTPError as exc:
        failure, detail = classify_transport_error(exc)
        return ProviderProbe(url, failure=failure, detail=detail)
    try:
        json.loads(response.content)
        is_json = True
    except ValueError:
        is_json = False
    return ProviderProbe(
        url,
        status_code=response.status_code,
        json_body=is_json,
        location=response.headers.get("location"),
    )


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify_transport_error(exc: httpx.HTTPError) -> tuple[str, str]:
    """``(kind, detail)``: dns, refused, tls, timeout or unreachable, and the low-level reason."""
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            return "dns", str(cause)
        if isinstance(cause, ConnectionRefusedError):
            return "refused", "connection refused"
        if isinstance(cause, ssl.SSLError | ssl.CertificateError):
            return "tls", getattr(cause, "reason", None) or type(cause).__name__
    if isinstance(exc, httpx.TimeoutException):
        return "timeout", type(exc).__name__
    text = str(exc).lower()
    if "name or service not known" in text or "name resolution" in text:
        return "dns", str(exc)
    if "refused" in text:
        return "refused", "connection refused"
    if "ssl" in text or "certificate" in text:
        return "tls", str(exc)
    return "unreachable", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def provider_check(
    provider: str, probe: ProviderProbe, *, timeout: float = PROBE_TIMEOUT_SECONDS
) -> CheckResult:
    name = f"provider {provider}"
    variable = f"TASKRELAY_{provider.upper()}"
    parts = urlsplit(probe.url)
    host = parts.hostname or "?"
    place = f"{host}:{parts.port}" if parts.port else host
    base_fix = f"check {variable}_BASE_URL."
    if probe.failure == "dns":
        return CheckResult(
            name,
            FAIL,
            f"{host} does not resolve (DNS): the provider cannot be reached from here.",
            fix=f"{base_fix} If it is right, check this machine's DNS settings.",
        )
    if probe.failure == "refused":
        return CheckResult(
            name,
            FAIL,
            f"nothing accepts connections at {place} (connection refused).",
            fix=f"{base_fix} If it points at a proxy or gateway, check that it is running.",
        )
    if probe.failure == "tls":
        return CheckResult(
            name,
            FAIL,
            f"the TLS (HTTPS) handshake with {place} failed ({probe.detail}): a wrong "
            "certificate, or an http:// server behind an https:// URL.",
            fix=f"{base_fix} Behind an intercepting proxy, install its CA certificate "
            "(SSL_CERT_FILE).",
        )
    if probe.failure == "timeout":
        return CheckResult(
            name,
            FAIL,
            f"{place} did not answer within {timeout:.0f} s (a firewall may be dropping the "
            "traffic, or the provider is down).",
            fix=f"check that this machine may reach {place}; {base_fix}",
        )
    if probe.failure is not None:
        return CheckResult(name, FAIL, f"{place} could not be reached ({probe.detail}).", base_fix)
    status = probe.status_code
    assert status is not None
    if status in (401, 403):
        return CheckResult(
            name,
            FAIL,
            f"{place} answered but rejected the API key (HTTP {status}).",
            fix=f"check {variable}_API_KEY (and that the key is enabled at the provider).",
        )
    if 300 <= status < 400:
        return CheckResult(
            name,
            FAIL,
            f"{place} answered with a redirect (HTTP {status}) to {probe.location or '?'}: "
            "TaskRelay does not follow redirects, so its requests would not arrive.",
            fix=f"set {variable}_BASE_URL to the address the redirect points at.",
        )
    if status == 429:
        return CheckResult(
            name,
            WARN,
            f"{place} answered, but is rate-limiting this key right now (HTTP 429).",
            fix="nothing to do if it passes; otherwise ask the provider about the limits.",
        )
    if status >= 500:
        return CheckResult(
            name,
            WARN,
            f"{place} answered with a server error (HTTP {status}): the provider has trouble "
            "right now.",
            fix="try again later; TaskRelay retries submissions and status queries itself.",
        )
    if status == 404 and not probe.json_body:
        return CheckResult(
            name,
            WARN,
            f"{place} answered, but {parts.path} was not found (HTTP 404, not the provider's "
            "JSON): the base URL may be wrong, and the key was not checked.",
            fix=f"{base_fix} It should be the API's root, like the default in the README.",
        )
    if status == 404:
        return CheckResult(
            name,
            OK,
            f"{place} answered as expected for a made-up task id (HTTP 404) and did not "
            "reject the API key.",
        )
    return CheckResult(
        name, OK, f"{place} answered (HTTP {status}) and did not reject the API key."
    )


async def check_providers(
    settings: Settings, *, probe_seconds: float = PROBE_TIMEOUT_SECONDS
) -> list[CheckResult]:
    """One harmless request to each configured provider, all at once."""
    results: dict[str, CheckResult] = {}
    async with httpx.AsyncClient(timeout=probe_seconds, follow_redirects=False) as http:
        adapters = build_adapters(settings, http)
        probed = []
        for name, provider in settings.providers.items():
            if not provider.configured:
                continue
            if uses_sandbox(settings, name):
                results[name] = CheckResult(
                    f"provider {name}",
                    OK,
                    "uses the sandbox built into TaskRelay (emulated; not probed).",
                )
                continue
            probed.append(name)
        probes = await asyncio.gather(*(probe_provider(adapters[n], http) for n in probed))
    for name, probe in zip(probed, probes, strict=True):
        results[name] = provider_check(name, probe, timeout=probe_seconds)
    return [results[name] for name in settings.providers if name in results]


# --- all of it -----------------------------------------------------------------------------


def run_checks(
    environ: Mapping[str, str],
    *,
    env_file: Path | None = None,
    workers: int = 1,
    timeout: float = PROBE_TIMEOUT_SECONDS,
) -> list[CheckResult]:
    """Every check, in order; later checks are skipped when what they need is broken."""
    results, settings = load_configuration(environ, env_file, workers=workers)
    if settings is None:
        return results
    head, known = schema_revisions(settings.database_url)
    probe = probe_database(settings.database_url, timeout=timeout, head=head)
    results.append(database_check(probe))
    results.append(migrations_check(probe, head, known))
    clock = clock_check(probe, settings.poll_lease)
    if clock is not None:
        results.append(clock)
    results.extend(asyncio.run(check_providers(settings, probe_seconds=timeout)))
    results.append(public_url_check(settings))
    files = files_dir_check(settings)
    if files is not None:
        results.append(files)
    return redact(results, secret_values(settings))


def secret_values(settings: Settings) -> list[str]:
    values = [settings.secret_key.reveal()]
    values += [key.reveal() for key in settings.secret_key_fallbacks]
    values += [token.reveal() for token in settings.api_tokens.values()]
    values += [p.api_key.reveal() for p in settings.providers.values() if p.api_key]
    password = sa.engine.make_url(settings.database_url).password
    if password:
        values.append(str(password))
    return [value for value in values if value]


def redact(results: list[CheckResult], secrets: Iterable[str]) -> list[CheckResult]:
    """Every result with any secret value replaced by ``***`` (longest first)."""
    ordered = sorted(set(secrets), key=len, reverse=True)

    def scrub(text: str | None) -> str | None:
        if text is None:
            return None
        for value in ordered:
            text = masked(text, value, "***")
        return text

    return [
        replace(result, message=scrub(result.message) or "", fix=scrub(result.fix))
        for result in results
    ]


def exit_code(results: Iterable[CheckResult]) -> int:
    return 1 if any(result.status == FAIL for result in results) else 0


def render_text(results: list[CheckResult]) -> str:
    width = max(len(result.check) for result in results)
    lines = []
    for result in results:
        label = "FAIL" if result.status == FAIL else result.status
        line = f"{label:<4}  {result.check:<{width}}  {result.message}"
        if result.fix:
            line += f" Fix: {result.fix}"
        lines.append(line)
    failed = sum(result.status == FAIL for result in results)
    warned = sum(result.status == WARN for result in results)
    if failed:
        lines.append(f"\n{failed} problem(s) to fix, {warned} warning(s).")
    elif warned:
        lines.append(f"\nNo problems; {warned} warning(s).")
    else:
        lines.append("\nAll checks passed.")
    return "\n".join(lines)


def render_json(results: list[CheckResult]) -> str:
    document = {
        "ok": exit_code(results) == 0,
        "checks": [result.to_json() for result in results],
    }
    return json.dumps(document, indent=2)
