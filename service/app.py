"""The ASGI application: routes, error mapping, and the lifespan that owns every shared
resource (database engine, httpx client, webhook client, provider adapters, background
workers)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from service import api, callbacks, files, stream, subscriptions
from service.auth import ApiClients
from service.db import current_revision, make_engine, newer_schema, schema_revisions
from service.dispatcher import Dispatcher
from service.errors import SettingsError, StoreUnavailable, TaskRelayError
from service.files import ImageFiles
from service.groupcommit import GroupCommitter
from service.logs import configure_logging
from service.loops import Ticker
from service.metrics import (
    PUBLISH_SECONDS,
    WORKERS_DIR_ENV,
    Metrics,
    WorkerMetrics,
    collect_totals,
    metrics_endpoint,
)
from service.models import utcnow
from service.netguard import AddressPolicy, parse_networks
from service.observe import ObservedStarlette
from service.openapi import build_openapi
from service.outbox import Outbox
from service.polling import PollPolicy
from service.providers import build_adapters
from service.providers.base import ProviderAdapter
from service.ratelimit import ClientRateLimiter
from service.retention import Pruner
from service.retry import submit_backoff
from service.runtime import Runtime, runtime_of
from service.scheduler import ProviderLimiter, Scheduler
from service.settings import (
    MAX_POLL_CONCURRENCY,
    MAX_WRITE_QUEUE,
    Settings,
    check_public_url,
    lease_warning,
    load_settings,
)
from service.signing import CallbackSigner
from service.store import Store
from service.stream import EventSignal
from service.submitter import Submitter
from service.web import (
    handle_http_exception,
    handle_taskrelay_error,
    handle_unexpected,
    json_response,
)
from service.webclient import (
    DELIVERY_TIMEOUTS,
    MAX_CONNECTIONS,
    HttpxClient,
    LeanClient,
    WebhookClient,
)

log = logging.getLogger(__name__)

# Outbound calls to providers: explicit limits for each phase of a request.
SWITCH_INTERVAL_SECONDS = 0.0005
M_ARENA_MAX = -8  # glibc's mallopt() parameter number
MALLOC_ARENAS = 2
UPSTREAM_CONNECT_SECONDS = 5.0  # connecting (and waiting for a pooled connection) stays short
UPSTREAM_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=50)
# Status queries at their most leave submissions a share of each provider's pool.
assert (UPSTREAM_LIMITS.max_connections or 0) - MAX_POLL_CONCURRENCY >= 50
READINESS_TIMEOUT_SECONDS = 3.0
# Graceful shutdown has one budget (TASKRELAY_SHUTDOWN_TIMEOUT, `serve --graceful-timeout`),
# counted from SIGTERM/SIGINT. Requests in flight (uvicorn's drain) and background work in flight
# (status queries, submissions, deliveries) share its first part, side by side; the rest is kept
# for what must follow: recording what finished, cutting off the rest and releasing its leases,
# flushing the writer, closing connections.
SHUTDOWN_RESERVE_FRACTION = 0.2
SHUTDOWN_RESERVE_MAX_SECONDS = 5.0
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def upstream_timeout(seconds: float) -> httpx.Timeout:
    """Calls to providers: ``seconds`` (TASKRELAY_PROVIDER_TIMEOUT) for a read or a write."""
    return httpx.Timeout(
        connect=UPSTREAM_CONNECT_SECONDS,
        read=seconds,
        write=seconds,
        pool=UPSTREAM_CONNECT_SECONDS,
    )


def submit_slots(settings: Settings) -> dict[str, int]:
    """Per provider, the submissions that may be out at once: its pool's connections less
    those its status queries may hold (TASKRELAY_<P>_POLL_CONCURRENCY), at least one."""
    pool = UPSTREAM_LIMITS.max_connections or 1
    return {
        name: max(1, pool - provider.poll_concurrency)
        for name, provider in settings.providers.items()
    }


def shutdown_drain_seconds(total: float) -> float:
    """Of a shutdown budget of ``total`` seconds, how long requests and background work in
    flight may take to finish: the budget less a reserve (a fifth, at most 5 s) for the end."""
    return total - min(SHUTDOWN_RESERVE_MAX_SECONDS, total * SHUTDOWN_RESERVE_FRACTION)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)

    def check() -> str | None:
        runtime.store.ping()
        return current_revision(runtime.engine)

    try:
        # Both queries within the one timeout; the database may also go away between them.
        revision = await asyncio.wait_for(
            run_in_threadpool(check), timeout=READINESS_TIMEOUT_SECONDS
        )
    except (StoreUnavailable, TimeoutError, OSError, DBAPIError) as exc:
        reason = exc.message if isinstance(exc, TaskRelayError) else "database did not answer"
        return json_response({"status": "unavailable", "reason": reason}, status_code=503)
    except Exception:
        log.exception("readiness check failed")
        return json_response(
            {"status": "unavailable", "reason": "database check failed"}, status_code=503
        )
    expected = request.app.state.schema_head
    if revision is not None and revision not in request.app.state.schema_known:
        message, fix = newer_schema(revision, expected)
        return json_response(
            {"status": "unavailable", "reason": f"{message} Fix: {fix}"}, status_code=503
        )
    if revision != expected:
        return json_response(
            {
                "status": "unavailable",
                "reason": f"database schema is at {revision}, expected {expected}: "
                "run `taskrelay migrate`",
            },
            status_code=503,
        )
    return json_response({"status": "ready"})


async def openapi(request: Request) -> Response:
    return json_response(request.app.state.openapi)


async def _sandbox_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """Forwards /sandbox/... to the emulator the lifespan created."""
    sandbox = scope["app"].state.sandbox
    await sandbox.app(scope, receive, send)


# How long after a submission's timeouts have run out its answer may still be on its way into
# the database: storing images, recording the reply (kept trying for about four minutes while
# the database is unavailable: submitter.RECORD_RETRY_WAITS), clocks of replicas a little
# apart.
ANSWER_MARGIN = 300.0
# Before the end of a shutdown's drain: when the mounted sandbox's held requests are let go
# (end_sandbox_requests in create_app).
SANDBOX_LET_GO_BEFORE = 1.0


def answer_within(adapter: ProviderAdapter) -> float | None:
    """:attr:`PollPolicy.answer_within` for ``adapter``: None for one that calls back."""
    if adapter.delivers_callbacks():
        return None
    longest = adapter.longest_wait_for_answer()
    return None if longest is None else longest + ANSWER_MARGIN


def poll_policies(
    settings: Settings, adapters: Mapping[str, ProviderAdapter]
) -> dict[str, PollPolicy]:
    return {
        name: PollPolicy(
            typical_duration=provider.typical_duration,
            deadline=provider.deadline,
            grace=settings.poll_grace,
            max_interval=settings.poll_max_interval,
            error_backoff=settings.poll_error_backoff,
            queryable=adapters[name].can_query_status,
            answer_within=answer_within(adapters[name]),
        )
        for name, provider in settings.providers.items()
    }


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utcnow,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    http_transport: httpx.AsyncBaseTransport | None = None,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
    handle_signals: bool = False,
    worker_metrics_dir: Path | None = None,
) -> Starlette:
    """Build the service. ``clock``, ``monotonic``, ``sleep`` and ``http_transport`` are seams
    for tests (the sandbox, when mounted, runs on the same clock); so is ``webhook_transport``,
    which sends deliveries through httpx on that transport instead of the lean client. With
    ``handle_signals`` (the server's factory), SIGTERM and SIGINT begin the app's part of the
    graceful shutdown at once, alongside the server's (see :func:`_chain_shutdown_signals`).
    ``worker_metrics_dir``: this is one of the workers of ``serve --workers N``, which add
    their counters up there (:class:`service.metrics.WorkerMetrics`)."""
    check_public_url(settings)
    if not settings.api_tokens:
        raise SettingsError(
            "TASKRELAY_API_TOKENS is empty: set it to name:token pairs, one per API client "
            "(e.g. TASKRELAY_API_TOKENS=myapp:$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')).",
            details={"variable": "TASKRELAY_API_TOKENS"},
        )
    if settings.providers["openai"].configured:  # the one provider whose images TaskRelay keeps
        ImageFiles(settings.files_dir, settings.public_url).check_writable()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = make_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            statement_timeout=settings.db_statement_timeout,
        )

        def upstream_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                timeout=upstream_timeout(settings.provider_timeout),
                limits=UPSTREAM_LIMITS,
                transport=http_transport,
                follow_redirects=False,
            )

        http = upstream_client()  # the sandbox's callbacks
        # A pool of connections per provider: one whose requests are held open for long (an
        # OpenAI generation, a GrsAI stream) cannot take the connections the others need.
        provider_http = {name: upstream_client() for name in settings.providers}
        adapters = build_adapters(settings, http, clients=provider_http)
        store = Store(
            engine,
            clock=clock,
            audit_bytes=settings.callback_audit_bytes,
            policies=poll_policies(settings, adapters),
            delivery_first_wait=timedelta(seconds=settings.delivery_schedule[0]),
        )
        signer = CallbackSigner(
            settings.secret_key.reveal(),
            [key.reveal() for key in settings.secret_key_fallbacks],
            max_age=settings.callback_token_ttl,
        )
        image_files = ImageFiles(settings.files_dir, settings.public_url)
        metrics = Metrics()
        submitter = Submitter(
            store,
            adapters,
            signer,
            image_files,
            public_url=settings.public_url,
            backoff=submit_backoff(settings.submit_backoff, settings.submit_attempts),
            metrics=metrics,
            sweep_seconds=settings.submit_sweep,
            send_slots=submit_slots(settings),
        )
        sandbox: Any = None
        if settings.sandbox:
            from service.sandbox import Sandbox

            sandbox = Sandbox(http, clock=monotonic, sleep=sleep, can_let_go=handle_signals)
            app.state.sandbox = sandbox
        address_policy = AddressPolicy(
            allowed_networks=parse_networks(settings.webhook_allowed_networks)
        )
        # Subscriber deliveries: every connection checked against the address policy at
        # connect time (no DNS rebinding), no proxies, no redirects. Tests mounting an
        # in-process subscriber pass its transport, and get httpx with the same settings.
        webhook_http: WebhookClient
        if webhook_transport is None:
            # Room for every delivery the dispatcher may have in flight (one connection each),
            # so none waits for a connection another subscriber's slow answer holds.
            connections = max(MAX_CONNECTIONS, settings.delivery_concurrency)
            webhook_http = LeanClient(address_policy, max_connections=connections)
        else:
            webhook_http = HttpxClient(
                httpx.AsyncClient(
                    transport=webhook_transport,
                    trust_env=False,
                    follow_redirects=False,
                    timeout=DELIVERY_TIMEOUTS.for_httpx(),
                )
            )
        outbox = Outbox(store, schedule=settings.delivery_schedule)
        dispatcher = Dispatcher(
            outbox,
            webhook_http,
            metrics=metrics,
            concurrency=settings.delivery_concurrency,
            per_subscription=settings.delivery_per_subscription,
            lease_seconds=settings.poll_lease,
            tick_seconds=settings.scheduler_tick,
            monotonic=monotonic,
        )
        committer = GroupCommitter(store, max_batch=settings.write_batch, max_queue=MAX_WRITE_QUEUE)
        committer.start()
        event_signal = EventSignal(
            max_streams=settings.max_streams,
            max_streams_per_client=settings.max_streams_per_client,
        )
        # Wakes open streams: commits here through the listener, other processes' commits
        # through its watcher of this store (running only while a stream is open).
        event_signal.bind(asyncio.get_running_loop(), store)
        store.listeners.append(event_signal.notify)
        store.delivery_listeners.append(dispatcher.notify)
        scheduler = Scheduler(
            store,
            adapters,
            {
                name: ProviderLimiter(
                    provider.poll_concurrency, provider.poll_rate, monotonic=monotonic, sleep=sleep
                )
                for name, provider in settings.providers.items()
            },
            metrics=metrics,
            lease_seconds=settings.poll_lease,
            tick_seconds=settings.scheduler_tick,
            clock=clock,
        )
        pruner = None
        if settings.retention is not None:
            pruner = Pruner(store, image_files, settings.retention, metrics=metrics, clock=clock)
        app.state.runtime = Runtime(
            settings=settings,
            engine=engine,
            store=store,
            http=http,
            adapters=adapters,
            signer=signer,
            clients=ApiClients(
                settings.api_tokens,
                limiter=ClientRateLimiter(
                    settings.api_tokens,
                    rate=settings.rate_limit,
                    burst=settings.rate_limit_burst,
                ),
            ),
            files=image_files,
            submitter=submitter,
            scheduler=scheduler,
            metrics=metrics,
            outbox=outbox,
            dispatcher=dispatcher,
            event_signal=event_signal,
            address_policy=address_policy,
            committer=committer,
            pruner=pruner,
        )
        runtime = app.state.runtime
        worker_metrics = publisher = None
        if worker_metrics_dir is not None:
            worker_metrics = WorkerMetrics(
                worker_metrics_dir, metrics, collect=partial(collect_totals, runtime)
            )
            runtime.worker_metrics = worker_metrics
            publisher = Ticker("metrics publishing", worker_metrics.publish_step, PUBLISH_SECONDS)
            publisher.start()
        try:
            await submitter.resume()
        except StoreUnavailable:
            log.error("could not resume unsent submissions: the database is unavailable")
        submitter.start()
        log.info(
            "TaskRelay ready",
            extra={
                "public_url": settings.public_url,
                "database": engine.dialect.name,
                "sandbox": settings.sandbox,
            },
        )
        if settings.scheduler:
            risky = lease_warning(settings)
            if risky is not None:
                log.warning("%s", risky)
            await scheduler.start()
        if settings.dispatcher:
            await dispatcher.start()
        if pruner is not None:
            pruner.start()

        loop = asyncio.get_running_loop()
        drain_seconds = shutdown_drain_seconds(settings.shutdown_timeout)
        shutdown_began: list[float] = []  # loop time, once it has begun
        stopping: list[asyncio.Task[None]] = []
        letting_go: list[asyncio.Task[None]] = []  # end_sandbox_requests, when it runs

        def begin_shutdown() -> None:
            """The app's part of a graceful shutdown, from the moment it begins (idempotent).

            Open event streams end now (their clients reconnect elsewhere with Last-Event-ID:
            left open, each would hold the process for the whole drain). The scheduler and
            the dispatcher stop claiming, and what they have in flight gets until the end of
            the drain, side by side with the requests uvicorn is draining; then it is cut off
            and its leases released."""
            if shutdown_began:
                return
            shutdown_began.append(loop.time())
            ended = event_signal.drain()
            log.info(
                "shutting down: within %g s (requests and work in flight: %g s)",
                settings.shutdown_timeout,
                drain_seconds,
                extra={"streams_ended": ended},
            )
            if settings.scheduler:
                stopping.append(loop.create_task(scheduler.stop(grace=drain_seconds)))
            if settings.dispatcher:
                stopping.append(loop.create_task(dispatcher.stop(grace=drain_seconds)))
            if pruner is not None:  # no new batch; the one in flight (milliseconds) ends
                stopping.append(loop.create_task(pruner.stop()))
            # No new attempt that a cut-off would fail; submissions in flight go on.
            stopping.append(loop.create_task(submitter.begin_stop(grace=drain_seconds)))
            if sandbox is not None and handle_signals:
                letting_go.append(loop.create_task(end_sandbox_requests()))

        async def end_sandbox_requests() -> None:
            """The mounted sandbox's answers are requests uvicorn is draining: at the
            drain's end it would cancel the ones still held back (a hung or slow answer),
            answering them 500 with an error in the log, and a submission waiting for one
            would take the 500 for the provider's answer (and retry it) instead of being cut
            off. So, a little before, the submissions in flight are cut off (as at the end of
            any shutdown: _cut_off), then the sandbox lets its held requests go."""
            await asyncio.sleep(max(0.0, drain_seconds - SANDBOX_LET_GO_BEFORE))
            await submitter.stop(grace=0.0)
            sandbox.let_go()

        restore_signals = (
            _chain_shutdown_signals(loop, begin_shutdown) if handle_signals else _nothing
        )
        try:
            yield
        finally:
            # uvicorn has stopped accepting and finished (or cut off) the requests in flight.
            # Without a signal (tests; a server stopping on its own) the shutdown begins here.
            restore_signals()
            begin_shutdown()
            for early in letting_go:  # the drain is over: nothing is left to end early
                early.cancel()
            await asyncio.gather(*letting_go, return_exceptions=True)
            # Requests draining may still hand it tasks to send, so the submitter stops last,
            # with what is left of the drain.
            left = max(0.0, shutdown_began[0] + drain_seconds - loop.time())
            await asyncio.gather(submitter.stop(grace=left), *stopping)
            await committer.stop()
            if publisher is not None and worker_metrics is not None:
                await publisher.stop()
                worker_metrics.publish()  # this worker's last counts, kept for the sums
            await event_signal.stop()
            await webhook_http.aclose()
            if sandbox is not None:
                await sandbox.aclose()
            for client in provider_http.values():
                await client.aclose()
            await http.aclose()
            engine.dispose()

    routes: list[Route | Mount] = [
        # Callbacks first: the busiest route, and Starlette tries routes in order.
        *callbacks.routes,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *api.routes,
        *stream.routes,
        *subscriptions.routes,
        *files.routes,
    ]
    if settings.sandbox:
        routes.append(Mount("/sandbox", app=_sandbox_asgi))
    # Request ids (X-Request-ID, and on every log line): outermost, so a 500 has one too.
    app = ObservedStarlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            TaskRelayError: handle_taskrelay_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
    )
    # A path with a trailing slash is a 404 like any unknown path: Starlette would redirect
    # it (307) to a URL built from the request's own Host header.
    app.router.redirect_slashes = False
    app.state.openapi = build_openapi()
    # Read the migration scripts once, not on every readiness probe.
    app.state.schema_head, app.state.schema_known = schema_revisions(settings.database_url)
    return app


def _nothing() -> None:
    pass


def _chain_shutdown_signals(
    loop: asyncio.AbstractEventLoop, begin: Callable[[], None]
) -> Callable[[], None]:
    """Have SIGTERM and SIGINT also call ``begin`` on ``loop``; returns the undo.

    uvicorn's handlers (installed before the lifespan starts, in every worker process) only
    set a flag: the server then stops accepting and waits for the open connections, and runs
    the lifespan's shutdown only after they have closed or the graceful timeout cut them off.
    An open event stream never closes by itself, and background work would only begin to stop
    after the drain. The handler in place is kept and called too; uvicorn puts back its own
    originals after serving anyway."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing  # signal handlers can only be set from the main thread
    installed: dict[int, tuple[Any, Any]] = {}
    for signum in SHUTDOWN_SIGNALS:
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue  # no graceful handler in place (default or ignored): leave it alone
        handler = _chained(loop, begin, previous)
        signal.signal(signum, handler)
        installed[signum] = (previous, handler)

    def restore() -> None:
        for signum, (previous, handler) in installed.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, previous)

    return restore


