"""The ASGI application: routes, error mapping, and the lifespan that owns every shared
resource (database engine, httpx client, provider adapters, background workers)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from service import api, callbacks, files, stream, subscriptions
from service.auth import ApiClients
from service.db import current_revision, head_revision, make_engine
from service.dispatcher import DELIVERY_TIMEOUT, Dispatcher
from service.errors import SettingsError, StoreUnavailable, TaskRelayError
from service.files import ImageFiles
from service.groupcommit import GroupCommitter
from service.metrics import Metrics, metrics_endpoint
from service.models import utcnow
from service.netguard import AddressPolicy, guarded_transport, parse_networks
from service.observe import ObservedStarlette
from service.openapi import build_openapi
from service.outbox import Outbox
from service.polling import PollPolicy
from service.providers import build_adapters
from service.providers.base import ProviderAdapter
from service.ratelimit import ClientRateLimiter
from service.retry import submit_backoff
from service.runtime import Runtime, runtime_of
from service.scheduler import ProviderLimiter, Scheduler
from service.settings import Settings, load_settings
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

log = logging.getLogger(__name__)

# Outbound calls to providers: explicit limits for each phase of a request.
SWITCH_INTERVAL_SECONDS = 0.0005
M_ARENA_MAX = -8  # glibc's mallopt() parameter number
MALLOC_ARENAS = 2
UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=5.0)
UPSTREAM_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=50)
READINESS_TIMEOUT_SECONDS = 3.0
# On shutdown, how long background work in flight (status queries, submissions, deliveries)
# may take to finish, after uvicorn's own grace for HTTP requests.
WORKER_STOP_GRACE_SECONDS = 10.0


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime = runtime_of(request)
    try:
        await asyncio.wait_for(
            run_in_threadpool(runtime.store.ping), timeout=READINESS_TIMEOUT_SECONDS
        )
        revision = await run_in_threadpool(current_revision, runtime.engine)
    except (StoreUnavailable, TimeoutError, OSError) as exc:
        reason = exc.message if isinstance(exc, TaskRelayError) else "database did not answer"
        return json_response({"status": "unavailable", "reason": reason}, status_code=503)
    except Exception:
        log.exception("readiness check failed")
        return json_response(
            {"status": "unavailable", "reason": "database check failed"}, status_code=503
        )
    expected = request.app.state.schema_head
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


def poll_policies(
    settings: Settings, adapters: Mapping[str, ProviderAdapter]
) -> dict[str, PollPolicy]:
    return {
        name: PollPolicy(
            typical_duration=provider.typical_duration,
            deadline=provider.deadline,
            grace=settings.poll_grace,
            max_interval=settings.poll_max_interval,
            queryable=adapters[name].can_query_status,
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
) -> Starlette:
    """Build the service. ``clock``, ``monotonic``, ``sleep`` and ``http_transport`` are seams
    for tests (the sandbox, when mounted, runs on the same clock)."""
    if not settings.api_tokens:
        raise SettingsError(
            "TASKRELAY_API_TOKENS is empty: set it to name:token pairs, one per API client "
            "(e.g. TASKRELAY_API_TOKENS=myapp:$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')).",
            details={"variable": "TASKRELAY_API_TOKENS"},
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size)
        http = httpx.AsyncClient(
            timeout=UPSTREAM_TIMEOUT,
            limits=UPSTREAM_LIMITS,
            transport=http_transport,
            follow_redirects=False,
        )
        adapters = build_adapters(settings, http)
        store = Store(
            engine,
            clock=clock,
            audit_bytes=settings.callback_audit_bytes,
            policies=poll_policies(settings, adapters),
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
        )
        sandbox: Any = None
        if settings.sandbox:
            from service.sandbox import Sandbox

            sandbox = Sandbox(http, clock=monotonic, sleep=sleep)
            app.state.sandbox = sandbox
        address_policy = AddressPolicy(
            allowed_networks=parse_networks(settings.webhook_allowed_networks)
        )
        # Subscriber deliveries: no proxies from the environment, no redirects, and every
        # connection checked against the address policy at connect time (no DNS rebinding).
        webhook_http = httpx.AsyncClient(
            transport=webhook_transport or guarded_transport(address_policy),
            trust_env=False,
            follow_redirects=False,
            timeout=DELIVERY_TIMEOUT,
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
        committer = GroupCommitter(store, max_batch=settings.write_batch)
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
        )
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
            await scheduler.start()
        if settings.dispatcher:
            await dispatcher.start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and finished the requests in flight. Status
            # queries, submissions and deliveries in flight finish side by side within one
            # grace; the leases of whatever is left are released for the next process.
            stopping = [submitter.stop(grace=WORKER_STOP_GRACE_SECONDS)]
            if settings.scheduler:
                stopping.append(scheduler.stop(grace=WORKER_STOP_GRACE_SECONDS))
            if settings.dispatcher:
                stopping.append(dispatcher.stop(grace=WORKER_STOP_GRACE_SECONDS))
            await asyncio.gather(*stopping)
            await committer.stop()
            await event_signal.stop()
            await webhook_http.aclose()
            if sandbox is not None:
                await sandbox.aclose()
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
    app.state.openapi = build_openapi()
    # Read the migration scripts once, not on every readiness probe.
    app.state.schema_head = head_revision(settings.database_url)
    return app


def tune_process() -> None:
    """Process-wide settings for a threaded server (each uvicorn worker calls this once)."""
    # The GIL's hand-over interval (5 ms by default) is a floor on how long a thread that
    # finished a database call waits to run again while the event loop is busy; the group
    # committer, the dispatcher's transactions and SQLite's single write turn all pay it.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    # glibc gives threads that allocate at the same time malloc arenas of their own (up to 8
    # per core), each keeping the pages freed in it: over a 10-minute run that made RSS grow
    # ~11 % with no live object growing (bench/memory.py). Two arenas hold it under 5 %. An
    # explicit MALLOC_ARENA_MAX in the environment wins; other C libraries have no mallopt.
    if sys.platform == "linux" and "MALLOC_ARENA_MAX" not in os.environ:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def create_app_from_env() -> Starlette:
    """The uvicorn factory (``service.app:create_app_from_env``): settings from the environment."""
    tune_process()
    settings = load_settings()
    app = create_app(settings)
    # Everything imported and built so far lives as long as the process: move it out of the
    # cyclic collector's way, so that its full collections, which otherwise walk it all, stop
    # adding ~25 ms to the occasional request (bench/store_scale.py: list p99 30 -> 6 ms).
    gc.collect()
    gc.freeze()
    return app
