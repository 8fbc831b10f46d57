"""Serving the sandbox alone with uvicorn (``taskrelay sandbox``, ``python -m service.sandbox``).

Standalone, the providers are at ``http://<host>:<port>/<provider>`` and the control API at
``http://<host>:<port>/_sandbox/``. The host owns the httpx client used for callbacks: here that
is this module, which opens it before serving and closes it at shutdown.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from service.sandbox.app import Sandbox
from service.sandbox.behaviour import SandboxBehaviour

log = logging.getLogger(__name__)

# Callbacks carry their own per-request timeout (SandboxBehaviour.callback_timeout).
CALLBACK_CLIENT_TIMEOUT = 10.0
# On SIGTERM, how long requests in flight may take: an emulator has nothing to finish, and a
# query it leaves hanging on purpose (``status_error=timeout``, ``status_latency``) would
# otherwise hold its exit for uvicorn's default of waiting forever.
GRACEFUL_SHUTDOWN_SECONDS = 1


def standalone_app(
    *, api_key: str = "sandbox-key", behaviour: Mapping[str, SandboxBehaviour] | None = None
) -> Starlette:
    """The sandbox at ``/``, with a lifespan that closes its callback client and senders."""
    http = httpx.AsyncClient(timeout=CALLBACK_CLIENT_TIMEOUT)
    sandbox = Sandbox(http, api_key=api_key, behaviour=behaviour)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sandbox.aclose()
            await http.aclose()

    app = Starlette(routes=[Mount("/", app=sandbox.app)], lifespan=lifespan)
    app.state.sandbox = sandbox
    return app


def run(
    host: str,
    port: int,
    *,
    api_key: str = "sandbox-key",
    behaviour: Mapping[str, SandboxBehaviour] | None = None,
) -> None:
    """Serve the sandbox with uvicorn until interrupted."""
    import uvicorn

    log.info("sandbox: providers at http://%s:%d/<provider>, control at /_sandbox/", host, port)
    uvicorn.run(
        standalone_app(api_key=api_key, behaviour=behaviour),
        host=host,
        port=port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # The caller's log set-up (taskrelay sandbox: JSON lines, as serve's), no access log.
        log_config=None,
        access_log=False,
    )
