"""HTTP plumbing shared by every endpoint: bounded body reading, JSON in and out, and the one
place where errors become responses.

Every error response has the shape ``{"error": {"code", "message", "details"}}``; no stack trace
ever leaves the process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from service.errors import (
    BadRequest,
    ClientGone,
    PayloadTooLarge,
    TaskRelayError,
    UnsupportedMediaType,
)
from service.providers.parsing import (
    MAX_JSON_DEPTH,
    UnstorableJSON,
    depth_ok,
    loads_storable,
    too_deep,
    too_many,
    too_many_values,
)

log = logging.getLogger(__name__)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
}


class BodyTooLarge(PayloadTooLarge):
    """Raised by :func:`read_body`; ``prefix`` is what was read before giving up."""

    def __init__(self, message: str, prefix: bytes, size: int) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.size = size  # the declared size, or how much had arrived when reading stopped


def json_response(
    data: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(data, status_code=status_code, headers=headers)


def error_response(exc: TaskRelayError) -> Response:
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="taskrelay"'
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float) and math.isfinite(retry_after):
        # Rounded up: a client that waits exactly this long must not come back too early.
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    headers.update(getattr(exc, "headers", None) or {})
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


async def read_body(request: Request, limit: int, *, keep_prefix: bool = False) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes without buffering it all.

    With ``keep_prefix`` an oversized body is still read up to ``limit`` bytes, so the caller
    can keep its start for audit; otherwise a too-large Content-Length is refused unread."""
    declared = request.headers.get("content-length")
    too_large = (
        f"The request body is larger than the {limit}-byte limit; send a smaller body "
        "(the limit is TASKRELAY_MAX_BODY_BYTES)."
    )
    declared_size = 0
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise BadRequest("The Content-Length header is not a number.") from None
        if declared_size > limit and not keep_prefix:
            raise BodyTooLarge(too_large, b"", declared_size)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks.append(chunk)
                raise BodyTooLarge(too_large, b"".join(chunks)[:limit], max(size, declared_size))
            chunks.append(chunk)
    except ClientDisconnect:
        # Anyone can do this at will: one quiet line, not an error with its traceback.
        log.info(
            "%s %s: the client went away after %d bytes of its body",
            request.method,
            route_path(request),
            size,
        )
        raise ClientGone(
            "The connection closed before the whole request body arrived; nothing was done."
        ) from None
    return b"".join(chunks)


def decode_json(body: bytes, *, what: str = "request body") -> Any:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"The {what} is not UTF-8 encoded.", code="invalid_encoding") from exc
    if not text.strip():
        raise BadRequest(f"The {what} is empty; send a JSON object.", code="invalid_json")
    if too_many_values(text):
        raise BadRequest(too_many(what), code="invalid_json")
    try:
        value = loads_storable(text)
    except UnstorableJSON as exc:
        raise BadRequest(f"The {what} cannot be accepted: {exc}.", code="invalid_json") from exc
    except RecursionError as exc:
        raise BadRequest(too_deep(MAX_JSON_DEPTH, what), code="invalid_json") from exc
    except ValueError as exc:
        raise BadRequest(f"The {what} is not valid JSON: {exc}.", code="invalid_json") from exc
    if not depth_ok(value, MAX_JSON_DEPTH):
        raise BadRequest(too_deep(MAX_JSON_DEPTH, what), code="invalid_json")
    return value


async def read_json_object(
    request: Request, limit: int, *, optional: bool = False
) -> dict[str, Any]:
    """A management API body: ``application/json`` (415 otherwise), bounded, a JSON object.
    ``optional``: an empty body (any content type) is an empty object."""
    # Read first only when it may be empty: otherwise the content type is refused unread.
    raw = await read_body(request, limit) if optional else None
    if raw is not None and not raw.strip():
        return {}
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"Send the body as JSON with 'Content-Type: application/json' "
            f"(got {content_type or 'no Content-Type'!r})."
        )
    value = decode_json(raw if raw is not None else await read_body(request, limit))
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return value


async def handle_taskrelay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TaskRelayError)
    if exc.status >= 500:
        # One line per failed request, never a traceback: the message says what is wrong (a
        # full or read-only database, an outage) in the words the client gets too.
        log.warning(
            "request failed: %s %s -> %s %s: %s",
            request.method,
            route_path(request),
            exc.status,
            exc.code,
            exc.message,
        )
    return error_response(exc)


def route_path(request: Request) -> str:
    """The matched route's template (``/callbacks/{provider}/{token}``), never the concrete path:
    callback paths carry tokens, which must not reach the logs."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Starlette's router records the matched endpoint, not the route: find the route by it.
    endpoint = request.scope.get("endpoint")
    if endpoint is not None:
        for candidate in getattr(request.app, "routes", ()):
            candidate_path = getattr(candidate, "path", None)
            if getattr(candidate, "endpoint", None) is endpoint and isinstance(candidate_path, str):
                return candidate_path
    return "(unmatched route)"


def _shown_path(request: Request) -> str:
    """The request's path for an error message, with whatever may be a callback token left
    out: answers end up in proxies' and clients' logs too."""
    path = request.url.path
    if not path.startswith("/callbacks/"):
        return path
    segments = path.split("/")  # "", "callbacks", provider, token, ...
    return "/".join([*segments[:3], "…"]) if len(segments) > 3 else "/callbacks/…"


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    if exc.status_code == 404:
        message = f"No endpoint at {_shown_path(request)}; see /openapi.json for the API."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {_shown_path(request)}."
    body = {"error": {"code": code, "message": message, "details": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, route_path(request))
    body = {
        "error": {
            "code": "internal_error",
            "message": "TaskRelay hit an unexpected error. "
            "Retrying is safe: updates are idempotent.",
            "details": None,
        }
    }
    return JSONResponse(body, status_code=500)


Endpoint = Callable[[Request], Awaitable[Response]]


def by_method(path: str, **endpoints: Endpoint) -> Route:
    """One route for a path that takes several methods (``GET=list_tasks, POST=create_task``).
    Starlette answers a method no route takes with a 405 whose ``Allow`` names the methods of
    the first route whose path matched: routes split by method would name only some."""
    handlers = {method.upper(): endpoint for method, endpoint in endpoints.items()}
    if "GET" in handlers:
        handlers["HEAD"] = handlers["GET"]  # as Starlette's Route adds HEAD to GET

    async def dispatch(request: Request) -> Response:
        return await handlers[request.method](request)

    dispatch.__name__ = dispatch.__qualname__ = "_or_".join(
        endpoint.__name__ for endpoint in endpoints.values()
    )
    return Route(path, dispatch, methods=list(handlers))


class _Reserved(Route):
    """A route that answers every method on its path: see :func:`reserved`."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        # A method it does not take is its own 405 (Route.handle), not the next route's.
        return (Match.FULL if match is Match.PARTIAL else match), child_scope


def reserved(path: str, **endpoints: Endpoint) -> Route:
    """:func:`by_method` for a literal path that a later route's pattern matches too
    (``/v1/tasks/track`` and ``/v1/tasks/{task_id}``). Starlette would hand a method this
    route does not take to that one (GET /v1/tasks/track: "no task 'track'", a 404); this
    route answers it 405, naming the methods it takes."""
    route = by_method(path, **endpoints)
    return _Reserved(route.path, route.endpoint, methods=list(route.methods or ()))
