"""The ASGI application: routes, error mapping, and the lifespan that owns every shared
resource (database engine, httpx client, provider adapters, background workers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
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

from service import api, callbacks, files
from service.auth import ApiClients
from service.db import current_revision, head_revision, make_engine
from service.errors import SettingsError, StoreUnavailable, TaskRelayError
from service.files import ImageFiles
from service.models import utcnow
from service.openapi import build_openapi
from service.providers import build_adapters
from service.retry import submit_backoff
from service.runtime import Runtime, runtime_of
from service.settings import Settings, load_settings
from service.signing import CallbackSigner
from service.store import Store
from service.submitter import Submitter
from service.web import (
    handle_http_exception,
    handle_taskrelay_error,
    handle_unexpected,
    json_response,
)

log = logging.getLogger(__name__)

# Outbound calls to providers: explicit limits for each phase of a request.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=5.0)
UPSTREAM_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=50)
READINESS_TIMEOUT_SECONDS = 3.0


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
    expected = head_revision(runtime.settings.database_url)
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


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utcnow,
    http_transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """Build the service. ``clock`` and ``http_transport`` are seams for tests."""
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
        store = Store(engine, clock=clock, audit_bytes=settings.callback_audit_bytes)
        signer = CallbackSigner(
            settings.secret_key.reveal(),
            [key.reveal() for key in settings.secret_key_fallbacks],
            max_age=settings.callback_token_ttl,
        )
        adapters = build_adapters(settings, http)
        image_files = ImageFiles(settings.files_dir, settings.public_url)
        submitter = Submitter(
            store,
            adapters,
            signer,
            image_files,
            public_url=settings.public_url,
            backoff=submit_backoff(settings.submit_backoff, settings.submit_attempts),
        )
        sandbox: Any = None
        if settings.sandbox:
            from service.sandbox import Sandbox

            sandbox = Sandbox(http)
            app.state.sandbox = sandbox
        app.state.runtime = Runtime(
            settings=settings,
            engine=engine,
            store=store,
            http=http,
            adapters=adapters,
            signer=signer,
            clients=ApiClients(settings.api_tokens),
            files=image_files,
            submitter=submitter,
        )
        try:
            await submitter.resume()
        except StoreUnavailable:
            log.error("could not resume unsent submissions: the database is unavailable")
        log.info(
            "TaskRelay ready",
            extra={
                "public_url": settings.public_url,
                "database": engine.dialect.name,
                "sandbox": settings.sandbox,
            },
        )
        try:
            yield
        finally:
            await submitter.stop()
            if sandbox is not None:
                await sandbox.aclose()
            await http.aclose()
            engine.dispose()

    routes: list[Route | Mount] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *api.routes,
        *callbacks.routes,
        *files.routes,
    ]
    if settings.sandbox:
        routes.append(Mount("/sandbox", app=_sandbox_asgi))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            TaskRelayError: handle_taskrelay_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
    )
    app.state.openapi = build_openapi()
    return app


def create_app_from_env() -> Starlette:
    """The uvicorn factory (``service.app:create_app_from_env``): settings from the environment."""
    settings = load_settings()
    return create_app(settings)
