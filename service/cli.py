"""The ``taskrelay`` command line: serve, migrate, doctor, sandbox, new-token."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from sqlalchemy.exc import DBAPIError

from service import __version__
from service.db import (
    Migrated,
    SchemaError,
    current_revision,
    make_engine,
    migrate,
    newer_schema,
    schema_revisions,
    sqlite_path,
)
from service.errors import SettingsError, StoreUnavailable
from service.logs import configure_logging
from service.settings import (
    Settings,
    check_public_url,
    env_file_path,
    load_settings,
    port_number,
    read_env_file,
)

log = logging.getLogger("taskrelay")


# Stands in for the signing key where a command signs nothing (migrate).
UNUSED_SECRET = "taskrelay-unused-signing-key"  # noqa: S105


def _settings(*, signs: bool = True) -> Settings:
    """The settings, with logging set up at their level. Logging is set up once before too:
    loading them may log (the warning that a signing key was generated), and every log line
    is a JSON line. A bad value is one line naming it, and exit 2. A command that signs
    nothing (``signs=False``: migrate) neither reads nor makes the signing key file: migrate
    run in an init container with a read-only data folder failed for want of it."""
    configure_logging("INFO")
    environ: Mapping[str, str] = os.environ
    if not signs:
        environ = {**os.environ, "TASKRELAY_SECRET_KEY": UNUSED_SECRET}
    try:
        settings = load_settings(environ)
    except SettingsError as exc:
        print(f"taskrelay: configuration error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from exc
    configure_logging(settings.log_level)
    unknown = settings.unknown_variables_text()
    if unknown:
        log.warning("unknown settings: %s", unknown)
    return settings


def _why(settings: Settings, exc: Exception) -> str:
    """A migration's or schema check's failure in one line: the store's own message, or the
    database driver's error in plain words (as doctor says it), never with the password."""
    if not isinstance(exc, DBAPIError):
        return exc.message if isinstance(exc, StoreUnavailable | SchemaError) else str(exc)
    from service.doctor import database_error_line

    return database_error_line(settings.database_url, exc)


# `serve --demo` (what `make run` runs): for trying TaskRelay out on this machine.
DEMO_DEFAULTS = {"TASKRELAY_SANDBOX": "true", "TASKRELAY_API_TOKENS": "demo:demo-token"}


def _demo_defaults() -> None:
    """Each of DEMO_DEFAULTS that neither the environment nor the .env file sets. (Set in
    the environment by `make run`, they hid the .env file's own values.)"""
    try:
        file_values = read_env_file(env_file_path(os.environ))
    except SettingsError:
        file_values = {}  # the settings say what is wrong with it, next
    for name, value in DEMO_DEFAULTS.items():
        if not (os.environ.get(name, "").strip() or file_values.get(name, "").strip()):
            os.environ[name] = value


