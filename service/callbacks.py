"""The callback endpoint: ``POST /callbacks/{provider}/{token}``.

Providers do not sign their callbacks, so the signed token in the URL is the proof. The
endpoint is a thin shell around two pure steps: :func:`verify` (token -> the task it names, or a
typed error) and :func:`parse` (body -> a normalised update, or a typed error). Then one transaction
applies the update and keeps the raw body. A 2xx goes out only after that commit, and no
outbound call happens before answering.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import observe
from service.errors import (
    BadRequest,
    CallbackParseError,
    CallbackProviderMismatch,
    CallbackTokenExpired,
    CallbackTokenInvalid,
    ClientGone,
    Conflict,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
)
from service.groupcommit import Overloaded
from service.ingest import UpdateRequest
from service.lifecycle import TaskUpdate
from service.models import UpdateSource
from service.providers.base import ProviderAdapter
from service.runtime import Runtime, runtime_of
from service.signing import CallbackClaim, CallbackSigner
from service.store import ReceiptDraft
from service.web import BodyTooLarge, json_response, read_body

log = logging.getLogger(__name__)


def verify(
    signer: CallbackSigner, adapters: Mapping[str, ProviderAdapter], provider: str, token: str
) -> CallbackClaim:
    if provider not in adapters:
        raise NotFound(
            f"Unknown provider {provider!r} in the callback URL; "
            f"known providers: {', '.join(adapters)}."
        )
    return signer.verify(token, provider)


def parse(adapter: ProviderAdapter, headers: Mapping[str, str], body: bytes) -> TaskUpdate:
    """The provider adapter's reading of a callback body (pure; CallbackParseError if none)."""
    return adapter.parse_callback(body, headers)


# What became of a callback that was not recorded as applied/unchanged/terminal (metrics).
_FAILURES: tuple[tuple[type[Exception], str], ...] = (
    (CallbackTokenExpired, "expired_token"),
    (CallbackTokenInvalid, "invalid_token"),
    (CallbackProviderMismatch, "wrong_provider"),
    (NotFound, "not_found"),
    (PayloadTooLarge, "too_large"),
    (ClientGone, "client_gone"),
    (CallbackParseError, "rejected"),
    (Conflict, "rejected"),
    (BadRequest, "rejected"),
    (Overloaded, "overloaded"),
    (StoreUnavailable, "unavailable"),
)


def failure_outcome(exc: Exception) -> str:
    for kind, outcome in _FAILURES:
        if isinstance(exc, kind):
            return outcome
    return "error"


async def receive_callback(request: Request) -> Response:
    runtime = runtime_of(request)
    provider = request.path_params["provider"]
    # A label only for the providers there are: the path is the sender's to choose.
    label = provider if provider in runtime.adapters else "unknown"
    started = time.perf_counter()
    outcome = "error"
    try:
        response, outcome = await _receive(request, runtime, provider)
        return response
    except Exception as exc:
        outcome = failure_outcome(exc)
        raise
    finally:
        runtime.metrics.inc("callbacks_total", provider=label, outcome=outcome)
        elapsed = time.perf_counter() - started
        runtime.metrics.observe("callback_duration_seconds", elapsed, provider=label)


async def _receive(request: Request, runtime: Runtime, provider: str) -> tuple[Response, str]:
    token = request.path_params["token"]
    content_type = request.headers.get("content-type")
    # The token is checked before the body is read: a forged URL costs us nothing.
    claim = verify(runtime.signer, runtime.adapters, provider, token)
    observe.bind(task_id=claim.task_id, provider=provider)
    try:
        body = await read_body(request, runtime.settings.max_body_bytes, keep_prefix=True)
    except BodyTooLarge as exc:
        draft = ReceiptDraft(provider, exc.prefix, content_type, error=exc.message, size=exc.size)
        await run_in_threadpool(runtime.store.record_rejected_callback, claim.task_id, draft)
        raise
    try:
        update = parse(runtime.adapters[provider], request.headers, body)
    except CallbackParseError as exc:
        draft = ReceiptDraft(provider, body, content_type, error=exc.message)
        await run_in_threadpool(runtime.store.record_rejected_callback, claim.task_id, draft)
        log.info("callback for %s rejected: %s", claim.task_id, exc.message)
        raise
    draft = ReceiptDraft(provider, body, content_type)
    request_ = UpdateRequest(claim.task_id, update, UpdateSource.callback, draft)
    applied = await runtime.committer.apply(request_)
    response = json_response(
        {
            "received": True,
            "task_id": claim.task_id,
            "status": applied.task["status"],
            "outcome": applied.outcome.value,
        }
    )
    return response, applied.outcome.value


routes = [Route("/callbacks/{provider}/{token}", receive_callback, methods=["POST"])]