def _chained(
    loop: asyncio.AbstractEventLoop,
    begin: Callable[[], None],
    previous: Callable[[int, FrameType | None], Any],
) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread (the loop's): hand over, do not run.
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to stop
            loop.call_soon_threadsafe(begin)
        previous(signum, frame)

    return handler


def tune_process() -> None:
    """Process-wide settings for a threaded server (each uvicorn worker calls this once)."""
    # The GIL's hand-over interval (5 ms by default) is a floor on how long a thread that
    # finished a database call waits to run again while the event loop is busy; the group
    # committer, the dispatcher's transactions and SQLite's single write turn all pay it.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    # A fatal signal (SIGSEGV, or SIGBUS: SQLite's -shm file is memory-mapped, and one made
    # immutable or truncated under it faults) would end the process without a word: leave the
    # Python stacks of every thread on stderr instead.
    with contextlib.suppress(RuntimeError, ValueError):  # no stderr to write to: nothing to do
        faulthandler.enable(all_threads=True)
    # glibc gives threads that allocate at the same time malloc arenas of their own (up to 8
    # per core), each keeping the pages freed in it: over a 10-minute run that made RSS grow
    # ~11 % with no live object growing (bench/memory.py). Two arenas hold it under 5 %. An
    # explicit MALLOC_ARENA_MAX in the environment wins; other C libraries have no mallopt.
    if sys.platform == "linux" and "MALLOC_ARENA_MAX" not in os.environ:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def create_app_from_env() -> Starlette:
    """The uvicorn factory (``service.app:create_app_from_env``): settings from the environment.

    Each worker of ``serve --workers N`` is a fresh process that calls this: it sets up the
    JSON logs at the configured level itself (uvicorn runs with ``log_config=None``), as
    ``taskrelay serve`` does for one process, or its lines would be plain text and its info
    lines lost."""
    tune_process()
    configure_logging("INFO")  # loading the settings may log
    settings = load_settings()
    configure_logging(settings.log_level)
    shared = os.environ.get(WORKERS_DIR_ENV)
    app = create_app(
        settings, handle_signals=True, worker_metrics_dir=Path(shared) if shared else None
    )
    # Everything imported and built so far lives as long as the process: move it out of the
    # cyclic collector's way, so that its full collections, which otherwise walk it all, stop
    # adding ~25 ms to the occasional request (bench/store_scale.py: list p99 30 -> 4 ms).
    gc.collect()
    gc.freeze()
    return app