def cmd_serve(args: argparse.Namespace) -> int:
    # Command-line flags win over the environment; the uvicorn factory reads the environment
    # again in each worker, so pass them on there.
    if args.demo:
        _demo_defaults()
    if args.host:
        os.environ["TASKRELAY_HOST"] = args.host
    if args.port:
        os.environ["TASKRELAY_PORT"] = str(args.port)
    if args.sandbox:
        os.environ["TASKRELAY_SANDBOX"] = "true"
    if args.graceful_timeout is not None:
        os.environ["TASKRELAY_SHUTDOWN_TIMEOUT"] = duration_text(args.graceful_timeout)
    settings = _settings()
    if settings.is_sqlite and args.workers > 1:
        print(
            "taskrelay: SQLite supports one process; use PostgreSQL for several workers.",
            file=sys.stderr,
        )
        return 2
    if settings.sandbox and args.workers > 1:
        print(
            "taskrelay: the built-in sandbox keeps its tasks in the process that made them, "
            "so with several workers a status query to another worker finds none. Run "
            "`taskrelay sandbox` on its own and point TASKRELAY_<PROVIDER>_BASE_URL at it, "
            "or serve with one worker.",
            file=sys.stderr,
        )
        return 2
    try:  # before migrating: serve hands out callback URLs, so it needs a usable public URL
        check_public_url(settings)
    except SettingsError as exc:
        print(f"taskrelay: configuration error: {exc.message}", file=sys.stderr)
        return 2
    # Before migrating: a second serve started by mistake (the same data folder and port, or
    # a release started while the old one still runs) must not change the schema under the
    # process that holds the port, and then exit.
    unable = _cannot_listen(settings.host, settings.port, args.workers)
    if unable is not None:
        print(
            f"taskrelay: cannot listen on {settings.host} port {settings.port}: {unable}.",
            file=sys.stderr,
        )
        return 2
    held = _hold_sqlite_file(settings)
    if held is not None:
        print(f"taskrelay: {held}", file=sys.stderr)
        return 2
    if settings.is_sqlite or args.migrate:
        try:
            migrate(settings.database_url)
        # Read-only or full, a schema newer than this release, a database that cannot be
        # reached: say so, no traceback.
        except (StoreUnavailable, SchemaError, DBAPIError) as exc:
            print(f"taskrelay: {_why(settings, exc)}", file=sys.stderr)
            return 2
        log.info("database schema is up to date", extra={"database": _describe(settings)})
    else:
        problem = _schema_problem(settings)
        if problem:
            print(f"taskrelay: {problem}", file=sys.stderr)
            return 2
    # Build once here so a bad configuration stops start-up before uvicorn starts.
    from service.app import create_app, shutdown_drain_seconds

    try:
        create_app(settings)
    except SettingsError as exc:
        print(f"taskrelay: configuration error: {exc.message}", file=sys.stderr)
        return 2
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM (stops accepting, finishes the requests in
    # flight, then the app's lifespan finishes or releases its background work; the app begins
    # its part at the signal itself: open event streams end, background work stops claiming),
    # all within TASKRELAY_SHUTDOWN_TIMEOUT: uvicorn's drain gets the part the app gives the
    # work in flight, the rest is the app's to record and release what was cut off. Then raises
    # the signal again for the handler it found, the default one, which kills the process:
    # an orchestrator would see "killed by SIGTERM" after a clean stop. Exit 0 instead. A
    # SIGTERM before uvicorn has installed its own handler (still starting) also stops here.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    drain = shutdown_drain_seconds(settings.shutdown_timeout)
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": True,
        # Annotated int, used as a number of seconds (asyncio.wait_for): a float is kept exact.
        "timeout_graceful_shutdown": drain,
        "server_header": False,
    }
    if args.workers == 1:
        # workers=1 said: uvicorn would otherwise take WEB_CONCURRENCY from the environment
        # (some platforms set it) and run several processes under its own supervisor.
        uvicorn.run(APP_FACTORY, workers=1, **options)
        return 0
    # Several workers: uvicorn's supervisor, as uvicorn.run would start it, but one that lets
    # go of the listening socket when it stops.
    from uvicorn.config import STARTUP_FAILURE

    from service.metrics import WORKERS_DIR_ENV
    from service.supervisor import Supervisor

    config = uvicorn.Config(APP_FACTORY, workers=args.workers, **options)
    # Where the workers add up their counters for /metrics (service.metrics.WorkerMetrics):
    # new for each run, as a process's counters are, in the data folder (writable: the signing
    # key may live there too; a read-only system with no temporary folder is common).
    shared: str | None
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        shared = tempfile.mkdtemp(prefix=".metrics-", dir=settings.data_dir)
    except OSError as exc:
        shared = None
        log.warning(
            "cannot make a folder for the workers' metrics in %s (%s): each worker's /metrics "
            "answer has its own counters only",
            settings.data_dir,
            exc,
        )
    else:
        os.environ[WORKERS_DIR_ENV] = shared
    try:
        with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before its handlers are set
            supervisor = Supervisor(config, sockets=[config.bind_socket()])
            supervisor.run()
            if supervisor.failed_to_start:
                return STARTUP_FAILURE  # as uvicorn exits with one worker that failed to start
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
    return 0


APP_FACTORY = "service.app:create_app_from_env"


def _port(text: str) -> int:
    try:
        return port_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a TCP port number ({exc})") from None


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("a number of worker processes, 1 or more")
    return value


def _cannot_listen(host: str, port: int, workers: int) -> str | None:
    """Why the server could not listen on ``host``:``port`` (in use, not an address of this
    machine, not allowed), found by binding as uvicorn will and letting go; None if it can.
    Checked before start-up, which would otherwise log "TaskRelay ready" and then fail. One
    process binds every address the host resolves to, IPv6 ones for IPv6 only (asyncio's
    create_server); several bind one socket for the host (uvicorn's Config.bind_socket)."""
    addresses: list[tuple[socket.AddressFamily, Any]]
    try:
        if workers > 1:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            addresses = [(family, (host, port))]
        else:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            addresses = [(found_family, address) for found_family, _, _, _, address in found]
    except OSError as exc:
        return f"{host} does not resolve ({exc.strerror or exc}); check --host or TASKRELAY_HOST"
    for family, address in dict.fromkeys(addresses):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and workers == 1:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            return _bind_problem(exc)
    return None


