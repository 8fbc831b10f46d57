"""Request ids and the log context: what every log line is about.

Every HTTP request gets a request id: the caller's ``X-Request-ID`` when it is a safe, short
token, a fresh one otherwise. It is returned in the response's ``X-Request-ID`` and kept in a
context variable for the request's duration, together with the task id and provider once an
endpoint knows them (:func:`bind`); ``service.logs`` stamps them on every log line. Background
work (scheduler, submitter, dispatcher) binds the task it is working on the same way. asyncio
tasks and ``run_in_threadpool`` copy the context, so their lines carry it too; threads started
by hand (the group-commit writer) do not.

The middleware is plain ASGI (no ``BaseHTTPMiddleware``, which costs a task and a stream per
request), and sits outside Starlette's error middleware, so a 500 carries the id as well.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
from contextvars import ContextVar
from typing import NamedTuple

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID = 128
# Safe in a header, a log line and a shell: letters, digits and a few separators (UUIDs,
# hex, base64 and ULIDs all fit). Anything else is replaced, never echoed.
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,%d}" % MAX_REQUEST_ID)


class LogContext(NamedTuple):
    """What a log line is about; immutable, so a copy of the context never sees later binds."""

    request_id: str | None = None
    task_id: str | None = None
    provider: str | None = None


_EMPTY = LogContext()
log_context: ContextVar[LogContext] = ContextVar("taskrelay_log_context", default=_EMPTY)


def bind(*, task_id: str | None = None, provider: str | None = None) -> None:
    """Name the task (and its provider) the current request or background job works on."""
    current = log_context.get()
    log_context.set(
        current._replace(task_id=task_id or current.task_id, provider=provider or current.provider)
    )


def current() -> LogContext:
    return log_context.get()


# Request ids need to be unique, not secret: a generator of our own (no syscall per request,
# unlike os.urandom), which nobody else reseeds (tests seed the global one), reseeded in a
# forked child so two workers never share a sequence.
_ids = random.Random()
if hasattr(os, "register_at_fork"):  # Unix
    os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """128 random bits as 32 hex digits (the format of nginx's ``$request_id``)."""
    return f"{_ids.getrandbits(128):032x}"


def accepted_request_id(value: bytes | None) -> str | None:
    """The caller's request id when it is safe to keep and echo; None otherwise."""
    # fullmatch: "$" would let a trailing newline through.
    if value is None or not _REQUEST_ID_RE.fullmatch(value):
        return None
    return value.decode("ascii")


class RequestIds:
    """Pure ASGI middleware: a request id per HTTP request, in the log context and echoed in
    the ``X-Request-ID`` response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                incoming = value
                break
        request_id = accepted_request_id(incoming) or new_request_id()
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # A new list: a Response object may be sent more than once.
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = log_context.set(LogContext(request_id=request_id))
        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError as exc:
            # uvicorn cancels the requests still running when its graceful drain ends (a body
            # that never finishes arriving, say): it then answered a bare "500 Internal Server
            # Error" without this id, and logged the cancellation as an error with its
            # traceback. Answered here, a 503 saying what happened; the cancellation ends
            # with this request's task, which uvicorn only waits for. Only that one: a request
            # run in its caller's task (httpx's ASGITransport: the mounted sandbox called in
            # process) is cancelled with its caller, who must see the cancellation.
            if started or not _drain_ended(exc):
                raise
            from starlette.requests import Request

            from service.web import route_path  # here: web imports this module

            # The route's template, never the path: a callback's carries its token.
            log.warning(
                "request cut off by the shutdown before it was answered: %s %s",
                scope.get("method"),
                route_path(Request(scope)),
            )
            await send_with_id(dict(_CUT_OFF_START))  # a copy: its headers get the id
            await send_with_id(_CUT_OFF_BODY)
            return
        # Reset only after a normal return: on an exception the id stays bound, so the
        # server's own "Exception in ASGI application" line carries it too. Each request runs
        # in a task of its own, whose context ends with it.
        log_context.reset(token)


# What uvicorn cancels a request's task with when its graceful drain ends (uvicorn/server.py).
_DRAIN_ENDED = "timeout graceful shutdown exceeded"


def _drain_ended(exc: asyncio.CancelledError) -> bool:
    """Whether this is uvicorn cancelling the request at the end of its graceful drain."""
    return any(isinstance(arg, str) and _DRAIN_ENDED in arg for arg in exc.args)


_CUT_OFF = json.dumps(
    {
        "error": {
            "code": "cut_off_by_shutdown",
            "message": "TaskRelay shut down before this request was answered, and it may or "
            "may not have been recorded. Send it again (a callback is applied once; a task "
            "submission with its Idempotency-Key creates nothing twice).",
            "details": None,
        }
    }
).encode()
_CUT_OFF_START: Message = {
    "type": "http.response.start",
    "status": 503,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_CUT_OFF)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ],
}
_CUT_OFF_BODY: Message = {"type": "http.response.body", "body": _CUT_OFF}


class ObservedStarlette(Starlette):
    """Starlette with :class:`RequestIds` outermost, outside even the error middleware that
    turns an unhandled exception into a 500 (and logs it)."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestIds(super().build_middleware_stack())