def _bind_problem(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return f"{reason}; stop what holds the port, or choose another (--port, TASKRELAY_PORT)"
    if exc.errno == errno.EACCES:
        return (
            f"{reason}; ports below 1024 need privileges: choose a higher one (--port, "
            "TASKRELAY_PORT)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{reason}; it is not an address of this machine: choose one of its addresses, "
            "or 0.0.0.0 for all (--host, TASKRELAY_HOST)"
        )
    return f"{reason}; check --host and --port (TASKRELAY_HOST, TASKRELAY_PORT)"


def duration_text(seconds: float) -> str:
    """``seconds`` as a duration setting reads it: in milliseconds, to the microsecond
    ("{:f}" made 0.0000001 s "0.000000", which the setting refused, naming a variable the
    user never set)."""
    return f"{seconds * 1000:.3f}ms"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.001 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be from 0.001 to 3600 seconds")
    return value


# The lock `serve` holds on its SQLite file's lock file while it runs (kept open: closing it,
# or the process ending however it ends, lets it go).
_SERVING: list[int] = []


def _hold_sqlite_file(settings: Settings) -> str | None:
    """On SQLite, lock ``<database>.serve-lock`` for as long as this process runs: a second
    ``serve`` on the same file (another port, a copy of the service started by mistake) is
    refused, rather than run a second scheduler and writer against one file. Why not, or
    None. A file system that takes no locks takes none."""
    import fcntl

    path = sqlite_path(settings.database_url)
    if path is None:
        return None
    # Named after the file itself: a symbolic link to it (or to its folder) is the same file,
    # and went around the lock.
    path = path.resolve()
    lock = path.with_name(path.name + ".serve-lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None  # the database's own checks say what is wrong with the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return (
            f"another `taskrelay serve` is using the SQLite file {path}: SQLite serves one "
            "process. Stop it first, or give this one a TASKRELAY_DATA_DIR of its own (use "
            "PostgreSQL for several processes)."
        )
    except OSError:
        pass  # no locks here
    _SERVING.append(fd)
    return None


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _schema_problem(settings: Settings) -> str | None:
    """Why the database cannot be served as it is, or None when its schema is current."""
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        revision = current_revision(engine)
    except (DBAPIError, StoreUnavailable) as exc:
        return _why(settings, exc)
    except Exception as exc:  # any other error on the way: still no traceback
        return f"cannot reach the database ({type(exc).__name__}): check TASKRELAY_DATABASE_URL."
    finally:
        engine.dispose()
    expected, known = schema_revisions(settings.database_url)
    if revision is not None and revision not in known:
        message, fix = newer_schema(revision, expected)
        return f"{message} Fix: {fix}"
    if revision != expected:
        return (
            f"the database schema is at {revision or 'nothing (empty database)'}, this version "
            f"needs {expected}: run `taskrelay migrate` first (or `taskrelay serve --migrate`)."
        )
    return None


def _describe(settings: Settings) -> str:
    path = sqlite_path(settings.database_url)
    return f"sqlite file {path}" if path else "postgresql"


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(signs=False)
    try:
        done = migrate(settings.database_url, args.revision, discard_data=args.discard_data)
    except (StoreUnavailable, SchemaError, DBAPIError) as exc:
        print(f"taskrelay: {_why(settings, exc)}", file=sys.stderr)
        return 2
    print(f"taskrelay: {_what_migrate_did(done)} ({_describe(settings)})")
    return 0


def _what_migrate_did(done: Migrated) -> str:
    if done.before == done.after:
        return f"the database schema is already at {done.after or 'base (no tables)'}: no change"
    if done.downgraded:
        after = done.after or "base (every TaskRelay table removed; Alembic's own, empty, is left)"
        return f"database downgraded from {done.before} to {after}"
    return f"database upgraded from {done.before or 'nothing (an empty database)'} to {done.after}"


def cmd_sandbox(args: argparse.Namespace) -> int:
    configure_logging("INFO")
    from service.sandbox import run

    signal.signal(signal.SIGTERM, _exit_cleanly)  # exit 0 after a clean stop, as serve does
    run(args.host, args.port, api_key=args.api_key)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    # Reads only: no migration, no key file, no bytecode beside the migration scripts.
    sys.dont_write_bytecode = True
    from service import doctor

    if args.demo:
        _demo_defaults()
    results = doctor.run_checks(os.environ, workers=args.workers, timeout=args.timeout)
    print(doctor.render_json(results) if args.json else doctor.render_text(results))
    return doctor.exit_code(results)


def cmd_new_token(args: argparse.Namespace) -> int:
    print(secrets.token_urlsafe(32))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskrelay",
        description="TaskRelay tracks asynchronous image-generation tasks across providers. "
        "Configuration comes from TASKRELAY_* environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"taskrelay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the HTTP service (migrates an embedded SQLite store first)",
        description="Run the HTTP service with uvicorn.",
    )
    serve.add_argument("--host", help="address to listen on (default: TASKRELAY_HOST or 127.0.0.1)")
    serve.add_argument(
        "--port", type=_port, help="port to listen on (default: TASKRELAY_PORT or 8000)"
    )
    serve.add_argument(
        "--workers", type=_workers, default=1, help="worker processes (PostgreSQL only)"
    )
    serve.add_argument(
        "--migrate",
        action="store_true",
        help="apply migrations before serving on PostgreSQL too (SQLite always migrates)",
    )
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="mount the provider sandbox at /sandbox and point unconfigured providers at it",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="for trying TaskRelay out (`make run`): the sandbox and the API token "
        "demo:demo-token, each unless the environment or the .env file sets it",
    )
    serve.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="the longest the whole shutdown on SIGTERM may take: requests and background work "
        "in flight, then releasing what was cut off (default: TASKRELAY_SHUTDOWN_TIMEOUT or 30)",
    )
    serve.set_defaults(handler=cmd_serve)

    mig = commands.add_parser(
        "migrate",
        help="apply database migrations (or undo them, to an older revision)",
        description="Bring the database schema to a revision: upgrade to it, or downgrade to "
        "it when it is older than the schema's. Prints what it did.",
    )
    mig.add_argument(
        "--revision",
        default="head",
        help="target revision: head (the default), a revision id such as 0008 (older than the "
        "schema's: a downgrade), base (remove every table), or -1 (one back)",
    )
    mig.add_argument(
        "--discard-data",
        action="store_true",
        help="let a downgrade delete stored data (subscriptions, pending deliveries, tasks, "
        "...); without it, such a downgrade is refused and names what it would delete",
    )
    mig.set_defaults(handler=cmd_migrate)

    sandbox = commands.add_parser(
        "sandbox",
        help="run the provider sandbox on its own",
        description="Run the emulator of all five providers' HTTP APIs on its own.",
    )
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=_port, default=9000)
    sandbox.add_argument("--api-key", default="sandbox-key", help="the key clients must send")
    sandbox.set_defaults(handler=cmd_sandbox)

    doctor = commands.add_parser(
        "doctor",
        help="check configuration, database, migrations and providers; change nothing",
        description="Check the configuration, the database and its schema, each configured "
        "provider (one request that costs nothing) and the public callback URL, and say what "
        "is wrong in plain words. Exits 1 when a check fails (warnings alone exit 0).",
    )
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    doctor.add_argument(
        "--demo",
        action="store_true",
        help="check the setup `serve --demo` (`make run`) runs: its demo defaults applied alike",
    )
    doctor.add_argument(
        "--workers", type=_workers, default=1, help="the worker count you serve with (default: 1)"
    )
    doctor.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds each network check may take"
    )
    doctor.set_defaults(handler=cmd_doctor)

    token = commands.add_parser(
        "new-token",
        help="print a new random API token",
        description="Print a random token for TASKRELAY_API_TOKENS or TASKRELAY_SECRET_KEY.",
    )
    token.set_defaults(handler=cmd_new_token)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM before the command's own handling of it (serve: before uvicorn's). A
    KeyboardInterrupt, as psycopg cancels the statement running on the server only for one:
    otherwise a migration waiting for a table lock left its session running after the exit,
    holding the migration lock, its lock request queueing every other user of the table."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A signal while a command starts (serve migrating, waiting for the migration lock, a
    # doctor check): one line and an exit status, not a traceback (SIGINT) or a kill by the
    # signal's default action midway (SIGTERM). What a migration step had begun is rolled
    # back by its transaction. serve sets handlers of its own before it serves.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result: int = args.handler(args)
    except KeyboardInterrupt as exc:  # _Terminated too
        signum = signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT
        print(f"taskrelay: stopped by {signum.name} before it finished", file=sys.stderr)
        # serve told to stop while starting (an orchestrator scaling down) stopped cleanly.
        return 0 if signum == signal.SIGTERM and args.handler is cmd_serve else 128 + signum
    return result


if __name__ == "__main__":
    raise SystemExit(main())
